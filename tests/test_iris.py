"""Tests of influence_nb.iris: data split, presets, a tiny resumable study, and the command line."""
from dataclasses import replace

import pytest
import torch

iris = pytest.importorskip("influence_nb.iris")


pytestmark = pytest.mark.usefixtures("one_thread")


TINY = dict(train_steps=300, retrain_steps=50, depths=(1,), widths=(8,), seeds=1, lissa=dict(depth=50, repeats=1, batch_size=30))


def test_split_is_stratified_and_standardised():
    Xtr, ytr, Xte, yte = iris.iris_data()
    assert (len(ytr), len(yte)) == (120, 30)
    assert torch.bincount(ytr).tolist() == [40, 40, 40]
    torch.testing.assert_close(Xtr.std(0, unbiased=False), torch.ones(4, dtype=torch.float64))


def test_presets_carry_the_paper_protocol():
    p = iris.IrisConfig.from_preset("paper")
    assert (p.train_steps, p.retrain_steps, p.top_fraction, p.no_decay_damping) == (60_000, 7_500, 0.166, 1e-3)
    assert max(p.depths) == 8 and (min(p.widths), max(p.widths)) == (8, 50)
    with pytest.raises(ValueError, match="unknown preset"):
        iris.IrisConfig.from_preset("fast")


def test_tiny_study_resumes_to_identical_numbers(tmp_path):
    cfg = iris.IrisConfig.from_preset("quick", **TINY)
    a = iris.run_iris_study(cfg, tmp_path, progress=False)
    done = sorted((tmp_path / "runs").glob("*.json"))
    done[len(done) // 2].unlink()                     # interrupted halfway: one run missing
    b = iris.run_iris_study(cfg, tmp_path, progress=False)
    assert [r.to_dict() for r in a.runs] == [r.to_dict() for r in b.runs]
    assert all(-1 <= r.spearman <= 1 and len(r.removed) == 20 for r in b.runs)
    assert isinstance(b, iris.IrisSummary) and isinstance(b.runs[0], iris.IrisRun)
    with pytest.raises(ValueError, match="different configuration .*seeds: stored 1, asked 2"):
        iris.run_iris_study(replace(cfg, seeds=2), tmp_path, progress=False)
    table = iris.correlation_table(b)
    assert "relu-d1-w5-wd0.001-damp0" in table and "0.97" in table     # the paper's number stands beside ours


def test_weight_decay_network_tracks_retraining():
    """With weight decay, the base network's influence ranks the top points like retraining does."""
    cfg = iris.IrisConfig.from_preset("quick", seeds=1)
    data = iris.iris_data()
    s = iris.IrisSetting()
    m = iris.train_iris_models(s, cfg, [0], data)[0]
    r = iris.evaluate_model(m, s, cfg, data, seed=0)
    assert r["spearman"] > 0.8 and r["top_eigenvalue"] > 0


def test_cli_help_lists_iris():
    from influence_nb.cli import parser
    assert "iris" in parser().format_help()
    with pytest.raises(SystemExit):
        parser().parse_args(["iris", "--preset", "huge"])
    a = parser().parse_args(["iris", "--seeds", "3", "--out", "x"])
    assert (a.preset, a.seeds, a.out, a.threads) == ("quick", 3, "x", 1)


def test_study_is_registered_without_the_cli():
    from influence_nb.study import STUDIES, config_from_args
    assert STUDIES["iris"] is iris.IRIS
    from influence_nb.cli import parser
    cfg = config_from_args(iris.IRIS, parser().parse_args(["iris", "--preset", "paper", "--seeds", "2"]))
    assert cfg == iris.IrisConfig.from_preset("paper", seeds=2)
