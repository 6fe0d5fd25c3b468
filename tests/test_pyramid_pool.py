"""Pyramid volumetric pooling (the op ahnet_fast.ops.pyramid_pool and the module AHNet.psp): every backend
against MONAI's PSP and the reference, values and gradients, every mode; ties and NaN; layouts and dtypes;
gradcheck and opcheck; what the backward keeps; sizes it cannot take. The Triton kernels:
test_pyramid_pool_triton.py."""
import pytest
import torch

import ahnet_fast
from ahnet_fast._extension import extension_available
from ahnet_fast.ops.pyramid_pool import _Args, pyramid_pool
from tests._monai import flat, run_model
from tests.conftest import ConcatInput, assert_close_normwise, rel_err

monai_ahnet = pytest.importorskip("monai.networks.nets.ahnet")
needs_ext = pytest.mark.skipif(not extension_available(), reason="compiled extension not built")

MODES = {3: ("transpose", "trilinear", "nearest"), 2: ("transpose", "bilinear", "nearest")}
CASES = [(3, p, mode) for p in (1, 2, 3, 4) for mode in MODES[3]] + [(2, p, mode) for p in (1, 4) for mode in MODES[2]]


def _shape(spatial_dims, psp, mode, batch=2, channels=5):
    window = 2 ** (psp + 2)
    if mode == "transpose":  # in-plane multiples of the largest window
        return (batch, channels, window * 2, window, 3) if spatial_dims == 3 else (batch, channels, window * 2, 3)
    # interpolation: any size at least the window (odd sizes leave rows and columns unpooled)
    return (batch, channels, window * 2 + 5, window + 3, 3) if spatial_dims == 3 else (batch, channels, window + 7, 5)


def _pair(spatial_dims, psp, mode, channels=5, seed=0):
    torch.manual_seed(seed)
    theirs = monai_ahnet.PSP(spatial_dims, psp, channels, mode)
    ours = ahnet_fast.PyramidVolumetricPooling(spatial_dims, psp, channels, mode)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return theirs, ours


def _params(module):
    transpose = module.upsample_mode == "transpose"
    return ([m.weight for m in module.project_modules], [m.bias for m in module.project_modules],
            [m.weight for m in module.up_modules] if transpose else None,
            [m.bias for m in module.up_modules] if transpose else None)


def _compare(got, ref, rtol, atol=0.0):
    assert_close_normwise(got[0], ref[0], rtol, atol, what="output")
    assert_close_normwise(got[1], ref[1], rtol, atol, what="input grad")
    for name in ref[2]:
        assert_close_normwise(got[2][name], ref[2][name], rtol, atol, what=name)


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpp", marks=needs_ext)])
@pytest.mark.parametrize("spatial_dims,psp,mode", CASES)
@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_matches_monai_psp(spatial_dims, psp, mode, dtype, rtol, backend):
    theirs, ours = _pair(spatial_dims, psp, mode, seed=psp)
    theirs, ours = theirs.to(dtype), ours.to(dtype)
    ours.backend = backend
    x = torch.randn(_shape(spatial_dims, psp, mode), dtype=dtype)
    got, ref = run_model(ours, x), run_model(theirs, x)
    if dtype == torch.float64:
        _compare(got, ref, rtol)
        return
    # float32: each quantity within 1e-5 of the float64 result, or within 2x MONAI's own float32
    # error where that is larger. A one-element bias gradient is a sum of many terms that cancel: its
    # relative error measures the cancellation, which differs by summation order from CPU to CPU (AVX-512
    # vs AVX2 lanes), so the bias gradients are judged together with the weight gradients (the float64
    # test above checks each exactly).
    truth = run_model(theirs.double(), x.double())
    pairs = [(got[0], ref[0], truth[0], "output"), (got[1], ref[1], truth[1], "input grad"),
             (flat(got[2]), flat(ref[2]), flat(truth[2]), "all parameter grads")]
    pairs += [(got[2][k], ref[2][k], truth[2][k], k) for k in truth[2] if truth[2][k].numel() > 1]
    for mine, theirs32, exact, what in pairs:
        assert rel_err(mine, exact) <= max(rtol, 2 * rel_err(theirs32, exact)), what


class _MonaiConcat(torch.nn.Module):
    def __init__(self, psp):
        super().__init__()
        self.psp = psp

    def forward(self, x):
        return torch.cat((self.psp(x), x), 1)


@needs_ext
@pytest.mark.parametrize("spatial_dims,psp,mode", [(3, 4, "transpose"), (3, 2, "trilinear"), (3, 3, "nearest"),
                                                   (2, 2, "bilinear"), (2, 3, "transpose")])
