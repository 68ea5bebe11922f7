"""The peers' runners for bench/quality.py: pyDVL, captum and kronfluence, each aligned with our conventions.

Every runner takes a workload (a `cases.Case`: model at θ*, training set, chosen test points, λ, δ, the curvature's
data) and one budget, does its untimed set-up, and returns a zero-argument function giving the (n_test, n_train)
matrix in our convention: the predicted change of the test loss when a training point is removed,
(1/n) ∇ℓ_tᵀ (H + δI)⁻¹ ∇ℓ_j with λ inside H.

- pyDVL 0.10: `influences(mode="up")` is ⟨H⁻¹∇ℓ_t, ∇ℓ_j⟩ with H the Hessian of the *mean* loss, no 1/n and no minus
  sign: ours = pyDVL / n, with its `regularization` = λ + δ (its loss has no weight decay). CG's stopping rule is
  aligned as in bench/peers.py. Arnoldi (`ArnoldiInfluence`, rank r, default `use_woodbury=False`: the inverse on the
  top-r eigenspace only) and Nyström (`NystroemSketchInfluence`, rank r, Woodbury form) take the same
  regularization.
- captum 0.9: with `reduction="sum"` its Hessian is the sum over the curvature data, n_h·H, so `hessian_reg` =
  n_h(λ + δ), and its score × n_h / n is ours.
- kronfluence 1.0.1: its curvature is the Fisher of the per-example loss averaged over the examples it is fitted on
  (no weight decay), and `damping_factor` is *added* to the eigenvalues (an absolute number; `None` would mean 0.1 ×
  their mean): damping_factor = λ + δ. Its pairwise score is g_tᵀ(F + d)⁻¹g_j with the test loss as measurement,
  no 1/n and no minus sign: ours = kronfluence / n. Its true-Fisher factors draw one label per example from the
  model's predictive distribution (`sample=True`); one draw varies between seeds (Pearson 0.98-0.99 against the
  expectation), so `kron_kfac` / `kron_ekfac` use the exact expectation over the classes: the factor data is every
  (example, class) pair with the loss weighted by √(C·p_c), so that E over pairs of g gᵀ is the mean over examples
  of Σ_c p_c g_c g_cᵀ (the Gauss-Newton matrix of cross-entropy). `kron_*_1s` is kronfluence's own one-draw mode.
"""
import functools, tempfile, time
from pathlib import Path

# what the timed call spent where: the solve (fit + inverse-HVP factors, where a library separates them) and the
# Hessian(-or-GGN)-vector products it ran, counted as vectors × examples of each batch product
COUNT = {"solve": None, "hvp_vec_examples": 0}


def add_solve(t0):
    COUNT["solve"] = (COUNT["solve"] or 0.) + time.perf_counter() - t0


class _CountedRows:
    "A curvature's batch products rows(V, x, y), counting vectors × examples; every other attribute is the inner one's."
    def __init__(self, inner): self._inner = inner
    def __call__(self, V, x, y):
        COUNT["hvp_vec_examples"] += (V.shape[0] if V.dim() == 2 else 1) * x.shape[0]
        return self._inner(V, x, y)
    def __getattr__(self, k): return getattr(self._inner, k)


def count_products():
    "Count every batch curvature product of ours (all registered curvatures) and pyDVL's (Hessian and Gauss-Newton)."
    from influence_nb import core
    for name, factory in list(core.CURVATURES.items()):
        if getattr(factory, "_counted", False): continue
        @functools.wraps(factory)          # keeps the signature: curvature_rows looks for a `mode` parameter
        def counted(*a, _f=factory, **k): return _CountedRows(_f(*a, **k))
        counted._counted = True
        core.CURVATURES[name] = counted
    try:
        from pydvl.influence.torch.batch_operation import HessianBatchOperation, GaussNewtonBatchOperation
    except ImportError:
        return
    for cls in (HessianBatchOperation, GaussNewtonBatchOperation):
        theirs = cls.apply
        def counted_apply(self, batch, tensor, _theirs=theirs):
            COUNT["hvp_vec_examples"] += (tensor.shape[0] if tensor.ndim == 2 else 1) * batch.x.shape[0]
            return _theirs(self, batch, tensor)
        cls.apply = counted_apply


