"""Which positions of a g x g window are masked.

Every window masks the same number of positions, ``n = round(r * g^2)`` clipped to
``[1, g^2 - 1]``, so a batch is a dense (B, n) set of masked and (B, g^2 - n) of visible
positions, and the loss normaliser is known without communication between DDP ranks. A mask
depends only on (seed, epoch, window index): resume and DDP sharding give the same masks.
"""

from __future__ import annotations

import numpy as np

MASK_STRATEGIES = ("random", "block")


def num_masked(grid: int, ratio: float) -> int:
    if grid < 2:
        raise ValueError("a context window needs grid >= 2 (one masked and one visible patch)")
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"mask ratio must be in (0, 1), got {ratio}")
    n = grid * grid
    return int(min(max(round(ratio * n), 1), n - 1))


def make_mask(grid: int, ratio: float, strategy: str, rng: np.random.Generator) -> np.ndarray:
    """Boolean (g^2,) row-major mask, True = masked."""
    n_pos = grid * grid
    k = num_masked(grid, ratio)
    mask = np.zeros(n_pos, dtype=bool)
    if strategy == "random":
        mask[rng.choice(n_pos, size=k, replace=False)] = True
    elif strategy == "block":
        # the smallest near-square rectangle holding k cells, at a random place; its first k
        # cells (row-major) are masked, so the masked area is one contiguous block.
        h = int(np.ceil(np.sqrt(k)))
        w = int(np.ceil(k / h))
        if rng.random() < 0.5:
            h, w = w, h
        h, w = min(h, grid), min(w, grid)
        while h * w < k:  # only when clipped by the grid
            if w < grid:
                w += 1
            else:
                h += 1
        top = int(rng.integers(0, grid - h + 1))
        left = int(rng.integers(0, grid - w + 1))
        cells = [(top + r) * grid + (left + c) for r in range(h) for c in range(w)]
        mask[cells[:k]] = True
        # random flips, so a partly filled rectangle is not always open at its last corner
        square = mask.reshape(grid, grid)
        if rng.random() < 0.5:
            square = square[::-1]
        if rng.random() < 0.5:
            square = square[:, ::-1]
        mask = np.ascontiguousarray(square).reshape(-1)
    else:
        raise ValueError(f"unknown mask strategy '{strategy}' (choices: {MASK_STRATEGIES})")
    return mask


def window_masks(
    indices: np.ndarray, grid: int, ratio: float, strategy: str, seed: int, epoch: int
) -> np.ndarray:
    """Masks (B, g^2) for windows identified by their global index in the epoch's window list
    (B may be 0: a rank with no window in a micro-batch)."""
    masks = [
        make_mask(grid, ratio, strategy, np.random.default_rng([seed, epoch, int(i), 0x3A5C]))
        for i in np.asarray(indices).ravel()
    ]
    return np.stack(masks) if masks else np.zeros((0, grid * grid), dtype=bool)
