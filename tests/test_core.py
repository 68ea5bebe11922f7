"""Unit and property tests of influence_nb.core: gradients, HVPs, exactness on ridge regression, errors."""
import copy
import functools
import warnings

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

from influence_nb import (Influence, InfluenceError, HessianNotPositiveDefinite, NonFiniteError, influence_scores,
                          param_changes, self_influence, upweight_influence)
from influence_nb.core import Flat, as_loader, select_params

from conftest import fit, half_mse, linear_model, mlp, random_classification, ridge_data, ridge_fit, ridge_hessian

torch.set_default_dtype(torch.float32)


@settings(max_examples=15, deadline=None)
@given(n=st.integers(8, 40), d=st.integers(1, 5), lam=st.floats(1e-3, 1.0), seed=st.integers(0, 10_000))
def test_ridge_removal_equals_exact_loo_up_to_leverage(n, d, lam, seed):
    """For the squared loss, exact LOO = influence prediction / (1 - leverage), to float64 precision."""
    X, y = ridge_data(n, d, seed)
    theta = ridge_fit(X, y, lam)
    dth = param_changes(linear_model(theta), half_mse, (X, y), weight_decay=lam)
    H = ridge_hessian(X, lam)
    lev = torch.einsum("ij,jk,ik->i", X, torch.linalg.inv(H), X) / n
    loo = torch.stack([ridge_fit(X, y, lam, torch.ones(n, dtype=X.dtype).index_fill(0, torch.tensor([j]), 0.)) - theta
                       for j in range(n)])
    torch.testing.assert_close(dth / (1 - lev[:, None]), loo, rtol=1e-6, atol=1e-9)


def test_ridge_scores_match_loo_test_loss_change():
    (X, y), lam = ridge_data(), 0.1
    n = len(y)
    theta = ridge_fit(X, y, lam)
    Xt, yt = X[:3] + 0.5, y[:3]
    s = influence_scores(linear_model(theta), half_mse, (X, y), (Xt, yt), weight_decay=lam)
    H = ridge_hessian(X, lam)
    lev = torch.einsum("ij,jk,ik->i", X, torch.linalg.inv(H), X) / n
    # first-order in the parameter change: ∇ℓ_tᵀ Δθ_LOO (1 - h_j) equals the score exactly
    loo = torch.stack([ridge_fit(X, y, lam, torch.ones(n, dtype=X.dtype).index_fill(0, torch.tensor([j]), 0.)) - theta
                       for j in range(n)])
    gt = (Xt @ theta - yt)[:, None] * Xt
    torch.testing.assert_close(s, gt @ (loo * (1 - lev[:, None])).T, rtol=1e-6, atol=1e-10)
    torch.testing.assert_close(upweight_influence(linear_model(theta), half_mse, (X, y), (Xt, yt), weight_decay=lam),
                               -n * s)


@functools.cache
def _trained_mlp(seed, n, wd):
    X, y = random_classification(n, seed=seed)
    m = fit(mlp(4, 5, 3, seed=seed), nn.functional.cross_entropy, X.double(), y, wd)   # θ* in float64 ...
    return m.float(), X, y                                                              # ... scored in float32


def trained_mlp(seed=0, n=60, wd=1e-2):
    "A fresh copy of the float32 4-5-3 tanh MLP at θ* on 60 random points (labels without signal), and its data."
    m, X, y = _trained_mlp(seed, n, wd)
    return copy.deepcopy(m), X.clone(), y.clone(), wd


