"""Helpers for the API / lag / ops-page tests: topics with known offsets, a consumer group
with known committed offsets, and `clv serve` in its own process."""
from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic


def unique(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


async def create_topics(bootstrap: str, partitions: dict[str, int]) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(t, n, 1) for t, n in partitions.items()])
        # wait until every partition has a leader
        for _ in range(100):
            meta = {t["topic"]: t for t in await admin.describe_topics(list(partitions))}
            if all(len(meta.get(t, {}).get("partitions", ())) == n and
                   all(p["leader"] >= 0 for p in meta[t]["partitions"]) for t, n in partitions.items()):
                return
            await asyncio.sleep(0.1)
        raise AssertionError(f"topics {list(partitions)} have no leaders after 10 s")
    finally:
        await admin.close()


async def produce(bootstrap: str, counts: dict[tuple[str, int], int]) -> None:
    """Write counts[(topic, partition)] small records to each partition."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
    await producer.start()
    try:
        futs = []
        for (topic, part), n in counts.items():
            for i in range(n):
                futs.append(await producer.send(topic, b'{"n": %d}' % i, partition=part))
        await producer.flush()
        await asyncio.gather(*futs)
    finally:
        await producer.stop()


async def commit(bootstrap: str, group: str, offsets: dict[tuple[str, int], int]) -> None:
    """Commit offsets for ``group`` the way a consumer does (manual assignment, no join)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group,
                                enable_auto_commit=False)
    await consumer.start()
    try:
        tps = {TopicPartition(t, p): o for (t, p), o in offsets.items()}
        consumer.assign(list(tps))
        await consumer.commit(tps)
    finally:
        await consumer.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def settings_env(settings) -> dict[str, str]:
    """The environment that makes a `clv` process see exactly ``settings``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLV_")}
    return {**env, **settings.to_env()}


def serve(settings, log: Path) -> tuple[subprocess.Popen, str]:
    """Start `clv serve` on a free port with ``settings``; returns (process, base URL)."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", "from clv_cli import app; app()", "serve",
                             "--host", "127.0.0.1", "--port", str(port)],
                            env=settings_env(settings), stdout=open(log, "w"), stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        assert proc.poll() is None, log.read_text()
        try:
            if httpx.get(base + "/healthz", timeout=1).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, f"API did not start in 60 s: {log.read_text()}"
        time.sleep(0.2)


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    proc.wait(20)
