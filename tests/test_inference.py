"""Sliding-window inference: window layout, Gaussian weights, exact stitching, devices, errors."""
import math

import pytest
import torch
from torch import nn

from ahnet_fast import inference
from ahnet_fast.inference import (
    MIN_GAUSSIAN_WEIGHT,
    gaussian_weight,
    sliding_window_inference,
    window_positions,
)


def close(a, b, tol=1e-6):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


# ----------------------------------------------------------------------------- window layout
@pytest.mark.parametrize(
    "size, window, overlap, expected",
    [
        (10, 4, 0.0, [0, 3, 6]),  # ceil(6 / 4) + 1 = 3 windows, last flush with the end
        (12, 8, 0.5, [0, 4]),  # the stride divides the span exactly: no extra window
        (20, 8, 0.5, [0, 4, 8, 12]),
        (8, 8, 0.5, [0]),  # fits
        (5, 8, 0.25, [0]),  # smaller: padded by the caller
        (9, 8, 0.0, [0, 1]),
        (11, 2, 0.99, list(range(10))),  # tiny stride: capped at one window per position
    ],
)
def test_window_positions_examples(size, window, overlap, expected):
    assert window_positions(size, window, overlap) == expected


@pytest.mark.parametrize("overlap", [0.0, 0.1, 0.25, 0.3, 0.5, 0.75, 0.9])
def test_window_positions_properties(overlap):
    for size in range(1, 70, 3):
        for window in (1, 4, 7, 16):
            pos = window_positions(size, window, overlap)
            assert pos[0] == 0
            if size <= window:
                assert pos == [0]
                continue
            assert pos[-1] == size - window
            assert all(b > a for a, b in zip(pos, pos[1:]))
            n = min(math.ceil((size - window) / (window * (1 - overlap)) - 1e-9) + 1, size - window + 1)
            assert len(pos) == n
            gaps = [b - a for a, b in zip(pos, pos[1:])]
            assert max(gaps) - min(gaps) <= 1  # spread evenly
            assert max(gaps) <= window  # the volume is covered without holes


