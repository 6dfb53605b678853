"""Point-in-time training sets: offline replay == what the stream writes; no leakage."""
from __future__ import annotations

import logging
import random

import numpy as np
import pytest

from streams.events import Order, Review, parse
from streams.fold import FEATURE_NAMES, FX_TO_USD, features, fold, text_vector
from tests.unit.train_data import DAY, T0, fake_encode, history, write_jsonl
from training.dataset import (HAS_TEXT, build_examples, build_many, concat, model_inputs, read_jsonl,
                              sorted_events)

CUT = T0 + 70 * DAY
H = 30.0


def _stream_states(evs, until: float):
    """What the worker would hold: each event folded as it arrives, reviews with text
    embedded by the (same) encoder, reviews without text folded without one."""
    states = {}
    for ev in evs:
        if ev.ts > until:
            continue
        emb = fake_encode([ev.text])[0] if isinstance(ev, Review) and ev.text else None
        states[ev.user_id] = fold(states.get(ev.user_id), ev, emb=emb)
    return states


def test_offline_features_equal_stream_features():
    evs = sorted(history(40, seed=1), key=lambda e: e.ts)
    ex = build_examples(evs, CUT, H, encode=fake_encode, users="all")
    states = _stream_states(evs, CUT)
    assert sorted(states) == ex.user_ids
    for i, uid in enumerate(ex.user_ids):
        np.testing.assert_array_equal(ex.features[i], features(states[uid], CUT))
        np.testing.assert_allclose(ex.text[i], text_vector(states[uid]), rtol=0, atol=1e-6)
    assert ex.features[:, HAS_TEXT].sum() > 0  # the fixture has reviews with text


def test_arrival_order_only_moves_the_ipt_spread():
    """The stream folds in arrival order; the archive replays in event-time order. Only the
    documented arrival-order-dependent feature (inter-purchase-time spread) may differ."""
    evs = history(40, seed=2)
    random.Random(0).shuffle(evs)  # worst case: everything late / out of order
    ex = build_examples(evs, CUT, H, encode=fake_encode, users="all")
    states = _stream_states(evs, CUT)
    online = np.stack([features(states[u], CUT) for u in ex.user_ids])
    spread = FEATURE_NAMES.index("ipt_std_days")
    other = [j for j in range(len(FEATURE_NAMES)) if j != spread]
    np.testing.assert_allclose(ex.features[:, other], online[:, other], rtol=1e-5, atol=1e-4)


def test_nothing_after_the_cutoff_reaches_features():
    evs = history(30, seed=3)
    base = build_examples(evs, CUT, H, encode=fake_encode, users="all")
    later = []
    for i, uid in enumerate(base.user_ids):  # wild events after the cutoff for everyone
        t = CUT + 1 + i
        later += [
            parse({"type": "order", "event_id": f"late-o{i}", "user_id": uid, "ts": t, "order_id": f"L{i}",
                   "amount": 9999.0}),
            parse({"type": "review", "event_id": f"late-r{i}", "user_id": uid, "ts": t, "item_id": "x",
                   "rating": 1, "text": f"late review {i}"}),
            parse({"type": "profile", "event_id": f"late-p{i}", "user_id": uid, "ts": t, "age_band": "65+"}),
            parse({"type": "click", "event_id": f"late-c{i}", "user_id": uid, "ts": t, "action": "cart"}),
        ]
    later.append(parse({"type": "order", "event_id": "late-new", "user_id": "newcomer", "ts": CUT + 5,
                        "order_id": "N", "amount": 5.0}))
    ex = build_examples(evs + later, CUT, H, encode=fake_encode, users="all")
    assert ex.user_ids == base.user_ids  # a user first seen after the cutoff is not a row
    np.testing.assert_array_equal(ex.features, base.features)
    np.testing.assert_array_equal(ex.text, base.text)
    assert ex.texts == base.texts
    np.testing.assert_array_equal(ex.past_spend, base.past_spend)
    np.testing.assert_allclose(ex.label - base.label, 9999.0, rtol=1e-6)  # only the label sees them


