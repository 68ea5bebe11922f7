"Tests of influence_nb.ggn: Gauss-Newton products against the dense GGN, PSD where H is not, CG, BatchNorm, refusals."
import pytest
import torch
from torch import nn
from torch.func import hessian, jacrev, vmap

from conftest import fit, iris, mlp, ridge_data, half_mse, ridge_hessian
from influence_nb.core import CURVATURES, Curvature, HessianNotPositiveDefinite, InfluenceError
from influence_nb.ggn import GGNRows, check_output_convexity, ggn_matrix, output_hessians
from influence_nb.ihvp import CGSolver, LissaDivergence, LissaSolver
from influence_nb.models import make_model
from influence_nb.scoring import Influence
from influence_nb.solvers import ExactSolver

torch.set_num_threads(1)
CE = nn.CrossEntropyLoss()
F64 = torch.float64


def naive_ggn(eng, x, y):
    "(1/B) Σ_j J_jᵀ H_j J_j from the full Jacobian of the batch's outputs and the loss's Hessians in them (p, p)."
    J = jacrev(lambda th: eng.forward(th, x))(eng.theta).flatten(1, -2)            # (B, m, p)
    out = eng.forward(eng.theta, x).detach()
    shape = out.shape[1:]
    Ho = vmap(hessian(lambda o, t: eng.loss(o.reshape(1, *shape), t[None])[0]))(out.flatten(1), y)
    return torch.einsum("bcp,bcd,bdq->pq", J, Ho, J) / len(x)


def rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def untrained():
    "The 4-5-3 tanh MLP at its seeded initialisation on Iris, no weight decay: its loss Hessian is indefinite."
    X, y, Xt, yt = iris()
    return Influence(mlp(4, 5, 3, seed=1), CE, (X, y)), (X, y), (Xt, yt)


def test_registered_and_built_by_influence(untrained):
    assert CURVATURES["ggn"] is GGNRows
    _, train, _ = untrained
    inf = Influence(mlp(4, 5, 3, seed=1), CE, train, curvature="ggn", hvp_chunk=7)
    assert isinstance(inf.curvature.tuner, GGNRows) and inf.curvature.tuner.chunk == 7


def test_rows_equal_the_naive_dense_ggn(untrained):
    eng, (X, y), _ = untrained
    V = torch.randn(9, eng.num_params, generator=torch.Generator().manual_seed(0), dtype=F64)
    for x, t in ((X, y), (X[:7], y[:7])):
        G = naive_ggn(eng, x, t)
        assert rel(G, G.T) < 1e-15
        for chunk in (None, 1, 4, 64):
            assert rel(GGNRows(eng, chunk)(V, x, t), V @ G) < 1e-13
        assert rel(GGNRows(eng)(V[:1], x, t), V[:1] @ G) < 1e-13                      # one row: no vmap


def test_ggn_is_the_hessian_of_a_model_linear_in_theta():
    # logistic regression at its minimum: H = G exactly (no network curvature term)
    X, y, _, _ = iris()
    lr = fit(nn.Linear(4, 3).double(), CE, X, y, 1e-3)
    H = Influence(lr, CE, (X, y), weight_decay=1e-3).hessian()
    G = Influence(lr, CE, (X, y), weight_decay=1e-3, curvature="ggn").hessian()
    assert rel(G, H) < 1e-12
    # ridge (linear model, squared error): G + λI = XᵀX/n + λI in closed form
    Xr, yr = ridge_data()
    G = Influence(nn.Linear(3, 1, bias=False).double(), half_mse, (Xr, yr), weight_decay=0.1, curvature="ggn").hessian()
    assert rel(G, ridge_hessian(Xr, 0.1)) < 1e-13


