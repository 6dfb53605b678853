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
    Sends are not awaited one by one: up to ``window`` delivery futures are in flight while
    the producer batches (``linger_ms``, ``max_batch_size``); idempotence and ``acks=all``
    make a retried batch land exactly once per partition.
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
    inflight: deque[asyncio.Future] = deque()

    async def settle(keep: int) -> None:
        while len(inflight) > keep:
            try:
                await inflight.popleft()
                res.delivered += 1
            except KafkaError as exc:
                res.failed += 1
                if res.first_error is None:
                    res.first_error = f"{type(exc).__name__}: {exc}"
                    log.error("delivery failed: %s", res.first_error)

    t0 = time.perf_counter()
    pace = 1.0 / rate if rate else 0.0
    try:
        for m in as_messages(items):
            topic = topics[m.kind]
            try:
                inflight.append(await producer.send(topic, m.value, key=m.key))
            except KafkaError as exc:  # e.g. a record larger than max_request_size
                res.failed += 1
                res.first_error = res.first_error or f"{type(exc).__name__}: {exc}"
            res.messages += 1
            res.by_topic[topic] += 1
            res.by_label[m.label] += 1
            if progress is not None and res.messages % 1000 == 0:
                progress(1000)
            if len(inflight) >= window:
                await settle(window // 2)
            if pace:
                ahead = t0 + res.messages * pace - time.perf_counter()
                if ahead > 0.002:
                    await asyncio.sleep(ahead)
        await settle(0)
    finally:
        await producer.stop()
    res.seconds = time.perf_counter() - t0
    if progress is not None:
        progress(res.messages % 1000)
    return res


def _unreachable(settings, exc: Exception) -> str:
    return (f"cannot reach Kafka at {settings.kafka_bootstrap} ({type(exc).__name__}: {exc}); "
            "start the broker (infra/) or point CLV_KAFKA_BOOTSTRAP / --bootstrap at one")
