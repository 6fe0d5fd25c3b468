"""ahnet_fast.data: synthetic phantom, NIfTI I/O and discovery, preprocessing, samplers.

All volumes are tiny (the default-size phantom is generated once, for its timing), so the file
runs in seconds on 2 cores.
"""
import json
import time
import warnings

import nibabel as nib
import numpy as np
import pytest
import torch

from ahnet_fast.data import (
    Case,
    CasePaths,
    PatchSampler,
    Preprocessing,
    SliceSampler,
    derive_case_seed,
    discover_cases,
    load_case,
    load_nifti,
    make_synthetic_case,
    preprocess,
    restore_inplane,
    save_nifti,
    synthetic_cases,
)

SMALL = 64  # in-plane size of the synthetic cases used by the tests


@pytest.fixture(scope="module")
def synth():
    return synthetic_cases(2, seed=11, size_xy=SMALL)


@pytest.fixture(scope="module")
def prepped(synth):
    return [preprocess(c, Preprocessing(spacing_xy=1.6)) for c in synth]


def _write(path, array, affine=None, dtype=None):
    """Write a fixture volume with nibabel directly (independent of save_nifti)."""
    array = np.asarray(array)
    img = nib.Nifti1Image(array, np.eye(4) if affine is None else affine)
    img.set_data_dtype(dtype or array.dtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))
    return path


def _blob_case(shape=(12, 10, 6), name="blob", spacing=(0.8, 0.8, 3.0)):
    rng = np.random.default_rng(0)
    image = rng.normal(40.0, 20.0, size=shape).astype(np.float32)
    x, y, z = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    label = np.zeros(shape, np.uint8)
    label[((x - 4) ** 2 + (y - 4) ** 2) < 5] = 1
    label[(x == 4) & (y == 4) & (z == 2)] = 2
    affine = np.diag([*spacing, 1.0])
    return Case(name=name, image=image, label=label, spacing=spacing, affine=affine)


# ---------------------------------------------------------------------------------------------
# synthetic
# ---------------------------------------------------------------------------------------------
def test_synthetic_deterministic_and_seed_dependent():
    a = make_synthetic_case(3, size_xy=SMALL)
    b = make_synthetic_case(3, size_xy=SMALL)
    c = make_synthetic_case(4, size_xy=SMALL)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.label, b.label)
    np.testing.assert_array_equal(a.affine, b.affine)
    assert a.spacing == b.spacing
    assert a.image.shape != c.image.shape or not np.array_equal(a.image, c.image)


def test_synthetic_cases_derive_seeds(synth):
    again = make_synthetic_case(derive_case_seed(11, 1), size_xy=SMALL)
    np.testing.assert_array_equal(synth[1].image, again.image)
    assert [c.name for c in synth] == ["synthetic-11-0000", "synthetic-11-0001"]
    # set 0's case 1 is not set 1's case 0
    assert derive_case_seed(0, 1) != derive_case_seed(1, 0)


def test_synthetic_looks_like_abdominal_ct(synth):
    for case in synth:
        img, lab = case.image, case.label
        assert img.dtype == np.float32 and lab.dtype == np.uint8 and img.shape == lab.shape
        assert set(np.unique(lab)) == {0, 1, 2}
        sx, sy, sz = case.spacing
        assert 0.7 <= sx <= 0.9 and sx == sy and 2.5 <= sz <= 5.0
        assert 115 <= img.shape[2] * sz <= 205
        assert img[0, 0].mean() < -900  # air outside the body
        assert img.max() > 400  # bone
        # windowed [-200, 250]: liver clearly brighter than the tissue around it, lesions darker than liver
        win = np.clip((img + 200) / 450, 0, 1)
        liver = lab == 1
        ring = np.zeros_like(liver)
        for dx, dy in [(4, 0), (-4, 0), (0, 4), (0, -4)]:
            ring |= np.roll(liver, (dx, dy), axis=(0, 1))
        ring &= (lab == 0) & (img > -500)
        assert win[liver].mean() - win[ring].mean() > 0.1
        assert win[liver].mean() - win[lab == 2].mean() > 0.04
        # lesions sit inside the liver: their in-plane neighbours are almost all liver or lesion
        lesion = lab == 2
        rim = np.zeros_like(lesion)
        for dx, dy in [(1, 0), (-1, 0), (0, 1), (0, -1)]:
            rim |= np.roll(lesion, (dx, dy), axis=(0, 1))
        rim &= ~lesion
        assert (lab[rim] > 0).mean() > 0.7
        assert lesion.sum() < (lab == 1).sum()


