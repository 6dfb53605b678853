"""Shared pieces of the chaos suite: settings per test, a background publisher, the offline
reference (archive -> fold), the state comparison, DLQ reads and metric scrapes.

The reference for "what Redis must hold" is always an offline replay of the events the worker
itself ARCHIVED (``streams.archive.read_events`` -> ``streams.fold.replay``), checked in turn
against what was published, so a lost or double-counted event shows up in one of the two.
"""
from __future__ import annotations

import asyncio
import os
import threading
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from streams.fold import FEATURE_NAMES, IDX, features, replay

KEEP = [i for i, n in enumerate(FEATURE_NAMES) if n != "ipt_std_days"]  # order-dependent: docs/reliability.md
RTOL, ATOL = 1e-5, 1e-4
COUNT_FIELDS = ("n_events", "n_orders", "n_reviews")


def env_int(name: str, default: int) -> int:
    """Test sizes come from the environment (tests may read env; the app may not)."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return int(float(raw))
    except ValueError as exc:
        raise ValueError(f"{name}={raw!r} must be a number") from exc


def chaos_settings(stack, tmp_path: Path, tag: str, **overrides):
    """Fresh topics, group, Redis prefix and data dir on ``stack`` (``services`` or an
    ``infra_factory`` stack); small batches so kills land mid-work."""
    topics = stack.unique_topics(tag)
    base = dict(
        redis_prefix=f"{tag}{uuid.uuid4().hex[:8]}", data_dir=tmp_path / "var", archive_within_s=0.5,
        batch_within_s=0.02, model_poll_s=1.0, retry_backoff_initial_s=0.2, retry_backoff_max_s=2.0,
    )
    base.update(topics)
    base.update(overrides)
    return stack.settings(**base)


# ---- publishing ----------------------------------------------------------------------------
def publish_sync(messages: Iterable, settings, rate: float | None = None):
    from streams.simulate import publish

    res = asyncio.run(publish(list(messages), settings, rate))
    assert res.failed == 0, f"publish failed for {res.failed} messages: {res.first_error}"
    return res


class Publisher(threading.Thread):
    """Publishes ``chunks`` one after another (pausing ``pause_s`` between them) in a thread,
    so the worker consumes while events still arrive."""

    def __init__(self, chunks: Sequence[Sequence], settings, pause_s: float = 1.0, rate: float | None = None):
        super().__init__(name="chaos-publisher", daemon=True)
        self.chunks, self.settings, self.pause_s, self.rate = chunks, settings, pause_s, rate
        self.delivered = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            for i, chunk in enumerate(self.chunks):
                self.delivered += publish_sync(chunk, self.settings, self.rate).delivered
                if i + 1 < len(self.chunks):
                    time.sleep(self.pause_s)
        except BaseException as exc:  # reported by join_ok
            self.error = exc

    def join_ok(self, timeout: float = 600.0) -> int:
        self.join(timeout)
        assert not self.is_alive(), f"publisher still running after {timeout}s"
        if self.error is not None:
            raise AssertionError(f"publisher failed: {self.error!r}") from self.error
        return self.delivered


def chunked(items: Sequence, n: int) -> list[list]:
    size = max(1, -(-len(items) // n))
    return [list(items[i:i + size]) for i in range(0, len(items), size)]


# ---- the reference ---------------------------------------------------------------------------
def archived_events(settings, expected: int | None = None, timeout: float = 60.0) -> list:
    """Archived events (deduplicated by event_id); waits for ``expected`` of them (the archiver
    flushes every ``archive_within_s``)."""
    from streams.archive import read_events

    deadline = time.time() + timeout
    while True:
        evs = list(read_events(settings.archive_dir))
        if expected is None or len(evs) >= expected or time.time() > deadline:
            return evs
        time.sleep(0.5)


def reference(events, embed=None) -> dict:
    """Each user's unique events (by id, in event-time order) through the fold. ``embed``:
    text -> embedding for review texts (the served encoder); None = no embeddings, as the
    worker does without an encoder."""
    per_user: dict[str, list] = defaultdict(list)
    seen: set[str] = set()
    for ev in sorted(events, key=lambda e: e.ts):
        if ev.event_id not in seen:
            seen.add(ev.event_id)
            per_user[ev.user_id].append(ev)

    def emb(ev):
        return embed(ev.text) if embed is not None and getattr(ev, "text", "") else None

    return {u: replay((e, emb(e)) for e in evs) for u, evs in per_user.items()}


def load_states(settings, users: Sequence[str]) -> dict:
    from streams.store import RedisStore, redis_client

    async def go():
        store = RedisStore(redis_client(settings), settings.redis_prefix)
        try:
            out = {}
            users_l = list(users)
            for i in range(0, len(users_l), 500):
                got = await store.load_many(users_l[i:i + 500])
                out.update({u: got[u].state for u in got})
            return out
        finally:
            await store.r.aclose()

    return asyncio.run(go())


def redis_user_ids(settings, r) -> set[str]:
    from streams.keys import Keys

    prefix = Keys(settings.redis_prefix).user("")
    return {k.decode()[len(prefix):] for k in r.scan_iter(match=f"{prefix}*", count=1000)}


@dataclass
class Comparison:
    users: int = 0  # users in the reference
    redis_users: int = 0
    missing: list = field(default_factory=list)  # in the reference, not in Redis
    extra: list = field(default_factory=list)  # in Redis, not in the reference
    feature_mismatch: list = field(default_factory=list)
    count_mismatch: list = field(default_factory=list)  # (uid, field, redis, reference)
    events_in_redis: int = 0  # sum of n_events over users in Redis
    events_in_reference: int = 0
    lost: int = 0  # events the reference has that Redis did not count
    doubled: int = 0  # events Redis counted more than once

    @property
    def ok(self) -> bool:
        return not (self.missing or self.extra or self.feature_mismatch or self.count_mismatch)

    def summary(self) -> str:
        return (f"users={self.users} redis_users={self.redis_users} missing={len(self.missing)} "
                f"extra={len(self.extra)} feature_mismatch={len(self.feature_mismatch)} "
                f"count_mismatch={len(self.count_mismatch)} events redis/reference="
                f"{self.events_in_redis}/{self.events_in_reference} lost={self.lost} "
                f"doubled={self.doubled}; e.g. missing {self.missing[:3]} extra {self.extra[:3]} "
                f"features {self.feature_mismatch[:3]} counts {self.count_mismatch[:3]}")


def compare_state(settings, ref: dict, r) -> Comparison:
    """Redis state of every user vs the reference fold: features (tolerance, without
    ipt_std_days) and exact counts; also no user in Redis that the reference lacks."""
    c = Comparison(users=len(ref))
    in_redis = redis_user_ids(settings, r)
    c.redis_users = len(in_redis)
    c.extra = sorted(in_redis - set(ref))
    got = load_states(settings, sorted(ref))
    for uid, want in ref.items():
        g = got.get(uid)
        n_want = int(want.v[IDX["n_events"]])
        c.events_in_reference += n_want
        if g is None:
            c.missing.append(uid)
            c.lost += n_want
            continue
        n_got = int(g.v[IDX["n_events"]])
        c.events_in_redis += n_got
        c.lost += max(0, n_want - n_got)
        c.doubled += max(0, n_got - n_want)
        for f in COUNT_FIELDS:
            a, b = int(g.v[IDX[f]]), int(want.v[IDX[f]])
            if a != b:
                c.count_mismatch.append((uid, f, a, b))
        as_of = want.v[IDX["last_ts"]] + 86400.0
        a, b = features(g, as_of)[KEEP], features(want, as_of)[KEEP]
        if not np.allclose(a, b, rtol=RTOL, atol=ATOL):
            bad = [FEATURE_NAMES[KEEP[i]] for i in np.nonzero(~np.isclose(a, b, rtol=RTOL, atol=ATOL))[0]]
            c.feature_mismatch.append((uid, bad[:4]))
    return c


def assert_archive_complete(archived, published_events) -> None:
    """The archive holds exactly the published valid events (each id once after dedupe)."""
    want = {e.event_id for e in published_events}
    got = {e.event_id for e in archived}
    missing, extra = want - got, got - want
    assert not missing and not extra, (
        f"archive differs from what was published: {len(missing)} missing (e.g. {sorted(missing)[:3]}), "
        f"{len(extra)} unexpected (e.g. {sorted(extra)[:3]})")


# ---- Kafka reads -----------------------------------------------------------------------------
def read_topic(settings, topic: str, expected: int, timeout: float = 90.0) -> list:
    """Records of ``topic`` from the beginning, until ``expected`` arrived or ``timeout``."""
    from aiokafka import AIOKafkaConsumer

    from streams.kafka import client_kwargs

    async def go():
        c = AIOKafkaConsumer(topic, auto_offset_reset="earliest", enable_auto_commit=False,
                             group_id=None, max_partition_fetch_bytes=4 * 1024 * 1024,
                             fetch_max_bytes=16 * 1024 * 1024, **client_kwargs(settings))
        await c.start()
        out = []
        try:
            deadline = time.time() + timeout
            idle_since = None
            while time.time() < deadline:
                batch = await c.getmany(timeout_ms=500, max_records=5000)
                n = sum(len(v) for v in batch.values())
                for recs in batch.values():
                    out.extend(recs)
                if len(out) >= expected:
                    # drain what is left (duplicates from a retried publish, if any)
                    if n == 0:
                        idle_since = idle_since or time.time()
                        if time.time() - idle_since > 1.0:
                            break
                    else:
                        idle_since = None
        finally:
            await c.stop()
        return out

    return asyncio.run(go())


def read_upto(settings, ends: dict[tuple[str, int], int], timeout: float = 120.0) -> list:
    """Records of each (topic, partition) from the log start up to (not incl.) ``ends``."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    from streams.kafka import client_kwargs

    async def go():
        want = {TopicPartition(t, p): e for (t, p), e in ends.items() if e > 0}
        if not want:
            return []
        c = AIOKafkaConsumer(enable_auto_commit=False, group_id=None, max_partition_fetch_bytes=4 << 20,
                             fetch_max_bytes=16 << 20, **client_kwargs(settings))
        await c.start()
        out = []
        try:
            c.assign(list(want))
            await c.seek_to_beginning(*want)
            deadline = time.time() + timeout
            pending = dict(want)
            while pending:
                assert time.time() < deadline, f"could not read up to {pending} in {timeout}s"
                batch = await c.getmany(*pending, timeout_ms=500, max_records=10000)
                for tp, recs in batch.items():
                    out.extend(m for m in recs if m.offset < want[tp])
                for tp in list(pending):
                    if await c.position(tp) >= want[tp]:
                        del pending[tp]
        finally:
            await c.stop()
        return out

    return asyncio.run(go())


