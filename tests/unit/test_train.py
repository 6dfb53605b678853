"""The ZILN network, fit/predict, ablations, the trainer's split, promotion and loop."""
from __future__ import annotations

import dataclasses

import json
import math
import shutil
import threading

import numpy as np
import pytest

pytestmark = pytest.mark.train
torch = pytest.importorskip("torch")

from scipy import special, stats  # noqa: E402

from serving.registry import Registry  # noqa: E402
from serving.scorer import Scorer  # noqa: E402
from streams.fold import FEATURE_NAMES, FEATURE_SCHEMA, TEXT_DIM  # noqa: E402
from streams.settings import Settings  # noqa: E402
from tests.unit.train_data import DAY, T0, encoder_cache, history, write_jsonl  # noqa: E402
from training.dataset import build_many  # noqa: E402
from training.evaluate import normalized_gini  # noqa: E402
from training.export import stamp  # noqa: E402
from training.model import (CLICK_FEATURES, PROFILE_FEATURES, ndtri, ziln_loss,  # noqa: E402
                            ziln_predict)
from training.train import TrainConfig, fit  # noqa: E402
from training.trainer import (Job, Outcome, Policy, parse_every, plan, refit_guard, run_forever,  # noqa: E402
                              train_once)

QUICK = dict(quick=True, epochs=15, device="cpu", use_text=False)


@pytest.fixture(scope="module")
def data():
    evs = history(160, days=150, seed=21, text=False)
    return build_many(evs, [T0 + 60 * DAY, T0 + 75 * DAY, T0 + 110 * DAY], 30.0)


# ---- ZILN maths -------------------------------------------------------------------------
def test_ndtri_matches_scipy():
    u = torch.linspace(1e-5, 1 - 1e-5, 2001, dtype=torch.float32)
    ref = special.ndtri(u.double().numpy())
    assert np.abs(ndtri(u).numpy() - ref).max() < 2e-5


def test_ziln_outputs_match_the_closed_forms():
    logits = torch.tensor([[0.3, 2.0, 0.5], [-2.0, 4.0, 1.2], [3.0, 0.5, -1.0]])
    p, ev, q = ziln_predict(logits)
    pp = 1 / (1 + np.exp(-logits[:, 0].numpy()))
    mu = logits[:, 1].numpy()
    sigma = np.log1p(np.exp(logits[:, 2].numpy()))
    np.testing.assert_allclose(p.numpy(), pp, rtol=1e-6)
    np.testing.assert_allclose(ev.numpy(), pp * np.exp(mu + sigma**2 / 2), rtol=1e-5)
    for j, level in enumerate((0.1, 0.5, 0.9)):
        u = (level - (1 - pp)) / pp
        want = np.where(u > 0, stats.lognorm.ppf(np.clip(u, 1e-9, 1), s=sigma, scale=np.exp(mu)), 0.0)
        np.testing.assert_allclose(q[:, j].numpy(), want, rtol=1e-4)


def test_ziln_loss_is_bce_plus_lognormal_nll():
    logits = torch.tensor([[0.3, 2.0, 0.5], [-1.0, 1.0, 0.1]])
    y = torch.tensor([5.0, 0.0])
    p = 1 / (1 + math.exp(-0.3))
    q = 1 / (1 + math.exp(1.0))
    bce = -(math.log(p) + math.log(1 - q)) / 2
    sigma = math.log1p(math.exp(0.5))
    nll = -stats.lognorm.logpdf(5.0, s=sigma, scale=math.exp(2.0)) / 2
    assert float(ziln_loss(logits, y)) == pytest.approx(bce + nll, rel=1e-5)


# ---- fit / predict ----------------------------------------------------------------------
def test_fit_predict_is_sane_reproducible_and_learns(data):
    a, b, test = data
    m1 = fit([a, b], TrainConfig(seed=3, **QUICK))
    m2 = fit([a, b], TrainConfig(seed=3, **QUICK))
    p1, p2 = m1.predict(test), m2.predict(test)
    np.testing.assert_array_equal(p1.expected_clv, p2.expected_clv)  # same seed, same model
    assert p1.quantiles.shape == (len(test), 3)
    assert np.all((p1.p_repeat >= 0) & (p1.p_repeat <= 1)) and np.all(np.isfinite(p1.expected_clv))
    assert np.all(np.diff(p1.quantiles, axis=1) >= -1e-4)
    assert normalized_gini(test.label, p1.expected_clv) > 0.5  # hidden value is learnable
    assert m1.info["rows"] == len(a) + len(b) and m1.info["members"][0]["seed"] == 3
    p3 = fit([a, b], TrainConfig(seed=4, **QUICK)).predict(test)
    assert not np.array_equal(p1.expected_clv, p3.expected_clv)


