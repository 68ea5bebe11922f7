"""Tests of influence_nb.krylov: the Arnoldi basis, Arnoldi influence and deflated block CG, under the solver contract
of test_ihvp.py (equal to the exact solve on positive-definite problems, k right-hand sides = k single solves,
indefinite curvature handled as documented, SolveInfo filled)."""
import math
import warnings

import pytest
import torch
from torch import nn

from conftest import exact_reference, iris, iris_mlp, ridge_data, half_mse, ridge_hessian
from influence_nb.core import (Curvature, HessianNotPositiveDefinite, InfluenceError, NonFiniteError,
                               NotConvergedError, NotConvergedWarning)
from influence_nb.solvers import SOLVERS, ExactSolver, IndefiniteHessianWarning, make_solver
from influence_nb.scoring import Influence
from influence_nb.ihvp import BlockCGSolver
import influence_nb.krylov  # noqa: F401  (registers 'arnoldi' and 'deflated_cg')
from influence_nb.krylov import (ArnoldiSolver, DeflatedBlockCGSolver, KrylovBasis, arnoldi, arnoldi_embeddings,
                                 krylov_basis)

torch.set_num_threads(1)
CE = nn.CrossEntropyLoss()
WD, DAMP = 1e-3, 0.1
NAMES = ["arnoldi", "deflated_cg"]
GOOD = {"arnoldi": {}, "deflated_cg": dict(tol=1e-10)}          # defaults: at p = 43 Arnoldi keeps every eigenpair
TINY = {"arnoldi": dict(rank=1, max_iter=1), "deflated_cg": dict(rank=2, max_iter=1)}


def _exact_reference(m, X, y, V, wd=WD, damping=DAMP):
    return exact_reference(m, X, y, V, wd, damping)


@pytest.fixture(scope="module")
def setup():
    X, y, Xt, yt = iris()
    m = iris_mlp(lam=WD)
    inf = Influence(m, CE, (X, y), weight_decay=WD, damping=DAMP, dtype=torch.float64)
    V = inf.grad_matrix((Xt, yt))[:4]
    return m, inf, (X, y), (Xt, yt), V, _exact_reference(m, X, y, V)


def _quiet(fn):
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        out = fn()
    return out, [x for x in w if issubclass(x.category, NotConvergedWarning)]


def _fresh(setup, **kw):
    "A new Influence (its own curvature operator, so nothing is cached from another test)."
    m, _, train, *_ = setup
    opts = dict(weight_decay=WD, damping=DAMP, dtype=torch.float64) | kw
    return Influence(m, CE, train, **opts)


# ------------------------------------------------------------------------------------------------ the solver contract
def test_registered(setup):
    assert SOLVERS["arnoldi"] is ArnoldiSolver and SOLVERS["deflated_cg"] is DeflatedBlockCGSolver
    assert isinstance(make_solver("arnoldi", rank=3), ArnoldiSolver)
    m, _, train, test, _, _ = setup
    exact = Influence(m, CE, train, weight_decay=WD, damping=DAMP, dtype=torch.float64).scores(test)
    for name, opts in (("deflated_cg", dict(tol=1e-10, rank=5)), ("arnoldi", {})):   # through Influence's solver=
        s, info = Influence(m, CE, train, weight_decay=WD, damping=DAMP, dtype=torch.float64, solver=name,
                            **opts).scores(test, return_info=True)
        assert info.solver == name
        torch.testing.assert_close(s, exact, rtol=1e-7, atol=1e-9 * float(exact.abs().max()))


