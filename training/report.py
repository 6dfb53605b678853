"""Backtest output: the rich console tables and the HTML report with PNG plots.

Report directory contents::

    index.html         tables (metrics with bootstrap CIs, paired differences) + the plots
    gain.png           cumulative share of actual value vs share of customers (Gini curve)
    deciles.png        mean predicted vs mean actual value per decile of prediction
    calibration.png    P(any purchase) reliability, and predicted vs actual value by bin
    metrics.json       everything in the tables, machine-readable
    predictions.npz    per-customer actual value and every model's predictions
"""
from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np

from training.evaluate import HIGHER_IS_BETTER, METRICS, Evaluation, ModelScores, cumulative_true, decile_table

LABELS = {
    "gini": "norm. Gini", "decile_mape": "decile MAPE", "spearman": "Spearman", "auc": "AUC(any)",
    "precision": "P@top20%", "recall": "R@top20%", "f1": "F1@top20%",
}
SHORT = {
    "gini": "Gini", "decile_mape": "dec.MAPE", "spearman": "Spearman", "auc": "AUC any",
    "precision": "P@20%", "recall": "R@20%", "f1": "F1@20%",
}


def _fmt(v: float) -> str:
    return "n/a" if v is None or not math.isfinite(v) else f"{v:.3f}"


def cell(ev: Evaluation, model: str, metric: str) -> str:
    s = _fmt(ev.point[model][metric])
    if ev.n_boot and model in ev.lo:
        s += f" [{_fmt(ev.lo[model][metric])}, {_fmt(ev.hi[model][metric])}]"
    return s


def _two_line(ev: Evaluation, model: str, metric: str) -> str:
    s = _fmt(ev.point[model][metric])
    if ev.n_boot and model in ev.lo:
        s += f"\n[dim]{_fmt(ev.lo[model][metric])}–{_fmt(ev.hi[model][metric])}[/]"
    return s


