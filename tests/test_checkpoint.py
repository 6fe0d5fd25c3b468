"""AHNet(checkpoint=...): activations recomputed in backward give the same gradients and the same
BatchNorm bookkeeping as the model without checkpointing."""
import copy

import pytest
import torch

import ahnet_fast
from benchmarks._common import saved_bytes
from tests._monai import run_model

POLICIES = ["encoder", "decoder", "all"]


def make(dtype, checkpoint="none", **kw):
    torch.manual_seed(0)
    kwargs = dict(layers=(1, 2, 1, 1), psp_block_num=2, out_channels=2)  # layer2: a block without downsample
    kwargs.update(kw)
    return ahnet_fast.AHNet(**kwargs, checkpoint=checkpoint).to(dtype)


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_same_step_as_without_checkpointing(policy, dtype):
    """Output, input and parameter gradients, running statistics and batch counts after two
    training steps: equal (bitwise: the recomputation repeats the same deterministic kernels)."""
    plain = make(dtype)
    ckpt = copy.deepcopy(plain)
    ckpt.checkpoint = policy
    x = torch.randn(2, 1, 32, 32, 32, generator=torch.Generator().manual_seed(1), dtype=dtype)
    for step in range(2):
        a = run_model(plain, x, grad_seed=step)
        b = run_model(ckpt, x, grad_seed=step)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        assert list(a[2]) == list(b[2])
        for name in a[2]:
            assert torch.equal(a[2][name], b[2][name]), name
        for name in a[3]:
            assert torch.equal(a[3][name], b[3][name]), name


@pytest.mark.parametrize("kw", [dict(spatial_dims=2), dict(upsample_mode="trilinear", psp_block_num=3)],
                         ids=["2d", "trilinear"])