@pytest.mark.parametrize("name", NAMES)
def test_solver_contract(setup, name):
    _, inf, _, _, V, Xref = setup
    opts = GOOD[name]
    (X, info), w = _quiet(lambda: make_solver(name, **opts).solve(inf.curvature, V))
    rel = float(((X - Xref).norm(dim=1) / Xref.norm(dim=1)).max())
    assert rel < 1e-8, (name, rel)                                                     # (a) the float64 solve
    assert w == []
    singles = torch.cat([make_solver(name, **opts).solve(inf.curvature, V[i:i + 1])[0] for i in range(len(V))])
    torch.testing.assert_close(X, singles, rtol=1e-8, atol=1e-8 * float(X.abs().max()))  # (b) k at once = k single
    assert info.solver == name and math.isfinite(info.residual) and info.residual < 1e-8   # (c) SolveInfo filled
    assert info.damping == DAMP and info.weight_decay == WD
    assert info.converged is True and isinstance(info.iterations, int) and info.iterations >= 1
    assert isinstance(info.details["hvps"], int)
    (_, info), w = _quiet(lambda: make_solver(name, **TINY[name]).solve(_fresh(setup).curvature, V))  # (d) tiny budget
    assert info.converged is False and len(w) == 1 and "not converged" in str(w[0].message)
    with pytest.raises(NotConvergedError, match="not converged"):
        make_solver(name, **TINY[name], on_fail="raise").solve(_fresh(setup).curvature, V)
    (_, info), w = _quiet(lambda: make_solver(name, **TINY[name], on_fail="ignore").solve(_fresh(setup).curvature, V))
    assert w == [] and info.converged is False


@pytest.mark.parametrize("name", NAMES)
def test_solver_option_misuse(name):
    for bad in (dict(tol=0), dict(tol=-1e-3), dict(tol=float("nan")), dict(on_fail="loud"), dict(foo=1),
                dict(rank=0), dict(rank=2.5), dict(seed=0.5)):
        with pytest.raises(InfluenceError, match=next(iter(bad))):
            make_solver(name, **bad)
    with pytest.raises(InfluenceError, match="the options of solver="):
        SOLVERS[name](foo=1)
    for v in (0, 2.5, True):
        with pytest.raises(InfluenceError, match="max_iter must be an int >= 1"):
            make_solver(name, max_iter=v)
    size = "max_iter" if name == "arnoldi" else "krylov_size"
    with pytest.raises(InfluenceError, match="at least rank=5"):
        make_solver(name, rank=5, **{size: 4})


@pytest.mark.parametrize("name", NAMES)
def test_indefinite_is_refused_undamped(setup, name):
    "Without weight decay the trained MLP's H is indefinite: refused like the exact solver (and CG) refuse it."
    inf0 = _fresh(setup, weight_decay=0., damping=0.)
    lam = torch.linalg.eigvalsh(inf0.hessian())
    assert lam[0] < 0
    _, _, _, _, V, _ = setup
    with pytest.raises(HessianNotPositiveDefinite):
        ExactSolver().solve(inf0.curvature, V)
    opts = {"arnoldi": dict(rank=inf0.num_params), "deflated_cg": dict(rank=5)}[name]
    with pytest.raises(HessianNotPositiveDefinite, match="pass damping >"):
        make_solver(name, **opts).solve(inf0.curvature, V)
    lifted = inf0.curvature.with_damping(-2 * float(lam[0]))          # the damping the message asks for
    (X, info), _ = _quiet(lambda: make_solver(name, **opts, tol=1e-10).solve(lifted, V))
    torch.testing.assert_close(X, torch.linalg.solve(lifted.dense(), V.T).T, rtol=1e-6, atol=1e-8)


def test_arnoldi_kept_negative_eigenvalue_warns_when_damped(setup):
    inf0 = _fresh(setup, weight_decay=0., damping=0.)
    lam0 = float(torch.linalg.eigvalsh(inf0.hessian())[0])
    with pytest.warns(IndefiniteHessianWarning, match="indefinite"):
        ArnoldiSolver(rank=inf0.num_params).solve(inf0.curvature.with_damping(-lam0 / 2), setup[4])


@pytest.mark.parametrize("name", NAMES)
def test_non_finite_hvp_is_named(setup, name):
    "HVPs that turn NaN from the third call on: the solver names the step (Krylov step 2)."
    inf = _fresh(setup)
    calls = [0]
    def poison(f):
        def g(*a, **k):
            calls[0] += 1; out = f(*a, **k)
            return out * float("nan") if calls[0] >= 3 else out
        return g
    class Poisoned(Curvature):
        __slots__ = ()
        hvp, batch_hvp = poison(Curvature.hvp), poison(Curvature.batch_hvp)
    op = inf.curvature
    bad = Poisoned(inf, op.data, op.weight_decay, op.damping, op.tuner)
    with pytest.raises(NonFiniteError, match=rf"^{name}: .*not finite.*step 2\b"):
        make_solver(name).solve(bad, setup[4])


