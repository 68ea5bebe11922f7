"""Benchmark: K leave-one-out retrains on Iris, batched (one vmapped stack) vs a plain sequential loop.

Protocol (paper, Section 5.1): start from θ*, remove one training example, run 7,500 full-batch GD steps.
Both sides run in the same process on the same θ*, data, settings and thread count; the batched side also trains the
control model (K + 1 models), so the comparison is conservative. Run on demand (not part of the tests):

    python bench/bench_retrain.py                 # K = 20, 7,500 steps, 1 torch thread
    python bench/bench_retrain.py --threads 2     # let torch use 2 threads
"""
import argparse, time
import torch
from torch import nn
from sklearn.datasets import load_iris
from influence_nb.retrain import RetrainConfig, loo_retrain, retrain_sequential, removal_weights, per_example_cross_entropy


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--k', type=int, default=20, help='number of removals')
    ap.add_argument('--steps', type=int, default=7500, help='retraining steps per removal')
    ap.add_argument('--train-steps', type=int, default=6000, help='full-batch GD steps to reach θ*')
    ap.add_argument('--width', type=int, default=8); ap.add_argument('--depth', type=int, default=2)
    ap.add_argument('--lr', type=float, default=0.1); ap.add_argument('--weight-decay', type=float, default=1e-3)
    ap.add_argument('--threads', type=int, default=1, help='torch.set_num_threads for both sides')
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
    net = retrain_sequential(net, Xtr, ytr, torch.ones(len(Xtr)), RetrainConfig(args.train_steps, args.lr, args.weight_decay))
    cfg = RetrainConfig(steps=args.steps, lr=args.lr, weight_decay=args.weight_decay)
    removed = torch.arange(args.k)
    p = sum(q.numel() for q in net.parameters())
    print(f"Iris tanh MLP depth {args.depth} width {args.width} ({p} params), n={len(Xtr)}, K={args.k}, "
          f"T={args.steps} full-batch GD steps, lr={args.lr}, λ={args.weight_decay}, torch threads={torch.get_num_threads()}")

    def batched():
        w0, c0 = time.perf_counter(), time.process_time()
        res = loo_retrain(net, Xtr, ytr, Xte, yte, removed, cfg, progress=False)
        return res, time.perf_counter() - w0, time.process_time() - c0

    # The machine may be shared, so the load can change during the run: time the batched stack three times
    # (before, between the two halves of the sequential loop, and after) and compare with the median of those.
    seq, t_seq, c_seq, bat = [], 0.0, 0.0, [batched()]
    for half in (removed[: args.k // 2], removed[args.k // 2:]):
        w0, c0 = time.perf_counter(), time.process_time()
        for j in half.tolist():
            m = retrain_sequential(net, Xtr, ytr, removal_weights(len(Xtr), [j])[1], cfg)
            with torch.no_grad(): seq.append(per_example_cross_entropy(m.eval()(Xte), yte))
        t_seq += time.perf_counter() - w0; c_seq += time.process_time() - c0
        bat.append(batched())
    res = bat[0][0]
    t_bat = sorted(b[1] for b in bat)[1]; c_bat = sorted(b[2] for b in bat)[1]

    diff = (torch.stack(seq) - res.test_losses).abs().max().item()
    print(f"sequential loop : {t_seq:8.2f} s wall, {c_seq:8.2f} s CPU  ({t_seq / args.k:.2f} s wall per retrain)")
    print(f"batched (K+1)   : {t_bat:8.2f} s wall, {c_bat:8.2f} s CPU  (median of 3: "
          + ", ".join(f"{b[1]:.2f}" for b in bat) + " s wall; control model included)")
    print(f"speed-up        : {t_seq / t_bat:8.1f}x wall, {c_seq / c_bat:.1f}x CPU   (target >= 10x)")
    print(f"max |test-loss difference| batched vs sequential: {diff:.2e}")


if __name__ == '__main__':
    main()
