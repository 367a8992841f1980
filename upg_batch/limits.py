"""The limits a sampling value must meet, in one place.

`SamplingParams` (a row's values, per-row overrides included) and the job's `sampling` section
apply the same checks, so a job default that passes config validation is one every row accepts.
Plain Python, no native import: the config module uses it on the driver before anything loads.
"""

from __future__ import annotations

import math
from typing import Any, Callable

__all__ = ["INT32_MAX", "SAMPLING_LIMITS", "finite", "int_in", "sampling_problem"]

# the native engine counts tokens in 32-bit integers on some targets
INT32_MAX = 2**31 - 1


def int_in(x: object, low: int, high: int) -> bool:
    """An int (not a bool) in [low, high]."""
    return isinstance(x, int) and not isinstance(x, bool) and low <= x <= high


def finite(x: object) -> bool:
    """A finite int or float (not a bool, inf or nan)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


# field -> (check, what a valid value is)
SAMPLING_LIMITS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "max_tokens": (lambda v: int_in(v, 1, INT32_MAX), "an integer in [1, 2**31 - 1]"),
    "temperature": (lambda v: finite(v) and v >= 0, "a finite number >= 0"),
    "top_k": (lambda v: int_in(v, 0, INT32_MAX), "an integer in [0, 2**31 - 1] (0: off)"),
    "top_p": (lambda v: finite(v) and 0 < v <= 1, "a number in (0, 1]"),
    "min_p": (lambda v: finite(v) and 0 <= v <= 1, "a number in [0, 1]"),
    "seed": (lambda v: v is None or int_in(v, 0, 2**64 - 1), "None or an integer in [0, 2**64)"),
    "n": (lambda v: int_in(v, 1, 128), "an integer in [1, 128] (samples per prompt)"),
    "logprobs": (lambda v: v is None or int_in(v, 0, 20), "None or an integer in [0, 20] (top log-probabilities per token)"),
}


def sampling_problem(name: str, value: object) -> str | None:
    """None when `value` is valid for sampling field `name`, else what it must be."""
    check, what = SAMPLING_LIMITS[name]
    return None if check(value) else f"must be {what}"
