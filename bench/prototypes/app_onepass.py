"""Prototype: streams/app.py with ONE agent that scores and archives each micro-batch.

Differences from ``streams.app`` (everything else is imported from it unchanged):

* no ``clv-archive`` agent: Faust's per-message path (conductor -> stream queue -> take
  buffer -> ack) runs once per record instead of twice;
* the score agent archives ``result.valid_events`` (already decoded by the pipeline) in a
  thread while it publishes the scores, so nothing is decoded twice; the batch is acked only
  when the archive write, Redis and the broker acks are all done (same guarantee as before);
* score messages go out as per-partition record batches (``create_batch``/``send_batch``)
  instead of one ``send()`` per score (``--publish send`` keeps the old way, to compare).
"""
from __future__ import annotations

import asyncio
import time

import orjson

from streams.app import Backoff, Worker, _records
from streams.pipeline import BatchResult, Transient


class OnePassWorker(Worker):
    batched_publish = True
    archive_inline = True  # False: the caller archives result.valid_events itself
    last_result = None

    async def _score_batch(self, records) -> None:
        backoff = Backoff(self.s.retry_backoff_initial_s, self.s.retry_backoff_max_s)
        while True:
            try:
                result = await self.pipeline.process(records)
                break
            except Transient as exc:
                self._retry("redis", exc, backoff.delay)
                await backoff.wait()
        backoff.reset()
        items = result.valid_events
        self.last_result = result
        archive = (asyncio.ensure_future(self._archive_items(items))
                   if items and self.archive_inline else None)
        if self.batched_publish:
            await publish_batched(self, result, backoff)
        else:
            await self._publish(result, backoff)
        if archive is not None:
            await archive
        if self.metrics:
            self.metrics.observe_batch(result, records)

    async def _archive_items(self, items) -> None:
        backoff = Backoff(self.s.retry_backoff_initial_s, self.s.retry_backoff_max_s)
        loop = asyncio.get_running_loop()
        while True:
            try:
                await loop.run_in_executor(None, self.archive.write, items)
                return
            except OSError as exc:
                self._retry("archive", exc, backoff.delay)
                await backoff.wait()


async def publish_batched(worker, result: BatchResult, backoff: Backoff) -> None:
    """DLQ as before (rare); scores packed into one record batch per scores-topic partition."""
    if result.dead:
        scores, result.scores = result.scores, []
        await worker._publish(result, backoff)  # DLQ only
        result.scores = scores
    if not result.scores:
        return
    from aiokafka.partitioner import murmur2

    producer = worker.app.producer
    topic = worker.s.topic_scores
    while True:
        try:
            client = producer._ensure_producer()  # the AIOKafkaProducer behind faust (or the lean adapter)
            parts = await _partitions(client, topic)
            batches: dict = {}
            futs = []
            dumps = orjson.dumps
            for so in result.scores:
                sc = so.score
                key = so.user_id.encode()
                p = parts[(murmur2(key) & 0x7FFFFFFF) % len(parts)]
                body = dumps({"user_id": so.user_id, "clv": sc.clv, "p_repeat": sc.p_repeat,
                              "segment": sc.segment, "model_version": sc.model_version,
                              "scored_at": sc.at, "event_ts": so.event_ts})
                b = batches.get(p)
                if b is None:
                    b = batches[p] = client.create_batch()
                if b.append(key=key, value=body, timestamp=None) is None:
                    futs.append(await client.send_batch(b, topic, partition=p))
                    b = batches[p] = client.create_batch()
                    b.append(key=key, value=body, timestamp=None)
            for p, b in batches.items():
                futs.append(await client.send_batch(b, topic, partition=p))
            await asyncio.gather(*futs)
            result.scores.clear()
            return
        except Exception as exc:  # noqa: BLE001 - broker trouble: retry, never drop
            worker._retry("kafka", exc, backoff.delay)
            await backoff.wait()


_PARTS: dict = {}


async def _partitions(client, topic: str) -> list[int]:
    parts = _PARTS.get(topic)
    if parts is None:
        parts = _PARTS[topic] = sorted(await client.partitions_for(topic))
    return parts


def create_app(settings, scorer=None, metrics=None, publish: str = "batch"):
    import faust

    from streams.kafka import faust_credentials

    (settings.data_dir / "faust").mkdir(parents=True, exist_ok=True)
    app = faust.App(
        settings.consumer_group,
        broker=[f"kafka://{h.strip()}" for h in settings.kafka_bootstrap.split(",")],
        broker_credentials=faust_credentials(settings),
        key_serializer="raw", value_serializer="raw",
        stream_buffer_maxsize=settings.stream_buffer_maxsize,
        stream_ack_cancelled_tasks=False, stream_ack_exceptions=False,
        consumer_auto_offset_reset="earliest",
        producer_acks=-1, producer_linger_ms=5,
        topic_partitions=settings.topic_partitions, topic_disable_leader=True,
        broker_commit_interval=1.0, web_enabled=False, store="memory://",
        datadir=str(settings.data_dir / "faust"),
    )
    topic = app.topic(*settings.event_topics, key_type=bytes, value_type=bytes, allow_empty=True)
    worker = OnePassWorker(settings, app, scorer, metrics)
    worker.batched_publish = publish == "batch"
    app.clv = worker

    @app.agent(topic, name="clv-score", concurrency=1)
    async def score(stream):
        async for events in stream.take_events(settings.batch_max, within=settings.batch_within_s):
            await worker._guarded(worker._score_batch(_records(events)), "score")

    @app.timer(settings.model_poll_s)
    async def reload_model():
        if scorer is not None:
            await asyncio.get_running_loop().run_in_executor(None, scorer.maybe_reload)

    @app.task
    async def on_start():
        await worker.store.write_meta()
        # warm the archive's lazy imports (pyarrow -> pandas) off the first batch
        await asyncio.get_running_loop().run_in_executor(None, _warm_archive)
        if metrics:
            await metrics.start(app)

    return app


def _warm_archive() -> None:
    t = time.perf_counter()
    import pyarrow as pa

    pa.Table.from_pydict({"x": [1]})
    import logging

    logging.getLogger("clv.worker").info("archive imports warmed in %.1fs", time.perf_counter() - t)
