"""Shared plumbing for the bench scripts: services, a scoring model, load, tables, JSON.

* ``stack()``       Kafka + Redis: the ones named by ``CLV_BENCH_KAFKA`` / ``CLV_BENCH_REDIS``
                    (``bench/run_all.py`` starts one stack for every script), else a fresh
                    ``tests.conftest.InfraStack`` on free ports, stopped on exit.
* ``bench_model()`` a model folder to score with: ``--model DIR``, else a stand-in exported
                    once and cached under ``var/bench/model`` (an untrained head and the
                    pretrained text encoder: speed does not depend on the weights).
* ``Report``        one result table: printed with rich, written as JSON for ``run_all``.
* ``load()``        the 1-minute load average and core count, noted next to every figure
                    (the bench machine is shared; a figure without its load means little).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

CACHE = REPO / "var" / "bench"
MODEL_VERSION = "bench-standin"
N_MEMBERS = 5  # TrainConfig.n_ensemble: the shipped head averages 5 nets


# ---- machine load --------------------------------------------------------------------------
def load() -> str:
    """'load 1.23/2c': 1-minute load average over the number of cores."""
    return f"load {os.getloadavg()[0]:.2f}/{os.cpu_count()}c"


def cpu_seconds(pid: int | None = None) -> float:
    """User + system CPU seconds of a process (this one by default), children excluded."""
    if pid is None:
        t = os.times()
        return t.user + t.system
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / tick  # utime, stime


def pct(values, *qs: float) -> list[float]:
    import numpy as np

    if len(values) == 0:
        return [float("nan")] * len(qs)
    a = np.asarray(values, dtype=np.float64)
    return [float(np.percentile(a, q)) for q in qs]


def median(values) -> float:
    return pct(values, 50)[0]


# ---- services ------------------------------------------------------------------------------
@dataclass
class Services:
    kafka_bootstrap: str
    redis_url: str
    root: Path  # scratch folder for this script (data dirs, logs)
    partitions: int = 4

    def settings(self, **overrides):
        from streams.settings import Settings

        base = {"kafka_bootstrap": self.kafka_bootstrap, "redis_url": self.redis_url,
                "data_dir": self.root / "app", "topic_partitions": self.partitions}
        base.update(overrides)
        return Settings(**base)

    def fresh(self, tag: str, **overrides):
        """Settings with new topic names, group and Redis prefix (runs never see each other)."""
        from tests.conftest import InfraStack

        over = InfraStack.unique_topics(tag)
        over["redis_prefix"] = over["consumer_group"].replace(".group", "")
        over.update(overrides)
        return self.settings(**over)


@contextlib.contextmanager
def stack(partitions: int = 4, need_kafka: bool = True, redis_fsync: str = "always") -> Iterator[Services]:
    kafka, redis_url = os.environ.get("CLV_BENCH_KAFKA"), os.environ.get("CLV_BENCH_REDIS")
    root = Path(tempfile.mkdtemp(prefix="clv-bench-"))
    try:
        if redis_url and (kafka or not need_kafka) and redis_fsync == "always":  # the shared stack's setting
            yield Services(kafka or "", redis_url, root, partitions)
            return
        from tests.conftest import InfraStack

        st = InfraStack(root / "stack", partitions=partitions)
        st.env["CLV_INFRA_REDIS_APPENDFSYNC"] = redis_fsync  # infra/redis/redis.conf.tmpl
        t0 = time.perf_counter()
        st.launch(*(("kafka", "redis") if need_kafka else ("redis",)))
        print(f"[bench] services up in {time.perf_counter() - t0:.0f}s "
              f"(kafka {st.kafka_bootstrap if need_kafka else '-'}, redis {st.redis_url})", file=sys.stderr)
        try:
            yield Services(st.kafka_bootstrap, st.redis_url, root, partitions)
        finally:
            st.shutdown()
    finally:
        shutil.rmtree(root, ignore_errors=True)


def create_topics(settings, partitions: int) -> None:
    from streams.kafka import ensure_topics
    from tests.conftest import run_sync

    run_sync(ensure_topics(settings, partitions))


# ---- model -----------------------------------------------------------------------------------
MODEL_KINDS = ("text", "int8", "head")  # fp32 encoder | int8 encoder | head only (no encoder)


def bench_model(model: Path | None = None, kind: str = "text") -> Path:
    """A model folder (head.onnx [+ encoder.onnx]). Exported once, then reused from the cache.

    ``kind``: "text" (fp32 text encoder, what `clv train` ships by default), "int8" (the
    dynamically quantised encoder served, `--int8 serve`), "head" (no text encoder). The
    head is an ensemble of ``N_MEMBERS`` untrained nets, the shape `clv train` exports."""
    if model is not None:
        return Path(model)
    if kind not in MODEL_KINDS:
        raise ValueError(f"model kind must be one of {MODEL_KINDS}, got {kind!r}")
    out = CACHE / {"text": "model", "int8": "model-int8", "head": "model-head"}[kind]
    if (out / "head.onnx").exists():
        return out
    import numpy as np

    from streams.fold import FEATURE_NAMES, TEXT_DIM
    from training.model import Ensemble, ZILNNet
    from training.train import FittedModel, TrainConfig

    print(f"[bench] exporting a stand-in model to {out} (once; about a minute)", file=sys.stderr)
    rng = np.random.default_rng(0)
    sample = (np.abs(rng.standard_normal((64, len(FEATURE_NAMES)))).astype(np.float32),
              rng.standard_normal((64, TEXT_DIM)).astype(np.float32))
    enc = None
    if kind != "head":
        from training.text import TextEncoder

        enc = TextEncoder("cpu")
    fm = FittedModel(TrainConfig(quick=True, int8="serve" if kind == "int8" else "off"), Ensemble([ZILNNet() for _ in range(N_MEMBERS)]).eval(), enc,
                     {"vip": 100.0, "high": 50.0, "mid": 10.0, "lapsing_p": 0.15}, 273.0, {"_sample": sample})
    tmp = CACHE / f".tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    fm.export(tmp, MODEL_VERSION, 39, cache_dir=CACHE / "cache")
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def install_model(settings, model_dir: Path) -> str:
    """Make ``model_dir`` the champion of ``settings``' registry (a symlink, no copy)."""
    from serving.contract import Contract
    from serving.registry import Registry
    from training.export import metadata

    meta = metadata(model_dir / "head.onnx")
    version = Contract.from_metadata(meta, source=str(model_dir)).model_version
    reg = Registry(settings.models_dir)
    reg.root.mkdir(parents=True, exist_ok=True)
    link = reg.path(version)
    if not link.exists():
        link.symlink_to(Path(model_dir).resolve(), target_is_directory=True)
    reg.set_champion(version, "bench")
    return version


