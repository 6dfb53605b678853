"""Baselines the model is judged against, all from the transactions alone.

* ``bgnbd_gg``  BG/NBD (purchase counts) x Gamma-Gamma (spend per purchase), lifetimes 0.11.3.
  lifetimes works unchanged with the installed pandas 3 / numpy 2 / scipy (checked; it only
  emits a deprecation warning at import, silenced here), so no compat shim or btyd is needed.
  Pitfall when calling it yourself: on pandas DataFrames ``summary.T`` is the *transpose*;
  use ``summary["T"]``.
* ``lightgbm_rfm``  gradient boosting on RFM features. Trained on an earlier window
  (features at ``train_cutoff``, label = spend in ``(train_cutoff, cutoff]``), so nothing
  after the calibration cutoff is used; predictions are scaled from the training window to
  the horizon (``horizon / window``, a constant, so it moves calibration, never ranking).
* ``naive``  "past spend continues": (spend up to the cutoff / days observed) x horizon.

Every baseline returns :class:`training.evaluate.ModelScores` for the customers ``ids``
(customers with a purchase on or before the cutoff), in that order.
"""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd

from training.evaluate import ModelScores
from training.transactions import InputError, spend_between

log = logging.getLogger(__name__)
MIN_TRAIN_HISTORY_SHARE = 0.5  # training cutoff leaves at least half the history as features


@dataclass(frozen=True)
class Window:
    """The evaluation cutoff/horizon and the leak-free training window before it."""

    cutoff: pd.Timestamp  # last calibration day (inclusive)
    horizon_days: float
    train_cutoff: pd.Timestamp  # features up to here ...
    train_days: float  # ... labels are spend in (train_cutoff, cutoff]

    @property
    def scale(self) -> float:
        """Factor from a training-window prediction to a horizon prediction."""
        return self.horizon_days / self.train_days


def choose_window(tx: pd.DataFrame, cutoff: pd.Timestamp, horizon_days: float, train_days: float | None = None) -> Window:
    """Training window: as long as the horizon when the history allows it, otherwise half the
    history before the cutoff (CDNOW: 272 days of history -> a 136-day window). Labels end at
    the cutoff either way."""
    first = tx["date"].min()
    history = float((cutoff - first) / pd.Timedelta(days=1))
    if train_days is None:
        train_days = float(min(horizon_days, np.floor(history * (1 - MIN_TRAIN_HISTORY_SHARE))))
    train_days = float(int(round(train_days)))
    if train_days < 1 or train_days >= history:
        raise InputError(
            f"only {history:.0f} days of history before the cutoff {cutoff.date()}; a training window of "
            f"{train_days:.0f} days leaves no earlier purchases to learn from. Pick a later --cutoff "
            "or a shorter --train-window"
        )
    t0 = cutoff - pd.Timedelta(days=train_days)
    return Window(cutoff, float(horizon_days), t0, train_days)


# ---- BG/NBD + Gamma-Gamma ------------------------------------------------------------
def _lifetimes():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pandas 3 deprecation of an option lifetimes sets
        import lifetimes
        from lifetimes.utils import summary_data_from_transaction_data
    return lifetimes, summary_data_from_transaction_data


def rfm_summary(tx: pd.DataFrame, cutoff: pd.Timestamp, ids: list[str]) -> pd.DataFrame:
    """lifetimes' frequency/recency/T/monetary_value (days) at ``cutoff``, rows in ``ids`` order."""
    _, summary_fn = _lifetimes()
    cal = tx.loc[tx["date"] <= cutoff, ["customer_id", "date", "amount"]]
    s = summary_fn(cal, "customer_id", "date", monetary_value_col="amount",
                   observation_period_end=cutoff, freq="D")
    return s.reindex(pd.Index(ids))


@dataclass
class BgNbdGg:
    bg_params: dict
    gg_params: dict | None
    penalizer: float


