"""What the worker reports to Prometheus (metric objects live in serving/metrics.py)."""
from __future__ import annotations

import asyncio
import logging
import time

log = logging.getLogger("clv.observe")


class WorkerMetrics:
    def __init__(self, settings):
        from serving import metrics as m

        self.s = settings
        self.m = m
        m.prime(settings.event_topics)
        self.monitor = None
        self.port = None

    async def start(self, app) -> None:
        from serving.lag import LagMonitor

        self.port = self.m.start_metrics_server(self.s.worker_web_port)
        log.info("Prometheus metrics on :%d/metrics", self.port)
        self.monitor = LagMonitor(self.s)
        asyncio.ensure_future(self.monitor.run())

    def observe_batch(self, result, records) -> None:
        m = self.m
        consumed: dict[str, int] = {}
        for r in records:
            consumed[r.topic] = consumed.get(r.topic, 0) + 1
        for t, n in consumed.items():
            m.EVENTS_CONSUMED.labels(topic=t).inc(n)
        for t, n in result.by_topic.items():
            m.EVENTS_PROCESSED.labels(topic=t).inc(n)
        if result.n_duplicates:
            # duplicates are not split by topic in the batch result; attribute to the batch's first topic
            m.EVENTS_DUPLICATE.labels(topic=records[0].topic).inc(result.n_duplicates)
        for reason, n in result.dlq_reasons.items():
            m.DLQ_MESSAGES.labels(reason=reason).inc(n)
        tm = result.timings
        m.BATCH_SIZE.observe(len(records))
        if "fold" in tm:
            m.FOLD_SECONDS.observe(tm["fold"])
        if "score" in tm:
            m.SCORE_SECONDS.observe(tm["score"])
        if "redis" in tm:
            m.REDIS_SECONDS.observe(tm["redis"])
        now = time.time()
        for ts in result.score_event_ts:
            m.EVENT_TO_SCORE_SECONDS.observe(max(0.0, now - ts))
        if result.score_failed:
            m.RETRIES.labels(dependency="model").inc()

    def retry(self, dependency: str) -> None:
        self.m.RETRIES.labels(dependency=dependency).inc()

    def model_changed(self, version: str) -> None:
        self.m.set_model_version(version)

    def model_refused(self, version: str) -> None:
        self.m.MODEL_REFUSALS.inc()
