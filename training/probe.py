"""Supervised text probe: the review embedding -> a few CLV scores, by cross-fitted ridge.

Why: the head used to learn a 384 -> 16 projection of the mean review embedding jointly
with the MLP. With a few thousand training rows (and the text signal carried by a few
hundred writers) that layer fits noise: on the simulated ablation the validation loss got
worse with text than without it and the text arm lost Gini (docs/model.md, "Text").
A ridge regression has one tuning knob (chosen here by user-grouped cross-validation), a
closed form, and no early-stopping race with the behaviour features.

``fit_probe(text, targets, groups)`` returns
* ``weight`` [TEXT_DIM, k] and ``center`` [k]: scores = text @ weight - center for a user
  with review text, exactly 0 for one without (a zero embedding); scaled so the writers'
  out-of-fold scores have mean 0 and unit standard deviation;
* ``oof`` [N, k]: each row's scores from a probe fitted without any row of its user (the
  head trains on these, so it learns how far out-of-sample scores can be trusted; serving
  and validation use ``text @ weight`` from the probe fitted on every row);
* a JSON-able record (alpha per target, out-of-fold correlation with each target).

Pure numpy, deterministic.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# ridge penalties tried, in units of the mean eigenvalue of the centred embedding's Gram matrix
ALPHAS = (0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0)
MIN_ROWS = 40  # fewer writers than this: no probe (all-zero weight)


@dataclass
class Probe:
    weight: np.ndarray  # [TEXT_DIM, k] float32
    center: np.ndarray  # [k] subtracted for writers: score = text @ weight - has_text * center
    oof: np.ndarray  # [N, k] float32 out-of-fold scores (0 for rows without text)
    fold: np.ndarray  # [N] int: the fold a row's out-of-fold score was predicted in (-1: no text)
    record: dict = field(default_factory=dict)


def probe_targets(label: np.ndarray) -> np.ndarray:
    """[N, 2]: any purchase in the horizon (0/1) and log1p(spend) - what the ZILN head's two
    parts (p and the spend level) need."""
    y = np.asarray(label, np.float64)
    return np.c_[(y > 0).astype(np.float64), np.log1p(np.maximum(y, 0.0))]


def _ridge_path(x: np.ndarray, y: np.ndarray, alphas: np.ndarray) -> np.ndarray:
    """Coefficients [len(alphas), D, k] of ridge on centred x, y (via one SVD)."""
    u, s, vt = np.linalg.svd(x, full_matrices=False)
    uty = u.T @ y  # [r, k]
    d = s[None, :, None] / (s[None, :, None] ** 2 + alphas[:, None, None])  # [a, r, 1]
    return np.einsum("rd,arK->adK", vt, d * uty[None])


def fit_probe(text: np.ndarray, targets: np.ndarray, groups, *, folds: int = 5, seed: int = 0,
              alphas=ALPHAS) -> Probe:
    """Cross-fitted ridge of ``targets`` [N, k] on ``text`` [N, D] over the rows with a
    non-zero embedding; folds never split a group (a user's rows at several cutoffs)."""
    x_all = np.asarray(text, np.float64)
    t_all = np.asarray(targets, np.float64)
    n, dim = x_all.shape
    k = t_all.shape[1]
    has = np.any(x_all != 0.0, axis=1)
    rows = np.flatnonzero(has)
    oof = np.zeros((n, k), np.float32)
    if len(rows) < MIN_ROWS:
        return Probe(np.zeros((dim, k), np.float32), np.zeros(k, np.float32), oof, np.full(n, -1), {"writers": int(len(rows)), "fitted": False})
    g = np.asarray(groups)[rows]
    uniq = np.unique(g)
    rng = np.random.default_rng(seed)
    fold_of_group = dict(zip(uniq.tolist(), rng.permutation(len(uniq)) % max(2, folds)))
    fold = np.array([fold_of_group[v] for v in g.tolist()])
    x, t = x_all[rows], t_all[rows]
    xc = x - x.mean(0)
    scale = float(np.sum(xc * xc)) / dim  # mean eigenvalue of the Gram matrix
    a = np.asarray(alphas, np.float64) * max(scale, 1e-12)
    pred = np.zeros((len(a), len(rows), k))  # out-of-fold predictions of the targets per alpha
    raw = np.zeros((len(a), len(rows), k))  # the same without intercept: x @ coefficients
    for f in np.unique(fold):
        tr, te = fold != f, fold == f
        mx, mt = x[tr].mean(0), t[tr].mean(0)
        b = _ridge_path(x[tr] - mx, t[tr] - mt, a)  # [a, D, k]
        raw[:, te] = np.einsum("nd,adk->ank", x[te], b)
        pred[:, te] = raw[:, te] + (mt - np.einsum("d,adk->ak", mx, b))[:, None, :]
    mse = ((pred - t[None]) ** 2).mean(1)  # [a, k]
    best = mse.argmin(0)  # per target
    cols = range(k)
    oof_rows = np.stack([pred[best[j], :, j] for j in cols], 1)
    oof_scores = np.stack([raw[best[j], :, j] for j in cols], 1)  # zero embedding -> 0, as served
    b_all = _ridge_path(xc, t - t.mean(0), a)
    weight = np.stack([b_all[best[j], :, j] for j in cols], 1)  # [D, k]
    sd = oof_scores.std(0)
    sd = np.where(sd > 1e-12, sd, 1.0)
    weight = weight / sd
    center = x.mean(0) @ weight  # the writers' mean score under the full probe
    oof[rows] = ((oof_scores - oof_scores.mean(0)) / sd).astype(np.float32)
    corr = [float(np.corrcoef(oof_rows[:, j], t[:, j])[0, 1]) if t[:, j].std() > 0 else 0.0 for j in range(k)]
    record = {"fitted": True, "writers": int(len(rows)), "groups": int(len(uniq)), "folds": int(len(np.unique(fold))),
              "alpha": [float(alphas[i]) for i in best], "oof_corr": [round(c, 4) for c in corr]}
    fold_all = np.full(n, -1)
    fold_all[rows] = fold
    return Probe(weight.astype(np.float32), center.astype(np.float32), oof, fold_all, record)
