"""Benchmark: could a preconditioner cut the number of HVPs that conjugate gradient needs?

    python bench/precond.py --case cnn              # forms H (2,506 x 2,506, ~2 min once, cached), then matrix-level CG
    python bench/precond.py --case fashion --ranks 20,50   # LeNet-5: randomized Nystrom only, through real HVPs

Every solver in peers.py costs (number of HVPs) x (cost of one HVP), and ours already runs as few HVPs as pyDVL's at
about the floor cost of one HVP (bench/README.md). A 3x lead would need a third of the HVPs at the same tolerance:
that is what a good preconditioner M ~ (H + dI) would buy, with CG run on M^-1 (H + dI). This script measures, for the
same right-hand sides (the test gradients of the case) and the same stopping rule ||r_t|| <= tol ||v_t||, the CG
iterations and HVPs with:
- none: plain CG, one per test point, and block CG (all test points in one Krylov space, as `block_cg` in notebook 03);
- jacobi: the exact diagonal of H + dI (needs H; a stochastic estimate would approximate it);
- block-diagonal: the exact diagonal blocks of H + dI, per layer (weight and bias together): the best that any
  layer-wise (K-FAC-like) preconditioner could reach;
- top-r eigenvectors: the exact r largest eigenpairs of H + dI folded into M (deflation): the best that any rank-r
  low-rank preconditioner could reach, sketch cost not counted;
- nystrom-r: randomized Nystrom (Frangella, Tropp and Udell, 2023, SIAM J. Matrix Anal. Appl. 44(2)), the
  preconditioner pyDVL offers: a Gaussian sketch of rank r costs r HVPs, counted.
With --case cnn, H is formed once and the products are with the matrix (float64); the iteration counts are those of
the HVP solvers up to rounding. With --case fashion (p = 61,706), only the Nystrom rows run, through the engine's HVPs.
"""
import argparse, sys, time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cases import ROOT, load_case                                      # noqa: E402
from influence_nb.scoring import Influence                             # noqa: E402
from influence_nb.ihvp import _orth_rows                               # noqa: E402

TOL = {"cnn": 1e-6, "fashion": 1e-4}      # the CG tolerances of peers.py


def block_pcg(A, V, Minv, tol, max_iter=2000):
    "Block preconditioned CG on A X = V (rows); returns (iterations, HVPs). A and Minv act on rows."
    rank_tol = torch.finfo(V.dtype).eps ** 0.5
    vn = V.norm(dim=1)
    X, R, it, hvps = torch.zeros_like(V), V.clone(), 0, 0
    P = _orth_rows(Minv(R), rank_tol)
    while bool((R.norm(dim=1) / vn > tol).any()) and it < max_iter:
        Q = A(P); hvps += len(P)
        PtQ = P @ Q.T
        L = torch.linalg.cholesky((PtQ + PtQ.T) / 2)
        alpha = torch.cholesky_solve(P @ R.T, L)
        X, R, it = X + alpha.T @ P, R - alpha.T @ Q, it + 1
        active = R.norm(dim=1) / vn > tol
        if not bool(active.any()): break
        Z = Minv(R)
        P = _orth_rows((Z - torch.cholesky_solve(Q @ Z.T, L).T @ P)[active], rank_tol)
    return it, hvps


def pcg(A, V, Minv, tol, max_iter=5000):
    "One preconditioned CG per row of V, advanced together; returns (iterations of the slowest, HVPs in all)."
    vn = V.norm(dim=1)
    X, R = torch.zeros_like(V), V.clone()
    Z = Minv(R); P = Z.clone(); rz = (R * Z).sum(1)
    active, it, hvps = R.norm(dim=1) / vn > tol, 0, 0
    while bool(active.any()) and it < max_iter:
        idx = active.nonzero().flatten()
        AP = A(P[idx]); hvps += len(idx)
        a = rz[idx] / (P[idx] * AP).sum(1)
        X[idx] += a[:, None] * P[idx]; R[idx] -= a[:, None] * AP
        Zi = Minv(R[idx]); rz_new = (R[idx] * Zi).sum(1)
        P[idx] = Zi + (rz_new / rz[idx])[:, None] * P[idx]; rz[idx] = rz_new
        it += 1
        active = R.norm(dim=1) / vn > tol
    return it, hvps


def nystrom(A, p, r, dtype, seed=0):
    "Randomized Nystrom approximation U diag(lam) U^T of the PSD operator A from r products (one pass of r vectors)."
    g = torch.Generator().manual_seed(seed)
    Om = torch.linalg.qr(torch.randn(p, r, generator=g, dtype=dtype))[0].T.contiguous()     # (r, p), orthonormal rows
    Y = A(Om)
    nu = torch.finfo(dtype).eps ** 0.5 * Y.norm()                                           # shift for stability
    Yn = Y + nu * Om
    C = torch.linalg.cholesky((Om @ Yn.T + Yn @ Om.T) / 2)
    B = torch.linalg.solve_triangular(C, Yn, upper=False)                                    # C^-1 Y_nu, (r, p)
    U, S, _ = torch.linalg.svd(B.T, full_matrices=False)
    return U, (S ** 2 - nu).clamp_min(0)


