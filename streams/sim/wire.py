"""From simulated events to wire messages: duplicates and bad messages mixed in, JSONL out.

A :class:`Message` is what one Kafka record carries: the event type (which picks the
topic), the key (the user id) and the value (``streams.events.encode`` bytes), plus a
``label`` saying what it is: ``"event"``, ``"duplicate"`` (a re-send of an earlier
event's exact bytes, a few messages later, as a retrying producer would) or, for an
injected bad message, the ``Rejection.reason`` the decoder must give.
"""
from __future__ import annotations

import random
from collections import deque
from typing import IO, Iterable, Iterator, NamedTuple

import orjson

from streams.events import encode
from streams.sim.bad import bad_messages

EVENT, DUPLICATE = "event", "duplicate"


class Message(NamedTuple):
    kind: str  # click | order | review | profile: selects the topic
    key: bytes | None
    value: bytes | None
    label: str = EVENT


def as_messages(items: Iterable) -> Iterator[Message]:
    """Accept typed events, ``(kind, key, value)`` triples or :class:`Message` s."""
    for it in items:
        if isinstance(it, Message):
            yield it
        elif isinstance(it, tuple):
            yield Message(*it)
        else:
            yield Message(it.type, it.user_id.encode(), encode(it))


def mix(messages: Iterable, *, duplicates: float = 0.0, bad: float = 0.0, seed: int = 0,
        users: int = 1000, max_delay: int = 3) -> Iterator[Message]:
    """Pass ``messages`` through, re-sending a ``duplicates`` fraction of them 0-``max_delay``
    messages later and adding a bad message after a ``bad`` fraction of them.

    Deterministic for a seed. A duplicate repeats the original's key and bytes exactly, so
    the consumer sees the same ``event_id`` twice (the fold's dedupe ring must drop it).
    """
    for name, f in (("duplicates", duplicates), ("bad", bad)):
        if not 0.0 <= f <= 1.0:
            raise ValueError(f"--{name} is a fraction of the events, between 0 and 1; got {f}")
    rng = random.Random(f"clv-sim-wire:{seed}")
    pending: deque[tuple[int, Message]] = deque()  # (send after this many messages, msg)
    sent = 0
    for msg in as_messages(messages):
        yield msg
        sent += 1
        if duplicates and rng.random() < duplicates:
            pending.append((sent + rng.randint(0, max_delay), msg._replace(label=DUPLICATE)))
        if bad and rng.random() < bad:
            b = bad_messages(rng, 1, users=users, ts=_ts_of(msg.value))[0]
            yield Message(b.kind, b.key, b.raw, b.reason)
        while pending and pending[0][0] <= sent:
            yield pending.popleft()[1]
    while pending:
        yield pending.popleft()[1]


def _ts_of(value: bytes | None) -> float | None:
    """The event time of an encoded event (so injected bad messages are broken only where
    intended, not also by a timestamp far from the stream's)."""
    try:
        ts = orjson.loads(value)["ts"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return None
    return ts if isinstance(ts, (int, float)) else None


def write_jsonl(messages: Iterable[Message], fh: IO[bytes]) -> int:
    """Write message values one per line (tombstones are skipped: a file has no key/value
    split; a newline byte inside a bad message becomes a space). Returns lines written."""
    n = 0
    for m in messages:
        if m.value is None:
            continue
        fh.write(m.value.replace(b"\n", b" ") if b"\n" in m.value else m.value)
        fh.write(b"\n")
        n += 1
    return n
