"Tests of influence_nb.ihvp: CG and LiSSA against the exact solve, divergence detection, flat memory, spectrum tools."
import warnings
import pytest
import torch
from torch import nn
from sklearn.datasets import load_iris
from hypothesis import given, settings, strategies as st, HealthCheck

from influence_nb.core import Influence, ExactSolver, HessianNotPositiveDefinite, influence_scores
from influence_nb.ihvp import (CGSolver, BlockCGSolver, LissaSolver, LissaDivergence, top_eigenvalue, bottom_eigenvalue,
                               power_iteration, peak_memory, minibatches)

torch.set_num_threads(1)
CE = nn.CrossEntropyLoss()


def _data():
    X, y = load_iris(return_X_y=True)
    X = torch.tensor((X - X.mean(0)) / X.std(0)); y = torch.tensor(y)
    return X[:120], y[:120], X[120:], y[120:]


def _trained_mlp(depth=1, width=5, wd=1e-3, seed=0):
    X, y, _, _ = _data()
    torch.manual_seed(seed)
    layers, d = [], 4
    for _ in range(depth): layers += [nn.Linear(d, width), nn.Tanh()]; d = width
    m = nn.Sequential(*layers, nn.Linear(d, 3)).double()
    opt = torch.optim.LBFGS(m.parameters(), max_iter=1000, tolerance_grad=1e-12, tolerance_change=0,
                            history_size=50, line_search_fn="strong_wolfe")
    def closure():
        opt.zero_grad(); l = CE(m(X), y) + wd / 2 * sum((p ** 2).sum() for p in m.parameters()); l.backward(); return l
    for _ in range(4): opt.step(closure)
    return m


@pytest.fixture(scope="module")
def setup():
    X, y, Xt, yt = _data()
    m = _trained_mlp()
    inf = Influence(m, CE, (X, y), weight_decay=1e-3, dtype=torch.float64)
    return m, inf, (X, y), (Xt, yt), inf.grad_matrix((Xt, yt))


def test_cg_equals_exact_on_pd(setup):
    _, inf, _, _, G = setup
    assert float(torch.linalg.eigvalsh(inf.hessian())[0]) > 0          # a positive-definite problem
    Xe, _ = ExactSolver().solve(inf, G)
    Xc, info = CGSolver(tol=1e-10).solve(inf, G)
    assert float(((Xc - Xe).norm(dim=1) / Xe.norm(dim=1)).max()) < 1e-6
    assert info.residual < 1e-9 and info.details["converged"]
    assert info.details["residual_history"].shape[1] == G.shape[0]


def test_cg_several_rhs_equal_one_at_a_time(setup):
    _, inf, _, _, G = setup
    X_all, _ = CGSolver(tol=1e-10).solve(inf, G[:6])
    for i in range(6):
        xi, _ = CGSolver(tol=1e-10).solve(inf, G[i:i + 1])
        assert float((X_all[i] - xi[0]).norm() / xi[0].norm()) < 1e-6   # both to a 1e-10 residual, κ ≈ 5e3


def test_cg_refuses_indefinite_and_reports_cap(setup):
    m, _, train, _, G = setup
    inf0 = Influence(nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double(), CE, train, dtype=torch.float64)
    with pytest.raises(HessianNotPositiveDefinite, match="pass damping >"):
        CGSolver().solve(inf0, inf0.grad_matrix(train)[:3])
    inf = Influence(m, CE, train, weight_decay=1e-3, dtype=torch.float64)
    with pytest.warns(UserWarning, match="not converged after max_iter=3"):
        _, info = CGSolver(max_iter=3).solve(inf, G)
    assert not info.details["converged"] and info.iterations == 3


def test_solver_names_reach_the_engine(setup):
    m, _, train, test, _ = setup
    exact = influence_scores(m, CE, train, test, weight_decay=1e-3, dtype=torch.float64)
    cg, info = influence_scores(m, CE, train, test, weight_decay=1e-3, dtype=torch.float64, solver="cg",
                                tol=1e-10, return_info=True)
    assert info.solver == "cg"
    torch.testing.assert_close(cg, exact, rtol=1e-6, atol=1e-9 * float(exact.abs().max()))
    s, info = influence_scores(m, CE, train, test, weight_decay=1e-3, damping=0.01, dtype=torch.float64,
                               solver="lissa", depth=50, return_info=True)
    assert info.solver == "lissa" and info.details["depth"] == 50 and torch.isfinite(s).all()
    import math; assert math.isfinite(info.residual)


