"""Misuse suite (issue 15): every misuse of the public API gets a clear error or the right number.

Each case performs one thing a new user might do and states what the CONTRACT (issue 15; notebook 00's "what loss_fn
must be", README "Score your own model") says must happen:

- `Right(expected)`: numbers that agree with an independent float64 reference (`torch.func.hessian` of the full
  objective mean per-example loss + (λ/2)|θ|² over the flat parameters, `torch.linalg.solve`; scores[t, j] =
  ∇ℓ_tᵀ(H+δI)⁻¹∇ℓ_j / n);
- `Err(type, fragments)`: that exception (influence_nb.InfluenceError or a subclass) with a message containing every
  fragment (a tuple inside the fragments means "any one of these"), fragments that tell the user the fix;
- `Warns(NotConvergedWarning, fragments)`: an iterative solver stopped short and said so with that warning class;
- `Exit(code, fragments)`: the CLI exits (argparse's SystemExit, or returns) with that code and prints the fragments.

Many cases fail while the package is being fixed: that is the measurement. Run

    python tests/test_misuse.py            # table of outcomes by category, and totals
    python tests/test_misuse.py --list     # every case with its outcome and the first line of its message
    pytest tests/test_misuse.py            # one test per case: passes when the outcome is `right` or `clear error`

Outcomes: `right`, `clear error`, `error, unclear message` (an error raised deliberately by the package, of the wrong
class or without the fragment; or an InfluenceError where numbers were expected), `raw internal error` (any other
exception, e.g. from torch internals), `silent wrong` (numbers that disagree with the reference, or numbers where an
error was expected, or a refusal that still rewrote state), `hang` (past the per-case timeout), `skipped`.
"""
from __future__ import annotations

import argparse, contextlib, copy, functools, io, math, os, shutil, signal, sys, tempfile, threading, time, traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import (BatchSampler, DataLoader, Dataset, IterableDataset, Sampler, SequentialSampler, Subset,
                              SubsetRandomSampler, TensorDataset, WeightedRandomSampler)

import influence_nb
from influence_nb import (Influence, InfluenceError, HessianNotPositiveDefinite, NonFiniteError, NotConvergedError,
                          NotConvergedWarning, influence_scores, param_changes, self_influence, upweight_influence)

F64 = torch.float64
LAM = 1e-2                     # weight decay of training and scoring
TIMEOUT = float(os.environ.get("MISUSE_TIMEOUT", 60))   # seconds per case before it counts as a hang
PKG_DIR = str(Path(influence_nb.__file__).resolve().parent)


# ======================================================================================================== fixtures
sys.path.insert(0, str(Path(__file__).resolve().parent))      # the shared fixtures, also when run as a script
from conftest import fit as _fit, iris_mlp, iris_test, iris_train, mlp as _mlp_of   # noqa: E402


def tr():
    "Fresh copies of the Iris training set (X (120, 4) float64, y (120,) long; conftest.iris: seeded shuffle)."
    return iris_train()


def te():
    "Fresh copies of the Iris test set (X (30, 4) float64, y (30,) long)."
    return iris_test()


def ce_ref(o, t):
    "Per-example cross-entropy, written out (the reference's own, not the package's)."
    return -o.log_softmax(-1).gather(-1, t[:, None].long())[:, 0]


def fit(model, per_ex, X, y, lam=LAM):
    "Train to θ* (conftest.fit: L-BFGS on mean per-example loss + (λ/2)|θ|² over the trainable parameters), eval mode."
    return _fit(model, per_ex, X, y, lam)


def _mlp(out=3, seed=0):
    "The 4-5-out tanh MLP, float64, seeded, untrained."
    return _mlp_of(4, 5, out, seed=seed)


def mlp():
    "A fresh copy of the 4-5-3 tanh MLP at θ* (float64, eval mode)."
    return iris_mlp(lam=LAM)


def reg_targets(y): return (y.to(F64) - 1.)[:, None]          # class index as a regression target, (n, 1)
def bin_targets(y): return (y == 2).to(F64)[:, None]          # class 2 against the rest, (n, 1)
def mse_ref(o, t): return ((o - t) ** 2).flatten(1).mean(1)
def bce_ref(pw):
    def f(o, t):
        ls = F.logsigmoid(o)
        return -(pw * t * ls + (1 - t) * (ls - o)).flatten(1).mean(1)      # log(1-σ(o)) = logσ(o) - o
    return f


@functools.cache
def _trained_reg():
    X, y = tr(); return fit(_mlp(1), mse_ref, X, reg_targets(y))


@functools.cache
def _trained_bin():
    X, y = tr(); return fit(_mlp(1), bce_ref(2.0), X, bin_targets(y))


@functools.cache
def _trained_bn():
    "Linear -> BatchNorm1d -> tanh -> Linear, running stats set from the training data, then trained in eval mode."
    m = _mlp_of(4, 5, 3, mid=[nn.BatchNorm1d(5, momentum=None)])
    X, y = tr()
    with torch.no_grad(): m.train()(X)
    return fit(m.eval(), ce_ref, X, y)


@functools.cache
def _trained_for(name):
    "The 4-5-3 MLP trained on another classification objective (its own θ*, where its Hessian is positive definite)."
    X, y = tr(); return fit(_mlp(), PER_EX[name], X, y)


def mlp_for(name): return copy.deepcopy(_trained_for(name))


def reg(): return copy.deepcopy(_trained_reg())
def binm(): return copy.deepcopy(_trained_bin())
def bn(): return copy.deepcopy(_trained_bn())


# ====================================================================================================== reference
_REF_CACHE: dict = {}


def reference(model, per_ex, train, test=None, *, lam=LAM, damping=0., names=None, hessian_data=None, key=None):
    """Float64 reference: {'scores', 'param_changes', 'self_influence', 'H', 'G', 'grads_test'}.

    H = torch.func.hessian of mean per-example loss + (λ/2)|θ|² (over `hessian_data` if given) at the model's parameters
    cast to float64, over the flat vector of the parameters named in `names` (default: those with requires_grad)."""
    if key is not None and key in _REF_CACHE: return _REF_CACHE[key]
    from torch.func import functional_call, hessian, jacrev
    m = copy.deepcopy(model).eval()
    named = dict(m.named_parameters())
    names = names or [k for k, p in named.items() if p.requires_grad]
    m = m.to(F64)
    state = {k: v.detach().to(F64) for k, v in m.named_parameters()}
    state.update({k: (v.detach().to(F64) if v.is_floating_point() else v.detach()) for k, v in m.named_buffers()})
    shapes = [state[k].shape for k in names]
    theta = torch.cat([state[k].reshape(-1) for k in names])
    def unflat(th):
        out, i = {}, 0
        for k, s in zip(names, shapes):
            n = math.prod(s); out[k] = th[i:i + n].reshape(s); i += n
        return out
    f64 = lambda t: t.to(F64) if t.is_floating_point() else t
    def losses(th, X, y):
        return per_ex(functional_call(m, {**state, **unflat(th)}, (f64(X),)), f64(y))
    Xtr, ytr = train
    Xh, yh = hessian_data if hessian_data is not None else train
    objective = lambda th: losses(th, Xh, yh).mean() + lam / 2 * (th @ th)
    H = hessian(objective)(theta)
    if (H - H.T).abs().max() > 1e-9 * H.abs().max():
        # through LayerNorm (torch 2.14) torch.func.hessian, and jacrev(jacrev(...)) too, come out asymmetric and wrong
        # (checked against finite differences of the gradient): there, plain autograd double backward, row by row
        with torch.enable_grad():
            th = theta.clone().requires_grad_(True)
            g = torch.autograd.grad(objective(th), th, create_graph=True)[0]
            H = torch.stack([torch.autograd.grad(g[i], th, retain_graph=True)[0] for i in range(len(th))]).detach()
        assert (H - H.T).abs().max() <= 1e-9 * H.abs().max(), "reference Hessian not symmetric"
    A = H + damping * torch.eye(len(theta), dtype=F64)
    G = jacrev(losses)(theta, Xtr, ytr)                                   # (n, p)
    n = len(Xtr)
    X_ = torch.linalg.solve(A, G.T)                                       # (p, n)
    out = dict(H=H, G=G, param_changes=X_.T / n, self_influence=(G * X_.T).sum(1) / n, theta=theta)
    if test is not None:
        Gt = jacrev(losses)(theta, *test)
        out.update(grads_test=Gt, scores=Gt @ X_ / n)
    if key is not None: _REF_CACHE[key] = out
    return out


def REF(): return reference(mlp(), ce_ref, tr(), te(), key="base")


def ref_scores(**kw):
    "Lazily computed scores of the base MLP / CE setting, with overrides."
    return lambda: reference(**{"model": mlp(), "per_ex": ce_ref, "train": tr(), "test": te(), **kw})["scores"]


def top_eig(): return float(torch.linalg.eigvalsh(REF()["H"])[-1])


# ====================================================================================================== the cases
@dataclass
class Right:
    expected: Callable            # zero-argument callable returning the reference tensor
    rtol: float = 1e-4


@dataclass
class Err:
    exc: Any                      # exception class (or tuple) the contract asks for
    fragments: tuple = ()         # each a str, or a tuple of alternatives; all must appear (case-insensitive)


@dataclass
class Warns:
    warning: type
    fragments: tuple = ()


@dataclass
class Exit:
    code: int
    fragments: tuple = ()


@dataclass
class Either:
    "The contract leaves the choice to the package: the right numbers, or this clear error."
    right: Right
    err: Err


@dataclass
class Case:
    id: str
    category: str
    fn: Callable
    expect: Any
    note: str = ""
    area: str = ""                # the part of the package that must change: core / solvers / retraining / CLI
    timeout: float | None = None
    skip: str | None = None


CASES: list[Case] = []
AREAS = {"solver options": "solvers", "retraining": "retraining", "CLI": "CLI"}


def case(cid, category, expect, note="", area=None, timeout=None, skip=None):
    def deco(fn):
        assert all(c.id != cid for c in CASES), cid
        CASES.append(Case(cid, category, fn, expect, note, area or AREAS.get(category, "core"), timeout, skip))
        return fn
    return deco


def E(*fragments, exc=InfluenceError): return Err(exc, fragments)


W_CE = torch.tensor([1.0, 2.0, 0.5], dtype=F64)        # class weights
def wce_ref(o, t): return W_CE[t] * ce_ref(o, t)
def ls_ref(eps):
    def f(o, t):
        lp = o.log_softmax(-1)
        return (1 - eps) * -lp.gather(-1, t[:, None])[:, 0] - eps * lp.mean(-1)
    return f
SMOOTH = lambda y: F.one_hot(y, 3).to(F64) * 0.85 + 0.05                  # soft targets, rows sum to 1
def kl_ref(lp, t): return (t * (t.log() - lp)).sum(-1)


PER_EX = {"wce": wce_ref, "ls": ls_ref(0.1), "mse1h": lambda o, t: mse_ref(o, F.one_hot(t, 3).to(F64))}
def ref_for(name, **kw):
    "Reference of the model trained on objective `name`, scored with that objective."
    return lambda: reference(mlp_for(name), PER_EX[name], tr(), te(), key=None if kw else name, **kw)


def X_with(idx, value, data=None):
    X, y = data or tr(); X[idx, 0] = value; return X, y


# ---------------------------------------------------------------------------------------------------------- losses
@case("loss-ce-mean", "losses", Right(lambda: REF()["scores"]), "nn.CrossEntropyLoss() (mean): the README's usage")
def _(): return influence_scores(mlp(), nn.CrossEntropyLoss(), tr(), te(), weight_decay=LAM)

@case("loss-ce-none", "losses", Right(lambda: REF()["scores"]), "reduction='none': per-example losses")
def _(): return influence_scores(mlp(), nn.CrossEntropyLoss(reduction="none"), tr(), te(), weight_decay=LAM)

@case("loss-ce-sum", "losses", E("reduction='sum'", "reduction='mean'"),
      "issue 15: 'sum' scores were exactly n apart; refuse and name the fix (mean with weight_decay=λ/n)")
