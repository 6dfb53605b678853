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


class Keys:
    def __init__(self, prefix: str = "clv"):
        self.prefix = f"{prefix}:v{KEYS_VERSION}"

    def user(self, user_id: str) -> str:
        return f"{self.prefix}:u:{user_id}"

    @property
    def top(self) -> str:
        """ZSET user_id -> expected CLV (top users, distribution)."""
        return f"{self.prefix}:top"

    @property
    def meta(self) -> str:
        """HASH of layout/schema versions, written by the worker at start."""
        return f"{self.prefix}:meta"

    @property
    def stats(self) -> str:
        """HASH of worker counters shown on the ops page (events, dlq:<reason>, ...)."""
        return f"{self.prefix}:stats"
