"""Scenario 5: bad models promoted while the worker serves.

A worker (metrics on, CLV_MODEL_POLL_S=1) serves a good model ``m1``; a stream is published
in phases, and before each phase a new champion is promoted in the registry
(``tests/chaos/models.py`` builds them with the ``onnx`` helper API):

=========  ==============================================  =================================
model      fault                                           expected
=========  ==============================================  =================================
m2         corrupt head.onnx (random bytes)                refused at load, m1 keeps serving
m3         contract mismatch (feature list of another      refused at load, m1 keeps serving
           fold)
m4         NaN for every real user (finite for the         loads, fails at scoring time
           scorer's all-zero smoke batch)                  (FloatingPointError): refused,
                                                           m1 serves again, no score gap
m5         fixed batch shape [1, F] (runs for the smoke    loads, fails in onnxruntime for
           batch, fails for any batch of 2+)               a batch of 2+: refused, m1 again
m6         a good model                                    served from then on
=========  ==============================================  =================================

Each phase's users must carry fresh scores of the model that should serve; the state of
every user must equal the offline fold of the archive (scoring failures never cost a state
update); ``clv_model_refusals_total`` counts the 4 refusals and ``clv_model_info`` names m6.

A second, service-free test covers the case without a fallback (the first model ever is
bad): state is still written, the batch's users are counted as score failures.
"""
from __future__ import annotations

import asyncio
import itertools
import json
import time

import pytest
import redis

from serving.registry import Registry
from serving.scorer import HotScorer
from streams.events import encode
from streams.keys import F_AT, F_MV, Keys
from streams.pipeline import Pipeline, Record
from streams.settings import Settings
from streams.simulate import simulate
from streams.store import MemoryStore
from tests.chaos.harness import (
    archived_events, assert_archive_complete, chaos_settings, compare_state, env_int, metric,
    publish_sync, reference, scrape, wait_caught_up, wait_metrics,
)
from tests.chaos.models import register
from tests.conftest import free_ports
from tests.integration.worker_proc import WorkerProc

pytestmark = [pytest.mark.chaos]

PHASES = [  # (version, kind, served afterwards, log line that says the worker saw it)
    ("m2", "corrupt", "m1", "refusing model m2"),
    ("m3", "contract", "m1", "refusing model m3"),
    ("m4", "nan", "m1", "now serving model m4"),
    ("m5", "shape", "m1", "now serving model m5"),
    ("m6", "good", "m6", "now serving model m6"),
]


def _wait_log(path, text: str, w, timeout: float = 60.0) -> None:
    deadline = time.time() + timeout
    while text not in path.read_text(errors="replace"):
        assert w.alive, f"worker exited:\n{w.log_tail()}"
        assert time.time() < deadline, f"log never said {text!r}:\n{w.log_tail()}"
        time.sleep(0.2)


@pytest.mark.integration
def test_bad_models_are_refused_or_isolated_and_m1_keeps_serving(services, tmp_path, engine):
    n = env_int("CLV_CHAOS_MODEL_EVENTS", 18_000)
    port = free_ports(1)[0]
    s = chaos_settings(services, tmp_path, "models", worker_web_port=port, batch_max=300, engine=engine)
    reg = Registry(s.models_dir)
    register(reg, "m1", "good", champion=True, seed=1)
    sim = simulate(n_users=max(20, n // 50), start="2025-01-01", days=150, seed=5)
    events = list(itertools.islice(sim.iter_events(), n))
    size = len(events) // (len(PHASES) + 1)
    chunks = [events[i * size:(i + 1) * size] for i in range(len(PHASES))] + [events[len(PHASES) * size:]]
    r = redis.Redis.from_url(s.redis_url)
    keys = Keys(s.redis_prefix)
    log = tmp_path / "worker.log"
    w = WorkerProc(s, log, metrics=True)
    sent = 0
    served = {}
    try:
        w.start()
        wait_metrics(port)
        _wait_log(log, "now serving model m1", w)
        plan = [(None, None, "m1", None)] + PHASES
        for (version, kind, expect, seen_line), chunk in zip(plan, chunks):
            if version is not None:
                register(reg, version, kind, seed=len(served) + 2)
                reg.set_champion(version, reason=f"chaos: {kind}")
                _wait_log(log, seen_line, w)
            t_phase = time.time()
            publish_sync(chunk, s)
            sent += len(chunk)
            wait_caught_up(s, r, [w], timeout=300, min_events=sent, settle_s=0.5)
            users = sorted({e.user_id for e in chunk})
            mv = [v.decode() if v else None for v in (r.hget(keys.user(u), F_MV) for u in users)]
            at = [float(v or 0) for v in (r.hget(keys.user(u), F_AT) for u in users)]
            wrong = [(u, m) for u, m in zip(users, mv) if m != expect]
            assert not wrong, f"after promoting {version} ({kind}) users must be scored by {expect}: {wrong[:5]}"
            stale = [u for u, a in zip(users, at) if a < t_phase]
            assert not stale, f"{len(stale)} users of the {version} phase were not rescored: {stale[:5]}"
            served[version or "m1"] = expect
        text = log.read_text(errors="replace")
        for bad in ("m4", "m5"):
            assert f"model {bad} failed at scoring time" in text and "serving m1 again" in text
        samples = scrape(port)
        assert metric(samples, "clv_model_refusals_total") == 4
        assert metric(samples, "clv_model_info", version="m6") == 1.0
        assert w.alive and w.starts == 1 and "exiting without ack" not in text

        archived = archived_events(s, expected=len(events))
        assert_archive_complete(archived, events)
        cmp = compare_state(s, reference(archived), r)
        assert cmp.ok and cmp.lost == 0 and cmp.doubled == 0, cmp.summary()
        history = [(h["action"], h["version"]) for h in reg.history()]
        print("\n[chaos models] " + json.dumps({"events": len(events), "served": served,
                                                "refusals": metric(samples, "clv_model_refusals_total"),
                                                "users": cmp.users, "history": history}))
    finally:
        w.stop()


def test_without_a_fallback_state_is_still_written(tmp_path):
    """The first model ever is bad: nothing to fall back to, scoring fails, state does not."""
    reg = Registry(tmp_path / "models")
    register(reg, "only", "nan", champion=True)
    hot = HotScorer(reg, ["CPUExecutionProvider"])
    assert hot.current is not None and hot.current.version == "only"  # passed the smoke run
    S = Settings(_env_file=None)
    store = MemoryStore()
    pipe = Pipeline(S, store, hot)
    sim = simulate(n_users=30, start="2025-01-01", days=60, seed=9)
    evs = [e for e in sim.iter_events() if e.type in ("click", "order")][:400]
    topic = {"click": S.topic_clicks, "order": S.topic_orders}
    recs = [Record(topic[e.type], 0, i, e.user_id.encode(), encode(e)) for i, e in enumerate(evs)]
    res = asyncio.run(pipe.process(recs))
    assert res.n_applied == len(evs) and not res.dead
    assert res.score_failed == len({e.user_id for e in evs}) and not res.scores
    assert hot.current.version == "only"  # no previous model to go back to
    want = reference(evs)
    got = asyncio.run(store.load_many(sorted(want)))
    assert all(int(got[u].state.get("n_events")) == int(want[u].get("n_events")) for u in want)
