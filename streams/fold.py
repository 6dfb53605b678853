"""The one pure fold: ``fold(state, event) -> state`` and ``features(state, as_of)``.

No I/O here. The worker applies these online; the trainer replays the archive through the
very same functions, so train/serve skew cannot happen (tests/unit/test_skew.py proves it).

State is constant-size per user (``State``: a flat list of floats plus a small dedupe
block). Order-insensitivity, i.e. which fields give the same value whatever order the
events arrive in:

* exact (up to float rounding): counts, sums, min/max times, decayed click counters
  (each half-life keeps counters at a reference time = the latest click seen, and an
  older click is added already decayed), category-diversity bitmask, review count and
  rating sum, the running review embedding (a mean), mean inter-purchase time
  (``(last_order - first_order) / (n_orders - 1)``), profile attributes (a profile event
  is a full snapshot of what the user told the shop, absent = unknown; the latest by event
  time wins, ties broken by event-id hash).
* arrival-order dependent: the inter-purchase-time *spread* (a Welford variance over
  gaps between consecutive orders in arrival order; a late order that lands between two
  earlier ones is folded as a gap from the latest order so far, clamped at 0) and the
  dedupe ring (which ids are remembered).

Idempotence: an event whose ``event_id`` is among the user's last ``RING`` ids, or whose
source offset is at or below the user's watermark for that topic, leaves the state as it
is. The watermark makes Kafka redelivery (crash, rebalance) exact; the ring catches a
producer that publishes the same event twice in a row. A record the ring drops still moves
the watermark (the worker saves it), so its redelivery is dropped by offset even after the
user's events on other topics have rotated the ring.
"""
from __future__ import annotations

import math
import re
import struct
from dataclasses import dataclass, field
from hashlib import blake2b
from itertools import repeat
from operator import itemgetter
from typing import Iterable, Sequence

import numpy as np

from streams.events import (
    AGE_BANDS,
    CHANNELS,
    CLICK_ACTIONS,
    GENDERS,
    REGIONS,
    Click,
    Event,
    Order,
    Profile,
    Review,
)

STATE_VERSION = 2  # 2: compact codec (varints, zero/duplicate elision); 1 blobs are refused
DAY = 86400.0
HALF_LIVES_DAYS = (1.0, 7.0, 30.0)
RING = 8  # remembered event ids per user
EID_BYTES = 6  # event-id hash width (bytes)
N_TOPICS = 4  # watermarks: clicks, orders, reviews, profiles
TEXT_DIM = 384  # all-MiniLM-L6-v2 sentence embedding
# Static conversion to USD: the fold must stay pure, so rates are versioned with the code.
FX_TO_USD = {"USD": 1.0, "EUR": 1.08, "GBP": 1.27}

# ---- scalar state layout ---------------------------------------------------------
_TIME_FIELDS = (
    "first_ts", "last_ts", "first_order_ts", "last_order_ts", "profile_ts",
    *(f"ref_ts_{int(h)}d" for h in HALF_LIVES_DAYS),
)
_NUM_FIELDS = (
    "n_events", "n_orders", "sum_amount", "sum_log_amount", "max_amount", "n_items",
    "ipt_n", "ipt_mean", "ipt_m2",
    *(f"n_{a}" for a in CLICK_ACTIONS),
    *(f"dc_{a}_{int(h)}d" for h in HALF_LIVES_DAYS for a in CLICK_ACTIONS),
    "n_reviews", "sum_rating", "n_neg_reviews", "n_text",
    "age_band", "gender", "region", "channel",  # code+1, 0 = unknown
)
FIELDS = _TIME_FIELDS + _NUM_FIELDS
IDX = {name: i for i, name in enumerate(FIELDS)}
_NT = len(_TIME_FIELDS)
_NN = len(_NUM_FIELDS)


def _i(name: str) -> int:
    return IDX[name]


