"""The lookup API as deployed: `clv serve` in its own process against the session's Redis,
driven over HTTP by serving.client.ClvHttpClient and a raw keep-alive load loop."""
from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
import uuid

import httpx
import pytest
import redis

from serving.client import ApiError, ClvHttpClient
from tests.integration.ops_helpers import free_port, serve, stop
from streams.fold import FEATURE_NAMES, new_state
from streams.settings import Settings
from streams.store import RedisStore, Score, Update

pytestmark = pytest.mark.integration
TOKEN = "integration-token"
N_USERS = 200


def populate(settings: Settings, n: int = N_USERS) -> float:
    now = time.time()

    async def go():
        store = RedisStore.from_settings(settings)
        await store.write_meta()
        await store.save_many([
            Update(f"u{i}", new_state(), 0, Score(10.0 + i, i / n, "mid", "m-int", now))
            for i in range(n)])
        await store.r.aclose()

    asyncio.run(go())
    return now


@pytest.fixture(scope="module")
def api(services, tmp_path_factory):
    settings = services.settings(redis_prefix=f"api{uuid.uuid4().hex[:8]}", api_token=TOKEN)
    now = populate(settings)
    proc, base = serve(settings, tmp_path_factory.mktemp("api") / "api.log")
    yield settings, base, now
    stop(proc)


def test_http_client_lookups(api):
    settings, base, now = api
    with ClvHttpClient(base, token=TOKEN) as c:
        assert c.get("u7") == {"user_id": "u7", "clv": 17.0, "p_repeat": 7 / N_USERS,
                               "segment": "mid", "model_version": "m-int",
                               "scored_at": pytest.approx(now)}
        assert c.get("nobody") is None
        full = c.get("u7", features=True)
        assert list(full["features"]) == list(FEATURE_NAMES)
        got = c.batch(["u1", "ghost", "u2"])
        assert [r["user_id"] for r in got["found"]] == ["u1", "u2"] and got["missing"] == ["ghost"]
        ready = c.ready()
        assert ready["ready"] is True and ready["meta"]["keys_version"] == "1"
    with ClvHttpClient(base, token="wrong") as c, pytest.raises(ApiError) as err:
        c.get("u7")
    assert err.value.status == 401


def test_user_ids_with_odd_characters(api):
    settings, base, _ = api
    uid = "odd id/with:colon?&=%"

    async def put():
        store = RedisStore.from_settings(settings)
        await store.save_many([Update(uid, new_state(), 0, Score(1.5, 0.1, "low", "m-int", 1.0))])
        await store.r.aclose()

    asyncio.run(put())
    with ClvHttpClient(base, token=TOKEN) as c:
        assert c.get(uid)["clv"] == 1.5
        assert c.batch([uid])["found"][0]["user_id"] == uid


def load(base: str, n: int, conc: int) -> list[float]:
    """n GETs over `conc` keep-alive connections; per-request latencies in seconds."""
    host, port = base.removeprefix("http://").split(":")

    async def worker(k: int, lat: list[float]):
        r, w = await asyncio.open_connection(host, int(port))
        for i in range(k):
            req = (f"GET /v1/users/u{i % N_USERS}/clv HTTP/1.1\r\nHost: x\r\n"
                   f"Authorization: Bearer {TOKEN}\r\n\r\n").encode()
            t0 = time.perf_counter()
            w.write(req)
            head = await r.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200"), head
            length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length")))
            await r.readexactly(length)
            lat.append(time.perf_counter() - t0)
        w.close()

    async def main():
        lat: list[float] = []
        await worker(200, [])  # warm-up
        await asyncio.gather(*(worker(n // conc, lat) for _ in range(conc)))
        return lat

    return asyncio.run(main())


def test_lookup_latency_under_load(api):
    """Figures are printed; the bound is loose because the test machine is shared (2 cores)."""
    _, base, _ = api
    for conc in (1, 4):
        lat = sorted(load(base, 2000, conc))
        p50, p99 = lat[len(lat) // 2] * 1e3, lat[int(len(lat) * 0.99)] * 1e3
        print(f"lookup latency, {conc} connection(s): p50 {p50:.2f} ms, p99 {p99:.2f} ms")
        assert len(lat) == 2000
        assert p99 < 50, f"p99 {p99:.1f} ms"


@pytest.fixture
def own_redis(tmp_path):
    """A private redis-server this test may stop and start (never the shared one)."""
    port = free_port()
    exe = shutil.which("redis-server")
    assert exe, "redis-server is not installed: apt-get install redis-server"

    def start():
        p = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                              "--appendonly", "no", "--dir", str(tmp_path)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        r = redis.Redis(port=port)
        for _ in range(200):
            try:
                r.ping()
                return p
            except redis.ConnectionError:
                time.sleep(0.05)
        raise AssertionError("redis-server did not start")

    procs = [start()]
    yield port, procs, start
    for p in procs:
        if p.poll() is None:
            p.terminate()
            p.wait(10)


def test_api_reports_redis_outage_and_recovers(own_redis, tmp_path):
    port, procs, start = own_redis
    settings = Settings(redis_url=f"redis://127.0.0.1:{port}/0", redis_prefix="own",
                        kafka_bootstrap="127.0.0.1:1")
    populate(settings, 3)
    proc, base = serve(settings, tmp_path / "api.log")
    try:
        assert httpx.get(f"{base}/v1/users/u1/clv").status_code == 200
        procs[0].terminate()
        procs[0].wait(10)
        down = httpx.get(f"{base}/v1/users/u1/clv", timeout=20)
        ready = httpx.get(f"{base}/readyz", timeout=20)
        assert down.status_code == 503 and down.json()["error"] == "redis_unavailable"
        assert f"127.0.0.1:{port}" in down.json()["detail"]
        assert ready.status_code == 503 and ready.json()["ready"] is False
        assert httpx.get(f"{base}/healthz").status_code == 200  # alive, just not ready
        procs.append(start())  # same port, empty data
        populate(settings, 3)
        deadline = time.monotonic() + 15
        while httpx.get(f"{base}/v1/users/u1/clv", timeout=20).status_code != 200:
            assert time.monotonic() < deadline, "API did not recover after Redis came back"
            time.sleep(0.2)
        assert httpx.get(f"{base}/readyz").status_code == 200
    finally:
        stop(proc)
