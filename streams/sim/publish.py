"""Publish simulated messages to the event topics with an idempotent, batching producer."""
from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Callable, Iterable

from streams.sim.wire import as_messages

log = logging.getLogger("clv.simulate")


@dataclass
class PublishResult:
    messages: int = 0  # records handed to the producer
    delivered: int = 0  # acknowledged by the broker (acks=all)
    failed: int = 0
    seconds: float = 0.0
    by_topic: Counter = field(default_factory=Counter)
    by_label: Counter = field(default_factory=Counter)
    first_error: str | None = None

    @property
    def rate(self) -> float:
        return self.delivered / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict:
        return {"messages": self.messages, "delivered": self.delivered, "failed": self.failed,
                "seconds": round(self.seconds, 3), "rate": round(self.rate, 1),
                "by_topic": dict(self.by_topic), "by_label": dict(self.by_label),
                "first_error": self.first_error}


def topic_for(settings) -> dict[str, str]:
    return {"click": settings.topic_clicks, "order": settings.topic_orders,
            "review": settings.topic_reviews, "profile": settings.topic_profiles}


async def publish(items: Iterable, settings, rate: float | None = None, *,
                  linger_ms: int = 20, max_batch_size: int = 512 * 1024, window: int = 20000,
                  create_topics: bool = True,
                  progress: Callable[[int], None] | None = None) -> PublishResult:
    """Send events (typed events, ``Message`` s or ``(kind, key, value)`` triples) to the
    topic of their type, keyed by user id. Returns counts once everything is acknowledged.

    ``rate``: messages per second to pace a live stream (None or 0 = as fast as possible).
    Nothing is awaited message by message. Unpaced, records are packed into per-partition
    batches (``producer.create_batch``/``send_batch``, partition = murmur2(key) as Kafka's
    default partitioner, so a user's events share a partition whoever produces them).
    Paced, each record goes through ``send()`` and ``linger_ms`` batches them. Up to
    ``window`` records are unacknowledged at a time; idempotence and ``acks=all`` make a
    retried batch land exactly once.
    """
    from aiokafka import AIOKafkaProducer
    from aiokafka.errors import KafkaError

    from streams.kafka import client_kwargs, ensure_topics

    topics = topic_for(settings)
    if create_topics:
        try:
            await ensure_topics(settings)
        except (KafkaError, OSError) as exc:
            raise RuntimeError(_unreachable(settings, exc)) from exc
    producer = AIOKafkaProducer(
        **client_kwargs(settings), enable_idempotence=True, acks="all", linger_ms=linger_ms,
        max_batch_size=max_batch_size,
        max_request_size=max(1024 * 1024, 2 * settings.max_message_bytes),
    )
    try:
        await producer.start()
    except (KafkaError, OSError) as exc:
        await producer.stop()
        raise RuntimeError(_unreachable(settings, exc)) from exc
    res = PublishResult()
    inflight: deque[tuple[asyncio.Future, int]] = deque()  # (delivery future, records)
    unacked = 0

    def failed(n: int, exc: Exception) -> None:
        res.failed += n
        if res.first_error is None:
            res.first_error = f"{type(exc).__name__}: {exc}"
            log.error("delivery failed: %s", res.first_error)

    async def settle(keep: int) -> None:
        nonlocal unacked
        while unacked > keep:
            fut, n = inflight.popleft()
            unacked -= n
            try:
                await fut
                res.delivered += n
            except KafkaError as exc:
                failed(n, exc)

    def count(m) -> str:
        topic = topics[m.kind]
        res.messages += 1
        res.by_topic[topic] += 1
        res.by_label[m.label] += 1
        if progress is not None and res.messages % 1000 == 0:
            progress(1000)
        return topic

    t0 = time.perf_counter()
    try:
        if rate:
            pace = 1.0 / rate
            for m in as_messages(items):
                topic = count(m)
                try:
                    inflight.append((await producer.send(topic, m.value, key=m.key), 1))
                    unacked += 1
                except KafkaError as exc:  # e.g. a record larger than max_request_size
                    failed(1, exc)
                if unacked >= window:
                    await settle(window // 2)
                ahead = t0 + res.messages * pace - time.perf_counter()
                if ahead > 0.002:
                    await asyncio.sleep(ahead)
        else:
            batcher = _Batcher(producer, await _partitions(producer, topics.values()))
            for m in as_messages(items):
                full = batcher.add(count(m), m.key, m.value)
                if full is not None:
                    inflight.append(await batcher.submit(*full))
                    unacked += full[0].record_count()
                    if unacked >= window:
                        await settle(window // 2)
            for full in batcher.drain():
                inflight.append(await batcher.submit(*full))
                unacked += full[0].record_count()
        await settle(0)
    finally:
        await producer.stop()
    res.seconds = time.perf_counter() - t0
    if progress is not None:
        progress(res.messages % 1000)
    return res


async def _partitions(producer, topics: Iterable[str]) -> dict[str, list[int]]:
    return {t: sorted(await producer.partitions_for(t)) for t in topics}


class _Batcher:
    """One open record batch per topic-partition; a full one is handed back for sending."""

    def __init__(self, producer, partitions: dict[str, list[int]]):
        from aiokafka.partitioner import murmur2

        self.producer, self.partitions, self._murmur2 = producer, partitions, murmur2
        self.open: dict[tuple[str, int], object] = {}
        self._part: dict[tuple[str, bytes], int] = {}  # (topic, key) -> partition
        self._rr = 0

    def partition(self, topic: str, key: bytes | None) -> int:
        parts = self.partitions[topic]
        if key is None:
            self._rr += 1
            return parts[self._rr % len(parts)]
        p = self._part.get((topic, key))
        if p is None:  # exactly aiokafka's/Kafka's DefaultPartitioner
            p = self._part[(topic, key)] = parts[(self._murmur2(key) & 0x7FFFFFFF) % len(parts)]
        return p

    def add(self, topic: str, key: bytes | None, value: bytes | None):
        tp = (topic, self.partition(topic, key))
        batch = self.open.get(tp)
        if batch is None:
            batch = self.open[tp] = self.producer.create_batch()
        if batch.append(key=key, value=value, timestamp=None) is not None:
            return None
        fresh = self.open[tp] = self.producer.create_batch()
        if fresh.append(key=key, value=value, timestamp=None) is None:
            raise ValueError(f"a record of {len(value or b'')} bytes does not fit in a batch; "
                             "raise max_batch_size")
        return batch, tp

    def drain(self):
        while self.open:
            tp, batch = self.open.popitem()
            yield batch, tp

    async def submit(self, batch, tp) -> tuple[asyncio.Future, int]:
        fut = await self.producer.send_batch(batch, tp[0], partition=tp[1])
        return fut, batch.record_count()


def _unreachable(settings, exc: Exception) -> str:
    return (f"cannot reach Kafka at {settings.kafka_bootstrap} ({type(exc).__name__}: {exc}); "
            "start the broker (infra/) or point CLV_KAFKA_BOOTSTRAP / --bootstrap at one")