T_FIRST, T_LAST, T_FO, T_LO, T_PROF = (_i(n) for n in _TIME_FIELDS[:5])
T_REF = tuple(_i(f"ref_ts_{int(h)}d") for h in HALF_LIVES_DAYS)
N_EV, N_ORD, SUM_AMT, SUM_LOG, MAX_AMT, N_ITEMS = (
    _i(n) for n in ("n_events", "n_orders", "sum_amount", "sum_log_amount", "max_amount", "n_items")
)
IPT_N, IPT_MEAN, IPT_M2 = _i("ipt_n"), _i("ipt_mean"), _i("ipt_m2")
N_ACT = {a: _i(f"n_{a}") for a in CLICK_ACTIONS}
DC = {(a, k): _i(f"dc_{a}_{int(h)}d") for k, h in enumerate(HALF_LIVES_DAYS) for a in CLICK_ACTIONS}
N_REV, SUM_RAT, N_NEG, N_TEXT = (_i(n) for n in ("n_reviews", "sum_rating", "n_neg_reviews", "n_text"))
P_AGE, P_GEN, P_REG, P_CHAN = (_i(n) for n in ("age_band", "gender", "region", "channel"))
_LN2 = math.log(2.0)
_DECAY = tuple(_LN2 / (h * DAY) for h in HALF_LIVES_DAYS)
_TOPIC_OF = {"click": 0, "order": 1, "review": 2, "profile": 3}


@dataclass(slots=True)
class State:
    """Per-user state. ``v`` holds the scalars in ``FIELDS`` order."""

    v: list[float] = field(default_factory=lambda: [0.0] * len(FIELDS))
    cats: int = 0  # 64-bit bitmask of hashed categories seen (diversity)
    ring: list[int] = field(default_factory=list)  # last RING event-id hashes
    wm: list[int] = field(default_factory=lambda: [-1] * N_TOPICS)  # offset watermarks
    profile_eid: int = 0  # tie-break for profile updates with equal ts
    emb: np.ndarray | None = None  # running mean review embedding (float32), None = no text

    def copy(self) -> "State":
        return State(
            list(self.v), self.cats, list(self.ring), list(self.wm), self.profile_eid,
            None if self.emb is None else self.emb.copy(),
        )

    def get(self, name: str) -> float:
        return self.v[IDX[name]]


def event_hash(event_id: str) -> int:
    """48-bit id hash (dedupe ring, profile tie-break). A new event falsely taken for one of
    the user's last RING ids: RING / 2**48 = 3e-14 per event; 6 bytes each in the blob."""
    return int.from_bytes(blake2b(event_id.encode(), digest_size=EID_BYTES).digest(), "little")


def _cat_bit(category: str) -> int:
    return 1 << (blake2b(category.encode(), digest_size=1).digest()[0] & 63)


def new_state() -> State:
    return State()


def fold(
    state: State | None,
    event: Event,
    *,
    emb: Sequence[float] | np.ndarray | None = None,
    pos: tuple[int, int] | None = None,
) -> State:
    """Apply one event. Returns a new state (the input is not modified).

    ``emb``: the review text's embedding (reviews only; filled by the text encoder).
    ``pos``: ``(topic_index, offset)`` of the Kafka record, for exact redelivery dedupe.
    """
    s = new_state() if state is None else state.copy()
    apply(s, event, emb=emb, pos=pos)
    return s


def apply(
    s: State,
    event: Event,
    *,
    emb: Sequence[float] | np.ndarray | None = None,
    pos: tuple[int, int] | None = None,
) -> bool:
    """In-place fold (the worker's hot path). Returns False when the event was a duplicate."""
    if pos is not None:
        t_idx, offset = pos
        if offset <= s.wm[t_idx]:
            return False
    h = event_hash(event.event_id)
    if h in s.ring:
        if pos is not None:
            # this record is handled (as a duplicate): a redelivery must be judged by the
            # watermark, not by a ring that the user's events on other topics may have rotated
            s.wm[pos[0]] = pos[1]
        return False
    if pos is not None:
        s.wm[pos[0]] = pos[1]
    s.ring.append(h)
    if len(s.ring) > RING:
        del s.ring[0]

    v = s.v
    t = event.ts
    if v[N_EV] == 0 or t < v[T_FIRST]:
        v[T_FIRST] = t
    if t > v[T_LAST]:
        v[T_LAST] = t
    v[N_EV] += 1

    if isinstance(event, Click):
        _click(s, event, t)
    elif isinstance(event, Order):
        _order(s, event, t)
    elif isinstance(event, Review):
        _review(s, event, emb)
    elif isinstance(event, Profile):
        _profile(s, event, t, h)
    return True


