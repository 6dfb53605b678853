"""Ablation: does each input add signal? (``clv backtest --ablation``, ``bench/ablation.py``)

Trains the CLV model five times on the same customers and training windows, adding one
input at a time:

    orders only -> + clicks -> + reviews (ratings, no text) -> + review text -> + profile (full)

Each arm gets only the events it is allowed to see (so "orders only" really sees nothing
else) and the matching ``TrainConfig`` switches. All arms and the baselines are scored on the
same customers; paired bootstrap intervals of each step's gain (arm - previous arm) show
whether the gain is signal or noise. The text steps are also scored among the customers who
wrote review text on or before the cutoff, where text can matter at all.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

ARMS = (
    # name, event types besides orders, TrainConfig switches
    ("orders only", (), dict(use_clicks=False, use_text=False, use_profile=False)),
    ("+ clicks", ("click",), dict(use_clicks=True, use_text=False, use_profile=False)),
    ("+ reviews (ratings)", ("click", "review"), dict(use_clicks=True, use_text=False, use_profile=False)),
    ("+ review text", ("click", "review"), dict(use_clicks=True, use_text=True, use_profile=False)),
    ("+ profile (full)", ("click", "review", "profile"), dict(use_clicks=True, use_text=True, use_profile=True)),
)
MIN_WRITERS = 50  # fewer customers with text: no separate table for them


@dataclass
class AblationResult:
    ids: list[str]
    y: Any  # np.ndarray actual spend in the horizon
    models: list  # ModelScores: the arms, then the baselines
    evaluation: Any  # all customers
    writers: Any  # np.ndarray bool: wrote review text on/before the cutoff
    writers_evaluation: Any  # Evaluation among writers (None when fewer than MIN_WRITERS)
    meta: dict = field(default_factory=dict)


def orders_frame(events):
    """Orders (``streams.events.Order``) as a transactions frame (customer_id, date = UTC day, amount in USD)."""
    import pandas as pd

    from streams.events import Order
    from streams.fold import FX_TO_USD

    rows = [(e.user_id, e.ts, e.amount * FX_TO_USD[e.currency]) for e in events if isinstance(e, Order)]
    df = pd.DataFrame(rows, columns=["customer_id", "ts", "amount"])
    df["date"] = pd.to_datetime(df["ts"], unit="s", utc=True).dt.tz_localize(None).dt.normalize()
    return df[["customer_id", "date", "amount"]].reset_index(drop=True)


def parse_overrides(items: Sequence[str], cfg) -> dict:
    """``["finetune_steps=128", ...]`` -> {field: value typed like the config's current value}."""
    fields = {f.name for f in dataclasses.fields(cfg)}
    out = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or key not in fields:
            raise ValueError(f"--set {item!r}: expected FIELD=VALUE with FIELD one of {sorted(fields)}")
        cur = getattr(cfg, key)
        if isinstance(cur, bool):
            val = raw.lower() in ("1", "true", "yes", "on")
        elif isinstance(cur, tuple):
            val = tuple(int(v) for v in raw.split(","))
        elif cur is None:
            val = raw
        else:
            val = type(cur)(raw)
        out[key] = val
    return out


def run_ablation(tx, side_events: Sequence, cutoff, horizon_days: float, cfg, *, n_boot: int = 200,
                 seed: int = 0, n_train_cutoffs: int = 3, train_days: float | None = None,
                 console=None) -> AblationResult:
    """The five arms plus BG/NBD+GG, LightGBM-RFM and naive on the customers active at
    ``cutoff`` (``tx`` as ``training.transactions.load_transactions`` returns it; orders come
    from it, clicks/reviews/profiles from ``side_events``)."""
    import numpy as np
    import pandas as pd
    from rich.console import Console

    from training import baselines as B
    from training.backtest import fit_model, train_cutoffs
    from training.evaluate import ModelScores, evaluate
    from training.transactions import InputError, active_customers, day_end_epoch, spend_between

    console = console or Console(stderr=True)
    cut = pd.Timestamp(cutoff).normalize()
    ids = active_customers(tx, cut)
    if len(ids) < 10:
        raise InputError(f"only {len(ids)} customers bought on or before {cut.date()}; need at least 10")
    y = spend_between(tx, cut, cut + pd.Timedelta(days=horizon_days), ids)
    window = B.choose_window(tx, cut, horizon_days, train_days)
    t_cuts = train_cutoffs(tx, window, n_train_cutoffs)
    models, infos, timings = [], {}, {}
    for name, kinds, switches in ARMS:
        side = [e for e in side_events if e.type in kinds]
        arm_cfg = dataclasses.replace(cfg, **switches)
        t0 = time.perf_counter()
        with console.status(f"arm '{name}': dataset + training..."):
            m, info = fit_model(tx, side, window, ids, t_cuts, arm_cfg)
        timings[name] = round(time.perf_counter() - t0, 1)
        infos[name] = info
        console.log(f"arm '{name}': {timings[name]} s")
        # scaled by the day ratio only: the arms are compared on ranking (Gini, Spearman, AUC)
        models.append(ModelScores(name, m.expected, m.p_any))
    with console.status("baselines..."):
        bg, _ = B.bgnbd_gg(tx, cut, horizon_days, ids)
        models += [bg, B.lightgbm_rfm(tx, window, ids, seed=seed, train_cutoffs=t_cuts),
                   B.naive(tx, cut, horizon_days, ids)]
    names = [a[0] for a in ARMS]
    compare = [(names[i], names[i - 1]) for i in range(1, len(names))]
    compare += [(names[0], "LightGBM-RFM"), (names[-1], names[0])]
    ev = evaluate(y, models, n_boot=n_boot, seed=seed, compare_to=compare)
    end = day_end_epoch(cut)
    wrote = {e.user_id for e in side_events if e.type == "review" and e.text and e.ts <= end}
    writers = np.array([u in wrote for u in ids])
    wev = None
    if writers.sum() >= MIN_WRITERS and y[writers].sum() > 0:
        arms = [m for m in models if m.name in names]
        wev = evaluate(y[writers], [ModelScores(m.name, m.expected[writers], None if m.p_any is None else m.p_any[writers])
                                    for m in arms],
                       n_boot=n_boot, seed=seed, compare_to=[(names[3], names[2]), (names[4], names[3])])
    meta = {
        "cutoff": str(cut.date()), "horizon days": horizon_days, "customers": len(ids),
        "buyers in horizon": int((y > 0).sum()), "customers with review text": int(writers.sum()),
        "training windows": ", ".join(f"{t.date()}+{window.train_days:.0f}d" for t in t_cuts),
        "bootstrap": f"{n_boot} resamples, seed {seed}", "timings (s)": timings, "arms": infos,
    }
    return AblationResult(ids, y, models, ev, writers, wev, meta)


def print_ablation(res: AblationResult, console, title: str) -> None:
    from training.report import console_tables

    table, diffs = console_tables(res.evaluation, title)
    console.print(table)
    console.print(diffs)
    if res.writers_evaluation is not None:
        t2, d2 = console_tables(res.writers_evaluation,
                                f"customers with review text on/before the cutoff ({int(res.writers.sum())})")
        console.print(t2)
        console.print(d2)
    else:
        console.print(f"{int(res.writers.sum())} customers wrote review text before the cutoff "
                      f"(fewer than {MIN_WRITERS}): no separate table for them")


def write_ablation_report(out_dir, res: AblationResult, extra_meta: dict | None = None):
    """The backtest report of the arms (+ ``text_subset.json`` for the writers)."""
    import json
    from pathlib import Path

    from training.report import write_report

    out = Path(out_dir)
    index = write_report(out, res.y, res.models, res.evaluation, {**res.meta, **(extra_meta or {})}, ids=res.ids)
    if res.writers_evaluation is not None:
        (out / "text_subset.json").write_text(json.dumps(res.writers_evaluation.to_json(), indent=2))
    return index
