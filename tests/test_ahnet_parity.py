"""AHNet against MONAI 1.6's AHNet: same state dict, same function, same gradients."""
import copy

import pytest
import torch

import ahnet_fast
from ahnet_fast.ops import aniso_conv
from tests._monai import deepcopy_to, flat, run_model, twins
from tests.conftest import assert_close_normwise, rel_err

monai_nets = pytest.importorskip("monai.networks.nets")

# (kwargs, input shape): every upsample mode, psp_block_num 0-4, 2D and 3D, odd but valid sizes,
# more than one input channel, and the full-size default network.
CONFIGS = [
    (dict(layers=(1, 1, 1, 1), psp_block_num=0), (2, 1, 32, 32, 32)),
    (dict(layers=(1, 2, 1, 1), in_channels=2, out_channels=3, psp_block_num=2), (2, 2, 64, 32, 33)),
    (dict(layers=(1, 1, 1, 1), psp_block_num=3, upsample_mode="trilinear"), (2, 1, 64, 63, 32)),
    (dict(layers=(1, 1, 1, 1), psp_block_num=1, upsample_mode="nearest", out_channels=2), (2, 1, 32, 64, 32)),
    (dict(layers=(1, 1, 1, 1), psp_block_num=4, upsample_mode="trilinear"), (1, 1, 128, 128, 32)),
    (dict(layers=(1, 1, 2, 1), spatial_dims=2, psp_block_num=4), (2, 1, 128, 32)),
    (dict(layers=(1, 1, 1, 1), spatial_dims=2, in_channels=3, out_channels=2, psp_block_num=2,
          upsample_mode="bilinear"), (2, 3, 64, 64)),
    (dict(layers=(1, 1, 1, 1), spatial_dims=2, psp_block_num=0, upsample_mode="nearest"), (2, 1, 32, 33)),
]
FULL = (dict(out_channels=3), (1, 1, 128, 128, 32))
IDS = [f"{c.get('spatial_dims', 3)}d-{c.get('upsample_mode', 'transpose')}-psp{c['psp_block_num']}" for c, _ in CONFIGS]


def _input(shape, dtype):
    return torch.randn(shape, generator=torch.Generator().manual_seed(99), dtype=torch.float64).to(dtype)


def _compare(ours, theirs, rtol, atol_scale, what):
    y, dx, grads, bufs = ours
    ty, tdx, tgrads, tbufs = theirs
    assert_close_normwise(y, ty, rtol, what=f"{what} output")
    assert_close_normwise(dx, tdx, rtol, what=f"{what} input grad")
    # atol relative to the size of all gradients: some gradients are exactly zero in exact arithmetic
    # (a per-channel shift feeding a training-mode BatchNorm), and then only rounding noise remains.
    atol = atol_scale * flat(tgrads).norm().item()
    assert list(grads) == list(tgrads)
    for name in grads:
        assert_close_normwise(grads[name], tgrads[name], rtol, atol, what=f"{what} grad {name}")
    for name in bufs:
        assert_close_normwise(bufs[name].double(), tbufs[name].double(), rtol, what=f"{what} buffer {name}")


@pytest.mark.parametrize("kwargs,shape", CONFIGS, ids=IDS)
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_float64_same_function(kwargs, shape, train):
    """In float64 the fused path equals MONAI to rounding: the same function, the same gradients."""
    theirs, ours = twins(monai_nets.AHNet, ahnet_fast.AHNet, kwargs, dtype=torch.float64)
    theirs.train(train), ours.train(train)
    x = _input(shape, torch.float64)
    _compare(run_model(ours, x), run_model(theirs, x), 1e-10, 1e-12, "float64")


@pytest.mark.parametrize("kwargs,shape", CONFIGS, ids=IDS)
def test_float32_eval_within_1e5(kwargs, shape):
    theirs, ours = twins(monai_nets.AHNet, ahnet_fast.AHNet, kwargs)
    theirs.eval(), ours.eval()
    _judge_float32_eval(theirs, ours, _input(shape, torch.float32))


