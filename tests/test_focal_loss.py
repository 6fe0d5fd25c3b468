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


@needs_ext
@pytest.mark.parametrize("softmax", [False, True])
@pytest.mark.parametrize("target_kind", ["labels", "onehot", "soft"])
@pytest.mark.parametrize("reduction,ignore", [("mean", None), ("sum", None), ("mean", 1), ("sum", 9)])
def test_gradcheck_float64(softmax, target_kind, reduction, ignore):
    if ignore is not None and target_kind != "labels":
        return  # the fused kernel takes ignore_index with label maps (covered by test_backend_reasons)
    x, labels, onehot = data((2, 3, 3, 2, 2), seed=11, dtype=torch.float64)
    if ignore is not None:
        labels[0, 0] = ignore
    target = {"labels": labels, "onehot": onehot.double(),
              "soft": torch.softmax(torch.randn(onehot.shape, dtype=torch.float64), 1)}[target_kind]
    x.requires_grad_()

    def f(a):
        return ahnet_fast.ops.focal_loss(a, target, use_softmax=softmax, reduction=reduction, gamma=1.5,
                                         alpha=0.3, ignore_index=ignore, backend="cpp")

    assert torch.autograd.gradcheck(f, (x,))


@needs_ext
def test_opcheck():
    x, labels, onehot = data((2, 3, 4, 3, 2), seed=2)
    ones, scale = torch.ones(3, dtype=torch.float64), torch.full((2,), 0.5, dtype=torch.float64)
    op = torch.ops.ahnet_fast.focal_loss_forward.default
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
                          (dict(alpha=1.5), "alpha"), (dict(alpha=[0.1, 0.2]), "length of alpha"),
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