@pytest.mark.parametrize("name", NAMES)
def test_non_finite_training_data_refused(setup, name):
    m, _, (X, y), _, V, _ = setup
    Xp = X.clone()
    inf = Influence(m, CE, (Xp, y), weight_decay=WD, damping=DAMP, dtype=torch.float64)
    Xp[3, 0] = float("inf")
    with pytest.raises(NonFiniteError):
        make_solver(name).solve(inf.curvature, V)


# ------------------------------------------------------------------------------------------------------ the basis
def test_arnoldi_full_space_with_repeated_eigenvalues():
    "Ridge with n < d: H = XᵀX/n + λI has λ repeated d - n times; m = d still finds every eigenpair (restarts)."
    X, y = ridge_data(3, 8, seed=1)
    inf = Influence(nn.Linear(8, 1, bias=False).double(), half_mse, (X, y), weight_decay=0.5)
    kb = arnoldi(inf, 20)                                          # asks for more than p: clamped to p = 8
    assert kb.size == 8 and kb.hvps == 8 and kb.restarts >= 1
    theta, U, E = kb.pairs(8)
    H = ridge_hessian(X, 0.5)
    torch.testing.assert_close(theta.sort().values, torch.linalg.eigvalsh(H), rtol=0, atol=1e-12)
    torch.testing.assert_close(U @ U.T, torch.eye(8, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(U @ H, theta[:, None] * U + E, rtol=0, atol=1e-12)


def test_ritz_pairs_and_relation(setup):
    inf = _fresh(setup)
    H = inf.hessian()
    kb = arnoldi(inf.curvature, 20, seed=3)
    assert isinstance(kb, KrylovBasis) and kb.Q.shape == (21, inf.num_params) and kb.Hbar.shape == (21, 20)
    torch.testing.assert_close(H @ kb.Q[:-1].T, kb.Q.T @ kb.Hbar, rtol=0, atol=1e-12)       # H Q_m = Q_{m+1} Hbar
    theta, U, E = kb.pairs(5, "largest")
    torch.testing.assert_close(theta, torch.linalg.eigvalsh(H).flip(0)[:5], rtol=1e-10, atol=0)
    torch.testing.assert_close(U @ H, theta[:, None] * U + E, rtol=0, atol=1e-12)
    with pytest.raises(InfluenceError, match="which must be"):
        kb.pairs(3, "smallest")
    with pytest.raises(InfluenceError, match="Krylov size must be an int >= 1"):
        arnoldi(inf.curvature, 0)


def test_basis_is_kept_with_the_operator(setup):
    inf = _fresh(setup)
    a, built = krylov_basis(inf.curvature, 12, seed=0)
    b, again = krylov_basis(inf.curvature.with_damping(3.), 12, seed=0)     # another damping: the same H
    assert built and not again and a is b


# ------------------------------------------------------------------------------------------------ Arnoldi influence
def test_arnoldi_low_rank_residual_is_the_true_one_and_reused(setup):
    inf = _fresh(setup)
    _, _, _, _, V, _ = setup
    X, info = ArnoldiSolver(rank=5).solve(inf.curvature, V)
    true = float(((inf.curvature.mv(X) - V).norm(dim=1) / V.norm(dim=1)).max())
    assert abs(info.residual - true) < 1e-10 and 0.01 < true < 1         # the dropped share of each v, reported
    d = info.details
    assert d["rank"] == 5 and d["krylov_size"] == 30 and d["hvps"] == 30 and d["krylov_hvps"] == 30
    assert info.iterations == 30 and not d["krylov_reused"] and d["ritz_residual"] <= 1e-2
    lam = torch.linalg.eigvalsh(inf.hessian())
    top = lam[lam.abs().argsort(descending=True)[:5]]
    torch.testing.assert_close(d["eigenvalues"], top, rtol=1e-8, atol=0)
    assert d["eigenvalue_range"] == (float(d["eigenvalues"].min()), float(d["eigenvalues"].max()))
    X2, info2 = ArnoldiSolver(rank=5).solve(inf.curvature.with_damping(1.), V)    # reuse: no HVP
    assert info2.details["hvps"] == 0 and info2.details["krylov_reused"]
    lam_all, vec_all = torch.linalg.eigh(inf.hessian())
    idx = lam_all.abs().argsort(descending=True)[:5]
    P = vec_all[:, idx]                                                 # the top-5 eigenvectors (columns), from eigh
    torch.testing.assert_close(X2, (V @ P) / (lam_all[idx] + 1.) @ P.T, rtol=1e-8, atol=1e-10)


def test_arnoldi_embeddings_give_the_scores(setup):
    m, _, train, test, _, _ = setup
    inf = Influence(m, CE, train, weight_decay=WD, damping=DAMP, dtype=torch.float64, solver="arnoldi", rank=7)
    emb, w = arnoldi_embeddings(inf)
    emb_t, w_t = arnoldi_embeddings(inf, test)
    assert emb.shape == (len(train[1]), 7) and emb_t.shape == (len(test[1]), 7)
    torch.testing.assert_close(w, w_t)
    torch.testing.assert_close((emb_t * w) @ emb.T / len(train[1]), inf.scores(test), rtol=1e-9, atol=1e-12)
    full = ArnoldiSolver(rank=1000)                                  # more than p: every eigenpair, the exact scores
    inf_e = Influence(m, CE, train, weight_decay=WD, damping=DAMP, dtype=torch.float64)
    e, w = arnoldi_embeddings(inf_e, solver=full)
    et, _ = arnoldi_embeddings(inf_e, test, solver=full)
    torch.testing.assert_close((et * w) @ e.T / len(train[1]), inf_e.scores(test), rtol=1e-8, atol=1e-12)


# ------------------------------------------------------------------------------------------------ deflated block CG
def test_deflated_cg_counts_and_saves_hvps():
    "The ill-conditioned depth-2 MLP (PD, κ ~ 1e4-1e5): one right-hand side takes fewer HVPs per solve once deflated."
    X, y, Xt, yt = iris()
    inf = Influence(iris_mlp(hidden=(5, 5), lam=WD), CE, (X, y), weight_decay=WD, damping=1e-3, dtype=torch.float64)
    V = inf.grad_matrix((Xt, yt))[:1]
    Xe, _ = ExactSolver().solve(inf.curvature, V)
    _, plain = BlockCGSolver(tol=1e-10).solve(inf.curvature, V)
    Xd, first = DeflatedBlockCGSolver(tol=1e-10, rank=10).solve(inf.curvature, V)
    torch.testing.assert_close(Xd, Xe, rtol=1e-7, atol=1e-7 * float(Xe.abs().max()))
    d = first.details
    assert d["lanczos_hvps"] == min(inf.num_params, 40) and not d["lanczos_reused"]
    assert d["hvps"] == d["solve_hvps"] + d["lanczos_hvps"] and d["rank"] == 10
    _, second = DeflatedBlockCGSolver(tol=1e-10, rank=10).solve(inf.curvature, inf.grad_matrix((Xt, yt))[1:2])
    assert second.details["lanczos_reused"] and second.details["hvps"] == second.details["solve_hvps"]
    assert d["solve_hvps"] < plain.details["hvps"], (d, plain.details["hvps"])


def test_deflated_cg_float32():
    "In float32 it converges to the tolerance judged for the dtype, like block CG."
    X, y = ridge_data(60, 12, seed=2)
    X, y = X.float(), y.float()
    inf = Influence(nn.Linear(12, 1, bias=False), half_mse, (X, y), weight_decay=1e-3, damping=1e-3)
    V = torch.randn(3, 12, generator=torch.Generator().manual_seed(0))
    Xd, info = DeflatedBlockCGSolver(rank=4, tol=1e-6).solve(inf.curvature, V)
    assert info.converged and info.residual < 1e-3
    ref = torch.linalg.solve(ridge_hessian(X.double(), 1e-3) + 1e-3 * torch.eye(12, dtype=torch.float64), V.double().T).T
    torch.testing.assert_close(Xd.double(), ref, rtol=1e-3, atol=1e-3 * float(ref.abs().max()))


def test_deflated_cg_full_deflation_is_the_coarse_solve(setup):
    "r = p: the start x₀ = Zᵀ E⁻¹ Z v is already the solution; block CG has nothing left to do."
    inf = _fresh(setup)
    _, _, _, _, V, Xref = setup
    (X, info), _ = _quiet(lambda: DeflatedBlockCGSolver(rank=inf.num_params, tol=1e-8).solve(inf.curvature, V))
    torch.testing.assert_close(X, Xref, rtol=1e-8, atol=1e-10)
    assert info.details["solve_hvps"] == 0 and info.converged
