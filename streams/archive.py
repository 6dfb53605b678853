"""Durable event archive for the trainer: date-partitioned Parquet, written atomically.

Layout (``{CLV_DATA_DIR}/archive``)::

    date=YYYY-MM-DD/{topic}-p{partition}-{first_offset}-{last_offset}.parquet

``date`` is the day the batch was archived (ingest time, UTC), not the event time: a
backfill of a year of history then writes a few files, not one per event day. One file per
(topic, partition) slice of an archiver micro-batch, written to a temporary
name and renamed, so a reader never sees half a file and a crash leaves no torn file. Rows:
``event_id, user_id, ts, type, topic, partition, offset, payload`` where ``payload`` is the
original message bytes (the trainer decodes them with the same decoder as the worker).

Delivery is at-least-once (a batch redelivered after a crash is archived again, under the
same or an overlapping file name): ``read_events`` deduplicates by ``event_id`` and yields
events in event-time order (ties: topic, partition, offset), so a replay is exact.

``clv archive compact`` (streams/compact.py, docs/archive.md) merges a closed day's files into
one ``compact-{topic}-p{partition}-....parquet`` per (day, topic, partition), rows sorted by
``user_bucket`` (a stable 16-bit hash of ``user_id``, an extra column) so that a reader of a
range of buckets (``read_partition``, one Dask task) skips the other row groups. A compacted
file names the files it replaces in its footer (``clv.replaces``); ``files`` leaves those out,
so a reader sees every row once whether or not the compaction has deleted them yet.
"""
from __future__ import annotations

import json
import os
import time
import uuid
from datetime import datetime, timezone
from hashlib import blake2b
from pathlib import Path
from typing import Callable, Iterator, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from streams.events import Event, Rejection, decode

SCHEMA = pa.schema([
    ("event_id", pa.string()),
    ("user_id", pa.string()),
    ("ts", pa.float64()),
    ("type", pa.string()),
    ("topic", pa.string()),
    ("partition", pa.int32()),
    ("offset", pa.int64()),
    ("payload", pa.binary()),
])


def _day(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%Y-%m-%d")


def warm_up() -> None:
    """Make pyarrow's first table now: it imports pandas then (~1.5 s of CPU). A worker calls this
    before consuming; inside the first archive batch it stalled scoring for 1.5-2.4 s."""
    pa.Table.from_pydict({"x": [1]})


def record_batch(items: Sequence[tuple]) -> pa.RecordBatch:
    """``(record, event)`` pairs (``streams.pipeline.Record``) as one Arrow batch of ``SCHEMA``.
    The worker converts each micro-batch as it goes, so the buffer it archives every few
    seconds holds no Python objects: a full GC collection has nothing of it to walk, and the
    write thread (Arrow and Parquet release the GIL) does not stall the event loop."""
    return pa.RecordBatch.from_arrays([
        pa.array([e.event_id for _, e in items], pa.string()),
        pa.array([e.user_id for _, e in items], pa.string()),
        pa.array([e.ts for _, e in items], pa.float64()),
        pa.array([e.type for _, e in items], pa.string()),
        pa.array([r.topic for r, _ in items], pa.string()),
        pa.array([r.partition for r, _ in items], pa.int32()),
        pa.array([r.offset for r, _ in items], pa.int64()),
        pa.array([r.value for r, _ in items], pa.binary()),
    ], schema=SCHEMA)


USER_BUCKETS = 1 << 16  # user_bucket values: 0 .. USER_BUCKETS - 1
BUCKET = "user_bucket"  # the compacted files' extra column (uint16)
REPLACES = b"clv.replaces"  # compacted files' footer key: JSON [[name, size, mtime_ns], ...]
COMPACT_PREFIX = "compact-"


def user_bucket(user_id: str) -> int:
    """A user's bucket: the first 16 bits of blake2b(user_id). Stable across processes,
    machines and Python versions (unlike ``hash()``, which is salted per process)."""
    return int.from_bytes(blake2b(user_id.encode(), digest_size=2).digest(), "little")


def bucket_range(part: int, n_parts: int) -> tuple[int, int]:
    """The buckets ``[lo, hi)`` of partition ``part`` of ``n_parts`` (contiguous ranges, so a
    compacted file's row-group statistics prune the others)."""
    if not 0 <= part < n_parts <= USER_BUCKETS:
        raise ValueError(f"partition {part} of {n_parts}: need 0 <= part < n_parts <= {USER_BUCKETS}")
    return part * USER_BUCKETS // n_parts, (part + 1) * USER_BUCKETS // n_parts


def partition_of(user_id: str, n_parts: int) -> int:
    """Which of ``n_parts`` partitions (``bucket_range``) holds ``user_id``."""
    return (user_bucket(user_id) * n_parts) // USER_BUCKETS


def buckets(user_ids: pa.Array) -> pa.Array:
    """``user_bucket`` of each id (uint16), hashing each distinct id once."""
    import pyarrow.compute as pc

    enc = user_ids if pa.types.is_dictionary(user_ids.type) else pc.dictionary_encode(user_ids)
    if isinstance(enc, pa.ChunkedArray):
        enc = enc.combine_chunks() if enc.num_chunks != 1 else enc.chunk(0)
    table = pa.array([user_bucket(u) for u in enc.dictionary.to_pylist()], pa.uint16())
    return table.take(enc.indices)


class ArchiveWriter:
    def __init__(self, root: Path, clock: Callable[[], float] = time.time):
        """``clock``: what picks the ``date=`` folder (ingest time; tests and the bench's
        simulated archive pass another clock)."""
        self.root = Path(root)
        self.clock = clock

    def write(self, items: Sequence[tuple]) -> int:
        """Archive ``(record, event)`` pairs. Returns files written."""
        return self.write_batches([record_batch(items)])

    def write_batches(self, batches: Sequence[pa.RecordBatch]) -> int:
        """Archive ``record_batch`` batches: one file per (topic, partition). Returns files written."""
        import pyarrow.compute as pc

        # one contiguous table: filtering hundreds of small chunks costs ~7x more
        table = pa.Table.from_batches(batches, schema=SCHEMA).combine_chunks()
        if not len(table):
            return 0
        d = self.root / f"date={_day(self.clock())}"
        d.mkdir(parents=True, exist_ok=True)
        groups = table.select(["topic", "partition"]).group_by(["topic", "partition"]).aggregate([])
        for topic, part in zip(groups["topic"].to_pylist(), groups["partition"].to_pylist()):
            part_rows = table.filter(pc.and_(pc.equal(table["topic"], topic), pc.equal(table["partition"], part)))
            offs = pc.min_max(part_rows["offset"])
            name = f"{topic}-p{part}-{offs['min'].as_py()}-{offs['max'].as_py()}.parquet"
            tmp = d / f".{name}.{uuid.uuid4().hex}.tmp"
            # event ids and payloads are unique: a dictionary only costs time there
            pq.write_table(part_rows, tmp, compression="zstd", use_dictionary=["user_id", "type", "topic"])
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, d / name)
        return len(groups)


