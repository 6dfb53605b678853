"""CLV lookup API (``clv serve``). Read-only: it never writes Redis.

    GET  /v1/users/{user_id}/clv[?features=true]   one user (404 JSON says what is missing)
    POST /v1/users/clv:batch  {"user_ids": [...]}  many users -> {"found": [...], "missing": [...]}
    GET  /v1/clv?ids=a,b                            the same, as a GET
    GET  /healthz   liveness (the process answers)
    GET  /readyz    readiness (Redis answers and its key layout is the one this code reads)
    GET  /ops, /ops/data                            ops page (serving/ops_page.py)
    GET  /docs, /openapi.json                       OpenAPI
    GET  /metrics   Prometheus: clv_api_requests_total{route,status}, clv_api_request_seconds{route}

With ``CLV_API_TOKEN`` set, every /v1 route (and /ops/data) needs ``Authorization: Bearer
<token>``. A lookup is one HMGET on one pooled connection; responses are serialised with
orjson straight to bytes (no response-model validation on the hot path).
"""
from __future__ import annotations

import functools
import gc
import hmac
import logging
import time
from time import perf_counter
from contextlib import asynccontextmanager
from urllib.parse import urlsplit, urlunsplit

import orjson
from fastapi import Depends, FastAPI, Query, Request, Security
from fastapi.responses import Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field
from starlette.routing import Route

from serving.client import LOOKUP_FIELDS, missing_reason, record
from streams.keys import F_EMB, F_STATE, KEYS_VERSION, Keys
from streams.settings import Settings, get_settings

log = logging.getLogger(__name__)
MAX_BATCH = 1000
MAX_ID_LEN = 256


class JSON(Response):
    """orjson-rendered JSON (FastAPI's ORJSONResponse is deprecated; same thing)."""

    media_type = "application/json"

    def render(self, content) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


class ApiError(Exception):
    def __init__(self, status: int, error: str, detail: str, **extra):
        self.status, self.body = status, {"error": error, "detail": detail, **extra}


# ---- OpenAPI models (documentation only: handlers return JSON bytes directly) --------
class ClvRecord(BaseModel):
    user_id: str
    clv: float = Field(description="expected spend over the model horizon (USD)")
    p_repeat: float | None = Field(description="probability of purchasing again in the horizon")
    segment: str | None = Field(description="vip, high, mid, low or lapsing")
    model_version: str | None
    scored_at: float | None = Field(description="when it was scored (epoch seconds)")
    features: dict[str, float] | None = Field(
        None, description="with ?features=true: the feature vector by name, as of now")
    features_as_of: float | None = None


class BatchIn(BaseModel):
    user_ids: list[str] = Field(max_length=MAX_BATCH)


class BatchOut(BaseModel):
    found: list[ClvRecord]
    missing: list[str]


class ErrorOut(BaseModel):
    error: str
    detail: str


def redact(url: str) -> str:
    """The URL without its password (for messages)."""
    p = urlsplit(url)
    if p.password is None:
        return url
    netloc = f"{p.username or ''}:***@{p.hostname}" + (f":{p.port}" if p.port else "")
    return urlunsplit(p._replace(netloc=netloc))


_TRUE = frozenset(("1", "true", "on", "yes", "t", "y"))
_FALSE = frozenset(("0", "false", "off", "no", "f", "n", ""))


def _bool(v: str) -> bool:
    low = v.lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise ApiError(422, "bad_query", f"features={v!r} is not a boolean: use true or false")


def _check_id(user_id: str) -> None:
    if not user_id or len(user_id) > MAX_ID_LEN:
        raise ApiError(422, "bad_user_id", f"user_id must be 1..{MAX_ID_LEN} characters")