def test_concat_input_is_the_concatenation_ahnet_takes(spatial_dims, psp, mode):
    theirs, ours = _pair(spatial_dims, psp, mode)
    theirs, ours = theirs.double(), ours.double()
    x = torch.randn(_shape(spatial_dims, psp, mode), dtype=torch.float64)
    _compare(run_model(ConcatInput(ours), x), run_model(_MonaiConcat(theirs), x), 1e-12)


@needs_ext
@pytest.mark.parametrize("spatial_dims,psp,mode", [(3, 3, "transpose"), (3, 2, "trilinear"), (3, 2, "nearest"),
                                                   (2, 3, "transpose"), (2, 2, "bilinear")])
def test_ties_go_where_pytorch_puts_them(spatial_dims, psp, mode):
    """Few distinct values, so most windows hold several equal maxima: PyTorch's rule (first in
    row-major order of the window) in the forward, and the gradient to that same element."""
    theirs, ours = _pair(spatial_dims, psp, mode)
    theirs, ours = theirs.double(), ours.double()
    shape = _shape(spatial_dims, psp, mode)
    for seed in range(3):
        x = torch.randint(-1, 2, shape, generator=torch.Generator().manual_seed(seed)).double()
        _compare(run_model(ConcatInput(ours), x), run_model(_MonaiConcat(theirs), x), 1e-12)


@needs_ext
def test_constant_input_routes_every_window_to_its_first_element():
    _, ours = _pair(3, 2, "transpose", channels=2)
    ours = ours.double()
    x = torch.zeros(1, 2, 16, 16, 2, dtype=torch.float64, requires_grad=True)
    ours(x).sum().backward()
    routed = x.grad != 0
    assert routed.sum() == 2 * 2 * 4  # one element per 8x8 window (the 16x16 window's is among them)
    assert routed[:, :, ::8, ::8].all()


@needs_ext
def test_nan_propagates_and_takes_the_gradient_as_in_pytorch():
    theirs, ours = _pair(3, 2, "transpose", channels=3)
    theirs, ours = theirs.double(), ours.double()
    x = torch.randn(1, 3, 16, 16, 2, dtype=torch.float64)
    x[0, 0, 1, 2, 0] = float("nan")
    x[0, 0, 9, 9, 0] = float("nan")  # two NaN in the 16x16 window: PyTorch takes the last one
    x[0, 1, 12, 3, 1] = float("nan")
    got, ref = run_model(ConcatInput(ours), x), run_model(_MonaiConcat(theirs), x)
    assert torch.equal(got[0].isnan(), ref[0].isnan())
    assert torch.equal(got[1].isnan(), ref[1].isnan())
    assert torch.equal(got[1] != 0, ref[1] != 0)  # the same elements receive gradient
    finite = ref[1].isfinite()
    assert_close_normwise(got[1][finite], ref[1][finite], 1e-12)


@needs_ext
@pytest.mark.parametrize("layout", ["channels_last", "permuted", "sliced"])
@pytest.mark.parametrize("mode", ["transpose", "trilinear"])
def test_layouts(layout, mode):
    theirs, ours = _pair(3, 2, mode, channels=6)
    base = torch.randn(2, 6, 32, 16, 5)
    if layout == "channels_last":
        x = base.contiguous(memory_format=torch.channels_last_3d)
    elif layout == "permuted":  # a layout the kernel reads through generic strides
        x = base.permute(0, 1, 4, 2, 3).contiguous().permute(0, 1, 3, 4, 2)
    else:  # every other depth slice of a larger tensor
        x = torch.randn(2, 6, 32, 16, 10)[..., ::2]
    y = ConcatInput(ours)(x)
    if layout == "channels_last":
        assert y.is_contiguous(memory_format=torch.channels_last_3d)
    _compare(run_model(ConcatInput(ours), x), run_model(_MonaiConcat(theirs), x), 1e-5)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", ["transpose", "trilinear", "nearest"])
def test_low_precision(dtype, mode):
    """Judged as flash-attention does: error against the float64 result at most 2x that of the
    reference run in the same low precision (PyTorch's own ops), plus a small atol."""
    theirs, ours = _pair(3, 2, mode, channels=8)
    x = torch.randn(2, 8, 32, 32, 4, dtype=torch.float64)
    truth = run_model(_MonaiConcat(theirs.double()), x)
    ref = run_model(_MonaiConcat(theirs.to(dtype)), x.to(dtype))
    got = run_model(ConcatInput(ours.to(dtype)), x.to(dtype))
    for i, what in ((0, "output"), (1, "input grad")):
        assert got[i].dtype == dtype
        assert rel_err(got[i], truth[i]) <= 2 * rel_err(ref[i], truth[i]) + 1e-3, what
    for name in truth[2]:
        assert rel_err(got[2][name], truth[2][name]) <= 2 * rel_err(ref[2][name], truth[2][name]) + 1e-3, name


