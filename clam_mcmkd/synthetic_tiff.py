"""Pyramidal JPEG-tiled TIFFs in Aperio's layout: the writer both synthetic generators share.

OpenSlide reads the pages as levels; tifffile and tiatoolbox see an SVS with its mpp (and
objective power unless it is left out). `cfg` is a :class:`cohort.CohortConfig` (tile size,
JPEG quality, mpp, smallest level).
"""

from __future__ import annotations

import numpy as np

from .utils import atomic_path


def halve(img: np.ndarray) -> np.ndarray:
    h, w = img.shape[0] // 2 * 2, img.shape[1] // 2 * 2
    part = img[:h, :w].astype(np.uint16)
    return (
        (part[0::2, 0::2] + part[1::2, 0::2] + part[0::2, 1::2] + part[1::2, 1::2] + 2) // 4
    ).astype(np.uint8)


def _aperio_description(width: int, height: int, cfg) -> str:
    """Aperio-style ImageDescription: OpenSlide reads the pages as levels, tifffile and
    tiatoolbox see an SVS with its mpp (and objective power, unless it is left out)."""
    fields = [
        f"Aperio Image Library (clam-mcmkd synthetic) \r\n{width}x{height} [0,0 {width}x{height}]"
        f" ({cfg.tile_size}x{cfg.tile_size}) JPEG/RGB Q={cfg.jpeg_quality}",
        f"MPP = {cfg.mpp:g}",
    ]
    if cfg.write_objective_power:
        fields.insert(1, f"AppMag = {10.0 / cfg.mpp:g}")
    return "|".join(fields)


def write_pyramid(path, tiles, level1: np.ndarray, width: int, height: int, cfg) -> None:
    """Write a pyramidal JPEG-tiled TIFF in Aperio's layout (atomically).

    `tiles` yields the level-0 tiles (``cfg.tile_size`` square, row by row); `level1` is the 2x2
    mean of level 0, from which the thumbnail and the lower levels are halved.
    """
    import tifffile

    px_per_cm = 1e4 / cfg.mpp
    t = cfg.tile_size
    common = dict(
        tile=(t, t),
        photometric="rgb",
        compression="jpeg",
        compressionargs={"level": cfg.jpeg_quality},
        resolutionunit="CENTIMETER",
        metadata=None,
    )
    big = width * height * 3 > 2**31
    description = _aperio_description(width, height, cfg)
    with atomic_path(path) as tmp:
        with tifffile.TiffWriter(tmp, bigtiff=big) as tif:
            tif.write(
                tiles,
                shape=(height, width, 3),
                dtype=np.uint8,
                resolution=(px_per_cm, px_per_cm),
                description=description,
                **common,
            )
            # Aperio layout: page 1 is a stripped thumbnail, pages 2.. are the reduced levels
            thumb = level1
            while max(thumb.shape[:2]) > 1024:
                thumb = halve(thumb)
            tif.write(thumb, photometric="rgb", compression="jpeg", metadata=None)
            level, ds = level1, 2
            while max(level.shape[:2]) >= cfg.min_level_side and min(level.shape[:2]) >= 16:
                tif.write(
                    level,
                    resolution=(px_per_cm / ds, px_per_cm / ds),
                    description=f"Aperio Image Library (clam-mcmkd) {width}x{height} -> "
                    f"{level.shape[1]}x{level.shape[0]}",
                    **common,
                )
                level, ds = halve(level), ds * 2
