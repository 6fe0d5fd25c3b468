"""An independent, plain-PyTorch ResNet50 with torchvision's layout, key names and semantics
(v1.5 bottleneck: stride on the 3x3 convolution). Tests use it as the oracle for our encoder,
and to stand in for torchvision inside MONAI's FCN (torchvision does not install beside this torch)."""
import types

import torch
from torch import nn


class RefBottleneck(nn.Module):
    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class RefResNet50(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        inplanes = 64
        for i, (planes, blocks, stride) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3), (1, 2, 2, 2)), 1):
            ds = None
            if stride != 1 or inplanes != planes * 4:
                ds = nn.Sequential(nn.Conv2d(inplanes, planes * 4, 1, stride=stride, bias=False),
                                   nn.BatchNorm2d(planes * 4))
            mods = [RefBottleneck(inplanes, planes, stride, ds)] + [RefBottleneck(planes * 4, planes)
                                                                     for _ in range(blocks - 1)]
            inplanes = planes * 4
            setattr(self, f"layer{i}", nn.Sequential(*mods))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2048, 1000)

    def features(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def randomise_batchnorm(module, seed=0):
    """Non-trivial BatchNorm parameters and running statistics, so copies are visible."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
                m.num_batches_tracked.fill_(7)
    return module


def fake_torchvision_models():
    """What MONAI's FCN needs of `torchvision.models`."""
    def resnet50(progress=True, weights=None):
        assert weights is None, "tests never download"
        return RefResNet50()

    return types.SimpleNamespace(resnet50=resnet50, ResNet50_Weights=types.SimpleNamespace(IMAGENET1K_V1="x"))