@needs_ext
@pytest.mark.parametrize("spatial_dims,psp,mode", [(3, 2, "transpose"), (3, 2, "trilinear"), (3, 1, "nearest"),
                                                   (2, 2, "bilinear"), (2, 1, "transpose")])
@pytest.mark.parametrize("concat", [False, True])
def test_gradcheck(spatial_dims, psp, mode, concat):
    _, ours = _pair(spatial_dims, psp, mode, channels=2)
    ours = ours.double()
    shape = _shape(spatial_dims, psp, mode, batch=1, channels=2)
    if spatial_dims == 3:  # the numerical Jacobian costs two forwards per input element: one largest
        # window in-plane (odd leftovers for interpolation), so the smaller levels still pool several
        # cells, and two slices
        window, odd = 2 ** (psp + 2), int(mode != "transpose")
        shape = (1, 2, window + odd, window + 3 * odd, 2)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    groups = [[t.detach().clone().requires_grad_() for t in group] if group is not None else None
              for group in _params(ours)]
    flat = [t for group in groups if group is not None for t in group]
    n = [len(group) if group is not None else 0 for group in groups]

    def f(x, *ps):
        it = iter(ps)
        pw, pb, uw, ub = ([next(it) for _ in range(k)] if k else None for k in n)
        return pyramid_pool(x, pw, pb, uw, ub, upsample_mode=mode, concat_input=concat, backend="cpp")

    assert torch.autograd.gradcheck(f, [x] + flat, eps=1e-6, atol=1e-7)


@needs_ext
def test_opcheck():
    for spatial_dims, mode, concat in ((3, "transpose", True), (3, "trilinear", False), (2, "nearest", True)):
        _, ours = _pair(spatial_dims, 2, mode, channels=3)
        x = torch.randn(_shape(spatial_dims, 2, mode, channels=3))
        for xin in (x, x.clone().requires_grad_()):
            a = _Args(xin, *_params(ours), mode)
            torch.library.opcheck(torch.ops.ahnet_fast.pyramid_pool.default, a.op_args(concat))
        out, pooled, args, _ = torch.ops.ahnet_fast.pyramid_pool(*a.op_args(concat))
        gid = torch.randn(a.x5.shape) if concat else None
        torch.library.opcheck(torch.ops.ahnet_fast.pyramid_pool_backward.default,
                              (gid, [torch.randn(p.shape) for p in pooled], args, list(a.x5.shape), a.pool_w,
                               torch.float32, False))