def timed(route: str):
    """Count and time a handler in clv_api_requests_total / clv_api_request_seconds."""
    from redis.exceptions import RedisError

    from serving.metrics import API_REQUESTS, API_SECONDS

    hist, ok = API_SECONDS.labels(route), API_REQUESTS.labels(route, "200")

    def deco(fn):
        @functools.wraps(fn)
        async def wrapper(*args, **kwargs):
            t0 = perf_counter()
            status = 500
            try:
                resp = await fn(*args, **kwargs)
                status = resp.status_code
                return resp
            except ApiError as exc:
                status = exc.status
                raise
            except RedisError:
                status = 503
                raise
            finally:
                hist.observe(perf_counter() - t0)
                (ok if status == 200 else API_REQUESTS.labels(route, str(status))).inc()

        return wrapper

    return deco


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    keys = Keys(settings.redis_prefix)
    user_key = keys.user
    redis_where = redact(settings.redis_url)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        from streams.store import redis_client

        app.state.redis = redis_client(settings)
        # long-lived objects (routes, models, modules) out of the GC's way: shorter pauses
        gc.collect()
        gc.freeze()
        try:
            yield
        finally:
            from serving.ops_page import close as close_ops

            await close_ops(app)
            await app.state.redis.aclose()

    app = FastAPI(title="CLV lookup API", version="1", lifespan=lifespan,
                  default_response_class=JSON,
                  description="Real-time customer-lifetime-value scores (read-only).")
    app.state.settings = settings

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return JSON(exc.body, status_code=exc.status, headers=headers)

    import redis.exceptions as rex

    @app.exception_handler(rex.ConnectionError)
    @app.exception_handler(rex.TimeoutError)
    async def _redis_down(request: Request, exc: Exception):
        log.warning("Redis unavailable: %s", exc)
        return JSON({"error": "redis_unavailable",
                     "detail": f"Redis at {redis_where} did not answer ({type(exc).__name__}); "
                               "start it (bash infra/services.sh start) or fix CLV_REDIS_URL"},
                    status_code=503)

    # ---- auth ----------------------------------------------------------------
    bearer = HTTPBearer(auto_error=False, description="CLV_API_TOKEN")
    expected = (settings.api_token.get_secret_value().encode()
                if settings.api_token is not None else None)

    def check_token(authorization: str | None) -> None:
        scheme, _, cred = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(cred.strip().encode(), expected):
            raise ApiError(401, "unauthorized",
                           "missing or wrong bearer token: send 'Authorization: Bearer <token>' "
                           "with the token the API was started with (CLV_API_TOKEN)")

    async def require_token(cred: HTTPAuthorizationCredentials | None = Security(bearer)) -> None:
        if expected is not None:
            check_token(None if cred is None else f"{cred.scheme} {cred.credentials}")

    app.state.require_token = require_token
    auth = [Depends(require_token)] if expected is not None else []
    err = {404: {"model": ErrorOut}, 401: {"model": ErrorOut}, 503: {"model": ErrorOut}}

    # ---- lookups --------------------------------------------------------------
    @timed("lookup")
    async def lookup_one(request: Request) -> JSON:
        """GET /v1/users/{user_id}/clv: one HMGET. Served by a plain Starlette route (FastAPI's
        per-request dependency/validation machinery costs about as much CPU as the whole
        lookup); the FastAPI route below documents it in OpenAPI and calls this same code."""
        if expected is not None:
            check_token(request.headers.get("authorization"))
        user_id = request.path_params["user_id"]
        _check_id(user_id)
        flag = request.query_params.get("features")
        want = False if flag is None else _bool(flag)
        key = user_key(user_id)
        fields = (*LOOKUP_FIELDS, F_STATE, F_EMB) if want else LOOKUP_FIELDS
        vals = await request.app.state.redis.hmget(key, fields)
        rec = record(user_id, vals)
        if rec is None:
            raise ApiError(404, "not_found", missing_reason(user_id, key, vals[5]),
                           user_id=user_id, missing=["score"] if vals[5] else ["user"])
        if want:
            rec.update(_features(vals[6], vals[7]))
        return JSON(rec)

    @app.get("/v1/users/{user_id:path}/clv", dependencies=auth, response_model=ClvRecord,
             responses=err, summary="CLV of one user")
    async def get_clv(request: Request, user_id: str,
                      features: bool = Query(False, description="include the feature vector")):
        return await lookup_one(request)

    # the fast path answers first; same path, same behaviour (see lookup_one)
    app.router.routes.insert(0, Route("/v1/users/{user_id:path}/clv", lookup_one, methods=["GET"],
                                      include_in_schema=False))

    @timed("batch")
    async def _batch(request: Request, ids: list[str]) -> JSON:
        ids = list(dict.fromkeys(i for i in ids if i))
        if len(ids) > MAX_BATCH:
            raise ApiError(422, "batch_too_large",
                           f"{len(ids)} ids; at most {MAX_BATCH} per call: split the batch")
        for uid in ids:
            _check_id(uid)
        found, missing = [], []
        if ids:
            pipe = request.app.state.redis.pipeline(transaction=False)
            for uid in ids:
                pipe.hmget(user_key(uid), LOOKUP_FIELDS)
            for uid, vals in zip(ids, await pipe.execute()):
                rec = record(uid, vals)
                if rec is None:
                    missing.append(uid)
                else:
                    found.append(rec)
        return JSON({"found": found, "missing": missing})

    @app.post("/v1/users/clv:batch", dependencies=auth, response_model=BatchOut, responses=err,
              summary="CLV of many users")
    async def batch_post(request: Request, body: BatchIn):
        return await _batch(request, body.user_ids)

    @app.get("/v1/clv", dependencies=auth, response_model=BatchOut, responses=err,
             summary="CLV of many users (comma-separated ids)")
    async def batch_get(request: Request, ids: str = Query(..., description="comma-separated")):
        return await _batch(request, [i.strip() for i in ids.split(",")])

    # ---- health ---------------------------------------------------------------
    @app.get("/healthz", summary="liveness")
    async def healthz():
        return JSON({"status": "ok"})

    @app.get("/readyz", summary="readiness: Redis answers and the key layout matches",
             responses={503: {"description": "not ready; 'reasons' says why and what to do"}})
    async def readyz(request: Request):
        ready, body = await readiness(request.app.state.redis, keys, redis_where)
        return JSON(body, status_code=200 if ready else 503)

    @app.get("/metrics", include_in_schema=False)
    async def metrics():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        from serving.metrics import API_REGISTRY

        return Response(generate_latest(API_REGISTRY), media_type=CONTENT_TYPE_LATEST)

    from serving.ops_page import install as install_ops

    install_ops(app, settings)
    return app


