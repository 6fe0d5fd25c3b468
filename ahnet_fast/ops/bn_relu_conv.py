"""BatchNorm, ReLU and a convolution as one op that keeps only the BatchNorm input for backward.

``bn_relu_conv(x, ...) = conv(relu(batch_norm(x)), weight)`` — the pre-activation unit of AH-Net's
decoder (dense layers, transitions, the final block) and of its up/projection transitions. In
eager PyTorch the normalised activation ``relu(batch_norm(x))`` is written, and kept for the
convolution's backward next to ``x`` kept for the BatchNorm's: two full-size tensors. Here only
``x`` (and two per-channel statistics) are saved; backward recomputes the activation from them
(Pleiss et al., "Memory-Efficient Implementation of DenseNets", 2017), which costs one
elementwise pass and saves one tensor of the input's size per unit.

Backends:

- ``reference``: ``F.conv{2,3}d(F.relu(F.batch_norm(x)))`` under autograd: the oracle, and what
  runs when nothing faster can.
- ``cpp``: the C++ BatchNorm+ReLU kernels (``ahnet_fast::bn_relu``, ``bn_relu_backward``) with the
  convolution of ATen (oneDNN on CPU), the activation living only inside forward and inside
  backward; registered as ``ahnet_fast::bn_relu_conv`` / ``bn_relu_conv_backward``.
- ``triton``: the Triton BatchNorm statistics kernels and the Triton anisotropic convolution
  (ahnet_fast/kernels/triton/aniso_conv.py) that applies BatchNorm+ReLU while loading its operand,
  so the activation is never written at all; ``ahnet_fast::bn_relu_conv_triton`` / ``..._backward_triton``.

The convolution takes any kernel of AH-Net (1x1x1, 3x3x1, 1x1x3, and the 2D (3, 1) / (1, 3)), stride
1 or (2, 2, 1), and padding ``(k - 1) // 2`` (same-size output) unless given.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ahnet_fast import _scratch as scratch, backends
from ahnet_fast.ops import aniso_conv, _bands as bands, _conv_paths as conv_paths
from ahnet_fast.ops._affine import cpu_scale_shift, scale_shift
from ahnet_fast.ops.bn_relu import update_running_stats
from ahnet_fast.ops._conv_paths import output_format
from ahnet_fast._extension import extension_available
from ahnet_fast._layout import autocast_dtype, is_channels_last, opmath_dtype, output_like
from ahnet_fast.ops._registry import define_script_entry
from ahnet_fast.ops._registry import (cpp_kernel_reasons, dtype_reasons, note_compiled_kernels, register_triton_pair,
                                      triton_reasons)

__all__ = ["bn_relu_conv", "bn_relu_conv_reference", "same_padding"]


def same_padding(weight: torch.Tensor) -> list[int]:
    return [(k - 1) // 2 for k in weight.shape[2:]]


def bn_relu_conv_reference(x, running_mean, running_var, bn_weight, bn_bias, training, momentum, eps, weight,
                           stride=1, padding=None):
    conv = F.conv3d if x.dim() == 5 else F.conv2d
    a = F.relu(F.batch_norm(x, running_mean, running_var, bn_weight, bn_bias, training, momentum, eps))
    return conv(a, weight, None, stride, same_padding(weight) if padding is None else padding)


def _check(x, running_mean, running_var, bn_weight, bn_bias, training, weight, stride, padding):
    if x.dim() not in (4, 5):
        raise ValueError(f"bn_relu_conv: input must be (N, C, H, W) or (N, C, H, W, D), got {tuple(x.shape)}")
    channels = x.shape[1]
    for name, t in (("bn_weight", bn_weight), ("bn_bias", bn_bias), ("running_mean", running_mean),
                    ("running_var", running_var)):
        if t is not None and t.numel() != channels:
            raise ValueError(f"bn_relu_conv: {name} has {t.numel()} elements but the input has {channels} channels "
                             f"(shape {tuple(x.shape)})")
    if weight.dim() != x.dim() or weight.shape[1] != channels:
        raise ValueError(f"bn_relu_conv: weight of shape {tuple(weight.shape)} does not take an input of shape "
                         f"{tuple(x.shape)} (expected (C_out, {channels}, kernel...), groups=1)")
    if training and x.numel() // max(channels, 1) <= 1:
        raise ValueError(f"bn_relu_conv: expected more than 1 value per channel when training, got input of shape "
                         f"{tuple(x.shape)}")
    nd = x.dim() - 2
    for name, v in (("stride", stride), ("padding", padding)):
        if len(v) != nd or any((not isinstance(i, int)) or i < 0 for i in v):
            raise ValueError(f"bn_relu_conv: {name} must be {nd} non-negative integers, got {v!r}")
    if any(s == 0 for s in stride):
        raise ValueError(f"bn_relu_conv: stride must be positive, got {stride!r}")


# ---------------------------------------------------------------------------------------------
# Engines: how one backend computes the unit's forward and backward. The dense block composes them.


class _Engine:
    """What an engine's unit backward is, whichever engine: the convolution's gradients (its
    ``conv_backward``), then the BatchNorm+ReLU's (its ``bn_backward``). The dense block calls the
    two halves itself, to free temporaries between them."""

    @classmethod
    def backward(cls, grad_y, x, bn_weight, bn_bias, mean, var, use_batch_stats, eps, weight, stride, padding,
                 activation=None):
        grad_a, grad_w = cls.conv_backward(grad_y, x, bn_weight, bn_bias, mean, var, eps, weight, stride, padding,
                                           activation)
        grad_x, grad_bw, grad_bb = cls.bn_backward(grad_a, x, bn_weight, bn_bias, mean, var, use_batch_stats, eps)
        return grad_x, grad_bw, grad_bb, grad_w

    @staticmethod
    def _bn_backward(grad_a, x, bn_weight, bn_bias, mean, var, use_batch_stats, eps):
        raise NotImplementedError

    @classmethod
    def bn_backward(cls, grad_a, x, bn_weight, bn_bias, mean, var, use_batch_stats, eps, out=None,
                    accumulate=False):
        """(grad_x, grad_bn_weight, grad_bn_bias); with ``out``, grad_x is written into it (or added
        to it, ``accumulate``) and out is returned. The engine's own kernel may do that without a
        temporary; ``out`` may be grad_a itself."""
        grad_x, grad_bw, grad_bb = cls._bn_backward(grad_a, x, bn_weight, bn_bias, mean, var, use_batch_stats, eps)
        if out is None:
            return grad_x, grad_bw, grad_bb
        if accumulate:
            out.add_(grad_x)
        else:
            out.copy_(grad_x)
        return out, grad_bw, grad_bb


class CppEngine(_Engine):
    """C++ BatchNorm+ReLU and a convolution path of :mod:`ahnet_fast.ops.aniso_conv` chosen per shape;
    the activation is a temporary in both passes."""

    @staticmethod
    def forward(x, bn_weight, bn_bias, running_mean, running_var, use_batch_stats, eps, weight, stride, padding,
                workspace=None):
        """``workspace``: as in :meth:`conv_backward`, a flat buffer for the activation that the caller
        reuses from unit to unit (the dense block); without one, a pooled scratch buffer on CPU
        (ahnet_fast._scratch) instead of a fresh tensor per call."""
        if workspace is None and x.device.type == "cpu":
            with scratch.borrow(SCRATCH_SLOT, x.numel(), x.dtype, x.device) as pooled:
                return CppEngine.forward(x, bn_weight, bn_bias, running_mean, running_var, use_batch_stats, eps,
                                         weight, stride, padding, pooled)
        a = _in_workspace(workspace, x)
        fused = None
        if not aniso_conv.tuning() and bn_weight is not None and bn_bias is not None:
            # (tuning times the paths on the activation: it must be written.) The path is chosen for the
            # activation's shape and layout: the workspace's view, or for a band of rows (strided, its
            # activation written contiguous by bn_relu) an untouched tensor of that layout
            like = a if a is not None else torch.empty(x.shape, dtype=x.dtype, device=x.device)
            path = aniso_conv.choose("forward", like, weight, stride, padding)
            fused = path if conv_paths.fusable(path, x) else None
        if a is None and fused is None:
            a, mean, var = torch.ops.ahnet_fast.bn_relu(x, bn_weight, bn_bias, running_mean, running_var,
                                                        use_batch_stats, eps)
        else:
            if use_batch_stats:
                mean, var = torch.ops.ahnet_fast.bn_relu_stats(x)
            else:  # what bn_relu hands back in eval: the running statistics in the statistics dtype
                sd = opmath_dtype(x.dtype)
                mean, var = running_mean.to(sd).clone(), running_var.to(sd).clone()
            if fused is not None:
                # the BatchNorm-ReLU applied as the product reads x: the activation is never written
                scale, shift = cpu_scale_shift(bn_weight, bn_bias, mean, var, eps)
                y = conv_paths.forward(fused, x, weight, stride, padding, scale, shift)
                return y.contiguous(memory_format=output_format(x)), mean, var
            torch.ops.ahnet_fast.bn_relu_apply_(x, bn_weight, bn_bias, mean, var, eps, a)
        y = conv_paths.forward(aniso_conv.choose("forward", a, weight, stride, padding), a, weight, stride, padding)
        return y.contiguous(memory_format=output_format(x)), mean, var

    @staticmethod
    def recompute(x, bn_weight, bn_bias, mean, var, eps, weight, stride, padding, keep_activation=True):
        """(the unit's output, its activation) from saved statistics: the dense block's backward
        needs both, and passes the activation on to :meth:`conv_backward` instead of recomputing it
        (keep_activation=False: None, when holding it would cost more memory than recomputing it)."""
        a, _, _ = torch.ops.ahnet_fast.bn_relu(x, bn_weight, bn_bias, mean, var, False, eps)
        y = conv_paths.forward(aniso_conv.choose("forward", a, weight, stride, padding), a, weight, stride, padding)
        return y.contiguous(memory_format=output_format(x)), (a if keep_activation else None)

    @staticmethod
    def conv_backward(grad_y, x, bn_weight, bn_bias, mean, var, eps, weight, stride, padding, activation=None,
                      workspace=None, grad_in_workspace=False, grad_buffer=None):
        """(gradient of the activation, weight gradient); the activation is recomputed when not given,
        from the same statistics and the same arithmetic as forward: into ``workspace`` (a flat
        buffer of x's dtype the caller reuses from unit to unit) when it is given, large enough and x
        is contiguous or channels-last, so that the recomputation does not take fresh memory each
        time (on CPU fresh pages cost a page fault each on first touch). With
        ``grad_in_workspace``, on the matmul path, the activation's gradient goes into the workspace
        too once the weight gradient has read the activation: the returned gradient is then a view
        of the workspace, which the caller must consume before the workspace's next use. The shift
        path writes the gradient into ``grad_buffer`` (another flat scratch buffer) when given, with
        the same rule."""
        owned = activation is None
        a = _in_workspace(workspace, x) if owned else activation
        in_workspace = owned and a is not None
        if in_workspace:
            torch.ops.ahnet_fast.bn_relu_apply_(x, bn_weight, bn_bias, mean, var, eps, a)
        elif owned:
            a, _, _ = torch.ops.ahnet_fast.bn_relu(x, bn_weight, bn_bias, mean, var, False, eps)
        path = aniso_conv.choose("backward", a, weight, stride, padding)
        if owned and path == "matmul":
            # weight gradient first, then the activation is freed (or overwritten in the workspace)
            # before its gradient is written
            grad_w = conv_paths.matmul_weight_grad(grad_y, a, weight)
            like = torch.empty_like(a, device="meta")  # the activation's shape and layout, no storage
            target = a if in_workspace and grad_in_workspace else None
            del a
            grad_a = conv_paths.matmul_input_grad(grad_y, like, weight, out=target)
        else:
            grad_a, grad_w = conv_paths.backward(path, grad_y, a, weight, stride, padding, grad_buffer)
        return grad_a, grad_w.contiguous()  # the fake promises the weight's layout

    @classmethod
    def backward(cls, grad_y, x, bn_weight, bn_bias, mean, var, use_batch_stats, eps, weight, stride, padding,
                 activation=None):
        """The unit's backward with its temporaries reused: the recomputed activation (and, on the
        matmul path, its gradient) in a pooled scratch buffer on CPU; otherwise the BatchNorm
        gradient is written over the convolution's input gradient, which it consumes, when that
        already has the layout the op promises for grad_x."""
        if x.device.type != "cpu" or activation is not None:
            return super().backward(grad_y, x, bn_weight, bn_bias, mean, var, use_batch_stats, eps, weight, stride,
                                    padding, activation)
        rows = bands.band_rows(x, max(x.shape[1], weight.shape[0])) \
            if bands.lean_preferred() and bands.bandable(weight, stride, padding) else x.shape[2]
        if rows < x.shape[2]:
            # memory first: the activation recomputed a band at a time, its gradient written band by
            # band into grad_x's tensor and the BatchNorm gradient written over it in place (no
            # activation and no second gradient of the input's size)
            grad_x = output_like(x)
            workspace = bands.workspace_for(x, x.shape[1], rows, bands.halo(weight))
            grad_w = bands.conv_backward_banded(grad_y, x, bn_weight, bn_bias, mean, var, eps, weight, rows,
                                                workspace, grad_x)
            grad_bw, grad_bb = cls.bn_backward(grad_x, x, bn_weight, bn_bias, mean, var, use_batch_stats, eps,
                                               grad_x)[1:]
            return grad_x, grad_bw, grad_bb, grad_w.contiguous()
        with scratch.borrow(SCRATCH_SLOT, x.numel(), x.dtype, x.device) as pooled:
            grad_a, grad_w = cls.conv_backward(grad_y, x, bn_weight, bn_bias, mean, var, eps, weight, stride,
                                               padding, None, pooled, grad_in_workspace=True)
            in_pool = grad_a.untyped_storage().data_ptr() == pooled.untyped_storage().data_ptr()
            promised = output_like(torch.empty_like(x, device="meta")).stride()
            out = grad_a if not in_pool and grad_a.dtype == x.dtype and grad_a.stride() == promised else None
            grad_x, grad_bw, grad_bb = cls.bn_backward(grad_a, x, bn_weight, bn_bias, mean, var, use_batch_stats,
                                                       eps, out)
        return grad_x, grad_bw, grad_bb, grad_w

    @staticmethod
    def _bn_backward(grad_a, x, bn_weight, bn_bias, mean, var, use_batch_stats, eps):
        return torch.ops.ahnet_fast.bn_relu_backward(grad_a, x, bn_weight, bn_bias, mean, var, use_batch_stats, eps)

    @classmethod
    def bn_backward(cls, grad_a, x, bn_weight, bn_bias, mean, var, use_batch_stats, eps, out=None,
                    accumulate=False):
        if out is None:
            return cls._bn_backward(grad_a, x, bn_weight, bn_bias, mean, var, use_batch_stats, eps)
        grad_bw, grad_bb = torch.ops.ahnet_fast.bn_relu_backward_into_(grad_a, x, bn_weight, bn_bias, mean, var,
                                                                       use_batch_stats, eps, out, accumulate)
        return out, grad_bw, grad_bb


# The pool slot of the units' activations (and the dense block's: ahnet_fast.ops.dense_block).
SCRATCH_SLOT = "bn_relu_conv.activation"


def _in_workspace(workspace, x):
    """A view of the flat ``workspace`` with x's shape and layout (contiguous or channels-last, as
    bn_relu would write the activation) when x's dtype and size fit, else None."""
    if workspace is None or workspace.numel() < x.numel() or workspace.dtype != x.dtype:
        return None
    flat = workspace[:x.numel()]
    if x.is_contiguous():
        return flat.view(x.shape)
    if is_channels_last(x):
        return flat.view(x.shape[0], *x.shape[2:], x.shape[1]).movedim(-1, 1)
    return None


