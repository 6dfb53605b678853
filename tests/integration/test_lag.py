"""Consumer lag read straight from a real Kafka: lag_snapshot, the Prometheus gauges set by
LagMonitor, and the `clv lag` command."""
from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest
from prometheus_client import REGISTRY

from serving.lag import KafkaUnavailable, LagMonitor, PartitionLag, lag_snapshot
from tests.integration.ops_helpers import commit, create_topics, produce, settings_env, unique

pytestmark = pytest.mark.integration

# topic A: 3 partitions with 10/20/30 records; the group committed 4 and 20 on 0 and 1,
# nothing on 2. Topic B: 2 partitions with 5/0 records, nothing committed.
PRODUCED = {0: 10, 1: 20, 2: 30}
COMMITTED = {0: 4, 1: 20}


def make_lagged(services):
    a, b, group = unique("lag-a"), unique("lag-b"), unique("grp")
    bs = services.kafka_bootstrap

    async def setup():
        await create_topics(bs, {a: 3, b: 2})
        await produce(bs, {**{(a, p): n for p, n in PRODUCED.items()}, (b, 0): 5})
        await commit(bs, group, {(a, p): o for p, o in COMMITTED.items()})

    asyncio.run(setup())
    settings = services.settings(topic_clicks=a, topic_orders=b, topic_reviews=unique("absent"),
                                 topic_profiles=unique("absent"), consumer_group=group)
    return settings, a, b, group


@pytest.fixture(scope="module")
def lagged(services):
    return make_lagged(services)


def expected(a: str, b: str) -> list[PartitionLag]:
    return [
        PartitionLag(a, 0, 10, 4, 6, 0),
        PartitionLag(a, 1, 20, 20, 0, 0),
        PartitionLag(a, 2, 30, None, 30, 0),  # nothing committed: all retained records
        PartitionLag(b, 0, 5, None, 5, 0),
        PartitionLag(b, 1, 0, None, 0, 0),
    ]


def test_lag_snapshot_reads_end_and_committed_offsets(lagged):
    settings, a, b, _ = lagged
    # the two topics that do not exist are left out (and are not auto-created)
    assert asyncio.run(lag_snapshot(settings)) == expected(a, b)
    assert asyncio.run(lag_snapshot(settings, topics=[a])) == expected(a, b)[:3]


def test_lag_for_a_group_that_never_committed(lagged):
    settings, a, b, _ = lagged
    lags = asyncio.run(lag_snapshot(settings, group=unique("never")))
    assert [(p.committed, p.lag) for p in lags] == [(None, 10), (None, 20), (None, 30), (None, 5), (None, 0)]


def test_monitor_sets_the_kafka_exporter_gauges(lagged):
    settings, a, b, group = lagged

    async def poll():
        mon = LagMonitor(settings, interval=0.1)
        task = asyncio.create_task(mon.run())
        for _ in range(100):
            if mon.last:
                break
            await asyncio.sleep(0.05)
        await mon.stop()
        await task
        return mon.last

    assert asyncio.run(poll()) == expected(a, b)
    g = REGISTRY.get_sample_value
    assert g("kafka_consumergroup_lag", {"consumergroup": group, "topic": a, "partition": "0"}) == 6
    assert g("kafka_consumergroup_lag", {"consumergroup": group, "topic": a, "partition": "2"}) == 30
    assert g("kafka_consumergroup_lag_sum", {"consumergroup": group, "topic": a}) == 36
    assert g("kafka_consumergroup_lag_sum", {"consumergroup": group, "topic": b}) == 5
    assert g("kafka_topic_partition_current_offset", {"topic": a, "partition": "1"}) == 20
    assert g("kafka_consumergroup_current_offset", {"consumergroup": group, "topic": a, "partition": "0"}) == 4
    assert g("kafka_consumergroup_current_offset", {"consumergroup": group, "topic": a, "partition": "2"}) == -1
    assert g("clv_lag_poll_timestamp_seconds") > 0


