"""Checks every layer of clip_lens shares (one owner each)."""

from __future__ import annotations

from typing import Any

import numpy as np


def is_integer(value: Any) -> bool:
    """A Python or NumPy integer, and not a bool (True is an int to Python, never a count to us)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)