@needs_ext
def test_backward_keeps_no_input_copy_and_no_int64():
    _, ours = _pair(3, 4, "transpose", channels=32)
    x = torch.randn(1, 32, 64, 64, 4, requires_grad=True)
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        ours(x, concat_input=True)
    assert not any(t.dtype == torch.int64 for t in kept)
    # nothing larger than the level-0 maxima (1/64 of x), or the stacked transposed-conv weights
    assert max(t.numel() for t in kept) <= max(x.numel() // 64, 4 * 64 * 64)
    assert {torch.int8, torch.int16} <= {t.dtype for t in kept}
    # the per-voxel state (maxima, positions, projections; 4-D and 5-D) is ~2% of x's bytes
    per_voxel = sum(t.numel() * t.element_size() for t in kept if t.dim() >= 4)
    assert per_voxel < 0.03 * x.numel() * x.element_size()


@needs_ext
def test_torch_compile_fullgraph():
    theirs, ours = _pair(3, 2, "trilinear", channels=4)
    x = torch.randn(1, 4, 32, 32, 3)
    compiled = torch.compile(ConcatInput(ours), fullgraph=True, backend="aot_eager")
    y, gx, grads, _ = run_model(compiled, x)
    grads = {name.removeprefix("_orig_mod."): g for name, g in grads.items()}
    _compare((y, gx, grads), run_model(_MonaiConcat(theirs), x), 1e-5)


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


def test_functional_argument_errors():
    _, ours = _pair(3, 2, "transpose", channels=3)
    pw, pb, uw, ub = _params(ours)
    x = torch.randn(1, 3, 32, 32, 2)
    with pytest.raises(ValueError, match="level 0 projection must be"):
        pyramid_pool(torch.randn(1, 4, 32, 32, 2), pw, pb, uw, ub)
    with pytest.raises(ValueError, match="needs 2 transposed-convolution"):
        pyramid_pool(x, pw, pb, None, None)
    with pytest.raises(ValueError, match="takes no transposed-convolution"):
        pyramid_pool(x, pw, pb, uw, ub, upsample_mode="nearest")
    with pytest.raises(ValueError, match="does not fit a 3D input"):
        pyramid_pool(x, pw, pb, upsample_mode="bilinear")
    with pytest.raises(ValueError, match="floating-point"):
        pyramid_pool(x.long(), pw, pb, uw, ub)


def test_zero_levels_give_no_channels():
    psp = ahnet_fast.PyramidVolumetricPooling(3, 0, 5)
    x = torch.randn(1, 5, 8, 8, 2)
    assert psp(x).shape == (1, 0, 8, 8, 2)
    assert torch.equal(psp(x, concat_input=True), x)


def dispatch_sample():
    """One call of the op for tests/test_dispatch.py's contract over every registered op: (run(backend) ->
    output, the arguments its table's reasons take)."""
    from ahnet_fast import ops

    torch.manual_seed(0)
    x = torch.randn(1, 4, 16, 16, 3, dtype=torch.float64)
    proj_w = [torch.randn(1, 4, 1, 1, 1, dtype=torch.float64) for _ in range(2)]
    proj_b = [torch.randn(1, dtype=torch.float64) for _ in range(2)]
    up_w = [torch.randn(1, 1, 8, 8, 1, dtype=torch.float64), torch.randn(1, 1, 16, 16, 1, dtype=torch.float64)]
    up_b = [torch.randn(1, dtype=torch.float64) for _ in range(2)]
    return (lambda be: ops.pyramid_pool(x, proj_w, proj_b, up_w, up_b, backend=be)), (x,)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("batch,layout", [(1, "contiguous"), (2, "contiguous"), (2, "channels_last_3d")])
def test_handed_over_gradient_is_written_in_place(dtype, batch, layout):
    """grad_handover (ops._handover): the backward adds the levels' gradient into the concatenated x's
    part of the output's gradient and returns that part (no tensor of x's size beside it); the
    gradients are bitwise those of the ordinary backward, for the input and every parameter."""
    from ahnet_fast.ops._handover import handed_over

    torch.manual_seed(3)
    x = torch.randn(batch, 6, 64, 64, 3, dtype=dtype)
    if layout == "channels_last_3d":
        x = x.contiguous(memory_format=torch.channels_last_3d)
    pw = [torch.randn(1, 6, 1, 1, 1, dtype=dtype) for _ in range(3)]
    pb = [torch.randn(1, dtype=dtype) for _ in range(3)]
    uw = [torch.randn(1, 1, 8 << i, 8 << i, 1, dtype=dtype) for i in range(3)]
    ub = [torch.randn(1, dtype=dtype) for _ in range(3)]
    grad = torch.randn(batch, 9, 64, 64, 3, dtype=dtype)
    results = []
    for handover in (False, True):
        leaves = [t.clone().requires_grad_() for t in [x, *pw, *pb, *uw, *ub]]
        out = pyramid_pool(leaves[0], leaves[1:4], leaves[4:7], leaves[7:10], leaves[10:13], concat_input=True,
                           backend="cpp", grad_handover=handover)
        g = grad.clone()
        results.append((torch.autograd.grad(out, leaves, g), g))
    (plain, _), (handed, g) = results
    for a, b in zip(plain, handed):
        assert torch.equal(a, b)
    assert handed[0].untyped_storage().data_ptr() == g.untyped_storage().data_ptr()  # x's gradient is in g
    assert not torch.equal(g[:, 3:], grad[:, 3:])  # written over
    with handed_over(False):  # the flag is read at the forward only: nothing leaks out of the call
        out = pyramid_pool(x.clone().requires_grad_(), pw, pb, uw, ub, concat_input=True, backend="cpp")
    g = grad.clone()
    out.backward(g)
    assert torch.equal(g, grad)


@needs_ext
def test_in_place_backward_op():
    """pyramid_pool_backward_: the out-of-place op's result written over the identity gradient;
    opcheck (its schema declares the mutation); overlapping gradients refused."""
    _, ours = _pair(3, 2, "transpose", channels=3)
    x = torch.randn(_shape(3, 2, "transpose", channels=3))
    a = _Args(x, *_params(ours), "transpose")
    _, pooled, args, _ = torch.ops.ahnet_fast.pyramid_pool(*a.op_args(True))
    gp = [torch.randn(p.shape) for p in pooled]
    gid = torch.randn(a.x5.shape)
    expected = torch.ops.ahnet_fast.pyramid_pool_backward(gid, gp, args, list(a.x5.shape), a.pool_w, torch.float32,
                                                          False)
    got = gid.clone()
    torch.ops.ahnet_fast.pyramid_pool_backward_(got, gp, args, a.pool_w)
    assert torch.equal(got, expected)
    torch.library.opcheck(torch.ops.ahnet_fast.pyramid_pool_backward_.default, (gid.clone(), gp, args, a.pool_w))
    overlapping = torch.randn(1, *a.x5.shape[1:]).expand(a.x5.shape)
    with pytest.raises(RuntimeError, match="must not overlap"):
        torch.ops.ahnet_fast.pyramid_pool_backward_(overlapping, gp, args, a.pool_w)
