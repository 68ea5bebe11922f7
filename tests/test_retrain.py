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

from conftest import mlp as make_mlp, random_classification, ridge_data

PROP = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])


pytestmark = pytest.mark.usefixtures("one_thread")


def data(n=30, d=4, c=3, seed=0):
    "float32 Gaussian features, uniform labels (conftest.random_classification)."
    return random_classification(n, d, c, seed)


def mlp(seed=0, bn=False):
    "The float32 4-6-3 tanh MLP, optionally with a BatchNorm1d before the tanh (conftest.mlp)."
    return make_mlp(4, 6, 3, seed=seed, dtype=torch.float32, mid=[nn.BatchNorm1d(6)] if bn else [])


def seq_losses(net, X, y, Xt, yt, w, cfg):
    m = retrain_sequential(net, X, y, w, cfg).eval()
    with torch.no_grad(): return per_example_cross_entropy(m(Xt),
                                                           yt), torch.nn.utils.parameters_to_vector(m.parameters())


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
        with torch.no_grad(): torch.testing.assert_close(L[k], per_example_cross_entropy(ref.eval()(X), y), atol=1e-5,
                                                         rtol=1e-5)
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
    with pytest.raises(ValueError): loo_retrain(mlp(), X, y, X[:2], y[:2], [], RetrainConfig(steps=2, lr=0.1),
                                                progress=False)


def test_ridge_matches_closed_form_loo():
    "Convex check: GD retraining from θ* reaches the exact ridge leave-one-out solution."
    n, lam = 40, 0.1
    X, y = ridge_data(n, 2, noise=0.2)
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
        loo_retrain(net, X, y, X[:5], y[:5], removed, cfg, chunk_size=2, out_dir=tmp_path, callback=crash,
                    progress=False)
    assert len(list(tmp_path.glob('chunk_*.pt'))) == crash_at + 1
    trained = []
    res = loo_retrain(net, X, y, X[:5], y[:5], removed, cfg, chunk_size=2, out_dir=tmp_path,
                      callback=lambda c, r: trained.append(c), progress=False)
    assert trained == list(range(crash_at + 1, 3))
    for f in ['test_losses', 'truth', 'truth_controlled', 'param_change', 'control_losses', 'control_param_change',
              'base_losses']:
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
        loo_retrain(mlp(6), X, y, X[:3], y[:3], [1, 2], RetrainConfig(steps=3, lr=0.1), out_dir=tmp_path,
                    progress=False)


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
    assert torch.allclose(noise_floor(net, X, y, X[:4], y[:4], cfg, seeds=[3, 4, 5], fast=False).losses, nf.losses,
                          atol=1e-6)
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


# --- the loss fingerprint (issue 15: resumed runs must not mix losses) ------------------------------------------
import functools, json, math, os, re, subprocess, sys, textwrap
import torch.nn.functional as F
from influence_nb.core import InfluenceError, NonFiniteError
from influence_nb.retrain import loss_fingerprint, loss_description, RemovedIndexError, per_example

SCALE = 2.0


def scaled_ce(o, t, s=1.0): return s * F.cross_entropy(o, t, reduction='none')


