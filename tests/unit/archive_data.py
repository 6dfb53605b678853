"""A simulated archive written as the worker writes it: per (topic, partition) files per flush,
partitions by user, offsets per partition, a redelivered overlap, spread over ingest days."""
from __future__ import annotations

import zlib
from pathlib import Path

from streams.archive import ArchiveWriter
from streams.events import decode
from streams.pipeline import Record
from streams.settings import Settings
from streams.simulate import simulate

DAY = 86400.0


def write_archive(root: Path, settings: Settings, users: int = 60, days: float = 90, seed: int = 3,
                  flush: int = 97, partitions: int = 3) -> list:
    """Returns the (record, event) pairs archived (each once; the file set holds some twice)."""
    sim = simulate(n_users=users, start="2025-01-01", days=days, seed=seed)
    topic = dict(zip(("click", "order", "review", "profile"), settings.event_topics))
    nxt: dict = {}
    pairs = []
    for kind, key, value in sim.iter_wire():
        ev = decode(value, now=1e12)
        tp = (topic[kind], zlib.crc32(key) % partitions)
        off = nxt.get(tp, 0)
        nxt[tp] = off + 1
        pairs.append((Record(tp[0], tp[1], off, key, value), ev))
    for i in range(0, len(pairs), flush):
        chunk = pairs[max(0, i - 5):i + flush]  # 5 records redelivered from the previous flush
        day = chunk[-1][1].ts  # ingest day ~ event day: several closed days
        ArchiveWriter(root, clock=lambda d=day: d).write(chunk)
    return pairs
