"""Decoder: bad input always becomes a Rejection with a reason and the original bytes."""
from __future__ import annotations

import math

import orjson
import pytest
from hypothesis import given, settings, strategies as st

from streams.events import Click, Limits, Order, Rejection, decode, encode, parse

NOW = 1.8e9
GOOD = {"type": "order", "event_id": "e1", "user_id": "u1", "ts": 1.75e9, "order_id": "o1",
        "amount": 12.5, "currency": "EUR", "items": [{"item_id": "i", "qty": 2, "price": 6.25}]}


def raw(**over):
    d = dict(GOOD)
    d.update(over)
    return orjson.dumps({k: v for k, v in d.items() if v is not ...})


def test_valid_roundtrip():
    ev = decode(raw(), now=NOW, key=b"u1", expect_type="order")
    assert isinstance(ev, Order) and ev.amount == 12.5 and ev.items[0].qty == 2
    assert decode(encode(ev), now=NOW) == ev


@pytest.mark.parametrize("payload,reason", [
    (b"\xff\xfe\x00", "invalid_json"),
    (b"not json", "invalid_json"),
    (b"[1,2,3]", "bad_field"),
    (b"", "invalid_json"),
    (raw(type="teleport"), "unknown_type"),
    (raw(type=...), "missing_field"),
    (raw(user_id=...), "missing_field"),
    (raw(amount=...), "missing_field"),
    (raw(amount="lots"), "bad_field"),
    (raw(amount=-1), "bad_field"),
    (b'{"type":"order","event_id":"e","user_id":"u1","ts":1.75e9,"order_id":"o","amount":NaN}', "bad_field"),
    (b'{"type":"order","event_id":"e","user_id":"u1","ts":1.75e9,"order_id":"o","amount":Infinity}', "bad_field"),
    (raw(amount=1e12), "bad_amount"),
    (raw(ts=NOW + 10 * 365 * 86400), "bad_timestamp"),
    (raw(ts=5.0), "bad_timestamp"),
    (raw(ts="yesterday"), "bad_field"),
    (raw(ts="1700000000"), "bad_field"),  # numbers must be JSON numbers: no coercion
    (raw(schema=True), "bad_field"),
    (raw(amount="12.5"), "bad_field"),
    (raw(currency="XXX"), "bad_field"),
    (raw(schema=2), "unsupported_schema"),
    (raw(user_id=""), "bad_field"),
    (raw(user_id="x" * 1000), "bad_field"),
])
def test_rejections(payload, reason):
    out = decode(payload, now=NOW)
    assert isinstance(out, Rejection), out
    assert out.reason == reason, out
    assert out.raw == payload and out.detail


def test_text_limit_and_size_limit():
    big = orjson.dumps({"type": "review", "event_id": "r", "user_id": "u", "ts": 1.75e9, "item_id": "i",
                        "rating": 3, "text": "a" * 6000})
    assert decode(big, now=NOW).reason == "text_too_long"
    lim = Limits(max_text_chars=10)
    mid = orjson.dumps({"type": "review", "event_id": "r", "user_id": "u", "ts": 1.75e9, "item_id": "i",
                        "rating": 3, "text": "a" * 50})
    assert decode(mid, now=NOW, limits=lim).reason == "text_too_long"
    huge = b'{"type":"review","text":"' + b"a" * (300 * 1024) + b'"}'
    assert decode(huge, now=NOW).reason == "too_large"


def test_key_and_topic_checks():
    assert decode(raw(), now=NOW, key=b"someone-else").reason == "key_mismatch"
    assert decode(raw(), now=NOW, expect_type="click").reason == "wrong_topic"
    assert decode(None, now=NOW).reason == "empty"


@given(st.binary(max_size=300))
@settings(max_examples=300, deadline=None)
def test_random_bytes_never_raise(data):
    out = decode(data, now=NOW)
    assert isinstance(out, Rejection) and out.raw == data


json_values = st.recursive(
    st.none() | st.booleans() | st.floats(allow_nan=False) | st.integers(-2**63, 2**63 - 1) | st.text(max_size=20),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
    max_leaves=10,
)


@given(st.dictionaries(st.sampled_from(list(GOOD) + ["action", "rating", "text", "schema"]), json_values))
@settings(max_examples=300, deadline=None)
def test_random_objects_never_raise(obj):
    out = decode(orjson.dumps(obj), now=NOW)
    if not isinstance(out, Rejection):  # if it passes, it really is a valid, finite event
        assert math.isfinite(out.ts) and out.user_id and out.event_id


@given(st.sampled_from(["view", "search", "cart", "wishlist", "like", "share"]),
       st.floats(min_value=1e9, max_value=1.79e9))
def test_valid_clicks_accepted(action, ts):
    ev = parse({"type": "click", "event_id": "c", "user_id": "u", "ts": ts, "action": action})
    assert isinstance(decode(encode(ev), now=NOW), Click)
