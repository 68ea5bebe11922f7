"""Benchmark: influence_nb against peer libraries (pyDVL, captum) on the same model, data, damping and solver settings.

    python bench/peers.py --case iris                  # exact: ours vs pyDVL DirectInfluence vs captum Naive
    python bench/peers.py --case cnn                   # exact, CG, LiSSA (+ captum Arnoldi)
    python bench/peers.py --case fashion               # CG and LiSSA on LeNet-5, all 60,000 training points scored
    python bench/peers.py --case cnn --repeats 5 --methods ours_cg,pydvl_cg

Every (method, repeat) runs in a fresh Python process with one torch thread, so its peak memory is its own and no
library warms a cache for another; repeats are interleaved (all methods once, then again). Timed: everything from the
trained model and the tensors in memory to the (n_test, n_train) score matrix (fitting the Hessian or operator,
the inverse-HVP solves, the pass over the training set). Not timed: importing, loading data, building the model.
Peak memory: resident memory sampled every 2 ms during the timed call, minus the resident memory just before it.
Before timing, each process runs a toy vmap/grad/jvp/vjp once, so torch.func's lazy imports (about 1 s) are paid
untimed.
Where the time went: `solve` is the inverse-HVP solve (ours: Influence.solve, with its residual check; pyDVL: fit +
influence factors; captum does all in one call and shows none), `rest` the wall time besides it (mostly the scoring
pass over the training set). `HVPs` counts Hessian-vector products in full-data equivalents (vectors × examples of
each batch HVP, over the size of the Hessian's data), and the last column divides the solve time by them: the cost of
one HVP over 1,000 examples, which shows how much of a difference is the engine and how much the algorithm.

Conventions, aligned to ours (predicted change of the test loss when a training point is removed,
(1/n) ∇ℓ_tᵀ (H + δI)⁻¹ ∇ℓ_j with λ inside H):
- pyDVL's `influences(..., mode="up")` is ⟨H⁻¹∇ℓ_t, ∇ℓ_j⟩ with H the Hessian of the *mean* loss and no 1/n and no
  minus sign: ours = pyDVL / n, with pyDVL's `regularization` = λ + δ (its loss has no weight decay).
- captum sums its Hessian over batches of the loss it is given; with `reduction="sum"` that is n·H, so
  `hessian_reg` = n(λ + δ) and captum's score equals ours with no rescaling.
Each table row reports the fitted factor between the peer's raw scores and ours, so a reader can check this.

Needs the `bench` extra (pyDVL pins numpy<2: use a virtual environment of its own):
    python3 -m venv .venv-bench && . .venv-bench/bin/activate && pip install -e ".[bench]"
"""
import argparse, json, os, statistics, subprocess, sys, tempfile, time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

# -- solver settings, the same for every library
SETTINGS = {
    "iris":    {"cg": dict(tol=1e-8, max_iter=500), "direct_batch": 128},
    "cnn":     {"cg": dict(tol=1e-6, max_iter=1000), "lissa": dict(depth=1000, batch_size=50, scale=None),
                "arnoldi": dict(arnoldi_dim=200, projection_dim=100),
                "direct_batch": 10},      # pyDVL's torch.func.hessian holds p × batch activations: 300 ran out of 24 GB
    "fashion": {"cg": dict(tol=1e-4, max_iter=100), "lissa": dict(depth=500, batch_size=100, scale=None),
                "arnoldi": dict(arnoldi_dim=100, projection_dim=50)},
}
METHODS = {
    "iris":    ["ours_exact", "pydvl_direct", "captum_naive"],
    "cnn":     ["ours_exact", "pydvl_direct", "captum_naive", "ours_cg", "ours_cg_block", "pydvl_cg", "pydvl_cg_block",
                "captum_arnoldi", "ours_lissa", "pydvl_lissa"],
    "fashion": ["ours_cg", "ours_cg_block", "pydvl_cg", "pydvl_cg_block", "captum_arnoldi", "ours_lissa",
                "pydvl_lissa"],
}
# calls per process: the first pays one-time costs and is reported apart; the median of the others is the time
CALLS = {"iris": 7, "cnn": 1, "fashion": 1}
SOLVER_OF = {"ours_exact": "exact", "pydvl_direct": "exact", "captum_naive": "exact",
             "ours_cg": "cg", "ours_cg_block": "cg", "pydvl_cg": "cg", "pydvl_cg_block": "cg", "captum_arnoldi": "cg",
             "ours_lissa": "lissa", "pydvl_lissa": "lissa"}


