"""AH-Net (Liu et al., "3D Anisotropic Hybrid Network", MICCAI 2018), MONAI-compatible.

Module names, parameter names, defaults, initialisation and function match MONAI 1.6's
``monai.networks.nets.AHNet``, so its state dicts load with ``strict=True``. The modules own the
parameters; BatchNorm+ReLU pairs run through the fused ``ahnet_fast.ops.bn_relu`` op.
In 2D mode MONAI slices some kernel/stride tuples from the front and others from the back; that
is kept exactly (the second spatial axis then plays the slice axis).

Under ``torch.jit.script`` (see :func:`ahnet_fast.nn.set_script_ops`) the modules here call, in eval
mode, the same fused ops as in eager mode, as ``torch.ops.ahnet_fast.*_script`` dispatcher ops (the
``_script_fused`` methods), and in training mode, or with ``set_script_ops(m, "aten")``, MONAI's own
arithmetic on their submodules (the ``_scripted`` methods): activation checkpointing, the memory
planner and the running-statistics bookkeeping of the fused ops are Python, which TorchScript cannot
hold, and an archive of ATen ops alone loads where ahnet_fast is not installed (LibTorch).
``torch.compile``, ``torch.jit.trace`` and ``torch.export`` record the fused ops in every mode.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from ahnet_fast.nn._bn import bn_add_relu, bn_relu, bn_relu_conv, dense_block, dense_block_input, dense_block_into, \
    set_backend
from ahnet_fast.nn._checkpoint import POLICIES, checkpoint_segment, output_discarded, resolve_auto
from ahnet_fast.nn.shapes import check_ahnet_input
from ahnet_fast.ops._bands import no_backward
from ahnet_fast.ops._inputs import check_input_matches
from ahnet_fast import _scratch as scratch
from ahnet_fast.ops import pointwise_conv, slice_max_pool, stem_conv_pool, transposed_conv
from ahnet_fast.ops.pyramid_pool import UPSAMPLE_MODES, check_pyramid_pool_input, pyramid_pool

__all__ = ["AHNet", "AHnet", "Ahnet", "PyramidVolumetricPooling", "UPSAMPLE_MODES"]



def _conv(spatial_dims: int) -> type[nn.Module]:
    return nn.Conv3d if spatial_dims == 3 else nn.Conv2d


def _conv_transpose(spatial_dims: int) -> type[nn.Module]:
    return nn.ConvTranspose3d if spatial_dims == 3 else nn.ConvTranspose2d


def _norm(spatial_dims: int) -> type[nn.Module]:
    return nn.BatchNorm3d if spatial_dims == 3 else nn.BatchNorm2d


def _maxpool(spatial_dims: int) -> type[nn.Module]:
    return nn.MaxPool3d if spatial_dims == 3 else nn.MaxPool2d


def _upsample(upsample_mode: str) -> nn.Upsample:
    align_corners = True if upsample_mode in ("trilinear", "bilinear") else None
    return nn.Upsample(scale_factor=2, mode=upsample_mode, align_corners=align_corners)


def _is_slice_max_pool(pool: nn.Module, nd: int) -> bool:
    """A max pool over the last axis alone, stride = window, nothing else set: AH-Net's slice pools."""
    if not isinstance(pool, (nn.MaxPool2d, nn.MaxPool3d)):
        return False
    kernel = _as_tuple(pool.kernel_size, nd)
    return kernel == _as_tuple(pool.stride, nd) and all(k == 1 for k in kernel[:-1]) and \
        not any(_as_tuple(pool.padding, nd)) and all(d == 1 for d in _as_tuple(pool.dilation, nd)) and \
        not pool.ceil_mode and not pool.return_indices


def _is_plain_conv(conv: nn.Module) -> bool:
    """Zero padding given as numbers, groups 1, dilation 1: the convolutions the ops take."""
    return isinstance(conv, (nn.Conv2d, nn.Conv3d)) and conv.padding_mode == "zeros" and conv.groups == 1 and \
        all(d == 1 for d in conv.dilation) and not isinstance(conv.padding, str)


