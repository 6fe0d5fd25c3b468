"""Every op's backend is decided by its table in ops/ (ahnet_fast.backends.register), and the
contract holds for every op: a forced backend that cannot run a call raises
BackendUnavailableError naming the op and the reason; each backend that can run gives the
reference's result; ``explain`` says which runs and why."""
import importlib

import pytest
import torch

import ahnet_fast
from ahnet_fast import BackendUnavailableError, backends
from ahnet_fast import ops
from tests.conftest import assert_close_normwise

D = torch.float64


def sample_calls():
    """op name -> (run(backend) -> output, the arguments its table's reasons take), from each op's own
    test file (tests/test_<op>.py: dispatch_sample), so a new op brings its row with its tests."""
    calls = {}
    for op in sorted(backends.registered()):
        module = importlib.import_module(f"tests.test_{op}")
        assert hasattr(module, "dispatch_sample"), f"tests/test_{op}.py has no dispatch_sample()"
        calls[op] = module.dispatch_sample()
    return calls


CALLS = sample_calls()


def test_every_registered_op_has_a_sample_call():
    """A new op registers its table and gives a dispatch_sample in its test file, so the contract below
    covers it."""
    assert set(CALLS) == set(backends.registered()) and len(CALLS) >= 10


@pytest.mark.parametrize("op", sorted(CALLS))
def test_forced_triton_on_cpu_outside_the_interpreter_raises_naming_the_op(op, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    run, _ = CALLS[op]
    with pytest.raises(BackendUnavailableError, match=f"backend 'triton' cannot run {op}: .*TRITON_INTERPRET"):
        run("triton")


@pytest.mark.parametrize("op", sorted(CALLS))
def test_every_backend_that_runs_gives_the_reference_result(op):
    run, _ = CALLS[op]
    ref = run("reference")
    backends_run = ["auto", "cpp"] if ahnet_fast.extension_available() else ["auto"]
    for name in backends_run + ["triton"]:  # the tests run with TRITON_INTERPRET=1: triton on CPU tensors
        try:
            got = run(name)
        except BackendUnavailableError as exc:
            assert name != "auto", exc
            assert "float64" in str(exc) or "bfloat16" in str(exc) or "kernel" in str(exc), exc
            continue
        # float64 Triton runs only in the interpreter (on a GPU float64 is refused by reason), and the
        # focal-loss kernel keeps some constants in float32 there: judged at float32's tolerance
        tol = 1e-6 if name == "triton" and op == "focal_loss" else 1e-12
        assert_close_normwise(got, ref, tol, what=f"{op} {name}")


@pytest.mark.parametrize("op", sorted(CALLS))
def test_without_the_extension_auto_runs_and_forced_cpp_says_why(op, monkeypatch):
    from ahnet_fast.ops import _registry

    monkeypatch.setattr(_registry, "extension_available", lambda: False)
    monkeypatch.setattr(_registry, "extension_error", lambda: "simulated")
    run, _ = CALLS[op]
    ref = run("reference")
    tol = 1e-12
    assert_close_normwise(run("auto"), ref, tol, what=op)
    table = {impl.backend: impl for impl in backends.registered()[op]}
    needs_kernel = op not in ("pointwise_conv", "transposed_conv")  # their CPU path is ATen
    if needs_kernel:
        with pytest.raises(BackendUnavailableError, match=f"backend 'cpp' cannot run {op}: .*not loaded"):
            run("cpp")
    else:
        assert_close_normwise(run("cpp"), ref, tol, what=op)
    assert "reference" in table


def test_explain_names_the_choice_and_every_reason(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x = CALLS["slice_max_pool"][1][0]
    report = backends.explain("slice_max_pool", x.device, x)
    assert report["chosen"] == ("cpp" if ahnet_fast.extension_available() else "reference")
    assert report["implementations"]["triton"]["not_supported"]
    assert report["implementations"]["reference"]["not_supported"] == []
    forced = backends.explain("slice_max_pool", x.device, x, explicit="triton")
    assert forced["chosen"] is None and "TRITON_INTERPRET" in forced["error"]


def test_auto_passes_over_a_backend_measured_slower_but_forcing_it_runs_it():
    """bn_add_relu: the compiled kernel is slower on small maps; auto takes the composition."""
    if not ahnet_fast.extension_available():
        pytest.skip("compiled extension not built")
    small = torch.randn(1, 8, 4, 4, 2, dtype=D)
    report = backends.explain("bn_add_relu", small.device, small, small)
    assert report["chosen"] == "reference" and report["implementations"]["cpp"]["slower"]
    assert backends.select("bn_add_relu", backends.registered()["bn_add_relu"], small.device,
                           (small, small), "cpp") == "cpp"


def test_a_table_without_a_reference_or_with_an_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="reference"):
        backends.register("bad", (backends.Implementation("cpp", lambda *a: []),))
    with pytest.raises(ValueError, match="distinct"):
        backends.register("bad", (backends.Implementation("reference", lambda *a: []),
                                  backends.Implementation("cuda", lambda *a: [])))
    assert "bad" not in backends.registered()


def test_an_unknown_backend_name_is_a_value_error():
    with pytest.raises(ValueError, match="unknown backend 'gpu'"):
        CALLS["slice_max_pool"][0]("gpu")


def test_recording_counts_the_backend_of_every_call_and_nests():
    x = CALLS["slice_max_pool"][1][0]
    with backends.recording() as outer:
        ops.slice_max_pool(x, 2, backend="reference")
        with backends.recording() as inner:
            ops.slice_max_pool(x, 2, backend="reference")
            ops.pointwise_conv(x, torch.randn(3, 4, 1, 1, 1, dtype=D), None, (1, 1, 1), backend="reference")
    assert outer == {"slice_max_pool": {"reference": 2}, "pointwise_conv": {"reference": 1}}
    assert inner == {"slice_max_pool": {"reference": 1}, "pointwise_conv": {"reference": 1}}
    ops.slice_max_pool(x, 2)  # outside: nothing recorded, nothing kept
    assert outer["slice_max_pool"] == {"reference": 2}


def test_recording_names_a_fallback_from_a_failed_triton_kernel(monkeypatch):
    """A Triton kernel that fails under auto: the call runs the next backend, and the record says so."""
    from ahnet_fast.kernels import errors

    monkeypatch.setattr(backends, "device_preference", lambda device: ("triton", "cpp", "reference"))
    logits = torch.randn(2, 3, 9, 7)
    labels = torch.randint(0, 3, (2, 9, 7))
    backends.clear_fallback_report()
    errors.inject_failure("focal_loss_fwd_kernel")
    try:
        with pytest.warns(RuntimeWarning, match="focal_loss_fwd_kernel"), backends.recording() as ran:
            ops.focal_loss(logits, labels, use_softmax=True)
    finally:
        errors.clear_injected_failures()
        backends.clear_fallback_report()
    expected = "cpp" if ahnet_fast.extension_available() else "reference"
    assert ran == {"focal_loss": {"triton": 1, f"{expected} after triton failed": 1}}
