"""Rebuild every user's state from the archive through the fold (after a state-version or
encoder change, or to repair Redis). Stop the workers first: this overwrites state.

The archived Kafka positions (topic, offset) are folded in too, so the rebuilt watermarks make
a later redelivery of those records a no-op, exactly as if the worker had folded them."""
from __future__ import annotations

import time
from collections import defaultdict

from streams.archive import read_table
from streams.events import Rejection, Review, decode
from streams.fold import apply, features_batch, new_state, text_batch
from streams.store import Score, Update


async def replay_archive(settings, store, model=None, batch: int = 2000, progress=None) -> tuple[int, int]:
    """Returns (users written, events folded)."""
    table = read_table(settings.archive_dir)
    t_index = {t: i for i, t in enumerate(settings.event_topics)}
    per_user: dict[str, list] = defaultdict(list)
    far = time.time() + 10 * 365 * 86400
    for raw, topic, off in zip(table.column("payload").to_pylist(), table.column("topic").to_pylist(),
                               table.column("offset").to_pylist()):
        ev = decode(raw, now=far)
        if isinstance(ev, Rejection) or topic not in t_index:
            raise ValueError(f"archive row {topic}@{off} does not decode or is from an unknown topic")
        per_user[ev.user_id].append((ev, (t_index[topic], off)))
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
        states = {}
        for u in chunk:
            st = new_state()
            for ev, pos in sorted(per_user[u], key=lambda x: x[1]):  # per topic in offset order
                folded += apply(st, ev, emb=embs.get(id(ev)), pos=pos)
            states[u] = st
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
