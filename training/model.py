"""The scoring network: behaviour features + review embedding -> zero-inflated lognormal.

Pure torch, no I/O. Everything the head needs at serving time lives inside the graph: the
log transform of heavy-tailed features, the standardisation (training mean/std as
buffers), the ablation masks and the ZILN -> (p_repeat, expected_clv, quantiles) maths, so
``head.onnx`` takes the raw ``streams.fold.features`` vector and the raw mean embedding.

ZILN (Wang, Liu & Miao 2019, google/lifetime_value): three outputs per user - a logit for
p(any purchase), and (mu, sigma) of a lognormal for the spend of buyers.
E[spend] = p * exp(mu + sigma^2 / 2); the q-quantile is 0 when q <= 1 - p, else the
lognormal's ((q - (1 - p)) / p)-quantile.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from streams.fold import FEATURE_NAMES, TEXT_DIM

QUANTILES = (0.1, 0.5, 0.9)
SIGMA_MIN, SIGMA_MAX = 1e-3, 4.0
LOG_EV_MAX = 20.0  # exp(20) ~ 4.9e8 USD: keeps expected_clv finite for absurd inputs
CLIP = 10.0  # standardised features are clipped to +-CLIP (out-of-range users stay sane)

# heavy-tailed raw features get log1p(max(x, 0)) inside the graph
LOG_FEATURES = frozenset({
    "repeat_orders", "recency_days", "tenure_days", "order_age_days", "ipt_mean_days",
    "ipt_std_days", "cart_to_order", "category_diversity", "days_since_last_event", "n_reviews",
})
# ablation groups (TrainConfig.use_clicks / use_text / use_profile)
CLICK_FEATURES = frozenset(n for n in FEATURE_NAMES if n.startswith(("log_clicks_", "log_total_"))) | {"cart_to_order"}
TEXT_FEATURES = frozenset({"has_text"})
PROFILE_FEATURES = frozenset(n for n in FEATURE_NAMES if n.startswith(("age_", "gender_", "region_", "channel_")))


def feature_mask(use_clicks: bool = True, use_text: bool = True, use_profile: bool = True) -> list[float]:
    off = set()
    if not use_clicks:
        off |= CLICK_FEATURES
    if not use_text:
        off |= TEXT_FEATURES
    if not use_profile:
        off |= PROFILE_FEATURES
    return [0.0 if n in off else 1.0 for n in FEATURE_NAMES]


def log_transform(x: torch.Tensor, log_mask: torch.Tensor) -> torch.Tensor:
    return torch.where(log_mask > 0, torch.log1p(torch.relu(x)), x)


def ndtri(u: torch.Tensor) -> torch.Tensor:
    """Standard normal quantile, sqrt(2) * erfinv(2u - 1), from elementary ops only (ONNX has
    no erfinv). M. Giles' single-precision erfinv approximation (rel. error < 4e-7)."""
    u = u.clamp(1e-7, 1.0 - 1e-7)
    x = 2.0 * u - 1.0
    w = -torch.log(4.0 * u * (1.0 - u))  # = -log((1 - x)(1 + x)) without cancellation near 0
    w1 = w - 2.5
    p1 = torch.full_like(w, 2.81022636e-08)
    for c in (3.43273939e-07, -3.5233877e-06, -4.39150654e-06, 0.00021858087, -0.00125372503,
              -0.00417768164, 0.246640727, 1.50140941):
        p1 = c + p1 * w1
    w2 = torch.sqrt(w) - 3.0
    p2 = torch.full_like(w, -0.000200214257)
    for c in (0.000100950558, 0.00134934322, -0.00367342844, 0.00573950773, -0.0076224613,
              0.00943887047, 1.00167406, 2.83297682):
        p2 = c + p2 * w2
    return math.sqrt(2.0) * torch.where(w < 5.0, p1, p2) * x


