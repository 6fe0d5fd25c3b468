"""The Triton focal-loss kernel, run in Triton's interpreter on CPU tensors (on a GPU machine, on CUDA),
against the float64 reference; and the ahead-of-time compile check of every Triton kernel.

Coverage (branch -> tests); test_coverage_table checks it against the kernel's compile_specs():

    focal_loss_fwd_kernel  SOFTMAX=False|True    -> test_every_branch_several_programs, test_low_precision
    focal_loss_fwd_kernel  LABELS=False|True     -> test_every_branch_several_programs, test_low_precision
    focal_loss_fwd_kernel  GAMMA_TWO=False|True  -> test_every_branch_several_programs, test_low_precision
    focal_loss_fwd_kernel  BLOCK=*               -> test_every_branch_several_programs

Runtime flags of the same kernel (one build serves both values; the launcher passes them as ints),
and the first class in the loss (include_background=False drops class 0):

    focal_loss_fwd_kernel  BINARY=0|1            -> test_every_branch_several_programs
    focal_loss_fwd_kernel  HAS_IGNORE=0|1        -> test_every_branch_several_programs, test_ignore_index_channels_last
    focal_loss_fwd_kernel  ALPHA_LINEAR=0|1      -> test_every_branch_several_programs
    focal_loss_fwd_kernel  COMPUTE_GRAD=0|1      -> test_every_branch_several_programs
    focal_loss_fwd_kernel  FIRST=0|1             -> test_every_branch_several_programs

test_every_branch_several_programs runs, on each path (sigmoid, softmax), every pair of values of
the target kind (dense soft targets; labels; labels with ignore_index; binary labels, with and
without ignore_index), the alpha form (scalar: linear; per class: not) and gamma (2: GAMMA_TWO;
0.5, 0), include_background=False once per non-binary target kind, each with and without the
gradient, on 2 samples of more voxels than a block (2 programs along both grid axes, a masked tail),
against the float64 reference. test_low_precision runs each constexpr variant (SOFTMAX x LABELS x
GAMMA_TWO) on float16 and on bfloat16 logits (bfloat16: tests/_triton_support.py);
test_float64_logits two on float64 logits.
"""
import importlib
import warnings

import pytest
import torch
import torch.nn.functional as F

from ahnet_fast.ops import focal_loss
from ahnet_fast.ops.focal_loss import _prepare, _triton_reasons
from tests._triton_support import (DEVICE, allow_bf16, check_coverage, launches,  # noqa: F401 (fixture)
                                   low_precision_ok, runs_here)
from tests.conftest import assert_close_normwise

pytest.importorskip("triton")
from ahnet_fast.kernels.triton import focal_loss as kernels  # noqa: E402

KERNEL = "focal_loss_fwd_kernel"
focal_module = importlib.import_module("ahnet_fast.ops.focal_loss")  # the package re-exports the function


