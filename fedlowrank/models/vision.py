"""Image classifiers: small MLP, CNN, VGG, ResNet and ViT for offline runs, and the architectures the
low-rank-from-scratch literature reports, by name: ``vgg11`` / ``vgg16`` (Simonyan & Zisserman 2015, CIFAR
variant: conv3×3-BN-ReLU stacks, 5 max-pools, a 512-512-classes MLP with dropout) and ``resnet18`` / ``resnet101``
(He et al. 2016, CIFAR variant: 3×3 stem, no max-pool). Dense definitions; low rank comes from
:func:`fedlowrank.lowrank.factorize` (hybrid = skip some layers)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class VisionConfig:
    arch: str = "mlp"  # mlp | cnn | vgg | resnet | vit | vgg11 | vgg16 | resnet18 | resnet101
    in_channels: int = 1
    image_size: int = 8
    num_classes: int = 10
    hidden: list[int] = field(default_factory=lambda: [128, 128])  # mlp widths
    channels: list[int] = field(default_factory=lambda: [32, 64])  # cnn/vgg/resnet stage widths
    dropout: float = 0.0
    # vit
    patch_size: int = 2
    dim: int = 64
    depth: int = 2
    heads: int = 4
    mlp_ratio: float = 2.0


class MLP(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        d = cfg.in_channels * cfg.image_size**2
        layers: list[nn.Module] = [nn.Flatten()]
        for h in cfg.hidden:
            layers += [nn.Linear(d, h), nn.ReLU(), nn.Dropout(cfg.dropout)]
            d = h
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(d, cfg.num_classes)

    def forward(self, x: Tensor) -> Tensor:  # (N, C, H, W) -> (N, classes)
        return self.head(self.features(x))


class CNN(nn.Module):
    """conv-relu(-pool) stages then an MLP head."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c, s = cfg.in_channels, cfg.image_size
        for i, w in enumerate(cfg.channels):
            layers += [nn.Conv2d(c, w, 3, padding=1), nn.ReLU()]
            if s >= 4:
                layers.append(nn.MaxPool2d(2))
                s //= 2
            c = w
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(c * s * s, 128)
        self.head = nn.Linear(128, cfg.num_classes)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        h = self.features(x).flatten(1)  # (N, c·s·s)
        return self.head(self.drop(F.relu(self.fc(h))))


class VGG(nn.Module):
    """VGG-style: each stage = two 3×3 conv-BN-ReLU, then 2×2 max-pool."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c, s = cfg.in_channels, cfg.image_size
        for w in cfg.channels:
            for _ in range(2):
                layers += [nn.Conv2d(c, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU()]
                c = w
            if s >= 2:
                layers.append(nn.MaxPool2d(2))
                s //= 2
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c, cfg.num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


def shortcut(cin: int, cout: int, stride: int) -> nn.Module:
    """A residual block's skip path: identity, or a 1x1 projection (with BatchNorm) where the shape changes."""
    if stride == 1 and cin == cout:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = shortcut(cin, cout, stride)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(h)) + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR-style ResNet: stem conv, one BasicBlock pair per stage width, avg-pool, head."""

    def __init__(self, cfg: VisionConfig, blocks_per_stage: int = 1) -> None:
        super().__init__()
        c0 = cfg.channels[0]
        self.stem = nn.Sequential(nn.Conv2d(cfg.in_channels, c0, 3, 1, 1, bias=False), nn.BatchNorm2d(c0), nn.ReLU())
        blocks, c = [], c0
        for i, w in enumerate(cfg.channels):
            for j in range(blocks_per_stage):
                blocks.append(BasicBlock(c, w, 2 if (i > 0 and j == 0) else 1))
                c = w
        self.layers = nn.Sequential(*blocks)
        self.head = nn.Linear(c, cfg.num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(F.adaptive_avg_pool2d(self.layers(self.stem(x)), 1).flatten(1))


# "M": 2x2 max-pool (skipped once the feature map is 1x1, e.g. on 8x8 digits)
VGG_LAYERS: dict[str, list[int | str]] = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
}


class VGGNet(nn.Module):
    """VGG-11/16 for CIFAR: ``features`` (conv3×3-BN-ReLU, max-pools) then ``classifier``
    (dropout, 512→512, ReLU, dropout, 512→512, ReLU, 512→classes)."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c, s = cfg.in_channels, cfg.image_size
        for v in VGG_LAYERS[cfg.arch]:
            if v == "M":
                if s >= 2:
                    layers.append(nn.MaxPool2d(2))
                    s //= 2
                continue
            layers += [nn.Conv2d(c, int(v), 3, padding=1), nn.BatchNorm2d(int(v)), nn.ReLU()]
            c = int(v)
        self.features = nn.Sequential(*layers)
        d = c * s * s
        p = cfg.dropout if cfg.dropout > 0 else 0.5
        self.classifier = nn.Sequential(nn.Dropout(p), nn.Linear(d, 512), nn.ReLU(), nn.Dropout(p),
                                        nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, cfg.num_classes))

    def forward(self, x: Tensor) -> Tensor:  # (N, C, H, W) -> (N, classes)
        return self.classifier(self.features(x).flatten(1))