def _(): return influence_scores(mlp(), nn.CrossEntropyLoss(reduction="sum"), tr(), te(), weight_decay=LAM)

@case("loss-ce-sum-batch16", "losses", E("reduction='sum'"), "'sum' with small batches: still refused")
def _():
    return influence_scores(mlp(), nn.CrossEntropyLoss(reduction="sum"), tr(), te(), weight_decay=LAM, batch_size=16)

@case("loss-ce-weight-mean", "losses", E("weight", "reduction='none'"),
      "issue 15: class-weighted mean depended on the number of test points and batch size")
def _(): return influence_scores(mlp(), nn.CrossEntropyLoss(weight=W_CE), tr(), te(), weight_decay=LAM)

@case("loss-ce-weight-mean-1test", "losses", E("weight", "reduction='none'"),
      "same, one test point (another code path)")
def _():
    X, y = te()
    return influence_scores(mlp(), nn.CrossEntropyLoss(weight=W_CE), tr(), (X[:1], y[:1]), weight_decay=LAM)

@case("loss-ce-weight-none", "losses",
      Right(lambda: ref_for("wce")()["scores"]),
      "class weight with reduction='none': objective = plain mean of weighted per-example losses")
def _():
    return influence_scores(mlp_for("wce"), nn.CrossEntropyLoss(weight=W_CE, reduction="none"), tr(), te(),
                            weight_decay=LAM)

@case("loss-ce-weight-none-1test", "losses",
      Right(lambda: ref_for("wce")()["scores"][:1]),
      "weighted per-example loss: one test point gives row 0 of the 30-point answer")
def _():
    X, y = te()
    return influence_scores(mlp_for("wce"), nn.CrossEntropyLoss(weight=W_CE, reduction="none"), tr(), (X[:1], y[:1]),
                            weight_decay=LAM)

@case("loss-ce-weight-none-batch16", "losses",
      Right(lambda: ref_for("wce")()["scores"]), "weighted per-example loss, batch_size=16")
def _():
    return influence_scores(mlp_for("wce"), nn.CrossEntropyLoss(weight=W_CE, reduction="none"), tr(), te(),
                            weight_decay=LAM, batch_size=16)

@case("loss-ce-ignore-index-in-train", "losses", E("ignore_index", "37"),
      "issue 15: a target equal to ignore_index (-100) gave a NaN score; refuse and name the example")
def _():
    X, y = tr(); y[37] = -100
    return influence_scores(mlp(), nn.CrossEntropyLoss(), (X, y), te(), weight_decay=LAM)

@case("loss-ce-ignore-index-in-test", "losses", E("ignore_index", "11"), "ignore_index target in the test set")
def _():
    X, y = te(); y[11] = -100
    return influence_scores(mlp(), nn.CrossEntropyLoss(), tr(), (X, y), weight_decay=LAM)

@case("loss-ce-ignore-index-class", "losses", E("ignore_index"), "ignore_index=1, a class that occurs in the data")
def _(): return influence_scores(mlp(), nn.CrossEntropyLoss(ignore_index=1), tr(), te(), weight_decay=LAM)

@case("loss-ce-label-smoothing", "losses",
      Right(lambda: ref_for("ls")()["scores"]), "label_smoothing=0.1 is a plain mean")
def _(): return influence_scores(mlp_for("ls"), nn.CrossEntropyLoss(label_smoothing=0.1), tr(), te(), weight_decay=LAM)

@case("loss-nll-logsoftmax", "losses", Right(lambda: REF()["scores"]), "LogSoftmax + NLLLoss() equals CrossEntropyLoss")
def _():
    m = nn.Sequential(*mlp(), nn.LogSoftmax(-1))
    return influence_scores(m, nn.NLLLoss(), tr(), te(), weight_decay=LAM)

@case("loss-nll-weight-mean", "losses", E("weight", "reduction='none'"), "NLLLoss(weight=w) mean refused like CE")
def _():
    m = nn.Sequential(*mlp(), nn.LogSoftmax(-1))
    return influence_scores(m, nn.NLLLoss(weight=W_CE), tr(), te(), weight_decay=LAM)

@case("loss-mse-onehot-mean", "losses",
      Right(lambda: ref_for("mse1h")()["scores"]),
      "MSELoss() on (n, 3) one-hot targets: per-example loss = mean over the 3 outputs")
def _():
    oh = lambda d: (d[0], F.one_hot(d[1], 3).to(F64))
    return influence_scores(mlp_for("mse1h"), nn.MSELoss(), oh(tr()), oh(te()), weight_decay=LAM)

@case("loss-mse-onehot-none", "losses",
      Right(lambda: ref_for("mse1h")()["scores"]),
      "MSELoss(reduction='none'): (B, 3) per-element losses, trailing dims averaged per example (matches 'mean')")
def _():
    oh = lambda d: (d[0], F.one_hot(d[1], 3).to(F64))
    return influence_scores(mlp_for("mse1h"), nn.MSELoss(reduction="none"), oh(tr()), oh(te()), weight_decay=LAM)

@case("loss-mse-regression", "losses",
      Right(lambda: reference(reg(), mse_ref, (tr()[0], reg_targets(tr()[1])), (te()[0], reg_targets(te()[1])),
                              key="reg")["scores"]),
      "4-5-1 regression, MSELoss() with (n, 1) targets")
def _():
    return influence_scores(reg(), nn.MSELoss(), (tr()[0], reg_targets(tr()[1])), (te()[0], reg_targets(te()[1])),
                            weight_decay=LAM)

@case("loss-mse-sum", "losses", E("reduction='sum'"), "MSELoss(reduction='sum') refused")
def _():
    return influence_scores(reg(), nn.MSELoss(reduction="sum"), (tr()[0], reg_targets(tr()[1])),
                            (te()[0], reg_targets(te()[1])), weight_decay=LAM)

@case("loss-smoothl1-mean", "losses",
      Right(lambda: reference(reg(), lambda o, t: F.smooth_l1_loss(o, t, reduction="none", beta=0.5).flatten(1).mean(1),
                              (tr()[0], reg_targets(tr()[1])), (te()[0], reg_targets(te()[1])), damping=1e-3)["scores"]),
      "SmoothL1Loss(beta=0.5) mean: a plain mean (damping 1e-3: the regression θ* is not its minimum)")
def _():
    return influence_scores(reg(), nn.SmoothL1Loss(beta=0.5), (tr()[0], reg_targets(tr()[1])),
                            (te()[0], reg_targets(te()[1])), weight_decay=LAM, damping=1e-3)

@case("loss-bce-pos-weight", "losses",
      Right(lambda: reference(binm(), bce_ref(2.0), (tr()[0], bin_targets(tr()[1])), (te()[0], bin_targets(te()[1])),
                              key="bin")["scores"]),
      "BCEWithLogitsLoss(pos_weight=2) mean: a plain mean over examples")
def _():
    return influence_scores(binm(), nn.BCEWithLogitsLoss(pos_weight=torch.tensor([2.0], dtype=F64)),
                            (tr()[0], bin_targets(tr()[1])), (te()[0], bin_targets(te()[1])), weight_decay=LAM)

@case("loss-bce-none", "losses",
      Right(lambda: reference(binm(), bce_ref(2.0), (tr()[0], bin_targets(tr()[1])), (te()[0], bin_targets(te()[1])),
                              key="bin")["scores"]),
      "BCEWithLogitsLoss(pos_weight=2, reduction='none')")
def _():
    return influence_scores(binm(), nn.BCEWithLogitsLoss(pos_weight=torch.tensor([2.0], dtype=F64), reduction="none"),
                            (tr()[0], bin_targets(tr()[1])), (te()[0], bin_targets(te()[1])), weight_decay=LAM)

@case("loss-kldiv-batchmean", "losses",
      Right(lambda: reference(nn.Sequential(*mlp(), nn.LogSoftmax(-1)), kl_ref, (tr()[0], SMOOTH(tr()[1])),
                              (te()[0], SMOOTH(te()[1])), damping=1e-3)["scores"]),
      "KLDivLoss('batchmean') on soft targets: per-example sums (damping 1e-3: θ* is the CE minimum, not KL's)")
def _():
    m = nn.Sequential(*mlp(), nn.LogSoftmax(-1))
    return influence_scores(m, nn.KLDivLoss(reduction="batchmean"), (tr()[0], SMOOTH(tr()[1])),
                            (te()[0], SMOOTH(te()[1])), weight_decay=LAM, damping=1e-3)

@case("loss-kldiv-sum", "losses", E("reduction='sum'"), "KLDivLoss(reduction='sum') refused")
def _():
    m = nn.Sequential(*mlp(), nn.LogSoftmax(-1))
    return influence_scores(m, nn.KLDivLoss(reduction="sum"), (tr()[0], SMOOTH(tr()[1])), (te()[0], SMOOTH(te()[1])),
                            weight_decay=LAM)

@case("loss-callable-per-example", "losses", Right(lambda: REF()["scores"]), "a function returning (B,) losses")
def _():
    return influence_scores(mlp(), lambda o, t: F.cross_entropy(o, t, reduction="none"), tr(), te(), weight_decay=LAM)

@case("loss-callable-mean", "losses", Right(lambda: REF()["scores"]), "a function returning the plain mean (checked)")
def _(): return influence_scores(mlp(), lambda o, t: F.cross_entropy(o, t), tr(), te(), weight_decay=LAM)

@case("loss-callable-sum", "losses", E("sum"), "a summing function refused")
def _():
    return influence_scores(mlp(), lambda o, t: F.cross_entropy(o, t, reduction="sum"), tr(), te(), weight_decay=LAM)

@case("loss-callable-weighted-mean", "losses", E("reduction='none'"),
      "a weighted-mean scalar: ask for per-example losses")
def _(): return influence_scores(mlp(), lambda o, t: F.cross_entropy(o, t, weight=W_CE), tr(), te(), weight_decay=LAM)

@case("loss-callable-ignore-mean", "losses", E("reduction='none'"),
      "an ignore-index mean scalar: ask for per-example losses")
def _():
    return influence_scores(mlp(), lambda o, t: F.cross_entropy(o, t, ignore_index=0), tr(), te(), weight_decay=LAM)

@case("loss-callable-per-element", "losses", Right(lambda: ref_for("mse1h")()["scores"]),
      "a function returning per-element (B, 3) losses (the outputs' shape) on one-hot targets: averaged per example")
def _():
    oh = lambda d: (d[0], F.one_hot(d[1], 3).to(F64))
    return influence_scores(mlp_for("mse1h"), lambda o, t: (o - t) ** 2, oh(tr()), oh(te()), weight_decay=LAM)

@case("loss-callable-one-hot-inside", "losses",
      Either(Right(lambda: ref_for("mse1h")()["scores"]), E("vmap")),
      "F.one_hot inside loss_fn (data-dependent, not vmappable): the right numbers, or an error that names vmap")
def _():
    return influence_scores(mlp_for("mse1h"), lambda o, t: ((o - F.one_hot(t, 3)) ** 2).mean(1), tr(), te(),
                            weight_decay=LAM)

@case("loss-callable-python-float", "losses", E("tensor"), "returns a Python float: refuse, it must return a tensor")
def _(): return influence_scores(mlp(), lambda o, t: float(F.cross_entropy(o, t)), tr(), te(), weight_decay=LAM)

@case("loss-not-callable", "losses", E("callable"), "loss_fn='cross_entropy' (a string)")
def _(): return influence_scores(mlp(), "cross_entropy", tr(), te(), weight_decay=LAM)

@case("loss-class-not-instance", "losses", E(("instance", "CrossEntropyLoss()")),
      "nn.CrossEntropyLoss (the class) passed for an instance")
def _(): return influence_scores(mlp(), nn.CrossEntropyLoss, tr(), te(), weight_decay=LAM)

@case("loss-model-returns-tuple", "losses", E("tuple"),
      "model returns (logits, hidden) with CrossEntropyLoss(): name it")
def _():
    class Two(nn.Module):
        def __init__(s): super().__init__(); s.net = mlp()
        def forward(s, x): return s.net(x), x
    return influence_scores(Two(), nn.CrossEntropyLoss(), tr(), te(), weight_decay=LAM)

