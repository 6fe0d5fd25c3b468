"""The input-size rule: derived from the strides, checked against what MONAI's network can run."""
import pytest
import torch

import ahnet_fast
from ahnet_fast.nn.shapes import ahnet_output_shape, ahnet_size_ok

monai_nets = pytest.importorskip("monai.networks.nets")

INPLANE = [31, 32, 33, 48, 63, 64, 65, 96, 127, 128, 129]
SLICE = [15, 16, 31, 32, 33, 34, 47, 63, 64, 65]


def monai_runs_exactly(net, shape):
    """MONAI's network runs on a meta tensor and every map meets its partner without broadcasting
    (tiny sizes otherwise broadcast silently), i.e. the output is 2x the conv_x map."""
    try:
        out = net(torch.empty(shape, device="meta"))
    except (RuntimeError, ValueError):
        return False
    return tuple(out.shape) == ahnet_output_shape(shape, net.spatial_dims, out.shape[1])


def assert_rule_matches_monai(spatial_dims, mode, psp, shapes):
    """Our network accepts exactly the shapes MONAI's runs without broadcasting (both on meta tensors)."""
    kwargs = dict(layers=(1, 1, 1, 1), spatial_dims=spatial_dims, psp_block_num=psp, upsample_mode=mode)
    with torch.device("meta"):
        theirs, ours = monai_nets.AHNet(**kwargs), ahnet_fast.AHNet(**kwargs)
    for shape in shapes:
        expected = monai_runs_exactly(theirs, shape)
        try:
            ours_ok = ours(torch.empty(shape, device="meta")) is not None
        except ValueError:
            ours_ok = False
        assert ours_ok == expected, f"shape {shape}: ours {'accepts' if ours_ok else 'rejects'}, MONAI runs={expected}"


@pytest.mark.parametrize("mode,psp", [("transpose", 0), ("transpose", 2), ("transpose", 4), ("trilinear", 3),
                                      ("trilinear", 4), ("nearest", 1)])
def test_rule_matches_monai_3d(mode, psp):
    good = next(n for n in (32, 64, 128, 256) if ahnet_size_ok(n, "in-plane", psp, mode))
    shapes = [(1, 1, n, good, 32) for n in INPLANE] + [(1, 1, good, good, d) for d in SLICE]
    assert_rule_matches_monai(3, mode, psp, shapes)


@pytest.mark.parametrize("mode,psp", [("transpose", 4), ("bilinear", 2), ("nearest", 0)])
def test_rule_matches_monai_2d(mode, psp):
    assert_rule_matches_monai(2, mode, psp, [(1, 1, n, 64) for n in INPLANE] + [(1, 1, 128, w) for w in SLICE])


def test_error_names_rule_shape_and_nearest_sizes():
    with torch.device("meta"):
        net = ahnet_fast.AHNet(layers=(1, 1, 1, 1))
    with pytest.raises(ValueError) as info:
        net(torch.empty(1, 1, 96, 128, 40, device="meta"))
    msg = str(info.value)
    assert "(1, 1, 96, 128, 40)" in msg
    assert "spatial axis 0 (in-plane) has size 96" in msg and "multiple of 64" in msg and "128" in msg
    assert "spatial axis 2 (slice) has size 40" in msg and "nearest valid: 32 or 64" in msg
    assert "axis 1" not in msg  # 128 is fine


def test_wrong_dimensions_channels_and_dtype():
    net = ahnet_fast.AHNet(layers=(1, 1, 1, 1), in_channels=2, psp_block_num=0)
    with pytest.raises(ValueError, match=r"expects a 5-D input \(B, C, H, W, D\), got shape \(2, 32, 32, 32\)"):
        net(torch.randn(2, 32, 32, 32))
    with pytest.raises(ValueError, match="in_channels=2.*3 channels"):
        net(torch.randn(1, 3, 32, 32, 32))
    with pytest.raises(ValueError, match="floating-point"):
        net(torch.ones(1, 2, 32, 32, 32, dtype=torch.int64))
    with pytest.raises(ValueError, match="4-D input"):
        ahnet_fast.AHNet(spatial_dims=2)(torch.randn(1, 1, 128, 32, 32))


def test_constructor_arguments_are_validated():
    for kwargs, match in [(dict(spatial_dims=4), "spatial_dims"), (dict(psp_block_num=5), "psp_block_num"),
                          (dict(upsample_mode="bicubic"), "upsample_mode"),
                          (dict(upsample_mode="bilinear"), "needs spatial_dims=2"),
                          (dict(spatial_dims=2, upsample_mode="trilinear"), "needs spatial_dims=3"),
                          (dict(layers=(3, 4, 6)), "layers"), (dict(pretrained=True), "never downloads"),
                          (dict(backend="fastest"), "unknown backend")]:
        with pytest.raises(ValueError, match=match):
            ahnet_fast.AHNet(**kwargs)


@pytest.mark.parametrize("shape", [(1, 1, 127, 128, 33), (2, 1, 128, 255, 64)])
def test_output_shape_formula(shape):
    with torch.device("meta"):
        net = ahnet_fast.AHNet(out_channels=3)
    out = net(torch.empty(shape, device="meta"))
    assert tuple(out.shape) == ahnet_output_shape(shape, 3, 3)
