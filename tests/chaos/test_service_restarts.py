"""Scenario 2: Redis, then the Kafka broker, go away mid-run and come back (an isolated stack
from ``infra_factory``, so no other test sees it).

One worker (metrics on a free CLV_WORKER_WEB_PORT, a model loaded so every batch also
produces scores) works through a backlog. While it works, Redis is stopped for a few seconds
and started again (graceful: its AOF keeps every acknowledged write); later, with a fresh
backlog, the broker is stopped and started again. The same process must:

* wait and retry with growing back-off: ``redis unavailable ... retrying in 0.2s, 0.4s, ...``
  and ``clv_retries_total{dependency="redis"}`` for Redis; for Kafka (whose client retries by
  itself) the worker's wait for broker acks, ``clv_retries_total{dependency="kafka"}``, and the
  client's reconnect attempts in the log;
* recover by itself (never exit, never be restarted) and catch up: lag 0 everywhere;
* end with state == the offline fold of the archive, which holds every published event.

Size: ``CLV_CHAOS_RESTART_EVENTS`` (default 30000).
"""
from __future__ import annotations

import itertools
import json
import re
import time

import pytest
import redis

from serving.registry import Registry
from streams.simulate import mix, simulate
from tests.chaos.harness import (
    archived_events, assert_archive_complete, chaos_settings, compare_state, env_int, metric_by,
    publish_sync, reference, scrape, wait_caught_up, wait_metrics, worker_stats,
)
from tests.chaos.models import register
from tests.conftest import free_ports
from tests.integration.worker_proc import WorkerProc

pytestmark = [pytest.mark.chaos, pytest.mark.integration]
OUTAGE_S = 5.0


def _events_seen(s, r, timeout: float = 120.0) -> int:
    deadline = time.time() + timeout
    while True:
        try:
            return worker_stats(s, r)["events"]
        except redis.RedisError:
            if time.time() > deadline:
                raise
            time.sleep(0.5)


def _wait_progress(s, r, w, target: int, timeout: float = 300.0) -> int:
    deadline = time.time() + timeout
    while True:
        assert w.alive, f"worker exited ({w.proc.returncode}):\n{w.log_tail()}"
        seen = _events_seen(s, r)
        if seen >= target:
            return seen
        assert time.time() < deadline, f"no progress to {target} in {timeout}s (at {seen}):\n{w.log_tail()}"
        time.sleep(0.1)


def test_worker_rides_out_redis_and_kafka_restarts(infra_factory, tmp_path, engine):
    n = env_int("CLV_CHAOS_RESTART_EVENTS", 30_000)
    stack = infra_factory("kafka", "redis")
    port = free_ports(1)[0]
    s = chaos_settings(stack, tmp_path, "restart", worker_web_port=port, batch_max=500, engine=engine)
    register(Registry(s.models_dir), "restart-m1", "good", champion=True)
    sim = simulate(n_users=max(20, n // 50), start="2025-01-01", days=150, seed=2)
    events = list(itertools.islice(sim.iter_events(), n))
    msgs = list(mix(events, duplicates=0.02, bad=0.002, seed=2, users=len(sim.truth)))
    half = len(msgs) // 2
    r = redis.Redis.from_url(s.redis_url, socket_timeout=5)
    w = WorkerProc(s, tmp_path / "worker.log", metrics=True)
    t0 = time.time()
    figures: dict = {}
    try:
        w.start()
        wait_metrics(port)

        # --- Redis goes away while the worker works through the first half ------------------
        publish_sync(msgs[:half], s)
        at = _wait_progress(s, r, w, half // 3)
        stack.stop("redis")
        time.sleep(OUTAGE_S)
        assert w.alive, f"worker exited while Redis was down:\n{w.log_tail()}"
        stack.start("redis")
        _wait_progress(s, r, w, at + 500)  # made progress again, same process
        samples = scrape(port)
        figures["redis_retries"] = metric_by(samples, "clv_retries_total", "dependency").get("redis", 0)
        assert figures["redis_retries"] >= 2, samples
        log = (tmp_path / "worker.log").read_text(errors="replace")
        delays = [float(x) for x in re.findall(r"redis unavailable \(.*?\); retrying in ([0-9.]+)s", log)]
        assert len(delays) >= 2 and delays[0] == s.retry_backoff_initial_s and max(delays) > delays[0], delays
        assert all(b >= a for a, b in zip(delays, delays[1:])), f"back-off must grow: {delays}"
        figures["redis_backoff_s"] = delays

        # --- the broker goes away while the worker works through the second half -------------
        publish_sync(msgs[half:], s)
        _wait_progress(s, r, w, half + half // 3)
        stack.stop("kafka")
        time.sleep(OUTAGE_S)
        assert w.alive, f"worker exited while Kafka was down:\n{w.log_tail()}"
        stack.start("kafka")
        wait_caught_up(s, r, [w], timeout=600, min_events=len(msgs))
        figures["wall_s"] = round(time.time() - t0, 1)
        assert w.alive and w.starts == 1
        samples = scrape(port)
        retries = metric_by(samples, "clv_retries_total", "dependency")
        figures["kafka_retries"] = retries.get("kafka", 0)
        figures["lag_poll_errors"] = samples.get(("clv_lag_poll_errors_total", ()), 0)
        assert figures["kafka_retries"] >= 1, retries
        log = (tmp_path / "worker.log").read_text(errors="replace")
        assert "kafka unavailable" in log
        assert re.search(r"Unable connect to node|Connection refused|KafkaConnectionError", log)
        assert "exiting without ack" not in log

        # --- nothing lost, nothing twice --------------------------------------------------------
        archived = archived_events(s, expected=len(events))
        assert_archive_complete(archived, events)
        cmp = compare_state(s, reference(archived), r)
        assert cmp.ok and cmp.lost == 0 and cmp.doubled == 0, cmp.summary()
        figures.update(events=len(events), messages=len(msgs), users=cmp.users, lost=cmp.lost,
                       doubled=cmp.doubled)
        print("\n[chaos restarts] " + json.dumps(figures))
    finally:
        w.stop()