@case("loss-model-returns-tuple-picked", "losses", Right(lambda: REF()["scores"]), "tuple output, loss_fn picks out[0]")
def _():
    class Two(nn.Module):
        def __init__(s): super().__init__(); s.net = mlp()
        def forward(s, x): return s.net(x), x
    return influence_scores(Two(), lambda o, t: F.cross_entropy(o[0], t, reduction="none"), tr(), te(),
                            weight_decay=LAM)

@case("loss-ce-float-targets", "losses", E("target", ("long", "dtype")),
      "class indices as float (y.double()) for CrossEntropyLoss: name the target dtype")
def _():
    X, y = tr()
    Xt, yt = te()
    return influence_scores(mlp(), nn.CrossEntropyLoss(), (X, y.double()), (Xt, yt.double()), weight_decay=LAM)


# -------------------------------------------------------------------------------------------------------- loaders
def dl(data, **kw): return DataLoader(TensorDataset(*data), **kw)

@case("data-test-shuffle", "loaders/samplers", E("shuffle"), "issue 15: a shuffled test loader gave permuted rows")
def _():
    return influence_scores(mlp(), nn.CrossEntropyLoss(), tr(), dl(te(), batch_size=8, shuffle=True), weight_decay=LAM)

@case("data-train-shuffle", "loaders/samplers", E("shuffle"), "a shuffled training loader")
def _():
    return influence_scores(mlp(), nn.CrossEntropyLoss(), dl(tr(), batch_size=32, shuffle=True), te(), weight_decay=LAM)

@case("data-test-subset-random-sampler", "loaders/samplers", E("sampler"), "SubsetRandomSampler on the test set")
def _():
    return influence_scores(mlp(), nn.CrossEntropyLoss(), tr(),
                            dl(te(), batch_size=8, sampler=SubsetRandomSampler(range(30))), weight_decay=LAM)

@case("data-train-subset-random-sampler", "loaders/samplers", E("sampler"), "SubsetRandomSampler of 96 training points")
def _():
    return influence_scores(mlp(), nn.CrossEntropyLoss(),
                            dl(tr(), batch_size=32, sampler=SubsetRandomSampler(range(96))), te(), weight_decay=LAM)

@case("data-train-weighted-sampler", "loaders/samplers", E("sampler"), "WeightedRandomSampler on the training set")
def _():
    return influence_scores(mlp(), nn.CrossEntropyLoss(),
                            dl(tr(), batch_size=32, sampler=WeightedRandomSampler(torch.ones(120), 120)), te(), weight_decay=LAM)

class Reversed(Sampler):
    def __init__(s, n): s.n = n
    def __iter__(s): return iter(range(s.n - 1, -1, -1))
    def __len__(s): return s.n

@case("data-test-custom-sampler", "loaders/samplers", E("sampler"), "a custom (reversing) sampler on the test set")
def _():
    return influence_scores(mlp(), nn.CrossEntropyLoss(), tr(), dl(te(), batch_size=8, sampler=Reversed(30)),
                            weight_decay=LAM)

class ShuffledBatches(Sampler):
    def __init__(s, n, b): s.n, s.b = n, b
    def __iter__(s): return iter(torch.randperm(s.n, generator=torch.Generator().manual_seed(1)).split(s.b))
    def __len__(s): return math.ceil(s.n / s.b)

@case("data-train-batch-sampler", "loaders/samplers", E("batch_sampler"), "a custom batch_sampler on the training set")
def _():
    return influence_scores(mlp(), nn.CrossEntropyLoss(),
                            DataLoader(TensorDataset(*tr()), batch_sampler=ShuffledBatches(120, 32)), te(), weight_decay=LAM)

@case("data-test-batch-sampler-sequential", "loaders/samplers", Either(Right(lambda: REF()["scores"]), E("batch_sampler")),
      "a user BatchSampler over a SequentialSampler (complete, in order): the right numbers, or refused as a batch_sampler")
def _():
    return influence_scores(mlp(), nn.CrossEntropyLoss(), tr(),
                            DataLoader(TensorDataset(*te()), batch_sampler=BatchSampler(SequentialSampler(range(30)), 7, False)),
                            weight_decay=LAM)

@case("data-train-drop-last", "loaders/samplers", E("drop_last"),
      "issue 15: drop_last=True gave (30, 96) for 120 points")
def _():
    return influence_scores(mlp(), nn.CrossEntropyLoss(), dl(tr(), batch_size=32, drop_last=True), te(),
                            weight_decay=LAM)

@case("data-test-drop-last", "loaders/samplers", E("drop_last"), "drop_last=True on the test loader (30 = 16 + 14)")
def _():
    return influence_scores(mlp(), nn.CrossEntropyLoss(), tr(), dl(te(), batch_size=16, drop_last=True),
                            weight_decay=LAM)

@case("data-train-drop-last-exact", "loaders/samplers", Right(lambda: REF()["scores"]),
      "drop_last=True that drops nothing (120 = 3 x 40)")
def _():
    return influence_scores(mlp(), nn.CrossEntropyLoss(), dl(tr(), batch_size=40, drop_last=True), te(),
                            weight_decay=LAM)

@case("data-sequential-loaders", "loaders/samplers", Right(lambda: REF()["scores"]), "sequential DataLoaders, batch 7")
def _():
    return influence_scores(mlp(), nn.CrossEntropyLoss(), dl(tr(), batch_size=7), dl(te(), batch_size=7),
                            weight_decay=LAM)

@case("data-explicit-sequential-sampler", "loaders/samplers", Right(lambda: REF()["scores"]),
      "sampler=SequentialSampler, batch 50")
def _():
    d = TensorDataset(*tr())
    return influence_scores(mlp(), nn.CrossEntropyLoss(), DataLoader(d, batch_size=50, sampler=SequentialSampler(d)),
                            te(), weight_decay=LAM)

@case("data-tensordataset", "loaders/samplers", Right(lambda: REF()["scores"]), "TensorDatasets")
def _():
    return influence_scores(mlp(), nn.CrossEntropyLoss(), TensorDataset(*tr()), TensorDataset(*te()), weight_decay=LAM)

@case("data-numpy", "loaders/samplers", Right(lambda: REF()["scores"]), "(X, y) as numpy arrays")
def _():
    return influence_scores(mlp(), nn.CrossEntropyLoss(), tuple(t.numpy() for t in tr()),
                            tuple(t.numpy() for t in te()), weight_decay=LAM)

@case("data-list-pair", "loaders/samplers", Right(lambda: REF()["scores"]), "[X, y] as a list")
def _(): return influence_scores(mlp(), nn.CrossEntropyLoss(), list(tr()), list(te()), weight_decay=LAM)

@case("data-subset-ordered", "loaders/samplers",
      Right(lambda: REF()["scores"][torch.arange(29, -1, -1)]),
      "test = Subset(ds, reversed indices): an ordered map-style dataset")
def _():
    return influence_scores(mlp(), nn.CrossEntropyLoss(), tr(), Subset(TensorDataset(*te()), list(range(29, -1, -1))),
                            weight_decay=LAM)

class Stream(IterableDataset):
    def __init__(s, data, forever=False): s.data, s.forever = data, forever
    def __iter__(s):
        while True:
            yield from zip(*s.data)
            if not s.forever: return

@case("data-test-iterable", "loaders/samplers", E("map-style"), "a (finite) IterableDataset as the test set")
def _(): return influence_scores(mlp(), nn.CrossEntropyLoss(), tr(), Stream(te()), weight_decay=LAM)

@case("data-train-iterable-endless", "loaders/samplers", E("map-style"), "issue 15: an endless IterableDataset hung",
      timeout=20)
def _(): return influence_scores(mlp(), nn.CrossEntropyLoss(), Stream(tr(), forever=True), te(), weight_decay=LAM)

@case("data-xy-length-mismatch", "loaders/samplers", E("119"), "X has 120 rows, y 119")
def _(): X, y = tr(); return influence_scores(mlp(), nn.CrossEntropyLoss(), (X, y[:119]), te(), weight_decay=LAM)

@case("data-empty-train", "loaders/samplers", E("empty"), "an empty training set")
def _(): X, y = tr(); return influence_scores(mlp(), nn.CrossEntropyLoss(), (X[:0], y[:0]), te(), weight_decay=LAM)

@case("data-empty-test", "loaders/samplers", E("empty"), "an empty test set")
def _(): X, y = te(); return influence_scores(mlp(), nn.CrossEntropyLoss(), tr(), (X[:0], y[:0]), weight_decay=LAM)

class Triples(Dataset):
    def __init__(s, d): s.X, s.y = d
    def __len__(s): return len(s.X)
    def __getitem__(s, i): return s.X[i], s.y[i], i

@case("data-triples", "loaders/samplers", E(("(inputs, targets)", "pair")), "items are (x, y, index) triples")
def _(): return influence_scores(mlp(), nn.CrossEntropyLoss(), Triples(tr()), te(), weight_decay=LAM)

class Dicts(Dataset):
    def __init__(s, d): s.X, s.y = d
    def __len__(s): return len(s.X)
    def __getitem__(s, i): return {"x": s.X[i], "y": s.y[i]}

@case("data-test-dict-items", "loaders/samplers", E(("(inputs, targets)", "pair")),
      "a test Dataset whose items are dicts")
def _(): return influence_scores(mlp(), nn.CrossEntropyLoss(), tr(), Dicts(te()), weight_decay=LAM)

@case("data-list-of-pairs", "loaders/samplers", E(("Dataset", "(X, y)")),
      "a Python list of (x, y) pairs is not an accepted form: say which forms are")
def _(): return influence_scores(mlp(), nn.CrossEntropyLoss(), list(zip(*tr())), te(), weight_decay=LAM)

@case("data-three-tensors", "loaders/samplers", E("(X, y)"), "train=(X, y, w): three tensors")
def _():
    X, y = tr(); return influence_scores(mlp(), nn.CrossEntropyLoss(), (X, y, torch.ones(120)), te(), weight_decay=LAM)

@case("data-hessian-subset", "loaders/samplers",
      Right(lambda: reference(mlp(), ce_ref, tr(), te(), hessian_data=(tr()[0][:60], tr()[1][:60]))["scores"]),
      "hessian_data = the first 60 training points: H over them, gradients of all 120, scores / 120")
def _():
    X, y = tr()
    return influence_scores(mlp(), nn.CrossEntropyLoss(), (X, y), te(), weight_decay=LAM, hessian_data=(X[:60], y[:60]))

@case("data-hessian-other-features", "loaders/samplers", E("hessian_data"), "hessian_data with 3 features instead of 4")
def _():
    X, y = tr()
    return influence_scores(mlp(), nn.CrossEntropyLoss(), (X, y), te(), weight_decay=LAM, hessian_data=(X[:, :3], y))

@case("data-hessian-shuffled", "loaders/samplers", E("shuffle"),
      "hessian_data as a shuffled loader: its order matters to nothing but it is the one validation")
def _():
    return influence_scores(mlp(), nn.CrossEntropyLoss(), tr(), te(), weight_decay=LAM,
                            hessian_data=dl(tr(), batch_size=32, shuffle=True))

@case("data-numpy-mixed-dtypes", "loaders/samplers",
      Right(lambda: reference(mlp(), ce_ref, (tr()[0].float().double(), tr()[1]), te())["scores"]),
      "X as float32 numpy, y as int64 numpy: cast to the model's dtype")
def _():
    X, y = tr()
    return influence_scores(mlp(), nn.CrossEntropyLoss(), (X.float().numpy(), y.numpy()), te(), weight_decay=LAM)


# --------------------------------------------------------------------------------------------------------- shapes
@case("shape-one-test-point", "shapes", Right(lambda: REF()["scores"][:1]), "(X[:1], y[:1])")
def _(): X, y = te(); return influence_scores(mlp(), nn.CrossEntropyLoss(), tr(), (X[:1], y[:1]), weight_decay=LAM)

