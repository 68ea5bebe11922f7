"""Tests of influence_nb.fragility: the Bregman divergence, PBRF against leave-one-out on a convex model, the batched
Newton solve, convergence diagnostics, the LDS, and a one-setting study that resumes to identical numbers."""
import dataclasses, json

import pytest
import torch
from torch import nn
from torch.func import grad

fr = pytest.importorskip("influence_nb.fragility")
from influence_nb.core import InfluenceError
from influence_nb.iris import IrisSetting, iris_data, iris_mlp, train_iris_models
from influence_nb.retrain import RetrainConfig, loo_retrain
from influence_nb.scoring import Influence
from influence_nb.study import STUDIES


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data():
    return iris_data()


@pytest.fixture(scope="module")
def convex(data):
    "A linear softmax classifier on Iris with weight decay, fitted to its minimum by the package's Newton solve."
    Xtr, ytr = data[:2]
    torch.manual_seed(0)
    m = nn.Linear(4, 3).double()
    ce, lam = nn.CrossEntropyLoss(), 1e-2
    fit = fr.proximal_response(Influence(m, ce, (Xtr, ytr), weight_decay=lam, batch_size=120), [0], "prf", tol=1e-13)
    with torch.no_grad():
        for p, v in zip(m.parameters(), Influence(m, ce, (Xtr, ytr)).flat.unflatten(fit.base).values()): p.copy_(v)
    return m, Influence(m, ce, (Xtr, ytr), weight_decay=lam, batch_size=120), lam


def test_bregman_divergence_of_cross_entropy_is_kl():
    g = torch.Generator().manual_seed(0)
    f0, f1 = (torch.randn(5, 4, generator=g, dtype=torch.float64) for _ in range(2))
    t = torch.tensor([0, 1, 2, 3, 0])
    ce = lambda o, y: nn.functional.cross_entropy(o, y, reduction="none")
    kl = (f0.softmax(1) * (f0.log_softmax(1) - f1.log_softmax(1))).sum(1)
    torch.testing.assert_close(fr.bregman_divergence(ce, f1, f0, t), kl)
    assert bool((fr.bregman_divergence(ce, f1, f0, t) >= 0).all())


def test_pbrf_is_leave_one_out_on_a_convex_model(convex):
    _, inf, _ = convex
    pb = fr.proximal_response(inf, range(0, 120, 3), "pbrf", tol=1e-13)
    loo = fr.proximal_response(inf, range(0, 120, 3), "prf", 0.0, tol=1e-13)
    assert bool(pb.converged.all()) and bool(loo.converged.all())
    torch.testing.assert_close(pb.theta, loo.theta, atol=1e-10, rtol=0)
    # influence is one Newton step of the same problem: close, up to the leverage of each point
    dth = inf.param_changes()[::3]
    rel = (dth - loo.param_change).norm(dim=1) / loo.param_change.norm(dim=1)
    assert float(rel.median()) < 0.1 and float(rel.max()) < 0.5


def test_influence_and_pbrf_have_the_sign_of_retraining(convex, data):
    m, inf, lam = convex
    Xtr, ytr, Xte, yte = data
    t = int(inf.losses((Xte, yte)).argmax())
    removed = torch.arange(0, 120, 4)
    scores = inf.scores((Xte[t:t + 1], yte[t:t + 1]))[0, removed]
    gd = loo_retrain(m, Xtr, ytr, Xte[t:t + 1], yte[t:t + 1], removed, RetrainConfig(3000, 0.5, lam),
                     progress=False).truth_controlled[:, 0]
    pb = fr.proximal_response(inf, removed, "pbrf", tol=1e-13)
    L = fr.response_losses(inf, torch.cat([inf.theta[None], pb.theta]), Xte[t:t + 1], yte[t:t + 1])[:, 0]
    big = gd.abs() > 0.05 * gd.abs().max()
    assert int(big.sum()) >= 8
    assert bool((torch.sign(scores[big]) == torch.sign(gd[big])).all())
    assert bool((torch.sign(L[1:] - L[0])[big] == torch.sign(gd[big])).all())


