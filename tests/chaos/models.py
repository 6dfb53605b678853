"""Small ONNX heads for the model-fault tests, built with the ``onnx`` helper API (no torch).

Every builder honours ``serving/contract.py`` unless it is meant to break it:

    inputs   features float32 [N, F], text float32 [N, TEXT_DIM]
    outputs  p_repeat float32 [N], expected_clv float32 [N], quantiles float32 [N, 3]
    metadata Contract.current(version, horizon_weeks, thresholds).to_metadata()

Kinds (``head_model(version, kind)``):

* ``good``      a linear model: h = features.w + text.u + b; p = sigmoid(h),
                clv = softplus(h) * 50, quantiles = clv * (0.5, 1, 2). Finite everywhere.
* ``nan``       clv = sqrt(1 - sum(features)): finite for the all-zero smoke batch the scorer
                runs at load time, NaN for any real user (the scorer raises FloatingPointError).
* ``shape``     reshapes the features to a fixed [1, F]: runs for one row (the smoke batch),
                fails inside onnxruntime for any batch of two or more users.
* ``contract``  a good graph stamped with a feature list that lacks one feature (a model
                trained on another fold): the contract check refuses it.
* ``outputs``   a good graph whose outputs are misnamed (``score`` instead of
                ``expected_clv``): refused at load.

``encoder=True`` adds a toy text encoder (``encoder_model``: input_ids/attention_mask ->
embedding [N, TEXT_DIM]) and a word-level ``tokenizer.json``, so review texts go through the
worker's embedding path. ``corrupt_model_dir`` writes random bytes as head.onnx. ``register``
places a model folder in a registry (``serving.registry.Registry``) so a test can
``set_champion`` it.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from serving.contract import Contract
from streams.fold import FEATURE_NAMES, TEXT_DIM

THRESHOLDS = {"vip": 500.0, "high": 150.0, "mid": 40.0, "lapsing_p": 0.2}
KINDS = ("good", "nan", "shape", "contract", "outputs")
F = len(FEATURE_NAMES)


def _contract_metadata(version: str, kind: str, encoder_id: str | None = None) -> dict[str, str]:
    meta = Contract.current(version, 39, THRESHOLDS).to_metadata()
    if encoder_id is not None:  # the embedding space the head was trained in (export stamps it)
        meta["clv.encoder_id"] = encoder_id
    if kind == "contract":
        meta["clv.feature_names"] = json.dumps(list(FEATURE_NAMES[:-1]))
        meta["clv.feature_schema"] = f"clv-features-v1-{F - 1}"
    return meta


def head_model(version: str, kind: str = "good", seed: int = 0, encoder_id: str | None = None) -> bytes:
    """Serialized ONNX head of ``kind`` stamped with model version ``version``."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    if kind not in KINDS:
        raise ValueError(f"unknown model kind {kind!r}; choose from {KINDS}")
    rng = np.random.default_rng(seed)
    w = (rng.normal(0, 0.05, size=(F, 1))).astype(np.float32)
    u = (rng.normal(0, 0.01, size=(TEXT_DIM, 1))).astype(np.float32)
    inits = [
        numpy_helper.from_array(w, "w"),
        numpy_helper.from_array(u, "u"),
        numpy_helper.from_array(np.array([-0.5], np.float32), "b"),
        numpy_helper.from_array(np.array([50.0], np.float32), "scale"),
        numpy_helper.from_array(np.array([[0.5, 1.0, 2.0]], np.float32), "qmul"),
        numpy_helper.from_array(np.array([-1], np.int64), "flat"),
        numpy_helper.from_array(np.array([1], np.float32), "one"),
        numpy_helper.from_array(np.array([1], np.int64), "axis1"),
        numpy_helper.from_array(np.array([1, F], np.int64), "one_row"),
    ]
    nodes = []
    feats = "features"
    if kind == "shape":
        nodes.append(helper.make_node("Reshape", ["features", "one_row"], ["feats_fixed"]))
        feats = "feats_fixed"
    nodes += [
        helper.make_node("MatMul", [feats, "w"], ["hf"]),
        helper.make_node("MatMul", ["text", "u"], ["ht"]),
        helper.make_node("Add", ["hf", "ht"], ["h0"]),
        helper.make_node("Add", ["h0", "b"], ["h"]),  # [N, 1]
        helper.make_node("Reshape", ["h", "flat"], ["hv"]),  # [N]
        helper.make_node("Sigmoid", ["hv"], ["p_repeat"]),
    ]
    clv_name = "score" if kind == "outputs" else "expected_clv"
    if kind == "nan":
        nodes += [
            helper.make_node("ReduceSum", ["features", "axis1"], ["fsum"], keepdims=0),  # [N]
            helper.make_node("Sub", ["one", "fsum"], ["rest"]),
            helper.make_node("Sqrt", ["rest"], ["root"]),
            helper.make_node("Mul", ["root", "scale"], [clv_name]),
        ]
    else:
        nodes += [
            helper.make_node("Softplus", ["hv"], ["sp"]),
            helper.make_node("Mul", ["sp", "scale"], [clv_name]),
        ]
    nodes += [
        helper.make_node("Unsqueeze", [clv_name, "axis1"], ["clv_col"]),  # [N, 1]
        helper.make_node("Mul", ["clv_col", "qmul"], ["quantiles"]),  # [N, 3]
    ]
    graph = helper.make_graph(
        nodes, f"chaos-{kind}",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", F]),
         helper.make_tensor_value_info("text", TensorProto.FLOAT, ["N", TEXT_DIM])],
        [helper.make_tensor_value_info("p_repeat", TensorProto.FLOAT, ["N"]),
         helper.make_tensor_value_info(clv_name, TensorProto.FLOAT, ["N"]),
         helper.make_tensor_value_info("quantiles", TensorProto.FLOAT, ["N", 3])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                              producer_name="tests.chaos.models")
    model.ir_version = 8
    helper.set_model_props(model, _contract_metadata(version, kind, encoder_id))
    onnx.checker.check_model(model)
    return model.SerializeToString()


