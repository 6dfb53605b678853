"""The save script's roll-ups against the user hashes they summarise (real Redis): the ``hist``
hash counts every scored user in its CLV bucket, the ``top`` zset is exactly the users above
``top:floor`` (so its head is the true top), through re-scores up and down, unscored writes
and hashes written by the previous state version. MemoryStore keeps the same roll-ups."""
from __future__ import annotations

import asyncio
import random
import uuid

import pytest
import redis

from streams.fold import encode_state, new_state
from streams.keys import HIST_EDGES, Keys, hist_bucket
from streams.store import MemoryStore, RedisStore, Score, Update, redis_client

pytestmark = pytest.mark.integration


def truth(r: redis.Redis, keys: Keys, users) -> dict[str, float]:
    """user -> stored clv, read from the user hashes themselves."""
    out = {}
    for u in users:
        v = r.hget(keys.user(u), "clv")
        if v is not None:
            out[u] = float(v)
    return out


def check(r: redis.Redis, keys: Keys, clv: dict[str, float], counted: set[str]) -> None:
    hist = {int(k): int(v) for k, v in r.hgetall(keys.hist).items()}
    want: dict[int, int] = {}
    for u in counted:
        want[hist_bucket(clv[u])] = want.get(hist_bucket(clv[u]), 0) + 1
    assert {b: c for b, c in hist.items() if c} == want
    floor = r.get(keys.top_floor)
    floor = float(floor) if floor is not None else float("-inf")
    top = {u.decode(): s for u, s in r.zrange(keys.top, 0, -1, withscores=True)}
    assert top == {u: c for u, c in clv.items() if c > floor}  # exactly the users above the floor
    head = [u.decode() for u in r.zrevrange(keys.top, 0, 4)]
    best = sorted(clv.values(), reverse=True)[:len(head)]
    assert [clv[u] for u in head] == best  # so its head is the true top


def test_hist_and_top_follow_every_write(services):
    s = services.settings(redis_prefix=f"roll{uuid.uuid4().hex[:8]}")
    keys = Keys(s.redis_prefix)
    r = redis.Redis.from_url(s.redis_url)
    rnd = random.Random(3)
    users = [f"u{i}" for i in range(60)]
    mem = MemoryStore(top_keep=8)

    async def go():
        store = RedisStore(redis_client(s), s.redis_prefix, top_keep=8)
        ver = {u: 0 for u in users}
        for rnd_i in range(12):
            batch = rnd.sample(users, 25)
            ups = []
            for u in batch:
                # scores move both ways, cross bucket edges, and some writes carry no score
                if rnd.random() < 0.2:
                    sc = None
                else:
                    c = rnd.choice([0.0, 0.99, 1.0, 4.999, 5.0, rnd.lognormvariate(3, 2), 5e12 + 1])
                    sc = Score(c, 0.5, "mid", "m1", 1.7e9 + rnd_i)
                ups.append(Update(u, new_state(), ver[u], sc))
            assert await store.save_many(ups) == []
            assert await mem.save_many(ups) == []
            for u in batch:
                ver[u] += 1
            clv = truth(r, keys, users)
            check(r, keys, clv, set(clv))
            assert {b: c for b, c in mem.hist.items() if c} == \
                {int(k): int(v) for k, v in r.hgetall(keys.hist).items() if int(v)}
            assert mem.top == {u.decode(): v for u, v in r.zrange(keys.top, 0, -1, withscores=True)}
        assert r.get(keys.top_floor) is not None, "the zset never grew past top_keep: test too weak"
        await store.r.aclose()

    asyncio.run(go())


def test_hashes_from_the_previous_state_version_are_counted_once_rewritten(services):
    """Before this layout, the worker kept no ``hist``: such users count from their next write."""
    s = services.settings(redis_prefix=f"roll{uuid.uuid4().hex[:8]}")
    keys = Keys(s.redis_prefix)
    r = redis.Redis.from_url(s.redis_url)
    old_blob = bytes([1]) + encode_state(new_state())[1:]  # what a version-1 writer left
    for u, c in (("a", "10.00"), ("b", "300.00"), ("c", "7.50")):
        r.hset(keys.user(u), mapping={"s": old_blob, "ver": 3, "clv": c, "p": "0.5", "seg": "mid",
                                      "mv": "old", "at": "1.7e9"})
        r.zadd(keys.top, {u: float(c)})

    async def go():
        store = RedisStore(redis_client(s), s.redis_prefix)
        await store.save_many([Update("a", new_state(), 3, Score(2000.0, 0.5, "vip", "m2", 1.8e9)),
                               Update("b", new_state(), 3, None),  # replay without scoring
                               Update("d", new_state(), 0, Score(1.5, 0.1, "low", "m2", 1.8e9))])
        check(r, keys, truth(r, keys, "abcd"), {"a", "b", "d"})  # c: not rewritten yet
        await store.save_many([Update("b", new_state(), 4, Score(0.5, 0.1, "low", "m2", 1.8e9)),
                               Update("c", new_state(), 3, None)])
        check(r, keys, truth(r, keys, "abcd"), {"a", "b", "c", "d"})
        await store.r.aclose()

    asyncio.run(go())
    assert sum(int(v) for v in r.hvals(keys.hist)) == 4


