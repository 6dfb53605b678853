"""Do the prototype workers keep the streaming core's guarantees? The checks of
tests/integration/test_worker.py::test_stream_to_redis_equals_offline_fold, on any variant.

    .venv/bin/python bench/prototypes/verify.py ["clv worker --engine kafka" "proto: one agent + drain patch" ...]

For each variant: 300 simulated users' events with 3 % producer duplicates and 1 % bad messages
are published, one worker drains them, and then: every user's Redis state equals the offline
fold of the same events; the DLQ holds every bad message with its reason and original bytes;
the stats counters are exact; the archive holds every valid event exactly once.
"""
from __future__ import annotations

import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # repo

from common import create_topics, stack  # noqa: E402


def check(svc, variant: str) -> str:
    import redis

    from streams.simulate import DUPLICATE, EVENT, mix, publish, simulate
    from tests.integration.test_worker import assert_outputs_exact
    from workers import drain, VARIANTS, Proc

    sim = simulate(n_users=300, start="2025-01-01", days=120, seed=11)
    s = svc.fresh("verify", archive_within_s=0.5, batch_within_s=0.02, data_dir=svc.root / variant.replace(" ", "_"))
    create_topics(s, 4)
    events = list(sim.iter_events())
    msgs = list(mix(events, duplicates=0.03, bad=0.01, seed=5, users=300))
    n_dup = sum(m.label == DUPLICATE for m in msgs)
    bad = [m for m in msgs if m.label not in (EVENT, DUPLICATE)]
    res = asyncio.run(publish(msgs, s))
    assert res.delivered == len(msgs), res.as_dict()
    w = Proc(VARIANTS[variant], s, svc.root / "verify.log", {"CLV_WORKER_WEB_PORT": "0"}).start()
    r = redis.Redis.from_url(s.redis_url)
    try:
        drain(s, len(msgs), [w], timeout=240)
        n_users, _ = assert_outputs_exact(s, r, events, msgs, bad, n_dup)
        return (f"OK: {len(events)} events, {n_dup} duplicates, {len(bad)} bad -> state of {n_users} users "
                f"= offline fold; DLQ, stats and archive exact")
    finally:
        w.stop()
        r.close()


def main(variants: list[str]) -> int:
    variants = variants or ["clv worker --engine kafka", "proto: one agent + drain patch"]
    failed = 0
    with stack() as svc:
        for v in variants:
            try:
                print(f"{v}: {check(svc, v)}", flush=True)
            except AssertionError as exc:
                failed += 1
                print(f"{v}: FAILED: {exc}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