def test_lissa_reaches_tolerance_full_batch(setup):
    "With the whole training set as the batch LiSSA is deterministic: relative error below 1e-6."
    m, _, train, _, G = setup
    inf = Influence(m, CE, train, weight_decay=1e-3, damping=0.1, dtype=torch.float64)
    Xe, _ = ExactSolver().solve(inf, G[:3])
    X, info = LissaSolver(depth=600, batch_size=len(train[1]), scale_probes=1).solve(inf, G[:3])
    assert float(((X - Xe).norm(dim=1) / Xe.norm(dim=1)).max()) < 1e-6 and info.residual < 1e-6


def test_lissa_reaches_tolerance_minibatch(setup):
    "Minibatches of 32, depth 1500, 3 repeats, δ=0.01: relative error below 10% of the exact damped solve."
    m, _, train, _, G = setup
    inf = Influence(m, CE, train, weight_decay=1e-3, damping=0.01, dtype=torch.float64)
    Xe, _ = ExactSolver().solve(inf, G[:3])
    X, info = LissaSolver(depth=1500, repeats=3, batch_size=32).solve(inf, G[:3])
    rel = float(((X - Xe).norm(dim=1) / Xe.norm(dim=1)).max())
    assert rel < 0.1, rel
    assert info.details["scale"] > info.details["top_eigenvalue"]


def test_lissa_small_scale_detected(setup):
    _, inf, _, _, G = setup
    top = top_eigenvalue(inf)
    with pytest.raises(LissaDivergence, match=r"scale=.* is too small: the top eigenvalue of H \+ δI is") as e:
        LissaSolver(depth=2000, scale=top / 3).solve(inf, G[:2])
    assert e.value.step < 200 and abs(e.value.top_eigenvalue - top) < 1e-3 * top
    assert f"{e.value.scale:g}" in str(e.value)


def test_lissa_never_returns_nan(setup):
    "Even when max_growth is disabled, non-finite iterates are stopped."
    _, inf, _, _, G = setup
    with pytest.raises(LissaDivergence, match="not finite"):
        LissaSolver(depth=5000, scale=top_eigenvalue(inf) / 10, max_growth=float("inf")).solve(inf, G[:1])


def test_lissa_memory_flat_with_depth(setup):
    "Peak memory at depth 100 and 400 differ by < 3 MB; a graph-keeping version grows by tens of MB (checked as a control)."
    m, inf, (X, y), _, G = setup
    run = lambda d: LissaSolver(depth=d, scale=10., batch_size=120).solve(inf, G[:1])
    run(10)
    _, m1 = peak_memory(lambda: run(100))
    _, m2 = peak_memory(lambda: run(400))
    assert m2 < m1 + 3e6, (m1, m2)
    params = list(m.parameters())
    def leaky(d):
        h = [torch.ones_like(p) for p in params]
        for _ in range(d):
            g = torch.autograd.grad(CE(m(X), y), params, create_graph=True)
            hv = torch.autograd.grad(g, params, h, create_graph=True)
            h = [a + b - c / 10. for a, b, c in zip(h, h, hv)]
        return h
    _, l1 = peak_memory(lambda: leaky(100))
    _, l2 = peak_memory(lambda: leaky(400))
    assert l2 > l1 + 10e6, (l1, l2)                   # the measurement can see a leak


def test_spectrum_matches_dense(setup):
    _, inf, train, _, _ = setup
    ev = torch.linalg.eigvalsh(inf.hessian())
    top = top_eigenvalue(inf)
    assert abs(top - float(ev[-1])) < 1e-6 * float(ev[-1])
    assert abs(bottom_eigenvalue(inf, top=top) - float(ev[0])) < 1e-5 * float(ev[-1])
    inf0 = Influence(inf.model, CE, train, weight_decay=0., dtype=torch.float64)
    assert bottom_eigenvalue(inf0) < 0                 # the unregularised loss Hessian is indefinite here


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.floats(0.1, 10.), min_size=2, max_size=6), st.integers(0, 1000))
def test_power_iteration_diagonal(diag, seed):
    "Power iteration finds the largest |eigenvalue| of a diagonal matrix with a clear gap."
    d = torch.tensor(sorted(diag), dtype=torch.float64)
    if d[-1] < 1.2 * d[-2]: d[-1] = 1.5 * d[-2]
    lam, v = power_iteration(lambda x: d * x, len(d), iters=2000, tol=1e-13, seed=seed)
    assert abs(lam - float(d[-1])) < 1e-6 * float(d[-1])


