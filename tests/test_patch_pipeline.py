"""The cohort data path: exact patches for every slide, per-slide failures, window reads."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import numpy as np
import openslide
import pytest
import tifffile
import torch
from test_features import assert_same_pixels, openslide_patches, write_coords, write_pyramid_tiff

from clam_mcmkd.clam import formats as clam_io
from clam_mcmkd.encoders import PatchTransforms
from clam_mcmkd.mcmkd.windows import read_window, slide_windows
from clam_mcmkd.patch_loader import PatchReader
from clam_mcmkd.patch_pipeline import SlideJob, default_num_workers, iter_cohort_batches
from clam_mcmkd.slides import open_slide


def _grid(w: int, h: int, step: int, n: int) -> np.ndarray:
    return np.array([[x, y] for y in range(0, h - 40, step) for x in range(0, w - 40, step)])[:n]


def _corrupt_tile(slide: Path, index: int) -> None:
    """Overwrite one level-0 JPEG tile with zeros: decoding it fails (in OpenSlide too)."""
    with tifffile.TiffFile(slide) as tif:
        off, n = tif.pages[0].dataoffsets[index], tif.pages[0].databytecounts[index]
    data = bytearray(slide.read_bytes())
    data[off : off + n] = bytes(n)
    slide.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def cohort(tmp_path_factory, cmu_slide):
    """Jobs: 3 good slides (RGB, YCbCr, the real svs with edge patches), a missing slide, a
    bad coords h5, and a slide whose 4th tile is corrupt (first rows read, then it fails)."""
    root = tmp_path_factory.mktemp("pipeline")
    jobs = []

    def job(sid, slide, coords, size, level=0):
        path = write_coords(root / "patches" / f"{sid}.h5", slide, coords, size, level)
        jobs.append(SlideJob(sid, str(slide), str(path)))

    a = write_pyramid_tiff(root / "a.tif", 700, 600, seed=1)
    job("a", a, _grid(700, 600, 70, 37), 96)
    b = write_pyramid_tiff(root / "b.tif", 650, 500, photometric="ycbcr", seed=2)
    job("b", b, _grid(650, 500, 90, 11), 80, level=1)
    job("cmu", cmu_slide, np.array([[0, 0], [2100, 2850], [2219, 2966], [900, 700]]), 256)
    jobs.append(SlideJob("missing", str(root / "missing.tif"), jobs[0].coords_path))
    bad = root / "patches" / "bad.h5"
    bad.write_text("not an h5 file")
    jobs.append(SlideJob("bad_coords", str(a), str(bad)))
    c = write_pyramid_tiff(root / "c.tif", 700, 600, seed=3)
    job("corrupt", c, _grid(700, 600, 100, 30), 64)  # rows 0-2 (y < 256) read fine
    _corrupt_tile(c, 3)  # tile (0, 256)
    d = write_pyramid_tiff(root / "d.tif", 300, 300, seed=4)
    job("last", d, _grid(300, 300, 50, 9), 48)
    return jobs


def _reference(job: SlideJob) -> tuple[np.ndarray, np.ndarray]:
    coords = clam_io.read_coords_h5(job.coords_path)
    with PatchReader(job.slide_path, coords.patch_level, coords.patch_size) as reader:
        return reader.read_batch(coords.coords), coords.coords


@pytest.mark.parametrize("workers", [0, 2])
def test_cohort_stream_is_exact_and_fails_per_slide(cohort, workers):
    records = list(iter_cohort_batches(cohort, batch_size=5, num_workers=workers))
    runs = [sid for sid, _ in itertools.groupby(r.slide_id for r in records)]
    assert runs == [j.slide_id for j in cohort]  # slide order kept, each slide contiguous
    for job in cohort:
        mine = [r for r in records if r.slide_id == job.slide_id]
        assert mine[-1].last and not any(r.last for r in mine[:-1])
        errors = [r for r in mine if r.error]
        if job.slide_id in ("missing", "bad_coords", "corrupt"):
            assert len(errors) == 1 and mine[-1] is errors[0], job.slide_id
            continue
        assert not errors
        ref, ref_coords = _reference(job)
        assert [r.start for r in mine] == list(range(0, len(ref), 5))
        ours = torch.cat([r.patches for r in mine]).numpy()
        np.testing.assert_array_equal(ours, ref)  # exactly PatchReader's pixels
        np.testing.assert_array_equal(np.concatenate([r.coords for r in mine]), ref_coords)
        level = clam_io.read_coords_h5(job.coords_path).patch_level
        assert_same_pixels(
            ours, openslide_patches(job.slide_path, ref_coords, level, ours.shape[1])
        )
    err = {r.slide_id: r.error for r in records if r.error}
    assert "missing.tif: slide file does not exist" in err["missing"]
    assert "bad.h5" in err["bad_coords"]
    assert "c.tif" in err["corrupt"] and "JPEG" in err["corrupt"]
    corrupt = [r for r in records if r.slide_id == "corrupt"]
    assert corrupt[0].error is None and corrupt[0].start == 0  # read until the bad tile


def test_transform_runs_in_the_readers(cohort):
    tf = PatchTransforms(32)
    jobs = cohort[:2]
    raw = list(iter_cohort_batches(jobs, batch_size=8, num_workers=0))
    done = list(iter_cohort_batches(jobs, batch_size=8, num_workers=2, transform=tf.batch))
    assert len(raw) == len(done)
    for r, d in zip(raw, done):
        assert d.patches.shape == (len(r.coords), 3, 32, 32) and d.patches.dtype == torch.float32
        torch.testing.assert_close(d.patches, tf.batch(r.patches))


def test_default_workers_from_available_cores():
    cores = len(os.sched_getaffinity(0))
    assert default_num_workers() == max(1, cores - 1)
    assert default_num_workers(local_world_size=cores) == 1
    assert default_num_workers(local_world_size=1) >= 1


def test_window_read_through_tiles_equals_openslide(cmu_slide, tmp_path):
    grid = 3
    with PatchReader(cmu_slide, 0, 128) as reader:
        for x, y in ((0, 0), (1000, 512), (1900, 2700)):  # the last one runs off the slide
            ours = reader.read_window(x, y, grid)
            osr = openslide.OpenSlide(str(cmu_slide))
            region = np.asarray(osr.read_region((x, y), 0, (384, 384)).convert("RGB"))
            ref = region.reshape(3, 128, 3, 128, 3).transpose(0, 2, 1, 3, 4).reshape(9, 128, 128, 3)
            np.testing.assert_array_equal(ours, ref)
        assert reader.stats.fallback_patches == 0
    # the fine-tuner's windows (level 1 of a generated pyramid): same patches as windows.py's
    slide = write_pyramid_tiff(tmp_path / "w.tif", 1300, 1000, seed=5)
    coords = clam_io.read_coords_h5(
        write_coords(tmp_path / "w.h5", slide, _grid(1300, 1000, 200, 30), 100, 1)
    )
    sw = slide_windows("w", slide, coords, grid=2, overlap=False)
    assert len(sw) >= 2
    with PatchReader(slide, 1, 100) as reader, open_slide(slide) as s:
        for w in range(len(sw)):
            x, y = sw.origins[w]
            np.testing.assert_array_equal(reader.read_window(x, y, 2), read_window(s, sw, w, 2))
        assert reader.stats.fallback_patches == 0
