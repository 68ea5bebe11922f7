"""Benchmark: K leave-one-out retrains on Iris, batched (one stack of K + 1 models) vs a plain sequential loop.

Protocol (paper, Section 5.1): start from θ*, remove one training example, run 7,500 full-batch GD steps.
Both sides run in the same process on the same θ*, data, settings and thread count; the batched side also trains the
control model (K + 1 models), so the comparison is conservative. The batched side takes the fast path of
`train_stack` (batched matmuls, no vmap) because the model is an nn.Sequential of Linear and Tanh layers; the general
`vmap(functional_call)` path (`fast=False`) is timed once as well, for comparison. Run on demand (not part of the
tests):

    python bench/bench_retrain.py                 # K = 20, 7,500 steps, 1 torch thread, 3 repeats
    python bench/bench_retrain.py --threads 2     # let torch use 2 threads

The machine may be shared, so the load can change during a run: every repeat times the batched stack three times
(before, between the two halves of the sequential loop, and after), and the table reports medians over all of them.
"""
import argparse, statistics, time
import torch
from torch import nn
from sklearn.datasets import load_iris
from influence_nb.retrain import (RetrainConfig, loo_retrain, retrain_sequential, removal_weights,
                                  per_example_cross_entropy, fast_path_layers)


def timed(f):
    "Run f(); return (result, wall seconds, CPU seconds of this process)."
    w0, c0 = time.perf_counter(), time.process_time()
    r = f()
    return r, time.perf_counter() - w0, time.process_time() - c0


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--k', type=int, default=20, help='number of removals')
    ap.add_argument('--steps', type=int, default=7500, help='retraining steps per removal')
    ap.add_argument('--train-steps', type=int, default=6000, help='full-batch GD steps to reach θ*')
    ap.add_argument('--width', type=int, default=8); ap.add_argument('--depth', type=int, default=2)
    ap.add_argument('--lr', type=float, default=0.1); ap.add_argument('--weight-decay', type=float, default=1e-3)
    ap.add_argument('--threads', type=int, default=1, help='torch.set_num_threads for both sides')
    ap.add_argument('--repeats', type=int, default=3, help='repeats of the whole comparison (medians reported)')
    ap.add_argument('--no-vmap', action='store_true', help='skip timing the general vmap path')
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    X, y = load_iris(return_X_y=True)
    X = torch.tensor((X - X.mean(0)) / X.std(0), dtype=torch.float32); y = torch.tensor(y)
    perm = torch.randperm(150, generator=torch.Generator().manual_seed(0))
    Xtr, ytr, Xte, yte = X[perm[:120]], y[perm[:120]], X[perm[120:]], y[perm[120:]]
    torch.manual_seed(0)
    layers, d = [], 4
    for _ in range(args.depth): layers += [nn.Linear(d, args.width), nn.Tanh()]; d = args.width
    net = nn.Sequential(*layers, nn.Linear(d, 3))
    net = retrain_sequential(net, Xtr, ytr, torch.ones(len(Xtr)),
                             RetrainConfig(args.train_steps, args.lr, args.weight_decay))
    cfg = RetrainConfig(steps=args.steps, lr=args.lr, weight_decay=args.weight_decay)
    removed = torch.arange(args.k)
    p = sum(q.numel() for q in net.parameters())
    assert fast_path_layers(net, Xtr) is not None
    print(f"Iris tanh MLP depth {args.depth} width {args.width} ({p} params), n={len(Xtr)}, K={args.k}, "
          f"T={args.steps} full-batch GD steps, lr={args.lr}, λ={args.weight_decay}, "
          f"torch threads={torch.get_num_threads()}, "
          f"torch {torch.__version__}")

    batched = lambda fast=True: loo_retrain(net, Xtr, ytr, Xte, yte, removed, cfg, progress=False, fast=fast)

    def sequential(idx):
        out = []
        for j in idx.tolist():
            m = retrain_sequential(net, Xtr, ytr, removal_weights(len(Xtr), [j])[1], cfg)
            with torch.no_grad(): out.append(per_example_cross_entropy(m.eval()(Xte), yte))
        return out

    seq_runs, bat_runs = [], []
    for r in range(args.repeats):
        bat_runs.append(timed(batched))
        seq, w, c = [], 0.0, 0.0
        for half in (removed[: args.k // 2], removed[args.k // 2:]):
            out, dw, dc = timed(lambda half=half: sequential(half))
            seq += out; w += dw; c += dc
            bat_runs.append(timed(batched))
        seq_runs.append((torch.stack(seq), w, c))
        last = ", ".join(f"{b[1]:.2f}" for b in bat_runs[-3:])
        print(f"  repeat {r + 1}: sequential {w:6.2f} s wall, batched " + last
              + f" s wall -> {w / statistics.median(b[1] for b in bat_runs[-3:]):.1f}x", flush=True)
    vm = None if args.no_vmap else timed(lambda: batched(fast=False))

    med = lambda xs: statistics.median(xs)
    t_seq, c_seq = med(s[1] for s in seq_runs), med(s[2] for s in seq_runs)
    t_bat, c_bat = med(b[1] for b in bat_runs), med(b[2] for b in bat_runs)
    res = bat_runs[0][0]
    diff = (seq_runs[0][0] - res.test_losses).abs().max().item()
    T = args.steps
    print("\n| threads | path | wall (s) | CPU (s) | µs per step | speed-up wall | speed-up CPU |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {args.threads} | sequential loop, {args.k} retrains (median of {len(seq_runs)}) | {t_seq:.2f} "
          f"| {c_seq:.2f} "
          f"| {t_seq / (args.k * T) * 1e6:.0f} (one model) | 1.0x | 1.0x |")
    print(f"| {args.threads} | batched fast path, {args.k}+1 models (median of {len(bat_runs)}) | {t_bat:.2f} "
          f"| {c_bat:.2f} "
          f"| {t_bat / T * 1e6:.0f} (stack) | **{t_seq / t_bat:.1f}x** | {c_seq / c_bat:.1f}x |")
    if vm is not None:
        print(f"| {args.threads} | batched vmap path (`fast=False`), {args.k}+1 models (1 run) | {vm[1]:.2f} "
              f"| {vm[2]:.2f} "
              f"| {vm[1] / T * 1e6:.0f} (stack) | {t_seq / vm[1]:.1f}x | {c_seq / vm[2]:.1f}x |")
    print(f"\ntarget: batched >= 10x faster than sequential (wall): {'met' if t_seq / t_bat >= 10 else 'NOT met'}")
    print(f"max |test-loss difference| batched (fast) vs sequential: {diff:.2e}")
    if vm is not None:
        d_vm = (vm[0].test_losses - res.test_losses).abs().max().item()
        print(f"max |test-loss difference| batched fast vs vmap path:    {d_vm:.2e}")


if __name__ == '__main__':
    main()
