"""A seeded synthetic cohort: pyramidal JPEG-tiled TIFF slides with a learnable slide label.

No real labelled slides can be shipped with the project, so tests, benchmarks and the demo run
on slides made here. Each slide has a near-white background, one to three blob-shaped tissue
regions with an H&E-like texture (pink stroma, small purple nuclei) and, in "tumor" slides, a
small region (``tumor_frac`` of the tissue) of dense, large, dark nuclei: a label that MIL can
learn from patch features (``tumor_contrast`` < 1 brings that texture closer to normal tissue,
for experiments that must not sit at ceiling). The files are generic pyramidal TIFFs (levels as
pages, 256 px JPEG tiles, resolution tags for the mpp), which OpenSlide and tiatoolbox both read.

Speed: shapes are drawn on a coarse grid (``mask_step`` level-0 pixels per cell) and textures
come from a small bank of pre-rendered 256 px tiles, so a slide is rendered strip by strip with a
few vectorised numpy operations per tile row; lower pyramid levels are 2x2 means of the level
above, so every level shows the same pixels.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .clam.formats import write_dataset_csv
from .synthetic_tiff import write_pyramid
from .utils import atomic_write_text, check_output_path, field_default, progress, save_config

LABELS = ("normal", "tumor")
KINDS = ("blobs", "fields")


@dataclass
class CohortConfig:
    out_dir: str
    n_slides: int = 24
    size: int = 4096  # level-0 side in pixels (int) ...
    height: int | None = None  # ... or a non-square slide: size = width, height = height
    seed: int = 0
    positive_frac: float = 0.5
    tile_size: int = 256
    mpp: float = 0.5  # microns per pixel at level 0 (0.5 = 20x)
    write_objective_power: bool = True  # AppMag = 10 / mpp; False: readers must go by the mpp
    tumor_frac: float = 0.04  # tumour area / tissue area in positive slides
    # difficulty knob: 1 = the distinct tumour texture, 0 = tumour looks like normal tissue;
    # in between, stroma/nucleus colour, nuclear density and size are interpolated
    tumor_contrast: float = 1.0
    two_slide_case_frac: float = 0.3  # share of cases that have two slides
    jpeg_quality: int = 90
    min_level_side: int = 512  # stop adding pyramid levels below this longer side
    mask_step: int = 16  # level-0 pixels per cell of the coarse shape grid
    stain_jitter: float = 0.06  # per-slide colour variation, so colour alone is no label
    slide_prefix: str = "slide"
    # "blobs": the texture-bank slides above; "fields": tissue classes as smooth random fields
    # with a regional label (see cohort_fields), where context can matter
    kind: str = "blobs"
    texture_source: str | None = None  # fields only: a slide to take real texture from

    def __post_init__(self):
        if not 0.0 <= self.tumor_contrast <= 1.0:
            raise ValueError(f"tumor_contrast must be in [0, 1], got {self.tumor_contrast}")
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if self.texture_source is not None:
            if self.kind != "fields":
                raise ValueError("texture_source needs kind='fields'")
            if not Path(self.texture_source).is_file():
                raise ValueError(f"{self.texture_source}: texture source slide does not exist")


# --------------------------------------------------------------------------- texture bank


_BACKGROUND = np.array([242.0, 240.0, 243.0], np.float32)
_STROMA = np.array([236.0, 168.0, 204.0], np.float32)
_NUCLEUS = np.array([112.0, 62.0, 150.0], np.float32)
_TUMOR_STROMA = np.array([196.0, 120.0, 190.0], np.float32)
_TUMOR_NUCLEUS = np.array([58.0, 26.0, 96.0], np.float32)


def _texture_tile(
    rng: np.random.Generator,
    tile: int,
    stroma: np.ndarray,
    nucleus: np.ndarray,
    density: float,
    radius: tuple[float, float],
) -> np.ndarray:
    """One float32 RGB tile: noisy stroma with round nuclei (a few pixels across)."""
    from scipy import ndimage

    n_nuclei = rng.poisson(density * tile * tile / 1000.0)
    ink = np.zeros((tile, tile), np.float32)
    centers = rng.uniform(0, tile, size=(n_nuclei, 2))
    radii = rng.uniform(*radius, size=n_nuclei)
    reach = int(np.ceil(radius[1])) + 1
    offsets = np.arange(-reach, reach + 1)
    for (cy, cx), r in zip(centers, radii):
        iy, ix = int(cy), int(cx)
        dy = (iy + offsets - cy)[:, None]
        dx = (ix + offsets - cx)[None, :]
        disc = np.clip(r + 0.5 - np.sqrt(dx * dx + dy * dy), 0, 1)
        # indices wrap, so neighbouring tiles join without seams
        window = np.ix_((iy + offsets) % tile, (ix + offsets) % tile)
        ink[window] = np.maximum(ink[window], disc)
    fibres = ndimage.gaussian_filter(
        rng.normal(0, 1, (tile, tile)).astype(np.float32), 3, mode="wrap"
    )
    fibres /= fibres.std() + 1e-6
    base = stroma[None, None, :] * (1 + 0.05 * fibres[..., None])
    img = base * (1 - ink[..., None]) + nucleus[None, None, :] * ink[..., None]
    img += rng.normal(0, 4, img.shape)
    return img.astype(np.float32)


_NORMAL_DENSITY, _NORMAL_RADIUS = 6.0, (2.5, 4.0)
_TUMOR_DENSITY, _TUMOR_RADIUS = 16.0, (5.0, 8.0)


def _tumor_texture_params(contrast: float) -> tuple[np.ndarray, np.ndarray, float, tuple]:
    """Tumour stroma, nucleus colour, density, radius range at `contrast` (1 = the defaults)."""
    if contrast == 1.0:  # exactly today's constants, so default slides stay byte-identical
        return _TUMOR_STROMA, _TUMOR_NUCLEUS, _TUMOR_DENSITY, _TUMOR_RADIUS

    def mix(normal, tumor):
        return normal + contrast * (np.asarray(tumor) - np.asarray(normal))

    return (
        mix(_STROMA, _TUMOR_STROMA).astype(np.float32),
        mix(_NUCLEUS, _TUMOR_NUCLEUS).astype(np.float32),
        float(mix(_NORMAL_DENSITY, _TUMOR_DENSITY)),
        tuple(float(r) for r in mix(_NORMAL_RADIUS, _TUMOR_RADIUS)),
    )


def _texture_bank(
    rng: np.random.Generator, tile: int, n: int = 6, tumor_contrast: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    normal = np.stack(
        [
            _texture_tile(rng, tile, _STROMA, _NUCLEUS, _NORMAL_DENSITY, _NORMAL_RADIUS)
            for _ in range(n)
        ]
    )
    stroma, nucleus, density, radius = _tumor_texture_params(tumor_contrast)
    tumor = np.stack([_texture_tile(rng, tile, stroma, nucleus, density, radius) for _ in range(n)])
    return normal, tumor


# --------------------------------------------------------------------------- shapes


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    import cv2

    noise = cv2.GaussianBlur(rng.normal(0, 1, shape).astype(np.float32), (0, 0), sigma)
    return noise / (noise.std() + 1e-6)


def _tissue_mask(rng: np.random.Generator, grid_h: int, grid_w: int) -> np.ndarray:
    """Union of 1-3 irregular ellipses on the coarse grid (bool)."""
    yy, xx = np.mgrid[0:grid_h, 0:grid_w].astype(np.float32)
    side = min(grid_h, grid_w)
    noise = _smooth_noise(rng, (grid_h, grid_w), sigma=max(side / 24, 1.0))
    mask = np.zeros((grid_h, grid_w), bool)
    n_blobs = int(rng.integers(1, 4))
    for _ in range(n_blobs):
        cy = rng.uniform(0.3, 0.7) * grid_h
        cx = rng.uniform(0.3, 0.7) * grid_w
        a = rng.uniform(0.18, 0.32) * grid_w
        b = rng.uniform(0.15, 0.28) * grid_h
        t = rng.uniform(0, np.pi)
        u = (xx - cx) * np.cos(t) + (yy - cy) * np.sin(t)
        v = -(xx - cx) * np.sin(t) + (yy - cy) * np.cos(t)
        mask |= (u / a) ** 2 + (v / b) ** 2 + 0.25 * noise < 1.0
    if not mask.any():  # pragma: no cover - the ellipses are large enough
        mask[grid_h // 3 : 2 * grid_h // 3, grid_w // 3 : 2 * grid_w // 3] = True
    return mask


def _tumor_mask(rng: np.random.Generator, tissue: np.ndarray, frac: float) -> np.ndarray:
    """An irregular blob of about `frac` of the tissue area, well inside the tissue."""
    from scipy import ndimage

    area = frac * tissue.sum()
    radius = max(np.sqrt(area / np.pi), 1.5)
    inside = ndimage.distance_transform_edt(tissue)
    candidates = np.argwhere(inside >= min(radius * 1.2, inside.max()))
    cy, cx = candidates[rng.integers(len(candidates))]
    yy, xx = np.mgrid[0 : tissue.shape[0], 0 : tissue.shape[1]].astype(np.float32)
    noise = _smooth_noise(rng, tissue.shape, sigma=max(radius / 3, 1.0))
    stretch = rng.uniform(0.7, 1.4)
    dist = ((xx - cx) / (radius * stretch)) ** 2 + ((yy - cy) * stretch / radius) ** 2
    tumor = (dist + 0.2 * noise < 1.0) & tissue
    if not tumor.any():
        tumor[cy, cx] = True
    return tumor


def _mask_contours(mask: np.ndarray, step: int) -> list[list[list[int]]]:
    """Outer contours of a coarse mask, in level-0 pixels."""
    import cv2

    contours, _ = cv2.findContours(
        mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE
    )
    return [(c.reshape(-1, 2) * step).astype(int).tolist() for c in contours if len(c) >= 3]


# --------------------------------------------------------------------------- rendering


def _upsample_rows(grid: np.ndarray, row0: int, n_rows: int, width: int, step: int) -> np.ndarray:
    """Bilinear upsampling of coarse-grid rows to a level-0 strip [row0, row0 + n_rows)."""
    import cv2

    g0 = row0 // step
    lo, hi = max(g0 - 1, 0), min(g0 + n_rows // step + 2, grid.shape[0])
    block = grid[lo:hi].astype(np.float32)
    up = cv2.resize(block, (grid.shape[1] * step, (hi - lo) * step), interpolation=cv2.INTER_LINEAR)
    start = row0 - lo * step
    return up[start : start + n_rows, :width]


class _SlideRenderer:
    """Renders one slide strip by strip (tile rows) and keeps the 2x downsampled copy."""

    def __init__(self, cfg: CohortConfig, width: int, height: int, seed: int, positive: bool):
        rng = np.random.default_rng(seed)
        self.cfg, self.width, self.height = cfg, width, height
        t, step = cfg.tile_size, cfg.mask_step
        self.tiles_x = -(-width // t)
        self.tiles_y = -(-height // t)
        grid_h = -(-self.tiles_y * t // step)
        grid_w = -(-self.tiles_x * t // step)
        self.tissue = _tissue_mask(rng, grid_h, grid_w)
        # keep tissue off the padded margin beyond the slide's edge
        self.tissue[height // step :, :] = False
        self.tissue[:, width // step :] = False
        self.tumor = (
            _tumor_mask(rng, self.tissue, cfg.tumor_frac)
            if positive
            else np.zeros_like(self.tissue)
        )
        self.normal_bank, self.tumor_bank = _texture_bank(rng, t, tumor_contrast=cfg.tumor_contrast)
        jitter = (1 + rng.uniform(-cfg.stain_jitter, cfg.stain_jitter, 3)).astype(np.float32)
        self.normal_bank = self.normal_bank * jitter
        self.tumor_bank = self.tumor_bank * jitter
        self.background = _BACKGROUND * jitter.mean()
        self.rng = rng
        self.level1 = np.empty((height // 2, width // 2, 3), np.uint8)

    def _bank_strip(self, bank: np.ndarray, choice: np.ndarray) -> np.ndarray:
        return np.concatenate([bank[i] for i in choice], axis=1)

    def strip(self, ty: int) -> np.ndarray:
        """Tile row `ty` as a uint8 (tile, tiles_x * tile, 3) array; fills level 1 as it goes."""
        t, step = self.cfg.tile_size, self.cfg.mask_step
        w = self.tiles_x * t
        row0 = ty * t
        n_bank = len(self.normal_bank)
        normal = self._bank_strip(self.normal_bank, self.rng.integers(n_bank, size=self.tiles_x))
        alpha = _upsample_rows(self.tissue, row0, t, w, step)[..., None]
        img = self.background + 2.0 * self.rng.standard_normal((t, w, 1), dtype=np.float32)
        if self.tumor[row0 // step : (row0 + t) // step + 2].any():
            tumor = self._bank_strip(self.tumor_bank, self.rng.integers(n_bank, size=self.tiles_x))
            beta = _upsample_rows(self.tumor, row0, t, w, step)[..., None]
            tissue = normal * (1 - beta) + tumor * beta
        else:
            tissue = normal
        img += (tissue - img) * alpha
        strip = np.clip(img, 0, 255).astype(np.uint8)
        # level 1 = 2x2 means of level 0 (rows of this strip that exist in the slide)
        r_end = min(row0 + t, self.height - self.height % 2)
        if r_end > row0:
            part = strip[: r_end - row0, : self.width - self.width % 2].astype(np.uint16)
            half = (
                part[0::2, 0::2] + part[1::2, 0::2] + part[0::2, 1::2] + part[1::2, 1::2] + 2
            ) // 4
            self.level1[row0 // 2 : r_end // 2] = half.astype(np.uint8)
        return strip

    def tiles(self):
        t = self.cfg.tile_size
        for ty in range(self.tiles_y):
            strip = self.strip(ty)
            for tx in range(self.tiles_x):
                yield strip[:, tx * t : (tx + 1) * t]


def make_slide(
    path: str | os.PathLike,
    *,
    size: int = 4096,
    height: int | None = None,
    seed: int = 0,
    positive: bool = False,
    cfg: CohortConfig | None = None,
) -> dict:
    """Write one synthetic slide; returns its ground truth (tissue and tumour, level-0 px)."""
    cfg = cfg or CohortConfig(out_dir=str(Path(path).parent))
    width, height = slide_dims(cfg, size, height)
    renderer = _SlideRenderer(cfg, width, height, seed, positive)
    write_pyramid(path, renderer.tiles(), renderer.level1, width, height, cfg)
    truth = slide_truth(cfg, width, height, positive, renderer.tissue, renderer.tumor)
    if cfg.tumor_contrast != 1.0:  # key left out at the default: annotations stay byte-identical
        truth["tumor_contrast"] = cfg.tumor_contrast
    return truth


def slide_dims(cfg: CohortConfig, size: int, height: int | None) -> tuple[int, int]:
    width, height = int(size), int(height or size)
    if min(width, height) < 2 * cfg.tile_size:
        raise ValueError(
            f"slide side must be at least {2 * cfg.tile_size} px, got {width}x{height}"
        )
    return width, height


def slide_truth(cfg: CohortConfig, width: int, height: int, positive: bool, tissue, tumor,
                extra: dict | None = None) -> dict:  # fmt: skip
    """One slide's annotation: size, label, `extra` keys, tissue and tumour contours, areas
    and the tumour's bounding box (x0, y0, x1, y1), all in level-0 px (masks at mask_step)."""
    step = cfg.mask_step
    truth = {
        "width": width,
        "height": height,
        "mpp": cfg.mpp,
        "label": LABELS[int(positive)],
        **(extra or {}),
        "tissue_contours": _mask_contours(tissue, step),
        "tissue_area_px": int(tissue.sum()) * step * step,
        "tumor_contours": _mask_contours(tumor, step) if positive else [],
        "tumor_area_px": int(tumor.sum()) * step * step,
        "tumor_bbox": None,
    }
    if positive and tumor.any():
        ys, xs = np.nonzero(tumor)
        truth["tumor_bbox"] = [int(xs.min()) * step, int(ys.min()) * step,
                               int(xs.max() + 1) * step, int(ys.max() + 1) * step]  # fmt: skip
    return truth


