"""Consumer lag, read straight from Kafka (no exporter needed).

Per partition of each event topic: the log end offset (next offset to be written), the log
start offset, and the consumer group's committed offset (next offset it will read).

Lag semantics::

    lag = end - max(committed, beginning)        when the group has committed an offset
    lag = end - beginning                        when it has not (committed is None)

So a group that has never committed owes everything still retained in the log (the worker
starts from the earliest offset), and an offset that retention already deleted counts from
the log start, never as negative or as messages that no longer exist. Lag is never < 0.

``lag_snapshot(settings)`` is one-shot; ``LagReader`` keeps its Kafka connections for
repeated polls (the ops page); ``LagMonitor`` polls every ``interval`` seconds and sets the
kafka-exporter-style gauges in ``serving.metrics``.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import asdict, dataclass
from typing import Sequence

from streams.settings import Settings
from streams.kafka import client_kwargs

log = logging.getLogger(__name__)


class KafkaUnavailable(RuntimeError):
    """Kafka could not be reached or did not answer; the message says what to start."""


@dataclass(frozen=True, slots=True)
class PartitionLag:
    topic: str
    partition: int
    end: int  # log end offset
    committed: int | None  # group's committed offset, None = never committed
    lag: int
    beginning: int = 0  # log start offset

    def as_dict(self) -> dict:
        return asdict(self)


def compute_lag(end: int, beginning: int, committed: int | None) -> int:
    start = beginning if committed is None or committed < 0 else max(committed, beginning)
    return max(0, end - start)


def unreachable_message(settings: Settings, exc: BaseException | None = None) -> str:
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        why = " (no answer in time)"
    else:
        name = type(exc).__name__ if exc is not None else ""
        text = str(exc) if exc is not None else ""
        why = f" ({text if text.startswith(name) else f'{name}: {text}'})" if exc is not None else ""
    return (f"Kafka did not answer the lag query at {settings.kafka_bootstrap}{why}. Is it "
            "running? Start it (`bash infra/services.sh start`) or point CLV_KAFKA_BOOTSTRAP "
            "at a running broker.")


class LagReader:
    """Keeps one admin client and one group-less consumer open for repeated lag reads."""

    def __init__(self, settings: Settings, topics: Sequence[str] | None = None,
                 group: str | None = None, timeout_s: float = 5.0):
        self.settings = settings
        self.topics = tuple(topics or settings.event_topics)
        self.group = group or settings.consumer_group
        self.timeout_s = timeout_s
        self._admin = None
        self._consumer = None
        self._lock = asyncio.Lock()

    async def _connect(self) -> None:
        from aiokafka import AIOKafkaConsumer
        from aiokafka.admin import AIOKafkaAdminClient

        kw = client_kwargs(self.settings)
        timeout_ms = int(self.timeout_s * 1000)
        admin = AIOKafkaAdminClient(client_id="clv-lag", request_timeout_ms=timeout_ms, **kw)
        consumer = AIOKafkaConsumer(client_id="clv-lag", group_id=None, enable_auto_commit=False,
                                    request_timeout_ms=timeout_ms, **kw)
        try:
            await admin.start()
            await consumer.start()
        except BaseException:
            await _quiet_close(consumer, admin)
            raise
        self._admin, self._consumer = admin, consumer

    async def close(self) -> None:
        admin, consumer, self._admin, self._consumer = self._admin, self._consumer, None, None
        await _quiet_close(consumer, admin)

    async def read(self) -> list[PartitionLag]:
        """One snapshot, sorted by topic and partition. Topics that do not exist are left
        out. Raises KafkaUnavailable (and drops the connections) when Kafka does not answer."""
        async with self._lock:
            try:
                return await asyncio.wait_for(self._read_retrying(), self.timeout_s)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                await self.close()
                raise KafkaUnavailable(unreachable_message(self.settings, exc)) from exc

    async def _read_retrying(self) -> list[PartitionLag]:
        from aiokafka.errors import KafkaError

        if self._consumer is None:
            await self._connect()  # no retry: a broker that refuses connections is down
        delay = 0.05
        while True:  # bounded by wait_for in read()
            try:
                return await self._read()
            except KafkaError as exc:
                # e.g. the group coordinator is not there yet (first group on a new broker)
                if not getattr(exc, "retriable", False):
                    raise
                log.debug("lag read: retrying after %s", exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.5)

    async def _read(self) -> list[PartitionLag]:
        from aiokafka import TopicPartition

        consumer, admin = self._consumer, self._admin
        # metadata of all topics (naming topics could auto-create missing ones)
        known = {t["topic"]: t for t in await admin.describe_topics() if not t.get("error_code")}
        tps = []
        for topic in self.topics:
            parts = known.get(topic, {}).get("partitions", ())
            for p in sorted(int(x["partition"]) for x in parts):
                tps.append(TopicPartition(topic, p))
        if not tps:
            return []
        # the group's offsets first, so that lag is never under-reported by a race
        committed = await admin.list_consumer_group_offsets(self.group, partitions=tps)
        ends = await consumer.end_offsets(tps)
        begins = await consumer.beginning_offsets(tps)
        out = []
        for tp in tps:
            meta = committed.get(tp)
            c = meta.offset if meta is not None and meta.offset >= 0 else None
            end, beg = int(ends[tp]), int(begins[tp])
            out.append(PartitionLag(tp.topic, tp.partition, end, c, compute_lag(end, beg, c), beg))
        return out


async def _quiet_close(*clients) -> None:
    for c in clients:
        if c is None:
            continue
        try:
            await (c.stop() if hasattr(c, "stop") else c.close())
        except Exception:  # closing a half-started client: nothing left to do
            pass


async def lag_snapshot(settings: Settings, topics: Sequence[str] | None = None,
                       group: str | None = None, timeout_s: float = 10.0) -> list[PartitionLag]:
    """One-shot read of per-partition lag for ``settings.event_topics`` (or ``topics``) and
    ``settings.consumer_group`` (or ``group``). Raises KafkaUnavailable when Kafka is down."""
    reader = LagReader(settings, topics, group, timeout_s)
    try:
        return await reader.read()
    finally:
        await reader.close()


def set_gauges(group: str, lags: Sequence[PartitionLag]) -> None:
    """Set the kafka-exporter-style gauges in serving.metrics from one snapshot."""
    from serving import metrics as m

    sums: dict[str, int] = {}
    for pl in lags:
        p = str(pl.partition)
        m.CONSUMERGROUP_LAG.labels(group, pl.topic, p).set(pl.lag)
        m.TOPIC_PARTITION_CURRENT_OFFSET.labels(pl.topic, p).set(pl.end)
        m.CONSUMERGROUP_CURRENT_OFFSET.labels(group, pl.topic, p).set(
            -1 if pl.committed is None else pl.committed)
        sums[pl.topic] = sums.get(pl.topic, 0) + pl.lag
    for topic, total in sums.items():
        m.CONSUMERGROUP_LAG_SUM.labels(group, topic).set(total)
    m.LAG_POLL_TIMESTAMP.set(time.time())


class LagMonitor:
    """Polls lag every ``interval`` seconds and sets the gauges; survives Kafka outages
    (logs once per outage, counts ``clv_lag_poll_errors_total``, keeps the last values).

    In the worker::

        monitor = LagMonitor(settings)
        task = asyncio.create_task(monitor.run())
        ...
        await monitor.stop()
    """

    def __init__(self, settings: Settings, interval: float = 2.0,
                 topics: Sequence[str] | None = None, group: str | None = None):
        self.interval = interval
        self.reader = LagReader(settings, topics, group, timeout_s=max(1.0, min(10.0, interval * 2)))
        self.last: list[PartitionLag] = []
        self._stop = asyncio.Event()
        self._failing = False

    @property
    def group(self) -> str:
        return self.reader.group

    async def poll_once(self) -> list[PartitionLag]:
        from serving import metrics as m

        try:
            lags = await self.reader.read()
        except KafkaUnavailable as exc:
            m.LAG_POLL_ERRORS.inc()
            if not self._failing:
                log.warning("lag monitor: %s", exc)
            self._failing = True
            raise
        if self._failing:
            log.info("lag monitor: Kafka reachable again")
        self._failing = False
        set_gauges(self.group, lags)
        self.last = lags
        return lags

    async def run(self) -> None:
        self._stop.clear()
        try:
            while not self._stop.is_set():
                try:
                    await self.poll_once()
                except KafkaUnavailable:
                    pass
                try:
                    await asyncio.wait_for(self._stop.wait(), self.interval)
                except asyncio.TimeoutError:
                    pass
        finally:
            await self.reader.close()

    async def stop(self) -> None:
        self._stop.set()