def _loader(X, y, batch_size):
    from torch.utils.data import DataLoader, TensorDataset
    return DataLoader(TensorDataset(X, y), batch_size=batch_size, shuffle=False)


def test_grad_min_norm(case) -> float:
    "min_t ‖∇ℓ_t‖ (for pyDVL's one-at-a-time CG stopping rule), untimed."
    import torch
    from influence_nb.scoring import Influence
    test = (case.X_test, case.y_test)
    return float(Influence(case.model, torch.nn.functional.cross_entropy, test).grad_matrix(test).norm(dim=1).min())


# ------------------------------------------------------------------------------------------------ pyDVL
def pydvl_runner(case, kind: str, budget: dict, *, lissa_scale=None, lissa_batch=None, direct_batch=None):
    "pyDVL's 'direct', 'cg', 'cg_block', 'lissa', 'arnoldi' or 'nystroem' with one budget (tol, depth or rank)."
    import torch
    from torch import nn
    from pydvl.influence.torch import (DirectInfluence, CgInfluence, LissaInfluence, ArnoldiInfluence,
                                       NystroemSketchInfluence)
    F = nn.functional.cross_entropy
    reg = case.weight_decay + case.damping
    hX, hy = case.hessian_data()
    fit_bs = case.batch_size
    if kind == "direct":
        model, fit_bs = DirectInfluence(case.model, F, regularization=reg), direct_batch or case.batch_size
    elif kind in ("cg", "cg_block"):
        tol = budget["tol"]
        if kind == "cg_block": rtol, atol = tol ** 0.5, 0.0
        else: rtol, atol = 0.0, (tol * test_grad_min_norm(case)) ** 0.5
        model = CgInfluence(case.model, F, regularization=reg, rtol=rtol, atol=atol,
                            maxiter=budget.get("max_iter", 1000), warn_on_max_iteration=False,
                            solve_simultaneously=kind == "cg_block")
    elif kind == "lissa":
        model = LissaInfluence(case.model, F, regularization=reg, maxiter=budget["depth"], scale=lissa_scale,
                               rtol=0.0, warn_on_max_iteration=False)
        fit_bs = lissa_batch
    elif kind == "arnoldi":
        model = ArnoldiInfluence(case.model, F, regularization=reg, rank=budget["rank"])
    elif kind == "nystroem":
        model = NystroemSketchInfluence(case.model, F, regularization=reg, rank=budget["rank"])
    else: raise ValueError(f"unknown pyDVL method {kind!r}")
    n, test = case.n, (case.X_test, case.y_test)
    def run():
        torch.manual_seed(0)
        t0 = time.perf_counter()
        m = model.fit(_loader(hX, hy, fit_bs))
        factors = m.influence_factors(*test)
        add_solve(t0)
        blocks = [m.influences_from_factors(factors, xb, yb) for xb, yb in _loader(case.X_train, case.y_train,
                                                                                  case.batch_size)]
        return torch.cat(blocks, dim=1) / n
    return run


# ------------------------------------------------------------------------------------------------ captum
def captum_runner(case, kind: str, budget: dict):
    "captum's 'naive' (the full Hessian) or 'arnoldi' (arnoldi_dim, projection_dim) influence."
    import torch
    from torch import nn
    from torch.utils.data import TensorDataset
    from captum.influence import NaiveInfluenceFunction
    from captum.influence._core.arnoldi_influence_function import ArnoldiInfluenceFunction
    ckpt = Path(tempfile.mkdtemp()) / "model.pt"
    torch.save(case.model.state_dict(), ckpt)
    loss = nn.CrossEntropyLoss(reduction="sum")
    hX, hy = case.hessian_data()
    train_ds, hess_dl, nh = TensorDataset(case.X_train, case.y_train), _loader(hX, hy, case.batch_size), len(hy)
    reg = nh * (case.weight_decay + case.damping)
    test = (case.X_test, case.y_test)
    def run():
        if kind == "naive":
            f = NaiveInfluenceFunction(case.model, train_ds, str(ckpt), loss_fn=loss, batch_size=case.batch_size,
                                       hessian_dataset=hess_dl, sample_wise_grads_per_batch=True,
                                       projection_dim=case.p, hessian_reg=reg, hessian_inverse_tol=0.0)
        elif kind == "arnoldi":
            f = ArnoldiInfluenceFunction(case.model, train_ds, str(ckpt), loss_fn=loss, batch_size=case.batch_size,
                                         hessian_dataset=hess_dl, sample_wise_grads_per_batch=True, hessian_reg=reg,
                                         hessian_inverse_tol=0.0, arnoldi_dim=budget["arnoldi_dim"],
                                         projection_dim=budget["projection_dim"])
        else: raise ValueError(f"unknown captum method {kind!r}")
        return f.influence(test) * nh / case.n
    return run