@settings(max_examples=10, deadline=None)
@given(k=st.integers(1, 6), seed=st.integers(0, 1000))
def test_hvp_equals_hessian_times_v(k, seed):
    m, X, y, wd = trained_mlp()
    inf = Influence(m, nn.CrossEntropyLoss(), (X, y), weight_decay=wd, batch_size=16, dtype=torch.float64)
    H = inf.hessian()
    torch.testing.assert_close(H, H.T)
    V = torch.randn(k, inf.num_params, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    torch.testing.assert_close(inf.hvp(V), V @ H.T)
    torch.testing.assert_close(inf.hvp(V[0]), H @ V[0])


def test_per_example_grads_equal_autograd_and_batching_does_not_matter():
    m, X, y, wd = trained_mlp()
    G16 = Influence(m, nn.CrossEntropyLoss(), (X, y), batch_size=16).grad_matrix((X, y))
    G7 = Influence(m, nn.CrossEntropyLoss(), (X, y), batch_size=7).grad_matrix((X, y))
    torch.testing.assert_close(G16, G7)
    for i in [0, 33, 59]:
        m.zero_grad()
        nn.functional.cross_entropy(m(X[i:i + 1]), y[i:i + 1]).backward()
        torch.testing.assert_close(G16[i], torch.cat([p.grad.flatten() for p in m.parameters()]))


def test_scoring_paths_agree_and_match_explicit_formula():
    m, X, y, wd = trained_mlp()
    inf = Influence(m, nn.CrossEntropyLoss(), (X, y), weight_decay=wd, dtype=torch.float64, batch_size=25)
    Xt, yt = X[:4] + 0.1, y[:4]
    a, b = inf.scores((Xt, yt), method="grad"), inf.scores((Xt, yt), method="jvp")
    torch.testing.assert_close(a, b)
    G, Gt = inf.grad_matrix((X, y)), inf.grad_matrix((Xt, yt))
    torch.testing.assert_close(a, Gt @ torch.linalg.solve(inf.hessian(), G.T) / len(y))
    si = self_influence(m, nn.CrossEntropyLoss(), (X, y), weight_decay=wd, dtype=torch.float64)
    assert (si > 0).all(), "a positive-definite H gives positive self-influence"


def test_last_layer_only():
    m, X, y, wd = trained_mlp()
    inf = Influence(m, nn.CrossEntropyLoss(), (X, y), weight_decay=wd, params=["2"])
    assert inf.num_params == 5 * 3 + 3
    assert inf.scores((X[:2], y[:2])).shape == (2, len(y))


def test_dataset_and_dataloader_inputs_agree():
    from torch.utils.data import DataLoader, TensorDataset
    m, X, y, wd = trained_mlp()
    kw = dict(weight_decay=wd, dtype=torch.float64)
    a = influence_scores(m, nn.CrossEntropyLoss(), (X, y), (X[:3], y[:3]), **kw)
    b = influence_scores(m, nn.CrossEntropyLoss(), TensorDataset(X, y), DataLoader(TensorDataset(X[:3], y[:3])), **kw)
    torch.testing.assert_close(a, b)


def test_model_mode_is_restored_and_batchnorm_uses_running_stats():
    X, y = random_classification(50, c=2)
    m = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Dropout(0.5), nn.Linear(6, 2))
    m.train()
    s = influence_scores(m, nn.CrossEntropyLoss(), (X, y), (X[:2], y[:2]), damping=1.0)
    assert m.training and torch.isfinite(s).all()


# --------------------------------------------------------------- bad input gives a clear error
def test_bad_inputs():
    m, X, y, wd = trained_mlp()
    ce = nn.CrossEntropyLoss()
    with pytest.raises(ValueError, match="disagree on the number of examples"):
        influence_scores(m, ce, (X, y[:-1]), (X[:2], y[:2]))
    with pytest.raises(InfluenceError, match="reduction='sum'"):
        influence_scores(m, nn.CrossEntropyLoss(reduction="sum"), (X, y), (X[:2], y[:2]))
    with pytest.raises(InfluenceError, match="failed on a batch"):
        influence_scores(m, ce, (X, y), (X[:2, :3], y[:2]))
    with pytest.raises(ValueError, match="train is empty"):
        influence_scores(m, ce, (X[:0], y[:0]), (X[:2], y[:2]))
    with pytest.raises(ValueError, match="test is empty"):
        influence_scores(m, ce, (X, y), (X[:0], y[:0]), weight_decay=wd)
    with pytest.raises(InfluenceError, match="unknown solver 'nope'"):
        influence_scores(m, ce, (X, y), (X[:2], y[:2]), solver="nope")
    Xn = X.clone(); Xn[3] = float("inf")
    with pytest.raises(NonFiniteError):
        influence_scores(m, ce, (Xn, y), (X[:2], y[:2]), weight_decay=wd)
    with pytest.raises(TypeError, match="expected an"):
        influence_scores(m, ce, "data", (X[:2], y[:2]))


