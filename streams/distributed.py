"""Replays on Dask distributed: users partitioned by ``archive.user_bucket`` (a stable hash of
``user_id``), one task per partition. Each task reads only its users' rows
(``archive.read_partition``) and folds them exactly as the one-process path does, so the
result is the same for any number of partitions and workers (tests/integration/test_dask_replay.py).

``dask_client(scheduler, workers)``: a client of a running scheduler (``CLV_DASK_SCHEDULER`` /
``--dask``), of a ``distributed.LocalCluster`` of ``workers`` processes, or None (one process).
Workers need the clv package installed and the archive (and models folder) at the same path.
"""
from __future__ import annotations

import resource
import uuid
from contextlib import contextmanager
from typing import Any, Callable, Iterator


@contextmanager
def dask_client(scheduler: str | None, workers: int = 0) -> Iterator[Any]:
    if scheduler and workers:
        raise ValueError("give a Dask scheduler address or a local worker count, not both")
    if not scheduler and not workers:
        yield None
        return
    from distributed import Client, LocalCluster

    if workers:
        with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                          dashboard_address=None) as cluster, Client(cluster) as client:
            yield client
        return
    try:
        client = Client(scheduler, timeout="20s")
    except OSError as exc:
        raise RuntimeError(f"cannot reach the Dask scheduler at {scheduler} ({exc}); start one "
                           "(`dask scheduler`, docs/archive.md) or unset CLV_DASK_SCHEDULER / --dask") from exc
    with client:
        yield client


def n_partitions(client, configured: int = 0) -> int:
    """``configured``, else 4 per worker thread of the cluster."""
    if configured:
        return configured
    return max(1, 4 * sum(client.nthreads().values()))


def peak_rss_mb() -> float:
    """This process's peak resident memory (MiB): each task reports its worker's."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_partitions(client, fn: Callable, n_parts: int, *args, desc: str = "partitions") -> list:
    """``fn(part, n_parts, *args)`` for every partition on the cluster; results in partition
    order, with a progress bar."""
    from distributed import as_completed
    from tqdm import tqdm

    token = uuid.uuid4().hex[:8]
    futs = [client.submit(fn, p, n_parts, *args, key=f"{desc}-{token}-{p}", pure=False) for p in range(n_parts)]
    with tqdm(total=n_parts, desc=desc, unit="part") as bar:
        for _ in as_completed(futs):
            bar.update(1)
    return client.gather(futs)
