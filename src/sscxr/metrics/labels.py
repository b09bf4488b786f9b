"""Which labels are known: the rule every metric applies before it counts a sample."""

from __future__ import annotations

import numpy as np

__all__ = ["known_mask"]


def known_mask(y_true: np.ndarray) -> np.ndarray:
    """Boolean mask of samples with a known label (not NaN, not negative). ``y_true: (N,)``."""
    y = np.asarray(y_true)
    if np.issubdtype(y.dtype, np.floating):
        return ~np.isnan(y) & (np.nan_to_num(y, nan=-1.0) >= 0)
    return y >= 0
