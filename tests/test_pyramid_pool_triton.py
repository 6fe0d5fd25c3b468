"""The Triton kernels of pyramid volumetric pooling (ahnet_fast/kernels/triton/pyramid_pool.py), run
in Triton's interpreter on CPU tensors (on a GPU machine, on CUDA), through the module
``PyramidVolumetricPooling`` with backend="triton" against backend="reference" in float64: output,
input gradient and parameter gradients.

Coverage (branch -> tests); test_coverage_table checks it against the kernels' compile_specs():

    pyramid_pool_pool0_kernel     S=8                  -> test_deep_levels, test_several_programs
    pyramid_pool_pool0_kernel     SW=8|1               -> test_deep_levels, test_several_programs, test_low_precision
    pyramid_pool_pool0_kernel     COPY=True|False      -> test_deep_levels, test_several_programs, test_low_precision
    pyramid_pool_pool0_kernel     BLOCK=*              -> test_several_programs
    pyramid_pool_coarsen_kernel   SP=8|16|32           -> test_deep_levels, test_several_programs, test_low_precision
    pyramid_pool_coarsen_kernel   SWP=8|16|32|1        -> test_deep_levels, test_several_programs, test_low_precision
    pyramid_pool_coarsen_kernel   CW=2|1               -> test_deep_levels, test_several_programs, test_low_precision
    pyramid_pool_coarsen_kernel   BLOCK=*              -> test_several_programs
    pyramid_pool_project_kernel   PAD=1|0              -> test_deep_levels, test_several_programs, test_low_precision
    pyramid_pool_project_kernel   BLOCK=*              -> test_several_programs
    pyramid_pool_upsample_kernel  LINEAR=True|False    -> test_deep_levels, test_several_programs, test_low_precision
    pyramid_pool_upsample_kernel  TRANSPOSE=True|False -> test_deep_levels, test_several_programs, test_low_precision
    pyramid_pool_upsample_kernel  BLOCK=*              -> test_several_programs
    pyramid_pool_route_kernel     LEVELS=1|2|3|4       -> test_deep_levels, test_several_programs, test_ties
    pyramid_pool_route_kernel     POOL_W=True|False    -> test_deep_levels, test_several_programs, test_low_precision
    pyramid_pool_route_kernel     HAS_ID=True|False    -> test_deep_levels, test_several_programs, test_low_precision
    pyramid_pool_route_kernel     BLOCK=*              -> test_deep_levels, test_several_programs

(3D pools windows of s x s columns: SW = 8, SWP = SP, CW = 2, PAD = 1, POOL_W; 2D pools s x 1: SW = 1,
SWP = 1, CW = 1, PAD = 0. LINEAR: the (bi/tri)linear modes, TRANSPOSE: "transpose", neither:
"nearest". COPY / HAS_ID: concat_input.)

test_deep_levels runs psp_block_num 3 and 4 (route LEVELS 3 and 4, coarsening to 32 and 64) in 3D
and 2D at the smallest sizes the modes take, with several programs along both grid axes of the
route and upsampling kernels. test_several_programs runs sizes at which every kernel has several
programs along both grid axes, a masked tail in the last (in 3D the coarsening kernel only along
the plane axis: its first level holds 1/256 of the input). test_ties runs psp 1 and 2 on inputs of
three values (ties everywhere). test_low_precision runs float16 and bfloat16 (bfloat16:
tests/_triton_support.py) over every constexpr value of every kernel, LEVELS 1 and 4 of the route.
"""
import copy
import importlib

import pytest
import torch

import ahnet_fast
from ahnet_fast.ops.pyramid_pool import _Args, pyramid_pool
from tests._triton_support import (DEVICE, allow_bf16, check_coverage, launches,  # noqa: F401 (fixture)
                                   low_precision_ok, runs_here)
from tests.conftest import ConcatInput, assert_close_normwise

pytest.importorskip("triton")
from ahnet_fast.kernels.triton import pyramid_pool as kernels  # noqa: E402

psp_module = importlib.import_module("ahnet_fast.ops.pyramid_pool")  # the package re-exports the function


def _module(spatial_dims, psp, mode, channels, seed=0):
    torch.manual_seed(seed)
    return ahnet_fast.PyramidVolumetricPooling(spatial_dims, psp, channels, mode)


