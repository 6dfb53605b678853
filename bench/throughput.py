"""End-to-end events/s of one worker against a bare aiokafka consume loop, same topic, same data.

    .venv/bin/python bench/throughput.py [--events 200000] [--runs 2] [--models text,head]
                                         [--variants "clv worker"] [--step/--no-step] [--json OUT]

1. ``--events`` simulated events (a year of a shop, ~1 % duplicates, 0.1 % bad messages) are
   published once to a fresh 4-topic set of ``--partitions`` partitions each.
2. bare loop: ``AIOKafkaConsumer.getmany(max_records=2000)`` + ``orjson.loads`` of every value
   over the same topics (no group, from the beginning, uvloop) - the ceiling for any Python
   consumer.
3. each worker variant (``--variants``, default the real ``clv worker``; prototypes from
   bench/prototypes/) drains the topics into a fresh consumer group and Redis prefix with
   each model kind of ``--models`` (text: fp32 review encoder as `clv train` ships it,
   int8: the quantised encoder, head: no encoder). Rate = from the first events counted in
   ``clv:v1:stats`` to all counted (start-up excluded); lag 0 (all committed) is timed too.
4. ``--step``: ``Pipeline.process`` alone on the same records (no Kafka), to separate the
   framework's cost from our work.

Ratios (worker / bare loop) are computed from figures of the same run.
"""
from __future__ import annotations

import time
from pathlib import Path

import typer

from common import Report, bench_model, create_topics, install_model, load, publish, sim_messages, stack
from common import cpu_seconds, median

app = typer.Typer(add_completion=False)
TARGET_RATIO, TARGET_RATE = 0.5, 20_000


async def _bare(settings, expected: int) -> dict:
    import orjson
    from aiokafka import AIOKafkaConsumer, TopicPartition

    from streams.kafka import client_kwargs

    c = AIOKafkaConsumer(**client_kwargs(settings), group_id=None, enable_auto_commit=False,
                         auto_offset_reset="earliest")
    await c.start()
    try:
        tps = [TopicPartition(t, p) for t in settings.event_topics
               for p in sorted(c.partitions_for_topic(t) or await _parts(c, t))]
        c.assign(tps)
        await c.seek_to_beginning(*tps)
        n, n0, t0, c0 = 0, 0, None, 0.0
        loads = orjson.loads
        deadline = time.perf_counter() + 120
        while n < expected and time.perf_counter() < deadline:
            batches = await c.getmany(timeout_ms=500, max_records=2000)  # batches like CLV_BATCH_MAX
            if t0 is None and batches:  # like the worker: count from the end of the first batch
                t0, c0, n0 = time.perf_counter(), cpu_seconds(), sum(len(v) for v in batches.values())
                n = n0
                continue
            for recs in batches.values():
                for r in recs:
                    try:
                        loads(r.value)
                    except orjson.JSONDecodeError:  # the injected bad messages
                        pass
                n += len(recs)
        wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    finally:
        await c.stop()
    if n < expected:
        raise RuntimeError(f"bare loop read only {n}/{expected} records in 120 s")
    return {"rate": (n - n0) / wall, "cpu_us": 1e6 * cpu / max(1, n - n0), "load": load()}


async def _parts(c, topic):
    await c._client.force_metadata_update()
    return c.partitions_for_topic(topic) or []


def bare_loop(settings, expected: int) -> dict:
    import uvloop

    return uvloop.run(_bare(settings, expected))


