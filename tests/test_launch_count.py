"""How many Triton kernels one AH-Net training step compiles.

Triton compiles a kernel once per specialisation key (constexprs, warps, pointer dtypes and
alignment, and for integer arguments it specialises, ==1 / divisible by 16). Sizes and geometry that
vary from layer to layer are declared ``do_not_specialize``, so the count is bounded by the tile and
layout variants, not by the number of layers or shapes. The step is run on CPU with every Triton
launch recorded and skipped (``record_launches(execute=False)``): the launchers see the tensors they
would see on a GPU, nothing is computed by the kernels.
"""
import os
from collections import Counter

import pytest
import torch

import ahnet_fast
from ahnet_fast import backends

pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
                                reason="needs a GPU or TRITON_INTERPRET=1")

# fp32 AHNet (layers 3,4,6,3, psp_block_num 4), one training step at 1x1x128x128x32, forward and
# backward of the network (the focal loss adds one more kernel). Measured: 34 with Triton 3.8's
# tiles. A change that pushes it past this bound specialises on something that varies per layer.
MAX_KERNELS_PER_STEP = 40


def test_training_step_compiles_a_bounded_number_of_kernels(monkeypatch):
    from ahnet_fast.kernels.triton import _launch

    monkeypatch.setattr(backends, "device_preference", lambda device: ("triton", "cpp", "reference"))
    torch.manual_seed(0)
    net = ahnet_fast.AHNet(out_channels=3, psp_block_num=4)
    x = torch.randn(1, 1, 128, 128, 32)
    with _launch.record_launches(execute=False) as keys:
        out = net(x)
        out.backward(torch.ones_like(out))
    per_kernel = Counter(k[0] for k in keys)
    print(f"{len(keys)} kernels for one step: {dict(per_kernel)}")
    # every Triton op of the network ran through the launchers
    assert {"conv_fwd_kernel", "conv_dgrad_kernel", "conv_wgrad_kernel", "bn_relu_stats_kernel", "pyramid_pool_pool0_kernel",
            "pyramid_pool_route_kernel"} <= set(per_kernel)
    assert len(keys) <= MAX_KERNELS_PER_STEP, sorted(keys, key=str)
    # sizes never enter a key: the do_not_specialize arguments are plain integers in every one
    for name, _, _, args in keys:
        params = _launch._params[name]
        for pname, arg in zip(params, args):
            if pname in _launch._not_specialized[name]:
                assert arg in ("i32", "i64"), (name, pname, arg)


def test_sizes_do_not_add_kernels():
    """Two launches of one kernel at different sizes (same layouts) share one key."""
    from ahnet_fast.kernels.triton import _launch, aniso_conv as ac

    w = torch.randn(20, 48, 3, 3, 1, dtype=torch.float64)
    with _launch.record_launches(execute=False) as keys:
        for h, wd in ((16, 16), (32, 48), (80, 64)):
            ac.conv_forward(torch.randn(1, 48, h, wd, 32, dtype=torch.float64), w, None, None, 1, (1, 1, 0))
    assert len(keys) == 1, keys
