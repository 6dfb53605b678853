"""The scoring worker on one aiokafka consumer-group loop (``CLV_ENGINE=kafka``).

Same batch step (``streams.pipeline.Pipeline`` via ``streams.app.Worker``), same settings, same
Redis, archive, DLQ and scores topics and the same guarantee as the Faust agents, without
Faust's per-message path (conductor, stream queues, take buffers, per-message acks: ~140 CPU µs
per event, paid once per agent). One fetch is one micro-batch::

    getmany(max_records=CLV_BATCH_MAX, timeout=CLV_BATCH_WITHIN_S)
      -> Pipeline.process (decode, embed, Redis load, fold, score, Redis CAS save)
      -> DLQ (one send per reject) + scores (one record batch per scores partition), broker acks
         (in a task: the next batch is scored meanwhile; one publish in flight, in order)
      -> the batch's decoded events join the archive buffer (as an Arrow batch)
      -> archive write (thread; CLV_ARCHIVE_BATCH_MAX rows or CLV_ARCHIVE_WITHIN_S seconds)
      -> commit the archived batches' offsets

Offsets are committed only after Redis, the broker acks and the archive file are durable, so a
commit never runs ahead of anything the batch owes. A rebalance revokes partitions between
batches: ``on_partitions_revoked`` waits for the batch in flight, writes the archive buffer and
commits before the partitions move. Redelivery after a crash is safe through the fold's dedupe
markers and the archive reader's dedupe, exactly as with the Faust worker. Crash-only: an
unexpected error ends the process (exit 70) with nothing committed for unfinished work.
"""
from __future__ import annotations

import asyncio
import logging
import os
import time

import orjson
from aiokafka import ConsumerRebalanceListener

from streams.app import EXIT_UNSAFE, Backoff, Worker, settle_heap
from streams.archive import record_batch
from streams.pipeline import BatchResult, Record

log = logging.getLogger("clv.engine")


class _ProducerPort:
    """``Worker`` sends through ``app.producer.send(topic, key, value, partition, timestamp,
    headers)`` (Faust's signature); this adapts a plain ``AIOKafkaProducer`` to it."""

    def __init__(self, producer):
        self.client = producer

    async def send(self, topic, key, value, partition, timestamp, headers):
        return await self.client.send(topic, value=value, key=key, partition=partition,
                                      timestamp_ms=None if timestamp is None else int(timestamp * 1000),
                                      headers=headers)


class _App:
    def __init__(self, producer):
        self.producer = _ProducerPort(producer)


class BatchWorker(Worker):
    """``Worker`` whose scores go out as one record batch per scores-topic partition (one
    ``send()`` per score costs ~10 µs in the client's accumulator)."""

    _parts: list[int] | None = None

    def _client(self):
        """The ``AIOKafkaProducer`` that scores are batched into."""
        return self.app.producer.client

    async def _publish(self, result: BatchResult, backoff: Backoff) -> None:
        if result.dead:  # rare: the per-message path, scores held back
            scores, result.scores = result.scores, []
            await super()._publish(result, backoff)
            result.scores = scores
        if result.scores:
            await self._publish_scores(result, backoff)

    async def _publish_scores(self, result: BatchResult, backoff: Backoff) -> None:
        from aiokafka.partitioner import murmur2

        client = self._client()
        topic = self.s.topic_scores
        dumps = orjson.dumps
        while True:
            try:
                if self._parts is None:
                    self._parts = sorted(await client.partitions_for(topic))
                parts = self._parts
                batches: dict = {}
                futs = []
                for so in result.scores:
                    sc = so.score
                    key = so.user_id.encode()
                    # Kafka's default partitioner, so a user's scores keep one partition
                    p = parts[(murmur2(key) & 0x7FFFFFFF) % len(parts)]
                    body = dumps({"user_id": so.user_id, "clv": sc.clv, "p_repeat": sc.p_repeat,
                                  "segment": sc.segment, "model_version": sc.model_version,
                                  "scored_at": sc.at, "event_ts": so.event_ts})
                    b = batches.get(p)
                    if b is None:
                        b = batches[p] = client.create_batch()
                    if b.append(key=key, value=body, timestamp=None) is None:  # batch full
                        futs.append(await client.send_batch(b, topic, partition=p))
                        b = batches[p] = client.create_batch()
                        b.append(key=key, value=body, timestamp=None)
                for p, b in batches.items():
                    b.close()  # complete: a closed batch goes out at once, not after linger_ms
                    futs.append(await client.send_batch(b, topic, partition=p))
                await self._acked(asyncio.gather(*futs))
                result.scores.clear()
                return
            except Exception as exc:  # noqa: BLE001 - broker trouble: retry, never drop
                self._parts = None  # re-read partitions (the topic may have grown)
                self._retry("kafka", exc, backoff.delay)
                await backoff.wait()


