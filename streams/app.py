"""The Faust worker: two agents over the event topics, in one consumer group.

* ``score`` takes micro-batches (``stream.take_events``), runs ``Pipeline.process`` (decode,
  fold, Redis, ONNX), publishes rejects to the DLQ and scores to the scores topic, and only
  then lets Faust ack the batch. Offsets are committed for acked events only, so a commit
  never runs ahead of state that is not yet in Redis.
* ``archive`` takes larger batches and writes them to the Parquet archive before acking.

A Kafka message is committed only when both agents acked it. Nothing in a batch raises
through an agent: bad input goes to the DLQ, a dependency outage is retried with backoff,
and anything else ends the process (crash-only: a restart redelivers from the last commit,
which the dedupe markers make safe) rather than ack work that was not done.
"""
from __future__ import annotations

import asyncio
import gc
import logging
import os
import time
from typing import Sequence

import orjson

from streams.archive import ArchiveWriter, record_batch
from streams.events import Rejection, decode
from streams.kafka import faust_credentials
from streams.pipeline import TOPIC_TYPES, BatchResult, Pipeline, Record, Transient
from streams.store import RedisStore

log = logging.getLogger("clv.worker")
EXIT_UNSAFE = 70  # exit code when a batch could not be finished safely
# A DLQ copy must fit the worker's producer request (Faust: 1,000,000 bytes) with key and
# headers, or its send fails for ever and stalls the partition: the broker itself accepts
# records up to ~1 MiB. Bigger originals are forwarded truncated (header clv-truncated-from).
DLQ_MAX_VALUE = 900 * 1024
DLQ_MAX_KEY = 1024


def _records(events) -> list[Record]:
    out = []
    for e in events:
        m = e.message
        out.append(Record(m.topic, m.partition, m.offset, m.key, m.value, m.timestamp))
    return out


class Backoff:
    def __init__(self, initial: float, maximum: float):
        self.initial, self.maximum = initial, maximum
        self.delay = initial

    async def wait(self) -> float:
        d = self.delay
        await asyncio.sleep(d)
        self.delay = min(self.maximum, self.delay * 2)
        return d

    def reset(self) -> None:
        self.delay = self.initial