def data(shape, seed, dtype=torch.float32, layout="contiguous"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 2
    labels = torch.randint(0, max(shape[1], 2), (shape[0], *shape[2:]), generator=g)
    onehot = F.one_hot(labels, max(shape[1], 2)).movedim(-1, 1).float()[:, :shape[1]]
    if layout == "channels_last_3d":
        x = x.contiguous(memory_format=torch.channels_last_3d)
    return x.to(dtype).to(DEVICE), labels.to(DEVICE), onehot.to(DEVICE)


def run(x, target, backend, **kw):
    xi = x.detach().clone().requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI's warning: scalar alpha ignored without the background
        loss = focal_loss(xi, target, backend=backend, **kw)
    loss.backward()
    return loss.detach(), xi.grad


def several_programs_shape(channels):
    """(B, C, *spatial): 2 samples of more voxels than a block (and not a multiple of it): 2 programs
    along both grid axes, the second block partly masked."""
    return (2, channels, 2, 5, kernels.BLOCK // 10 + 3)


TARGETS = {False: ("dense", "labels", "labels-ignore", "binary", "binary-ignore"),
           True: ("dense", "labels", "labels-ignore")}  # softmax over one channel with labels: refused


def _branches():
    """(softmax, target kind, alpha linear, gamma 2, first class): all pairs of values of target kind,
    alpha form and gamma form on each path (the flags are independent; all pairs, not the product),
    with include_background=False on one case of each non-binary target kind."""
    out = []
    for softmax in (False, True):
        for i, target in enumerate(TARGETS[softmax]):
            pairs = ((True, True), (False, False)) if i % 2 == 0 else ((True, False), (False, True))
            for k, (alpha_linear, gamma_two) in enumerate(pairs):
                out.append((softmax, target, alpha_linear, gamma_two, 0 if target.startswith("binary") else k))
    return out


BRANCHES = _branches()


def branch_problem(softmax, target_kind, alpha_linear, gamma_two, first, seed):
    """Logits, target and focal_loss keyword arguments that select this branch."""
    binary = target_kind.startswith("binary")
    c = 1 if binary else 4
    x, labels, onehot = data(several_programs_shape(c), seed)
    g = torch.Generator().manual_seed(seed + 1)
    kw = dict(use_softmax=softmax, include_background=first == 0, reduction="sum" if gamma_two else "mean",
              gamma=2.0 if gamma_two else (0.5 if alpha_linear else 0.0), weight=1.5,
              alpha=0.25 if alpha_linear else [0.9, 0.2, 0.6, 0.4][first:c])
    if target_kind == "dense":  # soft targets: exact 0 and 1 for half the voxels, fractions elsewhere
        soft = torch.rand(onehot.shape, generator=g).to(DEVICE)
        pick = (torch.rand(onehot.shape[:1] + onehot.shape[2:], generator=g) < 0.5).unsqueeze(1).to(DEVICE)
        return x, torch.where(pick, onehot, soft), kw
    target = (labels % 2 if binary else labels).to(torch.int32 if gamma_two else torch.int64)
    if target_kind.endswith("ignore"):
        kw["ignore_index"] = 255 if binary else -100
        drop = (torch.rand(target.shape, generator=g) < 0.15).to(DEVICE)
        target = torch.where(drop, torch.full_like(target, kw["ignore_index"]), target)
    return x, target, kw


@runs_here
@pytest.mark.parametrize("branch", BRANCHES, ids=[f"{'softmax' if s else 'sigmoid'}-{t}-{'alin' if a else 'aclass'}-"
                                                  f"{'g2' if g else 'g'}-first{f}" for s, t, a, g, f in BRANCHES])
def test_every_branch_several_programs(branch, launches):
    softmax, target_kind, alpha_linear, gamma_two, _ = branch
    x, target, kw = branch_problem(*branch, seed=BRANCHES.index(branch))
    truth = run(x.double(), target, "reference", **kw)  # float64 reference
    got = run(x, target, "triton", **kw)
    assert_close_normwise(got[0], truth[0], 1e-5, what="loss")
    assert_close_normwise(got[1], truth[1], 1e-5, 1e-10, what="grad")
    with torch.no_grad():  # COMPUTE_GRAD off: the loss alone
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loss = focal_loss(x, target, backend="triton", **kw)
    assert_close_normwise(loss, truth[0], 1e-5, what="loss without the gradient")
    if "ignore" in target_kind:
        assert got[1][(target == kw["ignore_index"]).unsqueeze(1).expand_as(x)].abs().max() == 0
    if not kw["include_background"]:
        assert got[1][:, 0].abs().max() == 0  # the excluded class gets no gradient
    grid = launches.max_grid(KERNEL, SOFTMAX=softmax, LABELS=target_kind != "dense", GAMMA_TWO=gamma_two)
    assert grid[0] >= 2 and grid[1] >= 2, grid


LOW = [(dtype, softmax, labels, gamma_two) for dtype in (torch.float16, torch.bfloat16) for softmax in (False, True)
       for labels in (False, True) for gamma_two in (False, True)]


@runs_here
@pytest.mark.parametrize("dtype,softmax,labels,gamma_two", LOW,
                         ids=[f"{str(d)[6:]}-{'softmax' if s else 'sigmoid'}-{'labels' if la else 'dense'}-"
                              f"{'g2' if g else 'g'}" for d, s, la, g in LOW])
def test_low_precision(dtype, softmax, labels, gamma_two, launches, monkeypatch):
    """float16 / bfloat16 logits (dense targets in float32 or in the logits' dtype): the loss is
    computed in float32 from the rounded logits, so it matches the float64 loss of those; the
    gradient, stored in the low precision, within 2x PyTorch's own error (flash-attention's rule)."""
    if dtype == torch.bfloat16:
        allow_bf16(monkeypatch, focal_module, required=False)  # right without ml_dtypes too
    x, target, kw = branch_problem(softmax, "labels" if labels else "dense", True, gamma_two, 0, seed=11)
    x = x.to(dtype)
    if not labels and gamma_two:
        target = target.to(dtype)  # a dense target in the logits' dtype is read as it is
    truth = run(x.double(), target, "reference", **kw)
    ref_low = run(x, target, "reference", **kw)
    got = run(x, target, "triton", **kw)
    assert got[1].dtype == dtype
    assert_close_normwise(got[0], truth[0], 1e-5, what="loss")
    low_precision_ok(got[1], ref_low[1], truth[1], 1e-3, what="grad")
    assert launches.values(KERNEL, "SOFTMAX") == {softmax}


@runs_here
@pytest.mark.skipif(DEVICE == "cuda", reason="float64 runs on ATen on a GPU (triton_reasons)")
@pytest.mark.parametrize("softmax,labels", [(False, False), (True, True)])
def test_float64_logits(softmax, labels):
    """float64 logits (read as they are, float32 math, a float64 gradient stored)."""
    x, target, kw = branch_problem(softmax, "labels" if labels else "dense", not labels, labels, 0, seed=13)
    x = x.double()
    truth = run(x, target, "reference", **kw)
    got = run(x, target, "triton", **kw)
    assert got[1].dtype == torch.float64
    assert_close_normwise(got[0], truth[0], 1e-5, what="loss")
    assert_close_normwise(got[1], truth[1], 1e-5, 1e-10, what="grad")


@runs_here
@pytest.mark.parametrize("softmax", [False, True])
@pytest.mark.parametrize("ignore_index", [255, 1])
def test_ignore_index_channels_last(softmax, ignore_index):
    x, labels, _ = data((2, 3, 6, 4, 3), seed=3, layout="channels_last_3d")
    labels[0, :2] = ignore_index
    kw = dict(use_softmax=softmax, ignore_index=ignore_index, reduction="sum")
    ref = run(x.double(), labels, "reference", **kw)
    got = run(x, labels, "triton", **kw)
    assert got[1].stride() == x.stride()
    assert_close_normwise(got[0], ref[0], 1e-5)
    assert_close_normwise(got[1], ref[1], 1e-5, 1e-9)


@runs_here
def test_bad_targets_raise():
    x, labels, onehot = data((1, 3, 4, 4, 2), seed=5)
    labels[0, 0, 0, 0] = 7
    with pytest.raises(ValueError, match="labels must be 0..2"):
        focal_loss(x, labels, backend="triton")
    onehot[0, 1, 0, 0, 1] = 1.5
    with pytest.raises(ValueError, match=r"target values must be in \[0, 1\]"):
        focal_loss(x, onehot, backend="triton")
    binary = (labels % 2)[:, None].expand(-1, 1, -1, -1, -1).contiguous()
    binary[0, 0, 1, 1, 0] = 2
    with pytest.raises(ValueError, match="0 or 1"):
        focal_loss(x[:, :1], binary, backend="triton")


@runs_here
def test_triton_opcheck():
    x, labels, _ = data((2, 3, 4, 3, 2), seed=6)
    ones = torch.ones(3, dtype=torch.float64)
    scale = torch.full((2,), 0.25, dtype=torch.float64)
    from ahnet_fast.ops.focal_loss import _triton_op

    torch.library.opcheck(_triton_op(), (x.clone().requires_grad_(), labels, ones, ones, scale, 2.0, True, True, 0, 0,
                                         False, True, True))


def test_triton_reasons_without_the_interpreter(monkeypatch):
    x, labels, _ = data((1, 3, 4, 4, 2), seed=7)
    x = x.cpu()
    p = _prepare(x, labels.cpu(), gamma=2.0, alpha=None, weight=None, reduction="mean", use_softmax=True,
                 include_background=True, to_onehot_y=False, ignore_index=None)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert any("TRITON_INTERPRET=1" in r for r in _triton_reasons(p))


def test_coverage_table():
    """Every constexpr value compile_specs() builds is in the table above, with a test that runs it."""
    check_coverage(__doc__, kernels, globals())