# ---------------------------------------------------------------- worker side (one method, one process)
# what the timed call spent where: the inverse-HVP solve (for pyDVL: fit + influence factors; absent for captum, whose
# one call does everything) and the Hessian-vector products it ran, counted as vectors × examples of the batch
COUNT = {"solve": None, "hvp_vec_examples": 0}


def count_hvps():
    "Wrap our and pyDVL's batch HVP entry points so every call adds (number of vectors) × (batch size) to COUNT."
    from influence_nb.core import HVPRows
    ours = HVPRows.__call__
    def counted(self, V, x, y):
        COUNT["hvp_vec_examples"] += V.shape[0] * x.shape[0]
        return ours(self, V, x, y)
    HVPRows.__call__ = counted
    try:
        from pydvl.influence.torch.batch_operation import HessianBatchOperation
    except ImportError:
        return
    theirs = HessianBatchOperation.apply
    def counted_apply(self, batch, tensor):
        COUNT["hvp_vec_examples"] += (tensor.shape[0] if tensor.ndim == 2 else 1) * batch.x.shape[0]
        return theirs(self, batch, tensor)
    HessianBatchOperation.apply = counted_apply


def _add_solve(t0):
    COUNT["solve"] = (COUNT["solve"] or 0.) + time.perf_counter() - t0

def _loader(X, y, batch_size, shuffle=False):
    from torch.utils.data import DataLoader, TensorDataset
    return DataLoader(TensorDataset(X, y), batch_size=batch_size, shuffle=shuffle)


def lissa_scale(case):
    "LiSSA's scale, the same for every library: 1.1 × (top eigenvalue of H + λ + δ), by our Lanczos (not timed)."
    from influence_nb.scoring import Influence
    from influence_nb.ihvp import top_eigenvalue
    import torch
    path = Path(tempfile.gettempdir()) / f"influence_bench_scale_{case.name}.json"
    if path.exists(): return json.loads(path.read_text())["scale"]
    inf = Influence(case.model, torch.nn.functional.cross_entropy, case.hessian_data(), weight_decay=case.weight_decay,
                    damping=case.damping, batch_size=case.batch_size)
    top = top_eigenvalue(inf, tol=1e-3)
    scale = 1.1 * (top + case.damping) * 1.5      # margin for minibatch Hessians, which can exceed the full one
    path.write_text(json.dumps({"scale": scale, "top": top}))
    return scale