def test_psd_where_the_hessian_is_indefinite(untrained):
    eng, (X, y), _ = untrained
    H = eng.hessian()
    G = Curvature(eng, eng.train, rows=GGNRows(eng)).hessian()
    ev_H, ev_G = torch.linalg.eigvalsh(H), torch.linalg.eigvalsh(G)
    assert float(ev_H[0]) < -1e-3                           # the premise: H indefinite, no weight decay
    assert float(ev_G[0]) >= -1e-12 * float(ev_G[-1])
    # H = G + Σ_j g_jᵀ ∇²f_j / n: the dropped term, from frozen output gradients g_j
    out = eng.forward(eng.theta, X).detach()
    g = torch.func.vmap(torch.func.grad(lambda o, t: eng.loss(o[None], t[None])[0]))(out, y)
    R = hessian(lambda th: (g * eng.forward(th, X)).sum() / len(X))(eng.theta)
    assert rel(G + R, H) < 1e-12


def test_cg_on_the_ggn_equals_the_exact_solve(untrained):
    eng, _, test = untrained
    V = eng.grad_matrix(test)[:4]
    with pytest.raises(HessianNotPositiveDefinite, match="damping >"):
        CGSolver(tol=1e-10).solve(Curvature(eng, eng.train, 0., 1e-4), V)
    op = Curvature(eng, eng.train, 0., 1e-4, rows=GGNRows(eng))
    Xc, info = CGSolver(tol=1e-10).solve(op, V)
    Xe, info_e = ExactSolver().solve(op, V)
    assert info.converged and info.residual < 1e-9 and info_e.details["min_eigenvalue"] > 0
    assert float(((Xc - Xe).norm(dim=1) / Xe.norm(dim=1)).max()) < 1e-6
    # the same through Influence(curvature='ggn'), reported in the SolveInfo
    inf = Influence(eng.model, CE, eng.train, damping=1e-4, curvature="ggn", solver="cg", tol=1e-10)
    Xi, info_i = inf.solve(V)
    assert info_i.details["curvature"] == "ggn" and rel(Xi, Xe) < 1e-6


def test_lissa_on_the_ggn_where_the_hessian_needs_more_damping(untrained):
    eng, _, test = untrained
    lam_min = float(torch.linalg.eigvalsh(eng.hessian())[0])
    delta = -lam_min / 2                                    # H + δI stays indefinite
    V = eng.grad_matrix(test)[:2]
    op = Curvature(eng, eng.train, 0., delta, rows=GGNRows(eng))
    Xe, _ = ExactSolver().solve(op, V)
    Xl, info = LissaSolver(depth=150, batch_size=120, on_fail="raise").solve(op, V)   # the whole set: no noise
    assert rel(Xl, Xe) < 1e-3 and info.residual < 1e-3
    with pytest.raises(LissaDivergence, match="not positive definite"):        # the Hessian, same damping
        LissaSolver(depth=150, batch_size=120).solve(Curvature(eng, eng.train, 0., delta), V)


def test_ggn_matrix_is_the_operators_dense_matrix(untrained):
    eng, _, _ = untrained
    op = Curvature(eng, eng.train, 0.01, rows=GGNRows(eng, chunk=16))
    G = ggn_matrix(op)
    by_rows = Curvature(eng, eng.train, 0.01, rows=GGNRows(eng)).hessian()      # products against the identity
    assert rel(G, by_rows) < 1e-13 and torch.equal(G, G.T)
    assert op.hessian() is G and op.with_damping(0.5).hessian() is G             # kept: the exact solver reuses it
    with pytest.raises(InfluenceError, match="needs a Gauss-Newton curvature"):
        ggn_matrix(eng)


def test_small_cnn_float64_against_dense():
    cnn = make_model("small-cnn", (1, 28, 28), 10).double().eval()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(6, 1, 28, 28, generator=g, dtype=F64), torch.randint(0, 10, (6,), generator=g)
    eng = Influence(cnn, CE, (x, y))
    V = torch.randn(3, eng.num_params, generator=g, dtype=F64)
    assert rel(GGNRows(eng)(V, x, y), V @ naive_ggn(eng, x, y)) < 1e-12


