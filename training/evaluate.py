"""Metrics for CLV predictions, with customer-level bootstrap intervals.

Definitions follow google/lifetime_value (``lifetime_value/metrics.py``, Wang, Liu & Miao 2019):

* **normalised Gini**: order customers by prediction (descending) and take the cumulative
  share of actual value, ``c_k = sum_{i<=k} y_(i) / sum y``. Raw Gini = ``2 * mean(c) - 1``
  (twice the area between that curve and the diagonal, in discrete form); normalised Gini =
  model raw Gini / the raw Gini of the perfect ordering (by actual value). Customers with
  tied predictions are given their group's mean actual value, so the figure does not depend
  on how a sort happens to order ties (the reference code used an unstable sort).
* **decile MAPE**: split customers into ten equal-sized buckets by predicted rank, take the
  mean prediction and mean actual per bucket, ``|mean_pred - mean_true| / mean_true``, and
  average over buckets (the reference notebooks report ``decile_mape.mean()``). Buckets whose
  mean actual is 0 have no defined relative error and are left out of the average.
* **Spearman**: rank correlation of prediction and actual value (average ranks for ties).
* **AUC**: ROC AUC of a score for "made any purchase in the horizon" (Mann-Whitney form).
* **top-k precision/recall/F1**: flag the top ``share`` (20 %) of customers by prediction; the
  truly high-value customers are those whose actual value is positive and at least the
  value at rank ``ceil(share * n)`` of the actual ordering (ties at the threshold all count).

Everything here is numpy/scipy only and vectorised, so 200 bootstrap resamples of ~25k
customers over a handful of models take seconds.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np
from scipy.stats import rankdata

METRICS: tuple[str, ...] = ("gini", "decile_mape", "spearman", "auc", "precision", "recall", "f1")
# higher is better for every metric except decile MAPE
HIGHER_IS_BETTER = {m: m != "decile_mape" for m in METRICS}
TOP_SHARE = 0.2


def _as_arrays(y_true, y_pred) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true, dtype=np.float64).ravel()
    p = np.asarray(y_pred, dtype=np.float64).ravel()
    if y.shape != p.shape:
        raise ValueError(f"y_true has {y.size} values but y_pred has {p.size}; pass one prediction per customer")
    if y.size == 0:
        raise ValueError("no customers to evaluate (empty arrays)")
    if not (np.all(np.isfinite(y)) and np.all(np.isfinite(p))):
        raise ValueError("y_true / y_pred contain NaN or inf; fix the model output before evaluating")
    return y, p


def cumulative_true(y_true, y_pred) -> np.ndarray:
    """Cumulative share of actual value, customers ordered by prediction (highest first).

    Tied predictions share their group's mean actual value (order-independent)."""
    y, p = _as_arrays(y_true, y_pred)
    total = y.sum()
    if total <= 0:
        return np.full(y.size, np.nan)
    order = np.argsort(-p, kind="stable")
    ys, ps = y[order], p[order]
    # tie groups: runs of equal predictions in sorted order -> replace by group mean
    starts = np.flatnonzero(np.r_[True, ps[1:] != ps[:-1]])
    if starts.size < ys.size:
        sums = np.add.reduceat(ys, starts)
        counts = np.diff(np.r_[starts, ys.size])
        ys = np.repeat(sums / counts, counts)
    return np.cumsum(ys) / total


def raw_gini(y_true, y_pred) -> float:
    c = cumulative_true(y_true, y_pred)
    return float(2.0 * c.mean() - 1.0)


def normalized_gini(y_true, y_pred) -> float:
    """Model Gini / perfect Gini over the cumulative-value curve (NaN if all actuals are 0)."""
    perfect = raw_gini(y_true, y_true)
    if not np.isfinite(perfect) or perfect <= 0:
        return float("nan")
    return raw_gini(y_true, y_pred) / perfect


