"""Metric functions against hand-computed values and the google/lifetime_value definitions,
the bootstrap, and the baselines on the CDNOW sample (fast)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.stats import spearmanr

from training import evaluate as E


def google_gini(y, p):
    """The reference definition (lifetime_value/metrics.py: cumulative_true + gini_from_gain)."""
    def gain(pred):
        df = pd.DataFrame({"y": y, "p": pred}).sort_values("p", ascending=False, kind="stable")
        return (df["y"].cumsum() / df["y"].sum()).to_numpy()

    raw = lambda c: 2 * c.sum() / len(c) - 1  # noqa: E731
    return raw(gain(p)) / raw(gain(y))


def test_gini_hand_computed():
    y = np.array([10.0, 0.0, 5.0, 5.0])
    p = np.array([4.0, 3.0, 2.0, 1.0])
    # by prediction: 10, 0, 5, 5 -> cumulative shares .5 .5 .75 1 -> raw 2*0.6875-1 = 0.375
    # perfect: 10, 5, 5, 0 -> .5 .75 1 1 -> raw 0.625
    assert E.raw_gini(y, p) == pytest.approx(0.375)
    assert E.raw_gini(y, y) == pytest.approx(0.625)
    assert E.normalized_gini(y, p) == pytest.approx(0.6)
    assert E.normalized_gini(y, y) == pytest.approx(1.0)
    assert E.normalized_gini(y, -y) < 0


def test_gini_matches_google_definition_without_ties():
    rng = np.random.default_rng(0)
    y = rng.gamma(0.4, 50, 2000) * (rng.random(2000) < 0.4)
    p = y * rng.lognormal(0, 1, 2000) + rng.random(2000)
    assert E.normalized_gini(y, p) == pytest.approx(google_gini(y, p), abs=1e-12)


def test_gini_ties_do_not_depend_on_row_order():
    y = np.array([0.0, 0.0, 9.0, 1.0, 0.0, 3.0])
    p = np.array([1.0, 1.0, 1.0, 2.0, 0.0, 0.0])
    perm = np.array([2, 0, 1, 3, 5, 4])
    assert E.normalized_gini(y, p) == pytest.approx(E.normalized_gini(y[perm], p[perm]))
    # tied group {y=0,0,9} shares its mean 3: order 1 | 3,3,3 | 0,3 (mean 1.5,1.5)
    c = E.cumulative_true(y, p)
    assert c == pytest.approx(np.cumsum([1, 3, 3, 3, 1.5, 1.5]) / 13)


def test_decile_mape_hand_computed():
    y = np.arange(1.0, 21.0)  # two customers per decile
    assert E.decile_mape(y, y) == 0.0
    assert E.decile_mape(y, 1.1 * y) == pytest.approx(0.1)
    pred, true = E.decile_table(y, y * 2)
    assert true == pytest.approx([1.5 + 2 * k for k in range(10)])
    assert pred == pytest.approx(2 * true)
    # a bucket whose actual mean is 0 has no relative error and is left out
    y0 = y.copy()
    y0[:2] = 0.0
    assert E.decile_mape(y0, 1.1 * y + 1) == pytest.approx(np.mean([(1.1 * m + 1 - m) / m for m in true[1:]]))


def test_decile_buckets_equal_sized_with_ties():
    y = np.arange(100.0)
    p = np.zeros(100)  # all tied: still ten buckets of ten
    pred, true = E.decile_table(y, p)
    assert pred == pytest.approx(np.zeros(10))
    assert len(true) == 10
    with pytest.raises(ValueError, match="at least 10"):
        E.decile_table(y[:5], p[:5])


def test_spearman_and_auc_match_references():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(1)
    y = np.round(rng.gamma(0.5, 20, 500) * (rng.random(500) < 0.5), 1)
    p = np.round(y + rng.normal(0, 10, 500), 0)  # ties on purpose
    assert E.spearman(y, p) == pytest.approx(spearmanr(y, p).statistic, abs=1e-12)
    assert E.auc(y > 0, p) == pytest.approx(roc_auc_score(y > 0, p), abs=1e-12)
    assert np.isnan(E.auc(np.ones(5, bool), np.arange(5.0)))


def test_top_share_precision_recall_hand_computed():
    y = np.array([100.0, 50, 0, 0, 0, 0, 0, 0, 0, 10])
    p = np.array([9.0, 1, 0, 0, 0, 0, 0, 0, 0, 8])
    # k = 2 flagged: customers 0 and 9; truly high-value (top 2 by actual): 0 and 1
    assert E.top_share_prf(y, p) == pytest.approx((0.5, 0.5, 0.5))
    assert E.top_share_prf(y, y) == pytest.approx((1.0, 1.0, 1.0))


def test_bad_inputs_are_explained():
    with pytest.raises(ValueError, match="one prediction per customer"):
        E.all_metrics(np.zeros(10), np.zeros(9))
    with pytest.raises(ValueError, match="NaN"):
        E.all_metrics(np.ones(10), np.full(10, np.nan))


def test_bootstrap_intervals_and_paired_differences():
    rng = np.random.default_rng(2)
    y = rng.gamma(0.5, 20, 1500) * (rng.random(1500) < 0.5)
    good = E.ModelScores("good", y + rng.gamma(1, 5, 1500))
    same = E.ModelScores("same", good.expected.copy())
    noise = E.ModelScores("noise", rng.random(1500))
    ev = E.evaluate(y, [good, same, noise], n_boot=60, seed=3,
                    compare_to=[("good", "same"), ("good", "noise")])
    for name in ("good", "noise"):
        for m in ("gini", "spearman", "auc"):
            assert ev.lo[name][m] <= ev.point[name][m] <= ev.hi[name][m]
    assert ev.diffs[("good", "same")]["gini"] == (0.0, 0.0, 0.0)
    pt, lo, hi = ev.diffs[("good", "noise")]["gini"]
    assert lo > 0 and pt > 0.5
    again = E.evaluate(y, [good, same, noise], n_boot=60, seed=3)
    assert again.lo == ev.lo and again.hi == ev.hi
    assert E.best_by(ev.point, "gini", ["good", "noise"]) == "good"


# ---- baselines on the CDNOW sample (2,357 customers) ------------------------------------
@pytest.fixture(scope="module")
def cdnow_sample():
    from training import cdnow
    from training.transactions import active_customers, spend_between

    tx = cdnow.load(sample=True)
    cut = pd.Timestamp("1997-09-30")
    ids = active_customers(tx, cut)
    y = spend_between(tx, cut, cut + pd.Timedelta(days=273), ids)
    return tx, cut, ids, y


def test_bgnbd_on_cdnow_sample_is_in_the_ballpark(cdnow_sample):
    from training.baselines import bgnbd_gg

    tx, cut, ids, y = cdnow_sample
    assert len(ids) == 2357
    scores, info = bgnbd_gg(tx, cut, 273.0, ids)
    # full CDNOW (daily periods) fits r=0.25 alpha=33.5 a=0.72 b=2.16; the 1/10 sample is close
    p = info.bg_params
    assert 0.15 < p["r"] < 0.35 and 20 < p["alpha"] < 50 and 0.4 < p["a"] < 1.2 and 1.0 < p["b"] < 4.0
    m = E.all_metrics(y, scores.expected, scores.p_any)
    # published full-data figure: Gini 0.668 (ours on the full data: 0.672)
    assert 0.58 < m["gini"] < 0.76
    assert m["decile_mape"] < 0.45
    assert 0.68 < m["auc"] < 0.82
    assert 0.0 <= scores.p_any.min() and scores.p_any.max() <= 1.0
    # expected total spend within 30 % of what happened
    assert 0.7 < scores.expected.sum() / y.sum() < 1.3


def test_lightgbm_and_naive_on_cdnow_sample(cdnow_sample):
    from training.baselines import choose_window, lightgbm_rfm, naive

    tx, cut, ids, y = cdnow_sample
    w = choose_window(tx, cut, 273.0)
    assert w.train_days == 136 and w.train_cutoff == pd.Timestamp("1997-05-17")
    lgbm = lightgbm_rfm(tx, w, ids)
    m = E.all_metrics(y, lgbm.expected, lgbm.p_any)
    # on 2,357 customers the 95 % interval is about +-0.06 (full data: 0.70-0.72)
    assert 0.45 < m["gini"] < 0.8
    nv = naive(tx, cut, 273.0, ids)
    # hand check for one customer: spend so far / days observed * horizon
    cal = tx[(tx["customer_id"] == ids[0]) & (tx["date"] <= cut)]
    days = (cut - cal["date"].min()).days + 1
    assert nv.expected[0] == pytest.approx(cal["amount"].sum() / days * 273.0)
    assert E.decile_mape(y, nv.expected) > 1.0  # the naive rule ignores churn: far too high


def test_interval_coverage_by_decile_and_total_ratio():
    y = np.arange(1.0, 21.0)
    lo, hi = y - 0.5, y + 0.5
    hi[:10] = y[:10] - 0.1  # the lower half is missed
    assert E.interval_coverage(y, lo, hi) == pytest.approx(0.5)
    assert E.coverage_by_decile(y, y, lo, hi) == pytest.approx([0] * 5 + [1] * 5)
    assert E.total_ratio(y, 2 * y) == pytest.approx(2.0)
    assert np.isnan(E.total_ratio(np.zeros(3), np.ones(3)))
    a, b = E.wilson(0.8, 1000)
    assert a < 0.8 < b and b - a == pytest.approx(0.0496, abs=0.002)


def test_conformal_scale_makes_too_narrow_intervals_cover_their_level():
    """ZILN-shaped data whose model quantiles are half as wide (log space) as the truth: the
    split-conformal scale fitted on one sample covers ~80 % / ~50 % of a fresh sample."""
    from scipy.stats import norm

    from training import calibration as C

    def draw(n, seed):
        rng = np.random.default_rng(seed)
        mu = rng.normal(3.0, 1.0, n)
        buy = rng.random(n) < 0.95
        y = np.where(buy, np.exp(mu + 1.2 * rng.standard_normal(n)), 0.0)
        # the model's quantiles: right p and mu, sigma 0.6 instead of 1.2
        q = np.stack([np.where((qq - 0.05) > 0, np.exp(mu + 0.6 * norm.ppf(np.clip((qq - 0.05) / 0.95, 1e-6, 1 - 1e-6))), 0.0)
                      for qq in (0.1, 0.5, 0.9)], axis=1)
        return y, q

    yv, qv = draw(4000, 0)
    yt, qt = draw(4000, 1)
    raw = E.interval_coverage(yt, qt[:, 0], qt[:, 2])
    assert raw < 0.72  # too narrow before
    for level in (0.5, 0.8):
        s = C.fit_interval_scale(yv, qv, level)
        lo, hi = C.scaled_interval(qt, s)
        assert abs(E.interval_coverage(yt, lo, hi) - level) < 0.03
    # s = 1 reproduces the model's own interval; scores are the smallest covering scale
    lo, hi = C.scaled_interval(qt, 1.0)
    assert lo == pytest.approx(qt[:, 0], rel=1e-9, abs=1e-9) and hi == pytest.approx(qt[:, 2], rel=1e-9)
    sc = C.conformal_scores(yt, qt)
    lo, hi = C.scaled_interval(qt, 1.0)
    assert np.all((sc <= 1.0 + 1e-9) == ((yt >= lo - 1e-9) & (yt <= hi + 1e-9)))
    with pytest.raises(ValueError, match="level"):
        C.fit_interval_scale(yv, qv, 1.5)