def test_singular_hessian_names_eigenvalue_and_damping():
    X, y = random_classification(20)
    wide = nn.Sequential(nn.Linear(4, 30), nn.ReLU(), nn.Linear(30, 3))
    with pytest.raises(HessianNotPositiveDefinite, match=r"smallest eigenvalue .* pass damping >"):
        influence_scores(wide, nn.CrossEntropyLoss(), (X, y), (X[:2], y[:2]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s = influence_scores(wide, nn.CrossEntropyLoss(), (X, y), (X[:2], y[:2]), damping=1.0)
    assert torch.isfinite(s).all()


def test_flat_roundtrip_and_param_selection():
    m = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 1))
    f = Flat(dict(m.named_parameters()))
    v = torch.randn(f.numel)
    torch.testing.assert_close(f.flatten(f.unflatten(v)), v)
    assert list(select_params(m, "1")) == ["1.weight", "1.bias"]
    with pytest.raises(ValueError, match="no parameter"):
        select_params(m, "7")
    with pytest.raises(ValueError, match="shuffle"):
        from torch.utils.data import DataLoader, TensorDataset
        as_loader(DataLoader(TensorDataset(torch.zeros(3, 1), torch.zeros(3)), shuffle=True))


def small_convnet(seed=0):
    "A tiny net with a Conv2d (stride, padding), max-pooling, a Conv1d and a Linear called twice."
    torch.manual_seed(seed)
    class Net(nn.Module):
        def __init__(s):
            super().__init__()
            s.c2, s.l = nn.Conv2d(1, 3, 3, stride=1, padding=1), nn.Linear(12, 12)
            s.c1, s.o = nn.Conv1d(3, 2, 3, padding=1), nn.Linear(8, 3)
        def forward(s, x):
            h = nn.functional.max_pool2d(torch.relu(s.c2(x)), 2).flatten(1)        # (B, 3·2·2)
            h = torch.tanh(s.l(torch.tanh(s.l(h))))
            return s.o(torch.tanh(s.c1(h.view(-1, 3, 4))).flatten(1))
    return Net().double()


@settings(max_examples=8, deadline=None)
@given(k=st.integers(1, 5), batch=st.integers(3, 30), seed=st.integers(0, 100))
def test_layer_scoring_equals_per_example_gradients(k, batch, seed):
    net = small_convnet(seed)
    g = torch.Generator().manual_seed(seed)
    X, y = torch.randn(30, 1, 4, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (30,), generator=g)
    inf = Influence(net, nn.CrossEntropyLoss(), (X, y), weight_decay=0.1, damping=1.0, batch_size=batch)
    Xt, yt = X[:k] + 0.1, y[:k]
    ref = inf.scores((Xt, yt), method="grad")
    torch.testing.assert_close(inf.scores((Xt, yt), method="layer"), ref)
    torch.testing.assert_close(inf.scores((Xt, yt), method="auto"), ref)
    torch.testing.assert_close(inf.scores((Xt, yt), method="jvp"), ref)