def bgnbd_gg(tx: pd.DataFrame, cutoff: pd.Timestamp, horizon_days: float, ids: list[str]) -> tuple[ModelScores, BgNbdGg]:
    """Expected spend = E[purchases in horizon | history] (BG/NBD) x E[spend per purchase |
    history] (Gamma-Gamma fitted on repeat customers with positive spend).
    P(any purchase) = P(alive) x (1 - ((alpha+T)/(alpha+T+h))^(r+x))."""
    lifetimes, _ = _lifetimes()
    s = rfm_summary(tx, cutoff, ids)
    x, tx_, T = (s[c].to_numpy(dtype=np.float64) for c in ("frequency", "recency", "T"))
    m = s["monetary_value"].to_numpy(dtype=np.float64)
    bg = None
    for pen in (0.0, 0.001, 0.01, 0.1):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                cand = lifetimes.BetaGeoFitter(penalizer_coef=pen).fit(x, tx_, T)
            n = np.asarray(cand.conditional_expected_number_of_purchases_up_to_time(horizon_days, x, tx_, T), dtype=np.float64)
            if np.all(np.isfinite(n)):
                bg = cand
                break
        except Exception as exc:  # noqa: BLE001 - lifetimes raises ConvergenceError and friends
            log.warning("BG/NBD fit with penalizer %s failed: %s", pen, exc)
    if bg is None:
        raise RuntimeError("BG/NBD did not converge on this data even with a penalizer; check the transactions")
    r, alpha, a, b = (float(bg.params_[k]) for k in ("r", "alpha", "a", "b"))
    p_alive = np.asarray(bg.conditional_probability_alive(x, tx_, T), dtype=np.float64)
    p_any = p_alive * (1.0 - np.exp((r + x) * (np.log(alpha + T) - np.log(alpha + T + horizon_days))))

    rep = (x > 0) & (m > 0)
    gg_params = None
    spend = np.full(x.size, float(tx.loc[tx["date"] <= cutoff, "amount"].mean()))
    if rep.sum() >= 20:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                gg = lifetimes.GammaGammaFitter(penalizer_coef=0.0).fit(x[rep], m[rep])
                cand = np.asarray(gg.conditional_expected_average_profit(x, m), dtype=np.float64)
            if np.all(np.isfinite(cand)) and np.all(cand >= 0):
                spend = cand
                gg_params = {k: float(v) for k, v in gg.params_.items()}
        except Exception as exc:  # noqa: BLE001
            log.warning("Gamma-Gamma fit failed (%s); using the mean purchase value instead", exc)
    else:
        log.warning("only %d repeat customers: Gamma-Gamma skipped, mean purchase value used", int(rep.sum()))
    info = BgNbdGg({"r": r, "alpha": alpha, "a": a, "b": b}, gg_params, pen)
    return ModelScores("BG/NBD+GG", n * spend, np.clip(p_any, 0.0, 1.0)), info


# ---- RFM features + LightGBM -----------------------------------------------------------
RFM_FEATURES = (
    "frequency", "recency", "T", "monetary", "total_spend", "n_transactions", "mean_spend",
    "max_spend", "first_spend", "last_spend", "days_since_last", "spend_30d", "spend_90d",
    "days_90d", "spend_rate",
)


def rfm_features(tx: pd.DataFrame, as_of: pd.Timestamp, ids: list[str]) -> np.ndarray:
    """RFM matrix (``RFM_FEATURES`` columns) from purchases on or before ``as_of``.

    Purchases on the same day are one purchase (as in lifetimes); days are the unit."""
    cal = tx.loc[tx["date"] <= as_of]
    n_rows = cal.groupby("customer_id").size()
    daily = cal.groupby(["customer_id", "date"], sort=True)["amount"].sum().reset_index()
    g = daily.groupby("customer_id", sort=False)
    day = pd.Timedelta(days=1)
    first, last, cnt, tot = g["date"].min(), g["date"].max(), g.size(), g["amount"].sum()
    first_amt = g["amount"].first()
    recent = lambda d: daily[daily["date"] > as_of - pd.Timedelta(days=d)].groupby("customer_id")  # noqa: E731
    T = (as_of - first) / day
    f = pd.DataFrame({
        "frequency": cnt - 1,
        "recency": (last - first) / day,
        "T": T,
        "monetary": ((tot - first_amt) / (cnt - 1).clip(lower=1)).where(cnt > 1, 0.0),
        "total_spend": tot,
        "n_transactions": n_rows,
        "mean_spend": tot / cnt,
        "max_spend": g["amount"].max(),
        "first_spend": first_amt,
        "last_spend": g["amount"].last(),
        "days_since_last": (as_of - last) / day,
        "spend_30d": recent(30)["amount"].sum(),
        "spend_90d": recent(90)["amount"].sum(),
        "days_90d": recent(90).size(),
        "spend_rate": tot / (T + 1.0),
    }).reindex(pd.Index(ids))
    missing = f["frequency"].isna().to_numpy()
    if missing.any():
        raise ValueError(f"{int(missing.sum())} customer(s) have no purchase on or before {as_of.date()}")
    return f[list(RFM_FEATURES)].fillna(0.0).to_numpy(dtype=np.float64)