def test_monitor_survives_kafka_being_unreachable(services):
    settings = services.settings(kafka_bootstrap="127.0.0.1:1")
    before = REGISTRY.get_sample_value("clv_lag_poll_errors_total") or 0

    async def go():
        mon = LagMonitor(settings, interval=0.05)
        with pytest.raises(KafkaUnavailable, match="infra/services.sh start"):
            await mon.poll_once()
        task = asyncio.create_task(mon.run())
        await asyncio.sleep(0.3)
        await mon.stop()
        await task  # run() ended cleanly: an outage never kills the loop

    asyncio.run(go())
    assert REGISTRY.get_sample_value("clv_lag_poll_errors_total") >= before + 2


def run_cli(settings, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**settings_env(settings), "COLUMNS": "160"}
    return subprocess.run([sys.executable, "-c", "from clv_cli import app; app()", *args],
                          env=env, capture_output=True, text=True, timeout=timeout)


def test_clv_lag_prints_the_table_with_rates(services):
    settings, a, b, group = make_lagged(services)  # its own topics: this test moves offsets
    import threading

    # While `clv lag` samples, traffic goes on: a record every 0.2 s on a/0 and b/1, and the
    # group keeps committing a/0 two records behind its end.
    stop = threading.Event()

    def traffic():
        async def go():
            end = PRODUCED[0]
            while not stop.is_set():
                await produce(services.kafka_bootstrap, {(a, 0): 1, (b, 1): 1})
                end += 1
                await commit(services.kafka_bootstrap, group, {(a, 0): end - 2})
                await asyncio.sleep(0.2)

        asyncio.run(go())

    t = threading.Thread(target=traffic)
    t.start()
    try:
        out = run_cli(settings, "lag", "--interval", "3")
    finally:
        stop.set()
        t.join()
    assert out.returncode == 0, out.stderr + out.stdout
    rows = {}
    for line in out.stdout.splitlines():
        cells = [c.strip() for c in line.strip("│┃ ").split("│")]
        if len(cells) == 8:
            rows[(cells[0], cells[1])] = cells
    num = lambda s: float(s.replace(",", ""))  # noqa: E731
    end, committed, lag_ = (num(x) for x in rows[(a, "0")][2:5])
    assert lag_ == end - committed and end > PRODUCED[0]
    assert num(rows[(a, "0")][5]) > 0 and num(rows[(a, "0")][6]) > 0  # consumed/s, produced/s
    assert rows[(a, "1")][2:5] == ["20", "20", "0"] and rows[(a, "1")][7] == "caught up"
    assert rows[(a, "2")][2:] == ["30", "none", "30", "0.0", "0.0", "never (not consuming)"]
    assert rows[(b, "0")][2:5] == ["5", "none", "5"]
    assert rows[(b, "1")][3] == "none" and num(rows[(b, "1")][4]) == num(rows[(b, "1")][2]) > 0
    assert num(rows[(b, "1")][6]) > 0  # produced/s
    total = sum(num(r[4]) for k, r in rows.items() if k[0] in (a, b))
    assert num(rows[("total", "")][4]) == total


def test_clv_lag_says_what_to_start_when_kafka_is_down(services):
    out = run_cli(services.settings(kafka_bootstrap="127.0.0.1:1"), "lag", "--interval", "0",
                  timeout=60)
    assert out.returncode == 2
    text = " ".join((out.stdout + out.stderr).split())
    assert "127.0.0.1:1" in text and "infra/services.sh start" in text
    assert "Traceback" not in text


def test_lag_over_sasl(infra_factory):
    """Settings' SASL credentials reach both lag clients (admin and offsets consumer)."""
    stack = infra_factory("kafka", sasl=True)
    settings = stack.sasl_settings(**stack.unique_topics("sasl-lag"))
    stack.admin(sasl=True).create([settings.topic_clicks], partitions=2)
    lags = asyncio.run(lag_snapshot(settings))
    assert [(p.topic, p.partition, p.end, p.committed, p.lag) for p in lags] == \
        [(settings.topic_clicks, 0, 0, None, 0), (settings.topic_clicks, 1, 0, None, 0)]
    wrong = settings.model_copy(update={"kafka_sasl_password": None})
    with pytest.raises(KafkaUnavailable):
        asyncio.run(lag_snapshot(wrong, timeout_s=5))
