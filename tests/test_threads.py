"""The compiled kernels with several threads: their parallel loops split channels, planes and rows
among threads and combine per-thread partial sums, which one thread never exercises. The rest of the
suite may run on one thread per pytest-xdist worker (tests/conftest.py), so these tests set the
thread count themselves."""
import importlib

import pytest
import torch

import ahnet_fast
from ahnet_fast import backends
from tests.conftest import assert_close_normwise

pytestmark = pytest.mark.skipif(not ahnet_fast.extension_available(), reason="compiled extension not built")


@pytest.fixture
def threads():
    before = torch.get_num_threads()

    def use(n):
        torch.set_num_threads(n)

    yield use
    torch.set_num_threads(before)


def _weighted_sum(out):
    """A scalar whose gradient reaches every output element with a different weight."""
    return (out * torch.linspace(-1.0, 1.0, out.numel(), dtype=out.dtype).reshape(out.shape)).sum()


@pytest.mark.parametrize("op", sorted(backends.registered()))
@pytest.mark.parametrize("n_threads", [2, 3])
def test_compiled_backend_with_several_threads_gives_the_reference_result(op, n_threads, threads):
    """Every op's cpp backend (the float64 sample from its test file) with 2 and 3 threads (3: uneven
    splits) equals the reference; the network test below covers the backward kernels."""
    threads(n_threads)
    run, args = importlib.import_module(f"tests.test_{op}").dispatch_sample()
    try:
        got = run("cpp")
    except backends.BackendUnavailableError as exc:
        pytest.skip(f"{op}: {exc}")
    assert_close_normwise(got, run("reference"), 1e-12, what=f"{op} with {n_threads} threads")


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_ahnet_step_with_two_threads_equals_one_thread(train, threads):
    """A whole forward and backward in float64: the thread count changes only the order of some sums."""
    results = []
    for n in (1, 2):
        threads(n)
        torch.manual_seed(0)
        net = ahnet_fast.AHNet(layers=(1, 1, 1, 1), psp_block_num=2).double().train(train)
        x = torch.randn(2, 1, 64, 64, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        x.requires_grad_()
        loss = _weighted_sum(net(x))
        loss.backward()
        results.append((loss.detach(), x.grad, torch.cat([p.grad.flatten() for p in net.parameters()])))
    for a, b, what in zip(results[0], results[1], ("output", "input gradient", "parameter gradients")):
        assert_close_normwise(b, a, 1e-10, what=what)
