"""influence_nb.distributed: `torchrun --standalone --nproc_per_node=2` on CPU (gloo) gives the single-process numbers.

One torchrun job (the script below, written into a temporary folder) computes everything distributed: scores, a CG solve,
LiSSA with a fixed seed, the exact solve from a sharded dense Hessian, the HVP itself, leave-one-out retrains, a score
store written from scratch and one resumed after a killed run. The tests compare its numbers with the single-process
ones computed here. The killed run is a plain `python` process (one process: the world-size-1 fallback) that dies with
`os._exit` after writing two shards; one of them is then torn in half and a temporary file is left beside it, as a
kill mid-write could leave them. The torchrun job finishes that store with 2 processes, and the result is compared bit
for bit with an uninterrupted one-process run. Tiny problem: the Iris MLP (4-5-3, float64), 120 training points.
"""
import os, subprocess, sys, textwrap, warnings
from pathlib import Path

import pytest
import torch
from torch import nn
from hypothesis import given, settings, strategies as st

from influence_nb.core import InfluenceError
from influence_nb.ihvp import LissaSolver
from influence_nb.retrain import RetrainConfig, loo_retrain
from influence_nb.scoring import Influence
from influence_nb.distributed import (Dist, DistributedInfluence, ScoreStore, ShardedCurvature, ShardedLissa,
                                      init_distributed, shard, shard_range, sharded_solver, teardown)

from conftest import iris, iris_mlp

WD, DAMPING = 1e-2, 1e-3
LISSA = dict(depth=40, repeats=3, batch_size=16, seed=7, on_fail="ignore")      # 3 repeats: ranks get 2 and 1
REMOVED, CHUNK = list(range(0, 120, 11)), 3                                     # 11 removals, 4 chunks
CFG = dict(steps=60, lr=0.5, weight_decay=WD, batch_size=32, seed=3)
SHARD_ROWS, KILL_AFTER = 25, 2                                                  # 5 shards of 25, 25, 25, 25, 20 rows

PROBLEM = '''
import os, sys, time, warnings, torch
from pathlib import Path
from torch import nn
from influence_nb.scoring import Influence
from influence_nb.distributed import *
from influence_nb.retrain import RetrainConfig
from influence_nb.ihvp import LissaSolver
from influence_nb.core import InfluenceError

HERE = Path(sys.argv[1])
P = torch.load(HERE / "problem.pt")

def model():
    m = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    m.load_state_dict(P["state"])
    return m.eval()

def influence(**kw):
    "hvp_mode='vmap': no timing decides how HVPs are taken, so every process computes the same bits"
    return Influence(model(), nn.CrossEntropyLoss(), (P["X"], P["y"]), weight_decay=P["wd"], damping=P["damping"],
                     batch_size=32, hvp_mode="vmap", **kw)

TEST = (P["Xt"], P["yt"])
'''

MAIN = '''
d = init_distributed()
assert d.world == 2 and d.backend == "gloo", d
cg = DistributedInfluence(influence(solver="cg", tol=1e-10), d, block_rows=P["shard_rows"])
V = cg.test_vectors(TEST)
out = {"scores": cg.scores(TEST), "cg": cg.solve(V)[0], "hvp": cg.curvature.hvp(V), "rows": list(cg.rows)}
out["exact"] = DistributedInfluence(influence(solver="exact"), d).solve(V)[0]
out["lissa"] = DistributedInfluence(influence(solver=LissaSolver(**P["lissa"])), d).solve(V)[0]
out["auto"], info = DistributedInfluence(influence(solver="auto", tol=1e-10), d).solve(V)       # planned on rank 0
out["auto_chose"] = info.details["chosen"]
other = model()
if d.rank == 1:
    with torch.no_grad(): other[0].bias += 1                   # rank 1 holds another model: refused on every rank
try: DistributedInfluence(Influence(other, nn.CrossEntropyLoss(), (P["X"], P["y"])), d); out["mismatch"] = ""
except InfluenceError as e: out["mismatch"] = str(e)
loo = distributed_loo(model(), P["X"], P["y"], *TEST, P["removed"], RetrainConfig(**P["cfg"]), chunk_size=P["chunk"],
                      keep_params=True, ctx=d)
out["loo"] = vars(loo)
while not (HERE / "go").exists(): time.sleep(0.05)                                # the killed run, torn
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    cg.scores_to_store(TEST, HERE / "killed")                                       # resumes the killed run
    out["warnings"] = [str(x.message) for x in w]
cg.scores_to_store(TEST, HERE / "whole")                                            # an uninterrupted run
if d.main: torch.save(out, HERE / "out.pt")
teardown(d)
'''

