"""Benchmark: the influence engine on a deep net, torchvision's ResNet-18 (11.2M parameters, BatchNorm in eval mode).

    python bench/deep_engine.py              # 256 random 3x32x32 images, 10 classes, 2 torch threads (1.5-4 min)
    python bench/deep_engine.py --quick      # 64 images, fewer repeats and LiSSA steps (under a minute): a smoke run
    python bench/deep_engine.py --threads 1  # one torch thread (steadier on a shared machine)

--quick's ratios are not the targets' measurement: on 64 images the scoring pass is one batch, so its once-per-pass
set-up (splitting the solved vectors by parameter) weighs four times more, and one HVP shares its fixed costs with
fewer examples.

Three targets, each a ratio between things timed in this one run (absolute seconds are context only):

1. HVP: one Hessian-vector product over the n training images (`Influence.hvp`, hvp_mode='auto') against one
   forward+backward over the same images (`loss.backward()`), target <= 2.5x; also the cost per vector when 4 vectors
   share the batch (a CG or LiSSA step for 4 test points), and hvp_mode='loop' (reverse-over-reverse, the engine's
   single-vector way before reverse-over-forward) for comparison.
2. LiSSA's automatic scale: the wall time of `LissaSolver.choose_scale` against the HVP time of its own recursion
   (4 test points, minibatches of 32), target <= 10% at depth --depth (200). Every step of the recursion is one
   minibatch HVP of the 4 rows, so its HVP time is depth x the median time of a step, measured over --lissa-steps
   steps of a real `LissaSolver.solve`; the ratio is also printed for depths 100 and 1000.
3. Scoring pass: `Influence.train_scores` for 4 solved vectors over the n training images, batches of --batch,
   against the epoch floor (one forward+backward over the same batches), target <= 2x; with 1 vector for scale.

Where a target is missed, the torch.profiler table of that piece is printed (top operators by self CPU time).
The model is `torchvision.models.resnet18(num_classes=10)` at its (seeded) initialisation with BatchNorm running
statistics drawn away from 0 and 1; inputs and labels are random. Weight decay 1e-3, damping 0.01 (as in the issue).
"""
import argparse, statistics, sys, time
from pathlib import Path

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from influence_nb.core import Curvature                       # noqa: E402
from influence_nb.ihvp import LissaSolver                      # noqa: E402
from influence_nb.scoring import Influence                     # noqa: E402

CE = torch.nn.functional.cross_entropy


def resnet18(seed: int = 0) -> torch.nn.Module:
    "ResNet-18 for 10 classes in eval mode, with BatchNorm running statistics and affine parameters away from 0 and 1."
    torch.manual_seed(seed)
    m = torchvision.models.resnet18(num_classes=10).eval()
    for mod in m.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.1, 0.1); mod.running_var.uniform_(0.5, 1.5)
            mod.weight.data.uniform_(0.8, 1.2); mod.bias.data.uniform_(-0.1, 0.1)
    return m


def timed(jobs: dict, repeats: int) -> dict:
    "Median wall seconds of each zero-argument job, the jobs interleaved within each repeat."
    times = {k: [] for k in jobs}
    for _ in range(repeats):
        for k, f in jobs.items():
            t0 = time.perf_counter(); f(); times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def profile(f, rows: int = 12) -> str:
    "torch.profiler's table of one call of f: the top operators by self CPU time."
    from torch.profiler import ProfilerActivity, profile as prof
    with prof(activities=[ProfilerActivity.CPU]) as p: f()
    return p.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=44)


def verdict(ratio: float, target: float) -> str:
    return f"{'met' if ratio <= target else 'MISSED'} (target <= {target:g}{'x' if target > 1 else ''})"


