"""The model contract: what an exported model promises, stored in its ONNX metadata.

Head graph (``head.onnx``)
    inputs:  ``features`` float32 [N, F] (F = len(feature_names)),
             ``text`` float32 [N, text_dim] (mean review embedding, zeros without text)
    outputs: ``p_repeat`` float32 [N]  probability of any purchase in the horizon
             ``expected_clv`` float32 [N]  expected spend in the horizon (USD)
             ``quantiles`` float32 [N, 3]  spend quantiles 10 %, 50 %, 90 %
Encoder graph (``encoder.onnx``, optional)
    inputs:  ``input_ids``, ``attention_mask`` int64 [N, L]
    output:  ``embedding`` float32 [N, text_dim] (mean-pooled, L2-normalised)

Metadata keys (all strings): see ``REQUIRED``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from streams.fold import FEATURE_NAMES, FEATURE_SCHEMA, STATE_VERSION, TEXT_DIM

CONTRACT_VERSION = "1"
REQUIRED = (
    "clv.contract",  # CONTRACT_VERSION
    "clv.feature_names",  # JSON list, must equal streams.fold.FEATURE_NAMES
    "clv.feature_schema",  # streams.fold.FEATURE_SCHEMA
    "clv.state_version",  # streams.fold.STATE_VERSION the trainer ran with (informational: a model
    # depends on the features, FEATURE_SCHEMA, not on how the state blob is stored)
    "clv.model_version",  # registry version, e.g. 20261129T0500Z-ab12cd
    "clv.text_dim",  # TEXT_DIM
    "clv.horizon_weeks",  # label horizon the model was trained for
    "clv.segment_thresholds",  # JSON {"vip": x, "high": y, "mid": z, "lapsing_p": w}
)


class ContractError(ValueError):
    """A model does not fit this code. The message says which key and what to do."""


@dataclass(frozen=True)
class Contract:
    model_version: str
    feature_names: tuple[str, ...]
    feature_schema: str
    state_version: int
    text_dim: int
    horizon_weeks: int
    thresholds: dict

    def to_metadata(self) -> dict[str, str]:
        return {
            "clv.contract": CONTRACT_VERSION,
            "clv.feature_names": json.dumps(list(self.feature_names)),
            "clv.feature_schema": self.feature_schema,
            "clv.state_version": str(self.state_version),
            "clv.model_version": self.model_version,
            "clv.text_dim": str(self.text_dim),
            "clv.horizon_weeks": str(self.horizon_weeks),
            "clv.segment_thresholds": json.dumps(self.thresholds),
        }

    @classmethod
    def current(cls, model_version: str, horizon_weeks: int, thresholds: dict) -> "Contract":
        """The contract this code base serves, for an exporter to stamp on a model."""
        return cls(model_version, FEATURE_NAMES, FEATURE_SCHEMA, STATE_VERSION, TEXT_DIM,
                   horizon_weeks, thresholds)

    @classmethod
    def from_metadata(cls, meta: dict[str, str], *, source: str = "model") -> "Contract":
        missing = [k for k in REQUIRED if k not in meta]
        if missing:
            raise ContractError(
                f"{source} lacks contract metadata {missing}; export it with training.export "
                "(it stamps the contract) or pick another model"
            )
        if meta["clv.contract"] != CONTRACT_VERSION:
            raise ContractError(
                f"{source} has contract version {meta['clv.contract']}, this code serves "
                f"{CONTRACT_VERSION}; re-export the model with this code base"
            )
        try:
            c = cls(
                model_version=meta["clv.model_version"],
                feature_names=tuple(json.loads(meta["clv.feature_names"])),
                feature_schema=meta["clv.feature_schema"],
                state_version=int(meta["clv.state_version"]),
                text_dim=int(meta["clv.text_dim"]),
                horizon_weeks=int(meta["clv.horizon_weeks"]),
                thresholds=json.loads(meta["clv.segment_thresholds"]),
            )
        except (ValueError, TypeError) as exc:
            raise ContractError(f"{source} has malformed contract metadata: {exc}") from exc
        c.check(source)
        return c

    def check(self, source: str = "model") -> None:
        """Raise ContractError unless this contract matches what the fold produces."""
        if self.feature_schema != FEATURE_SCHEMA or self.feature_names != FEATURE_NAMES:
            diff = sorted(set(self.feature_names) ^ set(FEATURE_NAMES))[:5]
            raise ContractError(
                f"{source} expects feature schema {self.feature_schema!r} but the fold produces "
                f"{FEATURE_SCHEMA!r} (differing names, first few: {diff}); retrain with this code base"
            )
        if self.text_dim != TEXT_DIM:
            raise ContractError(f"{source} has text_dim {self.text_dim}, the fold keeps {TEXT_DIM}")
        for k in ("vip", "high", "mid", "lapsing_p"):
            if k not in self.thresholds:
                raise ContractError(f"{source} segment_thresholds lacks {k!r}")


def segment(clv: float, p_repeat: float, thresholds: dict) -> str:
    if p_repeat < thresholds["lapsing_p"]:
        return "lapsing"
    if clv >= thresholds["vip"]:
        return "vip"
    if clv >= thresholds["high"]:
        return "high"
    if clv >= thresholds["mid"]:
        return "mid"
    return "low"
