"""The Triton anisotropic-convolution kernels (forward, input gradient, weight gradient, with the
BN-ReLU prologue on load), run in Triton's interpreter on CPU tensors (on a GPU machine, on CUDA),
through their launchers against torch's convolution in float64.

Coverage (branch -> tests); test_coverage_table checks it against the kernels' compile_specs():

    conv_fwd_kernel      PROLOGUE=True|False  -> test_matches_reference, test_tiles_and_grids, test_low_precision
    conv_fwd_kernel      PRECISION=ieee|tf32  -> test_matches_reference, test_tiles_and_grids
    conv_fwd_kernel      BLOCK_M=*            -> test_tiles_and_grids
    conv_fwd_kernel      BLOCK_N=*            -> test_tiles_and_grids
    conv_fwd_kernel      BLOCK_K=*            -> test_tiles_and_grids
    conv_dgrad_kernel    PRECISION=ieee|tf32  -> test_matches_reference, test_tiles_and_grids
    conv_dgrad_kernel    BLOCK_M=*            -> test_tiles_and_grids
    conv_dgrad_kernel    BLOCK_N=*            -> test_tiles_and_grids
    conv_dgrad_kernel    BLOCK_K=*            -> test_tiles_and_grids
    conv_wgrad_kernel    PROLOGUE=True|False  -> test_matches_reference, test_tiles_and_grids, test_low_precision
    conv_wgrad_kernel    PRECISION=ieee|tf32  -> test_matches_reference, test_tiles_and_grids
    conv_wgrad_kernel    BLOCK_CI=*           -> test_tiles_and_grids
    conv_wgrad_kernel    BLOCK_CO=*           -> test_tiles_and_grids
    conv_wgrad_kernel    BLOCK_M=*            -> test_tiles_and_grids
    wgrad_reduce_kernel  BLOCK=*              -> test_tiles_and_grids, test_weight_grad_deterministic_with_split_k

``*``: every tile of the module's tile tables (GEMM_TILES, WGRAD_TILES) for each dot path ("fma":
fp32 "ieee" and fp64; "tf32"; "mma": fp16 and bf16), read at test time. test_tiles_and_grids, for
each path, runs each distinct table entry (channel counts the launchers pick it for), and the
largest tiles with several programs along every grid axis: more positions than 2 BLOCK_M, more
output channels than 2 BLOCK_N, more input channels than 2 BLOCK_K (the K loop); the input gradient
at stride 2 (4 stride-parity classes on grid axis 2); the weight gradient over several channel
tiles, 3 taps and several split-K ranges, summed by wgrad_reduce_kernel over several programs.
test_matches_reference runs every kernel size, stride and padding AH-Net uses (and one more) with
channel counts that leave tails, prologue on and off, fp32 and fp64. test_low_precision runs fp16
and bf16 (bf16: tests/_triton_support.py).
"""
import itertools

import pytest
import torch
import torch.nn.functional as F

from tests._triton_support import (DEVICE, INTERPRETED, check_coverage, enable_interpreter_bf16,  # noqa: F401
                                   launches, low_precision_ok, runs_here)
from tests.conftest import assert_close_normwise, rel_err

pytest.importorskip("triton")
from ahnet_fast.kernels.triton import aniso_conv as ac  # noqa: E402

# (kernel size, stride, padding, Ci, Co): AH-Net's geometries plus one arbitrary one; channel
# counts that leave tails in the K loop and in the output-channel tiles
GEOMETRIES = [
    ((3, 3, 1), (1, 1, 1), (1, 1, 0), 40, 20),
    ((3, 3, 1), (2, 2, 1), (1, 1, 0), 5, 70),
    ((1, 1, 3), (1, 1, 1), (0, 0, 1), 20, 20),
    ((1, 1, 1), (1, 1, 1), (0, 0, 0), 33, 40),
    ((1, 1, 1), (2, 2, 1), (0, 0, 0), 7, 5),
    ((1, 1, 3), (2, 1, 2), (1, 0, 1), 6, 9),
]
GEOM_IDS = [f"k{''.join(map(str, k))}-s{''.join(map(str, s))}-ci{ci}-co{co}" for k, s, _, ci, co in GEOMETRIES]
SHAPE = (2, 5, 6, 3)  # N, H, W, D


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


