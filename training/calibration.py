"""Horizon scaling measured on the training data ("validated" scale) instead of the day ratio.

When the history before the cutoff is shorter than the horizon, the window-trained models
(the CLV model, LightGBM-RFM) predict spend in a ``W``-day window and must be scaled to the
``H``-day horizon. ``H / W`` assumes spend keeps its rate and that the model is calibrated
on customers older than any it was trained on; neither holds on CDNOW (ensemble +6-16 %).

The validated rule replays the whole protocol one step earlier, at the same ratio, with
every label ending on or before the evaluation cutoff:

* validation cutoff ``v = cutoff - W`` (the latest training cutoff), validation horizon
  ``H_v = W`` (ends at the cutoff), validation training window ``W_v = W * W / H`` so
  that ``H_v / W_v = H / W`` (CDNOW: ``v`` = 1997-05-17, ``H_v`` = 136 d, ``W_v`` = 68 d);
* fit the model on the validation training cutoffs (as ``train_cutoffs`` does), predict
  the customers active at ``v``, scale by ``H_v / W_v`` like the real run;
* factor ``c = sum(actual in (v, v + H_v]) / sum(scaled predictions)``, clipped to
  [0.5, 2]; the real predictions are scaled by ``H / W * c``.

``c`` corrects the total (level), so it moves decile MAPE and never ranking (Gini,
Spearman, AUC, top-20 %). Nothing after the cutoff is used: ``v + H_v`` is the cutoff.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import pandas as pd

from training.baselines import Window, choose_window
from training.transactions import active_customers, spend_between

CLIP = (0.5, 2.0)
MIN_CUSTOMERS = 50


@dataclass(frozen=True)
class Validation:
    """The replayed protocol one step earlier (``window.cutoff`` is ``v``)."""

    window: Window  # cutoff v, horizon H_v, training window W_v
    ids: list[str]  # customers active at v
    y: np.ndarray  # their actual spend in (v, v + H_v]

    def factor(self, pred: np.ndarray) -> float:
        """Σactual / Σpred (predictions already scaled to ``H_v``), clipped to ``CLIP``."""
        tot = float(np.sum(pred))
        if not np.isfinite(tot) or tot <= 0:
            return 1.0
        return float(np.clip(float(np.sum(self.y)) / tot, *CLIP))


def validation(tx: pd.DataFrame, window: Window) -> Validation | None:
    """The validation replay for ``window``, or None when the history is too short for it
    (then the day ratio is used)."""
    v = window.train_cutoff
    h_v = window.train_days
    w_v = float(round(window.train_days * window.train_days / window.horizon_days))
    if w_v < 7:
        return None
    first = tx["date"].min()
    if (v - pd.Timedelta(days=w_v) - first) < pd.Timedelta(days=30):
        return None
    try:
        win_v = choose_window(tx, v, h_v, w_v)
    except ValueError:
        return None
    ids = active_customers(tx, v)
    if len(ids) < MIN_CUSTOMERS:
        return None
    y = spend_between(tx, v, v + pd.Timedelta(days=h_v), ids)
    if y.sum() <= 0:
        return None
    return Validation(win_v, ids, y)


def validated_factor(val: Validation, predict: Callable[[Window, list[str]], np.ndarray]) -> float:
    """``predict(window_v, ids_v)`` returns predictions for ``H_v`` (already × H_v/W_v)."""
    return val.factor(np.asarray(predict(val.window, val.ids), dtype=np.float64))


# ---- conformal scaling of the ZILN quantiles ---------------------------------------------------
# The head's 10/50/90 % spend quantiles come from one lognormal per customer whose sigma early
# stopping does not pin down, so the raw 80 % interval need not cover 80 %. Split-conformal
# scaling (fitted on the validation replay's customers, whose labels end at the cutoff):
# in log1p space, an interval with scale s around the median m is
#     lo_s = expm1(log1p(m) - s * (log1p(m) - log1p(q10)))    (clipped at 0)
#     hi_s = expm1(log1p(m) + s * (log1p(q90) - log1p(m)))
# (s = 1 is the model's own 80 % interval). Each customer's score is the smallest s whose
# interval holds their actual value; the fitted s is the ceil((n + 1) * level) / n empirical
# quantile of the scores (the finite-sample split-conformal rule), one s per level.
# Two plain numbers per model (50 % and 80 %), stored in the card and the head's metadata.
LEVELS = (0.5, 0.8)
SCALE_MAX = 50.0


def conformal_scores(y: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Smallest scale ``s`` whose interval around the median covers each ``y`` (``q`` [N, 3])."""
    y = np.log1p(np.maximum(np.asarray(y, np.float64), 0.0))
    lq = np.log1p(np.maximum(np.asarray(q, np.float64), 0.0))
    lo, mid, hi = lq[:, 0], lq[:, 1], lq[:, 2]
    up, down = hi - mid, mid - lo
    with np.errstate(divide="ignore", invalid="ignore"):
        s = np.where(y >= mid, (y - mid) / up, (mid - y) / down)
    s = np.where(y == mid, 0.0, s)
    return np.where(np.isfinite(s), np.clip(s, 0.0, SCALE_MAX), SCALE_MAX)


def fit_interval_scale(y: np.ndarray, q: np.ndarray, level: float) -> float:
    """The split-conformal scale for a ``level`` interval from validation actuals ``y`` and the
    model's quantiles ``q`` [N, 3] (10/50/90 %) for the same customers."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"interval level must be in (0, 1), got {level}")
    s = np.sort(conformal_scores(y, q))
    n = s.size
    if n == 0:
        raise ValueError("no validation customers to fit the interval scale on")
    k = min(n, int(np.ceil((n + 1) * level)))
    return float(s[k - 1])


def scaled_interval(q: np.ndarray, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """(lo, hi) of the interval with ``scale`` around the median (see the module notes)."""
    lq = np.log1p(np.maximum(np.asarray(q, np.float64), 0.0))
    mid = lq[:, 1]
    lo = np.maximum(np.expm1(mid - scale * (mid - lq[:, 0])), 0.0)
    hi = np.expm1(mid + scale * (lq[:, 2] - mid))
    return lo, hi


def fit_interval_scales(y: np.ndarray, q: np.ndarray) -> dict[str, float]:
    """The split-conformal scale of every level in ``LEVELS`` ({"0.5": s50, "0.8": s80}), from
    validation actuals ``y`` and the model's quantiles ``q`` [N, 3] for the same customers."""
    return {f"{lv:g}": round(fit_interval_scale(y, q, lv), 4) for lv in LEVELS}


def calibrate_scores(m, m_val, y_val: np.ndarray, factor: float = 1.0, intervals: bool = True):
    """``m`` (a ``training.evaluate.ModelScores`` with quantiles) with expected value and
    quantiles times ``factor`` and, if ``intervals``, the conformal scales fitted on the
    validation replay's scores ``m_val`` (quantiles times the same ``factor``) against its
    actuals ``y_val``."""
    from training.evaluate import ModelScores

    q = None if m.quantiles is None else m.quantiles * factor
    scales = None
    if intervals and m_val.quantiles is not None:
        scales = fit_interval_scales(y_val, m_val.quantiles * factor)
    return ModelScores(m.name, m.expected * factor, m.p_any, q, scales)
