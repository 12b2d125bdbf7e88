"""The model zoo's named architectures and their accounting: parameter counts of the CIFAR variants against the
published ones, FLOPs and sizes of a small conv net and an MLP against hand counts (dense and factorized), and
hybrid factorization keeping exactly the named layers dense."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from fedlowrank.lowrank import LowRankConv2d, LowRankLinear, count_flops, count_params, factorize, size_mb
from fedlowrank.models.vision import VisionConfig, build_vision_model


def cifar(arch: str) -> nn.Module:
    return build_vision_model(VisionConfig(arch=arch, in_channels=3, image_size=32, num_classes=10))


@pytest.mark.parametrize("arch,params", [("resnet18", 11_173_962),
                                         pytest.param("resnet101", 42_512_970, marks=pytest.mark.slow)])
def test_cifar_resnets_have_the_published_parameter_counts(arch, params):
    """11.17M / 42.51M: the CIFAR ResNet-18/101 (3x3 stem, no max-pool) of the literature's tables."""
    m = cifar(arch)
    assert count_params(m) == params
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_cifar_vggs_count_their_layers():
    """VGG-11/16: 8/13 conv layers and a 3-layer classifier; parameters from the layer list by hand."""
    for arch, convs in (("vgg11", [64, 128, 256, 256, 512, 512, 512, 512]),
                        ("vgg16", [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512])):
        m = cifar(arch)
        assert sum(isinstance(x, nn.Conv2d) for x in m.modules()) == len(convs)
        cin, want = 3, 0
        for c in convs:
            want += cin * c * 9 + c + 2 * c  # conv weight + bias, BatchNorm weight + bias
            cin = c
        want += 512 * 512 + 512 + 512 * 512 + 512 + 512 * 10 + 10
        assert count_params(m) == want


def _small_nets():
    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.Flatten(),
                         nn.Linear(16 * 6 * 6, 10))
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(36, 32), nn.ReLU(), nn.Linear(32, 10))
    return conv, mlp


def test_flops_and_size_equal_hand_counts_dense_and_factorized():
    N, r = 4, 3
    conv, mlp = _small_nets()
    x = torch.randn(N, 3, 6, 6)
    hw = 36
    dense_conv = 2 * N * hw * (8 * 3 * 9 + 16 * 8 * 9) + 2 * N * 576 * 10
    assert count_flops(conv, x) == dense_conv
    p_conv = (8 * 27 + 8) + (16 * 72 + 16) + (576 * 10 + 10)
    assert count_params(conv) == p_conv and size_mb(conv) == pytest.approx(4 * p_conv / 2**20)
    factorize(conv, rank=r, targets=[r"^2$"])  # the second conv only: k x k conv to r channels, then 1x1
    assert isinstance(conv[2], LowRankConv2d) and isinstance(conv[0], nn.Conv2d)
    assert count_flops(conv, x) == 2 * N * hw * (8 * 3 * 9 + r * 72 + 16 * r) + 2 * N * 576 * 10
    assert count_params(conv) == p_conv - 16 * 72 + r * (72 + 16)
    xm = torch.randn(N, 1, 6, 6)
    assert count_flops(mlp, xm) == 2 * N * (36 * 32 + 32 * 10)
    factorize(mlp, rank=r, targets=[r"^1$"])
    assert isinstance(mlp[1], LowRankLinear)
    assert count_flops(mlp, xm) == 2 * N * (r * (36 + 32) + 32 * 10)
    assert count_params(mlp) == r * (36 + 32) + 32 + 32 * 10 + 10
    assert size_mb(mlp) == pytest.approx(4 * count_params(mlp) / 2**20)


@pytest.mark.parametrize("arch,skip,dense", [
    ("vgg11", ["features.0", "classifier.6"], ["features.0", "classifier.6"]),
    ("resnet18", ["stem", "head", "shortcut", "layer1"],
     ["stem.0", "head", "layer2.0.shortcut.0", "layer3.0.shortcut.0", "layer4.0.shortcut.0",
      "layer1.0.conv1", "layer1.0.conv2", "layer1.1.conv1", "layer1.1.conv2"]),
])
def test_hybrid_keeps_exactly_the_named_layers_dense(arch, skip, dense):
    m = cifar(arch)
    factorize(m, ratio=0.2, skip=skip)
    kept = sorted(n for n, x in m.named_modules() if isinstance(x, (nn.Linear, nn.Conv2d)))
    assert kept == sorted(dense)
    low = [n for n, x in m.named_modules() if isinstance(x, (LowRankConv2d, LowRankLinear))]
    total = 8 + 3 if arch == "vgg11" else 1 + 16 + 3 + 1  # every conv and linear layer of the network
    assert len(low) == total - len(dense)
