"""Ablation on simulated data: does each input add signal?

    .venv/bin/python bench/ablation.py [--users 8000] [--quick] [--bootstrap 200] [--report DIR] [--write DIR]
                                       [--text-head probe|learned] [--set finetune_steps=128 ...]

Simulates a shop (``streams.simulate.simulate``), turns its orders into the backtest's
transactions (one row per order, USD, dated by UTC day) and runs ``training.ablation``
(the same as ``clv backtest --ablation``): the CLV model trained five times on the same
customers, adding one input at a time (orders only -> + clicks -> + ratings -> + review
text -> + profile), paired bootstrap step gains, and the text steps among review writers;
plus how many customers told the simulator's hidden plan in review text. ``--write DIR`` also saves ``transactions.csv``
and ``events.jsonl`` so the same run can be repeated with ``clv backtest``.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import typer  # noqa: E402

app = typer.Typer(add_completion=False)


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
    from training.ablation import orders_frame
    from training.train import TrainConfig
    from training.transactions import parse_date, parse_horizon

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

    from training.ablation import parse_overrides, print_ablation, run_ablation, write_ablation_report

    base_cfg = TrainConfig(seed=seed, quick=quick, text_head=text_head)
    if members:
        base_cfg = dataclasses.replace(base_cfg, n_ensemble=members)
    try:
        base_cfg = dataclasses.replace(base_cfg, **parse_overrides(overrides, base_cfg))
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    side = [e for e in events if e.type != "order"]
    res = run_ablation(tx, side, cut, h, base_cfg, n_boot=bootstrap, seed=seed, console=err)
    print_ablation(res, out, f"simulated shop ({users} users, seed {seed}), cutoff {cut.date()}, horizon {h:g} d")
    # how many scored customers the hidden plan (streams/sim: told only in review text) can help
    from streams.sim.text import PLAN
    from training.transactions import day_end_epoch

    end = day_end_epoch(cut)
    told: dict[str, str] = {}
    for e in events:
        if e.type == "review" and e.text and e.ts <= end:
            for kind, phrases in PLAN.items():
                if any(ph in e.text for ph in phrases):
                    told[e.user_id] = kind
    y = res.y
    plan_counts = {}
    for kind in PLAN:
        m_ = np.array([told.get(u) == kind for u in res.ids])
        plan_counts[kind] = {"customers": int(m_.sum()), "mean spend": round(float(y[m_].mean()), 1) if m_.any() else None}
    out.print(f"scored customers {len(res.ids)} (mean spend {float(np.mean(y)):.1f}), with review text "
              f"{int(res.writers.sum())}; told a plan before the cutoff: {plan_counts}")
    meta = {
        "simulation": f"{users} users, {days:g} days from {start}, seed {seed}",
        "told a plan in review text": plan_counts,
        "model config": ("quick" if quick else f"default ({base_cfg.n_ensemble} members)") + f", text head {text_head}"
                        + "".join(f", {o}" for o in overrides),
    }
    if report is not None:
        out.print(f"report: {write_ablation_report(report, res, meta)}")
    out.print(f"total {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    app()
