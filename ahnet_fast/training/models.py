"""The networks of each stage, built from plain descriptions that live in checkpoints."""
from __future__ import annotations

import torch
from torch import nn

from ahnet_fast.nn import AHNet, MCFCN
from ahnet_fast.training.checkpoint import load_checkpoint

# The ResNet50 encoder that the paper transfers from 2D to 3D (and freezes in stage 3d).
ENCODER = ("conv1", "bn0", "layer1", "layer2", "layer3", "layer4")


def model_spec(config) -> dict:
    """{"kind": ..., "kwargs": ...}: enough to rebuild the network without the training config."""
    # detection: one channel, the heat map's logit
    out = 1 if getattr(config, "task", "segmentation") == "detection" else config.num_classes
    if config.stage == "2d":
        return {"kind": "MCFCN", "kwargs": {"in_channels": 3, "out_channels": out}}
    return {"kind": "AHNet", "kwargs": {"in_channels": 1, "out_channels": out,
                                         "psp_block_num": config.psp_block_num, "upsample_mode": "transpose"}}


def build_from_spec(spec: dict, *, backend: str | None = None, checkpoint: str = "none") -> nn.Module:
    kind, kwargs = spec.get("kind"), dict(spec.get("kwargs", {}))
    if kind == "MCFCN":
        return MCFCN(**kwargs, backend=backend)
    if kind == "AHNet":
        return AHNet(**kwargs, backend=backend, checkpoint=checkpoint)
    raise ValueError(f"unknown model kind {kind!r} (expected 'MCFCN' or 'AHNet')")


def build_model(config) -> nn.Module:
    return build_from_spec(model_spec(config), backend=config.backend, checkpoint=config.checkpoint)


def initialise_from(model: nn.Module, path: str) -> str:
    """Loads ``path`` (a training checkpoint) into ``model`` as the stage needs; returns what was done.

    A 2D (MCFCN) checkpoint into an AHNet: the paper's transfer (``AHNet.copy_from``). The same kind
    of network: its weights are loaded (strictly)."""
    ckpt = load_checkpoint(path)
    spec = ckpt.get("model_spec") or {}
    src_kind = spec.get("kind")
    if src_kind is None:
        raise ValueError(f"--init {path!r}: the checkpoint does not say which network it holds (no 'model_spec')")
    if isinstance(model, AHNet) and src_kind == "MCFCN":
        net2d = build_from_spec(spec)
        net2d.load_state_dict(ckpt["model"])
        model.copy_from(net2d)
        return f"encoder transferred from the 2D network in {path}"
    if type(model).__name__ != src_kind:
        raise ValueError(f"--init {path!r} holds a {src_kind}; this stage trains a {type(model).__name__}")
    if spec.get("kwargs") != model_spec_kwargs(model):
        raise ValueError(f"--init {path!r}: its {src_kind} was built with {spec.get('kwargs')}, this one with "
                         f"{model_spec_kwargs(model)}")
    model.load_state_dict(ckpt["model"])
    return f"weights loaded from {path}"


def model_spec_kwargs(model: nn.Module) -> dict:
    if isinstance(model, AHNet):
        return {"in_channels": model.in_channels, "out_channels": model.out_channels,
                "psp_block_num": model.psp_block_num, "upsample_mode": model.upsample_mode}
    return {"in_channels": model.in_channels, "out_channels": model.out_channels}


def freeze_encoder(model: nn.Module) -> list[str]:
    """Stage 3d: the transferred encoder neither learns nor updates its BatchNorm statistics."""
    frozen = []
    for name in ENCODER:
        module = getattr(model, name)
        module.requires_grad_(False)
        frozen.append(name)
    return frozen


def set_train_mode(model: nn.Module, frozen: list[str]) -> None:
    """``model.train()``, except frozen parts stay in eval mode (their BatchNorm uses the running
    statistics they were transferred with)."""
    model.train()
    for name in frozen:
        getattr(model, name).eval()


def trainable_parameters(model: nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]