def test_loss_fingerprint_tells_options_apart():
    a, b = 0.5, 0.6
    def closure(c): return lambda o, t: c * per_example_cross_entropy(o, t)
    losses = [nn.CrossEntropyLoss(label_smoothing=0.1), nn.CrossEntropyLoss(label_smoothing=0.2),
              nn.CrossEntropyLoss(reduction='none'), nn.CrossEntropyLoss(ignore_index=2),
              nn.CrossEntropyLoss(weight=torch.tensor([1., 2., 3.])),
              nn.CrossEntropyLoss(weight=torch.tensor([1., 2., 4.])),
              nn.CrossEntropyLoss(weight=torch.tensor([1., 2., 3.], dtype=torch.float64)),
              nn.HuberLoss(delta=1.), nn.HuberLoss(delta=2.), nn.SmoothL1Loss(beta=0.5),
              nn.MarginRankingLoss(margin=0.1),
              lambda o, t: 0.5 * per_example_cross_entropy(o, t), lambda o, t: 0.6 * per_example_cross_entropy(o, t),
              lambda o, t: a * per_example_cross_entropy(o, t), lambda o, t: b * per_example_cross_entropy(o, t),
              closure(1.0), closure(3.0),
              lambda o, t: SCALE * per_example_cross_entropy(o, t),      # a global constant, read by value
              lambda o, t, s=1.5: s * per_example_cross_entropy(o, t),   # defaults
              lambda o, t, s=2.5: s * per_example_cross_entropy(o, t),
              lambda o, t: per_example_cross_entropy(o, t) + torch.tensor([1., 2.]).sum(),  # a nested constant
              functools.partial(scaled_ce, s=2.0), functools.partial(scaled_ce, s=3.0), functools.partial(scaled_ce, 0),
              scaled_ce, per_example_cross_entropy, F.cross_entropy,
              functools.partial(F.cross_entropy, reduction='none', label_smoothing=0.1),
              functools.partial(F.cross_entropy, reduction='none', label_smoothing=0.2)]
    fps = [loss_fingerprint(f) for f in losses]
    assert len(set(fps)) == len(fps)
    # the same loss in a fresh object: the same fingerprint
    assert loss_fingerprint(nn.CrossEntropyLoss(label_smoothing=0.1)) == fps[0]
    assert loss_fingerprint(nn.CrossEntropyLoss(weight=torch.tensor([1., 2., 3.]))) == fps[4]
    assert loss_fingerprint(closure(1.0)) == fps[15]
    assert loss_fingerprint(functools.partial(scaled_ce, s=2.0)) == fps[21]
    # the wrapper is transparent
    assert loss_fingerprint(per_example(nn.CrossEntropyLoss(label_smoothing=0.1))) == fps[0]
    assert 'label_smoothing=0.1' in loss_description(losses[0])
    assert 'weight=tensor(shape=(3,)' in loss_description(losses[4])
    assert 'lambda o, t: 0.5' in loss_description(losses[11])


def test_loss_fingerprint_global_value_change():
    global SCALE
    f = lambda o, t: SCALE * per_example_cross_entropy(o, t)
    before = loss_fingerprint(f)
    try:
        SCALE = 3.0
        assert loss_fingerprint(f) != before
    finally: SCALE = 2.0
    assert loss_fingerprint(f) == before


class Weird:
    def __init__(self, a): self.a = a
    def __call__(self, o, t): return self.a * per_example_cross_entropy(o, t)


def test_loss_fingerprint_refuses_what_it_cannot_see():
    w = Weird(2.0)
    for bad, where in [(w, 'Weird'), (lambda o, t: w(o, t), "closure variable 'w'"),
                       (functools.partial(scaled_ce, s=w), 'partial keywords'),
                       (lambda o, t: per_example_cross_entropy(o, t) * torch.Generator().initial_seed(), None)]:
        if where is None: loss_fingerprint(bad); continue  # torch.Generator is a class: read by name, fine
        with pytest.raises(InfluenceError, match='nn loss module') as e: loss_fingerprint(bad)
        assert where in str(e.value) and 'without out_dir' in str(e.value)


SCRIPT = textwrap.dedent('''
    import functools, json, torch, torch.nn.functional as F
    from torch import nn
    from influence_nb.retrain import loss_fingerprint, per_example_cross_entropy
    K = 0.25
    def make(c): return lambda o, t: c * F.cross_entropy(o, t, reduction='none') + K
    def helper(o, t): return (o.squeeze(-1) - t) ** 2
    losses = [nn.CrossEntropyLoss(label_smoothing=0.1, weight=torch.tensor([1., 2., 3.])), make(0.5),
              lambda o, t, s=3: s * helper(o, t),
              functools.partial(F.cross_entropy, reduction='none', label_smoothing=0.2),
              nn.Sequential(nn.Identity()), per_example_cross_entropy]
    if WARM:  # run the lambdas many times first: the interpreter specialises their bytecode
        for _ in range(200):
            losses[1](torch.randn(4, 3), torch.tensor([0, 1, 2, 0])); losses[2](torch.randn(4, 1), torch.randn(4))
    print(json.dumps([loss_fingerprint(f) for f in losses]))
''')


def test_loss_fingerprint_stable_across_processes(tmp_path):
    outs = []
    for warm in (False, True):
        p = tmp_path / f'fp_{warm}.py'
        p.write_text(f'WARM = {warm}\n' + SCRIPT)
        r = subprocess.run([sys.executable, str(p)], capture_output=True, text=True, timeout=120,
                           env={**os.environ, 'PYTHONHASHSEED': str(1 + warm)})
        assert r.returncode == 0, r.stderr
        outs.append(json.loads(r.stdout.strip().splitlines()[-1]))
    assert outs[0] == outs[1] and len(set(outs[0])) == len(outs[0])
    assert outs[0][0] == loss_fingerprint(nn.CrossEntropyLoss(label_smoothing=0.1, weight=torch.tensor([1., 2., 3.])))
    assert outs[0][-1] == loss_fingerprint(per_example_cross_entropy)


