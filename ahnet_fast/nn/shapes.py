"""Which input sizes AH-Net can take, derived from its strides (MONAI issue #1422).

Axes: in 3D the first two spatial axes are in-plane and the last is the slice axis; in 2D
(MONAI's convention, which slices the 3D kernel tuples from the back) the first axis is in-plane
and the second plays the slice axis. For an input size n:

- in-plane: conv1 has stride 2 (size ceil(n/2) = the `conv_x` size c); `maxpool` and layers 2-4
  halve it four more times and the decoder doubles it back, adding the encoder maps on the way,
  so c must be divisible by 16. The pyramid pooling level i pools windows of 2^(i+3) on c:
  with transposed-convolution upsampling the window must divide c (so c must be divisible by
  2^(psp_block_num+2)); with interpolation each window only has to fit (c >= 2^(psp_block_num+2)).
- slice axis: conv1 keeps it, `pool1` halves it (floor(n/2) = c), then the same four halvings
  and doublings: c must be a positive multiple of 16.

The output's spatial size is 2*c per axis: equal to the input size exactly when n is a multiple
of 32 (in-plane sizes 32k-1 and slice sizes 32k+1 are accepted too, as MONAI accepts them, and
give 32k). Sizes that break a rule are rejected before any computation; MONAI either fails deep
inside the decoder or, for tiny sizes, silently broadcasts mismatched maps.
"""
from __future__ import annotations

import torch

__all__ = ["check_ahnet_input", "ahnet_size_ok", "nearest_ahnet_sizes", "ahnet_output_shape"]


def _inplane_ok(n: int, psp_block_num: int, upsample_mode: str) -> bool:
    c = -(-n // 2)
    if c <= 0 or c % 16:
        return False
    if psp_block_num == 0:
        return True
    window = 2 ** (psp_block_num + 2)
    return c % window == 0 if upsample_mode == "transpose" else c >= window


def _slice_ok(n: int) -> bool:
    c = n // 2
    return c > 0 and c % 16 == 0


def _axis_kinds(spatial_dims: int) -> tuple[str, ...]:
    return ("in-plane", "in-plane", "slice") if spatial_dims == 3 else ("in-plane", "slice")


def ahnet_size_ok(n: int, kind: str, psp_block_num: int, upsample_mode: str) -> bool:
    """True when an axis of size n (kind "in-plane" or "slice") is accepted."""
    return _inplane_ok(n, psp_block_num, upsample_mode) if kind == "in-plane" else _slice_ok(n)


def _inplane_rule(psp_block_num: int, upsample_mode: str) -> str:
    if psp_block_num == 0:
        return "ceil(n/2) a positive multiple of 16 (n a multiple of 32, or one less)"
    window = 2 ** (psp_block_num + 2)
    if upsample_mode == "transpose":
        step = max(16, window)
        return (f"ceil(n/2) a positive multiple of {step} (n a multiple of {2 * step}, or one less), because the "
                f"largest pyramid pooling window, {window} at psp_block_num={psp_block_num}, must tile it "
                "exactly with upsample_mode='transpose'")
    return (f"ceil(n/2) a multiple of 16 and at least {window} (n a multiple of 32, or one less, and n >= "
            f"{2 * window - 1}), so the largest pyramid pooling window ({window}) fits")


def nearest_ahnet_sizes(n: int, kind: str, psp_block_num: int, upsample_mode: str) -> tuple[int | None, int]:
    """The nearest accepted multiples of 32 below (None if there is none) and above n."""
    below = next((m for m in range((n // 32) * 32, 0, -32) if ahnet_size_ok(m, kind, psp_block_num, upsample_mode)),
                 None)
    above = next(m for m in range((n // 32 + 1) * 32, 1 << 30, 32) if ahnet_size_ok(m, kind, psp_block_num,
                                                                                       upsample_mode))
    return below, above


def ahnet_output_shape(input_shape, spatial_dims: int, out_channels: int) -> tuple[int, ...]:
    """Output shape (B, out_channels, *spatial) for an accepted input shape."""
    spatial = input_shape[2:]
    out = [2 * (-(-n // 2)) if k == "in-plane" else 2 * (n // 2) for n, k in zip(spatial, _axis_kinds(spatial_dims))]
    return (input_shape[0], out_channels, *out)


def check_ahnet_input(x: torch.Tensor, spatial_dims: int, in_channels: int, psp_block_num: int,
                      upsample_mode: str) -> None:
    """Raises ValueError naming the rule and the shape when AH-Net cannot take ``x``."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"AHNet expects a torch.Tensor, got {type(x).__name__}")
    if x.dim() != spatial_dims + 2:
        layout = "(B, C, H, W, D)" if spatial_dims == 3 else "(B, C, H, W)"
        raise ValueError(f"AHNet(spatial_dims={spatial_dims}) expects a {spatial_dims + 2}-D input {layout}, "
                         f"got shape {tuple(x.shape)}")
    if x.shape[1] != in_channels:
        raise ValueError(f"AHNet(in_channels={in_channels}) got an input with {x.shape[1]} channels "
                         f"(shape {tuple(x.shape)}); channels are dimension 1")
    if not x.is_floating_point():
        raise ValueError(f"AHNet expects a floating-point input, got dtype {x.dtype}")
    if x.shape[0] == 0:
        raise ValueError(f"AHNet got an empty batch (shape {tuple(x.shape)})")
    problems = []
    for axis, (n, kind) in enumerate(zip(x.shape[2:], _axis_kinds(spatial_dims))):
        if ahnet_size_ok(n, kind, psp_block_num, upsample_mode):
            continue
        rule = _inplane_rule(psp_block_num, upsample_mode) if kind == "in-plane" else \
            "floor(n/2) a positive multiple of 16 (n a multiple of 32, or one more)"
        below, above = nearest_ahnet_sizes(n, kind, psp_block_num, upsample_mode)
        near = f"{below} or {above}" if below else f"{above}"
        problems.append(f"spatial axis {axis} ({kind}) has size {n}; it needs {rule}; nearest valid: {near}")
    if problems:
        raise ValueError(
            f"AHNet(spatial_dims={spatial_dims}, psp_block_num={psp_block_num}, upsample_mode={upsample_mode!r}) "
            f"cannot take an input of shape {tuple(x.shape)}: " + "; ".join(problems)
        )
