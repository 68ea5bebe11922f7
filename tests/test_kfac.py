"""K-FAC and EK-FAC (notebook 03d_kfac): what holds exactly, the streamed factors, layers without a Kronecker rule,
and the solver interface. Every reference is the dense Gauss-Newton matrix of a small float64 model."""
import math

import pytest
import torch
from torch import nn
from torch.func import jacrev, vmap

import influence_nb.kfac  # noqa: F401  (registers the solvers 'kfac' and 'ekfac')
from influence_nb.core import HessianNotPositiveDefinite, InfluenceError
from influence_nb.kfac import (EKFACSolver, KFACSolver, KronConvRule, KronLinearRule, eigen_factors, fit_eigenvalues,
                               fit_factors, kron_plan, kron_rule, kron_solve, output_factor)
from influence_nb.models import make_model
from influence_nb.scoring import ConvRule, Influence
from influence_nb.solvers import make_solver, relative_residual

from conftest import fit, half_mse, mlp, random_classification, ridge_data, ridge_hessian

F64 = torch.float64
ce = nn.CrossEntropyLoss()


# ---------------------------------------------------------------------------------------------------------- helpers
def dense_ggn(eng):
    "(1/n) Σ_j J_jᵀ H_j J_j over the training set, from per-example Jacobians (no weight decay)."
    G, n = torch.zeros(eng.num_params, eng.num_params, dtype=eng.dtype), 0
    outputs = lambda th, xj: eng.forward(th, xj[None])[0].flatten()
    for x, y in eng.batches(eng.train):
        J = vmap(jacrev(outputs), in_dims=(None, 0))(eng.theta, x)
        M = torch.einsum("bor,bop->brp", output_factor(eng, eng.forward(eng.theta, x), y), J).flatten(0, 1)
        G += M.T @ M; n += len(x)
    return G / n


def wb_index(eng, w_name, b_name=None):
    "Flat positions of [W b] flattened row by row (W as (d_out, -1)); of a lone parameter when b_name is None."
    start = dict(zip(eng.flat.names, [sum(eng.flat.sizes[:i]) for i in range(len(eng.flat.sizes))]))
    size = dict(zip(eng.flat.names, eng.flat.sizes))
    first = w_name or b_name
    d_out = eng.flat.shapes[eng.flat.names.index(first)][0] if eng.flat.shapes[eng.flat.names.index(first)] else 1
    cols = [start[w_name] + torch.arange(size[w_name]).view(d_out, -1)] if w_name else []
    if b_name: cols.append(start[b_name] + torch.arange(d_out).view(d_out, 1))
    return torch.cat(cols, 1).flatten()


def block_index(eng, b):
    "Flat positions of a block's parameters, in its own [W b] order."
    if b.kind == "kronecker": return wb_index(eng, b.params.get("weight"), b.params.get("bias"))
    return torch.cat([wb_index(eng, n) for n in b.params.values()])


def dense_approx(eng, blocks, fac, lam):
    "The block-diagonal K-FAC (lam None) or EK-FAC approximation as a dense (p, p) matrix."
    Gt = torch.zeros(eng.num_params, eng.num_params, dtype=F64)
    for k, (b, f) in enumerate(zip(blocks, fac)):
        i = block_index(eng, b)
        if b.kind == "kronecker":
            Q = torch.kron(f["QS"], f["QA"])
            ev = (lam[k] if lam is not None else f["lS"][:, None] * f["lA"][None, :]).flatten()
            Gt[i[:, None], i[None, :]] = Q @ torch.diag(ev) @ Q.T
        else:
            Gt[i, i] = torch.cat([d.flatten() for d in f["D"].values()])
    return Gt


def fitted(inf, solver=None):
    "(blocks, factors, Λ) of an EK-FAC solver on the Influence's curvature."
    s = solver or EKFACSolver()
    blocks, fac, _ = s.factors(inf.curvature)
    lam, _ = s.eigenvalues(inf.curvature)
    return blocks, fac, lam


