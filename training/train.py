"""Fit the CLV model: (optionally) fine-tune the text encoder's top layers, embed reviews,
fit the text probe (``training.probe``), train an ensemble of ZILN heads with early
stopping, derive segment thresholds.

    fit(train: list[Examples] | Examples, cfg, valid=None) -> FittedModel
    FittedModel.predict(ex) -> Prediction(p_repeat, expected_clv, quantiles [N, 3])
    FittedModel.export(out_dir, model_version, horizon_weeks) -> out_dir  (ONNX + card.json)

Text: the model always embeds ``Examples.texts`` with its own encoder (the one it exports),
so whatever ``encode`` built the examples, training, prediction and serving see the same
embedding space. ``has_text`` is set from the texts the same way the worker sets it
(a review with non-empty text is embedded).
"""
from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from streams.fold import FEATURE_NAMES
from training.dataset import Examples, concat, model_inputs

log = logging.getLogger("clv.train")
N_PROBE = 2  # text scores of the "probe" head: any purchase, log1p spend (training.probe.probe_targets)
SEGMENT_QUANTILES = {"vip": 0.95, "high": 0.80, "mid": 0.50}


@dataclass
class TrainConfig:
    seed: int = 0
    epochs: int = 200  # upper bound; early stopping on the validation loss ends sooner
    batch_size: int = 512
    lr: float = 2e-3
    weight_decay: float = 0.05  # AdamW (decoupled); 0.05 beat 1e-4 on CDNOW in both protocols
    hidden: tuple[int, ...] = (64, 32)
    text_head: str = "probe"  # "probe": cross-fitted ridge text scores (training.probe); "learned": joint layer
    text_proj: int = 16  # "learned" only: 384-d review embedding -> this many inputs of the MLP
    probe_folds: int = 5  # "probe": user-grouped folds for the out-of-fold scores and the ridge penalty
    dropout: float = 0.1
    patience: int = 12  # epochs without validation improvement before stopping
    valid_fraction: float = 0.15  # users held out for early stopping when no valid set is given
    n_ensemble: int = 5  # members (seeds seed, seed+1, ...) averaged in the exported head
    use_clicks: bool = True
    use_text: bool = True
    use_profile: bool = True
    finetune_layers: int = 2  # top encoder layers fine-tuned; 0 keeps the pretrained encoder
    finetune_texts: int = 384  # bounded sample of (review text, writer's target) pairs
    finetune_steps: int = 16
    finetune_batch: int = 32
    finetune_max_length: int = 64
    finetune_lr: float = 5e-5
    lapsing_p: float = 0.15  # segment "lapsing" below this p_repeat
    int8: str = "measure"  # encoder int8: "off", "measure" (card figures, fp32 served) or "serve"
    quick: bool = False  # small/fast: 1 member, <= 40 epochs, no fine-tuning, no int8
    device: str = "auto"  # "auto" (CUDA when present), "cpu", "cuda", "cuda:1", ...
    clip: str = "sigma"  # inputs beyond the training data: "sigma" (clip at +-10 sd) or "range" (at min/max)
    calibrate: bool = False  # scale each member's spend so its validation total matches the labels
    # (off: on CDNOW the members are already calibrated on same-period users; their spread
    # comes from extrapolating to older customers, which this cannot see - measured no gain)
    cache_dir: str | None = None  # keeps the exported pretrained encoder; embeds with it (fast)
    # A model folder whose text encoder (encoder.onnx, its clv.encoder_id) is reused as it is:
    # no fine-tuning, the same embedding space as the review means already in Redis. The trainer
    # sets it to the champion unless ``refit_encoder`` (docs/redis.md, "Embedding space").
    encoder_from: str | None = None
    refit_encoder: bool = False

    def effective(self) -> "TrainConfig":
        """The config actually used (``quick`` applied)."""
        if not self.quick:
            return self
        return dataclasses.replace(self, epochs=min(self.epochs, 40), patience=min(self.patience, 6),
                                   n_ensemble=1, finetune_layers=0, int8="off")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["hidden"] = list(self.hidden)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown TrainConfig keys {unknown}; known: {sorted(names)}")
        d = dict(d)
        if "hidden" in d:
            d["hidden"] = tuple(d["hidden"])
        return cls(**d)