class Worker:
    """Everything the agents need; built once per process."""

    def __init__(self, settings, app, scorer, metrics=None):
        self.s = settings
        self.app = app
        self.scorer = scorer
        self.metrics = metrics
        self.store = RedisStore.from_settings(settings)
        self.pipeline = Pipeline(settings, self.store, scorer)
        self.archive = ArchiveWriter(settings.archive_dir)
        self.topic_index = {t: i for i, t in enumerate(settings.event_topics)}

    # ---- scoring agent ---------------------------------------------------------------------
    async def score_batch(self, events) -> None:
        await self._guarded(self._score_batch(_records(events)), "score")

    async def _score_batch(self, records: list[Record]) -> BatchResult:
        result = await self.process(records)
        await self.publish(result, records)
        return result

    async def process(self, records: list[Record]) -> BatchResult:
        """The batch step, retried whole while Redis is unavailable (idempotent)."""
        backoff = Backoff(self.s.retry_backoff_initial_s, self.s.retry_backoff_max_s)
        while True:
            try:
                return await self.pipeline.process(records)
            except Transient as exc:
                self._retry("redis", exc, backoff.delay)
                await backoff.wait()

    async def publish(self, result: BatchResult, records: list[Record]) -> None:
        """DLQ + scores until the broker acked them, then the batch's metrics."""
        await self._publish(result, Backoff(self.s.retry_backoff_initial_s, self.s.retry_backoff_max_s))
        if self.metrics:
            self.metrics.observe_batch(result, records)

    async def _publish(self, result: BatchResult, backoff: Backoff) -> None:
        """DLQ first, then scores; wait for the broker's acks before the batch is acked."""
        while True:
            try:
                futs = []
                send = self.app.producer.send
                for d in result.dead:
                    r = d.record
                    key, value = r.key, r.value or b""
                    headers = [
                        ("clv-reason", d.reason.encode()),
                        ("clv-detail", d.detail.encode()[:2000]),
                        ("clv-source-topic", r.topic.encode()),
                        ("clv-source-partition", str(r.partition).encode()),
                        ("clv-source-offset", str(r.offset).encode()),
                        ("clv-rejected-at", repr(time.time()).encode()),
                    ]
                    if len(value) > DLQ_MAX_VALUE:
                        headers.append(("clv-truncated-from", str(len(value)).encode()))
                        value = value[:DLQ_MAX_VALUE]
                    if key is not None and len(key) > DLQ_MAX_KEY:
                        headers.append(("clv-key-truncated-from", str(len(key)).encode()))
                        key = key[:DLQ_MAX_KEY]
                    futs.append(await send(self.s.topic_dlq, key, value, None, None, headers))
                for so in result.scores:
                    sc = so.score
                    body = orjson.dumps({
                        "user_id": so.user_id, "clv": sc.clv, "p_repeat": sc.p_repeat,
                        "segment": sc.segment, "model_version": sc.model_version,
                        "scored_at": sc.at, "event_ts": so.event_ts,
                    })
                    futs.append(await send(self.s.topic_scores, so.user_id.encode(), body, None, None, None))
                if futs:
                    await self._acked(asyncio.gather(*futs))
                result.dead.clear()
                result.scores.clear()
                return
            except Exception as exc:  # noqa: BLE001 - broker trouble: retry, never drop
                self._retry("kafka", exc, backoff.delay)
                await backoff.wait()

    async def _acked(self, acks: asyncio.Future) -> None:
        """Wait for the broker's acks. The Kafka client retries a broker outage by itself
        (nothing raises); every ``retry_backoff_max_s`` without acks is logged and counted as a
        kafka retry, so an outage shows in ``clv_retries_total`` like a Redis one."""
        patience = max(1.0, self.s.retry_backoff_max_s)
        waited = 0.0
        while True:
            try:
                await asyncio.wait_for(asyncio.shield(acks), timeout=patience)
                return
            except asyncio.TimeoutError:
                waited += patience
                self._retry("kafka", TimeoutError(f"no broker ack for {waited:.0f}s, the client keeps "
                                                  "retrying"), patience)

    # ---- archive agent -----------------------------------------------------------------------
    async def archive_batch(self, events) -> None:
        await self._guarded(self._archive_batch(_records(events)), "archive")

    async def _archive_batch(self, records: Sequence[Record]) -> None:
        now = time.time()
        items = []
        limits = self.pipeline.limits
        for r in records:
            t = self.topic_index.get(r.topic)
            if t is None:
                continue
            ev = decode(r.value, now=now, key=r.key, expect_type=TOPIC_TYPES[t], limits=limits)
            if not isinstance(ev, Rejection):
                items.append((r, ev))
        if items:
            await self.archive_items(items)

    async def archive_items(self, items: Sequence[tuple]) -> None:
        """Write decoded ``(record, event)`` pairs to the archive: see ``archive_batches``."""
        await self.archive_batches([record_batch(items)])

    async def archive_batches(self, batches: Sequence) -> None:
        """Write ``streams.archive.record_batch`` batches to the archive (in a thread), retrying
        a failing disk with backoff: the caller acks/commits only after this returns."""
        backoff = Backoff(self.s.retry_backoff_initial_s, self.s.retry_backoff_max_s)
        loop = asyncio.get_running_loop()
        while True:
            try:
                await loop.run_in_executor(None, self.archive.write_batches, batches)
                return
            except OSError as exc:  # disk full / read-only: retry, never ack unarchived events
                self._retry("archive", exc, backoff.delay)
                await backoff.wait()

    # ---- model ---------------------------------------------------------------------------------
    async def reload_model(self) -> None:
        """Check the registry for a new champion (every CLV_MODEL_POLL_S). A model may only score
        the review embeddings stored in Redis if it was trained with the encoder that built them
        (``clv:v1:meta`` field ``encoder_id``; the first text model to score claims it)."""
        scorer = self.scorer
        if scorer is None:
            return
        try:
            space = await self.store.embedding_space()
            cur = scorer.current
            if space is None and cur is not None and cur.encoder_id != "none":
                space = await self.store.claim_embedding_space(cur.encoder_id)
        except Exception as exc:  # noqa: BLE001 - Redis away: check again at the next poll
            log.warning("model check skipped: cannot read the embedding space from Redis (%s: %s)",
                        type(exc).__name__, exc)
            return
        scorer.hold_if_incompatible(space)
        await asyncio.get_running_loop().run_in_executor(None, scorer.maybe_reload, space)

    # ---- safety --------------------------------------------------------------------------------
    async def _guarded(self, coro, what: str) -> None:
        """Run a batch so that neither cancellation nor a bug acks unfinished work.

        Faust acks a taken batch when the agent moves on or its generator closes. If we are
        cancelled (shutdown) we finish the batch first (bounded wait); if that is impossible,
        or an unexpected error escapes, the process exits before anything is acked.
        """
        task = asyncio.ensure_future(coro)
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            try:
                await asyncio.wait_for(asyncio.shield(task), timeout=30)
            except BaseException:  # noqa: BLE001
                log.critical("shutdown while a %s batch could not finish; exiting without ack", what)
                os._exit(EXIT_UNSAFE)
            raise
        except BaseException:  # noqa: BLE001
            log.critical("unexpected error in a %s batch; exiting without ack (a restart redelivers)",
                         what, exc_info=True)
            os._exit(EXIT_UNSAFE)

    def _retry(self, dependency: str, exc: Exception, delay: float) -> None:
        log.warning("%s unavailable (%s: %s); retrying in %.1fs", dependency, type(exc).__name__, exc, delay)
        if self.metrics:
            self.metrics.retry(dependency)


