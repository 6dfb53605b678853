"""The batch step on the in-memory store: DLQ, dedupe, CAS conflicts, scoring failures,
and the skew guarantee (stream state == offline replay of the archive through the fold)."""
from __future__ import annotations

import asyncio
import zlib

import numpy as np
import orjson
import pytest
from hypothesis import given, settings as hsettings, strategies as st

from streams.archive import ArchiveWriter, read_events
from streams.events import encode
from streams.fold import FEATURE_NAMES, features, replay
from streams.pipeline import Pipeline, Record, Transient
from streams.settings import Settings
from streams.store import MemoryStore
from tests.unit.strategies import event_lists, fixed_events

S = Settings(_env_file=None)
TOPIC_OF = {"click": S.topic_clicks, "order": S.topic_orders, "review": S.topic_reviews, "profile": S.topic_profiles}
AS_OF = 1.7e9 + 500 * 86400
_KEEP = [i for i, n in enumerate(FEATURE_NAMES) if n != "ipt_std_days"]


def to_records(events, partitions=4, start=None):
    """Wire-encode events the way a producer keyed by user_id would partition them."""
    offsets = dict(start or {})
    out = []
    for ev in events:
        topic = TOPIC_OF[ev.type]
        p = zlib.crc32(ev.user_id.encode()) % partitions
        off = offsets.get((topic, p), 0)
        offsets[(topic, p)] = off + 1
        out.append(Record(topic, p, off, ev.user_id.encode(), encode(ev)))
    return out, offsets


def run(pipe, records, batch):
    results = []
    for i in range(0, len(records), batch):
        results.append(asyncio.run(pipe.process(records[i:i + batch])))
    return results


def by_user(events):
    d = {}
    for e in events:
        d.setdefault(e.user_id, []).append(e)
    return d


@given(event_lists(max_size=60), st.integers(1, 25))
@hsettings(max_examples=40, deadline=None)
def test_stream_state_equals_offline_replay(events, batch):
    store = MemoryStore()
    pipe = Pipeline(S, store)
    records, _ = to_records(events)
    run(pipe, records, batch)
    for uid, evs in by_user(events).items():
        got = asyncio.run(store.load_many([uid]))[uid].state
        want = replay((e, None) for e in evs)
        np.testing.assert_allclose(features(got, AS_OF)[_KEEP], features(want, AS_OF)[_KEEP], rtol=1e-5, atol=1e-4)


@given(event_lists(min_size=1, max_size=40), st.integers(1, 10))
@hsettings(max_examples=30, deadline=None)
def test_redelivery_and_duplicates_count_once(events, batch):
    store, twice = MemoryStore(), MemoryStore()
    records, _ = to_records(events)
    run(Pipeline(S, store), records, batch)
    p2 = Pipeline(S, twice)
    run(p2, records, batch)
    res = run(p2, records, batch)  # the whole log redelivered (crash before any commit)
    assert sum(r.n_applied for r in res) == 0
    assert sum(r.n_duplicates for r in res) == len(records)
    for uid in by_user(events):
        a = asyncio.run(store.load_many([uid]))[uid].state
        b = asyncio.run(twice.load_many([uid]))[uid].state
        np.testing.assert_array_equal(features(a, AS_OF), features(b, AS_OF))


def test_bad_messages_go_to_dlq_with_reason_and_bytes():
    store = MemoryStore()
    pipe = Pipeline(S, store)
    recs = [
        Record(S.topic_orders, 0, 0, b"u", b"\xff\xfe"),
        Record(S.topic_orders, 0, 1, b"u", orjson.dumps({"type": "order", "event_id": "e", "user_id": "u",
                                                         "ts": 1.75e9, "order_id": "o", "amount": -3})),
        Record(S.topic_clicks, 0, 0, b"u", orjson.dumps({"type": "click", "event_id": "c", "user_id": "u",
                                                         "ts": 1.75e9, "action": "view"})),
        Record(S.topic_clicks, 0, 1, None, None),
        Record("elsewhere", 0, 0, b"u", b"{}"),
    ]
    res = asyncio.run(pipe.process(recs))
    reasons = sorted(d.reason for d in res.dead)
    assert reasons == ["bad_field", "empty", "invalid_json", "unknown_topic"]
    assert {d.record.value for d in res.dead} >= {b"\xff\xfe", None}
    assert res.n_applied == 1
    assert store.stats["dlq"] == 4 and store.stats["dlq:invalid_json"] == 1


class _Racing(MemoryStore):
    """Another writer bumps a user's version between our load and save, once."""

    def __init__(self):
        super().__init__()
        self.raced = False

    async def save_many(self, updates, stats=None, put=None):
        if not self.raced and updates:
            self.raced = True
            row = self.rows.setdefault(updates[0].user_id, {"ver": 0})
            row["ver"] = int(row["ver"]) + 1
        return await super().save_many(updates, stats, put)


