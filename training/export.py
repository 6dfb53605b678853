"""ONNX export with the serving contract.

``export_model(fitted, out_dir, model_version, horizon_weeks)`` writes::

    head.onnx       features [N, F], text [N, 384] -> p_repeat, expected_clv, quantiles
                    (legacy exporter, opset 17; contract stamped in metadata_props)
    encoder.onnx    input_ids, attention_mask -> embedding (mean-pooled, L2-normalised),
                    legacy exporter + onnxruntime's BERT fusion; only when text is used
    tokenizer.json  the encoder's tokenizer (truncation 256)
    card.json       config, training record, thresholds, parity and int8 figures (JSON)

Every export checks parity torch vs onnxruntime on real inputs and refuses to finish when
the graphs disagree (``ExportError``): a model that would score differently from what was
evaluated never reaches the registry.
"""
from __future__ import annotations

import contextlib
import copy
import datetime as dt
import hashlib
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from serving.contract import Contract
from streams.fold import FEATURE_NAMES, TEXT_DIM

log = logging.getLogger("clv.export")
OPSET = 17
HEAD_ATOL = 1e-5  # p_repeat, absolute
HEAD_RTOL = 1e-4  # expected_clv and quantiles, relative to max(1, |value|): float32 exp() of ~20

ENCODER_MIN_COSINE = 0.9999
HEAD_OUTPUTS = ["p_repeat", "expected_clv", "quantiles"]
DEFAULT_TEXTS = (
    "Great blender, I use it every morning and already ordered a second one for my sister.",
    "Arrived broken and support never answered. Returning it.",
    "ok",
    "The sizing runs small; exchanged for a larger one and now it fits perfectly. Will buy again.",
    "Meh. Does the job but the battery dies after two hours, not worth the premium price at all.",
    "Fast delivery, nice packaging, exactly as described in the listing. Five stars from me!",
    "I have bought from this shop for years: quality keeps dropping while prices keep rising.",
    "Perfect gift.",
)


class ExportError(RuntimeError):
    """The exported graph does not reproduce the trained model (or could not be written)."""


@contextlib.contextmanager
def _quiet():
    """Silence the exporter's known, harmless warnings (legacy-exporter deprecation, tracer
    notes about transformers' mask code whose values are constant for any batch shape)."""
    import warnings

    with warnings.catch_warnings():
        for cat in (DeprecationWarning, UserWarning, FutureWarning):
            warnings.simplefilter("ignore", cat)
        try:
            from torch.jit import TracerWarning

            warnings.simplefilter("ignore", TracerWarning)
        except ImportError:
            pass
        yield


def _ort_session(path: Path, threads: int = 1):
    """A CPU session; ``threads=0``: up to 4 threads that sleep rather than spin (a shared
    machine's cores are not all ours)."""
    import os

    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = threads or min(4, os.cpu_count() or 1)
    if opts.intra_op_num_threads > 1:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def metadata(path: Path) -> dict[str, str]:
    """The model's metadata_props (what ``stamp`` wrote), without loading external weights."""
    import onnx

    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}


def stamp(path: Path, meta: dict[str, str]) -> None:
    """Write ``meta`` into the model's metadata_props (replacing keys already there)."""
    import onnx

    m = onnx.load(str(path))
    keep = [p for p in m.metadata_props if p.key not in meta]
    del m.metadata_props[:]
    m.metadata_props.extend(keep)
    for k, v in meta.items():
        m.metadata_props.add(key=k, value=str(v))
    onnx.save(m, str(path))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ---- head --------------------------------------------------------------------------------
def export_head(head, path: Path, meta: dict[str, str], sample: tuple[np.ndarray, np.ndarray]) -> dict:
    """Export the ensemble head and check it against torch on ``sample`` (features, text)."""
    import torch

    head = head.eval().cpu()
    feats, text = (torch.from_numpy(np.ascontiguousarray(a, np.float32)) for a in sample)
    path = Path(path)
    with _quiet():
        torch.onnx.export(
            head, (feats[:2], text[:2]), str(path), dynamo=False, opset_version=OPSET,
            input_names=["features", "text"], output_names=HEAD_OUTPUTS,
            dynamic_axes={"features": {0: "batch"}, "text": {0: "batch"}, "p_repeat": {0: "batch"},
                          "expected_clv": {0: "batch"}, "quantiles": {0: "batch"}},
        )
    stamp(path, meta)
    return head_parity(head, path, sample)