def ziln_params(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[N, 3] -> (p, mu, sigma)."""
    p = torch.sigmoid(logits[:, 0])
    mu = logits[:, 1]
    sigma = nn.functional.softplus(logits[:, 2]).clamp(SIGMA_MIN, SIGMA_MAX)
    return p, mu, sigma


def ziln_predict(logits: torch.Tensor, quantiles: Sequence[float] = QUANTILES):
    """(p_repeat [N], expected_clv [N], quantiles [N, len(q)])."""
    p, mu, sigma = ziln_params(logits)
    ev = p * torch.exp((mu + 0.5 * sigma * sigma).clamp(max=LOG_EV_MAX))
    cols = []
    for q in quantiles:
        u = (q - (1.0 - p)) / p.clamp(min=1e-6)
        z = ndtri(u.clamp(1e-6, 1.0 - 1e-6))
        val = torch.exp((mu + sigma * z).clamp(max=LOG_EV_MAX))
        cols.append(torch.where(u > 0, val, torch.zeros_like(val)))
    return p, ev, torch.stack(cols, dim=1)


def ziln_loss(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Mean ZILN negative log-likelihood (BCE on purchase + lognormal NLL of buyers' spend)."""
    pos = (label > 0).to(logits.dtype)
    bce = nn.functional.binary_cross_entropy_with_logits(logits[:, 0], pos)
    _, mu, sigma = ziln_params(logits)
    safe = torch.where(label > 0, label, torch.ones_like(label))
    logy = torch.log(safe)
    nll = logy + torch.log(sigma) + 0.5 * math.log(2 * math.pi) + (logy - mu) ** 2 / (2 * sigma * sigma)
    return bce + (pos * nll).mean()


class ZILNNet(nn.Module):
    """features [N, F] raw + text [N, 384] -> ZILN logits [N, 3].

    ``text_head="probe"`` (default): the text enters as ``text_proj`` fixed scores,
    ``text @ W - [text != 0] * center``, from a cross-fitted ridge probe (``training.probe``,
    set with ``set_probe``; not trained with the MLP). ``"learned"``: a Linear(384 ->
    text_proj) trained jointly with the MLP (the earlier design; it overfits small data)."""

    def __init__(self, hidden: Sequence[int] = (64, 32), text_proj: int = 16, dropout: float = 0.1,
                 mask: Sequence[float] | None = None, use_text: bool = True, text_head: str = "learned"):
        super().__init__()
        if text_head not in ("probe", "learned"):
            raise ValueError(f"text_head must be 'probe' or 'learned', got {text_head!r}")
        nf = len(FEATURE_NAMES)
        self.text_head = text_head
        self.register_buffer("log_mask", torch.tensor([1.0 if n in LOG_FEATURES else 0.0 for n in FEATURE_NAMES]))
        self.register_buffer("mean", torch.zeros(nf))
        self.register_buffer("std", torch.ones(nf))
        self.register_buffer("lo", torch.full((nf,), -CLIP))  # standardised bounds (training range)
        self.register_buffer("hi", torch.full((nf,), CLIP))
        self.register_buffer("mask", torch.tensor(list(mask) if mask is not None else [1.0] * nf))
        self.register_buffer("text_gate", torch.tensor(1.0 if use_text else 0.0))
        self.register_buffer("shift", torch.zeros(3))  # added to the logits: calibration of mu
        self.register_buffer("text_center", torch.zeros(text_proj))  # probe: writers' mean score
        self.text = nn.Linear(TEXT_DIM, text_proj, bias=text_head == "learned")
        if text_head == "probe":
            nn.init.zeros_(self.text.weight)
            self.text.weight.requires_grad_(False)
        layers: list[nn.Module] = []
        width = nf + text_proj
        for h in hidden:
            layers += [nn.Linear(width, h), nn.GELU(), nn.Dropout(dropout)]
            width = h
        self.mlp = nn.Sequential(*layers)
        self.out = nn.Linear(width, 3)

    def set_probe(self, weight, center) -> None:
        """Fixed text scores: ``weight`` [TEXT_DIM, text_proj], ``center`` [text_proj]."""
        if self.text_head != "probe":
            raise ValueError("set_probe needs text_head='probe'")
        with torch.no_grad():
            self.text.weight.copy_(torch.as_tensor(weight, dtype=torch.float32).T)
            self.text_center.copy_(torch.as_tensor(center, dtype=torch.float32))

    def set_scaler(self, mean, std, lo=None, hi=None) -> None:
        """Standardisation, and optional bounds (standardised units) the inputs are clipped to."""
        self.mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
        self.std.copy_(torch.as_tensor(std, dtype=torch.float32))
        if lo is not None:
            self.lo.copy_(torch.as_tensor(lo, dtype=torch.float32).clamp(-CLIP, CLIP))
        if hi is not None:
            self.hi.copy_(torch.as_tensor(hi, dtype=torch.float32).clamp(-CLIP, CLIP))

    def init_output(self, p: float, mu: float, sigma: float) -> None:
        """Start at the marginal distribution (faster, steadier training)."""
        with torch.no_grad():
            self.out.weight.mul_(0.1)
            p = min(max(p, 1e-4), 1 - 1e-4)
            s = max(sigma, 2 * SIGMA_MIN)
            self.out.bias.copy_(torch.tensor([math.log(p / (1 - p)), mu, math.log(math.expm1(s))]))

    def calibrate(self, scale: float) -> None:
        """Multiply this member's spend distribution by ``scale`` (mu += log scale): expected
        value and quantiles scale, p_repeat does not."""
        with torch.no_grad():
            self.shift[1] += math.log(scale)

    def standardise(self, features: torch.Tensor) -> torch.Tensor:
        x = (log_transform(features, self.log_mask) - self.mean) / self.std
        return torch.minimum(torch.maximum(x, self.lo), self.hi) * self.mask

    def text_scores(self, text: torch.Tensor) -> torch.Tensor:
        t = text * self.text_gate
        if self.text_head == "learned":
            return self.text(t)
        has = (t.abs().sum(dim=1, keepdim=True) > 0).to(t.dtype)  # zero embedding: no review text
        return self.text(t) - has * self.text_center

    def forward(self, features: torch.Tensor, text: torch.Tensor,
                scores: torch.Tensor | None = None) -> torch.Tensor:
        """``scores``: text scores to use instead of ``text_scores(text)`` (training on the
        probe's out-of-fold scores)."""
        t = self.text_scores(text) if scores is None else scores * self.text_gate
        return self.out(self.mlp(torch.cat([self.standardise(features), t], dim=1))) + self.shift


class Ensemble(nn.Module):
    """The exported head: averages members' p, expected value and quantiles
    (quantile averaging; the mixture's exact quantiles would need a root search)."""

    def __init__(self, members: Sequence[ZILNNet]):
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, features: torch.Tensor, text: torch.Tensor):
        outs = [ziln_predict(m(features, text)) for m in self.members]
        k = float(len(outs))
        p = sum(o[0] for o in outs) / k
        ev = sum(o[1] for o in outs) / k
        q = sum(o[2] for o in outs) / k
        return p, ev, q
