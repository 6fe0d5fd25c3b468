"""Dice per class, per case and global, against hand-computed values."""
import numpy as np
import pytest
import torch

from ahnet_fast.metrics import LITS_CLASS_NAMES, DiceTracker, default_class_names, dice_per_class


def test_dice_hand_computed_1d():
    pred = np.array([0, 1, 1, 2, 2, 0])
    target = np.array([0, 1, 2, 2, 0, 0])
    # class 0: pred {0,5}, target {0,4,5}: 2*2/(2+3); class 1: {1,2} vs {1}: 2*1/3; class 2: {3,4} vs {2,3}: 2*1/4
    np.testing.assert_allclose(dice_per_class(pred, target, 3), [4 / 5, 2 / 3, 1 / 2])


def test_dice_hand_computed_3d_blocks():
    target = np.zeros((4, 4, 2), np.uint8)
    pred = np.zeros((4, 4, 2), np.uint8)
    target[:2, :2, :] = 1  # 8 voxels
    pred[:2, :, :] = 1  # 16 voxels, 8 of them on the target
    dice = dice_per_class(pred, target, 2)
    assert dice[1] == pytest.approx(2 * 8 / (16 + 8))
    assert dice[0] == pytest.approx(2 * 16 / (16 + 24))
    assert dice.dtype == np.float64 and dice.shape == (2,)


def test_both_empty_is_one_and_one_sided_is_zero():
    target = np.zeros((3, 3, 3), np.int64)
    pred = np.zeros((3, 3, 3), np.int64)
    np.testing.assert_array_equal(dice_per_class(pred, target, 3), [1.0, 1.0, 1.0])
    pred[1, 1, 1] = 2  # a false-positive lesion voxel
    d = dice_per_class(pred, target, 3)
    assert d[2] == 0.0 and d[1] == 1.0
    assert not np.isnan(d).any()


def test_torch_and_numpy_agree():
    g = torch.Generator().manual_seed(0)
    pred = torch.randint(0, 3, (5, 6, 7), generator=g)
    target = torch.randint(0, 3, (5, 6, 7), generator=g)
    ref = dice_per_class(pred.numpy(), target.numpy(), 3)
    np.testing.assert_allclose(dice_per_class(pred, target, 3), ref)
    np.testing.assert_allclose(dice_per_class(pred.to(torch.uint8), target.numpy().astype(np.uint8), 3), ref)
    np.testing.assert_allclose(dice_per_class(pred.numpy(), target, 3), ref)
    assert isinstance(dice_per_class(pred, target, 3), np.ndarray)


def test_bool_masks():
    pred = np.array([True, True, False, False])
    target = np.array([True, False, False, False])
    np.testing.assert_allclose(dice_per_class(pred, target, 2), [2 * 2 / 5, 2 / 3])


@pytest.mark.parametrize(
    "pred, target, num_classes, match",
    [
        (np.zeros(4, np.float32), np.zeros(4, np.int64), 2, "argmax"),
        (torch.zeros(2, 4), torch.zeros(4, dtype=torch.long), 2, "argmax"),
        (np.zeros(4, np.int64), np.zeros(5, np.int64), 2, r"\(4,\) vs \(5,\)"),
        (np.array([0, 3, 1, 7]), np.zeros(4, np.int64), 3, r"pred has labels outside \[0, 3\): \[3, 7\]"),
        (np.zeros(4, np.int64), np.array([-1, 0, 0, 0]), 3, r"target .*\[-1\]"),
        (np.zeros(4, np.int64), np.zeros(4, np.int64), 0, "num_classes"),
    ],
)
def test_bad_inputs(pred, target, num_classes, match):
    with pytest.raises(ValueError, match=match):
        dice_per_class(pred, target, num_classes)


def _case(lesion_slices, predicted_lesion_slices, shape=(16, 16, 8)):
    """Liver in a fixed block; a lesion block of the given z range and its prediction."""
    target = np.zeros(shape, np.uint8)
    target[2:14, 2:14, :] = 1
    pred = target.copy()
    if lesion_slices:
        target[4:12, 4:12, slice(*lesion_slices)] = 2
    if predicted_lesion_slices:
        pred[4:12, 4:12, slice(*predicted_lesion_slices)] = 2
    return pred, target