def method_fn(case, method, settings):
    "A zero-argument function computing the (n_test, n_train) score matrix with `method`, after untimed setup."
    import torch
    from torch import nn
    F = nn.functional.cross_entropy
    lam, delta, n, bs = case.weight_decay, case.damping, case.n, case.batch_size
    hX, hy = case.hessian_data()
    test = (case.X_test, case.y_test)
    if method.startswith("ours"):
        from influence_nb.scoring import Influence
        from influence_nb.ihvp import CGSolver, BlockCGSolver, LissaSolver
        solver = {"ours_exact": lambda: "exact",
                  "ours_cg": lambda: CGSolver(**settings["cg"], on_fail="ignore"),
                  "ours_cg_block": lambda: BlockCGSolver(**settings["cg"], on_fail="ignore"),
                  "ours_lissa": lambda: LissaSolver(depth=settings["lissa"]["depth"],
                                                    batch_size=settings["lissa"]["batch_size"], scale=lissa_scale(case),
                                                    repeats=1, seed=0, on_fail="ignore")}[method]()
        hd = None if case.hessian_idx is None else (hX, hy)
        def run():
            inf = Influence(case.model, F, (case.X_train, case.y_train), weight_decay=lam, damping=delta, solver=solver,
                            batch_size=bs, hessian_data=hd)
            solve = inf.solve
            def timed_solve(V):
                t0 = time.perf_counter(); out = solve(V); _add_solve(t0); return out
            inf.solve = timed_solve
            return inf.scores(test)
        return run
    if method.startswith("pydvl"):
        from pydvl.influence.torch import DirectInfluence, CgInfluence, LissaInfluence
        reg = lam + delta
        if method == "pydvl_direct": model = DirectInfluence(case.model, F, regularization=reg)
        elif method in ("pydvl_cg", "pydvl_cg_block"):     # one CG per test point, or pyDVL's block CG
            # stopping rule aligned with ours, ||r_t|| <= tol·||b_t||. pyDVL stops at ||r|| <= max(rtol²·ynorm, atol²):
            # its block CG takes ynorm = ||b_t|| (so rtol = √tol), its one-by-one CG takes the norm of a column of the
            # stacked right-hand sides, not of b_t, so there rtol = 0 and atol² = tol·min_t ||b_t|| (at least as tight).
            s = settings["cg"]
            if method == "pydvl_cg_block": rtol, atol = s["tol"] ** 0.5, 0.0
            else:
                from influence_nb.scoring import Influence
                bmin = float(Influence(case.model, F, test).grad_matrix(test).norm(dim=1).min())
                rtol, atol = 0.0, (s["tol"] * bmin) ** 0.5
            model = CgInfluence(case.model, F, regularization=reg, rtol=rtol, atol=atol, maxiter=s["max_iter"],
                                warn_on_max_iteration=False, solve_simultaneously=method == "pydvl_cg_block")
        else:
            s = settings["lissa"]
            model = LissaInfluence(case.model, F, regularization=reg, maxiter=s["depth"], scale=lissa_scale(case),
                                   rtol=0.0, warn_on_max_iteration=False)
        fit_bs = {"pydvl_lissa": settings.get("lissa", {}).get("batch_size", bs),
                  "pydvl_direct": settings.get("direct_batch", bs)}.get(method, bs)
        def run():
            torch.manual_seed(0)
            t0 = time.perf_counter()
            m = model.fit(_loader(hX, hy, fit_bs))
            factors = m.influence_factors(*test)
            _add_solve(t0)
            blocks = [m.influences_from_factors(factors, xb, yb) for xb, yb in _loader(case.X_train, case.y_train, bs)]
            return torch.cat(blocks, dim=1) / n
        return run
    if method.startswith("captum"):
        from captum.influence import NaiveInfluenceFunction
        from captum.influence._core.arnoldi_influence_function import ArnoldiInfluenceFunction
        from torch.utils.data import TensorDataset
        ckpt = Path(tempfile.mkdtemp()) / "model.pt"
        torch.save(case.model.state_dict(), ckpt)
        loss = nn.CrossEntropyLoss(reduction="sum")
        train_ds = TensorDataset(case.X_train, case.y_train)
        hess_ds = _loader(hX, hy, bs)
        def run():
            if method == "captum_naive":
                f = NaiveInfluenceFunction(case.model, train_ds, str(ckpt), loss_fn=loss, batch_size=bs,
                                           hessian_dataset=hess_ds, sample_wise_grads_per_batch=True,
                                           projection_dim=case.p, hessian_reg=len(hy) * (lam + delta),
                                           hessian_inverse_tol=0.0)
            else:
                s = settings["arnoldi"]
                f = ArnoldiInfluenceFunction(case.model, train_ds, str(ckpt), loss_fn=loss, batch_size=bs,
                                             hessian_dataset=hess_ds, sample_wise_grads_per_batch=True,
                                             hessian_reg=len(hy) * (lam + delta), hessian_inverse_tol=0.0, **s)
            return f.influence(test) * len(hy) / n    # captum divides by nothing: its H is the sum over len(hy) points
        return run
    raise ValueError(f"unknown method {method!r}")


def warm_torch_func():
    "Pay torch.func's one-time lazy imports (about 1 s on first use of vmap/grad, the same for every library) untimed."
    import torch
    from torch.func import grad, jvp, vjp, vmap
    f = lambda w, x: torch.tanh(x @ w).sum()
    w, X = torch.randn(3), torch.randn(4, 3)
    vmap(grad(f), in_dims=(None, 0))(w, X)
    jvp(lambda w: f(w, X), (w,), (w,)); vjp(grad(lambda w: f(w, X)), w)[1](w)