def _bn_mlp():
    m = mlp(4, 6, 3, seed=2, mid=(nn.BatchNorm1d(6),))
    with torch.no_grad():
        bn = m[1]
        bn.running_mean.uniform_(-0.5, 0.5); bn.running_var.uniform_(0.3, 3.); bn.weight.uniform_(0.5, 1.5)
    return m


def test_batchnorm_in_eval_mode():
    X, y, _, _ = iris()
    m = _bn_mlp().eval()
    eng = Influence(m, CE, (X, y))
    V = torch.randn(4, eng.num_params, generator=torch.Generator().manual_seed(0), dtype=F64)
    assert rel(GGNRows(eng)(V, X[:10], y[:10]), V @ naive_ggn(eng, X[:10], y[:10])) < 1e-13
    # a model left in training mode: the operator takes its products in eval mode (running statistics) and restores it
    m.train()
    out = Curvature(eng, eng.train, rows=GGNRows(eng)).hvp(V)
    assert m.training and m[1].training
    m.eval()
    assert rel(out, V @ naive_ggn(eng, X, y)) < 1e-13


def test_resnet_batchnorm_under_vmap():
    net = make_model("resnet18", (3, 32, 32), 10, width=0.25).eval()
    with torch.no_grad():
        for mod in net.modules():
            if isinstance(mod, nn.BatchNorm2d): mod.running_mean.uniform_(-0.2, 0.2); mod.running_var.uniform_(0.5, 2.)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 10, (4,), generator=g)
    eng = Influence(net, CE, (x, y))
    V = torch.randn(3, eng.num_params, generator=g)
    rows = GGNRows(eng)
    GV = rows(V, x, y)
    M = V @ GV.T                                          # v_aᵀ G v_b
    assert float((M - M.T).abs().max()) < 1e-4 * float(M.abs().max())
    assert bool((M.diagonal() > 0).all())
    assert torch.equal(rows(V, x, y), GV)                 # deterministic
    assert rel(rows(V[1:2], x, y)[0], GV[1]) < 1e-5       # one row alone (no vmap) gives the same row


def test_deterministic(untrained):
    eng, (X, y), _ = untrained
    V = torch.randn(5, eng.num_params, generator=torch.Generator().manual_seed(3), dtype=F64)
    a = Curvature(eng, eng.train, rows=GGNRows(eng, chunk=2)).hvp(V)
    b = Curvature(eng, eng.train, rows=GGNRows(eng, chunk=2)).hvp(V)
    assert torch.equal(a, b)


