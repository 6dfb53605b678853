"""Start worker processes (the real ``clv worker`` or a prototype) and time them draining a topic.

``drain(settings, expected, procs)`` polls the Redis stats counter ``clv:v1:stats`` field
``events`` (every record a score batch finished, bad ones included) and each worker's CPU
time. The rate is taken from the first moment the counter moves (start of consumption;
worker start-up is not counted) to the moment it reaches ``expected``:
``(expected - events_at_first_sight) / (t_done - t_first_sight)``. Lag 0 (every partition
committed by every agent, read from Kafka) is timed as well.
"""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from common import REPO, cpu_seconds, load

CLV_WORKER = [sys.executable, "-m", "clv_cli", "worker"]
VARIANTS = {
    # name -> argv. Prototypes read the same CLV_* settings as `clv worker`.
    "clv worker": CLV_WORKER,
    "clv worker --engine faust": [*CLV_WORKER, "--engine", "faust"],
    "clv worker --engine kafka": [*CLV_WORKER, "--engine", "kafka"],
    "proto: one agent": [sys.executable, str(REPO / "bench" / "prototypes" / "run_worker.py"), "onepass"],
    "proto: one agent + drain patch": [sys.executable, str(REPO / "bench" / "prototypes" / "run_worker.py"),
                                       "onepass", "--drain-patch"],
    "proto: drain patch only": [sys.executable, str(REPO / "bench" / "prototypes" / "run_worker.py"), "baseline",
                                "--drain-patch"],
    "clv worker via prototype runner": [sys.executable, str(REPO / "bench" / "prototypes" / "run_worker.py"),
                                        "baseline"],  # control for the runner-based variants
    "clv worker (ONNX 1 thread)": [sys.executable, str(REPO / "bench" / "prototypes" / "run_worker.py"), "baseline",
                                  "--ort-threads", "1"],
}


class Proc:
    def __init__(self, argv: list[str], settings, log_path: Path, env: dict | None = None):
        self.argv, self.settings, self.log_path = argv, settings, Path(log_path)
        self.env = env or {}
        self.p: subprocess.Popen | None = None

    def start(self) -> "Proc":
        env = {**os.environ, **self.settings.to_env(), **self.env, "PYTHONUNBUFFERED": "1"}
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(self.log_path, "ab")
        self.p = subprocess.Popen(self.argv, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, start_new_session=True)
        return self

    @property
    def pid(self) -> int:
        return self.p.pid

    @property
    def alive(self) -> bool:
        return self.p is not None and self.p.poll() is None

    def cpu(self) -> float:
        try:
            return cpu_seconds(self.p.pid)
        except (FileNotFoundError, ProcessLookupError):
            return float("nan")

    def stop(self, timeout: float = 30) -> None:
        if self.alive:
            os.killpg(self.p.pid, signal.SIGTERM)
            try:
                self.p.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.p.pid, signal.SIGKILL)
                self.p.wait(10)

    def tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except FileNotFoundError:
            return ""


@dataclass
class Drain:
    events: int
    seconds: float  # first sight -> all counted
    rate: float  # events/s (wall)
    cpu_us: float  # worker CPU microseconds per event (all workers together)
    lag0_s: float | None  # first sight -> lag 0 on every partition (commits included)
    load: str
    startup_s: float  # process start -> first sight
    samples: list = field(default_factory=list)  # (t, events) for plots / sanity


def drain(settings, expected: int, procs: list[Proc], timeout: float = 300.0, lag0: bool = True) -> Drain:
    import redis

    from streams.keys import Keys

    r = redis.Redis.from_url(settings.redis_url)
    key = Keys(settings.redis_prefix).stats
    t_start = time.perf_counter()
    deadline = t_start + timeout
    first = None  # (t, events, cpu)
    samples = []
    try:
        while True:
            now = time.perf_counter()
            if now > deadline:
                raise TimeoutError(f"workers counted {samples[-1][1] if samples else 0}/{expected} events "
                                   f"in {timeout:.0f}s\n" + "\n---\n".join(p.tail() for p in procs))
            for p in procs:
                if not p.alive:
                    raise RuntimeError(f"worker exited with {p.p.returncode}:\n{p.tail()}")
            n = int(r.hget(key, "events") or 0)
            cpu = sum(p.cpu() for p in procs)
            samples.append((now - t_start, n))
            if n and first is None:
                first = (now, n, cpu, load())
            if n >= expected:
                done = (now, n, cpu)
                break
            time.sleep(0.05)
    finally:
        r.close()
    t0, n0, c0, ld = first
    secs = max(done[0] - t0, 1e-9)
    counted = done[1] - n0
    lag_s = None
    if lag0:
        lag_s = _wait_lag0(settings, deadline)
        lag_s = None if lag_s is None else lag_s - t0
    return Drain(done[1], secs, counted / secs, 1e6 * (done[2] - c0) / max(counted, 1), lag_s, ld,
                 t0 - t_start, samples)


def _wait_lag0(settings, deadline: float) -> float | None:
    from serving.lag import lag_snapshot

    async def go():
        while time.perf_counter() < deadline:
            lags = await lag_snapshot(settings, list(settings.event_topics))
            if sum(p.lag for p in lags) == 0 and all(p.committed is not None for p in lags if p.end > 0):
                return time.perf_counter()
            await asyncio.sleep(0.1)
        return None

    return asyncio.run(go())


def wait_group_stable(settings, members: int, procs: list[Proc], timeout: float = 120.0) -> float:
    """Until the consumer group is Stable with ``members`` members; returns the seconds waited."""
    from aiokafka.admin import AIOKafkaAdminClient

    from streams.kafka import client_kwargs

    async def go() -> float:
        admin = AIOKafkaAdminClient(**client_kwargs(settings))
        await admin.start()
        t0 = time.perf_counter()
        try:
            while time.perf_counter() - t0 < timeout:
                for p in procs:
                    if not p.alive:
                        raise RuntimeError(f"worker exited with {p.p.returncode}:\n{p.tail()}")
                try:
                    (resp,) = await admin.describe_consumer_groups([settings.consumer_group])
                    _err, _gid, state, _ptype, _proto, mems = resp.groups[0][:6]
                    if state == "Stable" and len(mems) == members:
                        return time.perf_counter() - t0
                except Exception:  # noqa: BLE001 - group not there yet
                    pass
                await asyncio.sleep(0.25)
        finally:
            await admin.close()
        raise TimeoutError(f"group {settings.consumer_group} not Stable with {members} members in {timeout:.0f}s")

    return asyncio.run(go())


def run_variant(name: str, settings, expected: int, log_dir: Path, n_workers: int = 1,
                env: dict | None = None, timeout: float = 300.0, publish_after=None) -> Drain:
    """Start ``n_workers`` of a variant and time them draining ``expected`` events.

    ``publish_after``: messages to publish once the group is Stable with every worker in it
    (so a multi-worker run measures the steady state, not the join/rebalance dance)."""
    from common import publish
    from tests.conftest import free_ports

    procs = []
    try:
        for i, port in enumerate(free_ports(n_workers)):
            e = {"CLV_WORKER_WEB_PORT": str(port), **(env or {})}
            procs.append(Proc(VARIANTS[name], settings, log_dir / f"{_slug(name)}-{i}.log", e).start())
        if publish_after is not None:
            wait_group_stable(settings, n_workers, procs)
            publish(publish_after, settings)
        return drain(settings, expected, procs, timeout)
    finally:
        for p in procs:
            p.stop()


def _slug(s: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in s).strip("-")
