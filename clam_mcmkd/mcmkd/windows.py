"""Context windows: g x g blocks of grid-adjacent tissue patches, read with one ``read_region``.

Windows are found from a CLAM coords h5 alone. Two patches are grid-adjacent when their level-0
corners differ by exactly one patch side (``CoordsH5.patch_size_level0``) along x or y, so coords
from several contours with different grid offsets (CLAM tiles each contour from its own corner)
are handled: a window only needs its g^2 corners to be present.

Windows do NOT overlap by default: scanning corners row by row, a window is taken when all its
g^2 patches exist and none is already in a taken window. One epoch then shows each tissue patch at
most once, the teacher runs at most once per patch, and no window is a near-copy of another.
``overlap=True`` takes every valid corner instead (up to g^2 times more windows per slide).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np
import torch

from ..clam.formats import CoordsH5
from ..patch_loader import PatchReader
from ..slides import Slide
from ..utils import ClamMcmkdError, OpenFiles

log = logging.getLogger("clam_mcmkd.mcmkd")
# Per reading process: windows come in shuffled order, so a tile cache is rarely hit across
# windows; a few slides open with small caches bound the handles and memory of any cohort.
SLIDES_OPEN_PER_WORKER = 8
READER_CACHE_BYTES = 32 * 2**20


class NoWindowsError(ClamMcmkdError):
    """No slide has enough grid-adjacent tissue patches for one window."""


def find_window_origins(
    coords: np.ndarray, step: int, grid: int, overlap: bool = False
) -> np.ndarray:
    """Level-0 top-left corners (W, 2) of the g x g windows fully covered by `coords`."""
    coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
    if grid < 1 or step < 1 or len(coords) < grid * grid:
        return np.zeros((0, 2), dtype=np.int64)
    present = {(int(x), int(y)) for x, y in coords}
    order = np.lexsort((coords[:, 0], coords[:, 1]))  # row by row: y, then x
    offsets = [(i * step, j * step) for j in range(grid) for i in range(grid)]
    used: set[tuple[int, int]] = set()
    origins = []
    for x, y in coords[order]:
        x, y = int(x), int(y)
        cells = [(x + dx, y + dy) for dx, dy in offsets]
        if not all(c in present for c in cells):
            continue
        if not overlap:
            if any(c in used for c in cells):
                continue
            used.update(cells)
        origins.append((x, y))
    return np.asarray(origins, dtype=np.int64).reshape(-1, 2)


def window_patch_coords(origin: np.ndarray, step: int, grid: int) -> np.ndarray:
    """Level-0 corners (g^2, 2) of the patches of one window, row-major (position p = j*g + i)."""
    jj, ii = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")
    offs = np.stack([ii.ravel(), jj.ravel()], axis=1) * step
    return np.asarray(origin, dtype=np.int64).reshape(1, 2) + offs


@dataclass(frozen=True)
class SlideWindows:
    """The windows of one slide and the geometry needed to read them."""

    slide_id: str
    slide_path: str
    origins: np.ndarray  # (W, 2) level-0
    step: int  # level-0 pixels between grid-adjacent patches
    patch_size: int  # pixels at patch_level
    patch_level: int

    def __len__(self) -> int:
        return len(self.origins)

    def patch_coords(self, w: int, grid: int) -> np.ndarray:
        return window_patch_coords(self.origins[w], self.step, grid)


def slide_windows(
    slide_id: str, slide_path: str | os.PathLike, coords: CoordsH5, grid: int, overlap: bool
) -> SlideWindows:
    step = coords.patch_size_level0
    origins = find_window_origins(coords.coords, step, grid, overlap)
    return SlideWindows(
        slide_id, str(slide_path), origins, step, coords.patch_size, coords.patch_level
    )


def read_window(slide: Slide, sw: SlideWindows, w: int, grid: int) -> np.ndarray:
    """One ``read_region`` of g*P pixels at patch_level, cut into g^2 patches: (g^2, P, P, 3)."""
    p = sw.patch_size
    x, y = (int(v) for v in sw.origins[w])
    region = slide.read_region((x, y), sw.patch_level, (grid * p, grid * p))
    if region.shape[:2] != (grid * p, grid * p):
        raise ClamMcmkdError(
            f"{sw.slide_path}: read_region returned {region.shape[:2]} for a {grid * p}px window"
        )
    # (gP, gP, 3) -> (g, P, g, P, 3) -> (g_row, g_col, P, P, 3) -> row-major positions
    patches = region.reshape(grid, p, grid, p, 3).transpose(0, 2, 1, 3, 4)
    return np.ascontiguousarray(patches.reshape(grid * grid, p, p, 3))


@dataclass(frozen=True)
class WindowRef:
    """A window as a (slide index, window index) pair: small, picklable, orderable."""

    slide: int
    window: int


class WindowDataset(torch.utils.data.Dataset):
    """Windows as uint8 patch stacks plus their level-0 coords, read through the slide's own
    JPEG tiles (:meth:`PatchReader.read_window`, equal to :func:`read_window`, several times
    faster than OpenSlide's ``read_region``). Each process keeps at most
    ``SLIDES_OPEN_PER_WORKER`` slides open (least recently used closed first), each with a
    ``READER_CACHE_BYTES`` tile cache: a shuffled epoch over thousands of slides holds bounded
    file handles and memory."""

    def __init__(
        self, slides: list[SlideWindows], refs: list[WindowRef], grid: int, teacher=None,
        masks=None,
    ):  # fmt: skip
        self.slides = slides
        self.refs = list(refs)
        self.grid = grid
        self.teacher = teacher  # a teacher_cache.CacheReader, or None
        self.masks = masks  # masks(window indices, epoch) -> (B, g^2) bool, True = masked
        self.readers = OpenFiles(SLIDES_OPEN_PER_WORKER, self._open_reader)

    def __len__(self) -> int:
        return len(self.refs)

    def _open_reader(self, i: int) -> PatchReader:
        sw = self.slides[i]
        return PatchReader(
            sw.slide_path, sw.patch_level, sw.patch_size, cache_bytes=READER_CACHE_BYTES
        )

    def __getitem__(self, key) -> dict:
        """Window `key` whole (an int), or ``(k, epoch)``: only the patches its mask of that
        epoch leaves visible, row-major (n_vis, P, P, 3): the student never sees the others,
        and their teacher features are cached, so reading them is wasted work."""
        k, epoch = key if isinstance(key, tuple) else (key, None)
        ref = self.refs[k]
        sw = self.slides[ref.slide]
        coords = sw.patch_coords(ref.window, self.grid)
        reader = self.readers.get(ref.slide)
        mask = None
        if epoch is not None and self.masks is not None:
            mask = self.masks(np.asarray([k]), epoch)[0]
        if mask is None or not mask.any():  # every patch seen (patch_kd): one region read
            x, y = (int(v) for v in sw.origins[ref.window])
            patches = reader.read_window(x, y, self.grid)
        else:
            patches = reader.read_batch(coords[~mask])
        item = {
            "patches": torch.from_numpy(patches),
            "coords": torch.from_numpy(coords),
            "slide": ref.slide,
            "index": k,
        }
        if self.teacher is not None:
            item["teacher"] = torch.from_numpy(self.teacher.features(ref.slide, coords))
        return item

    def close(self) -> None:
        self.readers.close()
        if self.teacher is not None:
            self.teacher.close()


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The seeded shuffled order in which one epoch visits each window once."""
    return np.random.default_rng([int(seed), int(epoch), 0x5EED]).permutation(n)
