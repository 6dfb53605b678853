"""Run every benchmark against one Kafka + Redis stack and write bench/results.md.

    .venv/bin/python bench/run_all.py [--quick] [--only throughput,latency] [--out bench/results.md]

Each script runs as its own process (``--json`` hands its table back), one after the other,
so no two benchmarks compete for the CPU; each prints its rich table as it finishes. The
markdown file gets every table, the targets (met / missed), the machine's load next to each
figure, and how the run was made. ``--quick`` shrinks every size for a smoke run (minutes, not
figures to quote). A script that fails is reported in the file and the others still run.
``--only a,b`` reruns those benchmarks and keeps every other section of the existing file.
"""
from __future__ import annotations

import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import typer

from common import REPO, load

app = typer.Typer(add_completion=False)

# name -> (script, full args, quick args)
PLAN: list[tuple[str, str, list[str], list[str]]] = [
    ("throughput", "throughput.py",
     ["--events", "200000", "--runs", "2", "--models", "head", "--variants",
      "clv worker,clv worker --engine kafka"],
     ["--events", "20000", "--runs", "1", "--models", "head", "--variants", "clv worker,clv worker --engine kafka",
      "--no-step"]),
    ("throughput-text", "throughput.py",
     ["--events", "100000", "--runs", "1", "--models", "text,int8", "--variants", "clv worker,clv worker --engine kafka"],
     ["--events", "10000", "--runs", "1", "--models", "text", "--variants", "clv worker --engine kafka", "--no-step"]),
    ("throughput-faust-options", "throughput.py",
     ["--events", "100000", "--runs", "1", "--models", "head", "--no-step", "--variants",
      "proto: drain patch only,proto: one agent,proto: one agent + drain patch"],
     ["--events", "10000", "--runs", "1", "--models", "head", "--no-step", "--variants", "proto: one agent"]),
    ("knob-batch-500", "throughput.py",
     ["--events", "100000", "--runs", "1", "--models", "head", "--no-step", "--env", "CLV_BATCH_MAX=500"],
     ["--events", "10000", "--runs", "1", "--models", "head", "--no-step", "--env", "CLV_BATCH_MAX=500"]),
    ("knob-batch-5000", "throughput.py",
     ["--events", "100000", "--runs", "1", "--models", "head", "--no-step", "--env", "CLV_BATCH_MAX=5000"],
     ["--events", "10000", "--runs", "1", "--models", "head", "--no-step", "--env", "CLV_BATCH_MAX=5000"]),
    ("knob-buffer-4096", "throughput.py",
     ["--events", "100000", "--runs", "1", "--models", "head", "--no-step", "--env", "CLV_STREAM_BUFFER_MAXSIZE=4096"],
     ["--events", "10000", "--runs", "1", "--models", "head", "--no-step", "--env",
      "CLV_STREAM_BUFFER_MAXSIZE=4096"]),
    ("pipeline_step", "pipeline_step.py", ["--events", "100000", "--runs", "2", "--batches", "200,500,5000"],
     ["--events", "10000", "--runs", "1"]),
    ("profile-clv-worker", "profile_worker.py", ["--events", "100000", "--model", "head", "--seconds", "20"],
     ["--events", "20000", "--model", "head", "--seconds", "4"]),
    ("profile-kafka", "profile_worker.py",
     ["--events", "200000", "--model", "head", "--seconds", "10", "--variant", "clv worker --engine kafka"],
     ["--events", "20000", "--model", "head", "--seconds", "2", "--variant", "clv worker --engine kafka"]),
    ("latency", "latency.py",
     ["--rates", "1000,5000", "--within", "0.05,0.01", "--models", "head", "--seconds", "10"],
     ["--rates", "1000", "--within", "0.01", "--models", "head", "--seconds", "3"]),
    ("latency-kafka", "latency.py",
     ["--rates", "1000,5000", "--within", "0.01", "--models", "head", "--seconds", "10", "--runs", "2", "--variant",
      "clv worker --engine kafka"],
     ["--rates", "1000", "--within", "0.01", "--models", "head", "--seconds", "3", "--variant",
      "clv worker --engine kafka"]),
    ("latency-kafka-everysec", "latency.py",
     ["--rates", "1000,5000", "--within", "0.01", "--models", "head", "--seconds", "10", "--runs", "2", "--variant",
      "clv worker --engine kafka", "--redis-fsync", "everysec"],
     ["--rates", "1000", "--within", "0.01", "--models", "head", "--seconds", "3", "--variant",
      "clv worker --engine kafka", "--redis-fsync", "everysec"]),
    ("codec", "codec.py", ["--runs", "7"], ["--runs", "1"]),
    ("api_lookup", "api_lookup.py", ["--rates", "500,1000,2000", "--seconds", "8", "--runs", "2"],
     ["--rates", "500", "--seconds", "2", "--runs", "1"]),
    ("decode", "decode.py", ["--events", "50000", "--bad", "2000", "--runs", "5"],
     ["--events", "5000", "--bad", "500", "--runs", "1"]),
    ("onnx_vs_torch", "onnx_vs_torch.py", ["--runs", "2"], ["--runs", "1", "--seconds", "0.3"]),
    ("redis_memory", "redis_memory.py", ["--users", "100000", "--runs", "2"], ["--users", "5000", "--runs", "1"]),
    ("scaleout", "scaleout.py", ["--events", "80000", "--partitions", "8", "--runs", "2",
                                 "--variants", "clv worker,clv worker --engine kafka"],
     ["--events", "10000", "--partitions", "8", "--runs", "1", "--variants", "clv worker --engine kafka"]),
]


