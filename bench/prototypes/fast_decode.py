"""Prototype: ``streams.events.decode`` on msgspec Structs instead of pydantic models.

Same wire schema (docs/events.md), same semantic checks (``streams.events.check`` is reused
on a pydantic-free event), same ``Rejection`` reasons for schema errors mapped from msgspec's
messages. Events come out as msgspec Structs with the attributes the fold reads (``type``,
``event_id``, ``user_id``, ``ts``, ``action``, ``amount``, ``items``...), so ``streams.fold``
works unchanged on them (isinstance checks would need the Struct classes: see the
proposal). bench/decode.py measures speed and agreement with the real decoder.
"""
from __future__ import annotations

import math
from typing import Annotated, Literal, Optional, Union

import msgspec
from msgspec import Meta, Struct

from streams.events import Limits, Rejection

Id = Annotated[str, Meta(min_length=1, max_length=128)]
Str128 = Annotated[str, Meta(max_length=128)]
Money = Annotated[float, Meta(ge=0.0)]


class _E(Struct, frozen=True, tag_field="type", forbid_unknown_fields=False):
    event_id: Id
    user_id: Id
    ts: float
    schema_: int = msgspec.field(default=1, name="schema")


class Click(_E, tag="click"):
    action: Literal["view", "search", "cart", "wishlist", "like", "share"] = None  # type: ignore[assignment]
    item_id: Optional[Str128] = None
    category: Optional[Str128] = None

    @property
    def type(self) -> str:
        return "click"


class LineItem(Struct, frozen=True):
    item_id: Id
    price: Money
    category: Optional[Str128] = None
    qty: Annotated[int, Meta(ge=1, le=10_000)] = 1


class Order(_E, tag="order"):
    order_id: Id = None  # type: ignore[assignment]
    amount: Money = None  # type: ignore[assignment]
    currency: Literal["USD", "EUR", "GBP"] = "USD"
    items: Annotated[tuple[LineItem, ...], Meta(max_length=200)] = ()

    @property
    def type(self) -> str:
        return "order"


class Review(_E, tag="review"):
    item_id: Id = None  # type: ignore[assignment]
    rating: Annotated[int, Meta(ge=1, le=5)] = None  # type: ignore[assignment]
    text: str = ""

    @property
    def type(self) -> str:
        return "review"


class Profile(_E, tag="profile"):
    age_band: Optional[Literal["18-24", "25-34", "35-44", "45-54", "55-64", "65+"]] = None
    gender: Optional[Literal["female", "male", "other"]] = None
    region: Optional[Literal["north", "south", "east", "west", "abroad"]] = None
    channel: Optional[Literal["organic", "paid_search", "social", "email", "referral"]] = None

    @property
    def type(self) -> str:
        return "profile"


_REQUIRED = {"click": ("action",), "order": ("order_id", "amount"), "review": ("item_id", "rating"), "profile": ()}
_DEC = msgspec.json.Decoder(Union[Click, Order, Review, Profile])


def decode(raw: bytes | None, *, now: float, key: bytes | None = None, expect_type: str | None = None,
           limits: Limits = Limits()):
    if raw is None:
        return Rejection("empty", "message has no value (tombstone?); send a JSON event", b"")
    if len(raw) > limits.max_message_bytes:
        return Rejection("too_large", f"message is {len(raw)} bytes, limit is {limits.max_message_bytes}", raw)
    try:
        ev = _DEC.decode(raw)
    except msgspec.ValidationError as err:
        msg = str(err)
        if "Expected `object`" in msg and "$" not in msg.replace("`$`", ""):
            return Rejection("invalid_json", f"not a JSON object: {msg}", raw)
        if "Invalid value" in msg and "`$.type`" in msg:
            return Rejection("unknown_type", "unknown event type", raw)
        if "missing required field `type`" in msg:
            return Rejection("missing_field", "field 'type' is missing", raw)
        if "missing required field" in msg:
            return Rejection("missing_field", msg, raw)
        return Rejection("bad_field", msg, raw)
    except (msgspec.DecodeError, UnicodeDecodeError) as err:
        return Rejection("invalid_json", f"not a JSON object: {err}", raw)
    for f in _REQUIRED[ev.type]:
        if getattr(ev, f) is None:
            return Rejection("missing_field", f"{f}: Field required", raw)
    if not math.isfinite(ev.ts):
        return Rejection("bad_field", "ts: must be finite", raw)
    if ev.type == "order" and not math.isfinite(ev.amount):
        return Rejection("bad_field", "amount: must be finite", raw)
    return _check(ev, raw, now=now, key=key, expect_type=expect_type, limits=limits)


def _check(ev, raw, *, now, key, expect_type, limits):
    # streams.events.check, without its isinstance tests on pydantic classes
    if ev.schema_ != 1:
        return Rejection("unsupported_schema", f"schema version {ev.schema_} is not supported", raw)
    if expect_type is not None and ev.type != expect_type:
        return Rejection("wrong_topic", f"a '{ev.type}' event on the topic for '{expect_type}' events", raw)
    if key is not None and key != ev.user_id.encode():
        return Rejection("key_mismatch", "Kafka key must equal user_id", raw)
    if ev.ts < limits.min_event_ts or ev.ts > now + limits.max_clock_skew_s:
        return Rejection("bad_timestamp", f"ts={ev.ts!r} out of range", raw)
    if ev.type == "order" and ev.amount > limits.max_amount:
        return Rejection("bad_amount", f"amount {ev.amount} exceeds CLV_MAX_AMOUNT", raw)
    if ev.type == "review" and len(ev.text) > limits.max_text_chars:
        return Rejection("text_too_long", f"review text has {len(ev.text)} chars", raw)
    return ev