class Bottleneck(nn.Module):
    """1×1 reduce, 3×3 (stride), 1×1 expand ×4, with a projection shortcut where the shape changes."""

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int) -> None:
        super().__init__()
        cout = planes * self.expansion
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.shortcut = shortcut(cin, cout, stride)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        h = F.relu(self.bn2(self.conv2(h)))
        return F.relu(self.bn3(self.conv3(h)) + self.shortcut(x))


RESNET_LAYERS = {"resnet18": (BasicBlock, [2, 2, 2, 2]), "resnet101": (Bottleneck, [3, 4, 23, 3])}


class ResNetCIFAR(nn.Module):
    """ResNet-18/101 for CIFAR: ``stem`` (3×3 conv, BN, ReLU; no max-pool), ``layer1..4`` (64/128/256/512
    planes, stride 2 from layer2 on), global average pool, ``head``."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        block, counts = RESNET_LAYERS[cfg.arch]
        self.stem = nn.Sequential(nn.Conv2d(cfg.in_channels, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU())
        c = 64
        for i, (planes, n) in enumerate(zip((64, 128, 256, 512), counts)):
            blocks = []
            for j in range(n):
                blocks.append(block(c, planes, 2 if (i > 0 and j == 0) else 1))
                c = planes * getattr(block, "expansion", 1)
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.head = nn.Linear(c, cfg.num_classes)

    def forward(self, x: Tensor) -> Tensor:
        h = self.stem(x)
        for i in range(1, 5):
            h = getattr(self, f"layer{i}")(h)
        return self.head(F.adaptive_avg_pool2d(h, 1).flatten(1))


class Attention(nn.Module):
    """Multi-head self-attention with plain Linear projections (factorizable)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} not divisible by heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:  # (B, T, D)
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)  # (B, H, T, D/H)
        return self.proj(y.transpose(1, 2).reshape(B, T, D))


class ViTBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float, dropout: float = 0.0) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.drop = nn.Dropout(dropout)  # on each branch's output, before the residual sum

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop(self.attn(self.ln1(x)))
        return x + self.drop(self.mlp(self.ln2(x)))


class ViT(nn.Module):
    """Vision Transformer (Dosovitskiy et al.): patch embedding, CLS token, pre-LN blocks (``model=vit_cifar``: the
    CIFAR ViT of the low-rank-from-scratch comparison: 4x4 patches, width 512, 6 blocks of 8 heads, MLP 512,
    dropout 0.1)."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        if cfg.image_size % cfg.patch_size:
            raise ValueError("image_size must be divisible by patch_size")
        n = (cfg.image_size // cfg.patch_size) ** 2
        self.patch = nn.Conv2d(cfg.in_channels, cfg.dim, cfg.patch_size, cfg.patch_size)
        self.cls = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.pos = nn.Parameter(torch.randn(1, n + 1, cfg.dim) * 0.02)
        self.blocks = nn.Sequential(*[ViTBlock(cfg.dim, cfg.heads, cfg.mlp_ratio, cfg.dropout)
                                      for _ in range(cfg.depth)])
        self.drop = nn.Dropout(cfg.dropout)  # on the embedded tokens
        self.ln = nn.LayerNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.num_classes)

    def forward(self, x: Tensor) -> Tensor:
        t = self.patch(x).flatten(2).transpose(1, 2)  # (B, n, D)
        t = self.drop(torch.cat([self.cls.expand(t.shape[0], -1, -1), t], 1) + self.pos)
        return self.head(self.ln(self.blocks(t))[:, 0])


VISION_MODELS = {"mlp": MLP, "cnn": CNN, "vgg": VGG, "resnet": ResNet, "vit": ViT, "vgg11": VGGNet,
                 "vgg16": VGGNet, "resnet18": ResNetCIFAR, "resnet101": ResNetCIFAR}


def build_vision_model(cfg: VisionConfig) -> nn.Module:
    if cfg.arch not in VISION_MODELS:
        raise ValueError(f"unknown vision arch {cfg.arch!r}; choose from {sorted(VISION_MODELS)}")
    return VISION_MODELS[cfg.arch](cfg)
