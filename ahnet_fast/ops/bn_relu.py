"""BatchNorm followed by ReLU, as one op.

``bn_relu`` computes ``relu(batch_norm(x))`` with the semantics of
``torch.nn.functional.batch_norm`` (batch statistics in training, updating the running
statistics in place with ``momentum``; running statistics in eval). Backends:

- ``reference``: ``F.relu(F.batch_norm(...))``, the oracle and fallback.
- ``cpp``: ``torch.ops.ahnet_fast.bn_relu`` (csrc/cpu/bn_relu.cpp): one pass for the statistics,
  one for normalise+ReLU, channel-first or channels-last read directly; its backward recomputes the
  ReLU mask from the input, so the activation is not saved for backward by this op.
- ``triton`` (ahnet_fast/kernels/triton/bn_relu.py, registered as ``ahnet_fast::bn_relu_triton`` /
  ``bn_relu_backward_triton`` with the same fake and autograd): the same contract on CUDA (or CPU
  under TRITON_INTERPRET=1); statistics per channel with Chan's formula between blocks, so a large
  mean does not cancel the variance.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ahnet_fast import backends
from ahnet_fast._extension import extension_available
from ahnet_fast._layout import opmath_dtype, output_like
from ahnet_fast.ops._registry import define_script_entry
from ahnet_fast.ops._registry import (cpp_kernel_reasons, dtype_reasons, register_compiled_pair,
                                      register_triton_pair, triton_reasons)

__all__ = ["bn_relu", "bn_relu_reference"]


def bn_relu_reference(x, running_mean, running_var, weight, bias, training, momentum, eps):
    return F.relu(F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps))


def _check(x, running_mean, running_var, weight, bias, training):
    if x.dim() < 2:
        raise ValueError(f"bn_relu: input must have shape (N, C, ...), got {tuple(x.shape)}")
    channels = x.shape[1]
    for name, t in (("weight", weight), ("bias", bias), ("running_mean", running_mean), ("running_var", running_var)):
        if t is not None and t.numel() != channels:
            raise ValueError(
                f"bn_relu: {name} has {t.numel()} elements but the input has {channels} channels "
                f"(shape {tuple(x.shape)})"
            )
    if training and x.numel() // max(channels, 1) <= 1:
        raise ValueError(
            f"bn_relu: expected more than 1 value per channel when training, got input of shape {tuple(x.shape)}"
        )


def _cpp_reasons(x, *_):
    return cpp_kernel_reasons("bn_relu", x.device) + dtype_reasons(x.dtype)


def _triton_reasons(x, *_):
    # the kernels only convert bf16 to fp32 and back: exact in the interpreter too
    return triton_reasons(x.device, x.dtype, interpreter_bf16=True) + dtype_reasons(x.dtype)


IMPLEMENTATIONS = backends.register("bn_relu", (
    backends.Implementation("reference", lambda *a: []),
    backends.Implementation("cpp", _cpp_reasons),
    backends.Implementation("triton", _triton_reasons),
))


def bn_relu(x, running_mean, running_var, weight, bias, training: bool, momentum: float, eps: float,
                    *, backend: str | None = None) -> torch.Tensor:
    """``relu(F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps))``."""
    _check(x, running_mean, running_var, weight, bias, training)

    def run(chosen):
        if chosen == "reference":
            return bn_relu_reference(x, running_mean, running_var, weight, bias, training, momentum, eps)
        w, b, use_batch_stats = kernel_arguments(x, weight, bias, training, running_mean, running_var)
        forward = torch.ops.ahnet_fast.bn_relu if chosen == "cpp" else _triton_ops()[0]
        y, mean, var = forward(x, w, b, None if use_batch_stats else running_mean,
                               None if use_batch_stats else running_var, use_batch_stats, eps)
        update_running_stats(running_mean, running_var, mean, var, training, momentum, x.numel() // x.shape[1])
        return y

    return backends.dispatch("bn_relu", IMPLEMENTATIONS, x.device, (x,), backend, run)


def kernel_arguments(x, weight, bias, training, running_mean, running_var):
    """(weight, bias, use_batch_stats) as the compiled kernels take them: an affine-free BatchNorm
    gets weight 1 and bias 0; batch statistics in training or when there are no running ones."""
    if weight is None:
        weight = x.new_ones(x.shape[1], dtype=opmath_dtype(x.dtype))
    if bias is None:
        bias = torch.zeros_like(weight)
    return weight, bias, training or running_mean is None or running_var is None


def update_running_stats(running_mean, running_var, mean, var, training, momentum, count):
    """nn.BatchNorm's update of the running statistics from a batch's biased mean and variance over
    ``count`` values per channel: the running variance takes the unbiased batch variance."""
    if training and running_mean is not None and running_var is not None:
        with torch.no_grad():
            running_mean.mul_(1.0 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
            running_var.mul_(1.0 - momentum).add_(var.to(running_var.dtype), alpha=momentum * count / (count - 1))


# ---------------------------------------------------------------------------------------------
# Fake (shape) functions and autograd of the compiled ops, registered when the extension loads.


def _bn_relu_fake(x, weight, bias, running_mean, running_var, training, eps):
    c = x.shape[1]
    return output_like(x), x.new_empty(c, dtype=opmath_dtype(x.dtype)), x.new_empty(c, dtype=opmath_dtype(x.dtype))


def _bn_relu_backward_fake(grad_out, x, weight, bias, mean, var, training, eps):
    return output_like(x), torch.empty_like(weight), torch.empty_like(bias)


def _setup_context(ctx, inputs, output):
    x, weight, bias, running_mean, running_var, training, eps = inputs
    _, mean, var = output
    ctx.save_for_backward(x, weight, bias, mean, var)
    ctx.use_batch_stats = training or running_mean is None or running_var is None
    ctx.eps = eps


def _make_backward(backward_op):
    def backward(ctx, grad_y, _grad_mean, _grad_var):
        x, weight, bias, mean, var = ctx.saved_tensors
        if grad_y is None:
            return None, None, None, None, None, None, None
        dx, dw, db = backward_op(grad_y, x, weight, bias, mean, var, ctx.use_batch_stats, ctx.eps)
        return dx, dw, db, None, None, None, None

    return backward


_TRITON_OPS = None


def _triton_ops():
    """``ahnet_fast::bn_relu_triton`` / ``bn_relu_backward_triton``: the Triton kernels as custom ops
    (CUDA, or CPU under TRITON_INTERPRET=1), with the C++ ops' fakes and autograd."""
    global _TRITON_OPS
    if _TRITON_OPS is None:
        from ahnet_fast.ops import _triton as kernels

        @torch.library.custom_op("ahnet_fast::bn_relu_backward_triton", mutates_args=())
        def bn_relu_backward_triton(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                                    bias: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, training: bool,
                                    eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            return kernels.bn_relu_backward(grad_out, x, weight, bias, mean, var, training, eps)

        @torch.library.custom_op("ahnet_fast::bn_relu_triton", mutates_args=())
        def bn_relu_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                           running_mean: torch.Tensor | None, running_var: torch.Tensor | None, training: bool,
                           eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            y, mean, var = kernels.bn_relu_forward(x, weight, bias, running_mean, running_var, training, eps)
            # outputs must not alias inputs (eval mode hands back the running statistics)
            return y, mean.clone() if mean is running_mean else mean, var.clone() if var is running_var else var

        _TRITON_OPS = register_triton_pair(bn_relu_triton, bn_relu_backward_triton, _bn_relu_fake,
                                           _bn_relu_backward_fake, _make_backward, _setup_context)
    return _TRITON_OPS


def _register():
    if extension_available():
        register_compiled_pair("bn_relu", "bn_relu_backward", _bn_relu_fake, _bn_relu_backward_fake, _make_backward,
                               _setup_context)
        # writes into its `out` argument and returns nothing: the fake has nothing to produce
        torch.library.register_fake("ahnet_fast::bn_relu_apply_")(lambda *args: None)

        def stats_fake(x):
            c = x.shape[1]
            return x.new_empty(c, dtype=opmath_dtype(x.dtype)), x.new_empty(c, dtype=opmath_dtype(x.dtype))

        torch.library.register_fake("ahnet_fast::bn_relu_stats")(stats_fake)
        # the input gradient goes into `out`; what is returned are the weight and bias gradients
        torch.library.register_fake("ahnet_fast::bn_relu_backward_into_")(
            lambda grad_out, x, weight, bias, mean, var, training, eps, out, accumulate:
            (torch.empty_like(weight), torch.empty_like(bias)))


_register()

# TorchScript's entry to the op (see define_script_entry): the same dispatch as a Python call.
# Eval mode: the running statistics where given, the batch's where not (nothing is updated).
define_script_entry(
    "bn_relu_script",
    "(Tensor x, Tensor? running_mean, Tensor? running_var, Tensor? weight, Tensor? bias, float eps, str? backend) "
    "-> Tensor",
    lambda x, running_mean, running_var, weight, bias, eps, backend: bn_relu(
        x, running_mean, running_var, weight, bias, running_mean is None or running_var is None, 0.0, eps,
        backend=backend))
