"""Hostile messages with the reason the worker must give each (an oracle independent of the
decoder: a wrong reason is a finding, not something to copy from ``decode``).

``hostile(rng, n, users, ts)`` returns ``n`` :class:`streams.simulate.Message` s whose
``label`` is the expected ``Rejection.reason`` and whose ``kind`` picks the topic. Kinds of
damage (``KINDS``): random bytes, invalid UTF-8, lone surrogates, truncated JSON, deep
nesting, non-objects, wrong types, missing fields, NaN / infinite / negative / overflowing /
huge amounts, far-future / pre-1990 / millisecond timestamps, texts over the char limit,
messages of 300 KB - 1 MB (over CLV_MAX_MESSAGE_BYTES; the largest ones are bigger than what
the worker's own producer may send, so a DLQ copy of the full bytes is impossible), unknown
event types, valid events of unknown schema versions, key / user mismatches (also with keys of
up to 200 KB), events on the wrong topic, tombstones.

``junk_fields(ev_bytes, rng)`` adds unknown fields to a valid event (it must still be
applied: the schema ignores unknown fields).
"""
from __future__ import annotations

import json
import random
import time

from streams.simulate import Message
from streams.sim.bad import MAKERS, BadMessage, bad_messages

FAR_FUTURE = 4102444800.0  # 2100-01-01
MAX_MESSAGE_BYTES = 256 * 1024  # Settings.max_message_bytes default
TOPIC_OF_TYPE = ("click", "order", "review", "profile")

# relative weights: the big ones are rare (each is up to ~1 MB through Kafka)
WEIGHTS = {
    "random_bytes": 8, "invalid_utf8": 6, "lone_surrogate": 4, "truncated": 6, "deep_nesting": 2,
    "not_an_object": 4, "wrong_type": 10, "missing_field": 8, "bad_number": 8, "huge_amount": 4,
    "bad_timestamp": 8, "long_text": 3, "too_large": 0.05, "dlq_oversize": 0.02,
    "unknown_type": 6, "unknown_schema": 6, "key_mismatch": 4, "huge_key": 0.05, "wrong_topic": 4,
    "tombstone": 2,
    "simulator": 6,
}
KINDS = tuple(WEIGHTS)


def _body(r: random.Random, uid: str, ts: float, kind: str) -> dict:
    d = {"schema": 1, "event_id": f"h-{r.getrandbits(64):016x}", "user_id": uid,
         "ts": ts - r.uniform(0, 3600.0), "type": kind}
    if kind == "click":
        d.update(action=r.choice(("view", "cart", "search")), item_id="home-001", category="home")
    elif kind == "order":
        d.update(order_id=f"ho-{r.getrandbits(40):010x}", amount=round(r.uniform(5, 300), 2),
                 currency="USD", items=[{"item_id": "home-001", "category": "home", "qty": 1,
                                         "price": 5.0}])
    elif kind == "review":
        d.update(item_id="home-001", rating=r.randint(1, 5), text="Works fine.")
    else:
        d.update(region="east", channel="email")
    return d


def _j(d) -> bytes:
    return json.dumps(d, allow_nan=True).encode()


def _msg(kind: str, uid: str, raw: bytes | None, reason: str, key: bytes | None = None) -> Message:
    return Message(kind, uid.encode() if key is None else key, raw, reason)