# ------------------------------------------------------------------------------------------------ kronfluence
def kron_runner(case, kind: str, budget: dict, *, expectation: bool = True, seed: int = 0):
    "kronfluence's 'kfac' or 'ekfac' (true Fisher: the exact class expectation, or its own one sampled label)."
    import logging, warnings
    import torch
    import torch.nn.functional as F
    from torch.utils.data import Dataset
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task
    logging.getLogger("kronfluence").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")

    class Pairs(Dataset):
        "Examples (x, y, c): with `classes`, every (example, class) pair; else each example once (c = its label)."
        def __init__(self, X, y, classes=0): self.X, self.y, self.C = X, y, classes
        def __len__(self): return len(self.y) * max(self.C, 1)
        def __getitem__(self, i):
            if not self.C: return self.X[i], self.y[i], self.y[i]
            j, c = divmod(i, self.C)
            return self.X[j], self.y[j], torch.tensor(c)

    class CE(Task):
        def compute_train_loss(self, batch, model, sample=False):
            x, y, c = batch
            logits = model(x)
            if not sample: return F.cross_entropy(logits, y, reduction="sum")
            if expectation:      # every class, weighted so that the mean over pairs is the expectation over classes
                p = torch.softmax(logits.detach(), -1)
                w = (p.shape[-1] * p.gather(1, c[:, None])[:, 0]).sqrt()
                return (w * F.cross_entropy(logits, c, reduction="none")).sum()
            with torch.no_grad():
                drawn = torch.multinomial(torch.softmax(logits.detach(), -1), 1)[:, 0]
            return F.cross_entropy(logits, drawn, reduction="sum")
        def compute_measurement(self, batch, model):
            x, y, _ = batch
            return F.cross_entropy(model(x), y, reduction="sum")

    hX, hy = case.hessian_data()
    n_classes = int(case.model(case.X_train[:2]).shape[-1])
    model = prepare_model(case.model, CE())
    out = Path(tempfile.mkdtemp())
    analyzer = Analyzer(analysis_name="quality", model=model, task=CE(), cpu=True, disable_tqdm=True,
                        disable_model_save=True, output_dir=str(out))
    fargs = FactorArguments(strategy=kind, covariance_max_examples=None, lambda_max_examples=None)
    sargs = ScoreArguments(damping_factor=case.weight_decay + case.damping)
    fit_ds = Pairs(hX, hy, n_classes if expectation else 0)
    train_ds, query_ds = Pairs(case.X_train, case.y_train), Pairs(case.X_test, case.y_test)
    calls = [0]
    def run():
        calls[0] += 1
        name = f"{kind}_{calls[0]}"
        torch.manual_seed(seed)
        t0 = time.perf_counter()
        analyzer.fit_all_factors(factors_name=name, dataset=fit_ds, per_device_batch_size=case.batch_size,
                                 factor_args=fargs, overwrite_output_dir=True)
        add_solve(t0)
        analyzer.compute_pairwise_scores(scores_name=name, factors_name=name, query_dataset=query_ds,
                                         train_dataset=train_ds, per_device_query_batch_size=len(case.y_test),
                                         per_device_train_batch_size=case.batch_size, score_args=sargs,
                                         overwrite_output_dir=True)
        return analyzer.load_pairwise_scores(name)["all_modules"].to(torch.float64) / case.n
    return run
