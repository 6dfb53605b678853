"""Prototype: the scoring worker on a plain aiokafka consumer group (no Faust streams).

    python bench/prototypes/lean_worker.py [--no-metrics] [--ort-threads N]

Same settings, scorer, store, pipeline, archive and guarantees as ``clv worker``:

    getmany(max_records=CLV_BATCH_MAX, timeout=CLV_BATCH_WITHIN_S)
      -> Pipeline.process (decode, embed, Redis load, fold, score, Redis save)
      -> archive result.valid_events (thread) || publish DLQ + scores (record batches)
      -> commit the batch's offsets (only after Redis, the archive and the broker acks)

Offsets are committed per batch, after everything the batch owes is durable, so a commit
never runs ahead of state (the same rule the Faust agents follow). A rebalance revokes
partitions between batches: ``on_partitions_revoked`` waits for the batch in flight and
commits it before the partitions move (redelivery after a crash stays safe through the
fold's dedupe markers, exactly as with the Faust worker). What Faust also gives and this
prototype leaves out: its web server/monitor (we have our own /metrics) and agents'
supervisor restarts (our rule is crash-only anyway: an unexpected error ends the process).
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import typer  # noqa: E402
from aiokafka import ConsumerRebalanceListener  # noqa: E402

log = logging.getLogger("clv.lean")
app = typer.Typer(add_completion=False)
EXIT_UNSAFE = 70


class LeanWorker:
    def __init__(self, settings, scorer, metrics=None):
        from streams.app import Worker

        self.s = settings
        self.scorer = scorer
        self.metrics = metrics
        self.w = Worker(settings, _NoApp(), scorer, metrics)  # reuse store/pipeline/archive/_retry
        self.consumer = None
        self.producer = None
        self.inflight: asyncio.Future | None = None
        self.inflight_offsets: dict = {}
        self.done: dict = {}  # finished, not yet committed: tp -> next offset
        self.buf: list = []  # (record, event) rows not yet archived
        self.buf_offsets: dict = {}  # their offsets (committed once archived)
        self.buf_t0 = 0.0
        self.flushing: asyncio.Future | None = None
        self.stopping = False

    async def start(self) -> None:
        from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

        from streams.kafka import client_kwargs

        kw = client_kwargs(self.s)
        self.producer = AIOKafkaProducer(**kw, acks="all", linger_ms=5, enable_idempotence=True)
        self.consumer = AIOKafkaConsumer(
            **kw, group_id=self.s.consumer_group, enable_auto_commit=False, auto_offset_reset="earliest",
            max_poll_records=self.s.batch_max, fetch_max_wait_ms=100,
            max_partition_fetch_bytes=4 * 1024 * 1024)
        await self.producer.start()
        self.w.app.producer = _FaustLikeProducer(self.producer)
        self.consumer.subscribe(list(self.s.event_topics), listener=_Listener(self))
        await self.consumer.start()
        await self.w.store.write_meta()
        await asyncio.get_running_loop().run_in_executor(None, _warm_archive)

    async def run(self) -> None:
        from streams.pipeline import Record

        c = self.consumer
        within_ms = int(1000 * self.s.batch_within_s)
        while not self.stopping:
            batches = await c.getmany(timeout_ms=within_ms, max_records=self.s.batch_max)
            if not batches:
                if self.buf_offsets and time.monotonic() - self.buf_t0 >= self.s.archive_within_s:
                    await self._archive([], {})  # idle: write what waits, then commit it
                continue
            records = [Record(m.topic, m.partition, m.offset, m.key, m.value,
                              m.timestamp / 1000 if m.timestamp else None)
                       for msgs in batches.values() for m in msgs]
            offsets = {tp: msgs[-1].offset + 1 for tp, msgs in batches.items()}
            self.inflight_offsets = offsets
            self.inflight = asyncio.ensure_future(self.w._score_batch(records))
            try:
                await asyncio.shield(self.inflight)
            except asyncio.CancelledError:
                await asyncio.wait_for(asyncio.shield(self.inflight), 30)
                raise
            except BaseException:  # noqa: BLE001 - crash-only: nothing is committed
                log.critical("unexpected error in a batch; exiting without commit", exc_info=True)
                os._exit(EXIT_UNSAFE)
            finally:
                self.inflight = None
            await self._archive(self.w.last_result.valid_events, offsets)

    async def _archive(self, items, offsets) -> None:
        """Buffer the batch's decoded events; write them with the following batches' once
        CLV_ARCHIVE_BATCH_MAX rows or CLV_ARCHIVE_WITHIN_S seconds are reached (big Parquet
        files, few fsyncs). Offsets are committed only once their rows are on disk. One write
        runs in a thread at a time while the next batches are scored."""
        if not self.buf_offsets:
            self.buf_t0 = time.monotonic()
        self.buf.extend(items)
        self.buf_offsets.update(offsets)
        due = (len(self.buf) >= self.s.archive_batch_max
               or time.monotonic() - self.buf_t0 >= self.s.archive_within_s)
        if not due:
            return
        if self.flushing is not None:
            await self.flushing  # never more than one write in flight
        rows, offs, self.buf, self.buf_offsets = self.buf, self.buf_offsets, [], {}
        self.flushing = asyncio.ensure_future(self._flush(rows, offs))

    async def _flush(self, rows, offsets) -> None:
        await self.w._archive_items(rows) if rows else None
        self.done.update(offsets)
        await self.commit()

    async def drain_archive(self) -> None:
        if self.flushing is not None:
            await self.flushing
        rows, offs, self.buf, self.buf_offsets = self.buf, self.buf_offsets, [], {}
        if offs:
            await self._flush(rows, offs)

    async def commit(self) -> None:
        from aiokafka.errors import CommitFailedError

        if not self.done:
            return
        offsets, self.done = self.done, {}
        try:
            await self.consumer.commit(offsets)
        except CommitFailedError as exc:  # partitions moved meanwhile: the new owner redoes it
            log.warning("commit after a rebalance failed (%s); the batch will be redelivered", exc)

    async def stop(self) -> None:
        self.stopping = True
        if self.inflight is not None:
            await asyncio.wait_for(asyncio.shield(self.inflight), 30)
        await self.drain_archive()
        await self.consumer.stop()
        await self.producer.stop()


def _offsets_of_inflight(lw: LeanWorker) -> dict:
    return dict(lw.inflight_offsets)


class _NoApp:
    producer = None


class _FaustLikeProducer:
    """streams.app.Worker calls faust's ``send(topic, key, value, partition, timestamp, headers)``."""

    def __init__(self, producer):
        self.p = producer

    def _ensure_producer(self):
        return self.p

    async def send(self, topic, key, value, partition, timestamp, headers):
        return await self.p.send(topic, value=value, key=key, partition=partition, headers=headers)


