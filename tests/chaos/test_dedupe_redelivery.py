"""The double count the kill test found, pinned down without Kafka (seconds, no services).

A producer duplicate (same event_id, a later offset) is dropped by the event-id ring. Before
the fix the drop left the per-topic offset watermark behind, so once the user's events on
*other* topics had rotated the ring (8 ids), a crash-redelivery of that duplicate record was
judged by the ring alone and folded a second time (an order counted twice).
"""
from __future__ import annotations

import asyncio

import pytest

from streams.events import encode, parse
from streams.fold import apply, new_state
from streams.pipeline import Pipeline, Record
from streams.settings import Settings
from streams.store import MemoryStore

pytestmark = pytest.mark.chaos
S = Settings(_env_file=None)
T0 = 1.7e9


def _order(eid="o1"):
    return parse({"event_id": eid, "user_id": "u1", "ts": T0, "type": "order", "order_id": "x",
                  "amount": 10.0})


def _click(i):
    return parse({"event_id": f"c{i}", "user_id": "u1", "ts": T0 + i, "type": "click", "action": "view"})


def test_fold_duplicate_moves_the_watermark():
    s = new_state()
    o = _order()
    assert apply(s, o, pos=(1, 10)) is True
    assert apply(s, o, pos=(1, 12)) is False  # producer duplicate, caught by the ring
    for i in range(10):  # rotate the ring with events of another topic
        apply(s, _click(i), pos=(0, 100 + i))
    assert apply(s, o, pos=(1, 12)) is False  # redelivery of the duplicate record
    assert s.get("n_orders") == 1 and s.get("n_events") == 11


def test_pipeline_saves_the_watermark_of_a_duplicate_only_batch():
    store = MemoryStore()
    pipe = Pipeline(S, store)
    o = encode(_order())
    order = lambda off: Record(S.topic_orders, 0, off, b"u1", o)  # noqa: E731

    async def go():
        await pipe.process([order(10)])
        dup = await pipe.process([order(12)])  # only a duplicate: nothing applied ...
        assert dup.n_applied == 0 and dup.n_duplicates == 1
        await pipe.process([Record(S.topic_clicks, 0, 100 + i, b"u1", encode(_click(i))) for i in range(10)])
        again = await pipe.process([order(12)])  # ... but its redelivery must still be a duplicate
        return again, (await store.load_many(["u1"]))["u1"].state

    again, st = asyncio.run(go())
    assert again.n_applied == 0 and again.n_duplicates == 1
    assert st.get("n_orders") == 1 and st.get("n_events") == 11