@case("shape-two-test-points", "shapes", Right(lambda: REF()["scores"][:2]), "(X[:2], y[:2])")
def _(): X, y = te(); return influence_scores(mlp(), nn.CrossEntropyLoss(), tr(), (X[:2], y[:2]), weight_decay=LAM)

@case("shape-three-test-points", "shapes", Right(lambda: REF()["scores"][:3]), "(X[:3], y[:3])")
def _(): X, y = te(); return influence_scores(mlp(), nn.CrossEntropyLoss(), tr(), (X[:3], y[:3]), weight_decay=LAM)

@case("shape-unbatched-test-point", "shapes", E(("[None]", "[i:i+1]", "unsqueeze")),
      "issue 15: (X[0], y[0]) raised IndexError; suggest X[None] / X[i:i+1]")
def _(): X, y = te(); return influence_scores(mlp(), nn.CrossEntropyLoss(), tr(), (X[0], y[0]), weight_decay=LAM)

@case("shape-mse-broadcast", "shapes", E("reshape", ("(30, 1)", "(120, 1)")),
      "issue 15: MSELoss with targets (n,) against outputs (n, 1) broadcasts to (n, n); was called an indefinite Hessian")
def _():
    return influence_scores(reg(), nn.MSELoss(), (tr()[0], reg_targets(tr()[1])[:, 0]),
                            (te()[0], reg_targets(te()[1])[:, 0]), weight_decay=LAM)

@case("shape-mse-broadcast-none", "shapes", E("reshape"), "same broadcast with reduction='none' (per-element (n, n))")
def _():
    return influence_scores(reg(), nn.MSELoss(reduction="none"), (tr()[0], reg_targets(tr()[1])[:, 0]),
                            (te()[0], reg_targets(te()[1])[:, 0]), weight_decay=LAM)

@case("shape-bce-target-vector", "shapes", E("target"), "BCEWithLogitsLoss with (n,) targets for (n, 1) outputs")
def _():
    return influence_scores(binm(), nn.BCEWithLogitsLoss(), (tr()[0], bin_targets(tr()[1])[:, 0]),
                            (te()[0], bin_targets(te()[1])[:, 0]), weight_decay=LAM)

@case("shape-ce-target-column", "shapes", E("target"), "y of shape (n, 1) for CrossEntropyLoss: name the target shape")
def _():
    X, y = tr()
    Xt, yt = te()
    return influence_scores(mlp(), nn.CrossEntropyLoss(), (X, y[:, None]), (Xt, yt[:, None]), weight_decay=LAM)

@case("shape-test-other-features", "shapes", E("test"), "test inputs with 3 features instead of 4")
def _(): X, y = te(); return influence_scores(mlp(), nn.CrossEntropyLoss(), tr(), (X[:, :3], y), weight_decay=LAM)

@case("shape-batch-size-zero", "shapes", E("batch_size"), "batch_size=0")
def _(): return influence_scores(mlp(), nn.CrossEntropyLoss(), tr(), te(), weight_decay=LAM, batch_size=0)

@case("shape-batch-size-negative", "shapes", E("batch_size"), "batch_size=-5")
def _(): return influence_scores(mlp(), nn.CrossEntropyLoss(), tr(), te(), weight_decay=LAM, batch_size=-5)

@case("shape-batch-size-float", "shapes", E("batch_size"), "batch_size=7.5")
def _(): return influence_scores(mlp(), nn.CrossEntropyLoss(), tr(), te(), weight_decay=LAM, batch_size=7.5)

@case("shape-batch-size-1", "shapes", Right(lambda: REF()["scores"]), "batch_size=1: every batch a single example")
def _(): return influence_scores(mlp(), nn.CrossEntropyLoss(), tr(), te(), weight_decay=LAM, batch_size=1)

@case("shape-batch-size-2", "shapes", Right(lambda: REF()["scores"]), "batch_size=2")
def _(): return influence_scores(mlp(), nn.CrossEntropyLoss(), tr(), te(), weight_decay=LAM, batch_size=2)

@case("shape-batch-size-large", "shapes", Right(lambda: REF()["scores"]), "batch_size=1000 > n")
def _(): return influence_scores(mlp(), nn.CrossEntropyLoss(), tr(), te(), weight_decay=LAM, batch_size=1000)


# --------------------------------------------------------------------------------------------------------- dtypes
def cast_model(m, dt): return m.to(dt)

@case("dtype-float32-model", "dtypes",
      Right(lambda: reference(mlp().float(), ce_ref, (tr()[0].float(), tr()[1]), (te()[0].float(), te()[1]))["scores"],
            rtol=2e-3),
      "the README's float32 model and data")
def _():
    X, y = tr()
    Xt, yt = te()
    return influence_scores(mlp().float(), nn.CrossEntropyLoss(), (X.float(), y), (Xt.float(), yt), weight_decay=LAM)

@case("dtype-float32-model-float64-data", "dtypes",
      Right(lambda: reference(mlp().float(), ce_ref, (tr()[0].float(), tr()[1]), (te()[0].float(), te()[1]))["scores"],
            rtol=2e-3),
      "float32 model, float64 data: data cast to the model's dtype")
def _(): return influence_scores(mlp().float(), nn.CrossEntropyLoss(), tr(), te(), weight_decay=LAM)

@case("dtype-float32-model-dtype64", "dtypes",
      Right(lambda: reference(mlp().float(), ce_ref, (tr()[0].float(), tr()[1]), (te()[0].float(), te()[1]))["scores"],
            rtol=1e-5),
      "float32 model and data, dtype=torch.float64")
def _():
    X, y = tr()
    Xt, yt = te()
    return influence_scores(mlp().float(), nn.CrossEntropyLoss(), (X.float(), y), (Xt.float(), yt), weight_decay=LAM,
                            dtype=torch.float64)

@case("dtype-float64-model-dtype32", "dtypes", Right(lambda: REF()["scores"], rtol=2e-3),
      "float64 model computed in dtype=torch.float32")
def _(): return influence_scores(mlp(), nn.CrossEntropyLoss(), tr(), te(), weight_decay=LAM, dtype=torch.float32)

@case("dtype-float16-model", "dtypes", E("dtype="), "a float16 model without dtype=: refuse, name dtype=")
def _(): return influence_scores(mlp().half(), nn.CrossEntropyLoss(), tr(), te(), weight_decay=LAM)

@case("dtype-bfloat16-model", "dtypes", E("dtype="), "issue 15: a bfloat16 model was called singular")
def _(): return influence_scores(mlp().bfloat16(), nn.CrossEntropyLoss(), tr(), te(), weight_decay=LAM)

@case("dtype-bfloat16-model-dtype64", "dtypes",
      Right(lambda: reference(mlp().bfloat16(), ce_ref, tr(), te())["scores"], rtol=1e-5),
      "bfloat16 model with dtype=torch.float64: the right numbers at its (rounded) parameters")
def _():
    return influence_scores(mlp().bfloat16(), nn.CrossEntropyLoss(), tr(), te(), weight_decay=LAM, dtype=torch.float64)

@case("dtype-float16-model-dtype32", "dtypes", Right(lambda: reference(mlp().half(), ce_ref, tr(), te())["scores"], rtol=2e-3),
      "float16 model with dtype=torch.float32")
def _(): return influence_scores(mlp().half(), nn.CrossEntropyLoss(), tr(), te(), weight_decay=LAM, dtype=torch.float32)

@case("dtype-integer-inputs", "dtypes", E("dtype"),
      "integer X with a float model: refuse naming the dtype (ints may be token ids, so no silent cast)")
def _():
    X, y = tr()
    Xt, yt = te()
    return influence_scores(mlp(), nn.CrossEntropyLoss(), ((X * 10).long(), y), ((Xt * 10).long(), yt),
                            weight_decay=LAM)

@case("dtype-string", "dtypes", E("dtype"), "dtype='float64' (a string)")
def _(): return influence_scores(mlp(), nn.CrossEntropyLoss(), tr(), te(), weight_decay=LAM, dtype="float64")

@case("dtype-integer-dtype", "dtypes", E("dtype"), "dtype=torch.int64")
def _(): return influence_scores(mlp(), nn.CrossEntropyLoss(), tr(), te(), weight_decay=LAM, dtype=torch.int64)


# -------------------------------------------------------------------------------------------------------- devices
NO_CUDA = None if torch.cuda.is_available() else "no CUDA device"

@case("device-cuda-model-cpu-data", "devices", Right(lambda: REF()["scores"], rtol=1e-6),
      "data on the CPU, model on cuda: moved", skip=NO_CUDA)
def _(): return influence_scores(mlp().cuda(), nn.CrossEntropyLoss(), tr(), te(), weight_decay=LAM).cpu()

@case("device-cpu-model-cuda-data", "devices", Right(lambda: REF()["scores"], rtol=1e-6),
      "data on cuda, model on the CPU: moved", skip=NO_CUDA)
def _():
    return influence_scores(mlp(), nn.CrossEntropyLoss(), tuple(t.cuda() for t in tr()), tuple(t.cuda() for t in te()),
                            weight_decay=LAM).cpu()

@case("device-noncontiguous-inputs", "devices", Right(lambda: REF()["scores"]),
      "X as a non-contiguous (transposed) view")
def _():
    X, y = tr(); return influence_scores(mlp(), nn.CrossEntropyLoss(), (X.T.contiguous().T, y), te(), weight_decay=LAM)

@case("device-inputs-require-grad", "devices", Right(lambda: REF()["scores"]),
      "X with requires_grad=True (a leaf of the user's graph)")
def _():
    X, y = tr(); return influence_scores(mlp(), nn.CrossEntropyLoss(), (X.requires_grad_(), y), te(), weight_decay=LAM)


# --------------------------------------------------------------------------------------------------------- params
def last_ref(names=("2.weight", "2.bias")): return lambda: reference(mlp(), ce_ref, tr(), te(), names=list(names),
                                                                     key=f"p{names}")["scores"]

@case("params-names", "params", Right(last_ref()), "params=['2.weight', '2.bias']")
def _():
    return influence_scores(mlp(), nn.CrossEntropyLoss(), tr(), te(), weight_decay=LAM, params=["2.weight", "2.bias"])

@case("params-submodule-name", "params", Right(last_ref()), "params='2' (a submodule's name)")
def _(): return influence_scores(mlp(), nn.CrossEntropyLoss(), tr(), te(), weight_decay=LAM, params="2")

@case("params-submodule", "params", Right(last_ref()), "issue 15: params=model[2] ('Linear' object is not iterable)")
def _(): m = mlp(); return influence_scores(m, nn.CrossEntropyLoss(), tr(), te(), weight_decay=LAM, params=m[2])

@case("params-generator", "params", Right(last_ref()), "params=model[2].parameters() (a generator)")
def _():
    m = mlp(); return influence_scores(m, nn.CrossEntropyLoss(), tr(), te(), weight_decay=LAM, params=m[2].parameters())

@case("params-tensor-list", "params", Right(last_ref(("2.weight",))), "params=[model[2].weight]")
def _():
    m = mlp(); return influence_scores(m, nn.CrossEntropyLoss(), tr(), te(), weight_decay=LAM, params=[m[2].weight])

@case("params-duplicates", "params", Right(last_ref()),
      "params=['2.weight', '2.weight', '2.bias']: duplicates counted once")
def _():
    return influence_scores(mlp(), nn.CrossEntropyLoss(), tr(), te(), weight_decay=LAM,
                            params=["2.weight", "2.weight", "2.bias"])

@case("params-layer-method-subset", "params", Right(last_ref()), "selected last layer, method='layer'")
def _(): return Influence(mlp(), nn.CrossEntropyLoss(), tr(), weight_decay=LAM, params="2").scores(te(), method="layer")

@case("params-unknown-name", "params", E("nonexistent"), "params='nonexistent'")
def _(): return influence_scores(mlp(), nn.CrossEntropyLoss(), tr(), te(), weight_decay=LAM, params="nonexistent")

@case("params-empty-list", "params", E("params"), "params=[] names nothing")
def _(): return influence_scores(mlp(), nn.CrossEntropyLoss(), tr(), te(), weight_decay=LAM, params=[])