# --- resume never mixes runs and never rewrites config.json when it refuses ------------------------------------------
def small_run(out_dir, loss_fn=per_example_cross_entropy, cfg=None, **kw):
    X, y = data(20)
    return loo_retrain(mlp(5), X, y, X[:3], y[:3], [1, 2, 7], cfg or RetrainConfig(steps=4, lr=0.1), loss_fn=loss_fn,
                       chunk_size=2, out_dir=out_dir, progress=False, **kw)


def snapshot(d):
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


@pytest.mark.parametrize('first,second,says', [
    (nn.CrossEntropyLoss(label_smoothing=0.1, reduction='none'),
     nn.CrossEntropyLoss(label_smoothing=0.2, reduction='none'), 'label_smoothing=0.2'),
    (nn.CrossEntropyLoss(weight=torch.tensor([1., 2., 3.]), reduction='none'),
     nn.CrossEntropyLoss(weight=torch.tensor([1., 2., 4.]), reduction='none'), 'same description, different contents'),
    (lambda o, t: 0.5 * per_example_cross_entropy(o, t), lambda o, t: 0.6 * per_example_cross_entropy(o, t), '0.6'),
])
def test_refused_resume_leaves_folder_byte_identical(tmp_path, first, second, says):
    small_run(tmp_path, first)
    before = snapshot(tmp_path)
    assert set(before) == {'config.json', 'chunk_00000.pt', 'chunk_00001.pt'}  # no temporary files left behind
    with pytest.raises(InfluenceError, match='different run') as e: small_run(tmp_path, second)
    msg = str(e.value)
    assert msg.count('loss:') == 1 and says in msg and 'fresh out_dir' in msg and 'delete' in msg
    assert snapshot(tmp_path) == before


def test_refusal_names_each_setting(tmp_path):
    small_run(tmp_path)
    before = snapshot(tmp_path)
    with pytest.raises(InfluenceError) as e: small_run(tmp_path, cfg=RetrainConfig(steps=4, lr=0.2, momentum=0.5))
    msg = str(e.value)
    assert 'cfg.lr: 0.1 -> 0.2' in msg and 'cfg.momentum: 0.0 -> 0.5' in msg and 'loss' not in msg
    X, y = data(20)
    with pytest.raises(InfluenceError, match='model') as e:
        loo_retrain(mlp(6), X, y, X[:3], y[:3], [1, 2, 7], RetrainConfig(steps=4, lr=0.1), chunk_size=2,
                    out_dir=tmp_path, progress=False)
    with pytest.raises(InfluenceError, match='test_data'):
        loo_retrain(mlp(5), X, y, X[:4], y[:4], [1, 2, 7], RetrainConfig(steps=4, lr=0.1), chunk_size=2,
                    out_dir=tmp_path, progress=False)
    with pytest.raises(InfluenceError, match='chunk_size: 2 -> 3'):
        loo_retrain(mlp(5), X, y, X[:3], y[:3], [1, 2, 7], RetrainConfig(steps=4, lr=0.1), chunk_size=3,
                    out_dir=tmp_path, progress=False)
    assert snapshot(tmp_path) == before


def test_config_describes_the_loss(tmp_path):
    loss = nn.CrossEntropyLoss(label_smoothing=0.1, reduction='none')
    small_run(tmp_path, loss)
    cfg = json.loads((tmp_path / 'config.json').read_text())
    assert cfg['loss'] == dict(description=loss_description(loss), fingerprint=loss_fingerprint(loss))
    assert 'label_smoothing=0.1' in cfg['loss']['description'] and cfg['cfg']['lr'] == 0.1 and cfg['chunk_size'] == 2


