"""The streaming core end to end on real Kafka + Redis with real `clv worker` processes:

* N simulated events (with producer duplicates and bad messages mixed in) published ->
  every user's Redis state equals the offline fold of the same events;
* duplicates change nothing; bad messages land in the DLQ with reasons and original bytes;
* a worker SIGKILLed mid-stream and restarted ends with the same state;
* the archive replays to the same events.
"""
from __future__ import annotations

import asyncio
import random
import time

import numpy as np
import pytest
import redis

from streams.archive import read_events
from streams.fold import FEATURE_NAMES, features, replay
from streams.simulate import DUPLICATE, EVENT, mix, publish, simulate
from streams.store import RedisStore, redis_client
from tests.integration.worker_proc import WorkerProc, wait_caught_up

pytestmark = pytest.mark.integration
_KEEP = [i for i, n in enumerate(FEATURE_NAMES) if n != "ipt_std_days"]


@pytest.fixture(scope="module")
def sim():
    return simulate(n_users=300, start="2025-01-01", days=120, seed=11)


def _settings(services, tmp_path, engine, **kw):
    topics = services.unique_topics("w")
    return services.settings(
        **topics, redis_prefix=topics["consumer_group"], data_dir=tmp_path / "var", archive_within_s=0.5,
        batch_within_s=0.02, model_poll_s=1.0, engine=engine, **kw,
    )


def offline(events) -> dict:
    """The reference: each user's events (unique by id, in time order) through the fold."""
    seen, per_user = set(), {}
    for ev in sorted(events, key=lambda e: e.ts):
        if ev.event_id in seen:
            continue
        seen.add(ev.event_id)
        per_user.setdefault(ev.user_id, []).append(ev)
    return {u: replay((e, None) for e in evs) for u, evs in per_user.items()}


def assert_state_matches(settings, events):
    want = offline(events)

    async def load():
        store = RedisStore(redis_client(settings), settings.redis_prefix)
        try:
            return await store.load_many(sorted(want))
        finally:
            await store.r.aclose()

    got = asyncio.run(load())
    mismatched = []
    for uid, w in want.items():
        g = got[uid].state
        assert g is not None, f"user {uid} has no state in Redis"
        as_of = w.v[1] + 86400.0
        a, b = features(g, as_of)[_KEEP], features(w, as_of)[_KEEP]
        if not np.allclose(a, b, rtol=1e-5, atol=1e-4):
            mismatched.append(uid)
    assert not mismatched, f"{len(mismatched)} users differ from the offline fold, e.g. {mismatched[:5]}"
    return len(want)


def assert_outputs_exact(s, r, events, msgs, bad, n_dup) -> tuple[int, int]:
    """Everything a worker owes for ``msgs`` (the unique valid ``events``, ``n_dup`` producer
    duplicates and the ``bad`` messages): Redis state = the offline fold, the DLQ holds every bad
    message with its reason and original bytes, the stats counters are exact, the archive holds
    every valid event once. Returns (users checked, DLQ messages). Also used by
    bench/prototypes/verify.py on worker variants."""
    n_users = assert_state_matches(s, events)
    dlq = dlq_messages(s, len(bad))
    assert len(dlq) == len(bad), f"DLQ has {len(dlq)}, expected {len(bad)}"
    headers = [dict(m.headers) for m in dlq]
    assert all(h["clv-reason"] for h in headers)
    assert sorted(h["clv-reason"].decode() for h in headers) == sorted(m.label for m in bad), "DLQ reasons differ"
    assert sorted((m.value or b"") for m in dlq) == sorted((m.value or b"") for m in bad)
    stats = {k.decode(): v for k, v in r.hgetall(f"{s.redis_prefix}:v1:stats").items()}
    stats = {k: int(v) for k, v in stats.items() if k not in ("ts_last", "mv")}
    assert stats["dlq"] == len(bad), stats
    assert stats["events"] == len(msgs) and stats["duplicates"] == n_dup, stats
    assert stats["processed"] == len(events), stats
    # the archive holds every valid event exactly once after dedupe
    deadline = time.time() + 30
    while time.time() < deadline:
        archived = list(read_events(s.archive_dir))
        if len(archived) == len(events):
            break
        time.sleep(0.5)
    assert sorted(e.event_id for e in archived) == sorted(e.event_id for e in events), "archive differs"
    return n_users, len(dlq)