# the click path's indices, looked up once: per half-life (its reference time, its decay rate,
# every action's counter) and per action (its total counter, its counter per half-life)
_CLICK_K = tuple((T_REF[k], rate, tuple(DC[a, k] for a in CLICK_ACTIONS)) for k, rate in enumerate(_DECAY))
_CLICK_A = {a: (N_ACT[a], tuple(DC[a, k] for k in range(len(HALF_LIVES_DAYS)))) for a in CLICK_ACTIONS}
_exp = math.exp


def _click(s: State, ev: Click, t: float) -> None:
    v = s.v
    n_i, own = _CLICK_A[ev.action]
    v[n_i] += 1
    for (ref_i, rate, counters), a_i in zip(_CLICK_K, own):
        ref = v[ref_i]
        if t >= ref:
            if ref > 0:
                f = _exp(-rate * (t - ref))
                for c in counters:
                    v[c] *= f
            v[ref_i] = t
            v[a_i] += 1.0
        else:
            v[a_i] += _exp(-rate * (ref - t))
    if ev.category:
        s.cats |= _cat_bit(ev.category)


def _order(s: State, ev: Order, t: float) -> None:
    v = s.v
    amt = ev.amount * FX_TO_USD[ev.currency]
    n = v[N_ORD]
    if n >= 1:
        # gap from the latest order so far (arrival order; late orders clamp at 0)
        gap = max(0.0, t - v[T_LO]) / DAY
        v[IPT_N] += 1
        d = gap - v[IPT_MEAN]
        v[IPT_MEAN] += d / v[IPT_N]
        v[IPT_M2] += d * (gap - v[IPT_MEAN])
    if n == 0 or t < v[T_FO]:
        v[T_FO] = t
    if n == 0 or t > v[T_LO]:
        v[T_LO] = t
    v[N_ORD] = n + 1
    v[SUM_AMT] += amt
    v[SUM_LOG] += math.log1p(amt)
    if amt > v[MAX_AMT]:
        v[MAX_AMT] = amt
    v[N_ITEMS] += sum(li.qty for li in ev.items)
    for li in ev.items:
        if li.category:
            s.cats |= _cat_bit(li.category)


def _review(s: State, ev: Review, emb) -> None:
    v = s.v
    v[N_REV] += 1
    v[SUM_RAT] += ev.rating
    if ev.rating <= 2:
        v[N_NEG] += 1
    if emb is not None:
        x = np.asarray(emb, dtype=np.float32)
        if x.shape != (TEXT_DIM,) or not np.all(np.isfinite(x)):
            raise ValueError(f"review embedding must be {TEXT_DIM} finite floats, got shape {x.shape}")
        v[N_TEXT] += 1
        if s.emb is None:
            s.emb = x.copy()
        else:
            s.emb = s.emb + (x - s.emb) / np.float32(v[N_TEXT])


def _profile(s: State, ev: Profile, t: float, h: int) -> None:
    v = s.v
    if t < v[T_PROF] or (t == v[T_PROF] and h <= s.profile_eid):
        return  # an older (or tied, lower-id) update: last writer by event time wins
    v[T_PROF] = t
    s.profile_eid = h
    for idx, val, vocab in (
        (P_AGE, ev.age_band, AGE_BANDS),
        (P_GEN, ev.gender, GENDERS),
        (P_REG, ev.region, REGIONS),
        (P_CHAN, ev.channel, CHANNELS),
    ):
        v[idx] = 0 if val is None else vocab.index(val) + 1


def replay(events: Iterable[tuple[Event, np.ndarray | None]], state: State | None = None) -> State:
    """Fold a sequence of (event, embedding-or-None) for one user."""
    s = new_state() if state is None else state.copy()
    for ev, emb in events:
        apply(s, ev, emb=emb)
    return s


