"Unit and property tests of influence_nb.retrain (batched leave-one-out retraining)."
import copy
from dataclasses import asdict

import pytest
import torch
from torch import nn
from hypothesis import given, settings, strategies as st, HealthCheck

import influence_nb.retrain as retrain_mod
from influence_nb.retrain import (RetrainConfig, LOOResult, NoiseFloor, removal_weights, minibatch_order,
                                  per_example_cross_entropy, retrain_sequential, stack_state, train_stack,
                                  stack_losses, loo_retrain, noise_floor, above_noise, fast_path_layers)

PROP = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(autouse=True, scope='module')
def one_thread():
    "Tiny models: one torch thread is faster and avoids oversubscription; restore afterwards."
    old = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def data(n=30, d=4, c=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randint(0, c, (n,), generator=g)


def mlp(seed=0, bn=False):
    torch.manual_seed(seed)
    mid = [nn.BatchNorm1d(6)] if bn else []
    return nn.Sequential(nn.Linear(4, 6), *mid, nn.Tanh(), nn.Linear(6, 3))


def seq_losses(net, X, y, Xt, yt, w, cfg):
    m = retrain_sequential(net, X, y, w, cfg).eval()
    with torch.no_grad(): return per_example_cross_entropy(m(Xt), yt), torch.nn.utils.parameters_to_vector(m.parameters())


# --- removal weights -------------------------------------------------------------------------------------------
@PROP
@given(n=st.integers(1, 50), data_=st.data())
def test_removal_weights_property(n, data_):
    removed = data_.draw(st.lists(st.integers(0, n - 1), max_size=8))
    w = removal_weights(n, removed)
    assert w.shape == (len(removed) + 1, n)
    assert torch.equal(w[0], torch.ones(n))
    for k, j in enumerate(removed):
        assert w[k + 1, j] == 0 and w[k + 1].sum() == n - 1


def test_removal_weights_bounds():
    with pytest.raises(IndexError): removal_weights(4, [4])
    with pytest.raises(IndexError): removal_weights(4, [-1])


# --- minibatch order -------------------------------------------------------------------------------------------
@PROP
@given(n=st.integers(1, 40), bs=st.integers(1, 45), steps=st.integers(0, 30), seed=st.integers(0, 10))
def test_minibatch_order_property(n, bs, steps, seed):
    b = list(minibatch_order(n, bs, steps, seed))
    assert len(b) == steps
    again = list(minibatch_order(n, bs, steps, seed))
    assert all((x is None and z is None) or torch.equal(x, z) for x, z in zip(b, again))
    if bs >= n:
        assert all(x is None for x in b)
    else:
        per_epoch = -(-n // bs)
        for e in range(steps // per_epoch):
            assert torch.equal(torch.cat(b[e * per_epoch:(e + 1) * per_epoch]).sort().values, torch.arange(n))


def test_minibatch_order_seed_matters():
    a, b = list(minibatch_order(20, 5, 4, 0)), list(minibatch_order(20, 5, 4, 1))
    assert not all(torch.equal(x, y) for x, y in zip(a, b))


# --- batched == sequential -------------------------------------------------------------------------------------
@PROP
@given(K=st.integers(1, 4), bs=st.sampled_from([None, 7, 12]), mom=st.sampled_from([0.0, 0.9]),
       wd=st.sampled_from([0.0, 1e-2]), seed=st.integers(0, 5), steps=st.integers(1, 15), fast=st.booleans())
def test_batched_equals_sequential(K, bs, mom, wd, seed, steps, fast):
    X, y = data(30, seed=seed)
    net = mlp(seed)
    cfg = RetrainConfig(steps=steps, lr=0.3, weight_decay=wd, momentum=mom, batch_size=bs, seed=seed)
    removed = torch.randperm(30, generator=torch.Generator().manual_seed(seed))[:K]
    r = loo_retrain(net, X, y, X[:6], y[:6], removed, cfg, chunk_size=2, progress=False, fast=fast)
    theta = torch.nn.utils.parameters_to_vector(net.parameters()).detach()
    for k, j in enumerate(removed.tolist()):
        l, p = seq_losses(net, X, y, X[:6], y[:6], removal_weights(30, [j])[1], cfg)
        torch.testing.assert_close(r.test_losses[k], l, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(r.param_change[k], p.detach() - theta, atol=1e-5, rtol=1e-5)
    l0, _ = seq_losses(net, X, y, X[:6], y[:6], torch.ones(30), cfg)
    torch.testing.assert_close(r.control_losses, l0, atol=1e-5, rtol=1e-5)


# --- the fast path (batched matmuls, no vmap) for Linear/elementwise MLPs ---------------------------------------
ACTS = [nn.ReLU, nn.Tanh, nn.Sigmoid, nn.GELU, nn.ELU, lambda: nn.LeakyReLU(0.2), nn.SiLU, nn.Softplus, nn.Identity,
        nn.Flatten]


def no_vmap(monkeypatch):
    "Make the general vmap path fail loudly, so a passing call proves the fast path ran."
    def boom(*a, **k): raise AssertionError('vmap path used')
    monkeypatch.setattr(retrain_mod, '_stack_forward', boom)


def test_fast_path_taken_for_mlp_and_matches(monkeypatch):
    X, y = data(30)
    net = mlp(0)
    assert [c[0] for c in fast_path_layers(net, X)] == ['linear', 'act', 'linear']
    assert fast_path_layers(mlp(0, bn=True), X) is None
    assert fast_path_layers(nn.Sequential(nn.Linear(4, 3), nn.Dropout(0.5)), X) is None
    assert fast_path_layers(nn.Sequential(nn.Linear(4, 3), nn.PReLU()), X) is None  # activation with a parameter
    assert fast_path_layers(nn.Sequential(nn.Sequential(nn.Linear(4, 3))), X) is None  # nested: vmap path
    assert fast_path_layers(net, X[:, None]) is None  # 3-D inputs: vmap path
    hooked = mlp(0); hooked[1].register_forward_hook(lambda m, i, o: None)
    assert fast_path_layers(hooked, X) is None
    cfg = RetrainConfig(steps=20, lr=0.3, weight_decay=1e-2, momentum=0.9, batch_size=8, seed=1)
    W = removal_weights(30, [2, 17, 29])
    Pv, Bv = stack_state(net, 4); train_stack(net, Pv, Bv, W, X, y, cfg, fast=False)
    Lv = stack_losses(net, Pv, Bv, X, y, fast=False)
    with monkeypatch.context() as m:
        no_vmap(m)
        Pf, Bf = stack_state(net, 4); train_stack(net, Pf, Bf, W, X, y, cfg)
        Lf = stack_losses(net, Pf, Bf, X, y)
        r = loo_retrain(net, X, y, X[:5], y[:5], [2, 17, 29], cfg, progress=False)
    for k in Pv: torch.testing.assert_close(Pf[k], Pv[k], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(Lf, Lv, atol=1e-6, rtol=1e-6)
    for k in range(4):
        ref = retrain_sequential(net, X, y, W[k], cfg)
        for name, p in ref.named_parameters(): torch.testing.assert_close(Pf[name][k], p.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(r.test_losses, Lf[1:, :5], atol=1e-6, rtol=1e-6)


def test_vmap_path_still_used_for_batchnorm(monkeypatch):
    X, y = data(20)
    net = mlp(1, bn=True)
    no_vmap(monkeypatch)
    with pytest.raises(AssertionError, match='vmap path used'):
        train_stack(net, *stack_state(net, 2), torch.ones(2, 20), X, y, RetrainConfig(steps=1, lr=0.1))


@PROP
@given(acts=st.lists(st.sampled_from(range(len(ACTS))), min_size=1, max_size=3), width=st.integers(1, 7),
       bias=st.booleans(), lead_act=st.booleans(), K=st.integers(1, 4), bs=st.sampled_from([None, 5, 11]),
       mom=st.sampled_from([0.0, 0.5]), wd=st.sampled_from([0.0, 1e-2]), per_model=st.booleans(),
       seed=st.integers(0, 20))
def test_fast_path_equals_vmap_and_sequential(acts, width, bias, lead_act, K, bs, mom, wd, per_model, seed):
    "Random Linear/activation stacks: fast path == vmap path == plain loop, shared or per-model minibatches."
    X, y = data(23, seed=seed)
    torch.manual_seed(seed)
    layers, d = ([nn.Tanh()] if lead_act else []), 4
    for a in acts: layers += [nn.Linear(d, width, bias=bias), ACTS[a]()]; d = width
    net = nn.Sequential(*layers, nn.Linear(d, 3))
    assert fast_path_layers(net, X) is not None
    cfg = RetrainConfig(steps=8, lr=0.2, weight_decay=wd, momentum=mom, batch_size=bs, seed=seed)
    W = removal_weights(23, torch.randperm(23, generator=torch.Generator().manual_seed(seed))[:K])
    seeds = list(range(seed, seed + len(W))) if per_model else None
    out = {}
    for fast in (True, False):
        P, B = stack_state(net, len(W))
        train_stack(net, P, B, W, X, y, cfg, seeds=seeds, fast=fast)
        out[fast] = P, stack_losses(net, P, B, X, y, fast=fast)
    for name in out[True][0]: torch.testing.assert_close(out[True][0][name], out[False][0][name], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[True][1], out[False][1], atol=1e-5, rtol=1e-5)
    for k in range(len(W)):
        c = cfg if seeds is None else RetrainConfig(**{**asdict(cfg), 'seed': seeds[k]})
        ref = retrain_sequential(net, X, y, W[k], c)
        for name, p in ref.named_parameters():
            torch.testing.assert_close(out[True][0][name][k], p.detach(), atol=1e-5, rtol=1e-5)


def test_fast_path_other_loss_and_bare_linear(monkeypatch):
    "A bare nn.Linear with a non-cross-entropy loss (the loss is called on (K·B, out), as on the vmap path)."
    X, y = data(25)
    t = X @ torch.tensor([1., -1., .5, 2.])
    sq = lambda o, t: (o.squeeze(-1) - t) ** 2
    net = nn.Linear(4, 1)
    cfg = RetrainConfig(steps=30, lr=0.05, weight_decay=1e-3, batch_size=10)
    rv = loo_retrain(net, X, t, X[:4], t[:4], [0, 3], cfg, loss_fn=sq, progress=False, fast=False)
    no_vmap(monkeypatch)
    rf = loo_retrain(net, X, t, X[:4], t[:4], [0, 3], cfg, loss_fn=sq, progress=False)
    torch.testing.assert_close(rf.test_losses, rv.test_losses, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(rf.param_change, rv.param_change, atol=1e-6, rtol=1e-5)


def test_batchnorm_buffers_stacked_and_match():
    X, y = data(30)
    net = mlp(1, bn=True)
    cfg = RetrainConfig(steps=12, lr=0.2, weight_decay=1e-3, momentum=0.5, batch_size=8, seed=2)
    W = removal_weights(30, [3, 17])
    P, B = stack_state(net, 3)
    assert set(B) == {'1.running_mean', '1.running_var', '1.num_batches_tracked'}
    train_stack(net, P, B, W, X, y, cfg)
    L = stack_losses(net, P, B, X, y)
    for k in range(3):
        ref = retrain_sequential(net, X, y, W[k], cfg)
        torch.testing.assert_close(B['1.running_mean'][k], ref[1].running_mean, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(B['1.running_var'][k], ref[1].running_var, atol=1e-5, rtol=1e-5)
        assert B['1.num_batches_tracked'][k] == ref[1].num_batches_tracked == 12
        with torch.no_grad(): torch.testing.assert_close(L[k], per_example_cross_entropy(ref.eval()(X), y), atol=1e-5, rtol=1e-5)
    assert not torch.equal(B['1.running_mean'][1], B['1.running_mean'][2])
    assert net.training and net[1].num_batches_tracked == 0  # the original model is untouched


def test_frozen_parameters_not_updated():
    X, y = data(20)
    net = mlp(2); net[0].weight.requires_grad_(False)
    r = loo_retrain(net, X, y, X[:3], y[:3], [0, 1], RetrainConfig(steps=5, lr=0.5), progress=False)
    ref = retrain_sequential(net, X, y, removal_weights(20, [1])[1], RetrainConfig(steps=5, lr=0.5))
    torch.testing.assert_close(ref[0].weight, net[0].weight)
    assert r.param_change.shape[1] == sum(p.numel() for p in net.parameters() if p.requires_grad)


# --- truths, control, results ----------------------------------------------------------------------------------
def test_truth_definitions():
    X, y = data(25)
    net = mlp(3)
    r = loo_retrain(net, X, y, X[:4], y[:4], [0, 5, 9], RetrainConfig(steps=10, lr=0.2), progress=False)
    with torch.no_grad(): base = per_example_cross_entropy(net.eval()(X[:4]), y[:4])
    torch.testing.assert_close(r.base_losses, base)
    torch.testing.assert_close(r.truth, r.test_losses - base)
    torch.testing.assert_close(r.truth_controlled, r.test_losses - r.control_losses)
    torch.testing.assert_close(r.param_change_norm, r.param_change.norm(dim=1))
    assert isinstance(r, LOOResult) and r.truth.shape == (3, 4)


def test_keep_params_false_and_empty():
    X, y = data(10)
    r = loo_retrain(mlp(), X, y, X[:2], y[:2], [1], RetrainConfig(steps=2, lr=0.1), keep_params=False, progress=False)
    assert r.param_change is None and r.control_param_change is None
    with pytest.raises(ValueError): loo_retrain(mlp(), X, y, X[:2], y[:2], [], RetrainConfig(steps=2, lr=0.1), progress=False)


def test_ridge_matches_closed_form_loo():
    "Convex check: GD retraining from θ* reaches the exact ridge leave-one-out solution."
    g = torch.Generator().manual_seed(0)
    n, lam = 40, 0.1
    X = torch.randn(n, 2, generator=g, dtype=torch.float64); y = X @ torch.tensor([1., -1.], dtype=torch.float64) + 0.2 * torch.randn(n, generator=g, dtype=torch.float64)
    A = torch.cat([X, torch.ones(n, 1, dtype=torch.float64)], 1)
    def solve(w):
        H = 2 / n * A.T @ (w[:, None] * A) + lam * torch.eye(3, dtype=torch.float64)
        return torch.linalg.solve(H, 2 / n * A.T @ (w * y)), H
    th, H = solve(torch.ones(n, dtype=torch.float64))
    net = nn.Linear(2, 1).double()
    with torch.no_grad(): net.weight.copy_(th[:2][None]); net.bias.copy_(th[2:])
    sq = lambda o, t: (o.squeeze(-1) - t) ** 2
    cfg = RetrainConfig(steps=2000, lr=1 / torch.linalg.eigvalsh(H).max().item(), weight_decay=lam)
    r = loo_retrain(net, X, y, X[:5], y[:5], [0, 13, 39], cfg, loss_fn=sq, progress=False)
    for k, j in enumerate([0, 13, 39]):
        tj, _ = solve(removal_weights(n, [j])[1].double())
        torch.testing.assert_close(r.param_change[k], tj - th, atol=1e-10, rtol=0)
    torch.testing.assert_close(r.control_losses, r.base_losses, atol=1e-12, rtol=0)


# --- resumable -------------------------------------------------------------------------------------------------
class Crash(Exception): pass


@pytest.mark.parametrize('crash_at', [0, 1])
def test_interrupt_and_resume_identical(tmp_path, crash_at):
    X, y = data(30)
    net = mlp(4)
    cfg = RetrainConfig(steps=20, lr=0.2, weight_decay=1e-2, momentum=0.9, batch_size=8, seed=1)
    removed = [0, 3, 8, 21, 29]
    full = loo_retrain(net, X, y, X[:5], y[:5], removed, cfg, chunk_size=2, progress=False)

    def crash(c, res):
        if c == crash_at: raise Crash()
    with pytest.raises(Crash):
        loo_retrain(net, X, y, X[:5], y[:5], removed, cfg, chunk_size=2, out_dir=tmp_path, callback=crash, progress=False)
    assert len(list(tmp_path.glob('chunk_*.pt'))) == crash_at + 1
    trained = []
    res = loo_retrain(net, X, y, X[:5], y[:5], removed, cfg, chunk_size=2, out_dir=tmp_path,
                      callback=lambda c, r: trained.append(c), progress=False)
    assert trained == list(range(crash_at + 1, 3))
    for f in ['test_losses', 'truth', 'truth_controlled', 'param_change', 'control_losses', 'control_param_change', 'base_losses']:
        assert torch.equal(getattr(full, f), getattr(res, f)), f
    # a third run trains nothing and still returns the same numbers
    again = loo_retrain(net, X, y, X[:5], y[:5], removed, cfg, chunk_size=2, out_dir=tmp_path,
                        callback=lambda c, r: trained.append(('again', c)), progress=False)
    assert trained == list(range(crash_at + 1, 3)) and torch.equal(again.truth, full.truth)


def test_resume_refuses_other_run(tmp_path):
    X, y = data(20)
    net = mlp(5)
    loo_retrain(net, X, y, X[:3], y[:3], [1, 2], RetrainConfig(steps=3, lr=0.1), out_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match='different run'):
        loo_retrain(net, X, y, X[:3], y[:3], [1, 2], RetrainConfig(steps=3, lr=0.2), out_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match='different run'):
        loo_retrain(mlp(6), X, y, X[:3], y[:3], [1, 2], RetrainConfig(steps=3, lr=0.1), out_dir=tmp_path, progress=False)


# --- noise floor -----------------------------------------------------------------------------------------------
def test_noise_floor_matches_sequential_and_full_batch_is_zero():
    X, y = data(30)
    net = mlp(7)
    cfg = RetrainConfig(steps=15, lr=0.2, weight_decay=1e-2, batch_size=8)
    nf = noise_floor(net, X, y, X[:4], y[:4], cfg, seeds=[3, 4, 5])
    assert isinstance(nf, NoiseFloor) and nf.losses.shape == (3, 4)
    for k, s in enumerate([3, 4, 5]):
        l, _ = seq_losses(net, X, y, X[:4], y[:4], torch.ones(30), RetrainConfig(**{**asdict(cfg), 'seed': s}))
        torch.testing.assert_close(nf.losses[k], l, atol=1e-5, rtol=1e-5)
    assert (nf.std > 0).all() and (nf.spread >= nf.std).all()
    assert torch.allclose(noise_floor(net, X, y, X[:4], y[:4], cfg, seeds=[3, 4, 5], fast=False).losses, nf.losses, atol=1e-6)
    full = noise_floor(net, X, y, X[:4], y[:4], RetrainConfig(steps=5, lr=0.1), seeds=[1, 2, 3])
    assert torch.equal(full.std, torch.zeros(4)) and full.losses.shape == (3, 4)
    with pytest.raises(ValueError): train_stack(net, *stack_state(net, 2), torch.ones(2, 30), X, y, cfg, seeds=[1])


def test_above_noise():
    nf = NoiseFloor([0, 1, 2], torch.tensor([[0., 1.], [1., 1.], [2., 1.]]))  # std 1 and 0
    m = above_noise(torch.tensor([[1.9, 1e-9], [2.1, 0.0], [-3., 0.]]), nf)
    assert m.tolist() == [[False, True], [True, False], [True, False]]


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_cuda_follows_model():
    X, y = data(20)
    net = mlp(8)
    cfg = RetrainConfig(steps=10, lr=0.2, batch_size=6)
    cpu = loo_retrain(net, X, y, X[:3], y[:3], [0, 4], cfg, progress=False)
    gpu = loo_retrain(copy.deepcopy(net).cuda(), X, y, X[:3], y[:3], [0, 4], cfg, progress=False)
    assert gpu.truth.device.type == 'cuda'
    torch.testing.assert_close(gpu.truth.cpu(), cpu.truth, atol=1e-4, rtol=1e-4)
