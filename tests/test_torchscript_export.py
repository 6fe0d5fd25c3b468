"""AHNet, PyramidVolumetricPooling and FocalLoss under torch.jit.script (saved and reloaded),
torch.jit.trace and torch.export, as a MONAI user would run them.

Scripted modules run MONAI's arithmetic on ATen ops (a TorchScript archive that loads without
ahnet_fast); traced and exported graphs keep the fused ops (``torch.ops.ahnet_fast.*``)."""
import io
import itertools
import warnings
from collections import Counter

import pytest
import torch

import ahnet_fast
from ahnet_fast import AHNet, FocalLoss, PyramidVolumetricPooling
from tests.conftest import assert_close_normwise

monai_losses = pytest.importorskip("monai.losses")
# torch 2.13 marks torch.jit.script/trace deprecated; MONAI users still script and trace, so these stay tested
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _reload(scripted):
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)
    buffer.seek(0)
    return torch.jit.load(buffer)


def _input(spatial_dims, psp_block_num, upsample_mode, seed=0):
    in_plane = 128 if psp_block_num == 4 else 64
    shape = (2, 1, in_plane, in_plane, 32) if spatial_dims == 3 else (2, 1, in_plane, 32)
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _aten_only(graph) -> bool:
    return not any("ahnet_fast" in node.kind() for node in graph.nodes())


# Every upsample mode in both dimensionalities, and every psp_block_num in each (not the full product:
# the pyramid's scripted code differs by mode only, and a full AHNet forward is the cost here).
SCRIPT_CASES = [(3, "transpose", 4), (3, "transpose", 1), (3, "trilinear", 3), (3, "nearest", 0), (3, "nearest", 2),
                (2, "transpose", 2), (2, "bilinear", 4), (2, "bilinear", 1), (2, "nearest", 3), (2, "transpose", 0)]


def test_script_cases_cover_every_mode_and_level():
    for dims in (2, 3):
        cases = [c for c in SCRIPT_CASES if c[0] == dims]
        assert {c[2] for c in cases} == {0, 1, 2, 3, 4}
        assert {c[1] for c in cases} == {"transpose", "nearest", "trilinear" if dims == 3 else "bilinear"}


@pytest.mark.parametrize("spatial_dims,upsample_mode,psp_block_num", SCRIPT_CASES)
def test_scripted_ahnet_equals_eager_and_survives_save_and_load(spatial_dims, upsample_mode, psp_block_num):
    torch.manual_seed(0)
    model = AHNet(layers=(1, 1, 1, 1), spatial_dims=spatial_dims, psp_block_num=psp_block_num,
                  upsample_mode=upsample_mode).double().eval()
    x = _input(spatial_dims, psp_block_num, upsample_mode)
    scripted = torch.jit.script(model)
    assert _aten_only(scripted.inlined_graph)  # loads where ahnet_fast is not installed
    reloaded = _reload(scripted)
    with torch.no_grad():
        eager = model(x)
        assert_close_normwise(scripted(x), eager, 1e-11, what="scripted")
        assert_close_normwise(reloaded(x), eager, 1e-11, what="reloaded")


def test_scripted_ahnet_trains_like_eager():
    """Training mode: the output, the input and weight gradients and the BatchNorm running statistics
    of the scripted model equal the eager model's."""
    torch.manual_seed(1)
    eager = AHNet(layers=(1, 1, 1, 1), spatial_dims=2, psp_block_num=2, upsample_mode="transpose").double()
    scripted = torch.jit.script(AHNet(layers=(1, 1, 1, 1), spatial_dims=2, psp_block_num=2,
                                      upsample_mode="transpose").double())
    scripted.load_state_dict(eager.state_dict())
    x = _input(2, 2, "transpose", seed=2)
    outputs, grads = [], []
    for model in (eager, scripted):
        xi = x.clone().requires_grad_()
        out = model(xi)
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        outputs.append(out.detach())
        grads.append([xi.grad] + [p.grad for p in model.parameters()])
    assert_close_normwise(outputs[1], outputs[0], 1e-11, what="output")
    assert_close_normwise(grads[1][0], grads[0][0], 1e-9, what="input gradient")
    # every parameter gradient, with an absolute floor: a bias in front of a training-mode BatchNorm
    # has gradient 0 in exact arithmetic, and only rounding noise is left to compare
    scale = torch.cat([g.flatten() for g in grads[0][1:]]).norm().item()
    for i, (a, b) in enumerate(zip(grads[0][1:], grads[1][1:])):
        assert_close_normwise(b, a, 1e-9, 1e-12 * scale, what=f"parameter gradient {i}")
    for (name, a), (_, b) in zip(eager.state_dict().items(), scripted.state_dict().items()):
        assert torch.equal(a, b) if not a.is_floating_point() else torch.allclose(a, b, rtol=1e-10), name


