"""Typed events and the decoder that turns Kafka bytes into an event or a rejection.

Wire format (schema version 1) is documented in ``docs/events.md``. Every message is a
JSON object keyed by ``user_id`` on its topic. ``decode`` never raises: it returns either
an event or a :class:`Rejection` that carries the reason and the original bytes, which the
worker sends to the dead-letter topic.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, TypeAdapter, ValidationError

SCHEMA_VERSION = 1
SUPPORTED_SCHEMAS = frozenset({1})

CLICK_ACTIONS = ("view", "search", "cart", "wishlist", "like", "share")
CURRENCIES = ("USD", "EUR", "GBP")
AGE_BANDS = ("18-24", "25-34", "35-44", "45-54", "55-64", "65+")
GENDERS = ("female", "male", "other")
REGIONS = ("north", "south", "east", "west", "abroad")
CHANNELS = ("organic", "paid_search", "social", "email", "referral")

MAX_TEXT_CHARS = 5000  # default limit (CLV_MAX_TEXT_CHARS); longer texts -> "text_too_long"
SCHEMA_TEXT_CEILING = 1_000_000  # the schema itself only bounds memory; messages are capped by size
MAX_LINE_ITEMS = 200

Id = Annotated[str, StringConstraints(min_length=1, max_length=128, strip_whitespace=False)]
Ts = Annotated[float, Field(allow_inf_nan=False)]
Money = Annotated[float, Field(ge=0.0, allow_inf_nan=False)]


class _Event(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")

    schema_: int = Field(1, alias="schema")
    event_id: Id
    user_id: Id
    ts: Ts  # event time, seconds since the Unix epoch (UTC)


class Click(_Event):
    type: Literal["click"]
    action: Literal["view", "search", "cart", "wishlist", "like", "share"]
    item_id: Annotated[str, StringConstraints(max_length=128)] | None = None
    category: Annotated[str, StringConstraints(max_length=128)] | None = None


class LineItem(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")
    item_id: Id
    category: Annotated[str, StringConstraints(max_length=128)] | None = None
    qty: Annotated[int, Field(ge=1, le=10_000)] = 1
    price: Money


class Order(_Event):
    type: Literal["order"]
    order_id: Id
    amount: Money
    currency: Literal["USD", "EUR", "GBP"] = "USD"
    items: Annotated[tuple[LineItem, ...], Field(max_length=MAX_LINE_ITEMS)] = ()


class Review(_Event):
    type: Literal["review"]
    item_id: Id
    rating: Annotated[int, Field(ge=1, le=5)]
    text: Annotated[str, StringConstraints(max_length=SCHEMA_TEXT_CEILING)] = ""


class Profile(_Event):
    type: Literal["profile"]
    age_band: Literal["18-24", "25-34", "35-44", "45-54", "55-64", "65+"] | None = None
    gender: Literal["female", "male", "other"] | None = None
    region: Literal["north", "south", "east", "west", "abroad"] | None = None
    channel: Literal["organic", "paid_search", "social", "email", "referral"] | None = None


Event = Union[Click, Order, Review, Profile]
EVENT_TYPES = {"click": Click, "order": Order, "review": Review, "profile": Profile}
_ADAPTER: TypeAdapter[Event] = TypeAdapter(
    Annotated[Event, Field(discriminator="type")]
)


@dataclass(frozen=True, slots=True)
class Rejection:
    """An input that failed validation. Goes to the DLQ with the original bytes."""

    reason: str  # short machine-friendly code, e.g. "invalid_json", "bad_field"
    detail: str  # what was wrong and what to do, for a person
    raw: bytes


@dataclass(frozen=True, slots=True)
class Limits:
    max_message_bytes: int = 256 * 1024
    max_text_chars: int = MAX_TEXT_CHARS
    max_amount: float = 1_000_000.0
    max_clock_skew_s: float = 24 * 3600.0
    min_event_ts: float = 631152000.0

    @classmethod
    def from_settings(cls, s) -> "Limits":
        return cls(
            max_message_bytes=s.max_message_bytes,
            max_text_chars=s.max_text_chars,
            max_amount=s.max_amount,
            max_clock_skew_s=s.max_clock_skew_s,
            min_event_ts=s.min_event_ts,
        )


def _describe(err: ValidationError) -> str:
    parts = []
    for e in err.errors()[:3]:
        loc = ".".join(str(x) for x in e.get("loc", ())) or "(message)"
        parts.append(f"{loc}: {e.get('msg')}")
    return "; ".join(parts)


def decode(
    raw: bytes | None,
    *,
    now: float,
    key: bytes | None = None,
    expect_type: str | None = None,
    limits: Limits = Limits(),
) -> Event | Rejection:
    """Decode and validate one message. Never raises.

    ``now`` is the wall clock (passed in so this stays pure); ``key`` the Kafka key, which
    must equal the event's ``user_id``; ``expect_type`` the event type the topic carries.
    """
    if raw is None:
        return Rejection("empty", "message has no value (tombstone?); send a JSON event", b"")
    if len(raw) > limits.max_message_bytes:
        return Rejection(
            "too_large",
            f"message is {len(raw)} bytes, limit is {limits.max_message_bytes} (CLV_MAX_MESSAGE_BYTES)",
            raw,
        )
    try:
        # strict: a number must be a JSON number ("ts": "1700000000" is rejected, not coerced)
        ev = _ADAPTER.validate_json(raw, strict=True)
    except ValidationError as err:
        errors = err.errors()
        first = errors[0] if errors else {}
        etype = first.get("type", "")
        if etype in ("json_invalid", "json_type"):
            return Rejection("invalid_json", f"not a JSON object: {first.get('msg')}", raw)
        if etype == "union_tag_invalid":
            return Rejection(
                "unknown_type",
                f"unknown event type; expected one of {sorted(EVENT_TYPES)}",
                raw,
            )
        if etype == "union_tag_not_found":
            return Rejection("missing_field", "field 'type' is missing", raw)
        if etype == "missing":
            return Rejection("missing_field", _describe(err), raw)
        return Rejection("bad_field", _describe(err), raw)
    except Exception as exc:  # noqa: BLE001 - the decoder must never raise
        return Rejection("undecodable", f"{type(exc).__name__}: {exc}", raw)
    return check(ev, raw, now=now, key=key, expect_type=expect_type, limits=limits)


def check(
    ev: Event, raw: bytes, *, now: float, key: bytes | None, expect_type: str | None, limits: Limits
) -> Event | Rejection:
    """Semantic checks that the schema alone cannot express."""
    if ev.schema_ not in SUPPORTED_SCHEMAS:
        return Rejection(
            "unsupported_schema",
            f"schema version {ev.schema_} is not supported (this worker reads {sorted(SUPPORTED_SCHEMAS)}); "
            "upgrade the worker or produce schema 1",
            raw,
        )
    if expect_type is not None and ev.type != expect_type:
        return Rejection(
            "wrong_topic", f"a '{ev.type}' event on the topic for '{expect_type}' events", raw
        )
    if key is not None and key != ev.user_id.encode():
        return Rejection(
            "key_mismatch",
            "Kafka key must equal user_id so a user's events share a partition",
            raw,
        )
    if ev.ts < limits.min_event_ts or ev.ts > now + limits.max_clock_skew_s or not math.isfinite(ev.ts):
        return Rejection(
            "bad_timestamp",
            f"ts={ev.ts!r} is outside [{limits.min_event_ts:.0f}, now+{limits.max_clock_skew_s:.0f}s]; "
            "send seconds since the Unix epoch (UTC)",
            raw,
        )
    if isinstance(ev, Order) and ev.amount > limits.max_amount:
        return Rejection(
            "bad_amount", f"amount {ev.amount} exceeds CLV_MAX_AMOUNT={limits.max_amount}", raw
        )
    if isinstance(ev, Review) and len(ev.text) > limits.max_text_chars:
        return Rejection(
            "text_too_long", f"review text has {len(ev.text)} chars, limit {limits.max_text_chars}", raw
        )
    return ev


def encode(ev: Event) -> bytes:
    """Serialise an event to its wire form (the inverse of ``decode``)."""
    return ev.model_dump_json(by_alias=True, exclude_none=True).encode()


def parse(obj: dict) -> Event:
    """Build an event from a dict (raises ``ValidationError``); for producers and tests."""
    return _ADAPTER.validate_python(obj)
