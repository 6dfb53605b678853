"""CPU vs GPU scoring throughput of the exported model (head and text encoder).

    .venv/bin/python bench/gpu_scoring.py [--model DIR] [--seconds 2] [--batches 1,64,256]

``--model``: a model folder (head.onnx, encoder.onnx, tokenizer.json); default: the
registry's champion, else a stand-in exported on the spot (untrained head + the pretrained
encoder: throughput does not depend on the weights). Every graph runs through
``serving.scorer`` sessions with the CPU provider and, when onnxruntime can really create
it, the CUDA provider. On a machine without a GPU it prints the CPU figures and says so.
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import typer  # noqa: E402

app = typer.Typer(add_completion=False)
REVIEW = ("Bought this for my daughter and she loves it; the fabric is soft, the stitching solid, "
          "and delivery took two days. Would order from this shop again.")


def _standin(out: Path, cache: Path) -> Path:
    """An exported model with an untrained head and the pretrained encoder."""
    from streams.fold import FEATURE_NAMES, TEXT_DIM
    from training.model import Ensemble, ZILNNet
    from training.text import TextEncoder
    from training.train import FittedModel, TrainConfig

    rng = np.random.default_rng(0)
    sample = (np.abs(rng.standard_normal((64, len(FEATURE_NAMES)))).astype(np.float32),
              rng.standard_normal((64, TEXT_DIM)).astype(np.float32))
    fm = FittedModel(TrainConfig(quick=True, int8="off"), Ensemble([ZILNNet()]).eval(), TextEncoder("cpu"),
                     {"vip": 100.0, "high": 50.0, "mid": 10.0, "lapsing_p": 0.15}, 273.0, {"_sample": sample})
    return fm.export(out, "bench-standin", 39, cache_dir=cache)


def _cuda_usable(model_dir: Path) -> tuple[bool, str]:
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False, f"onnxruntime has no CUDA provider (providers: {ort.get_available_providers()})"
    opts = ort.SessionOptions()
    opts.log_severity_level = 4
    try:
        s = ort.InferenceSession(str(model_dir / "head.onnx"), opts,
                                 providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001
        return False, f"CUDA provider failed to start: {exc}"
    if s.get_providers()[0] != "CUDAExecutionProvider":
        return False, "CUDA provider listed but could not be created (no GPU, or CUDA/cuDNN libraries missing)"
    return True, "CUDA provider active"


def _rate(fn, rows: int, seconds: float) -> tuple[float, float]:
    """(rows per second, median ms per call) over about ``seconds`` of calls."""
    fn()  # warm-up (CUDA graph capture, allocations)
    times = []
    t_end = time.perf_counter() + seconds
    while time.perf_counter() < t_end or len(times) < 3:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return rows / float(np.mean(times)), 1000 * float(np.median(times))


def bench(model_dir: Path, providers: list[str], batches: list[int], seconds: float) -> list[tuple]:
    from serving.scorer import Scorer

    s = Scorer(model_dir, providers=providers)
    nf, td = len(s.contract.feature_names), s.contract.text_dim
    rng = np.random.default_rng(0)
    rows = []
    for b in batches:
        feats = np.abs(rng.standard_normal((b, nf))).astype(np.float32)
        text = rng.standard_normal((b, td)).astype(np.float32)
        rate, ms = _rate(lambda: s.score(feats, text), b, seconds)
        rows.append(("head", b, rate, ms))
    if s.encoder is not None:
        for b in batches:
            texts = [f"{REVIEW} #{i}" for i in range(b)]
            rate, ms = _rate(lambda: s.encode(texts), b, seconds)
            rows.append(("encoder", b, rate, ms))
    return rows


@app.command()
def main(model: Path = typer.Option(None, "--model", help="model folder (default: champion, else a stand-in)"),
         seconds: float = typer.Option(2.0, "--seconds", min=0.1, help="time per measurement"),
         batches: str = typer.Option("1,64,256", "--batches")) -> None:
    from rich.console import Console
    from rich.table import Table

    from serving.registry import Registry
    from streams.settings import get_settings

    console = Console()
    sizes = [int(x) for x in batches.split(",") if x.strip()]
    tmp = None
    if model is None:
        settings = get_settings()
        reg = Registry(settings.models_dir)
        champ = reg.champion()
        if champ is not None:
            model = reg.path(champ)
        else:
            tmp = tempfile.TemporaryDirectory()
            console.log("no champion in the registry: exporting a stand-in model (untrained head, pretrained encoder)")
            model = _standin(Path(tmp.name) / "m", settings.data_dir / "cache")
    console.log(f"model: {model}")
    gpu, why = _cuda_usable(model)
    results = {"CPU": bench(model, ["CPUExecutionProvider"], sizes, seconds)}
    if gpu:
        results["GPU"] = bench(model, ["CUDAExecutionProvider", "CPUExecutionProvider"], sizes, seconds)
    table = Table(title="scoring throughput (rows or texts per second; median ms per call)")
    table.add_column("graph")
    table.add_column("batch", justify="right")
    for dev in results:
        table.add_column(f"{dev} rows/s", justify="right")
        table.add_column(f"{dev} ms", justify="right")
    if gpu:
        table.add_column("GPU/CPU", justify="right")
    for i, (graph, b, rate, ms) in enumerate(results["CPU"]):
        cells = [graph, str(b), f"{rate:,.0f}", f"{ms:.2f}"]
        if gpu:
            _, _, grate, gms = results["GPU"][i]
            cells += [f"{grate:,.0f}", f"{gms:.2f}", f"{grate / rate:.1f}x"]
        table.add_row(*cells)
    console.print(table)
    console.print("GPU: " + (why if gpu else f"not present - {why}; CPU figures only"))
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    app()