def test_cas_conflict_is_refolded_not_lost():
    events = fixed_events(5)
    store = _Racing()
    res = asyncio.run(Pipeline(S, store).process(to_records(events)[0]))
    assert res.conflicts >= 1
    assert res.n_applied == len(events) - res.n_duplicates
    # the ops counters ride on the saves: the conflicting user is counted once, not twice
    assert store.stats["processed"] == res.n_applied and store.stats.get("duplicates", 0) == res.n_duplicates
    assert store.stats["events"] == len(events)


class _AlwaysRacing(MemoryStore):
    """Another writer bumps the first user's version before every save (a conflict storm)."""

    racing = True

    async def save_many(self, updates, stats=None, put=None):
        if self.racing and updates:
            row = self.rows.setdefault(updates[0].user_id, {"ver": 0})
            row["ver"] = int(row["ver"]) + 1
        return await super().save_many(updates, stats, put)


def test_conflict_storm_is_retried_whole_and_counted_once():
    events = fixed_events(5)
    recs = to_records(events)[0]
    store = _AlwaysRacing()
    with pytest.raises(Transient, match="kept changing"):
        asyncio.run(Pipeline(S, store).process(recs))
    assert {k: v for k, v in store.stats.items() if k not in ("ts_last", "mv") and v} == {}
    store.racing = False  # the retry of the whole batch
    res = asyncio.run(Pipeline(S, store).process(recs))
    assert store.stats["events"] == len(recs)
    assert store.stats["processed"] + store.stats.get("duplicates", 0) == len(events)
    assert store.stats["processed"] == res.n_applied >= 1


class _Broken:
    class current:  # a model that raises at scoring time
        encoder = None
        version = "broken"

        @staticmethod
        def score(f, t):
            raise RuntimeError("boom")


def test_scoring_failure_never_blocks_state():
    events = fixed_events(3, users=("u",))
    store = MemoryStore()
    res = asyncio.run(Pipeline(S, store, _Broken()).process(to_records(events)[0]))
    assert res.score_failed >= 1 and not res.scores
    assert asyncio.run(store.load_many(["u"]))["u"].state is not None


def test_archive_replay_is_exact(tmp_path):
    events = fixed_events(30)
    records, _ = to_records(events)
    w = ArchiveWriter(tmp_path)
    pairs = list(zip(records, events))
    w.write(pairs[:20])
    w.write(pairs[10:])  # overlapping redelivery is archived twice...
    back = list(read_events(tmp_path))
    assert sorted(e.event_id for e in back) == sorted(e.event_id for e in events)  # ...read once
    assert [e.ts for e in back] == sorted(e.ts for e in back)


def test_archive_batches_write_one_file_per_topic_partition(tmp_path):
    """The kafka engine hands the writer many small Arrow batches (one per micro-batch)."""
    import pyarrow.parquet as pq

    from streams.archive import files, record_batch

    events = fixed_events(40)
    records, _ = to_records(events)
    pairs = list(zip(records, events))
    batches = [record_batch(pairs[i:i + 7]) for i in range(0, len(pairs), 7)]
    n = ArchiveWriter(tmp_path).write_batches(batches)
    expect = {}
    for r in records:
        lo, hi = expect.get((r.topic, r.partition), (r.offset, r.offset))
        expect[(r.topic, r.partition)] = (min(lo, r.offset), max(hi, r.offset))
    assert n == len(expect)
    assert sorted(f.name for f in files(tmp_path)) == sorted(
        f"{t}-p{p}-{lo}-{hi}.parquet" for (t, p), (lo, hi) in expect.items())
    for f in files(tmp_path):  # each file holds its slice only, in offset order
        t = pq.read_table(f)
        assert set(t["topic"].to_pylist()) == {f.name.split("-p")[0]}
        assert t["offset"].to_pylist() == sorted(t["offset"].to_pylist())
    assert sorted(e.event_id for e in read_events(tmp_path)) == sorted(e.event_id for e in events)
    assert ArchiveWriter(tmp_path).write_batches([]) == 0


def test_replay_rebuilds_the_state_the_stream_wrote(tmp_path):
    from streams.replay import replay_archive

    s = Settings(_env_file=None, data_dir=tmp_path)
    events = fixed_events(60)
    records, _ = to_records(events)
    streamed = MemoryStore()
    res = asyncio.run(Pipeline(s, streamed).process(records))
    ArchiveWriter(s.archive_dir).write(res.valid_events)
    rebuilt = MemoryStore()
    users, folded = asyncio.run(replay_archive(s, rebuilt))
    assert users == 3 and folded == len(events)
    for uid in ("alice", "bob", "carol"):
        a = asyncio.run(streamed.load_many([uid]))[uid].state
        b = asyncio.run(rebuilt.load_many([uid]))[uid].state
        np.testing.assert_allclose(features(a, AS_OF), features(b, AS_OF), rtol=1e-5)
        assert a.wm == b.wm
    # a redelivery after the rebuild counts nothing
    again = asyncio.run(Pipeline(s, rebuilt).process(records))
    assert again.n_applied == 0