# ---- features ------------------------------------------------------------------------
_PROFILE_ONEHOT = (
    [f"age_{b}" for b in AGE_BANDS]
    + [f"gender_{g}" for g in GENDERS]
    + [f"region_{r}" for r in REGIONS]
    + [f"channel_{c}" for c in CHANNELS]
)
FEATURE_NAMES: tuple[str, ...] = (
    "has_orders", "log_frequency", "repeat_orders", "log_monetary_total", "log_monetary_mean",
    "log_monetary_max", "mean_log_amount", "recency_days", "tenure_days", "order_age_days",
    "ipt_mean_days", "ipt_std_days", "log_items_per_order",
    *(f"log_clicks_{a}_{int(h)}d" for h in HALF_LIVES_DAYS for a in CLICK_ACTIONS),
    *(f"log_total_{a}" for a in CLICK_ACTIONS),
    "cart_to_order", "category_diversity", "days_since_last_event",
    "n_reviews", "mean_rating", "neg_review_share", "has_text",
    *_PROFILE_ONEHOT,
)
N_FEATURES = len(FEATURE_NAMES)
# What a model depends on: the meaning of ``features()`` (names, order, transforms), not how the
# state is stored. Bump FEATURE_VERSION when a feature's meaning changes (models are then refused
# until retrained); a codec change (STATE_VERSION) only needs `clv replay`, not a retrain.
FEATURE_VERSION = 1
FEATURE_SCHEMA = f"clv-features-v{FEATURE_VERSION}-{N_FEATURES}"


def features(state: State, as_of: float) -> np.ndarray:
    """The behaviour/transaction vector the model sees, as of ``as_of`` (epoch seconds)."""
    out = np.zeros(N_FEATURES, dtype=np.float32)
    _fill(state, as_of, out)
    return out


def features_batch(states: Sequence[State], as_of: float | Sequence[float]) -> np.ndarray:
    out = np.zeros((len(states), N_FEATURES), dtype=np.float32)
    for i, s in enumerate(states):
        _fill(s, as_of if isinstance(as_of, (int, float)) else as_of[i], out[i])
    return out


def text_vector(state: State) -> np.ndarray:
    """Running mean review embedding (zeros when the user wrote no review text)."""
    return np.zeros(TEXT_DIM, np.float32) if state.emb is None else state.emb.astype(np.float32)


def text_batch(states: Sequence[State]) -> np.ndarray:
    out = np.zeros((len(states), TEXT_DIM), dtype=np.float32)
    for i, s in enumerate(states):
        if s.emb is not None:
            out[i] = s.emb
    return out