@pytest.mark.parametrize("conv, shape", [
    (lambda: nn.Conv2d(2, 3, (2, 3), stride=(2, 1), padding=(1, 0), dilation=(1, 2)), (2, 9, 10)),
    (lambda: nn.Conv2d(2, 3, 3, stride=3), (2, 11, 11)),                  # the window overhangs the input
    (lambda: nn.Conv2d(2, 3, 3, padding="same", dilation=2), (2, 7, 7)),  # string padding: the stacked-kernel way
    (lambda: nn.Conv1d(2, 3, 3, stride=2, padding=2, dilation=2), (2, 13)),
    (lambda: nn.Conv3d(2, 2, (2, 2, 3), stride=(1, 2, 1), padding=1), (2, 4, 5, 5)),
])
def test_layer_scoring_convolutions_with_strides_dilations_and_padding(conv, shape):
    torch.manual_seed(0)
    c = conv()
    with torch.no_grad(): n_out = c(torch.zeros(1, *shape)).numel()
    net = nn.Sequential(c, nn.Tanh(), nn.Flatten(), nn.Linear(n_out, 3)).double()
    X, y = torch.randn(12, *shape, dtype=torch.float64), torch.randint(0, 3, (12,))
    inf = Influence(net, nn.CrossEntropyLoss(), (X, y), weight_decay=0.1, damping=1.0, batch_size=5)
    Xt, yt = X[:4] + 0.1, y[:4]
    torch.testing.assert_close(inf.scores((Xt, yt), method="layer"), inf.scores((Xt, yt), method="grad"))


def test_layer_scoring_refuses_parameters_outside_layers():
    m = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Linear(5, 3))
    X, y = torch.randn(20, 4), torch.randint(0, 3, (20,))
    inf = Influence(m, nn.CrossEntropyLoss(), (X, y), weight_decay=0.1, damping=0.1)
    with pytest.raises(InfluenceError, match="method='layer'"):
        inf.scores((X[:3], y[:3]), method="layer")
    torch.testing.assert_close(inf.scores((X[:3], y[:3])),
                               inf.scores((X[:3], y[:3]), method="grad"))   # auto falls back
    last = Influence(m, nn.CrossEntropyLoss(), (X, y), weight_decay=0.1, params=["2"])    # only the last Linear: fine
    torch.testing.assert_close(last.scores((X[:3], y[:3]), method="layer"), last.scores((X[:3], y[:3]), method="grad"))


def test_hvp_modes_agree_and_bad_mode_is_refused():
    m, X, y, wd = trained_mlp()
    V = torch.randn(20, 43, generator=torch.Generator().manual_seed(0), dtype=torch.float64)   # 43 parameters
    out = {mode: Influence(m, nn.CrossEntropyLoss(), (X, y), weight_decay=wd, dtype=torch.float64, hvp_mode=mode,
                           batch_size=16).hvp(V) for mode in ("vmap", "loop", "auto")}
    torch.testing.assert_close(out["vmap"], out["loop"])
    torch.testing.assert_close(out["auto"], out["loop"])
    with pytest.raises(ValueError, match="hvp_mode"):
        Influence(m, nn.CrossEntropyLoss(), (X, y), hvp_mode="fast")


def test_auto_hvp_mode_is_chosen_per_batch_size():
    m, X, y, wd = trained_mlp()                                   # 60 points: batches of 16, 16, 16 and 12
    g = torch.Generator().manual_seed(1)
    V = torch.randn(5, 43, generator=g, dtype=torch.float64)
    make = lambda **kw: Influence(m, nn.CrossEntropyLoss(), (X, y), weight_decay=wd, dtype=torch.float64, **kw)
    ref, inf = make(batch_size=16, hvp_mode="loop").hvp(V), make(batch_size=16)
    for _ in range(6):                                            # three timed calls each way, per batch size
        torch.testing.assert_close(inf.hvp(V), ref)
    assert inf.hvp_modes.keys() == {16, 12} and set(inf.hvp_modes.values()) <= {"vmap", "loop"}
    one = make(batch_size=60)
    torch.testing.assert_close(one.hvp(V[:1]), ref[:1])           # one vector: nothing to choose
    assert one.hvp_modes == {}
    W = torch.randn(100, 43, generator=g, dtype=torch.float64)     # many rows: timed in pieces within one call
    many = make(batch_size=60, hvp_chunk=16)
    torch.testing.assert_close(many.hvp(W), make(batch_size=60, hvp_mode="vmap").hvp(W))
    # pieces of hvp_chunk rows for a tiny model
    assert list(many.hvp_modes) == [60] and many.curvature.tuner.piece_rows(X, y) == 16


