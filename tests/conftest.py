"""Shared fixtures: the real CMU slide carried in tests/data and small seeded synthetic data."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

os.environ.setdefault("CLAM_MCMKD_NO_PROGRESS", "1")
# No test downloads weights: a pretrained=True build fails at once, as on a machine offline.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

CMU_SLIDE = Path(__file__).resolve().parent / "data" / "CMU-1-Small-Region.svs"
# provenance, licence and checksum: tests/data/README.md
CMU_SHA256 = "ed92d5a9f2e86df67640d6f92ce3e231419ce127131697fbbce42ad5e002c8a7"


@pytest.fixture(scope="session")
def cmu_slide() -> Path:
    """The real 2220x2967 Aperio slide (20x, 0.499 um/px, CC0) carried in tests/data."""
    if not CMU_SLIDE.is_file():
        pytest.fail(f"{CMU_SLIDE}: test slide is missing from the checkout")
    digest = hashlib.sha256(CMU_SLIDE.read_bytes()).hexdigest()
    if digest != CMU_SHA256:
        pytest.fail(f"{CMU_SLIDE}: sha256 {digest[:12]}... is not the OpenSlide test slide's")
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


@pytest.fixture
def hub_offline(monkeypatch):
    """The Hugging Face hub unreachable, whatever the environment says (fails in milliseconds)."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a test module: on a busy 2-core machine more threads make tiny
    models far slower (modules opt in with ``pytestmark``)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
