"""`clv archive compact`: one file per closed day and (topic, partition), and retention.

The worker writes one small Parquet file per (topic, partition) and flush (streams/archive.py).
Compaction merges a closed day's files of one (topic, partition) into
``compact-{topic}-p{partition}-{first}-{last}-{token}.parquet``: rows deduplicated by Kafka
offset (a redelivered batch archived twice), sorted by ``user_bucket`` (then ts, offset) with
that column added, in row groups of ``ROW_GROUP`` rows, so that a Dask task reading a range
of buckets (``archive.read_partition``) skips most of them.

Commit protocol (docs/archive.md), per (day, topic, partition):

1. write the merged rows to a temporary ``.compact-....tmp`` (readers never list ``.*.tmp``),
   with the ``[name, size, mtime_ns]`` of every input in its footer (``clv.replaces``); fsync;
2. rename it to its final name (atomic): from then on ``archive.files`` leaves the inputs out,
   whether they still exist or not, so a reader sees each row once at every instant;
3. delete the inputs (fsync the folder). A crash anywhere leaves either the inputs alone
   (a temporary file, removed by the next run) or the compacted file plus inputs that readers
   already ignore and that the next run deletes first.

Only closed days are compacted: ``date=`` is the ingest day, so once a day has ended (plus
``grace_s`` for a write in flight at midnight or a skewed clock) no worker writes there again,
and a redelivered batch goes to today's folder. A file that changed after it was listed
(another size or mtime) is neither taken for replaced by readers nor deleted.

Retention: with ``retention_days`` > 0, days older than that (by ingest date) are dropped
whole: renamed out of the ``date=*`` pattern first (readers stop seeing it at once), then
removed.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from streams import archive
from streams.archive import BUCKET, COMPACT_PREFIX, REPLACES, SCHEMA

ROW_GROUP = 32_768  # rows per row group: the pruning unit of a bucket-range read
Fault = Callable[[str], None]  # called at named points (tests kill the process there)


@dataclass
class Report:
    days_compacted: list[str] = field(default_factory=list)
    files_in: int = 0  # files merged (and deleted)
    files_out: int = 0  # compacted files written
    rows_in: int = 0  # rows read from the inputs
    rows_out: int = 0  # rows written (rows_in less same-offset duplicates)
    leftovers_removed: int = 0  # inputs of an earlier, interrupted run, and stale temp files
    days_dropped: list[str] = field(default_factory=list)  # retention

    def line(self) -> str:
        return (f"compacted {len(self.days_compacted)} day(s): {self.files_in} files -> {self.files_out}, "
                f"{self.rows_in} rows -> {self.rows_out} (same-offset duplicates dropped: "
                f"{self.rows_in - self.rows_out}); interrupted-run leftovers removed: "
                f"{self.leftovers_removed}; days dropped by retention: {len(self.days_dropped)}")


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _group_of(name: str) -> tuple[str, int]:
    """(topic, partition) from a fresh ``{topic}-p{p}-{lo}-{hi}.parquet`` or a compacted
    ``compact-{topic}-p{p}-{lo}-{hi}-{token}.parquet`` name."""
    stem = name[:-len(".parquet")]
    if stem.startswith(COMPACT_PREFIX):
        topic, part, _, _, _ = stem[len(COMPACT_PREFIX):].rsplit("-", 4)
    else:
        topic, part, _, _ = stem.rsplit("-", 3)
    if not part.startswith("p") or not part[1:].isdigit():
        raise ValueError(f"archive file {name} is not named {{topic}}-p{{partition}}-{{first}}-{{last}}.parquet; "
                         "move foreign files out of the archive")
    return topic, int(part[1:])


def _day_of(d: Path) -> datetime:
    return datetime.strptime(d.name[len("date="):], "%Y-%m-%d").replace(tzinfo=timezone.utc)


def finish_deletes(day: Path, fault: Fault | None = None) -> int:
    """Delete what the day's compacted files replace and an earlier run left. Returns count."""
    n = 0
    for f in sorted(day.glob(f"{COMPACT_PREFIX}*.parquet")):
        for name, size, mtime in archive.replaced_by(f):
            p = day / name
            try:
                st = p.stat()
            except FileNotFoundError:
                continue
            if (st.st_size, st.st_mtime_ns) == (size, mtime):
                p.unlink()
                n += 1
                if fault:
                    fault("deleting")
    if n:
        _fsync_dir(day)
    return n


