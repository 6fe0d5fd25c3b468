"""The one-buffer dense block against MONAI's layers and the reference composition."""
import copy
import os

import pytest
import torch
from torch import nn

import ahnet_fast
from ahnet_fast.nn._bn import dense_block as module_dense_block
from ahnet_fast.nn.ahnet import DenseBlock
from ahnet_fast.ops import dense_block
from ahnet_fast.nn import _checkpoint
from benchmarks._common import saved_bytes
from tests.conftest import assert_close_normwise, rel_err

needs_ext = pytest.mark.skipif(not ahnet_fast.extension_available(), reason="compiled extension not built")


def make_block(spatial_dims, channels, layers=3, growth=5, bn_size=4, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    block = DenseBlock(spatial_dims, layers, channels, bn_size, growth, 0.0).to(dtype)
    for m in block.modules():  # non-trivial affine parameters and running statistics
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.weight.data.uniform_(0.5, 1.5), m.bias.data.uniform_(-0.3, 0.3)
            m.running_mean.uniform_(-0.2, 0.2), m.running_var.uniform_(0.5, 1.5)
    return block


def run(block, x, grad, backend):
    block = copy.deepcopy(block)
    block.backend = backend
    xi = x.detach().clone().requires_grad_()
    y = block(xi)
    params = list(block.parameters())
    grads = torch.autograd.grad(y, [xi, *params], grad)
    return y.detach(), grads, {k: v.clone() for k, v in block.state_dict().items()}


def layers_one_by_one(block, x):
    for layer in block:
        x = layer(x)
    return x


@needs_ext
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("spatial_dims,shape", [(3, (2, 7, 6, 5, 4)), (3, (1, 9, 5, 7, 3)), (2, (2, 6, 7, 5))],
                         ids=["3d", "3d-odd", "2d"])
def test_matches_layer_by_layer_float64(spatial_dims, shape, training):
    block = make_block(spatial_dims, shape[1]).train(training)
    x = torch.randn(shape, dtype=torch.float64)
    grad = torch.randn((shape[0], shape[1] + 15, *shape[2:]), dtype=torch.float64)
    ref = run(block, x, grad, "reference")
    got = run(block, x, grad, "cpp")
    assert_close_normwise(got[0], ref[0], 1e-13, what="output")
    for (name, _), a, b in zip([("x", None), *block.named_parameters()], got[1], ref[1]):
        assert_close_normwise(a, b, 1e-11, atol=1e-14, what=name)
    for k in ref[2]:
        assert_close_normwise(got[2][k].double(), ref[2][k].double(), 1e-13, what=k)


@needs_ext
@pytest.mark.parametrize("kind", ["contiguous", "channels_last_3d", "strided"])
def test_float32_layouts(kind):
    """fp32 within 1e-5 of the float64 oracle for every input layout; channels-last stays channels-last."""
    block = make_block(3, 8)
    x64 = torch.randn(2, 8, 6, 5, 4, dtype=torch.float64)
    grad = torch.randn(2, 23, 6, 5, 4, dtype=torch.float64)
    ref = run(block, x64, grad, "reference")
    x = x64.float()
    if kind == "channels_last_3d":
        x = x.contiguous(memory_format=torch.channels_last_3d)
    elif kind == "strided":
        x = torch.zeros(2, 8, 6, 5, 8)[..., ::2].copy_(x)
    got = run(block.float(), x, grad.float(), "cpp")
    assert_close_normwise(got[0], ref[0], 1e-5)
    for a, b in zip(got[1], ref[1]):
        assert_close_normwise(a, b, 1e-5, atol=1e-6)
    if kind == "channels_last_3d":
        assert got[0].is_contiguous(memory_format=torch.channels_last_3d)


@needs_ext
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("with_skip", [False, True], ids=["plain", "skip"])
def test_without_a_backward_the_block_keeps_nothing_and_computes_the_same(training, with_skip):
    """Under no_grad (inference) the block runs without its op's saved tensors: the same output and
    running statistics bit for bit (the same engine, in the same order), and it holds no more than
    its output (no activation for a backward)."""
    block = make_block(3, 8, layers=4, growth=6).float().train(training)
    x = torch.randn(2, 8, 12, 10, 6)
    skip = torch.randn_like(x) if with_skip else None
    states = []
    outs = []
    for grad_mode in (True, False):
        b = copy.deepcopy(block)
        b.backend = "cpp"
        with torch.set_grad_enabled(grad_mode):
            xi = x.clone().requires_grad_(grad_mode)
            outs.append(b(xi, skip=skip).detach() if with_skip else b(xi).detach())
        states.append(b.state_dict())
    assert torch.equal(outs[0], outs[1])
    for k in states[0]:
        assert torch.equal(states[0][k], states[1][k]), k

    # what each path keeps alive: saved tensors with a backward to come, none without
    import importlib

    op_module = importlib.import_module("ahnet_fast.ops.dense_block")

    kept, banded = [], []
    real_forward, real_banded = op_module._forward, op_module._fill_banded

    def spy(*args, **kwargs):
        out, rest = real_forward(*args, **kwargs)
        kept.append(sum(t.numel() for t in rest if t.dim() > 1))  # the activations, not the statistics
        return out, rest

    def spy_banded(*args, **kwargs):
        banded.append(True)
        return real_banded(*args, **kwargs)

    op_module._forward, op_module._fill_banded = spy, spy_banded
    try:
        with torch.no_grad():
            block(x, skip=skip) if with_skip else block(x)
        with torch.enable_grad():
            y = block(x.clone().requires_grad_(), skip=skip) if with_skip else block(x.clone().requires_grad_())
    finally:
        op_module._forward, op_module._fill_banded = real_forward, real_banded
    if training:  # batch statistics need the whole map: the op's forward, keeping nothing
        assert kept[0] == 0 and kept[1] > 0 and not banded, (kept, banded)
    else:  # running statistics: in bands (ops._bands), which keep nothing by construction
        assert banded == [True] and len(kept) == 1 and kept[0] > 0, (kept, banded)
    del y


@needs_ext
def test_matches_monai():
    monai_ahnet = pytest.importorskip("monai.networks.nets.ahnet")
    torch.manual_seed(0)
    theirs = monai_ahnet.DenseBlock(3, 3, 12, 4, 6, 0.0).double()
    ours = DenseBlock(3, 3, 12, 4, 6, 0.0).double()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(2, 12, 6, 6, 4, dtype=torch.float64)
    grad = torch.randn(2, 30, 6, 6, 4, dtype=torch.float64)
    xt, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
    yt, yo = theirs(xt), ours(xo)
    gt = torch.autograd.grad(yt, [xt, *theirs.parameters()], grad)
    go = torch.autograd.grad(yo, [xo, *ours.parameters()], grad)
    assert_close_normwise(yo, yt, 1e-13)
    for a, b in zip(go, gt):
        assert_close_normwise(a, b, 1e-11, atol=1e-14)
    for (k, a), b in zip(ours.state_dict().items(), theirs.state_dict().values()):
        assert torch.equal(a, b) if a.dtype == torch.int64 else rel_err(a, b) < 1e-13, k


@needs_ext
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradcheck(training):
    block = make_block(3, 3, layers=2, growth=2, bn_size=2).train(training)
    x = torch.randn(2, 3, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    names = [n for n, _ in block.named_parameters()]

    def f(x, *ps):
        with torch.nn.utils.stateless._reparametrize_module(block, dict(zip(names, ps))):
            return block(x)

    assert torch.autograd.gradcheck(f, (x, *block.parameters()), eps=1e-6, atol=1e-6, rtol=1e-5)


def _op_args(block, x, training, keep=False, skip=None):
    weights, means, variances = [], [], []
    for layer in block:
        for bn, conv in ((layer.bn1, layer.conv1), (layer.bn2, layer.conv2), (layer.bn3, layer.conv3),
                         (layer.bn4, layer.conv4)):
            weights += [bn.weight.detach(), bn.bias.detach(), conv.weight.detach()]
            means.append(bn.running_mean)
            variances.append(bn.running_var)
    return (x, weights, [] if training else means, [] if training else variances, training, 1e-5, keep, skip)


@needs_ext
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("kind", ["contiguous", "channels_last_3d"])
@pytest.mark.parametrize("keep", [False, True], ids=["recompute-c1", "keep-c1"])
@pytest.mark.parametrize("with_skip", [False, True], ids=["x", "x+skip"])
def test_opcheck(training, kind, keep, with_skip):
    block = make_block(3, 4, layers=2, growth=3, bn_size=2, dtype=torch.float32)
    x = torch.randn(2, 4, 5, 4, 3)
    skip = torch.randn(2, 4, 5, 4, 3) if with_skip else None
    if kind == "channels_last_3d":
        x = x.contiguous(memory_format=torch.channels_last_3d)
    args = _op_args(block, x, training, keep, skip)
    torch.library.opcheck(torch.ops.ahnet_fast.dense_block.default, args)
    grad_args = (args[0].clone().requires_grad_(), [w.clone().requires_grad_() for w in args[1]], *args[2:-1],
                 None if skip is None else skip.clone().requires_grad_())
    torch.library.opcheck(torch.ops.ahnet_fast.dense_block.default, grad_args)
    out, saved = torch.ops.ahnet_fast.dense_block.default(*args)
    torch.library.opcheck(torch.ops.ahnet_fast.dense_block_backward.default,
                          (torch.randn_like(out), out, x.shape[1], args[1], saved, training, 1e-5))


@needs_ext
@pytest.mark.parametrize("kind", ["contiguous", "channels_last_3d"])
def test_opcheck_in_bands(kind, monkeypatch):
    """In bands (no kept bottleneck, one row a band) the forward saves each layer's a as a tensor with
    no rows (the backward recomputes it): the fake kernel makes the same choice from the shapes, so
    opcheck's fake-vs-real comparison holds, and the backward op accepts what the forward saved."""
    from ahnet_fast.ops import _bands

    monkeypatch.setattr(_bands, "BAND_BYTES", 1)
    block = make_block(3, 4, layers=2, growth=3, bn_size=2, dtype=torch.float32)
    x = torch.randn(2, 4, 5, 4, 3)
    if kind == "channels_last_3d":
        x = x.contiguous(memory_format=torch.channels_last_3d)
    args = _op_args(block, x, True, False, None)
    out, saved = torch.ops.ahnet_fast.dense_block.default(*args)
    assert [tuple(t.shape) for t in saved[:2]] == [(2, 3, 0, 4, 3)] * 2  # a of each layer, not kept
    torch.library.opcheck(torch.ops.ahnet_fast.dense_block.default, args)
    grad_args = (args[0].clone().requires_grad_(), [w.clone().requires_grad_() for w in args[1]], *args[2:])
    torch.library.opcheck(torch.ops.ahnet_fast.dense_block.default, grad_args)
    torch.library.opcheck(torch.ops.ahnet_fast.dense_block_backward.default,
                          (torch.randn_like(out), out, x.shape[1], args[1], saved, True, 1e-5))


@needs_ext
def test_backward_refuses_a_band_size_changed_since_the_forward(monkeypatch):
    """A forward in bands keeps no a; a backward that would run on the whole map (the band size grew
    in between) cannot recompute it there, and says so instead of failing on a shape."""
    from ahnet_fast.ops import _bands

    monkeypatch.setattr(_bands, "BAND_BYTES", 1)
    block = make_block(3, 4, layers=2, growth=3, bn_size=2, dtype=torch.float32)
    args = _op_args(block, torch.randn(2, 4, 5, 4, 3), True, False, None)
    out, saved = torch.ops.ahnet_fast.dense_block.default(*args)
    monkeypatch.setattr(_bands, "BAND_BYTES", 2 ** 40)
    with pytest.raises(ValueError, match="band size changed"):
        torch.ops.ahnet_fast.dense_block_backward.default(torch.randn_like(out), out, 4, args[1], saved, True, 1e-5)


@needs_ext
def test_saved_bytes_at_most_0_4_of_monai_block():
    """The issue's target, at AH-Net's last block (64 input channels, growth 20, bottleneck 80; the
    ratio does not depend on the spatial size): the one-buffer block keeps at most 0.4x the bytes
    MONAI's block keeps for backward (parameters not counted)."""
    monai_ahnet = pytest.importorskip("monai.networks.nets.ahnet")
    theirs_block = monai_ahnet.DenseBlock(3, 3, 64, 4, 20, 0.0)
    block = make_block(3, 64, growth=20, dtype=torch.float32)
    x = torch.randn(1, 64, 8, 8, 4, requires_grad=True)
    ours, _ = saved_bytes(lambda: block(x), exclude=list(block.parameters()))
    theirs, _ = saved_bytes(lambda: theirs_block(x), exclude=list(theirs_block.parameters()))
    assert ours <= 0.4 * theirs, (ours, theirs)
    # the output buffer, a, c1 and a + b of each layer: (64 + 60) + 3 * 20 + 3 * 80 + 3 * 20
    # channels, and 8 floats of statistics per BatchNorm channel pair
    per_channel = 8 * 8 * 4 * 4
    assert (124 + 60 + 240 + 60) * per_channel <= ours <= (124 + 60 + 240 + 60) * per_channel + 8 * 1024
    # inside a checkpointed segment (its recomputation) c1 and a + b are recomputed instead: the
    # output buffer and a only
    with _checkpoint.prefer_recomputation():
        lean, _ = saved_bytes(lambda: block(x), exclude=list(block.parameters()))
    assert (124 + 60) * per_channel <= lean <= (124 + 60) * per_channel + 8 * 1024
    assert lean <= 0.2 * theirs, (lean, theirs)


@needs_ext
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_keeping_c1_gives_the_same_gradients_bitwise(training):
    """c1 and a + b recomputed in backward are bitwise the forward's (deterministic kernels), so
    keeping them changes memory and time only. (On a map wider than one band, 16 MiB of the widest
    activation, the lean path runs in bands and agrees to rounding instead: the test above.)"""
    block = make_block(3, 6, layers=3, growth=4, bn_size=2, dtype=torch.float32)
    x = torch.randn(2, 6, 7, 5, 3)
    grad = torch.randn(2, 18, 7, 5, 3)
    results = []
    for keep in (False, True):
        args = _op_args(block, x, training, keep)
        xi = args[0].clone().requires_grad_()
        ws = [w.clone().requires_grad_() for w in args[1]]
        out, saved = torch.ops.ahnet_fast.dense_block.default(xi, ws, *args[2:])
        assert len(saved) == (3 + (6 if keep else 0) + 2 * 4 * 3)
        out.backward(grad)
        results.append([out.detach(), xi.grad] + [w.grad for w in ws])
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_bad_input_is_a_value_error():
    block = make_block(3, 4, layers=2, growth=3, bn_size=2, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"weight \(6, 4, 1, 1, 1\), but its input has 5 channels"):
        block(torch.randn(2, 5, 4, 4, 3))
    x = torch.randn(2, 4, 4, 4, 3)
    args = _op_args(block, x, True)
    with pytest.raises(ValueError, match="12 tensors per layer"):
        dense_block(x, args[1][:-1], [None] * 8, [None] * 8, True, [0.1] * 8, 1e-5)
    with pytest.raises(ValueError, match="momenta must hold 4 entries per layer"):
        dense_block(x, args[1], [None] * 8, [None] * 8, True, [0.1] * 7, 1e-5)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        dense_block(x[0, 0], args[1], [None] * 8, [None] * 8, True, [0.1] * 8, 1e-5)


# ---------------------------------------------------------------------------------------------
# Triton (interpreted on CPU; on CUDA on a GPU machine)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
triton_here = pytest.mark.skipif(
    DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1", reason="needs a GPU or TRITON_INTERPRET=1")


@triton_here
def test_triton_block_matches_reference():
    pytest.importorskip("triton")
    block = make_block(3, 6, layers=2, growth=4, bn_size=2)
    x = torch.randn(2, 6, 5, 4, 3, dtype=torch.float64)
    grad = torch.randn(2, 14, 5, 4, 3, dtype=torch.float64)
    ref = run(block, x, grad, "reference")
    prev = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        got = run(block.float().to(DEVICE), x.float().to(DEVICE), grad.float().to(DEVICE), "triton")
    finally:
        torch.backends.cudnn.allow_tf32 = prev
    assert_close_normwise(got[0].cpu(), ref[0], 1e-5)
    for a, b in zip(got[1], ref[1]):
        assert_close_normwise(a.cpu(), b, 1e-5, atol=1e-6)


@needs_ext
@pytest.mark.parametrize("keep", [True, False], ids=["kept", "lean"])
def test_results_do_not_share_the_scratch_pool(keep):
    """The block's activations (forward and backward) and its first units' input gradients live in a
    pooled scratch buffer (ahnet_fast._scratch): nothing returned may be a view of it, so a second
    block call leaves the first call's output and gradients unchanged."""
    from ahnet_fast.ops import dense_block

    block = make_block(3, 6, dtype=torch.float32)
    weights = list(block.parameters())

    def call(x, grad):
        leaves = [x.clone().requires_grad_(), *(w.detach().clone().requires_grad_() for w in weights)]
        y = dense_block(leaves[0], leaves[1:], [None] * 12, [None] * 12, True, [0.1] * 12, 1e-5, backend="cpp",
                        keep_bottleneck=keep)
        return [y.detach(), *torch.autograd.grad(y, leaves, grad)]

    first = call(torch.randn(1, 6, 7, 5, 3), torch.randn(1, 21, 7, 5, 3))
    kept = [t.clone() for t in first]
    call(torch.randn(1, 6, 7, 5, 3) * 2 + 1, torch.randn(1, 21, 7, 5, 3))
    for a, b in zip(first, kept):
        assert torch.equal(a, b)


@needs_ext
@pytest.mark.parametrize("backend", ["cpp", "reference"])
@pytest.mark.parametrize("kind", ["contiguous", "channels_last_3d"])
def test_skip_is_the_block_on_the_sum(backend, kind):
    """dense_block(x, skip=s) == dense_block(x + s) (the sum written into the block's buffer), and
    x and s both get the gradient of the sum; a skip of another shape is a ValueError."""
    block = make_block(3, 5, layers=2, growth=3, bn_size=2)
    block.backend = backend
    x = torch.randn(2, 5, 6, 4, 3, dtype=torch.float64)
    s = torch.randn(2, 5, 6, 4, 3, dtype=torch.float64)
    if kind == "channels_last_3d":
        x, s = (t.contiguous(memory_format=torch.channels_last_3d) for t in (x, s))
    grad = torch.randn(2, 11, 6, 4, 3, dtype=torch.float64)
    xi, si = x.clone().requires_grad_(), s.clone().requires_grad_()
    y = block(xi, si)
    gx, gs = torch.autograd.grad(y, (xi, si), grad)
    ref = copy.deepcopy(block)
    total = (x + s).requires_grad_()
    y_ref = ref(total)
    (g_ref,) = torch.autograd.grad(y_ref, (total,), grad)
    assert_close_normwise(y, y_ref, 1e-13, what="output")
    assert_close_normwise(gx, g_ref, 1e-12, what="grad x")
    assert_close_normwise(gs, g_ref, 1e-12, what="grad skip")
    with pytest.raises(ValueError, match="skip must have the input's shape"):
        block(x, s[:, :4])
    # another dtype: the sum promotes as eager PyTorch's does, then the block runs on it
    y_mixed = block(x, s.float())
    assert y_mixed.dtype == torch.float64
    assert_close_normwise(y_mixed, block(x + s.float()), 1e-13, what="mixed-dtype skip")


def dispatch_sample():
    """One call of the op for tests/test_dispatch.py's contract over every registered op: (run(backend) ->
    output, the arguments its table's reasons take)."""
    torch.manual_seed(0)
    x = torch.randn(2, 4, 8, 8, 4, dtype=torch.float64)
    block = DenseBlock(3, 1, 4, 2, 3, 0.0).double()
    return (lambda be: module_dense_block(list(block), x, be)), (x,)


@needs_ext
@pytest.mark.parametrize("spatial_dims,shape,kind", [(3, (2, 7, 9, 5, 4), "contiguous"),
                                                     (3, (1, 6, 7, 6, 3), "channels_last"),
                                                     (3, (2, 7, 9, 5, 4), "strided"),
                                                     (2, (2, 6, 7, 5), "contiguous")],
                         ids=["3d", "3d-channels-last", "3d-strided", "2d"])
@pytest.mark.parametrize("rows", [1, 2, 4])
def test_inference_in_bands_matches_reference(spatial_dims, shape, kind, rows, monkeypatch):
    """Eval mode without a backward: each layer in bands of ``rows`` rows (ops._bands; the last band
    shorter, every boundary crossed by the 3x3x1 unit's halo), with and without a skip: within 1e-5
    of the float64 reference composition."""
    from ahnet_fast.ops import _bands

    block = make_block(spatial_dims, shape[1]).eval()
    x64 = torch.randn(shape, dtype=torch.float64)
    skip64 = torch.randn(shape, dtype=torch.float64)
    with torch.no_grad():
        refs = [layers_one_by_one(block, x64), layers_one_by_one(block, x64 + skip64)]
    widest = shape[1] + 10  # the last layer's prefix (growth 5, three layers) vs the bottleneck's 20
    per_row = shape[0] * max(widest, 20) * 4 * torch.tensor(shape[3:]).prod().item()
    monkeypatch.setattr(_bands, "BAND_BYTES", rows * per_row)
    block = block.float()
    block.backend = "cpp"

    def arrange(t):
        t = t.float()
        if kind == "channels_last":
            return t.contiguous(memory_format=torch.channels_last_3d)
        if kind == "strided":
            return torch.zeros((*t.shape[:-1], 2 * t.shape[-1]))[..., ::2].copy_(t)
        return t

    with torch.no_grad():
        got = [block(arrange(x64)), block(arrange(x64), skip=arrange(skip64))]
    for g, r in zip(got, refs):
        assert_close_normwise(g, r, 1e-5)


@needs_ext
def test_dense_block_into_fills_a_channel_slice_in_place(monkeypatch):
    """dense_block_input + dense_block_into (AH-Net's last stage): the block's channels written after
    the caller's front channels, which stay as they were; the result equals the block's."""
    from ahnet_fast.ops import _bands

    monkeypatch.setattr(_bands, "BAND_BYTES", 1)  # one row a band
    block = make_block(3, 6).float().eval()
    block.backend = "cpp"
    x, skip = torch.randn(2, 6, 7, 5, 4), torch.randn(2, 6, 7, 5, 4)
    with torch.no_grad():
        expected = block(x, skip=skip)
        buffer = block.input_buffer(x, skip, front=3)
        assert buffer.shape == (2, 3 + 21, 7, 5, 4)
        buffer[:, :3] = 7.0
        out = block.fill(buffer[:, 3:], 6)
    assert out.data_ptr() == buffer[:, 3:].data_ptr()
    assert torch.equal(buffer[:, :3], torch.full_like(buffer[:, :3], 7.0))
    assert_close_normwise(buffer[:, 3:], expected, 1e-6)


@needs_ext
def test_dense_block_into_bad_input_is_a_value_error():
    block = make_block(3, 6).float().eval()
    x = torch.randn(1, 6, 5, 5, 3)
    with torch.no_grad():
        buffer = block.input_buffer(x)
        with pytest.raises(ValueError, match="give 21 channels, but the buffer has 20"):
            block.fill(buffer[:, 1:], 6)
        with pytest.raises(ValueError, match="0 < channels0"):
            block.fill(buffer, 0)
        with pytest.raises(ValueError, match="skip must have the input's shape"):
            block.input_buffer(x, torch.randn(1, 6, 5, 5, 4))
        with pytest.raises(ValueError, match="eval mode"):
            block.train().fill(buffer, 6)
    block.eval()
    with pytest.raises(ValueError, match="is for inference"):
        block.fill(buffer.requires_grad_(), 6)


@needs_ext
@pytest.mark.parametrize("kind", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_training_in_bands_matches_reference(kind, rows, training, monkeypatch):
    """Inside activation checkpointing (no kept bottleneck), the C++ engine runs every unit in bands of
    ``rows`` rows in forward and backward (the units' batch statistics over the whole input first; the
    3x3x1 unit's weight gradient from its band's rows only, its input gradient added over the halo):
    output, input, skip and parameter gradients and running statistics as the float64 reference's."""
    from ahnet_fast.ops import _bands

    shape = (2, 5, 9, 4, 3)
    block = make_block(3, shape[1]).train(training)
    x = torch.randn(shape, dtype=torch.float64)
    skip = torch.randn(shape, dtype=torch.float64)
    grad = torch.randn((shape[0], shape[1] + 15, *shape[2:]), dtype=torch.float64)
    per_row = shape[0] * 20 * 8 * 4 * 3  # the widest activation: the bottleneck's 20 channels, float64
    calls = []
    original = _bands.conv_backward_banded
    monkeypatch.setattr(_bands, "conv_backward_banded", lambda *a, **k: calls.append(1) or original(*a, **k))

    def arrange(t):
        if kind == "channels_last":
            return t.contiguous(memory_format=torch.channels_last_3d)
        if kind == "strided":
            return torch.zeros((*t.shape[:-1], 2 * t.shape[-1]), dtype=t.dtype)[..., ::2].copy_(t)
        return t

    def step(backend, band_bytes):
        monkeypatch.setattr(_bands, "BAND_BYTES", band_bytes)
        b = copy.deepcopy(block)
        b.backend = backend
        xi, si = arrange(x).requires_grad_(), arrange(skip).requires_grad_()
        with _checkpoint.prefer_recomputation():
            y = b(xi, skip=si)
        grads = torch.autograd.grad(y, [xi, si, *b.parameters()], grad)
        return y.detach(), grads, b.state_dict()

    ref = step("reference", rows * per_row)
    got = step("cpp", rows * per_row)
    assert calls, "the banded backward did not run"
    assert_close_normwise(got[0], ref[0], 1e-12, what="output")
    for (name, _), a, b in zip([("x", None), ("skip", None), *block.named_parameters()], got[1], ref[1]):
        assert_close_normwise(a, b, 1e-11, atol=1e-13, what=name)
    for k in ref[2]:
        assert_close_normwise(got[2][k].double(), ref[2][k].double(), 1e-13, what=k)


@needs_ext
def test_training_in_bands_under_bf16_autocast_is_as_accurate_as_the_whole_map(monkeypatch):
    """Under CPU bf16 autocast the banded training path (the bottleneck gradient streamed in three
    passes, the prefix gradient written in two parts) is judged as low precision is: its error
    against the float64 reference at most twice the whole-map path's under the same autocast, output
    and every gradient, plus a small atol."""
    from ahnet_fast.ops import _bands

    shape = (1, 16, 12, 6, 4)
    block = make_block(3, shape[1], growth=8, dtype=torch.float32).train()
    x = torch.randn(shape)
    grad = torch.randn((shape[0], shape[1] + 24, *shape[2:]))

    def step(dtype, banded):
        monkeypatch.setattr(_bands, "BAND_BYTES", 3 * shape[0] * 32 * 6 * 4 * 2 if banded else 2 ** 40)
        b = copy.deepcopy(block).to(dtype)
        xi = x.to(dtype).requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.float32), \
                _checkpoint.prefer_recomputation():
            y = b(xi)
        grads = torch.autograd.grad(y, [xi, *b.parameters()], grad.to(y.dtype))
        return [y.detach().double()] + [g.double() for g in grads]

    ref = step(torch.float64, False)
    whole = step(torch.float32, False)
    banded = step(torch.float32, True)
    names = ["output", "x"] + [n for n, _ in block.named_parameters()]
    for name, got, base, r in zip(names, banded, whole, ref):
        bound = 2 * (base - r).norm().item() + 1e-3 * r.norm().item() + 1e-6
        assert (got - r).norm().item() <= bound, (name, (got - r).norm().item(), (base - r).norm().item())


@needs_ext
def test_training_in_bands_holds_less_at_once(monkeypatch):
    """What the bands are for: the largest set of tensors alive at once inside the block's lean
    training forward and inside its backward (a live-set count over every op the C++ engine runs) is
    smaller with bands than on the whole map, at AH-Net's last block's widths; the results agree
    (checked in float64: in float32 the bands round differently, and a voxel whose pre-activation
    lies within rounding of a ReLU's kink may switch sides, which moves a gradient by ~1e-3 of its
    norm on some draws, as any two float32 evaluations of the block can)."""
    import importlib

    from ahnet_fast.memory import live_set_tracker
    from ahnet_fast.ops import _bands

    ops = importlib.import_module("ahnet_fast.ops.dense_block")
    block = make_block(3, 64, growth=20, dtype=torch.float32)
    weights, means, variances = _op_args(block, None, True)[1:4]
    x = torch.randn(1, 64, 32, 16, 8)
    grad = torch.randn(1, 124, 32, 16, 8)
    per_row = 104 * 16 * 8 * 4
    results, peaks = [], []
    for band_bytes in (4 * per_row, 10 ** 12):
        monkeypatch.setattr(_bands, "BAND_BYTES", band_bytes)
        forward, backward = live_set_tracker(), live_set_tracker()
        with torch.no_grad():
            with forward:
                out, saved = ops._forward(ops.ENGINES["cpp"], x, weights, means, variances, True, 1e-5, False)
            with backward:
                ops._backward(ops.ENGINES["cpp"], grad, out, 64, weights, saved, True, 1e-5)
            # the same in float64, the same bands (per_row scaled with the element size)
            monkeypatch.setattr(_bands, "BAND_BYTES", 2 * band_bytes)
            w64 = [w.double() for w in weights]
            out, saved = ops._forward(ops.ENGINES["cpp"], x.double(), w64, [], [], True, 1e-5, False)
            grads = ops._backward(ops.ENGINES["cpp"], grad.double(), out, 64, w64, saved, True, 1e-5)
        results.append((out, grads[0], grads[1]))
        peaks.append((forward.peak, backward.peak))
    (banded_fwd, banded_bwd), (whole_fwd, whole_bwd) = peaks
    # measured: 0.54x and 0.55x (the output and the prefix gradient exist whole either way; the
    # forward was 0.73x while c1 was still written whole)
    assert banded_fwd < 0.65 * whole_fwd and banded_bwd < 0.85 * whole_bwd, peaks
    assert_close_normwise(results[0][0], results[1][0], 1e-12)
    assert_close_normwise(results[0][1], results[1][1], 1e-10)
    for a, b in zip(results[0][2], results[1][2]):
        assert_close_normwise(a, b, 1e-10)


@needs_ext
@pytest.mark.parametrize("rows", [None, 2], ids=["whole", "bands"])
@pytest.mark.parametrize("grad_layout", ["slice", "own", "channels_last"])
def test_handed_over_gradient_takes_the_prefix_gradients(rows, grad_layout, monkeypatch):
    """grad_handover (ops._handover): the backward adds the layers' prefix gradients into the output's
    gradient itself (as a channel slice of a wider one, as AH-Net's pyramid pooling hands it on, or a
    tensor of its own) instead of a buffer of the block's width; the input's gradient is a compact copy
    of its first channels. Gradients: bitwise those of the ordinary backward on the whole map, float32
    rounding in bands (the sums are added in another order). A gradient of another layout than the
    output's goes the ordinary way, untouched."""
    from ahnet_fast.ops import _bands

    if rows is not None:
        monkeypatch.setattr(_bands, "BAND_BYTES", rows * 2 * 20 * 7 * 3 * 4)
    block = make_block(3, 6, growth=5, dtype=torch.float32)
    torch.manual_seed(5)
    x, skip = torch.randn(2, 6, 9, 7, 3), torch.randn(2, 6, 9, 7, 3)
    wide = torch.randn(2, 3 + 21, 9, 7, 3)
    results = []
    for handover in (False, True):
        b = copy.deepcopy(block)
        xi, si = x.clone().requires_grad_(), skip.clone().requires_grad_()
        with _checkpoint.prefer_recomputation():
            y = module_dense_block(list(b), xi, "cpp", si, grad_handover=handover)
        if grad_layout == "slice":
            g = wide.clone()[:, 3:]
        elif grad_layout == "own":
            g = wide[:, 3:].clone()
        else:
            g = wide[:, 3:].contiguous(memory_format=torch.channels_last_3d)
        before = g.clone()
        grads = torch.autograd.grad(y, [xi, si, *b.parameters()], g)
        results.append((grads, g, before))
    (plain, _, _), (handed, g, before) = results
    for a, b in zip(plain, handed):
        if rows is None:
            assert torch.equal(a, b)
        else:
            assert_close_normwise(b, a, 1e-5)
    assert torch.equal(handed[0], handed[1])
    if grad_layout == "channels_last":
        assert torch.equal(g, before)  # not the output's layout: not written
    else:
        assert not torch.equal(g[:, :15], before[:, :15])  # the prefix gradients are in it
        assert torch.equal(g[:, :6], handed[0])
        assert handed[0].is_contiguous() and handed[0].untyped_storage().nbytes() == handed[0].numel() * 4


@needs_ext
def test_opcheck_handed_over_backward():
    block = make_block(3, 4, layers=2, growth=3, bn_size=2, dtype=torch.float32)
    x = torch.randn(2, 4, 5, 4, 3)
    args = _op_args(block, x, True)
    out, saved = torch.ops.ahnet_fast.dense_block.default(*args)
    torch.library.opcheck(torch.ops.ahnet_fast.dense_block_backward_.default,
                          (torch.randn_like(out), out, x.shape[1], args[1], saved, True, 1e-5,
                           [torch.empty_like(w) for w in args[1]]))