def test_pbrf_starts_at_theta_star_and_removal_adds_the_loss_gradient(data):
    Xtr, ytr = data[:2]
    net = iris_mlp(1, 5, "tanh", 0)
    inf = Influence(net, nn.CrossEntropyLoss(), (Xtr, ytr), weight_decay=1e-3, batch_size=120)
    F = fr.response_objective(inf, "pbrf", 1e-3)
    z = torch.zeros(120, dtype=torch.float64)
    assert float(grad(F)(inf.theta, z).abs().max()) < 1e-14
    r = torch.zeros(120, dtype=torch.float64); r[3] = 1
    torch.testing.assert_close(grad(F)(inf.theta, r), -inf.grad_matrix((Xtr[3:4], ytr[3:4]))[0] / 120)


def test_batched_newton_solves_a_network_and_matches_single_solves(data):
    Xtr, ytr = data[:2]
    s = IrisSetting(1, 5, "tanh", 1e-2)
    from influence_nb.iris import IrisConfig
    net = train_iris_models(s, IrisConfig.from_preset("quick", train_steps=1500), [0], data)[0]
    inf = Influence(net, nn.CrossEntropyLoss(), (Xtr, ytr), weight_decay=1e-2, batch_size=120)
    both = fr.proximal_response(inf, [4, 50], "pbrf", 1e-3)
    one = fr.proximal_response(inf, [50], "pbrf", 1e-3)
    assert bool(both.converged.all())
    torch.testing.assert_close(both.theta[1], one.theta[0], atol=1e-9, rtol=0)


def test_misuse_is_refused_with_the_fix(convex):
    _, inf, _ = convex
    with pytest.raises(InfluenceError, match="'pbrf' or 'prf'"): fr.proximal_response(inf, [0], "loo")
    with pytest.raises(InfluenceError, match="damping must be a finite number >= 0"):
        fr.proximal_response(inf, [0], damping=-1.0)
    with pytest.raises(InfluenceError, match="integer indices"):
        fr.proximal_response(inf, torch.zeros(120, dtype=torch.bool))
    with pytest.raises(InfluenceError, match=r"all in \[0, 120\)"): fr.proximal_response(inf, [120])
    with pytest.raises(InfluenceError, match="fraction must lie in"): fr.subset_masks(10, 2, 0.0)
    with pytest.raises(InfluenceError, match="outputs must be"):
        fr.lds(torch.zeros(3, 10), fr.subset_masks(10, 4), torch.zeros(4, 2))


def test_diagnostics_exact_and_lanczos_agree(data, convex):
    Xtr, ytr = data[:2]
    _, lin, lam = convex
    d = fr.convergence_diagnostics(lin, lr=0.5)
    assert d["grad_norm"] < 1e-12 and d["min_eigenvalue"] >= lam * (1 - 1e-9)
    assert d["edge_ratio"] == pytest.approx(0.5 * d["max_eigenvalue"] / 2)
    net = iris_mlp(2, 5, "tanh", 1)
    inf = Influence(net, nn.CrossEntropyLoss(), (Xtr, ytr), weight_decay=1e-3, batch_size=120)
    a, b = fr.convergence_diagnostics(inf, 0.1), fr.convergence_diagnostics(inf, 0.1, exact_up_to=0)
    assert (a["method"], b["method"]) == ("exact", "lanczos")
    assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-10)
    assert a["max_eigenvalue"] == pytest.approx(b["max_eigenvalue"], rel=1e-6)
    assert a["min_eigenvalue"] == pytest.approx(b["min_eigenvalue"], abs=1e-6 * a["max_eigenvalue"])


def test_lds_of_additive_outputs_and_the_margin():
    g = torch.Generator().manual_seed(0)
    tau = torch.randn(4, 60, generator=g, dtype=torch.float64)
    masks = fr.subset_masks(60, 30, seed=2)
    assert masks.sum(1).eq(30).all()
    assert fr.lds(tau, masks, masks @ tau.T)["lds"] == pytest.approx(1.0)
    assert fr.lds(-tau, masks, masks @ tau.T)["lds"] == pytest.approx(-1.0)
    o = torch.randn(7, 3, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0])
    torch.testing.assert_close(nn.functional.cross_entropy(o, y, reduction="none"),
                               nn.functional.softplus(-fr.margin(o, y)))


class _OneSetting(fr.FragilityConfig):
    "A fragility configuration with a single setting (a test-sized sweep)."
    def settings(self):
        return {"decay": [IrisSetting(1, 5, "tanh", 1e-3)]}


