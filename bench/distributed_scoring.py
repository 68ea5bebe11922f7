"""Benchmark: scoring over torchrun processes (examples per second, 1 and 2 processes) against the forward+backward epoch
floor, and the peak memory of the streamed score store as the training set grows.

    python bench/distributed_scoring.py                       # LeNet-5, 20,000 images; memory up to 160,000 rows
    python bench/distributed_scoring.py --images 8000 --block-rows 1000 --sizes 10000,20000,40000,80000   # a small run

Throughput. LeNet-5 (61,706 parameters) on synthetic 1x28x28 images, batches of 256, `--tests` solved vectors (the
gradients of that many test points: the solve is an identity here, so that only the scoring pass is timed). For W = 1
and 2 processes launched by torchrun (gloo, one torch thread each, as torchrun sets), rank 0 times:
- `gathered`: `DistributedInfluence.scores`, every rank scoring its blocks of `--block-rows` rows (4,096) and the
  (m, n) scores gathered in order on every rank;
- `streamed`: `DistributedInfluence.scores_to_store`, each block written to disk as a shard as soon as it is scored;
and, in the same job, the floor: one plain forward+backward epoch (`loss.backward()`, no optimiser step) over each
rank's rows, all ranks at once. The one-process floor over all n rows is the yardstick of every ratio.

Memory. A 784-32-10 MLP, `--mem-tests` (256) test points, the training set `--sizes` rows drawn from a fixed bank of
1,024 images (so that the data itself does not grow with n). Each way runs in a fresh one-process worker, which
reports the peak resident-memory increase during the pass (`influence_nb.ihvp.peak_memory`, sampled RSS):
- `in memory`: `Influence.scores`, which returns the whole (m, n) matrix (n·m·4 bytes, and its transpose);
- `streamed`: `DistributedInfluence.scores_to_store` with shards of 4,096 rows: one shard in memory at a time.
"""
import argparse, json, os, statistics, subprocess, sys, tempfile, time
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
F = nn.functional.cross_entropy


def _identity_solver():
    from influence_nb.core import SolveInfo
    from influence_nb.solvers import IHVPSolver

    class Identity(IHVPSolver):
        "A stand-in solver returning its right-hand sides: isolates the scoring pass."
        name = "identity"
        def solve(self, op, V): return V, SolveInfo("identity", op.damping, op.weight_decay, 0.0)
    return Identity()


class Bank(torch.utils.data.Dataset):
    "n examples cycling through a fixed bank of images: the data's memory does not grow with n."
    def __init__(self, X, y, n): self.X, self.y, self.n = X, y, n
    def __len__(self): return self.n
    def __getitem__(self, i): return self.X[i % len(self.X)], self.y[i % len(self.y)]


def images(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)


# ------------------------------------------------------------------------------------------------------ workers
def throughput_worker(args) -> dict | None:
    from influence_nb.distributed import DistributedInfluence, barrier, init_distributed, teardown, all_reduce_
    from influence_nb.models import lenet
    from influence_nb.scoring import Influence
    torch.set_num_threads(1)
    d = init_distributed()
    X, y = images(args.images)
    Xt, yt = images(args.tests, seed=1)
    model = lenet().eval()
    inf = Influence(model, F, (X, y), batch_size=256, solver=_identity_solver())
    di = DistributedInfluence(inf, d, block_rows=args.block_rows)
    di.block_scores(di.test_vectors((Xt, yt)), 0, 256)           # warm-up: torch.func's lazy set-up, untimed
    rows = di.rows
    def floor():
        for a in range(rows.start, rows.stop, 256):
            model.zero_grad(set_to_none=True)
            F(model(X[a:min(a + 256, rows.stop)]), y[a:min(a + 256, rows.stop)]).backward()
    out = {"world": d.world, "n": args.images, "tests": args.tests, "floor": [], "gathered": [], "streamed": []}
    for r in range(args.repeats):
        for name, fn in (("floor", floor), ("gathered", lambda: di.scores((Xt, yt))),
                         ("streamed", lambda r=r: di.scores_to_store((Xt, yt), Path(args.store) / f"{r}"))):
            barrier(d); t0 = time.perf_counter(); fn()
            t = torch.tensor([time.perf_counter() - t0], dtype=torch.float64, device=d.device)
            barrier(d)
            out[name].append(float(all_reduce_(t, d, "max")))     # the slowest rank's time
    teardown(d)
    return out if d.main else None


