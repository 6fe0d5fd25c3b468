"""Handing an output's gradient over to the op that made the output.

An op's backward may not write into the gradient autograd hands it: the same tensor can be another
node's gradient too (an addition passes one tensor to both operands, a user's hook may hold it).
Where the caller knows better -- the output's one consumer is its own op, whose backward returns a
tensor that nothing else sees -- it says so with :func:`handed_over` around the forward call, and the
op records that in its autograd context: its backward then accumulates its input's gradient in that
tensor instead of allocating one of the same size beside it. AH-Net's last stage does this
(dense4 -> pyramid pooling -> final block), where the gradients are the largest maps of a
checkpointed step.

Thread-local, read while the op's autograd context is set up (inside the op call, eager or traced).
"""
from __future__ import annotations

import contextlib
import threading

_state = threading.local()


@contextlib.contextmanager
def handed_over(enabled: bool = True):
    """Ops called inside may write their input's gradient into their output's gradient in backward."""
    previous = getattr(_state, "on", False)
    _state.on = enabled
    try:
        yield
    finally:
        _state.on = previous


def gradient_handed_over() -> bool:
    """Whether the op being set up now was called inside :func:`handed_over`."""
    return getattr(_state, "on", False)
