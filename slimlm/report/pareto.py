"""Pareto frontiers: the points no other point beats on both axes.

A point p dominates q when p is no worse on both axes and strictly better on one.
Both axes are minimised; pass `maximize_x=True` for an axis where larger is better
(decode tokens/s). Identical points do not dominate each other, so both stay.
"""

from __future__ import annotations

import numpy as np


def pareto_front(xs, ys, maximize_x: bool = False) -> list[int]:
    """Indices of the non-dominated points, ordered by x (best first when maximising)."""
    x = np.asarray(xs, dtype=np.float64)
    y = np.asarray(ys, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"xs and ys must be 1-D of the same length, got {x.shape} and {y.shape}")
    if maximize_x:
        x = -x
    ok = np.isfinite(x) & np.isfinite(y)
    # dom[i, j]: point i dominates point j  (n, n)
    le = (x[:, None] <= x[None, :]) & (y[:, None] <= y[None, :])
    lt = (x[:, None] < x[None, :]) | (y[:, None] < y[None, :])
    dom = le & lt & ok[:, None]
    keep = ok & ~dom.any(0)
    idx = np.flatnonzero(keep)
    return [int(i) for i in idx[np.lexsort((y[idx], x[idx]))]]


def frontier_flags(rows: list[dict], x: str, y: str, maximize_x: bool = False) -> list[bool]:
    """For each row, whether it is on the (x, y) frontier among rows holding both fields."""
    have = [i for i, r in enumerate(rows) if x in r and y in r and "error" not in r]
    front = pareto_front([rows[i][x] for i in have], [rows[i][y] for i in have], maximize_x)
    on = {have[j] for j in front}
    return [i in on for i in range(len(rows))]
