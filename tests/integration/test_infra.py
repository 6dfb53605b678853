"""infra/services.sh + tests/conftest.py against real Kafka and Redis.

Starts the session stack (free ports, tmp dir), moves real messages, restarts and kills the
services and checks that what was written survives; one extra broker with SASL/PLAIN.
"""
from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

import pytest
import redis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.errors import KafkaConnectionError

pytestmark = pytest.mark.integration


# --- helpers ---------------------------------------------------------------------------------------
def produce(bootstrap: str, topic: str, values: list[bytes], **kw: Any) -> None:
    async def go() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", **kw)
        try:
            await producer.start()
            futures = [await producer.send(topic, v, key=v) for v in values]
            await asyncio.gather(*futures)
        finally:
            await producer.stop()

    asyncio.run(go())


def consume(bootstrap: str, topic: str, n: int, *, group: str | None = None,
            commit: bool = False, timeout_s: float = 60.0, **kw: Any) -> list[bytes]:
    """Read ``n`` messages (from the committed offset, else the beginning) of ``topic``."""

    async def go() -> list[bytes]:
        consumer = AIOKafkaConsumer(
            topic, bootstrap_servers=bootstrap, group_id=group, auto_offset_reset="earliest",
            enable_auto_commit=False, **kw,
        )
        await consumer.start()
        got: list[bytes] = []
        try:
            deadline = time.monotonic() + timeout_s
            while len(got) < n and time.monotonic() < deadline:
                batch = await consumer.getmany(timeout_ms=500, max_records=n - len(got))
                for records in batch.values():
                    got.extend(r.value for r in records)
            if commit:
                await consumer.commit()
        finally:
            await consumer.stop()
        return got

    return asyncio.run(go())


def pid(stack: Any, service: str) -> int:
    return int((Path(stack.env["CLV_INFRA_DIR"]) / "run" / f"{service}.pid").read_text())


# --- the session stack -----------------------------------------------------------------------------
def test_kafka_round_trip_and_redis_ping(services, kafka_admin, redis_client) -> None:
    names = services.unique_topics("infra-rt")
    settings = services.settings(**names)
    assert settings.kafka_bootstrap == services.kafka_bootstrap
    assert settings.redis_url == services.redis_url
    assert settings.topic_orders == names["topic_orders"] != "clv.orders"

    created = kafka_admin.create_for(settings)
    assert set(created) <= kafka_admin.list()
    assert kafka_admin.partitions(settings.topic_orders) == settings.topic_partitions == 4

    values = [f"order-{i}".encode() for i in range(40)]
    produce(services.kafka_bootstrap, settings.topic_orders, values)
    got = consume(services.kafka_bootstrap, settings.topic_orders, len(values),
                  group=settings.consumer_group)
    assert sorted(got) == sorted(values)

    assert redis_client.ping() is True
    redis_client.set("clv:test:k", "v")
    assert redis_client.get("clv:test:k") == b"v"


def test_start_again_is_a_no_op(services) -> None:
    before = (pid(services, "kafka"), pid(services, "redis"))
    t0 = time.monotonic()
    services.start("kafka", "redis")
    assert time.monotonic() - t0 < 30
    assert (pid(services, "kafka"), pid(services, "redis")) == before
    status = services.status()
    assert "kafka      running" in status and "redis      running" in status
    assert "prometheus stopped" in status


def test_redis_restart_keeps_data(services, redis_client) -> None:
    redis_client.set("clv:test:survivor", "still here")
    redis_client.hset("clv:test:h", mapping={"a": "1", "b": "2"})
    old = pid(services, "redis")
    services.restart("redis")
    assert pid(services, "redis") != old
    fresh = redis.Redis.from_url(services.redis_url)
    try:
        assert fresh.get("clv:test:survivor") == b"still here"
        assert fresh.hgetall("clv:test:h") == {b"a": b"1", b"b": b"2"}
    finally:
        fresh.close()


