"""Helpers to run MONAI's networks side by side with ours."""
from __future__ import annotations

import copy

import torch


def run_model(net, x, grad_seed=1):
    """Forward + backward with a fixed random output gradient. Returns output, input gradient,
    parameter gradients and buffers (after the step) by name."""
    xi = x.detach().clone().requires_grad_()
    y = net(xi)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(grad_seed), dtype=torch.float64).to(y.dtype)
    y.backward(g)
    # parameters the forward never uses (MONAI FCN's `transformer`) have no gradient: left out
    grads = {n: p.grad.detach().clone() for n, p in net.named_parameters() if p.grad is not None}
    buffers = {n: b.detach().clone() for n, b in net.named_buffers()}
    net.zero_grad(set_to_none=True)
    return y.detach(), xi.grad.detach(), grads, buffers


def twins(monai_cls, ours_cls, kwargs, ours_kwargs=None, seed=0, dtype=torch.float32):
    """MONAI's network and ours, ours loaded from MONAI's state dict with strict=True."""
    torch.manual_seed(seed)
    theirs = monai_cls(**kwargs)
    ours = ours_cls(**kwargs, **(ours_kwargs or {}))
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return theirs.to(dtype), ours.to(dtype)


def flat(grads: dict) -> torch.Tensor:
    return torch.cat([g.flatten().double() for g in grads.values()])


def deepcopy_to(net, dtype):
    return copy.deepcopy(net).to(dtype)
