"""Redis memory per user: state + score + roll-ups (+ review embedding), 100k users.

    .venv/bin/python bench/redis_memory.py [--users 100000] [--runs 2] [--json OUT]

Realistic folded states: a year of a simulated shop (``--sim-users`` customers) is folded per
user with ``streams.fold`` (offset watermarks set as the worker sets them); the 100k Redis
users cycle through those states, each scored (clv, p, segment, model version, time), and are
written with ``streams.store.RedisStore.save_many`` exactly as the worker writes them (user
hash, the ``clv:v1:top`` zset of the top users and the ``clv:v1:hist`` CLV histogram). Per user
= ``INFO memory used_memory`` after - before, / users.

Variants: embeddings as the simulation has them (users who wrote review text carry the
384 x float16 running mean), no embeddings, every user with one; and the same with Redis'
``hash-max-listpack-value`` raised from 64 to 1024 bytes, so a user hash whose state blob is
~220 bytes stays a compact listpack instead of a hashtable (the variant is set with CONFIG SET
on this instance and restored afterwards). ``OBJECT ENCODING`` of a sample key is shown.
"""
from __future__ import annotations

import asyncio
import random
from pathlib import Path

import typer

from common import Report, load, stack

from streams.keys import TOP_KEEP

app = typer.Typer(add_completion=False)
TARGET_BYTES = 512
MODEL_VERSION = "20261129T0500Z-ab12cd"  # registry versions look like this


def folded_states(sim_users: int, seed: int = 5):
    """(states, share with review text) from a year of a simulated shop, watermarks set."""
    import time

    import numpy as np

    from streams.fold import TEXT_DIM, apply, new_state
    from streams.events import Review
    from streams.simulate import simulate

    sim = simulate(n_users=sim_users, start=time.time() - 366 * 86400, days=365, seed=seed)
    states: dict = {}
    texts: set = set()
    offsets = [0, 0, 0, 0]
    topic = {"click": 0, "order": 1, "review": 2, "profile": 3}
    for ev in sim.iter_events():
        st = states.get(ev.user_id)
        if st is None:
            st = states[ev.user_id] = new_state()
        t = topic[ev.type]
        offsets[t] += 1
        emb = None
        if isinstance(ev, Review) and ev.text:
            texts.add(ev.user_id)
            v = np.random.default_rng(offsets[t]).standard_normal(TEXT_DIM).astype(np.float32)
            emb = v / np.linalg.norm(v)
        apply(st, ev, emb=emb, pos=(t, offsets[t]))
    return list(states.values()), len(texts) / max(1, len(states))


async def _write(settings, states, users: int, emb_mode: str) -> dict:
    import numpy as np

    from streams.store import RedisStore, Score, Update, redis_client
    from streams.fold import TEXT_DIM

    store = RedisStore(redis_client(settings), settings.redis_prefix)
    r = store.r
    rng = random.Random(1)
    unit = np.ones(TEXT_DIM, np.float32) / np.sqrt(TEXT_DIM)
    await r.execute_command("MEMORY", "PURGE")
    before = int((await r.info("memory"))["used_memory"])
    chunk = []
    segs = ("vip", "high", "mid", "low", "lapsing")
    blob_bytes = 0
    for i in range(users):
        st = states[i % len(states)].copy()
        if emb_mode == "none":
            st.emb = None
        elif emb_mode == "all" and st.emb is None:
            st.emb = unit.copy()
        sc = Score(rng.lognormvariate(4, 1.5), rng.random(), rng.choice(segs), MODEL_VERSION,
                   1.7e9 + rng.random() * 1e7)
        chunk.append(Update(f"u{i:07d}", st, 0, sc))
        if len(chunk) == 1000:
            assert not await store.save_many(chunk)
            chunk = []
    if chunk:
        assert not await store.save_many(chunk)
    await r.execute_command("MEMORY", "PURGE")
    after = int((await r.info("memory"))["used_memory"])
    sample = [store.keys.user(f"u{i:07d}") for i in sorted(random.Random(7).sample(range(users), min(200, users)))]
    key_bytes = [int(await r.execute_command("MEMORY", "USAGE", k, "SAMPLES", "0")) for k in sample]
    enc = await r.object("encoding", sample[0])
    enc = enc.decode() if isinstance(enc, bytes) else str(enc)
    zset = sum([int(await r.execute_command("MEMORY", "USAGE", k, "SAMPLES", "0") or 0)
                for k in (store.keys.top, store.keys.hist, store.keys.top_floor)])
    for k in sample[:50]:
        blob_bytes += len(await r.hget(k, "s"))
    with_emb = sum([bool(await r.hexists(k, "e")) for k in sample])
    # clean up this variant's keys
    cursor = 0
    while True:
        cursor, keys = await r.scan(cursor, match=f"{settings.redis_prefix}:*", count=5000)
        if keys:
            await r.unlink(*keys)
        if cursor == 0:
            break
    await r.aclose()
    return {"per_user": (after - before) / users, "key_avg": sum(key_bytes) / len(key_bytes),
            "zset_per_user": zset / users, "encoding": enc, "blob": blob_bytes / 50,
            "emb_share": with_emb / len(sample)}


@app.command()
def main(users: int = typer.Option(100_000), sim_users: int = typer.Option(3000),
         runs: int = typer.Option(2, min=1), json_out: Path = typer.Option(None, "--json")) -> None:
    import redis

    states, text_share = folded_states(sim_users)
    rep = Report(f"Redis memory per user ({users:,} users: state + score + top/hist roll-ups)",
                 ["hash-max-listpack-value", "embeddings", "run", "bytes/user (used_memory)",
                  "user hash (MEMORY USAGE)", "top+hist per user", "hash encoding", "state blob", "users with emb",
                  "load"])
    best: dict = {}
    with stack(need_kafka=False) as svc:
        sync = redis.Redis.from_url(svc.redis_url)
        old = sync.config_get("hash-max-listpack-value")["hash-max-listpack-value"]
        try:
            for lp in ("64", "1024"):  # Redis' default, and what infra/redis/redis.conf.tmpl sets
                sync.config_set("hash-max-listpack-value", lp)
                for mode in ("as simulated", "none", "all"):
                    for run in range(runs):
                        s = svc.fresh("mem")
                        m = asyncio.run(_write(s, states, users, {"as simulated": "sim"}.get(mode, mode)))
                        rep.add(lp, mode, run + 1, m["per_user"], m["key_avg"], m["zset_per_user"], m["encoding"],
                                m["blob"], f"{100 * m['emb_share']:.0f} %", load())
                        best[(lp, mode)] = min(best.get((lp, mode), 1e9), m["per_user"])
        finally:
            sync.config_set("hash-max-listpack-value", old)
            sync.close()
    for (lp, mode), v in best.items():
        if mode in ("none", "as simulated"):
            rep.target(f"bytes/user, listpack-value {lp}, embeddings {mode}", f"<= {TARGET_BYTES}", f"{v:.0f}",
                       v <= TARGET_BYTES)
    rep.notes.append(f"states: {len(states):,} users of a simulated year folded; {100 * text_share:.1f} % of them "
                     "wrote review text (an embedding is 384 x float16 = 768 bytes on its own)")
    rep.notes.append("bytes/user = used_memory delta / users (MEMORY PURGE before each reading); user hash = mean "
                     "MEMORY USAGE of 200 sampled keys (key + hash); top+hist = MEMORY USAGE of the top zset "
                     f"(<= {TOP_KEEP:,} users), its floor and the histogram hash, / users")
    rep.show()
    rep.save(json_out)


if __name__ == "__main__":
    app()