# ----------------------------------------------------------------------------- gaussian weight
@pytest.mark.parametrize("window", [(7, 7), (8, 5), (6, 9, 4), (5, 5, 5), (1, 3, 2)])
def test_gaussian_weight_shape_symmetry_range(window):
    w = gaussian_weight(window)
    assert w.shape == window and w.dtype == torch.float32
    assert w.max().item() == 1.0
    assert (w > 0).all() and w.min().item() >= MIN_GAUSSIAN_WEIGHT * (1 - 1e-6)
    for axis in range(len(window)):
        assert torch.equal(w, w.flip(axis)), f"not symmetric along axis {axis}"
    # decreases from the centre outward along each axis
    centre = tuple(s // 2 for s in window)
    for axis, s in enumerate(window):
        line = w[centre[:axis] + (slice(None),) + centre[axis + 1 :]]
        half = line[: (s + 1) // 2]
        assert (half[1:] >= half[:-1]).all()


def test_gaussian_weight_is_clamped_not_zero():
    w = gaussian_weight((9, 9, 9), sigma_scale=0.02)  # unclamped corners would underflow to 0
    assert w.min().item() == pytest.approx(MIN_GAUSSIAN_WEIGHT)
    assert w.max().item() == 1.0


def test_gaussian_weight_per_axis_sigma_and_device():
    w = gaussian_weight((9, 9), sigma_scale=(0.125, 0.5), device="cpu")
    assert w.device.type == "cpu"
    assert w[0, 4] < w[4, 0]  # wider along the second axis


@pytest.mark.parametrize("bad", [0.0, -1.0, float("inf"), float("nan")])
def test_gaussian_weight_bad_sigma(bad):
    with pytest.raises(ValueError, match="sigma_scale"):
        gaussian_weight((5, 5), sigma_scale=bad)


# ----------------------------------------------------------------------------- exact stitching
SHAPES = {
    2: [((2, 2, 37, 29), (16, 12)), ((1, 3, 9, 6), (16, 12))],  # odd sizes; smaller than the window
    3: [((2, 2, 21, 17, 9), (8, 8, 4)), ((1, 2, 5, 19, 3), (8, 8, 4))],  # odd; some axes padded
}


@pytest.mark.parametrize("blend", ["gaussian", "constant"])
@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("overlap", [0.0, 0.5])
@pytest.mark.parametrize("window_batch", [1, 3])
def test_identity_predictor_reproduces_full_volume(blend, ndim, overlap, window_batch):
    torch.manual_seed(0)
    for shape, window in SHAPES[ndim]:
        x = torch.randn(shape)
        out = sliding_window_inference(x, lambda t: t, window, overlap=overlap, window_batch=window_batch, blend=blend)
        assert out.shape == x.shape and out.dtype == torch.float32
        close(out, x)

        conv_cls = nn.Conv2d if ndim == 2 else nn.Conv3d
        conv = conv_cls(shape[1], 4, kernel_size=1).eval()  # pointwise: window-independent
        out = sliding_window_inference(x, conv, window, overlap=overlap, window_batch=window_batch, blend=blend)
        with torch.no_grad():
            close(out, conv(x))


def _receptive_field_mask(size, window, positions, radius):
    """Voxels along one axis whose receptive field (clipped to the volume) lies inside every
    window that covers them: there a padding-free-in-the-interior network must be exact."""
    ok = torch.ones(size, dtype=torch.bool)
    for p in range(size):
        for s in positions:
            if s <= p < s + window and (max(p - radius, 0) < s or min(p + radius, size - 1) > s + window - 1):
                ok[p] = False
    return ok


RADIUS = (2, 2, 1)  # receptive field radius of _small_net per axis


def _small_net(seed=0):
    """An anisotropic 3x3x1 then a 3x3x3 convolution (receptive field radius 2, 2, 1), like
    AH-Net's kernels: translation-equivariant, and its zero padding at the volume border is the
    same in a window flush with that border as in the whole volume."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv3d(2, 6, (3, 3, 1), padding=(1, 1, 0)), nn.Tanh(), nn.Conv3d(6, 3, 3, padding=1)
    ).eval()


@pytest.mark.parametrize("blend", ["gaussian", "constant"])
def test_conv_net_exact_where_receptive_field_inside_windows(blend):
    net = _small_net()
    torch.manual_seed(1)
    shape, window, overlap = (1, 2, 26, 21, 11), (12, 10, 6), 0.5
    x = torch.randn(shape)
    out = sliding_window_inference(x, net, window, overlap=overlap, window_batch=2, blend=blend)
    with torch.no_grad():
        full = net(x)
    masks = [
        _receptive_field_mask(s, w, window_positions(s, w, overlap), r)
        for s, w, r in zip(shape[2:], window, RADIUS)
    ]
    mask = masks[0][:, None, None] & masks[1][None, :, None] & masks[2][None, None, :]
    assert mask.float().mean() > 0.1, "test layout leaves too few exact voxels to be meaningful"
    assert not mask.all(), "test layout should contain window seams"
    close(out[:, :, mask], full[:, :, mask], tol=1e-5)
    # at the seams the result differs from the full-volume prediction, but only by the border
    # effect of the windows: bounded, and smaller with Gaussian weights than with plain averaging
    err = (out - full).norm() / full.norm()
    assert err < (0.1 if blend == "gaussian" else 0.5)


def test_gaussian_blending_reduces_seam_error():
    net = _small_net(seed=3)
    x = torch.randn(1, 2, 24, 20, 8)
    with torch.no_grad():
        full = net(x)
    errs = {}
    for blend in ("gaussian", "constant"):
        out = sliding_window_inference(x, net, (8, 8, 4), overlap=0.5, blend=blend)
        errs[blend] = ((out - full).norm() / full.norm()).item()
    assert errs["gaussian"] < 0.5 * errs["constant"], errs


def test_conv_net_matches_naive_reference_everywhere(monkeypatch):
    """The blend itself, seams included, against a direct float64 transcription of the
    definition sum_k w_k f(crop_k) / sum_k w_k (positions written out by hand)."""
    net = _small_net(seed=2)
    torch.manual_seed(4)
    x = torch.randn(2, 2, 12, 9, 3)
    window = (8, 6, 4)  # Z (3) is shorter than the window: padded to 4 (0 before, 1 after)
    starts = ([0, 4], [0, 3], [0])  # overlap 0.5: strides 4 and 3 divide the spans 4 and 3
    w = gaussian_weight(window).double()
    num = torch.zeros(2, 3, 12, 9, 3, dtype=torch.float64)
    den = torch.zeros(12, 9, 3, dtype=torch.float64)
    for sx in starts[0]:
        for sy in starts[1]:
            crop = torch.nn.functional.pad(x[:, :, sx : sx + 8, sy : sy + 6, :], (0, 1), value=0.5)
            with torch.no_grad():
                y = net(crop).double()[..., :3]
            num[:, :, sx : sx + 8, sy : sy + 6, :] += y * w[..., :3]
            den[sx : sx + 8, sy : sy + 6, :] += w[..., :3]
    ref = (num / den).float()
    out = sliding_window_inference(x, net, window, overlap=0.5, window_batch=3, pad_value=0.5)
    close(out, ref, tol=1e-5)
    # the weight sum formed a few rows at a time (slabs cut across windows and their overlaps)
    for slab_rows in (1, 5):
        monkeypatch.setattr(inference, "_NORMALISE_SLAB_BYTES", slab_rows * 9 * 3 * 4)
        out = sliding_window_inference(x, net, window, overlap=0.5, window_batch=3, pad_value=0.5)
        close(out, ref, tol=1e-5)


def test_padding_uses_pad_value_and_is_cropped_back():
    seen = []

    def predictor(t):
        seen.append(t.clone())
        return t * 2

    x = torch.randn(1, 1, 5, 3)
    out = sliding_window_inference(x, predictor, (8, 6), pad_value=-7.0)
    assert out.shape == x.shape
    close(out, x * 2)
    (window,) = seen
    assert window.shape == (1, 1, 8, 6)
    # symmetric padding: the content sits in the middle (1 before / 2 after on X, 1 / 2 on Y)
    assert torch.equal(window[0, 0, 1:6, 1:4], x[0, 0])
    assert (window[0, 0, 0] == -7).all() and (window[0, 0, 6:] == -7).all()
    assert (window[0, 0, :, 0] == -7).all() and (window[0, 0, :, 4:] == -7).all()


def test_windows_batched_and_samples_kept_apart():
    calls = []

    def predictor(t):
        calls.append(t.shape[0])
        return t[:, :1] * 10 + t[:, 1:2]

    x = torch.randn(3, 2, 9, 9)  # 3 samples x (2 x 2 windows) = 12 windows
    out = sliding_window_inference(x, predictor, (6, 6), overlap=0.5, window_batch=5)
    assert calls == [5, 5, 2]  # never more than window_batch windows at once
    close(out, x[:, :1] * 10 + x[:, 1:2], tol=1e-5)


def test_module_state_is_left_alone():
    net = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.BatchNorm2d(2))
    net.train()
    sliding_window_inference(torch.randn(1, 1, 12, 12), net, (8, 8))
    assert net.training and all(m.training for m in net.modules())
    net.eval()
    sliding_window_inference(torch.randn(1, 1, 12, 12), net, (8, 8))
    assert not any(m.training for m in net.modules())


def test_no_grad_inside():
    net = _small_net()
    out = sliding_window_inference(torch.randn(1, 2, 8, 8, 4, requires_grad=True), net, (8, 8, 4))
    assert not out.requires_grad


# ----------------------------------------------------------------------------- devices, amp, progress
def test_output_device_cpu():
    x = torch.randn(1, 2, 13, 11, 5)
    net = _small_net()
    out = sliding_window_inference(x, net, (8, 8, 4), output_device="cpu", device="cpu")
    assert out.device.type == "cpu"
    out_auto = sliding_window_inference(x, net, (8, 8, 4), output_device="auto")
    assert out_auto.device.type == "cpu"
    close(out, out_auto, tol=0)


def test_stitch_device_choice():
    cpu, cuda0, cuda1 = torch.device("cpu"), torch.device("cuda", 0), torch.device("cuda", 1)
    fits_nowhere = lambda dev, n: False  # noqa: E731
    fits_everywhere = lambda dev, n: True  # noqa: E731
    only_cuda1 = lambda dev, n: dev == cuda1  # noqa: E731
    pick = inference._stitch_device
    assert pick(None, cpu, cuda0, 1, fits_nowhere) == cpu
    assert pick(None, cuda0, cuda0, 1, fits_everywhere) == cuda0
    assert pick(None, cuda0, cuda0, 1, fits_nowhere) == cpu  # the default falls back too
    assert pick("auto", cpu, cuda0, 1, fits_everywhere) == cuda0  # stitch where the windows are
    assert pick("auto", cuda1, cuda0, 1, only_cuda1) == cuda1
    assert pick("auto", cuda0, cuda0, 1, fits_nowhere) == cpu
    assert pick("auto", cpu, cpu, 1, fits_everywhere) == cpu
    assert pick(torch.device("cpu"), cuda0, cuda0, 1, fits_everywhere) == cpu  # forced
    assert pick(cuda0, cpu, cpu, 1, fits_nowhere) == cuda0  # forced, no second-guessing


def test_cuda_fits_uses_free_memory(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1000, 4000))
    assert inference._cuda_fits(torch.device("cuda", 0), 800)
    assert not inference._cuda_fits(torch.device("cuda", 0), 801)


def test_amp_bfloat16_on_cpu_is_close():
    net = _small_net()
    x = torch.randn(1, 2, 14, 12, 6)
    ref = sliding_window_inference(x, net, (8, 8, 4), overlap=0.5)
    out = sliding_window_inference(x, net, (8, 8, 4), overlap=0.5, amp=torch.bfloat16)
    assert out.dtype == torch.float32
    assert not torch.equal(out, ref)  # autocast really ran in bfloat16
    assert ((out - ref).norm() / ref.norm()).item() < 2e-2


def test_progress_bar(capsys):
    x = torch.randn(1, 1, 20, 20)
    out = sliding_window_inference(x, lambda t: t, (8, 8), overlap=0.5, progress=True)
    close(out, x)
    err = capsys.readouterr().err
    assert "sliding window" in err and "window" in err
    sliding_window_inference(x, lambda t: t, (8, 8), progress=False)
    assert capsys.readouterr().err == ""


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(window=(8, 8), overlap=1.0), "overlap"),
        (dict(window=(8, 8), overlap=-0.1), "overlap"),
        (dict(window=(8, 8), overlap=(0.5, 0.5, 0.5)), "overlap"),
        (dict(window=(8, 0)), "window"),
        (dict(window=(8, 8.5)), "window"),
        (dict(window=(8, 8, 8)), "spatial dims"),
        (dict(window=-3), "window"),
        (dict(window=(8, 8), window_batch=0), "window_batch"),
        (dict(window=(8, 8), blend="linear"), "blend"),
        (dict(window=(8, 8), amp=torch.float32), "amp"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sliding_window_inference(torch.randn(1, 1, 10, 10), lambda t: t, **kwargs)


@pytest.mark.parametrize(
    "x, match",
    [
        (torch.randn(10, 10), "spatial dims"),
        (torch.randn(1, 1, 4, 4, 4, 4), "spatial dims"),
        (torch.zeros(1, 1, 10, 10, dtype=torch.int64), "floating-point"),
        (torch.zeros(0, 1, 10, 10), "empty"),
    ],
)
def test_bad_inputs(x, match):
    with pytest.raises(ValueError, match=match):
        sliding_window_inference(x, lambda t: t, 4)


@pytest.mark.parametrize(
    "predictor, match",
    [
        (lambda t: t[..., :-1], "expected"),  # wrong window shape
        (lambda t: (t, t), "Tensor"),  # deep-supervision style tuple
        (lambda t: t[0], "expected"),  # dropped the batch axis
    ],
)
def test_bad_predictor_output(predictor, match):
    with pytest.raises(ValueError, match=match):
        sliding_window_inference(torch.randn(1, 1, 10, 10), predictor, (8, 8))


def test_window_and_overlap_accept_numpy_scalars():
    import numpy as np

    x = torch.randn(1, 1, 11, 9)
    out = sliding_window_inference(x, lambda t: t, np.array([6, 4]), overlap=np.float64(0.5), window_batch=np.int64(2))
    close(out, x)
    assert window_positions(np.int64(10), np.int32(4), np.float32(0.0)) == [0, 3, 6]