@pytest.mark.parametrize("spatial_dims,upsample_mode", [(3, "transpose"), (3, "trilinear"), (3, "nearest"),
                                                        (2, "transpose"), (2, "bilinear"), (2, "nearest")])
@pytest.mark.parametrize("psp_block_num", [1, 3])
@pytest.mark.parametrize("concat_input", [False, True])
def test_scripted_pyramid_pooling_equals_eager(spatial_dims, upsample_mode, psp_block_num, concat_input):
    torch.manual_seed(3)
    psp = PyramidVolumetricPooling(spatial_dims, psp_block_num, 5, upsample_mode).double()
    shape = (2, 5, 64, 32, 3) if spatial_dims == 3 else (2, 5, 64, 32)
    x = torch.randn(shape, dtype=torch.float64)
    scripted = _reload(torch.jit.script(psp))
    assert_close_normwise(scripted(x, concat_input), psp(x, concat_input=concat_input), 1e-12,
                          what="scripted pyramid")


FOCAL_CASES = list(itertools.product(["mean", "sum", "none"], [False, True], [True, False], [None, 0.3, 2.0, "seq"],
                                     [None, "seq"], [None, 1, 255]))[::5]


@pytest.mark.parametrize("case", FOCAL_CASES, ids=[str(i) for i in range(len(FOCAL_CASES))])
def test_scripted_focal_loss_equals_monai(case):
    reduction, softmax, background, alpha, weight, ignore_index = case
    n = 3 if background else 2
    kwargs = dict(reduction=reduction, use_softmax=softmax, include_background=background,
                  alpha=[0.2, 0.5, 1.5][:n] if alpha == "seq" else alpha,
                  weight=[1.0, 0.5, 2.0][:n] if weight == "seq" else weight, ignore_index=ignore_index)
    g = torch.Generator().manual_seed(len(FOCAL_CASES))
    x = torch.randn(2, 3, 5, 4, 3, generator=g)
    labels = torch.randint(0, 3, (2, 1, 5, 4, 3), generator=g)
    onehot = torch.nn.functional.one_hot(labels[:, 0], 3).movedim(-1, 1).float()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for target, to_onehot in ((labels, True), (onehot, False)):
            scripted = _reload(torch.jit.script(FocalLoss(to_onehot_y=to_onehot, **kwargs)))
            xi, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
            ours = scripted(xi, target)
            theirs = monai_losses.FocalLoss(to_onehot_y=to_onehot, **kwargs)(xr, target)
            assert_close_normwise(ours, theirs, 1e-6, 1e-8, what="loss")
            ours.sum().backward()
            theirs.sum().backward()
            assert_close_normwise(xi.grad, xr.grad, 1e-6, 1e-9, what="gradient")


def test_scripted_focal_loss_takes_classification_logits():
    scripted = torch.jit.script(FocalLoss(to_onehot_y=True, reduction="sum", use_softmax=True))
    x, labels = torch.randn(6, 3), torch.randint(0, 3, (6, 1))
    theirs = monai_losses.FocalLoss(to_onehot_y=True, reduction="sum", use_softmax=True)(x, labels)
    assert_close_normwise(scripted(x, labels), theirs, 1e-6, what="(B, C) logits")


def _small_ahnet(train: bool):
    torch.manual_seed(4)
    model = AHNet(layers=(1, 1, 1, 1), spatial_dims=3, psp_block_num=2, upsample_mode="transpose")
    return model.train(train), _input(3, 2, "transpose", seed=5).float()[:1]


def _fused_ops(targets) -> Counter:
    return Counter(t.split(".")[1] if t.startswith("ahnet_fast.") else t.split("::")[1].split(".")[0]
                   for t in map(str, targets) if "ahnet_fast" in t)


@pytest.mark.skipif(not ahnet_fast.extension_available(), reason="compiled extension not built")
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_export_keeps_the_fused_ops_and_matches_eager(train):
    model, x = _small_ahnet(train)
    exported = torch.export.export(model, (x,))
    fused = _fused_ops(n.target for n in exported.graph.nodes if n.op == "call_function")
    for op in ("bn_relu_conv", "dense_block", "pyramid_pool", "slice_max_pool", "bn_add_relu"):
        assert fused[op] > 0, (op, fused)
    reference, _ = _small_ahnet(train)
    with torch.no_grad():
        assert_close_normwise(exported.module()(x), reference(x), 1e-6, what="exported")


@pytest.mark.skipif(not ahnet_fast.extension_available(), reason="compiled extension not built")
def test_trace_keeps_the_fused_ops_and_matches_eager():
    model, x = _small_ahnet(False)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(model, (x,), check_trace=False)
        expected = model(x)
    fused = _fused_ops(node.kind() for node in traced.inlined_graph.nodes())
    assert fused["bn_relu_conv"] > 0 and fused["dense_block"] > 0 and fused["pyramid_pool"] > 0, fused
    with torch.no_grad():
        assert_close_normwise(traced(x), expected, 1e-6, what="traced")
