"""Scenario 4: hostile input mixed into a valid stream.

At least 10k fuzzed messages (``tests/chaos/fuzz.py``: random bytes, invalid UTF-8, lone
surrogates, truncated / deeply nested JSON, wrong types, missing fields, NaN / infinite /
negative / huge amounts, far-future timestamps, texts over the limit, 300 KB - 1 MB
messages, unknown types, unknown schema versions, key and topic mismatches, tombstones) are
interleaved with a simulated stream (10 % of its events carry unknown junk fields, which the
schema ignores) and published while one worker with metrics on consumes. Then:

* the worker never stopped;
* every bad message is in the DLQ exactly with the reason the fuzzer expects, with the
  source coordinates in its headers (the bytes verbatim, or their first
  CLV_MAX_MESSAGE_BYTES when the original is too big to forward);
* ``clv_dlq_messages_total{reason}`` counts each reason exactly;
* every good event is applied: the state equals the offline fold of the archive, and the
  archive holds exactly the good events.

Size: ``CLV_CHAOS_BAD`` (default 10000) bad messages, ``CLV_CHAOS_HOSTILE_EVENTS`` (default
20000) good events.
"""
from __future__ import annotations

import itertools
import json
import random
import time
from collections import Counter

import pytest
import redis

from streams.sim.wire import as_messages
from streams.simulate import simulate
from streams.app import DLQ_MAX_KEY, DLQ_MAX_VALUE
from tests.chaos.fuzz import hostile, junk_fields, make
from tests.chaos.harness import (
    Publisher, archived_events, assert_archive_complete, chaos_settings, chunked, compare_state,
    env_int, metric_by, read_topic, reference, scrape, wait_caught_up, wait_metrics, worker_stats,
)
from tests.conftest import free_ports
from tests.integration.worker_proc import WorkerProc

pytestmark = [pytest.mark.chaos, pytest.mark.integration]


def test_hostile_messages_go_to_the_dlq_and_good_ones_are_applied(services, tmp_path, engine):
    n_bad = env_int("CLV_CHAOS_BAD", 10_000)
    n_good = env_int("CLV_CHAOS_HOSTILE_EVENTS", 20_000)
    rng = random.Random(env_int("CLV_CHAOS_SEED", 4))
    port = free_ports(1)[0]
    s = chaos_settings(services, tmp_path, "hostile", worker_web_port=port, engine=engine)

    sim = simulate(n_users=max(20, n_good // 50), start="2025-01-01", days=150, seed=4)
    events = list(itertools.islice(sim.iter_events(), n_good))
    good = [junk_fields(m, rng) if rng.random() < 0.1 else m for m in as_messages(events)]
    users = sorted(sim.truth)
    ts = events[len(events) // 2].ts
    bad = hostile(rng, n_bad, users, ts=ts)
    # the rare giants, always: 300-900 KB texts, ~1 MB records (DLQ copy truncated), huge keys
    bad[:9] = [make(k, rng, rng.choice(users), ts) for k in ("too_large", "dlq_oversize", "huge_key") * 3]
    rng.shuffle(bad)
    # interleave, keeping the good events in their order
    slots = sorted(rng.sample(range(len(good) + len(bad)), len(bad)))
    msgs, gi, bi = [], iter(good), iter(bad)
    slot_set = set(slots)
    for i in range(len(good) + len(bad)):
        msgs.append(next(bi) if i in slot_set else next(gi))
    expected_reasons = Counter(m.label for m in bad)

    r = redis.Redis.from_url(s.redis_url)
    w = WorkerProc(s, tmp_path / "worker.log", metrics=True)
    pub = Publisher(chunked(msgs, 6), s, pause_s=1.0)
    t0 = time.time()
    try:
        w.start()
        wait_metrics(port)
        pub.start()
        while pub.is_alive():
            assert w.alive, f"worker stopped ({w.proc.returncode}):\n{w.log_tail()}"
            time.sleep(0.5)
        pub.join_ok()
        wait_caught_up(s, r, [w], timeout=600, min_events=len(msgs))
        wall = time.time() - t0
        assert w.alive

        # every good event applied, nothing else
        archived = archived_events(s, expected=len(events))
        assert_archive_complete(archived, events)
        cmp = compare_state(s, reference(archived), r)
        assert cmp.ok and cmp.lost == 0 and cmp.doubled == 0, cmp.summary()

        # every bad one in the DLQ, with the expected reason and its source coordinates
        dlq = read_topic(s, s.topic_dlq, len(bad), timeout=180)
        got, truncated, key_truncated = Counter(), 0, 0
        for m in dlq:
            h = {k: v.decode() for k, v in m.headers}
            assert {"clv-reason", "clv-detail", "clv-source-topic", "clv-source-partition",
                    "clv-source-offset"} <= set(h), h
            assert h["clv-detail"], h
            value = m.value or b""
            if "clv-truncated-from" in h:
                truncated += 1
                assert len(value) == DLQ_MAX_VALUE < int(h["clv-truncated-from"])
            if "clv-key-truncated-from" in h:
                key_truncated += 1
                assert len(m.key) == DLQ_MAX_KEY < int(h["clv-key-truncated-from"])
            got[(h["clv-reason"], value, int(h.get("clv-truncated-from", len(value))))] += 1
        want = Counter((m.label, (m.value or b"")[:DLQ_MAX_VALUE], len(m.value or b"")) for m in bad)
        assert truncated == sum(len(m.value or b"") > DLQ_MAX_VALUE for m in bad) >= 3
        assert key_truncated == sum(len(m.key or b"") > DLQ_MAX_KEY for m in bad) >= 3
        missing = want - got
        assert not missing, (f"{sum(missing.values())} bad messages missing from the DLQ (or with "
                             f"another reason), e.g. {[(k[0], k[1][:80]) for k in list(missing)[:5]]}")
        extra = got - want
        assert not extra, f"unexpected DLQ records, e.g. {[(k[0], k[1][:80]) for k in list(extra)[:5]]}"

        # metrics and the ops counters count them by reason
        samples = scrape(port)
        by_reason = {k: int(v) for k, v in metric_by(samples, "clv_dlq_messages_total", "reason").items() if v}
        assert by_reason == dict(expected_reasons), (by_reason, dict(expected_reasons))
        consumed = sum(metric_by(samples, "clv_events_consumed_total", "topic").values())
        assert consumed == len(msgs)
        stats = worker_stats(s, r)
        assert stats["dlq"] == len(bad)
        assert all(stats[f"dlq:{k}"] == v for k, v in expected_reasons.items())
        log = (tmp_path / "worker.log").read_text(errors="replace")
        assert "exiting without ack" not in log
        print("\n[chaos hostile] " + json.dumps({
            "good_events": len(events), "bad_messages": len(bad), "reasons": dict(expected_reasons),
            "dlq_records": len(dlq), "truncated_in_dlq": truncated, "users": cmp.users,
            "kafka_retries": metric_by(samples, "clv_retries_total", "dependency").get("kafka", 0),
            "wall_s": round(wall, 1)}))
    finally:
        w.stop()
        if pub.is_alive():
            pub.join(60)