def check_exact_diagonals(inf, G=None):
    "Λ = diag(Qᵀ G_block Q) on every Kronecker block, D = diag(G) on every diagonal block; EK-FAC no worse than K-FAC."
    G = dense_ggn(inf) if G is None else G
    blocks, fac, lam = fitted(inf)
    for k, (b, f) in enumerate(zip(blocks, fac)):
        i = block_index(inf, b)
        Gb = G[i][:, i]
        scale = float(Gb.abs().max()) + 1e-30
        if b.kind == "kronecker":
            Q = torch.kron(f["QS"], f["QA"])
            assert torch.allclose(lam[k].flatten(), torch.diagonal(Q.T @ Gb @ Q), atol=1e-11 * scale, rtol=0)
            err_k = (Q @ torch.diag((f["lS"][:, None] * f["lA"]).flatten()) @ Q.T - Gb).norm()
            err_e = (Q @ torch.diag(lam[k].flatten()) @ Q.T - Gb).norm()
            assert err_e <= err_k * (1 + 1e-9)
        else:
            D = torch.cat([d.flatten() for d in f["D"].values()])
            assert torch.allclose(D, torch.diagonal(Gb), atol=1e-11 * scale, rtol=0)
    return blocks


class Scaled(nn.Module):
    "Conv2d, BatchNorm2d (a layer rule), Linear, and a free per-class scale (no rule): every kind of block."
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.Tanh(), nn.Flatten(),
                                  nn.Linear(48, 3))
        self.scale = nn.Parameter(torch.ones(3))
    def forward(self, x): return self.body(x) * self.scale


def scaled_model(seed=0):
    torch.manual_seed(seed)
    m = Scaled().double()
    X, y = torch.randn(18, 1, 4, 4, dtype=F64), torch.randint(0, 3, (18,))
    m.train(); m(X); m.eval()                          # running statistics from the data
    return m, X, y


class Tokens(nn.Module):
    "An embedding (no layer rule), a BatchNorm1d (no layer rule) and a Linear applied twice (shared weights)."
    def __init__(self):
        super().__init__()
        self.emb, self.bn, self.lin, self.out = nn.Embedding(7, 4), nn.BatchNorm1d(4), nn.Linear(4, 4), nn.Linear(8, 3)
    def forward(self, x):
        e = self.bn(self.emb(x).mean(1))
        return self.out(torch.cat([self.lin(e), torch.tanh(self.lin(e.flip(-1)))], -1))


class TokenData(torch.utils.data.Dataset):
    def __init__(self, n=24, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.x, self.y = torch.randint(0, 7, (n, 3), generator=g), torch.randint(0, 3, (n,), generator=g)
    def __len__(self): return len(self.y)
    def __getitem__(self, i): return self.x[i], self.y[i]


# ------------------------------------------------------------------------------------------------- exact cases
@pytest.mark.parametrize("bias", [False, True])
def test_kfac_solves_least_squares_exactly(bias):
    "½(wᵀx + b - y)²: H_j = 1, so g is the same for every example and S ⊗ A is the Hessian: K-FAC is exact."
    X, y = ridge_data(40, 3)
    for solver in ("kfac", "ekfac"):
        inf = Influence(nn.Linear(3, 1, bias=bias).double(), half_mse, (X, y), weight_decay=0.1, solver=solver)
        V = torch.randn(4, inf.num_params, dtype=F64)
        Xs, info = inf.solve(V)
        Xa = torch.cat([X, torch.ones(40, 1, dtype=F64)], 1) if bias else X
        want = torch.linalg.solve(ridge_hessian(Xa, 0.1), V.T).T
        assert torch.allclose(Xs, want, atol=1e-12, rtol=0)
        assert info.residual < 1e-12


def test_kfac_is_exact_on_one_example():
    "One example: every Linear layer's block is (Σ_c g_c g_cᵀ) ⊗ ā āᵀ exactly, so K-FAC is the block-diagonal GGN."
    X, y = random_classification(1, 4, 3, dtype=F64)
    inf = Influence(mlp(4, 5, 3), ce, (X, y), damping=0.1)
    G = dense_ggn(inf)
    blocks, fac, _ = KFACSolver().factors(inf.curvature)
    Gk = dense_approx(inf, blocks, fac, None)
    mask = Gk != 0
    assert torch.allclose(Gk, G * mask, atol=1e-13, rtol=0)
    # logistic regression (one layer): K-FAC is the whole GGN, its solve the exact damped one
    lr = Influence(nn.Linear(4, 3).double(), ce, (X, y), damping=0.1, solver="kfac")
    V = torch.randn(3, lr.num_params, dtype=F64)
    want = torch.linalg.solve(dense_ggn(lr) + 0.1 * torch.eye(lr.num_params, dtype=F64), V.T).T
    assert torch.allclose(lr.solve(V)[0], want, atol=1e-12, rtol=0)


def test_ekfac_eigenvalues_are_the_ggn_diagonal_in_the_kronecker_basis():
    "An MLP with an in-place ReLU after its first layer (the recorded output must be the layer's, not the ReLU's)."
    X, y = random_classification(30, 4, 3, dtype=F64)
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 6), nn.ReLU(inplace=True), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    blocks = check_exact_diagonals(Influence(m, ce, (X, y), batch_size=8))
    assert [b.kind for b in blocks] == ["kronecker"] * 3


