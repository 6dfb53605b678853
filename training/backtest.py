"""`clv backtest`: score the CLV model and its baselines on any transaction history.

    clv backtest --transactions tx.csv --cutoff 1997-09-30 --horizon 39w [--events DIR|FILE.jsonl]
                 [--report out/] [--no-model] [--quick] [--bootstrap 200] [--ablation]

Population: customers with at least one purchase on or before the cutoff (inclusive).
Actual value: their spend dated in (cutoff, cutoff + horizon]. No model sees anything after
the cutoff: features are computed at the cutoff, and training rows use earlier cutoffs whose
labels end at the cutoff (see ``training.baselines.choose_window`` and docs/backtest.md).
The module imports only typer at load time; everything heavy is imported in the functions.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import typer

cli = typer.Typer()
log = logging.getLogger("clv.backtest")
MODEL_NAME = "model"
DEFAULT_TRAIN_CUTOFFS = 3


@dataclass
class BacktestResult:
    ids: list[str]
    y: Any  # np.ndarray actual spend in the horizon
    models: list  # list[ModelScores]
    evaluation: Any  # training.evaluate.Evaluation
    window: Any  # training.baselines.Window
    meta: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


# ---- inputs --------------------------------------------------------------------------------
def load_side_events(path: str | Path) -> tuple[list, dict]:
    """Clicks, reviews and profiles from an archive directory (Parquet, ``clv`` archiver),
    a directory of ``*.jsonl`` files, or one JSONL file (``clv simulate --out``).
    Orders in it are dropped: purchases come from the transactions CSV only."""
    from streams.events import Order
    from training.dataset import read_jsonl
    from training.transactions import InputError

    p = Path(path)
    if p.is_dir():
        from streams import archive

        if archive.files(p):
            evs = list(archive.read_events(p))
        else:
            files = sorted(p.rglob("*.jsonl"))
            if not files:
                raise InputError(f"--events {p}: no archive (date=*/*.parquet) and no *.jsonl files in it")
            evs = [e for f in files for e in read_jsonl(f)]
    elif p.is_file():
        evs = list(read_jsonl(p))
    else:
        raise InputError(f"--events {p} does not exist; pass the archive directory or a JSONL file of events")
    counts: dict[str, int] = {}
    for e in evs:
        counts[e.type] = counts.get(e.type, 0) + 1
    return [e for e in evs if not isinstance(e, Order)], counts


def train_cutoffs(tx, window, n: int) -> list:
    """``n`` training cutoffs ending at ``window.train_cutoff``, ``window.train_days / 4``
    apart (at least 7 days), keeping only those with at least 30 days of history before them.
    Every label window (t, t + train_days] ends on or before the evaluation cutoff."""
    import pandas as pd

    step = pd.Timedelta(days=max(7, round(window.train_days / 4)))
    first = tx["date"].min()
    out = []
    for k in range(max(1, n)):
        t = window.train_cutoff - k * step
        if k == 0 or t - first >= pd.Timedelta(days=30):
            out.append(t)
    return out


# ---- the model ---------------------------------------------------------------------------------
def fit_model(tx, side_events: Sequence, window, ids: list[str], t_cutoffs: Sequence, cfg=None,
              notes: list[str] | None = None):
    """Train ``training.train.fit`` on the training cutoffs and score the population.

    Only events up to the end of the cutoff day are given to the dataset builder, so no
    feature or label can use the hold-out period. Predictions are for a window of
    ``window.train_days`` and are scaled by ``window.scale`` to the horizon."""
    import numpy as np
    import pandas as pd

    from training.dataset import build_many
    from training.evaluate import ModelScores
    from training.train import TrainConfig, fit
    from training.transactions import day_end_epoch, spend_between, to_orders

    cfg = cfg or TrainConfig()
    end = day_end_epoch(window.cutoff)
    events = [e for e in [*to_orders(tx), *side_events] if e.ts <= end]
    cut_ts = [day_end_epoch(t) for t in t_cutoffs]
    t0 = time.perf_counter()
    *train_parts, test = build_many(events, [*cut_ts, end], window.train_days, encode=None, users="active")
    build_s = time.perf_counter() - t0
    for t, part in zip(t_cutoffs, train_parts):  # the event path must agree with the CSV path
        want = spend_between(tx, t, t + pd.Timedelta(days=window.train_days), part.user_ids)
        if not np.allclose(part.label, want, rtol=1e-4, atol=0.01):
            bad = int(np.sum(~np.isclose(part.label, want, rtol=1e-4, atol=0.01)))
            raise RuntimeError(f"dataset labels at {t.date()} disagree with the CSV for {bad} customers")
    t0 = time.perf_counter()
    fitted = fit(train_parts, cfg, valid=None)
    fit_s = time.perf_counter() - t0
    pred = fitted.predict(test)
    pos = {u: i for i, u in enumerate(test.user_ids)}
    missing = [u for u in ids if u not in pos]
    if missing:
        raise RuntimeError(f"{len(missing)} customers of the population have no model row (e.g. {missing[:3]})")
    take = np.array([pos[u] for u in ids])
    info = {"train_rows": int(sum(len(p) for p in train_parts)), "build_seconds": round(build_s, 1),
            "fit_seconds": round(fit_s, 1), "text_used": bool(fitted.uses_text),
            "members": len(fitted.info.get("members", [])), "device": fitted.info.get("device")}
    if "text_probe" in fitted.info:
        info["text_probe"] = {k: fitted.info["text_probe"][k] for k in ("writers", "alpha", "oof_corr")
                              if k in fitted.info["text_probe"]}
    if notes is not None and not fitted.uses_text and any(t for p in train_parts for t in p.texts):
        notes.append("the events have review text but the model was trained without it (use_text off)")
    return ModelScores(
        MODEL_NAME,
        np.asarray(pred.expected_clv, dtype=np.float64)[take] * window.scale,
        np.clip(np.asarray(pred.p_repeat, dtype=np.float64)[take], 0.0, 1.0),
        np.asarray(pred.quantiles, dtype=np.float64)[take] * window.scale,
    ), info


# ---- orchestration -------------------------------------------------------------------------------
def run_backtest(
    tx,
    cutoff,
    horizon_days: float,
    *,
    side_events: Sequence = (),
    model: bool = True,
    cfg=None,
    n_boot: int = 200,
    seed: int = 0,
    train_days: float | None = None,
    n_train_cutoffs: int = DEFAULT_TRAIN_CUTOFFS,
    baselines: Sequence[str] = ("bgnbd", "lightgbm", "naive"),
    progress: bool = True,
    console=None,
    horizon_scale: str = "validated",
    intervals: bool = True,
) -> BacktestResult:
    """Everything but the printing: fit the baselines (and the model), evaluate, bootstrap.

    ``horizon_scale``: how window-trained models (model, LightGBM) reach the horizon when the
    training window is shorter: ``"validated"`` (``H/W`` times a factor measured by replaying
    the protocol one step earlier, ``training.calibration``) or ``"days"`` (``H/W`` alone).
    ``intervals``: fit the split-conformal scales of the model's 50 % / 80 % spend intervals
    on that validation replay (``training.calibration.calibrate_scores``)."""
    import numpy as np
    import pandas as pd
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from training import baselines as B
    from training import calibration as C
    from training.evaluate import ModelScores, evaluate, interval_summary
    from training.transactions import InputError, active_customers, spend_between

    console = console or Console(stderr=True, quiet=not progress)
    cutoff = pd.Timestamp(cutoff).normalize()
    first, last = tx["date"].min(), tx["date"].max()
    if cutoff < first or cutoff >= last:
        raise InputError(
            f"cutoff {cutoff.date()} is outside the transactions ({first.date()} .. {last.date()}); "
            "the cutoff must leave purchases before it and a hold-out period after it"
        )
    end = cutoff + pd.Timedelta(days=horizon_days)
    notes: list[str] = []
    if last < end:
        notes.append(
            f"the transactions end on {last.date()}, {(end - last).days} day(s) before the horizon ends "
            f"({end.date()}): actual values may be incomplete"
        )
    ids = active_customers(tx, cutoff)
    if len(ids) < 10:
        raise InputError(f"only {len(ids)} customers bought on or before {cutoff.date()}; need at least 10")
    y = spend_between(tx, cutoff, end, ids)
    window = B.choose_window(tx, cutoff, horizon_days, train_days)
    t_cuts = train_cutoffs(tx, window, n_train_cutoffs)
    if horizon_scale not in ("validated", "days"):
        raise InputError(f"horizon scale {horizon_scale!r} is not known; use 'validated' or 'days'")
    val = C.validation(tx, window) if horizon_scale == "validated" and window.train_days < horizon_days else None
    factors: dict[str, float] = {}
    if window.train_days < horizon_days:
        how = (f"x a factor measured at the validation cutoff {val.window.cutoff.date()} (see 'horizon factors')"
               if val is not None else "(day ratio only)")
        notes.append(
            f"only {(cutoff - first).days} days of history: models are trained on {window.train_days:.0f}-day "
            f"label windows and their predictions scaled by {window.scale:.3f} {how} to the {horizon_days:.0f}-day horizon"
        )
        if horizon_scale == "validated" and val is None:
            notes.append("the history is too short for the validated horizon scale; the day ratio is used")
    models, timings = [], {}
    meta_extra: dict = {}

    def validated(m, predict):
        """``m`` scaled by the factor measured on the validation replay (``predict(win, ids)``)."""
        if val is None:
            return m
        f = C.validated_factor(val, predict)
        factors[m.name] = round(f, 4)
        return ModelScores(m.name, m.expected * f, m.p_any)

    def step(name: str, fn):
        t0 = time.perf_counter()
        with console.status(f"[bold]{name}..."):
            out = fn()
        timings[name] = round(time.perf_counter() - t0, 1)
        console.log(f"{name}: done in {timings[name]} s")
        return out

    bg_info = None
    if "bgnbd" in baselines:
        m, bg_info = step("BG/NBD + Gamma-Gamma", lambda: B.bgnbd_gg(tx, cutoff, horizon_days, ids))
        models.append(m)
    if "lightgbm" in baselines:
        def lgb_fit(win, who, cuts):
            return B.lightgbm_rfm(tx, win, who, seed=seed, train_cutoffs=cuts)

        models.append(step("LightGBM on RFM", lambda: validated(
            lgb_fit(window, ids, t_cuts),
            lambda win, who: lgb_fit(win, who, train_cutoffs(tx, win, n_train_cutoffs)).expected)))
    if "naive" in baselines:
        models.append(B.naive(tx, cutoff, horizon_days, ids))
    model_info = None
    if model:
        m, model_info = step("model (dataset + training)",
                             lambda: fit_model(tx, side_events, window, ids, t_cuts, cfg, notes))
        # the validation replay (labels end at the cutoff) sets the horizon factor (validated
        # scale) and the conformal interval scales; with intervals on it runs even when the
        # training window is the horizon (then it is the protocol one window earlier)
        rep = val if val is not None else (C.validation(tx, window) if intervals else None)
        if rep is not None:
            mv = step("model on the validation replay", lambda: fit_model(
                tx, side_events, rep.window, rep.ids, train_cutoffs(tx, rep.window, n_train_cutoffs), cfg)[0])
            f = 1.0
            if val is not None:
                f = val.factor(mv.expected)
                factors[m.name] = round(f, 4)
            m = C.calibrate_scores(m, mv, rep.y, factor=f, intervals=intervals)
            if intervals:
                meta_extra["interval calibration"] = (
                    f"split-conformal on {len(rep.ids)} customers at {rep.window.cutoff.date()} "
                    f"(+{rep.window.horizon_days:.0f} d): scales {m.interval_scale}")
        elif intervals:
            notes.append("the history is too short for a validation replay: the model's intervals are uncalibrated")
        models.insert(0, m)
    if not models:
        raise InputError("nothing to evaluate: enable the model or at least one baseline")
    ref = models[0].name
    compare = [(ref, m.name) for m in models[1:]] if model else []
    with Progress(TextColumn("bootstrap"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True, disable=not progress) as bar:
        task = bar.add_task("bootstrap", total=n_boot)
        ev = evaluate(y, models, n_boot=n_boot, seed=seed, compare_to=compare,
                      progress=lambda k: bar.advance(task, k))
    meta = {
        "cutoff (last calibration day)": str(cutoff.date()),
        "horizon": f"{horizon_days:g} days (to {end.date()})",
        "customers (bought on/before cutoff)": len(ids),
        "buyers in horizon": int(np.sum(y > 0)),
        "mean actual value": round(float(np.mean(y)), 3),
        "transactions": f"{len(tx)} rows, {first.date()} .. {last.date()}",
        "training windows": ", ".join(f"{t.date()}+{window.train_days:.0f}d" for t in t_cuts),
        "bootstrap": f"{n_boot} resamples, seed {seed}",
        "timings (s)": timings,
        "horizon scale": (f"validated: {window.scale:.4f} (days) x factor; validation cutoff {val.window.cutoff.date()}, "
                          f"{val.window.train_days:.0f}-day training windows, {val.window.horizon_days:.0f}-day horizon, "
                          f"{len(val.ids)} customers" if val is not None else
                          f"days: {window.scale:.4f}"),
        "horizon factors": factors,
        **meta_extra,
    }
    if bg_info is not None:
        meta["BG/NBD params"] = {k: round(v, 4) for k, v in bg_info.bg_params.items()}
        meta["Gamma-Gamma params"] = None if bg_info.gg_params is None else {k: round(v, 4) for k, v in bg_info.gg_params.items()}
    if model_info is not None:
        meta["model"] = model_info
    meta["intervals"] = {m.name: interval_summary(y, m) for m in models}
    return BacktestResult(ids, y, models, ev, window, meta, notes)


def print_result(res: BacktestResult, console, title: str = "CLV backtest") -> None:
    from training.report import console_tables

    table, diffs = console_tables(res.evaluation, title)
    console.print(table)
    if diffs is not None:
        console.print(diffs)
    console.print(interval_table(res.meta.get("intervals", {})))
    for n in res.notes:
        console.print(f"[yellow]note:[/] {n}")


def interval_table(summary: dict):
    """Rich table: total predicted / actual per model, and the spend intervals' coverage."""
    from rich.table import Table

    t = Table(title="calibration: total predicted / actual, prediction-interval coverage (95 % Wilson CI)")
    for c in ("model", "total pred/actual", "interval", "coverage", "by decile of predicted value (low -> high)"):
        t.add_column(c)
    for name, s in summary.items():
        iv = [k for k in s if k != "total_ratio"]
        if not iv:
            t.add_row(name, f"{s['total_ratio']:.3f}", "-", "-", "-")
        for i, k in enumerate(iv):
            lo, hi = s[k]["ci"]
            t.add_row(name if i == 0 else "", f"{s['total_ratio']:.3f}" if i == 0 else "", k,
                      f"{s[k]['coverage']:.3f} [{lo:.3f}, {hi:.3f}]", " ".join(f"{v:.2f}" for v in s[k]["by_decile"]))
    return t


