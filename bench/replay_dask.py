"""Training-set build on Dask: wall time and peak memory per worker, 1 vs 2 workers.

    .venv/bin/python bench/replay_dask.py --events 10000000 --users 40000 [--dir /tmp/clv-bench-dask]

1. writes a simulated archive straight to Parquet in the archive's own format (no Kafka: the
   simulator's wire bytes as the worker would archive them, one file per topic-partition and
   flush of ``--flush`` records, ingest day = event day), unless ``--dir`` already holds one;
2. ``clv archive compact`` on it (files, rows, seconds);
3. ``build_many_dask`` on a LocalCluster of 1, then 2 worker processes (same partitions), each
   on a fresh cluster: wall seconds, CPU seconds of the workers, peak RSS per worker, and the
   one-process driver's peak RSS; checks both runs give the same examples.
The figures go to stdout (docs/archive.md records a run).
"""
from __future__ import annotations

import argparse
import resource
import time
import zlib
from pathlib import Path

import numpy as np


def write(root: Path, n_events: int, users: int, flush: int, partitions: int) -> int:
    import pyarrow as pa
    from tqdm import tqdm

    from streams.archive import SCHEMA, ArchiveWriter
    from streams.settings import Settings
    from streams.simulate import simulate

    import orjson

    topics = dict(zip(("click", "order", "review", "profile"), Settings(_env_file=None).event_topics))
    sim = simulate(n_users=users, start="2024-01-01", days=365, seed=11)
    nxt: dict = {}
    cols: dict = {k: [] for k in SCHEMA.names}
    n = 0

    def out():
        day = cols["ts"][-1]
        ArchiveWriter(root, clock=lambda: day).write_batches([pa.RecordBatch.from_pydict(cols, schema=SCHEMA)])
        for v in cols.values():
            v.clear()

    for kind, key, value in tqdm(sim.iter_wire(limit=n_events), total=n_events, desc="simulate", unit="ev",
                                 mininterval=5):
        d = orjson.loads(value)
        tp = (topics[kind], zlib.crc32(key) % partitions)
        off = nxt.get(tp, 0)
        nxt[tp] = off + 1
        for k, v in (("event_id", d["event_id"]), ("user_id", d["user_id"]), ("ts", d["ts"]), ("type", kind),
                     ("topic", tp[0]), ("partition", tp[1]), ("offset", off), ("payload", value)):
            cols[k].append(v)
        n += 1
        if len(cols["ts"]) >= flush:
            out()
    if cols["ts"]:
        out()
    return n


def _reset_peak() -> None:
    """Linux: reset this process's peak RSS (VmHWM, what ru_maxrss reports) to its current RSS."""
    Path("/proc/self/clear_refs").write_text("5")


def _peak_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def run(root: Path, workers: int, cutoffs, horizon: float, n_parts: int):
    from streams.distributed import dask_client
    from training.dataset import build_many_dask

    with dask_client(None, workers=workers) as client:
        client.run(_reset_peak)  # a spawned worker starts with its parent's peak
        base = client.run(_peak_mb)
        cpu0 = client.run(time.process_time)
        t = time.perf_counter()
        ex = build_many_dask(root, cutoffs, horizon, client, users="active", n_parts=n_parts)
        wall = time.perf_counter() - t
        cpu = sum(v - cpu0[k] for k, v in client.run(time.process_time).items())
        peak = client.run(_peak_mb)
    return ex, wall, cpu, base, peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--events", type=int, default=10_000_000)
    ap.add_argument("--users", type=int, default=40_000)
    ap.add_argument("--flush", type=int, default=10_000, help="events per simulated archiver flush")
    ap.add_argument("--partitions", type=int, default=8, help="Dask tasks (user partitions)")
    ap.add_argument("--kafka-partitions", type=int, default=4, help="partitions per simulated topic")
    ap.add_argument("--dir", type=Path, default=Path("/tmp/clv-bench-dask"))
    a = ap.parse_args()
    from streams import archive
    from streams.compact import compact

    root = a.dir / "archive"
    done = a.dir / "archive.complete"  # written last: a half-written archive is not reused
    if archive.all_files(root) and not done.exists():
        raise SystemExit(f"{root} holds an archive this script did not finish writing; remove {a.dir} and rerun")
    if not done.exists():
        t = time.perf_counter()
        n = write(root, a.events, a.users, a.flush, a.kafka_partitions)
        done.write_text(f"{n}\n")
        print(f"archive: {n} events written in {time.perf_counter() - t:.0f}s, "
              f"{len(archive.files(root))} files, {sum(f.stat().st_size for f in archive.files(root)) / 2**20:.0f} MiB")
    t, c = time.perf_counter(), time.process_time()
    rep = compact(root, now=time.time(), grace_s=0)
    print(f"compact: {rep.line()} in {time.perf_counter() - t:.0f}s wall, {time.process_time() - c:.0f}s CPU; "
          f"{len(archive.files(root))} files now")
    lo, hi = archive.ts_range(root)
    span = hi - lo  # --events stops the simulated stream early: cutoffs at shares of its span
    cutoffs = [lo + 0.4 * span, lo + 0.55 * span, lo + 0.7 * span]
    horizon = 0.3 * span / 86400
    results = {}
    for w in (1, 2):
        ex, wall, cpu, base, peak = run(root, w, cutoffs, horizon, a.partitions)
        results[w] = ex
        print(f"{w} worker(s), {a.partitions} partitions: {wall:.0f}s wall, {cpu:.0f}s worker CPU, "
              f"rows per cutoff {[len(x) for x in ex]}; peak RSS per worker (MiB, during the run) "
              f"{sorted(round(v) for v in peak.values())} (at start {sorted(round(v) for v in base.values())})")
    same = all(x.user_ids == y.user_ids and np.array_equal(x.features, y.features) and np.array_equal(x.label, y.label)
               for x, y in zip(results[1], results[2]))
    print(f"1 and 2 workers give the same examples: {same}; driver peak RSS "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB; load avg "
          f"{open('/proc/loadavg').read().split()[:3]}")


if __name__ == "__main__":
    main()
