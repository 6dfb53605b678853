"""`clv archive compact`: rows and event ids the same before and after (a crash at every
point of the commit protocol included), readers see each row once at every instant, fresh and
compacted files read alike, retention drops old days whole."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pyarrow.parquet as pq
import pytest

from streams import archive
from streams.compact import _group_of, compact
from streams.settings import Settings
from tests.unit.archive_data import DAY, write_archive

S = Settings(_env_file=None)
NOW = 1_800_000_000.0  # long after the simulated days: all closed


def live_rows(root):
    """(day, topic, partition, offset) and event ids of the live files, duplicates kept (a
    record redelivered on another ingest day stays in both days: readers dedupe it)."""
    recs, ids = [], []
    for f in archive.files(root):
        t = pq.read_table(f, columns=["topic", "partition", "offset", "event_id"])
        recs += [(f.parent.name, *r) for r in zip(t["topic"].to_pylist(), t["partition"].to_pylist(),
                                                   t["offset"].to_pylist())]
        ids += t["event_id"].to_pylist()
    return recs, ids


@pytest.fixture
def root(tmp_path):
    pairs = write_archive(tmp_path / "archive", S)
    return tmp_path / "archive", pairs


def test_compaction_keeps_every_row_once(root):
    root, pairs = root
    before = archive.read_table(root)
    recs0, _ = live_rows(root)
    n_files = len(archive.files(root))
    rep = compact(root, now=NOW)
    recs1, ids1 = live_rows(root)
    assert len({r[1:] for r in recs0}) == len(pairs) < len(set(recs0)) < len(recs0)  # overlaps
    assert sorted(recs1) == sorted(set(recs0))  # each record once a day, none lost
    assert len(ids1) == len(recs1) and set(ids1) == {e.event_id for _, e in pairs}
    assert rep.files_in == n_files and rep.rows_out == len(set(recs0)) and rep.rows_in == len(recs0)
    after = archive.all_files(root)
    assert all(f.name.startswith("compact-") for f in after)
    assert len(after) == len({(f.parent.name, _group_of(f.name)) for f in after})  # one per day+tp
    assert archive.read_table(root).equals(before)  # readers see the same
    assert compact(root, now=NOW).files_out == 0  # nothing left to do


def test_open_days_are_left_alone(root):
    root, _ = root
    days = sorted(d.name for d in root.glob("date=*"))
    from datetime import datetime

    end_of_last = datetime.strptime(days[-1][5:], "%Y-%m-%d").timestamp() + DAY
    rep = compact(root, now=end_of_last + 1800, grace_s=3600)
    assert days[-1][5:] not in rep.days_compacted and len(rep.days_compacted) == len(days) - 1
    assert not list((root / days[-1]).glob("compact-*"))


def test_fresh_and_compacted_files_read_alike(root):
    root, _ = root
    before = archive.read_table(root)
    parts = [archive.read_partition(root, p, 3) for p in range(3)]
    # the newest day stays fresh, the others are compacted: a reader mixes both kinds
    from datetime import datetime

    last = sorted(d.name for d in root.glob("date=*"))[-1][5:]
    compact(root, now=datetime.strptime(last, "%Y-%m-%d").timestamp() + DAY + 60, grace_s=3600)
    assert {f.name.startswith("compact-") for f in archive.files(root)} == {True, False}
    assert archive.read_table(root).equals(before)
    for p in range(3):
        got = archive.read_partition(root, p, 3)
        assert got.equals(parts[p])
        assert {archive.partition_of(u, 3) for u in got["user_id"].to_pylist()} <= {p}
    assert sum(len(t) for t in parts) == len(before)
    assert archive.ts_range(root) == (before["ts"][0].as_py(), before["ts"][-1].as_py())


@pytest.mark.parametrize("point", ["written", "renamed", "deleting"])
def test_crash_mid_compaction_then_rerun(root, point):
    """SIGKILL the compaction at each point of the protocol: readers still see each row once;
    a rerun finishes and the counts match."""
    root, pairs = root
    before = archive.read_table(root)
    recs0, _ = live_rows(root)
    code = textwrap.dedent(f"""
        import os, signal
        from streams.compact import _group_of, compact
        n = 0
        def fault(where):
            global n
            if where == {point!r}:
                n += 1
                if n == 2:  # the second time: one group already done
                    os.kill(os.getpid(), signal.SIGKILL)
        compact({str(root)!r}, now={NOW}, fault=fault)
        raise SystemExit("no crash happened")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    recs0 = set(recs0)
    recs, ids = live_rows(root)
    assert set(recs) == recs0  # none lost; each (day, record) once
    assert set(ids) == {e.event_id for _, e in pairs}
    assert archive.read_table(root).equals(before)
    leftovers = list(root.glob("date=*/.*.tmp"))
    assert bool(leftovers) == (point == "written")
    rep = compact(root, now=NOW)
    # the temp file, or the inputs the killed run had renamed over but not deleted
    assert rep.leftovers_removed >= (point != "deleting")
    recs, ids = live_rows(root)
    assert sorted(recs) == sorted(recs0)
    assert len(ids) == len(recs) and set(ids) == {e.event_id for _, e in pairs}
    assert not list(root.glob("date=*/.*.tmp"))
    assert all(f.name.startswith("compact-") for f in archive.all_files(root))
    assert archive.read_table(root).equals(before)


def test_retention_drops_old_days(root):
    root, pairs = root
    days = sorted(d.name[5:] for d in root.glob("date=*"))
    from datetime import datetime

    keep_from = days[len(days) // 2]
    now = datetime.strptime(keep_from, "%Y-%m-%d").timestamp() + 10 * DAY
    rep = compact(root, now=now, retention_days=10)
    assert rep.days_dropped == [d for d in days if d < keep_from]
    assert sorted(d.name[5:] for d in root.glob("date=*")) == [d for d in days if d >= keep_from]
    assert not list(root.glob(".expired-*"))
    left = {e.event_id for e in archive.read_events(root)}
    assert left and left < {e.event_id for _, e in pairs}
