"""solver='auto' against the clock: its predicted seconds for exact, CG and block CG next to each one's measured time.

    python bench/auto_plan.py                 # small CNN (2,506 parameters), 300 MNIST digits, GGN, 1 and 20 test points
    python bench/auto_plan.py --width 0.5 --n 200 --tests 1,8    # the notebook's (03e) quick version

Each solve runs on a fresh operator (nothing cached between them), float64, weight decay 1e-3, damping 1e-2, one torch
thread unless --threads. The plan is right when the solver it picks is the fastest or close to it; the prediction of CG is
a textbook upper bound on its iterations, so CG usually beats its prediction.
"""
import argparse, time

import torch
import torch.nn.functional as F
from torch import nn

import influence_nb  # noqa: F401  (registers 'ggn' and 'auto')
from influence_nb.data import load_images
from influence_nb.models import make_model
from influence_nb.scoring import Influence


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=float, default=1.0)
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--tests", default="1,20")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    digits = load_images("mnist", n_train=a.n, n_test=100, seed=0)
    cnn = make_model("small-cnn", (1, 28, 28), 10, width=a.width, seed=0)
    sgd = torch.optim.SGD(cnn.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(10):
        for idx in torch.randperm(a.n, generator=gen).split(64):
            sgd.zero_grad(); F.cross_entropy(cnn(digits.X_train[idx]), digits.y_train[idx]).backward(); sgd.step()
    print(f"small CNN width {a.width}: {sum(p.numel() for p in cnn.parameters()):,} parameters, {a.n} digits, "
          f"GGN, λ=1e-3, δ=1e-2, float64, {a.threads} thread(s)")
    print("| test points | auto chose | solver | predicted (s) | measured (s) | iterations |")
    print("|---|---|---|---|---|---|")
    for m in map(int, a.tests.split(",")):
        res = {}
        for s in ("auto", "exact", "cg", "block_cg"):
            inf = Influence(cnn, nn.CrossEntropyLoss(), (digits.X_train, digits.y_train), weight_decay=1e-3,
                            damping=1e-2, solver=s, batch_size=a.n, dtype=torch.float64, curvature="ggn")
            G = inf.grad_matrix((digits.X_test[:m], digits.y_test[:m]))
            t0 = time.perf_counter(); _, info = inf.solve(G)
            res[s] = (time.perf_counter() - t0, info)
        chosen, pred = res["auto"][1].details["chosen"], res["auto"][1].details["predicted_seconds"]
        for s in ("exact", "cg", "block_cg"):
            p = f"{pred[s]:.3g}" if s in pred else "—"
            print(f"| {m} | {chosen} | {s} | {p} | {res[s][0]:.3g} | {res[s][1].iterations or '—'} |", flush=True)
        best = min(res[s][0] for s in ("exact", "cg", "block_cg"))
        print(f"| {m} | {chosen} | auto's pick / fastest | | {res[chosen][0] / best:.2f}x | |", flush=True)


if __name__ == "__main__":
    main()