def settle_heap() -> None:
    """Move everything alive after start-up (modules, the model, pandas/pyarrow, ~1M objects)
    into the GC's permanent generation: a full collection otherwise walks them all, 60-300 ms
    every few seconds under load (measured), which is the event -> score tail."""
    gc.collect()
    gc.freeze()


def create_app(settings, scorer=None, metrics=None):
    """Build the Faust app and its agents for these settings."""
    import faust

    (settings.data_dir / "faust").mkdir(parents=True, exist_ok=True)
    app = faust.App(
        settings.consumer_group,
        broker=[f"kafka://{h.strip()}" for h in settings.kafka_bootstrap.split(",")],
        broker_credentials=faust_credentials(settings),
        key_serializer="raw",
        value_serializer="raw",
        stream_buffer_maxsize=settings.stream_buffer_maxsize,
        stream_ack_cancelled_tasks=False,
        stream_ack_exceptions=False,
        # Two agents read each record: on a rebalance or stop Faust clears the agents' queues,
        # so a record one agent already took stays unacked by the other for ever, and
        # "wait for streams to be empty" hangs (a rebalance then stalls until the group evicts
        # the worker; SIGTERM never finishes). Unacked records are simply redelivered, which
        # the CAS writes and the offset watermarks make safe, so do not wait for them.
        stream_wait_empty=False,
        consumer_auto_offset_reset="earliest",
        producer_acks=-1,
        producer_linger_ms=5,
        topic_partitions=settings.topic_partitions,
        topic_disable_leader=True,
        broker_commit_interval=1.0,
        broker_session_timeout=settings.kafka_session_timeout_s,
        broker_heartbeat_interval=min(3.0, settings.kafka_session_timeout_s / 4),
        web_enabled=False,
        store="memory://",
        datadir=str(settings.data_dir / "faust"),
    )
    topic = app.topic(*settings.event_topics, key_type=bytes, value_type=bytes, allow_empty=True)
    worker = Worker(settings, app, scorer, metrics)
    app.clv = worker  # for tests and the CLI

    @app.agent(topic, name="clv-score", concurrency=1)
    async def score(stream):
        async for events in stream.take_events(settings.batch_max, within=settings.batch_within_s):
            await worker.score_batch(events)

    @app.agent(topic, name="clv-archive", concurrency=1)
    async def archive(stream):
        async for events in stream.take_events(settings.archive_batch_max, within=settings.archive_within_s):
            await worker.archive_batch(events)

    @app.timer(settings.model_poll_s)
    async def reload_model():
        await worker.reload_model()

    @app.task
    async def on_start():
        await worker.store.write_meta()
        await worker.reload_model()
        if metrics:
            await metrics.start(app)
        settle_heap()

    return app