# ---- CLI -----------------------------------------------------------------------------------------
@cli.command("backtest")
def backtest(
    transactions: Path = typer.Option(..., "--transactions", "-t", help="CSV with a header and columns customer_id,date,amount"),
    cutoff: str = typer.Option(..., "--cutoff", help="last calibration day, inclusive: YYYY-MM-DD or YYYYMMDD"),
    horizon: str = typer.Option("39w", "--horizon", help="hold-out length: weeks (39w) or days (273d)"),
    events: Path = typer.Option(None, "--events", help="clicks/reviews/profiles: archive directory or JSONL file"),
    report: Path = typer.Option(None, "--report", help="write index.html + PNG plots + metrics.json into this directory"),
    model: bool = typer.Option(True, "--model/--no-model", help="train and score the CLV model (needs the train extra)"),
    quick: bool = typer.Option(False, "--quick", help="fast model config (1 member, few epochs, no fine-tuning)"),
    bootstrap: int = typer.Option(200, "--bootstrap", min=0, help="bootstrap resamples of customers for the CIs (0 = none)"),
    seed: int = typer.Option(0, "--seed"),
    train_window: str = typer.Option(None, "--train-window", help="training label window (default: the horizon, or half the history if shorter)"),
    n_train_cutoffs: int = typer.Option(DEFAULT_TRAIN_CUTOFFS, "--train-cutoffs", min=1, help="training cutoffs stacked for the model and LightGBM"),
    device: str = typer.Option("auto", "--device", help="model device: auto, cpu, cuda"),
    horizon_scale: str = typer.Option("validated", "--horizon-scale",
                                      help="window shorter than the horizon: 'validated' (day ratio x factor measured "
                                           "one step earlier, leak-free) or 'days' (day ratio only)"),
    ablation: bool = typer.Option(False, "--ablation", help="instead: train the model five times, adding one input "
                                                             "at a time (orders, clicks, ratings, text, profile), "
                                                             "and print each step's paired gain"),
) -> None:
    """Backtest the CLV model against BG/NBD+Gamma-Gamma, LightGBM on RFM and the naive rule."""
    from rich.console import Console

    from training.transactions import InputError, load_transactions, parse_date, parse_horizon

    import sys

    # a pipe or file gets the full-width table; a terminal keeps its own width
    out = Console() if sys.stdout.isatty() else Console(width=130)
    err = Console(stderr=True)
    try:
        cut = parse_date(cutoff, what="--cutoff")
        h = parse_horizon(horizon)
        tw = parse_horizon(train_window) if train_window else None
        with err.status("reading transactions..."):
            tx = load_transactions(transactions)
        err.log(f"{transactions}: {len(tx)} transactions, {tx['customer_id'].nunique()} customers")
        side = []
        if events is not None:
            with err.status("reading events..."):
                side, counts = load_side_events(events)
            err.log(f"{events}: {counts} (orders come from the CSV; {len(side)} other events used)")
        cfg = None
        if model:
            try:
                from training.train import TrainConfig
            except ImportError as exc:
                raise InputError(
                    f"the model needs the training extra ({exc.name} is missing): pip install -e '.[train]', "
                    "or run the baselines only with --no-model"
                ) from None
            cfg = TrainConfig(seed=seed, quick=quick, device=device)
        if ablation:
            if not model:
                raise InputError("--ablation trains the model: drop --no-model")
            if events is None:
                raise InputError("--ablation compares inputs beside the orders: pass --events (archive or JSONL)")
            from training.ablation import print_ablation, run_ablation, write_ablation_report

            ab = run_ablation(tx, side, cut, h, cfg, n_boot=bootstrap, seed=seed, n_train_cutoffs=n_train_cutoffs,
                              train_days=tw, console=err)
            print_ablation(ab, out, f"ablation: {transactions.name}, cutoff {cut.date()}, horizon {h:g} d")
            if report is not None:
                out.print(f"report: {write_ablation_report(report, ab)}")
            return
        res = run_backtest(tx, cut, h, side_events=side, model=model, cfg=cfg, n_boot=bootstrap, seed=seed,
                           train_days=tw, n_train_cutoffs=n_train_cutoffs, console=err, horizon_scale=horizon_scale)
    except InputError as exc:
        err.print(f"[red]error:[/] {exc}")
        raise typer.Exit(2) from None
    print_result(res, out)
    if report is not None:
        from training.report import write_report

        with err.status("writing report..."):
            index = write_report(report, res.y, res.models, res.evaluation, res.meta, res.notes, ids=res.ids)
        out.print(f"report: {index}")