@settings(max_examples=10, deadline=None)
@given(st.integers(3, 12), st.floats(1e-2, 1.), st.integers(0, 10_000))
def test_cg_solves_random_spd_ridge(p, lam, seed):
    "On ridge regression (H = XᵀX/n + λI, exactly known) CG matches torch.linalg.solve to 1e-8."
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(30, p, generator=g, dtype=torch.float64); y = torch.randn(30, generator=g, dtype=torch.float64)
    lin = nn.Sequential(nn.Linear(p, 1, bias=False), nn.Flatten(0)).double()
    inf = Influence(lin, lambda o, t: 0.5 * ((o - t) ** 2).mean(), (X, y), weight_decay=lam, dtype=torch.float64)
    V = torch.randn(3, p, generator=g, dtype=torch.float64)
    Xs, info = CGSolver(tol=1e-12, max_iter=10 * p).solve(inf, V)
    H = X.T @ X / 30 + lam * torch.eye(p, dtype=torch.float64)
    torch.testing.assert_close(Xs, torch.linalg.solve(H, V.T).T, rtol=1e-8, atol=1e-10)


def test_minibatches_shapes_and_full_batch(setup):
    _, inf, (X, y), _, _ = setup
    xb, yb = next(minibatches(inf, 16, torch.Generator().manual_seed(0)))
    assert xb.shape == (16, 4) and xb.dtype == torch.float64
    xb, yb = next(minibatches(inf, 10_000, torch.Generator().manual_seed(0)))
    assert torch.equal(xb, X) and torch.equal(yb, y)


def test_bad_options():
    with pytest.raises(Exception, match="depth must be"): LissaSolver(depth=0)
    with pytest.raises(Exception, match="scale must be"): LissaSolver(scale=0.)
    with pytest.raises(Exception, match="tol must be"): CGSolver(tol=-1)


def test_cg_converged_columns_stop_costing_hvps(setup):
    _, inf, _, _, G = setup
    evals, evecs = ExactSolver().eigh(inf)
    V = torch.stack([G[0], evecs[:, -1].to(G.dtype) * G[0].norm()])     # an eigenvector converges in one iteration
    X, info = CGSolver(tol=1e-10).solve(inf, V)
    torch.testing.assert_close(X, ExactSolver().solve(inf, V)[0], rtol=1e-6, atol=1e-8)
    assert info.details["hvps"] == info.iterations + 1                  # the second column cost one HVP, not all


def test_block_cg_equals_exact_with_fewer_hvps(setup):
    _, inf, _, _, G = setup
    Xe, _ = ExactSolver().solve(inf, G)
    Xb, info = BlockCGSolver(tol=1e-10).solve(inf, G)
    _, info_cg = CGSolver(tol=1e-10).solve(inf, G)
    assert float(((Xb - Xe).norm(dim=1) / Xe.norm(dim=1)).max()) < 1e-6
    assert info.residual < 1e-9 and info.details["converged"]
    assert info.details["hvps"] < G.shape[0] * info_cg.iterations        # the shared Krylov space pays off
    x1, _ = BlockCGSolver(tol=1e-10).solve(inf, G[:1])                    # one right-hand side: plain CG
    assert float((x1[0] - Xe[0]).norm() / Xe[0].norm()) < 1e-6


def test_block_cg_refuses_indefinite_and_bad_options(setup):
    m, _, train, _, G = setup
    inf0 = Influence(m, CE, train, weight_decay=0., dtype=torch.float64)
    with pytest.raises(HessianNotPositiveDefinite, match="damping >"):
        BlockCGSolver().solve(inf0, G)
    for bad in (dict(tol=0), dict(max_iter=0), dict(max_iter=2.5)):
        with pytest.raises(ValueError):
            BlockCGSolver(**bad)


@settings(max_examples=10, deadline=None)
@given(p=st.integers(2, 12), k=st.integers(1, 8), lam=st.floats(0.01, 1.0), seed=st.integers(0, 1000))
def test_block_cg_solves_random_ridge(p, k, lam, seed):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(30, p, generator=g, dtype=torch.float64); y = torch.randn(30, generator=g, dtype=torch.float64)
    m = nn.Linear(p, 1, bias=False).double()
    loss = lambda o, t: 0.5 * ((o.squeeze(-1) - t) ** 2).mean()
    inf = Influence(m, loss, (X, y), weight_decay=lam)
    V = torch.randn(k, p, generator=g, dtype=torch.float64)
    Xb, info = BlockCGSolver(tol=1e-10).solve(inf, V)
    A = X.T @ X / 30 + lam * torch.eye(p, dtype=torch.float64)
    torch.testing.assert_close(Xb, torch.linalg.solve(A, V.T).T, rtol=1e-7, atol=1e-9)
