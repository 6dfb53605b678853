"""`clv train`, `clv trainer`, `clv promote`, `clv models`: the training side of the CLI.

Only typer is imported at load time (the worker and the API import this module's siblings
through clv_cli and must never pull in torch); the commands import what they need.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

import typer

cli = typer.Typer()
log = logging.getLogger("clv.trainer")


def _job(quick: bool, events: Optional[Path], horizon_weeks: Optional[int], cutoffs: int, step_days: float,
         users: str, promote: bool, seed: int, device: str, int8: Optional[str], finetune_layers: Optional[int],
         ensemble: Optional[int], epochs: Optional[int], gini_tolerance: float, mape_tolerance: float,
         refit_encoder: bool = False, refit_latest: bool = True):
    from streams.settings import get_settings
    from training.train import TrainConfig
    from training.trainer import Job, Policy

    settings = get_settings()
    cfg = TrainConfig(seed=seed, quick=quick, device=device, refit_encoder=refit_encoder)
    over = {"int8": int8, "finetune_layers": finetune_layers, "n_ensemble": ensemble, "epochs": epochs}
    cfg = TrainConfig.from_dict({**cfg.to_dict(), **{k: v for k, v in over.items() if v is not None}})
    if users not in ("all", "active"):
        raise typer.BadParameter("--users must be 'all' or 'active'")
    job = Job(horizon_weeks=horizon_weeks or settings.score_horizon_weeks, events_file=events,
              n_cutoffs=1 if quick else cutoffs, step_days=step_days, users=users, promote=promote,
              refit_latest=refit_latest, policy=Policy(gini_tolerance, mape_tolerance), cfg=cfg)
    return settings, job


# shared options (typer wants them spelled out per command)
_O = {
    "quick": typer.Option(False, "--quick", help="small/fast config: 1 member, few epochs, no fine-tuning, no int8"),
    "events": typer.Option(None, "--events", help="train from this JSONL of wire-format events instead of the archive"),
    "horizon_weeks": typer.Option(None, "--horizon-weeks", min=1, help="label horizon (default CLV_SCORE_HORIZON_WEEKS)"),
    "cutoffs": typer.Option(3, "--cutoffs", min=1, help="training cutoffs stacked (--quick uses 1)"),
    "step_days": typer.Option(28.0, "--step-days", min=1.0, help="days between training cutoffs"),
    "users": typer.Option("all", "--users", help="'all' (anyone seen, as the stream scores) or 'active' (buyers)"),
    "promote": typer.Option(True, "--promote/--no-promote", help="promote the model when it is at least as good"),
    "seed": typer.Option(0, "--seed"),
    "device": typer.Option("auto", "--device", help="auto (CUDA when present), cpu, cuda"),
    "int8": typer.Option(None, "--int8", help="encoder int8: off, measure (card only) or serve"),
    "finetune_layers": typer.Option(None, "--finetune-layers", min=0, max=6, help="top encoder layers to fine-tune (0 = none)"),
    "ensemble": typer.Option(None, "--ensemble", min=1, help="ensemble members (seeds)"),
    "epochs": typer.Option(None, "--epochs", min=1, help="max epochs per member"),
    "gini_tolerance": typer.Option(0.0, "--gini-tolerance", min=0.0, help="promote if Gini >= champion's - this"),
    "mape_tolerance": typer.Option(0.02, "--mape-tolerance", min=0.0, help="... and decile MAPE <= champion's + this"),
    "refit_encoder": typer.Option(False, "--refit-encoder", help="fine-tune a new text encoder instead of reusing "
                                  "the champion's (new embedding space: run `clv replay` after promoting)"),
    "refit_latest": typer.Option(True, "--refit-latest/--no-refit-latest",
                                 help="serve a refit of the validated model on the newest cutoffs (labels up to "
                                 "the last event); --no-refit-latest serves the validated model itself"),
}


@cli.command("train")
def train(quick: bool = _O["quick"], events: Optional[Path] = _O["events"],
          horizon_weeks: Optional[int] = _O["horizon_weeks"], cutoffs: int = _O["cutoffs"],
          step_days: float = _O["step_days"], users: str = _O["users"], promote: bool = _O["promote"],
          seed: int = _O["seed"], device: str = _O["device"], int8: Optional[str] = _O["int8"],
          finetune_layers: Optional[int] = _O["finetune_layers"], ensemble: Optional[int] = _O["ensemble"],
          epochs: Optional[int] = _O["epochs"], gini_tolerance: float = _O["gini_tolerance"],
          mape_tolerance: float = _O["mape_tolerance"], refit_encoder: bool = _O["refit_encoder"],
          refit_latest: bool = _O["refit_latest"]) -> None:
    """One shot: read events -> point-in-time sets -> train -> evaluate -> export -> register -> promote."""
    from training.trainer import train_once

    settings, job = _job(quick, events, horizon_weeks, cutoffs, step_days, users, promote, seed, device, int8,
                         finetune_layers, ensemble, epochs, gini_tolerance, mape_tolerance, refit_encoder,
                         refit_latest)
    try:
        out = train_once(settings, job)
    except (ValueError, FileNotFoundError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(json.dumps({"version": out.version, "model_dir": str(out.model_dir), "promoted": out.promoted,
                           "reason": out.reason, "metrics": out.metrics, "champion_before": out.champion,
                           "champion_metrics": out.champion_metrics, "seconds": out.seconds}, indent=2))


@cli.command("trainer")
def trainer(every: str = typer.Option("6h", "--every", help="period: 6h, 30m, 1d, 90s"),
            max_runs: Optional[int] = typer.Option(None, "--max-runs", min=1, help="stop after this many runs"),
            quick: bool = _O["quick"], events: Optional[Path] = _O["events"],
            horizon_weeks: Optional[int] = _O["horizon_weeks"], cutoffs: int = _O["cutoffs"],
            step_days: float = _O["step_days"], users: str = _O["users"], promote: bool = _O["promote"],
            seed: int = _O["seed"], device: str = _O["device"], int8: Optional[str] = _O["int8"],
            finetune_layers: Optional[int] = _O["finetune_layers"], ensemble: Optional[int] = _O["ensemble"],
            epochs: Optional[int] = _O["epochs"], gini_tolerance: float = _O["gini_tolerance"],
            mape_tolerance: float = _O["mape_tolerance"], refit_encoder: bool = _O["refit_encoder"],
            refit_latest: bool = _O["refit_latest"]) -> None:
    """Long-running: train now and every --every; a failed run is logged and retried next period."""
    import signal
    import threading

    from training.trainer import parse_every, run_forever

    try:
        period = parse_every(every)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    settings, job = _job(quick, events, horizon_weeks, cutoffs, step_days, users, promote, seed, device, int8,
                         finetune_layers, ensemble, epochs, gini_tolerance, mape_tolerance, refit_encoder,
                         refit_latest)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stop = threading.Event()

    def _stop(signum, _frame):
        log.info("signal %d: stopping after the current step", signum)
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    log.info("trainer: every %s (%.0fs), models in %s", every, period, settings.models_dir)
    run_forever(settings, job, period, stop=stop, max_runs=max_runs)
    log.info("trainer stopped")


@cli.command("promote")
def promote(version: str = typer.Argument(..., help="registered model version")) -> None:
    """Make VERSION the champion by hand (it must load under this code's contract)."""
    from serving.registry import Registry
    from serving.scorer import Scorer
    from streams.settings import get_settings

    reg = Registry(get_settings().models_dir)
    if version not in reg.versions():
        typer.echo(f"error: no model {version} in {reg.root}; see `clv models`", err=True)
        raise typer.Exit(2)
    try:
        Scorer(reg.path(version), providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - a model that does not load must not be promoted
        reg.log("refused", version, str(exc))
        typer.echo(f"error: {version} does not load, not promoted: {exc}", err=True)
        raise typer.Exit(1) from None
    reg.set_champion(version, "promoted by hand")
    typer.echo(f"champion: {version}")


@cli.command("models")
def models() -> None:
    """List registered models with their hold-out metrics (champion marked *)."""
    from serving.registry import Registry
    from streams.settings import get_settings

    reg = Registry(get_settings().models_dir)
    champ = reg.champion()
    for v in reg.versions():
        m = reg.card(v).get("metrics", {})
        g, mape = m.get("gini"), m.get("decile_mape")
        typer.echo(f"{'*' if v == champ else ' '} {v}  gini={g if g is None else round(g, 4)}  "
                   f"decile_mape={mape if mape is None else round(mape, 4)}  users={m.get('users')}")