KILLED = '''
d = init_distributed()
assert d.world == 1 and d.backend is None
done = []
def die(i):
    done.append(i)
    if len(done) == P["kill_after"]: os._exit(3)            # killed: no clean-up, no exception handler runs
cg = DistributedInfluence(influence(solver="cg", tol=1e-10), d, block_rows=P["shard_rows"])
cg.scores_to_store(TEST, HERE / "killed", callback=die)
'''


# one torch thread, like each torchrun worker, so that the single-process numbers are computed the same way
pytestmark = pytest.mark.usefixtures("one_thread")


def problem():
    "The Iris split and the fitted MLP (float64) that every process loads."
    X, y, Xt, yt = iris()
    return dict(X=X, y=y, Xt=Xt[:5], yt=yt[:5], state=iris_mlp().state_dict(), wd=WD, damping=DAMPING, lissa=LISSA,
                removed=REMOVED, chunk=CHUNK, cfg=CFG, shard_rows=SHARD_ROWS, kill_after=KILL_AFTER)


def rel(a, b) -> float:
    "||a - b|| / ||b||"
    return float((a - b).norm() / b.norm())


def influence(P, **kw):
    m = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    m.load_state_dict(P["state"])
    return Influence(m.eval(), nn.CrossEntropyLoss(), (P["X"], P["y"]), weight_decay=WD, damping=DAMPING,
                     batch_size=32, hvp_mode="vmap", **kw)


