"""Shared fixtures: the real CMU slide from ../shared and small seeded synthetic data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("CLAM_MCMKD_NO_PROGRESS", "1")

REPO = Path(__file__).resolve().parents[1]
CMU_SLIDE = REPO.parent / "shared" / "data" / "CMU-1-Small-Region.svs"


@pytest.fixture(scope="session")
def cmu_slide() -> Path:
    """The real 2220x2967 Aperio slide (20x, 0.499 um/px) that CI has beside the checkout."""
    if not CMU_SLIDE.is_file():
        pytest.fail(f"{CMU_SLIDE} is missing: CI must have ../shared beside the checkout")
    return CMU_SLIDE


@pytest.fixture(scope="session")
def small_cohort(tmp_path_factory) -> Path:
    """Six seeded synthetic slides (3072 px, 20x, 3 tumor / 3 normal, one two-slide case).

    Returns the cohort directory: ``slides/<id>.tif``, ``dataset.csv``, ``annotations/``.
    The tumour region is enlarged (8% of tissue) so a few patches per tumor slide show it.
    """
    from clam_mcmkd.cohort import make_cohort

    out = tmp_path_factory.mktemp("cohort")
    make_cohort(out, n_slides=6, size=3072, seed=7, tumor_frac=0.08)
    return out


@pytest.fixture(scope="session")
def small_cohort_tiled(small_cohort, tmp_path_factory) -> Path:
    """`small_cohort` tiled at 256 px / 20x: returns the tiling dir (``patches/<id>.h5``)."""
    from clam_mcmkd.tiling import TileConfig, tile_slides

    out = tmp_path_factory.mktemp("tiled")
    summary = tile_slides(TileConfig(source=str(small_cohort / "slides"), save_dir=str(out)))
    assert not summary.failed, summary.failed
    return out
