"Tests of influence_nb.ihvp: CG and LiSSA against the exact solve, divergence detection, flat memory, spectrum tools."
import inspect, math
import warnings

import pytest
import torch
from influence_nb.core import Curvature
from torch import nn
from hypothesis import given, settings, strategies as st, HealthCheck

from conftest import exact_reference, iris, iris_mlp, ridge_data, half_mse, ridge_hessian
from influence_nb.core import (HessianNotPositiveDefinite, InfluenceError, NonFiniteError, NotConvergedWarning,
                               NotConvergedError)
from influence_nb.solvers import ExactSolver, SOLVERS, make_solver
from influence_nb.scoring import Influence, influence_scores
from influence_nb.ihvp import (CGSolver, BlockCGSolver, LissaSolver, LissaDivergence, LissaOverflow, top_eigenvalue,
                               bottom_eigenvalue, power_iteration, peak_memory, minibatches)

torch.set_num_threads(1)
CE = nn.CrossEntropyLoss()
WD = 1e-3


def test_the_test_points_span_every_class():
    "Iris is sorted by class: an unshuffled 120/30 split tests on class 2 alone. The shared split is shuffled."
    _, y, _, yt = iris()
    assert set(yt.tolist()) == set(y.tolist()) == {0, 1, 2} and min(torch.bincount(yt)) >= 5


@pytest.fixture(scope="module")
def setup():
    X, y, Xt, yt = iris()
    m = iris_mlp(lam=WD)
    inf = Influence(m, CE, (X, y), weight_decay=WD, dtype=torch.float64)
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
    inf0 = Influence(nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double(), CE, train,
                     dtype=torch.float64)
    with pytest.raises(HessianNotPositiveDefinite, match="pass damping >"):
        CGSolver().solve(inf0, inf0.grad_matrix(train)[:3])
    inf = Influence(m, CE, train, weight_decay=WD, dtype=torch.float64)
    with pytest.warns(NotConvergedWarning, match="max_iter=3"):
        _, info = CGSolver(max_iter=3).solve(inf, G)
    assert info.converged is False and not info.details["converged"] and info.iterations == 3


def test_solver_names_reach_the_engine(setup):
    m, _, train, test, _ = setup
    exact = influence_scores(m, CE, train, test, weight_decay=WD, dtype=torch.float64)
    cg, info = influence_scores(m, CE, train, test, weight_decay=WD, dtype=torch.float64, solver="cg",
                                tol=1e-10, return_info=True)
    assert info.solver == "cg"
    torch.testing.assert_close(cg, exact, rtol=1e-6, atol=1e-9 * float(exact.abs().max()))
    s, info = influence_scores(m, CE, train, test, weight_decay=WD, damping=0.01, dtype=torch.float64,
                               solver="lissa", depth=50, on_fail="ignore", return_info=True)
    assert info.solver == "lissa" and info.details["depth"] == 50 and torch.isfinite(s).all()
    assert math.isfinite(info.residual)


def test_lissa_reaches_tolerance_full_batch(setup):
    "With the whole training set as the batch LiSSA is deterministic: relative error below 1e-6."
    m, _, train, _, G = setup
    inf = Influence(m, CE, train, weight_decay=WD, damping=0.1, dtype=torch.float64)
    Xe, _ = ExactSolver().solve(inf, G[:3])
    X, info = LissaSolver(depth=600, batch_size=len(train[1]), scale_probes=1).solve(inf, G[:3])
    assert float(((X - Xe).norm(dim=1) / Xe.norm(dim=1)).max()) < 1e-6 and info.residual < 1e-6