def launch(folder: Path, body: str, nproc: int | None) -> subprocess.Popen:
    "Write PROBLEM + body as a script into `folder` and start it: under torchrun with `nproc` processes, or plain python."
    script = folder / f"{'torchrun' if nproc else 'plain'}.py"
    script.write_text(PROBLEM + textwrap.dedent(body))
    launch = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc else []
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return subprocess.Popen([sys.executable, *launch, str(script), str(folder)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def test_torchrun_with_two_processes_gives_the_single_process_numbers(tmp_path):
    """One test, so that pytest-xdist runs the job once: the killed run and the torchrun job start together (the job
    waits for the killed run, torn by then, before it resumes it); the single-process numbers are computed meanwhile."""
    P = problem()
    torch.save(P, tmp_path / "problem.pt")
    killed, job = launch(tmp_path, KILLED, None), launch(tmp_path, MAIN, 2)
    try:
        ref = references(P, tmp_path)
        assert killed.wait(timeout=300) == 3, killed.stdout.read()
        shards = sorted((tmp_path / "killed").glob("rows_*.pt"))
        assert len(shards) == KILL_AFTER and (tmp_path / "killed" / "vectors.pt").exists()
        torn = shards[-1]
        torn.write_bytes(torn.read_bytes()[:len(torn.read_bytes()) // 2])                # half a shard under its name
        (tmp_path / "killed" / f".{torn.name}.123.tmp").write_bytes(b"partial")          # a write cut short
        (tmp_path / "go").touch()
        log = job.communicate(timeout=300)[0]
        assert job.returncode == 0, log[-6000:]
    finally:
        for p in (killed, job):
            if p.poll() is None: p.kill()
    out = torch.load(tmp_path / "out.pt")
    assert "ranks hold different models" in out["mismatch"]
    check_scoring(out, ref)
    check_solves(out, ref)
    check_retraining(out, ref)
    check_resume(P, tmp_path, out)
    check_reader(tmp_path, out)


def references(P, folder) -> dict:
    "The single-process numbers: scores, HVP, CG, exact and LiSSA solves, leave-one-out retrains."
    inf = influence(P, solver="cg", tol=1e-10)
    test = (P["Xt"], P["yt"])
    V = inf.grad_matrix(test)
    lissa = influence(P, solver=LissaSolver(**LISSA))
    return dict(scores=inf.scores(test), hvp=inf.hvp(V), cg=inf.solve(V)[0],
                exact=influence(P, solver="exact").solve(V)[0], lissa=lissa.solve(V)[0],
                lissa8=influence(P, solver=LissaSolver(**dict(LISSA, seed=8))).solve(V)[0],
                loo=loo_retrain(inf.model, P["X"], P["y"], *test, REMOVED, RetrainConfig(**CFG), chunk_size=CHUNK,
                                progress=False))


def check_scoring(out, ref):
    assert out["scores"].shape == ref["scores"].shape == (5, 120)
    assert rel(out["scores"], ref["scores"]) < 1e-6                  # two CG solves to tol 1e-10, summed differently
    assert out["rows"] == list(range(75))                            # rank 0 scored blocks 0:25, 25:50, 50:75


def check_solves(out, ref):
    torch.testing.assert_close(out["hvp"], ref["hvp"], rtol=1e-12, atol=1e-13)
    assert rel(out["cg"], ref["cg"]) < 1e-6
    assert rel(out["exact"], ref["exact"]) < 1e-10                   # the dense H as a sum of the ranks' shards
    assert rel(out["auto"], ref["exact"]) < 1e-6 and out["auto_chose"] in ("exact", "cg", "block_cg")
    torch.testing.assert_close(out["lissa"], ref["lissa"], rtol=1e-10, atol=1e-12)   # the same draws, split by repeat
    assert not torch.allclose(out["lissa"], ref["lissa8"])                           # and the seed matters


def check_retraining(out, ref):
    loo, r = out["loo"], ref["loo"]
    assert torch.equal(loo["removed"], r.removed)
    for k in ("base_losses", "control_losses", "test_losses", "truth", "truth_controlled", "param_change",
              "control_param_change"):
        torch.testing.assert_close(loo[k], getattr(r, k), rtol=1e-12, atol=1e-14, msg=k)


def check_resume(P, folder, out):
    assert any("not a whole shard" in w for w in out["warnings"])                   # the torn shard was recomputed
    assert not list((folder / "killed").glob(".*.tmp"))                              # the cut-short write was removed
    resumed = ScoreStore(folder / "killed")
    assert resumed.complete and resumed.num_shards == 5
    inf = influence(P, solver="cg", tol=1e-10)                                       # an uninterrupted one-process run
    whole = DistributedInfluence(inf, Dist(), SHARD_ROWS).scores_to_store((P["Xt"], P["yt"]), folder / "one")
    assert torch.equal(resumed.load_vectors(), whole.load_vectors())
    assert torch.equal(resumed.load(), whole.load())                                 # bit for bit
    assert rel(ScoreStore(folder / "whole").load(), whole.load()) < 1e-6             # uninterrupted, 2 processes


def check_reader(folder, out):
    store, S = ScoreStore(folder / "whole"), out["scores"]                          # the same run, in memory
    assert torch.equal(store.load(), S)
    idx = [119, 0, 25, 24, 60, 60, 3]                                               # any order, repeats, shard edges
    assert torch.equal(store.rows(idx), S[:, idx].T)
    for largest in (True, False):
        v, i = store.topk(7, largest=largest)
        rv, ri = S.topk(7, dim=1, largest=largest)
        assert torch.equal(v, rv) and torch.equal(i, ri)
    with pytest.raises(InfluenceError, match="rows must lie"): store.rows([120])


# ----------------------------------------------------------------------------------------------- one process
@settings(max_examples=40, deadline=None)
@given(n=st.integers(0, 50), world=st.integers(1, 8))
def test_shard_range_partitions_in_order(n, world):
    ranges = [shard_range(n, r, world) for r in range(world)]
    assert [i for r in ranges for i in r] == list(range(n))
    assert max(map(len, ranges)) - min(map(len, ranges)) <= 1


def test_shard_keeps_the_kind_of_data():
    X, y = torch.arange(10.).reshape(5, 2), torch.arange(5)
    a, b = shard((X, y), 1, 2), shard(torch.utils.data.TensorDataset(X, y), 1, 2)
    assert torch.equal(a[0], X[3:]) and torch.equal(b[:][1], y[3:])
    loader = shard(torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=2), 0, 2)
    assert [len(yb) for _, yb in loader] == [2, 1]
    with pytest.raises(InfluenceError, match="shuffle"):
        shard(torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), shuffle=True), 0, 2)


def test_one_process_fallback_gives_influence_exactly():
    assert init_distributed() == Dist() and Dist().main
    teardown(Dist())
    P = problem()
    inf = influence(P, solver="cg", tol=1e-10)
    di = DistributedInfluence(inf, Dist())
    assert isinstance(di.curvature, ShardedCurvature) and len(di.curvature.rows_of_rank) == 120
    assert torch.equal(di.scores((P["Xt"], P["yt"])), inf.scores((P["Xt"], P["yt"])))     # one block: the same bits
    blocks = DistributedInfluence(inf, Dist(), block_rows=50)
    assert blocks.blocks == [(0, 50), (50, 100), (100, 120)] and blocks.rows == range(120)
    assert rel(blocks.scores((P["Xt"], P["yt"])), inf.scores((P["Xt"], P["yt"]))) < 1e-14
    lis = influence(P, solver=LissaSolver(**LISSA))
    V = lis.grad_matrix((P["Xt"], P["yt"]))
    solver = sharded_solver(lis.solver, Dist())
    assert isinstance(solver, ShardedLissa) and sharded_solver(inf.solver) is inf.solver
    X, info = solver.solve(lis.curvature, V)
    ref, ref_info = lis.solve(V)
    torch.testing.assert_close(X, ref, rtol=1e-13, atol=1e-15)     # the restated recursion is LissaSolver's
    assert info.residual == pytest.approx(ref_info.residual, rel=1e-9)
    assert info.details["repeat_spread"] == pytest.approx(ref_info.details["repeat_spread"], rel=1e-6)


def test_store_refuses_another_run_and_reports_missing_shards(tmp_path):
    st_ = ScoreStore.create(tmp_path, n=10, m=2, shard_rows=4, record={"model": "a"})
    assert st_.num_shards == 3 and st_.bounds(2) == (8, 10) and st_.missing() == [0, 1, 2]
    st_.write(1, torch.ones(4, 2))
    assert st_.missing() == [0, 2] and torch.equal(st_.rows([5, 4]), torch.ones(2, 2))
    with pytest.raises(InfluenceError, match="not written yet"): st_.topk(1)
    with pytest.raises(InfluenceError, match="model: stored 'a', this run 'b'"):
        ScoreStore.create(tmp_path, n=10, m=2, shard_rows=4, record={"model": "b"})
    with pytest.raises(InfluenceError, match=r"scores of shape \(4, 2\)"): st_.write(0, torch.ones(3, 2))
    assert ScoreStore.create(tmp_path, n=10, m=2, shard_rows=4, record={"model": "a"}).missing() == [0, 2]
    st_.path(0).write_bytes(b"not a shard")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert st_.missing() == [0, 2] and "not a whole shard" in str(w[0].message)
