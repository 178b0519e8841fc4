"""AUP, d3LLM's Accuracy Under Parallelism (arXiv 2601.07568), as its leaderboard computes it.

A method is a curve of (rho, y) points: rho = tokens per forward (TPF), y = accuracy in percent,
one point per parallelism setting of the same model on the same task. With the points sorted by
rho and y_1 the accuracy at the smallest rho:

    W(y) = min(exp(-alpha * (1 - y / y_max)), 1)                       alpha = 3
    keep the points with y >= y_1 - 5 (the last point may not drop more than 5 below y_1)
    AUP  = rho_1 * y_1 + sum_{i >= 2} (rho_i - rho_{i-1}) * (y_i W(y_i) + y_{i-1} W(y_{i-1})) / 2

The first term is unweighted. `y_max` is the best accuracy of ANY method on the task (so adding a
stronger method changes every AUP of the task): the caller must pass the shared maximum.
Their TPF convention differs from d2f's (docs/evaluation.md, "AUP").
"""

from __future__ import annotations

import math
from collections.abc import Sequence

ALPHA = 3.0  # the leaderboard's penalty factor
Y_MIN_OFFSET = 5.0  # points more than this below y_1 are dropped (percentage points)


def weight(y: float, y_max: float, alpha: float = ALPHA) -> float:
    """Quality weight W(y) = min(exp(-alpha (1 - y / y_max)), 1)."""
    return min(math.exp(-alpha * (1.0 - y / y_max)), 1.0)


def aup(
    points: Sequence[tuple[float, float]],
    y_max: float,
    alpha: float = ALPHA,
    y_min_offset: float = Y_MIN_OFFSET,
) -> float:
    """AUP of (TPF, accuracy in percent) points, with `y_max` the task's best accuracy (percent).

    Raises ValueError (naming the point) on an empty curve, a TPF <= 0, a non-finite value, an
    accuracy outside [0, 100] or a y_max <= 0, and when the highest-TPF point's accuracy is more
    than `y_min_offset` below the lowest-TPF point's (the leaderboard refuses such curves).
    """
    if not points:
        raise ValueError("AUP needs at least one (TPF, accuracy) point")
    if not (math.isfinite(y_max) and y_max > 0):
        raise ValueError(f"AUP y_max must be a positive number (percent), got {y_max}")
    for i, (rho, y) in enumerate(points):
        if not (math.isfinite(rho) and rho > 0):
            raise ValueError(f"AUP point {i}: TPF must be a positive number, got {rho}")
        if not (math.isfinite(y) and 0.0 <= y <= 100.0):
            raise ValueError(f"AUP point {i}: accuracy must be a percentage in [0, 100], got {y}")
    pts = sorted(points, key=lambda p: p[0])  # stable: equal TPFs keep the caller's order
    y1 = pts[0][1]
    if y1 - pts[-1][1] > y_min_offset:
        raise ValueError(
            f"AUP: accuracy drops from {y1} (TPF {pts[0][0]}) to {pts[-1][1]} (TPF {pts[-1][0]}), "
            f"more than {y_min_offset} points: the leaderboard refuses such a curve"
        )
    kept = [(r, y) for r, y in pts if y >= y1 - y_min_offset]
    total = kept[0][0] * kept[0][1]
    for (r0, y0), (r1, y1_) in zip(kept, kept[1:], strict=False):
        total += 0.5 * (r1 - r0) * (y1_ * weight(y1_, y_max, alpha) + y0 * weight(y0, y_max, alpha))
    return total
