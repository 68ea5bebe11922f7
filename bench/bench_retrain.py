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

`--case resnet18` (the paper's deep-net protocol, Section 5.3: 40 removals of a BatchNorm network retrained from θ*):
torchvision's `resnet18(num_classes=10)` on random 3x32x32 images, K = 40 removals, a few SGD steps of batch 32 (with
momentum and weight decay). Three variants, each in a subprocess of its own so that its peak resident memory (VmHWM
from /proc/self/status; tracemalloc does not see torch's allocations) is its own: a sequential loop of K
`retrain_sequential` runs; `loo_retrain` as the library runs it (`fast=True`: on a CPU it trains such a model model by
model, the 'loop' path of `train_stack`, control run included); and `loo_retrain(fast=False)`, the `vmap` stack, in
chunks of `--vmap-chunk` removals (each chunk with its own control). The sequential loop and the library run are timed
`--repeats` times, interleaved; the `vmap` stack once. Under 5 minutes on a 2-core VM; `--quick` for 8 removals.
The last column compares each variant's test losses with the sequential loop's: the loop path runs the very same
kernels (identical numbers); the `vmap` stack runs grouped convolutions, whose float32 rounding is amplified by
BatchNorm in this untrained network (a float64 run of the worst removal is about as far from either float32 result).

    python bench/bench_retrain.py --case resnet18           # K = 40, 3 steps of batch 32, 1 thread
    python bench/bench_retrain.py --case resnet18 --quick   # K = 8, 2 steps

`--case crossover` times one `train_stack` on the `vmap` path against the loop (`LOOP_MIN_FLOPS = 0`) for small
residual nets of growing width and image size and for BatchNorm MLPs of growing width, and prints the forward FLOPs of
one model on one minibatch next to the ratio: where `stack_path` puts its threshold `LOOP_MIN_FLOPS`.
"""
import argparse, json, os, statistics, subprocess, sys, time
import torch
from torch import nn
from influence_nb import retrain as retrain_mod
from influence_nb.retrain import (RetrainConfig, loo_retrain, retrain_sequential, removal_weights,
                                  per_example_cross_entropy, fast_path_layers, stack_path, stack_state, train_stack)


def timed(f):
    "Run f(); return (result, wall seconds, CPU seconds of this process)."
    w0, c0 = time.perf_counter(), time.process_time()
    r = f()
    return r, time.perf_counter() - w0, time.process_time() - c0


def iris(args):
    "The Iris case: K removals, 7,500 full-batch GD steps each, batched (fast path) vs a sequential loop."
    from sklearn.datasets import load_iris
    args.k = 20 if args.k is None else args.k
    args.steps = 7500 if args.steps is None else args.steps
    args.lr = 0.1 if args.lr is None else args.lr
    args.weight_decay = 1e-3 if args.weight_decay is None else args.weight_decay
    args.repeats = 3 if args.repeats is None else args.repeats
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



# --- the deep case: torchvision ResNet-18, K = 40 removals -------------------------------------------------------
def peak_rss_mb() -> float:
    "This process's peak resident set size (VmHWM) in MB: what torch's allocations count towards, unlike tracemalloc."
    for line in open('/proc/self/status'):
        if line.startswith('VmHWM:'): return int(line.split()[1]) / 1024
    return float('nan')


def resnet_setup(args):
    "θ* (a seeded torchvision resnet18, 10 classes), n random 3x32x32 images, test points, removals, settings."
    from torchvision.models import resnet18
    torch.manual_seed(0)
    net = resnet18(num_classes=10)
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(args.n, 3, 32, 32, generator=g), torch.randint(0, 10, (args.n,), generator=g)
    Xt, yt = torch.randn(args.m, 3, 32, 32, generator=g), torch.randint(0, 10, (args.m,), generator=g)
    cfg = RetrainConfig(steps=args.steps, lr=args.lr, weight_decay=args.weight_decay, momentum=0.9,
                        batch_size=args.batch)
    return net, X, y, Xt, yt, torch.arange(args.k), cfg


def resnet_variant(args):
    "Run one variant in this process; print one JSON line: wall and CPU seconds, peak RSS, test losses, path."
    torch.set_num_threads(args.threads)
    net, X, y, Xt, yt, removed, cfg = resnet_setup(args)
    rss0 = peak_rss_mb()
    if args.variant == 'sequential':
        def run():
            out = []
            for j in removed.tolist():
                m = retrain_sequential(net, X, y, removal_weights(len(X), [j])[1], cfg).eval()
                with torch.no_grad(): out.append(per_example_cross_entropy(m(Xt), yt))
            return torch.stack(out)
        path = 'sequential'
    else:
        fast = args.variant == 'library'
        chunk = None if fast else args.vmap_chunk
        run = lambda: loo_retrain(net, X, y, Xt, yt, removed, cfg, chunk_size=chunk, keep_params=False,
                                  progress=False, fast=fast).test_losses
        path = stack_path(net, X, cfg.batch_size, fast=fast)
    L, wall, cpu = timed(run)
    print(json.dumps(dict(variant=args.variant, path=path, wall=wall, cpu=cpu, rss_setup_mb=rss0,
                          rss_peak_mb=peak_rss_mb(), losses=L.tolist())))


def spawn(args, variant):
    "One variant in a fresh process (its own peak RSS), one torch thread unless --threads says otherwise."
    cmd = [sys.executable, os.path.abspath(__file__), '--case', 'resnet18', '--variant', variant,
           '--threads', str(args.threads), '--k', str(args.k), '--steps', str(args.steps), '--batch', str(args.batch),
           '--n', str(args.n), '--m', str(args.m), '--lr', str(args.lr), '--weight-decay', str(args.weight_decay),
           '--vmap-chunk', str(args.vmap_chunk)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode: raise SystemExit(f"variant {variant} failed:\n{r.stderr[-3000:]}")
    res = json.loads(r.stdout.strip().splitlines()[-1])
    print(f"  {variant:10s} ({res['path']}): {res['wall']:6.1f} s wall, peak RSS {res['rss_peak_mb']:7.0f} MB "
          f"(after set-up {res['rss_setup_mb']:.0f} MB)", flush=True)
    return res


def resnet(args):
    "The ResNet-18 case: K removals, a few SGD steps each, sequential loop vs the library's stack vs the vmap stack."
    quick = args.quick
    args.k = (8 if quick else 40) if args.k is None else args.k
    args.steps = (2 if quick else 3) if args.steps is None else args.steps
    args.lr = 0.01 if args.lr is None else args.lr
    args.weight_decay = 5e-4 if args.weight_decay is None else args.weight_decay
    args.repeats = (1 if quick else 2) if args.repeats is None else args.repeats
    args.vmap_chunk = min(args.vmap_chunk, args.k)
    if args.variant: return resnet_variant(args)
    net, X, *_ , cfg = resnet_setup(args)
    p = sum(q.numel() for q in net.parameters())
    print(f"torchvision resnet18(num_classes=10), {p:,} parameters ({p * 4 / 2**20:.1f} MiB); n={args.n} random "
          f"3x32x32 images, {args.m} test points, K={args.k} removals, {args.steps} SGD steps of batch {args.batch} "
          f"(lr {args.lr}, momentum 0.9, λ={args.weight_decay}); torch threads={args.threads}, torch "
          f"{torch.__version__}; stack_path: {stack_path(net, X, args.batch)}", flush=True)
    runs = {'sequential': [], 'library': [], 'vmap': []}
    for r in range(args.repeats):
        for v in (('sequential', 'library') if r % 2 == 0 else ('library', 'sequential')): runs[v].append(spawn(args, v))
    if not args.no_vmap: runs['vmap'].append(spawn(args, 'vmap'))
    med = lambda v, key: statistics.median(x[key] for x in runs[v])
    t_seq = med('sequential', 'wall')
    ref = torch.tensor(runs['sequential'][0]['losses'])
    n_chunks = -(-args.k // args.vmap_chunk)
    rows = [('sequential', f"sequential loop, {args.k} `retrain_sequential` runs", args.k),
            ('library', f"`loo_retrain` (library default: {runs['library'][0]['path']}), {args.k}+1 models", args.k + 1),
            ('vmap', f"`loo_retrain(fast=False)`: vmap stack, {n_chunks} chunk(s) of {args.vmap_chunk}+1 models",
             args.k + n_chunks)]
    print("\n| variant | models trained | runs | wall (s) | CPU (s) | ms per model-step | speed-up wall | peak RSS (MB) "
          "| max abs test-loss diff vs sequential |")
    print("|---|---|---|---|---|---|---|---|---|")
    for v, label, models in rows:
        if not runs[v]: continue
        t, c, rss = med(v, 'wall'), med(v, 'cpu'), med(v, 'rss_peak_mb')
        diff = (torch.tensor(runs[v][0]['losses']) - ref).abs().max().item()
        print(f"| {label} | {models} | {len(runs[v])} | {t:.1f} | {c:.1f} | {t / (models * args.steps) * 1e3:.0f} | "
              f"{t_seq / t:.2f}x | {rss:.0f} | {diff:.1e} |")
    print(f"\npeak RSS after set-up (model, data, imports): {med('sequential', 'rss_setup_mb'):.0f} MB")


# --- where the loop overtakes vmap ---------------------------------------------------------------------------------
def time_train_stack(net, W, X, y, cfg, loop:bool) -> float:
    "Wall seconds of one train_stack of len(W) models: on the loop (LOOP_MIN_FLOPS = 0) or on the vmap path."
    old = retrain_mod.LOOP_MIN_FLOPS
    retrain_mod.LOOP_MIN_FLOPS = 0
    try: return timed(lambda: train_stack(net, *stack_state(net, len(W)), W, X, y, cfg, fast=loop))[1]
    finally: retrain_mod.LOOP_MIN_FLOPS = old


def crossover(args):
    "vmap stack vs the loop on one train_stack, for nets of growing cost: ratio against forward FLOPs per model-step."
    from torchvision.models.resnet import BasicBlock
    from torch.utils.flop_counter import FlopCounterMode
    K = 16 if args.k is None else args.k
    steps = 3 if args.steps is None else args.steps
    repeats = 3 if args.repeats is None else args.repeats

    def block(c):
        return nn.Sequential(nn.Conv2d(3, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True),
                             BasicBlock(c, c), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 10))

    def bn_mlp(w):
        return nn.Sequential(nn.Flatten(), nn.Linear(784, w), nn.BatchNorm1d(w), nn.ReLU(), nn.Linear(w, w),
                             nn.BatchNorm1d(w), nn.ReLU(), nn.Linear(w, 10))
    nets = [(f"BasicBlock net, {c} channels, {r}x{r}", lambda c=c: block(c), (3, r, r))
            for c, r in [(8, 8), (8, 16), (16, 16), (8, 32), (16, 32), (32, 32)]]
    nets += [(f"BatchNorm MLP 784-{w}-{w}-10", lambda w=w: bn_mlp(w), (784,)) for w in (64, 512, 2048)]
    print(f"K={K} models, {steps} SGD steps of batch {args.batch}, torch threads={args.threads}, medians of {repeats}; "
          f"LOOP_MIN_FLOPS = {retrain_mod.LOOP_MIN_FLOPS / 1e6:.0f} MFLOP\n")
    print("| model | forward MFLOP per model-step | vmap ms per model-step | loop ms per model-step | vmap / loop "
          "| stack_path |")
    print("|---|---|---|---|---|---|")
    for name, make, shape in nets:
        torch.manual_seed(0); net = make()
        X, y = torch.randn(256, *shape), torch.randint(0, 10, (256,))
        with FlopCounterMode(display=False) as fc, torch.no_grad(): net.eval()(X[:1])
        net.train()
        cfg = RetrainConfig(steps=steps, lr=0.01, momentum=0.9, batch_size=args.batch)
        W = removal_weights(256, range(K - 1))
        one = lambda loop: time_train_stack(net, W, X, y, cfg, loop)  # noqa: B023 (called within the iteration)
        one(False); one(True)  # warm up
        tv, tl = [], []
        for _ in range(repeats): tv.append(one(False)); tl.append(one(True))
        tv, tl = statistics.median(tv), statistics.median(tl)
        print(f"| {name} | {fc.get_total_flops() * args.batch / 1e6:.1f} | {tv / (K * steps) * 1e3:.2f} "
              f"| {tl / (K * steps) * 1e3:.2f} | {tv / tl:.2f} | {stack_path(net, X, args.batch)} |", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--case', choices=['iris', 'resnet18', 'crossover'], default='iris')
    ap.add_argument('--k', type=int, default=None, help='number of removals (iris 20, resnet18 40; crossover: models)')
    ap.add_argument('--steps', type=int, default=None, help='retraining steps per removal (iris 7,500, resnet18 3)')
    ap.add_argument('--train-steps', type=int, default=6000, help='iris: full-batch GD steps to reach θ*')
    ap.add_argument('--width', type=int, default=8); ap.add_argument('--depth', type=int, default=2)
    ap.add_argument('--lr', type=float, default=None); ap.add_argument('--weight-decay', type=float, default=None)
    ap.add_argument('--threads', type=int, default=1, help='torch.set_num_threads for every side')
    ap.add_argument('--repeats', type=int, default=None, help='repeats (medians reported; iris 3, resnet18 2)')
    ap.add_argument('--no-vmap', action='store_true', help='skip timing the general vmap path')
    ap.add_argument('--quick', action='store_true', help='resnet18: K = 8, 2 steps, 1 repeat')
    ap.add_argument('--batch', type=int, default=32, help='resnet18 / crossover: minibatch size')
    ap.add_argument('--n', type=int, default=256, help='resnet18: training images')
    ap.add_argument('--m', type=int, default=8, help='resnet18: test images')
    ap.add_argument('--vmap-chunk', type=int, default=10, help='resnet18: removals per chunk of the vmap stack')
    ap.add_argument('--variant', choices=['sequential', 'library', 'vmap'], help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    {'iris': iris, 'resnet18': resnet, 'crossover': crossover}[args.case](args)


if __name__ == '__main__':
    main()
