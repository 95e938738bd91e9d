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


# --------------------------------------------------------------------------- kind="fields"


def _fields_cfg(tmp_path, **kw):
    return CohortConfig(out_dir=str(tmp_path), kind="fields", tumor_frac=0.2, **kw)


def _hematoxylin(img: np.ndarray) -> np.ndarray:
    from clam_mcmkd.cohort_fields import _STAINS, _to_od

    return (_to_od(img.astype(np.float32)) @ np.linalg.inv(_STAINS))[..., 0]


def test_fields_slide_readable_seeded_with_maps(tmp_path):
    from tiatoolbox.wsicore.wsireader import WSIReader

    from clam_mcmkd.cohort_fields import CLASSES, make_fields_slide, read_maps

    cfg = _fields_cfg(tmp_path, tumor_contrast=0.5)
    truth = make_fields_slide(
        tmp_path / "a.tif", size=768, height=512, seed=3, positive=True, cfg=cfg
    )
    make_fields_slide(tmp_path / "b.tif", size=768, height=512, seed=3, positive=True, cfg=cfg)
    make_fields_slide(tmp_path / "c.tif", size=768, height=512, seed=4, positive=True, cfg=cfg)
    assert _sha(tmp_path / "a.tif") == _sha(tmp_path / "b.tif")
    assert _sha(tmp_path / "a.tif") != _sha(tmp_path / "c.tif")
    with open_slide(tmp_path / "a.tif") as slide:
        assert slide.backend == "openslide" and slide.dimensions == (768, 512)
        assert slide.mpp == pytest.approx(0.5)
    info = WSIReader.open(str(tmp_path / "a.tif")).info
    assert tuple(info.slide_dimensions) == (768, 512)
    assert truth["kind"] == "fields" and truth["classes"] == list(CLASSES)
    assert truth["tumor_area_px"] > 0 and truth["tumor_bbox"] is not None
    maps = read_maps(tmp_path, "a")  # written beside the annotations of cfg.out_dir
    assert maps["classes"].shape == maps["atypia"].shape == (512 // 16, 768 // 16)
    assert set(np.unique(maps["classes"])) <= set(range(len(CLASSES)))
    assert 0.0 <= maps["atypia"].min() and maps["atypia"].max() == pytest.approx(1.0, abs=1e-3)


def test_fields_classes_span_several_patches(tmp_path):
    """Context carries information: a 64 px patch's class is predictable from its neighbour's."""
    from clam_mcmkd.cohort_fields import make_fields_slide, read_maps

    kappas = []
    for seed in range(3):
        make_fields_slide(
            tmp_path / f"n{seed}.tif", size=1024, seed=seed, cfg=_fields_cfg(tmp_path)
        )
        maps = read_maps(tmp_path, f"n{seed}")
        c, t = maps["classes"], maps["tissue"]
        both = t[:, :-4] & t[:, 4:]  # cells 64 px apart, both in tissue
        agree = (c[:, :-4] == c[:, 4:])[both].mean()
        p = np.bincount(c[t], minlength=4) / t.sum()
        kappas.append((agree - (p**2).sum()) / (1 - (p**2).sum()))  # agreement beyond chance
    assert np.mean(kappas) > 0.35


def test_fields_contrast_knob_scales_the_regional_change(tmp_path):
    """At contrast 0 a positive slide is pixel for pixel its seed's negative (the label leaves
    no trace); above it, hematoxylin in the region (vs the rest of the same slide) rises with
    the contrast, and the region's classes fragment into nests."""
    from clam_mcmkd.cohort_fields import FieldsRenderer

    def render(contrast, seed, positive=True):
        return FieldsRenderer(
            _fields_cfg(tmp_path, tumor_contrast=contrast), 768, 768, seed, positive
        )

    gaps, switches = {}, {}
    for seed in (1, 2):
        neg, zero = render(1.0, seed, positive=False), render(0.0, seed)
        assert np.array_equal(neg.image, zero.image) and zero.atypia.max() > 0.99
        for contrast, r in ((0.0, zero), (0.5, render(0.5, seed)), (1.0, render(1.0, seed))):
            a = np.kron(r.atypia, np.ones((16, 16)))
            tissue = np.kron(r.tissue, np.ones((16, 16), bool))
            h = _hematoxylin(r.image)
            gap = h[a > 0.8].mean() - h[tissue & (a == 0)].mean()
            inside = r.atypia[:, :-1] > 0.8
            switch = (r.classes[:, :-1] != r.classes[:, 1:])[inside].mean()
            gaps.setdefault(contrast, []).append(gap)
            switches.setdefault(contrast, []).append(switch)
    # the same slide at a higher contrast (class composition of the region fixed by the seed)
    lift = {c: np.mean(gaps[c]) - np.mean(gaps[0.0]) for c in gaps}
    assert lift[0.5] > 0.05 and lift[1.0] > lift[0.5] + 0.05
    assert np.mean(switches[1.0]) > np.mean(switches[0.0]) + 0.1


def test_fields_real_texture_from_a_source_slide(tmp_path):
    """texture_source: the classes are quilted from the source's pixels. The source here is a
    generated cyan texture (no pink at all), so the test needs no real data."""
    from clam_mcmkd.cohort_fields import FieldsRenderer
    from clam_mcmkd.synthetic_tiff import halve, write_pyramid

    rng = np.random.default_rng(0)
    cyan = np.clip(rng.normal([70, 170, 190], 25, (1024, 1024, 3)), 0, 255).astype(np.uint8)
    tiles = (
        cyan[y : y + 256, x : x + 256] for y in range(0, 1024, 256) for x in range(0, 1024, 256)
    )
    src_cfg = CohortConfig(out_dir=str(tmp_path))
    write_pyramid(tmp_path / "src.tif", tiles, halve(cyan), 1024, 1024, src_cfg)
    cfg = _fields_cfg(tmp_path, tumor_contrast=0.5, texture_source=str(tmp_path / "src.tif"))
    real = FieldsRenderer(cfg, 768, 768, 5, positive=True)
    procedural = FieldsRenderer(_fields_cfg(tmp_path, tumor_contrast=0.5), 768, 768, 5, True)
    tissue = np.kron(real.tissue, np.ones((16, 16), bool))[:768, :768]
    tissue &= np.kron(real.atypia, np.ones((16, 16)))[:768, :768] == 0  # away from the region
    real_rgb = real.image[tissue].astype(float).mean(axis=0)
    proc_rgb = procedural.image[tissue].astype(float).mean(axis=0)
    assert real_rgb[0] < real_rgb[1] - 30  # cyan from the source survives the stain jitter
    assert proc_rgb[0] > proc_rgb[1] + 30  # the procedural look is pink
    with pytest.raises(ValueError, match="does not exist"):
        _fields_cfg(tmp_path, texture_source=str(tmp_path / "missing.svs"))
    with pytest.raises(ValueError, match="kind"):
        CohortConfig(out_dir=str(tmp_path), kind="stripes")


def test_make_cohort_fields_resume_and_patch_truth(tmp_path):
    from clam_mcmkd.cohort_fields import patch_truth, read_maps

    csv = make_cohort(tmp_path, n_slides=2, size=512, seed=2, kind="fields", tumor_frac=0.3)
    df = read_dataset_csv(csv)
    slide = tmp_path / "slides" / "slide_000.tif"
    made = slide.stat().st_mtime_ns
    make_cohort(tmp_path, n_slides=2, size=512, seed=2, kind="fields", tumor_frac=0.3)
    assert slide.stat().st_mtime_ns == made  # same kind: resumed
    ann = read_annotation(tmp_path, "slide_000")
    assert ann["kind"] == "fields" and ann["label"] == df["label"][0]
    maps = read_maps(tmp_path, "slide_000")
    coords = np.array([[0, 0], [64, 128], [448, 448]])
    classes, atypia = patch_truth(maps, coords, 64)
    for (x, y), c, a in zip(coords, classes, atypia):
        block = maps["classes"][y // 16 : y // 16 + 4, x // 16 : x // 16 + 4]
        assert c == np.bincount(block.ravel()).argmax()
        expected = maps["atypia"][y // 16 : y // 16 + 4, x // 16 : x // 16 + 4]
        assert a == pytest.approx(expected.astype(np.float32).mean(), abs=1e-3)
    make_cohort(tmp_path, n_slides=2, size=512, seed=2, tumor_frac=0.3)  # blobs: redone
    assert slide.stat().st_mtime_ns != made
    assert "kind" not in read_annotation(tmp_path, "slide_000")  # default annotation unchanged


def test_cli_make_cohort_kind_fields(tmp_path):
    out = tmp_path / "f"
    args = ["make-cohort", str(out), "--n-slides", "2", "--size", "512", "--kind", "fields"]
    result = CliRunner().invoke(main, args + ["--tumor-contrast", "0.4"])
    assert result.exit_code == 0, result.output
    config = json.loads((out / "cohort_config.json").read_text())
    assert config["kind"] == "fields" and config["tumor_contrast"] == 0.4
    assert (out / "annotations" / "slide_000.npz").is_file()
    missing = CliRunner().invoke(main, args + ["--texture-source", str(tmp_path / "no.svs")])
    assert missing.exit_code != 0 and "no.svs" in missing.output
