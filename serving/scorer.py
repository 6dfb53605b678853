"""ONNX scoring: the head on every event, the text encoder when a review arrives.

Imports onnxruntime and numpy only (no torch). A model whose contract does not match the
fold is refused with :class:`ContractError`; :class:`HotScorer` keeps the old model serving.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from serving.contract import Contract, ContractError, segment
from serving.registry import Registry

log = logging.getLogger("clv.scorer")
MAX_TOKENS = 256  # what all-MiniLM-L6-v2 was trained with (not the tokenizer's 512)


def pick_providers(spec: str = "auto") -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    if spec != "auto":
        wanted = [p.strip() for p in spec.split(",") if p.strip()]
        missing = [p for p in wanted if p not in available]
        if missing:
            raise ValueError(f"onnxruntime providers {missing} not available here (have {available})")
        return wanted
    # onnxruntime-gpu lists CUDA even on machines without a GPU (and then logs an error on
    # every session it falls back for), so only ask for it when a driver is actually present.
    if not _gpu_present():
        available = [p for p in available if p not in ("CUDAExecutionProvider", "TensorrtExecutionProvider")]
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


def _gpu_present() -> bool:
    import ctypes.util

    return os.path.exists("/dev/nvidiactl") or ctypes.util.find_library("cuda") is not None


def _session(path: Path, providers: list[str], threads: int | None = None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
    # idle pool threads spin-wait for the next run by default, burning the CPU the worker's
    # own thread (and Kafka/Redis on the same box) need between batches
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 3  # CUDA-provider fallback warnings are logged by us, once
    try:
        sess = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidProtobuf types
        raise ContractError(f"cannot load ONNX model {path}: {exc}") from exc
    return sess


@dataclass
class Scores:
    p_repeat: np.ndarray  # [N]
    expected_clv: np.ndarray  # [N]
    quantiles: np.ndarray  # [N, 3]
    segments: list[str]
    model_version: str


class Scorer:
    """One loaded model version (head + optional encoder)."""

    def __init__(self, model_dir: Path, providers: list[str] | None = None, threads: int | None = None):
        model_dir = Path(model_dir)
        head = model_dir / "head.onnx"
        if not head.exists():
            raise ContractError(f"{model_dir} has no head.onnx; train one with `clv train`")
        self.providers = providers or pick_providers()
        # the head is a small MLP: a thread pool only adds hand-offs (bench/pipeline_step.py:
        # 46 -> 27 CPU µs/event at the same wall rate with one thread)
        self.head = _session(head, self.providers, 1)
        meta = self.head.get_modelmeta().custom_metadata_map
        self.contract = Contract.from_metadata(meta, source=str(head))
        self.version = self.contract.model_version
        # the embedding space the head expects the stored review means in ("none": no text)
        self.encoder_id = meta.get("clv.encoder_id", "none")
        names = {i.name for i in self.head.get_inputs()}
        outs = {o.name for o in self.head.get_outputs()}
        if names != {"features", "text"} or not {"p_repeat", "expected_clv", "quantiles"} <= outs:
            raise ContractError(
                f"{head} has inputs {sorted(names)} / outputs {sorted(outs)}; the contract wants "
                "inputs features,text and outputs p_repeat,expected_clv,quantiles"
            )
        self.encoder = None
        self.tokenizer = None
        enc = model_dir / "encoder.onnx"
        if enc.exists():
            from tokenizers import Tokenizer

            self.encoder = _session(enc, self.providers, threads)
            self.tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
            self.tokenizer.enable_truncation(MAX_TOKENS)
            self.tokenizer.enable_padding()
        # a smoke run proves the graph executes before anyone relies on it
        self.score(np.zeros((1, len(self.contract.feature_names)), np.float32),
                   np.zeros((1, self.contract.text_dim), np.float32))
        if self.encoder is not None:
            self.encode(["smoke test"])
        log.info("model %s loaded from %s (providers %s, encoder %s)", self.version, model_dir,
                 self.head.get_providers(), "yes" if self.encoder else "no")

    def score(self, feats: np.ndarray, text: np.ndarray) -> Scores:
        p, clv, q = self.head.run(
            ["p_repeat", "expected_clv", "quantiles"],
            {"features": np.ascontiguousarray(feats, np.float32), "text": np.ascontiguousarray(text, np.float32)},
        )
        p = np.asarray(p).reshape(-1)
        clv = np.asarray(clv).reshape(-1)
        if not (np.all(np.isfinite(p)) and np.all(np.isfinite(clv))):
            raise FloatingPointError(f"model {self.version} produced non-finite scores")
        th = self.contract.thresholds
        segs = [segment(float(c), float(pp), th) for c, pp in zip(clv, p)]
        return Scores(p, clv, np.asarray(q).reshape(len(p), -1), segs, self.version)

    def encode(self, texts: list[str]) -> np.ndarray | None:
        """Embed review texts; None when this model has no encoder."""
        if self.encoder is None or not texts:
            return None
        enc = self.tokenizer.encode_batch(texts)
        ids = np.array([e.ids for e in enc], dtype=np.int64)
        mask = np.array([e.attention_mask for e in enc], dtype=np.int64)
        feeds = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in {i.name for i in self.encoder.get_inputs()}:
            feeds["token_type_ids"] = np.zeros_like(ids)
        (emb,) = self.encoder.run(["embedding"], feeds)
        return np.asarray(emb, np.float32)


class HotScorer:
    """Serves the registry's champion and swaps to a new one without a restart.

    ``maybe_reload`` is cheap (one small file read); a new champion that fails to load or
    breaks the contract is refused, logged, and the current model keeps serving. A model that
    loads but then fails at scoring time where the one it replaced still works is refused by
    ``demote`` and the previous model serves again (``previous`` is kept for that).
    """

    def __init__(self, registry: Registry, providers: list[str] | None = None, threads: int | None = None):
        self.registry = registry
        self.providers = providers or pick_providers()
        self.threads = threads
        self.current: Scorer | None = None
        self.previous: Scorer | None = None  # the model current replaced: the fallback
        self.refused: dict[str, str] = {}
        self.held: dict[tuple, str] = {}  # (version, embedding space) -> why it waits
        self.on_change = None  # callback(version) for metrics
        self.on_refuse = None  # callback(version) for metrics
        self.maybe_reload()

    @staticmethod
    def space_conflict(model: "Scorer", space: str | None) -> str | None:
        """Why ``model`` cannot score the embeddings stored in ``space`` (None: it can)."""
        if space is None or model.encoder_id in ("none", space):
            return None
        return (f"model {model.version} embeds review text with encoder {model.encoder_id}, but the "
                f"user embeddings in Redis were built with encoder {space}: mixing them would skew "
                "every score. Run `clv replay` (workers stopped) to re-embed the archive with the "
                "champion's encoder; workers then switch by themselves")

    def hold_if_incompatible(self, space: str | None) -> bool:
        """Stop serving the current model if it cannot score embeddings built in ``space``
        (state keeps being folded, scores wait). True if it was taken out of service."""
        cur = self.current
        why = self.space_conflict(cur, space) if cur is not None else None
        if why is None:
            return False
        self.current, self.previous = None, None
        self._hold(cur.version, space, why, "nothing")
        return True

    def _hold(self, version: str, space: str | None, why: str, serving: str) -> None:
        """``version`` waits until the embedding space changes (a replay): logged and counted."""
        self.held[(version, space)] = why
        if self.on_refuse:
            self.on_refuse(version)
        log.error("not serving model %s: %s; serving %s", version, why, serving)

    def maybe_reload(self, space: str | None = None) -> bool:
        """Swap to the registry's champion if it is new, loads, keeps the contract and can
        score the embeddings stored in ``space`` (the encoder id recorded in Redis)."""
        v = self.registry.champion()
        if v is None or (self.current and self.current.version == v) or v in self.refused:
            return False
        if (v, space) in self.held:  # waits for a replay; re-checked when the space changes
            return False
        try:
            new = Scorer(self.registry.path(v), self.providers, self.threads)
            if new.version != v:
                raise ContractError(f"registry folder {v} holds a model stamped {new.version}")
        except Exception as exc:  # noqa: BLE001 - any broken model is refused, never served
            self.refused[v] = str(exc)
            if self.on_refuse:
                self.on_refuse(v)
            log.error("refusing model %s: %s; still serving %s", v, exc,
                      self.current.version if self.current else "nothing")
            return False
        why = self.space_conflict(new, space)
        if why is not None:
            self._hold(v, space, why, self.current.version if self.current else "nothing")
            return False
        old = self.current.version if self.current else None
        if self.current is not None:
            self.previous = self.current
        self.current = new
        log.info("now serving model %s (was %s)", v, old)
        if self.on_change:
            self.on_change(v)
        return True

    def demote(self, model: Scorer, reason: str) -> bool:
        """``model`` failed at scoring time where ``previous`` works: refuse it (until a new
        champion is promoted) and serve the previous model again. False if nothing changed."""
        if self.current is not model or self.previous is None:
            return False
        self.refused[model.version] = f"failed at scoring time: {reason}"
        self.current, self.previous = self.previous, None
        log.error("model %s failed at scoring time (%s); refused it, serving %s again",
                  model.version, reason, self.current.version)
        if self.on_refuse:
            self.on_refuse(model.version)
        if self.on_change:
            self.on_change(self.current.version)
        return True