def _fill(s: State, as_of: float, out: np.ndarray) -> None:
    v = s.v
    n = v[N_ORD]
    f: list[float] = []
    if n > 0:
        recency = max(0.0, as_of - v[T_LO]) / DAY
        order_age = max(0.0, as_of - v[T_FO]) / DAY
        ipt_mean = (v[T_LO] - v[T_FO]) / DAY / (n - 1) if n > 1 else 0.0
        ipt_std = math.sqrt(v[IPT_M2] / v[IPT_N]) if v[IPT_N] > 1 else 0.0
        mean_amt = v[SUM_AMT] / n
        f += [1.0, math.log1p(n), n - 1, math.log1p(v[SUM_AMT]), math.log1p(mean_amt),
              math.log1p(v[MAX_AMT]), v[SUM_LOG] / n, recency]
    else:
        order_age = ipt_mean = ipt_std = 0.0
        f += [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    tenure = max(0.0, as_of - v[T_FIRST]) / DAY if v[N_EV] > 0 else 0.0
    f += [tenure, order_age, ipt_mean, ipt_std, math.log1p(v[N_ITEMS] / n) if n > 0 else 0.0]
    for k, rate in enumerate(_DECAY):
        ref = v[T_REF[k]]
        decay = math.exp(-rate * (as_of - ref)) if as_of > ref else 1.0
        for a in CLICK_ACTIONS:
            f.append(math.log1p(v[DC[a, k]] * decay))
    for a in CLICK_ACTIONS:
        f.append(math.log1p(v[N_ACT[a]]))
    f.append(n / (v[N_ACT["cart"]] + 1.0))
    f.append(float(bin(s.cats).count("1")))
    f.append(max(0.0, as_of - v[T_LAST]) / DAY if v[N_EV] > 0 else 0.0)
    nr = v[N_REV]
    f += [nr, v[SUM_RAT] / nr if nr else 0.0, v[N_NEG] / nr if nr else 0.0, 1.0 if s.emb is not None else 0.0]
    onehot = [0.0] * len(_PROFILE_ONEHOT)
    base = 0
    for idx, vocab in ((P_AGE, AGE_BANDS), (P_GEN, GENDERS), (P_REG, REGIONS), (P_CHAN, CHANNELS)):
        code = int(v[idx])
        if code:
            onehot[base + code - 1] = 1.0
        base += len(vocab)
    f += onehot
    out[:] = f


# ---- compact binary codec (what Redis stores) ------------------------------------------
# State version 2 (docs/redis.md, "State blob"). Little-endian:
#   u8 version | u8 flags | u8 ring_len | [u64 cats] | [u48 profile_eid]
#   | varint (wm + 1) x N_TOPICS | u48 ring x ring_len (event ids are 48-bit hashes)
#   | 2-bit code per scalar (FIELDS order, packed 4 per byte) | the scalars' values
# flags: 1 = has embedding, 2 = cats present (else 0), 4 = profile_eid present (else 0).
# Scalar codes: 0 = zero (no bytes); 1 = a whole number in (0, 2**53): unsigned LEB128
# varint (exact); 2 = a time as f64 / a counter as f32 (v1 kept counters as f32 too);
# 3 = (times only) the same value as the earlier time field whose index follows as a u8
# (the three click reference times are always equal, last_ts often equals one of them).
# Times and whole-number counters round-trip exactly; other counters round to f32 as in v1.
# The embedding is stored separately (float16) so users without reviews pay nothing.
#
# Speed (bench/codec.py): the worker decodes and encodes every touched user once per
# micro-batch, so both sides avoid per-field byte handling. The encoder classifies each field
# in one tight loop into a struct format character (" " = zero, which struct ignores; "B" =
# whole < 128 or, as "b", a back-reference; "Ns" = a longer varint; "f" / "d") and packs all
# values with one cached ``struct.Struct`` per format; the format string also keys the cached
# 13 code bytes. The decoder reads all values with one cached Struct per code pattern, taking
# each varint for one byte (a whole number < 128); where one is longer it reads that varint
# and continues with the Struct for the fields after it. Anything unexpected (an unknown
# version, a short or long blob, a bad back-reference) is re-read by ``_decode_checked``, the
# field-by-field reference decoder, which raises the precise error.
_HDR = struct.Struct("<BBB")
_U64 = struct.Struct("<Q")
_F64 = struct.Struct("<d")
_F32 = struct.Struct("<f")
_NS = _NT + _NN
_NCODE = (_NS + 3) // 4
_WHOLE_MAX = float(2**53)
_FLAG_EMB, _FLAG_CATS, _FLAG_PEID = 1, 2, 4
_PLAN_CACHE = 4096  # cached Structs per side; the cache is emptied when it reaches this


def _varint(out: bytearray, n: int) -> None:
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)


def _varint_bytes(n: int) -> bytes:
    if n < 0x80:
        return bytes((n,))  # a negative n raises ValueError, as _varint does
    out = bytearray()
    _varint(out, n)
    return bytes(out)


def _read_varint(blob: bytes, off: int) -> tuple[int, int]:
    n = shift = 0
    while True:
        b = blob[off]
        off += 1
        n |= (b & 0x7F) << shift
        if b < 0x80:
            return n, off
        shift += 7
        if shift > 63:
            raise StateDecodeError("corrupt state blob: varint longer than 64 bits")


# ---- encoder ------------------------------------------------------------------------------
_SMALL_WHOLE = {float(n): n for n in range(1, 0x80)}  # 1.0..127.0 -> the int (1-byte varint)
_VARINT_FMT = tuple(f"{n}s" for n in range(11))  # a varint of n bytes, packed as bytes
_FMT_CODE = {" ": 0, "B": 1, "s": 1, "f": 2, "d": 2, "b": 3}
_ENC_PLANS: dict[str, tuple[struct.Struct, bytes]] = {}