@case("params-parameterless-module", "params", E("params"), "params=model[1] (Tanh: a submodule without parameters)")
def _(): m = mlp(); return influence_scores(m, nn.CrossEntropyLoss(), tr(), te(), weight_decay=LAM, params=m[1])

@case("params-foreign-tensor", "params", E("params"), "a tensor that is not a parameter of the model")
def _(): return influence_scores(mlp(), nn.CrossEntropyLoss(), tr(), te(), weight_decay=LAM, params=[torch.zeros(3, 5)])

@case("params-foreign-module", "params", E("params"), "a Linear that is not part of the model")
def _(): return influence_scores(mlp(), nn.CrossEntropyLoss(), tr(), te(), weight_decay=LAM, params=nn.Linear(5, 3))

@case("params-all-frozen", "params", E(("requires_grad", "frozen")), "every parameter requires_grad=False")
def _():
    m = mlp(); [p.requires_grad_(False) for p in m.parameters()]
    return influence_scores(m, nn.CrossEntropyLoss(), tr(), te(), weight_decay=LAM)

@case("params-first-layer-frozen", "params", Right(last_ref()),
      "first layer frozen: influence over the trainable last layer")
def _():
    m = mlp(); m[0].requires_grad_(False)
    return influence_scores(m, nn.CrossEntropyLoss(), tr(), te(), weight_decay=LAM)


# ----------------------------------------------------------------------------------------------------- non-finite
NF = lambda *frag: Err(NonFiniteError, frag)

@case("nonfinite-nan-train-input", "non-finite", NF("57"), "NaN in X_train[57]")
def _(): return influence_scores(mlp(), nn.CrossEntropyLoss(), X_with(57, float("nan")), te(), weight_decay=LAM)

@case("nonfinite-inf-train-input", "non-finite", NF("57"),
      "issue 15: Inf in X_train[57] saturates tanh, the loss stays finite")
def _(): return influence_scores(mlp(), nn.CrossEntropyLoss(), X_with(57, float("inf")), te(), weight_decay=LAM)

@case("nonfinite-inf-test-input", "non-finite", NF("13"), "Inf in X_test[13]")
def _(): return influence_scores(mlp(), nn.CrossEntropyLoss(), tr(), X_with(13, float("inf"), te()), weight_decay=LAM)

@case("nonfinite-inf-test-input-1pt", "non-finite", NF("0"), "Inf in the only test point (jvp path)")
def _():
    X, y = X_with(0, float("inf"), te())
    return influence_scores(mlp(), nn.CrossEntropyLoss(), tr(), (X[:1], y[:1]), weight_decay=LAM)

@case("nonfinite-nan-third-batch", "non-finite", NF(("40", "batch 2", "batch 3")),
      "issue 15: a NaN loss in the third batch (batch_size=16) ended in a raw LinAlgError")
def _():
    return influence_scores(mlp(), nn.CrossEntropyLoss(), X_with(40, float("nan")), te(), weight_decay=LAM,
                            batch_size=16)

@case("nonfinite-nan-target-mse", "non-finite", NF("21"), "NaN regression target y_train[21]")
def _():
    y = reg_targets(tr()[1]); y[21] = float("nan")
    return influence_scores(reg(), nn.MSELoss(), (tr()[0], y), (te()[0], reg_targets(te()[1])), weight_decay=LAM)

@case("nonfinite-nan-hessian-data", "non-finite", NF("hessian_data"), "NaN in hessian_data")
def _():
    return influence_scores(mlp(), nn.CrossEntropyLoss(), tr(), te(), weight_decay=LAM,
                            hessian_data=X_with(3, float("nan")))

@case("nonfinite-nan-parameter", "non-finite", NF(("0.weight", "parameter")), "a NaN in the model's first weight")
def _():
    m = mlp()
    with torch.no_grad(): m[0].weight[0, 0] = float("nan")
    return influence_scores(m, nn.CrossEntropyLoss(), tr(), te(), weight_decay=LAM)

@case("nonfinite-inf-loss-one-example", "non-finite", NF("5"),
      "finite data, a per-example loss that is inf for training example 5 only (its target marked 3)")
def _():
    X, y = tr(); y[5] = 3
    return influence_scores(mlp(), lambda o, t: F.cross_entropy(o, t.clamp(max=2), reduction="none") / (t < 3), (X, y),
                            te(), weight_decay=LAM)

@case("nonfinite-inf-train-cg", "non-finite", NF("57"), "Inf in X_train[57], solver='cg'")
def _():
    return influence_scores(mlp(), nn.CrossEntropyLoss(), X_with(57, float("inf")), te(), weight_decay=LAM, solver="cg")

@case("nonfinite-inf-train-lissa", "non-finite", NF("57"),
      "Inf in X_train[57], solver='lissa' (its minibatches must be validated too)", area="solvers")
def _():
    return influence_scores(mlp(), nn.CrossEntropyLoss(), X_with(57, float("inf")), te(), weight_decay=LAM,
                            solver="lissa", depth=20, scale=10.)

@case("nonfinite-inf-train-jvp", "non-finite", NF("57"), "Inf in X_train[57], method='jvp'")
def _():
    return Influence(mlp(), nn.CrossEntropyLoss(), X_with(57, float("inf")), weight_decay=LAM).scores(te(),
                                                                                                      method="jvp")

@case("nonfinite-inf-train-layer", "non-finite", NF("57"), "Inf in X_train[57], method='layer'")
def _():
    return Influence(mlp(), nn.CrossEntropyLoss(), X_with(57, float("inf")), weight_decay=LAM).scores(te(),
                                                                                                      method="layer")

@case("nonfinite-inf-train-hessian-subset", "non-finite", NF("57"),
      "Inf in X_train[57] outside hessian_data (the first 40): the gradient pass must still catch it")
def _():
    X, y = X_with(57, float("inf"))
    return influence_scores(mlp(), nn.CrossEntropyLoss(), (X, y), te(), weight_decay=LAM, hessian_data=(X[:40], y[:40]))

@case("nonfinite-self-influence", "non-finite", NF("57"), "self_influence with Inf in X_train[57]")
def _(): return self_influence(mlp(), nn.CrossEntropyLoss(), X_with(57, float("inf")), weight_decay=LAM)

@case("nonfinite-param-changes", "non-finite", NF("57"), "param_changes with NaN in X_train[57]")
def _(): return param_changes(mlp(), nn.CrossEntropyLoss(), X_with(57, float("nan")), weight_decay=LAM)


# ------------------------------------------------------------------------------------------------------ grad mode
@case("grad-no-grad-30", "grad mode", Right(lambda: REF()["scores"]),
      "issue 15: inside torch.no_grad(), 30 test points")
def _():
    m, train, test = mlp(), tr(), te()       # fixtures first: a lazily trained fixture must not train inside the context
    with torch.no_grad(): return influence_scores(m, nn.CrossEntropyLoss(), train, test, weight_decay=LAM)

@case("grad-no-grad-1", "grad mode", Right(lambda: REF()["scores"][:1]), "inside torch.no_grad(), 1 test point")
def _():
    X, y = te()
    m, train = mlp(), tr()
    with torch.no_grad(): return influence_scores(m, nn.CrossEntropyLoss(), train, (X[:1], y[:1]), weight_decay=LAM)

@case("grad-inference-mode-30", "grad mode", Right(lambda: REF()["scores"]),
      "issue 15: inside torch.inference_mode(), 30 test points")
def _():
    m, train, test = mlp(), tr(), te()
    with torch.inference_mode(): return influence_scores(m, nn.CrossEntropyLoss(), train, test,
                                                         weight_decay=LAM).clone()

@case("grad-inference-mode-2", "grad mode", Right(lambda: REF()["scores"][:2]),
      "inside torch.inference_mode(), 2 test points")
def _():
    X, y = te()
    m, train = mlp(), tr()
    with torch.inference_mode(): return influence_scores(m, nn.CrossEntropyLoss(), train, (X[:2], y[:2]),
                                                         weight_decay=LAM).clone()

@case("grad-inference-tensors-as-data", "grad mode", Right(lambda: REF()["scores"]),
      "data created under inference_mode, scored outside it")
def _():
    with torch.inference_mode(): train, test = tuple(t.clone() for t in tr()), tuple(t.clone() for t in te())
    return influence_scores(mlp(), nn.CrossEntropyLoss(), train, test, weight_decay=LAM)

@case("grad-set-grad-disabled-self", "grad mode", Right(lambda: REF()["self_influence"]),
      "torch.set_grad_enabled(False), self_influence")
def _():
    m, train = mlp(), tr()
    prev = torch.is_grad_enabled(); torch.set_grad_enabled(False)
    try: return self_influence(m, nn.CrossEntropyLoss(), train, weight_decay=LAM)
    finally: torch.set_grad_enabled(prev)

@case("grad-no-grad-layer", "grad mode", Right(lambda: REF()["scores"]), "inside torch.no_grad(), method='layer'")
def _():
    m, train, test = mlp(), tr(), te()
    with torch.no_grad(): return Influence(m, nn.CrossEntropyLoss(), train, weight_decay=LAM).scores(test,
                                                                                                     method="layer")

@case("grad-no-grad-jvp", "grad mode", Right(lambda: REF()["scores"]), "inside torch.no_grad(), method='jvp'")
def _():
    m, train, test = mlp(), tr(), te()
    with torch.no_grad(): return Influence(m, nn.CrossEntropyLoss(), train, weight_decay=LAM).scores(test, method="jvp")

class DropoutAlways(nn.Module):
    def __init__(s, training_flag=False):
        super().__init__(); s.net, s.flag = mlp(), training_flag
    def forward(s, x):
        h = torch.tanh(s.net[0](x))
        h = F.dropout(h, 0.5, training=s.training) if s.flag else F.dropout(h, 0.5)
        return s.net[2](h)

@case("grad-functional-dropout", "grad mode", E("training=self.training"),
      "issue 15: F.dropout(x, 0.5) in forward is random even in eval mode (raw vmap randomness error)")
def _(): return influence_scores(DropoutAlways(), nn.CrossEntropyLoss(), tr(), te(), weight_decay=LAM)

@case("grad-functional-dropout-flagged", "grad mode", Right(lambda: REF()["scores"]),
      "F.dropout(x, 0.5, training=self.training), model left in train mode: scored in eval mode")
def _(): return influence_scores(DropoutAlways(True).train(), nn.CrossEntropyLoss(), tr(), te(), weight_decay=LAM)

class Noisy(nn.Module):
    def __init__(s): super().__init__(); s.net = mlp()
    def forward(s, x): return s.net(x + 0.01 * torch.randn_like(x))

@case("grad-random-noise-forward", "grad mode", E("random"),
      "torch.randn_like in forward (input noise): refused as random")
def _(): return influence_scores(Noisy(), nn.CrossEntropyLoss(), tr(), te(), weight_decay=LAM)

@case("grad-dropout-module-train-mode", "grad mode", Right(lambda: REF()["scores"]),
      "nn.Dropout model left in train mode")
def _():
    m = mlp(); m = nn.Sequential(m[0], m[1], nn.Dropout(0.5), m[2]).train()
    return influence_scores(m, nn.CrossEntropyLoss(), tr(), te(), weight_decay=LAM)[:, :]

@case("grad-batchnorm-train-mode", "grad mode", Right(lambda: reference(bn(), ce_ref, tr(), te(), key="bn")["scores"]),
      "BatchNorm model left in train mode: scored in eval mode with its running stats")
def _(): return influence_scores(bn().train(), nn.CrossEntropyLoss(), tr(), te(), weight_decay=LAM)

@case("grad-train-mode-restored", "grad mode", Right(lambda: REF()["scores"]),
      "model in train mode comes back in train mode")
def _():
    m = mlp().train()
    s = influence_scores(m, nn.CrossEntropyLoss(), tr(), te(), weight_decay=LAM)
    if not m.training: raise AssertionError("silent: the model came back in eval mode")
    return s


# ------------------------------------------------------------------------------------------------- solver options
def untrained(): return _mlp(seed=3)

