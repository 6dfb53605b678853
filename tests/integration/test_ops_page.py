"""The ops page as a person sees it: real Redis and Kafka with known contents, the API in
its own process (`clv serve`), the page rendered by headless Chromium, the DOM checked
against Redis and Kafka. A screenshot is saved too (path printed; set CLV_OPS_SCREENSHOT
to keep it somewhere)."""
from __future__ import annotations

import asyncio
import math
import os
import shutil
import subprocess
import time
from html.parser import HTMLParser
from pathlib import Path

import pytest
import redis

from serving.lag import lag_snapshot
from serving.registry import Registry
from streams.fold import new_state
from streams.keys import Keys
from streams.store import RedisStore, Score, Update
from tests.integration.ops_helpers import commit, create_topics, produce, serve, stop, unique

pytestmark = pytest.mark.integration

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
TOKEN = "ops-page-token"
N_USERS = 30
DLQ = {"invalid_json": 7, "bad_field": 3, "too_large": 1}


class Dom(HTMLParser):
    """Elements carrying data-testid: (testid, attrs, text) in document order."""

    def __init__(self, html: str):
        super().__init__()
        self.items: list[tuple[str, dict, str]] = []
        self._open: list[tuple[str, int | None]] = []
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        idx = None
        if "data-testid" in a:
            idx = len(self.items)
            self.items.append((a["data-testid"], a, ""))
        if tag not in ("br", "img", "input", "meta", "link", "hr", "polyline", "line"):
            self._open.append((tag, idx))

    def handle_endtag(self, tag):
        while self._open:
            t, _ = self._open.pop()
            if t == tag:
                break

    def handle_data(self, data):
        for _, idx in self._open:
            if idx is not None:
                tid, a, text = self.items[idx]
                self.items[idx] = (tid, a, text + data)

    def all(self, testid: str) -> list[tuple[dict, str]]:
        return [(a, t.strip()) for tid, a, t in self.items if tid == testid]

    def one(self, testid: str) -> tuple[dict, str]:
        found = self.all(testid)
        assert len(found) == 1, f"{len(found)} elements with data-testid={testid}"
        return found[0]


def chromium(url: str, tmp: Path, *extra: str) -> str:
    assert Path(CHROMIUM).exists(), "chromium is not installed: apt-get install chromium"
    profile = tmp / f"profile-{time.monotonic_ns()}"
    out = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
         f"--user-data-dir={profile}", "--virtual-time-budget=5000", *extra, url],
        capture_output=True, text=True, timeout=90)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


@pytest.fixture(scope="module")
def world(services, tmp_path_factory):
    """Kafka: clicks topic (2 partitions: 7 and 3 records, group committed 2 on p0) and an
    orders topic (1 partition, 4 records, committed 4). Redis: 30 scored users, worker stats
    with DLQ reasons. Registry: a champion."""
    tmp = tmp_path_factory.mktemp("ops")
    clicks, orders, group = unique("ops-clicks"), unique("ops-orders"), unique("ops-grp")
    bs = services.kafka_bootstrap

    async def kafka():
        await create_topics(bs, {clicks: 2, orders: 1})
        await produce(bs, {(clicks, 0): 7, (clicks, 1): 3, (orders, 0): 4})
        await commit(bs, group, {(clicks, 0): 2, (orders, 0): 4})

    asyncio.run(kafka())

    data_dir = tmp / "data"
    reg = Registry(data_dir / "models")
    for v in ("m-old", "m-champ"):
        reg.path(v).mkdir(parents=True)
        (reg.path(v) / "head.onnx").write_bytes(b"not a real model: the page only reads CHAMPION")
    reg.set_champion("m-champ", "test")

    settings = services.settings(
        topic_clicks=clicks, topic_orders=orders, topic_reviews=unique("ops-absent"),
        topic_profiles=unique("ops-absent"), consumer_group=group,
        redis_prefix=f"ops{unique('p')}", data_dir=data_dir, api_token=TOKEN,
        top_keep=25)  # CLV_TOP_KEEP below N_USERS: the top set gets a floor
    now = time.time()

    async def fill():
        store = RedisStore.from_settings(settings)
        await store.write_meta()
        ups = []
        for i in range(N_USERS):
            clv = round(1.7 ** i, 2)  # 1 .. ~4.8e6: spans many log buckets
            mv = "m-champ" if i % 2 else "m-old"
            ups.append(Update(f"user<{i}>", new_state(), 0,  # '<' checks HTML escaping
                              Score(clv, 0.05 + i / 40, "vip" if i > 25 else "mid", mv, now - 100 + i)))
        await store.save_many(ups, stats={"events": 1234, "processed": 1200, "duplicates": 9,
                                          "dlq": sum(DLQ.values()),
                                          **{f"dlq:{k}": v for k, v in DLQ.items()}})
        await store.r.hset(store.keys.stats, "ts_last", now)
        await store.r.aclose()

    asyncio.run(fill())
    return settings, tmp


@pytest.fixture(scope="module")
def api(world):
    settings, tmp = world
    proc, base = serve(settings, tmp / "api.log")
    yield base
    stop(proc)