@dataclass
class Prediction:
    p_repeat: np.ndarray  # [N]
    expected_clv: np.ndarray  # [N] USD in the horizon
    quantiles: np.ndarray  # [N, 3] 10 / 50 / 90 %


@dataclass
class FittedModel:
    cfg: TrainConfig  # effective config
    head: object  # training.model.Ensemble (torch, eval mode, on CPU)
    encoder: object | None  # training.text.TextEncoder, None when text is not used
    thresholds: dict
    horizon_days: float
    info: dict = field(default_factory=dict)  # rows, cutoffs, members, timings, fine-tuning

    @property
    def uses_text(self) -> bool:
        return self.encoder is not None

    def inputs(self, ex: Examples) -> tuple[np.ndarray, np.ndarray]:
        """(features, text) exactly as the stream would hand them to this model."""
        return _inputs(ex, self.encoder)

    def predict(self, ex: Examples, batch_size: int = 8192) -> Prediction:
        import torch

        feats, text = self.inputs(ex)
        ps, evs, qs = [], [], []
        with torch.inference_mode(), _threads(1):
            for i in range(0, len(feats), batch_size):
                p, ev, q = self.head(torch.from_numpy(feats[i:i + batch_size]),
                                     torch.from_numpy(text[i:i + batch_size]))
                ps.append(p.numpy())
                evs.append(ev.numpy())
                qs.append(q.numpy())
        if not ps:
            return Prediction(np.zeros(0, np.float32), np.zeros(0, np.float32), np.zeros((0, 3), np.float32))
        return Prediction(np.concatenate(ps), np.concatenate(evs), np.concatenate(qs))

    def export(self, out_dir: Path, model_version: str, horizon_weeks: int, **kw) -> Path:
        """Write head.onnx (+ encoder.onnx, tokenizer.json when text is used) and card.json.
        Keyword options: see ``training.export.export_model``."""
        from training.export import export_model

        return export_model(self, Path(out_dir), model_version, horizon_weeks, **kw)


def _inputs(ex: Examples, encoder) -> tuple[np.ndarray, np.ndarray]:
    return model_inputs(ex, None if encoder is None else encoder.encode)


