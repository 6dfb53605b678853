"""Metric names (a contract with the Grafana dashboard), lag arithmetic, the ops page's
histogram buckets and `clv lag`'s catch-up estimate."""
from __future__ import annotations

import json
import re
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from serving import metrics as m
from serving.cli import catch_up_s, fmt_catch_up
from serving.lag import PartitionLag, compute_lag, set_gauges
from serving.ops_page import histogram
from streams.keys import HIST_EDGES, hist_bucket

DASHBOARD = Path(__file__).resolve().parents[2] / "infra" / "grafana" / "clv.json"
REQUIRED = {
    "clv_events_consumed_total", "clv_events_processed_total", "clv_events_duplicate_total",
    "clv_dlq_messages_total", "clv_fold_seconds", "clv_score_seconds", "clv_redis_seconds",
    "clv_batch_size", "clv_event_to_score_seconds", "clv_retries_total", "clv_model_info",
    "clv_model_refusals_total", "kafka_consumergroup_lag", "kafka_consumergroup_lag_sum",
    "kafka_topic_partition_current_offset", "kafka_consumergroup_current_offset",
    "clv_api_requests_total", "clv_api_request_seconds",
}


def base_names() -> set[str]:
    """Metric family names as PromQL sees them (counters with _total, info with _info), of
    the worker's registry and the API's."""
    out = set()
    for fam in [*REGISTRY.collect(), *m.API_REGISTRY.collect()]:
        if fam.type == "counter":
            out.add(fam.name + "_total")
        elif fam.type == "info":
            out.add(fam.name + "_info")
        else:
            out.add(fam.name)
    return out


def dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]


def test_the_contracted_metric_names_exist():
    m.prime(["clicks"])
    assert REQUIRED <= base_names()


def test_every_dashboard_query_uses_defined_metrics_and_covers_them_all():
    defined = base_names()
    used = set()
    for expr in dashboard_exprs():
        for name in re.findall(r"\b((?:clv|kafka)_[a-z_]+)\b", expr):
            used.add(re.sub(r"_(bucket|sum|count)$", "", name) if name not in defined else name)
    assert used - defined == set(), "dashboard queries metrics that serving/metrics.py lacks"
    assert REQUIRED - used == set(), "metrics missing from the dashboard"


def test_metrics_server_exposes_the_names_and_labels():
    """Names and labels as scraped; counters are process-wide, so check deltas."""
    from prometheus_client import REGISTRY

    def val(name, **labels):
        return REGISTRY.get_sample_value(name, labels) or 0.0

    port = m.start_metrics_server(0, addr="127.0.0.1")
    before = {
        "dlq": val("clv_dlq_messages_total", reason="invalid_json"),
        "fold5": val("clv_fold_seconds_bucket", le="0.0005"),
        "fold1": val("clv_fold_seconds_bucket", le="0.0001"),
        "e2e": val("clv_event_to_score_seconds_bucket", le="0.025"),
        "retry": val("clv_retries_total", dependency="redis"),
    }
    m.EVENTS_CONSUMED.labels(topic="metrics-test.orders").inc(3)
    m.DLQ_MESSAGES.labels(reason="invalid_json").inc()
    m.FOLD_SECONDS.observe(0.0003)
    m.EVENT_TO_SCORE_SECONDS.observe(0.02)
    m.RETRIES.labels(dependency="redis").inc()
    m.set_model_version("m-2026")
    set_gauges("g1", [PartitionLag("clv.orders", 0, 10, 4, 6), PartitionLag("clv.orders", 1, 5, None, 5)])
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    for line in (
        'clv_events_consumed_total{topic="metrics-test.orders"} 3.0',
        f'clv_dlq_messages_total{{reason="invalid_json"}} {before["dlq"] + 1}',
        f'clv_fold_seconds_bucket{{le="0.0005"}} {before["fold5"] + 1}',
        f'clv_fold_seconds_bucket{{le="0.0001"}} {before["fold1"]}',
        f'clv_event_to_score_seconds_bucket{{le="0.025"}} {before["e2e"] + 1}',
        f'clv_retries_total{{dependency="redis"}} {before["retry"] + 1}',
        'clv_model_info{version="m-2026"} 1.0',
        'kafka_consumergroup_lag{consumergroup="g1",partition="0",topic="clv.orders"} 6.0',
        'kafka_consumergroup_lag_sum{consumergroup="g1",topic="clv.orders"} 11.0',
        'kafka_topic_partition_current_offset{partition="1",topic="clv.orders"} 5.0',
        'kafka_consumergroup_current_offset{consumergroup="g1",partition="1",topic="clv.orders"} -1.0',
    ):
        assert line in text, line
    m.set_model_version("m-2027")  # a reload replaces the label, never adds a second series
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert 'clv_model_info{version="m-2027"} 1.0' in text and "m-2026" not in text


def test_metrics_server_port_taken_says_what_to_do():
    port = m.start_metrics_server(0, addr="127.0.0.1")
    with pytest.raises(OSError, match="CLV_WORKER_WEB_PORT"):
        m.start_metrics_server(port, addr="127.0.0.1")


@pytest.mark.parametrize("end, beginning, committed, lag", [
    (100, 0, 40, 60),
    (100, 0, 100, 0),
    (100, 0, None, 100),   # never committed: everything retained
    (100, 30, None, 70),   # ... which starts at the log start offset
    (100, 30, 10, 70),     # committed offset already deleted by retention
    (100, 0, -1, 100),     # -1 from the broker means none
    (100, 0, 120, 0),      # never negative
])
def test_lag_semantics(end, beginning, committed, lag):
    assert compute_lag(end, beginning, committed) == lag


def test_hist_buckets_are_1_2_5_and_the_page_shows_up_to_the_highest_user():
    assert HIST_EDGES[:7] == (1, 2, 5, 10, 20, 50, 100) and HIST_EDGES[-1] == 5e12
    assert [hist_bucket(x) for x in (0, 0.99, 1, 1.99, 2, 4.8e6, 5e12, float("nan"))] == [0, 0, 1, 1, 2, 20, 39, 0]
    users, buckets = histogram({b"0": b"2", b"3": b"1", b"20": b"4", b"25": b"0"})
    assert users == 7 and len(buckets) == 21
    assert buckets[0] == {"lo": 0.0, "hi": 1.0, "count": 2} and buckets[1]["count"] == 0
    assert buckets[20] == {"lo": 2e6, "hi": 5e6, "count": 4}
    assert histogram({b"39": b"1"})[1][-1] == {"lo": 5e12, "hi": None, "count": 1}
    assert histogram({}) == (0, [])


def test_catch_up_estimate():
    assert catch_up_s(0, 0, 0) == 0 and fmt_catch_up(0.0, False) == "caught up"
    assert catch_up_s(1000, 150, 50) == pytest.approx(10)
    assert catch_up_s(1000, 50, 50) is None
    assert fmt_catch_up(None, True) == "never (not draining)"
    assert fmt_catch_up(None, False) == "never (not consuming)"
    assert fmt_catch_up(600, True) == "10 min" and fmt_catch_up(30, True) == "30 s"