class TritonEngine(_Engine):
    """Triton: statistics pass, then (path "triton") a convolution that normalises while it loads,
    nothing written between; in backward the convolution's input gradient, then the BatchNorm+ReLU
    backward, with the weight gradient recomputing the activation on load. Where measuring shows
    cuDNN faster for a shape (``AHNET_FAST_CONV_TUNE=1``), the activation is written by the Triton
    BatchNorm kernel and the convolution is cuDNN's (``aten``/``folded``)."""

    @staticmethod
    def _scale_shift(bn_weight, bn_bias, mean, var, eps):
        return scale_shift(bn_weight, bn_bias, mean, var, eps)

    @staticmethod
    def _path(direction, x, weight, stride, padding, scale, shift):
        from ahnet_fast.ops import _triton as kernels

        prec = _precision(x)
        if x.is_cuda and prec == "ieee" and x.dtype == torch.float32:
            # exact fp32 (TF32 turned off): Triton's FMA dot needs more registers than a GPU thread
            # has under some supported Tritons, so cuDNN convolves; the BatchNorm stays Triton's
            return aniso_conv.choose(direction, x, weight, stride, padding)
        if direction == "forward":
            def fused():
                return kernels.conv_forward(x, weight, scale, shift, tuple(stride), tuple(padding), precision=prec)
        else:
            def fused():  # measured only when tuning
                g = torch.empty((x.shape[0], weight.shape[0], *x.shape[2:]), dtype=x.dtype, device=x.device)
                kernels.conv_weight_grad(x, g, scale, shift, tuple(weight.shape), tuple(stride), tuple(padding),
                                         precision=prec)
                return kernels.conv_input_grad(g, weight, tuple(x.shape), tuple(stride), tuple(padding),
                                               precision=prec)
        return aniso_conv.choose(direction, x, weight, stride, padding, extra={"triton": fused})

    @staticmethod
    def forward(x, bn_weight, bn_bias, running_mean, running_var, use_batch_stats, eps, weight, stride, padding,
                workspace=None):
        """``workspace`` is unused: the Triton convolution normalises on load."""
        from ahnet_fast.ops import _triton as kernels

        if use_batch_stats:
            mean, var = kernels.bn_relu_stats(x)
        else:
            sd = opmath_dtype(x.dtype)
            mean, var = running_mean.to(sd).clone(), running_var.to(sd).clone()
        scale, shift = TritonEngine._scale_shift(bn_weight, bn_bias, mean, var, eps)
        path = TritonEngine._path("forward", x, weight, stride, padding, scale, shift)
        if path == "triton":
            y = kernels.conv_forward(x, weight, scale, shift, tuple(stride), tuple(padding), precision=_precision(x))
        else:
            a, _, _ = kernels.bn_relu_forward(x, bn_weight, bn_bias, mean, var, False, eps)
            y = conv_paths.forward(path, a, weight, stride, padding).contiguous(memory_format=output_format(x))
        return y, mean, var

    @staticmethod
    def recompute(x, bn_weight, bn_bias, mean, var, eps, weight, stride, padding, keep_activation=True):
        """(the unit's output, None): nothing to hand on, the activation is never written."""
        y, _, _ = TritonEngine.forward(x, bn_weight, bn_bias, mean, var, False, eps, weight, stride, padding)
        return y, None

    @staticmethod
    def conv_backward(grad_y, x, bn_weight, bn_bias, mean, var, eps, weight, stride, padding, activation=None,
                      workspace=None, grad_in_workspace=False, grad_buffer=None):
        """``workspace`` and ``grad_buffer`` are unused: the Triton convolution normalises on load."""
        from ahnet_fast.ops import _triton as kernels

        scale, shift = TritonEngine._scale_shift(bn_weight, bn_bias, mean, var, eps)
        path = TritonEngine._path("backward", x, weight, stride, padding, scale, shift)
        if path == "triton":
            prec = _precision(x)
            grad_w = kernels.conv_weight_grad(x, grad_y, scale, shift, tuple(weight.shape), tuple(stride),
                                              tuple(padding), precision=prec).to(weight.dtype)
            grad_a = kernels.conv_input_grad(grad_y, weight, tuple(x.shape), tuple(stride), tuple(padding),
                                             precision=prec)
        else:
            a, _, _ = kernels.bn_relu_forward(x, bn_weight, bn_bias, mean, var, False, eps)
            grad_a, grad_w = conv_paths.backward(path, grad_y, a, weight, stride, padding)
        return grad_a, grad_w.contiguous()

    @staticmethod
    def _bn_backward(grad_a, x, bn_weight, bn_bias, mean, var, use_batch_stats, eps):
        from ahnet_fast.ops import _triton as kernels

        return kernels.bn_relu_backward(grad_a, x, bn_weight, bn_bias, mean, var, use_batch_stats, eps)


