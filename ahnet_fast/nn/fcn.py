"""The 2D networks whose encoder AH-Net transfers: FCN and MCFCN (MC-GCN in the paper).

A ResNet50 encoder written here (torchvision's ResNet50 layout and key names, so a torchvision
checkpoint you already have loads with :meth:`FCN.load_resnet50_weights`; no torchvision
dependency, nothing downloaded), Global Convolutional Network blocks on five encoder maps, Refine
blocks, and an upsample-add-refine decoder back to the input resolution. Module names match
MONAI 1.6's ``monai.networks.blocks.FCN`` / ``MCFCN``.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ahnet_fast.nn._bn import bn_relu, set_backend
from ahnet_fast.nn.shapes import ahnet_size_ok
from ahnet_fast.ops._inputs import check_input_matches

__all__ = ["FCN", "MCFCN", "GCN", "Refine", "ResNet50Bottleneck", "resnet50_layers"]


class ResNet50Bottleneck(nn.Module):
    """torchvision's ResNet bottleneck (v1.5: the stride sits on the 3x3 convolution)."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride
        self.backend: str | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = bn_relu(self.bn1, self.conv1(x), self.backend)
        out = bn_relu(self.bn2, self.conv2(out), self.backend)
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return torch.relu_(out + identity)


def resnet50_layers(layers=(3, 4, 6, 3)) -> list[nn.Sequential]:
    """layer1..layer4 of a ResNet50 (widths 64/128/256/512, expansion 4, stride 2 from layer2 on)."""
    inplanes, out = 64, []
    for planes, blocks, stride in zip((64, 128, 256, 512), layers, (1, 2, 2, 2)):
        downsample = None
        if stride != 1 or inplanes != planes * 4:
            downsample = nn.Sequential(nn.Conv2d(inplanes, planes * 4, kernel_size=1, stride=stride, bias=False),
                                       nn.BatchNorm2d(planes * 4))
        mods = [ResNet50Bottleneck(inplanes, planes, stride, downsample)]
        inplanes = planes * 4
        mods += [ResNet50Bottleneck(inplanes, planes) for _ in range(1, blocks)]
        out.append(nn.Sequential(*mods))
    return out