# --------------------------------------------------------------------------- cohort


def _cases(rng: np.random.Generator, n_slides: int, two_frac: float) -> list[list[int]]:
    """Group slide indices into cases; about `two_frac` of cases get two slides."""
    cases, i = [], 0
    while i < n_slides:
        k = 2 if (n_slides >= 4 and n_slides - i >= 2 and rng.random() < two_frac) else 1
        cases.append(list(range(i, i + k)))
        i += k
    return cases


def _case_labels(rng: np.random.Generator, cases: list[list[int]], n_pos_slides: int) -> list[int]:
    """Case-level labels with about `n_pos_slides` positive slides (both classes when possible)."""
    order = rng.permutation(len(cases))
    labels = [0] * len(cases)
    count = 0
    for j in order:
        if count + len(cases[j]) <= n_pos_slides:
            labels[j] = 1
            count += len(cases[j])
    if len(cases) >= 2 and all(labels):
        labels[order[-1]] = 0
    if len(cases) >= 2 and not any(labels):
        labels[order[0]] = 1
    return labels


def make_cohort(
    out_dir: str | os.PathLike,
    n_slides: int = field_default(CohortConfig, "n_slides"),
    size: int = field_default(CohortConfig, "size"),
    seed: int = field_default(CohortConfig, "seed"),
    **kw,
) -> Path:
    """Generate the cohort into `out_dir`; returns the dataset CSV path.

    Layout: ``slides/<slide_id>.tif``, ``annotations/<slide_id>.json`` (tissue and tumour
    contours, level-0 px), ``dataset.csv`` (case_id, slide_id, label), ``cohort_config.json``.
    Existing slides with an annotation are kept (resume); the result only depends on `seed`.
    """
    cfg = CohortConfig(
        out_dir=str(out_dir), n_slides=int(n_slides), size=int(size), seed=seed, **kw
    )
    if cfg.n_slides < 1:
        raise ValueError("n_slides must be >= 1")
    out = check_output_path(out_dir)
    (out / "slides").mkdir(parents=True, exist_ok=True)
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(cfg.seed)
    cases = _cases(rng, cfg.n_slides, cfg.two_slide_case_frac)
    labels = _case_labels(rng, cases, int(round(cfg.positive_frac * cfg.n_slides)))
    slide_seeds = rng.integers(0, 2**31 - 1, size=cfg.n_slides)
    rows = []
    for case_idx, (slides, lab) in enumerate(zip(cases, labels)):
        for i in slides:
            rows.append(
                {
                    "case_id": f"case_{case_idx:03d}",
                    "slide_id": f"{cfg.slide_prefix}_{i:03d}",
                    "label": LABELS[lab],
                    "seed": int(slide_seeds[i]),
                }
            )
    for row in progress(rows, desc="make-cohort", unit="slide"):
        slide_path = out / "slides" / f"{row['slide_id']}.tif"
        ann_path = out / "annotations" / f"{row['slide_id']}.json"
        if slide_path.is_file() and _same_slide(ann_path, row, cfg):
            continue  # resume: this exact slide was made before
        make = make_slide
        if cfg.kind == "fields":
            from .cohort_fields import make_fields_slide as make

        truth = make(
            slide_path,
            size=cfg.size,
            height=cfg.height,
            seed=row["seed"],
            positive=row["label"] == "tumor",
            cfg=cfg,
        )
        truth.update(slide_id=row["slide_id"], case_id=row["case_id"], seed=row["seed"])
        atomic_write_text(ann_path, json.dumps(truth) + "\n")
    save_config(cfg, out / "cohort_config.json")
    return write_dataset_csv(
        out / "dataset.csv", [{k: r[k] for k in ("case_id", "slide_id", "label")} for r in rows]
    )


def _same_slide(ann_path: Path, row: dict, cfg: CohortConfig) -> bool:
    try:
        ann = json.loads(ann_path.read_text())
    except (OSError, ValueError):
        return False
    return (
        ann.get("seed") == row["seed"]
        and ann.get("label") == row["label"]
        and ann.get("width") == cfg.size
        and ann.get("height") == (cfg.height or cfg.size)
        and ann.get("mpp") == cfg.mpp
        and ann.get("tumor_contrast", 1.0) == cfg.tumor_contrast
        and ann.get("kind", "blobs") == cfg.kind
        and ann.get("texture_source") == cfg.texture_source
    )


def read_annotation(cohort_dir: str | os.PathLike, slide_id: str) -> dict:
    """Ground truth of a generated slide (what benchmarks and tests compare against)."""
    return json.loads((Path(cohort_dir) / "annotations" / f"{slide_id}.json").read_text())
