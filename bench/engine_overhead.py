"""What the engine's checks cost: 4 Hessian-vector products and 500 per-example gradients on LeNet-5, one thread.

    python bench/engine_overhead.py                      # this checkout
    git worktree add /tmp/old 95df9b2 && PYTHONPATH=/tmp/old python bench/engine_overhead.py   # an older engine

Run the two alternately (twice or more): on a shared machine only the overlap of repeated runs means anything.
Uses only API that both the current and older engines have (`influence_nb.Influence`, `hvp`, `grad_matrix`).
"""
import sys, time, warnings

import torch
from torch import nn

warnings.simplefilter("ignore")
torch.set_num_threads(1)
from influence_nb import Influence  # noqa: E402


def main(modes=("vmap", "loop")):
    torch.manual_seed(0)
    X, y = torch.randn(1000, 1, 28, 28), torch.randint(0, 10, (1000,))
    m = nn.Sequential(nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 16, 5), nn.ReLU(),
                      nn.MaxPool2d(2), nn.Flatten(), nn.Linear(400, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(),
                      nn.Linear(84, 10))
    for mode in modes:
        inf = Influence(m, nn.CrossEntropyLoss(), (X, y), weight_decay=1e-2, damping=1.0, batch_size=500,
                        hvp_mode=mode)
        V = torch.randn(4, inf.num_params)
        inf.hvp(V)                                        # warm-up
        ts = []
        for _ in range(6):
            t0 = time.perf_counter(); inf.hvp(V); ts.append(time.perf_counter() - t0)
        t0 = time.perf_counter(); inf.grad_matrix((X[:500], y[:500])); tg = time.perf_counter() - t0
        print(f"hvp_mode={mode}: 4 HVPs over 1,000 images min {min(ts):.3f} s, median {sorted(ts)[3]:.3f} s; "
              f"500 per-example gradients {tg:.3f} s")


if __name__ == "__main__":
    main(tuple(sys.argv[1:]) or ("vmap", "loop"))