def _run(module, x, backend, dtype, concat, grad_dtype=None):
    """Output, input gradient and parameter gradients of the module (a copy in ``dtype``), for a fixed
    upstream gradient rounded to ``grad_dtype`` (default ``dtype``) first."""
    m = copy.deepcopy(module).to(DEVICE, dtype)
    m.backend = backend
    net = ConcatInput(m) if concat else m
    xi = x.to(DEVICE, dtype).detach().clone().requires_grad_()
    y = net(xi)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y.backward(g.to(grad_dtype or dtype).to(DEVICE, dtype))
    return y.detach(), xi.grad, {n: p.grad for n, p in net.named_parameters()}


def _compare(got, ref, rtol, atol=0.0):
    assert_close_normwise(got[0], ref[0], rtol, atol, what="output")
    assert_close_normwise(got[1], ref[1], rtol, atol, what="input grad")
    assert got[2].keys() == ref[2].keys()
    for name in ref[2]:
        assert_close_normwise(got[2][name], ref[2][name], rtol, atol, what=name)


def _check_float32(spatial_dims, psp, mode, concat, shape, seed=0, x=None):
    """Triton in float32 against the reference in float64, 1e-5."""
    module = _module(spatial_dims, psp, mode, shape[1], seed)
    if x is None:
        x = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    _compare(_run(module, x, "triton", torch.float32, concat),
             _run(module, x, "reference", torch.float64, concat, grad_dtype=torch.float32), 1e-5)


# (spatial dims, psp_block_num, mode, concat_input, input shape): the smallest in-plane sizes each
# mode takes (transpose: multiples of the largest window, 2 ** (psp + 2); interpolation: at least it)
DEEP = [(3, 4, "transpose", True, (2, 1, 64, 64, 1)), (3, 3, "trilinear", False, (2, 2, 37, 35, 2)),
        (3, 3, "nearest", True, (2, 1, 32, 40, 1)), (2, 4, "bilinear", False, (2, 2, 67, 9)),
        (2, 3, "transpose", True, (2, 2, 32, 13)), (2, 4, "nearest", True, (2, 2, 64, 5))]


@runs_here
@pytest.mark.parametrize("spatial_dims,psp,mode,concat,shape", DEEP,
                         ids=[f"{sd}d-psp{p}-{m}-{'concat' if c else 'psp'}" for sd, p, m, c, _ in DEEP])
def test_deep_levels(spatial_dims, psp, mode, concat, shape, launches):
    _check_float32(spatial_dims, psp, mode, concat, shape, seed=psp)
    pool_w = spatial_dims == 3
    assert launches.values("pyramid_pool_route_kernel", "LEVELS") == {psp}
    assert launches.values("pyramid_pool_coarsen_kernel", "SP") == {8 << level for level in range(psp - 1)}
    route = launches.max_grid("pyramid_pool_route_kernel", POOL_W=pool_w, HAS_ID=concat)
    upsample = launches.max_grid("pyramid_pool_upsample_kernel", LINEAR=mode in ("bilinear", "trilinear"),
                                 TRANSPOSE=mode == "transpose")
    assert min(route[:2]) >= 2 and min(upsample[:2]) >= 2, (route, upsample)