def test_label_window_is_cutoff_exclusive_horizon_inclusive():
    def order(eid, ts, amount, cur="USD"):
        return parse({"type": "order", "event_id": eid, "user_id": "u", "ts": ts, "order_id": eid,
                      "amount": amount, "currency": cur})

    evs = [order("a", CUT - 10, 1.0), order("b", CUT, 2.0), order("c", CUT + 1, 4.0, "EUR"),
           order("d", CUT + H * DAY, 8.0, "GBP"), order("e", CUT + H * DAY + 1, 16.0)]
    ex = build_examples(evs, CUT, H)
    assert ex.user_ids == ["u"]
    assert ex.past_spend[0] == pytest.approx(3.0)  # an order at the cutoff is history
    assert ex.label[0] == pytest.approx(4.0 * FX_TO_USD["EUR"] + 8.0 * FX_TO_USD["GBP"])
    assert ex.features[0, FEATURE_NAMES.index("log_frequency")] == pytest.approx(np.log1p(2))
    assert ex.label_complete is True  # the events reach past cutoff + horizon
    assert build_examples(evs, CUT + 10 * DAY, H).label_complete is False


def test_active_users_have_an_order_before_the_cutoff():
    evs = history(50, seed=4)
    act = build_examples(evs, CUT, H, users="active")
    everyone = build_examples(evs, CUT, H, users="all")
    assert set(act.user_ids) < set(everyone.user_ids)
    assert np.all(act.features[:, FEATURE_NAMES.index("has_orders")] == 1.0)
    assert any(u.startswith("browser") for u in everyone.user_ids)
    with pytest.raises(ValueError, match="users must be"):
        build_examples(evs, CUT, H, users="some")


def test_build_many_equals_one_build_per_cutoff():
    evs = history(30, seed=5)
    cuts = [T0 + 80 * DAY, T0 + 40 * DAY, T0 + 60 * DAY]  # any order in, same order out
    many = build_many(evs, cuts, H, encode=fake_encode)
    for c, ex in zip(cuts, many):
        one = build_examples(evs, c, H, encode=fake_encode)
        assert ex.cutoff == c and ex.user_ids == one.user_ids
        np.testing.assert_array_equal(ex.features, one.features)
        np.testing.assert_array_equal(ex.label, one.label)
        assert ex.texts == one.texts
    both = concat(many)
    assert len(both) == sum(len(e) for e in many) and both.cutoff == max(cuts)


def test_model_inputs_follow_the_worker_for_has_text():
    evs = history(30, seed=6)
    ex = build_examples(evs, CUT, H, encode=None, users="all")  # no embeddings folded
    assert ex.features[:, HAS_TEXT].sum() == 0 and not ex.text.any()
    feats, text = model_inputs(ex, fake_encode)
    with_text = np.array([bool(t) for t in ex.texts])
    assert with_text.any() and not with_text.all()
    np.testing.assert_array_equal(feats[:, HAS_TEXT], with_text.astype(np.float32))
    assert not text[~with_text].any()
    ref = build_examples(evs, CUT, H, encode=fake_encode, users="all")  # what the stream holds
    np.testing.assert_allclose(text, ref.text, atol=1e-6)
    np.testing.assert_array_equal(feats, ref.features)
    feats0, text0 = model_inputs(ref, None)  # a model without encoder: the worker embeds nothing
    assert feats0[:, HAS_TEXT].sum() == 0 and not text0.any()


def test_read_jsonl_decodes_dedupes_and_reports_bad_lines(tmp_path, caplog):
    evs = history(10, seed=7)
    path = write_jsonl(evs + evs[:5], tmp_path / "ev.jsonl", bad_lines=2)  # 5 duplicates, 2 bad
    with caplog.at_level(logging.WARNING, logger="clv.dataset"):
        got = sorted_events(read_jsonl(path))
    assert len(got) == len(evs)
    assert [e.ts for e in got] == sorted(e.ts for e in got)
    assert "skipped 2 invalid lines" in caplog.text
    with pytest.raises(FileNotFoundError, match="clv simulate"):
        list(read_jsonl(tmp_path / "missing.jsonl"))


def test_orders_in_other_currencies_are_usd_in_past_spend():
    o = Order.model_validate({"type": "order", "event_id": "x", "user_id": "u", "ts": T0, "order_id": "x",
                              "amount": 10.0, "currency": "GBP"})
    ex = build_examples([o], T0 + 1, H)
    assert ex.past_spend[0] == pytest.approx(10.0 * FX_TO_USD["GBP"])