def test_ensemble_averages_members(data):
    a, _, test = data
    m = fit(a, TrainConfig(**{**QUICK, "quick": False, "n_ensemble": 2, "epochs": 5, "int8": "off",
                              "finetune_layers": 0}))
    assert len(m.head.members) == 2
    feats, text = m.inputs(test)
    with torch.no_grad():
        outs = [ziln_predict(mem(torch.from_numpy(feats), torch.from_numpy(text)))[1] for mem in m.head.members]
    np.testing.assert_allclose(m.predict(test).expected_clv, ((outs[0] + outs[1]) / 2).numpy(), rtol=1e-5)


@pytest.mark.parametrize("flag,group", [("use_clicks", CLICK_FEATURES), ("use_profile", PROFILE_FEATURES)])
def test_ablation_makes_the_head_blind_to_its_group(data, flag, group):
    a, _, test = data
    m = fit(a, TrainConfig(**{**QUICK, flag: False}))
    feats, text = m.inputs(test)
    cols = [FEATURE_NAMES.index(n) for n in group]
    moved = feats.copy()
    moved[:, cols] += np.random.default_rng(0).uniform(1, 50, (len(feats), len(cols))).astype(np.float32)
    with torch.no_grad():
        base = m.head(torch.from_numpy(feats), torch.from_numpy(text))[1]
        alt = m.head(torch.from_numpy(moved), torch.from_numpy(text))[1]
    np.testing.assert_array_equal(base.numpy(), alt.numpy())


def test_text_off_ignores_text_and_has_no_encoder(data):
    a, _, test = data
    m = fit(a, TrainConfig(**QUICK))
    assert m.encoder is None and not m.uses_text
    feats, text = m.inputs(test)
    noise = torch.randn(len(feats), TEXT_DIM)
    with torch.no_grad():
        base = m.head(torch.from_numpy(feats), torch.from_numpy(text))[1]
        alt = m.head(torch.from_numpy(feats), noise)[1]
    np.testing.assert_array_equal(base.numpy(), alt.numpy())


def test_config_round_trips_through_json():
    cfg = TrainConfig(seed=5, hidden=(32, 16), quick=True)
    back = TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg and back.effective().n_ensemble == 1 and back.effective().finetune_layers == 0
    with pytest.raises(ValueError, match="unknown TrainConfig keys"):
        TrainConfig.from_dict({"sed": 1})


def test_fit_explains_unusable_input(data):
    a, _, _ = data
    none = a.subset(np.flatnonzero(a.label == 0))
    with pytest.raises(ValueError, match="buyers"):
        fit(none, TrainConfig(**QUICK))
    other = build_many(history(20, seed=1, text=False), [T0 + 60 * DAY], 10.0)[0]
    with pytest.raises(ValueError, match="horizon"):
        fit([a, other], TrainConfig(**QUICK))


def test_finetuning_moves_only_the_top_layers(tmp_path_factory):
    from tests.unit.train_data import shared_encoder
    from training.text import TextEncoder

    enc = TextEncoder("cpu")
    before = {k: v.clone() for k, v in enc.model.state_dict().items()}
    base_fp = enc.fingerprint()
    rec = enc.finetune(["good shop"] * 4 + ["awful shop"] * 4, np.array([1.0] * 4 + [-1.0] * 4, np.float32),
                       layers=1, steps=3, batch_size=4, max_length=16)
    after = enc.model.state_dict()
    changed = {k.split(".")[2] for k in before if k.startswith("encoder.layer") and not torch.equal(before[k], after[k])}
    assert changed == {"5"}  # the top layer of six, nothing else
    assert all(torch.equal(before[k], after[k]) for k in before if not k.startswith("encoder.layer"))
    assert rec["steps"] == 3 and enc.fingerprint() != base_fp and enc.fingerprint().startswith("ft-")
    assert base_fp == shared_encoder().fingerprint()


# ---- the trainer ------------------------------------------------------------------------
def test_plan_keeps_training_labels_before_the_holdout():
    p = plan(0.0, 400 * DAY, 91.0, n_cutoffs=3, step_days=28)
    assert p.holdout == "temporal" and p.holdout_cutoff == pytest.approx(309 * DAY)
    assert all(c + 91 * DAY <= p.holdout_cutoff for c in p.train_cutoffs) and len(p.train_cutoffs) == 3
    short = plan(0.0, 150 * DAY, 91.0)
    assert short.holdout == "user_split" and short.train_cutoffs == [short.holdout_cutoff]
    with pytest.raises(ValueError, match="shorter --horizon-weeks"):
        plan(0.0, 95 * DAY, 91.0)