def untrained_min_eig():
    return float(torch.linalg.eigvalsh(reference(untrained(), ce_ref, tr(), te(), lam=0., key="untrained")["H"])[0])

NC = Warns(NotConvergedWarning, ("not converged",))

@case("solver-cg", "solver options", Right(lambda: REF()["scores"], rtol=1e-5), "solver='cg'")
def _(): return influence_scores(mlp(), nn.CrossEntropyLoss(), tr(), te(), weight_decay=LAM, solver="cg")

@case("solver-block-cg", "solver options", Right(lambda: REF()["scores"], rtol=1e-5), "solver='block_cg'")
def _(): return influence_scores(mlp(), nn.CrossEntropyLoss(), tr(), te(), weight_decay=LAM, solver="block_cg")

@case("solver-cg-max-iter-1", "solver options", NC, "CG max_iter=1 stops short: NotConvergedWarning")
def _(): return influence_scores(mlp(), nn.CrossEntropyLoss(), tr(), te(), weight_decay=LAM, solver="cg", max_iter=1)

@case("solver-cg-max-iter-1-raise", "solver options", Err(NotConvergedError, ("not converged",)),
      "CG max_iter=1, on_fail='raise'")
def _():
    return influence_scores(mlp(), nn.CrossEntropyLoss(), tr(), te(), weight_decay=LAM, solver="cg", max_iter=1,
                            on_fail="raise")

@case("solver-block-cg-max-iter-1", "solver options", NC, "block CG max_iter=1: NotConvergedWarning")
def _():
    return influence_scores(mlp(), nn.CrossEntropyLoss(), tr(), te(), weight_decay=LAM, solver="block_cg", max_iter=1)

@case("solver-block-cg-max-iter-1-raise", "solver options", Err(NotConvergedError, ("not converged",)),
      "block CG max_iter=1, on_fail='raise'")
def _():
    return influence_scores(mlp(), nn.CrossEntropyLoss(), tr(), te(), weight_decay=LAM, solver="block_cg", max_iter=1,
                            on_fail="raise")

@case("solver-lissa-scale-1000x", "solver options", NC,
      "issue 15: LiSSA with a scale 1000x too large was 97% wrong, silently")
def _():
    return influence_scores(mlp(), nn.CrossEntropyLoss(), tr(), te(), weight_decay=LAM, solver="lissa",
                            scale=1000 * top_eig(), depth=200, batch_size=120)

@case("solver-lissa-depth-2", "solver options", NC, "LiSSA depth=2: NotConvergedWarning")
def _():
    return influence_scores(mlp(), nn.CrossEntropyLoss(), tr(), te(), weight_decay=LAM, solver="lissa", depth=2,
                            scale=1.1 * top_eig())

@case("solver-lissa-depth-2-raise", "solver options", Err(NotConvergedError, ("not converged",)),
      "LiSSA depth=2, on_fail='raise'")
def _():
    return influence_scores(mlp(), nn.CrossEntropyLoss(), tr(), te(), weight_decay=LAM, solver="lissa", depth=2,
                            scale=1.1 * top_eig(), on_fail="raise")

@case("solver-exact-indefinite", "solver options", Err(HessianNotPositiveDefinite, ("damping=",)),
      "exact, undamped, untrained net without weight decay (indefinite H): suggest a damping")
def _(): return influence_scores(untrained(), nn.CrossEntropyLoss(), tr(), te(), weight_decay=0.)

@case("solver-exact-indefinite-damped", "solver options",
      Right(lambda: reference(untrained(), ce_ref, tr(), te(), lam=0., damping=0.1 - untrained_min_eig())["scores"]),
      "the same H with damping making H + δI positive definite: the exact answer")
def _():
    return influence_scores(untrained(), nn.CrossEntropyLoss(), tr(), te(), weight_decay=0.,
                            damping=0.1 - untrained_min_eig())

@case("solver-cg-indefinite", "solver options", Err(HessianNotPositiveDefinite, ("damping",)), "CG on an indefinite H")
def _(): return influence_scores(untrained(), nn.CrossEntropyLoss(), tr(), te(), weight_decay=0., solver="cg")

@case("solver-block-cg-indefinite", "solver options", Err(HessianNotPositiveDefinite, ("damping",)),
      "block CG on an indefinite H")
def _(): return influence_scores(untrained(), nn.CrossEntropyLoss(), tr(), te(), weight_decay=0., solver="block_cg")

class DeadParam(nn.Module):
    def __init__(s): super().__init__(); s.net, s.unused = mlp(), nn.Parameter(torch.zeros(2, dtype=F64))
    def forward(s, x): return s.net(x)

@case("solver-exact-singular", "solver options", Err(HessianNotPositiveDefinite, ("damping=",)),
      "a parameter unused by forward, no weight decay: H singular")
def _(): return influence_scores(DeadParam(), nn.CrossEntropyLoss(), tr(), te(), weight_decay=0.)

@case("solver-cg-tol-zero", "solver options", E("tol"), "cg tol=0")
def _(): return influence_scores(mlp(), nn.CrossEntropyLoss(), tr(), te(), weight_decay=LAM, solver="cg", tol=0)

@case("solver-cg-tol-negative", "solver options", E("tol"), "cg tol=-1")
def _(): return influence_scores(mlp(), nn.CrossEntropyLoss(), tr(), te(), weight_decay=LAM, solver="cg", tol=-1.)

@case("solver-cg-max-iter-zero", "solver options", E("max_iter"), "cg max_iter=0")
def _(): return influence_scores(mlp(), nn.CrossEntropyLoss(), tr(), te(), weight_decay=LAM, solver="cg", max_iter=0)

@case("solver-unknown-option", "solver options", E("foo", "max_iter"),
      "cg foo=1: name the bad option and the valid ones")
def _(): return influence_scores(mlp(), nn.CrossEntropyLoss(), tr(), te(), weight_decay=LAM, solver="cg", foo=1)

@case("solver-exact-unknown-option", "solver options", E("max_iter"), "exact with max_iter=10 (a CG option)")
def _(): return influence_scores(mlp(), nn.CrossEntropyLoss(), tr(), te(), weight_decay=LAM, max_iter=10)

@case("solver-unknown-name", "solver options", E("newton", "cg"), "solver='newton'")
def _(): return influence_scores(mlp(), nn.CrossEntropyLoss(), tr(), te(), weight_decay=LAM, solver="newton")

@case("solver-on-fail-bad", "solver options", E("loud", "raise"), "on_fail='loud'")
def _():
    return influence_scores(mlp(), nn.CrossEntropyLoss(), tr(), te(), weight_decay=LAM, solver="cg", on_fail="loud")

@case("solver-lissa-repeats-zero", "solver options", E("repeats"), "lissa repeats=0")
def _(): return influence_scores(mlp(), nn.CrossEntropyLoss(), tr(), te(), weight_decay=LAM, solver="lissa", repeats=0)

@case("solver-lissa-scale-negative", "solver options", E("scale"), "lissa scale=-1")
def _(): return influence_scores(mlp(), nn.CrossEntropyLoss(), tr(), te(), weight_decay=LAM, solver="lissa", scale=-1.)

@case("solver-instance-with-options", "solver options", E("options"), "an IHVPSolver instance plus options")
def _():
    from influence_nb.ihvp import CGSolver
    return influence_scores(mlp(), nn.CrossEntropyLoss(), tr(), te(), weight_decay=LAM, solver=CGSolver(), tol=1e-3)

@case("opt-weight-decay-negative", "solver options", E("weight_decay"), "weight_decay=-0.01", area="core")
def _(): return influence_scores(mlp(), nn.CrossEntropyLoss(), tr(), te(), weight_decay=-LAM)

@case("opt-weight-decay-nan", "solver options", E("weight_decay"), "weight_decay=nan", area="core")
def _(): return influence_scores(mlp(), nn.CrossEntropyLoss(), tr(), te(), weight_decay=float("nan"))

@case("opt-weight-decay-string", "solver options", E("weight_decay"), "weight_decay='1e-2'", area="core")
def _(): return influence_scores(mlp(), nn.CrossEntropyLoss(), tr(), te(), weight_decay="1e-2")

@case("opt-weight-decay-tensor", "solver options", Either(Right(lambda: REF()["scores"]), E("weight_decay")),
      "weight_decay=torch.tensor(0.01): used as the number, or refused naming weight_decay", area="core")
def _(): return influence_scores(mlp(), nn.CrossEntropyLoss(), tr(), te(), weight_decay=torch.tensor(LAM))

@case("opt-damping-negative", "solver options", E("damping"), "damping=-0.1", area="core")
def _(): return influence_scores(mlp(), nn.CrossEntropyLoss(), tr(), te(), weight_decay=LAM, damping=-0.1)

@case("opt-damping-inf", "solver options", E("damping"), "damping=inf", area="core")
def _(): return influence_scores(mlp(), nn.CrossEntropyLoss(), tr(), te(), weight_decay=LAM, damping=float("inf"))

@case("opt-hvp-mode-bad", "solver options", E("hvp_mode"), "hvp_mode='fast'", area="core")
def _(): return Influence(mlp(), nn.CrossEntropyLoss(), tr(), weight_decay=LAM, hvp_mode="fast").scores(te())


# ----------------------------------------------------------------------------------------------------- scores API
@case("api-influence-scores", "scores API", Right(lambda: REF()["scores"]), "influence_scores, defaults")
def _(): return influence_scores(mlp(), nn.CrossEntropyLoss(), tr(), te(), weight_decay=LAM)

@case("api-method-grad", "scores API", Right(lambda: REF()["scores"]), "Influence.scores(method='grad')")
def _(): return Influence(mlp(), nn.CrossEntropyLoss(), tr(), weight_decay=LAM).scores(te(), method="grad")

@case("api-method-jvp", "scores API", Right(lambda: REF()["scores"]), "Influence.scores(method='jvp')")
def _(): return Influence(mlp(), nn.CrossEntropyLoss(), tr(), weight_decay=LAM).scores(te(), method="jvp")

@case("api-method-layer", "scores API", Right(lambda: REF()["scores"]), "Influence.scores(method='layer')")
def _(): return Influence(mlp(), nn.CrossEntropyLoss(), tr(), weight_decay=LAM).scores(te(), method="layer")

@case("api-method-layer-weighted-none", "scores API", Right(lambda: ref_for("wce")()["scores"]),
      "method='layer' with a class-weighted per-example loss")
def _():
    return Influence(mlp_for("wce"), nn.CrossEntropyLoss(weight=W_CE, reduction="none"), tr(),
                     weight_decay=LAM).scores(te(), method="layer")

@case("api-method-jvp-mean-loss", "scores API", Right(lambda: REF()["scores"]),
      "method='jvp' with a mean callable and batch 16")
def _():
    return Influence(mlp(), lambda o, t: F.cross_entropy(o, t), tr(), weight_decay=LAM, batch_size=16).scores(te(),
                                                                                                              method="jvp")

@case("api-method-unknown", "scores API", E("method", "grad"), "method='fast'")
def _(): return Influence(mlp(), nn.CrossEntropyLoss(), tr(), weight_decay=LAM).scores(te(), method="fast")

@case("api-method-layer-batchnorm", "scores API", E("layer"),
      "method='layer' on a BatchNorm model: name the other methods")
def _(): return Influence(bn(), nn.CrossEntropyLoss(), tr(), weight_decay=LAM).scores(te(), method="layer")

@case("api-upweight", "scores API", Right(lambda: -120 * REF()["scores"]), "upweight_influence = -n x scores")
def _(): return upweight_influence(mlp(), nn.CrossEntropyLoss(), tr(), te(), weight_decay=LAM)

@case("api-param-changes", "scores API", Right(lambda: REF()["param_changes"]), "param_changes")
def _(): return param_changes(mlp(), nn.CrossEntropyLoss(), tr(), weight_decay=LAM)

@case("api-self-influence", "scores API", Right(lambda: REF()["self_influence"]), "self_influence")
def _(): return self_influence(mlp(), nn.CrossEntropyLoss(), tr(), weight_decay=LAM)

