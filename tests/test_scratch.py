"""ahnet_fast._scratch: the pool of reused CPU buffers for the ops' large temporaries."""
import threading

import torch

from ahnet_fast import _scratch as scratch


def ptr(t):
    return t.untyped_storage().data_ptr()


def test_a_slot_hands_back_the_same_buffer_and_grows():
    scratch.release()
    with scratch.borrow("test", 100, torch.float32, "cpu") as a:
        first = ptr(a)
        assert a.numel() == 100 and a.dtype == torch.float32
    with scratch.borrow("test", 60, torch.float32, "cpu") as b:
        assert ptr(b) == first and b.numel() == 60  # a smaller request reuses the buffer
    with scratch.borrow("test", 60, torch.float64, "cpu") as c:
        assert ptr(c) != first  # dtypes have their own buffers
    with scratch.borrow("test", 1000, torch.float32, "cpu") as d:
        grown = ptr(d)
        assert d.numel() == 1000
    with scratch.borrow("test", 10, torch.float32, "cpu") as e:
        assert ptr(e) == grown
    assert scratch.pooled_bytes() == 1000 * 4 + 60 * 8
    scratch.release()
    assert scratch.pooled_bytes() == 0


def test_nested_borrows_of_a_slot_do_not_share_memory():
    scratch.release()
    with scratch.borrow("test", 50, torch.float32, "cpu") as outer:
        outer.fill_(1.0)
        with scratch.borrow("test", 50, torch.float32, "cpu") as inner:
            assert ptr(inner) != ptr(outer)
            inner.fill_(2.0)
        assert torch.all(outer == 1.0)
    scratch.release()


def test_threads_have_their_own_pool():
    scratch.release()
    seen = {}

    def borrow_in_thread():
        with scratch.borrow("test", 50, torch.float32, "cpu") as t:
            seen["thread"] = ptr(t)

    with scratch.borrow("test", 50, torch.float32, "cpu") as mine:
        worker = threading.Thread(target=borrow_in_thread)
        worker.start()
        worker.join()
        assert seen["thread"] != ptr(mine)
    scratch.release()


def test_switched_off_by_the_environment(monkeypatch):
    scratch.release()
    monkeypatch.setenv("AHNET_FAST_SCRATCH", "0")
    with scratch.borrow("test", 50, torch.float32, "cpu") as a:
        pass
    assert scratch.pooled_bytes() == 0
    with scratch.borrow("test", 50, torch.float32, "cpu") as b:
        assert b.numel() == 50
    assert not scratch.enabled()


def test_non_cpu_requests_are_fresh_tensors():
    scratch.release()
    with scratch.borrow("test", 8, torch.float32, "meta") as t:
        assert t.device.type == "meta" and t.numel() == 8
    assert scratch.pooled_bytes() == 0


def test_a_buffer_first_made_under_inference_mode_serves_training_later():
    """Validation under torch.inference_mode(), then training: the pooled buffers must not be
    inference tensors (a matrix product writing into one outside that mode would raise)."""
    import ahnet_fast
    from ahnet_fast.nn.ahnet import DenseBlock

    if not ahnet_fast.extension_available():
        import pytest

        pytest.skip("compiled extension not built")
    scratch.release()
    block = DenseBlock(3, 2, 6, 4, 3, 0.0)
    block.backend = "cpp"
    x = torch.randn(1, 6, 5, 4, 3)
    with torch.inference_mode():
        block.eval()(x)
    assert scratch.pooled_bytes() > 0
    block.train()
    xi = x.clone().requires_grad_()
    block(xi).sum().backward()
    assert xi.grad is not None and torch.isfinite(xi.grad).all()
    scratch.release()


def test_ahnet_keeps_the_pool_only_without_checkpointing():
    """AHNet puts memory first under activation checkpointing: no buffers are kept between steps
    there (they would count in the step's peak); without checkpointing they are. The choice holds
    for the model's own forward and backward only: the process-wide default is left as it was."""
    import pytest

    import ahnet_fast

    if not ahnet_fast.extension_available():
        pytest.skip("compiled extension not built")
    x = torch.randn(1, 1, 64, 64, 32)
    try:
        for policy, expect_kept in (("all", False), ("none", True), ("decoder", False)):
            scratch.release()
            net = ahnet_fast.AHNet(layers=(1, 1, 1, 1), psp_block_num=2, checkpoint=policy).train()
            net(x).sum().backward()
            assert (scratch.pooled_bytes() > 0) == expect_kept, policy
            assert scratch.keeping()  # the default, untouched
    finally:
        scratch.release()


def test_two_models_do_not_change_each_others_pool_choice():
    """A checkpointed model's backward frees the pool as its forward asked, even when another
    model's forward ran in between; the other model's backward keeps its buffers."""
    import pytest

    import ahnet_fast

    if not ahnet_fast.extension_available():
        pytest.skip("compiled extension not built")
    x = torch.randn(1, 1, 64, 64, 32)
    lean = ahnet_fast.AHNet(layers=(1, 1, 1, 1), psp_block_num=2, checkpoint="all").train()
    fast = ahnet_fast.AHNet(layers=(1, 1, 1, 1), psp_block_num=2, checkpoint="none").train()
    try:
        scratch.release()
        y_lean = lean(x).sum()
        y_fast = fast(x).sum()
        y_fast.backward()
        assert scratch.pooled_bytes() > 0  # the fast model keeps
        y_lean.backward()
        assert scratch.pooled_bytes() == 0  # the lean one's backward (and recomputation) frees
        y_fast = fast(x).sum()
        y_lean = lean(x).sum()  # a lean forward after the fast one ...
        y_fast.backward()
        assert scratch.pooled_bytes() > 0  # ... does not make the fast backward lean
    finally:
        scratch.release()
