"""Ablation on simulated data: does each input add signal?

    .venv/bin/python bench/ablation.py [--users 8000] [--quick] [--bootstrap 200] [--report DIR] [--write DIR]
                                       [--text-head probe|learned] [--set finetune_steps=128 ...]

Simulates a shop (``streams.simulate.simulate``), turns its orders into the backtest's
transactions (one row per order, USD, dated by UTC day) and trains the CLV model five times
on the same customers and training windows, adding one input at a time:

    orders only -> + clicks -> + reviews (ratings, no text) -> + review text -> + profile (full)

Each arm gets only the events it is allowed to see (so "orders only" really sees nothing
else) and the matching ``TrainConfig`` switches. All arms and the baselines are scored on
the same customers; paired bootstrap intervals of each step's gain (arm - previous arm)
show whether the gain is signal or noise. ``--write DIR`` also saves ``transactions.csv``
and ``events.jsonl`` so the same run can be repeated with ``clv backtest``.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import typer  # noqa: E402

app = typer.Typer(add_completion=False)
ARMS = (
    # name, event types besides orders, TrainConfig switches
    ("orders only", (), dict(use_clicks=False, use_text=False, use_profile=False)),
    ("+ clicks", ("click",), dict(use_clicks=True, use_text=False, use_profile=False)),
    ("+ reviews (ratings)", ("click", "review"), dict(use_clicks=True, use_text=False, use_profile=False)),
    ("+ review text", ("click", "review"), dict(use_clicks=True, use_text=True, use_profile=False)),
    ("+ profile (full)", ("click", "review", "profile"), dict(use_clicks=True, use_text=True, use_profile=True)),
)


def orders_frame(events):
    """Simulated orders as a transactions frame (customer_id, date = UTC day, amount in USD)."""
    import pandas as pd

    from streams.events import Order
    from streams.fold import FX_TO_USD

    rows = [(e.user_id, e.ts, e.amount * FX_TO_USD[e.currency]) for e in events if isinstance(e, Order)]
    df = pd.DataFrame(rows, columns=["customer_id", "ts", "amount"])
    df["date"] = pd.to_datetime(df["ts"], unit="s", utc=True).dt.tz_localize(None).dt.normalize()
    return df[["customer_id", "date", "amount"]].reset_index(drop=True)


def parse_overrides(items, cfg) -> dict:
    """``["finetune_steps=128", ...]`` -> {field: value typed like the config's current value}."""
    import dataclasses

    fields = {f.name for f in dataclasses.fields(cfg)}
    out = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or key not in fields:
            raise typer.BadParameter(f"--set {item!r}: expected FIELD=VALUE with FIELD one of {sorted(fields)}")
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


@app.command()
def main(
    users: int = typer.Option(8000, "--users"),
    days: float = typer.Option(600.0, "--days", help="simulated span"),
    start: str = typer.Option("2024-01-01", "--start"),
    cutoff: str = typer.Option("2025-01-31", "--cutoff", help="last calibration day"),
    horizon: str = typer.Option("26w", "--horizon"),
    seed: int = typer.Option(1, "--seed", help="simulation and training seed"),
    quick: bool = typer.Option(False, "--quick", help="fast model config (1 member, no fine-tuning)"),
    members: int = typer.Option(0, "--members", help="ensemble members per arm (0 = the config default)"),
    text_head: str = typer.Option("probe", "--text-head",
                                  help="how the review embedding enters the head: 'probe' (cross-fitted ridge "
                                       "scores, the default) or 'learned' (joint 384->16 layer, the old design)"),
    bootstrap: int = typer.Option(200, "--bootstrap"),
    overrides: list[str] = typer.Option([], "--set", help="TrainConfig field=value for every arm (repeatable), "
                                                            "e.g. --set finetune_steps=128 --set finetune_texts=4096"),
    report: Path = typer.Option(None, "--report", help="write the HTML report here"),
    write: Path = typer.Option(None, "--write", help="also write transactions.csv + events.jsonl here"),
) -> None:
    import dataclasses

    from rich.console import Console

    from streams.events import encode
    from streams.simulate import simulate
    from training import baselines as B
    from training.backtest import fit_model, train_cutoffs
    from training.evaluate import ModelScores, evaluate
    from training.report import console_tables, write_report
    from training.train import TrainConfig
    from training.transactions import active_customers, parse_date, parse_horizon, spend_between

    out, err = Console(width=140), Console(stderr=True)
    t_start = time.perf_counter()
    cut, h = parse_date(cutoff), parse_horizon(horizon)
    with err.status(f"simulating {users} customers over {days:g} days..."):
        sim = simulate(n_users=users, start=start, days=days, seed=seed)
        events = list(sim.iter_events())
    tx = orders_frame(events)
    err.log(f"simulated {len(events)} events, {len(tx)} orders ({time.perf_counter() - t_start:.0f} s)")
    if write is not None:
        write.mkdir(parents=True, exist_ok=True)
        csv = tx.assign(date=tx["date"].dt.strftime("%Y-%m-%d"))
        csv.to_csv(write / "transactions.csv", index=False)
        with open(write / "events.jsonl", "wb") as fh:
            for e in events:
                if e.type != "order":
                    fh.write(encode(e) + b"\n")
        err.log(f"wrote {write}/transactions.csv and events.jsonl: "
                f"clv backtest -t {write}/transactions.csv --events {write}/events.jsonl --cutoff {cutoff} --horizon {horizon}")

    import numpy as np
    import pandas as pd

    ids = active_customers(tx, cut)
    y = spend_between(tx, cut, cut + pd.Timedelta(days=h), ids)
    window = B.choose_window(tx, cut, h)
    t_cuts = train_cutoffs(tx, window, 3)
    models: list[ModelScores] = []
    infos = {}
    base_cfg = TrainConfig(seed=seed, quick=quick, text_head=text_head)
    if members:
        base_cfg = dataclasses.replace(base_cfg, n_ensemble=members)
    base_cfg = dataclasses.replace(base_cfg, **parse_overrides(overrides, base_cfg))
    for name, kinds, switches in ARMS:
        side = [e for e in events if e.type in kinds]
        cfg = dataclasses.replace(base_cfg, **switches)
        t0 = time.perf_counter()
        with err.status(f"arm '{name}': dataset + training..."):
            m, info = fit_model(tx, side, window, ids, t_cuts, cfg)
        infos[name] = info
        err.log(f"arm '{name}': {time.perf_counter() - t0:.0f} s, {info}")
        models.append(ModelScores(name, m.expected, m.p_any))
    with err.status("baselines..."):
        bg, _ = B.bgnbd_gg(tx, cut, h, ids)
        models += [bg, B.lightgbm_rfm(tx, window, ids, seed=seed, train_cutoffs=t_cuts), B.naive(tx, cut, h, ids)]
    compare = [(ARMS[i][0], ARMS[i - 1][0]) for i in range(1, len(ARMS))]
    compare += [(ARMS[0][0], "LightGBM-RFM"), (ARMS[-1][0], ARMS[0][0])]
    ev = evaluate(y, models, n_boot=bootstrap, seed=seed, compare_to=compare)
    table, diffs = console_tables(ev, f"simulated shop ({users} users, seed {seed}), cutoff {cut.date()}, horizon {h:g} d")
    out.print(table)
    out.print(diffs)
    # where text can matter at all: customers who wrote review text before the cutoff
    from training.transactions import day_end_epoch

    end = day_end_epoch(cut)
    writers = {e.user_id for e in events if e.type == "review" and e.text and e.ts <= end}
    sub = np.array([u in writers for u in ids])
    # how many scored customers the hidden plan (streams/sim: told only in review text) can help
    from streams.sim.text import PLAN

    told: dict[str, str] = {}
    for e in events:
        if e.type == "review" and e.text and e.ts <= end:
            for kind, phrases in PLAN.items():
                if any(ph in e.text for ph in phrases):
                    told[e.user_id] = kind
    plan_counts = {}
    for kind in PLAN:
        m_ = np.array([told.get(u) == kind for u in ids])
        plan_counts[kind] = {"customers": int(m_.sum()), "mean spend": round(float(y[m_].mean()), 1) if m_.any() else None}
    out.print(f"scored customers {len(ids)} (mean spend {float(np.mean(y)):.1f}), with review text {int(sub.sum())}; "
              f"told a plan before the cutoff: {plan_counts}")
    sub_ev = None
    if sub.sum() >= 50:
        arms = [m for m in models if m.name in {a[0] for a in ARMS}]
        sub_ev = evaluate(y[sub], [ModelScores(m.name, m.expected[sub], None if m.p_any is None else m.p_any[sub])
                                   for m in arms],
                          n_boot=bootstrap, seed=seed, compare_to=[(ARMS[3][0], ARMS[2][0]), (ARMS[4][0], ARMS[3][0])])
        t2, d2 = console_tables(sub_ev, "customers with review text before the cutoff")
        out.print(t2)
        out.print(d2)
    meta = {
        "simulation": f"{users} users, {days:g} days from {start}, seed {seed}",
        "cutoff": str(cut.date()), "horizon days": h, "customers": len(ids),
        "buyers in horizon": int((y > 0).sum()),
        "told a plan in review text": plan_counts,
        "training windows": ", ".join(f"{t.date()}+{window.train_days:.0f}d" for t in t_cuts),
        "model config": ("quick" if quick else f"default ({base_cfg.n_ensemble} members)") + f", text head {text_head}"
                        + "".join(f", {o}" for o in overrides),
        "arms": infos,
    }
    if report is not None:
        out.print(f"report: {write_report(report, y, models, ev, meta, ids=ids)}")
        if sub_ev is not None:
            import json

            (report / "text_subset.json").write_text(json.dumps(sub_ev.to_json(), indent=2))
    out.print(f"total {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    app()
