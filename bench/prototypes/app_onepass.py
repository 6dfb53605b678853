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

from streams.app import Backoff, Worker, _records
from streams.archive import warm_up
from streams.engine import BatchWorker


class OnePassWorker(BatchWorker):
    """Scores are batched per partition exactly as the kafka engine does (``BatchWorker``)."""

    batched_publish = True
    archive_inline = True  # False: the caller archives result.valid_events itself
    last_result = None

    async def _score_batch(self, records) -> None:
        result = await self.process(records)
        items = result.valid_events
        self.last_result = result
        archive = (asyncio.ensure_future(self.archive_items(items))
                   if items and self.archive_inline else None)
        backoff = Backoff(self.s.retry_backoff_initial_s, self.s.retry_backoff_max_s)
        if self.batched_publish:
            await BatchWorker._publish(self, result, backoff)
        else:
            await Worker._publish(self, result, backoff)
        if archive is not None:
            await archive
        if self.metrics:
            self.metrics.observe_batch(result, records)

    def _client(self):
        return self.app.producer._ensure_producer()  # the AIOKafkaProducer behind faust


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
        await asyncio.get_running_loop().run_in_executor(None, warm_up)
        if metrics:
            await metrics.start(app)

    return app