def test_other_configurations(kw):
    plain = make(torch.float64, **kw)
    ckpt = copy.deepcopy(plain)
    ckpt.checkpoint = "all"
    shape = (2, 1, 64, 64) if kw.get("spatial_dims") == 2 else (1, 1, 64, 64, 32)  # psp 3 needs 64 in-plane
    x = torch.randn(shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    a, b = run_model(plain, x), run_model(ckpt, x)
    for name in a[2]:
        assert torch.equal(a[2][name], b[2][name]), name
    for name in a[3]:
        assert torch.equal(a[3][name], b[3][name]), name


def test_checkpointing_drops_what_backward_would_keep():
    """What autograd keeps outside the segments: with "all" only the segments' inputs (the stage
    boundaries); everything inside is dropped (checkpoint's own hooks take it) and recomputed."""
    x = torch.randn(2, 1, 32, 32, 32, requires_grad=True)
    kept = {}
    for policy in ["none"] + POLICIES:
        net = make(torch.float32, checkpoint=policy)
        params = list(net.parameters())
        kept[policy], _ = saved_bytes(lambda: net(x), exclude=params)
    assert kept["encoder"] < kept["none"] and kept["decoder"] < kept["none"]
    assert kept["all"] < min(kept["encoder"], kept["decoder"]) and kept["all"] < 0.5 * kept["none"], kept


def test_eval_and_no_grad_do_not_checkpoint():
    net = make(torch.float32, checkpoint="all").eval()
    ref = make(torch.float32).eval()
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        assert torch.equal(net(x), ref(x))


def test_bad_policy_is_a_value_error():
    with pytest.raises(ValueError, match="checkpoint must be one of"):
        ahnet_fast.AHNet(checkpoint="everything")


def test_auto_picks_the_cheapest_policy_that_fits():
    """checkpoint="auto" asks the planner once per input shape: "none" when the budget is ample, a
    checkpointing policy when only that fits, "all" with a warning when nothing does; the gradients
    are those of the model without checkpointing either way."""
    from ahnet_fast.memory import estimate_training_memory

    plain = make(torch.float32)
    x = torch.randn(2, 1, 32, 32, 32)
    need = {p: estimate_training_memory(plain, tuple(x.shape), checkpoint=p).total
            for p in ("none", "encoder", "decoder", "all")}
    ample = copy.deepcopy(plain)
    ample.checkpoint, ample.memory_budget = "auto", "64GB"
    tight = copy.deepcopy(plain)
    tight.checkpoint, tight.memory_budget = "auto", need["all"] + 1
    assert need["all"] < min(need["encoder"], need["decoder"], need["none"])  # so "all" is the one that fits
    tiny = copy.deepcopy(plain)
    tiny.checkpoint, tiny.memory_budget = "auto", 1
    ref = run_model(plain, x)
    for net, expected in ((ample, "none"), (tight, "all"), (tiny, "all")):
        if net is tiny:
            with pytest.warns(UserWarning, match="no policy fits"):
                got = run_model(net, x)
        else:
            got = run_model(net, x)
        (choice,) = net.auto_choices.values()
        assert choice["policy"] == expected
        for name in ref[2]:
            assert torch.equal(got[2][name], ref[2][name]), name


@pytest.mark.parametrize("policy", ["none", "decoder"])
def test_encoder_blocks_are_not_checkpointed_unless_asked(policy, monkeypatch):
    """The encoder's layers nest their blocks' segments only under "encoder" / "all" in training: with
    another policy (or in eval mode with gradients) no block is checkpointed (it would run its forward
    twice and keep less than the policy says)."""
    from ahnet_fast.nn import ahnet as ahnet_module

    calls = []
    original = ahnet_module.checkpoint_segment
    monkeypatch.setattr(ahnet_module, "checkpoint_segment",
                        lambda fn, modules, *a: calls.append(type(modules[0]).__name__) or original(fn, modules, *a))
    net = make(torch.float32, checkpoint=policy)
    x = torch.randn(2, 1, 32, 32, 32, requires_grad=True)
    net(x).sum().backward()
    net.eval()
    net(x).sum().backward()
    assert not any(name.startswith("Bottleneck") for name in calls), calls


def _backward_ops(net, x):
    from torch.utils._python_dispatch import TorchDispatchMode

    names = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            names.append(str(func))
            return func(*args, **(kwargs or {}))

    y = net(x)
    with Record():
        y.sum().backward()
    return names


def test_last_stage_hands_its_gradients_over_unless_hooked():
    """Under decoder checkpointing the last stage's gradients pass in place from the final block to
    the pyramid pooling to dense4 (ops._handover: the in-place backward ops run; the gradients are
    bitwise those without checkpointing, test_same_step_as_without_checkpointing); a forward hook on
    any of those modules could see the tensors in between, and then the ordinary backward runs."""
    x = torch.randn(2, 1, 32, 32, 32)
    net = make(torch.float32, checkpoint="all")
    ran = _backward_ops(net, x)
    assert any("pyramid_pool_backward_" in n for n in ran) and any("dense_block_backward_" in n for n in ran)
    hooked = make(torch.float32, checkpoint="all")
    hooked.psp.register_forward_hook(lambda m, i, o: None)
    ran = _backward_ops(hooked, x)
    assert not any("pyramid_pool_backward_" in n or "dense_block_backward_" in n for n in ran)
    assert any("pyramid_pool_backward" in n for n in ran)


def test_output_discarded_only_in_the_segments_own_recomputation():
    """output_discarded(): False in a segment's first run, True while it runs again in backward,
    False for a function that a recomputation calls without checkpointing (its output is used), and
    False again afterwards."""
    from ahnet_fast.nn._checkpoint import checkpoint_segment, output_discarded

    seen = []
    lin = torch.nn.Linear(3, 3)

    def plain(t):
        seen.append(("plain", output_discarded()))
        return t * 2

    def segment(t):
        seen.append(("segment", output_discarded()))
        with torch.no_grad():  # not checkpointed: run as it is
            checkpoint_segment(plain, (), t)
        return torch.relu(lin(t)).sum()

    x = torch.randn(4, 3, requires_grad=True)
    checkpoint_segment(segment, (lin,), x).backward()
    assert seen == [("segment", False), ("plain", False), ("segment", True), ("plain", False)]
    assert not output_discarded()