def test_auto_hvp_pieces_shrink_with_the_batch_activations():
    torch.manual_seed(0)
    wide = nn.Sequential(nn.Linear(4, 20000), nn.Tanh(), nn.Linear(20000, 3)).double()
    X, y = torch.randn(200, 4, dtype=torch.float64), torch.randint(0, 3, (200,))
    inf = Influence(wide, nn.CrossEntropyLoss(), (X, y), batch_size=200)
    piece_rows = inf.curvature.tuner.piece_rows
    big, small = piece_rows(X, y), piece_rows(X[:2], y[:2])            # ~64 MB of saved activations per piece
    assert big == 2 and small >= 16                                     # 200 x 20,000 float64 = 32 MB per tensor
    V = torch.randn(5, inf.num_params, dtype=torch.float64)
    torch.testing.assert_close(inf.hvp(V), Influence(wide, nn.CrossEntropyLoss(), (X, y), batch_size=200,
                                                     hvp_mode="loop").hvp(V))


def test_loaders_that_reorder_repeat_or_drop_are_refused_on_every_path():
    """Scores are indexed by position: a loader that repeats, reorders or drops examples is refused, not scored."""
    m, X, y, wd = trained_mlp()
    from torch.utils.data import DataLoader, TensorDataset
    ds = TensorDataset(X, y)
    extra = DataLoader(ds, batch_size=16, sampler=list(range(len(y))) + [0, 1])   # would yield n + 2
    make = lambda train: Influence(m, nn.CrossEntropyLoss(), train, weight_decay=wd, dtype=torch.float64, batch_size=16)
    with pytest.raises(InfluenceError, match="shuffle=False and no sampler"):
        make(extra)
    with pytest.raises(InfluenceError, match="drop_last=False"):
        make(DataLoader(ds, batch_size=16, drop_last=True))
    inf = make((X, y))
    with pytest.raises(InfluenceError, match="shuffle=False"):          # a test loader, too
        inf.scores(DataLoader(TensorDataset(X[:5], y[:5]), shuffle=True))


def test_hessian_data_subset():
    m, X, y, wd = trained_mlp()
    ce = nn.CrossEntropyLoss()
    full = Influence(m, ce, (X, y), weight_decay=wd, dtype=torch.float64)
    same = Influence(m, ce, (X, y), weight_decay=wd, dtype=torch.float64, hessian_data=(X, y))
    torch.testing.assert_close(full.scores((X[:3], y[:3])), same.scores((X[:3], y[:3])))
    sub = Influence(m, ce, (X, y), weight_decay=wd, damping=0.1, dtype=torch.float64, hessian_data=(X[:20], y[:20]))
    only = Influence(m, ce, (X[:20], y[:20]), weight_decay=wd, damping=0.1, dtype=torch.float64)
    torch.testing.assert_close(sub.hessian(), only.hessian())        # H from the subset ...
    s = sub.scores((X[:3], y[:3]))
    assert s.shape == (3, 60) and sub.num_train() == 60              # ... every training point scored, 1/n with n = 60
    G, Gt = sub.grad_matrix((X, y)), sub.grad_matrix((X[:3], y[:3]))
    A = only.hessian() + 0.1 * torch.eye(43, dtype=torch.float64)
    torch.testing.assert_close(s, Gt @ torch.linalg.solve(A, G.T) / 60)
