"""Table 2 of the paper on synthetic data: seconds of influence per test point (solve + scoring pass over the training set).

The paper (Basu et al. 2021, Appendix C, Table 2) times LiSSA's inverse-HVP for one test point and the dot products with
every training gradient. This script times the same computation with the package's estimators on random images of the
data set's shape, so it runs where no data set is present (a GPU machine with no network):

    PYTHONPATH=. python bench/table2_timing.py --device cuda            # the GPU check (bench/gpu_check.sh)
    PYTHONPATH=. python bench/table2_timing.py --quick                  # a smoke run on the CPU

It prints one line per architecture: parameters, the estimator's settings, seconds per test point, and the paper's figure.
"""
import argparse
import time

import torch

from influence_nb.data import ImageData
from influence_nb.deep import DeepConfig, PAPER_TABLE2, estimate, hardware, new_model


def synthetic(shape, n_train: int, n_test: int, seed: int = 0) -> ImageData:
    "Random images in [0, 1] with balanced labels, shaped like the data set."
    g = torch.Generator().manual_seed(seed)
    return ImageData(torch.rand(n_train, *shape, generator=g), torch.arange(n_train) % 10,
                     torch.rand(n_test, *shape, generator=g), torch.arange(n_test) % 10, "synthetic", "synthetic",
                     [str(i) for i in range(10)])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--archs", nargs="+", default=["lenet", "resnet18", "resnet50"])
    p.add_argument("--data", default="cifar10", choices=["mnist", "cifar10"], help="input shape and the paper's column")
    p.add_argument("--n-train", type=int, default=10000, help="training points of the scoring pass")
    p.add_argument("--tests", type=int, default=2, help="test points (time is per test point)")
    p.add_argument("--depth", type=int, default=200, help="LiSSA depth (the paper's protocol used thousands)")
    p.add_argument("--lissa-batch", type=int, default=128)
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--device", default="auto")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    a = p.parse_args(argv)
    if a.quick: a.n_train, a.depth, a.width, a.tests = 256, 5, 0.125, 1
    shape = (1, 28, 28) if a.data == "mnist" else (3, 32, 32)
    data = synthetic(shape, a.n_train, max(a.tests, 2))
    cfg = DeepConfig(device=a.device, width=a.width, lissa=dict(depth=a.depth, repeats=1, batch_size=a.lissa_batch),
                     engine_batch=512)
    print(f"Table 2 on synthetic {a.data}-shaped data, {a.n_train:,} training points, LiSSA depth {a.depth}, batch "
          f"{a.lissa_batch}, width {a.width}; {hardware()}")
    for arch in a.archs:
        m = new_model(cfg, data, arch).eval()
        t0 = time.perf_counter()
        e, _ = estimate(m, data, cfg, 1e-3, list(range(a.tests)), "lissa")
        wall = time.perf_counter() - t0
        paper = PAPER_TABLE2[arch].get(a.data)
        got = "failed: " + e.error if e.error else f"{e.seconds_per_test:8.2f} s per test point"
        ref = f"paper {paper[0]:.0f} ± {paper[1]:.0f} s at its own depth and data size" if paper else "no paper figure"
        print(f"{arch:>9}: {sum(p.numel() for p in m.parameters()):>11,} parameters  {got}  (wall {wall:.1f} s; {ref})")


if __name__ == "__main__":
    main()