def commit_invariant(settings) -> tuple[int, list]:
    """Offsets never run ahead of state: for every valid event record below its partition's
    committed offset, the user's state in Redis has that topic's offset watermark at or past
    the record. Run it while no worker runs. Returns (records checked, violations)."""
    from streams.events import Limits, Rejection, decode
    from streams.pipeline import TOPIC_TYPES

    _lag, lags = total_lag(settings)
    ends = {(p.topic, p.partition): p.committed for p in lags if p.committed}
    records = read_upto(settings, ends)
    t_index = {t: i for i, t in enumerate(settings.event_topics)}
    limits, now = Limits.from_settings(settings), time.time()
    need: dict[str, list[tuple[int, int, tuple]]] = defaultdict(list)
    for m in records:
        ti = t_index[m.topic]
        ev = decode(m.value, now=now, key=m.key, expect_type=TOPIC_TYPES[ti], limits=limits)
        if not isinstance(ev, Rejection):
            need[ev.user_id].append((ti, m.offset, (m.topic, m.partition)))
    states = load_states(settings, sorted(need))
    bad = []
    for uid, recs in need.items():
        st = states.get(uid)
        for ti, off, tp in recs:
            if st is None or st.wm[ti] < off:
                bad.append((uid, tp, off, None if st is None else st.wm[ti]))
    return sum(len(v) for v in need.values()), bad


