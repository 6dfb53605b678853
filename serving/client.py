"""Reading CLV scores: straight from Redis (in-process, for personalisation code) or
through the lookup API over HTTP.

    from serving.client import lookup, lookup_many
    lookup("u42")                    # -> {"user_id": "u42", "clv": 123.4, ...} or None
    lookup_many(["u1", "u2"])        # -> {"u1": {...}} (users without a score left out)

    with ClvHttpClient("http://127.0.0.1:8000", token="...") as api:
        api.get("u42", features=True)

Both return the same record: ``user_id, clv, p_repeat, segment, model_version, scored_at``
(``scored_at`` in epoch seconds). Read-only: nothing here writes Redis.
"""
from __future__ import annotations

import threading
from typing import Iterable, Sequence

from streams.keys import F_AT, F_CLV, F_MV, F_P, F_SEG, F_VER, Keys
from streams.settings import Settings, get_settings

# one HMGET per lookup: the score fields, then ver (tells "unknown user" from "not scored")
LOOKUP_FIELDS = (F_CLV, F_P, F_SEG, F_MV, F_AT, F_VER)


def _s(b) -> str:
    return b.decode() if isinstance(b, bytes) else str(b)


def record(user_id: str, vals: Sequence) -> dict | None:
    """The score record from ``HMGET key clv p seg mv at [...]`` values; None without a score."""
    clv = vals[0]
    if clv is None:
        return None
    return {
        "user_id": user_id,
        "clv": float(clv),
        "p_repeat": float(vals[1]) if vals[1] is not None else None,
        "segment": _s(vals[2]) if vals[2] is not None else None,
        "model_version": _s(vals[3]) if vals[3] is not None else None,
        "scored_at": float(vals[4]) if vals[4] is not None else None,
    }


def missing_reason(user_id: str, key: str, ver) -> str:
    if ver is None:
        return (f"no CLV for user {user_id!r}: Redis has no state for them ({key} absent); "
                "the user has no events yet, or the id is wrong")
    return (f"no CLV for user {user_id!r} yet: the worker holds their state but has not "
            "scored it (no champion model loaded?); check `clv:v1:stats` and the worker log")


_clients: dict[tuple, object] = {}
_clients_lock = threading.Lock()


def _sync_redis(settings: Settings):
    """One shared (thread-safe, pooled) sync Redis client per connection settings."""
    from streams.store import redis_client

    key = (settings.redis_url, settings.redis_password, settings.redis_tls_ca)
    with _clients_lock:
        r = _clients.get(key)
        if r is None:
            r = _clients[key] = redis_client(settings, sync=True)
    return r


def lookup(user_id: str, settings: Settings | None = None) -> dict | None:
    """The user's score record from Redis, or None when they have none."""
    settings = settings or get_settings()
    keys = Keys(settings.redis_prefix)
    vals = _sync_redis(settings).hmget(keys.user(user_id), LOOKUP_FIELDS)
    return record(user_id, vals)


def lookup_many(user_ids: Iterable[str], settings: Settings | None = None) -> dict[str, dict]:
    """Records of the users that have a score (one pipelined round trip)."""
    settings = settings or get_settings()
    ids = list(dict.fromkeys(user_ids))
    if not ids:
        return {}
    keys = Keys(settings.redis_prefix)
    pipe = _sync_redis(settings).pipeline(transaction=False)
    for uid in ids:
        pipe.hmget(keys.user(uid), LOOKUP_FIELDS)
    out = {}
    for uid, vals in zip(ids, pipe.execute()):
        rec = record(uid, vals)
        if rec is not None:
            out[uid] = rec
    return out


class ApiError(RuntimeError):
    def __init__(self, status: int, body):
        self.status, self.body = status, body
        detail = body.get("detail") if isinstance(body, dict) else body
        super().__init__(f"CLV API answered {status}: {detail}")


class ClvHttpClient:
    """Small client for the lookup API (``clv serve``); keeps one connection pool."""

    def __init__(self, base_url: str | None = None, token: str | None = None,
                 timeout: float = 5.0, settings: Settings | None = None):
        import httpx

        if base_url is None or token is None:
            settings = settings or get_settings()
            base_url = base_url or f"http://{settings.api_host}:{settings.api_port}"
            if token is None and settings.api_token is not None:
                token = settings.api_token.get_secret_value()
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=base_url, headers=headers, timeout=timeout)

    def __enter__(self) -> "ClvHttpClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _json(self, resp, ok=(200,)):
        body = resp.json() if resp.headers.get("content-type", "").startswith("application/json") \
            else resp.text
        if resp.status_code not in ok:
            raise ApiError(resp.status_code, body)
        return body

    def get(self, user_id: str, features: bool = False) -> dict | None:
        """The user's record, or None (404)."""
        from urllib.parse import quote

        params = {"features": "true"} if features else None
        resp = self._http.get(f"/v1/users/{quote(user_id, safe='')}/clv", params=params)
        if resp.status_code == 404:
            return None
        return self._json(resp)

    def batch(self, user_ids: Sequence[str]) -> dict:
        """``{"found": [records], "missing": [ids]}``."""
        return self._json(self._http.post("/v1/users/clv:batch", json={"user_ids": list(user_ids)}))

    def ready(self) -> dict:
        """The /readyz answer (ready or not: check its "ready" field)."""
        return self._json(self._http.get("/readyz"), ok=(200, 503))