LGB_PARAMS = dict(
    n_estimators=400, learning_rate=0.03, num_leaves=15, min_child_samples=50,
    reg_lambda=1.0, deterministic=True, force_row_wise=True, n_jobs=1, verbose=-1,  # 1 thread: OpenMP spin-waits on busy cores
)


def lightgbm_rfm(tx: pd.DataFrame, window: Window, ids: list[str], *, seed: int = 0,
                 train_cutoffs: list[pd.Timestamp] | None = None) -> ModelScores:
    """Tweedie regressor for spend in a ``window.train_days`` window + a classifier for any
    purchase in it, trained on customers active at each training cutoff ``t`` (features at
    ``t``, label in ``(t, t + train_days]``, all ending by the cutoff); scored at the cutoff."""
    import lightgbm as lgb

    cuts = train_cutoffs or [window.train_cutoff]
    span = pd.Timedelta(days=window.train_days)
    if any(t + span > window.cutoff for t in cuts):
        raise ValueError("a training label window runs past the evaluation cutoff (leakage)")
    Xs, ys = [], []
    for t in cuts:
        train_ids = sorted(tx.loc[tx["date"] <= t, "customer_id"].unique().tolist())
        if train_ids:
            Xs.append(rfm_features(tx, t, train_ids))
            ys.append(spend_between(tx, t, t + span, train_ids))
    n = sum(len(y) for y in ys)
    if n < 50:
        raise InputError(
            f"only {n} customer rows bought before the training cutoff {window.train_cutoff.date()}; "
            "the gradient-boosting baseline needs more history: pick a later --cutoff"
        )
    Xtr, ytr = np.vstack(Xs), np.concatenate(ys)
    Xte = rfm_features(tx, window.cutoff, ids)
    reg = lgb.LGBMRegressor(objective="tweedie", random_state=seed, **LGB_PARAMS)
    reg.fit(Xtr, ytr)
    expected = np.clip(reg.predict(Xte), 0.0, None) * window.scale
    p_any = None
    any_tr = (ytr > 0).astype(int)
    if 0 < any_tr.sum() < any_tr.size:
        clf = lgb.LGBMClassifier(objective="binary", random_state=seed, **LGB_PARAMS)
        clf.fit(Xtr, any_tr)
        p_any = clf.predict_proba(Xte)[:, 1]
    return ModelScores("LightGBM-RFM", expected, p_any)


# ---- naive -------------------------------------------------------------------------------
def naive(tx: pd.DataFrame, cutoff: pd.Timestamp, horizon_days: float, ids: list[str]) -> ModelScores:
    """Spend in the horizon = spend so far / days since the first purchase (inclusive) x horizon."""
    cal = tx.loc[tx["date"] <= cutoff]
    g = cal.groupby("customer_id")
    days = ((cutoff - g["date"].min()) / pd.Timedelta(days=1) + 1.0).reindex(pd.Index(ids))
    spend = g["amount"].sum().reindex(pd.Index(ids))
    return ModelScores("naive", (spend / days).to_numpy(dtype=np.float64) * horizon_days)