def _identity(path: Path) -> list:
    st = path.stat()
    return [path.name, st.st_size, st.st_mtime_ns]


def replaced_by(path: Path) -> list[list]:
    """The ``[name, size, mtime_ns]`` entries a compacted file replaces (its footer)."""
    meta = pq.read_schema(path).metadata or {}
    return json.loads(meta[REPLACES]) if REPLACES in meta else []


def all_files(root: Path, day: str = "*") -> list[Path]:
    """Every visible Parquet file (temporary ``.*.tmp`` names are not), replaced ones included;
    ``day``: one ``YYYY-MM-DD`` (default all)."""
    root = Path(root)
    if not root.exists():
        return []
    return sorted(p for p in root.glob(f"date={day}/*.parquet"))


def files(root: Path, day: str = "*") -> list[Path]:
    """The live files: all but those a compacted file in the same day replaces (and has not
    deleted yet). A file rewritten since (another size or mtime) is not taken for replaced."""
    out = all_files(root, day)
    gone: set[tuple] = set()
    for f in out:
        if f.name.startswith(COMPACT_PREFIX):
            gone.update((f.parent / n, size, mt) for n, size, mt in replaced_by(f))
    if not gone:
        return out
    live = []
    for f in out:
        try:
            st = f.stat()
        except FileNotFoundError:  # deleted by a compaction since the listing
            continue
        if (f, st.st_size, st.st_mtime_ns) not in gone:
            live.append(f)
    return live


def _read_file(path: Path, columns: list[str], lo: int | None = None, hi: int | None = None) -> pa.Table:
    """One archive file's ``columns`` (cast to ``SCHEMA``), only users in buckets [lo, hi) when
    given: a compacted file prunes row groups by its ``user_bucket`` statistics, a fresh file
    is filtered on its (dictionary-encoded) user ids."""
    import pyarrow.compute as pc

    schema = pa.schema([SCHEMA.field(c) for c in columns])
    if lo is None:
        return pq.read_table(path, columns=columns, schema=schema)
    pf = pq.ParquetFile(path)
    if BUCKET in pf.schema_arrow.names:  # row groups by their bucket statistics, then rows
        md, col = pf.metadata, pf.schema_arrow.get_field_index(BUCKET)
        groups = [g for g in range(md.num_row_groups) if md.row_group(g).num_rows
                  and _overlaps(md.row_group(g).column(col).statistics, lo, hi, path)]
        if not groups:
            return schema.empty_table()
        t = pf.read_row_groups(groups, columns=[*columns, BUCKET])
        b = t.column(BUCKET)
        return t.filter(pc.and_(pc.greater_equal(b, lo), pc.less(b, hi))).select(columns).cast(schema)
    b = buckets(pf.read(columns=["user_id"]).column("user_id"))
    mask = pc.and_(pc.greater_equal(b, lo), pc.less(b, hi))
    if not pc.any(mask).as_py():
        return schema.empty_table()
    return pf.read(columns=columns).cast(schema).filter(mask)


