"""Benchmark: peak resident memory of the scoring pass over the 60,000 Fashion-MNIST points (LeNet-5, 10 test vectors).

    python bench/memory.py            # after a LiSSA-like history of vmapped HVPs on batches of 100, as in peers.py

Resident memory counts what glibc's allocator keeps, not only live tensors: its dynamic mmap threshold rises each time a
large block is freed, later medium-sized blocks then come from the heap, and blocks that outlive a batch fragment it.
This script runs the scoring pass two ways, each in a fresh process with the same history before it:
- `engine`: `Influence.scores` (method 'layer'), which writes each batch's rows into one (n, k) tensor allocated
            up front;
- `list`:   the same `layer_scores` per batch, the blocks kept in a list and concatenated at the end (the engine's
            way before 2026-11-22).
It prints the peak resident-memory increase and the wall time of each, median over repeats.
"""
import argparse, json, os, statistics, subprocess, sys, time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def worker(way: str) -> dict:
    import torch
    torch.set_num_threads(1)
    sys.path.insert(0, str(HERE))
    from cases import load_case
    from influence_nb.core import _EvalMode
    from influence_nb.scoring import Influence, layer_plan, layer_scores
    from influence_nb.ihvp import peak_memory
    F = torch.nn.functional.cross_entropy
    case = load_case("fashion"); case.model.requires_grad_(True)
    hX, hy = case.hessian_data()
    inf = Influence(case.model, F, (case.X_train, case.y_train), batch_size=case.batch_size, hessian_data=(hX, hy))
    g = torch.Generator().manual_seed(0)
    S = torch.randn(10, inf.num_params, generator=g)
    for _ in range(20):                                      # LiSSA-like: vmapped HVPs on batches of 100 ...
        idx = torch.randint(len(hy), (100,), generator=g); inf.batch_hvp(S, hX[idx], hy[idx])
    inf.hvp(S)                                               # ... and one full-data pass (its residual check)
    inf.solve = lambda V: (S, None)                          # the scoring pass alone: S stands for the solved vectors
    def engine():
        return inf.scores((case.X_test, case.y_test), method="layer")
    def as_list():
        plan = layer_plan(inf)
        with _EvalMode(inf.model):
            return torch.cat([layer_scores(inf, plan, S, x, y) for x, y in inf.batches(inf.train)]).T / inf.num_train()
    t0 = time.perf_counter()
    out, peak = peak_memory(engine if way == "engine" else as_list)
    return {"way": way, "peak_mb": peak / 2**20, "wall": time.perf_counter() - t0, "shape": list(out.shape)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--worker", choices=["engine", "list"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker))); return
    res = {"engine": [], "list": []}
    for _ in range(args.repeats):
        for way in res:
            r = subprocess.run([sys.executable, __file__, "--worker", way], capture_output=True, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"})
            if r.returncode: sys.exit(r.stderr)
            res[way].append(json.loads(r.stdout.strip().splitlines()[-1]))
    print("| scoring pass, 60,000 points, 10 vectors | peak resident memory (MB) | wall (s) | runs: MB |")
    print("|---|---|---|---|")
    for way, rs in res.items():
        print(f"| {way} | {statistics.median(r['peak_mb'] for r in rs):.0f} "
              f"| {statistics.median(r['wall'] for r in rs):.2f} "
              "| " + ", ".join(f"{r['peak_mb']:.0f}" for r in rs) + " |")


if __name__ == "__main__":
    main()