def worker(args):
    import torch
    torch.set_num_threads(1)
    warm_torch_func()
    from cases import load_case
    from influence_nb.ihvp import peak_memory
    case = load_case(args.case)
    case.model.requires_grad_(True)
    fn = method_fn(case, args.method, SETTINGS[args.case])
    count_hvps()
    def timed():
        COUNT.update(solve=None, hvp_vec_examples=0)
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        return out, time.perf_counter() - t0, time.process_time() - c0
    calls = []
    # the first call pays one-time costs (lazy imports, kernel set-up) and is reported apart when there are more;
    # peak memory is sampled on the last call only (the sampling thread, every 2 ms, would slow short timed calls)
    for i in range(CALLS[args.case]):
        if i == CALLS[args.case] - 1: (scores, wall, cpu), peak = peak_memory(timed)
        else: scores, wall, cpu = timed()
        calls.append({"wall": wall, "cpu": cpu, "solve": COUNT["solve"], "hvp_vec_examples": COUNT["hvp_vec_examples"]})
    warm = (calls[1:-1] or calls[1:]) if len(calls) > 1 else calls
    scores = scores.detach().double().cpu()
    torch.save(scores, args.out)
    Path(args.out).with_suffix(".json").write_text(json.dumps(
        {"method": args.method, "wall": statistics.median(c["wall"] for c in warm),
         "cpu": statistics.median(c["cpu"] for c in warm), "peak_bytes": peak,
         "cold_wall": calls[0]["wall"], "calls": calls, "shape": list(scores.shape),
         "finite": bool(torch.isfinite(scores).all()), "n_hessian": len(case.hessian_data()[1]),
         "solve": None if warm[0]["solve"] is None else statistics.median(c["solve"] for c in warm),
         "hvp_vec_examples": statistics.median(c["hvp_vec_examples"] for c in warm)}))


# ---------------------------------------------------------------- orchestrator
def pearson(a, b) -> float:
    import numpy as np
    a, b = np.asarray(a).ravel(), np.asarray(b).ravel()
    if a.std() == 0 or b.std() == 0: return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def fit_factor(peer, ours) -> float:
    "Least-squares factor c with peer ≈ c · ours."
    import numpy as np
    a, b = np.asarray(peer).ravel(), np.asarray(ours).ravel()
    return float(a @ b / (b @ b))


def fmt_s(x: float) -> str:
    "Seconds with 3 significant digits."
    return f"{x:.3g}"