@pytest.mark.parametrize("conv", [
    nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.Conv2d(2, 3, (3, 2), dilation=2, padding="same"),
    nn.Conv1d(2, 4, 3, stride=2), nn.Conv1d(2, 4, 3, padding="same", bias=False)])
def test_conv_patches_give_the_layer_gradients(conv):
    "Patches times output gradients, summed over positions, are the per-example kernel gradients of ConvRule."
    conv = conv.double()
    a = torch.randn(3, 2, 7, 6, dtype=F64) if isinstance(conv, nn.Conv2d) else torch.randn(3, 2, 9, dtype=F64)
    g = torch.randn_like(conv(a))
    rule = kron_rule(conv)
    assert isinstance(rule, KronConvRule)
    ai, go = rule.factors(conv, a, g)
    assert ai.shape[:2] == go.shape[:2]
    got = rule.from_matrix(conv, torch.einsum("bto,bti->boi", go, ai))
    assert torch.allclose(got, ConvRule().grads(conv, a, g)["weight"], atol=1e-12, rtol=0)


def test_conv_nets_and_uncovered_layers_have_exact_diagonals():
    "Conv2d + BatchNorm2d (diagonal from its layer rule) + a free parameter (diagonal by torch.func) + Linear."
    m, X, y = scaled_model()
    blocks = check_exact_diagonals(Influence(m, ce, (X, y), batch_size=7))
    assert [(b.kind, b.name, type(b.rule).__name__) for b in blocks] == [
        ("diagonal", "", "NoneType"), ("kronecker", "body.0", "KronConvRule"),
        ("diagonal", "body.1", "BatchNormRule"), ("kronecker", "body.4", "KronLinearRule")]


def test_embeddings_batchnorm1d_and_shared_layers():
    "No layer rule (Embedding, BatchNorm1d): diagonal by torch.func; a Linear called twice: both calls as positions."
    torch.manual_seed(0)
    m = Tokens().double()
    data = TokenData()
    m.train(); m(data.x); m.eval()
    inf = Influence(m, ce, data, batch_size=10)
    blocks = check_exact_diagonals(inf)
    kinds = {b.name or ",".join(b.params): b.kind for b in blocks}
    assert kinds == {"emb.weight,bn.weight,bn.bias": "diagonal", "lin": "kronecker", "out": "kronecker"}
    _, fac, _ = fitted(inf)
    assert fac[[b.name for b in blocks].index("lin")]["T"] == 2           # two calls, one position each


def test_small_cnn_ekfac_eigenvalues():
    "Koh & Liang's small CNN (six convolutions, a global average): Λ exact on every layer."
    torch.manual_seed(0)
    m = make_model("small-cnn", (1, 28, 28), 10).double().eval()
    X, y = torch.rand(12, 1, 28, 28, dtype=F64), torch.randint(0, 10, (12,))
    blocks = check_exact_diagonals(Influence(m, ce, (X, y), batch_size=5))
    assert [b.kind for b in blocks] == ["kronecker"] * 6


# --------------------------------------------------------------------------------------------- streamed factors
def test_factors_do_not_depend_on_the_batch_size():
    m, X, y = scaled_model()
    one, small = (fitted(Influence(m, ce, (X, y), batch_size=bs)) for bs in (18, 4))
    for f, g in zip(one[1], small[1]):
        for key in ("A", "S"):
            if key in f: assert torch.allclose(f[key], g[key], atol=1e-13, rtol=0)
        for p in f.get("D", {}): assert torch.allclose(f["D"][p], g["D"][p], atol=1e-13, rtol=0)
    for k in one[2]: assert torch.allclose(one[2][k], small[2][k], atol=1e-13, rtol=0)