def triton_all(x, wt, scale, shift, stride, padding, grad_y, precision="ieee", which="fdw"):
    """y, grad_a, grad_w from the three launchers (None for those not in ``which``)."""
    y = ac.conv_forward(x, wt, scale, shift, stride, padding, precision=precision) if "f" in which else None
    ga = ac.conv_input_grad(grad_y, wt, x.shape, stride, padding, precision=precision) if "d" in which else None
    gw = (ac.conv_weight_grad(x, grad_y, scale, shift, wt.shape, stride, padding, precision=precision)
          if "w" in which else None)
    return y, ga, gw


def grad_for(x, wt, stride, padding, seed=1):
    ks = wt.shape[2:]
    out = [(s + 2 * p - k) // st + 1 for s, k, st, p in zip(x.shape[2:], ks, stride, padding)]
    g = torch.Generator().manual_seed(seed)
    return torch.randn(x.shape[0], wt.shape[0], *out, generator=g, dtype=torch.float64).to(x.dtype).to(DEVICE)


def fp32_tolerance(precision):
    # the interpreter computes a "tf32" dot in full fp32; a GPU rounds the operands to 10 bits
    return 5e-3 if precision == "tf32" and not INTERPRETED else 1e-5


# prologue on/off alternates with the dtype, so that each geometry runs both, and each dtype both
MATCH = [(geom, on, dtype) for i, geom in enumerate(GEOMETRIES)
         for on, dtype in (((True, torch.float32), (False, torch.float64)) if i % 2 == 0 else
                           ((False, torch.float32), (True, torch.float64)))]


@runs_here
@pytest.mark.parametrize("geom,prologue,dtype", MATCH,
                         ids=[f"{GEOM_IDS[GEOMETRIES.index(g)]}-{'bnrelu' if on else 'plain'}-{str(dt)[6:]}"
                              for g, on, dt in MATCH])
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


# ---------------------------------------------------------------------------------------------
# Tiles and grids, from the module's tables.

PATHS = {"fma": (torch.float32, "ieee"), "tf32": (torch.float32, "tf32"), "mma-fp16": (torch.float16, "ieee"),
         "mma-bf16": (torch.bfloat16, "ieee")}
CHANNELS = range(1, 1025)


def _tile3(t):
    return tuple(t[:3])  # the table entries may carry a warp count after the three block sizes


def _smallest(pick, want, above=0):
    """The smallest channel count > ``above`` for which ``pick`` gives the tile ``want`` (None if none)."""
    return next((c for c in CHANNELS if c > above and _tile3(pick(c)) == want), None)


def tile_plan(path):
    """Channel counts for each distinct entry of the path's tables, and for several programs along
    every axis with the largest GEMM tile (the one for many channels)."""
    gemm = list(dict.fromkeys(_tile3(t) for t in ac.GEMM_TILES[path]))
    wgrad = list(dict.fromkeys(_tile3(t) for t in ac.WGRAD_TILES[path]))
    pick = lambda c: ac._gemm_tile(c, path)  # noqa: E731
    gemm_channels = {t: _smallest(pick, t) for t in gemm}
    pairs = sorted(itertools.product(range(1, 301), repeat=2), key=sum)
    wgrad_channels = {t: next((p for p in pairs if _tile3(ac._wgrad_tile(*p, path)) == t), None) for t in wgrad}
    big = _tile3(ac._gemm_tile(CHANNELS[-1], path))
    many = _smallest(pick, big, above=2 * big[1])  # > 2 BLOCK_N channels that still pick it
    return gemm_channels, wgrad_channels, big, many


def _check(got, ref, dtype, precision, what, low=None):
    if dtype in (torch.float16, torch.bfloat16):
        low_precision_ok(got, low, ref, 1e-3, what=what)
    else:
        assert_close_normwise(got, ref, fp32_tolerance(precision), what=what)


def _torch_low(x, wt, scale, shift, stride, padding, gy, dtype):
    """PyTorch's own convolution in ``dtype`` (operand a rounded as the kernel's dot sees it); fp32
    then rounded where this device has none in that dtype, or where it returns NaN."""
    a = operand(x, scale, shift).to(dtype)
    w, g = wt.to(dtype), gy.to(dtype)
    try:
        y = F.conv3d(a, w, stride=stride, padding=padding)
        ga, gw, _ = torch.ops.aten.convolution_backward(g, a, w, None, stride, padding, (1, 1, 1), False,
                                                        (0, 0, 0), 1, [True, True, False])
        if all(t.isfinite().all() for t in (y, ga, gw)):  # torch 2.13's CPU bf16 conv3d gives NaN at
            return y, ga, gw                                # some sizes (1x1x3, stride (2, 2, 1), 33 -> 257)
    except RuntimeError:
        pass
    return tuple(t.float().to(dtype) for t in reference(a.float(), w.float(), None, None, stride, padding, g.float()))


def _run_and_check(ci, co, ks, stride, padding, shape, dtype, precision, prologue, which, seed):
    x, wt, scale, shift, _, _ = make((ks, stride, padding, ci, co), dtype, prologue, seed=seed, shape=shape)
    gy = grad_for(x, wt, stride, padding, seed=seed)
    got = triton_all(x, wt, scale, shift, stride, padding, gy, precision=precision, which=which)
    ref = reference(x, wt, scale, shift, stride, padding, gy)
    low = (_torch_low(x, wt, scale, shift, stride, padding, gy, dtype) if dtype in (torch.float16, torch.bfloat16)
           else (None,) * 3)
    for what, a, b, lo in zip(("y", "grad_a", "grad_w"), got, ref, low):
        if a is not None:
            _check(a, b, dtype, precision, f"{what} ci={ci} co={co}", lo)
    return got


@runs_here
@pytest.mark.parametrize("path", list(PATHS))
def test_tiles_and_grids(path, launches, monkeypatch):
    dtype, precision = PATHS[path]
    if dtype == torch.bfloat16:
        enable_interpreter_bf16(monkeypatch)
    table = path.split("-")[0]
    gemm_channels, wgrad_channels, big, many = tile_plan(table)
    assert None not in gemm_channels.values() and None not in wgrad_channels.values(), "a tile no launch picks"
    assert many is not None, f"no channel count above 2 x BLOCK_N picks the {big} tile"
    # each distinct entry, one program or a few: 1x1x1 on a tiny input
    one = ((1, 1, 1), (1, 1, 1), (0, 0, 0))
    for i, c in enumerate(gemm_channels.values()):
        _run_and_check(c, c, *one, (1, 2, 2, 2), dtype, precision, prologue=i % 2 == 0, which="fd", seed=c)
    for i, (ci, co) in enumerate(wgrad_channels.values()):
        _run_and_check(ci, co, *one, (1, 2, 2, 2), dtype, precision, prologue=i % 2 == 1, which="w", seed=ci + co)
    fwd_tiles = {(c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_K"]) for k, _, c in launches.calls if k == "conv_fwd_kernel"}
    dgrad_tiles = {(c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_K"]) for k, _, c in launches.calls if k == "conv_dgrad_kernel"}
    wgrad_tiles = {(c["BLOCK_CI"], c["BLOCK_CO"], c["BLOCK_M"]) for k, _, c in launches.calls
                   if k == "conv_wgrad_kernel"}
    assert fwd_tiles == dgrad_tiles == set(gemm_channels) and wgrad_tiles == set(wgrad_channels)
    assert launches.values("conv_fwd_kernel", "PRECISION") == {precision}

    # several programs along every grid axis. Forward, with the tile for many channels: M > 2 BLOCK_M
    # positions, Co > 2 BLOCK_N, Ci > 2 BLOCK_K (three K steps, the last one partial)
    bm, bn, bk = big
    depth = -(-(2 * bm + 1) // 50)
    launches.calls.clear()
    _run_and_check(2 * bk + 1, many, *one, (2, 5, 5, depth), dtype, precision, True, "f", seed=1)
    fwd = launches.max_grid("conv_fwd_kernel")
    assert fwd[0] >= 3 and fwd[1] >= 3 and launches.values("conv_fwd_kernel", "BLOCK_K") == {bk}, fwd
    # input gradient at stride (2, 2, 1): Ci > 2 BLOCK_N, Co > 2 BLOCK_K, 4 parity classes (a 1x1x1
    # kernel reaches one; the other three are all skipped taps, zeros)
    _run_and_check(many, 2 * bk + 1, (1, 1, 1), (2, 2, 1), (0, 0, 0), (2, 9, 9, depth), dtype, precision, False, "d",
                   seed=2)
    dgrad = launches.max_grid("conv_dgrad_kernel")
    assert dgrad[0] >= 3 and dgrad[1] >= 3 and dgrad[2] == 4, dgrad
    # weight gradient: (channel tiles, 3 taps, split-K ranges) all > 1, summed by several programs
    ci, co = next((ci, co) for ci, co in itertools.product(range(1, 300), range(1, 300))
                  if _wgrad_programs(ci, co, table) >= 2 and ci * co * 3 > ac.REDUCE_BLOCK)
    k_step = _tile3(ac._wgrad_tile(ci, co, table))[2]
    _run_and_check(ci, co, (1, 1, 3), (1, 1, 1), (0, 0, 1), (2, 3, 3, -(-(8 * k_step + 1) // 18)), dtype, precision,
                   True, "w", seed=3)
    wgrad = launches.max_grid("conv_wgrad_kernel")
    assert wgrad[0] >= 2 and wgrad[1] == 3 and wgrad[2] >= 2, wgrad
    assert launches.max_grid("wgrad_reduce_kernel")[0] >= 2


def _wgrad_programs(ci, co, path):
    bci, bco, _ = _tile3(ac._wgrad_tile(ci, co, path))
    return -(-ci // bci) * -(-co // bco)


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


LOW = list(itertools.product((torch.float16, torch.bfloat16), (0, 1, 5)))


@runs_here
@pytest.mark.parametrize("dtype,g", LOW, ids=[f"{str(d)[6:]}-{GEOM_IDS[g]}" for d, g in LOW])
def test_low_precision(dtype, g, monkeypatch):
    """fp16 / bf16 operands, fp32 accumulation: each result's error against float64 at most twice
    that of PyTorch's own convolution in that dtype (the operand a rounded as the kernel's dot sees
    it), plus 1e-3; grad_w in fp32."""
    if dtype == torch.bfloat16:
        enable_interpreter_bf16(monkeypatch)
    ks, stride, padding, ci, co = GEOMETRIES[g]
    got = _run_and_check(ci, co, ks, stride, padding, SHAPE, dtype, "ieee", g != 5, "fdw", seed=4)
    assert got[0].dtype == got[1].dtype == dtype and got[2].dtype == torch.float32


@runs_here
def test_weight_grad_deterministic_with_split_k(launches):
    geom = GEOMETRIES[2]
    x, wt, scale, shift, stride, padding = make(geom, seed=7)
    gy = grad_for(x, wt, stride, padding)
    a = ac.conv_weight_grad(x, gy, scale, shift, wt.shape, stride, padding)
    b = ac.conv_weight_grad(x, gy, scale, shift, wt.shape, stride, padding)
    assert launches.max_grid("conv_wgrad_kernel")[2] > 1  # the split and its second reduction ran
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
    """Every tile (and warp count) the launchers pick on a GPU, for every channel count AH-Net uses,
    is in compile_specs."""
    specs = ac.compile_specs()

    def spec_set(kernel, names):
        return {(tuple(c[n] for n in names), s[next(iter(s))], warps) for _, fn, s, c, warps in specs if fn is kernel}

    fwd = spec_set(ac.conv_fwd_kernel, ("PROLOGUE", "PRECISION", "BLOCK_M", "BLOCK_N", "BLOCK_K"))
    dgrad = spec_set(ac.conv_dgrad_kernel, ("PRECISION", "BLOCK_M", "BLOCK_N", "BLOCK_K"))
    wgrad = spec_set(ac.conv_wgrad_kernel, ("PROLOGUE", "PRECISION", "BLOCK_CI", "BLOCK_CO", "BLOCK_M"))
    assert any(fn is ac.wgrad_reduce_kernel for _, fn, _, _, _ in specs)
    names = [(fn.__name__ if hasattr(fn, "__name__") else fn.fn.__name__, name) for name, fn, _, _, _ in specs]
    assert len(names) == len(set(names))

    def warps(tile):
        return tile[3] if len(tile) > 3 else ac.NUM_WARPS

    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}
    for _, dt, precision in ac._variants():  # the operand precisions the launchers use on a GPU
        dtype = dtypes[dt]
        prec = ac._precision(dtype, precision)
        path = ac._path(dtype, prec)
        for c in (1, 20, 32, 33, 64, 65, 80, 2048):
            tile = ac._gemm_tile(c, path)
            assert ((prec,) + _tile3(tile), f"*{dt}", warps(tile)) in dgrad
            for on in (True, False):
                assert ((on, prec) + _tile3(tile), f"*{dt}", warps(tile)) in fwd
                for ci in (1, 20, 32, 33, 80, 2048):
                    wt = ac._wgrad_tile(ci, c, path)
                    assert ((on, prec) + _tile3(wt), f"*{dt}", warps(wt)) in wgrad


def test_coverage_table():
    """Every constexpr value compile_specs() builds is in the table above, with a test that runs it."""
    check_coverage(__doc__, ac, globals())