def run_one(case, method, out, timeout, mmap_threshold=None):
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--case", case, "--method", method, "--out",
           str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    # glibc: a fixed threshold turns off its dynamic one, so large freed blocks go back to the OS
    if mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = str(mmap_threshold)
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if r.returncode != 0:
        return {"method": method, "error": (r.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(Path(out).with_suffix(".json").read_text())


def phases(ok) -> dict:
    "Median solve time, the rest of the wall time, and the HVPs run (full-data equivalents; per 1,000 examples' cost)."
    if any(x.get("solve") is None for x in ok): return {}
    solve = statistics.median(x["solve"] for x in ok)
    vex = statistics.median(x.get("hvp_vec_examples", 0) for x in ok)
    out = {"solve": solve, "rest": statistics.median(x["wall"] - x["solve"] for x in ok)}
    if vex: out.update(hvps=vex / ok[0]["n_hessian"], ms_per_hvp_k=solve * 1e3 / (vex / 1e3))
    return out


def table(case_name: str, dirs) -> list:
    "Print the markdown table for the runs saved in `dirs` (runs.json and scores), merged; return its rows."
    import torch
    runs, scores, meta, headers = {}, {}, {}, []
    saved_all = [(Path(d), json.loads((Path(d) / "runs.json").read_text())) for d in dirs]
    for i, (d, saved) in enumerate(saved_all):
        meta = meta or saved
        later = {m for _, s in saved_all[i + 1:] for m in s["runs"]}      # a later folder's runs replace these
        kept = [m for m in saved["runs"] if m not in later]
        if kept: headers.append(f"{', '.join(kept)}: {saved.get('header', '')}")
        for m in kept:
            rs = saved["runs"][m]
            runs[m] = rs
            if (d / f"{m}.pt").exists() and all("error" not in x for x in rs): scores[m] = torch.load(d / f"{m}.pt")
    ref = "ours_exact" if "ours_exact" in scores else ("ours_cg" if "ours_cg" in scores else None)
    rows = []
    for m, rs in runs.items():
        ok = [x for x in rs if "error" not in x]
        if not ok or m not in scores: rows.append({"method": m, "error": rs[0].get("error", "no scores")}); continue
        s, ours = scores[m], f"ours_{SOLVER_OF[m]}"
        rows.append({"method": m, "solver": SOLVER_OF[m], "wall": statistics.median(x["wall"] for x in ok),
                     "walls": [round(x["wall"], 3) for x in ok], "cold": [round(x["cold_wall"], 3) for x in ok],
                     "peak_mb": statistics.median(x["peak_bytes"] for x in ok) / 2**20,
                     "pearson_ref": pearson(s, scores[ref]) if ref else float("nan"),
                     "pearson_ours": pearson(s, scores[ours]) if ours in scores else float("nan"),
                     "factor": fit_factor(s, scores[ours]) if ours in scores else float("nan"),
                     **phases(ok)})
    print(f"\ncase {case_name}: {meta.get('describe', '')}")
    for h in headers: print(f"- {h}")
    print(f"\n| solver | method | median wall (s) | runs (s) | time / our fastest | peak memory (MB) "
          f"| Pearson vs {ref} | Pearson vs ours, same solver | peer / ours scale | solve (s) | rest (s) | HVPs "
          "| ms per HVP per 1k examples |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    order = {"exact": 0, "cg": 1, "lissa": 2}
    for r in sorted(rows, key=lambda r: (order.get(SOLVER_OF.get(r["method"]), 9), not r["method"].startswith("ours"))):
        if "error" in r:
            print(f"| {SOLVER_OF.get(r['method'], '?')} | {r['method']} | failed: {r['error'][:90]} "
                  "| | | | | | | | | | |")
            continue
        mine = [x for x in rows
                if x["method"].startswith("ours") and x.get("solver") == r["solver"] and "error" not in x]
        ours = min(mine, key=lambda x: x["wall"]) if mine else None          # our fastest for this solver
        ratio = f"{r['wall'] / ours['wall']:.2f}x" if ours and r is not ours else ""
        print(f"| {r['solver']} | {r['method']} | {fmt_s(r['wall'])} | {', '.join(fmt_s(w) for w in r['walls'])} | "
              f"{ratio} | {r['peak_mb']:.1f} | {r['pearson_ref']:.4f} | {r['pearson_ours']:.4f} | {r['factor']:.4g} | "
              + " | ".join(fmt_s(r[k]) if k in r else "" for k in ("solve", "rest", "hvps", "ms_per_hvp_k")) + " |")
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", default="iris", choices=sorted(SETTINGS))
    ap.add_argument("--methods", default=None, help="comma-separated subset of the case's methods")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--timeout", type=int, default=3600, help="seconds per run before it counts as failed")
    ap.add_argument("--malloc-mmap-threshold", type=int, default=None, metavar="BYTES",
                    help="run the workers with glibc's MALLOC_MMAP_THRESHOLD_=BYTES (e.g. 131072): peak memory without "
                         "the heap growth that glibc's dynamic threshold allows")
    ap.add_argument("--out", default=None, help="folder for scores and timings (default runs/bench/<case>)")
    ap.add_argument("--table", nargs="+", metavar="DIR",
                    help="only print the table of earlier runs saved in DIR(s), merged")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--method", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker: return worker(args)
    if args.table: return table(args.case, args.table)

    import torch
    from cases import ROOT, load_case
    methods = args.methods.split(",") if args.methods else METHODS[args.case]
    out = Path(args.out or ROOT / args.case); out.mkdir(parents=True, exist_ok=True)
    case = load_case(args.case)                      # trains and caches the model once, before any timing
    header = (f"n = {case.n}, p = {case.p}, λ = {case.weight_decay:g}, δ = {case.damping:g}, batch {case.batch_size}; "
              + (f"MALLOC_MMAP_THRESHOLD_={args.malloc_mmap_threshold}; " if args.malloc_mmap_threshold else "") +
              f"settings {SETTINGS[args.case]}; {args.repeats} repeat(s), {CALLS[args.case]} call(s) per process, "
              f"torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"case {args.case}: {case.describe}; {header}", flush=True)
    runs = {m: [] for m in methods}
    for r in range(args.repeats):
        for m in methods:
            res = run_one(args.case, m, out / f"{m}.pt", args.timeout, args.malloc_mmap_threshold)
            runs[m].append(res)
            print(f"  repeat {r + 1}: {m:15s} " + (f"{res['wall']:9.2f} s  peak {res['peak_bytes'] / 2**20:8.1f} MB"
                                                   if "error" not in res else f"FAILED: {res['error']}"), flush=True)
            (out / "runs.json").write_text(json.dumps({"case": args.case, "describe": case.describe, "header": header,
                                                       "runs": runs}, indent=1))
    table(args.case, [out])


if __name__ == "__main__":
    main()