def test_one_setting_study_resumes_to_identical_numbers(tmp_path):
    assert STUDIES["fragility"] is fr.FRAGILITY
    cfg = _OneSetting(train_steps=300, retrain_steps=50, seeds=1, newton_iters=5,
                      lissa=dict(depth=30, repeats=1, batch_size=30))
    a = fr.run_fragility_study(cfg, tmp_path, progress=False)
    assert len(a.runs) == 1
    r = a.runs[0]
    assert set(r.gaps["highest"]) == set(fr.GAPS) and set(r.test_points) == {"highest", "median"}
    assert sum(r.gaps["highest"].values()) == pytest.approx(1 - r.spearman["highest"]["loo_cold"])
    rho, g = fr.chain_gaps(r.truths["highest"], "linear")
    assert rho["linear"] == 1 and g["proximity"] + g["non_convergence"] + g["linearisation"] == pytest.approx(
        1 - rho["loo_warm"])
    with pytest.raises(InfluenceError, match="reference must be"): fr.chain_gaps(r.truths["highest"], "pbrf")
    (next((tmp_path / "runs").glob("*.json"))).unlink()
    b = fr.run_fragility_study(cfg, tmp_path, progress=False)
    assert json.dumps(a.runs[0].truths) == json.dumps(b.runs[0].truths)
    t = fr.gap_table(json.loads((tmp_path / "results.json").read_text()))
    assert t.shape[0] == 1 and t.iloc[0, 0] == pytest.approx(r.paper_spearman["highest"])


def test_gauss_newton_steps_reach_the_newton_minimiser(data):
    Xtr, ytr = data[:2]
    from influence_nb.iris import IrisConfig
    net = train_iris_models(IrisSetting(1, 5, "tanh", 1e-2), IrisConfig.from_preset("quick", train_steps=1500), [0],
                            data)[0]
    inf = Influence(net, nn.CrossEntropyLoss(), (Xtr, ytr), weight_decay=1e-2, batch_size=120)
    g = fr.proximal_response(inf, [4, 50], "pbrf", 1e-3, curvature="ggn")
    h = fr.proximal_response(inf, [4, 50], "pbrf", 1e-3)
    assert bool(g.converged.all()) and bool(h.converged.all())
    torch.testing.assert_close(g.theta, h.theta, atol=1e-7, rtol=0)   # both to ‖∇F‖ ≤ 1e-10
    # the PRF's Gauss-Newton steps converge only linearly (the loss's residual curvature is left out): close, not 1e-10
    g = fr.proximal_response(inf, [4, 50], "prf", 1e-3, curvature="ggn", max_iter=100)
    h = fr.proximal_response(inf, [4, 50], "prf", 1e-3)
    assert float(g.grad_norm.max()) < 1e-6
    torch.testing.assert_close(g.theta, h.theta, atol=1e-4, rtol=0)
    with pytest.raises(InfluenceError, match="'hessian' or 'ggn'"): fr.proximal_response(inf, [0], curvature="kfac")


def test_small_cnn_pieces():
    assert STUDIES["fragility-cnn"] is fr.FRAGILITY_CNN
    cfg = fr.CnnFragilityConfig.from_preset("quick", n_train=40, n_test=20, train_steps=30, lds_subsets=6)
    d = fr.cnn_data(cfg)
    assert d[0].shape == (40, 1, 28, 28) and d[0].dtype == torch.float64
    s = cfg.settings()["decay"]
    assert [x.weight_decay for x in s] == [1e-3, 0.0] and s[1].damping == cfg.no_decay_damping
    two = fr.train_cnn_models(s[0], cfg, [0, 1], d)
    one = fr.train_cnn_models(s[0], cfg, [1], d)[0]
    assert sum(p.numel() for p in one.parameters()) == 406
    torch.testing.assert_close(one[0].weight, two[1][0].weight, atol=1e-10, rtol=0)
    inf = Influence(two[0], nn.CrossEntropyLoss(), d[:2], weight_decay=1e-3, damping=1e-3, batch_size=40)
    r = fr.proximal_response(inf, [3, 7], "pbrf", 0.1, curvature="ggn")   # an untrained net: a firm proximity
    assert bool(r.converged.all())
    t = fr.cnn_lds(s[0], cfg, d, n_boot=50, estimators={"exact (GGN)": fr.LDS_ESTIMATORS["exact (GGN)"]})
    assert list(t.index) == ["exact (GGN)"] and -1 <= t.loc["exact (GGN)", "LDS"] <= 1
    assert fr._label(dataclasses.asdict(s[0])) == "CNN 3 ch. λ=0.001"
