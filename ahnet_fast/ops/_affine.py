"""BatchNorm as one multiply-add per channel, the (scale, shift) pair that kernels applying a
BatchNorm-ReLU on the fly use: the Triton kernels' prologue and the CPU product kernel
(ops.channel_mm). Apart from bn_relu so that the Triton launchers and the CPU engines import it
without importing each other."""
from __future__ import annotations

import torch

from ahnet_fast._layout import opmath_dtype


def scale_shift(weight, bias, mean, var, eps):
    """BatchNorm as one multiply-add per channel, (scale, shift), formed in float64 and kept in the
    statistics' precision: what the Triton kernels' BN-ReLU prologue applies."""
    invstd = torch.rsqrt(var.double() + eps)
    scale = weight.double() * invstd
    shift = bias.double() - mean.double() * scale
    dt = opmath_dtype(mean.dtype)
    return scale.to(dt).contiguous(), shift.to(dt).contiguous()


def cpu_scale_shift(weight, bias, mean, var, eps):
    """(scale, shift) of float32 BatchNorm exactly as the C++ BN-ReLU kernels form them
    (csrc/cpu/batch_norm.h: invstd in double, rounded, then scale = weight * invstd and shift = bias -
    mean * scale, each product and difference rounded to float32): the CPU product kernel
    (ops.channel_mm) applying x * scale + shift then gives the activation bn_relu_apply_ writes, bit for bit."""
    invstd = (1.0 / torch.sqrt(var.double() + eps)).to(mean.dtype)
    scale = weight.to(mean.dtype) * invstd
    shift = bias.to(mean.dtype) - mean * scale
    return scale.contiguous(), shift.contiguous()
