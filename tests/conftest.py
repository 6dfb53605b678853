"""Shared pytest fixtures: real Kafka + Redis from ``infra/services.sh`` on free ports.

Fixtures (nothing starts unless a test asks for it):

- ``services``       session-wide Kafka + Redis (own free ports, own dir under pytest's tmp),
                     stopped at session end, even on failure or if pytest is killed.
- ``redis_client``   ``redis.Redis`` on ``services``; the db is flushed before each test.
- ``kafka_admin``    topic helper on ``services`` (create/delete/list, waits for leaders).
- ``infra_factory``  starts extra, isolated stacks (e.g. a SASL broker, or one a chaos test
                     may kill without disturbing other tests); stopped at the end of the test.

Several pytest sessions may run at once on one machine: every stack gets its own free ports
(below the ephemeral range) and folder, never the demo ports (19092/19093/19094/16379/19090).
See docs/infra.md.
"""
from __future__ import annotations

import asyncio
import os
import random
import re
import socket
import subprocess
import threading
import uuid
from collections.abc import Coroutine, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

REPO = Path(__file__).resolve().parents[1]
SERVICES_SH = REPO / "infra" / "services.sh"
DEMO_PORTS = frozenset({19090, 19092, 19093, 19094, 16379})
START_TIMEOUT_S = 300  # services.sh waits up to CLV_INFRA_TIMEOUT_S (120 s) per service
SASL_USER, SASL_PASSWORD = "clv", "clv-test-secret"

T = TypeVar("T")


# --- small helpers -------------------------------------------------------------------------------
class InfraError(RuntimeError):
    pass


