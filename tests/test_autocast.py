"""torch.autocast through the custom ops: convolution operands in the low precision, BatchNorm
parameters and statistics in float32; judged against MONAI under the same autocast."""
import pytest
import torch

import ahnet_fast
from ahnet_fast.ops import bn_relu_conv
from tests._monai import deepcopy_to, flat, run_model, twins
from tests.conftest import rel_err

monai_nets = pytest.importorskip("monai.networks.nets")
DEVICE, AMP_DTYPES = ("cuda", (torch.bfloat16, torch.float16)) if torch.cuda.is_available() else \
    ("cpu", (torch.bfloat16,))


@pytest.mark.parametrize("dtype", AMP_DTYPES, ids=[str(d).split(".")[-1] for d in AMP_DTYPES])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_ahnet_under_autocast_as_accurate_as_monai(train, dtype):
    """Output, input gradient and parameter gradients: error against the float64 truth at most 2x that
    of MONAI's AHNet under the same autocast, plus 1e-3 (bf16 carries ~3 significant digits)."""
    theirs, ours = twins(monai_nets.AHNet, ahnet_fast.AHNet, dict(layers=(1, 1, 1, 1), psp_block_num=2,
                                                                  out_channels=2))
    theirs.train(train), ours.train(train)
    truth = run_model(deepcopy_to(theirs, torch.float64), torch.randn(
        2, 1, 64, 64, 32, generator=torch.Generator().manual_seed(3), dtype=torch.float64))
    x = torch.randn(2, 1, 64, 64, 32, generator=torch.Generator().manual_seed(3), dtype=torch.float64).float()
    theirs, ours = theirs.to(DEVICE), ours.to(DEVICE)
    with torch.autocast(DEVICE, dtype=dtype):
        got, ref = run_model(ours, x.to(DEVICE)), run_model(theirs, x.to(DEVICE))
    assert got[0].dtype == ref[0].dtype == dtype
    for pick, name in ((lambda r: r[0], "output"), (lambda r: r[1], "input grad"), (lambda r: flat(r[2]), "params")):
        e_ours, e_monai = rel_err(pick(got).cpu(), pick(truth)), rel_err(pick(ref).cpu(), pick(truth))
        assert e_ours <= 2 * e_monai + 1e-3, f"{name}: ours {e_ours:.2e}, MONAI under autocast {e_monai:.2e}"
    for name, p in ours.named_parameters():  # the master weights and their gradients stay float32
        assert p.dtype == torch.float32 and got[2][name].dtype == torch.float32, name


@pytest.mark.parametrize("dtype", AMP_DTYPES, ids=[str(d).split(".")[-1] for d in AMP_DTYPES])
def test_inference_path_under_autocast_as_accurate_as_monai(dtype, monkeypatch):
    """Eval mode under no_grad runs AHNet's inference path (ops in bands, the last stage in one
    buffer; here a few rows a band): under autocast its output is in the low precision and its error
    against the float64 truth at most 2x MONAI's under the same autocast, plus 1e-3."""
    from ahnet_fast.ops import _bands

    monkeypatch.setattr(_bands, "BAND_BYTES", 64 * 1024)
    theirs, ours = twins(monai_nets.AHNet, ahnet_fast.AHNet, dict(layers=(1, 1, 1, 1), psp_block_num=2,
                                                                  out_channels=2))
    theirs.eval(), ours.eval()
    x = torch.randn(2, 1, 64, 64, 32, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    with torch.no_grad():
        truth = deepcopy_to(theirs, torch.float64)(x)
        theirs, ours = theirs.to(DEVICE), ours.to(DEVICE)
        with torch.autocast(DEVICE, dtype=dtype):
            got, ref = ours(x.float().to(DEVICE)), theirs(x.float().to(DEVICE))
    assert got.dtype == ref.dtype == dtype
    e_ours, e_monai = rel_err(got.cpu(), truth), rel_err(ref.cpu(), truth)
    assert e_ours <= 2 * e_monai + 1e-3, f"ours {e_ours:.2e}, MONAI under autocast {e_monai:.2e}"


def test_bn_relu_conv_casts_the_convolution_not_the_batchnorm():
    x = torch.randn(2, 4, 6, 5, 3, device=DEVICE)
    bw, bb = torch.ones(4, device=DEVICE, requires_grad=True), torch.zeros(4, device=DEVICE, requires_grad=True)
    rm, rv = torch.zeros(4, device=DEVICE), torch.ones(4, device=DEVICE)
    w = torch.randn(3, 4, 3, 3, 1, device=DEVICE, requires_grad=True)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        y = bn_relu_conv(x, rm, rv, bw, bb, True, 0.1, 1e-5, w)
    assert y.dtype == torch.bfloat16 and rm.dtype == torch.float32
    y.float().sum().backward()
    assert w.grad.dtype == bw.grad.dtype == torch.float32