@case("api-self-influence-weighted-batch16", "scores API",
      Right(lambda: ref_for("wce")()["self_influence"]), "self_influence, weighted per-example loss, batch 16")
def _():
    return self_influence(mlp_for("wce"), nn.CrossEntropyLoss(weight=W_CE, reduction="none"), tr(), weight_decay=LAM,
                          batch_size=16)

@case("api-train-as-test", "scores API", Right(lambda: reference(mlp(), ce_ref, tr(), tr(), key="trtr")["scores"]),
      "scores(train): (120, 120)")
def _(): return influence_scores(mlp(), nn.CrossEntropyLoss(), tr(), tr(), weight_decay=LAM)

@case("api-damping", "scores API", Right(lambda: reference(mlp(), ce_ref, tr(), te(), damping=0.1)["scores"]),
      "damping=0.1")
def _(): return influence_scores(mlp(), nn.CrossEntropyLoss(), tr(), te(), weight_decay=LAM, damping=0.1)

@case("api-return-info", "scores API", Right(lambda: REF()["scores"]), "return_info=True: (scores, SolveInfo)")
def _():
    s, info = influence_scores(mlp(), nn.CrossEntropyLoss(), tr(), te(), weight_decay=LAM, return_info=True)
    return s

@case("api-scores-twice", "scores API", Right(lambda: torch.cat([REF()["scores"][:1], REF()["scores"]])),
      "one Influence, scores of 1 then of 30 test points (caches must not leak between calls)")
def _():
    inf = Influence(mlp(), nn.CrossEntropyLoss(), tr(), weight_decay=LAM); X, y = te()
    return torch.cat([inf.scores((X[:1], y[:1])), inf.scores((X, y))])

@case("api-solve-wrong-length", "scores API", E("43"), "Influence.solve with a vector of 42 entries (the model has 43)")
def _(): return Influence(mlp(), nn.CrossEntropyLoss(), tr(), weight_decay=LAM).solve(torch.ones(42, dtype=F64))

@case("api-solve", "scores API", Right(lambda: torch.linalg.solve(REF()["H"], REF()["G"][:4].T).T),
      "Influence.solve on 4 gradient rows")
def _(): return Influence(mlp(), nn.CrossEntropyLoss(), tr(), weight_decay=LAM).solve(REF()["G"][:4].clone())[0]

@case("api-model-not-module", "scores API", E("nn.Module"), "model given as a plain function")
def _(): m = mlp(); return influence_scores(lambda x: m(x), nn.CrossEntropyLoss(), tr(), te(), weight_decay=LAM)


# ------------------------------------------------------------------------------------------------- more engine cases
@case("loss-detached-outputs", "losses", E(("depend", "detach", "zero")),
      "loss_fn detaches the outputs: every gradient is zero; refuse (the loss does not depend on the parameters)")
def _():
    return influence_scores(mlp(), lambda o, t: F.cross_entropy(o.detach(), t, reduction="none"), tr(), te(),
                            weight_decay=LAM)

@case("loss-ce-target-out-of-range", "losses", E("target", "9"),
      "a class label 5 for a 3-class model at training example 9")
def _(): X, y = tr(); y[9] = 5; return influence_scores(mlp(), nn.CrossEntropyLoss(), (X, y), te(), weight_decay=LAM)

@case("loss-ce-target-negative", "losses", E("9"), "a class label -1 (not the ignore_index -100) at training example 9")
def _(): X, y = tr(); y[9] = -1; return influence_scores(mlp(), nn.CrossEntropyLoss(), (X, y), te(), weight_decay=LAM)

@case("data-loader-batch-size-none", "loaders/samplers", E("batch"),
      "DataLoader(batch_size=None) yields unbatched examples: refuse, ask for batches")
def _():
    return influence_scores(mlp(), nn.CrossEntropyLoss(), tr(), DataLoader(TensorDataset(*te()), batch_size=None),
                            weight_decay=LAM)

@case("data-loader-workers", "loaders/samplers", Right(lambda: REF()["scores"]),
      "a sequential DataLoader with num_workers=2")
def _():
    return influence_scores(mlp(), nn.CrossEntropyLoss(), tr(), dl(te(), batch_size=8, num_workers=2), weight_decay=LAM)

@case("data-test-loader-batch-1", "loaders/samplers", Right(lambda: REF()["scores"]),
      "test DataLoader with batch_size=1")
def _(): return influence_scores(mlp(), nn.CrossEntropyLoss(), tr(), dl(te(), batch_size=1), weight_decay=LAM)

@case("params-dict", "params", Right(last_ref()), "params=dict of name -> parameter (iterates as names)")
def _():
    m = mlp()
    return influence_scores(m, nn.CrossEntropyLoss(), tr(), te(), weight_decay=LAM,
                            params=dict(m[2].named_parameters(prefix="2")))

class BNBatchStats(nn.Module):
    def __init__(s):
        super().__init__()
        s.net = _mlp_of(4, 5, 3, mid=[nn.BatchNorm1d(5, track_running_stats=False)])
    def forward(s, x): return s.net(x)

@case("grad-batchnorm-batch-stats", "grad mode", E("batch"),
      "BatchNorm1d(track_running_stats=False): outputs depend on the other examples of the batch even in eval mode; refuse")
def _(): return influence_scores(BNBatchStats(), nn.CrossEntropyLoss(), tr(), te(), weight_decay=LAM, damping=0.1)

@functools.cache
def _trained_layernorm():
    X, y = tr(); return fit(_mlp_of(4, 5, 3, mid=[nn.LayerNorm(5)]), ce_ref, X, y)

@case("api-layernorm-auto", "scores API", Right(lambda: reference(_trained_layernorm(), ce_ref, tr(), te(), key="ln")["scores"]),
      "a LayerNorm model, method='auto' (not every parameter in a Linear: another method)")
def _():
    return influence_scores(copy.deepcopy(_trained_layernorm()), nn.CrossEntropyLoss(), tr(), te(), weight_decay=LAM)

class Tied(nn.Module):
    "One Linear(4, 4) applied twice, then a head: the 'layer' method must sum over both calls."
    def __init__(s):
        super().__init__(); torch.manual_seed(0)
        s.a, s.head = nn.Linear(4, 4).to(F64), nn.Linear(4, 3).to(F64)
    def forward(s, x): return s.head(torch.tanh(s.a(torch.tanh(s.a(x)))))

@functools.cache
def _trained_tied(): X, y = tr(); return fit(Tied(), ce_ref, X, y)

@case("api-layer-called-twice", "scores API", Right(lambda: reference(_trained_tied(), ce_ref, tr(), te(), key="tied")["scores"]),
      "method='layer' with a Linear called twice in forward")
def _():
    return Influence(copy.deepcopy(_trained_tied()), nn.CrossEntropyLoss(), tr(), weight_decay=LAM).scores(te(),
                                                                                                           method="layer")

@case("api-self-influence-batch-1", "scores API", Right(lambda: REF()["self_influence"]),
      "self_influence with batch_size=1")
def _(): return self_influence(mlp(), nn.CrossEntropyLoss(), tr(), weight_decay=LAM, batch_size=1)


# ------------------------------------------------------------------------------------------------------ retraining
def _rt():
    from influence_nb import retrain as R
    return R

RCFG = dict(steps=30, lr=0.1, weight_decay=LAM)


def loo(out_dir=None, loss_fn=None, model=None, X=None, cfg=None, removed=(0, 1, 2), chunk_size=2):
    R = _rt()
    Xtr, ytr = tr(); Xte, yte = te()
    kw = {} if loss_fn is None else {"loss_fn": loss_fn}
    return R.loo_retrain(model or mlp(), Xtr if X is None else X, ytr, Xte, yte, list(removed),
                         R.RetrainConfig(**(cfg or RCFG)), chunk_size=chunk_size, out_dir=out_dir, progress=False, **kw)


@functools.cache
def _loo_default(): return loo().truth


class StateRewritten(Exception):
    "A refused run that still changed the folder it refused to use (classified as silent wrong)."


def resumed(first: dict, second: dict):
    "Run loo_retrain in a folder, then again with `second`'s changes; the truth of the second run (or its error)."
    d = tempfile.mkdtemp(prefix="misuse-loo-")
    try:
        loo(out_dir=d, **first)
        before = (Path(d) / "config.json").read_bytes()
        try:
            return loo(out_dir=d, **second).truth
        except Exception as e:
            if (Path(d) / "config.json").read_bytes() != before:
                raise StateRewritten(f"refused ({type(e).__name__}: {str(e).splitlines()[0]}) but rewrote config.json") from e
            raise
    finally:
        shutil.rmtree(d, ignore_errors=True)


RE = lambda *frag: Err(ValueError, frag)     # retraining refusals: ValueError (InfluenceError is one)

@case("retrain-resume-same", "retraining", Right(lambda: _loo_default(), rtol=1e-9),
      "resume with everything equal: reuses chunks, same truth")
def _(): return resumed({}, {})

@case("retrain-resume-lambda-constant", "retraining", RE("out_dir"),
      "issue 15: a lambda with another constant reused the old chunks (fingerprinted by __name__)")
def _():
    return resumed({"loss_fn": lambda o, t: F.cross_entropy(o, t, reduction="none")},
                   {"loss_fn": lambda o, t: 2.0 * F.cross_entropy(o, t, reduction="none")})

@case("retrain-resume-label-smoothing", "retraining", RE("out_dir"),
      "CrossEntropyLoss(label_smoothing=0.1) then 0.2, reduction='none'")
def _():
    return resumed({"loss_fn": nn.CrossEntropyLoss(label_smoothing=0.1, reduction="none")},
                   {"loss_fn": nn.CrossEntropyLoss(label_smoothing=0.2, reduction="none")})

@case("retrain-resume-label-smoothing-mean", "retraining", RE("out_dir"),
      "CrossEntropyLoss(label_smoothing=0.1) then 0.2, mean")
def _():
    return resumed({"loss_fn": nn.CrossEntropyLoss(label_smoothing=0.1)},
                   {"loss_fn": nn.CrossEntropyLoss(label_smoothing=0.2)})

@case("retrain-resume-cfg", "retraining", RE("out_dir"),
      "resume with another learning rate; config.json must stay byte-identical")
def _(): return resumed({}, {"cfg": {**RCFG, "lr": 0.2}})

@case("retrain-resume-data", "retraining", RE("out_dir"), "resume with perturbed training inputs")
def _(): return resumed({}, {"X": tr()[0] + 1e-3})

@case("retrain-resume-model", "retraining", RE("out_dir"), "resume with another θ*")
def _():
    m = mlp()
    with torch.no_grad(): m[0].bias += 0.01
    return resumed({}, {"model": m})

@case("retrain-ce-mean", "retraining", Right(lambda: _loo_default(), rtol=1e-9),
      "issue 15: nn.CrossEntropyLoss() (mean) crashed with a reshape error; equals the per-example default")
def _(): return loo(loss_fn=nn.CrossEntropyLoss()).truth

@case("retrain-ce-none", "retraining", Right(lambda: _loo_default(), rtol=1e-9),
      "nn.CrossEntropyLoss(reduction='none')")
def _(): return loo(loss_fn=nn.CrossEntropyLoss(reduction="none")).truth

@case("retrain-ce-sum", "retraining", RE("reduction='sum'"), "CrossEntropyLoss(reduction='sum') refused")
def _(): return loo(loss_fn=nn.CrossEntropyLoss(reduction="sum")).truth

@case("retrain-removed-out-of-range", "retraining", Err((ValueError, IndexError), ("120",)),
      "removed=[120] for 120 training points")
def _(): return loo(removed=(0, 120)).truth

@case("retrain-removed-negative", "retraining", Err((ValueError, IndexError), ("-1",)), "removed=[-1]")
def _(): return loo(removed=(-1,)).truth

@case("retrain-chunk-size-zero", "retraining", RE("chunk_size"),
      "chunk_size=0 (a careful user expects an error, not empty results)")
def _(): return loo(chunk_size=0).truth

@case("retrain-steps-negative", "retraining", RE("steps"),
      "RetrainConfig(steps=-1): no training at all, truth 0; refuse")