class GCN(nn.Module):
    """Global Convolutional Network block: a k x k receptive field as two separable branches,
    (k x 1 then 1 x k) + (1 x k then k x 1)."""

    def __init__(self, inplanes: int, planes: int, ks: int = 7):
        super().__init__()
        self.conv_l1 = nn.Conv2d(inplanes, planes, kernel_size=(ks, 1), padding=(ks // 2, 0))
        self.conv_l2 = nn.Conv2d(planes, planes, kernel_size=(1, ks), padding=(0, ks // 2))
        self.conv_r1 = nn.Conv2d(inplanes, planes, kernel_size=(1, ks), padding=(0, ks // 2))
        self.conv_r2 = nn.Conv2d(planes, planes, kernel_size=(ks, 1), padding=(ks // 2, 0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_l2(self.conv_l1(x)) + self.conv_r2(self.conv_r1(x))


class Refine(nn.Module):
    """Residual refinement: x + conv(BN-ReLU(conv(BN-ReLU(x)))), one BatchNorm used twice (as MONAI)."""

    def __init__(self, planes: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(planes, planes, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, padding=1)
        self.backend: str | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv1(bn_relu(self.bn, x, self.backend))
        return x + self.conv2(bn_relu(self.bn, y, self.backend))


class _ConvBNReLU(nn.Sequential):
    """1x1 convolution + BatchNorm + ReLU with MONAI ``Convolution``'s key names (conv, adn.N, adn.A)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.add_module("conv", nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False))
        self.add_module("adn", nn.Sequential(OrderedDict(N=nn.BatchNorm2d(out_channels), A=nn.ReLU(inplace=True))))
        self.backend: str | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return bn_relu(self.adn.N, self.conv(x), self.backend)


class FCN(nn.Module):
    """2D FCN with 3 input channels (three adjacent slices), a ResNet50 encoder and a GCN/Refine decoder.

    Args (as MONAI 1.6's ``FCN``):
        out_channels: output channels. Default 1.
        upsample_mode: "bilinear" (default; align_corners=True) or "transpose" (a 2x2 transposed
            convolution shared by every level, ``up_conv.deconv``).
        pretrained: must be False (nothing is downloaded); use :meth:`load_resnet50_weights`.
        progress: accepted for MONAI compatibility; unused.

    Keyword-only: ``backend`` of the fused ops.

    Input (B, 3, H, W); with "transpose", ceil(H/2) and ceil(W/2) must be multiples of 16. The
    output has the input's size with "bilinear" and 2*ceil(n/2) with "transpose".
    """

    in_channels = 3

    def __init__(self, out_channels: int = 1, upsample_mode: str = "bilinear", pretrained: bool = False,
                 progress: bool = True, *, backend: str | None = None):
        super().__init__()
        if upsample_mode not in ("transpose", "bilinear"):
            raise ValueError(f"{type(self).__name__}: upsample_mode must be 'transpose' or 'bilinear', got "
                             f"{upsample_mode!r}")
        if out_channels < 1:
            raise ValueError(f"{type(self).__name__}: out_channels must be positive, got {out_channels}")
        if pretrained:
            raise ValueError(f"{type(self).__name__}(pretrained=True) would download ImageNet weights; ahnet_fast "
                             "never downloads. Load a torchvision ResNet50 checkpoint you have with "
                             ".load_resnet50_weights(path).")
        self.upsample_mode = upsample_mode
        self.conv2d_type = nn.Conv2d
        self.out_channels = out_channels

        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn0 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1, self.layer2, self.layer3, self.layer4 = resnet50_layers()
        # torchvision's ResNet initialisation of the encoder
        for m in [self.conv1, self.bn0, self.layer1, self.layer2, self.layer3, self.layer4]:
            for sub in m.modules():
                if isinstance(sub, nn.Conv2d):
                    nn.init.kaiming_normal_(sub.weight, mode="fan_out", nonlinearity="relu")
                elif isinstance(sub, nn.BatchNorm2d):
                    nn.init.ones_(sub.weight)
                    nn.init.zeros_(sub.bias)

        self.gcn1 = GCN(2048, out_channels)
        self.gcn2 = GCN(1024, out_channels)
        self.gcn3 = GCN(512, out_channels)
        self.gcn4 = GCN(64, out_channels)
        self.gcn5 = GCN(64, out_channels)
        for i in range(1, 11):
            self.add_module(f"refine{i}", Refine(out_channels))
        # Present in MONAI's FCN (and its checkpoints) though its forward never uses it.
        self.transformer = nn.Conv2d(256, 64, kernel_size=1)
        if upsample_mode == "transpose":
            self.up_conv = nn.Sequential(OrderedDict(deconv=nn.ConvTranspose2d(out_channels, out_channels,
                                                                               kernel_size=2, stride=2)))
        self.set_backend(backend)

    def set_backend(self, backend: str | None):
        """Sets the fused-op backend of every layer (None: follow the global choice)."""
        return set_backend(self, backend)

    def _check_input(self, x: torch.Tensor) -> None:
        name = type(self).__name__
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{name} expects a 4-D input (B, C, H, W), got {shape}")
        if x.shape[1] != self.in_channels:
            raise ValueError(f"{name} expects {self.in_channels} input channels (dimension 1), got shape "
                             f"{tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"{name} expects a floating-point input, got dtype {x.dtype}")
        check_input_matches(x, self.conv1.weight, name)
        if self.upsample_mode == "transpose":
            bad = [n for n in x.shape[2:] if not ahnet_size_ok(n, "in-plane", 0, "transpose")]
            if bad:
                raise ValueError(f"{name}(upsample_mode='transpose') cannot take shape {tuple(x.shape)}: each "
                                 "spatial size n needs ceil(n/2) to be a multiple of 16 (n a multiple of 32, or "
                                 "one less), because the decoder doubles each level back onto the encoder maps")

    def _encode_decode(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[2:]
        x = bn_relu(self.bn0, self.conv1(x), self.backend)
        conv_x = x
        x = self.maxpool(x)
        pool_x = x
        fm1 = self.layer1(x)
        fm2 = self.layer2(fm1)
        fm3 = self.layer3(fm2)
        fm4 = self.layer4(fm3)

        gcfm1 = self.refine1(self.gcn1(fm4))
        gcfm2 = self.refine2(self.gcn2(fm3))
        gcfm3 = self.refine3(self.gcn3(fm2))
        gcfm4 = self.refine4(self.gcn4(pool_x))
        gcfm5 = self.refine5(self.gcn5(conv_x))

        if self.upsample_mode == "transpose":
            up = self.up_conv
            fs1 = self.refine6(up(gcfm1) + gcfm2)
            fs2 = self.refine7(up(fs1) + gcfm3)
            fs3 = self.refine8(up(fs2) + gcfm4)
            fs4 = self.refine9(up(fs3) + gcfm5)
            return self.refine10(up(fs4))

        def up_to(t, like_size):
            return F.interpolate(t, like_size, mode=self.upsample_mode, align_corners=True)

        fs1 = self.refine6(up_to(gcfm1, fm3.shape[2:]) + gcfm2)
        fs2 = self.refine7(up_to(fs1, fm2.shape[2:]) + gcfm3)
        fs3 = self.refine8(up_to(fs2, pool_x.shape[2:]) + gcfm4)
        fs4 = self.refine9(up_to(fs3, conv_x.shape[2:]) + gcfm5)
        return self.refine10(up_to(fs4, size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        return self._encode_decode(x)

    @torch.no_grad()
    def load_resnet50_weights(self, state_dict_or_path) -> FCN:
        """Loads a torchvision-format ResNet50 checkpoint (keys ``conv1``, ``bn1``, ``layer1``..``layer4``;
        ``fc`` is ignored) into the encoder: ``bn1`` goes to ``bn0``. Accepts a state dict or a local file
        path, read with ``torch.load(..., weights_only=True)``. Raises ValueError on a missing, unexpected
        or wrongly shaped key."""
        if isinstance(state_dict_or_path, (str, os.PathLike)):
            path = os.fspath(state_dict_or_path)
            if not os.path.isfile(path):
                raise ValueError(f"load_resnet50_weights: no such file {path!r}")
            state = torch.load(path, map_location="cpu", weights_only=True)
        else:
            state = state_dict_or_path
        if not isinstance(state, Mapping):
            raise ValueError(f"load_resnet50_weights expects a state dict or a path, got {type(state).__name__}")
        if "state_dict" in state and isinstance(state["state_dict"], Mapping):
            state = state["state_dict"]
        state = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}

        def target(key: str) -> str | None:
            if key.startswith("fc."):
                return None
            if key.startswith("bn1."):
                return "bn0." + key[len("bn1."):]
            return key

        own = self.state_dict()
        encoder_keys = {k for k in own if k.split(".")[0] in ("conv1", "bn0", "layer1", "layer2", "layer3", "layer4")}
        loaded, unexpected, wrong_shape = set(), [], []
        for key, value in state.items():
            dst = target(key)
            if dst is None:
                continue
            if dst not in encoder_keys:
                unexpected.append(key)
                continue
            if tuple(value.shape) != tuple(own[dst].shape):
                wrong_shape.append(f"{key}: {tuple(value.shape)} vs {tuple(own[dst].shape)}")
                continue
            loaded.add(dst)
        # Old torchvision checkpoints carry no num_batches_tracked; that is fine.
        missing = sorted(k for k in encoder_keys - loaded if not k.endswith("num_batches_tracked"))
        if missing or unexpected or wrong_shape:
            parts = []
            if missing:
                parts.append(f"{len(missing)} missing (e.g. {missing[:3]})")
            if unexpected:
                parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")
            if wrong_shape:
                parts.append(f"{len(wrong_shape)} with the wrong shape (e.g. {wrong_shape[:3]})")
            raise ValueError("load_resnet50_weights: not a torchvision ResNet50 state dict: " + "; ".join(parts))
        for key, value in state.items():
            dst = target(key)
            if dst is not None:
                own[dst].copy_(value)
        return self


class MCFCN(FCN):
    """Multi-channel FCN: a 1x1 convolution + BatchNorm + ReLU (``init_proj``) maps ``in_channels``
    to the 3 channels the ResNet50 encoder takes; otherwise :class:`FCN`."""

    def __init__(self, in_channels: int = 3, out_channels: int = 1, upsample_mode: str = "bilinear",
                 pretrained: bool = False, progress: bool = True, *, backend: str | None = None):
        super().__init__(out_channels=out_channels, upsample_mode=upsample_mode, pretrained=pretrained,
                         progress=progress, backend=backend)
        if in_channels < 1:
            raise ValueError(f"MCFCN: in_channels must be positive, got {in_channels}")
        self.in_channels = in_channels
        self.init_proj = _ConvBNReLU(in_channels, 3)
        self.set_backend(backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        return self._encode_decode(self.init_proj(x))
