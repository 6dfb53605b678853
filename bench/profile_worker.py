"""Where a running worker's CPU goes per event: py-spy on a real worker draining a topic.

    .venv/bin/python bench/profile_worker.py [--events 100000] [--model text|int8|head]
                                             [--variant "clv worker"] [--seconds 20] [--json OUT]

Publishes simulated events, starts the worker, and once it consumes attaches ``py-spy record``
(100 Hz, raw collapsed stacks) for ``--seconds``. Every sample is put in one bucket by the
innermost frame that names a known piece of work (see ``BUCKETS``); what is left under
faust/mode is Faust's per-message machinery (stream iterator, conductor, acks, take buffer).
Shares of samples times the measured CPU µs/event give µs per event per bucket.
The raw stacks and a speedscope file go to var/bench/ (open the .json at speedscope.app).
"""
from __future__ import annotations

import collections
import subprocess
import sys
import threading
import time
from pathlib import Path

import typer

from common import CACHE, Report, bench_model, create_topics, install_model, publish, sim_messages, stack

app = typer.Typer(add_completion=False)

# (bucket, substrings of a "function (file:line)" frame). A sample goes to the innermost frame
# that matches a SPECIFIC bucket anywhere in its stack (so asyncio under the Redis client counts
# as Redis); only stacks with none of them fall back to the GENERIC buckets.
SPECIFIC: list[tuple[str, tuple[str, ...]]] = [
    ("one-time imports (lazy import in a batch)", ("<frozen importlib",)),
    ("text encoder (tokenize + ONNX)", ("encode (serving/scorer.py", "Pipeline.embed", "tokenizers")),
    ("head: features + ONNX", ("features_batch", "text_batch", "_fill (streams/fold.py", "score (serving/scorer.py",
                               "_score (streams/pipeline.py")),
    ("decode: pydantic + checks", ("streams/events.py",)),
    ("fold: apply()", ("streams/fold.py",)),
    ("redis: scripts, codec", ("streams/store.py", "(redis/", "hiredis")),
    ("archive (parquet; + 2nd decode in clv worker)", ("streams/archive.py", "_archive_batch", "pyarrow")),
    ("publish scores/DLQ (producer)", ("_publish (streams/app.py", "aiokafka/producer", "publish_batched", "_publish_scores")),
    ("metrics", ("streams/observe.py", "prometheus_client", "serving/lag.py")),
    ("aiokafka consumer: fetch + parse", ("aiokafka/consumer", "aiokafka/record", "aiokafka/conn",
                                          "aiokafka/client", "aiokafka/protocol", "aiokafka/util")),
    ("pipeline glue (records, batch result)", ("streams/pipeline.py", "streams/app.py", "streams/engine.py", "LeanWorker.run",
                                               "OnePassWorker", "prototypes/app_onepass.py")),
]
GENERIC: list[tuple[str, tuple[str, ...]]] = [
    ("faust/mode per-message machinery", ("(faust/", "(mode/")),
    ("asyncio scheduling (Python side)", ("asyncio/",)),
]
LOOP_LEAVES = ("execute_from_commandline", "_start_thread", "run_until_complete", "run_forever", "uvloop",
               "Runner.run")
IDLE_LEAVES = ("_worker (concurrent/futures/thread.py", "select (selectors.py", "wait (threading.py")


def bucket_of(stack: list[str]) -> str:
    if any(k in stack[-1] for k in IDLE_LEAVES):
        return "idle threads (executor / metrics server waits)"
    for table in (SPECIFIC, GENERIC):
        for frame in reversed(stack):
            for name, keys in table:
                if any(k in frame for k in keys):
                    if table is GENERIC and any(k in stack[-1] for k in LOOP_LEAVES):
                        return "event loop in C (uvloop: epoll, sockets, callbacks)"
                    return name
    return "other"


def summarise(raw: Path) -> tuple[collections.Counter, int, collections.Counter]:
    buckets: collections.Counter = collections.Counter()
    leaves: collections.Counter = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        frames = stack.split(";")
        n = int(count)
        total += n
        buckets[bucket_of(frames)] += n
        leaves[frames[-1]] += n
    return buckets, total, leaves


@app.command()
def main(events: int = typer.Option(100_000, help="simulated events to publish"),
         model: str = typer.Option("head", help="model kind: text, int8 or head"),
         variant: str = typer.Option("clv worker", help="worker variant (bench/workers.py VARIANTS)"),
         seconds: float = typer.Option(20.0, help="how long py-spy samples"),
         env: list[str] = typer.Option([], "--env", help="extra CLV_X=Y for the worker"),
         json_out: Path = typer.Option(None, "--json")) -> None:
    from workers import VARIANTS, Proc, drain

    from tests.conftest import free_ports

    extra = dict(e.split("=", 1) for e in env)
    msgs = sim_messages(events)
    out_dir = CACHE
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = f"{variant}-{model}".replace(" ", "_").replace(":", "")
    raw = out_dir / f"profile-{tag}.txt"
    with stack() as svc:
        s = svc.fresh("prof")
        create_topics(s, 4)
        publish(msgs, s)
        install_model(s, bench_model(kind=model))
        (port,) = free_ports(1)
        proc = Proc(VARIANTS[variant], s, svc.root / "logs" / "worker.log",
                    {"CLV_WORKER_WEB_PORT": str(port), **extra}).start()
        result: dict = {}

        def spy():
            # wait for consumption to start, then sample
            import redis

            from streams.keys import Keys

            r = redis.Redis.from_url(s.redis_url)
            while proc.alive and not int(r.hget(Keys(s.redis_prefix).stats, "events") or 0):
                time.sleep(0.05)
            r.close()
            cmd = [str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(proc.pid), "--rate", "100",
                   "--duration", str(int(seconds)), "--format", "raw", "--output", str(raw), "--nonblocking"]
            result["spy"] = subprocess.run(cmd, capture_output=True, text=True)

        th = threading.Thread(target=spy)
        th.start()
        try:
            d = drain(s, len(msgs), [proc], timeout=600, lag0=False)
        finally:
            th.join()
            proc.stop()
        if result["spy"].returncode != 0 and not raw.exists():
            raise RuntimeError(f"py-spy failed: {result['spy'].stderr}")
    buckets, total, leaves = summarise(raw)
    rep = Report(f"Worker CPU per event by component ({variant}, model {model}, {len(msgs):,} events)",
                 ["component", "share of samples", "µs/event"])
    for name, n in buckets.most_common():
        rep.add(name, f"{100 * n / total:.1f} %", d.cpu_us * n / total)
    rep.add("total (measured)", "100 %", d.cpu_us)
    rep.notes.append(f"worker drained at {d.rate:,.0f} events/s, {d.cpu_us:.0f} CPU µs/event, {d.load}; "
                     f"{total} py-spy samples (100 Hz, Python threads; ONNX intra-op threads are native and "
                     "show up only in the measured total)")
    rep.notes.append("top leaf frames: " + "; ".join(f"{f} {100 * n / total:.1f}%"
                                                     for f, n in leaves.most_common(8)))
    rep.notes.append(f"raw collapsed stacks: {raw}")
    rep.show()
    rep.save(json_out)


if __name__ == "__main__":
    app()