# ---- events ------------------------------------------------------------------------------------
def sim_messages(n_events: int, seed: int = 1, users: int | None = None,
                 duplicates: float = 0.01, bad: float = 0.001):
    """``n_events`` simulated events (a year of a shop, ending now) as wire Message tuples, with
    producer duplicates and bad messages mixed in (so dedupe and the DLQ path cost what they do)."""
    from streams.simulate import mix, simulate

    users = users or max(100, n_events // 80)  # ~84 events per user-year
    sim = simulate(n_users=users, start=time.time() - 366 * 86400, days=365, seed=seed)
    return list(mix(sim.iter_wire(n_events), duplicates=duplicates, bad=bad, seed=seed, users=users))


def publish(messages, settings) -> float:
    """Publish as fast as possible; returns messages/s. Raises if anything was not delivered."""
    import asyncio

    from streams.sim.publish import publish as _publish

    res = asyncio.run(_publish(messages, settings))
    if res.failed:
        raise RuntimeError(f"{res.failed} messages not delivered: {res.first_error}")
    return res.rate


# ---- reporting ---------------------------------------------------------------------------------
@dataclass
class Report:
    """One result table. ``targets``: (what, target, measured, ok) rows for the summary."""

    title: str
    columns: list[str]
    rows: list[list] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    targets: list[list] = field(default_factory=list)

    def add(self, *cells) -> None:
        self.rows.append([_cell(c) for c in cells])

    def target(self, what: str, target: str, measured: str, ok: bool | None) -> None:
        self.targets.append([what, target, measured, ok])

    def show(self) -> None:
        from rich.console import Console
        from rich.table import Table

        t = Table(title=self.title)
        for c in self.columns:
            t.add_column(c, justify="left" if c == self.columns[0] else "right")
        for r in self.rows:
            t.add_row(*r)
        con = Console(width=max(160, Console().width))
        con.print(t)
        for what, tgt, got, ok in self.targets:
            mark = "[green]met[/]" if ok else ("[red]missed[/]" if ok is False else "-")
            con.print(f"  target {what}: {tgt}; measured {got} -> {mark}")
        for n in self.notes:
            con.print(f"  [dim]{n}[/]")

    def save(self, path: Path | None) -> None:
        if path is None:
            return
        Path(path).write_text(json.dumps({"title": self.title, "columns": self.columns, "rows": self.rows,
                                          "notes": self.notes, "targets": self.targets}, indent=1))


def _cell(c) -> str:
    if isinstance(c, float):
        if c != c:
            return "-"
        if abs(c) >= 1000:
            return f"{c:,.0f}"
        if abs(c) >= 10:
            return f"{c:.1f}"
        return f"{c:.3g}" if abs(c) < 0.1 else f"{c:.2f}"
    return str(c)