def make(name: str, r: random.Random, uid: str, ts: float) -> Message:
    kind = r.choice(TOPIC_OF_TYPE)
    if name == "random_bytes":
        return _msg(kind, uid, bytes([r.randint(0x80, 0xFF)]) + r.randbytes(r.randint(0, 400)), "invalid_json")
    if name == "invalid_utf8":
        d = _body(r, uid, ts, "review")
        raw = _j(d).replace(b"Works fine.", b"Works \xc3\x28 fine \xed\xa0\x80.")
        return _msg("review", uid, raw, "invalid_json")
    if name == "lone_surrogate":
        d = _body(r, uid, ts, kind)
        field = r.choice(("event_id", "user_id"))
        raw = _j(d).replace(f'"{d[field]}"'.encode(), f'"{d[field]}\\ud800"'.encode(), 1)
        return _msg(kind, uid, raw, "invalid_json")
    if name == "truncated":
        raw = _j(_body(r, uid, ts, kind))
        return _msg(kind, uid, raw[: r.randint(1, len(raw) - 2)], "invalid_json")
    if name == "deep_nesting":
        opener = r.choice((b"[", b'{"a":'))
        raw = opener * r.randint(500, 300_000 // len(opener))
        return _msg(kind, uid, raw, "too_large" if len(raw) > MAX_MESSAGE_BYTES else "invalid_json")
    if name == "not_an_object":
        raw = r.choice((b"[1, 2]", b'"click"', b"42", b"null", b"true", b"{}", b"[]", b"1e999"))
        return _msg(kind, uid, raw, "missing_field" if raw == b"{}" else "bad_field")
    if name == "wrong_type":
        kind = r.choice(("click", "order", "review", "profile"))
        d = _body(r, uid, ts, kind)
        field, value = r.choice({
            "click": (("action", 7), ("item_id", {"id": 1}), ("event_id", 12345), ("user_id", None),
                      ("ts", [1]), ("action", "teleport")),
            "order": (("amount", "lots"), ("items", "home-001"), ("order_id", ["o1"]),
                      ("currency", "BTC"), ("items", [{"item_id": "x", "price": -1}]),
                      ("items", [{"item_id": "x", "price": 1, "qty": 0}])),
            "review": (("rating", "five"), ("rating", 4.5), ("text", {"body": "hi"}), ("rating", 9)),
            "profile": (("age_band", "100+"), ("region", 3), ("gender", ["x"])),
        }[kind])
        d[field] = value
        return _msg(kind, uid, _j(d), "bad_field")
    if name == "missing_field":  # the simulator's own maker (one required field dropped)
        b = BadMessage(*MAKERS["missing_field"](r, uid, ts))
        return Message(b.kind, b.key, b.raw, b.reason)
    if name == "bad_number":
        d = _body(r, uid, ts, "order")
        field, value = r.choice((("amount", float("nan")), ("amount", -r.uniform(0.01, 500)),
                                 ("amount", float("inf")), ("amount", float("-inf")),
                                 ("ts", float("nan")), ("ts", float("inf"))))
        d[field] = value
        return _msg("order", uid, _j(d), "bad_field")
    if name == "huge_amount":
        d = _body(r, uid, ts, "order")
        d["amount"] = r.choice((r.uniform(1.0000001e6, 1e9), 1e300, 9.99e307))
        return _msg("order", uid, _j(d), "bad_amount")
    if name == "bad_timestamp":
        d = _body(r, uid, ts, kind)
        d["ts"] = r.choice((FAR_FUTURE + r.uniform(0, 1e9), r.uniform(-1e9, 6e8), d["ts"] * 1000.0,
                            time.time() + 2 * 86400.0 + r.uniform(0, 1e8)))  # skew limit: 1 day
        return _msg(kind, uid, _j(d), "bad_timestamp")
    if name == "long_text":
        d = _body(r, uid, ts, "review")
        d["text"] = "Far too much to say. " * r.randint(250, 9000)  # 5.2k - 190k chars
        return _msg("review", uid, _j(d), "text_too_long")
    if name == "too_large":
        d = _body(r, uid, ts, "review")
        d["text"] = "y" * r.randint(300 * 1024, 900 * 1024)
        return _msg("review", uid, _j(d), "too_large")
    if name == "dlq_oversize":
        # ~1 MB: the broker takes it, but the worker's producer (1,000,000-byte request limit)
        # cannot copy it to the DLQ verbatim
        d = _body(r, uid, ts, "review")
        d["text"] = "z" * (1_000_000 - 150 + r.randint(0, 40_000))
        return _msg("review", uid, _j(d), "too_large")
    if name == "unknown_type":
        d = _body(r, uid, ts, kind)
        d["type"] = r.choice(("refund", "pageview", "ORDER", "", "Click", "click ", None, 3))
        return _msg(kind, uid, _j(d), "unknown_type")
    if name == "unknown_schema":
        d = _body(r, uid, ts, kind)
        d["schema"] = r.choice((0, 2, 3, 99, -1, 10**12))
        return _msg(kind, uid, _j(d), "unsupported_schema")
    if name == "key_mismatch":
        return _msg(kind, uid, _j(_body(r, uid, ts, kind)), "key_mismatch", key=f"{uid}x".encode())
    if name == "huge_key":
        key = uid.encode() + b"k" * r.randint(2048, 200_000)
        return _msg(kind, uid, _j(_body(r, uid, ts, kind)), "key_mismatch", key=key)
    if name == "wrong_topic":
        body_kind = r.choice(TOPIC_OF_TYPE)
        topic_kind = r.choice([k for k in TOPIC_OF_TYPE if k != body_kind])
        return _msg(topic_kind, uid, _j(_body(r, uid, ts, body_kind)), "wrong_topic")
    if name == "tombstone":
        return _msg(kind, uid, None, "empty")
    if name == "simulator":
        b = bad_messages(r, 1, users=10**6, ts=ts)[0]
        return Message(b.kind, b.key, b.raw, b.reason)
    raise ValueError(f"unknown hostile kind {name!r}; choose from {KINDS}")


def hostile(rng: random.Random, n: int, users: list[str], ts: float,
            kinds: tuple[str, ...] = KINDS) -> list[Message]:
    names = list(kinds)
    weights = [WEIGHTS[k] for k in names]
    return [make(rng.choices(names, weights)[0], rng, rng.choice(users), ts) for _ in range(n)]


def junk_fields(m: Message, rng: random.Random) -> Message:
    """The same valid event with unknown extra fields (must be applied all the same)."""
    d = json.loads(m.value)
    d[f"x_{rng.getrandbits(16):04x}"] = rng.choice(({"nested": [1, 2, {"deep": None}]}, "junk", 1e300, None))
    return m._replace(value=json.dumps(d).encode())