def total_lag(settings) -> tuple[int, list]:
    from serving.lag import lag_snapshot

    lags = asyncio.run(lag_snapshot(settings, list(settings.event_topics)))
    return sum(p.lag for p in lags), lags


def wait_caught_up(settings, r, workers=(), timeout: float = 600.0, min_events: int = 0,
                   settle_s: float = 2.0) -> list:
    """Until lag is 0 on every event partition (each one that has data committed) and the
    worker counted at least ``min_events`` records; stays 0 for ``settle_s``. Fails early
    when a worker process died."""
    from streams.keys import Keys

    stats = Keys(settings.redis_prefix).stats
    deadline = time.time() + timeout
    zero_since = None
    last = None
    while time.time() < deadline:
        for w in workers:
            if w.proc is not None and not w.alive:
                raise AssertionError(f"worker exited with {w.proc.returncode}:\n{w.log_tail()}")
        try:
            lag, lags = total_lag(settings)
        except Exception as exc:  # Kafka restarting: keep waiting
            last = repr(exc)
            time.sleep(1.0)
            continue
        try:
            seen = int(r.hget(stats, "events") or 0)
        except Exception as exc:  # Redis restarting
            last = repr(exc)
            time.sleep(1.0)
            continue
        last = (lag, seen, [(p.partition, p.end, p.committed) for p in lags if p.lag])
        done = lag == 0 and seen >= min_events and all(p.committed is not None for p in lags if p.end > 0)
        if done:
            zero_since = zero_since or time.time()
            if time.time() - zero_since >= settle_s:
                return lags
        else:
            zero_since = None
        time.sleep(0.5)
    logs = "\n---\n".join(w.log_tail() for w in workers)
    raise AssertionError(f"not caught up in {timeout}s: lag/events/lagging={last}\n{logs}")


# ---- metrics ---------------------------------------------------------------------------------
def scrape(port: int, timeout: float = 5.0) -> dict[tuple[str, tuple], float]:
    """The worker's /metrics as {(sample name, sorted labels): value}."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=timeout).text
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def scrape_text(port: int) -> str:
    import httpx

    return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5.0).text


def metric(samples: dict, name: str, **labels) -> float:
    want = tuple(sorted(labels.items()))
    return samples.get((name, want), 0.0)


def metric_by(samples: dict, name: str, label: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for (n, labels), v in samples.items():
        if n == name:
            d = dict(labels)
            if label in d:
                out[d[label]] = out.get(d[label], 0.0) + v
    return out


def wait_metrics(port: int, timeout: float = 120.0) -> dict:
    deadline = time.time() + timeout
    while True:
        try:
            return scrape(port)
        except Exception:
            if time.time() > deadline:
                raise
            time.sleep(0.5)


def worker_stats(settings, r) -> Counter:
    from streams.keys import Keys

    raw = r.hgetall(Keys(settings.redis_prefix).stats)
    out = Counter()
    for k, v in raw.items():
        try:
            out[k.decode()] = int(v)
        except ValueError:
            pass
    return out