def _md_table(res: dict) -> str:
    cols = res["columns"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in res["rows"]:
        lines.append("| " + " | ".join(str(c).replace("|", "/") for c in r) + " |")
    return "\n".join(lines)


def _git() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                              text=True).stdout.strip() + (" (+ uncommitted changes)" if subprocess.run(
                                  ["git", "status", "--porcelain"], cwd=REPO, capture_output=True,
                                  text=True).stdout.strip() else "")
    except OSError:
        return "?"


def _name(section: str) -> str:
    return section.split("\n", 1)[0].removeprefix("## ").split(":", 1)[0].strip()


def _parse(text: str) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(target rows, sections) of a results.md written by this script, each with its benchmark name."""
    parts = text.split("\n## ")
    rows = [(line.split("|")[1].strip(), line) for line in parts[1].splitlines()
            if line.startswith("| ") and not line.startswith("| benchmark")] if len(parts) > 1 else []
    sections = [("## " + p) for p in parts[2:]]
    return rows, [(_name(sec), sec if sec.endswith("\n") else sec + "\n") for sec in sections]


@app.command()
def main(quick: bool = typer.Option(False, help="tiny sizes: a smoke run, not figures to quote"),
         only: str = typer.Option("", help="comma list of benchmark names (default: all)"),
         out: Path = typer.Option(REPO / "bench" / "results.md")) -> None:
    from tests.conftest import InfraStack

    names = {n.strip() for n in only.split(",") if n.strip()}
    plan = [p for p in PLAN if not names or p[0] in names]
    unknown = names - {p[0] for p in PLAN}
    if unknown:
        raise typer.BadParameter(f"unknown benchmarks {sorted(unknown)}; known: {[p[0] for p in PLAN]}")
    started = dt.datetime.now(dt.timezone.utc)
    sections: list[str] = []
    summary: list[tuple] = []
    with tempfile.TemporaryDirectory(prefix="clv-bench-all-") as tmp:
        stack = InfraStack(Path(tmp) / "stack", partitions=4)
        t0 = time.perf_counter()
        stack.launch("kafka", "redis")
        print(f"[run_all] services up in {time.perf_counter() - t0:.0f}s", file=sys.stderr)
        env = {**os.environ, "CLV_BENCH_KAFKA": stack.kafka_bootstrap, "CLV_BENCH_REDIS": stack.redis_url}
        try:
            for name, script, full, small in plan:
                args = small if quick else full
                jpath = Path(tmp) / f"{name}.json"
                before = load()
                t = time.perf_counter()
                print(f"[run_all] {name}: {script} {' '.join(args)}  ({before})", file=sys.stderr)
                proc = subprocess.run([sys.executable, str(REPO / "bench" / script), *args, "--json", str(jpath)],
                                      cwd=REPO, env=env, capture_output=True, text=True)
                secs = time.perf_counter() - t
                sys.stdout.write(proc.stdout)
                cmd = f"`.venv/bin/python bench/{script} {' '.join(repr(a) if ' ' in a else a for a in args)}`"
                if proc.returncode != 0 or not jpath.exists():
                    tail = "\n".join((proc.stderr or proc.stdout).splitlines()[-25:])
                    sections.append(f"## {name}\n\n{cmd} FAILED (exit {proc.returncode}, {secs:.0f} s)\n\n```\n{tail}\n```\n")
                    summary.append((name, "FAILED", "", "", None))
                    continue
                res = json.loads(jpath.read_text())
                at = dt.datetime.now(dt.timezone.utc)
                body = [f"## {name}: {res['title']}", "",
                        f"{cmd} (run {at:%Y-%m-%d %H:%M} UTC, {secs:.0f} s; load before: {before})", "",
                        _md_table(res), ""]
                for what, tgt, got, ok in res["targets"]:
                    body.append(f"- target {what}: {tgt}; measured {got}: **{'met' if ok else 'missed' if ok is False else '-'}**")
                    summary.append((name, what, tgt, got, ok))
                body += [f"- {n}" for n in res["notes"]]
                sections.append("\n".join(body) + "\n")
        finally:
            stack.shutdown()
    head = [
        "# Benchmark results", "",
        f"Generated by `bench/run_all.py{' --quick' if quick else ''}` on {started:%Y-%m-%d %H:%M} UTC, "
        f"commit {_git()}; {platform.node()}, {os.cpu_count()} cores, Python {platform.python_version()}.",
        "The machine is shared with other work: each row carries the 1-minute load average at the time",
        "(load / cores; above 1.0 per core the figures are CPU-starved). Methods and analysis: docs/benchmarks.md.",
        "" if not quick else "\n**--quick run: sizes too small to quote; a smoke test of the scripts.**\n",
        "## Targets", "", "| benchmark | target | goal | measured | |", "|---|---|---|---|---|",
    ]
    for name, what, tgt, got, ok in summary:
        head.append(f"| {name} | {what} | {tgt} | {got} | {'met' if ok else 'missed' if ok is False else '-'} |")
    if names and out.exists():  # --only: keep the other benchmarks' sections and targets from the file
        old_rows, old_sections = _parse(out.read_text())
        rerun = {p[0] for p in plan}
        keep_rows = [r for n, r in old_rows if n not in rerun]
        sections = [sec for n, sec in old_sections if n not in rerun] + sections
        order = [p[0] for p in PLAN]
        sections.sort(key=lambda sec: order.index(_name(sec)) if _name(sec) in order else len(order))
        head += keep_rows
        head.append("")
        head.append(f"(sections {', '.join(sorted(rerun))} rerun on {started:%Y-%m-%d %H:%M} UTC; "
                    "the others kept from the previous run)")
    out.write_text("\n".join(head) + "\n\n" + "\n".join(sections))
    print(f"[run_all] wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    app()
