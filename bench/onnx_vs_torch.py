"""ONNX (onnxruntime, as the worker serves it) vs torch eager for the scoring head.

    .venv/bin/python bench/onnx_vs_torch.py [--batches 1,64,256] [--seconds 1.5] [--runs 2] [--json OUT]

The head is ``training.model.Ensemble`` of ``common.N_MEMBERS`` ``ZILNNet`` (the shape `clv
train` exports: standardisation, MLPs, ZILN maths with the ndtri polynomial, member average),
exported with ``training.export.export_head`` (which checks parity). Both sides get the same
inputs. Two thread settings: 1 thread each (what a worker sharing a core gets), and each
library's default. Reports median µs per call, rows/s and the speed-up of ONNX over torch;
also the ``serving.scorer.Scorer.score`` call the worker makes (ONNX + finite checks +
segments). Time per call is the median of many calls over ``--seconds``.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import typer

from common import N_MEMBERS, Report, load, median

app = typer.Typer(add_completion=False)


def _time(fn, seconds: float) -> float:
    """Median seconds per call."""
    for _ in range(5):
        fn()
    times = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end or len(times) < 20:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return median(times)


def _head():
    import torch

    from training.model import Ensemble, ZILNNet

    torch.manual_seed(0)
    return Ensemble([ZILNNet() for _ in range(N_MEMBERS)]).eval()


@app.command()
def main(batches: str = typer.Option("1,64,256"), seconds: float = typer.Option(1.5),
         runs: int = typer.Option(2, min=1), json_out: Path = typer.Option(None, "--json")) -> None:
    import onnxruntime as ort
    import torch

    from serving.contract import Contract
    from serving.scorer import Scorer
    from streams.fold import N_FEATURES, TEXT_DIM
    from training.export import export_head

    sizes = [int(b) for b in batches.split(",")]
    head = _head()
    rng = np.random.default_rng(0)
    sample = (np.abs(rng.standard_normal((64, N_FEATURES))).astype(np.float32) * 3,
              rng.standard_normal((64, TEXT_DIM)).astype(np.float32))
    tmp = tempfile.TemporaryDirectory()
    path = Path(tmp.name) / "head.onnx"
    meta = Contract.current("bench-head", 39, {"vip": 100.0, "high": 50.0, "mid": 10.0, "lapsing_p": 0.15}).to_metadata()
    parity = export_head(head, path, meta, sample)
    rep = Report(f"Scoring head: ONNX Runtime vs torch eager ({N_MEMBERS}-member ensemble, CPU)",
                 ["threads", "batch", "run", "torch µs/call", "ONNX µs/call", "ONNX speed-up",
                  "Scorer.score µs/call", "ONNX rows/s", "load"])
    default_torch_threads = torch.get_num_threads()
    speedups: dict = {}
    for threads in ("1", "default"):
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads == "1":
            opts.intra_op_num_threads = 1
            torch.set_num_threads(1)
        else:
            torch.set_num_threads(default_torch_threads)
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        scorer = Scorer.__new__(Scorer)  # the worker's score() on this session
        scorer.head, scorer.contract, scorer.version = sess, Contract.from_metadata(meta), "bench-head"
        names = ["p_repeat", "expected_clv", "quantiles"]
        for b in sizes:
            f = np.abs(rng.standard_normal((b, N_FEATURES))).astype(np.float32) * 3
            t = rng.standard_normal((b, TEXT_DIM)).astype(np.float32)
            tf, tt = torch.from_numpy(f), torch.from_numpy(t)

            def torch_call():
                with torch.inference_mode():
                    head(tf, tt)

            def onnx_call():
                sess.run(names, {"features": f, "text": t})

            for run in range(runs):
                t_torch = _time(torch_call, seconds)
                t_onnx = _time(onnx_call, seconds)
                t_scorer = _time(lambda: scorer.score(f, t), seconds)
                sp = t_torch / t_onnx
                speedups.setdefault((threads, b), []).append(sp)
                rep.add(threads, b, run + 1, 1e6 * t_torch, 1e6 * t_onnx, f"{sp:.1f}x", 1e6 * t_scorer,
                        b / t_onnx, load())
    tmp.cleanup()
    for (threads, b), sps in speedups.items():
        if b == 1:
            rep.target(f"ONNX vs torch at batch 1 ({threads} thread{'s' if threads != '1' else ''})", ">= 3x",
                       f"{median(sps):.1f}x (median of {len(sps)})", median(sps) >= 3)
    rep.notes.append(f"export parity (torch vs ONNX): p max abs {parity['p_repeat_max_abs']:.1e}, "
                     f"clv max rel {parity['expected_clv_max_rel']:.1e}")
    rep.notes.append(f"torch {torch.__version__} (default {default_torch_threads} threads), onnxruntime {ort.__version__}; "
                     "Scorer.score = session.run + finite checks + per-row segment (what Pipeline calls)")
    rep.show()
    rep.save(json_out)


if __name__ == "__main__":
    app()
