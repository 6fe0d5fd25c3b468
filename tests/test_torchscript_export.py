"""AHNet, PyramidVolumetricPooling and FocalLoss under torch.jit.script (saved and reloaded),
torch.jit.trace and torch.export, as a MONAI user would run them.

Scripted AHNet modules call the fused ops in eval mode (``torch.ops.ahnet_fast.*_script``: the same
numbers as eager mode) and run MONAI's arithmetic in training mode; with ``set_script_ops(m, "aten")``
MONAI's arithmetic on ATen ops throughout (an archive that loads without ahnet_fast). Traced and
exported graphs keep the fused ops (``torch.ops.ahnet_fast.*``)."""
import io
import itertools
import warnings
from collections import Counter

import os
import tempfile

import pytest
import torch

import ahnet_fast
from ahnet_fast import AHNet, FocalLoss, PyramidVolumetricPooling
from ahnet_fast.nn import set_script_ops
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


def _node_kinds(block):
    """Every node's kind in a TorchScript graph, inside if/loop blocks too."""
    for node in block.nodes():
        yield node.kind()
        for inner in node.blocks():
            yield from _node_kinds(inner)


def _fused_script_ops(graph) -> set:
    return {k.split("::")[1] for k in _node_kinds(graph) if k.startswith("ahnet_fast::")}


def _aten_only(graph) -> bool:
    return not _fused_script_ops(graph)


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
def test_scripted_ahnet_runs_the_fused_ops_and_equals_eager(spatial_dims, upsample_mode, psp_block_num):
    """The default: in eval mode the scripted (and saved, reloaded) model calls the fused ops through
    the same dispatch as eager mode, so its output is the eager output, bit for bit, in float32."""
    torch.manual_seed(0)
    model = AHNet(layers=(1, 1, 1, 1), spatial_dims=spatial_dims, out_channels=2, psp_block_num=psp_block_num,
                  upsample_mode=upsample_mode).eval()
    x = _input(spatial_dims, psp_block_num, upsample_mode).float()[:1]
    scripted = torch.jit.script(model)
    expected = {"stem_conv_pool_script", "bn_relu_script", "pointwise_conv_script", "bn_relu_conv_script",
                "slice_max_pool_script", "bn_add_relu_script", "dense_block_script", "pyramid_pool_script"}
    expected |= {"transposed_conv_script"} if upsample_mode == "transpose" else set()
    assert _fused_script_ops(scripted.inlined_graph) == expected
    reloaded = _reload(scripted)
    with torch.no_grad():
        eager = model(x)
        assert torch.equal(scripted(x), eager)
        assert torch.equal(reloaded(x), eager)


@pytest.mark.parametrize("spatial_dims,upsample_mode,psp_block_num", SCRIPT_CASES[::2])
def test_aten_scripted_ahnet_equals_eager_and_survives_save_and_load(spatial_dims, upsample_mode, psp_block_num):
    torch.manual_seed(0)
    model = AHNet(layers=(1, 1, 1, 1), spatial_dims=spatial_dims, psp_block_num=psp_block_num,
                  upsample_mode=upsample_mode).double().eval()
    x = _input(spatial_dims, psp_block_num, upsample_mode)
    scripted = torch.jit.script(set_script_ops(model, "aten"))
    assert _aten_only(scripted.inlined_graph)  # loads where ahnet_fast is not installed
    reloaded = _reload(scripted)
    with torch.no_grad():
        eager = model(x)
        assert_close_normwise(scripted(x), eager, 1e-11, what="scripted")
        assert_close_normwise(reloaded(x), eager, 1e-11, what="reloaded")


def test_monai_convert_to_torchscript_verifies():
    """MONAI's own check (its AHNet test_script): convert_to_torchscript with verify=True, which
    compares eager and reloaded scripted outputs elementwise at rtol 1e-4, atol 0."""
    monai_networks = pytest.importorskip("monai.networks")
    torch.manual_seed(5)
    cases = [(AHNet(spatial_dims=2, out_channels=2), torch.randn(1, 1, 128, 64)),
             (AHNet(spatial_dims=3, out_channels=2, psp_block_num=0, upsample_mode="nearest"),
              torch.randn(1, 1, 32, 32, 64))]
    with tempfile.TemporaryDirectory() as folder:
        for net, x in cases:
            monai_networks.convert_to_torchscript(net, os.path.join(folder, "model.ts"), verify=True, inputs=[x],
                                                  device="cpu", rtol=1e-4, atol=0.0)


