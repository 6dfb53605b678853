"""`clv` command line. Each package contributes commands from a module exposing
``cli = typer.Typer()``; heavy imports (torch, faust) happen inside the commands."""
from __future__ import annotations

import importlib
import logging

import typer

app = typer.Typer(help="Real-time customer-lifetime-value scoring.", no_args_is_help=True,
                  pretty_exceptions_show_locals=False)

COMMAND_MODULES = (
    "streams.cli",  # worker, replay, topics
    "streams.simulate",  # simulate
    "serving.cli",  # serve, lag, bench
    "training.cli",  # train, trainer, export, promote
    "training.backtest",  # backtest
)


@app.callback()
def _main(verbose: bool = typer.Option(False, "--verbose", "-v", help="debug logging")) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


for _name in COMMAND_MODULES:
    try:
        _mod = importlib.import_module(_name)
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.startswith(_name.split(".")[0]):
            continue  # that part of the product is not written yet
        raise
    _sub = getattr(_mod, "cli", None)
    if _sub is not None:
        app.registered_commands.extend(_sub.registered_commands)
        app.registered_groups.extend(_sub.registered_groups)  # e.g. `clv archive compact`


if __name__ == "__main__":
    app()