def test_policy_promotes_only_at_least_as_good():
    pol = Policy(gini_tolerance=0.0, mape_tolerance=0.02)
    assert pol.decide({"gini": 0.7, "decile_mape": 0.1}, None)[0]
    assert pol.decide({"gini": 0.7, "decile_mape": 0.1}, {"gini": 0.7, "decile_mape": 0.1})[0]
    assert not pol.decide({"gini": 0.69, "decile_mape": 0.1}, {"gini": 0.7, "decile_mape": 0.1})[0]
    assert not pol.decide({"gini": 0.75, "decile_mape": 0.2}, {"gini": 0.7, "decile_mape": 0.1})[0]
    assert not pol.decide({"gini": None, "decile_mape": None}, None)[0]


def test_parse_every():
    assert parse_every("6h") == 21600 and parse_every("1h30m") == 5400 and parse_every("90") == 90
    with pytest.raises(ValueError, match="6h"):
        parse_every("often")


def test_trainer_loop_logs_failures_and_keeps_going(caplog):
    calls = []

    def once(settings, job):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("archive unreadable")
        return Outcome("v", None, {}, None, None, True, "ok", 0.0)

    with caplog.at_level("INFO", logger="clv.trainer"):
        runs = run_forever(None, Job(), 0.01, stop=threading.Event(), max_runs=3, once=once)
    assert runs == 3 and len(calls) == 3
    assert "training run 1 failed: archive unreadable" in caplog.text and "run 3 done" in caplog.text


def test_train_once_registers_promotes_and_guards_the_champion(tmp_path, tmp_path_factory):
    cache = encoder_cache(tmp_path_factory)
    events = write_jsonl(history(120, days=120, seed=31), tmp_path / "events.jsonl")
    settings = Settings(data_dir=tmp_path / "var")
    cfg = TrainConfig(quick=True, epochs=10, device="cpu", cache_dir=str(cache))
    job = Job(horizon_weeks=3, events_file=events, n_cutoffs=2, step_days=14, cfg=cfg)
    reg = Registry(settings.models_dir)

    first = train_once(settings, job)
    assert first.promoted and reg.champion() == first.version
    card = reg.card(first.version)
    assert card["metrics"]["gini"] > 0.3 and card["data"]["holdout"] == "temporal"
    assert card["promotion"]["promoted"] is True and "int8" not in card  # --quick: no int8
    Scorer(reg.path(first.version), providers=["CPUExecutionProvider"])
    # served: the validated config refit on the newest cutoffs (labels to T), with the validated metrics
    validated = first.refit["validated_version"]
    vcard = reg.card(validated)
    assert first.version == validated + "-refit" and card["refit"]["done"] and first.metrics == vcard["metrics"]
    assert card["metrics"] == vcard["metrics"] and vcard["promotion"]["served_as"] == first.version
    hold, cuts, vcuts = card["data"]["holdout_cutoff"], card["data"]["train_cutoffs"], vcard["data"]["train_cutoffs"]
    assert max(cuts) == hold == vcard["data"]["holdout_cutoff"] and len(cuts) == len(vcuts) == 2
    assert min(cuts) > max(vcuts) and max(vcuts) + 21 * DAY <= hold  # newer than anything validated
    assert card["training"]["cutoffs"] == pytest.approx(cuts) and vcard["training"]["cutoffs"] == pytest.approx(vcuts)
    guard = card["refit"]["guard"]
    assert 0.5 <= guard["total_ratio"] <= 2.0 and guard["spearman"] >= 0.8 and guard["users"] > 50
    assert card["encoder"]["fingerprint"] == vcard["encoder"]["fingerprint"]  # the validated model's encoder
    assert card["encoder"]["reused_from"] == str(reg.path(validated) / "encoder.onnx")
    last = reg.history()[-1]
    assert last["action"] == "promoted" and last["version"] == first.version
    assert f"refit of {validated}" in last["reason"]

    strict = Job(**{**job.__dict__, "policy": Policy(gini_tolerance=-1.0)})  # needs +1.0 Gini: impossible
    second = train_once(settings, strict)
    assert not second.promoted and reg.champion() == first.version
    assert second.champion_metrics["gini"] == pytest.approx(first.metrics["gini"], abs=1e-6)
    assert second.champion_metrics["scored_as"] == validated  # the refit saw this hold-out's labels
    assert second.refit is None and "refit" not in reg.card(second.version)
    assert reg.history()[-1]["action"] == "rejected"
    # a retrain keeps the champion's text encoder (same embedding space as Redis), byte for byte
    enc1, enc2 = reg.card(first.version)["encoder"], reg.card(second.version)["encoder"]
    assert enc2["reused_from"].startswith(str(reg.path(first.version)))
    assert enc2["fingerprint"] == enc1["fingerprint"]
    assert Scorer(reg.path(second.version), providers=["CPUExecutionProvider"]).encoder_id == enc1["fingerprint"]
    assert (reg.path(second.version) / "encoder.onnx").read_bytes() != b""
    refit = Job(**{**strict.__dict__, "cfg": dataclasses.replace(cfg, refit_encoder=True)})
    assert "reused_from" not in reg.card(train_once(settings, refit).version)["encoder"]

    # the champion stops matching the contract (e.g. the fold changed): any loadable challenger wins
    stamp(reg.path(first.version) / "head.onnx", {"clv.feature_schema": FEATURE_SCHEMA + "-old"})
    third = train_once(settings, Job(**{**strict.__dict__, "refit_latest": False}))  # --no-refit-latest
    assert third.promoted and reg.champion() == third.version and third.champion_metrics is None
    assert not third.version.endswith("-refit") and third.refit["done"] is False
    assert reg.card(third.version)["refit"]["reason"] == "--no-refit-latest"
    assert reg.card(third.version)["data"]["train_cutoffs"] == vcuts
    assert not (reg.path(third.version + "-refit")).exists()
    assert not list((settings.data_dir / "staging").iterdir())
    shutil.rmtree(settings.data_dir)


