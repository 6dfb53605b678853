"""``clv simulate``: a seeded synthetic shop streaming click/order/review/profile events.

Function API (the pieces live in ``streams/sim/``; docs/simulator.md tells the story)::

    sim = simulate(n_users=2000, start="2025-01-01", days=365, seed=7)
    for ev in sim.iter_events(): ...        # typed events, time-ordered, lazy
    sim.truth["u000042"].churn_ts            # hidden traits + realised orders
    sim.future_spend(cutoff, horizon_days=90)  # the label: true spend after a cutoff
    msgs = mix(sim.iter_wire(), duplicates=0.01, bad=0.001, seed=7)
    await publish(msgs, settings, rate=None)   # idempotent batching producer
    bad_messages(random.Random(1), 100)        # (raw, key, expected Rejection.reason)
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Iterable, Iterator, Optional

import typer

from streams.sim.bad import BadMessage, bad_messages
from streams.sim.publish import PublishResult, publish
from streams.sim.simulation import Simulation, simulate, to_epoch
from streams.sim.wire import DUPLICATE, EVENT, Message, mix, write_jsonl
from streams.sim.world import SimConfig, UserTruth

__all__ = [
    "DUPLICATE", "EVENT", "BadMessage", "Message", "PublishResult", "SimConfig", "Simulation", "UserTruth",
    "bad_messages", "cli", "mix", "publish", "simulate", "to_epoch", "write_jsonl",
]

cli = typer.Typer()


def _counted(messages: Iterable[Message], tally: Counter) -> Iterator[Message]:
    for m in messages:
        tally[(m.label, m.kind)] += 1
        yield m


def _restamped(messages: Iterable[Message]) -> Iterator[Message]:
    """Live mode: event time = the moment the message is handed to the producer."""
    import orjson

    for m in messages:
        if m.label in (EVENT, DUPLICATE) and m.value:
            obj = orjson.loads(m.value)
            obj["ts"] = round(time.time(), 6)
            m = m._replace(value=orjson.dumps(obj))
        yield m


def _tee(messages: Iterable[Message], fh) -> Iterator[Message]:
    for m in messages:
        write_jsonl((m,), fh)
        yield m


@cli.command("simulate")
def simulate_command(
    users: int = typer.Option(1000, "--users", min=1, help="number of simulated customers"),
    days: float = typer.Option(365.0, "--days", min=0.01, help="length of the simulated span"),
    start: Optional[str] = typer.Option(
        None, "--start", help="first day (ISO date, UTC); default: so the span ends today"),
    seed: int = typer.Option(0, "--seed", help="same seed, same stream"),
    out: Optional[Path] = typer.Option(None, "--out", help="write one wire-format event per line"),
    to_kafka: bool = typer.Option(False, "--to-kafka", help="publish to the event topics"),
    bootstrap: Optional[str] = typer.Option(
        None, "--bootstrap", help="Kafka bootstrap servers (default: CLV_KAFKA_BOOTSTRAP)"),
    rate: float = typer.Option(0.0, "--rate", min=0.0,
                               help="messages per second when publishing; 0 = as fast as possible"),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="stop after this many events"),
    duplicates: float = typer.Option(0.0, "--duplicates", min=0.0, max=1.0,
                                     help="fraction of events sent twice (tests idempotence)"),
    bad: float = typer.Option(0.0, "--bad", min=0.0, max=1.0,
                              help="bad messages injected per event (tests the DLQ path)"),
    truth: Optional[Path] = typer.Option(
        None, "--truth", help="write each user's hidden traits and orders as JSON lines"),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
    live: bool = typer.Option(False, "--live",
                              help="stamp each event with the wall clock as it is sent (a live feed)"),
) -> None:
    """Generate a realistic, seeded event stream (with known ground truth) to a file or Kafka."""
    from rich.console import Console
    from rich.table import Table
    from tqdm import tqdm

    from streams.settings import get_settings

    console = Console(stderr=True)
    settings = get_settings()
    if bootstrap:
        settings = settings.model_copy(update={"kafka_bootstrap": bootstrap})
    try:
        sim = simulate(users, start, days, seed)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    if not live and sim.end > time.time() + settings.max_clock_skew_s:
        console.print(f"[yellow]warning:[/] the span ends after now + {settings.max_clock_skew_s:.0f}s; "
                      "the worker will reject those events as bad_timestamp (use an earlier --start)")
    if not out and not to_kafka:
        console.print("no --out or --to-kafka given: generating only (a dry run)")

    tally: Counter = Counter()
    msgs = _counted(mix(sim.iter_wire(limit), duplicates=duplicates, bad=bad, seed=seed,
                        users=users), tally)
    if live:
        msgs = _restamped(msgs)
    bar = tqdm(total=None, unit="msg", unit_scale=True, disable=not progress, file=sys.stderr,
               desc="simulate")
    t0 = time.perf_counter()
    fh = open(out, "wb") if out else None
    result: PublishResult | None = None
    try:
        if fh is not None:
            msgs = _tee(msgs, fh)
        if to_kafka:
            try:
                result = asyncio.run(publish(msgs, settings, rate or None, progress=bar.update))
            except RuntimeError as exc:
                console.print(f"[red]error:[/] {exc}")
                raise typer.Exit(2) from exc
        else:
            for i, _ in enumerate(msgs, 1):
                if i % 1000 == 0:
                    bar.update(1000)
    finally:
        bar.close()
        if fh is not None:
            fh.close()
    wall = time.perf_counter() - t0

    if truth:
        with open(truth, "w") as tf:
            for t in sim.truth.values():
                tf.write(json.dumps(dataclasses.asdict(t)) + "\n")

    table = Table(title=f"clv simulate: {users} users, {days:g} days, seed {seed}")
    table.add_column("what")
    table.add_column("count", justify="right")
    for kind in ("profile", "click", "order", "review"):
        table.add_row(f"{kind} events", str(tally[(EVENT, kind)]))
    table.add_row("duplicates", str(sum(v for (lab, _), v in tally.items() if lab == DUPLICATE)))
    table.add_row("bad messages", str(sum(v for (lab, _), v in tally.items()
                                          if lab not in (EVENT, DUPLICATE))))
    total = sum(tally.values())
    table.add_row("messages", str(total))
    table.add_row("wall time", f"{wall:.2f} s")
    table.add_row("rate", f"{total / wall if wall > 0 else 0:,.0f} msg/s")
    if result is not None:
        table.add_row("delivered (acks=all)", str(result.delivered))
        table.add_row("failed", str(result.failed))
    if out:
        table.add_row("file", str(out))
    console.print(table)
    if result is not None and result.failed:
        console.print(f"[red]{result.failed} messages were not delivered[/]: {result.first_error}")
        raise typer.Exit(1)