def _precision(x: torch.Tensor) -> str:
    """TF32 for float32 exactly when PyTorch's own cuDNN convolutions would use it."""
    return "tf32" if x.dtype == torch.float32 and x.is_cuda and torch.backends.cudnn.allow_tf32 else "ieee"


ENGINES = {"cpp": CppEngine, "triton": TritonEngine}


def _cpp_reasons(x, *_):
    return cpp_kernel_reasons("bn_relu", x.device) + dtype_reasons(x.dtype)


def _triton_reasons(x, weight=None, *_):
    reasons = triton_reasons(x.device, x.dtype) + dtype_reasons(x.dtype)
    if x.dim() != 5:
        reasons.append("the Triton convolution takes 5D (N, C, H, W, D) inputs")
    elif weight is not None and tuple(weight.shape[2:]) not in ((1, 1, 1), (3, 3, 1), (1, 1, 3)):
        reasons.append(f"the Triton convolution has no {tuple(weight.shape[2:])} kernel")
    return reasons


IMPLEMENTATIONS = backends.register("bn_relu_conv", (
    backends.Implementation("reference", lambda *a: []),
    backends.Implementation("cpp", _cpp_reasons),
    backends.Implementation("triton", _triton_reasons),
))


def bn_relu_conv(x, running_mean, running_var, bn_weight, bn_bias, training: bool, momentum: float, eps: float,
                 weight: torch.Tensor, stride: int | Sequence[int] = 1, padding: Sequence[int] | None = None, *,
                 backend: str | None = None) -> torch.Tensor:
    """``conv(relu(F.batch_norm(x, running_mean, running_var, bn_weight, bn_bias, training, momentum, eps)),
    weight, stride, padding)`` with no bias; padding defaults to ``(k - 1) // 2`` per axis. Running
    statistics are updated in place in training, as ``F.batch_norm`` does."""
    nd = x.dim() - 2
    stride = [stride] * nd if isinstance(stride, int) else list(stride)
    padding = same_padding(weight) if padding is None else list(padding)
    _check(x, running_mean, running_var, bn_weight, bn_bias, training, weight, stride, padding)
    cast = autocast_dtype(x)
    if cast is not None:  # a convolution under autocast: its operands in the low precision
        x, weight = x.to(cast), weight.to(cast)

    def run(chosen):
        if chosen == "reference":
            return bn_relu_conv_reference(x, running_mean, running_var, bn_weight, bn_bias, training, momentum, eps,
                                          weight, stride, padding)
        bw = x.new_ones(x.shape[1], dtype=opmath_dtype(x.dtype)) if bn_weight is None else bn_weight
        bb = torch.zeros_like(bw) if bn_bias is None else bn_bias
        use_batch_stats = training or running_mean is None or running_var is None
        if bands.no_backward(x, bw, bb, weight):
            # Inference: the engine called as plain Python, not through the registered op (whose first
            # call imports torch._dynamo, a few hundred megabytes a process that only infers need not
            # hold); with the running statistics in bands of rows (ops._bands).
            engine = ENGINES[chosen]
            if not use_batch_stats and bands.bandable(weight, stride, padding):
                return _banded(engine, x, bw, bb, running_mean, running_var, eps, weight)
            y, mean, var = engine.forward(x, bw, bb, None if use_batch_stats else running_mean,
                                          None if use_batch_stats else running_var, use_batch_stats, eps, weight,
                                          stride, padding)
            update_running_stats(running_mean, running_var, mean, var, training, momentum, x.numel() // x.shape[1])
            return y
        op = torch.ops.ahnet_fast.bn_relu_conv if chosen == "cpp" else _triton_op()
        y, mean, var = op(x, bw, bb, None if use_batch_stats else running_mean,
                          None if use_batch_stats else running_var, use_batch_stats, eps, weight, stride, padding)
        update_running_stats(running_mean, running_var, mean, var, training, momentum, x.numel() // x.shape[1])
        return y

    return backends.dispatch("bn_relu_conv", IMPLEMENTATIONS, x.device, (x, weight), backend, run)


def _banded(engine, x, bn_weight, bn_bias, running_mean, running_var, eps, weight):
    """The unit in eval mode with no backward to follow, band by band (ahnet_fast.ops._bands); one
    band is the plain forward."""
    size = x.shape[2]
    rows = bands.band_rows(x, x.shape[1])
    workspace = None if rows >= size else bands.workspace_for(x, x.shape[1], rows, bands.halo(weight))
    return bands.unit_banded(engine, x, bn_weight, bn_bias, running_mean, running_var, eps, weight, rows, workspace)


# ---------------------------------------------------------------------------------------------
# Registration: one custom op per backend, with fake and autograd.

def _out_size(size, k, s, p):
    return (size + 2 * p - k) // s + 1


def _forward_fake(x, bn_weight, bn_bias, running_mean, running_var, use_batch_stats, eps, weight, stride, padding):
    spatial = [_out_size(n, k, s, p) for n, k, s, p in zip(x.shape[2:], weight.shape[2:], stride, padding)]
    y = torch.empty((x.shape[0], weight.shape[0], *spatial), dtype=x.dtype, device=x.device,
                    memory_format=output_format(x))
    c = x.shape[1]
    sd = opmath_dtype(x.dtype)
    return y, x.new_empty(c, dtype=sd), x.new_empty(c, dtype=sd)


def _backward_fake(grad_y, x, bn_weight, bn_bias, mean, var, use_batch_stats, eps, weight, stride, padding):
    return output_like(x), torch.empty_like(bn_weight), torch.empty_like(bn_bias), torch.empty_like(weight)


def _setup_context(ctx, inputs, output):
    x, bn_weight, bn_bias, running_mean, running_var, use_batch_stats, eps, weight, stride, padding = inputs
    _, mean, var = output
    ctx.save_for_backward(x, bn_weight, bn_bias, mean, var, weight)
    # where memory came first in forward (the scratch pool not kept: AHNet under any checkpoint
    # policy), the backward runs in bands (ops._bands)
    ctx.args = (use_batch_stats, eps, list(stride), list(padding), not scratch.keeping())


def _make_backward(backward_op):
    def backward(ctx, grad_y, _grad_mean, _grad_var):
        x, bn_weight, bn_bias, mean, var, weight = ctx.saved_tensors
        use_batch_stats, eps, stride, padding, lean = ctx.args
        with bands.lean(lean):
            gx, gbw, gbb, gw = backward_op(grad_y, x, bn_weight, bn_bias, mean, var, use_batch_stats, eps, weight,
                                           stride, padding)
        return gx, gbw, gbb, None, None, None, None, gw, None, None

    return backward


def _define(name: str, engine):
    """``ahnet_fast::<name>`` and ``<name>_backward`` as torch.library custom ops running ``engine``."""

    @torch.library.custom_op(f"ahnet_fast::{name}_backward", mutates_args=())
    def backward_op(grad_y: torch.Tensor, x: torch.Tensor, bn_weight: torch.Tensor, bn_bias: torch.Tensor,
                    mean: torch.Tensor, var: torch.Tensor, use_batch_stats: bool, eps: float, weight: torch.Tensor,
                    stride: list[int], padding: list[int]
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return engine.backward(grad_y, x, bn_weight, bn_bias, mean, var, use_batch_stats, eps, weight, stride,
                               padding)

    @torch.library.custom_op(f"ahnet_fast::{name}", mutates_args=())
    def forward_op(x: torch.Tensor, bn_weight: torch.Tensor, bn_bias: torch.Tensor,
                   running_mean: torch.Tensor | None, running_var: torch.Tensor | None, use_batch_stats: bool,
                   eps: float, weight: torch.Tensor, stride: list[int], padding: list[int]
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        y, mean, var = engine.forward(x, bn_weight, bn_bias, running_mean, running_var, use_batch_stats, eps,
                                      weight, stride, padding)
        # outputs must not alias inputs (eval mode hands back the running statistics)
        return y, mean.clone() if mean is running_mean else mean, var.clone() if var is running_var else var

    return register_triton_pair(forward_op, backward_op, _forward_fake, _backward_fake, _make_backward,
                                _setup_context)[0]


_TRITON_OP = None


def _triton_op():
    global _TRITON_OP
    if _TRITON_OP is None:
        _TRITON_OP = _define("bn_relu_conv_triton", TritonEngine)
    return _TRITON_OP


if extension_available():
    _define("bn_relu_conv", CppEngine)
    note_compiled_kernels("bn_relu")

# TorchScript's entry to the op (see define_script_entry): the same dispatch as a Python call.
# Eval mode: the running statistics where given, the batch's where not (nothing is updated).
define_script_entry(
    "bn_relu_conv_script",
    "(Tensor x, Tensor? running_mean, Tensor? running_var, Tensor? bn_weight, Tensor? bn_bias, float eps, "
    "Tensor weight, int[] stride, int[] padding, str? backend) -> Tensor",
    lambda x, running_mean, running_var, bn_weight, bn_bias, eps, weight, stride, padding, backend: bn_relu_conv(
        x, running_mean, running_var, bn_weight, bn_bias, running_mean is None or running_var is None, 0.0, eps,
        weight, stride, padding, backend=backend))