def test_synthetic_default_size_is_fast():
    make_synthetic_case(0, size_xy=64)  # warm-up (torch interpolate first call)
    t0 = time.perf_counter()
    case = make_synthetic_case(1)
    elapsed = time.perf_counter() - t0
    assert case.image.shape[:2] == (256, 256)
    assert elapsed < 5.0, f"256x256x{case.image.shape[2]} took {elapsed:.2f} s"


@pytest.mark.parametrize("bad", [-1, 1.5, "3", True])
def test_synthetic_rejects_bad_seed(bad):
    with pytest.raises(ValueError, match="seed"):
        make_synthetic_case(bad, size_xy=SMALL)


# ---------------------------------------------------------------------------------------------
# samplers
# ---------------------------------------------------------------------------------------------
def test_patch_sampler_deterministic_and_resumable(prepped):
    s1 = PatchSampler(prepped, (16, 16, 8), seed=7)
    s2 = PatchSampler(prepped, (16, 16, 8), seed=7)
    for step in range(5):
        s1.batch(step, 4)
    x1, y1 = s1.batch(5, 4)
    x2, y2 = s2.batch(5, 4)  # fresh sampler, straight to step 5 (a resumed run)
    assert x1.shape == (4, 1, 16, 16, 8) and x1.dtype == torch.float32
    assert y1.shape == (4, 16, 16, 8) and y1.dtype == torch.int64
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    x3, _ = s1.batch(6, 4)
    assert not torch.equal(x1, x3)
    x4, _ = PatchSampler(prepped, (16, 16, 8), seed=8).batch(5, 4)
    assert not torch.equal(x1, x4)


SAMPLERS = [(PatchSampler, (16, 16, 8)), (SliceSampler, (16, 16))]