def _features(blob, emb) -> dict:
    from streams.fold import FEATURE_NAMES, StateDecodeError, decode_state, features

    if blob is None:
        return {"features": None, "features_as_of": None}
    try:
        state = decode_state(blob, emb)
    except StateDecodeError as exc:
        raise ApiError(500, "state_decode_error", str(exc))
    now = time.time()
    vec = features(state, now)
    return {"features": dict(zip(FEATURE_NAMES, vec.tolist())), "features_as_of": now}


async def readiness(r, keys: Keys, where: str) -> tuple[bool, dict]:
    from streams.fold import FEATURE_SCHEMA, STATE_VERSION

    reasons: list[str] = []
    try:
        await r.ping()
        meta = {k.decode(): v.decode() for k, v in (await r.hgetall(keys.meta)).items()}
    except Exception as exc:  # any Redis failure means not ready
        return False, {"ready": False, "redis": "unreachable", "reasons": [
            f"Redis at {where} did not answer ({type(exc).__name__}: {exc}); start it or fix "
            "CLV_REDIS_URL"]}
    if not meta:
        reasons.append(f"{keys.meta} is missing: no worker has initialised this Redis yet "
                       "(start `clv worker`)")
    elif meta.get("keys_version") != str(KEYS_VERSION):
        reasons.append(f"{keys.meta} says keys_version={meta.get('keys_version')}, this API reads "
                       f"{KEYS_VERSION}: deploy the matching API version or migrate the keys")
    warnings = []
    if meta and meta.get("state_version") != str(STATE_VERSION):
        warnings.append(f"state_version {meta.get('state_version')} != {STATE_VERSION}: "
                        "?features=true will fail until state is rebuilt (clv replay)")
    if meta and meta.get("feature_schema") not in (None, FEATURE_SCHEMA):
        warnings.append(f"feature_schema {meta.get('feature_schema')} != {FEATURE_SCHEMA}")
    body = {"ready": not reasons, "redis": "ok", "keys_version": KEYS_VERSION, "meta": meta,
            "reasons": reasons, "warnings": warnings}
    return not reasons, body
