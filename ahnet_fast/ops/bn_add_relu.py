"""BatchNorm, residual sum and ReLU as one op: the tail of a ResNet bottleneck.

``bn_add_relu(x, residual, ...) = relu(F.batch_norm(x, ...) + residual)``, with the
semantics of ``F.batch_norm`` (batch statistics in training, running statistics updated in place
with ``momentum``; running statistics in eval). AH-Net's encoder ends 13 of its 16 bottlenecks this
way (the first blocks of layers 2-4 pool bn3's output before the sum: the composition there). Composed of torch ops that is four passes over the block's widest tensor forward (the
BatchNorm's statistics and normalisation, the sum, the ReLU) and three backward (the ReLU's mask,
the BatchNorm's two); here forward is the statistics pass plus one pass writing the output, and
backward two passes, the second writing both gradients.

Backends:

- ``reference``: ``F.relu(F.batch_norm(...) + residual)``: the oracle, and what runs where the
  compiled kernel cannot (mixed dtypes), and under ``auto`` on maps too small for it to gain.
- ``cpp``: ``torch.ops.ahnet_fast.bn_add_relu`` / ``bn_add_relu_backward`` (csrc/cpu/bn_add_relu.cpp,
  the statistics shared with ``bn_relu``). Backward reads the output (the ReLU mask, as torch's
  ReLU backward does: blocked where output <= 0) and the input: the tensors the composition keeps,
  and the output is the next block's input, kept by it anyway.
- ``triton`` (the GPU path; no Triton kernel): the same composition, cuDNN's BatchNorm.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ahnet_fast import backends
from ahnet_fast._extension import extension_available
from ahnet_fast._layout import opmath_dtype, output_like
from ahnet_fast.ops._registry import define_script_entry
from ahnet_fast.ops._registry import cpp_kernel_reasons, dtype_reasons, gpu_composition_reasons, register_compiled_pair
from ahnet_fast.ops.bn_relu import kernel_arguments, update_running_stats

__all__ = ["bn_add_relu", "bn_add_relu_reference"]


def bn_add_relu_reference(x, residual, running_mean, running_var, weight, bias, training, momentum, eps):
    return F.relu(F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps) + residual)


def _check(x, residual, running_mean, running_var, weight, bias, training):
    if x.dim() < 2:
        raise ValueError(f"bn_add_relu: input must have shape (N, C, ...), got {tuple(x.shape)}")
    if residual.shape != x.shape:
        raise ValueError(f"bn_add_relu: residual has shape {tuple(residual.shape)} but the input has "
                         f"{tuple(x.shape)}")
    channels = x.shape[1]
    for name, t in (("weight", weight), ("bias", bias), ("running_mean", running_mean), ("running_var", running_var)):
        if t is not None and t.numel() != channels:
            raise ValueError(f"bn_add_relu: {name} has {t.numel()} elements but the input has {channels} "
                             f"channels (shape {tuple(x.shape)})")
    if training and x.numel() // max(channels, 1) <= 1:
        raise ValueError(f"bn_add_relu: expected more than 1 value per channel when training, got input of "
                         f"shape {tuple(x.shape)}")


def _cpp_reasons(x, residual):
    reasons = cpp_kernel_reasons("bn_add_relu", x.device) + dtype_reasons(x.dtype)
    if residual.dtype != x.dtype:
        reasons.append(f"the residual's dtype {residual.dtype} differs from the input's {x.dtype} (the sum would "
                       f"promote)")
    if residual.device != x.device:
        reasons.append(f"the residual is on {residual.device}, the input on {x.device}")
    return reasons


# Below this many values per channel "auto" runs the composition: the compiled op's fixed cost (a
# Python autograd node, a parallel loop over channels) outweighs its saved passes (measured in
# benchmarks/bench_bn_add_relu.py, benchmarks/results/bn_add_relu_cpu.md: the encoder's layer3 and
# layer4 maps are below it).
AUTO_MIN_VALUES_PER_CHANNEL = 512


def _cpp_slower(x, residual):
    per_channel = x.numel() // max(x.shape[1], 1)
    if per_channel < AUTO_MIN_VALUES_PER_CHANNEL:
        return [f"{per_channel} values per channel < {AUTO_MIN_VALUES_PER_CHANNEL}: the composition is faster"]
    return []


IMPLEMENTATIONS = backends.register("bn_add_relu", (
    backends.Implementation("reference", lambda *a: [], runs="F.relu(F.batch_norm(x) + residual)"),
    backends.Implementation("cpp", _cpp_reasons, slower_reasons=_cpp_slower,
                            runs="ahnet_fast::bn_add_relu (csrc/cpu/bn_add_relu.cpp)"),
    backends.Implementation("triton", lambda x, residual: gpu_composition_reasons(x.device),
                            runs="the composition on cuDNN's BatchNorm (no Triton kernel)"),
))


def bn_add_relu(x: torch.Tensor, residual: torch.Tensor, running_mean, running_var, weight, bias,
                        training: bool, momentum: float, eps: float, *, backend: str | None = None) -> torch.Tensor:
    """``relu(F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps) + residual)``.

    backend: "auto" (the compiled kernel where it runs and the map is large enough to gain,
    AUTO_MIN_VALUES_PER_CHANNEL, else the composition), "reference", "cpp" or "triton" (the GPU
    path: the composition, there is no Triton kernel); None follows ``ahnet_fast.backend(...)``."""
    _check(x, residual, running_mean, running_var, weight, bias, training)
    chosen = backends.select("bn_add_relu", IMPLEMENTATIONS, x.device, (x, residual), backend)
    if chosen != "cpp":
        return bn_add_relu_reference(x, residual, running_mean, running_var, weight, bias, training,
                                             momentum, eps)
    channels = x.shape[1]
    weight, bias, use_batch_stats = kernel_arguments(x, weight, bias, training, running_mean, running_var)
    y, mean, var = torch.ops.ahnet_fast.bn_add_relu(
        x, residual, weight, bias, None if use_batch_stats else running_mean,
        None if use_batch_stats else running_var, use_batch_stats, eps)
    update_running_stats(running_mean, running_var, mean, var, training, momentum, x.numel() // channels)
    return y


# ---------------------------------------------------------------------------------------------
# Fake (shape) functions and autograd of the compiled ops, registered when the extension loads.


def _forward_fake(x, residual, weight, bias, running_mean, running_var, training, eps):
    c = x.shape[1]
    sd = opmath_dtype(x.dtype)
    return output_like(x), x.new_empty(c, dtype=sd), x.new_empty(c, dtype=sd)


def _backward_fake(grad_out, output, x, weight, bias, mean, var, training, eps):
    return output_like(x), output_like(x), torch.empty_like(weight), torch.empty_like(bias)


def _setup_context(ctx, inputs, output):
    x, residual, weight, bias, running_mean, running_var, training, eps = inputs
    y, mean, var = output
    ctx.save_for_backward(y, x, weight, bias, mean, var)
    ctx.use_batch_stats = training or running_mean is None or running_var is None
    ctx.eps = eps
    ctx.set_materialize_grads(False)  # the statistics' gradients are never used


def _make_backward(backward_op):
    def backward(ctx, grad_y, _grad_mean, _grad_var):
        if grad_y is None:
            return (None,) * 8
        y, x, weight, bias, mean, var = ctx.saved_tensors
        dx, dr, dw, db = backward_op(grad_y, y, x, weight, bias, mean, var, ctx.use_batch_stats, ctx.eps)
        return dx, dr, dw, db, None, None, None, None

    return backward


if extension_available():
    register_compiled_pair("bn_add_relu", "bn_add_relu_backward", _forward_fake, _backward_fake, _make_backward,
                           _setup_context)

# TorchScript's entry to the op (see define_script_entry): the same dispatch as a Python call.
# Eval mode: the running statistics where given, the batch's where not (nothing is updated).
define_script_entry(
    "bn_add_relu_script",
    "(Tensor x, Tensor residual, Tensor? running_mean, Tensor? running_var, Tensor? weight, Tensor? bias, float eps, "
    "str? backend) -> Tensor",
    lambda x, residual, running_mean, running_var, weight, bias, eps, backend: bn_add_relu(
        x, residual, running_mean, running_var, weight, bias, running_mean is None or running_var is None, 0.0, eps,
        backend=backend))