def head_parity(head, path: Path, sample: tuple[np.ndarray, np.ndarray]) -> dict:
    import torch

    feats, text = (np.ascontiguousarray(a, np.float32) for a in sample)
    with torch.inference_mode():
        ref = [t.numpy() for t in head(torch.from_numpy(feats), torch.from_numpy(text))]
    got = _ort_session(path).run(HEAD_OUTPUTS, {"features": feats, "text": text})
    out = {"rows": int(len(feats))}
    for name, r, g in zip(HEAD_OUTPUTS, ref, got):
        diff = np.abs(np.asarray(g) - r)
        out[f"{name}_max_abs"] = float(diff.max()) if diff.size else 0.0
        out[f"{name}_max_rel"] = float((diff / np.maximum(1.0, np.abs(r))).max()) if diff.size else 0.0
    out["ok"] = (out["p_repeat_max_abs"] <= HEAD_ATOL and out["expected_clv_max_rel"] <= HEAD_RTOL
                 and out["quantiles_max_rel"] <= HEAD_RTOL)
    if not out["ok"]:
        raise ExportError(f"head.onnx disagrees with torch beyond atol {HEAD_ATOL} (p) / rtol {HEAD_RTOL} "
                          f"(values): {out}; do not ship it - report this with the card")
    return out


# ---- encoder -----------------------------------------------------------------------------
def cached_encoder(encoder, cache_dir: Path) -> tuple[Path, dict]:
    """The optimised graph of this encoder's weights, kept in ``cache_dir`` under their
    fingerprint (exported and parity-checked once; the pretrained encoder is the same for
    every model that does not fine-tune it). Returns (path, export record)."""
    cache_dir = Path(cache_dir)
    path = cache_dir / f"encoder-{encoder.fingerprint()}.onnx"
    rec_path = path.with_suffix(".json")
    if path.exists() and rec_path.exists():
        return path, json.loads(rec_path.read_text())
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache_dir / f".encoder-{time.time_ns()}.onnx"
    try:
        rec = {"fingerprint": encoder.fingerprint(), "opset": OPSET}
        _export_encoder_graph(encoder, tmp, rec)
        tok = serving_tokenizer(encoder.path / "tokenizer.json")
        rec["parity"] = encoder_parity(encoder, tmp, tok, DEFAULT_TEXTS)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    rec_path.write_text(json.dumps(rec, indent=2) + "\n")
    return path, rec


def export_encoder(encoder, path: Path, meta: dict[str, str], cache_dir: Path | None = None) -> dict:
    """Export ``TextEncoder`` as a pooled, normalised, BERT-fused ONNX graph (through the
    cache when ``cache_dir`` is given)."""
    path = Path(path)
    t0 = time.perf_counter()
    if cache_dir is not None:
        src, info = cached_encoder(encoder, cache_dir)
        shutil.copyfile(src, path)
        info = {**info, "from_cache": str(src)}
    else:
        info = {"fingerprint": encoder.fingerprint(), "opset": OPSET}
        _export_encoder_graph(encoder, path, info)
    stamp(path, meta)
    info["seconds"] = round(time.perf_counter() - t0, 2)
    return info


def _export_encoder_graph(encoder, path: Path, info: dict) -> None:
    import torch
    from onnxruntime.transformers import optimizer

    cfg = encoder.model.config
    module = encoder.pooled_module()
    if encoder.device != "cpu":
        module = copy.deepcopy(module).cpu()
    b = encoder.tokenizer(["a short one", "and a somewhat longer example sentence"], padding=True,
                          return_tensors="pt")
    raw = path.with_name(path.stem + ".raw.onnx")
    try:
        with _quiet():
            torch.onnx.export(
                module, (b["input_ids"].cpu(), b["attention_mask"].cpu()), str(raw), dynamo=False,
                opset_version=OPSET, input_names=["input_ids", "attention_mask"], output_names=["embedding"],
                dynamic_axes={"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"},
                              "embedding": {0: "batch"}},
            )
        for name in ("fusion_base", "onnx_model", "onnx_model_bert"):  # one line per fusion at INFO
            logging.getLogger(name).setLevel(logging.WARNING)
        opt = optimizer.optimize_model(str(raw), model_type="bert", num_heads=cfg.num_attention_heads,
                                       hidden_size=cfg.hidden_size)
        info["fused"] = {k: v for k, v in opt.get_fused_operator_statistics().items() if v}
        opt.save_model_to_file(str(path))
    finally:
        raw.unlink(missing_ok=True)
    if not info["fused"].get("Attention"):
        log.warning("onnxruntime fused no Attention nodes in the encoder: %s", info["fused"])


