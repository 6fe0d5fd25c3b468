"""The Triton focal-loss kernel, run in Triton's interpreter on CPU tensors (on a GPU machine, on CUDA),
against the reference; and the ahead-of-time compile check of every Triton kernel."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import ahnet_fast
from ahnet_fast.ops import focal_loss
from ahnet_fast.ops.focal_loss import _prepare, _triton_reasons
from tests.conftest import assert_close_normwise, rel_err

pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
runs_here = pytest.mark.skipif(DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1",
                               reason="needs a GPU or TRITON_INTERPRET=1")


def data(shape, seed, dtype=torch.float32, layout="contiguous"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 2
    labels = torch.randint(0, max(shape[1], 2), (shape[0], *shape[2:]), generator=g)
    onehot = F.one_hot(labels, max(shape[1], 2)).movedim(-1, 1).float()[:, :shape[1]]
    if layout == "channels_last_3d":
        x = x.contiguous(memory_format=torch.channels_last_3d)
    return x.to(dtype).to(DEVICE), labels.to(DEVICE), onehot.to(DEVICE)


def run(x, target, backend, **kw):
    xi = x.detach().clone().requires_grad_()
    loss = focal_loss(xi, target, backend=backend, **kw)
    loss.backward()
    return loss.detach(), xi.grad


CASES = []
for softmax in (False, True):
    for kind in ("labels", "onehot"):
        for include_background in (True, False):
            for gamma, reduction in ((2.0, "mean"), (0.5, "sum"), (0.0, "mean")):
                CASES.append(dict(softmax=softmax, kind=kind, include_background=include_background, gamma=gamma,
                                  reduction=reduction))


@runs_here
@pytest.mark.parametrize("case", CASES, ids=[f"{'softmax' if c['softmax'] else 'sigmoid'}-{c['kind']}-bg"
                                             f"{int(c['include_background'])}-g{c['gamma']}-{c['reduction']}"
                                             for c in CASES])
def test_triton_matches_reference(case):
    x, labels, onehot = data((2, 4, 5, 3, 4), seed=len(str(case)))
    target = labels if case["kind"] == "labels" else onehot
    kw = dict(use_softmax=case["softmax"], include_background=case["include_background"], gamma=case["gamma"],
              reduction=case["reduction"], alpha=[0.2, 0.4, 0.6, 0.8][0 if case["include_background"] else 1:],
              weight=2.0)
    ref = run(x, target, "reference", **kw)
    got = run(x, target, "triton", **kw)
    assert_close_normwise(got[0], ref[0], 1e-5)
    assert_close_normwise(got[1], ref[1], 1e-5, 1e-9)


@runs_here
@pytest.mark.parametrize("softmax", [False, True])
@pytest.mark.parametrize("ignore_index", [255, 1])
def test_triton_ignore_index_and_channels_last(softmax, ignore_index):
    x, labels, _ = data((2, 3, 6, 4, 3), seed=3, layout="channels_last_3d")
    labels[0, :2] = ignore_index
    kw = dict(use_softmax=softmax, ignore_index=ignore_index, reduction="sum")
    ref = run(x, labels, "reference", **kw)
    got = run(x, labels, "triton", **kw)
    assert got[1].stride() == x.stride()
    assert_close_normwise(got[0], ref[0], 1e-5)
    assert_close_normwise(got[1], ref[1], 1e-5, 1e-9)


@runs_here
def test_triton_binary_single_channel_and_fp16():
    x, labels, _ = data((2, 1, 6, 5, 2), seed=4)
    binary = (labels % 2).long()
    for target in (binary, binary.unsqueeze(1).float()):
        assert_close_normwise(run(x, target, "triton")[1], run(x, target, "reference")[1], 1e-5, 1e-9)
    x16 = x.to(torch.float16)
    truth = run(x16.double(), labels % 1, "reference")
    got, ref = run(x16, labels % 1, "triton"), run(x16, labels % 1, "reference")
    assert got[1].dtype == torch.float16
    assert rel_err(got[1], truth[1]) <= 2 * rel_err(ref[1], truth[1]) + 1e-3


@runs_here
def test_triton_bad_labels_raise():
    x, labels, _ = data((1, 3, 4, 4, 2), seed=5)
    labels[0, 0, 0, 0] = 7
    with pytest.raises(ValueError, match="labels must be 0..2"):
        focal_loss(x, labels, backend="triton")


@runs_here
def test_triton_opcheck():
    x, labels, _ = data((2, 3, 4, 3, 2), seed=6)
    ones = torch.ones(3, dtype=torch.float64)
    scale = torch.full((2,), 0.25, dtype=torch.float64)
    from ahnet_fast.ops.focal_loss import _triton_op

    torch.library.opcheck(_triton_op(), (x.clone().requires_grad_(), labels, ones, ones, scale, 2.0, True, True, 0, 0,
                                         False, True, True))


def test_triton_reasons_without_the_interpreter(monkeypatch):
    x, labels, _ = data((1, 3, 4, 4, 2), seed=7)
    x = x.cpu()
    p = _prepare(x, labels.cpu(), gamma=2.0, alpha=None, weight=None, reduction="mean", use_softmax=True,
                 include_background=True, to_onehot_y=False, ignore_index=None)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert any("TRITON_INTERPRET=1" in r for r in _triton_reasons(p))


def test_compile_check_sm80_sm90_no_spills():
    """Every Triton kernel compiles ahead of time for sm_80 and sm_90 with no register spill."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "ahnet_fast.kernels.compile_check"], capture_output=True, text=True,
                         env=env, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert " 0 failures" in out.stdout and "sm_90" in out.stdout and "sm_80" in out.stdout
