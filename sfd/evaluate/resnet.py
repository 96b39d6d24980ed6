"""ResNet-34 classifier in torchvision's state-dict layout, without torchvision -- the UA judge.

The reference measures unlearning accuracy with an ImageNet ResNet-34 fine-tuned on CIFAR-10
at 224x224, fed images normalised to [-1, 1] (REFERENCE-FORMATS.md section 1). Keys follow
torchvision's ``resnet34``: ``conv1``, ``bn1``, ``layer1..4.{i}.{conv1,bn1,conv2,bn2}``,
``layer{2,3,4}.0.downsample.{0,1}``, ``fc`` (218 state-dict entries), so a fine-tuned
torchvision state dict loads strictly.

A judge in this project has ``features_and_logits(x in [-1, 1])``; :class:`RealImageJudge`
pairs the classifier's logits with Inception pool features (the FID space).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..io import CheckpointError, load_state_strict
from .inception import complete_batchnorm_counters, load_fid_inception, read_state_dict

RESNET34_LAYERS = (3, 4, 6, 3)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            # Sequential so the keys read downsample.0 (conv) / downsample.1 (bn), as torchvision's.
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet34(nn.Module):
    """``features_and_logits`` on [-1, 1] images, resized to ``input_size`` (224 as the reference)."""

    def __init__(self, num_classes: int = 10, input_size: int | None = 224, layers=RESNET34_LAYERS):
        super().__init__()
        self.config = dict(num_classes=num_classes, input_size=input_size)
        self.input_size = input_size
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        cin = 64
        for i, (n, width) in enumerate(zip(layers, (64, 128, 256, 512))):
            blocks = []
            for j in range(n):
                blocks.append(BasicBlock(cin, width, stride=2 if (j == 0 and i > 0) else 1))
                cin = width
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.fc = nn.Linear(512, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if self.input_size and tuple(x.shape[-2:]) != (self.input_size, self.input_size):
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, stride=2, padding=1)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return F.adaptive_avg_pool2d(x, 1).flatten(1)

    def forward(self, x):
        return self.fc(self.features(x))

    def features_and_logits(self, x):
        f = self.features(x)
        return f, self.fc(f)


def load_resnet34(path, num_classes: int | None = None, input_size: int | None = 224, device="cpu") -> ResNet34:
    """A ResNet-34 classifier from a torchvision-layout state dict (.pt/.pth or .safetensors).

    ``num_classes`` defaults to the width of ``fc`` in the file; wrappers ``{"state_dict": ...}``
    and DataParallel's ``module.`` prefix are accepted. Every key is checked strictly.
    """
    state = read_state_dict(path)
    if num_classes is None:
        if "fc.weight" not in state:
            raise CheckpointError(f"{path} has no 'fc.weight'; it is not a torchvision-layout ResNet state dict")
        num_classes = int(state["fc.weight"].shape[0])
    net = ResNet34(num_classes=num_classes, input_size=input_size)
    load_state_strict(net, complete_batchnorm_counters(net, state), Path(path))
    return net.to(device).eval().requires_grad_(False)


class RealImageJudge(nn.Module):
    """Judge for real datasets: Inception pool features (FID space) + classifier logits (UA)."""

    def __init__(self, classifier: nn.Module, feature_net: nn.Module):
        super().__init__()
        self.classifier = classifier
        self.feature_net = feature_net

    def features_and_logits(self, x):
        return self.feature_net.features(x), self.classifier(x)


def load_real_judge(classifier_path, fid_weights_path, input_size: int | None = 224,
                    device="cpu") -> RealImageJudge:
    """The judge for CIFAR-10/STL-10: a ResNet-34 classifier file + the FID Inception weights file."""

    judge = RealImageJudge(load_resnet34(classifier_path, input_size=input_size, device=device),
                           load_fid_inception(fid_weights_path, device=device))
    return judge.eval().requires_grad_(False)