@pytest.mark.parametrize("sampler_cls,patch", SAMPLERS)
def test_ddp_shards_reassemble_global_batch(prepped, sampler_cls, patch):
    sampler = sampler_cls(prepped, patch, seed=3)
    world, bs, step = 4, 8, 17
    gx, gy = sampler.batch(step, bs)
    shards = [sampler.batch(step, bs, rank=r, world_size=world) for r in range(world)]
    assert all(sx.shape[0] == bs // world for sx, _ in shards)
    # global index i lives on rank i % world at position i // world
    rx = torch.stack([shards[i % world][0][i // world] for i in range(bs)])
    ry = torch.stack([shards[i % world][1][i // world] for i in range(bs)])
    assert torch.equal(rx, gx) and torch.equal(ry, gy)


def test_batch_argument_errors(prepped):
    sampler = PatchSampler(prepped, (8, 8, 4))
    with pytest.raises(ValueError, match="batch_size 6 is not divisible by world_size 4"):
        sampler.batch(0, 6, rank=0, world_size=4)
    with pytest.raises(ValueError, match="rank 4"):
        sampler.batch(0, 8, rank=4, world_size=4)
    with pytest.raises(ValueError, match="step"):
        sampler.batch(-1, 2)


def test_foreground_oversampling_raises_foreground_fraction(prepped):
    def fg_fraction(ratio):
        sampler = PatchSampler(prepped, (8, 8, 4), foreground_ratio=ratio, seed=1)
        _, y = sampler.batch(0, 48)
        return (y > 0).float().mean().item(), sampler

    uniform, _ = fg_fraction(0.0)
    oversampled, sampler = fg_fraction(1.0)
    assert oversampled > uniform + 0.2, (uniform, oversampled)
    # every foreground draw contains its foreground voxel
    for i in range(16):
        loc = sampler.locate(0, i)
        assert loc.foreground
    _, y = sampler.batch(0, 16)
    assert bool((y.flatten(1) > 0).any(dim=1).all())


def test_slice_sampler_channels_are_adjacent_slices_with_clamping():
    shape = (10, 9, 4)
    image = np.broadcast_to(np.arange(shape[2], dtype=np.float32), shape).copy()  # value = slice index
    label = np.zeros(shape, np.uint8)
    label[:, :, 2] = 1
    label[3:6, 3:6, 0] = 2
    case = Case("slices", image, label, (1.0, 1.0, 3.0), np.diag([1.0, 1.0, 3.0, 1.0]))
    sampler = SliceSampler([case], (6, 5), foreground_ratio=0.5, seed=0)
    x, y = sampler.batch(0, 40)
    assert x.shape == (40, 3, 6, 5) and y.shape == (40, 6, 5)
    seen = set()
    for i in range(40):
        loc = sampler.locate(0, i)
        sx, sy, z = loc.start
        expect = np.clip([z - 1, z, z + 1], 0, shape[2] - 1)
        for ch in range(3):
            assert torch.all(x[i, ch] == float(expect[ch]))
        np.testing.assert_array_equal(y[i].numpy(), label[sx : sx + 6, sy : sy + 5, z])
        seen.add(z)
    assert {0, shape[2] - 1} <= seen  # both clamped edges exercised


def test_sampler_pads_a_case_smaller_than_the_patch():
    """A patch larger than the case along an axis covers the whole axis at a random offset; the
    image is padded with air (0) and the label with background, and the case's own voxels are
    where the location says."""
    case = _blob_case(name="tiny_case_7")  # (12, 10, 6)
    case.image[...] = np.abs(case.image) + 1.0  # every real voxel > 0: padding is the only 0
    sampler = PatchSampler([case], (8, 16, 9), foreground_ratio=0.5, seed=3)
    x, y = sampler.batch(0, 24)
    assert x.shape == (24, 1, 8, 16, 9) and y.shape == (24, 8, 16, 9)
    offsets = set()
    for i in range(24):
        sx, sy, sz = sampler.locate(0, i).start
        assert 0 <= sx <= 12 - 8 and 10 - 16 <= sy <= 0 and 6 - 9 <= sz <= 0
        offsets.add((sy, sz))
        inside = x[i, 0, :, -sy:-sy + 10, -sz:-sz + 6]
        np.testing.assert_array_equal(inside.numpy(), case.image[sx:sx + 8])
        np.testing.assert_array_equal(y[i, :, -sy:-sy + 10, -sz:-sz + 6].numpy(), case.label[sx:sx + 8])
        real = torch.zeros(8, 16, 9, dtype=torch.bool)
        real[:, -sy:-sy + 10, -sz:-sz + 6] = True
        assert bool((x[i, 0][~real] == 0).all()) and bool((y[i][~real] == 0).all())
    assert len(offsets) > 1  # the padding moves from sample to sample
    slices = SliceSampler([case], (13, 4), foreground_ratio=0.0, seed=1)
    xs, ys = slices.batch(0, 8)
    assert xs.shape == (8, 3, 13, 4) and ys.shape == (8, 13, 4)
    for i in range(8):
        sx, sy, z = slices.locate(0, i).start
        assert sx in (-1, 0) and 0 <= sy <= 6
        np.testing.assert_array_equal(ys[i, -sx:-sx + 12].numpy(), case.label[:, sy:sy + 4, z])
        assert bool((xs[i, :, :-sx] == 0).all()) if sx else bool((xs[i, :, 12:] == 0).all())


def test_sampler_rejects_unlabelled_and_warns_on_empty_foreground():
    case = _blob_case(name="nolabel")
    case.label = None
    with pytest.raises(ValueError, match="nolabel"):
        PatchSampler([case], (4, 4, 2))
    empty = _blob_case(name="empty_fg")
    empty.label[:] = 0
    with pytest.warns(UserWarning, match="empty_fg"):
        sampler = PatchSampler([empty], (4, 4, 2), foreground_ratio=1.0)
    assert not sampler.locate(0, 0).foreground


# ---------------------------------------------------------------------------------------------
# preprocessing
# ---------------------------------------------------------------------------------------------
def test_preprocess_resamples_inplane_and_updates_affine():
    case = _blob_case(shape=(40, 30, 5), spacing=(0.8, 0.8, 3.0))
    # a flipped, shifted affine like a LiTS file (LPS -> RAS): columns keep their direction
    affine = np.array([[-0.8, 0, 0, 100.0], [0, -0.8, 0, 50.0], [0, 0, 3.0, -20.0], [0, 0, 0, 1]])
    case.affine = affine
    out = preprocess(case, Preprocessing(spacing_xy=1.6))
    assert out.image.shape == (20, 15, 5) and out.label.shape == (20, 15, 5)
    assert out.image.dtype == np.float32 and out.label.dtype == np.uint8
    np.testing.assert_allclose(out.spacing, (1.6, 1.6, 3.0))
    np.testing.assert_allclose(out.affine[:3, :3], np.diag([-1.6, -1.6, 3.0]))
    # grids share their outer edges: the world position of the field of view's centre is unchanged
    centre_old = affine @ np.array([(40 - 1) / 2, (30 - 1) / 2, 2, 1])
    centre_new = out.affine @ np.array([(20 - 1) / 2, (15 - 1) / 2, 2, 1])
    np.testing.assert_allclose(centre_new, centre_old, atol=1e-9)
    # new voxel 0 lies at old continuous index 0.5 along X and Y
    np.testing.assert_allclose(out.affine @ [0, 0, 0, 1], affine @ [0.5, 0.5, 0, 1])
    assert set(np.unique(out.label)) <= {0, 1, 2}
    assert case.image.shape == (40, 30, 5)  # input untouched


def test_preprocess_window_scaling_and_no_resampling():
    hu = np.array([-1000.0, -200.0, 25.0, 250.0, 1000.0], np.float32)
    image = hu.reshape(5, 1, 1) * np.ones((1, 2, 2), np.float32)
    case = Case("win", image, None, (0.8, 0.8, 3.0), np.diag([0.8, 0.8, 3.0, 1.0]))
    out = preprocess(case, Preprocessing(spacing_xy=None, window=(-200.0, 250.0)))
    np.testing.assert_allclose(out.image[:, 0, 0], [0.0, 0.0, 0.5, 1.0, 1.0], atol=1e-6)
    assert out.image.dtype == np.float32
    np.testing.assert_array_equal(out.affine, case.affine)
    assert out.spacing == case.spacing


def test_preprocessing_dict_round_trip_and_validation(tmp_path):
    prep = Preprocessing(spacing_xy=1.25, window=(-100, 200))
    d = prep.to_dict()
    assert d == {"spacing_xy": 1.25, "window": [-100.0, 200.0]}
    torch.save({"prep": d}, tmp_path / "ckpt.pt")
    loaded = torch.load(tmp_path / "ckpt.pt", weights_only=True)["prep"]
    assert Preprocessing.from_dict(loaded) == prep
    assert Preprocessing.from_dict(Preprocessing(spacing_xy=None).to_dict()).spacing_xy is None
    with pytest.raises(ValueError, match="unknown keys"):
        Preprocessing.from_dict({**d, "extra": 1})
    with pytest.raises(ValueError, match="missing keys"):
        Preprocessing.from_dict({"window": [0, 1]})
    with pytest.raises(ValueError, match="low < high"):
        Preprocessing(window=(250, -200))
    with pytest.raises(ValueError, match="spacing_xy"):
        Preprocessing(spacing_xy=0)


def test_restore_inplane_round_trip(synth):
    case = synth[0]
    out = preprocess(case, Preprocessing(spacing_xy=1.6))
    X, Y, Z = case.image.shape
    assert out.image.shape[:2] != (X, Y)
    lab = restore_inplane(out.label, (X, Y), is_label=True)
    assert lab.shape == (X, Y, Z) and lab.dtype == np.uint8
    assert (lab == case.label).mean() > 0.97
    # int64 labels (argmax output) and torch tensors are accepted
    lab64 = restore_inplane(torch.from_numpy(out.label.astype(np.int64)), (X, Y), is_label=True)
    assert lab64.dtype == np.int64 and np.array_equal(lab64, lab)
    probs = np.stack([out.image, 1 - out.image, out.image * 0.5])
    restored = restore_inplane(probs, (X, Y), is_label=False)
    assert restored.shape == (3, X, Y, Z) and restored.dtype == np.float32
    assert restored.min() >= -1e-6 and restored.max() <= 1 + 1e-6
    with pytest.raises(ValueError, match="shape"):
        restore_inplane(np.zeros((4, 4)), (8, 8), is_label=True)


# ---------------------------------------------------------------------------------------------
# NIfTI I/O and discovery
# ---------------------------------------------------------------------------------------------
def test_nifti_round_trip_keeps_affine_and_dtype(tmp_path):
    rng = np.random.default_rng(0)
    arr = rng.normal(size=(5, 4, 3)).astype(np.float32)
    theta = 0.3
    affine = np.array([
        [-0.7 * np.cos(theta), 0.7 * np.sin(theta), 0, 12.5],
        [0.7 * np.sin(theta), 0.7 * np.cos(theta), 0, -3.0],
        [0, 0, 2.5, 40.0],
        [0, 0, 0, 1],
    ])
    path = tmp_path / "sub" / "vol.nii.gz"
    save_nifti(path, arr, affine)
    back, back_affine, header = load_nifti(path)
    np.testing.assert_array_equal(back, arr)
    np.testing.assert_allclose(back_affine, affine, atol=1e-6)
    assert sorted(p.name for p in path.parent.iterdir()) == ["vol.nii.gz"]  # no temp file left

    # with an input's header (int16 with a slope): the array's dtype is stored, no scaling
    src = nib.Nifti1Image(np.zeros((5, 4, 3), np.int16), affine)
    src.header.set_slope_inter(2.0, -1024.0)
    labels = rng.integers(0, 3, size=(5, 4, 3))  # int64, as argmax gives
    save_nifti(path, labels, affine, header=src.header)  # overwrites
    back, back_affine, header = load_nifti(path)
    np.testing.assert_array_equal(back, labels)
    assert header.get_data_dtype() == np.uint8
    np.testing.assert_allclose(back_affine, affine, atol=1e-6)
    with pytest.raises(ValueError, match="vol.mha"):
        save_nifti(tmp_path / "vol.mha", arr, affine)


def test_load_nifti_squeezes_single_channel_4d(tmp_path):
    p = _write(tmp_path / "four.nii.gz", np.ones((3, 3, 2, 1), np.float32))
    assert load_nifti(p)[0].shape == (3, 3, 2)


def _decathlon(root, n=2, shape=(6, 5, 3), spacing=(0.7, 0.7, 2.5)):
    training = []
    for i in range(n):
        img = _write(root / "imagesTr" / f"liver_{i}.nii.gz", np.full(shape, 50 + i, np.int16), np.diag([*spacing, 1]))
        lab = np.zeros(shape, np.uint8)
        lab[1:3, 1:3, 1] = 1
        lab[2, 2, 1] = 2
        _write(root / "labelsTr" / f"liver_{i}.nii.gz", lab, np.diag([*spacing, 1]))
        training.append({"image": f"./imagesTr/{img.name}", "label": f"./labelsTr/{img.name}"})
    (root / "dataset.json").write_text(json.dumps({"name": "Liver", "training": training, "test": []}))


def test_discover_and_load_decathlon(tmp_path):
    _decathlon(tmp_path)
    found = discover_cases(tmp_path)
    assert [c.name for c in found] == ["liver_0", "liver_1"]
    assert found[0].image == tmp_path / "imagesTr" / "liver_0.nii.gz"
    case = load_case(found[1], num_classes=3)
    assert case.image.dtype == np.float32 and case.label.dtype == np.uint8
    assert case.image.shape == (6, 5, 3) and np.all(case.image == 51)
    np.testing.assert_allclose(case.spacing, (0.7, 0.7, 2.5), rtol=1e-6)
    assert set(np.unique(case.label)) == {0, 1, 2}
    assert case.header is not None


def test_discover_and_load_lits(tmp_path):
    shape = (4, 4, 3)
    for n, folder, seg_folder, ext in [
        (10, "Training Batch 2", "Training Batch 2", ".nii.gz"),
        (0, "Training Batch 1", "Training Batch 1", ".nii"),
        (2, "Training Batch 1", "segs", ".nii"),
    ]:
        _write(tmp_path / folder / f"volume-{n}{ext}", np.full(shape, n, np.float32))
        _write(tmp_path / seg_folder / f"segmentation-{n}{ext}", np.ones(shape, np.float32))  # float labels, as in LiTS
    (tmp_path / "Training Batch 1" / "notes.txt").write_text("ignored")
    found = discover_cases(tmp_path)
    assert [c.name for c in found] == ["volume-0", "volume-2", "volume-10"]
    assert found[1].label == tmp_path / "segs" / "segmentation-2.nii"
    case = load_case(found[2], num_classes=3)
    assert np.all(case.image == 10) and case.label.dtype == np.uint8 and np.all(case.label == 1)


def test_lits_unlabelled_volume(tmp_path):
    _write(tmp_path / "volume-3.nii", np.zeros((3, 3, 2), np.float32))
    with pytest.raises(ValueError, match="volume-3.nii.*segmentation-3"):
        discover_cases(tmp_path)
    found = discover_cases(tmp_path, require_labels=False)
    assert found[0].label is None
    assert load_case(found[0], num_classes=3).label is None
    _write(tmp_path / "segmentation-4.nii", np.zeros((3, 3, 2), np.float32))
    with pytest.raises(ValueError, match="segmentation-4.nii"):
        discover_cases(tmp_path, require_labels=False)


# ---------------------------------------------------------------------------------------------
# every bad input is a ValueError naming the file
# ---------------------------------------------------------------------------------------------
def test_error_missing_file(tmp_path):
    with pytest.raises(ValueError, match="nope.nii.gz.*not found"):
        load_nifti(tmp_path / "nope.nii.gz")
    _decathlon(tmp_path, n=1)
    (tmp_path / "labelsTr" / "liver_0.nii.gz").unlink()
    with pytest.raises(ValueError, match=r"liver_0.nii.gz: file not found \(listed by dataset.json\)"):
        discover_cases(tmp_path)
    with pytest.raises(ValueError, match="missing_dir"):
        discover_cases(tmp_path / "missing_dir")


def test_error_corrupt_nifti(tmp_path):
    garbage = tmp_path / "garbage.nii.gz"
    garbage.write_bytes(b"this is not a gzip stream at all" * 10)
    with pytest.raises(ValueError, match="garbage.nii.gz: cannot read as NIfTI"):
        load_nifti(garbage)
    good = _write(tmp_path / "good.nii.gz", np.random.default_rng(0).normal(size=(20, 20, 10)).astype(np.float32))
    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ValueError, match="truncated.nii.gz: cannot read as NIfTI"):
        load_nifti(truncated)
    plain = tmp_path / "bad_header.nii"
    plain.write_bytes(b"\x00" * 400)
    with pytest.raises(ValueError, match="bad_header.nii"):
        load_nifti(plain)


def test_error_not_3d(tmp_path):
    p = _write(tmp_path / "flat.nii.gz", np.zeros((4, 4), np.float32))
    with pytest.raises(ValueError, match=r"flat.nii.gz: expected a 3D volume.*\(4, 4\)"):
        load_nifti(p)
    p = _write(tmp_path / "two_channels.nii.gz", np.zeros((4, 4, 3, 2), np.float32))
    with pytest.raises(ValueError, match=r"two_channels.nii.gz: expected a 3D volume.*\(4, 4, 3, 2\)"):
        load_nifti(p)


def test_error_shape_mismatch(tmp_path):
    img = _write(tmp_path / "img.nii.gz", np.zeros((4, 4, 3), np.float32))
    lab = _write(tmp_path / "lab.nii.gz", np.zeros((4, 4, 2), np.uint8))
    msg = r"lab.nii.gz: label shape \(4, 4, 2\) does not match image img.nii.gz shape \(4, 4, 3\)"
    with pytest.raises(ValueError, match=msg):
        load_case(CasePaths("c", img, lab), num_classes=3)


def test_error_labels_outside_classes(tmp_path):
    img = _write(tmp_path / "img.nii.gz", np.zeros((4, 4, 3), np.float32))
    bad = np.zeros((4, 4, 3), np.float32)
    bad[0, 0, 0], bad[1, 1, 1] = 5, 7
    lab = _write(tmp_path / "lab_bad.nii.gz", bad)
    with pytest.raises(ValueError, match=r"lab_bad.nii.gz: label values must be integers in \[0, 3\); found 5, 7"):
        load_case(CasePaths("c", img, lab), num_classes=3)
    frac = np.zeros((4, 4, 3), np.float32)
    frac[0, 0, 0] = 0.5
    lab = _write(tmp_path / "lab_frac.nii.gz", frac)
    with pytest.raises(ValueError, match="lab_frac.nii.gz.*found 0.5"):
        load_case(CasePaths("c", img, lab), num_classes=3)
    neg = np.zeros((4, 4, 3), np.int16)
    neg[0, 0, 0] = -1
    lab = _write(tmp_path / "lab_neg.nii.gz", neg)
    with pytest.raises(ValueError, match="lab_neg.nii.gz.*found -1"):
        load_case(CasePaths("c", img, lab), num_classes=3)


def test_error_nonfinite_image(tmp_path):
    arr = np.zeros((4, 4, 3), np.float32)
    arr[1, 1, 1] = np.nan
    img = _write(tmp_path / "nan_img.nii.gz", arr)
    with pytest.raises(ValueError, match="nan_img.nii.gz: 1 of 48 voxels are NaN or infinite"):
        load_case(CasePaths("c", img, None), num_classes=3)


def test_error_folder_with_neither_layout(tmp_path):
    root = tmp_path / "random_folder"
    root.mkdir()
    (root / "scan.nii.gz").write_bytes(b"")
    with pytest.raises(ValueError, match="random_folder: neither a Medical Segmentation Decathlon"):
        discover_cases(root)


def test_error_bad_dataset_json(tmp_path):
    (tmp_path / "dataset.json").write_text("{not json")
    with pytest.raises(ValueError, match="dataset.json: cannot read as JSON"):
        discover_cases(tmp_path)
    (tmp_path / "dataset.json").write_text(json.dumps({"name": "x"}))
    with pytest.raises(ValueError, match="dataset.json: no 'training' list"):
        discover_cases(tmp_path)


def test_label_affine_mismatch_warns(tmp_path):
    img = _write(tmp_path / "img.nii.gz", np.zeros((4, 4, 3), np.float32), np.diag([1.0, 1.0, 2.0, 1.0]))
    lab = _write(tmp_path / "lab_shifted.nii.gz", np.zeros((4, 4, 3), np.uint8), np.diag([1.0, 1.0, 3.0, 1.0]))
    with pytest.warns(UserWarning, match="lab_shifted.nii.gz"):
        load_case(CasePaths("c", img, lab), num_classes=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_case(CasePaths("c", img, img), num_classes=3)


def test_case_validates_shapes():
    with pytest.raises(ValueError, match=r"case 'bad'.*\(2, 2, 2\).*\(2, 2, 3\)"):
        Case("bad", np.zeros((2, 2, 3), np.float32), np.zeros((2, 2, 2), np.uint8), (1, 1, 1), np.eye(4))


@pytest.mark.parametrize("sampler_cls,patch", SAMPLERS)
def test_slice_sampler_deterministic_too(prepped, sampler_cls, patch):
    a = sampler_cls(prepped, patch, seed=5).batch(9, 3)
    b = sampler_cls(prepped, patch, seed=5).batch(9, 3)
    assert all(torch.equal(u, v) for u, v in zip(a, b))


@pytest.mark.parametrize("bad", [-0.1, 1.5, "0.5", None])
def test_sampler_rejects_bad_foreground_ratio(prepped, bad):
    with pytest.raises(ValueError, match="foreground_ratio"):
        PatchSampler(prepped, (8, 8, 4), foreground_ratio=bad)
