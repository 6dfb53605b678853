"""The text probe (training.probe) and the "probe" text head of the network."""
from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.train

from streams.fold import FEATURE_NAMES, TEXT_DIM  # noqa: E402
from training.probe import fit_probe, probe_targets  # noqa: E402


def planted(n_users: int = 300, rows_per_user: int = 2, writers: float = 0.6, seed: int = 0):
    """Unit-norm embeddings whose projection on one hidden direction drives the target."""
    rng = np.random.default_rng(seed)
    direction = rng.standard_normal(TEXT_DIM)
    direction /= np.linalg.norm(direction)
    groups = np.repeat([f"u{i}" for i in range(n_users)], rows_per_user)
    x = rng.standard_normal((len(groups), TEXT_DIM)) * 0.05 + 0.3 * direction * rng.choice([-1, 1], (len(groups), 1))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    has = np.repeat(rng.random(n_users) < writers, rows_per_user)
    x[~has] = 0.0
    y = np.where(has, np.exp(1.0 + 2.0 * (x @ direction)) * (rng.random(len(groups)) < 0.7), 0.0)
    y[~has] = np.exp(1.0) * (rng.random((~has).sum()) < 0.5)
    return x.astype(np.float32), y.astype(np.float32), groups, direction, has


def test_probe_targets():
    np.testing.assert_allclose(probe_targets(np.array([0.0, 3.0])), [[0.0, 0.0], [1.0, np.log1p(3.0)]])


def test_probe_finds_a_planted_direction_and_scores_non_writers_zero():
    x, y, groups, direction, has = planted()
    p = fit_probe(x, probe_targets(y), groups, folds=5, seed=1)
    assert p.weight.shape == (TEXT_DIM, 2) and p.oof.shape == (len(y), 2)
    assert p.record["fitted"] and p.record["writers"] == int(has.sum())
    # the spend score points along the planted direction
    w = p.weight[:, 1] / np.linalg.norm(p.weight[:, 1])
    assert abs(float(w @ direction)) > 0.5  # 384 dims from ~360 rows: ridge spreads some weight
    assert p.record["oof_corr"][1] > 0.3  # the 30 % zeros (no purchase) are noise to it
    # no review text: score exactly 0 (out of fold and as served: x @ W - center * has)
    assert np.all(p.oof[~has] == 0.0)
    served = x @ p.weight - has[:, None] * p.center
    assert np.all(served[~has] == 0.0)
    # writers' scores are standardised; served (in-sample) ones agree with the out-of-fold ones
    np.testing.assert_allclose(p.oof[has].mean(0), 0.0, atol=1e-5)
    np.testing.assert_allclose(p.oof[has].std(0), 1.0, rtol=1e-4)
    assert np.corrcoef(served[has, 1], p.oof[has, 1])[0, 1] > 0.95


def test_out_of_fold_scores_never_see_their_own_user():
    x, y, groups, _, has = planted(seed=2)
    a = fit_probe(x, probe_targets(y), groups, seed=3)
    mine = groups == "u7"
    assert has[mine].all() and len(set(a.fold[mine])) == 1  # a user's rows share a fold
    y2 = y.copy()
    y2[mine] = y2[mine] * 3 + 5  # only user u7's labels change
    b = fit_probe(x, probe_targets(y2), groups, seed=3)
    assert a.record["alpha"] == b.record["alpha"]
    np.testing.assert_array_equal(a.fold, b.fold)
    same = a.fold == a.fold[mine][0]
    # the ridge that scored u7's fold never saw u7: its scores there move only by the common
    # standardisation (an affine map), while the other folds' ridges did see the change
    for j in range(2):
        assert np.corrcoef(a.oof[same, j], b.oof[same, j])[0, 1] > 1 - 1e-9
    other = [f for f in np.unique(a.fold) if f >= 0 and f != a.fold[mine][0]]
    assert all(np.corrcoef(a.oof[a.fold == f, 1], b.oof[a.fold == f, 1])[0, 1] < 1 - 1e-9 for f in other)
    assert not np.allclose(a.weight, b.weight)  # the full probe uses every row


def test_too_few_writers_gives_no_probe():
    x = np.zeros((50, TEXT_DIM), np.float32)
    x[:5, 0] = 1.0
    p = fit_probe(x, probe_targets(np.ones(50)), [str(i) for i in range(50)])
    assert not p.record["fitted"] and np.all(p.weight == 0) and np.all(p.oof == 0)


def test_probe_head_keeps_its_weights_and_uses_text():
    torch = pytest.importorskip("torch")
    from training.model import ZILNNet
    from training.train import N_PROBE

    x, y, groups, _, has = planted(n_users=80, seed=4)
    p = fit_probe(x, probe_targets(y), groups)
    net = ZILNNet(text_proj=N_PROBE, text_head="probe")
    net.set_probe(p.weight, p.center)
    assert not net.text.weight.requires_grad
    assert all(q is not net.text.weight for q in net.parameters() if q.requires_grad)
    t = torch.from_numpy(x)
    scores = net.text_scores(t).detach().numpy()
    np.testing.assert_allclose(scores, x @ p.weight - has[:, None] * p.center, rtol=1e-4, atol=1e-5)
    f = torch.zeros(len(x), len(FEATURE_NAMES))
    with torch.no_grad():
        a = net(f, t)
        b = net(f, torch.zeros_like(t))
        c = net(f, t, torch.from_numpy(p.oof))
    assert not torch.equal(a, b)  # the text reaches the output
    assert not torch.equal(a, c)  # explicit scores replace the probe's
    off = ZILNNet(text_proj=N_PROBE, text_head="probe", use_text=False)
    off.set_probe(p.weight, p.center)
    np.testing.assert_array_equal(off.text_scores(t).detach().numpy(), 0.0)
    with pytest.raises(ValueError, match="text_head"):
        ZILNNet(text_head="attention")


def test_fit_with_text_trains_around_a_fixed_probe(tmp_path_factory):
    torch = pytest.importorskip("torch")
    from tests.unit.train_data import DAY, T0, encoder_cache, history
    from training.dataset import build_many
    from training.train import TrainConfig, fit

    train, test = build_many(history(80, seed=11), [T0 + 60 * DAY, T0 + 90 * DAY], 30.0, users="all")
    cfg = TrainConfig(epochs=6, n_ensemble=2, finetune_layers=0, int8="off",
                      cache_dir=str(encoder_cache(tmp_path_factory)), device="cpu")
    m = fit(train, cfg)
    rec = m.info["text_probe"]
    assert m.uses_text and rec["fitted"] and rec["writers"] > 0 and len(rec["alpha"]) == 2
    # both members (seeds 0 and 1) serve the same probe: their training did not move it
    a, b = m.head.members
    assert a.text_head == "probe" and not a.text.weight.requires_grad
    assert torch.equal(a.text.weight, b.text.weight) and torch.equal(a.text_center, b.text_center)
    assert not torch.equal(a.out.weight, b.out.weight)
    feats, text = m.inputs(test)
    has = np.any(text != 0, axis=1)
    with torch.no_grad():
        s = a.text_scores(torch.from_numpy(text)).numpy()
    assert np.all(s[~has] == 0.0) and np.any(s[has] != 0.0)
