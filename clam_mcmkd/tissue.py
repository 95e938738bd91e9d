"""Tissue detection for tiling: tiatoolbox's maskers on a thumbnail, clean-up, contours.

The mask decides which patches are kept (``tiling.grid_coords``); the contours become the
GeoJSON tissue annotations in ``masks/``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .utils import ClamMcmkdError

MASK_METHODS = ("otsu", "morphological")


def _tiatoolbox_tissuemask():
    """tiatoolbox's tissuemask module, without running ``tiatoolbox.tools.__init__``.

    That ``__init__`` imports every tool (graph, registration, umap...) and costs ~10 s per
    process on a small machine; the masker module only needs numpy, cv2 and skimage. Falls back
    to the ordinary import if tiatoolbox's layout changes.
    """
    import importlib
    import sys
    import types

    if "tiatoolbox.tools" in sys.modules:
        return importlib.import_module("tiatoolbox.tools.tissuemask")
    try:
        import tiatoolbox

        stub = types.ModuleType("tiatoolbox.tools")
        stub.__path__ = [str(Path(tiatoolbox.__file__).parent / "tools")]
        sys.modules["tiatoolbox.tools"] = stub
        try:
            return importlib.import_module("tiatoolbox.tools.tissuemask")
        finally:
            del sys.modules["tiatoolbox.tools"]  # a later import runs the real __init__
    except ImportError:  # pragma: no cover
        return importlib.import_module("tiatoolbox.tools.tissuemask")


def tissue_mask(
    thumb: np.ndarray,
    method: str = "otsu",
    thumb_mpp: float | None = None,
    patch_px: float | None = None,
) -> np.ndarray:
    """Boolean tissue mask of an RGB thumbnail, with tiatoolbox's maskers.

    `patch_px` (a patch's side in thumbnail pixels) scales the clean-up: gaps and specks much
    smaller than a patch are closed or dropped, so pale stroma inside tissue counts as tissue.
    """
    tm = _tiatoolbox_tissuemask()
    import cv2

    gray = cv2.cvtColor(np.ascontiguousarray(thumb), cv2.COLOR_RGB2GRAY)
    if float(gray.std()) < 2.0 or int(gray.min()) > 235:  # blank image: Otsu would split the noise
        return np.zeros(gray.shape, bool)
    if method == "otsu":
        masker = tm.OtsuTissueMasker()
    elif method == "morphological":
        masker = tm.MorphologicalMasker(mpp=thumb_mpp) if thumb_mpp else tm.MorphologicalMasker()
    else:
        raise ClamMcmkdError(f"unknown mask method {method!r} (choose {', '.join(MASK_METHODS)})")
    mask = np.asarray(masker.fit_transform(thumb[None])[0], bool)
    if mask.ndim == 3:
        mask = mask[..., 0]
    return _clean_mask(mask, patch_px) if patch_px else mask


def _clean_mask(mask: np.ndarray, patch_px: float) -> np.ndarray:
    """Close gaps smaller than ~1/16 patch (cv2's ellipse: skimage's ``disk`` is another
    shape), then drop specks and fill holes under 1/16 of a patch (4-connected regions)."""
    import cv2
    from skimage.morphology import remove_small_holes, remove_small_objects

    radius = max(1, int(round(patch_px / 16)))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    closed = cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_CLOSE, kernel).astype(bool)
    min_area = max(4, int(patch_px * patch_px / 16))
    closed = remove_small_objects(closed, max_size=min_area - 1)  # specks
    return remove_small_holes(closed, max_size=min_area - 1)  # holes


def mask_polygons(mask: np.ndarray, scale: tuple[float, float], min_area: float = 4.0):
    """Tissue polygons (outer ring + holes) in level-0 px, from a mask at `scale` level-0/mask."""
    import cv2

    contours, hierarchy = cv2.findContours(
        mask.astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE
    )
    if hierarchy is None:
        return []
    hierarchy = hierarchy[0]
    factor = np.array(scale, dtype=float)

    def ring(contour):
        contour = cv2.approxPolyDP(contour, 0.7, True)  # drop staircase points
        pts = (contour.reshape(-1, 2).astype(float) + 0.5) * factor
        pts = np.round(pts, 1).tolist()
        return pts + [pts[0]]

    polygons = []
    for i, contour in enumerate(contours):
        if hierarchy[i][3] != -1 or len(contour) < 3 or cv2.contourArea(contour) < min_area:
            continue  # holes are added to their parent below; specks are dropped
        rings = [ring(contour)]
        child = hierarchy[i][2]
        while child != -1:
            if len(contours[child]) >= 3 and cv2.contourArea(contours[child]) >= min_area:
                rings.append(ring(contours[child]))
            child = hierarchy[child][0]
        polygons.append(rings)
    return polygons
