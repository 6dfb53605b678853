"""The worker's Prometheus metrics, defined once (names are a contract: the Grafana
dashboard in infra/grafana/clv.json and docs/ops.md use them).

The worker calls ``start_metrics_server(settings.worker_web_port)`` once, runs a
``serving.lag.LagMonitor`` for the consumer-lag gauges, and updates the objects below::

    EVENTS_CONSUMED.labels(topic=t).inc(n)
    with FOLD_SECONDS.time(): ...            # once per micro-batch
    MODEL_INFO.info({"version": v})          # on every model (re)load

Latency histograms are per batch (buckets 0.1 ms .. 1 s); ``EVENT_TO_SCORE_SECONDS`` is per
event (event time -> score written, 1 ms .. 60 s). Lag gauges follow kafka-exporter's names
so existing Kafka dashboards and alerts work unchanged.
"""
from __future__ import annotations

from prometheus_client import (
    GC_COLLECTOR, PLATFORM_COLLECTOR, PROCESS_COLLECTOR, REGISTRY, CollectorRegistry, Counter, Gauge,
    Histogram, Info, start_http_server,
)

# per-batch work measured in milliseconds: 0.1 ms .. 1 s
WORK_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                0.5, 1.0)
BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)
# event time -> score written: 1 ms .. 60 s
E2E_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
               30.0, 60.0)
DEPENDENCIES = ("redis", "kafka", "model")

EVENTS_CONSUMED = Counter(
    "clv_events_consumed_total", "Records read from an event topic (valid or not).", ["topic"])
EVENTS_PROCESSED = Counter(
    "clv_events_processed_total", "Events folded into user state (after dedupe).", ["topic"])
EVENTS_DUPLICATE = Counter(
    "clv_events_duplicate_total", "Events skipped as duplicates (event-id ring or offset "
    "watermark).", ["topic"])
DLQ_MESSAGES = Counter(
    "clv_dlq_messages_total", "Records sent to the dead-letter topic, by rejection reason.",
    ["reason"])
FOLD_SECONDS = Histogram(
    "clv_fold_seconds", "Time to fold one micro-batch (pure Python).", buckets=WORK_BUCKETS)
SCORE_SECONDS = Histogram(
    "clv_score_seconds", "Time to score one micro-batch (ONNX).", buckets=WORK_BUCKETS)
REDIS_SECONDS = Histogram(
    "clv_redis_seconds", "Time of one Redis round trip for a micro-batch (load or save).",
    buckets=WORK_BUCKETS)
BATCH_SIZE = Histogram(
    "clv_batch_size", "Events per micro-batch.", buckets=BATCH_BUCKETS)
EVENT_TO_SCORE_SECONDS = Histogram(
    "clv_event_to_score_seconds", "Event time to score written to Redis, per event.",
    buckets=E2E_BUCKETS)
RETRIES = Counter(
    "clv_retries_total", "Retries of a failed call, by dependency (redis, kafka, model).",
    ["dependency"])
MODEL_INFO = Info("clv_model", "The model version being served (label version).")
MODEL_INFO.info({"version": "none"})  # until a model is loaded: never a series without the label
MODEL_REFUSALS = Counter(
    "clv_model_refusals_total", "Candidate models refused (contract mismatch, load error).")

# kafka-exporter's conventional names, set by serving.lag.LagMonitor
CONSUMERGROUP_LAG = Gauge(
    "kafka_consumergroup_lag", "Log end offset minus the group's committed offset.",
    ["consumergroup", "topic", "partition"])
CONSUMERGROUP_LAG_SUM = Gauge(
    "kafka_consumergroup_lag_sum", "Sum of kafka_consumergroup_lag over a topic's partitions.",
    ["consumergroup", "topic"])
TOPIC_PARTITION_CURRENT_OFFSET = Gauge(
    "kafka_topic_partition_current_offset", "Log end offset of a partition.",
    ["topic", "partition"])
CONSUMERGROUP_CURRENT_OFFSET = Gauge(
    "kafka_consumergroup_current_offset",
    "The group's committed offset of a partition (-1: nothing committed yet).",
    ["consumergroup", "topic", "partition"])
LAG_POLL_ERRORS = Counter(
    "clv_lag_poll_errors_total", "Failed lag polls (Kafka unreachable, timeouts).")
LAG_POLL_TIMESTAMP = Gauge(
    "clv_lag_poll_timestamp_seconds", "When the lag gauges were last set (epoch seconds).")

# ---- the lookup API's own metrics (GET /metrics of `clv serve`), in their own registry so the
# API never exposes the worker's (zero) series --------------------------------------------
API_REGISTRY = CollectorRegistry(auto_describe=True)
for _c in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
    API_REGISTRY.register(_c)
API_REQUESTS = Counter(
    "clv_api_requests_total", "API requests by route and HTTP status.", ["route", "status"],
    registry=API_REGISTRY)
API_SECONDS = Histogram(
    "clv_api_request_seconds", "API handler time by route (Redis round trip included).",
    ["route"], buckets=WORK_BUCKETS, registry=API_REGISTRY)


def prime(topics: tuple[str, ...] | list[str]) -> None:
    """Create the per-topic series at 0 so rate() and dashboards show them before traffic."""
    for t in topics:
        for m in (EVENTS_CONSUMED, EVENTS_PROCESSED, EVENTS_DUPLICATE):
            m.labels(topic=t)
    for d in DEPENDENCIES:
        RETRIES.labels(dependency=d)


def set_model_version(version: str | None) -> None:
    MODEL_INFO.info({"version": version or "none"})


def start_metrics_server(port: int, addr: str = "0.0.0.0", registry=REGISTRY) -> int:
    """Serve ``/metrics`` from a daemon thread; returns the bound port (pass 0 for a free
    one). Raises OSError with the fix when the port is taken."""
    try:
        server, _thread = start_http_server(port, addr=addr, registry=registry)
    except OSError as exc:
        raise OSError(
            exc.errno, f"cannot serve Prometheus metrics on {addr}:{port} ({exc.strerror}); "
            "another process holds the port: stop it or set CLV_WORKER_WEB_PORT to a free one"
        ) from exc
    return server.server_address[1]
