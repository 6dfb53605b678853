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