def _port_pool() -> range | None:
    """Ports below the kernel's ephemeral range: no outgoing connection can take one of them
    while a service is down for a restart (which an OS-picked port-0 port would risk)."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return range(20000, low) if low - 20000 >= 2000 else None


def free_ports(n: int) -> list[int]:
    """``n`` distinct loopback ports that were free a moment ago (held open together)."""
    pool = _port_pool()
    rng = random.SystemRandom()
    socks: list[socket.socket] = []
    ports: list[int] = []
    try:
        for _ in range(50 * n):
            if len(ports) == n:
                break
            port = rng.choice(pool) if pool else 0
            if port in DEMO_PORTS or port in ports:
                continue
            s = socket.socket()
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                s.close()
                continue
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    if len(ports) < n:
        raise InfraError(f"could not find {n} free loopback ports")
    return ports


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` to completion from sync code, even when an event loop is already running."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    box: dict[str, Any] = {}

    def _target() -> None:
        try:
            box["value"] = asyncio.run(coro)
        except BaseException as exc:  # re-raised in the caller's thread
            box["error"] = exc

    t = threading.Thread(target=_target, name="run_sync")
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


_TOPIC_CHARS = re.compile(r"[^A-Za-z0-9._-]+")


# --- one stack of services -----------------------------------------------------------------------
class InfraStack:
    """Kafka (+ Redis) run by ``infra/services.sh`` in ``root`` on free ports.

    ``env`` holds the ``CLV_INFRA_*`` variables of this stack: pass ``{**os.environ, **env}`` to
    run ``infra/services.sh`` yourself. ``restart``/``kill``/``start``/``stop`` act on it.
    """

    script = SERVICES_SH

    def __init__(self, root: Path, *, sasl: bool = False, partitions: int = 4) -> None:
        self.root = Path(root)
        self.sasl = sasl
        self.partitions = partitions
        self.data_dir = self.root / "app"  # Settings.data_dir (archive, models)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._watchdog: subprocess.Popen[bytes] | None = None
        self._pick_ports()

    def _pick_ports(self) -> None:
        k, c, s, r, p = free_ports(5)
        self.env: dict[str, str] = {
            "CLV_INFRA_DIR": str(self.root / "infra"),
            "CLV_INFRA_KAFKA_PORT": str(k),
            "CLV_INFRA_KAFKA_CONTROLLER_PORT": str(c),
            "CLV_INFRA_KAFKA_SASL_PORT": str(s),
            "CLV_INFRA_KAFKA_SASL": "1" if self.sasl else "0",
            "CLV_INFRA_KAFKA_SASL_USER": SASL_USER,
            "CLV_INFRA_KAFKA_SASL_PASSWORD": SASL_PASSWORD,
            "CLV_INFRA_KAFKA_PARTITIONS": str(self.partitions),
            "CLV_INFRA_REDIS_PORT": str(r),
            "CLV_INFRA_PROM_PORT": str(p),
        }

    # addresses ------------------------------------------------------------------------------
    @property
    def kafka_bootstrap(self) -> str:
        return f"127.0.0.1:{self.env['CLV_INFRA_KAFKA_PORT']}"

    @property
    def kafka_sasl_bootstrap(self) -> str | None:
        return f"127.0.0.1:{self.env['CLV_INFRA_KAFKA_SASL_PORT']}" if self.sasl else None

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.env['CLV_INFRA_REDIS_PORT']}/0"

    @property
    def logs_dir(self) -> Path:
        return self.root / "infra" / "logs"

    # services.sh ----------------------------------------------------------------------------
    def _subprocess_env(self) -> dict[str, str]:
        base = {k: v for k, v in os.environ.items() if not k.startswith("CLV_INFRA_")}
        return {**base, **self.env}

    def run(self, *args: str, timeout: float = START_TIMEOUT_S, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [str(self.script), *args], env=self._subprocess_env(), capture_output=True,
            text=True, timeout=timeout, stdin=subprocess.DEVNULL,
        )
        if check and proc.returncode != 0:
            raise InfraError(
                f"infra/services.sh {' '.join(args)} failed (exit {proc.returncode}); "
                f"logs in {self.logs_dir}\n{proc.stdout}{proc.stderr}"
            )
        return proc

    def start(self, *services: str) -> None:
        self.run("start", *services)

    def stop(self, *services: str) -> None:
        self.run("stop", *services)

    def restart(self, service: str) -> None:
        """Graceful stop + start of ``kafka`` or ``redis``; data is kept. Returns when it answers."""
        self.run("restart", service)

    def kill(self, service: str) -> None:
        """SIGKILL (crash simulation); bring it back with ``start(service)``."""
        self.run("kill", service)

    def status(self) -> str:
        return self.run("status", check=False).stdout

    def launch(self, *services: str) -> None:
        """First start: retries on fresh ports when another process grabbed one meanwhile."""
        for attempt in range(3):
            try:
                self.start(*services)
                break
            except InfraError as exc:
                self.run("stop", check=False, timeout=120)
                text = str(exc)
                if attempt == 2 or ("already taken" not in text and "Address already in use" not in text):
                    raise
                self._pick_ports()
        self._start_watchdog()

    def _start_watchdog(self) -> None:
        # If pytest dies without running teardown (SIGKILL, OOM), stop the services anyway.
        script = 'while kill -0 "$1" 2>/dev/null; do sleep 2; done; exec "$2" stop'
        self._watchdog = subprocess.Popen(
            ["bash", "-c", script, "clv-infra-watchdog", str(os.getpid()), str(self.script)],
            env=self._subprocess_env(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, start_new_session=True,
        )

    def shutdown(self) -> None:
        try:
            self.run("stop", timeout=180)
        finally:
            if self._watchdog is not None:
                self._watchdog.terminate()
                self._watchdog.wait(timeout=10)
                self._watchdog = None

    # app side -------------------------------------------------------------------------------
    def settings(self, **overrides: Any):
        """``streams.settings.Settings`` pointing at this stack (kwargs win over env vars)."""
        from streams.settings import Settings

        base: dict[str, Any] = {
            "kafka_bootstrap": self.kafka_bootstrap,
            "redis_url": self.redis_url,
            "data_dir": self.data_dir,
            "topic_partitions": self.partitions,
        }
        base.update(overrides)
        return Settings(**base)

    def sasl_settings(self, **overrides: Any):
        """Settings for the SASL_PLAINTEXT listener (stack started with ``sasl=True``)."""
        if not self.sasl:
            raise InfraError("this stack has no SASL listener: start it with sasl=True")
        base: dict[str, Any] = {
            "kafka_bootstrap": self.kafka_sasl_bootstrap,
            "kafka_security_protocol": "SASL_PLAINTEXT",
            "kafka_sasl_mechanism": "PLAIN",
            "kafka_sasl_username": SASL_USER,
            "kafka_sasl_password": SASL_PASSWORD,
        }
        base.update(overrides)
        return self.settings(**base)

    def sasl_client_kwargs(self) -> dict[str, str]:
        """aiokafka client kwargs for the SASL_PLAINTEXT listener (PLAIN, test credentials)."""
        s = self.sasl_settings()
        return {
            "security_protocol": s.kafka_security_protocol,
            "sasl_mechanism": s.kafka_sasl_mechanism,
            "sasl_plain_username": s.kafka_sasl_username,
            "sasl_plain_password": s.kafka_sasl_password.get_secret_value(),
        }

    def admin(self, sasl: bool = False) -> KafkaAdmin:
        """Topic helper for this stack (``sasl=True``: through the SASL listener)."""
        if sasl:
            return KafkaAdmin(self.kafka_sasl_bootstrap, **self.sasl_client_kwargs())
        return KafkaAdmin(self.kafka_bootstrap)

    @staticmethod
    def unique_topics(prefix: str = "t") -> dict[str, str]:
        """Settings overrides with fresh topic names and consumer group, so tests never collide."""
        tag = f"{_TOPIC_CHARS.sub('-', prefix).strip('-.') or 't'}.{uuid.uuid4().hex[:10]}"
        names = ("clicks", "orders", "reviews", "profiles", "scores", "dlq")
        out = {f"topic_{n}": f"{tag}.{n}" for n in names}
        out["consumer_group"] = f"{tag}.group"
        return out


# --- topic admin ---------------------------------------------------------------------------------
class KafkaAdmin:
    """Create/delete/list topics with ``aiokafka.admin.AIOKafkaAdminClient``.

    Sync methods work from sync and async tests; ``a``-prefixed ones are coroutines.
    ``create`` returns only when every partition has a leader in the broker's metadata.
    """

    def __init__(self, bootstrap: str, **client_kwargs: Any) -> None:
        self.bootstrap = bootstrap
        self.client_kwargs = client_kwargs

    def _admin(self):
        from aiokafka.admin import AIOKafkaAdminClient

        return AIOKafkaAdminClient(bootstrap_servers=self.bootstrap, request_timeout_ms=30000,
                                   **self.client_kwargs)

    async def acreate(self, topics: Iterable[str], partitions: int = 4,
                      configs: dict[str, str] | None = None, exist_ok: bool = True) -> None:
        from aiokafka.admin import NewTopic
        from aiokafka.errors import TopicAlreadyExistsError

        topics = list(topics)
        admin = self._admin()
        await admin.start()
        try:
            existing = set(await admin.list_topics())
            new = [t for t in topics if t not in existing]
            if len(new) < len(topics) and not exist_ok:
                raise TopicAlreadyExistsError(f"exists already: {sorted(set(topics) - set(new))}")
            if new:
                resp = await admin.create_topics([
                    NewTopic(t, num_partitions=partitions, replication_factor=1,
                             topic_configs=dict(configs or {})) for t in new
                ])
                for name, code, *rest in getattr(resp, "topic_errors", []):
                    if code not in (0, 36):  # 36: TOPIC_ALREADY_EXISTS (a race with auto-create)
                        raise InfraError(f"create topic {name} failed: error {code} {rest}")
        finally:
            await admin.close()
        await self.await_leaders(topics)

    async def await_leaders(self, topics: Iterable[str], timeout_s: float = 30.0) -> None:
        from aiokafka.client import AIOKafkaClient

        topics = set(topics)
        client = AIOKafkaClient(bootstrap_servers=self.bootstrap, **self.client_kwargs)
        await client.bootstrap()
        try:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout_s
            while True:
                md = await client.fetch_all_metadata()
                missing = [t for t in topics
                           if not md.partitions_for_topic(t)
                           or any(md.leader_for_partition(_tp(t, p)) in (None, -1)
                                  for p in md.partitions_for_topic(t))]
                if not missing:
                    return
                if loop.time() > deadline:
                    raise InfraError(f"topics without leaders after {timeout_s}s: {missing}")
                await asyncio.sleep(0.2)
        finally:
            await client.close()

    async def adelete(self, topics: Iterable[str]) -> None:
        admin = self._admin()
        await admin.start()
        try:
            existing = set(await admin.list_topics())
            victims = [t for t in topics if t in existing]
            if victims:
                await admin.delete_topics(victims)
        finally:
            await admin.close()

    async def alist(self) -> set[str]:
        admin = self._admin()
        await admin.start()
        try:
            return set(await admin.list_topics())
        finally:
            await admin.close()

    async def apartitions(self, topic: str) -> int:
        admin = self._admin()
        await admin.start()
        try:
            (desc,) = await admin.describe_topics([topic])
            return len(desc["partitions"])
        finally:
            await admin.close()

    def create(self, topics: Iterable[str], partitions: int = 4,
               configs: dict[str, str] | None = None, exist_ok: bool = True) -> None:
        run_sync(self.acreate(topics, partitions, configs, exist_ok))

    def create_for(self, settings: Any, partitions: int | None = None) -> list[str]:
        """Create every topic a ``Settings`` names (4 event topics, scores, dlq)."""
        topics = [*settings.event_topics, settings.topic_scores, settings.topic_dlq]
        self.create(topics, partitions or settings.topic_partitions)
        return topics

    def delete(self, topics: Iterable[str]) -> None:
        run_sync(self.adelete(topics))

    def list(self) -> set[str]:
        return run_sync(self.alist())

    def partitions(self, topic: str) -> int:
        return run_sync(self.apartitions(topic))


def _tp(topic: str, partition: int):
    from aiokafka.structs import TopicPartition

    return TopicPartition(topic, partition)


# --- fixtures -------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def anyio_backend() -> str:
    """``@pytest.mark.anyio`` tests run on asyncio only (the product runs on asyncio/uvloop)."""
    return "asyncio"


@pytest.fixture(scope="session")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InfraStack]:
    """Kafka + Redis for the whole session, on free ports, in a pytest tmp dir."""
    stack = InfraStack(tmp_path_factory.mktemp("services"))
    try:
        stack.launch("kafka", "redis")
        yield stack
    finally:
        stack.shutdown()


@pytest.fixture
def infra_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """``start(*services, sasl=False, partitions=4) -> InfraStack``: extra isolated stacks,
    all stopped when the test ends."""
    stacks: list[InfraStack] = []

    def start(*names: str, sasl: bool = False, partitions: int = 4) -> InfraStack:
        stack = InfraStack(tmp_path_factory.mktemp("stack"), sasl=sasl, partitions=partitions)
        stacks.append(stack)
        stack.launch(*(names or ("kafka", "redis")))
        return stack

    try:
        yield start
    finally:
        errors = []
        for stack in stacks:
            try:
                stack.shutdown()
            except Exception as exc:  # stop the others anyway
                errors.append(exc)
        if errors:
            raise errors[0]


@pytest.fixture
def redis_client(services: InfraStack) -> Iterator[Any]:
    import redis

    client = redis.Redis.from_url(services.redis_url)
    client.flushdb()
    try:
        yield client
    finally:
        client.close()


@pytest.fixture(scope="session")
def kafka_admin(services: InfraStack) -> KafkaAdmin:
    return services.admin()


ENGINES = ("faust", "kafka")


@pytest.fixture(params=ENGINES)
def engine(request: pytest.FixtureRequest) -> str:
    """Run a worker test once per consuming engine (``CLV_ENGINE``): the Faust agents and the
    aiokafka consumer-group loop promise the same guarantees, so the same test must hold."""
    return request.param