def test_lissa_reaches_tolerance_minibatch(setup):
    "Minibatches of 32, depth 1500, 3 repeats, δ=0.01: relative error below 10% of the exact damped solve."
    m, _, train, _, G = setup
    inf = Influence(m, CE, train, weight_decay=WD, damping=0.01, dtype=torch.float64)
    Xe, _ = ExactSolver().solve(inf, G[:3])
    X, info = LissaSolver(depth=1500, repeats=3, batch_size=32).solve(inf, G[:3])
    rel = float(((X - Xe).norm(dim=1) / Xe.norm(dim=1)).max())
    assert rel < 0.1, rel
    assert info.details["scale"] > info.details["top_eigenvalue"]
    assert info.converged and info.residual < info.details["tol"]          # a healthy run: no warning


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
    with pytest.raises(LissaDivergence, match="not finite") as e:
        LissaSolver(depth=5000, scale=top_eigenvalue(inf) / 10, max_growth=float("inf")).solve(inf, G[:1])
    assert isinstance(e.value, NonFiniteError) and isinstance(e.value, LissaOverflow)


def test_lissa_memory_flat_with_depth(setup):
    """Peak memory at depth 100 and 400 differ by < 3 MB; a graph-keeping version grows by tens of MB (checked as a
    control)."""
    m, inf, (X, y), _, G = setup
    run = lambda d: LissaSolver(depth=d, scale=10., batch_size=120, on_fail="ignore").solve(inf, G[:1])
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
    X, y = ridge_data(30, p, seed)
    lin = nn.Sequential(nn.Linear(p, 1, bias=False), nn.Flatten(0)).double()
    inf = Influence(lin, half_mse, (X, y), weight_decay=lam, dtype=torch.float64)
    V = torch.randn(3, p, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    Xs, info = CGSolver(tol=1e-12, max_iter=10 * p).solve(inf, V)
    torch.testing.assert_close(Xs, torch.linalg.solve(ridge_hessian(X, lam), V.T).T, rtol=1e-8, atol=1e-10)


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
    X, y = ridge_data(30, p, seed)
    inf = Influence(nn.Linear(p, 1, bias=False).double(), half_mse, (X, y), weight_decay=lam)
    V = torch.randn(k, p, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    Xb, info = BlockCGSolver(tol=1e-10).solve(inf, V)
    torch.testing.assert_close(Xb, torch.linalg.solve(ridge_hessian(X, lam), V.T).T, rtol=1e-7, atol=1e-9)


# ---------------------------------------------------------------- the solver contract (issue 15)
import influence_nb.ihvp  # noqa: E402,F401  (registers the iterative solvers in SOLVERS)

DAMP = 0.1
GOOD = {"exact": {}, "cg": dict(tol=1e-10), "block_cg": dict(tol=1e-10),
        "lissa": dict(depth=800, batch_size=120, scale_probes=1),     # whole set per step: deterministic
        "arnoldi": {}, "deflated_cg": dict(tol=1e-10), "auto": dict(tol=1e-10)}
TOL = {"lissa": 1e-6}                                                  # truncated recursion: looser
TINY = {"cg": dict(max_iter=1), "block_cg": dict(max_iter=1),
        "lissa": dict(depth=1, batch_size=120, scale_probes=1),   # depth 2 reaches residual 0.48 < tol=0.5 at δ=0.1
        "arnoldi": dict(rank=1, max_iter=1), "deflated_cg": dict(rank=2, max_iter=1)}
# K-FAC and EK-FAC solve an approximated (Kronecker-factored Gauss-Newton) system: notebook 03d and tests/test_kfac.py
# check them against the dense approximation they define; here they must still be consistent and fill their SolveInfo
APPROX = {"kfac", "ekfac"}


def _exact_reference(m, X, y, V):
    return exact_reference(m, X, y, V, WD, DAMP)


@pytest.fixture(scope="module")
def problem(setup):
    m, _, (X, y), test, _ = setup
    inf = Influence(m, CE, (X, y), weight_decay=WD, damping=DAMP, dtype=torch.float64)
    V = inf.grad_matrix(test)[:4]
    return inf, V, _exact_reference(m, X, y, V)


def _quiet(fn):
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        out = fn()
    return out, [x for x in w if issubclass(x.category, NotConvergedWarning)]


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_solver_contract(problem, name):
    inf, V, Xref = problem
    opts = GOOD.get(name, {})
    (X, info), w = _quiet(lambda: make_solver(name, **opts).solve(inf, V))
    rel = float(((X - Xref).norm(dim=1) / Xref.norm(dim=1)).max())
    if name not in APPROX: assert rel < TOL.get(name, 1e-8), (name, rel)               # (a) the float64 solve
    assert w == []
    singles = torch.cat([make_solver(name, **opts).solve(inf, V[i:i + 1])[0] for i in range(len(V))])
    tol = TOL.get(name, 1e-8)
    torch.testing.assert_close(X, singles, rtol=tol, atol=tol * float(X.abs().max()))  # (b) k at once = k single
    assert info.solver == name and math.isfinite(info.residual) and info.damping == DAMP  # (c) SolveInfo filled
    assert info.weight_decay == WD
    if name == "exact" or name in APPROX: assert info.converged in (None, True)
    elif name == "auto": assert info.details["chosen"] == "exact"                       # 43 parameters: forming H wins
    else: assert info.converged is True and isinstance(info.iterations, int) and info.iterations >= 1
    if name not in TINY: return
    (_, info), w = _quiet(lambda: make_solver(name, **TINY[name]).solve(inf, V))          # (d) a tiny budget
    assert info.converged is False and len(w) == 1 and "not converged" in str(w[0].message)
    with pytest.raises(NotConvergedError, match="not converged"):
        make_solver(name, **TINY[name], on_fail="raise").solve(inf, V)
    (_, info), w = _quiet(lambda: make_solver(name, **TINY[name], on_fail="ignore").solve(inf, V))
    assert w == [] and info.converged is False


@pytest.mark.parametrize("name", [n for n in sorted(SOLVERS) if n != "exact"])
def test_solver_option_misuse(name):
    opts = inspect.signature(SOLVERS[name].__init__).parameters
    for bad in (dict(tol=0), dict(tol=-1e-3), dict(tol=float("nan")), dict(on_fail="loud"), dict(foo=1)):
        if next(iter(bad)) not in opts and name in APPROX | {"auto"}: bad = dict(foo=1)    # options it does not have
        with pytest.raises(InfluenceError, match=next(iter(bad))):
            make_solver(name, **bad)
    with pytest.raises(InfluenceError, match="the options of solver="):
        SOLVERS[name](foo=1)                                              # the class itself, not only make_solver
    budget = "depth" if name == "lissa" else "max_iter"
    if budget not in inspect.signature(SOLVERS[name].__init__).parameters: return    # no iteration budget to check
    for v in (0, 2.5, True):
        with pytest.raises(InfluenceError, match=f"{budget} must be an int >= 1"):
            make_solver(name, **{budget: v})


def test_option_misuse_specific(setup):
    m, _, train, _, _ = setup
    for v in (0, 1, 1.5, -1e-3):
        with pytest.raises(InfluenceError, match=r"rank_tol must be a number in \(0, 1\)"): BlockCGSolver(rank_tol=v)
    with pytest.raises(InfluenceError, match="warn=False contradicts"): CGSolver(warn=False, on_fail="raise")
    with pytest.raises(InfluenceError, match="foo"):
        Influence(m, CE, train, weight_decay=WD, solver="cg", foo=1)
    assert CGSolver(warn=False).on_fail == "ignore" and CGSolver().on_fail == "warn"     # the old spelling still works
    for bad in (dict(batch_size=0), dict(repeats=1.0), dict(scale_probes=0), dict(max_growth=0), dict(seed=0.5)):
        with pytest.raises(InfluenceError, match=next(iter(bad))): LissaSolver(**bad)


def test_lissa_batch_larger_than_training_set_is_the_whole_set(problem):
    "Documented choice: batch_size >= n means the whole training set at every step (deterministic), not an error."
    inf, V, Xref = problem
    X1, _ = LissaSolver(depth=300, batch_size=120, scale=5.).solve(inf, V[:1])
    X2, _ = LissaSolver(depth=300, batch_size=10_000, scale=5., seed=3).solve(inf, V[:1])
    torch.testing.assert_close(X1, X2, rtol=0, atol=0)


def test_lissa_failures_of_issue_15_warn(setup):
    """A scale 1000x the chosen one, and damping 1e-6 on the ill-conditioned depth-2 MLP: both far off, both now
    reported."""
    m, _, train, test, _ = setup
    inf = Influence(m, CE, train, weight_decay=WD, damping=0.01, dtype=torch.float64)
    V = inf.grad_matrix(test)[:10]
    s = LissaSolver().choose_scale(inf)[0]
    Xe, _ = ExactSolver().solve(inf, V)
    (X, info), w = _quiet(lambda: LissaSolver(scale=1000 * s).solve(inf, V))
    assert float(((X - Xe).norm(dim=1) / Xe.norm(dim=1)).max()) > 0.9
    assert info.converged is False and len(w) == 1
    msg = str(w[0].message)
    assert "raise depth" in msg and f"scale={1000 * s:.4g} (as given)" in msg
    assert "repeats" in msg and "batch_size" in msg
    with pytest.raises(NotConvergedError): LissaSolver(scale=1000 * s, on_fail="raise").solve(inf, V)
    m2 = iris_mlp(hidden=(5, 5), lam=WD)
    inf2 = Influence(m2, CE, train, weight_decay=WD, damping=1e-6, dtype=torch.float64)
    V2 = inf2.grad_matrix(test)
    Xe2, _ = ExactSolver().solve(inf2, V2)
    (X2, info2), w = _quiet(lambda: LissaSolver().solve(inf2, V2))
    assert float(((X2 - Xe2).norm(dim=1) / Xe2.norm(dim=1)).max()) > 0.5
    assert info2.converged is False and len(w) == 1 and "chosen as 1.1 × (top eigenvalue" in str(w[0].message)


def _poisoned(setup, after=1):
    """An engine whose HVPs (full-data and minibatch) turn NaN from the `after`-th call on: the solvers' own checks must
    name it."""
    m, _, train, test, _ = setup
    inf = Influence(m, CE, train, weight_decay=WD, damping=DAMP, dtype=torch.float64)
    V = inf.grad_matrix(test)[:2]
    calls = [0]
    def poison(f):
        def g(*a, **k):
            calls[0] += 1; out = f(*a, **k)
            return out * float("nan") if calls[0] >= after else out
        return g
    class Poisoned(Curvature):          # the operator is immutable: a poisoned one replaces it
        __slots__ = ()
        hvp, batch_hvp = poison(Curvature.hvp), poison(Curvature.batch_hvp)
    op = inf.curvature
    inf.curvature = Poisoned(inf, op.data, op.weight_decay, op.damping, op.tuner)
    return inf, V


# K-FAC and EK-FAC take no HVPs before their residual pass; auto's errors are named by the solver it ran
@pytest.mark.parametrize("name", [n for n in sorted(SOLVERS) if n not in {"exact", "auto"} | APPROX])
def test_non_finite_hvp_is_named(setup, name):
    inf, V = _poisoned(setup, after=3)
    opts = {"lissa": dict(scale=5., depth=20)}.get(name, {})
    at = r"(iteration|step) [23]\b"
    with pytest.raises(NonFiniteError, match=rf"^{name}: .*not finite.*{at}|^{name}: .*{at}.*not finite"):
        make_solver(name, **opts).solve(inf, V)


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_non_finite_training_data_refused(setup, name):
    "An Inf input (tanh saturates, the loss stays finite) is refused by every solver, whoever catches it first."
    m, _, (X, y), test, _ = setup
    Xp = X.clone()
    inf = Influence(m, CE, (Xp, y), weight_decay=WD, damping=DAMP, dtype=torch.float64)
    V = inf.grad_matrix(test)[:2]
    Xp[3, 0] = float("inf")
    with pytest.raises(NonFiniteError):
        make_solver(name, **{"lissa": dict(depth=20)}.get(name, {})).solve(inf, V)


def test_non_finite_spectrum_tools(setup):
    inf, V = _poisoned(setup)
    with pytest.raises(NonFiniteError, match="hvp_operator"): top_eigenvalue(inf)
    inf, V = _poisoned(setup)
    with pytest.raises(NonFiniteError, match="lissa: choosing the scale"): LissaSolver(depth=5).solve(inf, V)
    with pytest.raises(NonFiniteError, match="power_iteration: .* iteration 0"):
        power_iteration(lambda v: v * float("nan"), 3)