def test_chunks_checked_when_config_is_gone(tmp_path):
    small_run(tmp_path, nn.CrossEntropyLoss(label_smoothing=0.1, reduction='none'))
    (tmp_path / 'config.json').unlink()
    before = snapshot(tmp_path)
    with pytest.raises(InfluenceError, match='chunk_00000.pt was written by a different run'):
        small_run(tmp_path, nn.CrossEntropyLoss(label_smoothing=0.2, reduction='none'))
    assert snapshot(tmp_path) == before  # config.json not recreated for chunks it does not describe
    (tmp_path / 'chunk_00001.pt').write_bytes(b'garbage')
    with pytest.raises(InfluenceError, match='delete that file'):
        small_run(tmp_path, nn.CrossEntropyLoss(label_smoothing=0.1, reduction='none'))


def test_unfingerprintable_loss_refused_only_with_out_dir(tmp_path):
    w = Weird(1.0)
    X, y = data(20)
    r = loo_retrain(mlp(5), X, y, X[:3], y[:3], [1], RetrainConfig(steps=2, lr=0.1), loss_fn=w, progress=False)
    assert r.truth.shape == (1, 3)
    with pytest.raises(InfluenceError, match='run without out_dir'): small_run(tmp_path / 'x', w)
    assert not (tmp_path / 'x').exists()


def test_resume_with_fresh_identical_lambda_reuses_chunks(tmp_path):
    make = lambda c: (lambda o, t: c * per_example_cross_entropy(o, t))
    X, y = data(30)
    cfg = RetrainConfig(steps=10, lr=0.2, batch_size=8, momentum=0.9, seed=3)
    full = loo_retrain(mlp(4), X, y, X[:5], y[:5], [0, 3, 8, 21, 29], cfg, loss_fn=make(0.7), chunk_size=2,
                       progress=False)

    def crash(c, res):
        if c == 1: raise Crash()
    with pytest.raises(Crash):
        loo_retrain(mlp(4), X, y, X[:5], y[:5], [0, 3, 8, 21, 29], cfg, loss_fn=make(0.7), chunk_size=2,
                    out_dir=tmp_path, callback=crash, progress=False)
    trained = []
    res = loo_retrain(mlp(4), X, y, X[:5], y[:5], [0, 3, 8, 21, 29], cfg, loss_fn=make(0.7), chunk_size=2,
                      out_dir=tmp_path, callback=lambda c, r: trained.append(c), progress=False)
    assert trained == [2]
    assert torch.equal(res.truth, full.truth) and torch.equal(res.param_change, full.param_change)