def _(): return loo(cfg={**RCFG, "steps": -1}).truth


@case("retrain-ce-weight-mean", "retraining", RE("weight"),
      "CrossEntropyLoss(weight=w) (mean): refused as in the engine")
def _(): return loo(loss_fn=nn.CrossEntropyLoss(weight=W_CE)).truth

@case("retrain-ignore-index-target", "retraining", RE("ignore_index"), "a training target equal to ignore_index (-100)")
def _():
    R = _rt(); X, y = tr(); Xt, yt = te(); y[7] = -100
    return R.loo_retrain(mlp(), X, y, Xt, yt, [0, 1], R.RetrainConfig(**RCFG), progress=False).truth

@case("retrain-lr-negative", "retraining", RE("lr"), "RetrainConfig(lr=-0.1): gradient ascent; refuse")
def _(): return loo(cfg={**RCFG, "lr": -0.1}).truth


# ------------------------------------------------------------------------------------------------------------ CLI
@dataclass
class CliResult:
    code: Any
    output: str
    ran: list                      # the study commands that were reached (stubbed: never run for real)


def cli(*argv) -> CliResult:
    "influence_nb.cli.main(argv) with stdout/stderr captured and every study command stubbed out (never run here)."
    from influence_nb import cli as C
    C.parser()                                              # imports the study modules, which register their commands
    saved, ran = dict(C.COMMANDS), []
    for name, (h, add, run) in saved.items():
        if name != "info": C.COMMANDS[name] = (h, add, lambda args, name=name: ran.append((name, vars(args))) or 0)
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            try: code = C.main(list(argv))
            except SystemExit as e: code = e.code
    finally:
        C.COMMANDS.clear(); C.COMMANDS.update(saved)
    return CliResult(code, out.getvalue(), ran)

@case("cli-unknown-command", "CLI", Exit(2, ("invalid choice",)), "influence_nb foo")
def _(): return cli("foo")

@case("cli-no-command", "CLI", Exit(2, ("usage",)), "influence_nb (no command): usage, code 2")
def _(): return cli()

@case("cli-info", "CLI", Exit(0, ("influence_nb",)), "influence_nb info")
def _(): return cli("info")

@case("cli-help", "CLI", Exit(0, ("usage",)), "influence_nb --help")
def _(): return cli("--help")

@case("cli-unknown-preset", "CLI", Exit(2, ("invalid choice",)), "influence_nb iris --preset fast")
def _(): return cli("iris", "--preset", "fast")

@case("cli-unknown-flag", "CLI", Exit(2, ("unrecognized",)), "influence_nb iris --epochs 3")
def _(): return cli("iris", "--epochs", "3")

@case("cli-seeds-not-int", "CLI", Exit(2, ("--seeds",)), "influence_nb iris --seeds abc")
def _(): return cli("iris", "--seeds", "abc")

@case("cli-seeds-zero", "CLI", Exit(2, ("--seeds",)), "influence_nb iris --seeds 0: a study of no seeds")
def _(): return cli("iris", "--seeds", "0")

@case("cli-seeds-negative", "CLI", Exit(2, ("--seeds",)), "influence_nb iris --seeds -1")
def _(): return cli("iris", "--seeds", "-1")

@case("cli-threads-zero", "CLI", Exit(2, ("--threads",)),
      "influence_nb iris --threads 0 (torch.set_num_threads(0) raises)")
def _(): return cli("iris", "--threads", "0")

@case("cli-mnist-threads-negative", "CLI", Exit(2, ("--threads",)), "influence_nb small-mnist --threads -2")
def _(): return cli("small-mnist", "--threads", "-2")

@case("cli-mnist-bad-source", "CLI", Exit(2, ("invalid choice",)), "influence_nb small-mnist --source kaggle")
def _(): return cli("small-mnist", "--source", "kaggle")

@case("cli-preset-missing-value", "CLI", Exit(2, ("--preset",)), "influence_nb iris --preset (no value)")
def _(): return cli("iris", "--preset")


# ============================================================================================== running and judging
OUTCOMES = ["right", "clear error", "error, unclear message", "raw internal error", "silent wrong", "hang", "skipped"]
PASSING = ("right", "clear error")


class CaseTimeout(BaseException):
    "Raised by the alarm in a case that ran past its time (a BaseException: no `except Exception` swallows it)."


def _first_line(s) -> str:
    s = str(s).strip()
    return s.splitlines()[0] if s else ""


def _has(msg: str, fragments) -> list:
    "The fragments (or groups of alternatives) missing from msg, case-insensitive."
    low = msg.lower()
    return [f for f in fragments if not any(a.lower() in low for a in (f if isinstance(f, tuple) else (f,)))]


def _from_package(e: BaseException) -> bool:
    "Raised deliberately by influence_nb's own code: the innermost frame is a `raise` statement in the package?"
    tb = traceback.extract_tb(e.__traceback__)
    return bool(tb) and tb[-1].filename.startswith(PKG_DIR) and "raise " in (tb[-1].line or "")


def _agree(got, exp, rtol) -> tuple[bool, str]:
    if not isinstance(got, torch.Tensor):
        return False, f"returned {type(got).__name__}, not a tensor"
    got, exp = got.detach().cpu().to(F64), exp.detach().cpu().to(F64)
    if got.shape != exp.shape:
        return False, f"shape {tuple(got.shape)}, expected {tuple(exp.shape)}"
    if not torch.isfinite(got).all():
        return False, f"{int((~torch.isfinite(got)).sum())} non-finite values returned"
    scale = float(exp.abs().max())
    err = float((got - exp).abs().max())
    ok = bool(torch.allclose(got, exp, rtol=rtol, atol=rtol * scale))
    return ok, f"max |error| {err:.2e} = {err / max(scale, 1e-300):.1e} of max |reference| (rtol {rtol:g})"


def _call_with_deadline(fn, seconds):
    "fn() under a SIGALRM deadline (main thread); elsewhere, plainly."
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        return fn()
    def on_alarm(signum, frame): raise CaseTimeout(f"no answer after {seconds:g} s")
    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try: return fn()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0); signal.signal(signal.SIGALRM, old)


def run_case(c: Case, timeout: float | None = None) -> tuple[str, str]:
    "Run one case and classify what actually happened: (outcome, message)."
    if c.skip: return "skipped", c.skip
    timeout = c.timeout or timeout or TIMEOUT
    ex = c.expect
    old_threads = torch.get_num_threads()
    torch.set_num_threads(1)          # Iris-sized models: one thread is fastest
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result, err = None, None
            try: result = _call_with_deadline(c.fn, timeout)
            except CaseTimeout as e: return "hang", str(e)
            except StateRewritten as e: return "silent wrong", str(e)
            except Exception as e: err = e
            if isinstance(ex, Either): ex = ex.err if err is not None else ex.right
            expected = ex.expected() if isinstance(ex, Right) and err is None else None
    finally:
        torch.set_num_threads(old_threads)
    nc = [w for w in caught if issubclass(w.category, NotConvergedWarning)]
    other_warn = [w for w in caught if not issubclass(w.category, NotConvergedWarning)]

    if isinstance(ex, Exit):
        if err is not None: return "raw internal error", f"{type(err).__name__}: {_first_line(err)}"
        r: CliResult = result
        code = 0 if r.code is None else r.code
        if r.ran and code == 0 and ex.code != 0:
            return "silent wrong", f"accepted: would run {r.ran[0][0]} with these arguments (stubbed)"
        if "Traceback" in r.output: return "raw internal error", f"traceback printed: {_first_line(r.output[-300:])}"
        if code != ex.code:
            return "error, unclear message", f"exit code {code!r}, expected {ex.code}: {_first_line(r.output)}"
        missing = _has(r.output, ex.fragments)
        if missing: return "error, unclear message", f"exit {code}, output lacks {missing}: {_first_line(r.output)}"
        last = r.output.strip().splitlines()[-1] if r.output.strip() else ""
        return ("right" if ex.code == 0 else "clear error"), f"exit {code}: " + _first_line(last)

    if err is not None:
        msg = f"{type(err).__name__}: {_first_line(err)}"
        if isinstance(ex, Err) and isinstance(err, ex.exc):
            missing = _has(str(err), ex.fragments)
            return ("clear error", msg) if not missing else ("error, unclear message", f"lacks {missing}: {msg}")
        if isinstance(err, InfluenceError) or _from_package(err):
            want = ex.exc if isinstance(ex, Err) else (NotConvergedWarning if isinstance(ex, Warns) else None)
            why = (f"expected {getattr(want, '__name__', want)}" if isinstance(ex, (Err, Warns))
                   else "expected the right numbers")
            return "error, unclear message", f"{why}; got {msg}"
        return "raw internal error", msg

    # the call returned
    if isinstance(ex, Right):
        ok, detail = _agree(result, expected, ex.rtol)
        if ok: return "right", detail
        extra = f" (warned: {_first_line(nc[0].message)})" if nc else ""
        return "silent wrong", detail + extra
    if isinstance(ex, Warns):
        if nc:
            missing = _has(str(nc[0].message), ex.fragments)
            m = f"NotConvergedWarning: {_first_line(nc[0].message)}"
            return ("clear error", m) if not missing else ("error, unclear message", f"lacks {missing}: {m}")
        w = f"; only {other_warn[0].category.__name__}: {_first_line(other_warn[0].message)}" if other_warn else ""
        return "silent wrong", f"returned numbers with no NotConvergedWarning{w}"
    shape = tuple(result.shape) if isinstance(result, torch.Tensor) else type(result).__name__
    w = f"; warned {other_warn[0].category.__name__}: {_first_line(other_warn[0].message)}" if other_warn else ""
    return "silent wrong", f"returned {shape} where {ex.exc.__name__ if isinstance(ex.exc, type) else ex.exc} was expected{w}"


# ---------------------------------------------------------------------------------------------------------- pytest
try:
    import pytest

    @pytest.mark.parametrize("c", CASES, ids=lambda c: c.id)
    def test_misuse(c):
        if c.skip: pytest.skip(c.skip)
        outcome, msg = run_case(c)
        assert outcome in PASSING, f"[{c.category}] {c.note}\n{outcome}: {msg}"

    def test_suite_is_broad():
        assert len(CASES) >= 80 and len({c.category for c in CASES}) >= 12
except ImportError:          # the runner below needs no pytest
    pass


# ---------------------------------------------------------------------------------------------------------- runner
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Run the misuse cases and count what actually happens.")
    ap.add_argument("--list", action="store_true", help="print every case with its outcome and first message line")
    ap.add_argument("-k", default="", help="only cases whose id or category contains this")
    ap.add_argument("--timeout", type=float, default=TIMEOUT, help="seconds per case before it counts as a hang")
    args = ap.parse_args(argv)
    cases = [c for c in CASES if args.k in c.id or args.k in c.category]
    rows, t0 = [], time.perf_counter()
    for c in cases:
        t = time.perf_counter()
        outcome, msg = run_case(c, args.timeout)
        rows.append((c, outcome, msg, time.perf_counter() - t))
        if args.list:
            print(f"{c.id:40s} {c.category:17s} {outcome:22s} {time.perf_counter() - t:5.1f}s  {msg}", flush=True)
    cats = list(dict.fromkeys(c.category for c in cases))
    short = {"right": "right", "clear error": "clear", "error, unclear message": "unclear",
             "raw internal error": "raw", "silent wrong": "silent", "hang": "hang", "skipped": "skip"}
    print()
    print(f"{'category':18s}" + "".join(f"{short[o]:>9s}" for o in OUTCOMES) + f"{'total':>8s}")
    for cat in cats + ["TOTAL"]:
        sel = [r for r in rows if cat == "TOTAL" or r[0].category == cat]
        print(f"{cat:18s}" + "".join(f"{sum(r[1] == o for r in sel):9d}" for o in OUTCOMES) + f"{len(sel):8d}")
    print()
    for o in OUTCOMES: print(f"{o:24s} {sum(r[1] == o for r in rows)}")
    print(f"\n{len(rows)} cases in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
