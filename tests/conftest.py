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