def _encode_plan(fmt: str) -> tuple[struct.Struct, bytes]:
    """The Struct for a scalar format from ``encode_state`` and the 13 code bytes it implies."""
    codes = 0
    for i, item in enumerate(re.findall(r"\d*\D", fmt[1:])):  # one item per field
        codes |= _FMT_CODE[item[-1]] << (i << 1)
    plan = struct.Struct(fmt), codes.to_bytes(_NCODE, "little")
    if len(_ENC_PLANS) >= _PLAN_CACHE:
        _ENC_PLANS.clear()
    _ENC_PLANS[fmt] = plan
    return plan


def _large_or_negative_whole(x: float, float_item: str) -> tuple[str, bytes | float]:
    """The rare whole ``x`` that is not 1..127: a longer varint when below 2**53, else a float."""
    if 0 < x < _WHOLE_MAX:
        b = _varint_bytes(int(x))
        return _VARINT_FMT[len(b)], b
    return float_item, x


def encode_state(s: State) -> bytes:
    ring = s.ring[-RING:]
    flags = ((_FLAG_EMB if s.emb is not None else 0) | (_FLAG_CATS if s.cats else 0)
             | (_FLAG_PEID if s.profile_eid else 0))
    parts = [_HDR.pack(STATE_VERSION, flags, len(ring))]
    if s.cats:
        parts.append(_U64.pack(s.cats))
    if s.profile_eid:
        parts.append(s.profile_eid.to_bytes(EID_BYTES, "little"))
    w0, w1, w2, w3 = s.wm if len(s.wm) == N_TOPICS else (-2,) * 4  # (-2: the general way below)
    if -1 <= w0 < 0x7F and -1 <= w1 < 0x7F and -1 <= w2 < 0x7F and -1 <= w3 < 0x7F:
        parts.append(bytes((w0 + 1, w1 + 1, w2 + 1, w3 + 1)))  # every watermark a 1-byte varint
    else:
        parts += [_varint_bytes(w + 1) for w in s.wm]
    parts += [h.to_bytes(EID_BYTES, "little") for h in ring]

    v = s.v
    fmt = "<"  # one item per field, see _FMT_CODE
    args = []
    put = args.append
    small = _SMALL_WHOLE.get
    first = v.index  # an earlier time field with the same value (the first one)
    for i in range(_NT):
        x = v[i]
        if not x:
            fmt += " "
            continue
        j = first(x)
        if j < i:
            fmt += "b"
            put(j)
        elif x % 1:
            fmt += "d"
            put(x)
        elif (n := small(x)) is not None:
            fmt += "B"
            put(n)
        else:
            item, x = _large_or_negative_whole(x, "d")
            fmt += item
            put(x)
    for x in v[_NT:]:
        if not x:
            fmt += " "
        elif x % 1:
            fmt += "f"
            put(x)
        elif (n := small(x)) is not None:
            fmt += "B"
            put(n)
        else:
            item, x = _large_or_negative_whole(x, "f")
            fmt += item
            put(x)
    st, codes = _ENC_PLANS.get(fmt) or _encode_plan(fmt)
    parts.append(codes)
    parts.append(st.pack(*args))  # f32 out of range raises OverflowError, as it always did
    return b"".join(parts)


# ---- decoder ------------------------------------------------------------------------------
class StateDecodeError(ValueError):
    pass


def _field_codes(codes: int) -> list[int]:
    return [(codes >> (i << 1)) & 3 for i in range(_NS)]


class _Run:
    """Reads the values of the fields from ``start`` on with one ``struct`` call, taking every
    varint among them for a single byte (a whole number below 128, the common case)."""

    __slots__ = ("st", "fields", "offsets", "varints", "varint_items")

    def __init__(self, codes: int, start: int):
        fmt, self.fields, self.offsets, self.varints, size = "<", [], [], [], 0
        for i, c in enumerate(_field_codes(codes)):
            if i < start or not c:
                continue
            item = "B" if c != 2 else "d" if i < _NT else "f"
            if c == 1:
                self.varints.append(len(self.fields))
            self.fields.append(i)  # the field of each value read
            self.offsets.append(size)  # its byte offset
            fmt += item
            size += struct.calcsize(item)
        self.st = struct.Struct(fmt)
        vi = self.varints
        # the varint values as a tuple (itemgetter with one index returns the bare item)
        self.varint_items = itemgetter(*vi, *vi) if len(vi) == 1 else itemgetter(*vi) if vi else None


