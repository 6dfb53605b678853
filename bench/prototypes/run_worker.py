"""Run a prototype Faust worker exactly like `clv worker` does (same settings, scorer, metrics).

    python bench/prototypes/run_worker.py {baseline|onepass} [--drain-patch] [--publish send|batch]
                                          [--no-metrics] [--ort-threads N]

``baseline`` is ``streams.app.create_app`` (to measure the drain patch alone);
``onepass`` is ``bench/prototypes/app_onepass.py``. ``--drain-patch`` applies
``drain_patch.apply()`` (Faust's consumer awaits the per-message callback directly unless
flow is suspended, instead of racing it against the suspend event in two new tasks).
"""
from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import typer  # noqa: E402

app = typer.Typer(add_completion=False)


@app.command()
def main(which: str = typer.Argument("onepass"),
         drain_patch: bool = typer.Option(False, "--drain-patch"),
         publish: str = typer.Option("batch", "--publish"),
         metrics: bool = typer.Option(True, "--metrics/--no-metrics"),
         ort_threads: int = typer.Option(0, "--ort-threads", help="onnxruntime intra-op threads (0 = its default)"),
         loglevel: str = "info") -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import uvloop

    uvloop.install()
    from faust.worker import Worker as FaustWorker

    from serving.registry import Registry
    from serving.scorer import HotScorer, pick_providers
    from streams.kafka import ensure_topics
    from streams.settings import get_settings

    if drain_patch:
        from bench.prototypes.drain_patch import apply

        apply()
    s = get_settings()
    asyncio.run(ensure_topics(s))
    scorer = HotScorer(Registry(s.models_dir), pick_providers(s.onnx_providers), ort_threads or None)
    m = None
    if metrics:
        from streams.observe import WorkerMetrics

        m = WorkerMetrics(s)
    if which == "onepass":
        from bench.prototypes.app_onepass import create_app

        fapp = create_app(s, scorer, m, publish=publish)
    elif which == "baseline":
        from streams.app import create_app

        fapp = create_app(s, scorer, m)
    else:
        raise typer.BadParameter(f"unknown prototype {which!r}: baseline or onepass")
    FaustWorker(fapp, loglevel=loglevel, quiet=True, redirect_stdouts=False).execute_from_commandline()


if __name__ == "__main__":
    app()
