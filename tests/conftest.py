"""One copy of each test fixture: the Iris split, small MLPs, the L-BFGS fit to θ*, random classification data, ridge.

Plain functions, imported as `from conftest import iris, mlp, fit, iris_mlp, ...`: pytest puts this folder on
sys.path (a rootdir conftest, "prepend" import mode), a test file run as a script (`python tests/test_misuse.py`) has
its own folder as sys.path[0] (test_misuse.py inserts it too). Needs no pytest (the misuse runner imports this file
without it). What is cached (the split, each θ*) is built once per process and handed out as
copies (tensors cloned, models deep-copied), so no test can change what another one sees.
"""
from __future__ import annotations

import copy, functools, math

import torch
from torch import nn

F64 = torch.float64


try:                                  # the misuse runner imports this file without pytest
    import pytest
except ImportError:                   # pragma: no cover
    pytest = None

if pytest is not None:
    @pytest.fixture(scope="module")
    def one_thread():
        "One torch thread for a test module (tiny models; and torchrun's workers use one): restored afterwards."
        old = torch.get_num_threads(); torch.set_num_threads(1)
        yield
        torch.set_num_threads(old)

# ------------------------------------------------------------------------------------------------------------- Iris
@functools.cache
def _iris_split(n_test=30, seed=0):
    from sklearn.datasets import load_iris
    X, y = load_iris(return_X_y=True)
    X, y = torch.tensor(X, dtype=F64), torch.tensor(y, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))   # Iris is sorted by class: shuffle
    X, y = X[perm], y[perm]
    n = len(y) - n_test
    X = (X - X[:n].mean(0)) / X[:n].std(0)                                           # standardised, training statistics
    return X[:n], y[:n], X[n:], y[n:]


def iris(n_test=30, seed=0):
    """Fresh copies of Iris `(X, y, Xt, yt)`: a seeded shuffle, 120 train / 30 test by default (seed 0: test classes
    10/11/9), float64 features standardised with the training mean and std, long labels."""
    return tuple(t.clone() for t in _iris_split(n_test, seed))


def iris_train():
    "Fresh copies of the Iris training set: X (120, 4) float64, y (120,) long."
    return iris()[:2]


def iris_test():
    "Fresh copies of the Iris test set: X (30, 4) float64, y (30,) long."
    return iris()[2:]


# ------------------------------------------------------------------------------------------------ small random data
def random_classification(n=30, d=4, c=3, seed=0, dtype=torch.float32):
    "Gaussian features `(n, d)` and uniform labels in `range(c)`, from one seeded generator (labels carry no signal)."
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=dtype), torch.randint(0, c, (n,), generator=g)


# ---------------------------------------------------------------------------------------------------------- models
def mlp(*sizes, act=nn.Tanh, seed=0, dtype=F64, mid=()):
    """`Linear -> act` for each hidden width, then a `Linear` out: `mlp(4, 5, 3)` is the 4-5-3 tanh MLP. Seeded
    (`torch.manual_seed(seed)` right before the layers are made). `mid` are modules placed after the last hidden
    Linear, before its activation (e.g. a BatchNorm1d)."""
    sizes = sizes or (4, 5, 3)
    torch.manual_seed(seed)
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-2], sizes[1:-1])):
        layers += [nn.Linear(a, b), *(mid if i == len(sizes) - 3 else ()), act()]
    return nn.Sequential(*layers, nn.Linear(sizes[-2], sizes[-1])).to(dtype)


def fit(model, loss, X, y, lam, max_iter=400, rounds=3):
    """θ* by L-BFGS (strong Wolfe) on `loss(model(X), y).mean() + (λ/2)|θ|²` over the parameters with requires_grad;
    `loss` may return per-example losses or their mean. Returns the model, in eval mode."""
    ps = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.LBFGS(ps, lr=1, max_iter=max_iter, history_size=50, tolerance_grad=1e-12, tolerance_change=1e-15,
                            line_search_fn="strong_wolfe")
    def closure():
        opt.zero_grad()
        obj = loss(model(X), y).mean() + lam / 2 * sum((p ** 2).sum() for p in ps)
        obj.backward(); return obj
    for _ in range(rounds): opt.step(closure)
    return model.eval()


@functools.cache
def _iris_mlp(hidden, lam, seed):
    X, y, _, _ = _iris_split()
    return fit(mlp(4, *hidden, 3, seed=seed), nn.functional.cross_entropy, X, y, lam)


def iris_mlp(hidden=(5,), lam=1e-2, seed=0):
    """A fresh copy of the float64 tanh MLP `4-hidden-3` at θ* = argmin mean CE + (λ/2)|θ|² on the Iris training set
    (fitted once per setting, cached)."""
    return copy.deepcopy(_iris_mlp(tuple(hidden), lam, seed))


# ----------------------------------------------------------------------------------------------------------- ridge
def ridge_data(n=40, d=3, seed=0, noise=0.3):
    "Float64 `X (n, d)` Gaussian and `y = X β + noise·ε` with a random β, from one seeded generator."
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=F64)
    return X, X @ torch.randn(d, generator=g, dtype=F64) + noise * torch.randn(n, generator=g, dtype=F64)


def half_mse(o, t):
    "Mean of ½(o - t)², outputs (n, 1) or (n,): the ridge loss whose Hessian is XᵀX/n."
    return 0.5 * ((o.squeeze(-1) - t) ** 2).mean()


def ridge_hessian(X, lam):
    "XᵀX/n + λI: the exact Hessian of mean ½(xᵀθ - y)² + (λ/2)|θ|²."
    return X.T @ X / len(X) + lam * torch.eye(X.shape[1], dtype=X.dtype)


def ridge_fit(X, y, lam, w=None):
    "argmin (1/n) Σ w_i ½(x_iᵀθ - y_i)² + (λ/2)|θ|² in closed form (w: per-example weights, default ones)."
    n, d = X.shape
    w = torch.ones(n, dtype=X.dtype) if w is None else w
    return torch.linalg.solve((X.T * w) @ X / n + lam * torch.eye(d, dtype=X.dtype), (X.T * w) @ y / n)


def linear_model(theta):
    "A bias-free float64 `nn.Linear(d, 1)` holding `theta` (a copy)."
    m = nn.Linear(len(theta), 1, bias=False).double()
    with torch.no_grad(): m.weight.copy_(theta[None])
    return m



def exact_reference(m, X, y, V, wd, damping, loss=None):
    """(H + δI)⁻¹ V in float64 from torch.func.hessian of the mean loss + wd/2 |θ|² and torch.linalg.solve: independent
    of the engine, the oracle the solver tests check against (loss: mean cross-entropy by default)."""
    loss = loss or nn.CrossEntropyLoss()
    names = [n for n, _ in m.named_parameters()]
    shapes = [p.shape for _, p in m.named_parameters()]
    theta = torch.cat([p.detach().flatten() for _, p in m.named_parameters()]).double()
    def objective(t):
        ps, i = {}, 0
        for n, sh in zip(names, shapes):
            k = math.prod(sh); ps[n] = t[i:i + k].view(sh); i += k
        return loss(torch.func.functional_call(m, ps, (X,)), y) + wd / 2 * (t ** 2).sum()
    H = torch.func.hessian(objective)(theta)
    return torch.linalg.solve(H + damping * torch.eye(len(theta), dtype=H.dtype), V.T).T


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (run by bench/gpu_check.sh on a GPU machine)")
