"""Stream-side commands: `clv worker`, `clv topics`, `clv replay`."""
from __future__ import annotations

import asyncio
import logging

import typer

cli = typer.Typer()
log = logging.getLogger("clv.cli")


@cli.command()
def worker(
    loglevel: str = typer.Option("info", help="faust/worker log level"),
    metrics: bool = typer.Option(True, help="serve Prometheus /metrics on CLV_WORKER_WEB_PORT"),
    engine: str = typer.Option("", help="'faust' (agents) or 'kafka' (one aiokafka consumer-group "
                               "loop, same guarantees, ~4-5x faster); default CLV_ENGINE"),
) -> None:
    """Run a scoring worker until stopped (Ctrl-C / SIGTERM): consume the event topics in the
    worker group, fold, score, archive; commit only what is done."""
    import uvloop

    from serving.registry import Registry
    from serving.scorer import HotScorer, pick_providers
    from streams.app import create_app
    from streams.kafka import ensure_topics
    from streams.settings import get_settings

    s = get_settings()
    if engine:
        if engine not in ("faust", "kafka"):
            raise typer.BadParameter(f"unknown engine {engine!r}: use 'faust' or 'kafka'")
        s = s.model_copy(update={"engine": engine})
    if s.engine == "kafka":  # Faust configures logging itself
        logging.basicConfig(level=loglevel.upper(), format="[%(asctime)s] [%(process)d] %(levelname)s "
                            "%(name)s: %(message)s")
    try:
        asyncio.run(ensure_topics(s))
    except Exception as exc:  # noqa: BLE001
        raise typer.BadParameter(
            f"cannot reach Kafka at {s.kafka_bootstrap} ({type(exc).__name__}: {exc}); "
            "start it with `infra/services.sh start` or set CLV_KAFKA_BOOTSTRAP"
        ) from exc
    providers = pick_providers(s.onnx_providers)
    log.info("onnxruntime providers (in preference order): %s", providers)
    scorer = HotScorer(Registry(s.models_dir), providers)
    if scorer.current is None:
        log.warning("no model in %s: state is kept, scores appear once `clv train` promotes one",
                    s.models_dir)
    m = None
    if metrics:
        from streams.observe import WorkerMetrics

        m = WorkerMetrics(s)
        scorer.on_change = m.model_changed
        scorer.on_refuse = m.model_refused
        if scorer.current is not None:
            m.model_changed(scorer.current.version)
    from streams.archive import warm_up

    warm_up()  # pyarrow's pandas import, not inside either engine's first archive batch
    if s.engine == "kafka":
        from streams.engine import serve

        uvloop.run(serve(s, scorer, m))
        return
    uvloop.install()
    from faust.worker import Worker as FaustWorker

    app = create_app(s, scorer, m)
    FaustWorker(app, loglevel=loglevel, quiet=True, redirect_stdouts=False).execute_from_commandline()


@cli.command()
def topics(partitions: int = typer.Option(0, help="partitions for new topics (0 = CLV_TOPIC_PARTITIONS)")) -> None:
    """Create the event, scores and DLQ topics if they do not exist."""
    from streams.kafka import ensure_topics
    from streams.settings import get_settings

    created = asyncio.run(ensure_topics(get_settings(), partitions or None))
    typer.echo(f"created: {created or 'nothing (all exist)'}")


@cli.command()
def rescore(
    now: bool = typer.Option(False, help="score as of now (default: each user's last event time)"),
) -> None:
    """Rescore every user in Redis with the registry's champion model."""
    import time

    from rich.progress import Progress

    from serving.registry import Registry
    from serving.scorer import Scorer, pick_providers
    from streams.rescore import rescore_all
    from streams.settings import get_settings
    from streams.store import RedisStore

    s = get_settings()
    reg = Registry(s.models_dir)
    v = reg.champion()
    if v is None:
        raise typer.BadParameter(f"no champion model in {s.models_dir}; run `clv train` first")
    model = Scorer(reg.path(v), pick_providers(s.onnx_providers))

    async def run() -> int:
        store = RedisStore.from_settings(s)
        with Progress() as bar:
            task = bar.add_task(f"rescoring with {v}", total=None)
            n = await rescore_all(store, model, as_of=time.time() if now else None,
                                  progress=lambda k: bar.update(task, completed=k))
        await store.r.aclose()
        return n

    typer.echo(f"rescored {asyncio.run(run())} users with model {v}")


@cli.command()
def replay(
    score: bool = typer.Option(True, help="also score with the champion (and embed review text)"),
    dask: str = typer.Option("", "--dask", help="Dask scheduler address (default CLV_DASK_SCHEDULER): "
                             "one task per user partition, each writing its users to Redis"),
    dask_workers: int = typer.Option(0, "--dask-workers", min=0, help="run on a local Dask cluster of "
                                     "this many processes instead (0: none)"),
) -> None:
    """Rebuild every user's state in Redis from the archive (stop the workers first)."""
    from rich.progress import Progress

    from serving.registry import Registry
    from serving.scorer import Scorer, pick_providers
    from streams.replay import replay_archive, replay_dask
    from streams.settings import get_settings
    from streams.store import RedisStore

    s = get_settings()
    model = model_path = None
    if score:
        v = Registry(s.models_dir).champion()
        if v is not None:
            model_path = str(Registry(s.models_dir).path(v))
            model = Scorer(model_path, pick_providers(s.onnx_providers))
    scheduler = dask or (None if dask_workers else s.dask_scheduler)

    async def run():
        store = RedisStore.from_settings(s)
        if scheduler or dask_workers:
            from streams.distributed import dask_client

            with dask_client(scheduler, dask_workers) as client:
                out = replay_dask(s, client, model_path)[:2]
        else:
            with Progress() as bar:
                task = bar.add_task("replaying the archive", total=None)
                out = await replay_archive(s, store, model, progress=lambda k: bar.update(task, completed=k))
        if model is not None and model.encoder is not None:
            # every embedding is now in the champion's encoder space: workers may serve it
            await store.claim_embedding_space(model.encoder_id, replace=True)
        await store.r.aclose()
        return out

    users, events = asyncio.run(run())
    typer.echo(f"rebuilt {users} users from {events} archived events"
               + (f", scored with {model.version}" if model else ", not scored (no champion)"))


archive_cli = typer.Typer(help="The event archive: compaction and retention (docs/archive.md).")
cli.add_typer(archive_cli, name="archive")


@archive_cli.command("compact")
def archive_compact(
    retention_days: int = typer.Option(-1, "--retention-days", help="drop days older than this "
                                       "(default CLV_ARCHIVE_RETENTION_DAYS; 0 keeps all)"),
) -> None:
    """Merge each closed day's small files into one per (topic, partition), sorted by user
    bucket; drop days past the retention. Safe while workers write; rerun after a crash."""
    import time

    from streams.compact import compact
    from streams.settings import get_settings

    s = get_settings()
    keep = s.archive_retention_days if retention_days < 0 else retention_days
    rep = compact(s.archive_dir, now=time.time(), grace_s=s.archive_compact_grace_s, retention_days=keep,
                  progress=lambda what: log.info("compacting %s", what))
    typer.echo(rep.line())
