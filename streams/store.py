"""Per-user feature state behind a small interface: Redis for real, memory for unit tests.

Both implementations give the same guarantees (see docs/redis.md):
* ``load_many`` returns each user's state, embedding and CAS version in one round trip;
* ``save_many`` writes state + embedding + score + bumped version for many users in one
  atomic script call, skipping (and returning) users whose version moved since the load.
The dedupe markers live inside the state blob, so a write changes state and marker together.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Protocol, Sequence

from streams.fold import State, decode_state, encode_emb, encode_state
from streams.keys import (
    F_AT, F_CLV, F_EMB, F_MV, F_P, F_SEG, F_STATE, F_VER, HIST_EDGES, HIST_SINCE_STATE_VERSION, KEYS_VERSION,
    TOP_KEEP, Keys, hist_bucket,
)


@dataclass(frozen=True, slots=True)
class Loaded:
    state: State | None
    ver: int


@dataclass(frozen=True, slots=True)
class Score:
    clv: float
    p_repeat: float
    segment: str
    model_version: str
    at: float


@dataclass(slots=True)
class Update:
    user_id: str
    state: State
    expected_ver: int
    score: Score | None = None


class FeatureStore(Protocol):
    async def load_many(self, user_ids: Sequence[str]) -> dict[str, Loaded]: ...

    async def versions(self, user_ids: Sequence[str]) -> dict[str, int]:
        """Each user's CAS version, without decoding state (a rebuild overwrites old blobs)."""
        ...

    async def save_many(self, updates: Sequence[Update], stats: dict[str, int] | None = None,
                        put: dict[str, str] | None = None) -> list[str]:
        """Write updates atomically; returns user ids whose version moved (not written).
        ``stats``/``put``: bump/set ops counters (``stats`` hash) in the same atomic call."""
        ...

    async def score_of(self, user_id: str) -> Score | None: ...

    async def record_stats(self, incr: dict[str, int], put: dict[str, str]) -> None:
        """Bump ops counters (``stats`` hash) in one round trip."""
        ...


class MemoryStore:
    """In-process store with the same semantics (for unit tests and the offline replay)."""

    def __init__(self, top_keep: int = TOP_KEEP) -> None:
        self.rows: dict[str, dict] = {}
        self.top: dict[str, float] = {}  # users whose clv > top_floor (the Redis ``top`` zset)
        self.top_floor = -math.inf
        self.top_keep = top_keep
        self.hist: dict[int, int] = {}  # bucket -> users (the Redis ``hist`` hash)
        self.stats: dict[str, int] = {}

    async def load_many(self, user_ids: Sequence[str]) -> dict[str, Loaded]:
        out = {}
        for uid in user_ids:
            row = self.rows.get(uid)
            if row is None or F_STATE not in row:
                out[uid] = Loaded(None, int(row[F_VER]) if row else 0)
            else:
                out[uid] = Loaded(decode_state(row[F_STATE], row.get(F_EMB)), int(row[F_VER]))
        return out

    async def versions(self, user_ids: Sequence[str]) -> dict[str, int]:
        return {u: int(self.rows[u][F_VER]) if u in self.rows else 0 for u in user_ids}

    async def save_many(self, updates: Sequence[Update], stats: dict[str, int] | None = None,
                        put: dict[str, str] | None = None) -> list[str]:
        conflicts = []
        for u in updates:
            row = self.rows.setdefault(u.user_id, {F_VER: 0})
            if int(row[F_VER]) != u.expected_ver:
                conflicts.append(u.user_id)
                continue
            clv = None if u.score is None else float(f"{u.score.clv:.2f}")  # as Redis stores it
            was = hist_bucket(row[F_CLV]) if F_CLV in row and F_STATE in row else None
            now = hist_bucket(clv if clv is not None else row[F_CLV]) if clv is not None or F_CLV in row else None
            if was != now:
                if was is not None:
                    self.hist[was] -= 1
                if now is not None:
                    self.hist[now] = self.hist.get(now, 0) + 1
            row[F_STATE] = encode_state(u.state)
            emb = encode_emb(u.state)
            if emb is not None:
                row[F_EMB] = emb
            row[F_VER] = int(row[F_VER]) + 1
            if u.score is not None:
                s = u.score
                row.update({F_CLV: clv, F_P: s.p_repeat, F_SEG: s.segment, F_MV: s.model_version, F_AT: s.at})
                if clv > self.top_floor:
                    self.top[u.user_id] = clv
                else:
                    self.top.pop(u.user_id, None)
        if len(self.top) > self.top_keep:
            self.top_floor = sorted(self.top.values())[len(self.top) - self.top_keep - 1]
            self.top = {k: v for k, v in self.top.items() if v > self.top_floor}
        await self.record_stats(stats or {}, put or {})
        return conflicts

    async def record_stats(self, incr: dict[str, int], put: dict[str, str]) -> None:
        for k, v in incr.items():
            self.stats[k] = self.stats.get(k, 0) + v
        self.stats.update(put)

    async def score_of(self, user_id: str) -> Score | None:
        row = self.rows.get(user_id)
        if not row or F_CLV not in row:
            return None
        return Score(float(row[F_CLV]), float(row[F_P]), row[F_SEG], row[F_MV], float(row[F_AT]))


