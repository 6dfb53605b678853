"""The replay and the training-set build on a 2-process Dask LocalCluster equal the
one-process results exactly, on a small archive of fresh and compacted files."""
from __future__ import annotations

import asyncio
from datetime import datetime

import numpy as np
import pytest

from streams import archive
from streams.compact import compact
from streams.distributed import dask_client
from streams.settings import Settings
from streams.store import RedisStore
from tests.unit.archive_data import DAY, write_archive
from training.dataset import build_many, build_many_dask

H = 20.0


@pytest.fixture(scope="module")
def cluster():
    with dask_client(None, workers=2) as client:
        yield client


@pytest.fixture
def arch(tmp_path):
    s = Settings(_env_file=None, data_dir=tmp_path)
    pairs = write_archive(s.archive_dir, s, users=50, days=80)
    last = sorted(d.name for d in s.archive_dir.glob("date=*"))[-1][5:]
    # all days but the newest compacted: both kinds of files are read
    compact(s.archive_dir, now=datetime.strptime(last, "%Y-%m-%d").timestamp() + DAY + 60, grace_s=3600)
    return s, pairs


def test_training_sets_on_dask_equal_one_process(arch, cluster):
    s, _ = arch
    t0, t1 = archive.ts_range(s.archive_dir)
    cuts = [t0 + 30 * DAY, t0 + 55 * DAY, t1 - 1]
    for users in ("active", "all"):
        ref = build_many(archive.read_events(s.archive_dir), cuts, H, users=users)
        got = build_many_dask(s.archive_dir, cuts, H, cluster, users=users, n_parts=5)
        assert [len(x) for x in ref] == [len(x) for x in got] and len(ref[0]) > 0
        for a, b in zip(ref, got):
            assert a.user_ids == b.user_ids and a.texts == b.texts
            assert (a.cutoff, a.horizon_days, a.label_complete) == (b.cutoff, b.horizon_days, b.label_complete)
            for f in ("features", "text", "label", "past_spend"):
                np.testing.assert_array_equal(getattr(a, f), getattr(b, f))


def _dump(r, prefix):
    return {k: r.hgetall(k) for k in sorted(r.scan_iter(f"{prefix}:*"))}


@pytest.mark.integration
def test_replay_on_dask_equals_one_process(arch, cluster, infra_factory):
    import redis

    from streams.replay import replay_archive, replay_dask

    s, pairs = arch
    stack = infra_factory("redis")
    one = Settings(_env_file=None, data_dir=s.data_dir, redis_url=stack.redis_url, redis_prefix="one")
    many = Settings(_env_file=None, data_dir=s.data_dir, redis_url=stack.redis_url, redis_prefix="many")

    async def single():
        store = RedisStore.from_settings(one)
        try:
            return await replay_archive(one, store)
        finally:
            await store.r.aclose()

    ref = asyncio.run(single())
    users, events, parts = replay_dask(many, cluster, n_parts=4)
    assert (users, events) == ref and users == len({e.user_id for _, e in pairs})
    assert len(parts) == 4 and all(p["rows"] > 0 for p in parts)
    assert sum(p["rows"] for p in parts) == len(archive.read_table(s.archive_dir))
    r = redis.Redis.from_url(stack.redis_url)
    a, b = _dump(r, "one"), _dump(r, "many")
    assert len(a) >= users
    assert {k[3:]: v for k, v in a.items()} == {k[4:]: v for k, v in b.items()}  # same keys, same bytes