def dlq_messages(settings, expected: int, timeout: float = 60.0):
    from aiokafka import AIOKafkaConsumer

    from streams.kafka import client_kwargs

    async def run():
        c = AIOKafkaConsumer(settings.topic_dlq, auto_offset_reset="earliest", enable_auto_commit=False,
                             group_id=None, **client_kwargs(settings))
        await c.start()
        out = []
        try:
            deadline = time.time() + timeout
            while len(out) < expected and time.time() < deadline:
                batch = await c.getmany(timeout_ms=500)
                for recs in batch.values():
                    out.extend(recs)
        finally:
            await c.stop()
        return out

    return asyncio.run(run())


def test_stream_to_redis_equals_offline_fold(services, tmp_path, sim, engine):
    s = _settings(services, tmp_path, engine)
    events = list(sim.iter_events())
    msgs = list(mix(events, duplicates=0.03, bad=0.01, seed=5, users=300))
    n_dup = sum(m.label == DUPLICATE for m in msgs)
    bad = [m for m in msgs if m.label not in (EVENT, DUPLICATE)]
    t0 = time.time()
    res = asyncio.run(publish(msgs, s))
    assert res.delivered == len(msgs) and res.failed == 0
    w = WorkerProc(s, tmp_path / "worker.log").start()
    r = redis.Redis.from_url(s.redis_url)
    try:
        wait_caught_up(s, len(msgs), r, [w])
        wall = time.time() - t0
        n_users, n_dlq = assert_outputs_exact(s, r, events, msgs, bad, n_dup)
        print(f"\n[streaming-core] events={len(events)} published={len(msgs)} duplicates={n_dup} "
              f"bad={len(bad)} users={n_users} dlq={n_dlq} wall={wall:.1f}s")
    finally:
        w.stop()


def test_duplicates_published_again_change_nothing(services, tmp_path, sim, engine):
    """Every event published twice in a row (a retrying producer): state as if once."""
    s = _settings(services, tmp_path, engine)
    events = list(sim.iter_events())[:3000]
    doubled = [m for ev in events for m in (ev, ev)]
    asyncio.run(publish(doubled, s))
    w = WorkerProc(s, tmp_path / "worker.log").start()
    try:
        wait_caught_up(s, len(doubled), redis.Redis.from_url(s.redis_url), [w])
        assert_state_matches(s, events)
    finally:
        w.stop()


def test_killed_and_restarted_worker_ends_with_same_state(services, tmp_path, sim, engine):
    s = _settings(services, tmp_path, engine, batch_max=200)
    events = list(sim.iter_events())
    half = len(events) // 2
    r = redis.Redis.from_url(s.redis_url)
    asyncio.run(publish(events[:half], s))
    w = WorkerProc(s, tmp_path / "worker.log").start()
    try:
        rnd = random.Random(2)
        kills = 0
        deadline = time.time() + 120
        # kill it a few times while it works through the backlog
        while kills < 3 and time.time() < deadline:
            seen = int(r.hget(f"{s.redis_prefix}:v1:stats", "events") or 0)
            if seen > (kills + 1) * 1000:
                time.sleep(rnd.uniform(0.0, 0.5))
                w.kill()
                kills += 1
                w.start()
            time.sleep(0.1)
        asyncio.run(publish(events[half:], s))
        wait_caught_up(s, len(events), r, [w])
        assert kills >= 1
        assert_state_matches(s, events)
    finally:
        w.stop()