def _overlaps(st, lo: int, hi: int, path: Path) -> bool:
    if st is None or not st.has_min_max:
        raise ValueError(f"{path} has no {BUCKET} statistics (not written by `clv archive compact`?); "
                         "move it out of the archive")
    return st.max >= lo and st.min < hi


def _ordered(tables: list[pa.Table], columns: list[str], until: float | None) -> pa.Table:
    """Rows in event-time order (ties: topic, partition, offset), each event_id once (the
    first in that order)."""
    if not tables:
        return pa.schema([SCHEMA.field(c) for c in columns]).empty_table()
    table = pa.concat_tables(tables)
    if until is not None:
        import pyarrow.compute as pc

        table = table.filter(pc.less_equal(table["ts"], until))
    table = table.sort_by([("ts", "ascending"), ("topic", "ascending"),
                           ("partition", "ascending"), ("offset", "ascending")])
    # dedupe by event_id, keeping the first occurrence in that order
    seen: set[str] = set()
    keep = []
    for i, eid in enumerate(table.column("event_id").to_pylist()):
        if eid not in seen:
            seen.add(eid)
            keep.append(i)
    return table.take(keep) if len(keep) != len(table) else table


def _read_live(root: Path, lo: int | None = None, hi: int | None = None) -> list[pa.Table]:
    """Every live file's rows (of buckets [lo, hi) when given). A file that a compaction
    deleted after the listing (its rows are in the compacted file now) restarts the read."""
    for _ in range(10):
        try:
            return [t for f in files(root) if len(t := _read_file(f, SCHEMA.names, lo, hi))]
        except FileNotFoundError:
            continue
    raise RuntimeError(f"the archive under {root} kept changing while it was read (10 tries); "
                       "is a compaction looping? run `clv archive compact` alone and retry")


def read_table(root: Path, until: float | None = None) -> pa.Table:
    """All archived rows (deduplicated, sorted), optionally only events with ts <= until."""
    return _ordered(_read_live(root), SCHEMA.names, until)


def read_partition(root: Path, part: int, n_parts: int, until: float | None = None) -> pa.Table:
    """What ``read_table`` holds for the users of partition ``part`` of ``n_parts`` (by
    ``user_bucket``), reading only their rows: one Dask task's share (streams/distributed.py).
    An event id belongs to one user, so the per-user order and dedupe are ``read_table``'s."""
    return _ordered(_read_live(root, *bucket_range(part, n_parts)), SCHEMA.names, until)


def ts_range(root: Path) -> tuple[float, float] | None:
    """(first, last) event time in the archive from the Parquet statistics alone (no rows
    read; duplicates share their ts, so the range is the deduplicated one). None if empty."""
    lo, hi = float("inf"), float("-inf")
    for f in files(root):
        md = pq.ParquetFile(f).metadata
        col = md.schema.to_arrow_schema().get_field_index("ts")
        for g in range(md.num_row_groups):
            st = md.row_group(g).column(col).statistics
            if md.row_group(g).num_rows == 0:
                continue
            if st is None or not st.has_min_max:
                raise ValueError(f"{f} has no ts statistics (not written by the clv archiver?)")
            lo, hi = min(lo, st.min), max(hi, st.max)
    return None if lo > hi else (lo, hi)


def decode_rows(table: pa.Table) -> Iterator[Event]:
    """The events of ``read_table``/``read_partition`` rows, in their order."""
    now = time.time() + 10 * 365 * 86400  # archived events were validated on arrival
    for raw in table.column("payload").to_pylist():
        ev = decode(raw, now=now)
        if isinstance(ev, Rejection):  # pragma: no cover - only if the archive was tampered with
            raise ValueError(f"archived payload no longer decodes: {ev.detail}")
        yield ev


def read_events(root: Path, until: float | None = None) -> Iterator[Event]:
    """Valid events from the archive in event-time order, each event_id once."""
    yield from decode_rows(read_table(root, until))
