"""The Triton anisotropic-convolution kernels (forward, input gradient, weight gradient, with the
BN-ReLU prologue on load), run in Triton's interpreter on CPU tensors (on a GPU machine, on CUDA),
against torch's convolution in float64."""
import os

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import assert_close_normwise, rel_err

pytest.importorskip("triton")
from ahnet_fast.kernels.triton import aniso_conv as ac  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
runs_here = pytest.mark.skipif(DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1",
                               reason="needs a GPU or TRITON_INTERPRET=1")

# (kernel size, stride, padding, Ci, Co): AH-Net's geometries plus one arbitrary one; channel
# counts that leave tails in the K loop (BLOCK_K 32) and in every output-channel tile width
GEOMETRIES = [
    ((3, 3, 1), (1, 1, 1), (1, 1, 0), 40, 20),
    ((3, 3, 1), (2, 2, 1), (1, 1, 0), 5, 70),
    ((1, 1, 3), (1, 1, 1), (0, 0, 1), 20, 20),
    ((1, 1, 1), (1, 1, 1), (0, 0, 0), 33, 40),
    ((1, 1, 1), (2, 2, 1), (0, 0, 0), 7, 5),
    ((1, 1, 3), (2, 1, 2), (1, 0, 1), 6, 9),
]
GEOM_IDS = [f"k{''.join(map(str, k))}-s{''.join(map(str, s))}-ci{ci}-co{co}" for k, s, _, ci, co in GEOMETRIES]
SHAPE = (2, 7, 9, 5)  # N, H, W, D


def _layout(t, layout):
    """t (N, C, H, W, D) with the same values in another memory layout."""
    if layout == "contiguous":
        return t.contiguous()
    if layout == "channels_last_3d":
        return t.contiguous(memory_format=torch.channels_last_3d)
    if layout == "prefix":  # the first C channels of a larger concatenation buffer
        buf = torch.randn(t.shape[0], t.shape[1] + 11, *t.shape[2:], dtype=t.dtype, device=t.device)
        buf[:, :t.shape[1]] = t
        return buf[:, :t.shape[1]]
    if layout == "permuted":  # (N, W, D, C, H) in memory
        return t.permute(0, 3, 4, 1, 2).contiguous().permute(0, 3, 4, 1, 2)
    raise AssertionError(layout)


def make(geom, dtype=torch.float32, prologue=True, layout="contiguous", seed=0, shape=SHAPE):
    ks, stride, padding, ci, co = geom
    g = torch.Generator().manual_seed(seed)
    n, h, w, d = shape
    x = torch.randn(n, ci, h, w, d, generator=g, dtype=torch.float64)
    wt = torch.randn(co, ci, *ks, generator=g, dtype=torch.float64) / (ci * ks[0] * ks[1] * ks[2]) ** 0.5
    scale = shift = None
    if prologue:
        scale = (torch.rand(ci, generator=g, dtype=torch.float64) + 0.5).float()
        shift = (torch.randn(ci, generator=g, dtype=torch.float64) * 0.5).float()
    x = _layout(x.to(dtype).to(DEVICE), layout)
    to_dev = (lambda t: None if t is None else t.to(DEVICE))
    return x, wt.to(dtype).to(DEVICE), to_dev(scale), to_dev(shift), stride, padding


def operand(x, scale, shift):
    """a = relu(x * scale + shift) (or x) in float64."""
    x = x.double()
    if scale is None:
        return x
    view = (1, -1, 1, 1, 1)
    return torch.relu(x * scale.double().view(view) + shift.double().view(view))


def reference(x, wt, scale, shift, stride, padding, grad_y):
    """float64 y, grad_a, grad_w of conv3d(a, wt)."""
    a = operand(x, scale, shift)
    w64 = wt.double()
    y = F.conv3d(a, w64, stride=stride, padding=padding)
    ga, gw, _ = torch.ops.aten.convolution_backward(grad_y.double(), a, w64, None, stride, padding, (1, 1, 1), False,
                                                    (0, 0, 0), 1, [True, True, False])
    return y, ga, gw


