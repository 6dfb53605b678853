"""Scenario 1: a worker SIGKILLed again and again while events stream in.

A simulated shop's events (with producer duplicates and some bad messages mixed in) are
published in chunks while one `clv worker` consumes them; the worker is killed with SIGKILL
at random moments spread over the run and restarted at once: 20 % of the kills come 0.5-6 s
after a restart (while it starts, waits for the group, reads its first batch), the others
0-2.5 s after that incarnation committed progress and the committed total passed the kill's
share of the run (k / (kills + 1) of the messages; mid-batch, mid-archive-write, mid-commit,
whatever it was doing). At the end:

* after every kill, before the restart: each valid record below its partition's committed
  offset is already in Redis (its user's offset watermark for that topic is at or past it),
  i.e. offsets are never committed ahead of state;
* every event-topic partition has lag 0 (committed offset = log end);
* the archive holds every published valid event (each id once after dedupe);
* every user's Redis state equals the offline fold of the ARCHIVED events (features within
  tolerance, without the order-dependent ``ipt_std_days``; ``n_events``/``n_orders``/
  ``n_reviews`` exactly): 0 lost, 0 counted twice. Since offsets are committed only for
  events whose state is in Redis, a commit that ran ahead would show up here as a lost event;
* every bad message is in the DLQ with a reason; every user has a score from the model.

Size: ``CLV_CHAOS_EVENTS`` (default 60000) and ``CLV_CHAOS_KILLS`` (default 10). The full run
(docs/reliability.md) is ``CLV_CHAOS_EVENTS=200000``. ``CLV_CHAOS_REPORT=path.json`` writes the
figures there as well.
"""
from __future__ import annotations

import itertools
import json
import os
import random
import time
from collections import Counter

import pytest
import redis

from serving.registry import Registry
from streams.keys import F_MV, Keys
from streams.simulate import DUPLICATE, EVENT, mix, simulate
from tests.chaos.harness import (
    Publisher, archived_events, assert_archive_complete, chaos_settings, chunked, commit_invariant,
    compare_state, env_int, read_topic, reference, total_lag, wait_caught_up, worker_stats,
)
from tests.chaos.models import register
from tests.integration.worker_proc import WorkerProc

pytestmark = [pytest.mark.chaos, pytest.mark.integration]

EVENTS_PER_USER = 50  # what the simulator produces over ~120 days


def committed_total(s) -> tuple[int, int]:
    """(sum of committed offsets, total lag) over the event partitions."""
    lag, lags = total_lag(s)
    return sum(p.committed or 0 for p in lags), lag