def _merge(paths: list[Path]) -> tuple[pa.Table, int]:
    """The inputs' rows, each offset once, sorted by (user_bucket, ts, offset); rows read."""
    t = pa.concat_tables([pq.read_table(p, columns=SCHEMA.names).cast(SCHEMA) for p in paths])
    n_in = len(t)
    t = t.sort_by([("offset", "ascending")])
    offs = t.column("offset").to_numpy()
    keep = np.ones(len(t), bool)
    keep[1:] = offs[1:] != offs[:-1]  # same offset = same Kafka record archived twice: keep one
    t = t.filter(pa.array(keep))
    t = t.append_column(BUCKET, archive.buckets(t.column("user_id")))
    return t.sort_by([(BUCKET, "ascending"), ("ts", "ascending"), ("offset", "ascending")]), n_in


def compact_group(day: Path, topic: str, part: int, inputs: list[Path], fault: Fault | None = None) -> tuple[int, int]:
    """Merge ``inputs`` (one day, topic, partition) into one compacted file. Returns rows (in, out)."""
    replaces = [archive._identity(p) for p in inputs]  # before reading: a later rewrite is kept
    table, n_in = _merge(inputs)
    lo, hi = pc.min_max(table["offset"]).values()
    final = day / f"{COMPACT_PREFIX}{topic}-p{part}-{lo.as_py()}-{hi.as_py()}-{uuid.uuid4().hex[:8]}.parquet"
    tmp = day / f".{final.name}.tmp"
    table = table.replace_schema_metadata({REPLACES: json.dumps(replaces).encode()})
    pq.write_table(table, tmp, compression="zstd", row_group_size=ROW_GROUP,
                   use_dictionary=["user_id", "type", "topic"])
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    if fault:
        fault("written")
    os.replace(tmp, final)
    _fsync_dir(day)
    if fault:
        fault("renamed")
    finish_deletes(day, fault)
    return n_in, len(table)


def compact(root: Path, *, now: float, grace_s: float = 3600.0, retention_days: int = 0,
            fault: Fault | None = None, progress: Callable[[str], None] | None = None) -> Report:
    """Compact every closed day under ``root`` and apply retention (see the module doc)."""
    root = Path(root)
    rep = Report()
    if not root.exists():
        return rep
    now_dt = datetime.fromtimestamp(now, tz=timezone.utc)
    days = sorted(d for d in root.glob("date=*") if d.is_dir())
    if retention_days > 0:
        oldest = (now_dt - timedelta(days=retention_days)).replace(hour=0, minute=0, second=0, microsecond=0)
        for d in [d for d in days if _day_of(d) < oldest]:
            gone = root / f".expired-{d.name}-{uuid.uuid4().hex[:8]}"
            os.rename(d, gone)  # readers glob date=*: the day vanishes from their view at once
            shutil.rmtree(gone)
            rep.days_dropped.append(d.name[len("date="):])
        days = [d for d in days if _day_of(d) >= oldest]
        for stale in root.glob(".expired-*"):  # an interrupted drop
            shutil.rmtree(stale, ignore_errors=True)
    for d in days:
        if _day_of(d) + timedelta(days=1, seconds=grace_s) > now_dt:
            continue  # still open (today, or within the grace after midnight)
        rep.leftovers_removed += finish_deletes(d, fault)
        for tmp in d.glob(".*.tmp"):  # a closed day: nobody writes these any more
            tmp.unlink()
            rep.leftovers_removed += 1
        groups: dict[tuple[str, int], list[Path]] = {}
        for f in archive.files(root, d.name[len("date="):]):
            groups.setdefault(_group_of(f.name), []).append(f)
        did = False
        for (topic, part), inputs in sorted(groups.items()):
            if len(inputs) == 1 and inputs[0].name.startswith(COMPACT_PREFIX):
                continue
            if progress:
                progress(f"{d.name} {topic}-p{part}: {len(inputs)} files")
            n_in, n_out = compact_group(d, topic, part, inputs, fault)
            rep.files_in += len(inputs)
            rep.files_out += 1
            rep.rows_in += n_in
            rep.rows_out += n_out
            did = True
        if did:
            rep.days_compacted.append(d.name[len("date="):])
    return rep
