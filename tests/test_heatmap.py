"""Attention heatmaps on generated slides, real features and a really trained (tiny) MIL fold."""

from __future__ import annotations

import json
import shutil

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from clam_mcmkd.clam import formats as clam_io
from clam_mcmkd.features import ExtractConfig, extract_features
from clam_mcmkd.heatmap import (
    HeatmapConfig,
    HeatmapError,
    load_feature_norm,
    overlay,
    run_heatmaps,
    to_percentiles,
)
from clam_mcmkd.mil import TrainConfig, attention_scores, build_model, load_weights, train
from clam_mcmkd.slides import SlideError, find_slide


@pytest.fixture(scope="module")
def mil_run(small_cohort, small_cohort_tiled, tmp_path_factory):
    """ResNet-18 (random init, 32 px) features of the 6-slide cohort, one split, CLAM-SB and
    CLAM-MB trained for 2 epochs."""
    root = tmp_path_factory.mktemp("heatmap")
    csv = small_cohort / "dataset.csv"
    summary = extract_features(
        ExtractConfig(
            data_h5_dir=str(small_cohort_tiled), data_slide_dir=str(small_cohort / "slides"),
            csv_path=str(csv), feat_dir=str(root / "feats"), model="resnet18_trunc",
            slide_ext=".tif", target_patch_size=32, pretrained=False, device="cpu", batch_size=64,
        )
    )  # fmt: skip
    assert not summary.failed, summary.failed
    df = clam_io.read_dataset_csv(csv)
    labels = dict(zip(df["slide_id"], df["label"]))
    by_class = {c: [s for s, y in labels.items() if y == c] for c in sorted(set(labels.values()))}
    normal, tumor = by_class["normal"], by_class["tumor"]
    split = {"train": normal[:2] + tumor[:2], "val": [normal[2]], "test": [tumor[2]]}
    clam_io.write_splits(root / "splits", 0, split, labels, {"normal": 0, "tumor": 1})
    runs = {}
    for model_type in ("clam_sb", "clam_mb"):
        cfg = TrainConfig(
            data_root_dir=str(root / "feats"), csv_path=str(csv), split_dir=str(root / "splits"),
            results_dir=str(root / "results"), exp_code=model_type, model_type=model_type, k=1,
            max_epochs=2, device="cpu",
        )  # fmt: skip
        train(cfg)
        runs[model_type] = cfg.run_dir
    return {"root": root, "csv": csv, "feats": root / "feats", "runs": runs, "labels": labels}


def _cfg(mil_run, small_cohort, small_cohort_tiled, out, model_type="clam_sb", **kw):
    return HeatmapConfig(
        models_dir=str(mil_run["runs"][model_type]), data_root_dir=str(mil_run["feats"]),
        data_h5_dir=str(small_cohort_tiled), data_slide_dir=str(small_cohort / "slides"),
        csv_path=str(mil_run["csv"]), out=str(out), fold=0, device="cpu", **kw,
    )  # fmt: skip


def _reference_attention(run_dir, model_type, feats):
    model = build_model(model_type, n_classes=2, embed_dim=feats.shape[1], dropout=0.0)
    load_weights(model, run_dir / "s_0_checkpoint.pt")
    return np.atleast_2d(attention_scores(model.eval(), feats)), model


def test_outputs_of_one_slide(mil_run, small_cohort, small_cohort_tiled, tmp_path):
    slide_id = sorted(mil_run["labels"])[0]
    cfg = _cfg(mil_run, small_cohort, small_cohort_tiled, tmp_path / "hm", slide_ids=[slide_id])
    summary = run_heatmaps(cfg)
    assert summary.done == [slide_id] and not summary.failed
    coords = clam_io.read_coords_h5(clam_io.coords_path(small_cohort_tiled, slide_id))
    feats = clam_io.read_features(mil_run["feats"], slide_id)
    raw, _ = _reference_attention(mil_run["runs"]["clam_sb"], "clam_sb", feats)
    out = tmp_path / "hm" / slide_id

    with h5py.File(out / f"{slide_id}_blockmap.h5", "r") as f:
        np.testing.assert_array_equal(f["coords"][:], coords.coords)
        np.testing.assert_allclose(f["attention_scores"][:], raw[0][:, None], rtol=1e-5, atol=1e-6)
        pct = f["attention_percentile"][:]
    assert pct.shape == (1, len(coords)) and (pct > 0).all() and (pct <= 1).all()
    assert pct[0, raw[0].argmax()] == 1.0 and pct[0, raw[0].argmin()] == pytest.approx(
        1 / len(coords)
    )
    assert (np.argsort(raw[0], kind="stable") == np.argsort(pct[0], kind="stable")).all()

    geo = json.loads((out / f"{slide_id}_attention.geojson").read_text())
    assert geo["type"] == "FeatureCollection" and len(geo["features"]) == len(coords)
    side = coords.patch_size_level0
    for feat, (x, y), a, p in zip(geo["features"], coords.coords.tolist(), raw[0], pct[0]):
        assert feat["geometry"]["type"] == "Polygon"
        ring = feat["geometry"]["coordinates"][0]
        assert ring == [[x, y], [x + side, y], [x + side, y + side], [x, y + side], [x, y]]
        props = feat["properties"]
        assert props["objectType"] == "detection"
        assert props["measurements"]["attention"] == pytest.approx(a, abs=2e-6)
        assert props["measurements"]["attention_percentile"] == pytest.approx(p, abs=1e-6)

    png = np.asarray(Image.open(out / f"{slide_id}_attention.png").convert("RGB"))
    assert png.shape[0] > 100 and png.shape[1] > png.shape[0] * 0.5
    saved = json.loads((tmp_path / "hm" / "heatmap_summary.json").read_text())
    assert saved["done"] == [slide_id] and saved["extra"]["predictions"][slide_id][
        "patches"
    ] == len(coords)
    assert json.loads((tmp_path / "hm" / "heatmap_config.json").read_text())["fold"] == 0