def _seed_all(seed: int) -> None:
    import random

    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _split_users(ex: Examples, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Row indices (train, valid), all rows of a user on the same side (several cutoffs)."""
    users = sorted(set(ex.user_ids))
    rng = np.random.default_rng(seed)
    n_val = int(round(len(users) * fraction)) if len(users) >= 20 else 0
    val_users = set(rng.choice(users, size=n_val, replace=False).tolist()) if n_val else set()
    is_val = np.array([u in val_users for u in ex.user_ids])
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)


def _finetune(encoder, ex: Examples, cfg: TrainConfig) -> dict:
    """Fine-tune on a bounded sample of (text, standardised log1p(label) of its writer)."""
    rows = [i for i, t in enumerate(ex.texts) if t]
    if not rows:
        return {}
    y = np.log1p(ex.label[rows].astype(np.float64))
    y = (y - y.mean()) / (y.std() + 1e-6)
    pairs = [(t, float(yy)) for i, yy in zip(rows, y) for t in ex.texts[i]]
    rng = np.random.default_rng(cfg.seed)
    take = rng.permutation(len(pairs))[: cfg.finetune_texts]
    return encoder.finetune([pairs[i][0] for i in take], np.array([pairs[i][1] for i in take], np.float32),
                            layers=cfg.finetune_layers, steps=cfg.finetune_steps,
                            batch_size=cfg.finetune_batch, max_length=cfg.finetune_max_length,
                            lr=cfg.finetune_lr, seed=cfg.seed)


class _threads:
    """Run small-tensor work on one intra-op thread: the head's matrices are tiny, and
    several threads on a shared machine make an epoch 20-40x slower (measured)."""

    def __init__(self, n: int = 1):
        self.n = n

    def __enter__(self):
        import torch

        self.old = torch.get_num_threads()
        torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        import torch

        torch.set_num_threads(self.old)


class _AdamW:
    """AdamW (as torch.optim.AdamW, no amsgrad). Written out because constructing any
    torch.optim optimizer imports torch._dynamo: 4-9 s per process here, most of --quick."""

    def __init__(self, params, lr: float, weight_decay: float, betas=(0.9, 0.999), eps: float = 1e-8):
        import torch

        self.params = [p for p in params if p.requires_grad]
        self.lr, self.wd, self.b1, self.b2, self.eps, self.t = lr, weight_decay, betas[0], betas[1], eps, 0
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def step(self) -> None:
        import torch

        self.t += 1
        c1, c2 = 1 - self.b1 ** self.t, 1 - self.b2 ** self.t
        with torch.no_grad():
            for p, m, v in zip(self.params, self.m, self.v):
                if p.grad is None:
                    continue
                p.mul_(1 - self.lr * self.wd)
                m.mul_(self.b1).add_(p.grad, alpha=1 - self.b1)
                v.mul_(self.b2).addcmul_(p.grad, p.grad, value=1 - self.b2)
                p.addcdiv_(m, (v / c2).sqrt_().add_(self.eps), value=-self.lr / c1)


def _train_member(k: int, cfg: TrainConfig, data: dict, stats: dict, device: str):
    import torch

    from training.model import ZILNNet, feature_mask, ziln_loss

    seed = cfg.seed + k
    _seed_all(seed)
    probe = stats.get("probe")
    width = cfg.text_proj if cfg.text_head == "learned" else N_PROBE
    net = ZILNNet(cfg.hidden, width, cfg.dropout,
                  feature_mask(cfg.use_clicks, stats["text_used"], cfg.use_profile), stats["text_used"],
                  text_head=cfg.text_head)
    net.set_scaler(stats["mean"], stats["std"], stats.get("lo"), stats.get("hi"))
    net.init_output(stats["p"], stats["mu"], stats["sigma"])
    oof = None
    if probe is not None:  # the head trains on out-of-fold text scores, serves the full probe
        net.set_probe(probe.weight, probe.center)
        oof = torch.from_numpy(probe.oof).to(device)
    net.to(device)
    xf, xt, y = (torch.from_numpy(a).to(device) for a in data["train"])
    vf, vt, vy = (torch.from_numpy(a).to(device) for a in data["valid"])
    opt = _AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(seed)
    best, best_state, best_epoch, bad = float("inf"), None, 0, 0
    n = len(y)
    for epoch in range(cfg.epochs):
        net.train()
        perm = torch.randperm(n, generator=gen).to(device)
        for i in range(0, n, cfg.batch_size):
            idx = perm[i:i + cfg.batch_size]
            loss = ziln_loss(net(xf[idx], xt[idx], None if oof is None else oof[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        net.eval()
        with torch.no_grad():
            vl = float(ziln_loss(net(vf, vt), vy)) if len(vy) else float(loss)
        if vl < best - 1e-5:
            best, best_epoch, bad = vl, epoch, 0
            best_state = {kk: v.detach().clone() for kk, v in net.state_dict().items()}
        else:
            bad += 1
            if bad >= cfg.patience:
                break
    if best_state is not None:
        net.load_state_dict(best_state)
    net.eval()
    scale = 1.0
    if cfg.calibrate and len(vy) and float(vy.sum()) > 0:
        # members agree on ranking but not on the level of exp(mu + sigma^2/2) in the heavy
        # tail (seed to seed x1.04..x1.40 on CDNOW): pin each one's total to the validation total
        from training.model import ziln_predict

        with torch.no_grad():
            ev = ziln_predict(net(vf, vt))[1]
        scale = float(np.clip(float(vy.sum()) / max(float(ev.sum()), 1e-9), 0.25, 4.0))
        net.calibrate(scale)
    net.cpu()
    log.info("member %d (seed %d): best validation loss %.4f at epoch %d/%d, calibration x%.3f",
             k, seed, best, best_epoch + 1, epoch + 1, scale)
    return net, {"seed": seed, "valid_loss": round(best, 5), "best_epoch": best_epoch + 1, "epochs_run": epoch + 1,
                 "calibration": round(scale, 4)}


def fit(train: Sequence[Examples] | Examples, cfg: TrainConfig | None = None,
        valid: Examples | None = None) -> FittedModel:
    """Train on one or more cutoffs' examples (same horizon). ``valid`` (e.g. a later
    cutoff) drives early stopping; without it a share of the users is held out."""
    import torch

    from training.model import LOG_FEATURES, Ensemble, log_transform
    from training.text import TextEncoder, pick_device

    t0 = time.perf_counter()
    cfg = (cfg or TrainConfig()).effective()
    parts = [train] if isinstance(train, Examples) else list(train)
    ex = concat(parts)
    if len(ex) == 0 or not np.any(ex.label > 0):
        raise ValueError(
            f"training set has {len(ex)} rows and {int((ex.label > 0).sum())} buyers in the horizon; "
            "need some of both: use more data, earlier cutoffs or a shorter horizon"
        )
    if valid is not None and valid.horizon_days != ex.horizon_days:
        raise ValueError(f"valid horizon {valid.horizon_days} d != train horizon {ex.horizon_days} d")
    if cfg.clip not in ("sigma", "range"):
        raise ValueError(f"clip must be 'sigma' or 'range', got {cfg.clip!r}")
    if cfg.text_head not in ("probe", "learned"):
        raise ValueError(f"text_head must be 'probe' or 'learned', got {cfg.text_head!r}")
    _seed_all(cfg.seed)
    device = pick_device(cfg.device)
    if valid is None:
        tr_idx, va_idx = _split_users(ex, cfg.valid_fraction, cfg.seed)
    else:
        tr_idx, va_idx = np.arange(len(ex)), None
    info: dict = {"rows": len(ex), "users": len(set(ex.user_ids)), "cutoffs": sorted({p.cutoff for p in parts}),
                  "buyers": int((ex.label > 0).sum()), "device": device}

    encoder = None
    if cfg.use_text and any(ex.texts):
        encoder = TextEncoder(device)
        if cfg.encoder_from:
            info["encoder_reused"] = encoder.adopt(Path(cfg.encoder_from))
        elif cfg.finetune_layers > 0:
            info["finetune"] = _finetune(encoder, ex.subset(tr_idx), cfg)  # never the validation users
        elif cfg.cache_dir:  # pretrained weights: embed with their (cached) ONNX graph
            from training.export import cached_encoder

            encoder.use_onnx(cached_encoder(encoder, Path(cfg.cache_dir))[0])
    elif cfg.use_text:
        log.info("no review texts in the training data: the model is exported without a text encoder")
    info["text_used"] = encoder is not None
    t1 = time.perf_counter()
    xf, xt = _inputs(ex, encoder)
    y = ex.label.astype(np.float32)
    if valid is None:
        data = {"train": (xf[tr_idx], xt[tr_idx], y[tr_idx]), "valid": (xf[va_idx], xt[va_idx], y[va_idx])}
    else:
        vf, vt = _inputs(valid, encoder)
        data = {"train": (xf, xt, y), "valid": (vf, vt, valid.label.astype(np.float32))}
    info["embed_seconds"] = round(time.perf_counter() - t1, 2)
    info["train_rows"], info["valid_rows"] = len(data["train"][2]), len(data["valid"][2])

    z = log_transform(torch.from_numpy(data["train"][0]),
                      torch.tensor([1.0 if n in LOG_FEATURES else 0.0 for n in FEATURE_NAMES])).numpy()
    std = z.std(0)
    std = np.where(std > 1e-6, std, 1.0)
    ytr = data["train"][2]
    logpos = np.log(ytr[ytr > 0])
    stats = {"mean": z.mean(0), "std": std, "text_used": encoder is not None,
             "p": float((ytr > 0).mean()), "mu": float(logpos.mean()) if len(logpos) else 0.0,
             "sigma": float(logpos.std()) if len(logpos) > 1 else 1.0}
    if cfg.clip == "range":
        stats["lo"], stats["hi"] = (z.min(0) - stats["mean"]) / std, (z.max(0) - stats["mean"]) / std
    if encoder is not None and cfg.text_head == "probe":
        from training.probe import fit_probe, probe_targets

        t2 = time.perf_counter()
        users = [ex.user_ids[i] for i in tr_idx]  # never the validation users
        stats["probe"] = fit_probe(data["train"][1], probe_targets(ytr), users, folds=cfg.probe_folds, seed=cfg.seed)
        info["text_probe"] = {**stats["probe"].record, "seconds": round(time.perf_counter() - t2, 2)}
        log.info("text probe: %s", info["text_probe"])
    members, records = [], []
    with _threads(1):
        for k in range(cfg.n_ensemble):
            net, rec = _train_member(k, cfg, data, stats, device)
            members.append(net)
            records.append(rec)
    head = Ensemble(members).eval()
    model = FittedModel(cfg, head, encoder, {}, ex.horizon_days, info)
    info["members"] = records
    rng = np.random.default_rng(cfg.seed)
    pick = rng.permutation(len(xf))[:256]
    info["_sample"] = (xf[pick], xt[pick])  # real inputs for the export parity check
    all_texts = sorted({t for ts in ex.texts for t in ts})
    info["_texts"] = [all_texts[i] for i in rng.permutation(len(all_texts))[:64]]
    latest = [p for p in parts if p.cutoff == max(q.cutoff for q in parts)]
    model.thresholds = thresholds(model.predict(concat(latest)), cfg.lapsing_p)
    info["interval_scale"] = _interval_scales(head, data["valid"])
    info["train_seconds"] = round(time.perf_counter() - t0, 2)
    log.info("trained %d member(s) on %d rows in %.1fs (text %s)", cfg.n_ensemble, len(ex),
             info["train_seconds"], "on" if encoder is not None else "off")
    return model


def _interval_scales(head, valid: tuple) -> dict | None:
    """Split-conformal scales of the 50 % / 80 % spend intervals on the held-out validation
    rows (``training.calibration``); None with fewer than 30 of them. The backtest refits
    them on its validation replay; the export stamps them into head.onnx's metadata."""
    import torch

    from training.calibration import fit_interval_scales

    vf, vt, vy = valid
    if len(vy) < 30:
        return None
    with torch.inference_mode(), _threads(1):
        q = head(torch.from_numpy(vf), torch.from_numpy(vt))[2].numpy()
    return fit_interval_scales(vy, q)


def thresholds(pred: Prediction, lapsing_p: float) -> dict:
    """Segment cut-offs from training predictions: vip = top 5 % of expected CLV, high = top
    20 %, mid = top 50 %; lapsing = p_repeat below ``lapsing_p``."""
    ev = pred.expected_clv.astype(np.float64)
    out = {k: float(np.quantile(ev, q)) if len(ev) else 0.0 for k, q in SEGMENT_QUANTILES.items()}
    out["lapsing_p"] = float(lapsing_p)
    return out