def encoder_model(seed: int = 0) -> bytes:
    """A toy text encoder with the contract's I/O: input_ids, attention_mask int64 [N, L] ->
    embedding float32 [N, TEXT_DIM], mask-mean-pooled over a random token table and
    L2-normalised (the shape of all-MiniLM-L6-v2's output, none of its meaning)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    table = rng.normal(0, 1, size=(VOCAB, TEXT_DIM)).astype(np.float32)
    inits = [
        numpy_helper.from_array(table, "table"),
        numpy_helper.from_array(np.array([2], np.int64), "axis2"),
        numpy_helper.from_array(np.array([1], np.int64), "axis1"),
        numpy_helper.from_array(np.array([1.0], np.float32), "one"),
        numpy_helper.from_array(np.array([1e-6], np.float32), "eps"),
    ]
    nodes = [
        helper.make_node("Gather", ["table", "input_ids"], ["tok"], axis=0),  # [N, L, D]
        helper.make_node("Cast", ["attention_mask"], ["maskf"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["maskf", "axis2"], ["mask3"]),  # [N, L, 1]
        helper.make_node("Mul", ["tok", "mask3"], ["masked"]),
        helper.make_node("ReduceSum", ["masked", "axis1"], ["summed"], keepdims=0),  # [N, D]
        helper.make_node("ReduceSum", ["maskf", "axis1"], ["count"], keepdims=1),  # [N, 1]
        helper.make_node("Max", ["count", "one"], ["count1"]),
        helper.make_node("Div", ["summed", "count1"], ["mean"]),
        helper.make_node("ReduceL2", ["mean"], ["norm"], axes=[1], keepdims=1),  # opset 17: attr
        helper.make_node("Add", ["norm", "eps"], ["norm_eps"]),
        helper.make_node("Div", ["mean", "norm_eps"], ["embedding"]),
    ]
    graph = helper.make_graph(
        nodes, "chaos-encoder",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["N", "L"]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["N", "L"])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", TEXT_DIM])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                              producer_name="tests.chaos.models")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


VOCAB = 64


def write_tokenizer(path: Path) -> None:
    """A word-level tokenizer (``tokenizers``) with a tiny vocabulary: words outside it (almost
    all) become [UNK], so any text maps to ids the toy encoder can look up."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, "[PAD]": 1}
    vocab.update({f"w{i}": i for i in range(2, VOCAB)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path))


def write_model_dir(path: Path, version: str, kind: str = "good", seed: int = 0,
                    encoder: bool = False, encoder_id: str | None = None) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "head.onnx").write_bytes(head_model(version, kind, seed, encoder_id))
    if encoder:
        (path / "encoder.onnx").write_bytes(encoder_model(seed))
        write_tokenizer(path / "tokenizer.json")
    (path / "card.json").write_text(json.dumps({"version": version, "kind": kind, "test": True}))
    return path


def corrupt_model_dir(path: Path, seed: int = 0) -> Path:
    """head.onnx full of random bytes (a truncated upload, a disk error)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "head.onnx").write_bytes(np.random.default_rng(seed).bytes(4096))
    return path


def register(registry, version: str, kind: str = "good", *, champion: bool = False,
             seed: int = 0, encoder: bool = False, encoder_id: str | None = None) -> Path:
    """Build a model of ``kind`` (or ``corrupt``) next to the registry and move it in."""
    tmp = Path(registry.root) / f".build-{version}-{os.getpid()}"
    if kind == "corrupt":
        corrupt_model_dir(tmp, seed)
    else:
        write_model_dir(tmp, version, kind, seed, encoder, encoder_id)
    dst = registry.register(tmp, version, reason=f"chaos test: {kind}")
    if champion:
        registry.set_champion(version, reason=f"chaos test: {kind}")
    return dst
