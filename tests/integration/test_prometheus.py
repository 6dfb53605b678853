"""What ops would scrape: a real Prometheus (Debian package) scrapes a running `clv worker`
and the consumer lag and throughput are read back through Prometheus' HTTP API."""
from __future__ import annotations

import asyncio
import time

import httpx
import pytest
import redis

from streams.simulate import publish, simulate
from tests.conftest import free_ports
from tests.integration.worker_proc import WorkerProc, wait_caught_up

pytestmark = pytest.mark.integration


def query(prom: str, expr: str) -> list[dict]:
    r = httpx.get(f"{prom}/api/v1/query", params={"query": expr}, timeout=5)
    r.raise_for_status()
    return r.json()["data"]["result"]


def wait_for(prom: str, expr: str, ok, timeout: float = 60.0):
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        last = query(prom, expr)
        if last and ok(last):
            return last
        time.sleep(1.0)
    raise AssertionError(f"Prometheus query {expr!r} never satisfied; last={last}")


def test_prometheus_scrapes_worker_lag_and_throughput(services, tmp_path, engine):
    (port,) = free_ports(1)
    topics = services.unique_topics("prom")
    s = services.settings(**topics, redis_prefix=topics["consumer_group"], data_dir=tmp_path / "var",
                          worker_web_port=port, archive_within_s=0.5, engine=engine)
    events = list(simulate(n_users=100, start="2025-01-01", days=60, seed=3).iter_events())
    asyncio.run(publish(events, s))
    services.env["CLV_INFRA_SCRAPE_TARGETS"] = f"127.0.0.1:{port}"
    services.start("prometheus")
    prom = f"http://127.0.0.1:{services.env['CLV_INFRA_PROM_PORT']}"
    w = WorkerProc(s, tmp_path / "worker.log", metrics=True).start()
    try:
        wait_caught_up(s, len(events), redis.Redis.from_url(s.redis_url), [w])
        group = s.consumer_group
        # per-partition lag under kafka-exporter's names, every partition present and at 0
        lag = wait_for(prom, f'kafka_consumergroup_lag{{consumergroup="{group}"}}',
                       lambda res: len(res) == 16 and all(float(x["value"][1]) == 0 for x in res))
        assert {x["metric"]["topic"] for x in lag} == set(s.event_topics)
        total = wait_for(prom, f'sum(kafka_consumergroup_lag_sum{{consumergroup="{group}"}})',
                         lambda res: float(res[0]["value"][1]) == 0)
        assert float(total[0]["value"][1]) == 0
        # Prometheus keeps its TSDB across restarts and a stop writes no staleness markers, so an
        # earlier test's worker (another port) stays visible for the 5-minute lookback: select ours.
        mine = f'instance="127.0.0.1:{port}"'
        consumed = wait_for(prom, f"sum(clv_events_consumed_total{{{mine}}})",
                            lambda res: float(res[0]["value"][1]) >= len(events))
        assert float(consumed[0]["value"][1]) == len(events)
        ends = query(prom, f"sum(kafka_topic_partition_current_offset{{{mine}}})")
        assert float(ends[0]["value"][1]) == len(events)
        wait_for(prom, f"sum(clv_fold_seconds_count{{{mine}}})", lambda res: float(res[0]["value"][1]) > 0)
        wait_for(prom, f"sum(clv_batch_size_sum{{{mine}}})", lambda res: float(res[0]["value"][1]) == len(events))
    finally:
        w.stop()
        services.stop("prometheus")
