"""Scenario 3: workers join and leave the consumer group mid-run.

Worker A consumes a stream that is still being published (in three phases). Worker B joins
(the group rebalances: partitions move to B), consumes part of phase 2, and leaves gracefully
(SIGTERM: it finishes its batch, commits, leaves; partitions move back). Then worker C joins,
consumes part of phase 3 and crashes (SIGKILL: its partitions come back to A after the
session timeout, CLV_KAFKA_SESSION_TIMEOUT_S). At the end:

* B really took part (its own /metrics counted records), and so did C's join;
* every partition of every event topic has lag 0 (none left unconsumed);
* no duplicates and no loss: state == offline fold of the archive, exact counts.

Size: ``CLV_CHAOS_REBALANCE_EVENTS`` (default 40000).
"""
from __future__ import annotations

import itertools
import json
import time

import pytest
import redis

from serving.registry import Registry
from streams.simulate import mix, simulate
from tests.chaos.harness import (
    Publisher, archived_events, assert_archive_complete, chaos_settings, chunked, compare_state,
    env_int, metric_by, reference, scrape, wait_caught_up, wait_metrics, worker_stats,
)
from tests.chaos.models import register
from tests.conftest import free_ports
from tests.integration.worker_proc import WorkerProc

pytestmark = [pytest.mark.chaos, pytest.mark.integration]


def _consumed(port: int) -> float:
    return sum(metric_by(scrape(port), "clv_events_consumed_total", "topic").values())


def _wait(cond, what: str, workers, timeout: float = 240.0) -> None:
    deadline = time.time() + timeout
    while not cond():
        for w in workers:
            assert w.alive, f"a worker exited ({w.proc.returncode}) while waiting for {what}:\n{w.log_tail()}"
        assert time.time() < deadline, f"timed out waiting for {what}:\n" + "\n---\n".join(
            w.log_tail(30) for w in workers)
        time.sleep(0.25)


def test_join_and_leave_mid_run_keeps_state_exact(services, tmp_path, engine):
    n = env_int("CLV_CHAOS_REBALANCE_EVENTS", 40_000)
    pa, pb, pc = free_ports(3)
    s = chaos_settings(services, tmp_path, "rebal", batch_max=500, engine=engine)
    register(Registry(s.models_dir), "rebal-m1", "good", champion=True)
    sim = simulate(n_users=max(20, n // 50), start="2025-01-01", days=150, seed=3)
    events = list(itertools.islice(sim.iter_events(), n))
    msgs = list(mix(events, duplicates=0.02, bad=0.001, seed=3, users=len(sim.truth)))
    r = redis.Redis.from_url(s.redis_url)

    def worker(name: str, port: int) -> WorkerProc:
        return WorkerProc(s.model_copy(update={"worker_web_port": port}), tmp_path / f"worker-{name}.log",
                          metrics=True)

    a, b, c = worker("a", pa), worker("b", pb), worker("c", pc)
    # three phases of the stream, each published while the group changes under it
    third = len(msgs) // 3
    phases = [msgs[:third], msgs[third:2 * third], msgs[2 * third:]]
    pubs = [Publisher(chunked(ph, 6), s, pause_s=1.0) for ph in phases]
    t0 = time.time()
    try:
        a.start()
        wait_metrics(pa)
        pubs[0].start()
        _wait(lambda: worker_stats(s, r)["events"] > third // 2, "A to make progress", [a])

        b.start()  # joins: the group rebalances, some partitions move to B
        wait_metrics(pb)
        pubs[0].join_ok()
        pubs[1].start()
        _wait(lambda: _consumed(pb) > 500, "B to consume", [a, b])
        consumed_b = _consumed(pb)
        assert b.stop(timeout=60) == 0, f"B did not stop cleanly:\n{b.log_tail()}"  # leaves
        log_b = (tmp_path / "worker-b.log").read_text(errors="replace")
        assert "exiting without ack" not in log_b

        c.start()  # joins, then crashes: its partitions return to A after the session timeout
        wait_metrics(pc)
        pubs[1].join_ok()
        pubs[2].start()
        _wait(lambda: _consumed(pc) > 0, "C to consume", [a, c])
        consumed_c = _consumed(pc)
        c.kill()

        pubs[2].join_ok()
        wait_caught_up(s, r, [a], timeout=600, min_events=len(msgs))
        wall = time.time() - t0
        consumed_a = _consumed(pa)

        archived = archived_events(s, expected=len(events))
        assert_archive_complete(archived, events)
        cmp = compare_state(s, reference(archived), r)
        assert cmp.ok and cmp.lost == 0 and cmp.doubled == 0, cmp.summary()
        print("\n[chaos rebalance] " + json.dumps({
            "events": len(events), "messages": len(msgs), "consumed_a": consumed_a,
            "consumed_b": consumed_b, "consumed_c": consumed_c, "users": cmp.users,
            "lost": cmp.lost, "doubled": cmp.doubled, "wall_s": round(wall, 1)}))
    finally:
        for w in (a, b, c):
            w.stop()
        for pub in pubs:
            if pub.is_alive():
                pub.join(60)