class _Listener(ConsumerRebalanceListener):
    def __init__(self, lw: LeanWorker):
        self.lw = lw

    async def on_partitions_revoked(self, revoked):
        if self.lw.inflight is not None:  # finish the batch in flight
            try:
                await asyncio.shield(self.lw.inflight)
            except Exception:  # noqa: BLE001 - run() exits on it
                return
            await self.lw._archive(self.lw.w.last_result.valid_events, _offsets_of_inflight(self.lw))
        await self.lw.drain_archive()  # archive everything scored, then commit it

    async def on_partitions_assigned(self, assigned):
        log.info("assigned %d partitions", len(assigned))


def _warm_archive() -> None:
    import pyarrow as pa

    pa.Table.from_pydict({"x": [1]})


async def _main(metrics: bool, ort_threads: int | None) -> None:
    from serving.registry import Registry
    from serving.scorer import HotScorer, pick_providers
    from streams.kafka import ensure_topics
    from streams.settings import get_settings

    s = get_settings()
    await ensure_topics(s)
    loop = asyncio.get_running_loop()
    scorer = await loop.run_in_executor(None, lambda: HotScorer(Registry(s.models_dir),
                                                                pick_providers(s.onnx_providers), ort_threads))
    m = None
    if metrics:
        from streams.observe import WorkerMetrics

        m = WorkerMetrics(s)
        await m.start(None)
    from bench.prototypes.app_onepass import OnePassWorker

    lw = LeanWorker(s, scorer, m)
    lw.w.__class__ = OnePassWorker  # batched score publishing + archive from decoded events
    lw.w.archive_inline = False  # LeanWorker buffers the archive across batches
    await lw.start()

    async def reload():
        while True:
            await asyncio.sleep(s.model_poll_s)
            await loop.run_in_executor(None, scorer.maybe_reload)

    rl = asyncio.ensure_future(reload())
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    runner = asyncio.ensure_future(lw.run())
    await asyncio.wait([runner, asyncio.ensure_future(stop.wait())], return_when=asyncio.FIRST_COMPLETED)
    rl.cancel()
    if runner.done():
        runner.result()
    t = time.perf_counter()
    lw.stopping = True
    await lw.stop()
    runner.cancel()
    log.info("stopped in %.1fs", time.perf_counter() - t)


@app.command()
def main(metrics: bool = typer.Option(True, "--metrics/--no-metrics"),
         ort_threads: int = typer.Option(0, "--ort-threads", help="onnxruntime intra-op threads (0 = its default)")) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import uvloop

    uvloop.run(_main(metrics, ort_threads or None))


if __name__ == "__main__":
    app()
