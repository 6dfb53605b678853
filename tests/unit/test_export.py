"""ONNX export: torch vs onnxruntime parity, the contract, int8, and the serving Scorer."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

pytestmark = pytest.mark.train
torch = pytest.importorskip("torch")

from serving.contract import ContractError  # noqa: E402
from serving.registry import Registry  # noqa: E402
from serving.scorer import HotScorer, Scorer  # noqa: E402
from streams.fold import FEATURE_NAMES, FEATURE_SCHEMA, TEXT_DIM  # noqa: E402
from tests.unit.train_data import DAY, T0, encoder_cache, history, shared_encoder  # noqa: E402
from training.dataset import build_many  # noqa: E402
from training.export import (_ort_encode, _ort_session, cached_encoder, head_parity,  # noqa: E402
                             quantize_encoder, serving_tokenizer, stamp)
from training.text import model_path  # noqa: E402
from training.train import TrainConfig, fit  # noqa: E402

CPU = ["CPUExecutionProvider"]
TEXTS = [
    "Great blender, I use it every morning.",
    "",  # an empty review text still encodes ([CLS] [SEP])
    "ok",
    "Terrible. " * 200,  # > 256 tokens: truncated the same way in torch and the scorer
    "Überraschend gut! Très bien, 非常好 - emojis too 🎉🎉",
    "The sizing runs small; I exchanged it for a larger one and now it fits perfectly, will buy again.",
]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return encoder_cache(tmp_path_factory)


@pytest.fixture(scope="module")
def fitted(cache):
    evs = history(80, seed=11)
    train, test = build_many(evs, [T0 + 60 * DAY, T0 + 90 * DAY], 30.0, users="all")
    cfg = TrainConfig(quick=True, epochs=8, cache_dir=str(cache), device="cpu")
    return fit(train, cfg), test


@pytest.fixture(scope="module")
def model_dir(fitted, tmp_path_factory):
    model, _ = fitted
    return model.export(tmp_path_factory.mktemp("m") / "v1", "v1", 4)


def test_torch_encoder_reproduces_sentence_transformers():
    SentenceTransformer = pytest.importorskip("sentence_transformers").SentenceTransformer

    st = SentenceTransformer(str(model_path()), device="cpu")
    ref = st.encode(TEXTS, normalize_embeddings=False, convert_to_numpy=True)
    ours = shared_encoder().encode(TEXTS)
    assert np.abs(ours - ref).max() < 1e-5
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)


def test_encoder_onnx_parity_through_the_serving_tokenizer(cache):
    path, rec = cached_encoder(shared_encoder(), cache)
    assert rec["fused"].get("Attention") == 6  # onnxruntime's BERT fusion took
    ref = shared_encoder().encode(TEXTS)
    tok = serving_tokenizer(model_path() / "tokenizer.json")
    sess = _ort_session(path)
    batched = _ort_encode(sess, tok, TEXTS, batch=len(TEXTS))  # padded to the longest
    single = np.concatenate([_ort_encode(sess, tok, [t]) for t in TEXTS])  # no padding
    for got in (batched, single):
        cos = np.sum(ref * got, axis=1)
        assert cos.min() > 0.9999, cos
        assert np.abs(ref - got).max() < 1e-4


def test_int8_encoder_is_measured(cache, tmp_path):
    path, _ = cached_encoder(shared_encoder(), cache)
    tok = serving_tokenizer(model_path() / "tokenizer.json")
    rec = quantize_encoder(path, tmp_path / "q.onnx", tok, TEXTS * 4)
    assert 0.9 < rec["cosine_min"] <= rec["cosine_mean"] <= 1.0 + 1e-6
    assert rec["int8_mb"] < rec["fp32_mb"] / 2 and rec["speedup"] > 0


def test_head_parity_and_scorer_reproduce_the_trained_model(fitted, model_dir):
    model, test = fitted
    feats, text = model.inputs(test)
    # real rows plus extremes: zeros, huge values, no-text rows with random text
    rng = np.random.default_rng(0)
    extreme = np.abs(rng.standard_normal((16, len(FEATURE_NAMES))) * 1e3).astype(np.float32)
    feats = np.concatenate([feats, np.zeros_like(feats[:1]), extreme])
    text = np.concatenate([text, np.zeros_like(text[:1]), rng.standard_normal((16, TEXT_DIM)).astype(np.float32)])
    rec = head_parity(model.head, model_dir / "head.onnx", (feats, text))
    assert rec["ok"] and rec["p_repeat_max_abs"] <= 1e-5
    pred = model.predict(test)
    s = Scorer(model_dir, providers=CPU)
    f2, t2 = model.inputs(test)
    got = s.score(f2, t2)
    np.testing.assert_allclose(got.p_repeat, pred.p_repeat, atol=1e-5)
    np.testing.assert_allclose(got.expected_clv, pred.expected_clv, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got.quantiles, pred.quantiles, rtol=1e-4, atol=1e-4)
    assert np.all(np.diff(got.quantiles, axis=1) >= -1e-4)  # q10 <= q50 <= q90
    assert set(got.segments) <= {"vip", "high", "mid", "low", "lapsing"}
    emb = s.encode(TEXTS)  # the served encoder embeds like the one the model was trained with
    assert np.sum(emb * model.encoder.encode(TEXTS), axis=1).min() > 0.9999


def test_export_writes_contract_card_and_tokenizer(fitted, model_dir):
    model, _ = fitted
    assert sorted(p.name for p in model_dir.iterdir()) == ["card.json", "encoder.onnx", "head.onnx", "tokenizer.json"]
    s = Scorer(model_dir, providers=CPU)
    assert s.contract.model_version == "v1" and s.contract.horizon_weeks == 4
    assert s.contract.thresholds == model.thresholds
    th = model.thresholds
    assert th["vip"] >= th["high"] >= th["mid"] and th["lapsing_p"] == 0.15
    enc_meta = s.encoder.get_modelmeta().custom_metadata_map
    head_meta = s.head.get_modelmeta().custom_metadata_map
    assert enc_meta["clv.model_version"] == "v1"
    assert enc_meta["clv.encoder_id"] == head_meta["clv.encoder_id"] == model.encoder.fingerprint()
    card = json.loads((model_dir / "card.json").read_text())
    assert card["config"] == model.cfg.to_dict() and card["config"]["quick"] is True
    assert card["parity"]["head"]["ok"] and card["parity"]["encoder"]["cosine_min"] > 0.9999
    assert card["feature_names"] == list(FEATURE_NAMES)
    assert "_sample" not in card["training"]


def test_contract_mismatch_is_refused_and_the_old_model_keeps_serving(model_dir, tmp_path):
    reg = Registry(tmp_path / "models")
    good = shutil.copytree(model_dir, reg.path("v1"))
    bad = shutil.copytree(model_dir, reg.path("v2"))
    stamp(bad / "head.onnx", {"clv.model_version": "v2", "clv.feature_schema": FEATURE_SCHEMA + "-old"})
    with pytest.raises(ContractError, match="feature schema"):
        Scorer(bad, providers=CPU)
    reg.set_champion("v1")
    hot = HotScorer(reg, providers=CPU)
    assert hot.current.version == "v1"
    reg.set_champion("v2")
    assert hot.maybe_reload() is False
    assert hot.current.version == "v1" and "v2" in hot.refused
    assert good.exists()


def test_model_without_text_exports_the_head_only(tmp_path):
    evs = history(60, seed=12, text=False)
    (train,) = build_many(evs, [T0 + 70 * DAY], 30.0)
    model = fit(train, TrainConfig(quick=True, epochs=5, device="cpu"))
    assert model.encoder is None
    out = model.export(tmp_path / "m", "t1", 4)
    assert sorted(p.name for p in out.iterdir()) == ["card.json", "head.onnx"]
    s = Scorer(out, providers=CPU)
    assert s.encode(["text"]) is None
    assert np.isfinite(s.score(*model.inputs(train)).expected_clv).all()
