"""`clam-mcmkd tile`: patches on tissue, CLAM's h5 layout, QC outputs, resume, bad slides."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from clam_mcmkd.clam.formats import read_coords_h5
from clam_mcmkd.cli import main
from clam_mcmkd.cohort import CohortConfig, make_slide, read_annotation
from clam_mcmkd.slides import open_slide
from clam_mcmkd.tiling import TileConfig, tile_slide, tile_slides


def stained_fraction(rgb: np.ndarray) -> float:
    """Share of pixels that are stained (coloured or dark), not the white glass."""
    rgb = rgb.astype(int)
    chroma = rgb.max(axis=2) - rgb.min(axis=2)
    return float(((chroma > 25) | (rgb.mean(axis=2) < 200)).mean())


def check_patches(slide_path, h5_path, min_stained=0.3, sample=None):
    """Coords inside the slide, CLAM attrs consistent, CLAM-style reads land on tissue."""
    coords_h5 = read_coords_h5(h5_path)
    coords, attrs = coords_h5.coords, coords_h5.attrs
    assert len(coords) > 0
    with open_slide(slide_path) as slide:
        level, size = coords_h5.patch_level, coords_h5.patch_size
        ds = slide.level_downsamples[level]
        assert attrs["name"] == slide_path.stem
        assert np.allclose(attrs["downsample"], (ds, ds))
        assert tuple(attrs["level_dim"]) == slide.level_dimensions[level]
        assert tuple(attrs["downsampled_level_dim"]) == slide.level_dimensions[level]
        side0 = coords_h5.patch_size_level0
        width, height = slide.dimensions
        assert (coords >= 0).all()
        assert (coords[:, 0] + side0 <= width).all() and (coords[:, 1] + side0 <= height).all()
        assert len(np.unique(coords, axis=0)) == len(coords)
        rng = np.random.default_rng(0)
        picks = coords if sample is None else coords[rng.permutation(len(coords))[:sample]]
        fractions = []
        for x, y in picks:
            # exactly what CLAM's Whole_Slide_Bag_FP does for each coord
            patch = slide.read_region((int(x), int(y)), level, (size, size))
            assert patch.shape == (size, size, 3)
            fractions.append(stained_fraction(patch))
    assert min(fractions) >= min_stained, fractions
    return coords_h5


def test_cmu_slide_gives_tissue_patches(cmu_slide, tmp_path):
    cfg = TileConfig(source=str(cmu_slide), save_dir=str(tmp_path), patch_size=256, mag=20)
    summary = tile_slides(cfg)
    assert summary.done == ["CMU-1-Small-Region"], summary.failed
    h5 = check_patches(cmu_slide, tmp_path / "patches" / "CMU-1-Small-Region.h5")
    assert h5.patch_level == 0 and h5.patch_size == 256
    assert len(h5) >= 20  # about a third of the 8x11 grid is tissue
    assert h5.attrs["save_path"] == str(tmp_path / "patches")
    plist = pd.read_csv(tmp_path / "process_list.csv")
    assert plist.loc[0, "status"] == "done" and plist.loc[0, "n_patches"] == len(h5)
    saved = json.loads((tmp_path / "tile_config.json").read_text())
    assert saved["patch_size"] == 256 and saved["mask_method"] == "otsu"


def test_morphological_mask_on_cmu(cmu_slide, tmp_path):
    cfg = TileConfig(source=str(cmu_slide), save_dir=str(tmp_path), mask_method="morphological")
    row = tile_slide(cmu_slide, cfg)
    assert row["status"] == "done" and row["n_patches"] >= 20
    check_patches(cmu_slide, tmp_path / "patches" / "CMU-1-Small-Region.h5", sample=8)


def test_small_cohort_patches_on_tissue_and_tumour(small_cohort, small_cohort_tiled):
    dataset = pd.read_csv(small_cohort / "dataset.csv")
    for slide_id, label in zip(dataset["slide_id"], dataset["label"]):
        slide_path = small_cohort / "slides" / f"{slide_id}.tif"
        h5 = check_patches(
            slide_path, small_cohort_tiled / "patches" / f"{slide_id}.h5", min_stained=0.4, sample=6
        )
        truth = read_annotation(small_cohort, slide_id)
        # every patch of the tissue area is found: patch count ~ tissue area / patch area
        expected = truth["tissue_area_px"] / 256**2
        assert 0.5 * expected <= len(h5) <= 1.3 * expected + 2
        if label == "tumor":
            x0, y0, x1, y1 = truth["tumor_bbox"]
            cx, cy = h5.coords[:, 0] + 128, h5.coords[:, 1] + 128
            assert ((cx >= x0) & (cx < x1) & (cy >= y0) & (cy < y1)).any()


def test_qc_png_and_geojson(small_cohort, small_cohort_tiled):
    from PIL import Image

    slide_id = "slide_000"
    png = small_cohort_tiled / "masks" / f"{slide_id}.png"
    img = np.asarray(Image.open(png).convert("RGB"))
    assert max(img.shape[:2]) == 1024
    green = (img[..., 1] > 150) & (img[..., 0] < 60) & (img[..., 2] < 60)
    assert green.sum() > 100  # the tissue contour is drawn
    geo = json.loads((small_cohort_tiled / "masks" / f"{slide_id}.geojson").read_text())
    assert geo["type"] == "FeatureCollection" and geo["features"]
    truth = read_annotation(small_cohort, slide_id)
    area = 0.0
    for feature in geo["features"]:
        assert feature["geometry"]["type"] == "Polygon"
        assert feature["properties"]["objectType"] == "annotation"
        for i, ring in enumerate(feature["geometry"]["coordinates"]):
            pts = np.asarray(ring)
            assert (pts[0] == pts[-1]).all() and len(pts) >= 4  # closed rings
            assert (pts >= 0).all() and (pts[:, 0] <= truth["width"]).all()
            shoelace = 0.5 * abs(np.dot(pts[:-1, 0], pts[1:, 1]) - np.dot(pts[1:, 0], pts[:-1, 1]))
            area += shoelace if i == 0 else -shoelace
    assert area == pytest.approx(truth["tissue_area_px"], rel=0.15)


def test_resume_skips_done_slides(small_cohort, small_cohort_tiled, tmp_path):
    out = tmp_path / "again"
    shutil.copytree(small_cohort_tiled, out)
    h5_files = sorted((out / "patches").glob("*.h5"))
    before = {p.name: p.stat().st_mtime_ns for p in h5_files}
    summary = tile_slides(TileConfig(source=str(small_cohort / "slides"), save_dir=str(out)))
    assert summary.done == [] and len(summary.skipped) == len(h5_files)
    assert {p.name: p.stat().st_mtime_ns for p in h5_files} == before
    plist = pd.read_csv(out / "process_list.csv")
    assert set(plist["status"]) == {"skipped"}
    old = pd.read_csv(small_cohort_tiled / "process_list.csv")
    assert list(plist["n_patches"]) == list(old["n_patches"])
    # a removed h5 is redone, the others stay skipped
    h5_files[0].unlink()
    summary = tile_slides(TileConfig(source=str(small_cohort / "slides"), save_dir=str(out)))
    assert summary.done == [h5_files[0].stem]
    assert len(summary.skipped) == len(h5_files) - 1


def _bad_slide_dir(tmp_path, small_cohort):
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(small_cohort / "slides" / "slide_001.tif", src / "good.tif")
    (src / "corrupt.tif").write_bytes(np.random.default_rng(0).bytes(50_000))
    (src / "notes.svs").write_text("this is not a slide\n")
    data = (small_cohort / "slides" / "slide_002.tif").read_bytes()
    (src / "truncated.tif").write_bytes(data[: len(data) // 3])
    (src / "readme.txt").write_text("ignored: not a slide extension\n")
    return src


def test_bad_slides_are_recorded_and_skipped(small_cohort, tmp_path):
    src = _bad_slide_dir(tmp_path, small_cohort)
    out = tmp_path / "out"
    summary = tile_slides(TileConfig(source=str(src), save_dir=str(out)))
    assert summary.done == ["good"]
    assert set(summary.failed) == {"corrupt", "notes", "truncated"}
    plist = pd.read_csv(out / "process_list.csv").set_index("slide_id")
    assert set(plist.index) == {"good", "corrupt", "notes", "truncated"}
    assert plist.loc["good", "status"] == "done" and plist.loc["good", "n_patches"] > 0
    for bad in ("corrupt", "notes", "truncated"):
        name = next(p.name for p in src.iterdir() if p.stem == bad)
        assert plist.loc[bad, "status"] == "failed"
        assert name in plist.loc[bad, "error"]
    assert not (out / "patches" / "corrupt.h5").exists()


def test_blank_slide_is_no_tissue(tmp_path):
    import tifffile

    src = tmp_path / "src"
    src.mkdir()
    blank = np.full((1024, 1024, 3), 241, np.uint8)
    tifffile.imwrite(
        src / "blank.tif",
        blank,
        tile=(256, 256),
        photometric="rgb",
        compression="jpeg",
        resolution=(20000, 20000),
        resolutionunit="CENTIMETER",
        metadata=None,
    )
    summary = tile_slides(TileConfig(source=str(src), save_dir=str(tmp_path / "out")))
    assert summary.done == [] and "blank" in summary.failed
    plist = pd.read_csv(tmp_path / "out" / "process_list.csv")
    assert plist.loc[0, "status"] == "no_tissue"
    assert "tissue" in plist.loc[0, "error"]


def test_level_choice_on_a_40x_slide(tmp_path):
    """A 20x grid on a 40x slide with a 2x level reads 256 px at level 1, CLAM-style."""
    cfg = CohortConfig(out_dir=str(tmp_path), mpp=0.25)
    slide_path = tmp_path / "src" / "s40.tif"
    make_slide(slide_path, size=3072, seed=9, cfg=cfg)
    out = tmp_path / "out"
    row = tile_slide(slide_path, TileConfig(source=str(slide_path), save_dir=str(out), mag=20))
    assert row["patch_level"] == 1 and row["patch_size"] == 256
    h5 = check_patches(slide_path, out / "patches" / "s40.h5", sample=4)
    assert h5.patch_size_level0 == 512
    with open_slide(slide_path) as slide:
        x, y = map(int, h5.coords[0])
        at_level = slide.read_region((x, y), 1, (256, 256)).astype(float)
        level0 = slide.read_region((x, y), 0, (512, 512)).astype(float)
    pooled = level0.reshape(256, 2, 256, 2, 3).mean(axis=(1, 3))
    assert np.abs(pooled - at_level).mean() < 8
    # 10x: served by the 4x level; 0.75 um/px (no such level): level 0, patch scaled to 768
    row10 = tile_slide(slide_path, TileConfig(source="", save_dir=str(out / "m10"), mag=10))
    assert row10["patch_level"] == 2 and row10["patch_size"] == 256
    row_mpp = tile_slide(slide_path, TileConfig(source="", save_dir=str(out / "p"), mpp=0.75))
    assert row_mpp["patch_level"] == 1 and row_mpp["patch_size"] == 384
    h5_mpp = read_coords_h5(out / "p" / "patches" / "s40.h5")
    assert h5_mpp.patch_size_level0 == 768
    assert h5_mpp.attrs["target_patch_size"] == 256


def test_mpp_only_slide_tiles_by_magnification(tmp_path):
    cfg = CohortConfig(out_dir=str(tmp_path), write_objective_power=False)
    slide_path = tmp_path / "mpp_only.tif"
    make_slide(slide_path, size=2048, seed=4, cfg=cfg)
    row = tile_slide(slide_path, TileConfig(source="", save_dir=str(tmp_path / "o"), mag=20))
    assert row["status"] == "done" and row["objective_power"] == pytest.approx(20.0)
    assert row["patch_level"] == 0 and row["patch_size"] == 256


def test_cli_tile_with_aliases_and_exit_codes(small_cohort, tmp_path):
    src = _bad_slide_dir(tmp_path, small_cohort)
    runner = CliRunner()
    out = tmp_path / "cli"
    result = runner.invoke(
        main,
        ["tile", "--source", str(src), "--save_dir", str(out), "--patch_size", "128",
         "--slide-ext", ".tif", "--min_tissue", "0.6"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "1 done" in result.output and "2 failed" in result.output
    h5 = read_coords_h5(out / "patches" / "good.h5")
    assert h5.patch_size == 128
    plist = pd.read_csv(out / "process_list.csv")
    # notes.svs is filtered out by --slide-ext
    assert set(plist["slide_id"]) == {"good", "corrupt", "truncated"}
    # nothing processable: non-zero exit and a clear message
    only_bad = tmp_path / "only_bad"
    only_bad.mkdir()
    shutil.copy(src / "corrupt.tif", only_bad / "corrupt.tif")
    bad = runner.invoke(
        main, ["tile", "--source", str(only_bad), "--save-dir", str(tmp_path / "x")]
    )
    assert bad.exit_code != 0 and "no slide could be tiled" in bad.output
    empty = tmp_path / "empty"
    empty.mkdir()
    none = runner.invoke(main, ["tile", "--source", str(empty), "--save-dir", str(tmp_path / "y")])
    assert none.exit_code != 0 and "no slides" in none.output
    both = runner.invoke(
        main, ["tile", "--source", str(src), "--save-dir", str(out), "--mag", "20", "--mpp", "0.5"]
    )
    assert both.exit_code == 2


def _previous_drop_small_regions(mask: np.ndarray, min_area: int) -> np.ndarray:
    """The scipy code scikit-image replaced: 4-connected regions under min_area removed."""
    from scipy import ndimage

    labels, n = ndimage.label(mask)
    if n == 0:
        return mask
    keep = np.bincount(labels.ravel()) >= min_area
    keep[0] = False
    return keep[labels]


def test_mask_clean_up_by_scikit_image_equals_the_previous_code():
    import cv2
    from scipy import ndimage

    from clam_mcmkd.tissue import _clean_mask

    rng = np.random.default_rng(0)
    masks = [np.zeros((40, 50), bool), np.ones((40, 50), bool)]
    for i in range(12):
        m = ndimage.binary_dilation(rng.random((90, 120)) < 0.03, iterations=i % 3)
        masks.append(m | (rng.random(m.shape) < 0.06))
    for mask in masks:
        for patch_px in (8.0, 20.0, 40.0):
            radius = max(1, int(round(patch_px / 16)))
            kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1,) * 2)
            closed = cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_CLOSE, kernel).astype(bool)
            min_area = max(4, int(patch_px * patch_px / 16))
            closed = _previous_drop_small_regions(closed, min_area)
            want = ~_previous_drop_small_regions(~closed, min_area)
            np.testing.assert_array_equal(_clean_mask(mask, patch_px), want)
