"""FocalLoss / ahnet_fast.ops.focal_loss against MONAI 1.6's FocalLoss, and the fused kernel against
the reference."""
import itertools

import pytest
import torch
import torch.nn.functional as F

import ahnet_fast
from ahnet_fast.ops.focal_loss import IMPLEMENTATIONS, _prepare
from tests.conftest import assert_close_normwise, rel_err

monai_losses = pytest.importorskip("monai.losses")
needs_ext = pytest.mark.skipif(not ahnet_fast.extension_available(), reason="compiled extension not built")

SHAPE = (2, 4, 5, 6, 3)  # B, C, odd spatial sizes


def data(shape=SHAPE, seed=0, scale=2.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * scale).to(dtype)
    labels = torch.randint(0, shape[1], (shape[0], *shape[2:]), generator=g)
    onehot = F.one_hot(labels, shape[1]).movedim(-1, 1).float()
    return x, labels, onehot


def run(loss_fn, x, target):
    xi = x.detach().clone().requires_grad_()
    loss = loss_fn(xi, target)
    loss.sum().backward()
    return loss.detach(), xi.grad


ALPHAS = [None, 0.25, "seq"]
WEIGHTS = [None, 2.0, "seq"]


def _kwargs(i, softmax, gamma, reduction, include_background):
    n = SHAPE[1] - (0 if include_background else 1)
    alpha = ALPHAS[i % 3]
    weight = WEIGHTS[(i // 3) % 3]
    if alpha == "seq":
        alpha = [0.1, 0.3, 0.7, 0.9][:n]
    if weight == "seq":
        weight = [1.0, 0.5, 2.0, 3.0][:n]
    return dict(use_softmax=softmax, gamma=gamma, reduction=reduction, include_background=include_background,
                alpha=alpha, weight=weight)


MATRIX = [dict(i=i, softmax=s, gamma=g, reduction=r, include_background=b) for i, (s, g, r, b) in enumerate(
    itertools.product([False, True], [0.0, 0.5, 2.0, 4.0], ["mean", "sum", "none"], [True, False]))]


@pytest.mark.parametrize("case", MATRIX, ids=[f"{'softmax' if c['softmax'] else 'sigmoid'}-g{c['gamma']}-"
                                              f"{c['reduction']}-bg{int(c['include_background'])}-{c['i']}"
                                              for c in MATRIX])
def test_matches_monai(case):
    """Every backend, with a one-hot target and with an integer label map, equals MONAI (values and
    gradients) over gamma, alpha (scalar and per class), weights, include_background and reductions."""
    kwargs = _kwargs(case["i"], case["softmax"], case["gamma"], case["reduction"], case["include_background"])
    x, labels, onehot = data(seed=case["i"])
    with pytest.warns(UserWarning) if (case["softmax"] and not case["include_background"]
                                       and isinstance(kwargs["alpha"], float)) else _nothing():
        ref_loss, ref_grad = run(monai_losses.FocalLoss(**kwargs), x, onehot)
    for backend in ("reference", "cpp") if ahnet_fast.extension_available() else ("reference",):
        if backend == "cpp" and case["reduction"] == "none":
            continue  # the fused kernel covers mean and sum (test_backend_reasons)
        for target in (onehot, labels):
            with _quiet():
                ours = ahnet_fast.FocalLoss(**kwargs, backend=backend)
                loss, grad = run(ours, x, target)
            what = f"{backend} {'labels' if target is labels else 'one-hot'}"
            assert loss.dtype == ref_loss.dtype and loss.shape == ref_loss.shape, what
            assert_close_normwise(loss, ref_loss, 1e-5, 1e-7, what=f"{what} loss")
            assert_close_normwise(grad, ref_grad, 1e-5, 1e-8, what=f"{what} grad")


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def _quiet():
    import warnings

    cm = warnings.catch_warnings()
    cm.__enter__()
    warnings.simplefilter("ignore")

    class _Exit:
        def __enter__(self):
            return self

        def __exit__(self, *a):
            cm.__exit__(*a)
            return False

    return _Exit()


@pytest.mark.parametrize("softmax", [False, True])
@pytest.mark.parametrize("ignore_index", [255, 2, -1])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_ignore_index_matches_monai(softmax, ignore_index, reduction):
    x, labels, _ = data(seed=3)
    labels[0, :2] = ignore_index
    labels[1, 3:, 1] = ignore_index
    kwargs = dict(use_softmax=softmax, reduction=reduction, ignore_index=ignore_index, gamma=2.0, alpha=0.3)
    ref = run(monai_losses.FocalLoss(to_onehot_y=True, **kwargs), x, labels.unsqueeze(1).float())
    for backend in ("reference", "cpp") if ahnet_fast.extension_available() else ("reference",):
        got = run(ahnet_fast.FocalLoss(**kwargs, backend=backend), x, labels)
        assert_close_normwise(got[0], ref[0], 1e-5, what=f"{backend} loss")
        assert_close_normwise(got[1], ref[1], 1e-5, 1e-9, what=f"{backend} grad")
        assert (got[1][0, :, :2] == 0).all()  # ignored voxels get no gradient


def backends_for(reduction):
    """Every backend that runs the call: the fused kernels cover "mean" and "sum"."""
    fused = ahnet_fast.extension_available() and reduction != "none"
    return ("reference", "auto", "cpp") if fused else ("reference", "auto")


@pytest.mark.parametrize("softmax", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_classification_logits_b_c_match_monai(softmax, reduction):
    """(B, C) logits (no spatial axes), as MONAI takes them: a (B, 1) or (B,) label map with
    to_onehot_y, or a (B, C) float target; MONAI's "sum" over no spatial axes is the mean."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(7, 3, generator=g) * 2
    labels = torch.randint(0, 3, (7, 1), generator=g)
    soft = torch.rand(7, 3, generator=g)
    kwargs = dict(use_softmax=softmax, reduction=reduction, alpha=[0.2, 0.5, 1.5])
    cases = [("labels (B, 1)", dict(to_onehot_y=True), labels, labels),
             ("labels (B,)", dict(to_onehot_y=True), labels[:, 0], labels[:, 0]),
             ("float (B, C)", {}, soft, soft),
             ("labels, ignore_index", dict(to_onehot_y=True, ignore_index=2), labels, labels)]
    for what, extra, theirs_target, our_target in cases:
        ref = run(monai_losses.FocalLoss(**kwargs, **extra), x, theirs_target)
        for backend in backends_for(reduction):
            loss, grad = run(ahnet_fast.FocalLoss(**kwargs, **extra, backend=backend), x, our_target)
            assert loss.shape == ref[0].shape, (what, backend)
            assert_close_normwise(loss, ref[0], 1e-5, 1e-7, what=f"{what} {backend} loss")
            assert_close_normwise(grad, ref[1], 1e-5, 1e-8, what=f"{what} {backend} grad")
    with pytest.raises(ValueError, match=r"\(B, C\) or \(B, C, \*spatial\)"):
        ahnet_fast.ops.focal_loss(x[0], labels[0])


@pytest.mark.parametrize("softmax", [False, True])
@pytest.mark.parametrize("alpha", [[0.1, 0.5, 2.0, -0.5], 2.0, -1.0, 1.5])
def test_alpha_is_unrestricted_like_monai(softmax, alpha):
    """MONAI applies no range check to alpha, scalar or per class; neither does ahnet_fast (the fused
    kernels take the factors as they come)."""
    x, labels, onehot = data(seed=9)
    kwargs = dict(use_softmax=softmax, alpha=alpha, reduction="sum")
    ref = run(monai_losses.FocalLoss(**kwargs), x, onehot)
    for backend in backends_for("sum"):
        for target in (onehot, labels):
            loss, grad = run(ahnet_fast.FocalLoss(**kwargs, backend=backend), x, target)
            assert_close_normwise(loss, ref[0], 1e-5, 1e-7, what=f"{backend} loss")
            assert_close_normwise(grad, ref[1], 1e-5, 1e-8, what=f"{backend} grad")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_float_target_holding_ignore_index_matches_monai(reduction):
    """A float target with ignore_index values in it: MONAI masks those voxels (single channel, or a
    one-hot target whose ignored class is a channel), so they pass the [0, 1] check here too."""
    g = torch.Generator().manual_seed(11)
    x1 = torch.randn(2, 1, 5, 4, 3, generator=g)
    t1 = (torch.rand(2, 1, 5, 4, 3, generator=g) > 0.5).float()
    t1[0, 0, 0, :2] = 255
    t1[1, 0, 3] = 255
    x3, _, onehot = data(seed=12)
    for what, x, t, ignore in (("binary, 255", x1, t1, 255), ("one-hot, class 2 ignored", x3, onehot, 2)):
        kwargs = dict(ignore_index=ignore, reduction=reduction, gamma=1.5, alpha=0.3)
        ref = run(monai_losses.FocalLoss(**kwargs), x, t)
        loss, grad = run(ahnet_fast.FocalLoss(**kwargs), x, t)
        assert_close_normwise(loss, ref[0], 1e-5, 1e-7, what=f"{what} loss")
        assert_close_normwise(grad, ref[1], 1e-5, 1e-8, what=f"{what} grad")
    # MONAI's mask for a multi-channel target and an index outside the classes only drops all-zero
    # voxels, so a 255 there would enter the loss as a target value: refused, naming it
    bad = onehot.clone()
    bad[0, :, 0, 0, 0] = 255
    with pytest.raises(ValueError, match=r"\[0, 1\].*ignore_index.*255"):
        ahnet_fast.FocalLoss(ignore_index=255)(x3, bad)


def test_float_label_map_with_to_onehot_y_like_monai():
    x, labels, _ = data(seed=4)
    target = labels.unsqueeze(1).float()
    ref = run(monai_losses.FocalLoss(to_onehot_y=True, use_softmax=True), x, target)
    got = run(ahnet_fast.FocalLoss(to_onehot_y=True, use_softmax=True), x, target)
    assert_close_normwise(got[0], ref[0], 1e-5)
    assert_close_normwise(got[1], ref[1], 1e-5)


@pytest.mark.parametrize("softmax", [False, True])
def test_single_channel_binary_target(softmax):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 1, 7, 5, 3, generator=g)
    binary = torch.randint(0, 2, (2, 1, 7, 5, 3), generator=g)
    ref = run(monai_losses.FocalLoss(use_softmax=softmax), x, binary.float())
    for target in (binary, binary.float(), binary[:, 0]):
        got = run(ahnet_fast.FocalLoss(use_softmax=softmax), x, target)
        assert_close_normwise(got[0], ref[0], 1e-5, 1e-8)
        assert_close_normwise(got[1], ref[1], 1e-5, 1e-9)


@needs_ext
@pytest.mark.parametrize("classes", [2, 7, 32])
@pytest.mark.parametrize("layout", ["channels_last_3d", "non_contiguous", "sliced_channels"])
def test_layouts_and_class_counts(classes, layout):
    shape = (2, classes, 9, 4, 5)
    x, labels, onehot = data(shape, seed=classes)
    if layout == "channels_last_3d":
        xin = x.contiguous(memory_format=torch.channels_last_3d)
    elif layout == "non_contiguous":
        xin = torch.randn(shape[:-1] + (2 * shape[-1],))[..., ::2]
        xin.copy_(x)
    else:  # the logits are a channel slice of a bigger tensor
        big = torch.randn(shape[0], classes + 3, *shape[2:])
        xin = big[:, 2:2 + classes]
        xin.copy_(x)
    for softmax in (False, True):
        for target in (labels, onehot):
            ref = run(lambda a, t: ahnet_fast.ops.focal_loss(a, t, use_softmax=softmax, backend="reference"), x,
                      target)
            got = run(lambda a, t: ahnet_fast.ops.focal_loss(a, t, use_softmax=softmax, backend="cpp"), xin, target)
            assert_close_normwise(got[0], ref[0], 1e-5)
            assert_close_normwise(got[1], ref[1], 1e-5, 1e-9)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("softmax", [False, True])
def test_low_precision_logits(dtype, softmax):
    """fp32 math inside: error against the float64 truth at most 2x that of the reference path (which
    upcasts the same rounded logits to float32, as MONAI does), plus a small atol."""
    x, labels, _ = data((2, 5, 16, 8, 4), seed=9)
    x_low = x.to(dtype)
    truth = run(lambda a, t: ahnet_fast.ops.focal_loss(a, t, use_softmax=softmax, backend="reference"),
                x_low.double(), labels)
    ours = run(lambda a, t: ahnet_fast.ops.focal_loss(a, t, use_softmax=softmax, backend="cpp"), x_low, labels)
    theirs = run(lambda a, t: ahnet_fast.ops.focal_loss(a, t, use_softmax=softmax, backend="reference"), x_low,
                 labels)
    assert ours[1].dtype == dtype and ours[0].dtype == torch.float32
    for i in (0, 1):
        assert rel_err(ours[i], truth[i]) <= 2 * rel_err(theirs[i], truth[i]) + 1e-3


@needs_ext
@pytest.mark.parametrize("softmax", [False, True])
def test_extreme_logits_stay_finite(softmax):
    x, labels, onehot = data((2, 3, 4, 4, 2), seed=1)
    x = torch.where(torch.rand(x.shape) > 0.5, torch.full_like(x, 1e4), torch.full_like(x, -1e4))
    for target in (labels, onehot):
        loss, grad = run(lambda a, t: ahnet_fast.ops.focal_loss(a, t, use_softmax=softmax, backend="cpp"), x, target)
        assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
        # float32 carries ~1e-3 absolute at 1e4 (log-sum-exp of ties loses the small term), so the
        # fused kernel is held to the float64 truth no worse than 2x the float32 reference path.
        truth = run(lambda a, t: ahnet_fast.ops.focal_loss(a, t, use_softmax=softmax, backend="reference"),
                    x.double(), target)
        ref = run(lambda a, t: ahnet_fast.ops.focal_loss(a, t, use_softmax=softmax, backend="reference"), x, target)
        for i in (0, 1):
            assert rel_err(ours_i := (loss, grad)[i], truth[i]) <= 2 * rel_err(ref[i], truth[i]) + 1e-6, i
            assert torch.isfinite(ours_i).all()


# ---------------------------------------------------------------------------------------------
# Float64 gradcheck of every variant, on each CPU backend that runs it. The fused kernel's contract
# (ops/focal_loss.py): reductions "mean" and "sum", and ignore_index only with a label map; the
# reference runs everything. Combinations outside the kernel's contract are not generated for it:
# test_cpp_refuses_outside_its_contract checks that it refuses each of them, naming why, and the
# reference's gradcheck covers each of them.

GC_SHAPE = (2, 3, 3, 2, 2)
GC_TARGETS = ("labels", "onehot", "soft")
# no ignore_index; a class (a dense target's mask is then 1 - t[:, 1], MONAI's); outside the classes
# (a dense target's ignored voxels are its all-zero rows)
GC_IGNORES = (None, 1, 9)
# (alpha, weight, include_background), cycled through each (backend, softmax, target) group so that
# every group gets scalar and per-class alpha and both include_background values, and the softmax
# groups the scalar alpha that include_background=False drops (test_gradcheck_matrix_covers_every_variant)
GC_FACTORS = (("scalar", None, True), ("per_class", "per_class", False), ("scalar", "per_class", False),
              ("per_class", "scalar", True))


def _cpp_takes(reduction, target_kind, ignore):
    return reduction != "none" and (target_kind == "labels" or ignore is None)


def _gradcheck_cases():
    cases = []
    for backend in ("reference", "cpp"):
        for softmax in (False, True):
            for target_kind in GC_TARGETS:
                j = 2 * softmax  # the softmax groups start half a cycle later
                for reduction, ignore in itertools.product(("mean", "sum", "none"), GC_IGNORES):
                    if backend == "cpp" and not _cpp_takes(reduction, target_kind, ignore):
                        continue
                    alpha, weight, include_background = GC_FACTORS[j % len(GC_FACTORS)]
                    j += 1
                    cases.append(dict(backend=backend, softmax=softmax, target_kind=target_kind, reduction=reduction,
                                      ignore=ignore, alpha=alpha, weight=weight, include_background=include_background))
    return cases


GRADCHECK_CASES = _gradcheck_cases()
CPP_REFUSED = [dict(softmax=s, target_kind=t, reduction=r, ignore=i) for s, t, r, i in itertools.product(
    (False, True), GC_TARGETS, ("mean", "sum", "none"), GC_IGNORES) if not _cpp_takes(r, t, i)]


def _case_id(c):
    return (f"{c.get('backend', 'cpp')}-{'softmax' if c['softmax'] else 'sigmoid'}-{c['target_kind']}-{c['reduction']}"
            f"-ignore{c['ignore']}" + (f"-alpha_{c['alpha']}-weight_{c['weight']}-bg{int(c['include_background'])}"
                                      if "alpha" in c else ""))


def _gradcheck_inputs(target_kind, ignore):
    """float64 logits and the target: a label map with some voxels set to ``ignore``, or the dense
    target that ignores the same voxels under MONAI's rules."""
    x, labels, _ = data(GC_SHAPE, seed=11, dtype=torch.float64)
    c = GC_SHAPE[1]
    if ignore is not None:
        labels[0, 0] = ignore  # 4 voxels of sample 0 (ignore=1: every voxel of class 1 is ignored anyway)
    if target_kind == "labels":
        return x, labels
    valid = ((labels >= 0) & (labels < c)).unsqueeze(1)  # out-of-range labels: all-zero rows
    if target_kind == "onehot":
        dense = F.one_hot(labels.clamp(0, c - 1), c).movedim(-1, 1).double()
    else:
        g = torch.Generator().manual_seed(12)
        dense = torch.softmax(torch.randn(GC_SHAPE, dtype=torch.float64, generator=g), 1)
    return x, dense * valid


def _factors(case):
    n = GC_SHAPE[1] - (0 if case["include_background"] else 1)
    alpha = 0.3 if case["alpha"] == "scalar" else [0.2, 0.6, 0.9][:n]
    weight = {None: None, "scalar": 2.0, "per_class": [1.5, 0.5, 3.0][:n]}[case["weight"]]
    return alpha, weight


@pytest.fixture
def one_thread():
    """gradcheck makes ~150 calls on 72-element tensors: on a busy 2-core machine a second intra-op
    thread only adds waits at each parallel region (20-50x slower); the result is the same."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.filterwarnings("ignore:`include_background=False`, scalar `alpha` ignored when using softmax")
@pytest.mark.parametrize("case", [pytest.param(c, marks=needs_ext) if c["backend"] == "cpp" else c
                                  for c in GRADCHECK_CASES], ids=[_case_id(c) for c in GRADCHECK_CASES])
def test_gradcheck_float64(case, one_thread):
    """Analytical against numerical gradients in float64 (every element of the Jacobian) for every
    variant: sigmoid/softmax, label map/one-hot/soft target, reductions, ignore_index in and out of
    the class range, scalar/per-class alpha and weight, include_background."""
    x, target = _gradcheck_inputs(case["target_kind"], case["ignore"])
    alpha, weight = _factors(case)
    x.requires_grad_()

    def f(a):
        return ahnet_fast.ops.focal_loss(a, target, use_softmax=case["softmax"], reduction=case["reduction"],
                                         gamma=1.5, alpha=alpha, weight=weight,
                                         include_background=case["include_background"], ignore_index=case["ignore"],
                                         backend=case["backend"])

    out = f(x)
    first = 0 if case["include_background"] else 1
    assert out.dtype == torch.float64
    assert out.shape == ((GC_SHAPE[0], GC_SHAPE[1] - first, *GC_SHAPE[2:]) if case["reduction"] == "none" else ())
    assert torch.autograd.gradcheck(f, (x,))


def test_gradcheck_matrix_covers_every_variant():
    """What the cycling of GC_FACTORS must reach; and every combination the kernel refuses is
    gradchecked on the reference."""
    for backend in ("reference", "cpp"):
        mine = [c for c in GRADCHECK_CASES if c["backend"] == backend]
        for softmax, target_kind in itertools.product((False, True), GC_TARGETS):
            group = [c for c in mine if c["softmax"] == softmax and c["target_kind"] == target_kind]
            what = (backend, softmax, target_kind)
            assert {c["alpha"] for c in group} == {"scalar", "per_class"}, what
            assert {c["include_background"] for c in group} == {True, False}, what
            assert {c["reduction"] for c in group} == ({"mean", "sum", "none"} if backend == "reference"
                                                       else {"mean", "sum"}), what
            assert {c["ignore"] for c in group} == (set(GC_IGNORES) if backend == "reference" or target_kind == "labels"
                                                    else {None}), what
        assert {c["weight"] for c in mine} == {None, "scalar", "per_class"}, backend
        assert any(c["softmax"] and c["alpha"] == "scalar" and not c["include_background"] for c in mine), backend
    reference = {(c["softmax"], c["target_kind"], c["reduction"], c["ignore"]) for c in GRADCHECK_CASES
                 if c["backend"] == "reference"}
    cpp = {(c["softmax"], c["target_kind"], c["reduction"], c["ignore"]) for c in GRADCHECK_CASES
           if c["backend"] == "cpp"}
    refused = {(c["softmax"], c["target_kind"], c["reduction"], c["ignore"]) for c in CPP_REFUSED}
    assert len(reference) == 2 * 3 * 3 * 3 and refused <= reference and not refused & cpp
    assert cpp | refused == reference  # every combination: gradchecked on the kernel, or refused by it


@needs_ext
@pytest.mark.parametrize("case", CPP_REFUSED, ids=[_case_id(c) for c in CPP_REFUSED])
def test_cpp_refuses_outside_its_contract(case):
    """The combinations the gradcheck does not generate for the kernel: forcing it raises, naming why;
    under auto the same call runs the reference."""
    x, target = _gradcheck_inputs(case["target_kind"], case["ignore"])
    kwargs = dict(use_softmax=case["softmax"], reduction=case["reduction"], ignore_index=case["ignore"])
    reason = "reduction='none'" if case["reduction"] == "none" else "ignore_index with a dense"
    p = _prepare(x, target, gamma=2.0, alpha=None, weight=None, include_background=True, to_onehot_y=False,
                 **kwargs)
    assert IMPLEMENTATIONS[1].backend == "cpp"
    assert any(reason in r for r in IMPLEMENTATIONS[1].not_supported_reasons(p))
    with pytest.raises(ahnet_fast.BackendUnavailableError, match=reason):
        ahnet_fast.ops.focal_loss(x, target, **kwargs, backend="cpp")
    got = ahnet_fast.ops.focal_loss(x, target, **kwargs, backend="auto")  # auto runs it on the reference
    assert torch.equal(got, ahnet_fast.ops.focal_loss(x, target, **kwargs, backend="reference"))


@needs_ext
def test_opcheck():
    x, labels, onehot = data((2, 3, 4, 3, 2), seed=2)
    ones, scale = torch.ones(3, dtype=torch.float64), torch.full((2,), 0.5, dtype=torch.float64)
    op = torch.ops.ahnet_fast.focal_loss.default
    for target, is_label in ((labels, True), (onehot, False)):
        for softmax in (False, True):
            for xin in (x, x.clone().requires_grad_(), x.contiguous(memory_format=torch.channels_last_3d)):
                grad = xin.requires_grad
                torch.library.opcheck(op, (xin, target, ones, ones * 0.5, scale, 2.0, softmax, is_label, 0, 0, False,
                                           True, grad))


@needs_ext
def test_backward_twice_and_no_grad():
    x, labels, _ = data(seed=6)
    xi = x.clone().requires_grad_()
    loss = ahnet_fast.ops.focal_loss(xi, labels, backend="cpp")
    loss.backward(retain_graph=True)
    first = xi.grad.clone()
    (2 * loss).backward()  # the stored gradient was not consumed by the first backward
    assert_close_normwise(xi.grad, 3 * first, 1e-6)
    with torch.no_grad():
        assert torch.isfinite(ahnet_fast.ops.focal_loss(xi, labels, backend="cpp"))


@needs_ext
def test_backward_with_a_non_unit_upstream_gradient():
    x, labels, _ = data(seed=7)
    for reduction in ("mean", "sum"):
        a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
        (3.5 * ahnet_fast.ops.focal_loss(a, labels, reduction=reduction, backend="cpp")).backward()
        (3.5 * ahnet_fast.ops.focal_loss(b, labels, reduction=reduction, backend="reference")).backward()
        assert_close_normwise(a.grad, b.grad, 1e-5)


def test_backend_reasons():
    x, labels, onehot = data()
    p = _prepare(x, labels, gamma=2.0, alpha=None, weight=None, reduction="none", use_softmax=True,
                 include_background=True, to_onehot_y=False, ignore_index=None)
    assert any("reduction='none'" in r for r in IMPLEMENTATIONS[1].not_supported_reasons(p))
    with pytest.raises(ahnet_fast.BackendUnavailableError, match="reduction='none'"):
        ahnet_fast.ops.focal_loss(x, labels, reduction="none", backend="cpp")
    with pytest.raises(ahnet_fast.BackendUnavailableError, match="dense"):
        ahnet_fast.ops.focal_loss(x, onehot, ignore_index=1, backend="cpp")
    with pytest.raises(ahnet_fast.BackendUnavailableError, match="reduction='none'"):
        ahnet_fast.ops.focal_loss(x, labels, reduction="none", backend="triton")
    with ahnet_fast.backend("reference"):  # auto falls back where the kernel does not apply
        assert ahnet_fast.ops.focal_loss(x, labels, reduction="none").shape == x.shape


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_bad_input_raises_value_error(backend):
    if backend == "cpp" and not ahnet_fast.extension_available():
        pytest.skip("compiled extension not built")
    x, labels, onehot = data()
    fl = ahnet_fast.ops.focal_loss
    bad = labels.clone()
    bad[0, 0, 0, 0] = 4
    with pytest.raises(ValueError, match=r"labels must be 0..3.*max 4"):
        fl(x, bad, backend=backend)
    bad[0, 0, 0, 0] = -2
    with pytest.raises(ValueError, match=r"labels must be 0..3, or ignore_index=-1"):
        fl(x, bad, ignore_index=-1, backend=backend)
    soft = onehot.clone()
    soft[1, 2, 0, 0, 0] = 1.5
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        fl(x, soft, backend=backend)
    soft[1, 2, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        fl(x, soft, backend=backend)
    with pytest.raises(ValueError, match="different shape"):
        fl(x, onehot[:, :3], backend=backend)
    with pytest.raises(ValueError, match="to_onehot_y=True"):
        fl(x, labels.unsqueeze(1).float(), backend=backend)
    with pytest.raises(ValueError, match="integer class indices"):
        fl(x, labels.unsqueeze(1).float() + 0.5, to_onehot_y=True, backend=backend)
    with pytest.raises(ValueError, match="floating point"):
        fl(labels.unsqueeze(1), labels, backend=backend)


def test_bad_arguments_raise_value_error():
    x, labels, _ = data()
    fl = ahnet_fast.ops.focal_loss
    for kwargs, match in [(dict(reduction="avg"), "Unsupported reduction"), (dict(gamma=-1), "gamma"),
                          (dict(alpha=float("nan")), "alpha must be finite"), (dict(alpha=[0.1, 0.2]), "length of alpha"),
                          (dict(weight=[1.0, -1.0, 1.0, 1.0]), "non-negative"), (dict(weight=[1.0, 2.0]), "weight")]:
        with pytest.raises(ValueError, match=match):
            fl(x, labels, **kwargs)
    with pytest.raises(ValueError, match="Unsupported reduction"):
        ahnet_fast.FocalLoss(reduction="avg")


def test_module_state_dict_like_monai():
    theirs = monai_losses.FocalLoss(weight=[1.0, 2.0, 3.0])
    ours = ahnet_fast.FocalLoss(weight=[1.0, 2.0, 3.0])
    assert list(theirs.state_dict()) == list(ours.state_dict()) == ["class_weight"]
    ours.load_state_dict(theirs.state_dict())


@needs_ext
def test_narrower_isa_variants_match_reference():
    """The kernel is built three times (baseline, AVX2+FMA, AVX-512; the widest the CPU has runs); the
    suite runs that one, so check the narrower ones too, each in a process that disables the wider."""
    import os
    import subprocess
    import sys

    code = (
        "import torch, ahnet_fast\n"
        "from ahnet_fast.ops import focal_loss\n"
        "g = torch.Generator().manual_seed(0)\n"
        "x = torch.randn(2, 5, 9, 7, 3, generator=g); labels = torch.randint(0, 5, (2, 9, 7, 3), generator=g)\n"
        "for softmax in (False, True):\n"
        "    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()\n"
        "    la = focal_loss(a, labels, use_softmax=softmax, backend='cpp'); la.backward()\n"
        "    lb = focal_loss(b, labels, use_softmax=softmax, backend='reference'); lb.backward()\n"
        "    assert abs(la.item() - lb.item()) <= 1e-5 * abs(lb.item()), (la, lb)\n"
        "    assert (a.grad - b.grad).norm() <= 1e-5 * b.grad.norm()\n"
        "print('ok')\n")
    for switch in ("AHNET_FAST_NO_AVX2", "AHNET_FAST_NO_AVX512"):  # the baseline, then the AVX2 variant
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                             env=dict(os.environ, **{switch: "1"}))
        assert out.returncode == 0 and "ok" in out.stdout, (switch, out.stderr)


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_target_dtypes(backend):
    """Label maps of any integer dtype (and bool for one channel), dense targets of any float dtype."""
    if backend == "cpp" and not ahnet_fast.extension_available():
        pytest.skip("compiled extension not built")
    x, labels, onehot = data(seed=12)
    ref = run(lambda a, t: ahnet_fast.ops.focal_loss(a, t, use_softmax=True, backend="reference"), x, labels)
    for t in (labels.to(torch.int8), labels.to(torch.int16), labels.to(torch.int32), labels.to(torch.uint8),
              onehot.to(torch.float16), onehot.to(torch.bfloat16), onehot.double(), onehot.bool()):
        got = run(lambda a, tt: ahnet_fast.ops.focal_loss(a, tt, use_softmax=True, backend=backend), x, t)
        assert_close_normwise(got[0], ref[0], 1e-5, what=str(t.dtype))
        assert_close_normwise(got[1], ref[1], 1e-5, 1e-9, what=str(t.dtype))
    x1 = x[:, :1]
    binary = labels[:, None] % 2 == 1
    ref1 = run(lambda a, t: ahnet_fast.ops.focal_loss(a, t, backend="reference"), x1, binary.float())
    got1 = run(lambda a, t: ahnet_fast.ops.focal_loss(a, t, backend=backend), x1, binary)
    assert_close_normwise(got1[1], ref1[1], 1e-5, 1e-9)


def dispatch_sample():
    """One call of the op for tests/test_dispatch.py's contract over every registered op: (run(backend) ->
    output, the arguments its table's reasons take)."""
    from ahnet_fast import ops

    torch.manual_seed(0)
    logits = torch.randn(2, 3, 6, 5, 4, dtype=torch.float64)
    labels = torch.randint(0, 3, (2, 1, 6, 5, 4))
    return (lambda be: ops.focal_loss(logits, labels, use_softmax=True, backend=be)), None


@pytest.mark.parametrize("kw", [dict(to_onehot_y=True, use_softmax=True, gamma=2.0), dict(reduction="sum"),
                                dict(reduction="none"), dict(use_softmax=True, to_onehot_y=True, reduction="sum")])
def test_an_empty_batch_gives_monais_answer(kw):
    """MONAI: mean over nothing is NaN, a sum 0, "none" an empty tensor (not an IndexError)."""
    from monai.losses import FocalLoss as MonaiFocalLoss

    logits = torch.zeros(0, 3, 4, 4, 4)
    target = torch.zeros(0, 1 if kw.get("to_onehot_y") else 3, 4, 4, 4)
    ours = ahnet_fast.FocalLoss(**kw)(logits, target)
    theirs = MonaiFocalLoss(**kw)(logits, target)
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, equal_nan=True)
