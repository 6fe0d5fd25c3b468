"""PyramidVolumetricPooling (AHNet.psp) against MONAI's PSP: values and gradients, every mode."""
import pytest
import torch

import ahnet_fast
from tests._monai import run_model
from tests.conftest import assert_close_normwise

monai_ahnet = pytest.importorskip("monai.networks.nets.ahnet")

CASES = [(3, p, mode) for p in (1, 2, 3, 4) for mode in ("transpose", "trilinear", "nearest")] + \
        [(2, p, mode) for p in (1, 4) for mode in ("transpose", "bilinear", "nearest")]


def _shape(spatial_dims, psp):
    window = 2 ** (psp + 2)
    return (2, 5, window * 2, window, 3) if spatial_dims == 3 else (2, 5, window * 2, 3)


@pytest.mark.parametrize("spatial_dims,psp,mode", CASES)
@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_matches_monai_psp(spatial_dims, psp, mode, dtype, rtol):
    torch.manual_seed(psp)
    theirs = monai_ahnet.PSP(spatial_dims, psp, 5, mode)
    ours = ahnet_fast.PyramidVolumetricPooling(spatial_dims, psp, 5, mode)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    theirs, ours = theirs.to(dtype), ours.to(dtype)
    x = torch.randn(_shape(spatial_dims, psp), dtype=dtype)
    got, ref = run_model(ours, x), run_model(theirs, x)
    assert_close_normwise(got[0], ref[0], rtol, what="output")
    assert_close_normwise(got[1], ref[1], rtol, what="input grad")
    for name in ref[2]:
        assert_close_normwise(got[2][name], ref[2][name], rtol, what=name)


def test_sizes_it_cannot_take_are_rejected():
    psp = ahnet_fast.PyramidVolumetricPooling(3, 4, 5, "transpose")
    with pytest.raises(ValueError, match="in-plane axis 1 has size 96; it must be a positive multiple of 64"):
        psp(torch.randn(1, 5, 64, 96, 2))
    interp = ahnet_fast.PyramidVolumetricPooling(3, 3, 5, "trilinear")
    interp(torch.randn(1, 5, 40, 33, 2))  # interpolation only needs the window to fit
    with pytest.raises(ValueError, match="at least 32"):
        interp(torch.randn(1, 5, 31, 40, 2))
    with pytest.raises(ValueError, match=r"expects \(B, 5"):
        psp(torch.randn(1, 4, 64, 64, 2))
    with pytest.raises(ValueError, match="upsample_mode"):
        ahnet_fast.PyramidVolumetricPooling(3, 2, 5, "cubic")


def test_zero_levels_give_no_channels():
    out = ahnet_fast.PyramidVolumetricPooling(3, 0, 5)(torch.randn(1, 5, 8, 8, 2))
    assert out.shape == (1, 0, 8, 8, 2)
