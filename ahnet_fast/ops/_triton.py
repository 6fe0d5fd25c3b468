"""The Triton kernel launchers as the ops call them: each one guarded by its ATen composition.

Every launcher here has the arguments and results of its namesake in ``ahnet_fast/kernels/triton``.
When the kernel cannot compile or launch on this machine (see ``ahnet_fast.kernels.errors``), the
composition beside it computes the same contract with ATen/cuDNN under ``auto``, and a forced
Triton raises (``backends.guarded``). The compositions are also what the tests check the fallback
with, by injecting a kernel failure.

Ops import this module only after choosing Triton, so importing it may import triton.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ahnet_fast._layout import opmath_dtype, output_like
from ahnet_fast.backends import guarded
from ahnet_fast.ops._affine import scale_shift
from ahnet_fast.kernels.triton import aniso_conv as _conv
from ahnet_fast.kernels.triton import bn_relu as _bn
from ahnet_fast.kernels.triton import pyramid_pool as _pyramid

# ---------------------------------------------------------------------------------------------
# BatchNorm + ReLU


def _reduce_dims(x):
    return [0] + list(range(2, x.dim()))


def _bn_relu_stats_composition(x):
    sd = opmath_dtype(x.dtype)
    var, mean = torch.var_mean(x.to(sd), dim=_reduce_dims(x), correction=0)
    return mean, var


def _bn_relu_forward_composition(x, weight, bias, running_mean, running_var, training, eps):
    sd = opmath_dtype(x.dtype)
    if training:
        mean, var = _bn_relu_stats_composition(x)
    else:
        mean, var = running_mean.to(sd), running_var.to(sd)
    y = output_like(x)
    y.copy_(_operand(x, *scale_shift(weight, bias, mean, var, eps)))
    return y, mean, var


def _bn_relu_backward_composition(grad_out, x, weight, bias, mean, var, training, eps):
    sd = opmath_dtype(x.dtype)
    dims = _reduce_dims(x)
    shape = (1, -1) + (1,) * (x.dim() - 2)
    invstd = torch.rsqrt(var.double() + eps).to(sd)
    xhat = (x.to(sd) - mean.to(sd).view(shape)) * invstd.view(shape)
    g = torch.where(xhat * weight.to(sd).view(shape) + bias.to(sd).view(shape) > 0, grad_out.to(sd), 0)
    sum_g, sum_gx = g.sum(dims), (g * xhat).sum(dims)
    if training:
        count = x.numel() // x.shape[1]
        g = g - (sum_g.view(shape) + xhat * sum_gx.view(shape)) / count
    dx = output_like(x)
    dx.copy_(g * (weight.to(sd) * invstd).view(shape))
    return dx, sum_gx.to(weight.dtype), sum_g.to(bias.dtype)


bn_relu_stats = guarded("bn_relu", _bn.bn_relu_stats, _bn_relu_stats_composition)
bn_relu_forward = guarded("bn_relu", _bn.bn_relu_forward, _bn_relu_forward_composition)
bn_relu_backward = guarded("bn_relu", _bn.bn_relu_backward, _bn_relu_backward_composition)

# ---------------------------------------------------------------------------------------------
# Anisotropic convolutions (BN-ReLU on load)


def _operand(x, scale, shift):
    if scale is None:
        return x
    shape = (1, -1) + (1,) * (x.dim() - 2)
    sd = opmath_dtype(x.dtype)
    return torch.relu(x.to(sd) * scale.to(sd).view(shape) + shift.to(sd).view(shape)).to(x.dtype)


def _conv_forward_composition(x, weight, scale, shift, stride, padding, precision="ieee"):
    y = F.conv3d(_operand(x, scale, shift), weight.to(x.dtype), None, stride, padding)
    return y.contiguous(memory_format=torch.channels_last_3d if _conv.is_channels_last(x) else
                        torch.contiguous_format)


def _conv_input_grad_composition(grad_y, weight, input_shape, stride, padding, precision="ieee"):
    dx = torch.nn.grad.conv3d_input(tuple(input_shape), weight.to(grad_y.dtype), grad_y, stride, padding)
    return dx.contiguous(memory_format=torch.channels_last_3d if _conv.is_channels_last(grad_y) else
                         torch.contiguous_format)


def _conv_weight_grad_composition(x, grad_y, scale, shift, weight_shape, stride, padding, precision="ieee"):
    a = _operand(x, scale, shift)
    return torch.nn.grad.conv3d_weight(a, tuple(weight_shape), grad_y, stride, padding).to(opmath_dtype(x.dtype))


conv_forward = guarded("aniso_conv", _conv.conv_forward, _conv_forward_composition)
conv_input_grad = guarded("aniso_conv", _conv.conv_input_grad, _conv_input_grad_composition)
conv_weight_grad = guarded("aniso_conv", _conv.conv_weight_grad, _conv_weight_grad_composition)

# ---------------------------------------------------------------------------------------------
# Pyramid pooling: the forward falls back in the op's dispatch; the backward here routes each
# level's gradient to the argmax positions the forward recorded (row * window width + column
# inside each window; windows of one level do not overlap).


def _pyramid_pool_backward_composition(grad_identity, grad_pooled, argmax, size, pool_w, dtype, channels_last):
    n, c, h, w, d = size
    op = opmath_dtype(dtype)
    gx = torch.zeros((n, c, h * w, d), dtype=op, device=grad_pooled[0].device)
    for level, (gp, arg) in enumerate(zip(grad_pooled, argmax)):
        s = 8 << level
        sw = s if pool_w else 1
        hl, wl = gp.shape[2:4]
        a = arg.long()
        rows = torch.arange(hl, device=a.device).view(1, 1, hl, 1, 1) * s + a // sw
        cols = torch.arange(wl, device=a.device).view(1, 1, 1, wl, 1) * sw + a % sw
        index = (rows * w + cols).reshape(n, c, hl * wl, d)
        gx.scatter_add_(2, index, gp.to(op).reshape(n, c, hl * wl, d))
    gx = gx.view(n, c, h, w, d)
    if grad_identity is not None:
        gx += grad_identity.to(op)
    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
    return gx.to(dtype).contiguous(memory_format=fmt)


pyramid_pool_backward = guarded("pyramid_pool", _pyramid.pyramid_pool_backward, _pyramid_pool_backward_composition)
pyramid_pool = _pyramid.pyramid_pool  # a failure here reaches the op's dispatch, which runs another backend