def verdict(metric: str, lo: float, hi: float) -> str:
    """'better' / 'worse' when the paired interval excludes 0, else 'same (noise)'."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return "n/a"
    if lo > 0 or hi < 0:
        up = lo > 0
        return "better" if up == HIGHER_IS_BETTER[metric] else "worse"
    return "same (noise)"


def console_tables(ev: Evaluation, title: str, metrics: Sequence[str] = METRICS):
    """(metrics table, paired-difference table or None) as rich renderables."""
    from rich.table import Table

    ci = f", {ev.level:.0%} bootstrap CI over {ev.n_boot} resamples of customers" if ev.n_boot else ""
    t = Table(title=f"{title} ({ev.n_customers} customers{ci})", title_justify="left")
    t.add_column("model", style="bold", no_wrap=True)
    for m in metrics:
        t.add_column(SHORT[m] + (" ↓" if not HIGHER_IS_BETTER[m] else " ↑"), justify="right", no_wrap=True)
    for name in ev.point:
        t.add_row(name, *(_two_line(ev, name, m) for m in metrics))
    d = None
    if ev.diffs:
        d = Table(title="paired differences (model - baseline) on the same resamples", title_justify="left")
        for c in ("comparison", "metric", "difference", "CI", "verdict"):
            d.add_column(c, justify="left" if c in ("comparison", "metric", "verdict") else "right")
        for (a, b), row in ev.diffs.items():
            for m in ("gini", "decile_mape"):
                pt, lo, hi = row[m]
                d.add_row(f"{a} - {b}", LABELS[m], f"{pt:+.3f}", f"[{lo:+.3f}, {hi:+.3f}]", verdict(m, lo, hi))
    return t, d


# ---- plots -------------------------------------------------------------------------------
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_gain(y: np.ndarray, models: Sequence[ModelScores], ev: Evaluation, path: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 5.2))
    x = np.arange(1, y.size + 1) / y.size
    ax.plot(x, cumulative_true(y, y), color="black", lw=2, label="perfect (by actual)")
    for m in models:
        ax.plot(x, cumulative_true(y, m.expected), lw=1.5, label=f"{m.name} (Gini {_fmt(ev.point[m.name]['gini'])})")
    ax.plot([0, 1], [0, 1], color="grey", ls="--", lw=1, label="random")
    ax.set_xlabel("share of customers, highest prediction first")
    ax.set_ylabel("share of actual value in the horizon")
    ax.set_title("Cumulative value (gain) curve")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_deciles(y: np.ndarray, models: Sequence[ModelScores], ev: Evaluation, path: Path) -> Path:
    plt = _plt()
    n = len(models)
    cols = min(n, 2)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.0 * cols, 3.6 * rows), squeeze=False)
    idx = np.arange(10)
    for k, m in enumerate(models):
        ax = axes[k // cols][k % cols]
        pred, true = decile_table(y, m.expected)
        ax.bar(idx - 0.2, pred, width=0.4, label="mean predicted")
        ax.bar(idx + 0.2, true, width=0.4, label="mean actual")
        ax.set_xticks(idx, [str(i + 1) for i in idx])
        ax.set_xlabel("decile of prediction (10 = highest)")
        ax.set_ylabel("value in the horizon")
        ax.set_title(f"{m.name}: decile MAPE {_fmt(ev.point[m.name]['decile_mape'])}", fontsize=10)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3, axis="y")
    for k in range(n, rows * cols):
        axes[k // cols][k % cols].axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _bins(score: np.ndarray, n_bins: int) -> np.ndarray:
    order = np.argsort(score, kind="stable")
    b = np.empty(score.size, dtype=np.int64)
    b[order] = (np.arange(score.size) * n_bins) // score.size
    return b


def plot_calibration(y: np.ndarray, models: Sequence[ModelScores], path: Path, n_bins: int = 20) -> Path:
    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11.5, 4.8))
    bought = (y > 0).astype(np.float64)
    for m in models:
        if m.p_any is not None:
            b = _bins(m.p_any, n_bins)
            cnt = np.bincount(b, minlength=n_bins)
            a1.plot(np.bincount(b, m.p_any, n_bins) / cnt, np.bincount(b, bought, n_bins) / cnt, "o-", ms=3, label=m.name)
        b = _bins(m.expected, n_bins)
        cnt = np.bincount(b, minlength=n_bins)
        a2.plot(np.bincount(b, m.expected, n_bins) / cnt, np.bincount(b, y, n_bins) / cnt, "o-", ms=3, label=m.name)
    a1.plot([0, 1], [0, 1], color="grey", ls="--", lw=1)
    a1.set_xlabel("predicted P(any purchase in horizon)")
    a1.set_ylabel("observed share who bought")
    a1.set_title(f"Purchase-probability calibration ({n_bins} quantile bins)", fontsize=10)
    a1.legend(fontsize=8)
    a1.grid(alpha=0.3)
    hi = max(float(np.max(y)) if y.size else 1.0, 1.0)
    a2.plot([1e-2, hi], [1e-2, hi], color="grey", ls="--", lw=1)
    a2.set_xscale("symlog", linthresh=1.0)
    a2.set_yscale("symlog", linthresh=1.0)
    a2.set_xlabel("mean predicted value (bin)")
    a2.set_ylabel("mean actual value (bin)")
    a2.set_title(f"Value calibration ({n_bins} quantile bins of prediction)", fontsize=10)
    a2.legend(fontsize=8)
    a2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---- HTML ---------------------------------------------------------------------------------
_CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}img{max-width:100%;margin:0.5em 0}
.better{color:#0a7a0a}.worse{color:#b00}code{background:#f3f3f3;padding:0 3px}"""


def _table_html(ev: Evaluation) -> str:
    head = "".join(f"<th>{html.escape(LABELS[m])} {'&darr;' if not HIGHER_IS_BETTER[m] else '&uarr;'}</th>" for m in METRICS)
    rows = "".join(
        f"<tr><td>{html.escape(n)}</td>" + "".join(f"<td>{html.escape(cell(ev, n, m))}</td>" for m in METRICS) + "</tr>"
        for n in ev.point
    )
    return f"<table><tr><th>model</th>{head}</tr>{rows}</table>"