# --- losses that are not per-example: routed through core.per_example_loss --------------------------------------
@pytest.mark.parametrize('fast', [True, False])
def test_mean_and_none_cross_entropy_match_per_example(fast):
    X, y = data(30)
    cfg = RetrainConfig(steps=12, lr=0.3, weight_decay=1e-2, momentum=0.5, batch_size=8, seed=2)
    ref = loo_retrain(mlp(3), X, y, X[:6], y[:6], [0, 4, 9], cfg, chunk_size=2, progress=False, fast=fast)
    for loss in [nn.CrossEntropyLoss(), nn.CrossEntropyLoss(reduction='none'), lambda o, t: F.cross_entropy(o, t)]:
        r = loo_retrain(mlp(3), X, y, X[:6], y[:6], [0, 4, 9], cfg, loss_fn=loss, chunk_size=2, progress=False,
                        fast=fast)
        torch.testing.assert_close(r.truth, ref.truth, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(r.param_change, ref.param_change, atol=1e-6, rtol=1e-5)
    nf = noise_floor(mlp(3), X, y, X[:6], y[:6], cfg, seeds=[1, 2], loss_fn=nn.CrossEntropyLoss(), fast=fast)
    torch.testing.assert_close(nf.losses, noise_floor(mlp(3), X, y, X[:6], y[:6], cfg, seeds=[1, 2], fast=fast).losses)
    m1 = retrain_sequential(mlp(3), X, y, torch.ones(30), cfg, loss_fn=nn.CrossEntropyLoss())
    m2 = retrain_sequential(mlp(3), X, y, torch.ones(30), cfg)
    torch.testing.assert_close(m1[0].weight, m2[0].weight)


def test_cross_entropy_module_takes_fast_path(monkeypatch):
    X, y = data(20)
    no_vmap(monkeypatch)
    loo_retrain(mlp(1), X, y, X[:3], y[:3], [2], RetrainConfig(steps=3, lr=0.1), loss_fn=nn.CrossEntropyLoss(),
                progress=False)


def test_mean_mse_regression():
    X, _ = data(25)
    t = (X @ torch.tensor([1., -1., .5, 2.]))[:, None]
    cfg = RetrainConfig(steps=20, lr=0.05, batch_size=10)
    net = nn.Linear(4, 1)
    a = loo_retrain(net, X, t, X[:4], t[:4], [0, 3], cfg, loss_fn=nn.MSELoss(), progress=False)
    b = loo_retrain(net, X, t, X[:4], t[:4], [0, 3], cfg, loss_fn=lambda o, y: ((o - y) ** 2).squeeze(-1),
                    progress=False)
    torch.testing.assert_close(a.truth, b.truth)


@pytest.mark.parametrize('loss,says', [
    (nn.CrossEntropyLoss(reduction='sum'), "reduction='sum'"),
    (nn.CrossEntropyLoss(weight=torch.tensor([1., 2., 3.])), 'class-weighted mean'),
    (lambda o, t: F.cross_entropy(o, t, reduction='sum'), 'sums over the batch'),
    (lambda o, t: F.cross_entropy(o, t)[None].expand(2), 'losses of shape (2,)'),
])
def test_non_mean_losses_refused(loss, says):
    X, y = data(20)
    cfg = RetrainConfig(steps=3, lr=0.1)
    for call in [lambda: loo_retrain(mlp(1), X, y, X[:3], y[:3], [2], cfg, loss_fn=loss, progress=False),
                 lambda: noise_floor(mlp(1), X, y, X[:3], y[:3], RetrainConfig(steps=3, lr=0.1, batch_size=5),
                                     loss_fn=loss),
                 lambda: retrain_sequential(mlp(1), X, y, torch.ones(20), cfg, loss_fn=loss)]:
        with pytest.raises(InfluenceError, match=re.escape(says)): call()


def test_ignored_targets_refused():
    X, y = data(20)
    with pytest.raises(InfluenceError, match='ignore_index'):
        loo_retrain(mlp(1), X, y, X[:3], y[:3], [2], RetrainConfig(steps=3, lr=0.1),
                    loss_fn=nn.CrossEntropyLoss(ignore_index=int(y[5])), progress=False)


# --- other misuse at the entry points ---------------------------------------------------------------------------
CFG = RetrainConfig(steps=3, lr=0.1)


@pytest.mark.parametrize('kw,err,says', [
    (dict(removed=[20]), IndexError, r'\[0, 20\)'),
    (dict(removed=[-1]), RemovedIndexError, r'\[0, 20\)'),
    (dict(removed=[]), InfluenceError, 'is empty'),
    (dict(removed=torch.zeros(20, dtype=torch.bool)), InfluenceError, 'mask.nonzero'),
    (dict(removed=[1.5]), InfluenceError, 'integer indices'),
    (dict(chunk_size=0), InfluenceError, 'chunk_size must be a whole number >= 1'),
    (dict(chunk_size=-2), InfluenceError, 'chunk_size'),
    (dict(chunk_size=1.5), InfluenceError, 'chunk_size'),
    (dict(y=torch.zeros(19, dtype=torch.long)), InfluenceError, 'X has 20 rows but y has 19'),
    (dict(X_test=torch.zeros(3, 5)), InfluenceError, 'X_test has examples of shape \\(5,\\)'),
    (dict(y_test=torch.zeros(2, dtype=torch.long)), InfluenceError, 'X_test has 3 rows but y_test has 2'),
    (dict(y_test=torch.zeros(3)), InfluenceError, "training targets' kind"),
    (dict(X_test=torch.zeros(0, 4), y_test=torch.zeros(0, dtype=torch.long)), InfluenceError, 'X_test is empty'),
    (dict(X=torch.zeros(20, 4).index_fill_(0, torch.tensor([7]), math.nan)), NonFiniteError, 'row 7'),
    (dict(X=[[0.] * 4] * 20), InfluenceError, 'must be a torch.Tensor'),
    (dict(model=nn.ReLU()), InfluenceError, 'no parameters'),
])
def test_loo_retrain_misuse(tmp_path, kw, err, says):
    X, y = data(20)
    args = dict(model=mlp(1), X=X, y=y, X_test=X[:3], y_test=y[:3], removed=[2], cfg=CFG)
    args.update(kw)
    with pytest.raises(err, match=says):
        loo_retrain(**args, out_dir=tmp_path / 'out', progress=False)
    assert not (tmp_path / 'out').exists()  # refused before anything was written


@pytest.mark.parametrize('field,value', [('steps', -1), ('steps', 2.5), ('lr', 0.), ('lr', math.nan),
                                         ('weight_decay', -1e-3), ('momentum', 1.0), ('batch_size', 0), ('seed', 0.5)])
def test_retrain_config_refuses(field, value):
    with pytest.raises(InfluenceError, match=f'{field}='):
        RetrainConfig(**{'steps': 3, 'lr': 0.1, field: value})


def test_train_stack_shape_misuse():
    X, y = data(20)
    net = mlp(1)
    with pytest.raises(InfluenceError, match=r'shape \(2, 20\)'): train_stack(net, *stack_state(net, 2),
                                                                              torch.ones(2, 19), X, y, CFG)
    with pytest.raises(InfluenceError, match='stack_state\\(model, 3\\)'): train_stack(net, *stack_state(net, 2),
                                                                                       torch.ones(3, 20), X, y, CFG)
    with pytest.raises(InfluenceError, match=r'shape \(20,\)'): retrain_sequential(net, X, y, torch.ones(2, 20), CFG)


def test_non_finite_training_named():
    X, _ = data(20)
    t = X.sum(1)
    sq = lambda o, y: (o.squeeze(-1) - y) ** 2
    diverge = RetrainConfig(steps=200, lr=5.0)
    with pytest.raises(NonFiniteError, match=r'chunk 0, step \d+: the control run') as e:
        loo_retrain(nn.Linear(4, 1), X, t, X[:3], t[:3], [2], diverge, loss_fn=sq, progress=False)
    assert 'lower cfg.lr' in str(e.value)
    with pytest.raises(NonFiniteError, match=r'control run with seed \d, step \d+'):
        noise_floor(nn.Linear(4, 1), X, t, X[:3], t[:3], RetrainConfig(steps=200, lr=5.0, batch_size=5), seeds=[1, 2],
                    loss_fn=sq)
    with pytest.raises(NonFiniteError, match=r'step \d+'):
        retrain_sequential(nn.Linear(4, 1), X, t, torch.ones(20), diverge, loss_fn=sq)
    # one example's loss is infinite from the start: step 0, and the run that removes it is fine
    X, y = data(20)
    y = y.clone(); y[3] = 3  # a label only example 3 has, whose loss is infinite
    bad = lambda o, t: per_example_cross_entropy(o, t.clamp(max=2)) / (t != 3).float()
    with pytest.raises(NonFiniteError, match='chunk 0, step 0'):
        loo_retrain(mlp(1), X, y, X[:3], y[:3], [3], RetrainConfig(steps=3, lr=0.1), loss_fn=bad, progress=False,
                    fast=False)
    with pytest.raises(NonFiniteError, match='step 0, training example 3'):
        retrain_sequential(mlp(1), X, y, torch.ones(20), RetrainConfig(steps=3, lr=0.1), loss_fn=bad)


def test_non_finite_chunk_not_stored(tmp_path):
    X, _ = data(20)
    t = X.sum(1)
    sq = lambda o, y: (o.squeeze(-1) - y) ** 2
    with pytest.raises(NonFiniteError):
        loo_retrain(nn.Linear(4, 1), X, t, X[:3], t[:3], [2], RetrainConfig(steps=200, lr=5.0), loss_fn=sq,
                    out_dir=tmp_path, progress=False)
    assert not list(tmp_path.glob('chunk_*'))


def test_float64_data_with_a_float32_model_is_cast_like_the_engine():
    "Data in another floating dtype than the model is cast to the model's, as the influence engine does (no raw error)."
    torch.manual_seed(0)
    X, y = torch.randn(20, 4, dtype=torch.float64), torch.randint(0, 3, (20,))
    m = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    cfg = RetrainConfig(steps=5, lr=0.1)
    a = loo_retrain(m, X, y, X[:3], y[:3], [0, 1], cfg, progress=False)
    b = loo_retrain(m, X.float(), y, X[:3].float(), y[:3], [0, 1], cfg, progress=False)
    torch.testing.assert_close(a.truth, b.truth, rtol=0, atol=0)


# --- deep BatchNorm nets: conv + BN, torchvision BasicBlock / ResNet-18, the model-by-model loop ------------------
def conv_bn(momentum=0.1):
    "conv + BatchNorm + ReLU(inplace) -> pool -> linear, on 3x8x8 images."
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4, momentum=momentum), nn.ReLU(inplace=True),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))