def test_mse_with_several_outputs():
    X, _, _, _ = iris()
    Y = torch.randn(len(X), 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    net = mlp(4, 5, 2, seed=0)
    eng = Influence(net, nn.MSELoss(), (X, Y))
    Ho = output_hessians(eng, X[:3], Y[:3])
    assert torch.allclose(Ho, torch.eye(2, dtype=F64).expand(3, 2, 2))        # mean over 2 outputs of (o - t)²: I
    V = torch.randn(3, eng.num_params, generator=torch.Generator().manual_seed(1), dtype=F64)
    assert rel(GGNRows(eng)(V, X, Y), V @ naive_ggn(eng, X, Y)) < 1e-13


def cauchy(o, t):
    "Robust regression loss log(1 + r²) per example: concave in the residual where |r| > 1."
    return torch.log1p((o - t) ** 2).mean(1)


def test_a_loss_not_convex_in_the_outputs_is_refused():
    X, _, _, _ = iris()
    Y = 3 * torch.randn(len(X), 1, generator=torch.Generator().manual_seed(0), dtype=F64)
    eng = Influence(nn.Linear(4, 1).double(), cauchy, (X, Y))
    with pytest.raises(InfluenceError, match="not convex in the model's outputs") as e:
        check_output_convexity(eng, X, Y)
    assert "curvature='hessian'" in str(e.value) and "MSE" in str(e.value)
    with pytest.raises(InfluenceError, match="not convex"):                # on the first product
        GGNRows(eng)(torch.ones(1, eng.num_params, dtype=F64), X, Y)
    inf = Influence(nn.Linear(4, 1).double(), cauchy, (X, Y), damping=0.1, curvature="ggn", solver="cg")
    with pytest.raises(InfluenceError, match="not convex"):                # through the API
        inf.solve(torch.ones(inf.num_params, dtype=F64))
    GGNRows(eng, check=False)(torch.ones(1, eng.num_params, dtype=F64), X, Y)      # asked for: no check
    # many outputs per example: random probes of H_j instead of its eigenvalues
    Y3 = 3 * torch.randn(len(X), 3, generator=torch.Generator().manual_seed(1), dtype=F64)
    eng3 = Influence(nn.Linear(4, 3).double(), cauchy, (X, Y3))
    with pytest.raises(InfluenceError, match="not convex"):
        check_output_convexity(eng3, X, Y3, max_outputs=1)
    lo, hi = check_output_convexity(Influence(mlp(4, 5, 3), CE, (X, Y3[:, 0].abs().long() % 3)), X,
                                    Y3[:, 0].abs().long() % 3, max_outputs=1)
    assert lo >= -1e-15 and hi > 0


def test_a_loss_linear_in_the_outputs_is_refused():
    X, y, _, _ = iris()
    net = nn.Sequential(*mlp(4, 5, 3), nn.LogSoftmax(1))
    eng = Influence(net, nn.NLLLoss(), (X, y))
    with pytest.raises(InfluenceError, match="linear in the outputs") as e:
        GGNRows(eng)(torch.ones(1, eng.num_params, dtype=F64), X, y)
    assert "CrossEntropyLoss" in str(e.value)


def test_bad_chunk_and_non_tensor_outputs():
    X, y, _, _ = iris()
    eng = Influence(mlp(4, 5, 3), CE, (X, y))
    for bad in (0, -1, 2.5, True):
        with pytest.raises(InfluenceError, match="hvp_chunk"):
            GGNRows(eng, bad)

    class Pair(nn.Module):
        def __init__(self):
            super().__init__(); self.lin = nn.Linear(4, 3).double()
        def forward(self, x): return {"logits": self.lin(x)}
    pair_loss = lambda o, t: nn.functional.cross_entropy(o["logits"], t, reduction="none")
    eng = Influence(Pair(), pair_loss, (X, y))
    with pytest.raises(InfluenceError, match="returns one tensor"):
        GGNRows(eng)(torch.ones(1, eng.num_params, dtype=F64), X, y)
    with pytest.raises(InfluenceError, match="returns one tensor"):
        GGNRows(eng, check=False)(torch.ones(1, eng.num_params, dtype=F64), X, y)


def test_a_saturated_loss_is_not_mistaken_for_a_linear_one():
    # every example fitted to round-off: H_j = 0 and slope 0, so G = 0 there, rightly; no refusal
    y = torch.arange(20) % 3
    X = 3 * torch.eye(3, dtype=F64)[y]
    lin = nn.Linear(3, 3).double()
    with torch.no_grad(): lin.weight.copy_(1e4 * torch.eye(3)); lin.bias.zero_()
    eng = Influence(lin, CE, (X, y))
    assert check_output_convexity(eng, X, y) == (0., 0.)
    assert not GGNRows(eng)(torch.ones(2, eng.num_params, dtype=F64), X, y).any()


def test_dense_batch_matrix(untrained):
    eng, (X, y), _ = untrained
    rows = GGNRows(eng, chunk=5)
    G = rows.dense(X[:11], y[:11])
    assert rel(G, naive_ggn(eng, X[:11], y[:11])) < 1e-14 and rows.output_spectrum is not None