def hvp_part(model, X, y, repeats: int) -> dict:
    "Target 1: one HVP over (X, y) against one forward+backward over them."
    n = len(y)
    auto = Influence(model, CE, (X, y), batch_size=n, weight_decay=1e-3, damping=0.01)
    loop = Influence(model, CE, (X, y), batch_size=n, weight_decay=1e-3, damping=0.01, hvp_mode="loop")
    g = torch.Generator().manual_seed(1)
    V = torch.randn(4, auto.num_params, generator=g)
    ref = loop.hvp(V[0])
    for _ in range(6): got = auto.hvp(V[0])          # 'auto' times both single-vector ways three times, then keeps one
    for _ in range(3): auto.hvp(V)                   # and loop against vmap for four vectors
    rel = float((got - ref).norm() / ref.norm())

    def fb():
        model.zero_grad(set_to_none=True); CE(model(X), y).backward()
    fb()
    t = timed({"fb": fb, "hvp": lambda: auto.hvp(V[0]), "loop": lambda: loop.hvp(V[0]), "hvp4": lambda: auto.hvp(V)},
              repeats)
    out = {"fb": t["fb"], "hvp": t["hvp"], "loop": t["loop"], "hvp4": t["hvp4"] / 4,
           "single": auto.curvature.tuner.single_modes.get(n), "several": auto.hvp_modes.get(n), "rel": rel}
    out["ratio"] = out["hvp"] / out["fb"]
    print(f"\n## 1. One HVP over {n} images vs one forward+backward over them (median of {repeats})\n")
    print("| what | seconds | / forward+backward |\n|---|---|---|")
    print(f"| forward+backward (`loss.backward()`) | {t['fb']:.3f} | 1.00x |")
    print(f"| one HVP, hvp_mode='auto' (kept: {out['single']}) | {out['hvp']:.3f} | **{out['ratio']:.2f}x** |")
    print(f"| one HVP, hvp_mode='loop' (reverse-over-reverse) | {out['loop']:.3f} | {out['loop'] / t['fb']:.2f}x |")
    print(f"| per vector, 4 vectors on the batch ('auto', kept: {out['several']}) | {out['hvp4']:.3f} | "
          f"{out['hvp4'] / t['fb']:.2f}x |")
    print(f"\n'auto' vs 'loop' on the same vector: relative difference {rel:.1e}. Target 1: {out['ratio']:.2f}x, "
          f"{verdict(out['ratio'], 2.5)}")
    if out["ratio"] > 2.5:
        print("\nProfile of one HVP ('auto'):\n```\n" + profile(lambda: auto.hvp(V[0])) + "```")
        print("\nProfile of one forward+backward:\n```\n" + profile(fb) + "```")
    return out