def block_net():
    "A tiny residual net of torchvision BasicBlocks (in-place ReLU and residual add, a strided downsampling block)."
    from torchvision.models.resnet import BasicBlock
    down = nn.Sequential(nn.Conv2d(6, 8, 1, 2, bias=False), nn.BatchNorm2d(8))
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(inplace=True),
                         BasicBlock(6, 6), BasicBlock(6, 8, stride=2, downsample=down),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))


def images(n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 3, (n,), generator=g)


@pytest.fixture
def force_loop(monkeypatch):
    "Every stack that is not a plain MLP trains model by model (the 'loop' path)."
    monkeypatch.setattr(retrain_mod, 'LOOP_MIN_FLOPS', 0)


def assert_stack_is_sequential(net, P, B, W, X, y, cfg, seeds=None, atol=1e-5):
    "Parameters, BN running statistics, num_batches_tracked and eval losses of every row == retrain_sequential."
    L = stack_losses(net, P, B, X, y)
    for k in range(len(W)):
        c = cfg if seeds is None else RetrainConfig(**{**asdict(cfg), 'seed': seeds[k]})
        ref = retrain_sequential(net, X, y, W[k], c)
        S = {**P, **B}  # frozen parameters travel with the buffers
        for name, p in ref.named_parameters(): torch.testing.assert_close(S[name][k], p.detach(), atol=atol, rtol=atol)
        for name, b in ref.named_buffers():
            if b.is_floating_point(): torch.testing.assert_close(B[name][k], b, atol=atol, rtol=atol)
            else: assert torch.equal(B[name][k], b), name
        with torch.no_grad(): torch.testing.assert_close(L[k], per_example_cross_entropy(ref.eval()(X), y), atol=atol,
                                                         rtol=atol)


