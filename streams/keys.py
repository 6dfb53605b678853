"""The Redis key layout, in one place. Prose version: docs/redis.md.

Schema version ``KEYS_VERSION`` is part of every key, so a layout change never reads old
bytes as new: bump it, and old keys can be migrated or dropped by prefix.
"""
from __future__ import annotations

KEYS_VERSION = 1

# fields of the per-user hash
F_STATE = "s"  # state blob (streams.fold.encode_state)
F_EMB = "e"  # running review embedding, float16 x TEXT_DIM (absent without review text)
F_VER = "ver"  # CAS counter, incremented on every state write
F_CLV = "clv"  # expected spend over the model horizon (USD), decimal string
F_P = "p"  # probability of purchasing again within the horizon
F_SEG = "seg"  # segment (value tier) for ad targeting / inventory
F_MV = "mv"  # model version that produced the score
F_AT = "at"  # scored-at, epoch seconds
SCORE_FIELDS = (F_CLV, F_P, F_SEG, F_MV, F_AT)

# The ``top`` zset holds only the highest-CLV users: every user whose CLV is above the floor
# kept in ``top_floor`` (raised whenever the zset grows past TOP_KEEP members; CLV_TOP_KEEP sets
# it for the worker). The CLV distribution is the ``hist`` hash, kept exact by the same save script.
TOP_KEEP = 10_000  # the default of Settings.top_keep
# ``hist`` buckets: bucket i (field "i") counts users with HIST_EDGES[i-1] <= clv < HIST_EDGES[i]
# (bucket 0: clv < 1; the last, len(HIST_EDGES): clv >= 5e12). 1-2-5 log-spaced, in USD.
HIST_EDGES: tuple[float, ...] = tuple(float(m * 10**k) for k in range(13) for m in (1, 2, 5))
# A user is counted in ``hist`` iff its hash has a ``clv`` and a state blob of at least this
# state version (the first one whose writes keep ``hist``): hashes written by older code are
# counted when they are next written.
HIST_SINCE_STATE_VERSION = 2


def hist_bucket(clv: float) -> int:
    """The ``hist`` bucket of a CLV (the Lua save script computes the same)."""
    from bisect import bisect_right

    return 0 if clv != clv else bisect_right(HIST_EDGES, clv)  # NaN: bucket 0, as in Lua


class Keys:
    def __init__(self, prefix: str = "clv"):
        self.prefix = f"{prefix}:v{KEYS_VERSION}"

    def user(self, user_id: str) -> str:
        return f"{self.prefix}:u:{user_id}"

    @property
    def top(self) -> str:
        """ZSET user_id -> expected CLV of the top users: all users above ``top_floor``."""
        return f"{self.prefix}:top"

    @property
    def top_floor(self) -> str:
        """STRING: every user with CLV above this is in ``top``; absent = all scored users."""
        return f"{self.prefix}:top:floor"

    @property
    def hist(self) -> str:
        """HASH bucket index -> number of users (CLV distribution, ``HIST_EDGES``)."""
        return f"{self.prefix}:hist"

    @property
    def meta(self) -> str:
        """HASH of layout/schema versions, written by the worker at start."""
        return f"{self.prefix}:meta"

    @property
    def stats(self) -> str:
        """HASH of worker counters shown on the ops page (events, dlq:<reason>, ...)."""
        return f"{self.prefix}:stats"