def test_overlay_colours_each_patch_by_its_percentile():
    thumb = np.full((40, 60, 3), 200, np.uint8)
    coords = np.array([[0, 0], [100, 0], [0, 100]])  # level 0; the thumbnail is at 1/5
    pct = np.array([1.0, 0.5, 1 / 3])
    img = overlay(thumb, (0.2, 0.2), coords, 100, pct, "jet", alpha=0.6)
    from matplotlib import colormaps

    for (x, y), p in zip(coords, pct):
        want = 0.4 * 200 + 0.6 * np.asarray(colormaps["jet"](p)[:3]) * 255
        np.testing.assert_allclose(img[y // 5 + 10, x // 5 + 10], np.rint(want), atol=1)
    assert (img[25:, 25:] == 200).all()  # no patch there: the slide as it is


def test_clam_mb_has_one_map_per_class(mil_run, small_cohort, small_cohort_tiled, tmp_path):
    slide_id = sorted(mil_run["labels"])[1]
    cfg = _cfg(
        mil_run, small_cohort, small_cohort_tiled, tmp_path / "mb", "clam_mb", slide_ids=[slide_id]
    )
    assert run_heatmaps(cfg).done == [slide_id]
    feats = clam_io.read_features(mil_run["feats"], slide_id)
    raw, model = _reference_attention(mil_run["runs"]["clam_mb"], "clam_mb", feats)
    y_hat = int(model(torch.from_numpy(feats))[2].item())
    with h5py.File(tmp_path / "mb" / slide_id / f"{slide_id}_blockmap.h5", "r") as f:
        assert f["attention"].shape == (2, len(feats))
        np.testing.assert_allclose(f["attention"][:], raw, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(f["attention_scores"][:, 0], raw[y_hat], rtol=1e-5, atol=1e-6)
    geo = json.loads((tmp_path / "mb" / slide_id / f"{slide_id}_attention.geojson").read_text())
    names = set(geo["features"][0]["properties"]["measurements"])
    assert names == {
        "attention_normal", "attention_normal_percentile",
        "attention_tumor", "attention_tumor_percentile",
    }  # fmt: skip


def test_bad_slide_is_skipped_and_finished_slides_resume(
    mil_run, small_cohort, small_cohort_tiled, tmp_path
):
    good, bad = sorted(mil_run["labels"])[2:4]
    slides = tmp_path / "slides"
    slides.mkdir()
    (slides / f"{good}.tif").symlink_to(small_cohort / "slides" / f"{good}.tif")
    (slides / f"{bad}.tif").write_bytes(b"not a tiff at all")
    cfg = _cfg(mil_run, small_cohort, small_cohort_tiled, tmp_path / "hm", slide_ids=[good, bad])
    cfg.data_slide_dir = str(slides)
    first = run_heatmaps(cfg)
    assert first.done == [good] and list(first.failed) == [bad]
    assert f"{bad}.tif" in first.failed[bad] and "\n" not in first.failed[bad]
    assert not (tmp_path / "hm" / bad / f"{bad}_blockmap.h5").exists()
    again = run_heatmaps(cfg)
    assert again.skipped == [good] and list(again.failed) == [bad] and not again.done
    saved = json.loads((tmp_path / "hm" / "heatmap_summary.json").read_text())
    assert saved["skipped"] == [good] and bad in saved["failed"]


def test_saved_feature_standardisation_is_applied(
    mil_run, small_cohort, small_cohort_tiled, tmp_path
):
    run = tmp_path / "run"
    shutil.copytree(mil_run["runs"]["clam_sb"], run)
    slide_id = sorted(mil_run["labels"])[4]
    feats = clam_io.read_features(mil_run["feats"], slide_id)
    mean, std = feats.mean(0), feats.std(0) + 0.5
    np.savez(run / "s_0_feature_norm.npz", mean=mean, std=std)
    cfg = _cfg(mil_run, small_cohort, small_cohort_tiled, tmp_path / "hm", slide_ids=[slide_id])
    cfg.models_dir = str(run)
    assert run_heatmaps(cfg).done == [slide_id]
    raw, _ = _reference_attention(run, "clam_sb", (feats - mean) / std)
    unnormalised, _ = _reference_attention(run, "clam_sb", feats)
    with h5py.File(tmp_path / "hm" / slide_id / f"{slide_id}_blockmap.h5", "r") as f:
        np.testing.assert_allclose(f["attention"][:], raw, rtol=1e-5, atol=1e-6)
        assert not np.allclose(f["attention"][:], unnormalised, atol=1e-4)
        assert f.attrs["feature_norm"] == "saved statistics"


def test_feature_norm_hook(tmp_path):
    assert load_feature_norm(tmp_path, 0) is None
    (tmp_path / "train_config.json").write_text(json.dumps({"feature_norm": "zscore"}))
    with pytest.raises(HeatmapError, match="feature_norm='zscore' but no statistics"):
        load_feature_norm(tmp_path, 0)
    np.savez(tmp_path / "feature_norm.npz", mean=np.array([1.0, 2.0]), std=np.array([2.0, 4.0]))
    norm = load_feature_norm(tmp_path, 3)
    np.testing.assert_allclose(norm(np.array([[3.0, 6.0]])), [[1.0, 1.0]])


def test_percentiles_are_clams_average_ranks():
    np.testing.assert_allclose(to_percentiles([0.1, 0.5, 0.5, 0.9]), [0.25, 0.625, 0.625, 1.0])
    np.testing.assert_allclose(to_percentiles([3.0, -1.0, 2.0]), [1.0, 1 / 3, 2 / 3])


def test_find_slide_detects_the_extension(tmp_path):
    (tmp_path / "a.tif").write_bytes(b"x")
    (tmp_path / "a.h5").write_bytes(b"x")  # not a slide extension
    assert find_slide(tmp_path, "a", None) == tmp_path / "a.tif"
    with pytest.raises(SlideError, match=r"a.svs: slide file does not exist; .* has \*.tif slides"):
        find_slide(tmp_path, "a", ".svs")
    (tmp_path / "a.svs").write_bytes(b"x")
    with pytest.raises(SlideError, match="2 slides .* pass --slide-ext"):
        find_slide(tmp_path, "a", None)
    with pytest.raises(SlideError, match="no slide named b.<ext>"):
        find_slide(tmp_path, "b", None)


def test_heatmap_command(mil_run, small_cohort, small_cohort_tiled, tmp_path):
    from click.testing import CliRunner

    from clam_mcmkd.cli import main

    ids = sorted(mil_run["labels"])[:2]
    args = [
        "heatmap", "--models-dir", str(mil_run["runs"]["clam_sb"]), "--fold", "0",
        "--data-root-dir", str(mil_run["feats"]), "--data-h5-dir", str(small_cohort_tiled),
        "--data-slide-dir", str(small_cohort / "slides"), "--csv-path", str(mil_run["csv"]),
        "--out", str(tmp_path / "hm"), "--slide-ids", ",".join(ids), "--device", "cpu",
    ]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "heatmap: 2 done, 0 skipped, 0 failed" in result.output
    assert "predictions" not in result.output  # one line; per-slide results are in the file
    for slide_id in ids:  # the slide extension (.tif) was found, not given
        for suffix in ("_attention.png", "_attention.geojson", "_blockmap.h5"):
            assert (tmp_path / "hm" / slide_id / f"{slide_id}{suffix}").is_file()
    saved = json.loads((tmp_path / "hm" / "heatmap_config.json").read_text())
    defaults = HeatmapConfig("m", "d", "h", "s", "c", "o")
    assert (saved["alpha"], saved["cmap"], saved["thumb_max_size"]) == (
        defaults.alpha,
        defaults.cmap,
        defaults.thumb_max_size,
    )
    assert saved["slide_ids"] == ids and saved["slide_ext"] is None
    again = CliRunner().invoke(main, args)
    assert "heatmap: 0 done, 2 skipped, 0 failed" in again.output, again.output
    bad = CliRunner().invoke(main, [*args[:-4], "--out", str(tmp_path / "x"),
                                    "--models-dir", str(tmp_path / "none")])  # fmt: skip
    assert bad.exit_code != 0 and "no checkpoint for fold 0" in bad.output
    assert not (tmp_path / "x").exists()  # a run that cannot start writes nothing