class KafkaEngine:
    """One consumer-group member: fetch a batch, score it, archive it, commit it."""

    def __init__(self, settings, scorer=None, metrics=None):
        self.s = settings
        self.scorer = scorer
        self.metrics = metrics
        self.consumer = None
        self.producer = None
        self.worker: BatchWorker | None = None
        self.inflight: asyncio.Future | None = None  # the batch being scored (+ buffered)
        self.publishing: asyncio.Future | None = None  # DLQ/scores of the last batch, until acked
        self.flushing: asyncio.Future | None = None  # the archive write in flight
        self.buf: list = []  # Arrow batches (streams.archive.record_batch) scored, not archived
        self.buf_rows = 0
        self.buf_offsets: dict = {}  # tp -> next offset, committed once ``buf`` is archived
        self.buf_t0 = 0.0
        self.stopping = False

    # ---- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

        from streams.kafka import client_kwargs

        s = self.s
        kw = client_kwargs(s)
        self.producer = AIOKafkaProducer(**kw, acks="all", enable_idempotence=True, linger_ms=5,
                                         max_request_size=1_000_000)
        session_ms = int(s.kafka_session_timeout_s * 1000)
        self.consumer = AIOKafkaConsumer(
            **kw, group_id=s.consumer_group, enable_auto_commit=False, auto_offset_reset="earliest",
            max_poll_records=s.batch_max, fetch_max_wait_ms=100,
            max_partition_fetch_bytes=4 * 1024 * 1024, session_timeout_ms=session_ms,
            heartbeat_interval_ms=min(3000, session_ms // 4))
        await self.producer.start()
        self.worker = BatchWorker(s, _App(self.producer), self.scorer, self.metrics)
        await self.worker.store.write_meta()
        await self.worker.reload_model()  # before the first batch: is the champion's encoder ours?
        self.consumer.subscribe(list(s.event_topics), listener=_Listener(self))
        await self.consumer.start()
        log.info("consuming %s as group %s (engine kafka, batches of up to %d within %.3fs)",
                 ", ".join(s.event_topics), s.consumer_group, s.batch_max, s.batch_within_s)

    async def run(self) -> None:
        """Until ``stopping``: every fetched batch is scored, buffered for the archive and, once
        archived, committed."""
        getmany = self.consumer.getmany
        within_ms = max(1, int(1000 * self.s.batch_within_s))
        while not self.stopping:
            batches = await getmany(timeout_ms=within_ms, max_records=self.s.batch_max)
            if not batches:
                if self.buf_offsets and time.monotonic() - self.buf_t0 >= self.s.archive_within_s:
                    await self._flush()  # idle: archive what waits, then commit it
                continue
            records = [Record(m.topic, m.partition, m.offset, m.key, m.value,
                              m.timestamp / 1000 if m.timestamp else None)
                       for msgs in batches.values() for m in msgs]
            offsets = {tp: msgs[-1].offset + 1 for tp, msgs in batches.items()}
            self.inflight = asyncio.ensure_future(self._step(records, offsets))
            try:
                await asyncio.shield(self.inflight)
            except asyncio.CancelledError:  # stop(): let the batch finish, bounded
                await asyncio.wait_for(asyncio.shield(self.inflight), 30)
                raise
            except BaseException:  # noqa: BLE001 - crash-only: nothing of this batch is committed
                _die("unexpected error in a batch")
            finally:
                self.inflight = None

    async def _step(self, records: list[Record], offsets: dict) -> None:
        """Score a batch (state and scores in Redis when this returns), then hand its publishing
        to a task, so that the broker's acks for batch N are awaited while batch N+1 is scored.
        At most one publish is in flight; batches are published, buffered for the archive and
        committed in order."""
        result = await self.worker.process(records)
        if self.publishing is not None:
            await self.publishing
        self.publishing = asyncio.ensure_future(self._publish(result, records, offsets))
        self.publishing.add_done_callback(_crash_on_error)

    async def _publish(self, result: BatchResult, records: list[Record], offsets: dict) -> None:
        await self.worker.publish(result, records)
        if not self.buf_offsets:
            self.buf_t0 = time.monotonic()
        if result.valid_events:
            self.buf.append(record_batch(result.valid_events))
            self.buf_rows += len(result.valid_events)
        self.buf_offsets.update(offsets)
        if (self.buf_rows >= self.s.archive_batch_max
                or time.monotonic() - self.buf_t0 >= self.s.archive_within_s):
            await self._flush(wait=False)

    async def _flush(self, wait: bool = True) -> None:
        """Hand the buffer to one archive write in a thread (never two at once) that commits
        its offsets when the file is durable. ``wait``: also wait for that write."""
        if self.flushing is not None:
            await self.flushing
        batches, offsets, self.buf, self.buf_offsets, self.buf_rows = self.buf, self.buf_offsets, [], {}, 0
        if not offsets:
            return
        self.flushing = asyncio.ensure_future(self._archive_and_commit(batches, offsets))
        self.flushing.add_done_callback(_crash_on_error)
        if wait:
            await self.flushing

    async def _archive_and_commit(self, batches: list, offsets: dict) -> None:
        if batches:
            await self.worker.archive_batches(batches)  # retries a failing disk; never skips
        await self._commit(offsets)

    async def _commit(self, offsets: dict) -> None:
        from aiokafka.errors import CommitFailedError, IllegalStateError

        try:
            await self.consumer.commit(offsets)
        except (CommitFailedError, IllegalStateError) as exc:
            # the partitions moved meanwhile: their new owner redelivers from the last commit,
            # which the dedupe markers make safe
            log.warning("commit of %d partitions failed after a rebalance (%s); their events will be "
                        "redelivered to the new owner", len(offsets), exc)

    async def drain(self) -> None:
        """Finish the batch in flight, archive everything scored and commit it."""
        if self.inflight is not None:
            await asyncio.shield(self.inflight)
        if self.publishing is not None:
            await asyncio.shield(self.publishing)
        await self._flush()

    async def stop(self) -> None:
        self.stopping = True
        try:
            await asyncio.wait_for(self.drain(), 60)
        except BaseException:  # noqa: BLE001
            _die("shutdown while a batch or archive write could not finish")
        await self.consumer.stop()
        await self.producer.stop()


class _Listener(ConsumerRebalanceListener):
    """aiokafka rebalance listener: nothing scored leaves this member uncommitted."""

    def __init__(self, engine: KafkaEngine):
        self.engine = engine

    async def on_partitions_revoked(self, revoked) -> None:
        if revoked:
            try:
                await self.engine.drain()
            except BaseException:  # noqa: BLE001
                _die("a batch failed while partitions were being revoked")

    async def on_partitions_assigned(self, assigned) -> None:
        log.info("assigned %d partitions: %s", len(assigned),
                 ", ".join(f"{tp.topic}/{tp.partition}" for tp in sorted(assigned)))


def _crash_on_error(fut: asyncio.Future) -> None:
    """A publish or archive task that fails unexpectedly (their dependency errors are retried
    inside) ends the process before anything it owes is committed."""
    if not fut.cancelled() and fut.exception() is not None:
        _die("a publish or archive task failed", fut.exception())


def _die(what: str, exc: BaseException | None = None) -> None:
    """Exit at once (crash-only), logging ``exc`` or the exception being handled."""
    log.critical("%s; exiting without commit (a restart redelivers from the last commit)", what,
                 exc_info=exc or True)
    logging.shutdown()
    os._exit(EXIT_UNSAFE)


async def serve(settings, scorer=None, metrics=None) -> None:
    """Run one engine until SIGTERM/SIGINT; reload the champion model every CLV_MODEL_POLL_S."""
    import signal

    loop = asyncio.get_running_loop()
    engine = KafkaEngine(settings, scorer, metrics)
    await engine.start()
    if metrics:
        await metrics.start(None)
    settle_heap()

    async def reload() -> None:
        while True:
            await asyncio.sleep(settings.model_poll_s)
            await engine.worker.reload_model()

    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    runner = asyncio.ensure_future(engine.run())
    reloader = asyncio.ensure_future(reload())
    stopper = asyncio.ensure_future(stop.wait())
    await asyncio.wait([runner, stopper], return_when=asyncio.FIRST_COMPLETED)
    reloader.cancel()
    if runner.done():
        runner.result()  # a fatal error in the loop propagates
    t = time.perf_counter()
    engine.stopping = True
    runner.cancel()
    try:
        await runner
    except asyncio.CancelledError:
        pass
    await engine.stop()
    log.info("stopped cleanly in %.1fs (everything scored is archived and committed)",
             time.perf_counter() - t)