def test_refit_guard_refuses_a_refit_that_disagrees_with_the_validated_model():
    ev = np.random.default_rng(0).lognormal(3.0, 1.0, 500)
    near = ev * np.random.default_rng(1).uniform(0.9, 1.2, 500)
    ok, figures, _ = refit_guard(ev, near)
    assert ok and 1.0 < figures["total_ratio"] < 1.1 and figures["spearman"] > 0.95
    ok, figures, why = refit_guard(ev, ev * 2.5)
    assert not ok and figures["total_ratio"] == 2.5 and "outside [0.5, 2.0]" in why
    ok, _, why = refit_guard(ev, np.random.default_rng(2).permutation(ev))
    assert not ok and "Spearman" in why
    assert not refit_guard(ev, np.full(500, np.nan))[0]


def test_handwritten_adamw_matches_torch():
    from training.train import _AdamW

    torch.manual_seed(0)
    a, b = torch.nn.Linear(5, 3), torch.nn.Linear(5, 3)
    b.load_state_dict(a.state_dict())
    oa = torch.optim.AdamW(a.parameters(), lr=1e-2, weight_decay=0.05)
    ob = _AdamW(b.parameters(), lr=1e-2, weight_decay=0.05)
    for _ in range(30):
        x = torch.randn(8, 5)
        for m, o in ((a, oa), (b, ob)):
            o.zero_grad()
            (m(x) ** 2).mean().backward()
            o.step()
    assert max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters())) < 1e-6


def test_calibration_scales_spend_but_not_p(data):
    a, _, test = data
    plain = fit(a, TrainConfig(seed=2, **QUICK)).predict(test)
    cal_model = fit(a, TrainConfig(seed=2, calibrate=True, **QUICK))
    cal = cal_model.predict(test)
    scale = cal_model.info["members"][0]["calibration"]
    assert scale != 1.0
    np.testing.assert_allclose(cal.p_repeat, plain.p_repeat, rtol=1e-6)
    np.testing.assert_allclose(cal.expected_clv, plain.expected_clv * scale, rtol=1e-3)


def test_interval_scales_are_fitted_on_validation_rows_and_stamped_in_the_head(data, tmp_path):
    from training.calibration import scaled_interval
    from training.evaluate import interval_coverage
    from training.export import metadata

    a, b, test = data
    m = fit([a, b], TrainConfig(seed=3, **QUICK))
    s = m.info["interval_scale"]
    assert set(s) == {"0.5", "0.8"} and 0 < s["0.5"] < s["0.8"]
    q = m.predict(test).quantiles
    lo50, hi50 = scaled_interval(q, s["0.5"])
    lo80, hi80 = scaled_interval(q, s["0.8"])
    assert np.all(lo80 <= lo50 + 1e-9) and np.all(hi80 >= hi50 - 1e-9)  # nested
    assert interval_coverage(test.label, lo80, hi80) >= interval_coverage(test.label, lo50, hi50)
    meta = metadata(m.export(tmp_path / "m", "v1", 4) / "head.onnx")
    assert float(meta["clv.interval_scale_80"]) == s["0.8"] and float(meta["clv.interval_scale_50"]) == s["0.5"]