def test_kafka_restart_keeps_messages_and_committed_offsets(services, kafka_admin) -> None:
    topic = services.unique_topics("infra-restart")["topic_clicks"]
    group = f"{topic}.group"
    kafka_admin.create([topic], partitions=1)
    values = [f"click-{i:03d}".encode() for i in range(50)]
    produce(services.kafka_bootstrap, topic, values)
    first = consume(services.kafka_bootstrap, topic, 30, group=group, commit=True)
    assert first == values[:30]

    old = pid(services, "kafka")
    services.restart("kafka")
    assert pid(services, "kafka") != old

    # every message is still there for a new reader ...
    assert consume(services.kafka_bootstrap, topic, 50) == values
    # ... and the group resumes at its committed offset
    assert consume(services.kafka_bootstrap, topic, 20, group=group) == values[30:]


def test_kafka_kill_then_start_recovers(services, kafka_admin) -> None:
    topic = services.unique_topics("infra-kill")["topic_orders"]
    kafka_admin.create([topic], partitions=2)
    values = [f"o-{i}".encode() for i in range(30)]
    produce(services.kafka_bootstrap, topic, values)

    services.kill("kafka")
    assert "kafka      stopped" in services.status()
    services.start("kafka")

    assert sorted(consume(services.kafka_bootstrap, topic, 30)) == sorted(values)
    produce(services.kafka_bootstrap, topic, [b"after-crash"])
    assert len(consume(services.kafka_bootstrap, topic, 31)) == 31


def test_taken_port_gives_a_clear_error(services, tmp_path) -> None:
    clash = type(services)(tmp_path)  # conftest.InfraStack, not started
    clash.env["CLV_INFRA_KAFKA_PORT"] = services.env["CLV_INFRA_KAFKA_PORT"]
    proc = clash.run("start", "kafka", check=False, timeout=120)
    try:
        assert proc.returncode != 0
        assert f"127.0.0.1:{services.env['CLV_INFRA_KAFKA_PORT']}" in proc.stderr
        assert "already taken" in proc.stderr and "CLV_INFRA_KAFKA_PORT" in proc.stderr
    finally:
        clash.run("stop", check=False, timeout=120)
    assert "kafka      running" in services.status()  # the session broker was not touched


# --- a separate broker with SASL/PLAIN --------------------------------------------------------------
def test_sasl_plain(infra_factory, caplog) -> None:
    stack = infra_factory("kafka", sasl=True)
    assert "redis      stopped" in stack.status()
    s = stack.sasl_settings(**stack.unique_topics("infra-sasl"))
    assert s.kafka_security_protocol == "SASL_PLAINTEXT"
    auth = stack.sasl_client_kwargs()
    assert auth["sasl_plain_username"] == s.kafka_sasl_username
    stack.admin(sasl=True).create([s.topic_profiles], partitions=2)
    values = [b"p1", b"p2", b"p3"]
    produce(s.kafka_bootstrap, s.topic_profiles, values, **auth)
    assert sorted(consume(s.kafka_bootstrap, s.topic_profiles, 3, group=s.consumer_group,
                          **auth)) == values

    # wrong password: the broker refuses the login
    caplog.set_level(logging.ERROR, logger="aiokafka")
    with pytest.raises(KafkaConnectionError):
        produce(s.kafka_bootstrap, s.topic_profiles, [b"nope"],
                **{**auth, "sasl_plain_password": "wrong-password"})
    assert "Authentication failed" in caplog.text

    # no SASL at all on the SASL port: no metadata either
    with pytest.raises(KafkaConnectionError):
        produce(s.kafka_bootstrap, s.topic_profiles, [b"nope"], request_timeout_ms=5000)

    # the PLAINTEXT listener stays available and sees the same data
    assert sorted(consume(stack.kafka_bootstrap, s.topic_profiles, 3)) == values