def lissa_part(model, X, y, steps: int, depth: int) -> dict:
    "Target 2: choose_scale's wall time against the HVP time of the recursion (4 test points, minibatches of 32)."
    inf = Influence(model, CE, (X, y), batch_size=64, weight_decay=1e-3, damping=0.01)
    g = torch.Generator().manual_seed(2)
    V = torch.randn(4, inf.num_params, generator=g) * 1e-2
    hvp_time, calls, orig = [0.], [], Curvature.batch_hvp

    def counted(self, V_, x, y_):
        t0 = time.perf_counter(); out = orig(self, V_, x, y_)
        dt = time.perf_counter() - t0; hvp_time[0] += dt; calls.append((len(V_), dt)); return out
    Curvature.batch_hvp = counted
    try:
        solver = LissaSolver(depth=steps, batch_size=32, on_fail="ignore")
        t0 = time.perf_counter(); scale, est = solver.choose_scale(inf.curvature); t_scale = time.perf_counter() - t0
        scale_hvp, n_scale = hvp_time[0], len(calls)
        t0 = time.perf_counter(); solver.choose_scale(inf.curvature); t_cached = time.perf_counter() - t0
        hvp_time[0], calls[:] = 0., []
        t0 = time.perf_counter()
        LissaSolver(depth=steps, batch_size=32, scale=scale, on_fail="ignore").solve(inf.curvature, V)
        t_solve = time.perf_counter() - t0
    finally:
        Curvature.batch_hvp = orig
    step = [dt for k, dt in calls if k == len(V)]
    per_step = statistics.median(step[len(step) // 4:])            # the first steps include 'auto's trials
    out = {"scale_s": t_scale, "scale_hvps": n_scale, "scale_hvp_s": scale_hvp, "cached_s": t_cached,
           "step_s": per_step, "steps": len(step), "solve_s": t_solve, "scale": scale, "depth": depth,
           "top": est["batch_top_eigenvalue"]}
    out["ratio"] = t_scale / (depth * per_step)
    print("\n## 2. LiSSA's automatic scale vs its recursion's HVPs (4 test points, minibatches of 32)\n")
    print("| what | seconds | minibatch HVPs |\n|---|---|---|")
    print(f"| choose_scale: {solver.scale_probes} probes x at most {solver.scale_iters} Lanczos steps "
          f"(scale {scale:.4g} from a top eigenvalue {out['top']:.4g}) | {t_scale:.2f} | {n_scale} single-vector |")
    print(f"| choose_scale again (kept with the operator) | {t_cached:.4f} | 0 |")
    print(f"| one recursion step (4 vectors), median of steps {len(step) // 4 + 1}-{len(step)} of a {steps}-step "
          f"solve | {per_step:.3f} | 1 of 4 vectors |")
    print(f"| that {steps}-step solve, wall (with its final full-data residual pass) | {t_solve:.2f} | |")
    print()
    for d in sorted({100, depth, 1000}):
        print(f"- depth {d}: the scale costs {t_scale / (d * per_step):.1%} of the recursion's HVP time "
              f"({t_scale:.1f} s vs {d} x {per_step:.3f} s)")
    print(f"\nTarget 2 (depth {depth}): {out['ratio']:.1%}, {verdict(out['ratio'], 0.10)}")
    if out["ratio"] > 0.10:
        x, y_ = X[:32], y[:32]
        print(f"\nScale HVPs {scale_hvp:.2f} s of {t_scale:.2f} s. Profile of one single-vector minibatch HVP:\n```\n"
              + profile(lambda: inf.curvature.batch_hvp(V[0], x, y_)) + "```")
    return out


def scoring_part(model, X, y, batch: int, repeats: int) -> dict:
    "Target 3: the scoring pass over the training set against one forward+backward epoch over the same batches."
    n = len(y)
    inf = Influence(model, CE, (X, y), batch_size=batch, weight_decay=1e-3, damping=0.01)
    S = torch.randn(4, inf.num_params, generator=torch.Generator().manual_seed(3)) * 1e-2

    def epoch():
        for i in range(0, n, batch):
            model.zero_grad(set_to_none=True); CE(model(X[i:i + batch]), y[i:i + batch]).backward()
    small = Influence(model, CE, (X[:8], y[:8]), batch_size=8)
    agree = float((small.train_scores(S, "auto") - small.train_scores(S, "grad")).norm()
                  / small.train_scores(S, "grad").norm())
    epoch(); inf.train_scores(S); inf.train_scores(S[:1])
    t = timed({"floor": epoch, "k4": lambda: inf.train_scores(S), "k1": lambda: inf.train_scores(S[:1]),
               "k4layer": lambda: inf.train_scores(S, "layer")}, repeats)
    out = {"floor": t["floor"], "k4": t["k4"], "k1": t["k1"], "ratio": t["k4"] / t["floor"], "agree": agree}
    print(f"\n## 3. Scoring pass over {n} training images (batches of {batch}) vs the epoch floor (median of "
          f"{repeats})\n")
    print("| what | seconds | / epoch floor |\n|---|---|---|")
    print(f"| epoch floor (forward+backward over the same batches) | {t['floor']:.3f} | 1.00x |")
    print(f"| train_scores, 4 solved vectors ('auto': layer) | {t['k4']:.3f} | **{out['ratio']:.2f}x** |")
    print(f"| train_scores, 1 solved vector ('auto': jvp) | {t['k1']:.3f} | {t['k1'] / t['floor']:.2f}x |")
    print(f"\n'layer' vs per-example gradients ('grad') on 8 images: relative difference {agree:.1e}. "
          f"Target 3: {out['ratio']:.2f}x, {verdict(out['ratio'], 2.0)}")
    if out["ratio"] > 2.0:
        print("\nProfile of the pass (4 vectors):\n```\n" + profile(lambda: inf.train_scores(S)) + "```")
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="64 images, fewer repeats and LiSSA steps")
    ap.add_argument("--n", type=int, default=None, help="training images (default 256, --quick 64)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats (default 3, --quick 2)")
    ap.add_argument("--batch", type=int, default=64, help="batch of the scoring pass and its epoch floor")
    ap.add_argument("--depth", type=int, default=200, help="LiSSA depth the scale's cost is stated for")
    ap.add_argument("--lissa-steps", type=int, default=None, help="recursion steps timed (default 8, --quick 4)")
    ap.add_argument("--parts", default="hvp,lissa,scoring")
    args = ap.parse_args()
    n = args.n or (64 if args.quick else 256)
    repeats = args.repeats or (2 if args.quick else 3)
    steps = args.lissa_steps or (4 if args.quick else 8)
    torch.set_num_threads(args.threads)
    model = resnet18()
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)
    print(f"# ResNet-18 ({sum(p.numel() for p in model.parameters()):,} parameters), {n} images 3x32x32, "
          f"{args.threads} torch thread(s), torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M:%S %Z')}")
    t0, res = time.perf_counter(), {}
    parts = args.parts.split(",")
    if "hvp" in parts: res["hvp"] = hvp_part(model, X, y, repeats)
    if "lissa" in parts: res["lissa"] = lissa_part(model, X, y, steps, args.depth)
    if "scoring" in parts: res["scoring"] = scoring_part(model, X, y, args.batch, repeats)
    print("\n## Summary\n\n| target | measured | met? |\n|---|---|---|")
    if "hvp" in res:
        print(f"| 1. one HVP <= 2.5x one forward+backward | {res['hvp']['ratio']:.2f}x (4 vectors: "
              f"{res['hvp']['hvp4'] / res['hvp']['fb']:.2f}x per vector) | {verdict(res['hvp']['ratio'], 2.5)} |")
    if "lissa" in res:
        print(f"| 2. LiSSA's scale <= 10% of its recursion's HVP time (depth {args.depth}) | "
              f"{res['lissa']['ratio']:.1%} | {verdict(res['lissa']['ratio'], 0.10)} |")
    if "scoring" in res:
        print(f"| 3. scoring pass, 4 vectors, <= 2x the epoch floor | {res['scoring']['ratio']:.2f}x | "
              f"{verdict(res['scoring']['ratio'], 2.0)} |")
    print(f"\nTotal {time.perf_counter() - t0:.0f} s.")


if __name__ == "__main__":
    main()
