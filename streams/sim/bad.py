"""Invalid messages for testing the dead-letter path.

``bad_messages(rng, n)`` returns ``n`` :class:`BadMessage` tuples ``(raw, key, reason)``:
the bytes to send (``None`` = a tombstone), the Kafka key, and the ``Rejection.reason``
that ``streams.events.decode`` must give for them when read from the topic of
``BadMessage.kind`` with default limits and a ``now`` between ``ts`` (the event time of
the otherwise-valid bodies, default late 2023) and the year 2100.

Note: with default limits an over-long review text fails the schema (``bad_field``);
``text_too_long``: review text over CLV_MAX_TEXT_CHARS (default 5000).
"""
from __future__ import annotations

import json
import random
from typing import Callable, NamedTuple

from streams.events import EVENT_TYPES

FAR_FUTURE = 4102444800.0  # 2100-01-01
_T0 = 1_700_000_000.0  # 2023-11-14: default event time of otherwise-valid bodies


class BadMessage(NamedTuple):
    raw: bytes | None
    key: bytes | None
    reason: str  # the Rejection.reason decode() returns

    @property
    def kind(self) -> str:
        """The event type the message claims (so it goes to that type's topic), else click."""
        try:
            claimed = json.loads(self.raw).get("type") if self.raw else None
        except (ValueError, AttributeError):
            return "click"
        return claimed if claimed in EVENT_TYPES else "click"


def _body(r: random.Random, uid: str, ts: float, kind: str | None = None) -> dict:
    """A valid event body of ``kind`` (random when None) to be broken afterwards."""
    kind = kind or r.choice(("click", "order", "review", "profile"))
    d = {"schema": 1, "event_id": f"bad-{r.getrandbits(48):012x}", "user_id": uid,
         "ts": ts - r.uniform(0, 3600.0), "type": kind}
    if kind == "click":
        d.update(action="view", item_id="books-001", category="books")
    elif kind == "order":
        d.update(order_id=f"bad-o-{r.getrandbits(32):08x}", amount=19.99, currency="USD",
                 items=[{"item_id": "books-001", "category": "books", "qty": 1, "price": 19.99}])
    elif kind == "review":
        d.update(item_id="books-001", rating=4, text="Nice book.")
    else:
        d.update(region="north")
    return d


def _j(d: dict) -> bytes:
    return json.dumps(d, allow_nan=True).encode()


# each maker: (rng, user_id, ts) -> (raw, key, reason); key defaults to the user id
def _random_bytes(r, uid, ts):
    return bytes([r.randint(0x80, 0xFF)]) + r.randbytes(r.randint(0, 200)), uid.encode(), "invalid_json"


def _invalid_utf8(r, uid, ts):
    raw = _j(_body(r, uid, ts, "review")).replace(b"Nice book.", b"Nice \xff\xfe book.")
    return raw, uid.encode(), "invalid_json"


def _truncated(r, uid, ts):
    raw = _j(_body(r, uid, ts))
    return raw[: r.randint(1, len(raw) - 2)], uid.encode(), "invalid_json"


def _not_an_object(r, uid, ts):
    return r.choice((b"[1, 2, 3]", b'"click"', b"42", b"null", b"true")), uid.encode(), "bad_field"


def _wrong_type(r, uid, ts):
    kind = r.choice(("click", "order", "review"))
    d = _body(r, uid, ts, kind)
    field, value = r.choice({
        "click": (("ts", "yesterday"), ("action", 7), ("item_id", {"id": 1})),
        "order": (("amount", "lots"), ("items", "books-001"), ("order_id", ["o1"])),
        "review": (("rating", "five"), ("rating", 4.5), ("text", {"body": "hi"})),
    }[kind])
    d[field] = value
    return _j(d), uid.encode(), "bad_field"