# KEYS = user keys..., ARGV = fields. Returns {s, e, ver} per key (false for a missing field).
_LOAD = """
local out = {}
for i, k in ipairs(KEYS) do
  local r = redis.call('HMGET', k, 's', 'e', 'ver')
  out[#out + 1] = r[1]
  out[#out + 1] = r[2]
  out[#out + 1] = r[3]
end
return out
"""

# KEYS[1] = top zset, KEYS[2] = stats hash, KEYS[3] = hist hash, KEYS[4] = top floor,
# KEYS[5..] = user keys.
# ARGV[1] = number of stats pairs n, ARGV[2] = top keep, ARGV[3] = number of put pairs m, then
# n*(field, incr) and m*(field, value) for the stats hash, then per user 9 values: user_id, expected_ver, state, emb ('' = keep), clv ('' = no score), p, seg, mv, at
# Returns the 1-based indexes (into the user list) of users whose ver moved.
# hist: a user is counted iff it has a clv and a state blob of version >= HIST_SINCE (see
# streams/keys.py); each write moves the user between buckets accordingly. top: the zset is
# exactly the users whose clv > floor; past `keep` members the floor rises to the cut.
_SAVE = """
local EDGES = {@EDGES@}
local HIST_SINCE = @HIST_SINCE@
local function bucket(c)
  local i = 1
  while i <= #EDGES and c >= EDGES[i] do i = i + 1 end
  return tostring(i - 1)
end
local nstats, keep, nput = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local a = 4
for i = 1, nstats do
  redis.call('HINCRBY', KEYS[2], ARGV[a], ARGV[a + 1])
  a = a + 2
end
for i = 1, nput do
  redis.call('HSET', KEYS[2], ARGV[a], ARGV[a + 1])
  a = a + 2
end
local fl = redis.call('GET', KEYS[4])
local floor = fl and tonumber(fl) or -math.huge
local conflicts = {}
for i = 5, #KEYS do
  local k = KEYS[i]
  local uid, expected = ARGV[a], ARGV[a + 1]
  local old = redis.call('HMGET', k, 'ver', 'clv', 's')
  local cur = old[1] or '0'
  if cur ~= expected then
    conflicts[#conflicts + 1] = i - 4
  else
    local clv = ARGV[a + 4]
    local was, now = nil, nil
    if old[2] and old[3] and string.byte(old[3], 1) >= HIST_SINCE then was = bucket(tonumber(old[2])) end
    if clv ~= '' then now = bucket(tonumber(clv)) elseif old[2] then now = bucket(tonumber(old[2])) end
    if was ~= now then
      if was then redis.call('HINCRBY', KEYS[3], was, -1) end
      if now then redis.call('HINCRBY', KEYS[3], now, 1) end
    end
    redis.call('HSET', k, 's', ARGV[a + 2], 'ver', tostring(tonumber(cur) + 1))
    if ARGV[a + 3] ~= '' then redis.call('HSET', k, 'e', ARGV[a + 3]) end
    if clv ~= '' then
      redis.call('HSET', k, 'clv', clv, 'p', ARGV[a + 5], 'seg', ARGV[a + 6],
                 'mv', ARGV[a + 7], 'at', ARGV[a + 8])
      if tonumber(clv) > floor then
        redis.call('ZADD', KEYS[1], clv, uid)
      else
        redis.call('ZREM', KEYS[1], uid)
      end
    end
  end
  a = a + 9
end
local n = redis.call('ZCARD', KEYS[1])
if n > keep then
  local cut = redis.call('ZRANGE', KEYS[1], n - keep - 1, n - keep - 1, 'WITHSCORES')[2]
  redis.call('SET', KEYS[4], cut)
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', cut)
end
return conflicts
""".replace("@EDGES@", ", ".join(f"{e:.0f}" for e in HIST_EDGES)).replace(
    "@HIST_SINCE@", str(HIST_SINCE_STATE_VERSION))


def _f(x: float, digits: int = 6) -> str:
    """Compact decimal (listpack-friendly): 6 significant digits are plenty for a score."""
    return f"{float(x):.{digits}g}"


