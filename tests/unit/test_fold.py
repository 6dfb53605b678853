"""Properties of the pure fold: order-insensitivity where promised, idempotence, bounded size."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from streams.fold import (
    FEATURE_NAMES, FIELDS, RING, STATE_VERSION, TEXT_DIM, StateDecodeError, apply, decode_state, encode_emb,
    encode_state, features, fold, new_state, replay,
)
from tests.unit.strategies import event_lists

AS_OF = 1.7e9 + 500 * 86400
ORDER_DEPENDENT = {"ipt_std_days"}  # documented in streams/fold.py
_KEEP = [i for i, n in enumerate(FEATURE_NAMES) if n not in ORDER_DEPENDENT]


def feats(events):
    return features(replay((e, None) for e in events), AS_OF)


@given(event_lists(user=st.just("u")), st.randoms(use_true_random=False))
@settings(max_examples=40, deadline=None)
def test_order_insensitive_features(events, rnd):
    shuffled = list(events)
    rnd.shuffle(shuffled)
    a, b = feats(events), feats(shuffled)
    np.testing.assert_allclose(a[_KEEP], b[_KEEP], rtol=1e-5, atol=1e-5)


@given(event_lists(user=st.just("u")), st.data())
@settings(max_examples=40, deadline=None)
def test_adjacent_duplicates_change_nothing(events, data):
    """A producer that re-sends an event (within the last RING events) changes nothing."""
    dup = []
    for e in events:
        dup.append(e)
        if data.draw(st.booleans()):
            dup.append(e)
    np.testing.assert_array_equal(feats(events), feats(dup))


@given(event_lists(user=st.just("u")))
@settings(max_examples=50, deadline=None)
def test_redelivery_by_offset_is_exact(events):
    """Kafka redelivery (same offsets, any amount) is skipped by the offset watermark."""
    s1 = new_state()
    for off, e in enumerate(events):
        apply(s1, e, pos=(0, off))
    s2 = new_state()
    for off, e in enumerate(events):
        apply(s2, e, pos=(0, off))
    for off, e in enumerate(events):  # the whole partition again, e.g. after a crash
        assert not apply(s2, e, pos=(0, off))
    assert encode_state(s1) == encode_state(s2)


@given(event_lists(max_size=120, user=st.just("u")))
@settings(max_examples=40, deadline=None)
def test_state_size_is_bounded(events):
    s = replay((e, np.full(TEXT_DIM, 0.1, np.float32) if e.type == "review" else None) for e in events)
    blob = encode_state(s)
    # header 3 + cats/profile 16 + watermarks 4 x <=10 + ring + codes 13 + times <=8 x 8 + counters <=41 x 4
    # (a varint counter below 2**28 takes <= 4 bytes; the fold counts far fewer events per user)
    assert len(blob) <= 3 + 16 + 40 + 8 * RING + 13 + 8 * 8 + 4 * 41
    emb = encode_emb(s)
    assert emb is None or len(emb) == 2 * TEXT_DIM


@given(event_lists(user=st.just("u")))
@settings(max_examples=50, deadline=None)
def test_codec_roundtrip(events):
    s = replay((e, None) for e in events)
    s2 = decode_state(encode_state(s), encode_emb(s))
    np.testing.assert_allclose(features(s, AS_OF), features(s2, AS_OF), rtol=1e-5, atol=1e-5)
    assert s2.ring == s.ring[-RING:] and s2.wm == s.wm
    assert s2.cats == s.cats and s2.profile_eid == s.profile_eid
    nt = len(FIELDS) - 41
    assert s2.v[:nt] == s.v[:nt]  # times are exact
    for name, a, b in zip(FIELDS, s.v, s2.v):
        if a == int(a) and abs(a) < 2**53:  # whole-number counters are exact, the rest within f32
            assert a == b, name
        else:
            assert b == np.float32(a), name
    blob = encode_state(s2)
    assert encode_state(decode_state(blob)) == blob  # stable: re-saving changes nothing


@given(event_lists(user=st.just("u")), st.data())
@settings(max_examples=50, deadline=None)
def test_a_damaged_blob_is_refused_not_misread(events, data):
    s = replay((e, None) for e in events)
    for i, off in enumerate((4, 7, 11, 40, 1000)):
        s.wm[i % len(s.wm)] = off ** 3
    blob = encode_state(s)
    cut = data.draw(st.integers(0, len(blob) - 1))
    with pytest.raises(StateDecodeError):
        decode_state(blob[:cut])
    with pytest.raises(StateDecodeError):
        decode_state(blob + b"\0")


def test_an_old_state_version_is_refused_with_the_fix():
    blob = bytearray(encode_state(new_state()))
    blob[0] = STATE_VERSION - 1
    with pytest.raises(StateDecodeError, match="clv replay"):
        decode_state(bytes(blob))


# Written by the state-version-2 codec before it was made fast (bench/codec.py): the format is
# a contract with every blob already in Redis, so the bytes are pinned, not just the round trip.
GOLDEN_BLOB = bytes.fromhex(
    "0206080500000000000080452301efcdab007f80018194ebdc03fdfffffffffffcfffffffffffbfffffffffffafffffffffff9"
    "fffffffffff8fffffffffff7fffffffffff6ffffffffff4aff258601000000000004040000001040fc54d941000020a05055d9"
    "4180e2cfaa0600010101ac020366e6f6420000805d7f000020c0ffffffffffffff0f800102"
)
IDX_SUM_AMOUNT = FIELDS.index("sum_amount")


def _golden_state():
    """Every kind of field: zero, whole < 128, longer varints (a whole-second time, 300, 2**53 - 1),
    f32/f64, whole numbers the varint must not take (2**60, negative), back-references; a ring
    longer than RING, multi-byte watermarks, a top-bit category mask, a profile tie-break."""
    from streams.fold import IDX, State

    v = [0.0] * len(FIELDS)
    t1, t2 = 1.7e9 + 0.25, 1.7e9 + 86400.5
    v[:8] = [t1, t2, 0.0, 1700000000.0, t1, t2, t2, t2]
    for name, x in [("n_events", 300.0), ("n_orders", 3.0), ("sum_amount", 123.45), ("max_amount", 2.0**60),
                    ("n_items", 127.0), ("ipt_mean", -2.5), ("ipt_m2", float(2**53 - 1)),
                    ("n_reviews", 128.0), ("age_band", 2)]:
        v[IDX[name]] = x
    return State(v, (1 << 63) | 5, [(1 << 48) - 1 - k for k in range(10)], [-1, 126, 127, 10**9], 0xABCDEF012345)


def test_codec_bytes_are_pinned():
    s = _golden_state()
    assert encode_state(s) == GOLDEN_BLOB
    d = decode_state(GOLDEN_BLOB)
    expect = list(s.v)
    expect[IDX_SUM_AMOUNT] = float(np.float32(123.45))  # the only non-whole counter: f32
    assert d.v == expect and all(type(x) is float for x in d.v)
    assert (d.cats, d.ring, d.wm, d.profile_eid) == (s.cats, s.ring[-RING:], s.wm, s.profile_eid)
    assert encode_state(d) == GOLDEN_BLOB


def test_typical_blob_is_compact():
    """Elided zeros and repeated times, varint counts: a busy user (every field set) < 260 B (v1: 344)."""
    from tests.unit.strategies import fixed_events

    s = replay((e, None) for e in fixed_events(300, users=("u",)))
    blob = encode_state(s)
    assert len(blob) < 260, len(blob)
    assert decode_state(blob).v[:8] == s.v[:8]


def test_fold_is_pure():
    from tests.unit.strategies import _click

    s0 = new_state()
    before = encode_state(s0)
    s1 = fold(s0, _click(1, "u", 1.7e9, "view", "books"))
    assert encode_state(s0) == before and s1.get("n_view") == 1


def test_features_do_not_see_the_future_through_decay():
    """Decayed counters read at as_of earlier than the last click are not decayed upward."""
    from tests.unit.strategies import _click

    s = replay([(_click(i, "u", 1.7e9 + i * 86400, "view", None), None) for i in range(3)])
    f = features(s, 1.7e9 + 10 * 86400)
    assert np.all(np.isfinite(f))


def test_embedding_is_a_running_mean():
    from tests.unit.strategies import _review

    a, b = np.zeros(TEXT_DIM, np.float32), np.ones(TEXT_DIM, np.float32)
    s = replay([(_review(1, "u", 1.7e9, 5), a), (_review(2, "u", 1.7e9 + 1, 4), b)])
    np.testing.assert_allclose(s.emb, 0.5)
    assert s.get("n_reviews") == 2 and s.get("n_text") == 2