def _ort_encode(sess, tokenizer, texts: Sequence[str], batch: int = 32) -> np.ndarray:
    out = []
    for i in range(0, len(texts), batch):
        enc = tokenizer.encode_batch(list(texts[i:i + batch]))
        ids = np.array([e.ids for e in enc], dtype=np.int64)
        mask = np.array([e.attention_mask for e in enc], dtype=np.int64)
        out.append(sess.run(["embedding"], {"input_ids": ids, "attention_mask": mask})[0])
    return np.concatenate(out) if out else np.zeros((0, TEXT_DIM), np.float32)


def serving_tokenizer(src: Path, dst: Path | None = None):
    """The tokenizer as the scorer uses it (truncation 256, pad to the longest); saved to ``dst``."""
    from tokenizers import Tokenizer

    from serving.scorer import MAX_TOKENS

    tok = Tokenizer.from_file(str(src))
    tok.enable_truncation(MAX_TOKENS)
    tok.enable_padding()
    if dst is not None:
        tok.save(str(dst))
    return tok


def encoder_parity(encoder, path: Path, tokenizer, texts: Sequence[str]) -> dict:
    """torch (TextEncoder.encode) vs onnxruntime through the serving tokenizer."""
    ref = encoder.encode(list(texts))
    got = _ort_encode(_ort_session(path), tokenizer, texts)
    cos = np.sum(ref * got, axis=1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1))
    out = {"texts": len(texts), "max_abs": float(np.abs(ref - got).max()),
           "cosine_min": float(cos.min()), "cosine_mean": float(cos.mean())}
    out["ok"] = out["cosine_min"] > ENCODER_MIN_COSINE
    if not out["ok"]:
        raise ExportError(f"encoder.onnx disagrees with torch (min cosine {out['cosine_min']:.6f}): {out}")
    return out