class RedisStore:
    """Redis implementation: one script call to load a batch, one to save it.

    Single-node Redis. On Redis Cluster a multi-key script must stay in one hash slot:
    group a batch by ``CLUSTER KEYSLOT`` and call the scripts once per slot.
    """

    def __init__(self, client, prefix: str = "clv", top_keep: int = TOP_KEEP):
        if top_keep < 1:
            raise ValueError(f"top_keep must be at least 1, got {top_keep}")
        self.r = client
        self.keys = Keys(prefix)
        self.top_keep = top_keep
        self._load = client.register_script(_LOAD)
        self._save = client.register_script(_SAVE)

    @classmethod
    def from_settings(cls, settings) -> "RedisStore":
        return cls(redis_client(settings), settings.redis_prefix, settings.top_keep)

    async def reset_top(self) -> None:
        """Forget the top set and its floor, so that the next writes rebuild it from scratch
        (``clv rescore`` does this before rewriting every user: after a model change that lowers
        scores, the top set would otherwise shrink under its old floor)."""
        await self.r.delete(self.keys.top, self.keys.top_floor)

    async def embedding_space(self) -> str | None:
        """The encoder id (``clv.encoder_id``) the review embeddings in Redis were built with;
        None until a worker first scores with a text model."""
        v = await self.r.hget(self.keys.meta, "encoder_id")
        return v.decode() if v is not None else None

    async def claim_embedding_space(self, encoder_id: str, replace: bool = False) -> str:
        """Record ``encoder_id`` as the embeddings' space if none is recorded (``replace``:
        always, after a replay re-embedded everything). Returns the recorded space."""
        if replace:
            await self.r.hset(self.keys.meta, "encoder_id", encoder_id)
            return encoder_id
        await self.r.hsetnx(self.keys.meta, "encoder_id", encoder_id)
        return await self.embedding_space() or encoder_id

    async def write_meta(self) -> None:
        from streams.fold import FEATURE_SCHEMA, STATE_VERSION

        await self.r.hset(self.keys.meta, mapping={
            "keys_version": KEYS_VERSION, "state_version": STATE_VERSION,
            "feature_schema": FEATURE_SCHEMA, "updated_at": time.time(),
        })

    async def load_many(self, user_ids: Sequence[str]) -> dict[str, Loaded]:
        if not user_ids:
            return {}
        flat = await self._load(keys=[self.keys.user(u) for u in user_ids])
        out = {}
        for i, uid in enumerate(user_ids):
            s, e, ver = flat[3 * i], flat[3 * i + 1], flat[3 * i + 2]
            out[uid] = Loaded(decode_state(s, e) if s else None, int(ver) if ver else 0)
        return out

    async def versions(self, user_ids: Sequence[str]) -> dict[str, int]:
        pipe = self.r.pipeline(transaction=False)
        for u in user_ids:
            pipe.hget(self.keys.user(u), F_VER)
        return {u: int(v) if v else 0 for u, v in zip(user_ids, await pipe.execute())}

    async def save_many(self, updates: Sequence[Update], stats: dict[str, int] | None = None,
                        put: dict[str, str] | None = None) -> list[str]:
        if not updates and not stats and not put:
            return []
        stats, put = stats or {}, put or {}
        argv: list = [len(stats), self.top_keep, len(put)]
        for k, v in stats.items():
            argv += [k, v]
        for k, v in put.items():
            argv += [k, v]
        keys = [self.keys.top, self.keys.stats, self.keys.hist, self.keys.top_floor]
        for u in updates:
            keys.append(self.keys.user(u.user_id))
            emb = encode_emb(u.state) or b""
            s = u.score
            if s is None:
                argv += [u.user_id, str(u.expected_ver), encode_state(u.state), emb, "", "", "", "", ""]
            else:
                argv += [u.user_id, str(u.expected_ver), encode_state(u.state), emb,
                         f"{s.clv:.2f}", _f(s.p_repeat, 4), s.segment, s.model_version, f"{s.at:.3f}"]
        idx = await self._save(keys=keys, args=argv)
        return [updates[int(i) - 1].user_id for i in idx]

    async def record_stats(self, incr: dict[str, int], put: dict[str, str]) -> None:
        pipe = self.r.pipeline(transaction=False)
        for k, v in incr.items():
            if v:
                pipe.hincrby(self.keys.stats, k, v)
        pipe.hset(self.keys.stats, mapping=put)
        await pipe.execute()

    async def score_of(self, user_id: str) -> Score | None:
        vals = await self.r.hmget(self.keys.user(user_id), F_CLV, F_P, F_SEG, F_MV, F_AT)
        if vals[0] is None:
            return None
        return Score(float(vals[0]), float(vals[1]), vals[2].decode(), vals[3].decode(), float(vals[4]))

    async def state_of(self, user_id: str) -> State | None:
        s, e = await self.r.hmget(self.keys.user(user_id), F_STATE, F_EMB)
        return decode_state(s, e) if s else None


def redis_client(settings, *, sync: bool = False):
    """A Redis client from Settings (AUTH and TLS included); async unless ``sync``."""
    import redis
    import redis.asyncio as aredis

    kw: dict = {"socket_connect_timeout": 5, "socket_timeout": 10, "health_check_interval": 30}
    if settings.redis_password is not None:
        kw["password"] = settings.redis_password.get_secret_value()
    if settings.redis_tls_ca is not None:
        kw["ssl_ca_certs"] = str(settings.redis_tls_ca)
    mod = redis if sync else aredis
    return mod.Redis.from_url(settings.redis_url, **kw)