def _missing_field(r, uid, ts):
    kind = r.choice(("click", "order", "review"))
    d = _body(r, uid, ts, kind)
    required = {"click": ("event_id", "user_id", "ts", "action", "type"),
                "order": ("event_id", "ts", "order_id", "amount", "type"),
                "review": ("event_id", "item_id", "rating", "type")}[kind]
    del d[r.choice(required)]
    return _j(d), uid.encode(), "missing_field"


def _bad_number(r, uid, ts):
    d = _body(r, uid, ts, "order")
    field, value = r.choice((("amount", float("nan")), ("amount", -r.uniform(1, 500)),
                             ("amount", float("inf")), ("ts", float("nan"))))
    d[field] = value
    return _j(d), uid.encode(), "bad_field"


def _huge_amount(r, uid, ts):
    d = _body(r, uid, ts, "order")
    d["amount"] = r.uniform(2e6, 1e9)
    return _j(d), uid.encode(), "bad_amount"


def _bad_timestamp(r, uid, ts):
    d = _body(r, uid, ts)
    d["ts"] = r.choice((FAR_FUTURE + r.uniform(0, 1e9), r.uniform(0, 6e8),  # 2100+, before 1990
                        d["ts"] * 1000.0))  # milliseconds by mistake
    return _j(d), uid.encode(), "bad_timestamp"


def _long_text(r, uid, ts):
    d = _body(r, uid, ts, "review")
    d["text"] = "This is far too long. " * r.randint(300, 2000)  # 6.6k-44k chars
    return _j(d), uid.encode(), "text_too_long"  # over CLV_MAX_TEXT_CHARS (5000)


def _too_large(r, uid, ts):
    d = _body(r, uid, ts, "review")
    d["text"] = "x" * (300 * 1024)
    return _j(d), uid.encode(), "too_large"


def _unknown_type(r, uid, ts):
    d = _body(r, uid, ts)
    d["type"] = r.choice(("refund", "pageview", "ORDER", ""))
    return _j(d), uid.encode(), "unknown_type"


def _unknown_schema(r, uid, ts):
    d = _body(r, uid, ts)
    d["schema"] = r.choice((0, 2, 3, 99))
    return _j(d), uid.encode(), "unsupported_schema"


def _key_mismatch(r, uid, ts):
    return _j(_body(r, uid, ts)), f"{uid}-other".encode(), "key_mismatch"


def _tombstone(r, uid, ts):
    return None, uid.encode(), "empty"


MAKERS: dict[str, Callable] = {
    "random_bytes": _random_bytes, "invalid_utf8": _invalid_utf8, "truncated": _truncated,
    "not_an_object": _not_an_object, "wrong_type": _wrong_type, "missing_field": _missing_field,
    "bad_number": _bad_number, "huge_amount": _huge_amount, "bad_timestamp": _bad_timestamp,
    "long_text": _long_text, "too_large": _too_large, "unknown_type": _unknown_type,
    "unknown_schema": _unknown_schema, "key_mismatch": _key_mismatch, "tombstone": _tombstone,
}
# relative frequency of each kind; the very large ones are rare on purpose
WEIGHTS = {name: 1.0 for name in MAKERS} | {"too_large": 0.1, "long_text": 0.5}


def bad_messages(rng: random.Random, n: int, *, users: int = 1000,
                 kinds: tuple[str, ...] | None = None, ts: float | None = None) -> list[BadMessage]:
    """``n`` invalid messages of mixed kinds (see ``MAKERS``), keyed like real users.

    ``ts``: event time for the parts that are valid (so only the broken part is wrong
    for a decoder whose ``now`` is near it); default 2023-11-14.
    """
    t = _T0 if ts is None else ts
    names = list(kinds or MAKERS)
    unknown = [k for k in names if k not in MAKERS]
    if unknown:
        raise ValueError(f"unknown bad-message kind(s) {unknown}; choose from {sorted(MAKERS)}")
    weights = [WEIGHTS[k] for k in names]
    out = []
    for _ in range(n):
        uid = f"u{rng.randrange(users):06d}"
        out.append(BadMessage(*MAKERS[rng.choices(names, weights)[0]](rng, uid, t)))
    return out
