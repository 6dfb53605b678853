"""The Grafana dashboard's queries, run by a real Prometheus against the worker's metrics
endpoint (serving.metrics.start_metrics_server): every query parses and returns data."""
from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from serving import metrics as m
from serving.lag import PartitionLag, set_gauges

pytestmark = pytest.mark.integration
DASHBOARD = Path(__file__).resolve().parents[2] / "infra" / "grafana" / "clv.json"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def feed_metrics(i: int) -> None:
    for topic in ("clv.clicks", "clv.orders"):
        m.EVENTS_CONSUMED.labels(topic=topic).inc(100)
        m.EVENTS_PROCESSED.labels(topic=topic).inc(95)
        m.EVENTS_DUPLICATE.labels(topic=topic).inc(5)
    m.DLQ_MESSAGES.labels(reason="invalid_json").inc(2)
    m.RETRIES.labels(dependency="redis").inc()
    for v in (0.0004, 0.002):
        m.FOLD_SECONDS.observe(v)
        m.SCORE_SECONDS.observe(v * 2)
        m.REDIS_SECONDS.observe(v / 2)
    m.BATCH_SIZE.observe(250)
    m.EVENT_TO_SCORE_SECONDS.observe(0.04)
    m.MODEL_REFUSALS.inc()
    m.set_model_version("m-dash")
    m.API_REQUESTS.labels("lookup", "200").inc(50)
    m.API_SECONDS.labels("lookup").observe(0.0004)
    set_gauges("clv-worker", [PartitionLag("clv.clicks", 0, 1000 + 100 * i, 900 + 90 * i, 100 + 10 * i),
                              PartitionLag("clv.orders", 0, 50 + 5 * i, None, 50 + 5 * i)])


def test_every_dashboard_query_runs_in_prometheus(tmp_path):
    prom = shutil.which("prometheus")
    assert prom, "prometheus is not installed: apt-get install prometheus"
    worker = m.start_metrics_server(0, addr="127.0.0.1")
    api = m.start_metrics_server(0, addr="127.0.0.1", registry=m.API_REGISTRY)
    port = free_port()
    (tmp_path / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n  - job_name: clv\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{worker}', '127.0.0.1:{api}']\n")
    proc = subprocess.Popen(
        [prom, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=open(tmp_path / "prom.log", "w"))
    base = f"http://127.0.0.1:{port}/api/v1/query"
    try:
        deadline = time.monotonic() + 60
        i = 0
        scraped = 0
        while scraped < 5:  # enough samples for rate() over 10 s windows
            assert proc.poll() is None, (tmp_path / "prom.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "Prometheus scraped too little in 60 s"
            feed_metrics(i)
            i += 1
            time.sleep(0.5)
            try:
                res = httpx.get(base, params={"query": 'min(count_over_time(up{job="clv"}[1m]))'}, timeout=2).json()
                scraped = int(float(res["data"]["result"][0]["value"][1])) if res["data"]["result"] else 0
            except (httpx.HTTPError, KeyError, ValueError):
                scraped = 0
        dash = json.loads(DASHBOARD.read_text())
        empty = []
        for p in dash["panels"]:
            for t in p.get("targets", []):
                expr = t["expr"].replace("$__rate_interval", "10s").replace("$group", ".*")
                res = httpx.get(base, params={"query": expr}, timeout=5).json()
                assert res["status"] == "success", f"{p['title']}: {expr}: {res}"
                if not res["data"]["result"]:
                    empty.append(f"{p['title']}: {expr}")
        assert empty == [], "queries with no data:\n" + "\n".join(empty)
    finally:
        proc.terminate()
        proc.wait(20)