def lowrank_inverse(U, lam, floor):
    "M^-1 = floor U diag(1/lam) U^T + (I - U U^T): the r directions of U scaled to `floor`, the rest left alone."
    lam = lam.clamp_min(floor)
    return lambda R: ((R @ U) * (floor / lam - 1)) @ U.T + R


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", default="cnn", choices=["cnn", "fashion"])
    ap.add_argument("--ranks", default="10,20,50,100", help="Nystrom sketch ranks")
    args = ap.parse_args()
    torch.set_num_threads(1)
    case = load_case(args.case)
    tol, ranks = TOL[args.case], [int(r) for r in args.ranks.split(",")]
    inf = Influence(case.model, nn.functional.cross_entropy, (case.X_train, case.y_train),
                    weight_decay=case.weight_decay, damping=case.damping, batch_size=case.batch_size,
                    hessian_data=None if case.hessian_idx is None else case.hessian_data())
    V = inf.grad_matrix((case.X_test, case.y_test))
    p, rows = inf.num_params, []
    print(f"case {args.case}: {case.describe}; δ = {case.damping:g}, tol {tol:g}, {len(V)} right-hand sides, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", flush=True)
    if args.case == "cnn":
        path = ROOT / "models" / "cnn_hessian.pt"
        if path.exists(): H = torch.load(path)
        else:
            t0 = time.perf_counter()
            H = inf.hessian(); path.parent.mkdir(parents=True, exist_ok=True); torch.save(H, path)
            print(f"formed H in {time.perf_counter() - t0:.0f} s (cached in {path})", flush=True)
        Am = H.double() + case.damping * torch.eye(p, dtype=torch.float64)
        A, V = (lambda P: P @ Am), V.double()
        ev, U = torch.linalg.eigh(Am)
        q = torch.quantile(ev, torch.tensor([0.01, 0.5, 0.99], dtype=ev.dtype)).tolist()
        print(f"spectrum of H + δI: min {ev[0]:.3g}, max {ev[-1]:.3g}, condition number {ev[-1] / ev[0]:.0f}; "
              f"quantiles 1% {q[0]:.3g}, 50% {q[1]:.3g}, 99% {q[2]:.3g}; {int((ev > 1).sum())} eigenvalues above 1, "
              f"{int((ev < ev[0] * 2).sum())} below twice the smallest", flush=True)
        d = torch.diagonal(Am)
        sizes = [t.numel() for t in inf.flat.unflatten(torch.zeros(p)).values()]
        blocks, o = [], 0
        for i in range(0, len(sizes), 2):                           # (weight, bias) of each layer
            s = sum(sizes[i:i + 2]); blocks.append((o, o + s, torch.linalg.inv(Am[o:o + s, o:o + s]))); o += s
        def blockdiag(R):
            out = torch.empty_like(R)
            for a, b, Bi in blocks: out[:, a:b] = R[:, a:b] @ Bi
            return out
        pre = [("none", lambda R: R, 0), ("jacobi (exact diagonal)", lambda R: R / d, 0),
               ("block-diagonal per layer (exact blocks)", blockdiag, 0)]
        pre += [(f"top-{r} eigenvectors (exact)", lowrank_inverse(U[:, -r:], ev[-r:], float(ev[-r - 1])), 0)
                for r in (10, 50, 200)]
    else:
        A = lambda P: inf.hvp(P) + inf.damping * P
        pre = [("none", lambda R: R, 0)]
    for r in ranks:
        t0 = time.perf_counter()
        Un, lam = nystrom(A, p, r, V.dtype)
        pre.append((f"nystrom-{r} (randomized, sketch counted)", lowrank_inverse(Un, lam, float(lam[-1])), r))
        print(f"  nystrom sketch rank {r}: {time.perf_counter() - t0:.1f} s", flush=True)
    for name, Minv, cost in pre:
        t0 = time.perf_counter()
        bi, bh = block_pcg(A, V, Minv, tol)
        si, sh = pcg(A, V, Minv, tol) if args.case == "cnn" or name == "none" else (None, None)
        rows.append((name, bi, bh + cost, si, None if sh is None else sh + cost))
        print(f"  {name}: block CG {bi} iterations, {bh + cost} HVPs; CG per test point {si} iterations (slowest), "
              f"{None if sh is None else sh + cost} HVPs  [{time.perf_counter() - t0:.1f} s]", flush=True)
    base = rows[0]
    print("\n| preconditioner | block CG iterations | block CG HVPs | vs none | CG iterations (slowest) | CG HVPs "
          "| vs none |")
    print("|---|---|---|---|---|---|---|")
    for name, bi, bh, si, sh in rows:
        print(f"| {name} | {bi} | {bh} | {bh / base[2]:.2f}x | {si if si is not None else ''} | "
              f"{sh if sh is not None else ''} | {'' if sh is None else f'{sh / base[4]:.2f}x'} |")


if __name__ == "__main__":
    main()
