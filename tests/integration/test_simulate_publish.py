"""`publish` against a real broker: every message lands once, on its type's topic, keyed by
user id; duplicates and bad messages arrive as produced (their handling is the worker's)."""
from __future__ import annotations

import asyncio
import collections

import pytest

from streams.events import Rejection, decode
from streams.simulate import DUPLICATE, EVENT, mix, publish, simulate

pytestmark = pytest.mark.integration


async def _read_all(settings, expected: int, timeout_s: float = 60.0) -> list:
    from aiokafka import AIOKafkaConsumer

    from streams.kafka import client_kwargs

    consumer = AIOKafkaConsumer(*settings.event_topics, **client_kwargs(settings),
                                group_id=None, auto_offset_reset="earliest",
                                enable_auto_commit=False, max_partition_fetch_bytes=2 * 1024 * 1024)
    await consumer.start()
    out = []
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while len(out) < expected and loop.time() < deadline:
            batch = await consumer.getmany(timeout_ms=500, max_records=10000)
            for records in batch.values():
                out.extend(records)
    finally:
        await consumer.stop()
    return out


def test_publish_lands_every_message_on_its_topic(services):
    settings = services.settings(**services.unique_topics("sim"))
    sim = simulate(150, "2024-01-01", 120, seed=4)
    msgs = list(mix(sim.iter_wire(), duplicates=0.02, bad=0.01, seed=4, users=150))
    res = asyncio.run(publish(msgs, settings, linger_ms=10))
    assert res.failed == 0 and res.delivered == res.messages == len(msgs), res.as_dict()

    records = asyncio.run(_read_all(settings, len(msgs)))
    assert len(records) == len(msgs)
    topic_of = {"click": settings.topic_clicks, "order": settings.topic_orders,
                "review": settings.topic_reviews, "profile": settings.topic_profiles}
    sent = collections.Counter((topic_of[m.kind], m.key, m.value) for m in msgs)
    got = collections.Counter((r.topic, r.key, r.value) for r in records)
    assert got == sent
    kind_of = {v: k for k, v in topic_of.items()}
    n_events = sum(m.label == EVENT for m in msgs)
    valid = 0
    for r in records:
        ev = decode(r.value, now=sim.end, key=r.key, expect_type=kind_of[r.topic])
        valid += not isinstance(ev, Rejection)
    assert valid == n_events + sum(m.label == DUPLICATE for m in msgs)  # every bad one rejected
