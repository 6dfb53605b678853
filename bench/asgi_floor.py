"""Floor servers for bench/api_lookup.py: the same uvicorn (uvloop, httptools), no framework.

    uvicorn bench.asgi_floor:static   -- a constant JSON body (HTTP server + loop cost only)
    uvicorn bench.asgi_floor:redis    -- one HMGET of the user's score fields, orjson body

What `clv serve` costs above these is FastAPI/Starlette routing, the metrics decorator and
the record building; what these cost is the machine (scheduler, loopback, Redis).
"""
from __future__ import annotations

import orjson

BODY = orjson.dumps({"user_id": "u0000001", "clv": 123.4, "p_repeat": 0.5, "segment": "mid",
                     "model_version": "20261129T0500Z-ab12cd", "scored_at": 1.7e9})
HEADERS = [(b"content-type", b"application/json"), (b"content-length", str(len(BODY)).encode())]
_r = None


async def static(scope, receive, send):
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
    await send({"type": "http.response.body", "body": BODY})


async def redis(scope, receive, send):
    global _r
    if scope["type"] != "http":
        return
    if _r is None:
        from streams.settings import get_settings
        from streams.store import redis_client

        _r = (redis_client(get_settings()), get_settings().redis_prefix)
    client, prefix = _r
    uid = scope["path"].split("/")[3]
    vals = await client.hmget(f"{prefix}:v1:u:{uid}", ("clv", "p", "seg", "mv", "at"))
    body = orjson.dumps({"user_id": uid, "clv": float(vals[0]), "p_repeat": float(vals[1]),
                         "segment": vals[2].decode(), "model_version": vals[3].decode(),
                         "scored_at": float(vals[4])}) if vals[0] is not None else b"{}"
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