def test_scripted_eval_model_gives_the_eager_gradients():
    """The *_script ops are composite: autograd records the fused ops they run, so a scripted model in
    eval mode differentiates (input and weight gradients) exactly as the eager one."""
    torch.manual_seed(6)
    model = AHNet(layers=(1, 1, 1, 1), spatial_dims=2, psp_block_num=2, upsample_mode="transpose").eval()
    scripted = torch.jit.script(model)
    x = _input(2, 2, "transpose", seed=7).float()[:1]
    grads = []
    for net in (model, scripted):
        net.zero_grad()
        xi = x.clone().requires_grad_()
        out = net(xi)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads.append([xi.grad] + [p.grad for p in net.parameters()])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_set_script_ops_rejects_unknown_modes():
    with pytest.raises(ValueError, match="set_script_ops: ops must be one of"):
        set_script_ops(AHNet(layers=(1, 1, 1, 1)), "cpp")


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
    expected = psp(x, concat_input=concat_input)
    fused = _reload(torch.jit.script(psp))  # the fused op, in training and eval mode alike
    assert torch.equal(fused(x, concat_input), expected)
    aten = _reload(torch.jit.script(set_script_ops(psp, "aten")))
    assert_close_normwise(aten(x, concat_input), expected, 1e-12, what="scripted pyramid (ATen)")


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


_RUNNING_STATS: list = []  # the samples' BatchNorm buffers


def _script_op_samples():
    """One call of every ``ahnet_fast::*_script`` op, with the weights of a small AHNet (eval mode)."""
    torch.manual_seed(8)
    m = AHNet(layers=(1, 1, 1, 1), spatial_dims=3, psp_block_num=1, upsample_mode="transpose").eval()
    for module in m.modules():  # non-trivial running statistics
        if isinstance(module, torch.nn.BatchNorm3d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 1.5)

    def rand(*shape):
        return torch.randn(*shape)

    _RUNNING_STATS[:] = [t for b in m.modules() if isinstance(b, torch.nn.BatchNorm3d)
                         for t in (b.running_mean, b.running_var)]

    def bn(b):
        return b.running_mean, b.running_var, b.weight, b.bias, b.eps

    block, layer = m.layer1[0], m.dense0.denselayer1
    weights, means, variances = [], [], []
    for i in range(1, 5):
        b, c = getattr(layer, f"bn{i}"), getattr(layer, f"conv{i}")
        weights += [b.weight, b.bias, c.weight]
        means.append(b.running_mean)
        variances.append(b.running_var)
    width = layer.bn1.num_features
    ops = torch.ops.ahnet_fast
    return {
        "stem_conv_pool_script": (ops.stem_conv_pool_script, (rand(1, 1, 16, 16, 6), m.conv1.weight, None, [2, 2, 1],
                                                              [3, 3, 1], 2, None)),
        "bn_relu_script": (ops.bn_relu_script, (rand(1, 64, 4, 4, 3), *bn(m.bn0), None)),
        "pointwise_conv_script": (ops.pointwise_conv_script, (rand(1, 64, 4, 4, 3), block.conv1.weight, None,
                                                              [1, 1, 1], None)),
        "bn_relu_conv_script": (ops.bn_relu_conv_script, (rand(1, 64, 4, 4, 3), *bn(block.bn1), block.conv2.weight,
                                                          [1, 1, 1], [1, 1, 0], None)),
        "slice_max_pool_script": (ops.slice_max_pool_script, (rand(1, 3, 4, 4, 6), 2, None)),
        "bn_add_relu_script": (ops.bn_add_relu_script, (rand(1, 256, 2, 2, 3), rand(1, 256, 2, 2, 3), *bn(block.bn3),
                                                        None)),
        "transposed_conv_script": (ops.transposed_conv_script, (rand(1, 1024, 2, 2, 2), m.up0.up.weight, None,
                                                                [2, 2, 2], None)),
        "dense_block_script": (ops.dense_block_script, (rand(1, width, 4, 4, 3), weights, means, variances,
                                                        layer.bn1.eps, rand(1, width, 4, 4, 3), None)),
        "pyramid_pool_script": (ops.pyramid_pool_script, (rand(1, 5, 16, 16, 3), [rand(1, 5, 1, 1, 1)], [rand(1)],
                                                          [rand(1, 1, 8, 8, 1)], [rand(1)], "transpose", True, None)),
    }


def test_every_script_op_has_a_sample():
    registered = {name for name in torch._C._dispatch_get_all_op_names()
                  if name.startswith("ahnet_fast::") and name.endswith("_script")}
    assert {f"ahnet_fast::{n}" for n in _script_op_samples()} == registered


@pytest.mark.parametrize("name", sorted(_script_op_samples()))
def test_script_op_opcheck(name):
    """torch.library.opcheck on each entry (schema, fake tensors, autograd), without and with gradients;
    that an entry computes what eager mode does is the scripted-AHNet tests' check."""
    op, args = _script_op_samples()[name]
    torch.library.opcheck(op, args)
    buffers = {id(b) for b in _RUNNING_STATS}

    def leaf(a):  # every tensor but the running statistics (buffers) requires grad
        if isinstance(a, list):
            return [leaf(t) for t in a]
        if isinstance(a, torch.Tensor) and id(a) not in buffers:
            return a.detach().clone().requires_grad_()
        return a

    torch.library.opcheck(op, [leaf(a) for a in args])