@app.command()
def main(events: int = typer.Option(200_000, help="simulated events to publish"),
         partitions: int = typer.Option(4, help="partitions per event topic"),
         runs: int = typer.Option(2, min=1, help="repetitions of every measurement"),
         models: str = typer.Option("text,head", help="model kinds: text, int8, head (comma list)"),
         variants: str = typer.Option("clv worker", help="worker variants (bench/workers.py VARIANTS)"),
         step: bool = typer.Option(True, help="also time Pipeline.process alone"),
         env: list[str] = typer.Option([], "--env", help="extra CLV_X=Y for the workers (repeatable)"),
         json_out: Path = typer.Option(None, "--json")) -> None:
    from workers import VARIANTS, run_variant

    kinds = [k.strip() for k in models.split(",") if k.strip()]
    names = [v.strip() for v in variants.split(",") if v.strip()]
    for v in names:
        if v not in VARIANTS:
            raise typer.BadParameter(f"unknown variant {v!r}; known: {sorted(VARIANTS)}")
    extra = dict(e.split("=", 1) for e in env)
    msgs = sim_messages(events)
    n = len(msgs)
    rep = Report(f"End-to-end events/s, one worker ({n:,} events, {partitions} partitions x 4 topics)",
                 ["what", "model", "run", "events/s", "CPU µs/event", "vs bare loop", "lag 0 after s",
                  "load"])
    with stack(partitions) as svc:
        base = svc.fresh("tput", topic_partitions=partitions)
        create_topics(base, partitions)
        t0 = time.perf_counter()
        pub_rate = publish(msgs, base)
        rep.notes.append(f"published {n:,} messages at {pub_rate:,.0f} msg/s in {time.perf_counter() - t0:.1f}s")
        bare = []
        for run in range(runs):
            b = bare_loop(base, n)
            bare.append(b["rate"])
            rep.add("bare aiokafka getmany + orjson", "-", run + 1, b["rate"], b["cpu_us"], "1.00", "-", b["load"])
        bare_rate = median(bare) or float("nan")
        best: dict = {}
        for kind in kinds:
            model_dir = bench_model(kind=kind)
            for name in names:
                for run in range(runs):
                    s = svc.fresh("tput", topic_partitions=partitions, **_topics_of(base))
                    install_model(s, model_dir)
                    d = run_variant(name, s, n, svc.root / "logs", env=extra)
                    rep.add(name, kind, run + 1, d.rate, d.cpu_us, f"{d.rate / bare_rate:.2f}",
                            f"{d.lag0_s:.1f}" if d.lag0_s is not None else "-", d.load)
                    best[(name, kind)] = max(best.get((name, kind), 0.0), d.rate)
            if step:
                from pipeline_step import as_records, measure

                for run in range(runs):
                    s = svc.fresh("step")
                    r = measure(s, as_records(msgs, s, partitions), model_dir, s.batch_max)
                    rep.add("Pipeline.process alone (no Kafka)", kind, run + 1, r["rate"], r["cpu_us"],
                            f"{r['rate'] / bare_rate:.2f}", "-", r["load"])
        for (name, kind), rate in best.items():
            rep.target(f"{name} [{kind}] >= 50 % of bare loop", ">= 0.50",
                       f"{rate / bare_rate:.2f} (best run)", rate / bare_rate >= TARGET_RATIO)
            rep.target(f"{name} [{kind}] events/s", f">= {TARGET_RATE:,}", f"{rate:,.0f}", rate >= TARGET_RATE)
    rep.notes.append("events/s: wall clock from the first events counted to all counted (worker start-up "
                     "excluded); CPU µs/event: the worker process's user+sys CPU over the same span "
                     "(ONNX threads included); 'vs bare loop' divides by the median bare-loop rate of this run")
    rep.notes.append(f"worker settings: {_knobs(base, extra)}")
    rep.show()
    rep.save(json_out)


def _topics_of(s) -> dict:
    return {f"topic_{k}": getattr(s, f"topic_{k}") for k in
            ("clicks", "orders", "reviews", "profiles", "scores", "dlq")}


def _knobs(s, extra: dict) -> str:
    keys = ("batch_max", "batch_within_s", "stream_buffer_maxsize", "archive_batch_max")
    return ", ".join(f"CLV_{k.upper()}={getattr(s, k)}" for k in keys) + "".join(f", {k}={v}" for k, v in extra.items())


if __name__ == "__main__":
    app()
