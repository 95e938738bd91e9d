"""The synthetic cohort: readable by OpenSlide and tiatoolbox, seeded, with a visible tumour."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from click.testing import CliRunner

from clam_mcmkd.clam.formats import read_dataset_csv
from clam_mcmkd.cli import main
from clam_mcmkd.cohort import CohortConfig, make_cohort, make_slide, read_annotation
from clam_mcmkd.slides import open_slide


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def tumor_slide(tmp_path_factory):
    path = tmp_path_factory.mktemp("one") / "t.tif"
    truth = make_slide(path, size=2048, height=1792, seed=3, positive=True)
    return path, truth


def test_openslide_reads_pyramid_and_mpp(tumor_slide):
    path, truth = tumor_slide
    with open_slide(path) as slide:
        assert slide.backend == "openslide"
        assert slide.dimensions == (2048, 1792)
        assert slide.mpp == pytest.approx(0.5)
        assert slide.objective_power == pytest.approx(20.0)
        assert slide.level_count >= 3
        for i, (w, h) in enumerate(slide.level_dimensions):
            assert (w, h) == (2048 >> i, 1792 >> i)
            assert slide.level_downsamples[i] == pytest.approx(2**i)


def test_tiatoolbox_reads_same_geometry(tumor_slide):
    from tiatoolbox.wsicore.wsireader import WSIReader

    path, _ = tumor_slide
    info = WSIReader.open(str(path)).info
    with open_slide(path) as slide:
        assert tuple(info.slide_dimensions) == slide.dimensions
        assert [tuple(d) for d in info.level_dimensions] == slide.level_dimensions
    assert np.allclose(info.mpp, 0.5)
    assert info.objective_power == pytest.approx(20.0)


def test_levels_show_the_same_pixels(tumor_slide):
    path, truth = tumor_slide
    x0, y0, x1, y1 = truth["tumor_bbox"]
    with open_slide(path) as slide:
        full = slide.read_region((x0, y0), 0, (256, 256)).astype(float)
        half = slide.read_region((x0, y0), 1, (128, 128)).astype(float)
    pooled = full.reshape(128, 2, 128, 2, 3).mean(axis=(1, 3))
    assert np.abs(pooled - half).mean() < 8  # JPEG noise only


def test_background_tissue_and_tumour_differ(tumor_slide):
    path, truth = tumor_slide
    x0, y0, x1, y1 = truth["tumor_bbox"]
    cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
    with open_slide(path) as slide:
        corner = slide.read_region((0, 0), 0, (64, 64)).astype(float)
        tumour = slide.read_region((cx - 16, cy - 16), 0, (32, 32)).astype(float)
        overview = slide.read_region((0, 0), 2, slide.level_dimensions[2]).astype(float)
    assert corner.mean() > 225 and corner.std() < 10  # near-white background
    # stained tissue outside the tumour's box, on the 4x-downsampled level
    gray = overview.mean(axis=2)
    outside = np.ones(gray.shape, bool)
    outside[y0 // 4 : y1 // 4 + 1, x0 // 4 : x1 // 4 + 1] = False
    tissue = outside & (gray < 225)
    assert tissue.mean() > 0.05
    normal = gray[tissue].mean()
    assert tumour.mean() < normal - 40  # dense dark nuclei
    assert truth["tumor_area_px"] / truth["tissue_area_px"] == pytest.approx(0.04, rel=0.5)


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a = make_slide(tmp_path / "a.tif", size=1024, seed=5, positive=True)
    make_slide(tmp_path / "b.tif", size=1024, seed=5, positive=True)
    c = make_slide(tmp_path / "c.tif", size=1024, seed=6, positive=True)
    assert _sha(tmp_path / "a.tif") == _sha(tmp_path / "b.tif")
    assert _sha(tmp_path / "a.tif") != _sha(tmp_path / "c.tif")
    assert a["tumor_bbox"] != c["tumor_bbox"]
    assert not list(tmp_path.glob(".*tmp*"))  # atomic write left no temp file


def test_mpp_only_slide_has_no_objective_power(tmp_path):
    cfg = CohortConfig(out_dir=str(tmp_path), write_objective_power=False, mpp=0.25)
    make_slide(tmp_path / "m.tif", size=1024, seed=1, cfg=cfg)
    with open_slide(tmp_path / "m.tif") as slide:
        assert slide.objective_power is None
        assert slide.mpp == pytest.approx(0.25)


def test_make_cohort_dataset_and_cases(tmp_path):
    csv = make_cohort(tmp_path / "c1", n_slides=8, size=1024, seed=11)
    df = read_dataset_csv(csv, label_dict={"normal": 0, "tumor": 1})
    assert len(df) == 8
    assert set(df["label"]) == {"normal", "tumor"}
    assert abs((df["label"] == "tumor").sum() - 4) <= 1
    # patient-level labels: every case has one label, and some case has two slides
    assert (df.groupby("case_id")["label"].nunique() == 1).all()
    assert df["case_id"].value_counts().max() == 2
    for sid, label in zip(df["slide_id"], df["label"]):
        assert (tmp_path / "c1" / "slides" / f"{sid}.tif").is_file()
        ann = read_annotation(tmp_path / "c1", sid)
        assert ann["label"] == label
        assert (ann["tumor_bbox"] is not None) == (label == "tumor")
    config = json.loads((tmp_path / "c1" / "cohort_config.json").read_text())
    assert config["seed"] == 11 and config["n_slides"] == 8
    # seeded: a second cohort with the same seed is identical
    csv2 = make_cohort(tmp_path / "c2", n_slides=8, size=1024, seed=11)
    assert csv.read_text() == csv2.read_text()
    first = df["slide_id"][0]
    assert _sha(tmp_path / "c1" / "slides" / f"{first}.tif") == _sha(
        tmp_path / "c2" / "slides" / f"{first}.tif"
    )


def test_make_cohort_resume_keeps_finished_slides(tmp_path):
    make_cohort(tmp_path, n_slides=2, size=1024, seed=2)
    slide = tmp_path / "slides" / "slide_000.tif"
    before = slide.stat().st_mtime_ns
    make_cohort(tmp_path, n_slides=2, size=1024, seed=2)
    assert slide.stat().st_mtime_ns == before
    make_cohort(tmp_path, n_slides=2, size=1024, seed=3)  # other seed: slides are redone
    assert slide.stat().st_mtime_ns != before


def test_cli_make_cohort_with_underscore_alias(tmp_path):
    out = tmp_path / "cli"
    result = CliRunner().invoke(
        main, ["make-cohort", str(out), "--n_slides", "2", "--size", "1024", "--seed", "4"]
    )
    assert result.exit_code == 0, result.output
    df = read_dataset_csv(out / "dataset.csv")
    assert list(df["slide_id"]) == ["slide_000", "slide_001"]
    bad = CliRunner().invoke(main, ["make-cohort", str(out), "--size", "10"])
    assert bad.exit_code != 0


def _tumour_vs_normal_gap(path, truth) -> float:
    """Mean |RGB| difference between tumour and normal tissue, masks from the annotation."""
    import cv2

    with open_slide(path) as slide:
        img = slide.read_region((0, 0), 0, slide.dimensions).astype(float)
    masks = {}
    for key in ("tissue_contours", "tumor_contours"):
        mask = np.zeros(img.shape[:2], np.uint8)
        for contour in truth[key]:
            cv2.fillPoly(mask, [np.asarray(contour, np.int32).reshape(-1, 1, 2)], 1)
        masks[key] = cv2.erode(mask, np.ones((33, 33), np.uint8)).astype(bool)  # away from edges
    tumour = masks["tumor_contours"]
    normal = masks["tissue_contours"] & ~cv2.dilate(
        masks["tumor_contours"].astype(np.uint8), np.ones((97, 97), np.uint8)
    ).astype(bool)
    assert tumour.sum() > 500 and normal.sum() > 500
    return float(np.abs(img[tumour].mean(0) - img[normal].mean(0)).mean())


def test_tumor_contrast_knob(tmp_path):
    default = make_slide(tmp_path / "d.tif", size=1024, seed=7, positive=True)
    cfg_one = CohortConfig(out_dir=str(tmp_path), tumor_contrast=1.0)
    make_slide(tmp_path / "one.tif", size=1024, seed=7, positive=True, cfg=cfg_one)
    assert _sha(tmp_path / "one.tif") == _sha(tmp_path / "d.tif")  # 1.0 = today's slides
    assert "tumor_contrast" not in default
    gaps = []
    for contrast in (1.0, 0.3, 0.0):
        cfg = CohortConfig(out_dir=str(tmp_path), tumor_contrast=contrast, tumor_frac=0.1)
        path = tmp_path / f"c{contrast}.tif"
        truth = make_slide(path, size=1024, seed=7, positive=True, cfg=cfg)
        assert truth["tumor_area_px"] > 0  # the tumour is still annotated, only harder to see
        gaps.append(_tumour_vs_normal_gap(path, truth))
    assert gaps[0] > 50  # the distinct default texture
    assert gaps[1] < 0.5 * gaps[0]
    assert gaps[2] < 0.1 * gaps[0]  # no contrast: tumour pixels look like normal tissue
    with pytest.raises(ValueError, match="tumor_contrast"):
        CohortConfig(out_dir=str(tmp_path), tumor_contrast=1.5)


def test_cli_make_cohort_tumor_contrast_resumes_only_same_contrast(tmp_path):
    args = ["make-cohort", str(tmp_path), "--n-slides", "2", "--size", "1024", "--seed", "4"]
    low = CliRunner().invoke(main, args + ["--tumor-contrast", "0.3"])
    assert low.exit_code == 0, low.output
    assert json.loads((tmp_path / "cohort_config.json").read_text())["tumor_contrast"] == 0.3
    slide = tmp_path / "slides" / "slide_000.tif"
    made = slide.stat().st_mtime_ns
    again = CliRunner().invoke(main, args + ["--tumor_contrast", "0.3"])  # alias; resumes
    assert again.exit_code == 0 and slide.stat().st_mtime_ns == made
    assert CliRunner().invoke(main, args).exit_code == 0  # default contrast: slides redone
    assert slide.stat().st_mtime_ns != made
    assert read_annotation(tmp_path, "slide_000").get("tumor_contrast") is None
