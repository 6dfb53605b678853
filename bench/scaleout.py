"""Scale-out: two workers in one consumer group vs one, on an 8-partition topic set.

    .venv/bin/python bench/scaleout.py [--events 100000] [--partitions 8] [--runs 2]
                                       [--variants "clv worker"] [--model head] [--json OUT]

The same events are drained by 1 and then 2 worker processes (fresh topics, group and Redis
prefix each time). The workers start first; once the group is Stable with all of them (read
from Kafka), the events are published as fast as possible (far faster than they are consumed)
and the rate is all workers' events counted in ``clv:v1:stats`` from the first count to the
last: steady state, without the join/rebalance.
On a 2-core machine shared with Kafka, Redis and other work, two CPU-bound workers can at best
double what one gets when one worker does not already have a core to itself: the CPU µs/event
column (both workers together) tells whether scaling lost efficiency.
"""
from __future__ import annotations

from pathlib import Path

import typer

from common import Report, bench_model, create_topics, install_model, median, sim_messages, stack

app = typer.Typer(add_completion=False)


@app.command()
def main(events: int = typer.Option(100_000), partitions: int = typer.Option(8), runs: int = typer.Option(2, min=1),
         variants: str = typer.Option("clv worker"), model: str = typer.Option("head"),
         json_out: Path = typer.Option(None, "--json")) -> None:
    from workers import run_variant

    msgs = sim_messages(events)
    n = len(msgs)
    rep = Report(f"Scale-out: 1 vs 2 workers, {n:,} events, {partitions} partitions x 4 topics (model {model})",
                 ["variant", "workers", "run", "events/s", "CPU µs/event (all workers)", "speed-up vs 1", "lag 0 after s",
                  "load"])
    with stack(partitions) as svc:
        model_dir = bench_model(kind=model)
        for name in [v.strip() for v in variants.split(",") if v.strip()]:
            one: list = []
            for k in (1, 2):
                for run in range(runs):
                    s = svc.fresh("scale", topic_partitions=partitions)
                    create_topics(s, partitions)
                    install_model(s, model_dir)
                    d = run_variant(name, s, n, svc.root / "logs", n_workers=k, publish_after=msgs)
                    if k == 1:
                        one.append(d.rate)
                    sp = d.rate / median(one) if one else float("nan")
                    rep.add(name, k, run + 1, d.rate, d.cpu_us, f"{sp:.2f}x",
                            f"{d.lag0_s:.1f}" if d.lag0_s is not None else "-", d.load)
                    if k == 2 and run == runs - 1:
                        rep.target(f"{name}: 2 workers vs 1", "> 1x (scales out)", f"{sp:.2f}x", sp > 1.0)
    rep.notes.append("speed-up vs 1 divides by the median single-worker rate of this run")
    rep.show()
    rep.save(json_out)


if __name__ == "__main__":
    app()