def _judge_float32_eval(theirs, ours, x):
    """Float32 in eval mode: the output within 1e-5 of MONAI's with every convolution path; output,
    gradients and buffers within 1e-5 with the convolutions in ATen's summation order.

    With the faster paths (matrix products, shifted taps) the gradients are not compared at 1e-5: at
    random initialisation they are discontinuous (ReLU and max-pool kinks), and the float64 network
    itself moves its input gradient by ~2e-3 when its input moves by 1e-6 relative (a kink flips) —
    the size of the float32 rounding of a forward summed in another order. Those paths are checked
    per convolution instead (tests/test_aniso_conv.py, float32 within 2x ATen's own error)."""
    got = run_model(ours, x)
    ref = run_model(theirs, x)
    assert_close_normwise(got[0], ref[0], 1e-5, what="float32 eval output")
    with aniso_conv.use_path("aten"):
        _compare(run_model(ours, x), ref, 1e-5, 1e-7, "float32 eval (ATen convolution order)")


@pytest.mark.parametrize("kwargs,shape", CONFIGS[:3] + CONFIGS[5:6], ids=IDS[:3] + IDS[5:6])
def test_float32_train_reference_backend_within_1e5(kwargs, shape):
    """The reference backend is MONAI's arithmetic: float32 training steps agree to 1e-5 (in practice, bitwise)."""
    theirs, ours = twins(monai_nets.AHNet, ahnet_fast.AHNet, kwargs, ours_kwargs=dict(backend="reference"))
    x = _input(shape, torch.float32)
    _compare(run_model(ours, x), run_model(theirs, x), 1e-5, 1e-7, "float32 train (reference)")


def _errors_against(truth, result, training: bool) -> dict:
    """Relative errors of one run's output, input gradient, parameter gradients (together) and, in
    training mode, running statistics (together) against the float64 run."""
    errors = {"output": rel_err(result[0], truth[0]), "input grad": rel_err(result[1], truth[1]),
              "parameter grads": rel_err(flat(result[2]), flat(truth[2]))}
    if training:
        stats = [n for n in truth[3] if not n.endswith("num_batches_tracked")]
        errors["running statistics"] = rel_err(flat({n: result[3][n] for n in stats}),
                                               flat({n: truth[3][n] for n in stats}))
    return errors


