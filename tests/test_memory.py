"""The memory planner: exact parameter/optimizer bytes, a traced activation estimate that follows the
configuration, the plan search and its errors. (Estimate vs measured peaks: benchmarks/bench_memory.py.)"""
import pytest
import torch

import ahnet_fast
from ahnet_fast.memory import MemoryEstimate, estimate_training_memory, parse_bytes, plan


@pytest.fixture(scope="module")
def model():
    with torch.device("meta"):
        return ahnet_fast.AHNet(layers=(1, 1, 1, 1), in_channels=1, out_channels=3, psp_block_num=2)


def test_parameters_gradients_and_optimizer_state_are_exact(model):
    n = sum(p.numel() for p in model.parameters())
    for optimizer, moments in (("adam", 2), ("sgd", 0), ("sgd_momentum", 1)):
        est = estimate_training_memory(model, (1, 1, 64, 64, 32), optimizer=optimizer)
        assert est.parameters == est.gradients == 4 * n
        assert est.optimizer_state == moments * 4 * n
        assert est.total == sum(v for k, v in est.as_dict().items() if k != "total")


def test_activations_follow_the_configuration(model):
    base = estimate_training_memory(model, (1, 1, 64, 64, 32))
    double = estimate_training_memory(model, (2, 1, 64, 64, 32))
    assert 1.9 < double.activations / base.activations < 2.1  # linear in the batch
    half = estimate_training_memory(model, (1, 1, 64, 64, 32), dtype="bf16")
    assert 0.45 < half.activations / base.activations < 0.6  # 16-bit activations, 8-bit pool positions kept
    policies = {p: estimate_training_memory(model, (1, 1, 64, 64, 32), checkpoint=p).activations
                for p in ("none", "encoder", "decoder", "all")}
    assert policies["all"] < min(policies["encoder"], policies["decoder"]) <= policies["none"]


def test_the_fused_path_is_what_is_traced(model):
    """The trace runs the same ops as the real step: with the reference backend it keeps more."""
    if not ahnet_fast.extension_available():
        pytest.skip("compiled extension not built")
    fused = estimate_training_memory(model, (1, 1, 64, 64, 32))
    with ahnet_fast.backend("reference"):
        reference = estimate_training_memory(model, (1, 1, 64, 64, 32))
    assert fused.activations < 0.7 * reference.activations


def test_parse_bytes():
    assert parse_bytes("16GB") == 16 * 2**30 == parse_bytes("16 GiB") == parse_bytes(16 * 2**30)
    assert parse_bytes("512MB") == 512 * 2**20 and parse_bytes("1.5e9") == 1_500_000_000
    with pytest.raises(ValueError, match="cannot read 'lots' as a size"):
        parse_bytes("lots")


def test_plan_picks_the_fastest_that_fits(model):
    roomy = plan("64GB", (64, 64, 32), model=model, max_batch=2)
    assert roomy["precision"] == "bf16" and roomy["checkpoint"] == "none" and roomy["batch"] == 2
    smallest = min(r["total"] for r in roomy["table"])
    tight = plan(int(smallest * 1.01), (64, 64, 32), model=model, max_batch=2)
    assert tight["estimate"].total <= smallest * 1.01 and tight["batch"] == 1
    assert isinstance(tight["estimate"], MemoryEstimate)
    with pytest.raises(ValueError, match="nothing fits"):
        plan(int(smallest * 0.5), (64, 64, 32), model=model, max_batch=2)


def test_bad_arguments_are_value_errors(model):
    with pytest.raises(ValueError, match="checkpoint must be one of"):
        estimate_training_memory(model, (1, 1, 32, 32, 32), checkpoint="some")
    with pytest.raises(ValueError, match="optimizer must be one of"):
        estimate_training_memory(model, (1, 1, 32, 32, 32), optimizer="lion")
    with pytest.raises(ValueError, match="input_shape must be"):
        estimate_training_memory(model, (1, 2, 32, 32, 32))
    with pytest.raises(ValueError, match="dtype must be one of"):
        estimate_training_memory(model, (1, 1, 32, 32, 32), dtype="int8")
    with pytest.raises(ValueError, match="ahnet_fast.AHNet"):
        estimate_training_memory(torch.nn.Linear(2, 2), (1, 2))
    with pytest.raises(ValueError):
        estimate_training_memory(model, (1, 1, 30, 32, 32))  # not a size AH-Net takes
