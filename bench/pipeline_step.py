"""The batch step alone: ``Pipeline.process`` on real Redis with the ONNX scorer, no Kafka.

    .venv/bin/python bench/pipeline_step.py [--events 100000] [--batch 2000] [--runs 2]
                                            [--batches 200,500,5000] [--profile] [--json OUT]

Feeds the simulated records in micro-batches of ``--batch`` straight into
``streams.pipeline.Pipeline.process`` (decode -> embed -> Redis load -> fold -> score ->
Redis save -> stats) and reports events/s, CPU µs per event and where the time goes (the
pipeline's own stage timers, plus a split of decode vs embed measured here). This is our
work per event, without Faust/Kafka: the worker can never be faster than this.
Models: the text model with its fp32 or int8 encoder, the head-only model, none; ONNX with
onnxruntime's default threads (as `clv worker` runs it) or 1 thread. ``--batches`` sweeps the
micro-batch size. ``--profile`` writes a pyinstrument HTML profile of one run (head-only
model) to var/bench/pipeline_step.html.
"""
from __future__ import annotations

import time
from collections import defaultdict
from pathlib import Path

import typer

from common import CACHE, Report, bench_model, cpu_seconds, load, sim_messages, stack

app = typer.Typer(add_completion=False)


def as_records(messages, settings, partitions: int = 4):
    """Simulated messages as the worker would receive them (topic, murmur2 partition, offsets)."""
    from aiokafka.partitioner import murmur2

    from streams.pipeline import Record
    from streams.sim.publish import topic_for

    topics = topic_for(settings)
    offsets: dict = defaultdict(int)
    now = time.time()
    out = []
    for m in messages:
        t = topics[m.kind]
        p = (murmur2(m.key) & 0x7FFFFFFF) % partitions if m.key else 0
        out.append(Record(t, p, offsets[t, p], m.key, m.value, now))
        offsets[t, p] += 1
    return out


class _Fixed:
    """HotScorer stand-in: always the same model. ``threads``: onnxruntime intra-op threads
    (None = onnxruntime's default, what `clv worker` uses today)."""

    def __init__(self, model_dir: Path | None, threads: int | None = None):
        from serving.scorer import Scorer, pick_providers

        self.current = Scorer(model_dir, pick_providers("auto"), threads) if model_dir else None


async def _run(settings, records, model_dir, batch: int, store_kind: str = "redis",
               threads: int | None = None) -> dict:
    from streams.pipeline import Pipeline
    from streams.store import MemoryStore, RedisStore

    store = RedisStore.from_settings(settings) if store_kind == "redis" else MemoryStore()
    pipe = Pipeline(settings, store, _Fixed(model_dir, threads))
    # split decode vs embed: time the pieces process() runs back to back
    dec_t = [0.0]
    emb_t = [0.0]
    orig_decode, orig_embed = pipe.decode, pipe.embed

    def decode(recs, result):
        t = time.perf_counter()
        try:
            return orig_decode(recs, result)
        finally:
            dec_t[0] += time.perf_counter() - t

    def embed(by_user):
        t = time.perf_counter()
        try:
            return orig_embed(by_user)
        finally:
            emb_t[0] += time.perf_counter() - t

    pipe.decode, pipe.embed = decode, embed
    stages: dict = defaultdict(float)
    scores = 0
    c0, t0 = cpu_seconds(), time.perf_counter()
    for i in range(0, len(records), batch):
        res = await pipe.process(records[i:i + batch])
        for k, v in res.timings.items():
            stages[k] += v
        scores += len(res.scores)
    wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    if store_kind == "redis":
        await store.r.aclose()
    n = len(records)
    stages["decode"], stages["embed"] = dec_t[0], emb_t[0]
    stages["stats"] = stages["total"] - sum(stages[k] for k in ("decode_embed", "redis", "fold", "score"))
    return {"events": n, "wall": wall, "rate": n / wall, "cpu_us": 1e6 * cpu / n, "scores": scores,
            "stage_us": {k: 1e6 * v / n for k, v in stages.items()}, "load": load()}


def measure(settings, records, model_dir, batch: int, store_kind: str = "redis", threads: int | None = None) -> dict:
    import uvloop

    return uvloop.run(_run(settings, records, model_dir, batch, store_kind, threads))


@app.command()
def main(events: int = typer.Option(100_000, help="simulated events"),
         batch: int = typer.Option(2000, help="micro-batch size (CLV_BATCH_MAX)"),
         runs: int = typer.Option(2, min=1),
         batches: str = typer.Option("", help="also sweep these batch sizes (head-only model), e.g. 200,500,5000"),
         profile: bool = typer.Option(False, help="pyinstrument HTML of one run"),
         json_out: Path = typer.Option(None, "--json")) -> None:
    msgs = sim_messages(events)
    rep = Report(f"Pipeline.process alone ({len(msgs):,} events, batch {batch}, no Kafka)",
                 ["variant", "batch", "run", "events/s", "CPU µs/event", "decode", "embed", "redis", "fold",
                  "score", "stats", "load"])
    with stack(need_kafka=False) as svc:
        text, int8, head = (bench_model(kind=k) for k in ("text", "int8", "head"))
        variants = [("Redis + text model (fp32 encoder)", text, "redis", None, batch),
                    ("Redis + text model (int8 encoder)", int8, "redis", None, batch),
                    ("Redis + text model, ONNX 1 thread", text, "redis", 1, batch),
                    ("Redis + head-only model", head, "redis", None, batch),
                    ("Redis + head-only model, ONNX 1 thread", head, "redis", 1, batch),
                    ("Redis, no model", None, "redis", None, batch),
                    ("MemoryStore + head-only model", head, "memory", None, batch)]
        variants += [("Redis + head-only model", head, "redis", None, int(b)) for b in batches.split(",") if b.strip()]
        for name, mdir, kind, threads, bsize in variants:
            for run in range(runs):
                s = svc.fresh("step")
                recs = as_records(msgs, s)
                r = measure(s, recs, mdir, bsize, kind, threads)
                st = r["stage_us"]
                rep.add(name, bsize, run + 1, r["rate"], r["cpu_us"], st["decode"], st["embed"], st["redis"], st["fold"],
                        st["score"], st["stats"], r["load"])
        if profile:
            from pyinstrument import Profiler

            s = svc.fresh("step-prof")
            recs = as_records(msgs, s)
            prof = Profiler(interval=0.0005, async_mode="disabled")
            prof.start()
            measure(s, recs, head, batch)
            prof.stop()
            out = CACHE / "pipeline_step.html"
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(prof.output_html())
            rep.notes.append(f"pyinstrument profile: {out}")
    rep.notes.append("stage columns: wall µs per event inside process() (decode = pydantic decode+checks, "
                     "embed = text encoder on review texts, redis = load+save scripts, fold = apply(), "
                     "score = features + ONNX head, stats = the stats HINCRBY round trip)")
    rep.show()
    rep.save(json_out)


if __name__ == "__main__":
    app()