def test_solve_is_the_dense_block_diagonal_solve():
    "The flat layout: blocks with weight and bias, weight only, a diagonal block between them; K-FAC and EK-FAC."
    m, X, y = scaled_model()
    for params in (None, ["body.0", "body.1.weight", "body.4.weight"]):
        inf = Influence(m, ce, (X, y), weight_decay=1e-2, damping=0.05, params=params)
        blocks, fac, lam = fitted(inf)
        V = torch.randn(3, inf.num_params, dtype=F64)
        for corrected in (False, True):
            Gt = dense_approx(inf, blocks, fac, lam if corrected else None)
            want = torch.linalg.solve(Gt + 0.06 * torch.eye(inf.num_params, dtype=F64), V.T).T
            got = kron_solve(inf, blocks, fac, lam if corrected else None, V, 0.06)
            assert torch.allclose(got, want, atol=1e-10, rtol=0)
            inf.solver = EKFACSolver() if corrected else KFACSolver()
            assert torch.allclose(inf.solve(V)[0], want, atol=1e-10, rtol=0)


def test_without_kronecker_rules_every_block_is_the_exact_diagonal():
    X, y = random_classification(20, 4, 3, dtype=F64)
    inf = Influence(mlp(4, 5, 3), ce, (X, y), damping=0.1, solver="ekfac", rules=[])
    assert {b.kind for b in kron_plan(inf, rules=[])} == {"diagonal"}
    V = torch.randn(2, inf.num_params, dtype=F64)
    assert torch.allclose(inf.solve(V)[0], V / (torch.diagonal(dense_ggn(inf)) + 0.1), atol=1e-12, rtol=0)
    only_linear = kron_plan(inf, rules=[KronLinearRule()])
    assert {b.kind for b in only_linear} == {"kronecker"}


def test_empirical_fisher_uses_the_observed_gradients():
    X, y = random_classification(20, 4, 3, dtype=F64)
    inf = Influence(mlp(4, 5, 3), ce, (X, y), damping=0.1)
    s = KFACSolver(fisher="empirical", rules=[])
    blocks, fac, _ = s.factors(inf.curvature)
    D = torch.zeros(inf.num_params, dtype=F64)
    for b, f in zip(blocks, fac): D[block_index(inf, b)] = torch.cat([d.flatten() for d in f["D"].values()])
    assert torch.allclose(D, inf.grad_matrix(inf.train).square().mean(0), atol=1e-13, rtol=0)
    L = output_factor(inf, inf.forward(inf.theta, X), y, "empirical")
    assert L.shape == (20, 3, 1)


def test_output_factor_of_cross_entropy():
    X, y = random_classification(10, 4, 3, dtype=F64)
    inf = Influence(mlp(4, 5, 3), ce, (X, y))
    out = inf.forward(inf.theta, X)
    L = output_factor(inf, out, y)
    p = out.softmax(-1)
    assert L.shape == (10, 3, 2)                  # the all-equal-logits direction has no curvature: one column fewer
    assert torch.allclose(L @ L.transpose(1, 2), torch.diag_embed(p) - p[:, :, None] * p[:, None, :], atol=1e-13)


# ------------------------------------------------------------------------------------------- the solver interface
def test_factors_are_fitted_once_and_shared_by_every_damping():
    X, y = random_classification(20, 4, 3, dtype=F64)
    model = fit(mlp(4, 5, 3), ce, X, y, 1e-2)
    inf = Influence(model, ce, (X, y), weight_decay=1e-2, damping=1e-2, solver="ekfac", residual=False)
    V = torch.randn(2, inf.num_params, dtype=F64)
    _, a = inf.solve(V)
    calls = []
    import influence_nb.kfac as kfac
    orig = kfac.pseudo_gradients
    kfac.pseudo_gradients = lambda *args, **kw: calls.append(1) or orig(*args, **kw)
    try:
        _, b = inf.with_damping(0.5).solve(V)
    finally:
        kfac.pseudo_gradients = orig
    assert calls == [] and a.details["fit_seconds"] == b.details["fit_seconds"]
    assert math.isnan(b.residual) and "not computed" in b.details["residual"]
    assert b.converged is None and b.damping == 0.5 and b.weight_decay == 1e-2


