"""Live scoring with trained models: the running worker scores with the champion, writes the
score to Redis and the scores topic, and picks up a newly promoted model without a restart."""
from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest
import redis

from serving.registry import Registry
from streams.simulate import publish, simulate, write_jsonl
from streams.sim.wire import as_messages
from tests.integration.worker_proc import REPO, WorkerProc, wait_caught_up

pytestmark = [pytest.mark.integration, pytest.mark.train]


def train(settings, events_file: Path, seed: int) -> str:
    env = {**os.environ, **settings.to_env()}
    out = subprocess.run([sys.executable, "-m", "clv_cli", "train", "--quick", "--events", str(events_file),
                          "--seed", str(seed), "--horizon-weeks", "8", "--gini-tolerance", "1.0", "--mape-tolerance", "100"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return Registry(settings.models_dir).champion()


def consume_scores(settings, n: int, timeout: float = 60.0) -> list[dict]:
    from aiokafka import AIOKafkaConsumer

    from streams.kafka import client_kwargs

    async def run():
        c = AIOKafkaConsumer(settings.topic_scores, auto_offset_reset="earliest", group_id=None,
                             enable_auto_commit=False, **client_kwargs(settings))
        await c.start()
        out = []
        try:
            deadline = time.time() + timeout
            while len(out) < n and time.time() < deadline:
                for recs in (await c.getmany(timeout_ms=500)).values():
                    out.extend(orjson.loads(r.value) for r in recs)
        finally:
            await c.stop()
        return out

    return asyncio.run(run())


def test_worker_scores_and_hot_swaps_models(services, tmp_path, engine):
    topics = services.unique_topics("score")
    s = services.settings(**topics, redis_prefix=topics["consumer_group"], data_dir=tmp_path / "var",
                          model_poll_s=1.0, archive_within_s=0.5, engine=engine)
    sim = simulate(n_users=400, start="2025-01-01", days=240, seed=21)
    history = tmp_path / "history.jsonl"
    with open(history, "wb") as fh:
        write_jsonl(as_messages(sim.iter_events()), fh)
    v1 = train(s, history, seed=0)
    assert v1
    live = list(simulate(n_users=400, start="2025-09-01", days=30, seed=22).iter_events())
    first, second = live[: len(live) // 2], live[len(live) // 2:]
    asyncio.run(publish(first, s))
    r = redis.Redis.from_url(s.redis_url)
    w = WorkerProc(s, tmp_path / "worker.log").start()
    try:
        wait_caught_up(s, len(first), r, [w])
        users = {e.user_id for e in first}
        rows = {u: r.hmget(f"{s.redis_prefix}:v1:u:{u}", "clv", "p", "seg", "mv") for u in users}
        assert all(v[0] is not None for v in rows.values()), "a user with events has no score"
        assert {v[3].decode() for v in rows.values()} == {v1}
        assert all(float(v[0]) >= 0 and 0 <= float(v[1]) <= 1 for v in rows.values())
        assert {v[2].decode() for v in rows.values()} <= {"vip", "high", "mid", "low", "lapsing"}
        assert r.zcard(f"{s.redis_prefix}:v1:top") == len(users)
        scores = consume_scores(s, 1)
        assert scores and scores[0]["model_version"] == v1

        v2 = train(s, history, seed=1)  # a new champion, promoted while the worker runs
        assert v2 and v2 != v1
        deadline = time.time() + 60
        while "now serving model " + v2 not in w.log_path.read_text() and time.time() < deadline:
            time.sleep(0.5)
        assert "now serving model " + v2 in w.log_path.read_text(), w.log_tail()
        asyncio.run(publish(second, s))
        wait_caught_up(s, len(live), r, [w])
        later = {e.user_id for e in second}
        mv = {r.hget(f"{s.redis_prefix}:v1:u:{u}", "mv").decode() for u in later}
        assert mv == {v2}
    finally:
        w.stop()
