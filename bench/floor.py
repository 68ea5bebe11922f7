"""Benchmark: our scoring pass over the training set against the floor of one plain forward+backward epoch.

    python bench/floor.py --case fashion        # LeNet-5, 60,000 Fashion-MNIST training images
    python bench/floor.py --case cnn --repeats 5

Scoring is the last step of every influence computation: with the solved vectors s_t = (H + δI)⁻¹∇ℓ_t in hand, one pass
over the training set gives s_tᵀ∇ℓ_j for every training point j. Timed here, with an identity "solver" so that only the
pass is measured, for 1 and for 10 test points and each of our scoring methods:
- 'grad':  per-example gradients (vmap of grad) of each batch, multiplied by the k solved vectors;
- 'jvp':   forward-mode directional derivatives of the per-example losses along each solved vector (no per-example
           gradients), k of them per batch;
- 'layer': one backward pass for ∂ℓ_j/∂z at every layer output, then per-example kernel gradients of each Linear by
           one batched product with its input and of each convolution by one grouped convolution, and one product with
           the k solved vectors;
- 'auto':  what `Influence.scores` picks ('jvp' for at most 2 test points, else 'layer' when every parameter sits in a
           Linear or convolution, else 'grad').
The floor is one epoch of `loss.backward()` over the same batches (no optimiser step), the cheapest pass that touches
every training gradient. One torch thread; repeats interleaved; medians printed.
"""
import argparse, statistics, sys, time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cases import load_case                                            # noqa: E402
from influence_nb.core import SolveInfo                              # noqa: E402
from influence_nb.solvers import IHVPSolver                          # noqa: E402
from influence_nb.scoring import Influence                           # noqa: E402


class Identity(IHVPSolver):
    "A stand-in solver returning its right-hand sides: isolates the scoring pass."
    name = "identity"
    def solve(self, inf, V): return V, SolveInfo("identity", inf.damping, inf.weight_decay, 0.0)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", default="fashion")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    case = load_case(args.case)
    F = torch.nn.functional.cross_entropy
    model, bs = case.model, case.batch_size
    X, y = case.X_train, case.y_train

    def epoch():
        for i in range(0, len(y), bs):
            model.zero_grad(set_to_none=True)
            F(model(X[i:i + bs]), y[i:i + bs]).backward()

    def scoring(k, method):
        inf = Influence(model, F, (X, y), weight_decay=case.weight_decay, damping=case.damping, solver=Identity(),
                        batch_size=bs)
        return lambda: inf.scores((case.X_test[:k], case.y_test[:k]), method=method)

    jobs = {"epoch floor (forward+backward)": epoch}
    for k in (1, 10):
        for method in ("grad", "jvp", "layer", "auto"):
            jobs[f"scoring, {k:2d} test point{'s' if k > 1 else ' '}, {method}"] = scoring(k, method)
    epoch()                          # warm-up (lazy set-up), untimed
    times = {name: [] for name in jobs}
    for r in range(args.repeats):
        for name, f in jobs.items():
            t0 = time.perf_counter(); f(); times[name].append(time.perf_counter() - t0)
        print(f"repeat {r + 1}: " + ", ".join(f"{v[-1]:.2f}" for v in times.values()), flush=True)
    floor = statistics.median(times["epoch floor (forward+backward)"])
    print(f"\ncase {args.case}: {case.describe}; batch {bs}, {args.threads} torch thread(s), "
          f"median of {args.repeats}\n")
    print("| pass | median wall (s) | / epoch floor | per test point / epoch floor |")
    print("|---|---|---|---|")
    for name, v in times.items():
        m = statistics.median(v)
        k = 10 if "10 test" in name else 1
        per = f"{m / floor / k:.2f}" if "scoring" in name else ""
        print(f"| {name} | {m:.3g} | {m / floor:.2f}x | {per} |")


if __name__ == "__main__":
    main()