def test_per_case_and_global_differ_for_a_missed_small_lesion():
    """A large lesion found perfectly and a small lesion missed: per case the miss costs a whole
    case (mean 0.5), globally it is a few voxels among many (close to 1)."""
    tracker = DiceTracker(3)
    big_pred, big_target = _case((0, 8), (0, 8))  # 8x8x8 = 512 lesion voxels, all found
    small_target = np.zeros((16, 16, 8), np.uint8)
    small_target[2:14, 2:14, :] = 1
    small_pred = small_target.copy()
    small_target[7, 7, 3] = 2  # a one-voxel lesion, predicted as liver
    d_big = tracker.update(big_pred, big_target, case="big")
    d_small = tracker.update(small_pred, small_target, case="small")
    assert d_big[2] == 1.0 and d_small[2] == 0.0
    np.testing.assert_allclose(tracker.mean_per_case()[2], 0.5)
    np.testing.assert_allclose(tracker.global_dice()[2], 2 * 512 / (512 + 513))
    assert tracker.global_dice()[2] > 0.99
    # liver: per-case mean of (1, 2*1151/(1151+1152)) and pooled counts
    liver_small = 2 * 1151 / (1151 + 1152)
    np.testing.assert_allclose(tracker.mean_per_case()[1], (1 + liver_small) / 2)
    np.testing.assert_allclose(tracker.global_dice()[1], 2 * (640 + 1151) / (640 + 640 + 1151 + 1152))
    assert list(tracker.per_case()) == ["big", "small"]
    np.testing.assert_array_equal(tracker.per_case()["small"], d_small)


def test_lesion_free_case_counts_as_success_per_case():
    tracker = DiceTracker(3)
    tracker.update(*_case(None, None), case="healthy")  # no lesion, none predicted: 1.0
    tracker.update(*_case((2, 6), (2, 4)), case="half")  # lesion 256 voxels, 128 predicted: 2/3
    np.testing.assert_allclose(tracker.mean_per_case()[2], (1 + 2 / 3) / 2)
    np.testing.assert_allclose(tracker.global_dice()[2], 2 * 128 / (128 + 256))


def test_summary_keys_and_plain_floats():
    tracker = DiceTracker(3)
    tracker.update(torch.tensor([0, 1, 2, 2]), torch.tensor([0, 1, 2, 1]), case="a")
    s = tracker.summary()
    assert set(s) == {"dice_case/liver", "dice_case/lesion", "dice_global/liver", "dice_global/lesion"}
    assert all(type(v) is float for v in s.values())
    assert s["dice_case/lesion"] == pytest.approx(2 / 3)

    named = DiceTracker(2, class_names=["bg", "tumour"])
    named.update(np.array([1, 1]), np.array([1, 0]))
    assert set(named.summary()) == {"dice_case/tumour", "dice_global/tumour"}


def test_default_names():
    assert default_class_names(3) == LITS_CLASS_NAMES
    assert default_class_names(4) == ("background", "class1", "class2", "class3")
    assert DiceTracker(2).class_names == ("background", "class1")


def test_tracker_errors_and_reset():
    tracker = DiceTracker(3)
    with pytest.raises(ValueError, match="no cases"):
        tracker.mean_per_case()
    with pytest.raises(ValueError, match="no cases"):
        tracker.summary()
    tracker.update(np.zeros(3, np.int64), np.zeros(3, np.int64), case="x")
    with pytest.raises(ValueError, match="already added"):
        tracker.update(np.zeros(3, np.int64), np.zeros(3, np.int64), case="x")
    tracker.update(np.zeros(3, np.int64), np.zeros(3, np.int64))  # auto-named
    assert list(tracker.per_case()) == ["x", "case1"]
    assert len(tracker) == 2
    tracker.reset()
    assert len(tracker) == 0
    with pytest.raises(ValueError, match="outside"):
        tracker.update(np.array([0, 3]), np.array([0, 1]), case="y")
    with pytest.raises(ValueError, match="names for 3 classes"):
        DiceTracker(3, class_names=["a", "b"])
    with pytest.raises(ValueError, match="unique"):
        DiceTracker(2, class_names=["a", "a"])
    with pytest.raises(ValueError, match="'/'"):
        DiceTracker(2, class_names=["bg", "liver/lesion"])
