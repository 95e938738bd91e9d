"""Fast patch reading for feature extraction: the slide's own JPEG tiles, decoded once each.

CLAM reads every patch with one OpenSlide ``read_region`` call; its per-call overhead, not JPEG
decoding, bounds the data path (benchmarks/RESULTS.md). For the common case, a tiled JPEG TIFF/SVS level
read by OpenSlide's ``aperio`` or ``generic-tiff`` driver, :class:`PatchReader` reads the
compressed tiles a patch covers straight from the file (tifffile gives offsets and JPEG tables,
imagecodecs decodes), keeps decoded tiles in an LRU cache so that neighbouring patches share
them, and assembles the patch. The result equals OpenSlide's ``read_region(...).convert('RGB')``
(same libjpeg-turbo; pixels outside the level are black, as OpenSlide's transparent pixels
become after ``convert('RGB')``). Anything unusual (another vendor, non-JPEG compression, odd
photometric, a location that falls between pixels of a pyramid level) is read through
:func:`clam_mcmkd.slides.open_slide` instead, so the output never depends on the path taken.

:mod:`clam_mcmkd.patch_pipeline` runs readers in a pool of worker processes for a whole cohort.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .slides import Slide, SlideError, open_slide

log = logging.getLogger(__name__)

# OpenSlide drivers whose levels are plain TIFF tile grids (no overlaps, no sparse tiles).
FAST_VENDORS = ("aperio", "generic-tiff")
JPEG_COMPRESSION = 7
PHOTOMETRIC_RGB, PHOTOMETRIC_YCBCR = 2, 6
DEFAULT_CACHE_BYTES = 512 * 2**20


@dataclass
class ReaderStats:
    """What a reader did; the benchmark and tests use it to see which path ran."""

    fast_patches: int = 0
    fallback_patches: int = 0
    tiles_decoded: int = 0
    tile_cache_hits: int = 0
    fallback_reason: str | None = None

    def merge(self, other: ReaderStats) -> None:
        self.fast_patches += other.fast_patches
        self.fallback_patches += other.fallback_patches
        self.tiles_decoded += other.tiles_decoded
        self.tile_cache_hits += other.tile_cache_hits
        self.fallback_reason = self.fallback_reason or other.fallback_reason


class _FileReader:
    """Positional reads that are safe across threads (pread where the OS has it)."""

    def __init__(self, path: Path):
        self._fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        self._lock = None if hasattr(os, "pread") else threading.Lock()

    def read(self, offset: int, size: int) -> bytes:
        if self._lock is None:
            return os.pread(self._fd, size, offset)
        with self._lock:  # pragma: no cover - Windows
            os.lseek(self._fd, offset, os.SEEK_SET)
            return os.read(self._fd, size)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


@dataclass
class TiledJpegLevel:
    """One pyramid level stored as a JPEG tile grid, decoded tile by tile with an LRU cache."""

    width: int
    height: int
    tile_width: int
    tile_height: int
    offsets: np.ndarray
    bytecounts: np.ndarray
    jpegtables: bytes | None
    decode: object  # tifffile's per-page decode function
    file: _FileReader
    cache_tiles: int
    stats: ReaderStats = field(default_factory=ReaderStats)

    def __post_init__(self):
        self.tiles_across = -(-self.width // self.tile_width)
        self.tiles_down = -(-self.height // self.tile_height)
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()

    def tile(self, index: int) -> np.ndarray:
        cached = self._cache.get(index)
        if cached is not None:
            self._cache.move_to_end(index)
            self.stats.tile_cache_hits += 1
            return cached
        nbytes = int(self.bytecounts[index])
        if nbytes == 0:  # a sparse (absent) tile: OpenSlide paints it transparent -> black
            arr = np.zeros((self.tile_height, self.tile_width, 3), np.uint8)
        else:
            data = self.file.read(int(self.offsets[index]), nbytes)
            arr = self.decode(data, index, jpegtables=self.jpegtables)[0]
            arr = np.asarray(arr).reshape(arr.shape[-3:])[..., :3]
            if arr.shape[:2] != (self.tile_height, self.tile_width):  # a cropped edge tile
                full = np.zeros((self.tile_height, self.tile_width, 3), np.uint8)
                h, w = min(arr.shape[0], self.tile_height), min(arr.shape[1], self.tile_width)
                full[:h, :w] = arr[:h, :w]
                arr = full
        self.stats.tiles_decoded += 1
        self._cache[index] = arr
        if len(self._cache) > self.cache_tiles:
            self._cache.popitem(last=False)
        return arr

    def read(self, x: int, y: int, w: int, h: int, out: np.ndarray | None = None) -> np.ndarray:
        """Pixels [y, y+h) x [x, x+w) of this level; outside the level is black."""
        if out is None:
            out = np.zeros((h, w, 3), np.uint8)
        else:
            out[:] = 0
        x0, y0 = max(x, 0), max(y, 0)
        x1, y1 = min(x + w, self.width), min(y + h, self.height)
        if x0 >= x1 or y0 >= y1:
            return out
        tw, th = self.tile_width, self.tile_height
        for ty in range(y0 // th, (y1 - 1) // th + 1):
            ty0 = ty * th
            sy0, sy1 = max(y0, ty0), min(y1, ty0 + th)
            for tx in range(x0 // tw, (x1 - 1) // tw + 1):
                tx0 = tx * tw
                sx0, sx1 = max(x0, tx0), min(x1, tx0 + tw)
                tile = self.tile(ty * self.tiles_across + tx)
                out[sy0 - y : sy1 - y, sx0 - x : sx1 - x] = tile[
                    sy0 - ty0 : sy1 - ty0, sx0 - tx0 : sx1 - tx0
                ]
        return out


def _fast_level_problem(page, size: tuple[int, int]) -> str | None:
    """Why a TIFF page cannot be decoded tile by tile as OpenSlide would (None: it can)."""
    if not page.is_tiled:
        return "not tiled"
    if page.compression != JPEG_COMPRESSION:
        return f"compression {int(page.compression)} is not JPEG"
    if page.photometric not in (PHOTOMETRIC_RGB, PHOTOMETRIC_YCBCR):
        return f"photometric {int(page.photometric)} is not RGB/YCbCr"
    if page.samplesperpixel != 3 or page.bitspersample != 8 or page.planarconfig != 1:
        return "not 8-bit contiguous RGB"
    if "Orientation" in page.tags and int(page.tags["Orientation"].value) != 1:
        return "non-default orientation"
    if getattr(page, "tiledepth", 1) not in (1, None) or page.imagedepth > 1:
        return "3-D tiles"
    if (page.imagewidth, page.imagelength) != tuple(size):
        return "size differs from OpenSlide's level"
    if len(page.dataoffsets) != -(-page.imagewidth // page.tilewidth) * -(
        -page.imagelength // page.tilelength
    ):
        return "tile count does not match the grid"
    return None


def _tiff_pages(tif):
    """Every page of every series level (pyramids as successive pages or SubIFDs)."""
    seen = set()
    for series in tif.series:
        for level in series.levels:
            for page in level.pages:
                page = getattr(page, "keyframe", page)
                if page is not None and page.offset not in seen:
                    seen.add(page.offset)
                    yield page


class PatchReader:
    """Reads CLAM patches (level-0 location, level, square size) from one slide.

    Opened once per process; not to be shared between threads.
    """

    def __init__(
        self,
        slide_path: str | os.PathLike,
        patch_level: int,
        patch_size: int,
        *,
        fast: bool = True,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
    ):
        self.path = Path(slide_path)
        self.patch_level = int(patch_level)
        self.patch_size = int(patch_size)
        self.stats = ReaderStats()
        self.slide: Slide = open_slide(self.path)
        if not 0 <= self.patch_level < self.slide.level_count:
            raise SlideError(
                self.path,
                f"patch_level {self.patch_level} does not exist (slide has {self.slide.level_count} levels)",
            )
        self.downsample = float(self.slide.level_downsamples[self.patch_level])
        self._tif = None
        self._file: _FileReader | None = None
        self.level: TiledJpegLevel | None = None
        if fast:
            problem = self._open_fast(cache_bytes)
            if problem:
                self.stats.fallback_reason = problem
                log.debug("%s: OpenSlide path (%s)", self.path.name, problem)

    @property
    def is_fast(self) -> bool:
        return self.level is not None

    def _open_fast(self, cache_bytes: int) -> str | None:
        if self.slide.backend != "openslide":
            return f"read by {self.slide.backend}"
        vendor = getattr(self.slide, "properties", {}).get("openslide.vendor")
        if vendor not in FAST_VENDORS:
            return f"OpenSlide vendor {vendor!r}"
        try:
            import tifffile

            self._tif = tifffile.TiffFile(self.path)
        except Exception as err:  # noqa: BLE001 - any parse failure means: use OpenSlide
            return f"tifffile cannot parse it ({err})"
        size = self.slide.level_dimensions[self.patch_level]
        problems = []
        matches = []
        for page in _tiff_pages(self._tif):
            if (page.imagewidth, page.imagelength) != tuple(size):
                continue
            problem = _fast_level_problem(page, size)
            (problems if problem else matches).append(problem or page)
        if len(matches) != 1:
            self._close_tiff()
            return problems[0] if problems else f"{len(matches)} TIFF pages of size {size}"
        page = matches[0]
        self._file = _FileReader(self.path)
        tile_bytes = page.tilewidth * page.tilelength * 3
        tiles_across = -(-page.imagewidth // page.tilewidth)
        rows = -(-self.patch_size // page.tilelength) + 1
        cache_tiles = max(tiles_across * rows + 16, 1)
        cache_tiles = int(min(cache_tiles, max(cache_bytes // tile_bytes, 4 * rows)))
        self.level = TiledJpegLevel(
            width=int(page.imagewidth),
            height=int(page.imagelength),
            tile_width=int(page.tilewidth),
            tile_height=int(page.tilelength),
            offsets=np.asarray(page.dataoffsets, dtype=np.int64),
            bytecounts=np.asarray(page.databytecounts, dtype=np.int64),
            jpegtables=page.jpegtables,
            decode=page.decode,
            file=self._file,
            cache_tiles=cache_tiles,
            stats=self.stats,
        )
        return None

    def _level_xy(self, x: int, y: int) -> tuple[int, int] | None:
        """Level pixel of a level-0 location, or None if it falls between level pixels."""
        if self.downsample == 1.0:
            return int(x), int(y)
        lx, ly = x / self.downsample, y / self.downsample
        rx, ry = round(lx), round(ly)
        if abs(lx - rx) > 1e-6 or abs(ly - ry) > 1e-6:
            return None  # OpenSlide would interpolate: let it
        return int(rx), int(ry)

    def read_region(
        self, x: int, y: int, width: int, height: int, out: np.ndarray | None = None
    ) -> np.ndarray:
        """(height, width, 3) uint8 at patch_level from level-0 (x, y): OpenSlide's
        ``read_region((x, y), patch_level, (width, height))`` in RGB, through the tiles."""
        if self.level is not None:
            xy = self._level_xy(x, y)
            if xy is not None:
                self.stats.fast_patches += 1
                return self.level.read(xy[0], xy[1], width, height, out)
        self.stats.fallback_patches += 1
        region = self.slide.read_region((int(x), int(y)), self.patch_level, (width, height))
        if out is None:
            return region
        out[:] = region
        return out

    def read(self, x: int, y: int, out: np.ndarray | None = None) -> np.ndarray:
        """One patch (P, P, 3) uint8, equal to ``read_region((x, y), level, (P, P))`` in RGB."""
        return self.read_region(x, y, self.patch_size, self.patch_size, out)

    def read_window(self, x: int, y: int, grid: int) -> np.ndarray:
        """The g x g patches of the window at level-0 (x, y), read as ONE g*P region and cut:
        (g^2, P, P, 3) in row-major positions (what MCM-KD's windows need)."""
        p = self.patch_size
        region = self.read_region(x, y, grid * p, grid * p)
        patches = region.reshape(grid, p, grid, p, 3).transpose(0, 2, 1, 3, 4)
        return np.ascontiguousarray(patches.reshape(grid * grid, p, p, 3))

    def read_batch(self, coords: np.ndarray) -> np.ndarray:
        """Patches for (N, 2) level-0 coords, in order: uint8 (N, P, P, 3)."""
        coords = np.asarray(coords).reshape(-1, 2)
        out = np.empty((len(coords), self.patch_size, self.patch_size, 3), np.uint8)
        for i, (x, y) in enumerate(coords):
            self.read(int(x), int(y), out[i])
        return out

    def _close_tiff(self) -> None:
        if self._tif is not None:
            self._tif.close()
            self._tif = None

    def close(self) -> None:
        self._close_tiff()
        if self._file is not None:
            self._file.close()
            self._file = None
        self.slide.close()

    def __enter__(self) -> PatchReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