def _diff_html(ev: Evaluation) -> str:
    if not ev.diffs:
        return ""
    rows = []
    for (a, b), row in ev.diffs.items():
        for m in ("gini", "decile_mape", "spearman", "auc", "f1"):
            pt, lo, hi = row[m]
            v = verdict(m, lo, hi)
            cls = "better" if v == "better" else "worse" if v == "worse" else ""
            rows.append(f"<tr><td>{html.escape(a)} &minus; {html.escape(b)}</td><td>{LABELS[m]}</td>"
                        f"<td>{pt:+.3f}</td><td>[{lo:+.3f}, {hi:+.3f}]</td><td class='{cls}'>{v}</td></tr>")
    return ("<h2>Paired differences</h2><p>Each bootstrap resample scores all models on the same customers; "
            "an interval that excludes 0 is a real difference, one that includes 0 is noise.</p>"
            "<table><tr><th>comparison</th><th>metric</th><th>difference</th><th>CI</th><th>verdict</th></tr>"
            + "".join(rows) + "</table>")


def save_predictions(path: Path, ids: Sequence[str], y: np.ndarray, models: Sequence[ModelScores]) -> Path:
    """Per-customer actuals and predictions as .npz (plain arrays, loads with allow_pickle=False):
    ``customer_id``, ``actual``, ``names``, ``expected`` [models, N], ``p_any`` [models, N] (NaN = none)."""
    n = len(ids)
    p_any = np.full((len(models), n), np.nan)
    for i, m in enumerate(models):
        if m.p_any is not None:
            p_any[i] = m.p_any
    np.savez_compressed(path, customer_id=np.asarray(list(ids), dtype=str), actual=np.asarray(y, np.float64),
                        names=np.asarray([m.name for m in models], dtype=str),
                        expected=np.stack([np.asarray(m.expected, np.float64) for m in models]), p_any=p_any)
    return path


def write_report(out_dir: str | Path, y: np.ndarray, models: Sequence[ModelScores], ev: Evaluation,
                 meta: dict, notes: Sequence[str] = (), ids: Sequence[str] | None = None) -> Path:
    """Write index.html, the three PNGs, metrics.json (and predictions.npz when ``ids`` are
    given) into ``out_dir``; returns index.html."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    y = np.asarray(y, dtype=np.float64)
    if ids is not None:
        save_predictions(out / "predictions.npz", ids, y, models)
    plot_gain(y, models, ev, out / "gain.png")
    plot_deciles(y, models, ev, out / "deciles.png")
    plot_calibration(y, models, out / "calibration.png")
    calib = {}
    for m in models:
        pred, true = decile_table(y, m.expected)
        calib[m.name] = {"total_predicted_over_actual": float(m.expected.sum() / y.sum()) if y.sum() > 0 else None,
                         "decile_mean_predicted": pred.round(4).tolist(), "decile_mean_actual": true.round(4).tolist()}
    payload = {"meta": meta, "notes": list(notes), **ev.to_json(), "calibration": calib}
    (out / "metrics.json").write_text(json.dumps(payload, indent=2, default=str))
    meta_rows = "".join(f"<tr><td>{html.escape(str(k))}</td><td style='text-align:left'>{html.escape(str(v))}</td></tr>"
                        for k, v in meta.items())
    notes_html = "".join(f"<li>{html.escape(n)}</li>" for n in notes)
    ci = (f"{ev.level:.0%} percentile bootstrap intervals over {ev.n_boot} resamples of customers"
          if ev.n_boot else "no bootstrap (point estimates only)")
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>CLV backtest</title>
<style>{_CSS}</style></head><body>
<h1>CLV backtest</h1>
<table>{meta_rows}</table>
<h2>Metrics</h2><p>{ev.n_customers} customers; {ci}. Metric definitions: docs/backtest.md
(google/lifetime_value definitions for normalised Gini and decile MAPE).</p>
{_table_html(ev)}
{_diff_html(ev)}
<h2>Overall calibration</h2><p>Total predicted value / total actual value (1 = calibrated in aggregate):
{", ".join(f"{html.escape(k)} {v['total_predicted_over_actual']:.3f}" for k, v in calib.items() if v["total_predicted_over_actual"] is not None)}</p>
{"<h2>Notes</h2><ul>" + notes_html + "</ul>" if notes_html else ""}
<h2>Cumulative value (Gini) curve</h2><img src="gain.png" alt="gain curve">
<h2>Deciles: predicted vs actual</h2><img src="deciles.png" alt="decile bars">
<h2>Calibration</h2><img src="calibration.png" alt="calibration">
</body></html>"""
    index = out / "index.html"
    index.write_text(page)
    return index