def test_ops_page_shows_what_redis_and_kafka_hold(world, api):
    settings, tmp = world
    dom = Dom(chromium(f"{api}/ops#token={TOKEN}", tmp, "--dump-dom"))
    keys = Keys(settings.redis_prefix)
    r = redis.Redis.from_url(settings.redis_url)

    # it refreshed itself (polls every 2 s; 5 s of virtual time)
    assert int(dom.one("poll-count")[0]["data-value"]) >= 2
    assert dom.one("status")[1] == "live"
    assert dom.one("auth-error")[1] == ""

    # lag per partition, as Kafka has it
    lags = asyncio.run(lag_snapshot(settings))
    rows = dom.all("lag-row")
    assert [(a["data-topic"], int(a["data-partition"])) for a, _ in rows] == \
        [(p.topic, p.partition) for p in lags]
    ends = [int(a["data-value"]) for a, _ in dom.all("lag-end")]
    committed = [a["data-value"] for a, _ in dom.all("lag-committed")]
    lag_vals = [int(a["data-value"]) for a, _ in dom.all("lag-lag")]
    assert ends == [p.end for p in lags] == [7, 3, 4]
    assert committed == ["2", "", "4"]
    assert lag_vals == [p.lag for p in lags] == [5, 3, 0]
    assert dom.one("lag-total")[1] == "8"
    assert "not in Kafka yet" in dom.one("lag-error")[1]  # the two absent topics are named
    assert settings.topic_reviews in dom.one("lag-error")[1]

    # top 20 users and their CLV: the 20 highest of all user hashes, as the top zset has them
    # (ids shown as text, not HTML)
    clvs = {f"user<{i}>": float(r.hget(keys.user(f"user<{i}>"), "clv")) for i in range(N_USERS)}
    truth = sorted(clvs.items(), key=lambda kv: -kv[1])[:20]
    top = [(u.decode(), s) for u, s in r.zrevrange(keys.top, 0, 19, withscores=True)]
    shown = [(t, float(a["data-value"])) for (_, t), (a, _) in zip(dom.all("top-user"), dom.all("top-clv"))]
    assert len(shown) == 20
    assert shown == [(u, pytest.approx(s)) for u, s in top] == [(u, pytest.approx(s)) for u, s in truth]
    assert shown[0][0] == f"user<{N_USERS - 1}>"
    assert dom.all("top-clv")[0][1] == f"{round(1.7 ** (N_USERS - 1), 2):,.2f}"
    # which users the ranking covers: the CLV_TOP_KEEP highest, above the floor
    floor = float(r.get(keys.top_floor))
    assert r.zcard(keys.top) == 25 and floor == pytest.approx(round(1.7 ** (N_USERS - 26), 2))
    assert dom.one("top-tracked")[1] == (f"ranked among the 25 users above CLV {floor:,.2f} "
                                         "(the top set, CLV_TOP_KEEP); `clv rescore` rebuilds it")

    # the model: registry champion, and the version the worker wrote last (newest 'at')
    assert dom.one("model-champion")[1] == "m-champ"
    assert dom.one("model-latest")[1] == "m-champ"  # user 29 (odd) was scored last

    # worker counters and DLQ reasons
    assert dom.one("stat-events")[0]["data-value"] == "1234"
    assert dom.one("stat-processed")[1] == "1,200"
    assert dom.one("stat-dlq")[0]["data-value"] == str(sum(DLQ.values()))
    dlq = {a["data-reason"]: int(c["data-value"]) for (a, _), (c, _) in
           zip(dom.all("dlq-row"), dom.all("dlq-count"))}
    assert dlq == DLQ
    assert [a["data-reason"] for a, _ in dom.all("dlq-row")] == ["invalid_json", "bad_field", "too_large"]

    # histogram: every user in exactly one bucket; each bar counts the user hashes whose clv is
    # in its range; bars run up to the highest user's bucket
    bars = dom.all("hist-bar")
    assert sum(int(a["data-count"]) for a, _ in bars) == N_USERS
    for a, _ in bars:
        lo = -math.inf if float(a["data-lo"]) == 0 else float(a["data-lo"])
        hi = float(a["data-hi"]) if a["data-hi"] else math.inf
        assert int(a["data-count"]) == sum(lo <= c < hi for c in clvs.values()), (lo, hi)
    assert int(bars[-1][0]["data-count"]) > 0 and len(bars) > 10


def test_ops_page_without_the_token_says_how_to_get_in(world, api):
    settings, tmp = world
    dom = Dom(chromium(f"{api}/ops", tmp, "--dump-dom"))
    assert "#token=" in dom.one("auth-error")[1]
    assert dom.all("top-row") == [] and dom.one("status")[1] == "unauthorized"


def test_ops_page_screenshot(world, api):
    settings, tmp = world
    shot = Path(os.environ.get("CLV_OPS_SCREENSHOT") or tmp / "ops.png")
    chromium(f"{api}/ops#token={TOKEN}", tmp, f"--screenshot={shot}", "--window-size=1280,900",
             "--hide-scrollbars")
    assert shot.exists() and shot.stat().st_size > 20_000, "screenshot missing or blank"
    print(f"ops page screenshot: {shot}")


def test_ops_page_computes_throughput_from_successive_polls(world, api):
    """The worker's counters move while the page is open: it shows a rate > 0."""
    settings, tmp = world
    import threading

    keys = Keys(settings.redis_prefix)
    r = redis.Redis.from_url(settings.redis_url)
    stop_flag = threading.Event()

    def worker_counts():
        while not stop_flag.is_set():
            r.hincrby(keys.stats, "events", 5)
            r.hincrby(keys.stats, "processed", 5)
            time.sleep(0.01)

    t = threading.Thread(target=worker_counts)
    t.start()
    try:
        dom = Dom(chromium(f"{api}/ops#token={TOKEN}", tmp, "--dump-dom"))
    finally:
        stop_flag.set()
        t.join()
    assert int(dom.one("poll-count")[0]["data-value"]) >= 2
    assert float(dom.one("stat-rate")[0]["data-value"]) > 0
    assert int(dom.one("stat-events")[0]["data-value"]) > 1234