def decile_table(y_true, y_pred, n_buckets: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """(mean predicted, mean actual) per bucket of predicted rank, lowest bucket first.

    Buckets are equal-sized (sizes differ by at most one), like ``pd.qcut`` on ranks."""
    y, p = _as_arrays(y_true, y_pred)
    n = y.size
    if n < n_buckets:
        raise ValueError(f"need at least {n_buckets} customers for decile metrics, got {n}")
    order = np.argsort(p, kind="stable")
    bucket = np.empty(n, dtype=np.int64)
    bucket[order] = (np.arange(n) * n_buckets) // n
    counts = np.bincount(bucket, minlength=n_buckets)
    mean_pred = np.bincount(bucket, weights=p, minlength=n_buckets) / counts
    mean_true = np.bincount(bucket, weights=y, minlength=n_buckets) / counts
    return mean_pred, mean_true


def decile_mape(y_true, y_pred, n_buckets: int = 10) -> float:
    mean_pred, mean_true = decile_table(y_true, y_pred, n_buckets)
    ok = mean_true > 0
    if not ok.any():
        return float("nan")
    return float(np.mean(np.abs(mean_pred[ok] - mean_true[ok]) / mean_true[ok]))


def spearman(y_true, y_pred) -> float:
    y, p = _as_arrays(y_true, y_pred)
    ry, rp = rankdata(y), rankdata(p)
    sy, sp = ry.std(), rp.std()
    if sy == 0 or sp == 0:
        return float("nan")
    return float(np.mean((ry - ry.mean()) * (rp - rp.mean())) / (sy * sp))


def auc(positive, score) -> float:
    """ROC AUC (probability a random positive outscores a random negative, ties count 1/2)."""
    pos = np.asarray(positive).astype(bool).ravel()
    _, s = _as_arrays(pos.astype(np.float64), score)
    n_pos = int(pos.sum())
    n_neg = pos.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    r = rankdata(s)
    return float((r[pos].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def top_share_prf(y_true, y_pred, share: float = TOP_SHARE) -> tuple[float, float, float]:
    """Precision, recall, F1 of flagging the top ``share`` by prediction as high-value."""
    y, p = _as_arrays(y_true, y_pred)
    n = y.size
    k = max(1, int(math.ceil(share * n)))
    threshold = np.sort(y)[::-1][k - 1]
    truth = (y >= threshold) & (y > 0)
    flagged = np.zeros(n, dtype=bool)
    flagged[np.argsort(-p, kind="stable")[:k]] = True
    tp = float(np.sum(flagged & truth))
    precision = tp / k
    recall = tp / float(truth.sum()) if truth.any() else float("nan")
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return float(precision), float(recall), float(f1)


def all_metrics(y_true, y_pred, p_any=None) -> dict[str, float]:
    """Every metric for one model. ``p_any``: the model's P(any purchase) for the AUC; when the
    model has none, its value prediction is the score."""
    y, p = _as_arrays(y_true, y_pred)
    prec, rec, f1 = top_share_prf(y, p)
    return {
        "gini": normalized_gini(y, p),
        "decile_mape": decile_mape(y, p),
        "spearman": spearman(y, p),
        "auc": auc(y > 0, p if p_any is None else p_any),
        "precision": prec,
        "recall": rec,
        "f1": f1,
    }


@dataclass
class ModelScores:
    """What one model predicted for the evaluated customers."""

    name: str
    expected: np.ndarray  # predicted value in the horizon
    p_any: np.ndarray | None = None  # P(any purchase in the horizon), if the model gives one
    quantiles: np.ndarray | None = None  # [N, 3] spend quantiles 10/50/90 % in the horizon, if any
    interval_scale: dict | None = None  # level -> conformal scale (training.calibration), if fitted


@dataclass
class Evaluation:
    """Point estimates and bootstrap intervals for several models on the same customers."""

    n_customers: int
    point: dict[str, dict[str, float]]  # model -> metric -> value
    lo: dict[str, dict[str, float]] = field(default_factory=dict)
    hi: dict[str, dict[str, float]] = field(default_factory=dict)
    n_boot: int = 0
    level: float = 0.95
    # paired differences: (model, reference) -> metric -> (point, lo, hi)
    diffs: dict[tuple[str, str], dict[str, tuple[float, float, float]]] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "n_customers": self.n_customers,
            "n_boot": self.n_boot,
            "level": self.level,
            "point": self.point,
            "lo": self.lo,
            "hi": self.hi,
            "diffs": {f"{a} - {b}": d for (a, b), d in self.diffs.items()},
        }


def evaluate(
    y_true,
    models: Sequence[ModelScores],
    *,
    n_boot: int = 200,
    level: float = 0.95,
    seed: int = 0,
    compare_to: Sequence[tuple[str, str]] = (),
    progress: Callable[[int], None] | None = None,
) -> Evaluation:
    """Metrics for every model, plus percentile bootstrap intervals over customers.

    Each resample draws customers with replacement and scores every model on the *same*
    draw, so ``compare_to`` pairs ``(model, reference)`` get paired intervals for the
    difference model - reference (an interval excluding 0 is a real difference, not noise).
    ``progress(1)`` is called once per resample.
    """
    y = np.asarray(y_true, dtype=np.float64)
    point = {m.name: all_metrics(y, m.expected, m.p_any) for m in models}
    ev = Evaluation(n_customers=int(y.size), point=point, n_boot=n_boot, level=level)
    if n_boot <= 0:
        return ev
    rng = np.random.default_rng(seed)
    samples: dict[str, list[dict[str, float]]] = {m.name: [] for m in models}
    for _ in range(n_boot):
        idx = rng.integers(0, y.size, y.size)
        yb = y[idx]
        for m in models:
            samples[m.name].append(
                all_metrics(yb, m.expected[idx], None if m.p_any is None else m.p_any[idx])
            )
        if progress is not None:
            progress(1)
    a = (1.0 - level) / 2.0
    for name, rows in samples.items():
        ev.lo[name], ev.hi[name] = {}, {}
        for metric in METRICS:
            vals = np.array([r[metric] for r in rows], dtype=np.float64)
            ev.lo[name][metric], ev.hi[name][metric] = _interval(vals, a)
    for model, ref in compare_to:
        if model not in samples or ref not in samples:
            continue
        d = {}
        for metric in METRICS:
            vals = np.array([r[metric] for r in samples[model]]) - np.array([r[metric] for r in samples[ref]])
            lo, hi = _interval(vals, a)
            d[metric] = (point[model][metric] - point[ref][metric], lo, hi)
        ev.diffs[(model, ref)] = d
    return ev


def _interval(vals: np.ndarray, a: float) -> tuple[float, float]:
    vals = vals[np.isfinite(vals)]
    if vals.size == 0:
        return float("nan"), float("nan")
    lo, hi = np.quantile(vals, [a, 1.0 - a])
    return float(lo), float(hi)


def best_by(point: Mapping[str, Mapping[str, float]], metric: str, among: Sequence[str]) -> str | None:
    """Name of the best model among ``among`` for ``metric`` (respecting its direction)."""
    vals = [(point[n][metric], n) for n in among if n in point and np.isfinite(point[n][metric])]
    if not vals:
        return None
    return (max(vals) if HIGHER_IS_BETTER[metric] else min(vals))[1]


# ---- prediction intervals ---------------------------------------------------------------------
def interval_coverage(y_true, lo, hi) -> float:
    """Share of customers whose actual value lies in ``[lo, hi]`` (both ends inclusive)."""
    y, a = _as_arrays(y_true, lo)
    _, b = _as_arrays(y_true, hi)
    return float(np.mean((y >= a) & (y <= b)))


def coverage_by_decile(y_true, y_pred, lo, hi, n_buckets: int = 10) -> np.ndarray:
    """Interval coverage per bucket of predicted rank (lowest bucket first), the same
    equal-sized buckets as ``decile_table``."""
    y, p = _as_arrays(y_true, y_pred)
    _, a = _as_arrays(y_true, lo)
    _, b = _as_arrays(y_true, hi)
    n = y.size
    if n < n_buckets:
        raise ValueError(f"need at least {n_buckets} customers for decile coverage, got {n}")
    bucket = np.empty(n, dtype=np.int64)
    bucket[np.argsort(p, kind="stable")] = (np.arange(n) * n_buckets) // n
    inside = ((y >= a) & (y <= b)).astype(np.float64)
    return np.bincount(bucket, weights=inside, minlength=n_buckets) / np.bincount(bucket, minlength=n_buckets)


def total_ratio(y_true, y_pred) -> float:
    """Total predicted / total actual value (1 = calibrated in aggregate; NaN if no spend)."""
    y, p = _as_arrays(y_true, y_pred)
    tot = y.sum()
    return float(p.sum() / tot) if tot > 0 else float("nan")


def interval_summary(y_true, m: ModelScores) -> dict:
    """Coverage of the model's spend intervals: the raw 80 % (q10..q90) and, when
    ``m.interval_scale`` is set, the calibrated 50 % and 80 % intervals, overall and per
    decile of predicted value, with a 95 % binomial (Wilson) interval on the overall figure."""
    from training.calibration import scaled_interval

    y = np.asarray(y_true, dtype=np.float64)
    out: dict = {"total_ratio": total_ratio(y, m.expected)}
    if m.quantiles is None:
        return out
    q = np.asarray(m.quantiles, dtype=np.float64)
    rows = {"raw 80%": (q[:, 0], q[:, 2])}
    for level, s in (m.interval_scale or {}).items():
        rows[f"{float(level):.0%}"] = scaled_interval(q, float(s))
    for name, (lo, hi) in rows.items():
        c = interval_coverage(y, lo, hi)
        out[name] = {"coverage": c, "ci": wilson(c, y.size),
                     "by_decile": coverage_by_decile(y, m.expected, lo, hi).round(4).tolist()}
    return out


def wilson(p: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a proportion ``p`` observed on ``n`` customers."""
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return float(c - h), float(c + h)
