"""The ImageNet protocol (notebook 07b_imagenet): an ImageFolder of JPEGs written here, end to end on the quick preset with
a weights file saved here; the refusals; group influence against the sum of singles and against retraining on a convex
model."""
import argparse
import json

import numpy as np
import pytest
import torch
from torch import nn

from influence_nb.core import InfluenceError
from influence_nb.imagenet import (IMAGENET, ImageNetConfig, group_retrain, group_weights, imagenet_model,
                                   load_image_folder, run_imagenet_study, summed_influence, write_image_folder,
                                   protocol_table, grad_norm_table, group_table, grad_norm, save_figures, load_weights)
from influence_nb.metrics import compare_numbers, top_k
from influence_nb.retrain import RetrainConfig, loo_retrain
from influence_nb.scoring import Influence


def _jpeg_folder(root, n_train=40, n_test=20, classes=("cat", "dog", "fox", "owl"), seed=0):
    "A small ImageFolder of JPEGs: per class, a coloured blob on noise (learnable), 24×30 pixels (not square)."
    g = torch.Generator().manual_seed(seed)
    def images(n):
        y = torch.arange(n) % len(classes)
        X = 0.3 * torch.rand(n, 3, 24, 30, generator=g)
        for i, c in enumerate(y.tolist()):
            X[i, c % 3, 4 + 3 * c:12 + 3 * c, 6:18] += 0.6
        return X.clamp(0, 1), y
    for split, n in (("train", n_train), ("val", n_test)):
        X, y = images(n)
        write_image_folder(root, X, y, list(classes), split)
    return root


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    "The quick preset end to end on a JPEG ImageFolder, with a weights file and a reference weights file saved here."
    torch.set_num_threads(1)
    base = tmp_path_factory.mktemp("imagenet")
    root = _jpeg_folder(base / "data")
    net = imagenet_model("resnet18", 4, None, (3, 32, 32), width=1 / 16, seed=3, normalize=False)
    torch.save(net.state_dict(), base / "start.pt")
    torch.save({"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}, base / "reference.pt")
    cfg = ImageNetConfig.from_preset("quick", root=str(root), weights_path=str(base / "start.pt"),
                                     reference_weights=str(base / "reference.pt"))
    return base, cfg, run_imagenet_study(cfg, base / "out", progress=False)


def test_image_folder_reads_the_layout(tmp_path):
    root = _jpeg_folder(tmp_path)
    d = load_image_folder(root, size=32)
    assert d.X_train.shape == (40, 3, 32, 32) and d.X_test.shape == (20, 3, 32, 32)
    assert d.classes == ["cat", "dog", "fox", "owl"] and d.y_train.bincount().tolist() == [10] * 4
    assert 0 <= float(d.X_train.min()) and float(d.X_train.max()) <= 1 and "ImageFolder at" in d.source
    s = load_image_folder(root, size=16, n_train=8, n_test=4, seed=1)
    assert s.X_train.shape == (8, 3, 16, 16) and s.y_train.bincount().tolist() == [2] * 4 and "seed 1" in s.source


def test_missing_or_empty_roots_are_refused(tmp_path):
    with pytest.raises(InfluenceError, match="is not a folder"): load_image_folder(tmp_path / "absent")
    with pytest.raises(InfluenceError, match="root is None"): load_image_folder(None)
    with pytest.raises(InfluenceError, match="no 'train' folder"): load_image_folder(tmp_path)
    (tmp_path / "train" / "a").mkdir(parents=True)
    with pytest.raises(InfluenceError, match="hold no images"): load_image_folder(tmp_path)
    cfg = ImageNetConfig.from_preset("quick")          # no root given
    with pytest.raises(InfluenceError, match="root is None"): run_imagenet_study(cfg, None, progress=False)


def test_weights_come_from_a_local_file_only(tmp_path):
    with pytest.raises(InfluenceError, match="weights_path="):
        imagenet_model("resnet18", 4, tmp_path / "missing.pt", (3, 32, 32), 1 / 16)
    net = imagenet_model("resnet18", 4, None, (3, 32, 32), 1 / 16, normalize=False)
    torch.save(net.state_dict(), tmp_path / "w.pt")
    with pytest.raises(InfluenceError, match="does not fit"):
        imagenet_model("resnet18", 5, tmp_path / "w.pt", (3, 32, 32), 1 / 16)
    torch.save([1, 2], tmp_path / "junk.pt")
    with pytest.raises(InfluenceError, match="no state dict"): load_weights(net, tmp_path / "junk.pt")
    # a torchvision model by name: its weights file round-trips, and nothing is downloaded
    tv = imagenet_model("resnet18", 4, None, seed=1, normalize=False)
    torch.save(tv.state_dict(), tmp_path / "tv.pt")
    back = imagenet_model("resnet18", 4, tmp_path / "tv.pt", width=1.0)
    assert torch.equal(back[1].fc.weight, tv.fc.weight)
    cfg = ImageNetConfig.from_preset("quick", root=str(_jpeg_folder(tmp_path / "d")), weights_path=None, epochs=0.)
    with pytest.raises(InfluenceError, match="pass weights_path="): run_imagenet_study(cfg, None, progress=False)
    cfg = ImageNetConfig.from_preset("quick", root=cfg.root, weights_path=str(tmp_path / "gone.pt"))
    with pytest.raises(InfluenceError, match="weights_path="): run_imagenet_study(cfg, None, progress=False)


def test_quick_preset_runs_the_protocol_end_to_end(quick):
    base, cfg, s = quick
    r, g = s.runs["single"], s.runs["groups"]
    assert r.selected_by == "cg" and [p.label for p in r.points] == ["p83", "p37"]
    assert "ImageFolder at" in s.source and r.source == g.source == s.source      # the data source in every result
    losses = [p.test_loss for p in r.points]
    assert losses[0] >= losses[1]                                                  # 83rd percentile above the 37th
    for p in r.points:
        assert len(p.removed) == cfg.k and np.isfinite(p.truth).all() and len(p.top) == 25
        assert np.allclose(np.array(p.truth) - p.truth_controlled, p.control_change, atol=1e-5)
        assert p.noise_std is not None and 0 <= p.beaten_by_control <= 1
    assert set(r.grad_norms) == {"theta_star", "reference"}
    # the reference is the untrained start: θ* is nearer a stationary point of its objective
    assert r.grad_norms["theta_star"].full_norm < r.grad_norms["reference"].full_norm
    assert r.control_accuracy is not None and r.test_top5 is None                  # 4 classes: no top-5
    assert [p.ks for p in g.points] == [[1, 2, 4, 8]] * 2
    for p in g.points:
        assert [len(t) for t in p.top] == [1, 2, 4, 8] and all(len(x) == 2 for x in p.random)
    assert "| p83 |" in protocol_table(s) and "reference" in grad_norm_table(s) and "| p37 | 8 |" in group_table(g.points)
    stored = json.loads((base / "out" / "results.json").read_text())
    assert stored["runs"]["single"]["points"][0]["removed"] == r.points[0].removed
    save_figures(stored, base / "out")
    assert {p.name for p in (base / "out" / "figures").iterdir()} == {"figure8.png", "top25-p83.png", "top25-p37.png",
                                                                      "group-influence.png"}


def test_rerun_reads_every_unit_back(quick):
    base, cfg, s = quick
    again = run_imagenet_study(cfg, base / "out", progress=False)
    same = lambda a, b: json.dumps(a.to_dict(), sort_keys=True) == json.dumps(b.to_dict(), sort_keys=True)  # NaN too
    assert same(again.runs["single"], s.runs["single"]) and same(again.runs["groups"], s.runs["groups"])


def test_cli_options_map_to_the_configuration():
    from influence_nb.study import add_study_args, config_from_args
    p = argparse.ArgumentParser()
    add_study_args(IMAGENET, p)
    a = p.parse_args(["--preset", "paper", "--root", "/data/imagenet", "--weights", "r50.pt", "--reference-weights",
                      "tv.pt"])
    cfg = config_from_args(IMAGENET, a)
    assert (cfg.root, cfg.weights_path, cfg.reference_weights, cfg.arch, cfg.k) == ("/data/imagenet", "r50.pt",
                                                                                     "tv.pt", "resnet50", 50)
    assert cfg.percentiles == (83., 37.) and cfg.retrain_epochs == 2.


# ------------------------------------------------------------------------------------------------ group influence
def test_summed_influence_is_the_sum_of_singles():
    g = torch.Generator().manual_seed(0)
    S = torch.randn(3, 50, generator=g, dtype=torch.float64)
    groups = [[4], [1, 7, 9], list(range(0, 50, 5)), [49, 0]]
    G = summed_influence(S, groups)
    assert G.shape == (3, 4)
    for c, grp in enumerate(groups):
        assert torch.allclose(G[:, c], S[:, grp].sum(1))
    assert torch.equal(summed_influence(S, [[j] for j in range(50)]), S)           # groups of one: the singles
    assert torch.allclose(summed_influence(S[0], [[1, 2]]), S[0, [1, 2]].sum().view(1, 1))
    W = group_weights(50, groups)
    assert W.shape == (5, 50) and W[0].eq(1).all() and (W[1:] == 0).sum(1).tolist() == [1, 3, 10, 2]
    with pytest.raises(InfluenceError, match="twice"): group_weights(5, [[1, 1]])
    with pytest.raises(InfluenceError): group_weights(5, [[5]])


def _iris_logistic(lam=1e-2):
    "Softmax regression on standardised Iris (float64) at its minimiser of mean CE + (λ/2)|θ|², by L-BFGS."
    from conftest import fit, iris_train
    X, y = iris_train()
    torch.manual_seed(0)
    m = nn.Linear(4, 3).double()
    return fit(m, nn.functional.cross_entropy, X, y, lam), X, y


def test_group_of_one_is_leave_one_out():
    m, X, y = _iris_logistic()
    rc = RetrainConfig(steps=60, lr=0.3, weight_decay=1e-2, momentum=0.9, batch_size=16, seed=5)
    gr = group_retrain(m, X, y, X[:3], y[:3], [[4], [11], [4, 11]], rc)
    loo = loo_retrain(m, X, y, X[:3], y[:3], [4, 11], rc, keep_params=False, progress=False)
    assert torch.allclose(gr.truth[:2], loo.truth, atol=1e-10)
    assert torch.allclose(gr.control_losses[0], loo.control_losses, atol=1e-10)
    chunked = group_retrain(m, X, y, X[:3], y[:3], [[4], [11], [4, 11]], rc, chunk_size=2)
    assert torch.allclose(chunked.test_losses, gr.test_losses, atol=1e-10)
    with pytest.raises(InfluenceError, match="no groups"): group_retrain(m, X, y, X[:3], y[:3], [], rc)


def test_group_retraining_agrees_with_summed_influence_on_a_convex_model():
    "Logistic regression on Iris: summed influence predicts group retraining (to convergence) in sign and rank."
    lam = 1e-2
    m, X, y = _iris_logistic(lam)
    Xt, yt = X[:2], y[:2]
    S = Influence(m, nn.CrossEntropyLoss(), (X, y), weight_decay=lam, solver="exact").scores((Xt, yt))
    rng = np.random.default_rng(0)
    groups = [[int(i) for i in top_k(S[0].numpy(), k, by="signed")] for k in (1, 2, 3, 5)]
    groups += [[int(i) for i in top_k(S[0].numpy(), k, by="neg")] for k in (1, 3)]
    groups += [sorted(int(i) for i in rng.choice(len(y), k, replace=False)) for k in (2, 3, 5)]
    rc = RetrainConfig(steps=1500, lr=0.5, weight_decay=lam, momentum=0.9, batch_size=None)   # full batch: converged
    truth = group_retrain(m, X, y, Xt, yt, groups, rc).truth[:, 0]
    pred = summed_influence(S[:1], groups)[0]
    big = pred.abs() > 1e-4                       # random groups can sum to nearly nothing: their sign is noise
    assert (torch.sign(pred[big]) == torch.sign(truth[big])).all(), (pred, truth)
    c = compare_numbers(pred, truth, n_boot=0)
    assert c["spearman"]["r"] > 0.9 and c["pearson"]["r"] > 0.95, c
    # one point: within 10% of the retrained change; the first-order sum falls further short as the top group grows
    ratio = (pred / truth)[:4]
    assert 0.9 < ratio[0] <= 1.0 and (ratio.diff() < 0).all() and ratio[3] > 0.7, ratio


def test_grad_norm_is_zero_only_for_the_full_objective_at_a_minimiser():
    m, X, y = _iris_logistic()
    gn = grad_norm(m, X, y, batch_size=32, weight_decay=1e-2)
    assert gn.full_norm < 1e-6 and gn.mean_batch_norm > 1e-2 and gn.batches == 4
    assert gn.num_params == 15