def test_info_names_the_blocks_and_the_residual_is_one_mv_pass():
    m, X, y = scaled_model()
    inf = Influence(m, ce, (X, y), damping=0.1, solver="ekfac")
    V = torch.randn(2, inf.num_params, dtype=F64)
    Xs, info = inf.solve(V)
    assert info.solver == "ekfac" and info.details["fisher"] == "ggn"
    assert info.details["kronecker"] == {"body.0": dict(A=(10, 10), S=(3, 3), positions=16),
                                         "body.4": dict(A=(49, 49), S=(3, 3), positions=1)}
    assert info.details["diagonal"] == {"scale": 3, "body.1": 6}
    assert info.residual == pytest.approx(relative_residual(inf.curvature.mv(Xs), Xs, V), rel=1e-10)


def test_scores_through_the_facade():
    "Influence(..., solver='ekfac').scores: (n_test, n) from the EK-FAC solve, as from the solved vectors directly."
    m, X, y = scaled_model()
    inf = Influence(m, ce, (X, y), damping=0.1, solver="ekfac", residual=False)
    s = inf.scores((X[:4], y[:4]))
    S, _ = inf.solve(inf.grad_matrix((X[:4], y[:4])))
    assert s.shape == (4, 18)
    assert torch.allclose(s, S @ inf.grad_matrix(inf.train).T / 18, atol=1e-12, rtol=0)


def test_refusals():
    X, y = random_classification(20, 4, 3, dtype=F64)
    with pytest.raises(HessianNotPositiveDefinite, match="damping > 0"):      # softmax: a null direction
        Influence(mlp(4, 5, 3), ce, (X, y), solver="kfac").solve(torch.randn(1, 43, dtype=F64))
    with pytest.raises(InfluenceError, match="'ggn' or 'empirical'"):
        make_solver("ekfac", fisher="true")
    with pytest.raises(InfluenceError, match="Kronecker rules"):
        make_solver("kfac", rules=[ConvRule()])
    with pytest.raises(InfluenceError, match="factor_dtype"):
        make_solver("kfac", factor_dtype=torch.int64)
    class Pair(nn.Module):
        "A model whose outputs are a pair (logits, inputs), with a loss that takes the logits from it."
        def __init__(self):
            super().__init__(); self.l = nn.Linear(4, 3)
        def forward(self, x): return self.l(x), x
    pair = Influence(Pair().double(), lambda out, t: nn.functional.cross_entropy(out[0], t, reduction="none"), (X, y),
                     damping=0.1, solver="ekfac")
    with pytest.raises(InfluenceError, match="one tensor"):
        pair.solve(torch.randn(1, 15, dtype=F64))


def test_a_registered_rule_is_used():
    "A new layer type: one Kronecker rule class (here a Linear subclass with its own rule), one register line."
    import influence_nb.kfac as kfac
    class MyLinear(nn.Linear): pass
    class MyRule(KronLinearRule): types = (MyLinear,)
    rule = kfac.register_kron_rule(MyRule())
    try:
        assert kron_rule(MyLinear(2, 2)) is rule
        X, y = random_classification(10, 4, 3, dtype=F64)
        torch.manual_seed(0)
        inf = Influence(nn.Sequential(MyLinear(4, 3)).double(), ce, (X, y))
        assert kron_plan(inf)[0].rule is rule
    finally:
        kfac.KRON_RULES.remove(rule)


def test_fit_functions_compose_as_the_solver_does():
    X, y = random_classification(16, 4, 3, dtype=F64)
    inf = Influence(mlp(4, 5, 3), ce, (X, y), damping=0.1)
    blocks = kron_plan(inf)
    fac = eigen_factors(fit_factors(inf.curvature, blocks))
    lam = fit_eigenvalues(inf.curvature, blocks, fac, chunk=7)        # tiny chunks: the same Λ
    _, fac2, lam2 = fitted(inf)
    for k in lam: assert torch.allclose(lam[k], lam2[k], atol=1e-14, rtol=0)
