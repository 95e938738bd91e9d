"""A synthetic cohort in which context can matter: tissue classes as smooth random fields.

``make_cohort(..., kind="fields")`` (``clam-mcmkd make-cohort --kind fields``). Why a second
generator: in the first one every patch is drawn from a small bank of tiles and the label is a
blob of a distinct texture, so there is no structure at the scale of several patches and
nothing for a context model to learn from neighbours.

A slide here:

- tissue classes (stroma, epithelium, lymphoid, fat) are the argmax of K smooth Gaussian random
  fields whose correlation length spans a few patches, plus fine noise, so class domains cover
  several patches and their borders interdigitate over a graded band;
- nuclei are drawn one by one (ellipses) with their class's density, size, shape and darkness;
- positive ("tumor") slides have one region (``tumor_frac`` of the tissue) where a smooth
  "atypia" field a(x) in [0, 1] makes nuclei larger, darker, denser and more pleomorphic AND
  fragments the class fields into small nests. ``tumor_contrast`` (the difficulty knob) scales
  both: 0 = positives are drawn exactly like negatives (chance), 1 = the strongest change. At
  low contrast a single patch differs only subtly; the region's evidence is that many
  neighbouring patches share the shift - what a context model can pick up;
- a per-slide stain jitter and a smooth stain-unevenness field in optical-density (H&E) space,
  so colour alone is no label.

With ``texture_source`` (a user-given slide, e.g. an H&E svs) the classes take real texture:
the source's tissue cells are clustered (k-means on H/E density) into K classes and each class
layer is quilted from feathered, randomly rotated crops of its cluster; atypia then enlarges
the texture (crops zoomed in) and raises hematoxylin.

Each slide is rendered whole in memory (keep ``size`` <= ~4096) and written with the same
pyramidal JPEG TIFF writer as the first generator. Ground truth: the annotation JSON (tissue
and region contours) and ``annotations/<id>.npz`` with the coarse class and atypia maps.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from .utils import atomic_path

CLASSES = ("stroma", "epithelium", "lymphoid", "fat")


@dataclass(frozen=True)
class _ClassLook:
    base: tuple[float, float, float]  # cytoplasm / stroma RGB
    nucleus: tuple[float, float, float]
    density: float  # nuclei per 1000 px^2
    radius: tuple[float, float]  # semi-axes (long, short), level-0 px
    fibres: float  # amplitude of the fibre texture
    bias: float  # added to the class field: how common the class is


_LOOKS = (
    _ClassLook((236, 170, 206), (120, 66, 156), 1.6, (6.0, 2.2), 0.10, 0.3),  # stroma
    _ClassLook((214, 150, 200), (104, 56, 150), 7.0, (4.2, 3.6), 0.04, 0.0),  # epithelium
    _ClassLook((226, 176, 214), (70, 36, 120), 16.0, (2.6, 2.4), 0.03, -0.3),  # lymphoid
    _ClassLook((246, 240, 244), (130, 80, 160), 0.4, (4.0, 2.0), 0.00, -0.5),  # fat
)
_BACKGROUND = np.array([242.0, 240.0, 243.0], np.float32)


@dataclass(frozen=True)
class FieldParams:
    """Scales of the fields (level-0 px) and how strongly atypia acts at contrast 1."""

    class_sigma: float = 110.0  # correlation length of the class fields (~1.7 patches of 64)
    border_sigma: float = 3.0  # fine noise that makes borders interdigitate
    border_noise: float = 0.25
    nest_sigma: float = 10.0  # the fragmenting field inside the region
    nest_gain: float = 1.6
    size_gain: float = 0.55  # nuclear size x (1 + size_gain * c * a)
    dark_gain: float = 0.30
    density_gain: float = 0.6
    pleomorphism: float = 0.35
    zoom_gain: float = 0.45  # real textures: zoom factor 1 + zoom_gain * c
    h_gain: float = 0.35  # hematoxylin x (1 + h_gain * c * a)
    stain_sigma: float = 48.0  # stain unevenness
    stain_uneven: float = 0.08


def _smooth(rng: np.random.Generator, shape, sigma: float) -> np.ndarray:
    """Unit-variance Gaussian random field (float32) with correlation length ~`sigma` px.

    Wide fields are drawn on a grid ``sigma / 4`` times coarser and upsampled (bilinear): the
    same smoothness at a fraction of the cost of a wide blur at full resolution.
    """
    import cv2

    h, w = shape
    factor = max(int(sigma // 4), 1)
    coarse = (-(-h // factor) + 1, -(-w // factor) + 1)
    noise = rng.standard_normal(coarse, dtype=np.float32)
    field = cv2.GaussianBlur(noise, (0, 0), max(sigma / factor, 0.3), borderType=cv2.BORDER_REFLECT)
    if factor > 1:
        field = cv2.resize(field, (coarse[1] * factor, coarse[0] * factor))
    field = np.ascontiguousarray(field[:h, :w])
    return field / (field.std() + 1e-6)


def _upsample(grid: np.ndarray, width: int, height: int, step: int) -> np.ndarray:
    import cv2

    up = cv2.resize(
        grid.astype(np.float32),
        (grid.shape[1] * step, grid.shape[0] * step),
        interpolation=cv2.INTER_LINEAR,
    )
    return up[:height, :width]


# --------------------------------------------------------------------------- the maps


def _atypia_grid(rng, tissue: np.ndarray, frac: float, step: int) -> np.ndarray:
    """A smooth bump in [0, 1] covering about `frac` of the tissue (coarse grid)."""
    from scipy import ndimage

    radius = max(np.sqrt(frac * tissue.sum() / np.pi), 1.5)
    inside = ndimage.distance_transform_edt(tissue)
    candidates = np.argwhere(inside >= min(radius * 0.8, inside.max()))
    cy, cx = candidates[rng.integers(len(candidates))]
    yy, xx = np.mgrid[0 : tissue.shape[0], 0 : tissue.shape[1]].astype(np.float32)
    stretch = rng.uniform(0.75, 1.33)
    dist = np.sqrt(((xx - cx) * stretch) ** 2 + ((yy - cy) / stretch) ** 2) / radius
    dist = dist + 0.15 * _smooth(rng, tissue.shape, max(radius / 3, 1.0))
    # 1 inside, graded to 0 over ~0.6 radius: the border spans a patch or two
    return (np.clip((1.3 - dist) / 0.6, 0, 1) * tissue).astype(np.float32)


def _class_map(rng, shape, atypia: np.ndarray, contrast: float, p: FieldParams) -> np.ndarray:
    """Per-pixel class index: argmax of K smooth fields (+ nests inside the atypia region)."""
    fields = []
    for look in _LOOKS:
        f = _smooth(rng, shape, p.class_sigma) + look.bias
        f += p.border_noise * _smooth(rng, shape, p.border_sigma)
        f += p.nest_gain * contrast * atypia * _smooth(rng, shape, p.nest_sigma)
        fields.append(f)
    return np.argmax(np.stack(fields), axis=0).astype(np.uint8)


# --------------------------------------------------------------------------- procedural look


def _nuclei_ink(rng, classes, atypia, contrast, p: FieldParams) -> np.ndarray:
    """uint8 coverage of nuclei (0-255, x darkness), drawn one by one as antialiased ellipses."""
    import cv2

    h, w = classes.shape
    density = np.array([look.density for look in _LOOKS], np.float32)[classes] / 1000.0
    density = density * (1 + p.density_gain * contrast * atypia)
    peak = float(density.max())
    n = rng.poisson(peak * h * w)
    ys, xs = rng.uniform(0, h, n), rng.uniform(0, w, n)
    iy, ix = ys.astype(int), xs.astype(int)
    keep = rng.random(n) * peak < density[iy, ix]
    ink = np.zeros((h, w), np.uint8)
    shift = 4  # sub-pixel centres and axes (1/16 px)
    for y, x, yi, xi in zip(ys[keep], xs[keep], iy[keep], ix[keep]):
        look = _LOOKS[classes[yi, xi]]
        a = contrast * atypia[yi, xi]
        grow = (1 + p.size_gain * a) * rng.uniform(0.85, 1.15)
        long_ax, short_ax = (
            r * grow * (1 + p.pleomorphism * a * rng.normal()) for r in look.radius
        )
        dark = min(1.0, rng.uniform(0.75, 0.95) * (1 + p.dark_gain * a))
        cv2.ellipse(
            ink,
            (int(x * 16), int(y * 16)),
            (int(max(long_ax, 1.0) * 16), int(max(short_ax, 0.8) * 16)),
            float(rng.uniform(0, 180)),
            0,
            360,
            int(255 * dark),
            -1,
            cv2.LINE_AA,
            shift,
        )
    return ink


def _procedural_rgb(rng, classes, atypia, contrast, p: FieldParams) -> np.ndarray:
    """Float32 RGB of the tissue: class base colour with fibres, fat membranes, nuclei."""
    import cv2

    h, w = classes.shape
    base = np.array([look.base for look in _LOOKS], np.float32)[classes]
    fibre_amp = np.array([look.fibres for look in _LOOKS], np.float32)[classes]
    noise = rng.standard_normal((h, w), dtype=np.float32)
    ax = (9.0, 1.2) if rng.random() < 0.5 else (1.2, 9.0)  # fibre direction of this slide
    fibres = cv2.GaussianBlur(noise, (0, 0), sigmaX=ax[0], sigmaY=ax[1])
    fibres /= fibres.std() + 1e-6
    base *= 1 + (fibre_amp * fibres)[..., None]
    band = _smooth(rng, (h, w), 6.0)  # fat: thin membranes on the zero set of a band field
    membrane = np.exp(-((band / 0.12) ** 2))[..., None] * (classes == 3)[..., None]
    base = base * (1 - 0.55 * membrane) + np.float32([200, 120, 170]) * 0.55 * membrane
    ink = _nuclei_ink(rng, classes, atypia, contrast, p).astype(np.float32)[..., None] / 255.0
    nucleus = np.array([look.nucleus for look in _LOOKS], np.float32)[classes]
    return base * (1 - ink) + nucleus * ink


# --------------------------------------------------------------------------- real texture


@lru_cache(maxsize=2)
def _source_cells(path: str, cell: int = 64, max_side: int = 4096, n_classes: int = 4):
    """The source slide's level 0 (at most `max_side` square) and its tissue cells by class."""
    from sklearn.cluster import KMeans

    from .slides import open_slide

    with open_slide(path) as slide:
        w, h = slide.dimensions
        x0, y0 = max((w - max_side) // 2, 0), max((h - max_side) // 2, 0)
        img = slide.read_region((x0, y0), 0, (min(w, max_side), min(h, max_side)))
    img = np.ascontiguousarray(img[..., :3])
    gh, gw = img.shape[0] // cell, img.shape[1] // cell
    cells = img[: gh * cell, : gw * cell].reshape(gh, cell, gw, cell, 3).swapaxes(1, 2)
    od = _to_od(cells.reshape(gh * gw, cell * cell, 3).astype(np.float32))
    hed = od @ np.linalg.inv(_STAINS)  # (cells, px, 3) stain densities
    tissue = od.sum(axis=2).mean(axis=1) > 0.6  # stained cells only: no near-white class
    feats = np.stack([hed[..., 0].mean(1), hed[..., 1].mean(1), hed[..., 0].std(1)], axis=1)
    feats = feats[tissue]
    if len(feats) < 4 * n_classes:
        raise ValueError(f"{path}: too little tissue for a texture source ({len(feats)} cells)")
    km = KMeans(n_clusters=n_classes, n_init=4, random_state=0).fit(
        (feats - feats.mean(0)) / (feats.std(0) + 1e-6)
    )
    order = np.argsort([feats[km.labels_ == k, 0].mean() for k in range(n_classes)])
    label = np.empty(n_classes, int)
    label[order] = np.arange(n_classes)  # class 0 = least hematoxylin: deterministic ids
    ids = np.flatnonzero(tissue)
    corners = np.stack([ids // gw * cell, ids % gw * cell], axis=1)  # (y, x)
    return img, [corners[label[km.labels_] == k] for k in range(n_classes)], cell


def _quilt(rng, img, corners, cell, h, w, zoom: float) -> np.ndarray:
    """Float32 (h, w, 3) layer of feathered crops around `corners` (rotated, flipped, zoomed)."""
    import cv2

    size, stride = 2 * cell, 3 * cell // 2
    ramp = np.minimum(np.arange(size) + 1, size - np.arange(size)).astype(np.float32)
    feather = np.minimum(ramp[:, None], ramp[None, :])[..., None]
    acc = np.zeros((h + stride + size, w + stride + size, 3), np.float32)
    weight = np.zeros((h + stride + size, w + stride + size, 1), np.float32)
    src = max(int(size / zoom), 8)
    for y in range(-stride, h, stride):
        for x in range(-stride, w, stride):
            cy, cx = corners[rng.integers(len(corners))] + cell // 2
            top = int(np.clip(cy - src // 2, 0, img.shape[0] - src))
            left = int(np.clip(cx - src // 2, 0, img.shape[1] - src))
            crop = img[top : top + src, left : left + src].astype(np.float32)
            crop = np.rot90(crop, int(rng.integers(4)))
            crop = crop[:, ::-1] if rng.random() < 0.5 else crop
            crop = cv2.resize(np.ascontiguousarray(crop), (size, size))
            ys, xs = y + stride, x + stride  # acc is padded on both sides
            acc[ys : ys + size, xs : xs + size] += crop * feather
            weight[ys : ys + size, xs : xs + size] += feather
    out = acc / np.maximum(weight, 1e-6)
    return out[stride : stride + h, stride : stride + w]


def _real_rgb(rng, source: str, classes, atypia, contrast, p: FieldParams) -> np.ndarray:
    img, corners, cell = _source_cells(str(source))
    h, w = classes.shape
    out = np.zeros((h, w, 3), np.float32)
    dither = np.clip(0.5 + 0.25 * _smooth(rng, (h, w), 2.0), 0, 1)
    atypical = (atypia > dither) & (contrast > 0)
    for k, where in enumerate(corners):
        mask = classes == k
        layer = _quilt(rng, img, where, cell, h, w, 1.0)
        zoomed = _quilt(rng, img, where, cell, h, w, 1 + p.zoom_gain * contrast)
        out[mask] = layer[mask]
        out[mask & atypical] = zoomed[mask & atypical]
    return out


# --------------------------------------------------------------------------- stain


# Ruifrok & Johnston's H&E(-DAB) optical-density vectors (rows: H, E, residual)
_STAINS = (
    np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], np.float32)
    / np.linalg.norm([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], axis=1)[:, None]
)


def _to_od(rgb: np.ndarray) -> np.ndarray:
    return -np.log(np.clip(rgb, 1.0, 255.0) / 255.0)


def _stain(rng, rgb, atypia, contrast, jitter: float, p: FieldParams) -> np.ndarray:
    """Scale H and E densities: per-slide jitter, smooth unevenness, hematoxylin in atypia."""
    h, w = rgb.shape[:2]
    hed = _to_od(rgb) @ np.linalg.inv(_STAINS)
    for c in (0, 1):
        scale = 1 + rng.uniform(-jitter, jitter) * 2
        scale = scale + p.stain_uneven * _smooth(rng, (h, w), p.stain_sigma)
        if c == 0:
            scale = scale + p.h_gain * contrast * atypia
        hed[..., c] = np.where(hed[..., c] > 0, hed[..., c] * scale, hed[..., c])
    return 255.0 * np.exp(-(hed @ _STAINS))


# --------------------------------------------------------------------------- a slide


class FieldsRenderer:
    """Renders one fields slide; exposes what :func:`cohort.write_pyramid` needs."""

    def __init__(self, cfg, width: int, height: int, seed: int, positive: bool):
        from .cohort import _tissue_mask
        from .synthetic_tiff import halve

        rng = np.random.default_rng(seed)
        p, step = FieldParams(), cfg.mask_step
        gh, gw = -(-height // step), -(-width // step)
        self.tissue = _tissue_mask(rng, gh, gw)
        # drawn for every slide (same random stream), so that at contrast 0 a positive slide
        # is pixel for pixel the negative slide of the same seed
        self.atypia = _atypia_grid(rng, self.tissue, cfg.tumor_frac, step)
        if not positive:
            self.atypia[:] = 0.0
        contrast = cfg.tumor_contrast if positive else 0.0
        atypia = _upsample(self.atypia, width, height, step)
        classes = _class_map(rng, (height, width), atypia, contrast, p)
        if cfg.texture_source:
            tissue_rgb = _real_rgb(rng, cfg.texture_source, classes, atypia, contrast, p)
        else:
            tissue_rgb = _procedural_rgb(rng, classes, atypia, contrast, p)
        tissue_rgb = _stain(rng, tissue_rgb, atypia, contrast, cfg.stain_jitter, p)
        alpha = _upsample(self.tissue, width, height, step)[..., None]
        img = _BACKGROUND + 2.0 * rng.standard_normal((height, width, 1), dtype=np.float32)
        img += (tissue_rgb - img) * alpha
        self.image = np.clip(img, 0, 255).astype(np.uint8)
        self.classes = classes[step // 2 :: step, step // 2 :: step]  # coarse, at cell centres
        self.level1 = halve(self.image)
        self.tile = cfg.tile_size

    def tiles(self):
        t, (h, w) = self.tile, self.image.shape[:2]
        pad = np.full((-(-h // t) * t, -(-w // t) * t, 3), 242, np.uint8)
        pad[:h, :w] = self.image
        for y in range(0, pad.shape[0], t):
            for x in range(0, pad.shape[1], t):
                yield pad[y : y + t, x : x + t]


def write_maps(path: str | os.PathLike, renderer: FieldsRenderer, step: int) -> Path:
    """Coarse ground truth (one cell per `step` px): class index and atypia in [0, 1]."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez_compressed(
                fh,
                classes=renderer.classes,
                atypia=renderer.atypia.astype(np.float16),
                tissue=renderer.tissue,
                step=np.int32(step),
            )
    return Path(path)


def read_maps(cohort_dir: str | os.PathLike, slide_id: str) -> dict[str, np.ndarray]:
    with np.load(Path(cohort_dir) / "annotations" / f"{slide_id}.npz") as z:
        return {k: z[k] for k in z.files}


def patch_truth(maps: dict, coords: np.ndarray, patch: int) -> tuple[np.ndarray, np.ndarray]:
    """Per patch (level-0 top-left corners): majority class and mean atypia under it."""
    step = int(maps["step"])
    classes, atypia = maps["classes"], maps["atypia"].astype(np.float32)
    n = max(patch // step, 1)
    out_c, out_a = np.zeros(len(coords), int), np.zeros(len(coords), np.float32)
    for i, (x, y) in enumerate(np.asarray(coords, int) // step):
        block = classes[y : y + n, x : x + n].ravel()
        out_c[i] = np.bincount(block, minlength=len(CLASSES)).argmax() if block.size else 0
        out_a[i] = atypia[y : y + n, x : x + n].mean() if block.size else 0.0
    return out_c, out_a


def make_fields_slide(
    path: str | os.PathLike,
    *,
    size: int = 1024,
    height: int | None = None,
    seed: int = 0,
    positive: bool = False,
    cfg=None,
) -> dict:
    """Write one fields slide and ``<path stem>.npz`` ground-truth maps beside its annotation
    (``make_cohort`` puts them in ``annotations/``); returns the annotation dict."""
    from .cohort import CohortConfig, slide_dims, slide_truth
    from .synthetic_tiff import write_pyramid

    cfg = cfg or CohortConfig(out_dir=str(Path(path).parent), kind="fields")
    width, height = slide_dims(cfg, size, height)
    renderer = FieldsRenderer(cfg, width, height, seed, positive)
    write_pyramid(path, renderer.tiles(), renderer.level1, width, height, cfg)
    extra = {"kind": "fields", "texture_source": cfg.texture_source,
             "tumor_contrast": cfg.tumor_contrast, "classes": list(CLASSES)}  # fmt: skip
    region = renderer.atypia >= 0.5
    truth = slide_truth(cfg, width, height, positive, renderer.tissue, region, extra)
    maps_dir = Path(cfg.out_dir) / "annotations"
    write_maps(maps_dir / f"{Path(path).stem}.npz", renderer, cfg.mask_step)
    return truth