class _DecodePlan:
    """One 13-byte code pattern: its first run, where each field's value comes from, and the
    back-references to resolve."""

    __slots__ = ("codes", "run", "scatter", "back", "valid")

    def __init__(self, codes: int):
        fc = _field_codes(codes)
        self.codes = codes
        self.run = run = _Run(codes, 0)
        # decode_state builds ext = (*values, *varints as floats, 0.0); v = scatter(ext)
        n_vals = len(run.fields)
        n_var = len(run.varints) if len(run.varints) != 1 else 2
        zero = n_vals + n_var
        src = [zero] * _NS
        for k, i in enumerate(run.fields):
            if fc[i] == 2:
                src[i] = k
        for m, k in enumerate(run.varints):
            src[run.fields[k]] = n_vals + m
        self.scatter = itemgetter(*src)
        self.back = [(i, k) for k, i in enumerate(run.fields) if fc[i] == 3]  # (field, value)
        self.valid = all(i < _NT for i, _ in self.back)  # a counter cannot refer back


_DEC_PLANS: dict[bytes, _DecodePlan] = {}
_DEC_RUNS: dict[tuple[int, int], _Run] = {}
_BYTE_FLOAT = tuple(float(b) for b in range(0x80))  # a 1-byte varint as a float; >= 0x80: IndexError
_RING_IDS = tuple(struct.Struct("<" + f"{EID_BYTES}s" * n) for n in range(RING + 1))
_LITTLE = repeat("little")


class _Irregular(Exception):
    """The fast decoder met something it does not handle; _decode_checked decides."""


def _read_long_varints(blob: bytes, off: int, plan: _DecodePlan, got: tuple) -> tuple[tuple, int]:
    """All values after ``plan.run`` read ``got`` at ``off`` taking a longer varint for one byte:
    read each long varint properly and go on with the run of the fields after it."""
    run, vals = plan.run, ()
    while True:
        k = next((k for k in run.varints if got[k] >= 0x80), None)
        if k is None:
            return vals + got, off + run.st.size
        n, off = _read_varint(blob, off + run.offsets[k])
        vals += got[:k] + (n,)
        key = (plan.codes, run.fields[k] + 1)
        run = _DEC_RUNS.get(key)
        if run is None:
            if len(_DEC_RUNS) >= _PLAN_CACHE:
                _DEC_RUNS.clear()
            run = _DEC_RUNS[key] = _Run(*key)
        got = run.st.unpack_from(blob, off)


def decode_state(blob: bytes, emb: bytes | None = None) -> State:
    try:
        ver, flags, n_ring = _HDR.unpack_from(blob, 0)
        if ver != STATE_VERSION or n_ring > RING:
            raise _Irregular
        off = _HDR.size
        cats = peid = 0
        if flags & _FLAG_CATS:
            cats = _U64.unpack_from(blob, off)[0]
            off += 8
        if flags & _FLAG_PEID:
            peid = int.from_bytes(blob[off:off + EID_BYTES], "little")
            off += EID_BYTES
        w0, w1, w2, w3 = blob[off:off + N_TOPICS]
        if w0 < 0x80 and w1 < 0x80 and w2 < 0x80 and w3 < 0x80:
            wm = [w0 - 1, w1 - 1, w2 - 1, w3 - 1]
            off += N_TOPICS
        else:
            wm = []
            for _ in range(N_TOPICS):
                w, off = _read_varint(blob, off)
                wm.append(w - 1)
        ring = list(map(int.from_bytes, _RING_IDS[n_ring].unpack_from(blob, off), _LITTLE))
        off += EID_BYTES * n_ring

        code_bytes = blob[off:off + _NCODE]
        plan = _DEC_PLANS.get(code_bytes)
        if plan is None:
            if len(code_bytes) != _NCODE:
                raise _Irregular
            if len(_DEC_PLANS) >= _PLAN_CACHE:
                _DEC_PLANS.clear()
            plan = _DEC_PLANS[code_bytes] = _DecodePlan(int.from_bytes(code_bytes, "little"))
        if not plan.valid:
            raise _Irregular
        off += _NCODE
        run = plan.run
        got = run.st.unpack_from(blob, off)
        if run.varint_items is None:
            ext = (*got, 0.0)
            off += run.st.size
        else:
            try:
                ext = (*got, *map(_BYTE_FLOAT.__getitem__, run.varint_items(got)), 0.0)
                off += run.st.size
            except IndexError:  # a varint longer than one byte
                got, off = _read_long_varints(blob, off, plan, got)
                ext = (*got, *map(float, run.varint_items(got)), 0.0)
        if off != len(blob):
            raise _Irregular
        v = list(plan.scatter(ext))
        for i, k in plan.back:
            j = got[k]
            if j >= i:
                raise _Irregular
            v[i] = v[j]
    except (_Irregular, struct.error, IndexError, ValueError, StateDecodeError):
        return _decode_checked(blob, emb)
    vec = None
    if flags & _FLAG_EMB and emb:
        vec = np.frombuffer(emb, dtype=np.float16).astype(np.float32)
    return State(v, cats, ring, wm, peid, vec)