def test_lua_buckets_match_python_at_the_edges(services):
    s = services.settings(redis_prefix=f"roll{uuid.uuid4().hex[:8]}")
    keys = Keys(s.redis_prefix)
    r = redis.Redis.from_url(s.redis_url)
    values = sorted({0.0, 0.5, *HIST_EDGES, *(e - 0.01 for e in HIST_EDGES), 9e12})

    async def go():
        store = RedisStore(redis_client(s), s.redis_prefix)
        await store.save_many([Update(f"u{i}", new_state(), 0, Score(c, 0.5, "mid", "m", 1.7e9))
                               for i, c in enumerate(values)])
        await store.r.aclose()

    asyncio.run(go())
    want: dict[int, int] = {}
    for c in values:
        want[hist_bucket(float(f"{c:.2f}"))] = want.get(hist_bucket(float(f"{c:.2f}")), 0) + 1
    assert {int(k): int(v) for k, v in r.hgetall(keys.hist).items()} == want
    assert len(want) == len(HIST_EDGES) + 1  # every bucket, both ends included


def test_a_rebuild_can_overwrite_blobs_the_worker_refuses(services):
    """After a state-version bump the worker refuses old blobs; `clv replay` reads only versions."""
    from streams.fold import StateDecodeError

    s = services.settings(redis_prefix=f"roll{uuid.uuid4().hex[:8]}")
    keys = Keys(s.redis_prefix)
    r = redis.Redis.from_url(s.redis_url)
    r.hset(keys.user("old"), mapping={"s": bytes([1]) + bytes(40), "ver": 7})

    async def go():
        store = RedisStore(redis_client(s), s.redis_prefix)
        with pytest.raises(StateDecodeError, match="clv replay"):
            await store.load_many(["old"])
        assert await store.versions(["old", "new"]) == {"old": 7, "new": 0}
        assert await store.save_many([Update("old", new_state(), 7, None)]) == []
        assert (await store.load_many(["old"]))["old"].ver == 8
        await store.r.aclose()

    asyncio.run(go())


class _LowerModel:
    """Scores everyone far below the old floor (a recalibrated champion)."""

    model_version = "m-low"
    given = 0

    def score(self, feats, texts):
        import numpy as np
        from types import SimpleNamespace

        n = len(feats)
        clv = 1.0 + 0.01 * np.arange(self.given, self.given + n)  # distinct (ties share the cut)
        self.given += n
        return SimpleNamespace(expected_clv=clv, p_repeat=np.full(n, 0.5),
                               segments=["low"] * n, model_version=self.model_version)


def test_rescore_rebuilds_the_top_set_when_every_score_falls(services):
    """Without a rebuild, users re-scored under the floor leave ``top`` and it shrinks to nothing;
    ``clv rescore`` (rescore_all) resets it first, so it is exact again when the scan ends."""
    from streams.rescore import rescore_all

    s = services.settings(redis_prefix=f"roll{uuid.uuid4().hex[:8]}")
    keys = Keys(s.redis_prefix)
    r = redis.Redis.from_url(s.redis_url)
    users = [f"u{i}" for i in range(40)]

    async def go():
        store = RedisStore(redis_client(s), s.redis_prefix, top_keep=8)
        await store.save_many([Update(u, new_state(), 0, Score(100.0 + i, 0.5, "vip", "m1", 1.7e9))
                               for i, u in enumerate(users)])
        assert float(r.get(keys.top_floor)) >= 100.0
        n = await rescore_all(store, _LowerModel(), batch=7)
        await store.r.aclose()
        return n

    assert asyncio.run(go()) == len(users)
    clv = truth(r, keys, users)
    assert max(clv.values()) < 100.0
    check(r, keys, clv, set(users))
    assert r.zcard(keys.top) == 8  # full again: the true top 8 of the new scores