@pytest.mark.parametrize('path', ['vmap', 'loop'])
@pytest.mark.parametrize('make', [conv_bn, block_net])
def test_conv_batchnorm_stack_equals_sequential(make, path, monkeypatch):
    "conv+BN+ReLU(inplace) and a BasicBlock net: the stack == K plain trainings, parameters AND running statistics."
    if path == 'loop': monkeypatch.setattr(retrain_mod, 'LOOP_MIN_FLOPS', 0)
    X, y = images()
    torch.manual_seed(3); net = make()
    cfg = RetrainConfig(steps=5, lr=0.05, weight_decay=1e-3, momentum=0.9, batch_size=8, seed=1)
    assert retrain_mod.stack_path(net, X, 8) == path
    W = removal_weights(24, [0, 13])
    P, B = stack_state(net, 3)
    train_stack(net, P, B, W, X, y, cfg)
    assert_stack_is_sequential(net, P, B, W, X, y, cfg)
    assert all(int(v.min()) == 5 for k, v in B.items() if k.endswith('num_batches_tracked'))
    assert not torch.equal(B['1.running_mean'][0], B['1.running_mean'][2])
    assert net.training and all(int(m.num_batches_tracked) == 0 for m in net.modules()
                                if isinstance(m, nn.BatchNorm2d))  # the model itself is untouched


def test_loop_per_model_seeds_and_frozen_parameters(force_loop):
    "The loop with per-model minibatch orders (the noise floor) and a frozen layer == the plain loop per seed."
    X, y = images(20, seed=1)
    torch.manual_seed(4); net = conv_bn(); net[0].bias.requires_grad_(False)
    cfg = RetrainConfig(steps=6, lr=0.1, momentum=0.5, batch_size=6)
    W, seeds = torch.ones(3, 20), [4, 5, 6]
    P, B = stack_state(net, 3)
    assert '0.bias' in B and retrain_mod.stack_path(net, X, 6, per_model=True) == 'loop'
    train_stack(net, P, B, W, X, y, cfg, seeds=seeds)
    assert_stack_is_sequential(net, P, B, W, X, y, cfg, seeds=seeds)
    assert torch.equal(B['0.bias'][1], net[0].bias.detach())
    nf = noise_floor(net, X, y, X[:4], y[:4], cfg, seeds=seeds)
    torch.testing.assert_close(nf.losses, stack_losses(net, P, B, X[:4], y[:4]), atol=1e-6, rtol=1e-6)


