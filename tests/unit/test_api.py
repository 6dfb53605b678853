"""Lookup API against a real Redis (a private redis-server on a free port, no Kafka).

Scores are written with the worker's own writer (streams.store.RedisStore), so these tests
also pin the reader to the writer's key layout.
"""
from __future__ import annotations

import asyncio
import logging
import shutil
import socket
import subprocess
import time
import uuid

import pytest
import redis
from fastapi.testclient import TestClient

from serving.api import create_app
from serving.client import lookup, lookup_many
from streams.events import parse
from streams.fold import FEATURE_NAMES, features, fold, new_state
from streams.keys import Keys
from streams.settings import Settings
from streams.store import RedisStore, Score, Update

TOKEN = "s3cret-token-for-tests"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    exe = shutil.which("redis-server")
    assert exe, "redis-server is not installed: apt-get install redis-server"
    port = free_port()
    proc = subprocess.Popen(
        [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(tmp_path_factory.mktemp("redis"))],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    r = redis.Redis(port=port)
    deadline = time.monotonic() + 10
    while True:
        try:
            r.ping()
            break
        except redis.ConnectionError:
            assert proc.poll() is None, "redis-server exited at start"
            assert time.monotonic() < deadline, "redis-server did not answer within 10 s"
            time.sleep(0.05)
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(10)


@pytest.fixture
def settings(redis_url) -> Settings:
    # a fresh key prefix per test: tests never see each other's keys
    return Settings(redis_url=redis_url, redis_prefix=f"t{uuid.uuid4().hex[:10]}",
                    kafka_bootstrap="127.0.0.1:1")


def write(settings: Settings, updates: list[Update], meta: bool = True) -> None:
    async def go():
        store = RedisStore.from_settings(settings)
        if meta:
            await store.write_meta()
        await store.save_many(updates)
        await store.r.aclose()

    asyncio.run(go())


def user_state(uid: str, now: float):
    s = new_state()
    for i, ev in enumerate([
        {"type": "click", "event_id": f"{uid}-c1", "user_id": uid, "ts": now - 5 * 86400,
         "action": "view", "category": "shoes"},
        {"type": "order", "event_id": f"{uid}-o1", "user_id": uid, "ts": now - 4 * 86400,
         "order_id": "o1", "amount": 40.0},
        {"type": "order", "event_id": f"{uid}-o2", "user_id": uid, "ts": now - 86400,
         "order_id": "o2", "amount": 60.0, "currency": "EUR"},
    ]):
        s = fold(s, parse(ev))
    return s


@pytest.fixture
def populated(settings):
    now = time.time()
    updates = [
        Update("alice", user_state("alice", now), 0, Score(812.5, 0.91, "vip", "m-20260101", now - 3)),
        Update("bob", user_state("bob", now), 0, Score(12.25, 0.2, "low", "m-20260101", now - 2)),
        Update("carol", user_state("carol", now), 0, None),  # state, no score yet
    ]
    write(settings, updates)
    return settings, now


def client(settings: Settings) -> TestClient:
    return TestClient(create_app(settings))


def test_lookup_returns_the_stored_score(populated):
    settings, now = populated
    with client(settings) as c:
        r = c.get("/v1/users/alice/clv")
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    assert body == {"user_id": "alice", "clv": 812.5, "p_repeat": 0.91, "segment": "vip",
                    "model_version": "m-20260101", "scored_at": pytest.approx(now - 3)}


def test_unknown_user_is_a_404_that_says_what_is_missing(populated):
    settings, _ = populated
    with client(settings) as c:
        r = c.get("/v1/users/nobody/clv")
        r2 = c.get("/v1/users/carol/clv")
    assert r.status_code == 404
    body = r.json()
    assert body["error"] == "not_found" and body["user_id"] == "nobody"
    assert body["missing"] == ["user"]
    assert Keys(settings.redis_prefix).user("nobody") in body["detail"]
    # carol has state (the worker saw her) but no score yet: a different, precise answer
    assert r2.status_code == 404
    assert r2.json()["missing"] == ["score"]
    assert "not scored" in r2.json()["detail"]


def test_batch_lookup_post_and_get(populated):
    settings, _ = populated
    with client(settings) as c:
        r = c.post("/v1/users/clv:batch", json={"user_ids": ["bob", "nobody", "alice", "bob", "carol"]})
        g = c.get("/v1/clv", params={"ids": "alice,nobody"})
        empty = c.post("/v1/users/clv:batch", json={"user_ids": []})
        too_many = c.post("/v1/users/clv:batch", json={"user_ids": [f"u{i}" for i in range(1001)]})
    assert r.status_code == 200
    body = r.json()
    assert [x["user_id"] for x in body["found"]] == ["bob", "alice"]  # request order, deduped
    assert body["found"][0]["clv"] == 12.25 and body["found"][1]["segment"] == "vip"
    assert body["missing"] == ["nobody", "carol"]
    assert g.status_code == 200
    assert [x["user_id"] for x in g.json()["found"]] == ["alice"] and g.json()["missing"] == ["nobody"]
    assert empty.json() == {"found": [], "missing": []}
    assert too_many.status_code == 422


def test_features_true_decodes_the_state(populated):
    settings, now = populated
    with client(settings) as c:
        r = c.get("/v1/users/alice/clv", params={"features": "true"})
        plain = c.get("/v1/users/alice/clv").json()
    assert r.status_code == 200
    body = r.json()
    assert "features" not in plain
    assert list(body["features"]) == list(FEATURE_NAMES)
    expected = features(user_state("alice", now), body["features_as_of"])
    assert [body["features"][n] for n in FEATURE_NAMES] == pytest.approx(expected.tolist(), rel=1e-5, abs=1e-6)
    assert body["features"]["has_orders"] == 1.0
    assert body["features"]["repeat_orders"] == 1.0
    assert body["features"]["recency_days"] == pytest.approx(1.0, abs=0.01)


def test_bearer_token_required_on_v1_when_configured(populated):
    settings, _ = populated
    secured = Settings(**{**settings.model_dump(), "api_token": TOKEN})
    with client(secured) as c:
        none = c.get("/v1/users/alice/clv")
        wrong = c.get("/v1/users/alice/clv", headers={"Authorization": "Bearer nope"})
        basic = c.get("/v1/users/alice/clv", headers={"Authorization": f"Basic {TOKEN}"})
        ok = c.get("/v1/users/alice/clv", headers={"Authorization": f"Bearer {TOKEN}"})
        batch_none = c.post("/v1/users/clv:batch", json={"user_ids": ["alice"]})
        batch_ok = c.get("/v1/clv", params={"ids": "alice"}, headers={"Authorization": f"Bearer {TOKEN}"})
        ops_none = c.get("/ops/data")
        health = c.get("/healthz")
        page = c.get("/ops")
    for r in (none, wrong, basic, batch_none, ops_none):
        assert r.status_code == 401, r.text
        assert r.json()["error"] == "unauthorized"
        assert r.headers["www-authenticate"] == "Bearer"
        assert TOKEN not in r.text
    assert ok.status_code == 200 and ok.json()["clv"] == 812.5
    assert batch_ok.status_code == 200
    assert health.status_code == 200 and page.status_code == 200  # no data in either


def test_token_is_never_logged(populated, caplog):
    settings, _ = populated
    secured = Settings(**{**settings.model_dump(), "api_token": TOKEN})
    with caplog.at_level(logging.DEBUG):
        with client(secured) as c:
            c.get("/v1/users/alice/clv", headers={"Authorization": "Bearer wrong-token"})
            c.get("/v1/users/alice/clv", headers={"Authorization": f"Bearer {TOKEN}"})
    assert TOKEN not in caplog.text and "wrong-token" not in caplog.text


def test_readiness_checks_redis_and_the_keys_version(settings):
    r = redis.Redis.from_url(settings.redis_url)
    keys = Keys(settings.redis_prefix)
    with client(settings) as c:
        missing = c.get("/readyz")
        write(settings, [], meta=True)
        ready = c.get("/readyz")
        r.hset(keys.meta, "keys_version", "99")
        wrong = c.get("/readyz")
        live = c.get("/healthz")
    assert missing.status_code == 503
    assert missing.json()["ready"] is False
    assert "clv worker" in missing.json()["reasons"][0]
    assert ready.status_code == 200 and ready.json()["ready"] is True
    assert ready.json()["meta"]["keys_version"] == "1"
    assert wrong.status_code == 503 and "keys_version=99" in wrong.json()["reasons"][0]
    assert live.status_code == 200 and live.json() == {"status": "ok"}


def test_redis_down_gives_clear_503s():
    port = free_port()  # nothing listens there
    settings = Settings(redis_url=f"redis://:hunter2@127.0.0.1:{port}/0", kafka_bootstrap="127.0.0.1:1")
    with client(settings) as c:
        ready = c.get("/readyz")
        look = c.get("/v1/users/alice/clv")
        live = c.get("/healthz")
    assert ready.status_code == 503 and ready.json()["redis"] == "unreachable"
    assert look.status_code == 503 and look.json()["error"] == "redis_unavailable"
    assert f"127.0.0.1:{port}" in look.json()["detail"] and "start it" in look.json()["detail"]
    assert "hunter2" not in look.text and "hunter2" not in ready.text  # password redacted
    assert live.status_code == 200


def test_the_api_never_writes_redis(populated):
    settings, _ = populated
    r = redis.Redis.from_url(settings.redis_url)

    def snapshot():
        return {k: r.dump(k) for k in sorted(r.scan_iter(f"{settings.redis_prefix}:*"))}

    before = snapshot()
    with client(settings) as c:
        c.get("/v1/users/alice/clv", params={"features": "true"})
        c.get("/v1/users/nobody/clv")
        c.post("/v1/users/clv:batch", json={"user_ids": ["alice", "bob", "x"]})
        c.get("/readyz")
        c.get("/ops/data")
    assert snapshot() == before


def test_openapi_documents_the_routes(settings):
    with client(settings) as c:
        spec = c.get("/openapi.json").json()
        docs = c.get("/docs")
    assert {"/v1/users/{user_id}/clv", "/v1/users/clv:batch", "/v1/clv", "/healthz",
            "/readyz"} <= set(spec["paths"])
    assert docs.status_code == 200


def test_in_process_client_reads_redis_directly(populated):
    settings, now = populated
    rec = lookup("alice", settings)
    assert rec == {"user_id": "alice", "clv": 812.5, "p_repeat": 0.91, "segment": "vip",
                   "model_version": "m-20260101", "scored_at": pytest.approx(now - 3)}
    assert lookup("carol", settings) is None and lookup("nobody", settings) is None
    many = lookup_many(["bob", "nobody", "alice"], settings)
    assert set(many) == {"bob", "alice"} and many["bob"]["clv"] == 12.25
    assert lookup_many([], settings) == {}


def test_ops_data_reports_redis_contents_and_an_unreachable_kafka(populated):
    settings, _ = populated  # kafka_bootstrap is 127.0.0.1:1: nothing listens
    with client(settings) as c:
        page = c.get("/ops")
        d = c.get("/ops/data").json()
    assert page.status_code == 200 and "ops/data" in page.text
    assert d["lag"]["ok"] is False and "infra/services.sh start" in d["lag"]["error"]
    assert d["redis"]["ok"] is True
    assert [u["user_id"] for u in d["top"]] == ["alice", "bob"]
    assert d["distribution"]["users"] == 2
    assert sum(b["count"] for b in d["distribution"]["buckets"]) == 2
    assert d["model"]["latest_written"] == "m-20260101"


def test_api_metrics_count_lookups_by_status(populated):
    settings, _ = populated

    def count(text: str, status: str) -> float:
        line = f'clv_api_requests_total{{route="lookup",status="{status}"}} '
        return sum(float(x[len(line):]) for x in text.splitlines() if x.startswith(line))

    with client(settings) as c:
        before = c.get("/metrics").text
        c.get("/v1/users/alice/clv")
        c.get("/v1/users/alice/clv")
        c.get("/v1/users/nobody/clv")
        after = c.get("/metrics")
    assert after.headers["content-type"].startswith("text/plain")
    assert count(after.text, "200") == count(before, "200") + 2
    assert count(after.text, "404") == count(before, "404") + 1
    assert 'clv_api_request_seconds_bucket{le="0.001",route="lookup"}' in after.text
    assert "clv_events_consumed" not in after.text  # the worker's metrics are not the API's
