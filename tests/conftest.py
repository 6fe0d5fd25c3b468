import os

import pytest
import torch

# Keep the suite quick and deterministic on the 2-core CI machine. Under pytest-xdist (scripts/test.sh
# runs one worker per core) each worker computes on one thread: two workers of two threads each would
# oversubscribe the cores (OpenMP threads spin at every barrier). The multithreaded kernel paths keep
# their own tests, which set the thread count themselves (tests/test_threads.py).
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, os.cpu_count() or 1))

# Without a GPU, Triton kernels run in Triton's interpreter on CPU tensors; Triton reads this when
# a kernel is defined, so it is set before any test imports ahnet_fast's kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Norm-wise relative error of a against the reference b."""
    a, b = a.detach().double(), b.detach().double()
    denom = b.norm().item()
    return (a - b).norm().item() / denom if denom > 0 else (a - b).norm().item()


def assert_close_normwise(a, b, rtol, atol=0.0, what=""):
    """||a - b|| <= rtol * ||b|| + atol (atol lets mathematically-zero references through)."""
    a, b = a.detach().double(), b.detach().double()
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} vs {tuple(b.shape)}"
    err = (a - b).norm().item()
    bound = rtol * b.norm().item() + atol
    assert err <= bound, f"{what}: ||a-b|| = {err:.3e} > {bound:.3e} (rel {rel_err(a, b):.3e})"


class ConcatInput(torch.nn.Module):
    """A pyramid-pooling module called as AH-Net calls it: its output concatenated with its input."""

    def __init__(self, psp):
        super().__init__()
        self.psp = psp

    def forward(self, x):
        return self.psp(x, concat_input=True)


@pytest.fixture
def seed():
    torch.manual_seed(1234)
    return 1234
