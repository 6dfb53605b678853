"""The ops page: ``GET /ops`` (static HTML + plain JS, no CDN) polls ``GET /ops/data`` every
2 s. What it shows, and where each number comes from:

* lag per partition: Kafka itself (``serving.lag.LagReader``; one shared reader, cached 1 s);
* throughput and DLQ counts: the worker's counters in the ``clv:v1:stats`` hash (the page
  computes rates from successive polls);
* model: the registry's CHAMPION and the ``mv`` the worker wrote most recently (the stats
  field ``mv`` when the worker keeps it, else the newest ``at`` among the top users);
* CLV distribution: the ``clv:v1:hist`` hash (users per 1-2-5 log-spaced bucket, kept exact by
  the worker's save script, ``streams.store``), shown up to the highest non-empty bucket;
* top 20 users: ZREVRANGE WITHSCORES of the ``clv:v1:top`` zset, which holds every user whose
  CLV is above ``clv:v1:top:floor`` (the ``TOP_KEEP`` = 10,000 highest, give or take; see
  docs/redis.md), so its top 20 are the top 20 of all users.

Read-only, like the rest of the API. With ``CLV_API_TOKEN`` set, /ops/data needs the bearer
token; the page takes it from the URL fragment (``/ops#token=...``, never sent to the server
as part of the URL, so never in access logs).
"""
from __future__ import annotations

import asyncio
import logging
import math
import time
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.responses import HTMLResponse

from serving.registry import Registry
from streams.keys import F_AT, F_MV, F_P, F_SEG, HIST_EDGES, Keys
from streams.settings import Settings

log = logging.getLogger(__name__)
STATIC = Path(__file__).with_name("static")
TOP_N = 20
LAG_CACHE_S = 1.0
LAG_TIMEOUT_S = 2.0
STAT_FIELDS = ("events", "processed", "duplicates", "dlq")


def _num(v) -> float | int | None:
    if v is None:
        return None
    f = float(v)
    return int(f) if f.is_integer() and abs(f) < 2**53 else f


def histogram(raw: dict) -> tuple[int, list[dict]]:
    """(users, buckets) from the ``hist`` hash: buckets up to the highest non-empty one."""
    counts = {int(k): int(v) for k, v in raw.items()}
    nonzero = [i for i, c in counts.items() if c]
    if not nonzero:
        return 0, []
    buckets = [{"lo": 0.0 if i == 0 else HIST_EDGES[i - 1],
                "hi": HIST_EDGES[i] if i < len(HIST_EDGES) else None,
                "count": counts.get(i, 0)} for i in range(max(nonzero) + 1)]
    return sum(counts.values()), buckets


async def _redis_part(r, keys: Keys) -> dict:
    p = r.pipeline(transaction=False)
    p.hgetall(keys.stats)
    p.hgetall(keys.hist)
    p.zcard(keys.top)
    p.get(keys.top_floor)
    p.zrevrange(keys.top, 0, TOP_N - 1, withscores=True)
    stats_raw, hist_raw, n_top, floor, top = await p.execute()
    stats = {k.decode(): v.decode() for k, v in stats_raw.items()}
    n_users, buckets = histogram(hist_raw)

    top = [(u.decode(), float(s)) for u, s in top]
    p = r.pipeline(transaction=False)
    for uid, _ in top:
        p.hmget(keys.user(uid), F_SEG, F_P, F_MV, F_AT)
    details = await p.execute()
    rows, newest = [], (None, -math.inf)
    for (uid, score), (seg, pr, mv, at) in zip(top, details):
        row = {"user_id": uid, "clv": score,
               "segment": seg.decode() if seg else None,
               "p_repeat": float(pr) if pr is not None else None,
               "model_version": mv.decode() if mv else None,
               "scored_at": float(at) if at is not None else None}
        rows.append(row)
        if row["model_version"] and (row["scored_at"] or 0) > newest[1]:
            newest = (row["model_version"], row["scored_at"] or 0)

    dlq_by_reason = {k.split(":", 1)[1]: _num(v) for k, v in stats.items() if k.startswith("dlq:")}
    out_stats = {k: _num(stats.get(k)) for k in STAT_FIELDS}  # None: the worker keeps no such field
    out_stats["ts_last"] = _num(stats.get("ts_last"))
    out_stats["dlq_by_reason"] = dict(sorted(dlq_by_reason.items(), key=lambda kv: -(kv[1] or 0)))
    if stats.get("mv"):
        latest, source = stats["mv"], "worker stats"
    elif newest[0]:
        latest, source = newest[0], "newest score among the top users"
    else:
        latest, source = None, None
    return {
        "stats": out_stats,
        "latest_mv": latest, "latest_mv_source": source,
        "distribution": {"users": n_users, "max": top[0][1] if top else None, "buckets": buckets},
        "top": rows,
        # the top list covers every user above the floor (None: every scored user)
        "top_tracked": {"users": int(n_top), "floor": float(floor) if floor is not None else None},
    }