def triton_all(x, wt, scale, shift, stride, padding, grad_y, precision="ieee"):
    y = ac.conv_forward(x, wt, scale, shift, stride, padding, precision=precision)
    ga = ac.conv_input_grad(grad_y, wt, x.shape, stride, padding, precision=precision)
    gw = ac.conv_weight_grad(x, grad_y, scale, shift, wt.shape, stride, padding, precision=precision)
    return y, ga, gw


def grad_for(x, wt, stride, padding, seed=1):
    ks = wt.shape[2:]
    out = [(s + 2 * p - k) // st + 1 for s, k, st, p in zip(x.shape[2:], ks, stride, padding)]
    g = torch.Generator().manual_seed(seed)
    return torch.randn(x.shape[0], wt.shape[0], *out, generator=g, dtype=torch.float64).to(x.dtype).to(DEVICE)


@runs_here
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("prologue", [True, False], ids=["bnrelu", "plain"])
@pytest.mark.parametrize("geom", GEOMETRIES, ids=GEOM_IDS)
def test_matches_reference(geom, prologue, dtype):
    x, wt, scale, shift, stride, padding = make(geom, dtype, prologue)
    gy = grad_for(x, wt, stride, padding)
    got = triton_all(x, wt, scale, shift, stride, padding, gy)
    ref = reference(x, wt, scale, shift, stride, padding, gy)
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    for what, a, b, out_dtype in zip(("y", "grad_a", "grad_w"), got, ref,
                                     (dtype, dtype, torch.float64 if dtype == torch.float64 else torch.float32)):
        assert a.dtype == out_dtype, what
        assert a.is_contiguous(), what
        assert_close_normwise(a, b, tol, what=what)


@runs_here
@pytest.mark.parametrize("layout", ["channels_last_3d", "prefix", "permuted"])
@pytest.mark.parametrize("geom", [GEOMETRIES[1], GEOMETRIES[2]], ids=[GEOM_IDS[1], GEOM_IDS[2]])
def test_input_layouts(geom, layout):
    """Any input strides are read in place; channels_last_3d inputs give channels_last_3d outputs."""
    x, wt, scale, shift, stride, padding = make(geom, layout=layout, seed=2)
    gy = _layout(grad_for(x, wt, stride, padding), layout)
    got = triton_all(x, wt, scale, shift, stride, padding, gy)
    ref = reference(x, wt, scale, shift, stride, padding, gy)
    for what, a, b in zip(("y", "grad_a", "grad_w"), got, ref):
        assert_close_normwise(a, b, 1e-5, what=f"{layout} {what}")
    cl = layout == "channels_last_3d"
    for t in got[:2]:
        assert t.is_contiguous(memory_format=torch.channels_last_3d if cl else torch.contiguous_format)
    assert got[2].is_contiguous()


@runs_here
@pytest.mark.parametrize("geom", [GEOMETRIES[0], GEOMETRIES[1], GEOMETRIES[5]], ids=[GEOM_IDS[0], GEOM_IDS[1],
                                                                                     GEOM_IDS[5]])
def test_padding_after_prologue(geom):
    """With shift > 0 the operand relu(shift) at a padded position would be nonzero: the kernels must
    pad a with zeros, not x (whose padded value would pass the prologue as relu(shift))."""
    x, wt, scale, _, stride, padding = make(geom, seed=3)
    shift = torch.full_like(scale, 2.0)
    gy = grad_for(x, wt, stride, padding)
    y = ac.conv_forward(x, wt, scale, shift, stride, padding)
    gw = ac.conv_weight_grad(x, gy, scale, shift, wt.shape, stride, padding)
    ref_y, _, ref_gw = reference(x, wt, scale, shift, stride, padding, gy)
    assert_close_normwise(y, ref_y, 1e-5, what="y")
    assert_close_normwise(gw, ref_gw, 1e-5, what="grad_w")
    # the wrong order (pad x with zeros, then the prologue) is far from it: the test tells them apart
    pd = (padding[2], padding[2], padding[1], padding[1], padding[0], padding[0])
    wrong_a = operand(F.pad(x.double(), pd), scale, shift)
    wrong_y = F.conv3d(wrong_a, wt.double(), stride=stride)
    assert rel_err(wrong_y, ref_y) > 1e-2


@runs_here
@pytest.mark.parametrize("geom", GEOMETRIES[:5], ids=GEOM_IDS[:5])
def test_fp16_within_twice_torch_error(geom):
    """fp16: error against the float64 truth at most twice that of torch's own fp16 convolution."""
    x, wt, scale, shift, stride, padding = make(geom, torch.float16, seed=4)
    gy = grad_for(x, wt, stride, padding)
    got = triton_all(x, wt, scale, shift, stride, padding, gy)
    truth = reference(x, wt, scale, shift, stride, padding, gy)
    # torch in fp16: the operand rounded to fp16 as the kernel's dot sees it
    a16 = operand(x, scale, shift).half()
    w16, g16 = wt.half(), gy.half()
    try:
        y16 = F.conv3d(a16, w16, stride=stride, padding=padding)
        ga16, gw16, _ = torch.ops.aten.convolution_backward(g16, a16, w16, None, stride, padding, (1, 1, 1), False,
                                                            (0, 0, 0), 1, [True, True, False])
    except RuntimeError:  # no fp16 convolution on this device: fp32 computed, then rounded
        y16, ga16, gw16 = (t.float().half() for t in reference(a16.float(), w16.float(), None, None, stride,
                                                               padding, g16.float()))
    for what, a, t, r in zip(("y", "grad_a", "grad_w"), got, truth, (y16, ga16, gw16)):
        assert rel_err(a, t) <= 2 * rel_err(r, t) + 1e-4, f"{what}: {rel_err(a, t):.3e} vs torch {rel_err(r, t):.3e}"
    assert got[0].dtype == got[1].dtype == torch.float16 and got[2].dtype == torch.float32


@pytest.mark.skipif(DEVICE == "cpu", reason="the Triton interpreter's tl.dot mishandles bfloat16 operands")
def test_bf16_within_twice_torch_error():
    geom = GEOMETRIES[0]
    x, wt, scale, shift, stride, padding = make(geom, torch.bfloat16, seed=5)
    gy = grad_for(x, wt, stride, padding)
    got = triton_all(x, wt, scale, shift, stride, padding, gy)
    truth = reference(x, wt, scale, shift, stride, padding, gy)
    a16 = operand(x, scale, shift).bfloat16()
    y16 = F.conv3d(a16, wt, stride=stride, padding=padding)
    assert rel_err(got[0], truth[0]) <= 2 * rel_err(y16, truth[0]) + 1e-3
    for a, t in zip(got[1:], truth[1:]):
        assert rel_err(a, t) <= 1e-2


@runs_here
def test_tf32_precision_runs():
    geom = GEOMETRIES[0]
    x, wt, scale, shift, stride, padding = make(geom, seed=6)
    gy = grad_for(x, wt, stride, padding)
    got = triton_all(x, wt, scale, shift, stride, padding, gy, precision="tf32")
    for what, a, b in zip(("y", "grad_a", "grad_w"), got, reference(x, wt, scale, shift, stride, padding, gy)):
        assert_close_normwise(a, b, 5e-3, what=what)


@runs_here
def test_weight_grad_deterministic_with_split_k():
    geom = GEOMETRIES[2]
    x, wt, scale, shift, stride, padding = make(geom, seed=7)
    m = SHAPE[0] * SHAPE[1] * SHAPE[2] * SHAPE[3]
    bci, bco, bm = ac._wgrad_tile(geom[3], geom[4], "fma")
    assert ac._wgrad_splits(m, 3, bm)[1] > 1  # the case exercises the split and its second reduction
    gy = grad_for(x, wt, stride, padding)
    a = ac.conv_weight_grad(x, gy, scale, shift, wt.shape, stride, padding)
    b = ac.conv_weight_grad(x, gy, scale, shift, wt.shape, stride, padding)
    assert torch.equal(a, b)
    assert_close_normwise(a, reference(x, wt, scale, shift, stride, padding, gy)[2], 1e-5)


def test_bad_arguments_raise():
    x = torch.randn(1, 4, 5, 5, 3)
    w = torch.randn(6, 4, 3, 3, 1)
    gy = torch.randn(1, 6, 5, 5, 3)
    with pytest.raises(ValueError, match="5D"):
        ac.conv_forward(x[0], w, None, None, 1, (1, 1, 0))
    with pytest.raises(ValueError, match="kernel size"):
        ac.conv_forward(x, torch.randn(6, 4, 3, 3, 3), None, None, 1, 1)
    with pytest.raises(ValueError, match="input channels"):
        ac.conv_forward(x, torch.randn(6, 3, 3, 3, 1), None, None, 1, (1, 1, 0))
    with pytest.raises(ValueError, match="together"):
        ac.conv_forward(x, w, torch.ones(4), None, 1, (1, 1, 0))
    with pytest.raises(ValueError, match="shape"):
        ac.conv_forward(x, w, torch.ones(3), torch.ones(3), 1, (1, 1, 0))
    with pytest.raises(ValueError, match="dtype"):
        ac.conv_forward(x.int(), w, None, None, 1, (1, 1, 0))
    with pytest.raises(ValueError, match="grad_y has shape"):
        ac.conv_input_grad(gy, w, x.shape, 2, (1, 1, 0))
    with pytest.raises(ValueError, match="input channels"):
        ac.conv_input_grad(gy, w, (1, 5, 5, 5, 3), 1, (1, 1, 0))
    with pytest.raises(ValueError, match="dtype"):
        ac.conv_weight_grad(x, gy.double(), None, None, w.shape, 1, (1, 1, 0))
    with pytest.raises(ValueError, match="stride"):
        ac.conv_forward(x, w, None, None, 0, (1, 1, 0))
    with pytest.raises(ValueError, match="too small"):
        ac.conv_forward(x[..., :0, :, :], w, None, None, 1, (0, 0, 0))
    with pytest.raises(ValueError, match="precision"):
        ac.conv_forward(x, w, None, None, 1, (1, 1, 0), precision="bf16x3")


def test_compile_specs_cover_launcher_choices():
    """Every tile the launchers pick, for every channel count AH-Net uses, is in compile_specs."""
    specs = ac.compile_specs()
    fwd = {(c["PROLOGUE"], c["PRECISION"], c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_K"], s["x_ptr"])
           for _, fn, s, c, _ in specs if fn is ac.conv_fwd_kernel}
    dgrad = {(c["PRECISION"], c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_K"], s["g_ptr"])
             for _, fn, s, c, _ in specs if fn is ac.conv_dgrad_kernel}
    wgrad = {(c["PROLOGUE"], c["PRECISION"], c["BLOCK_CI"], c["BLOCK_CO"], c["BLOCK_M"], s["x_ptr"])
             for _, fn, s, c, _ in specs if fn is ac.conv_wgrad_kernel}
    assert any(fn is ac.wgrad_reduce_kernel for _, fn, _, _, _ in specs)
    names = [(fn.__name__, name) for name, fn, _, _, _ in specs]
    assert len(names) == len(set(names))
    for dtype, dt in ((torch.float32, "*fp32"), (torch.float16, "*fp16"), (torch.bfloat16, "*bf16")):
        for precision in ac.PRECISIONS:
            prec = ac._precision(dtype, precision)
            path = ac._path(dtype, prec)
            for c in (1, 20, 32, 33, 64, 65, 80, 2048):
                assert (prec,) + tuple(ac._gemm_tile(c, path)) + (dt,) in dgrad
                for on in (True, False):
                    assert (on, prec) + tuple(ac._gemm_tile(c, path)) + (dt,) in fwd
                    for ci in (1, 20, 32, 33, 80, 2048):
                        assert (on, prec) + tuple(ac._wgrad_tile(ci, c, path)) + (dt,) in wgrad