def memory_worker(args) -> dict:
    from influence_nb.distributed import DistributedInfluence, Dist
    from influence_nb.ihvp import peak_memory
    from influence_nb.scoring import Influence
    torch.set_num_threads(1)
    bank = images(1024)
    Xt, yt = images(args.mem_tests, seed=1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.Tanh(), nn.Linear(32, 10)).eval()
    inf = Influence(model, F, Bank(*bank, args.size), batch_size=512, solver=_identity_solver())
    inf.grad_matrix((Xt[:2], yt[:2]))                             # warm-up: torch.func's lazy set-up, outside the peak
    if args.way == "memory":
        out, peak = peak_memory(lambda: inf.scores((Xt, yt), "grad"))
        shape = list(out.shape)
    else:
        di = DistributedInfluence(inf, Dist(), block_rows=4096)
        with tempfile.TemporaryDirectory() as tmp:
            store, peak = peak_memory(lambda: di.scores_to_store((Xt, yt), tmp, method="grad"))
            shape = [store.m, store.n]
    return {"way": args.way, "n": args.size, "peak_mb": peak / 2**20, "shape": shape}


# ------------------------------------------------------------------------------------------------------ driver
def run(cmd, env=None) -> str:
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1",
                                                                 "PYTHONWARNINGS": "ignore", **(env or {})})
    if r.returncode: raise SystemExit(f"{' '.join(cmd)} failed:\n{(r.stdout + r.stderr)[-4000:]}")
    return [line for line in r.stdout.splitlines() if line.startswith("{")][-1]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=20000, help="training images of the throughput runs")
    ap.add_argument("--tests", type=int, default=2, help="solved vectors (test points) of the throughput runs")
    ap.add_argument("--block-rows", type=int, default=4096, help="rows per block (and per shard) of the throughput runs")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--procs", default="1,2")
    ap.add_argument("--sizes", default="20000,40000,80000,160000", help="training rows of the memory runs")
    ap.add_argument("--mem-tests", type=int, default=256)
    ap.add_argument("--worker", choices=["throughput", "memory"], help=argparse.SUPPRESS)
    ap.add_argument("--way", choices=["memory", "streamed"], help=argparse.SUPPRESS)
    ap.add_argument("--size", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--store", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker == "throughput":
        out = throughput_worker(args)
        if out: print(json.dumps(out))
        return
    if args.worker == "memory":
        print(json.dumps(memory_worker(args))); return

    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the start", flush=True)
    res = {}
    with tempfile.TemporaryDirectory() as tmp:
        for w in map(int, args.procs.split(",")):
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={w}", __file__,
                   "--worker", "throughput", "--images", str(args.images), "--tests", str(args.tests), "--repeats",
                   str(args.repeats), "--block-rows", str(args.block_rows), "--store", f"{tmp}/w{w}"]
            res[w] = json.loads(run(cmd))
            print(f"{w} process(es): " + ", ".join(f"{k} {statistics.median(res[w][k]):.2f} s"
                                                   for k in ("floor", "gathered", "streamed")), flush=True)
    floor1 = statistics.median(res[min(res)]["floor"])
    print(f"\nThroughput: LeNet-5, {args.images:,} synthetic 28x28 images, {args.tests} test points, batches of 256, one "
          f"torch thread per process, median of {args.repeats}. Floor: one forward+backward epoch in one process, "
          f"{floor1:.2f} s ({args.images / floor1:,.0f} examples/s).\n")
    print("| processes | pass | median wall (s) | examples/s | / 1-process epoch floor (time) | speed-up over 1 process |")
    print("|---|---|---|---|---|---|")
    for w, r in res.items():
        for k in ("floor", "gathered", "streamed"):
            t = statistics.median(r[k])
            base = statistics.median(res[min(res)][k])
            print(f"| {w} | {k} | {t:.2f} | {args.images / t:,.0f} | {t / floor1:.2f}x | {base / t:.2f}x |")

    mem = []
    for n in map(int, args.sizes.split(",")):
        for way in ("memory", "streamed"):
            mem.append(json.loads(run([sys.executable, __file__, "--worker", "memory", "--way", way, "--size", str(n),
                                       "--mem-tests", str(args.mem_tests)])))
            print(f"memory: n {n:,}, {way}: {mem[-1]['peak_mb']:.1f} MB", flush=True)
    print(f"\nPeak memory of the scoring pass (784-32-10 MLP, {args.mem_tests} test points, one process, fresh "
          "worker per row; the (m, n) matrix alone is n·m·4 bytes):\n")
    print("| n | (m, n) matrix (MB) | in memory: peak (MB) | streamed: peak (MB) | streamed / in memory |")
    print("|---|---|---|---|---|")
    for a, b in zip(mem[::2], mem[1::2]):
        print(f"| {a['n']:,} | {a['n'] * args.mem_tests * 4 / 2**20:.1f} | {a['peak_mb']:.1f} | {b['peak_mb']:.1f} | "
              f"{b['peak_mb'] / a['peak_mb']:.2f} |")


if __name__ == "__main__":
    main()