async def _lag_part(app: FastAPI, settings: Settings) -> dict:
    from serving.lag import KafkaUnavailable, LagReader

    st = app.state
    now = time.monotonic()
    cached = getattr(st, "ops_lag_cache", None)
    if cached is not None and now - cached[0] < LAG_CACHE_S:
        return cached[1]
    if getattr(st, "ops_lag", None) is None:
        st.ops_lag = LagReader(settings, timeout_s=LAG_TIMEOUT_S)
    try:
        lags = await st.ops_lag.read()
        topics: dict[str, int] = {}
        for pl in lags:
            topics[pl.topic] = topics.get(pl.topic, 0) + pl.lag
        out = {"ok": True, "error": None, "partitions": [pl.as_dict() for pl in lags],
               "topics": topics, "total": sum(topics.values()),
               "missing_topics": [t for t in settings.event_topics if t not in topics]}
    except KafkaUnavailable as exc:
        out = {"ok": False, "error": str(exc), "partitions": [], "topics": {}, "total": None,
               "missing_topics": []}
    st.ops_lag_cache = (time.monotonic(), out)
    return out


async def ops_data(app: FastAPI, settings: Settings) -> dict:
    keys = Keys(settings.redis_prefix)
    registry = Registry(settings.models_dir)

    async def redis_part():
        try:
            return {"redis": {"ok": True, "error": None}, **await _redis_part(app.state.redis, keys)}
        except Exception as exc:  # the page must still render and say what is wrong
            from serving.api import redact

            return {"redis": {"ok": False, "error": (
                f"Redis at {redact(settings.redis_url)} did not answer ({type(exc).__name__}: "
                f"{exc}); start it (bash infra/services.sh start) or fix CLV_REDIS_URL")}}

    red, lag = await asyncio.gather(redis_part(), _lag_part(app, settings))
    champion = registry.champion()
    return {
        "now": time.time(),
        "group": settings.consumer_group,
        "kafka": settings.kafka_bootstrap,
        "lag": lag,
        "model": {"champion": champion, "latest_written": red.pop("latest_mv", None),
                  "latest_written_source": red.pop("latest_mv_source", None),
                  "models_dir": str(settings.models_dir)},
        **red,
    }


def install(app: FastAPI, settings: Settings) -> None:
    html = (STATIC / "ops.html").read_bytes()
    require_token = app.state.require_token

    @app.get("/ops", response_class=HTMLResponse, include_in_schema=False)
    async def ops_page():
        return HTMLResponse(html)

    @app.get("/ops/data", dependencies=[Depends(require_token)], summary="ops page data")
    async def ops_json(request: Request):
        return await ops_data(request.app, settings)


async def close(app: FastAPI) -> None:
    reader = getattr(app.state, "ops_lag", None)
    if reader is not None:
        app.state.ops_lag = None
        await reader.close()
