"""CIFAR-style classifiers that take [0, 1] images and normalize inside (no torchvision here).

    from sat_train.models import build_model
    model = build_model("resnet18", num_classes=10, in_channels=1, image_size=28)

Architectures (`ARCHS`): resnet10/18/34 (He et al. 2016, 3x3 stem, no max-pool, as for CIFAR),
preact-resnet18 (He et al. 2016b, the usual adversarial-training baseline), wrn-28-k / wrn-34-k
(Zagoruyko & Komodakis 2016; k any integer, e.g. wrn-34-10 as in Madry/TRADES), cnn4 (4 convs
32-32-64-64, a CPU-sized Fashion-MNIST model) and tiny-cnn (for tests). All end in global average
pooling, so 28, 32 and 64 pixel inputs (and any size >= 8) work with the same code.

Normalization lives in the model (a `Normalize` layer with mean/std buffers) so every attack and
every eps works in [0, 1] pixel space. The buffers are part of the state_dict: a checkpoint
restores the statistics it was trained with.
"""
from __future__ import annotations

import re

import torch
import torch.nn as nn
import torch.nn.functional as F

# Per-channel statistics used when none are given: CIFAR-10's for colour, Fashion-MNIST's for grey.
DEFAULT_MEAN = {3: (0.4914, 0.4822, 0.4465), 1: (0.2860,)}
DEFAULT_STD = {3: (0.2470, 0.2435, 0.2616), 1: (0.3530,)}
ARCHS = ("tiny-cnn", "cnn4", "resnet10", "resnet18", "resnet34", "preact-resnet18", "wrn-28-<k>", "wrn-34-<k>")


class Normalize(nn.Module):
    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x):
        return (x - self.mean) / self.std


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class PreActBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x):
        out = F.relu(self.bn1(x))
        # pre-activation: the projection shortcut sees the normalized input (He et al. 2016b, fig. 4e)
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class ResNet(nn.Module):
    def __init__(self, block, num_blocks, num_classes, in_channels, preact=False):
        super().__init__()
        self.preact = preact
        self.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        # post-act: BN after the stem; pre-act: the final BN before the head (blocks normalize their inputs)
        self.bn1 = nn.BatchNorm2d(512 if preact else 64)
        layers, cin = [], 64
        for i, (width, n) in enumerate(zip((64, 128, 256, 512), num_blocks)):
            for j in range(n):
                layers.append(block(cin, width, 2 if (i > 0 and j == 0) else 1))
                cin = width
        self.layers = nn.Sequential(*layers)
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x):
        out = self.conv1(x)
        if not self.preact:
            out = F.relu(self.bn1(out))
        out = self.layers(out)
        if self.preact:
            out = F.relu(self.bn1(out))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


class WideBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False) if (stride != 1 or cin != cout) else None

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv2(F.relu(self.bn2(self.conv1(out))))
        return out + shortcut


class WideResNet(nn.Module):
    def __init__(self, depth, widen, num_classes, in_channels):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n + 4 (28, 34, ...), not {depth}")
        n = (depth - 4) // 6
        widths = (16, 16 * widen, 32 * widen, 64 * widen)
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        blocks, cin = [], widths[0]
        for i, width in enumerate(widths[1:]):
            for j in range(n):
                blocks.append(WideBlock(cin, width, 2 if (i > 0 and j == 0) else 1))
                cin = width
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(cin)
        self.linear = nn.Linear(cin, num_classes)

    def forward(self, x):
        out = F.relu(self.bn(self.blocks(self.conv1(x))))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


def _conv_bn(cin, cout):
    return [nn.Conv2d(cin, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


def small_cnn(widths, num_classes, in_channels):
    """Pairs of conv-bn-relu with a 2x2 max-pool after each pair, then global pooling and a linear head."""
    layers, cin = [], in_channels
    for i, w in enumerate(widths):
        layers += _conv_bn(cin, w)
        if i % 2 == 1:
            layers.append(nn.MaxPool2d(2))
        cin = w
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes)]
    return nn.Sequential(*layers)


FIXED_ARCHS = ("tiny-cnn", "cnn4", "resnet10", "resnet18", "resnet34", "preact-resnet18")
_WRN = re.compile(r"wrn-(28|34)-([1-9]\d{0,2})")  # widen factor 1..999


def check_arch(arch: str) -> None:
    """ValueError unless `arch` names one of ARCHS (checked when a config is made, before any data is read)."""
    if not (isinstance(arch, str) and (arch in FIXED_ARCHS or _WRN.fullmatch(arch))):
        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHS)} (e.g. wrn-34-10)")


def _body(arch, num_classes, in_channels):
    check_arch(arch)
    if arch == "tiny-cnn":
        return small_cnn((8, 16), num_classes, in_channels)
    if arch == "cnn4":
        return small_cnn((32, 32, 64, 64), num_classes, in_channels)
    blocks = {"resnet10": (1, 1, 1, 1), "resnet18": (2, 2, 2, 2), "resnet34": (3, 4, 6, 3)}
    if arch in blocks:
        return ResNet(BasicBlock, blocks[arch], num_classes, in_channels)
    if arch == "preact-resnet18":
        return ResNet(PreActBlock, (2, 2, 2, 2), num_classes, in_channels, preact=True)
    m = _WRN.fullmatch(arch)  # the only other form check_arch lets through
    return WideResNet(int(m.group(1)), int(m.group(2)), num_classes, in_channels)


class Classifier(nn.Module):
    """[0, 1] images -> logits: normalization, then the architecture's body."""

    def __init__(self, body: nn.Module, mean, std):
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.body = body

    def forward(self, x):
        return self.body(self.normalize(x))


def build_model(arch: str, num_classes: int, in_channels: int, image_size: int,
                mean=None, std=None) -> nn.Module:
    """A fresh model for [0, 1] inputs of shape (N, in_channels, image_size, image_size).

    mean/std default to CIFAR-10's (3 channels) or Fashion-MNIST's (1 channel) statistics."""
    if in_channels not in (1, 3) and (mean is None or std is None):
        raise ValueError(f"in_channels={in_channels}: give mean and std (defaults exist for 1 and 3 channels)")
    if image_size < 8:
        raise ValueError(f"image_size={image_size} is too small for these models (need >= 8)")
    if num_classes < 2:
        raise ValueError(f"num_classes={num_classes}: a classifier needs at least 2 classes")
    mean = DEFAULT_MEAN[in_channels] if mean is None else tuple(mean)
    std = DEFAULT_STD[in_channels] if std is None else tuple(std)
    if len(mean) != in_channels or len(std) != in_channels:
        raise ValueError(f"mean/std need {in_channels} values each")
    return Classifier(_body(arch, num_classes, in_channels), mean, std)


def model_spec(arch: str, num_classes: int, in_channels: int, image_size: int) -> dict:
    """The arguments that rebuild a model's architecture (stored in every checkpoint)."""
    return {"arch": arch, "num_classes": int(num_classes), "in_channels": int(in_channels), "image_size": int(image_size)}