@pytest.mark.timeout(3 * 3600)
def test_sigkill_storm_loses_nothing_and_counts_nothing_twice(services, tmp_path, engine):
    n_events = env_int("CLV_CHAOS_EVENTS", 60_000)
    n_kills = env_int("CLV_CHAOS_KILLS", 10)
    seed = env_int("CLV_CHAOS_SEED", 1)
    t_start = time.time()
    s = chaos_settings(services, tmp_path, "crash", batch_max=500, engine=engine)
    register(Registry(s.models_dir), "crash-m1", "good", champion=True)

    sim = simulate(n_users=max(50, n_events // EVENTS_PER_USER), start="2025-01-01", days=150, seed=seed)
    events = list(itertools.islice(sim.iter_events(), n_events))
    assert len(events) == n_events, f"the simulation produced only {len(events)} events; raise n_users"
    msgs = list(mix(events, duplicates=0.02, bad=0.002, seed=seed, users=len(sim.truth)))
    labels = Counter(m.label for m in msgs)
    bad = [m for m in msgs if m.label not in (EVENT, DUPLICATE)]

    r = redis.Redis.from_url(s.redis_url)
    w = WorkerProc(s, tmp_path / "worker.log")
    # published over roughly the time the kills take, so most kills hit a worker with work
    pub = Publisher(chunked(msgs, 3 * n_kills), s, pause_s=4.0)
    rng = random.Random(seed)
    kills, kill_log, invariant_checked = 0, [], 0
    try:
        w.start()
        pub.start()
        while kills < n_kills:
            started_at = time.time()
            committed_before, _ = committed_total(s)
            if rng.random() < 0.2:
                # a kill while it starts up / waits for the group / reads its first batch
                time.sleep(rng.uniform(0.5, 6.0))
                where = "startup"
            else:
                # a kill while it works: 0-2.5 s after this incarnation committed progress and
                # the run got past this kill's share of the messages (kills spread over the run)
                where = "working"
                target = (kills + 1) * len(msgs) / (n_kills + 1)
                deadline, last = time.time() + 240, committed_before
                while True:
                    assert w.alive, f"worker exited by itself ({w.proc.returncode}):\n{w.log_tail()}"
                    committed, lag = committed_total(s)
                    if committed > committed_before and committed >= target:
                        break
                    if lag == 0 and not pub.is_alive() and time.time() - started_at > 20:
                        where = "idle"  # all published and consumed: kill it anyway
                        break
                    if committed > last:  # progressing: keep waiting
                        deadline, last = time.time() + 240, committed
                    assert time.time() < deadline, f"no committed progress in 240 s:\n{w.log_tail()}"
                    time.sleep(0.2)
                time.sleep(rng.uniform(0.0, 2.5))
            assert w.alive, f"worker exited by itself ({w.proc.returncode}):\n{w.log_tail()}"
            w.kill()
            kills += 1
            # while nobody runs: every record below a committed offset is in Redis
            checked, ahead = commit_invariant(s)
            assert not ahead, f"offsets committed ahead of state after kill {kills}: {ahead[:5]}"
            invariant_checked += checked
            kill_log.append((where, round(time.time() - started_at, 1), worker_stats(s, r)["events"], checked))
            w.start()
        published = pub.join_ok()
        assert published == len(msgs)
        wait_caught_up(s, r, [w], timeout=900, min_events=len(msgs))
        wall = time.time() - t_start

        archived = archived_events(s, expected=len(events), timeout=60)
        assert_archive_complete(archived, events)
        cmp = compare_state(s, reference(archived), r)
        assert cmp.ok, cmp.summary()
        assert cmp.lost == 0 and cmp.doubled == 0, cmp.summary()
        assert cmp.events_in_redis == len(events)

        dlq = read_topic(s, s.topic_dlq, len(bad))
        dlq_values = Counter(m.value or b"" for m in dlq)
        missing_bad = [m for m in bad if dlq_values[m.value or b""] == 0]
        assert not missing_bad, f"{len(missing_bad)} bad messages not in the DLQ, e.g. {missing_bad[:2]}"
        assert all(dict(m.headers).get("clv-reason") for m in dlq)

        keys = Keys(s.redis_prefix)
        no_score = [u for u in reference(archived) if r.hget(keys.user(u), F_MV) is None]
        assert not no_score, f"{len(no_score)} users were never scored, e.g. {no_score[:3]}"
        stats = worker_stats(s, r)
        figures = {
            "events": len(events), "messages": len(msgs), "duplicates_published": labels[DUPLICATE],
            "bad_messages": len(bad), "kills": kills, "restarts": w.starts - 1,
            "kill_moments": kill_log, "committed_records_checked": invariant_checked, "users": cmp.users, "lost": cmp.lost, "doubled": cmp.doubled,
            "dlq_records": len(dlq), "dlq_redelivered": len(dlq) - len(bad),
            "records_read_incl_redelivery": stats["events"],
            "redelivered_records": stats["events"] - len(msgs),
            "wall_s": round(wall, 1),
        }
        print("\n[chaos crash] " + json.dumps(figures))
        if os.environ.get("CLV_CHAOS_REPORT"):
            with open(os.environ["CLV_CHAOS_REPORT"], "w") as fh:
                json.dump(figures, fh, indent=2)
        assert kills >= n_kills
    finally:
        w.stop()
        if pub.is_alive():
            pub.join(60)
