"""Run real `clv worker` processes against the test services and wait for them to catch up."""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CLV = [sys.executable, "-m", "clv_cli"]


class WorkerProc:
    def __init__(self, settings, log_path: Path, metrics: bool = False, extra_env: dict | None = None):
        self.settings = settings
        self.log_path = Path(log_path)
        self.metrics = metrics
        self.extra_env = extra_env or {}
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> "WorkerProc":
        env = {**os.environ, **self.settings.to_env(), **self.extra_env, "PYTHONUNBUFFERED": "1"}
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(self.log_path, "ab")
        args = [*CLV, "worker"] + ([] if self.metrics else ["--no-metrics"])
        self.proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.starts += 1
        return self

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout: float = 30) -> int | None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode if self.proc else None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except FileNotFoundError:
            return ""


async def total_lag(settings) -> tuple[int, list]:
    from serving.lag import lag_snapshot

    lags = await lag_snapshot(settings, list(settings.event_topics))
    return sum(pl.lag for pl in lags), lags


def wait_caught_up(settings, expected: int, redis_sync, workers=(), timeout: float = 240.0) -> None:
    """Until every event-topic partition has lag 0 and `expected` records were counted."""
    from streams.keys import Keys

    stats_key = Keys(settings.redis_prefix).stats
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        for w in workers:
            if not w.alive:
                raise AssertionError(f"worker exited with {w.proc.returncode}:\n{w.log_tail()}")
        lag, lags = asyncio.run(total_lag(settings))
        events = int(redis_sync.hget(stats_key, "events") or 0)
        last = (lag, events, [(p.topic, p.partition, p.end, p.committed) for p in lags])
        if lag == 0 and events >= expected and all(p.committed is not None for p in lags if p.end > 0):
            return
        time.sleep(0.5)
    logs = "\n---\n".join(w.log_tail() for w in workers)
    raise AssertionError(f"worker did not catch up in {timeout}s: lag/events/partitions={last}\n{logs}")
