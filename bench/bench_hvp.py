"""Benchmark: the cost of one Hessian-vector product, forward-over-reverse vs reverse-over-reverse, per model.

    python bench/bench_hvp.py                 # iris MLP, small MNIST CNN, LeNet-5; 1 torch thread, 5 repeats

For each model and one batch, k vectors (64 for the MLP, 8 or 10 for the convolutional nets), milliseconds per vector:
- fwd-over-rev, vmap:  vmap over v of jvp(grad(f), θ, v), the engine's HVP before this benchmark;
- fwd-over-rev, loop:  the same, one vector at a time;
- rev-over-rev, loop:  vjp(grad(f), θ) once per batch (forward and first backward kept), then its pull-back per vector;
- rev-over-rev, vmap:  that pull-back vmapped over the vectors;
- 'auto':              the engine's `Influence.hvp` with hvp_mode='auto' (times loop and vmap on its first calls for
                       this batch size and keeps the faster).
and one plain forward+backward of the batch for scale. Medians over repeats, interleaved.
"""
import argparse, statistics, sys, time
from pathlib import Path

import torch
from torch.func import grad, jvp, vjp, vmap

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cases import iris_case, cnn_case, lenet                 # noqa: E402
from influence_nb.scoring import Influence                     # noqa: E402


def models():
    c = iris_case(); yield "iris MLP (139 params, float64, batch 120)", c.model, c.X_train, c.y_train, 64
    c = cnn_case(); yield "small MNIST CNN (2,506 params, batch 300)", c.model, c.X_train, c.y_train, 8
    g = torch.Generator().manual_seed(0)
    yield ("LeNet-5 (61,706 params, batch 500)", lenet(), torch.randn(500, 1, 28, 28, generator=g),
           torch.randint(0, 10, (500,), generator=g), 8)
    yield ("LeNet-5 (61,706 params, batch 100, 10 vectors: LiSSA's step)", lenet(),
           torch.randn(100, 1, 28, 28, generator=g), torch.randint(0, 10, (100,), generator=g), 10)


def hvp_jobs(model, F, X, y, k):
    "The ways to take k HVPs of one case, as zero-argument jobs (closures over this call, not over a loop)."
    inf = Influence(model, F, (X, y), batch_size=len(y))
    V = torch.randn(k, inf.num_params, dtype=inf.dtype, generator=torch.Generator().manual_seed(1))
    g = lambda th: grad(inf.batch_loss)(th, X, y)
    f1 = lambda v: jvp(g, (inf.theta,), (v,))[1]
    def rr_loop():
        _, pull = vjp(g, inf.theta); return torch.stack([pull(v)[0] for v in V])
    def rr_vmap():
        _, pull = vjp(g, inf.theta); return vmap(lambda v: pull(v)[0])(V)
    engine = Influence(model, F, (X, y), batch_size=len(y))
    for _ in range(6): engine.hvp(V)                # 'auto' tries each way three times, then keeps the faster
    def auto():
        return engine.hvp(V)
    def fb():
        model.zero_grad(); F(model(X), y).backward()
    jobs = {"fr_vmap": lambda: vmap(f1)(V), "fr_loop": lambda: torch.stack([f1(v) for v in V]),
            "rr_loop": rr_loop, "rr_vmap": rr_vmap, "auto": auto, "fb": fb}
    return inf, engine, V, jobs


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    F = torch.nn.functional.cross_entropy
    print("| model | fwd-over-rev vmap | fwd-over-rev loop | rev-over-rev loop | rev-over-rev vmap | engine 'auto' "
          "(picked) | forward+backward | speed-up of 'auto' over fwd-over-rev vmap |")
    print("|---|---|---|---|---|---|---|---|")
    for name, model, X, y, k in models():
        inf, engine, V, jobs = hvp_jobs(model, F, X, y, k)
        ref = jobs["fr_vmap"]()
        for nm in ("rr_loop", "rr_vmap", "auto"):      # same numbers, whichever way
            torch.testing.assert_close(jobs[nm]() - inf.weight_decay * V, ref, rtol=1e-4, atol=1e-4)
        times = {nm: [] for nm in jobs}
        for _ in range(args.repeats):
            for nm, f in jobs.items():
                t0 = time.perf_counter(); f(); times[nm].append(time.perf_counter() - t0)
        ms = {nm: statistics.median(v) * 1e3 / (1 if nm == "fb" else k) for nm, v in times.items()}
        print(f"| {name} | {ms['fr_vmap']:.3g} | {ms['fr_loop']:.3g} | {ms['rr_loop']:.3g} | {ms['rr_vmap']:.3g} | "
              f"{ms['auto']:.3g} ({engine.hvp_modes.get(len(y))}) | {ms['fb']:.3g} "
              f"| {ms['fr_vmap'] / ms['auto']:.1f}x |",
              flush=True)
    print("\nms per vector (forward+backward: ms per batch); medians of", args.repeats, "repeats,", args.threads,
          "thread(s)")


if __name__ == "__main__":
    main()
