"""JSON as every reader accepts it: NaN and infinities written as null.

Python's json writes a bare ``NaN``/``Infinity`` that is not JSON (jq, JavaScript, most other
parsers reject the whole file); a metric that is undefined (a loss that diverged, a Dice with no
foreground) is null instead.
"""
from __future__ import annotations

import json
import math


def finite(value):
    """``value`` with every non-finite float (also numpy's) inside dicts, lists and tuples replaced by None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def dumps(value, **kw) -> str:
    return json.dumps(finite(value), allow_nan=False, **kw)