def slice_pool(pool: nn.Module, x: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """``pool(x)``; AH-Net's slice-axis max pools ((1, 1, k) windows, stride = window) through
    ``ops.slice_max_pool``."""
    window = _as_tuple(pool.kernel_size, x.dim() - 2)[-1]
    if _is_slice_max_pool(pool, x.dim() - 2) and x.shape[-1] >= window:
        return slice_max_pool(x, window, backend=backend)
    return pool(x)


def stem(conv: nn.Module, pool: nn.Module, x: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """``pool(conv(x))`` for conv1 and pool1, through ``ops.stem_conv_pool`` where the modules are
    AH-Net's (a plain convolution, a slice-axis max pool); the op checks the shapes."""
    nd = x.dim() - 2
    if _is_plain_conv(conv) and _is_slice_max_pool(pool, nd):
        return stem_conv_pool(x, conv.weight, conv.bias, conv.stride, conv.padding,
                              _as_tuple(pool.kernel_size, nd)[-1], backend=backend)
    return pool(conv(x))


def pointwise(conv: nn.Module, x: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """``conv(x)``; a 1x1x1 convolution without padding (the bottlenecks' first convolution and the
    downsampling projections, strided) through ``ops.pointwise_conv``."""
    if _is_plain_conv(conv) and all(k == 1 for k in conv.kernel_size) and not any(conv.padding):
        return pointwise_conv(x, conv.weight, conv.bias, conv.stride, backend=backend)
    return conv(x)


def upsample(up: nn.Module, x: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """``up(x)``; a transposed convolution whose kernel equals its stride (the x2 up-transitions)
    through ``ops.transposed_conv``."""
    if isinstance(up, (nn.ConvTranspose2d, nn.ConvTranspose3d)) and tuple(up.kernel_size) == tuple(up.stride) and \
            not any(up.padding) and not any(up.output_padding) and up.groups == 1 and \
            all(d == 1 for d in up.dilation) and up.padding_mode == "zeros":
        return transposed_conv(x, up.weight, up.bias, up.stride, backend=backend)
    return up(x)


def _as_tuple(v, n):
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * n


class _ScriptOps:
    """What a module of this file runs under torch.jit.script (a constant, so the branch not taken is
    not compiled): with ``script_fused`` True (the default), in eval mode, the same fused ops as in
    eager mode, called as ``torch.ops.ahnet_fast.*_script`` dispatcher ops, so the scripted module
    computes what the eager one does; in training mode, and with ``script_fused`` False, MONAI's
    arithmetic on ATen ops (an archive that loads without ahnet_fast, e.g. in LibTorch). See
    :func:`ahnet_fast.nn.set_script_ops`."""

    __constants__ = ["script_fused"]
    script_fused = True


class Bottleneck3x3x1(_ScriptOps, nn.Module):
    """ResNet50 bottleneck with the 3x3 convolution made 3x3x1 (stride (s, s, 1)); the downsample
    branch also pools the slice axis, and the main branch is pooled (1, 1, 2) to match it."""

    expansion = 4

    def __init__(self, spatial_dims: int, inplanes: int, planes: int, stride: Sequence[int] | int = 1,
                 downsample: nn.Sequential | None = None) -> None:
        super().__init__()
        conv, norm = _conv(spatial_dims), _norm(spatial_dims)
        self.conv1 = conv(inplanes, planes, kernel_size=1, bias=False)
        self.bn1 = norm(planes)
        self.conv2 = conv(planes, planes, kernel_size=(3, 3, 1)[-spatial_dims:], stride=stride,
                          padding=(1, 1, 0)[-spatial_dims:], bias=False)
        self.bn2 = norm(planes)
        self.conv3 = conv(planes, planes * 4, kernel_size=1, bias=False)
        self.bn3 = norm(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride
        self.pool = _maxpool(spatial_dims)(kernel_size=(1, 1, 2)[-spatial_dims:], stride=(1, 1, 2)[-spatial_dims:])
        self.backend: str | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            if self.script_fused:
                if not self.training:
                    return self._script_fused(x)
            return self._scripted(x)
        return self._fused(x)

    def _script_fused(self, x: torch.Tensor) -> torch.Tensor:
        ops = torch.ops.ahnet_fast
        out = ops.pointwise_conv_script(x, self.conv1.weight, self.conv1.bias, list(self.conv1.stride), self.backend)
        out = ops.bn_relu_conv_script(out, self.bn1.running_mean, self.bn1.running_var, self.bn1.weight, self.bn1.bias,
                                      self.bn1.eps, self.conv2.weight, list(self.conv2.stride),
                                      list(self.conv2.padding), self.backend)
        out = ops.bn_relu_conv_script(out, self.bn2.running_mean, self.bn2.running_var, self.bn2.weight, self.bn2.bias,
                                      self.bn2.eps, self.conv3.weight, list(self.conv3.stride),
                                      list(self.conv3.padding), self.backend)
        residual = x
        if self.downsample is not None:
            # MONAI's downsample branch: (1x1 convolution, slice-axis max pool, BN), as _fused runs it
            residual = ops.pointwise_conv_script(x, self.downsample[0].weight, self.downsample[0].bias,
                                                 list(self.downsample[0].stride), self.backend)
            residual = self._script_slice_pool(self.downsample[1].kernel_size[-1], residual)
            residual = self.downsample[2](residual)
            if out.size() != residual.size():
                out = self._script_slice_pool(self.pool.kernel_size[-1], self.bn3(out))
                return torch.relu_(out + residual)
        return ops.bn_add_relu_script(out, residual, self.bn3.running_mean, self.bn3.running_var, self.bn3.weight,
                                      self.bn3.bias, self.bn3.eps, self.backend)

    def _script_slice_pool(self, window: int, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.ahnet_fast.slice_max_pool_script(x, window, self.backend)

    def _scripted(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        residual = x
        if self.downsample is not None:
            residual = self.downsample(x)
            if out.size() != residual.size():
                out = self.pool(out)
        return self.relu(out + residual)

    @torch.jit.unused
    def _fused(self, x: torch.Tensor) -> torch.Tensor:
        out = bn_relu_conv(self.bn1, self.conv2, pointwise(self.conv1, x, self.backend), self.backend)
        out = bn_relu_conv(self.bn2, self.conv3, out, self.backend)
        residual = x
        if self.downsample is not None:
            residual = x
            for module in self.downsample:  # (conv, slice pool, BN); a (1, 1, 1) pool is the identity
                if isinstance(module, (nn.MaxPool2d, nn.MaxPool3d)):
                    residual = slice_pool(module, residual, self.backend)
                elif isinstance(module, (nn.Conv2d, nn.Conv3d)):
                    residual = pointwise(module, residual, self.backend)
                else:
                    residual = module(residual)
            if out.shape != residual.shape:  # MONAI pools bn3's output: the composition here
                out = slice_pool(self.pool, self.bn3(out), self.backend)
                return torch.relu_(out + residual)
        return bn_add_relu(self.bn3, out, residual, self.backend)


class _NormReLUConv(_ScriptOps, nn.Sequential):
    """Modules whose first three are norm, relu, conv: BN-ReLU-convolution as one fused op."""

    def _script_norm_relu_conv(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.ahnet_fast.bn_relu_conv_script(x, self.norm.running_mean, self.norm.running_var,
                                                        self.norm.weight, self.norm.bias, self.norm.eps,
                                                        self.conv.weight, list(self.conv.stride),
                                                        list(self.conv.padding), self.backend)

    @torch.jit.unused
    def _fused_norm_relu_conv(self, x: torch.Tensor) -> torch.Tensor:
        return bn_relu_conv(self.norm, self.conv, x, self.backend)


class Projection(_NormReLUConv):
    """BN-ReLU-1x1x1 convolution (``trans1``)."""

    def __init__(self, spatial_dims: int, num_input_features: int, num_output_features: int):
        super().__init__()
        self.add_module("norm", _norm(spatial_dims)(num_input_features))
        self.add_module("relu", nn.ReLU(inplace=True))
        self.add_module("conv", _conv(spatial_dims)(num_input_features, num_output_features, kernel_size=1, stride=1,
                                                    bias=False))
        self.backend: str | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            if self.script_fused:
                if not self.training:
                    return self._script_norm_relu_conv(x)
            return self.conv(self.relu(self.norm(x)))
        return self._fused_norm_relu_conv(x)


class _BNReLUConvUp(_NormReLUConv):
    """norm, relu, conv, up: BN-ReLU-convolution through the fused op, then x2 upsampling (a
    transposed convolution through ops.transposed_conv, or interpolation). UpTransition and Final
    differ only in their convolution's kernel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            if self.script_fused:
                if not self.training:
                    y = self._script_norm_relu_conv(x)
                    if hasattr(self.up, "weight"):  # static: a transposed convolution, as upsample() takes it
                        return torch.ops.ahnet_fast.transposed_conv_script(y, self.up.weight, self.up.bias,
                                                                           list(self.up.stride), self.backend)
                    return self.up(y)
            return self.up(self.conv(self.relu(self.norm(x))))
        return self._fused(x)

    @torch.jit.unused
    def _fused(self, x: torch.Tensor) -> torch.Tensor:
        return upsample(self.up, self._fused_norm_relu_conv(x), self.backend)


class UpTransition(_BNReLUConvUp):
    """BN-ReLU-1x1x1 convolution, then x2 upsampling (transposed convolution or interpolation)."""

    def __init__(self, spatial_dims: int, num_input_features: int, num_output_features: int,
                 upsample_mode: str = "transpose"):
        super().__init__()
        self.add_module("norm", _norm(spatial_dims)(num_input_features))
        self.add_module("relu", nn.ReLU(inplace=True))
        self.add_module("conv", _conv(spatial_dims)(num_input_features, num_output_features, kernel_size=1, stride=1,
                                                    bias=False))
        if upsample_mode == "transpose":
            self.add_module("up", _conv_transpose(spatial_dims)(num_output_features, num_output_features,
                                                                kernel_size=2, stride=2, bias=False))
        else:
            self.add_module("up", _upsample(upsample_mode))
        self.backend: str | None = None


class Final(_BNReLUConvUp):
    """BN-ReLU-3x3x1 convolution to the output classes, then x2 upsampling."""

    def __init__(self, spatial_dims: int, num_input_features: int, num_output_features: int,
                 upsample_mode: str = "transpose"):
        super().__init__()
        self.add_module("norm", _norm(spatial_dims)(num_input_features))
        self.add_module("relu", nn.ReLU(inplace=True))
        self.add_module("conv", _conv(spatial_dims)(num_input_features, num_output_features,
                                                    kernel_size=(3, 3, 1)[-spatial_dims:], stride=1,
                                                    padding=(1, 1, 0)[-spatial_dims:], bias=False))
        if upsample_mode == "transpose":
            self.add_module("up", _conv_transpose(spatial_dims)(num_output_features, num_output_features,
                                                                kernel_size=2, stride=2, bias=False))
        else:
            self.add_module("up", _upsample(upsample_mode))
        self.backend: str | None = None


class Pseudo3DLayer(nn.Module):
    """Dense layer of the decoder: BN-ReLU-1x1x1 -> BN-ReLU-3x3x1 (a) ; BN-ReLU-1x1x3(a) (b) ;
    BN-ReLU-1x1x1(a + b); the new features are concatenated onto the input."""

    def __init__(self, spatial_dims: int, num_input_features: int, growth_rate: int, bn_size: int,
                 dropout_prob: float):
        super().__init__()
        conv, norm = _conv(spatial_dims), _norm(spatial_dims)
        self.bn1 = norm(num_input_features)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = conv(num_input_features, bn_size * growth_rate, kernel_size=1, stride=1, bias=False)
        self.bn2 = norm(bn_size * growth_rate)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = conv(bn_size * growth_rate, growth_rate, kernel_size=(3, 3, 1)[-spatial_dims:], stride=1,
                          padding=(1, 1, 0)[-spatial_dims:], bias=False)
        self.bn3 = norm(growth_rate)
        self.relu3 = nn.ReLU(inplace=True)
        self.conv3 = conv(growth_rate, growth_rate, kernel_size=(1, 1, 3)[-spatial_dims:], stride=1,
                          padding=(0, 0, 1)[-spatial_dims:], bias=False)
        self.bn4 = norm(growth_rate)
        self.relu4 = nn.ReLU(inplace=True)
        self.conv4 = conv(growth_rate, growth_rate, kernel_size=1, stride=1, bias=False)
        # MONAI keeps the attribute but never applies dropout (it resets it to 0 in forward,
        # because the model is run in train mode for inference); so does this layer.
        self.dropout_prob = 0.0
        self.backend: str | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            a = self.conv2(self.relu2(self.bn2(self.conv1(self.relu1(self.bn1(x))))))
            b = self.conv3(self.relu3(self.bn3(a)))
            return torch.cat([x, self.conv4(self.relu4(self.bn4(a + b)))], 1)
        return self._fused(x)

    @torch.jit.unused
    def _fused(self, x: torch.Tensor) -> torch.Tensor:
        a = bn_relu_conv(self.bn2, self.conv2, bn_relu_conv(self.bn1, self.conv1, x, self.backend), self.backend)
        b = bn_relu_conv(self.bn3, self.conv3, a, self.backend)
        new_features = bn_relu_conv(self.bn4, self.conv4, a + b, self.backend)
        return torch.cat([x, new_features], 1)


class DenseBlock(_ScriptOps, nn.Sequential):
    """Pseudo-3D dense layers (``denselayer1..L``, MONAI's names) run as one op: the concatenation
    lives in one buffer that every layer writes into, and BN-ReLU outputs are recomputed in backward
    (:func:`ahnet_fast.ops.dense_block`)."""

    def __init__(self, spatial_dims: int, num_layers: int, num_input_features: int, bn_size: int, growth_rate: int,
                 dropout_prob: float):
        super().__init__()
        for i in range(num_layers):
            self.add_module(f"denselayer{i + 1}", Pseudo3DLayer(spatial_dims, num_input_features + i * growth_rate,
                                                                growth_rate, bn_size, dropout_prob))
        self.backend: str | None = None

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        """The block on ``x`` (MONAI's call), or on ``x + skip`` with the sum written into the block's
        buffer (AH-Net's decoder stages)."""
        if torch.jit.is_scripting():
            if self.script_fused:
                if not self.training:
                    return self._script_fused(x, skip)
            if skip is not None:
                x = x + skip
            for layer in self:
                x = layer(x)
            return x
        return self._fused(x, skip)

    def _script_fused(self, x: torch.Tensor, skip: torch.Tensor | None) -> torch.Tensor:
        weights: list[torch.Tensor] = []
        means: list[torch.Tensor | None] = []
        variances: list[torch.Tensor | None] = []
        eps = 1e-5
        for layer in self:  # the order dense_block() lists them in
            eps = layer.bn1.eps
            weights += [layer.bn1.weight, layer.bn1.bias, layer.conv1.weight, layer.bn2.weight, layer.bn2.bias,
                        layer.conv2.weight, layer.bn3.weight, layer.bn3.bias, layer.conv3.weight, layer.bn4.weight,
                        layer.bn4.bias, layer.conv4.weight]
            for bn_mean, bn_var in ((layer.bn1.running_mean, layer.bn1.running_var),
                                    (layer.bn2.running_mean, layer.bn2.running_var),
                                    (layer.bn3.running_mean, layer.bn3.running_var),
                                    (layer.bn4.running_mean, layer.bn4.running_var)):
                means.append(bn_mean)
                variances.append(bn_var)
        return torch.ops.ahnet_fast.dense_block_script(x, weights, means, variances, eps, skip, self.backend)

    @torch.jit.unused
    def _fused(self, x: torch.Tensor, skip: torch.Tensor | None, grad_handover: bool = False) -> torch.Tensor:
        return dense_block(list(self), x, self.backend, skip, grad_handover)

    @torch.jit.unused
    def input_buffer(self, x: torch.Tensor, skip: torch.Tensor | None = None, front: int = 0) -> torch.Tensor:
        """For inference by parts: a buffer of the block's output channels (after ``front`` channels
        left to the caller) holding x (+ skip), for :meth:`fill`; x and skip may be freed before it."""
        return dense_block_input(list(self), x, skip, front)

    @torch.jit.unused
    def fill(self, buffer: torch.Tensor, channels0: int) -> torch.Tensor:
        """Inference (eval mode, no autograd): the block's layers written into ``buffer`` after its
        first ``channels0`` channels, the block's input (``ops.dense_block_into``)."""
        return dense_block_into(list(self), buffer, channels0, self.backend)


class PyramidVolumetricPooling(_ScriptOps, nn.Module):
    """Pyramid volumetric pooling (MONAI's ``PSP``): for level i < psp_block_num, max-pool windows of
    (2^(i+3), 2^(i+3), 1), project to one channel with a 1x1x1 convolution padded (1, 1, 0) (MONAI's
    quirk: it adds a border ring), upsample back to the input size, and concatenate the levels.

    Same parameter names as MONAI's ``PSP(spatial_dims, psp_block_num, in_ch, upsample_mode)``
    (``project_modules.i``, ``up_modules.i``); here the channel count is ``in_channels``. The work is
    done by the op :func:`ahnet_fast.ops.pyramid_pool`: with the fused backends one read of the input
    serves every level and no int64 index is kept for backward (``pool_modules`` stay, parameter-free,
    for MONAI's module structure). ``forward(x, concat_input=True)`` returns ``cat([psp(x), x], 1)``,
    the tensor AH-Net's final block takes, written in the same pass.

    Keyword-only:
        backend: "auto", "reference", "cpp" or "triton"; None follows ``ahnet_fast.backend(...)`` /
            ``AHNET_FAST_BACKEND``.
    """

    def __init__(self, spatial_dims: int = 3, psp_block_num: int = 4, in_channels: int = 124,
                 upsample_mode: str = "transpose", *, backend: str | None = None):
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"PyramidVolumetricPooling: spatial_dims must be 2 or 3, got {spatial_dims!r}")
        if psp_block_num not in (0, 1, 2, 3, 4):
            raise ValueError(f"PyramidVolumetricPooling: psp_block_num must be an integer in [0, 4], got "
                             f"{psp_block_num!r}")
        if upsample_mode not in UPSAMPLE_MODES:
            raise ValueError(f"PyramidVolumetricPooling: upsample_mode must be one of {UPSAMPLE_MODES}, got "
                             f"{upsample_mode!r}")
        conv, pool = _conv(spatial_dims), _maxpool(spatial_dims)
        self.in_channels = in_channels
        self.backend = backend
        self.up_modules = nn.ModuleList()
        self.pool_modules = nn.ModuleList()
        self.project_modules = nn.ModuleList()
        for i in range(psp_block_num):
            size = (2 ** (i + 3), 2 ** (i + 3), 1)[-spatial_dims:]
            self.pool_modules.append(pool(kernel_size=size, stride=size))
            self.project_modules.append(conv(in_channels, 1, kernel_size=(1, 1, 1)[-spatial_dims:], stride=1,
                                             padding=(1, 1, 0)[-spatial_dims:]))
        self.spatial_dims = spatial_dims
        self.psp_block_num = psp_block_num
        self.upsample_mode = upsample_mode
        if upsample_mode == "transpose":
            for i in range(psp_block_num):
                size = (2 ** (i + 3), 2 ** (i + 3), 1)[-spatial_dims:]
                pad = (2 ** (i + 3), 2 ** (i + 3), 0)[-spatial_dims:]
                self.up_modules.append(_conv_transpose(spatial_dims)(1, 1, kernel_size=size, stride=size, padding=pad))
        set_backend(self, backend)  # validates the name now

    def check_input(self, x: torch.Tensor) -> None:
        """ValueError naming the rule when the pooling cannot take ``x``: the in-plane axes (3D: the first
        two spatial axes; 2D: the first) must be a multiple of the largest window, 2^(psp_block_num+2),
        with "transpose" (its upsampling tiles the window exactly), and at least that window otherwise."""
        name = (f"PyramidVolumetricPooling(spatial_dims={self.spatial_dims}, psp_block_num={self.psp_block_num}, "
                f"upsample_mode={self.upsample_mode!r})")
        if x.dim() != self.spatial_dims + 2 or x.shape[1] != self.in_channels:
            raise ValueError(f"{name} expects (B, {self.in_channels}, {self.spatial_dims} spatial axes), got shape "
                             f"{tuple(x.shape)}")
        check_pyramid_pool_input(x, self.psp_block_num, self.upsample_mode, what=name)

    def forward(self, x: torch.Tensor, concat_input: bool = False) -> torch.Tensor:
        """The pyramid channels (B, psp_block_num, *spatial), as MONAI's PSP; with ``concat_input=True``,
        ``torch.cat([that, x], 1)`` written in one buffer by the same pass that reads ``x``."""
        if torch.jit.is_scripting():
            if self.script_fused:
                return self._script_fused(x, concat_input)  # no BatchNorm: the same in train and eval
            return self._scripted(x, concat_input)
        return self._fused(x, concat_input)

    def _script_fused(self, x: torch.Tensor, concat_input: bool) -> torch.Tensor:
        proj_weights: list[torch.Tensor] = []
        proj_biases: list[torch.Tensor] = []
        for project in self.project_modules:
            bias = project.bias
            assert bias is not None  # the pyramid's convolutions are built with biases
            proj_weights.append(project.weight)
            proj_biases.append(bias)
        up_weights: list[torch.Tensor] | None = None
        up_biases: list[torch.Tensor] | None = None
        if self.upsample_mode == "transpose":
            weights: list[torch.Tensor] = []
            biases: list[torch.Tensor] = []
            for up in self.up_modules:
                up_bias = up.bias
                assert up_bias is not None
                weights.append(up.weight)
                biases.append(up_bias)
            up_weights, up_biases = weights, biases
        return torch.ops.ahnet_fast.pyramid_pool_script(x, proj_weights, proj_biases, up_weights, up_biases,
                                                        self.upsample_mode, concat_input, self.backend)

    def _scripted(self, x: torch.Tensor, concat_input: bool) -> torch.Tensor:
        outputs: list[torch.Tensor] = []
        if self.upsample_mode == "transpose":
            for project, pool, up in zip(self.project_modules, self.pool_modules, self.up_modules):
                outputs.append(up(project(pool(x))))
        else:
            align_corners: bool | None = None
            if self.upsample_mode in ["trilinear", "bilinear"]:
                align_corners = True
            for project, pool in zip(self.project_modules, self.pool_modules):
                outputs.append(nn.functional.interpolate(project(pool(x)), size=x.shape[2:], mode=self.upsample_mode,
                                                         align_corners=align_corners))
        if concat_input:
            outputs.append(x)
        return torch.cat(outputs, dim=1)

    @torch.jit.unused
    def _fused(self, x: torch.Tensor, concat_input: bool, grad_handover: bool = False) -> torch.Tensor:
        self.check_input(x)
        transpose = self.upsample_mode == "transpose"
        return pyramid_pool(
            x,
            [m.weight for m in self.project_modules],
            [m.bias for m in self.project_modules],
            [m.weight for m in self.up_modules] if transpose else None,
            [m.bias for m in self.up_modules] if transpose else None,
            upsample_mode=self.upsample_mode,
            concat_input=concat_input,
            backend=self.backend,
            grad_handover=grad_handover,
        )


# MONAI's name for the module.
PSP = PyramidVolumetricPooling


class AHNet(_ScriptOps, nn.Module):
    """AH-Net: a ResNet50 encoder with anisotropic 3x3x1 kernels (transferable from a 2D network,
    see :meth:`copy_from`), a decoder of pseudo-3D dense blocks (3x3x1 and 1x1x3 kernels), pyramid
    volumetric pooling, and a final 3x3x1 convolution with x2 upsampling.

    Args (as MONAI 1.6's ``AHNet``):
        layers: residual blocks in layer1..layer4. Default (3, 4, 6, 3).
        spatial_dims: 2 or 3. In 3D the last spatial axis is the slice axis.
        in_channels, out_channels: channels of input and output.
        psp_block_num: pyramid volumetric pooling levels, 0 to 4.
        upsample_mode: "transpose" (transposed convolutions), "bilinear" (2D), "trilinear" (3D)
            or "nearest".
        pretrained: must be False: no weights are downloaded. To start from ImageNet features, load
            a ResNet50 checkpoint you have into an :class:`~ahnet_fast.FCN` with
            ``load_resnet50_weights`` and call :meth:`copy_from`.
        progress: accepted for MONAI compatibility; unused.

    Keyword-only:
        backend: backend of the fused ops ("auto", "reference", "cpp", "triton"); None follows
            ``ahnet_fast.backend(...)`` / ``AHNET_FAST_BACKEND``.
        checkpoint: activation checkpointing (non-reentrant, in training with gradients): "none";
            "encoder" (every encoder layer, each of its bottleneck blocks a segment nested in it);
            "decoder" (every decoder stage: up-transition, skip sum and dense block; and the pyramid
            pooling with the final block); "all" (both, and the stem). Activations inside a segment
            are recomputed in backward; the BatchNorm running statistics equal those without
            checkpointing, and so do the gradients: bitwise where every map fits one band (16 MiB of
            a unit's widest activation, ``ahnet_fast.ops._bands``), to float rounding beyond, where
            on the CPU the BatchNorm-ReLU-convolution units (inside the dense blocks of segments,
            and every unit's backward under any policy) run band by band. "auto": at the first
            training forward of each input shape and precision, the memory planner
            (:mod:`ahnet_fast.memory`) picks the cheapest of those that fits ``memory_budget``.
        memory_budget: bytes (or "16GB") for checkpoint="auto"; None = the device's memory (CUDA:
            total memory; CPU: memory available plus this process's resident set), with 10% kept free.

    Input sizes (see :mod:`ahnet_fast.nn.shapes`): with c = ceil(n/2) for an in-plane size n, c
    must be a multiple of 16, and with psp_block_num = p > 0 also a multiple of 2^(p+2) in
    "transpose" mode, or at least 2^(p+2) otherwise; for the slice size n, floor(n/2) must be a
    positive multiple of 16. So with the defaults (transpose, p=4), in-plane sizes are multiples
    of 128 and the slice size a multiple of 32. Other shapes raise ``ValueError`` naming the rule.
    The output has spatial size 2*c per axis (the input size when it is a multiple of 32).
    """

    def __init__(self, layers: tuple = (3, 4, 6, 3), spatial_dims: int = 3, in_channels: int = 1,
                 out_channels: int = 1, psp_block_num: int = 4, upsample_mode: str = "transpose",
                 pretrained: bool = False, progress: bool = True, *, backend: str | None = None,
                 checkpoint: str = "none", memory_budget: int | str | None = None):
        self.inplanes = 64
        super().__init__()
        if checkpoint not in POLICIES:
            raise ValueError(f"AHNet: checkpoint must be one of {POLICIES}, got {checkpoint!r}")
        self.checkpoint = checkpoint
        self.memory_budget = memory_budget
        self.auto_choices: dict = {}  # checkpoint="auto": (shape, dtype, device) -> policy chosen
        if spatial_dims not in (2, 3):
            raise ValueError(f"AHNet: spatial_dims must be 2 or 3, got {spatial_dims!r}")
        if psp_block_num not in (0, 1, 2, 3, 4):
            raise ValueError(f"AHNet: psp_block_num must be an integer in [0, 4], got {psp_block_num!r}")
        if upsample_mode not in UPSAMPLE_MODES:
            raise ValueError(f"AHNet: upsample_mode must be one of {UPSAMPLE_MODES}, got {upsample_mode!r}")
        interp_for = {"bilinear": 2, "trilinear": 3}
        if interp_for.get(upsample_mode, spatial_dims) != spatial_dims:
            raise ValueError(f"AHNet: upsample_mode={upsample_mode!r} needs spatial_dims={interp_for[upsample_mode]}, "
                             f"got spatial_dims={spatial_dims}")
        if len(layers) != 4 or any(int(n) < 1 for n in layers):
            raise ValueError(f"AHNet: layers must be 4 positive block counts, got {layers!r}")
        if in_channels < 1 or out_channels < 1:
            raise ValueError(f"AHNet: in_channels and out_channels must be positive, got {in_channels}, {out_channels}")
        if pretrained:
            raise ValueError(
                "AHNet(pretrained=True) would download ImageNet weights; ahnet_fast never downloads. Build "
                "ahnet_fast.FCN(), call fcn.load_resnet50_weights(path_to_your_resnet50.pth), then "
                "AHNet(...).copy_from(fcn)."
            )
        self.backend = backend

        conv, conv_t, norm, pool = _conv(spatial_dims), _conv_transpose(spatial_dims), _norm(spatial_dims), \
            _maxpool(spatial_dims)
        self.conv2d_type = nn.Conv2d
        self.norm2d_type = nn.BatchNorm2d
        self.conv_type = conv
        self.norm_type = norm
        self.relu_type = nn.ReLU
        self.pool_type = pool
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.psp_block_num = psp_block_num
        self.upsample_mode = upsample_mode

        self.conv1 = conv(in_channels, 64, kernel_size=(7, 7, 3)[-spatial_dims:], stride=(2, 2, 1)[-spatial_dims:],
                          padding=(3, 3, 1)[-spatial_dims:], bias=False)
        self.pool1 = pool(kernel_size=(1, 1, 2)[-spatial_dims:], stride=(1, 1, 2)[-spatial_dims:])
        self.bn0 = norm(64)
        self.relu = nn.ReLU(inplace=True)
        if upsample_mode in ("transpose", "nearest"):
            # kernel == stride keeps max-pool backward deterministic (MONAI PR #815)
            self.maxpool = pool(kernel_size=(2, 2, 2)[-spatial_dims:], stride=2)
        else:
            self.maxpool = pool(kernel_size=(3, 3, 3)[-spatial_dims:], stride=2, padding=1)

        self.layer1 = self._make_layer(Bottleneck3x3x1, 64, layers[0], stride=1)
        self.layer2 = self._make_layer(Bottleneck3x3x1, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(Bottleneck3x3x1, 256, layers[2], stride=2)
        self.layer4 = self._make_layer(Bottleneck3x3x1, 512, layers[3], stride=2)

        growth, bn_size, n_dense = 20, 4, 3
        init_features, res1, res2, res3, res4 = 64, 256, 512, 1024, 2048
        self.up0 = UpTransition(spatial_dims, res4, res3, upsample_mode)
        self.dense0 = DenseBlock(spatial_dims, n_dense, res3, bn_size, growth, 0.0)
        self.up1 = UpTransition(spatial_dims, res3 + n_dense * growth, res2, upsample_mode)
        self.dense1 = DenseBlock(spatial_dims, n_dense, res2, bn_size, growth, 0.0)
        self.up2 = UpTransition(spatial_dims, res2 + n_dense * growth, res1, upsample_mode)
        self.dense2 = DenseBlock(spatial_dims, n_dense, res1, bn_size, growth, 0.0)
        self.trans1 = Projection(spatial_dims, res1 + n_dense * growth, init_features)
        self.dense3 = DenseBlock(spatial_dims, n_dense, init_features, bn_size, growth, 0.0)
        self.up3 = UpTransition(spatial_dims, init_features + n_dense * growth, init_features, upsample_mode)
        self.dense4 = DenseBlock(spatial_dims, n_dense, init_features, bn_size, growth, 0.0)
        d4_channels = init_features + n_dense * growth
        self.psp = PyramidVolumetricPooling(spatial_dims, psp_block_num, d4_channels, upsample_mode)
        self.final = Final(spatial_dims, psp_block_num + d4_channels, out_channels, upsample_mode)

        # MONAI's initialisation, in the same module order, so a seed gives MONAI's weights.
        for m in self.modules():
            if isinstance(m, (conv, conv_t)):
                n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                m.weight.data.normal_(0, math.sqrt(2.0 / n))
            elif isinstance(m, norm):
                m.weight.data.fill_(1)
                m.bias.data.zero_()
        set_backend(self, backend)  # validates the name now rather than at the first forward

    def _make_layer(self, block: type[Bottleneck3x3x1], planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        sd = self.spatial_dims
        if stride != 1 or self.inplanes != planes * block.expansion:
            # MONAI slices these two tuples from the front (unlike the kernels): kept as is.
            downsample = nn.Sequential(
                self.conv_type(self.inplanes, planes * block.expansion, kernel_size=1,
                               stride=(stride, stride, 1)[:sd], bias=False),
                self.pool_type(kernel_size=(1, 1, stride)[:sd], stride=(1, 1, stride)[:sd]),
                self.norm_type(planes * block.expansion),
            )
        layers = [block(sd, self.inplanes, planes, (stride, stride, 1)[:sd], downsample)]
        self.inplanes = planes * block.expansion
        for _ in range(1, blocks):
            layers.append(block(sd, self.inplanes, planes))
        return nn.Sequential(*layers)

    def set_backend(self, backend: str | None) -> AHNet:
        """Sets the fused-op backend of every layer (None: follow the global choice)."""
        return set_backend(self, backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            if self.script_fused:
                if not self.training:
                    return self._script_fused(x)
            return self._scripted(x)
        return self._fused(x)

    def _script_fused(self, x: torch.Tensor) -> torch.Tensor:
        """_fused in eval mode, every fused call a dispatcher op (modules below run theirs)."""
        ops = torch.ops.ahnet_fast
        conv_x = ops.stem_conv_pool_script(x, self.conv1.weight, self.conv1.bias, list(self.conv1.stride),
                                           list(self.conv1.padding), self.pool1.kernel_size[-1], self.backend)
        conv_x = ops.bn_relu_script(conv_x, self.bn0.running_mean, self.bn0.running_var, self.bn0.weight,
                                    self.bn0.bias, self.bn0.eps, self.backend)
        pool_x = self.maxpool(conv_x)
        fm1 = self.layer1(pool_x)
        fm2 = self.layer2(fm1)
        fm3 = self.layer3(fm2)
        fm4 = self.layer4(fm3)
        d0 = self.dense0(self.up0(fm4), fm3)
        d1 = self.dense1(self.up1(d0), fm2)
        d2 = self.dense2(self.up2(d1), fm1)
        d3 = self.dense3(self.trans1(d2), pool_x)
        d4 = self.dense4(self.up3(d3), conv_x)
        if self.psp_block_num > 0:
            d4 = self.psp(d4, True)
        return self.final(d4)

    def _scripted(self, x: torch.Tensor) -> torch.Tensor:
        conv_x = self.relu(self.bn0(self.pool1(self.conv1(x))))
        pool_x = self.maxpool(conv_x)
        fm1 = self.layer1(pool_x)
        fm2 = self.layer2(fm1)
        fm3 = self.layer3(fm2)
        fm4 = self.layer4(fm3)
        d0 = self.dense0(self.up0(fm4) + fm3)
        d1 = self.dense1(self.up1(d0) + fm2)
        d2 = self.dense2(self.up2(d1) + fm1)
        d3 = self.dense3(self.trans1(d2) + pool_x)
        d4 = self.dense4(self.up3(d3) + conv_x)
        if self.psp_block_num > 0:
            d4 = self.psp(d4, True)
        return self.final(d4)

    @torch.jit.unused
    def _fused(self, x: torch.Tensor) -> torch.Tensor:
        check_ahnet_input(x, self.spatial_dims, self.in_channels, self.psp_block_num, self.upsample_mode)
        check_input_matches(x, self.conv1.weight, "AHNet")
        if self._inference_path_applies() and no_backward(x, *self.parameters()):
            # inference: nothing kept for a backward, each map freed after its last reader, the ops'
            # scratch pool not kept (nor what a training step left in it)
            scratch.push_keep(False)
            try:
                return self._forward_lean(x)
            finally:
                scratch.pop_keep()
        policy = self.checkpoint
        if policy == "auto":
            policy = resolve_auto(self, x) if self.training and torch.is_grad_enabled() else "none"
        encoder, decoder, stem = policy in ("encoder", "all"), policy in ("decoder", "all"), policy == "all"
        # the ops' reused CPU scratch buffers (ahnet_fast._scratch) cost memory between steps: kept
        # when time comes first, freed under activation checkpointing, where memory does (for this
        # call and its backward only)
        scratch.push_keep(policy == "none")
        try:
            return self._forward(x, encoder, decoder, stem)
        finally:
            scratch.pop_keep()

    def _segment(self, enabled: bool, fn, modules, *args):
        return checkpoint_segment(fn, modules, *args) if enabled and self.training else fn(*args)

    def _forward(self, x: torch.Tensor, encoder: bool, decoder: bool, stem: bool) -> torch.Tensor:
        segment = self._segment
        if stem:
            # the pooling inside the stem's segment: what it keeps for backward (its indices, and
            # under autocast a float32 copy of conv_x: CPU autocast runs max pooling in float32)
            # would otherwise live from the forward to the stem's backward, next to the decoder's
            conv_x, x = segment(stem, self._stem_pooled, (self.conv1, self.bn0), x)
        else:
            conv_x = segment(stem, self._stem, (self.conv1, self.bn0), x)
            x = self.maxpool(conv_x)
        pool_x = x

        features = []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            # a layer is one segment, and each of its blocks a segment nested in it: between the forward
            # and the layer's backward only the layer's input is kept (not every block's output: at
            # layer1 those were three maps of 256 channels), the blocks' outputs exist again only
            # while the layer's backward runs. The price: the encoder's forward runs three times
            if encoder and self.training and len(layer) > 1:
                x = segment(True, self._blocks_checkpointed, (layer,), x, layer)
            else:
                for block in layer:
                    x = segment(encoder, block, (block,), x)
            features.append(x)
        fm1, fm2, fm3, fm4 = features

        # each decoder stage is dense(up(a) + skip), the sum written into the block's buffer
        d0 = segment(decoder, self._stage0, (self.up0, self.dense0), fm4, fm3)
        d1 = segment(decoder, self._stage1, (self.up1, self.dense1), d0, fm2)
        if decoder:
            # trans1 (BN-ReLU-1x1x1, no upsampling) in stage 2's segment: the boundary kept from the
            # forward to stage 3's backward is its 64 channels, not dense2's 316 (at 256x256x32 input
            # 8 instead of 39.5 MiB, alive through the last stages' backward, where the peak is)
            t2 = segment(True, self._stage2_transition, (self.up2, self.dense2, self.trans1), d1, fm1)
            d3 = segment(True, self.dense3, (self.dense3,), t2, pool_x)
        else:
            d2 = self._stage2(d1, fm1)
            d3 = self._stage3(d2, pool_x)
        if decoder and self.psp_block_num > 0:
            # the pyramid pooling and its concatenation in the last stage's segment: the boundary kept
            # for the final block is that concatenation alone, not it and dense4's output beside it
            # (the final block's backward held both, 124 + 128 channels at the largest decoder size)
            head_input = segment(True, self._stage4_pooled, (self.up3, self.dense4, self.psp), d3, conv_x)
            return segment(True, self.final, (self.final,), head_input)
        d4 = segment(decoder, self._stage4, (self.up3, self.dense4), d3, conv_x)
        return segment(decoder, self._head, (self.psp, self.final), d4)

    @staticmethod
    def _blocks_checkpointed(x: torch.Tensor, layer: nn.Sequential) -> torch.Tensor:
        for block in layer:
            x = checkpoint_segment(block, (block,), x)
        return x

    def _inference_path_applies(self) -> bool:
        """Whether _forward_lean computes what _forward would: every module in eval mode, every
        BatchNorm with running statistics (the banded units need them), and no forward hook on the
        modules it does not call as modules (dense4 is filled in place; the pyramid pooling returns
        its channels alone), so that hooks see what they would see on the ordinary path."""
        for m in self.modules():
            if m.training or (isinstance(m, nn.modules.batchnorm._BatchNorm) and
                              (m.running_mean is None or m.running_var is None)):
                return False
        return _unhooked(self.dense4, self.psp)

    def _forward_lean(self, x: torch.Tensor) -> torch.Tensor:
        """_forward in eval mode with no backward to follow, written so that each map is freed as
        soon as its last reader has run (what Inductor does for a compiled graph): an encoder map
        after the decoder stage that adds it, each stage's output after the next stage's input
        exists. The last stage, where the maps are largest, is built in one buffer: the upsampled
        map + conv_x written into it (both freed before the dense block runs, which fills the rest
        of the buffer in place), the pyramid channels written into its first channels, so that no
        concatenation is ever copied. The ops run in bands of rows (ahnet_fast.ops._bands)."""
        conv_x = self._stem(x)
        pool_x = self.maxpool(conv_x)
        h = pool_x
        features = []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            h = layer(h)
            features.append(h)
        del h
        fm4 = features.pop()
        d = self.dense0(self.up0(fm4), features.pop())
        del fm4
        d = self.dense1(self.up1(d), features.pop())
        d = self.dense2(self.up2(d), features.pop())
        d = self.dense3(self.trans1(d), pool_x)
        del pool_x
        up = self.up3(d)
        del d
        levels = self.psp_block_num
        buffer = self.dense4.input_buffer(up, conv_x, front=levels)
        channels0 = up.shape[1]
        del up, conv_x
        self.dense4.fill(buffer[:, levels:], channels0)
        if levels > 0:
            buffer[:, :levels].copy_(self.psp(buffer[:, levels:]))
        return self.final(buffer)

    def _stage0(self, a: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.dense0(self.up0(a), skip)

    def _stage1(self, a: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.dense1(self.up1(a), skip)

    def _stage2(self, a: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.dense2(self.up2(a), skip)

    def _stage2_transition(self, a: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.trans1(self._stage2(a, skip))

    def _stage3(self, a: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.dense3(self.trans1(a), skip)

    def _stage4(self, a: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.dense4(self.up3(a), skip)

    def _stage4_pooled(self, a: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        """The last stage and the pyramid pooling's cat((psp(d4), d4), 1), in one segment. The gradients
        pass from op to op in place where no hook can see the tensors between them (ops._handover):
        the final block's input gradient (a fresh tensor of its backward, the concatenation's only
        consumer) takes the pyramid levels' share and is dense4's output gradient; dense4's backward
        adds its prefix gradients into it. No second gradient of dense4's size is made."""
        # Run again in backward, only what the pooling saves is wanted (the same without the
        # concatenation): the 128-channel output is not built there
        concat = not output_discarded()
        if not self._handover_applies():
            return self.psp(self._stage4(a, skip), concat_input=concat)
        d4 = self.dense4._fused(self.up3(a), skip, grad_handover=True)
        return self.psp._fused(d4, concat, grad_handover=True)

    def _handover_applies(self) -> bool:
        return _unhooked(self.dense4, self.psp, self.final)

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        return bn_relu(self.bn0, stem(self.conv1, self.pool1, x, self.backend), self.backend)

    def _stem_pooled(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        conv_x = self._stem(x)
        return conv_x, self.maxpool(conv_x)

    def _head(self, d4: torch.Tensor) -> torch.Tensor:
        if self.psp_block_num > 0:
            d4 = self.psp(d4, concat_input=True)  # cat((psp(d4), d4), 1) in one buffer
        return self.final(d4)

    @torch.no_grad()
    def copy_from(self, net) -> AHNet:
        """Initialises the encoder from a 2D :class:`~ahnet_fast.FCN` / :class:`~ahnet_fast.MCFCN`, as the
        paper transfers it: conv1 64x3x7x7 becomes 64 x in_channels x 7x7x3 (the 2D net's three input
        channels, three adjacent slices, become the three slice taps; repeated over in_channels, as
        MONAI does), every other encoder convolution k x k becomes k x k x 1, and every BatchNorm's
        weight, bias, running mean, running variance and batch count are copied (MONAI copies only
        weight and bias, which changes the network's function in eval mode).

        After the transfer, in eval mode and with in_channels=1, conv1's output at slice z equals the
        2D conv1 applied to slices (z-1, z, z+1) as channels, and layer1 equals the 2D layer1 applied
        slice by slice.
        """
        if self.spatial_dims != 3:
            raise ValueError("AHNet.copy_from transfers a 2D network into a 3D AHNet; this AHNet has spatial_dims=2")
        for name in ("conv1", "bn0", "layer1", "layer2", "layer3", "layer4"):
            if not hasattr(net, name):
                raise ValueError(f"AHNet.copy_from expects an FCN/MCFCN-like 2D network with {name}; "
                                 f"{type(net).__name__} has none")
        w2d = net.conv1.weight
        if tuple(w2d.shape) != (64, 3, 7, 7):
            raise ValueError(f"AHNet.copy_from: the 2D conv1 weight must be 64x3x7x7, got {tuple(w2d.shape)}")
        # (64, 3, 7, 7) -> (64, 1, 7, 7, 3): input channel k becomes slice tap k.
        w3d = w2d.permute(0, 2, 3, 1).unsqueeze(1)
        self.conv1.weight.copy_(w3d.expand(-1, self.conv1.weight.shape[1], -1, -1, -1))
        _copy_bn(net.bn0, self.bn0)
        for i in range(1, 5):
            blocks_2d, blocks_3d = getattr(net, f"layer{i}"), getattr(self, f"layer{i}")
            if len(blocks_2d) != len(blocks_3d):
                raise ValueError(f"AHNet.copy_from: layer{i} has {len(blocks_2d)} blocks in the 2D network but "
                                 f"{len(blocks_3d)} here (layers={tuple(len(getattr(self, f'layer{j}')) for j in range(1, 5))})")
            for b2, b3 in zip(blocks_2d, blocks_3d):
                for conv_name, bn_name in (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")):
                    _copy_conv(getattr(b2, conv_name), getattr(b3, conv_name))
                    _copy_bn(getattr(b2, bn_name), getattr(b3, bn_name))
                if (b2.downsample is None) != (b3.downsample is None):
                    raise ValueError("AHNet.copy_from: the 2D and 3D blocks disagree on having a downsample branch")
                if b3.downsample is not None:
                    _copy_conv(b2.downsample[0], b3.downsample[0])  # 1x1 conv
                    _copy_bn(b2.downsample[1], b3.downsample[2])  # BN (the 3D branch has a pool between)
        return self


def _unhooked(*modules: nn.Module) -> bool:
    """No forward (pre-)hook anywhere in ``modules``, nor a global one: the model may then run them
    in ways a hook could tell apart (in place, in parts) without any hook seeing a difference."""
    m = torch.nn.modules.module
    if m._global_forward_hooks or m._global_forward_pre_hooks:
        return False
    return not any(sub._forward_hooks or sub._forward_pre_hooks for module in modules for sub in module.modules())


def _copy_conv(conv2d: nn.Module, conv3d: nn.Module) -> None:
    w = conv2d.weight.unsqueeze(-1)
    if w.shape != conv3d.weight.shape:
        raise ValueError(f"AHNet.copy_from: cannot turn a 2D kernel {tuple(conv2d.weight.shape)} into "
                         f"{tuple(conv3d.weight.shape)}")
    conv3d.weight.copy_(w)


def _copy_bn(bn2d: nn.Module, bn3d: nn.Module) -> None:
    for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
        src, dst = getattr(bn2d, name, None), getattr(bn3d, name, None)
        if src is not None and dst is not None:
            dst.copy_(src)


AHnet = Ahnet = AHNet