def _float32_errors(theirs, ours, truth_net, shape, seed, controls=False) -> dict:
    """Per quantity, (ahnet_fast's float32 error, MONAI's float32 error) against MONAI in float64 on one
    input. With ``controls``, MONAI's error is the largest over rounding-level variants of its own run:
    the other thread count, and the input moved by one part in 1e7 either way. Every run starts from
    copies of the given networks, so running statistics are compared after one step each."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    truth = run_model(copy.deepcopy(truth_net), x)
    ours_errors = _errors_against(truth, run_model(copy.deepcopy(ours), x.float()), truth_net.training)
    monai_runs = [run_model(copy.deepcopy(theirs), x.float())]
    if controls:
        threads = torch.get_num_threads()
        torch.set_num_threads(1 if threads > 1 else 2)
        try:
            monai_runs.append(run_model(copy.deepcopy(theirs), x.float()))
        finally:
            torch.set_num_threads(threads)
        monai_runs += [run_model(copy.deepcopy(theirs), (x * s).float()) for s in (1 + 1e-7, 1 - 1e-7)]
    monai_errors = [_errors_against(truth, run, truth_net.training) for run in monai_runs]
    return {name: (ours_errors[name], max(e[name] for e in monai_errors)) for name in ours_errors}


def _too_far(errors: dict) -> list[str]:
    return [f"{name}: ours {ours:.2e}, MONAI float32 {monai:.2e}" for name, (ours, monai) in errors.items()
            if ours > 3 * monai + 1e-7]


# every configuration but the one full 128x128 3D run (3D trilinear psp4): trilinear is covered at psp3
# and psp4 by 2D transpose, and that one run costs as much as the other seven together
ACCURACY_CONFIGS = [c for c, i in zip(CONFIGS, IDS) if i != "3d-trilinear-psp4"]
ACCURACY_IDS = [i for i in IDS if i != "3d-trilinear-psp4"]


def test_the_accuracy_configurations_cover_every_mode_and_level():
    covered = {(c.get("spatial_dims", 3), c.get("upsample_mode", "transpose")) for c, _ in ACCURACY_CONFIGS}
    assert covered >= {(3, "transpose"), (3, "trilinear"), (3, "nearest"), (2, "transpose"), (2, "bilinear"),
                       (2, "nearest")}
    assert {c["psp_block_num"] for c, _ in ACCURACY_CONFIGS} == {0, 1, 2, 3, 4}


@pytest.mark.parametrize("kwargs,shape", ACCURACY_CONFIGS, ids=ACCURACY_IDS)
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_float32_as_accurate_as_monai(kwargs, shape, train):
    """Float32 judged as low-precision kernels are: against MONAI run in float64, ahnet_fast's error
    (output, input gradient, all parameter gradients together, running statistics) is at most 3x
    MONAI's own float32 error, plus 1e-7.

    At random initialisation the network is discontinuous (ReLU and max-pool kinks; in training mode
    BatchNorm over small maps is ill-conditioned too): a pre-activation within float32 rounding of a
    kink lands on one side in one summation order and on the other in another, and the gradient jumps
    (2D transpose psp4, eval, first input: ahnet_fast's input gradient 8.2e-3 off; MONAI's 1.2e-6 on one
    thread but 8.2e-3 on two). MONAI's own error is then not one number but depends on rounding. So
    where the plain comparison fails, MONAI's error is taken as the largest over rounding-level
    variants of its run (thread count, input moved by 1e-7), and the verdict is the majority over
    three inputs."""
    theirs, ours = twins(monai_nets.AHNet, ahnet_fast.AHNet, kwargs)
    theirs.train(train), ours.train(train)
    truth_net = deepcopy_to(theirs, torch.float64)
    if not _too_far(_float32_errors(theirs, ours, truth_net, shape, 99)):
        return
    failed = {}
    for seed in (99, 100, 101):
        bad = _too_far(_float32_errors(theirs, ours, truth_net, shape, seed, controls=True))
        if bad:
            failed[seed] = bad
        elif seed == 99 or len(failed) > 1:
            break  # the controls explain the first input, or the majority is decided
    assert len(failed) <= 1, "; ".join(f"input {seed}: " + ", ".join(bad) for seed, bad in failed.items())


@pytest.mark.slow
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_full_size_default_network_float64(train):
    theirs, ours = twins(monai_nets.AHNet, ahnet_fast.AHNet, FULL[0], dtype=torch.float64)
    theirs.train(train), ours.train(train)
    x = _input(FULL[1], torch.float64)
    _compare(run_model(ours, x), run_model(theirs, x), 1e-10, 1e-12, "full float64")


def test_full_size_default_network_float32_eval():
    theirs, ours = twins(monai_nets.AHNet, ahnet_fast.AHNet, FULL[0])
    theirs.eval(), ours.eval()
    _judge_float32_eval(theirs, ours, _input(FULL[1], torch.float32))


@pytest.mark.parametrize("kwargs", [dict(), dict(upsample_mode="trilinear", out_channels=3), dict(spatial_dims=2),
                                    dict(psp_block_num=0, in_channels=4)])
def test_state_dicts_interchange(kwargs):
    """Same keys, shapes and order as MONAI, in both directions, strict=True; the same seed gives the
    same initial weights (same modules created in the same order, same initialisation)."""
    torch.manual_seed(5)
    theirs = monai_nets.AHNet(**kwargs)
    torch.manual_seed(5)
    ours = ahnet_fast.AHNet(**kwargs)
    a, b = theirs.state_dict(), ours.state_dict()
    assert list(a) == list(b)
    for k in a:
        assert a[k].shape == b[k].shape and a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k
    theirs.load_state_dict(ours.state_dict(), strict=True)
    assert [n for n, _ in theirs.named_modules()] == [n for n, _ in ours.named_modules()]


def test_parameter_count_matches_paper_and_monai():
    ours = ahnet_fast.AHNet(out_channels=3)
    n = sum(p.numel() for p in ours.parameters())
    assert n == sum(p.numel() for p in monai_nets.AHNet(out_channels=3).parameters())
    assert 38.0e6 < n < 38.3e6  # ~38.1 M in transpose mode


def test_checkpoint_roundtrip_weights_only(tmp_path):
    theirs = monai_nets.AHNet(layers=(1, 1, 1, 1), psp_block_num=1)
    path = tmp_path / "monai_ahnet.pt"
    torch.save(theirs.state_dict(), path)
    ours = ahnet_fast.AHNet(layers=(1, 1, 1, 1), psp_block_num=1)
    ours.load_state_dict(torch.load(path, weights_only=True), strict=True)
    for k, v in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[k], v)
