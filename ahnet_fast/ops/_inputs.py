"""Whether an input can meet a module's weights at all: the same dtype (outside autocast) and device.

Checked once where a model is entered, so that a float64 volume given to a float32 AH-Net is one
error naming both dtypes instead of a failure from inside whichever op meets it first. Here, in ops,
because whether autocast will cast for the convolutions is a question of how ops run.
"""
from __future__ import annotations

import torch


class InputMismatchError(ValueError, RuntimeError):
    """An input whose dtype or device differs from the module's weights. A ValueError, as every bad
    input here; also a RuntimeError, which is what PyTorch (and so MONAI) raises for the same input
    from inside the first convolution, so code written against either catches it."""


def check_input_matches(x: torch.Tensor, weight: torch.Tensor, name: str) -> None:
    """Raises InputMismatchError naming both dtypes (or devices) when ``x`` cannot meet ``weight``
    outside autocast (under autocast the convolutions cast for themselves)."""
    if x.device != weight.device:
        raise InputMismatchError(f"{name}: the input is on {x.device} but the weights are on {weight.device}; "
                                 f"move one of them (model.to(device) or x.to(device))")
    if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
        raise InputMismatchError(f"{name}: the input is {x.dtype} but the weights are {weight.dtype}; convert "
                                 f"one of them (x.to({weight.dtype}) or model.to({x.dtype})), or run under "
                                 "torch.autocast")
