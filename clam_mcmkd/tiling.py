"""``clam-mcmkd tile``: tissue mask (tiatoolbox) + patch grid at a target magnification.

For each slide: a low-resolution thumbnail is masked with tiatoolbox's Otsu or morphological
tissue masker (:mod:`clam_mcmkd.tissue`); a regular grid of patches at the target magnification is laid over the slide and
a patch is kept when at least ``min_tissue`` of it is tissue. Coords go to CLAM's
``patches/<slide_id>.h5``; QC images and tissue contours (GeoJSON, level-0 px) to ``masks/``;
one row per slide to ``process_list.csv``.

Level choice (CLAM semantics): coords are level-0 top-left corners and CLAM reads a patch with
``read_region(coord, patch_level, (patch_size, patch_size))``. We read at the deepest pyramid
level whose downsample does not exceed the target downsample (never upsampling), and scale the
patch size at that level so it covers the target field of view: a 256 px patch at 20x on a 40x
slide without a 20x level is stored as ``patch_level=0, patch_size=512``. Feature extraction
resizes patches to the encoder's input anyway, so the field of view is what must be right.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .clam.formats import (
    SLIDE_EXTENSIONS,
    coords_path,
    read_coords_h5,
    slide_id_of,
    write_coords_h5,
)
from .jobs import FAILED, SKIPPED, Outcome, SlideFailed, run_slide_job
from .slides import Slide, SlideError, open_slide
from .tissue import MASK_METHODS, mask_polygons, tissue_mask
from .utils import ClamMcmkdError, RunSummary, atomic_path, check_output_path, save_config

log = logging.getLogger(__name__)

PROCESS_LIST_COLUMNS = (
    "slide_id", "status", "n_patches", "seconds", "error", "patch_level", "patch_size",
    "patch_size_level0", "mpp", "objective_power",
)  # fmt: skip
# a target within this relative distance of a pyramid level is served by that level
LEVEL_TOLERANCE = 0.05


@dataclass
class TileConfig:
    source: str  # a directory of slides, or one slide file
    save_dir: str
    patch_size: int = 256  # pixels at the target magnification
    step_size: int = 256  # grid step at the target magnification (< patch_size: overlap)
    mag: float | None = 20.0  # target magnification (ignored when mpp is given)
    mpp: float | None = None  # target microns per pixel
    min_tissue: float = 0.5  # minimum tissue fraction of a kept patch
    mask_method: str = "otsu"  # otsu | morphological
    slide_ext: list[str] | None = None  # e.g. [".svs"]; None: every known slide extension
    mask_px_per_patch: int = 16  # thumbnail resolution: mask pixels along one patch side
    max_thumb_size: int = 4096
    min_thumb_size: int = 1024
    qc_size: int = 1024  # longer side of the QC png
    no_auto_skip: bool = False  # re-tile slides whose h5 exists

    def __post_init__(self) -> None:
        if isinstance(self.slide_ext, str):
            self.slide_ext = [self.slide_ext]
        if self.slide_ext:
            self.slide_ext = [e if e.startswith(".") else "." + e for e in self.slide_ext]


@dataclass
class PatchGeometry:
    """How one slide is cut: level, sizes in level and level-0 pixels."""

    patch_level: int
    patch_size: int  # at patch_level (what CLAM passes to read_region)
    step_level0: float
    patch_size_level0: float
    level_downsample: float
    target_downsample: float
    base_mpp: float | None
    base_mag: float | None


# --------------------------------------------------------------------------- inputs


def list_slides(source: str | os.PathLike, slide_ext: list[str] | None = None) -> list[Path]:
    """Slide files in `source` (or `source` itself), sorted; filtered by extension."""
    source = Path(source)
    if not source.exists():
        raise ClamMcmkdError(f"{source}: slide source does not exist")
    if source.is_file():
        return [source]
    exts = tuple(e.lower() for e in (slide_ext or SLIDE_EXTENSIONS))
    files = [
        p
        for p in sorted(source.iterdir())
        # a broken link is listed too: it fails in its slot (process_list.csv), not silently
        if (p.is_file() or p.is_symlink())
        and not p.name.startswith(".")
        and p.name.lower().endswith(exts)
    ]
    if not files:
        raise ClamMcmkdError(f"{source}: no slides with extension(s) {', '.join(exts)}")
    return files


# --------------------------------------------------------------------------- geometry


def base_magnification(slide: Slide) -> tuple[float | None, float | None]:
    """(level-0 mpp, level-0 magnification); one is derived from the other when missing."""
    mpp, mag = slide.mpp, slide.objective_power
    if mag is None and mpp:
        mag = 10.0 / mpp  # 0.5 um/px ~ 20x, the usual convention
    if mpp is None and mag:
        mpp = 10.0 / mag
    return mpp, mag


def patch_geometry(slide: Slide, cfg: TileConfig) -> PatchGeometry:
    base_mpp, base_mag = base_magnification(slide)
    if cfg.mpp:
        if not base_mpp:
            raise SlideError(slide.path, "has neither mpp nor objective power; cannot tile by mpp")
        target_ds = cfg.mpp / base_mpp
    elif cfg.mag:
        if not base_mag:
            raise SlideError(slide.path, "has neither mpp nor objective power; cannot tile by mag")
        target_ds = base_mag / cfg.mag
    else:
        target_ds = 1.0
    if abs(target_ds - round(target_ds)) <= LEVEL_TOLERANCE * target_ds and round(target_ds) >= 1:
        target_ds = float(round(target_ds))  # 0.499 vs 0.5 um/px is the same magnification
    if target_ds < 1:
        log.warning(
            "%s: target is finer than level 0 (downsample %.3f); patches are cut at level 0 "
            "and will be upsampled by feature extraction",
            slide.path.name,
            target_ds,
        )
    level = 0
    for i, ds in enumerate(slide.level_downsamples):
        if ds <= target_ds * (1 + LEVEL_TOLERANCE):
            level = i
    level_ds = slide.level_downsamples[level]
    patch_size = max(1, int(round(cfg.patch_size * target_ds / level_ds)))
    step_level = max(1, int(round(cfg.step_size * target_ds / level_ds)))
    return PatchGeometry(
        patch_level=level,
        patch_size=patch_size,
        step_level0=step_level * level_ds,
        patch_size_level0=patch_size * level_ds,
        level_downsample=level_ds,
        target_downsample=target_ds,
        base_mpp=base_mpp,
        base_mag=base_mag,
    )


# --------------------------------------------------------------------------- patches and QC


def grid_coords(
    dims: tuple[int, int], geom: PatchGeometry, mask: np.ndarray, min_tissue: float
) -> tuple[np.ndarray, np.ndarray]:
    """Level-0 top-left corners of full patches whose tissue fraction >= min_tissue."""
    import cv2

    width, height = dims
    ps0, step0 = geom.patch_size_level0, geom.step_level0
    xs = np.arange(0, width - ps0 + 1, step0)
    ys = np.arange(0, height - ps0 + 1, step0)
    if len(xs) == 0 or len(ys) == 0:
        return np.zeros((0, 2), np.int64), np.zeros(0)
    gx, gy = np.meshgrid(np.floor(xs).astype(np.int64), np.floor(ys).astype(np.int64))
    gx, gy = gx.ravel(), gy.ravel()
    mh, mw = mask.shape
    sx, sy = mw / width, mh / height
    # summed-area table: tissue pixels inside each patch's footprint on the mask
    sat = cv2.integral(mask.astype(np.uint8))
    x0 = np.clip(np.floor(gx * sx).astype(int), 0, mw - 1)
    y0 = np.clip(np.floor(gy * sy).astype(int), 0, mh - 1)
    x1 = np.clip(np.ceil((gx + ps0) * sx).astype(int), x0 + 1, mw)
    y1 = np.clip(np.ceil((gy + ps0) * sy).astype(int), y0 + 1, mh)
    inside = sat[y1, x1] - sat[y0, x1] - sat[y1, x0] + sat[y0, x0]
    frac = inside / ((x1 - x0) * (y1 - y0))
    keep = frac >= min_tissue
    return np.stack([gx[keep], gy[keep]], axis=1), frac[keep]


def write_geojson(path: Path, polygons, slide_id: str) -> Path:
    """Tissue polygons as a GeoJSON FeatureCollection that QuPath imports as annotations."""
    features = [
        {
            "type": "Feature",
            "id": f"{slide_id}-tissue-{i}",
            "geometry": {"type": "Polygon", "coordinates": rings},
            "properties": {
                "objectType": "annotation",
                "classification": {"name": "Tissue", "color": [0, 160, 0]},
            },
        }
        for i, rings in enumerate(polygons)
    ]
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    return path


def write_qc_image(
    path: Path,
    thumb: np.ndarray,
    mask: np.ndarray,
    coords: np.ndarray,
    patch_size_level0: float,
    dims: tuple[int, int],
    max_size: int,
) -> Path:
    """Thumbnail with the tissue contour (green) and the kept patches' grid (blue)."""
    import cv2

    scale = min(1.0, max_size / max(thumb.shape[:2]))
    h, w = int(round(thumb.shape[0] * scale)), int(round(thumb.shape[1] * scale))
    img = cv2.resize(thumb, (w, h), interpolation=cv2.INTER_AREA) if scale < 1 else thumb.copy()
    img = np.ascontiguousarray(img)
    small = cv2.resize(mask.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST)
    contours, _ = cv2.findContours(small, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE)
    sx, sy = w / dims[0], h / dims[1]
    side = max(1, int(round(patch_size_level0 * sx)))
    for x, y in coords:
        x0, y0 = int(round(x * sx)), int(round(y * sy))
        cv2.rectangle(img, (x0, y0), (x0 + side, y0 + side), (40, 80, 220), 1)
    cv2.drawContours(img, contours, -1, (0, 170, 0), max(1, w // 512))
    with atomic_path(path) as tmp:
        if not cv2.imwrite(str(tmp), cv2.cvtColor(img, cv2.COLOR_RGB2BGR)):
            raise OSError(f"cannot write {path}")
    return path


# --------------------------------------------------------------------------- one slide


def thumbnail_size(slide: Slide, geom: PatchGeometry, cfg: TileConfig) -> int:
    longest = max(slide.dimensions)
    per_px = geom.patch_size_level0 / cfg.mask_px_per_patch  # level-0 px per mask px
    size = int(math.ceil(longest / max(per_px, 1.0)))
    return int(min(max(size, cfg.min_thumb_size), cfg.max_thumb_size, longest))


def tile_slide(path: str | os.PathLike, cfg: TileConfig) -> dict:
    """Tile one slide; returns its process-list row. Raises SlideError for unreadable slides."""
    path = Path(path)
    save_dir = Path(cfg.save_dir)
    slide_id = slide_id_of(path)
    started = time.time()
    with open_slide(path) as slide:
        geom = patch_geometry(slide, cfg)
        thumb = slide.get_thumbnail(thumbnail_size(slide, geom, cfg))
        dims = slide.dimensions
        level_dim = slide.level_dimensions[geom.patch_level]
    thumb_ds = dims[0] / thumb.shape[1]
    thumb_mpp = geom.base_mpp * thumb_ds if geom.base_mpp else None
    mask = tissue_mask(thumb, cfg.mask_method, thumb_mpp, geom.patch_size_level0 / thumb_ds)
    coords, _ = grid_coords(dims, geom, mask, cfg.min_tissue)
    masks_dir = save_dir / "masks"
    scale = (dims[0] / mask.shape[1], dims[1] / mask.shape[0])
    write_geojson(masks_dir / f"{slide_id}.geojson", mask_polygons(mask, scale), slide_id)
    write_qc_image(
        masks_dir / f"{slide_id}.png",
        thumb,
        mask,
        coords,
        geom.patch_size_level0,
        dims,
        cfg.qc_size,
    )
    row = {
        "slide_id": slide_id,
        "status": "done",
        "n_patches": int(len(coords)),
        "error": "",
        "patch_level": geom.patch_level,
        "patch_size": geom.patch_size,
        "patch_size_level0": round(geom.patch_size_level0, 3),
        "mpp": geom.base_mpp,
        "objective_power": geom.base_mag,
    }
    if len(coords) == 0:
        row["status"] = "no_tissue"
        row["error"] = (
            f"no patch with >= {cfg.min_tissue:.0%} tissue "
            f"(tissue mask covers {mask.mean():.1%} of the thumbnail)"
        )
    else:
        write_coords_h5(
            coords_path(save_dir, slide_id),
            coords,
            patch_size=geom.patch_size,
            patch_level=geom.patch_level,
            downsample=(geom.level_downsample, geom.level_downsample),
            downsampled_level_dim=level_dim,
            level_dim=level_dim,
            name=slide_id,
            save_path=str(save_dir / "patches"),
            extra_attrs={
                "target_patch_size": int(cfg.patch_size),
                "target_downsample": float(geom.target_downsample),
                "step_size_level0": float(geom.step_level0),
                "mask_method": cfg.mask_method,
                "min_tissue": float(cfg.min_tissue),
            },
        )
    row["seconds"] = round(time.time() - started, 3)
    return row


# --------------------------------------------------------------------------- batch


def write_process_list(path: Path, rows: list[dict]) -> None:
    import pandas as pd

    df = pd.DataFrame(rows, columns=list(PROCESS_LIST_COLUMNS))
    for col in ("n_patches", "patch_level", "patch_size"):
        df[col] = df[col].astype("Int64")  # integers, blank where a slide failed
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)


def tile_slides(cfg: TileConfig) -> RunSummary:
    """Tile every slide in ``cfg.source``; bad slides are recorded and skipped."""
    _check_config(cfg)
    save_dir = check_output_path(cfg.save_dir)
    slides = list_slides(cfg.source, cfg.slide_ext)
    (save_dir / "patches").mkdir(parents=True, exist_ok=True)
    (save_dir / "masks").mkdir(parents=True, exist_ok=True)
    _check_previous_config(save_dir, cfg)
    save_config(cfg, save_dir / "tile_config.json")
    summary = RunSummary(stage="tile")
    rows: list[dict] = []

    def on_outcome(outcome: Outcome) -> None:  # process_list.csv is rewritten after each slide
        rows.append(_process_row(outcome))
        write_process_list(save_dir / "process_list.csv", rows)

    run_slide_job(
        slides,
        lambda path: _tile_task(path, cfg),
        summary,
        slide_id=slide_id_of,
        finished=None if cfg.no_auto_skip else lambda path: _tiled_before(save_dir, path),
        on_outcome=on_outcome,
        desc="tile",
        postfix=lambda: {
            "patches": sum(r["n_patches"] for r in rows),
            "failed": len(summary.failed),
        },
    )
    summary.extra["patches"] = sum(r["n_patches"] for r in rows)
    summary.extra["no_tissue"] = sum(r["status"] == "no_tissue" for r in rows)
    summary.write(save_dir / "tile_summary.json")
    return summary


def _check_config(cfg: TileConfig) -> None:
    if cfg.mask_method not in MASK_METHODS:
        raise ClamMcmkdError(
            f"unknown mask method {cfg.mask_method!r} (choose {', '.join(MASK_METHODS)})"
        )
    if cfg.patch_size < 1 or cfg.step_size < 1:
        raise ClamMcmkdError("patch size and step size must be positive")
    if not 0 <= cfg.min_tissue <= 1:
        raise ClamMcmkdError(f"min tissue must be in [0, 1], got {cfg.min_tissue}")
    if cfg.mpp is not None and cfg.mpp <= 0 or cfg.mag is not None and cfg.mag <= 0:
        raise ClamMcmkdError("target mag / mpp must be positive")


def _tiled_before(save_dir: Path, path: Path) -> int | None:
    """The patch count of a readable coords h5 made before, else None (tile the slide)."""
    h5_path = coords_path(save_dir, slide_id_of(path))
    if not h5_path.is_file():
        return None
    try:
        return len(read_coords_h5(h5_path))
    except ClamMcmkdError as err:
        log.warning("%s; tiling the slide again", err)
        return None


def _tile_task(path: Path, cfg: TileConfig) -> dict:
    try:
        row = tile_slide(path, cfg)
    except ClamMcmkdError:
        raise  # these name the file already
    except Exception as err:  # noqa: BLE001 - any other error of one slide, named here
        raise SlideFailed(f"{path}: cannot tile it ({type(err).__name__}: {err})") from err
    if row["status"] != "done":  # no tissue: a failure, with its full process-list row
        raise SlideFailed(row["error"], result=row)
    return row


def _process_row(outcome: Outcome) -> dict:
    """The process-list row of one outcome (a finished tiling's own row where there is one)."""
    if isinstance(outcome.result, dict):
        return outcome.result
    status = "failed" if outcome.status == FAILED else outcome.status
    return {
        "slide_id": outcome.slide_id,
        "status": status,
        "n_patches": outcome.result if outcome.status == SKIPPED else 0,
        "seconds": round(outcome.seconds, 3),
        "error": outcome.message,
    }


def _check_previous_config(save_dir: Path, cfg: TileConfig) -> None:
    """Warn when resuming into a directory tiled with another geometry."""
    old_path = save_dir / "tile_config.json"
    if not old_path.is_file():
        return
    try:
        old = json.loads(old_path.read_text())
    except (OSError, ValueError):
        return
    keys = ("patch_size", "step_size", "mag", "mpp", "min_tissue", "mask_method")
    changed = [k for k in keys if old.get(k) != getattr(cfg, k)]
    if changed and not cfg.no_auto_skip:
        log.warning(
            "%s was tiled with other settings (%s); existing h5 files are kept "
            "(use --no-auto-skip to redo them)",
            save_dir,
            ", ".join(f"{k}: {old.get(k)} -> {getattr(cfg, k)}" for k in changed),
        )
