"""The deep-architecture study (notebook 06_deep): the quick preset end to end, resume, CIFAR-10 from a fixture, CLI."""
import json
import shutil

import numpy as np
import pytest
import torch

from influence_nb.core import InfluenceError
from influence_nb.data import write_cifar10
from influence_nb.deep import DeepConfig, DEEP, run_deep_study, table1, table2, _check_runs, device_of
from influence_nb.models import ARCHS


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    "The whole quick preset: every architecture, with and without weight decay."
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("deep-quick")
    return out, run_deep_study(DeepConfig.from_preset("quick"), out, progress=False)


def test_quick_preset_runs_every_architecture(quick):
    _, s = quick
    test_archs = {r.arch for r in s.runs.values()}
    assert test_archs == set(ARCHS)
    for r in s.runs.values():
        assert r.selected_by, f"{r.arch}: no estimator succeeded: {r.estimates}"
        assert [x.label for x in r.selections] == (["A", "B"] if r.weight_decay > 0 else ["A"])
        for x in r.selections:
            assert len(x.removed) == 6 and np.isfinite(x.truth).all()
            assert r.selected_by in x.predicted
            assert all(len(v) == 6 for v in x.predicted.values())
        assert r.estimates[r.selected_by].seconds_per_test > 0
        # the exact Hessian only where p is small enough; otherwise skipped with the reason
        ex = r.estimates["exact"]
        assert (ex.skipped is None) == (r.num_params <= 5000)
    md = table1(s)
    assert md.count("\n") == 1 + len(ARCHS) and "(0.95)" in md   # the paper's small-CNN A P beside ours
    assert "s per test point" in table2(s)


def test_resume_gives_identical_numbers(quick):
    out, s = quick
    key = "mnist-lenet-wd0.001"
    (out / "runs" / f"{key}.json").unlink()            # as if killed before this unit finished
    shutil.rmtree(out / "loo" / key)                  # and before its retrains were stored
    s2 = run_deep_study(DeepConfig.from_preset("quick"), out, progress=False)
    a, b = s.runs[key].to_dict(), s2.runs[key].to_dict()
    for d in (a, b):
        d.pop("retrain_seconds"); d.pop("train_seconds")
        for e in d["estimates"].values(): e.pop("seconds"); e.pop("seconds_per_test")
    assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def test_cifar10_from_a_fixture_in_the_real_format(tmp_path):
    g = torch.Generator().manual_seed(0)
    Xtr = torch.randint(0, 256, (60, 3, 32, 32), generator=g, dtype=torch.uint8).numpy()
    Xte = torch.randint(0, 256, (20, 3, 32, 32), generator=g, dtype=torch.uint8).numpy()
    ytr, yte = np.arange(60) % 10, np.arange(20) % 10
    write_cifar10(tmp_path / "data", Xtr, ytr, Xte, yte)
    cfg = DeepConfig.from_preset("quick", datasets=("cifar10",), archs=("lenet",), root=str(tmp_path / "data"), sizes={},
                                 estimators=("cg",), noise_seeds=0, k=4)
    s = run_deep_study(cfg, tmp_path / "out", progress=False)
    r = s.runs["cifar10-lenet-wd0.001"]
    assert "cifar" in r.source.lower() and r.num_params > 0 and len(r.selections[0].removed) == 4


def test_bad_configurations_are_refused():
    with pytest.raises(InfluenceError, match="bad run"): _check_runs(DeepConfig(pairs=("mnist:alexnet",)))
    with pytest.raises(InfluenceError, match="bad run"): _check_runs(DeepConfig(pairs=("svhn:lenet",)))
    with pytest.raises(InfluenceError, match="not a device"): device_of(DeepConfig(device="tpu7"))
    if not torch.cuda.is_available():
        with pytest.raises(InfluenceError, match="no CUDA"): device_of(DeepConfig(device="cuda"))


def test_cli_options_map_to_the_configuration():
    from influence_nb.cli import parser
    from influence_nb.study import config_from_args
    a = parser().parse_args(["deep", "--arch", "lenet", "resnet18", "--data", "mnist", "--preset", "quick", "--out", "x"])
    cfg = config_from_args(DEEP, a)
    assert cfg.archs == ["lenet", "resnet18"] or tuple(cfg.archs) == ("lenet", "resnet18")
    assert tuple(cfg.datasets) == ("mnist",) and cfg.preset == "quick" and cfg.width == 0.125


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_protocol_on_cuda():
    "Training, every estimator, retraining and the noise floor on CUDA, on synthetic images (no data files needed)."
    from influence_nb.data import ImageData
    from influence_nb.deep import evaluate_run, train_model
    g = torch.Generator().manual_seed(0)
    data = ImageData(torch.rand(64, 3, 32, 32, generator=g), torch.arange(64) % 10, torch.rand(32, 3, 32, 32, generator=g),
                     torch.arange(32) % 10, "synthetic", "cifar10", [str(i) for i in range(10)])
    cfg = DeepConfig.from_preset("quick", device="cuda", k=4)
    for arch in ("lenet", "resnet18"):
        m = train_model(cfg, data, arch, 1e-3)
        assert next(m.parameters()).is_cuda
        r = evaluate_run(m, data, cfg, arch, 1e-3)
        assert all(np.isfinite(x.truth).all() for x in r.selections)
        assert any(e.seconds for e in r.estimates.values())