def _decode_checked(blob: bytes, emb: bytes | None = None) -> State:
    """Field-by-field reference decoder: the same result as ``decode_state`` on any blob, and
    the precise error on a damaged one (decode_state hands every irregular blob to it)."""
    try:
        ver, flags, n_ring = _HDR.unpack_from(blob, 0)
        if ver != STATE_VERSION:
            raise StateDecodeError(
                f"state blob has version {ver}, this code reads {STATE_VERSION}; rebuild the state "
                "by replaying the archive (clv replay)"
            )
        off = _HDR.size
        cats = peid = 0
        if flags & _FLAG_CATS:
            cats = _U64.unpack_from(blob, off)[0]; off += 8
        if flags & _FLAG_PEID:
            peid = int.from_bytes(blob[off:off + EID_BYTES], "little"); off += EID_BYTES
        wm = []
        for _ in range(N_TOPICS):
            w, off = _read_varint(blob, off)
            wm.append(w - 1)
        end = off + EID_BYTES * n_ring
        if end > len(blob):
            raise StateDecodeError(f"corrupt state blob ({len(blob)} bytes): truncated event-id ring")
        ring = [int.from_bytes(blob[i:i + EID_BYTES], "little") for i in range(off, end, EID_BYTES)]
        off = end
        if off + _NCODE > len(blob):
            raise StateDecodeError(f"corrupt state blob ({len(blob)} bytes): truncated scalar codes")
        codes = int.from_bytes(blob[off:off + _NCODE], "little")
        off += _NCODE
        v = [0.0] * _NS
        for i in range(_NS):
            c = codes & 3
            codes >>= 2
            if c == 0:
                continue
            if c == 1:
                if blob[off] < 0x80:
                    v[i] = float(blob[off]); off += 1
                else:
                    n, off = _read_varint(blob, off)
                    v[i] = float(n)
            elif c == 2:
                if i < _NT:
                    v[i] = _F64.unpack_from(blob, off)[0]; off += 8
                else:
                    v[i] = _F32.unpack_from(blob, off)[0]; off += 4
            else:
                j = blob[off]; off += 1
                if i >= _NT or j >= i:
                    raise StateDecodeError(f"corrupt state blob: bad back-reference in field {FIELDS[i]}")
                v[i] = v[j]
        if off != len(blob):
            raise StateDecodeError(f"corrupt state blob: {len(blob) - off} trailing bytes")
    except (struct.error, IndexError) as exc:
        raise StateDecodeError(f"corrupt state blob ({len(blob)} bytes): {exc}") from exc
    vec = None
    if flags & _FLAG_EMB and emb:
        vec = np.frombuffer(emb, dtype=np.float16).astype(np.float32)
    return State(v, cats, ring, wm, peid, vec)


def encode_emb(s: State) -> bytes | None:
    return None if s.emb is None else s.emb.astype(np.float16).tobytes()