def quantize_encoder(src: Path, dst: Path, tokenizer, texts: Sequence[str]) -> dict:
    """Dynamic int8 (per-channel) of the fused fp32 graph; cosine to fp32 and speed-up."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    t0 = time.perf_counter()
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.WARNING))  # the quantizer logs every tensor at INFO on the root logger
    try:
        quantize_dynamic(str(src), str(dst), per_channel=True, weight_type=QuantType.QInt8,
                         extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    finally:
        root.setLevel(level)
    q_s = time.perf_counter() - t0
    fp, q8 = _ort_session(src), _ort_session(dst)
    texts = list(texts)
    timings = {}
    embs = {}
    for name, sess in (("fp32", fp), ("int8", q8)):
        _ort_encode(sess, tokenizer, texts[:8])  # warm-up
        t0 = time.perf_counter()
        embs[name] = _ort_encode(sess, tokenizer, texts)
        timings[name] = time.perf_counter() - t0
    cos = np.sum(embs["fp32"] * embs["int8"], axis=1)
    return {
        "texts": len(texts), "cosine_min": float(cos.min()), "cosine_mean": float(cos.mean()),
        "speedup": round(timings["fp32"] / max(timings["int8"], 1e-9), 2),
        "fp32_ms_per_text": round(1000 * timings["fp32"] / max(1, len(texts)), 3),
        "int8_ms_per_text": round(1000 * timings["int8"] / max(1, len(texts)), 3),
        "fp32_mb": round(Path(src).stat().st_size / 2**20, 1), "int8_mb": round(Path(dst).stat().st_size / 2**20, 1),
        "quantize_seconds": round(q_s, 2), "per_channel": True, "threads": 1,
    }


# ---- the whole model ---------------------------------------------------------------------
def export_model(fitted, out_dir: Path, model_version: str, horizon_weeks: int, *,
                 int8: str | None = None, cache_dir: Path | None = None, card_extra: dict | None = None) -> Path:
    """Write the model folder (see module doc). ``int8``: "off", "measure" (figures in the
    card, fp32 served) or "serve" (int8 becomes encoder.onnx); default: the training config."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    int8 = int8 or fitted.cfg.int8
    if int8 not in ("off", "measure", "serve"):
        raise ValueError(f"int8 must be off, measure or serve, got {int8!r}")
    enc = fitted.encoder
    encoder_id = enc.fingerprint() if enc is not None else "none"
    contract = Contract.current(model_version, int(horizon_weeks), fitted.thresholds)
    contract.check("export")
    meta = contract.to_metadata()
    meta["clv.encoder_id"] = encoder_id
    # spend intervals: lo/hi = expm1(log1p(q50) -/+ s * (log1p(q50) - log1p(q10) | log1p(q90) - log1p(q50))),
    # lo clipped at 0 (training.calibration.scaled_interval); plain numbers, one per level
    for level, s in (fitted.info.get("interval_scale") or {}).items():
        meta[f"clv.interval_scale_{round(float(level) * 100)}"] = repr(float(s))
    card: dict = {
        "model_version": model_version,
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "horizon_weeks": int(horizon_weeks), "horizon_days": fitted.horizon_days,
        "thresholds": fitted.thresholds, "encoder_id": encoder_id,
        "feature_names": list(FEATURE_NAMES), "config": fitted.cfg.to_dict(), "training": fitted.info,
    }
    sample = fitted.info.get("_sample")
    if sample is None:
        raise ExportError("the fitted model keeps no input sample for the parity check; fit it with training.train.fit")
    t0 = time.perf_counter()
    card["parity"] = {"head": export_head(fitted.head, out_dir / "head.onnx", meta, sample)}
    if enc is not None:
        enc_meta = {"clv.model_version": model_version, "clv.encoder_id": encoder_id,
                    "clv.text_dim": str(TEXT_DIM), "clv.pooling": "mean+l2", "clv.max_tokens": "256"}
        tok_src = enc.path / "tokenizer.json"
        if enc.adopted is not None:  # the champion's graph, byte for byte, restamped
            shutil.copyfile(enc.adopted, out_dir / "encoder.onnx")
            stamp(out_dir / "encoder.onnx", enc_meta)
            card["encoder"] = {"fingerprint": encoder_id, "reused_from": str(enc.adopted)}
            if (enc.adopted.parent / "tokenizer.json").exists():
                tok_src = enc.adopted.parent / "tokenizer.json"
            int8 = "off"  # served as the champion served it (fp32 or int8)
        else:
            # only the pretrained encoder is worth caching: a fine-tuned one is new every run
            cache = cache_dir if encoder_id.startswith("base-") else None
            card["encoder"] = export_encoder(enc, out_dir / "encoder.onnx", enc_meta, cache)
        tok = serving_tokenizer(tok_src, out_dir / "tokenizer.json")
        texts = list(dict.fromkeys([*fitted.info.get("_texts", []), *DEFAULT_TEXTS]))[:128]
        cached = card["encoder"].pop("parity", None)
        if enc.adopted is not None:
            card["parity"]["encoder"] = {"reused": True, "note": "the champion's graph, checked when it was exported"}
        elif enc.torch_loaded or cached is None:
            card["parity"]["encoder"] = encoder_parity(enc, out_dir / "encoder.onnx", tok, texts)
        else:  # a copy of the cached graph, whose parity was checked when it was cached
            card["parity"]["encoder"] = {**cached, "checked_when_cached": True}
        if int8 != "off":
            q_path = out_dir / "encoder.int8.onnx"
            card["int8"] = quantize_encoder(out_dir / "encoder.onnx", q_path, tok, texts)
            card["int8"]["served"] = int8 == "serve"
            if int8 == "serve":
                stamp(q_path, enc_meta)
                q_path.replace(out_dir / "encoder.onnx")
            else:
                q_path.unlink()
            log.info("int8 encoder: cosine to fp32 min %.4f mean %.4f, %.2fx faster (%s)",
                     card["int8"]["cosine_min"], card["int8"]["cosine_mean"], card["int8"]["speedup"],
                     "served" if int8 == "serve" else "measured only")
    card["export_seconds"] = round(time.perf_counter() - t0, 2)
    card["files"] = {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)}
                     for p in sorted(out_dir.iterdir()) if p.suffix in (".onnx", ".json") and p.name != "card.json"}
    if card_extra:
        card.update(card_extra)
    write_card(out_dir, card)
    log.info("exported model %s to %s (encoder: %s)", model_version, out_dir, "yes" if enc is not None else "no")
    return out_dir


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items() if not str(k).startswith("_")}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, np.integer)):
        x = x.item()
    if isinstance(x, float) and not np.isfinite(x):
        return None
    if isinstance(x, np.ndarray):
        return x.tolist()
    return x


def write_card(out_dir: Path, card: dict) -> Path:
    """card.json, written atomically (JSON only; keys starting with '_' are private)."""
    path = Path(out_dir) / "card.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(_jsonable(card), indent=2, sort_keys=False, allow_nan=False) + "\n")
    tmp.replace(path)
    return path