# pooling at level 0 over more than a block of cells per plane, 2 samples x channels planes; in 2D
# every coarser level too (cells = rows / window x columns: the columns are not pooled)
SEVERAL = [(2, 2, "transpose", True, (2, 2, 16, kernels.BLOCK + 4)),
           (3, 1, "trilinear", True, (2, 1, 19, 16, kernels.BLOCK // 4 + 1)),
           (2, 2, "nearest", False, (2, 1, 23, kernels.BLOCK + 1))]


@runs_here
@pytest.mark.parametrize("spatial_dims,psp,mode,concat,shape", SEVERAL,
                         ids=[f"{sd}d-psp{p}-{m}-{'concat' if c else 'psp'}" for sd, p, m, c, _ in SEVERAL])
def test_several_programs(spatial_dims, psp, mode, concat, shape, launches):
    _check_float32(spatial_dims, psp, mode, concat, shape, seed=3)
    names = ["pyramid_pool_pool0_kernel", "pyramid_pool_project_kernel", "pyramid_pool_upsample_kernel", "pyramid_pool_route_kernel"]
    names += ["pyramid_pool_coarsen_kernel"] if spatial_dims == 2 and psp > 1 else []
    for name in names:
        for grid in launches.grids(name):
            assert min(grid[:2]) >= 2, (name, grid)


@runs_here
@pytest.mark.parametrize("spatial_dims,psp,mode", [(3, 1, "transpose"), (3, 2, "transpose"), (3, 2, "trilinear"),
                                                   (3, 1, "nearest"), (2, 2, "bilinear"), (2, 1, "transpose")])
def test_ties(spatial_dims, psp, mode):
    """Inputs of three values: most windows hold several maxima; the first in row-major order of the
    window wins (PyTorch's rule) and takes the gradient."""
    window = 2 ** (psp + 2)
    pad = 0 if mode == "transpose" else 3
    shape = (1, 3, window * 2 + pad, 3) if spatial_dims == 2 else (1, 3, window + pad, window, 2)
    x = torch.randint(-1, 2, shape, generator=torch.Generator().manual_seed(psp)).double()
    _check_float32(spatial_dims, psp, mode, True, shape, seed=psp, x=x)


# every constexpr value of every kernel, in each low precision
LOW = [(3, 4, "transpose", True, (1, 1, 64, 64, 1)), (2, 4, "bilinear", False, (2, 2, 67, 9)),
       (3, 1, "nearest", False, (1, 4, 16, 8, 3)), (2, 1, "transpose", True, (2, 3, 8, 5))]


@runs_here
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("spatial_dims,psp,mode,concat,shape", LOW,
                         ids=[f"{sd}d-psp{p}-{m}-{'concat' if c else 'psp'}" for sd, p, m, c, _ in LOW])
def test_low_precision(spatial_dims, psp, mode, concat, shape, dtype, monkeypatch):
    """Each result's error against float64 (from the same rounded input and upstream gradient: the
    parameter gradients are sums that cancel, whose float64 value moves by more than a bfloat16
    rounding when the upstream gradient is rounded) at most twice that of the reference in the same
    dtype (PyTorch's own ops), plus 1e-3."""
    if dtype == torch.bfloat16:
        allow_bf16(monkeypatch, psp_module)
    module = _module(spatial_dims, psp, mode, shape[1], seed=5)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64).to(dtype).double()
    if spatial_dims == 3 and psp == 1:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    truth = _run(module, x, "reference", torch.float64, concat, grad_dtype=dtype)
    ref = _run(module, x, "reference", dtype, concat)
    got = _run(module, x, "triton", dtype, concat)
    assert got[0].dtype == got[1].dtype == dtype
    low_precision_ok(got[0], ref[0], truth[0], 1e-3, what="output")
    low_precision_ok(got[1], ref[1], truth[1], 1e-3, what="input grad")
    for name in truth[2]:
        low_precision_ok(got[2][name], ref[2][name], truth[2][name], 1e-3, what=name)


@runs_here
def test_channels_last_output():
    module = _module(3, 1, "transpose", 4)
    x = torch.randn(1, 4, 16, 8, 3, dtype=torch.float64).contiguous(memory_format=torch.channels_last_3d)
    got = _run(module, x, "triton", torch.float32, True)
    assert got[0].is_contiguous(memory_format=torch.channels_last_3d)
    _compare(got, _run(module, x, "reference", torch.float64, True), 1e-5)


@runs_here
def test_triton_opcheck():
    forward, backward = psp_module._triton_ops()
    ours = _module(3, 1, "trilinear", 2)
    x = torch.randn(1, 2, 11, 9, 2, device=DEVICE, requires_grad=True)
    params = ([m.weight for m in ours.project_modules], [m.bias for m in ours.project_modules], None, None)
    a = _Args(x, *(None if p is None else [t.to(DEVICE) for t in p] for p in params), "trilinear")
    torch.library.opcheck(forward, a.op_args(True), test_utils=("test_schema", "test_faketensor",
                                                                "test_autograd_registration"))


@runs_here
def test_forced_triton_without_the_interpreter_says_why(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("CUDA machine: Triton runs")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    ours = _module(3, 1, "transpose", 2)
    params = ([m.weight for m in ours.project_modules], [m.bias for m in ours.project_modules],
              [m.weight for m in ours.up_modules], [m.bias for m in ours.up_modules])
    with pytest.raises(ahnet_fast.BackendUnavailableError, match="TRITON_INTERPRET=1"):
        pyramid_pool(torch.randn(1, 2, 8, 8, 1), *params, backend="triton")


def test_coverage_table():
    """Every constexpr value compile_specs() builds is in the table above, with a test that runs it."""
    check_coverage(__doc__, kernels, globals())