def test_cumulative_batchnorm_loops_and_vmap_refuses():
    "BatchNorm(momentum=None) reads num_batches_tracked as a number, which vmap cannot: it loops, fast=False refuses."
    X, y = images()
    torch.manual_seed(0); net = conv_bn(momentum=None)
    cfg = RetrainConfig(steps=4, lr=0.1, batch_size=8)
    assert retrain_mod.stack_path(net, X, 8) == 'loop'
    W = removal_weights(24, [5])
    P, B = stack_state(net, 2)
    train_stack(net, P, B, W, X, y, cfg)
    assert_stack_is_sequential(net, P, B, W, X, y, cfg)
    with pytest.raises(InfluenceError, match='momentum=None'):
        train_stack(net, *stack_state(net, 2), W, X, y, cfg, fast=False)


def test_loop_dropout_draws_the_shared_stack_masks(force_loop):
    "Shared minibatches: the loop gives every model the dropout masks of vmap(randomness='same'); per-model: vmap."
    X, y = data(30)
    torch.manual_seed(0); net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 3))
    cfg = RetrainConfig(steps=6, lr=0.2, batch_size=10, seed=2)
    assert retrain_mod.stack_path(net, X, 10) == 'loop'
    assert retrain_mod.stack_path(net, X, 10, per_model=True) == 'vmap'
    out = []
    for fast in (True, False):
        P, B = stack_state(net, 3)
        torch.manual_seed(7); train_stack(net, P, B, removal_weights(30, [1, 2]), X, y, cfg, fast=fast)
        out.append(P)
    for k in out[0]: torch.testing.assert_close(out[0][k], out[1][k], atol=1e-6, rtol=1e-6)


def test_loop_non_finite_named(force_loop):
    "On the loop, an infinite loss is named by chunk, step and run, as on the stack; the run without it is fine."
    X, y = images(16)
    y = y.clone(); y[3] = 3  # a label only example 3 has, whose loss is infinite
    bad = lambda o, t: per_example_cross_entropy(o, t.clamp(max=2)) / (t != 3).float()
    with pytest.raises(NonFiniteError, match=r'chunk 0, step 0: the control run'):
        loo_retrain(conv_bn(), X, y, X[4:6], y[4:6], [3], RetrainConfig(steps=3, lr=0.1), loss_fn=bad, progress=False)


def test_stack_losses_bounds_examples_in_flight(monkeypatch):
    "The eval pass holds at most batch_size examples at once: vmap runs batch_size // K per model, the loop one model."
    X, y = images(30)
    torch.manual_seed(0); net = conv_bn()
    P, B = stack_state(net, 5)
    P = {k: v + 0.01 * torch.randn_like(v) for k, v in P.items()}
    full = stack_losses(net, P, B, X, y)
    seen = []
    real = retrain_mod._stack_forward
    monkeypatch.setattr(retrain_mod, '_stack_forward', lambda m, p, b, xb, pm: seen.append(len(xb)) or real(m, p, b, xb, pm))
    torch.testing.assert_close(stack_losses(net, P, B, X, y, batch_size=12), full, atol=1e-6, rtol=1e-6)
    assert seen and max(seen) * 5 <= 12 and sum(seen) == 30
    monkeypatch.setattr(retrain_mod, 'LOOP_MIN_FLOPS', 0)
    torch.testing.assert_close(stack_losses(net, P, B, X, y, batch_size=12), full, atol=1e-6, rtol=1e-6)
    assert sum(seen) == 30  # the loop did not use vmap


def test_resnet18_through_loo_retrain():
    "torchvision resnet18(num_classes=10) on 3x32x32, two steps, chunked: takes the loop on a CPU, == the plain loop."
    from torchvision.models import resnet18
    torch.manual_seed(0)
    net, X, y = resnet18(num_classes=10), torch.randn(12, 3, 32, 32), torch.randint(0, 10, (12,))
    cfg = RetrainConfig(steps=2, lr=0.01, weight_decay=5e-4, momentum=0.9, batch_size=6)
    assert retrain_mod.stack_path(net, X, 6) == 'loop' and retrain_mod.stack_path(net, X, 6, fast=False) == 'vmap'
    r = loo_retrain(net, X, y, X[:3], y[:3], [0, 5], cfg, chunk_size=1, keep_params=False, progress=False)
    assert r.param_change is None and r.test_losses.shape == (2, 3)
    ref = retrain_sequential(net, X, y, removal_weights(12, [5])[1], cfg).eval()
    with torch.no_grad(): torch.testing.assert_close(r.test_losses[1], per_example_cross_entropy(ref(X[:3]), y[:3]),
                                                     atol=1e-4, rtol=1e-4)
