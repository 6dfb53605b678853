"""Rebuild every user's state from the archive through the fold (after a state-version or
encoder change, or to repair Redis). Stop the workers first: this overwrites state.

The archived Kafka positions (topic, offset) are folded in too, so the rebuilt watermarks make
a later redelivery of those records a no-op, exactly as if the worker had folded them.

One process (``replay_archive``) or one Dask task per user partition (``replay_dask``): each
task reads its users' rows only and writes them to Redis itself through the store API."""
from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from functools import lru_cache

from streams.archive import read_partition, read_table
from streams.events import Rejection, Review, decode
from streams.fold import apply, features_batch, new_state, text_batch
from streams.store import Score, Update


def group_rows(table, topics) -> dict[str, list]:
    """Archive rows (``read_table`` order) as {user: [(event, (topic index, offset))]}."""
    t_index = {t: i for i, t in enumerate(topics)}
    per_user: dict[str, list] = defaultdict(list)
    far = time.time() + 10 * 365 * 86400
    for raw, topic, off in zip(table.column("payload").to_pylist(), table.column("topic").to_pylist(),
                               table.column("offset").to_pylist()):
        ev = decode(raw, now=far)
        if isinstance(ev, Rejection) or topic not in t_index:
            raise ValueError(f"archive row {topic}@{off} does not decode or is from an unknown topic")
        per_user[ev.user_id].append((ev, (t_index[topic], off)))
    return per_user


def fold_users(per_user: dict[str, list], users, embs: dict | None = None) -> tuple[dict, int]:
    """Each user's state from their rows, per topic in offset order. Returns (states, folded)."""
    states, folded = {}, 0
    embs = embs or {}
    for u in users:
        st = new_state()
        for ev, pos in sorted(per_user[u], key=lambda x: x[1]):
            folded += apply(st, ev, emb=embs.get(id(ev)), pos=pos)
        states[u] = st
    return states, folded


async def replay_archive(settings, store, model=None, batch: int = 2000, progress=None) -> tuple[int, int]:
    """Returns (users written, events folded)."""
    return await replay_table(read_table(settings.archive_dir), settings, store, model, batch, progress)


async def replay_table(table, settings, store, model=None, batch: int = 2000, progress=None) -> tuple[int, int]:
    """Fold and write the users of ``table`` (rows in ``read_table`` order)."""
    per_user = group_rows(table, settings.event_topics)
    users = sorted(per_user)
    written = folded = 0
    for i in range(0, len(users), batch):
        chunk = users[i:i + batch]
        embs = {}
        if model is not None and model.encoder is not None:
            reviews = [ev for u in chunk for ev, _ in per_user[u] if isinstance(ev, Review) and ev.text]
            for j in range(0, len(reviews), 256):
                part = reviews[j:j + 256]
                embs.update({id(r): v for r, v in zip(part, model.encode([r.text for r in part]))})
        states, n = fold_users(per_user, chunk, embs)
        folded += n
        pending = chunk
        for _ in range(10):
            vers = await store.versions(pending)  # old blobs may be unreadable: that is why we rebuild
            scores = {}
            if model is not None:
                sts = [states[u] for u in pending]
                sc = model.score(features_batch(sts, [s.v[1] for s in sts]), text_batch(sts))
                now = time.time()
                scores = {u: Score(float(sc.expected_clv[k]), float(sc.p_repeat[k]), sc.segments[k],
                                   sc.model_version, now) for k, u in enumerate(pending)}
            ups = [Update(u, states[u], vers[u], scores.get(u)) for u in pending]
            conflicts = await store.save_many(ups)
            written += len(ups) - len(conflicts)
            pending = conflicts
            if not pending:
                break
        if progress:
            progress(written)
    return written, folded


@lru_cache(maxsize=2)
def _scorer(path: str, providers: str):
    from serving.scorer import Scorer, pick_providers

    return Scorer(path, pick_providers(providers))


def replay_partition(part: int, n_parts: int, settings, model_path: str | None, batch: int = 2000) -> dict:
    """One Dask task: replay the users of partition ``part`` into Redis (from the worker)."""
    from streams.distributed import peak_rss_mb
    from streams.store import RedisStore

    table = read_partition(settings.archive_dir, part, n_parts)
    model = _scorer(model_path, settings.onnx_providers) if model_path else None

    async def run():
        store = RedisStore.from_settings(settings)
        try:
            return await replay_table(table, settings, store, model, batch)
        finally:
            await store.r.aclose()

    users, folded = asyncio.run(run())
    return {"part": part, "rows": len(table), "users": users, "events": folded, "peak_rss_mb": peak_rss_mb()}


def replay_dask(settings, client, model_path: str | None = None, n_parts: int = 0) -> tuple[int, int, list[dict]]:
    """``replay_archive`` on a Dask cluster. Returns (users written, events folded, per-task figures)."""
    from streams.distributed import n_partitions, run_partitions

    parts = run_partitions(client, replay_partition, n_partitions(client, n_parts or settings.dask_partitions),
                           settings, model_path, desc="replay")
    return sum(p["users"] for p in parts), sum(p["events"] for p in parts), parts
