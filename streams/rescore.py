"""Rescore every user in Redis with the current model (after a promotion, or on a schedule
so that scores of inactive users age: ``as_of`` defaults to each user's last event time;
pass ``as_of`` to score everyone as of one moment, e.g. now)."""
from __future__ import annotations

import logging
import time

from streams.fold import T_LAST, features_batch, text_batch
from streams.store import RedisStore, Score, Update

log = logging.getLogger("clv.rescore")


async def rescore_all(store: RedisStore, model, batch: int = 1000, as_of: float | None = None,
                      progress=None) -> int:
    """Returns the number of users rescored. Safe while workers run (compare-and-set). The top
    set is rebuilt from the new scores (it is incomplete until the scan ends)."""
    await store.reset_top()
    n = 0
    pattern = store.keys.user("*")
    strip = len(store.keys.user(""))
    cursor = 0
    while True:
        cursor, keys = await store.r.scan(cursor=cursor, match=pattern, count=batch)
        uids = [k.decode()[strip:] for k in keys]
        for _ in range(10):  # users a worker changed meanwhile are retried
            if not uids:
                break
            loaded = await store.load_many(uids)
            rows = [(u, l) for u, l in loaded.items() if l.state is not None]
            if not rows:
                break
            states = [l.state for _, l in rows]
            when = [as_of or s.v[T_LAST] for s in states]
            sc = model.score(features_batch(states, when), text_batch(states))
            now = time.time()
            updates = [
                Update(u, l.state, l.ver, Score(float(sc.expected_clv[i]), float(sc.p_repeat[i]),
                                               sc.segments[i], sc.model_version, now))
                for i, (u, l) in enumerate(rows)
            ]
            conflicts = await store.save_many(updates)
            n += len(updates) - len(conflicts)
            uids = conflicts
        if progress:
            progress(n)
        if cursor == 0:
            return n
