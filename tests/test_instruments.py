"""The encoder instruments (benchmark/instruments.py): probes that can tell a feature that
knows something from one that does not, read from a real fields cohort and its CLAM files."""

import numpy as np

from clam_mcmkd.benchmark.instruments import (
    encoder_instruments,
    linear_probe,
    patch_truth_per_slide,
    slide_patches,
)
from clam_mcmkd.clam.formats import read_coords_h5


def _slides(rng, signal: float, n_slides: int = 6, n: int = 60):
    feats, targets = {}, {}
    for i in range(n_slides):
        y = rng.integers(0, 2, n)
        x = rng.normal(0, 1, (n, 8))
        x[:, 0] += signal * y
        feats[f"s{i}"], targets[f"s{i}"] = x, y
    return feats, targets


def test_linear_probe_separates_signal_from_noise():
    rng = np.random.default_rng(0)
    assert linear_probe(*_slides(rng, 4.0), "auc") > 0.97
    assert abs(linear_probe(*_slides(rng, 0.0), "auc") - 0.5) < 0.1
    assert linear_probe(*_slides(rng, 4.0), "acc") > 0.9
    feats, targets = _slides(rng, 4.0)
    targets = {s: np.zeros_like(y) for s, y in targets.items()}  # one class: no probe
    assert np.isnan(linear_probe(feats, targets, "auc"))


def test_encoder_instruments_on_a_fields_cohort(tmp_path):
    import pandas as pd

    from clam_mcmkd.benchmark.proxy_pretrain import FitConfig, save_random_encoder
    from clam_mcmkd.cohort import make_cohort
    from clam_mcmkd.tiling import TileConfig, tile_slides

    csv = make_cohort(tmp_path / "cohort", n_slides=4, size=512, seed=3, kind="fields",
                      tumor_frac=0.3, tumor_contrast=1.0, two_slide_case_frac=0.0)  # fmt: skip
    tile_slides(TileConfig(source=str(tmp_path / "cohort" / "slides"),
                           save_dir=str(tmp_path / "tiles"), patch_size=64, step_size=64))  # fmt: skip
    df = pd.read_csv(csv)
    per_slide = slide_patches(tmp_path / "cohort" / "slides", tmp_path / "tiles" / "patches",
                              list(df["slide_id"]) + ["no_such_slide"])  # fmt: skip
    assert per_slide and "no_such_slide" not in per_slide
    for sid, (imgs, coords) in per_slide.items():
        h5 = read_coords_h5(tmp_path / "tiles" / "patches" / f"{sid}.h5")
        assert imgs.shape == (len(h5.coords), 64, 64, 3) and imgs.dtype == np.uint8
        np.testing.assert_array_equal(coords, h5.coords)
    truth = patch_truth_per_slide(tmp_path / "cohort", per_slide, 64)
    for sid, (classes, atypia) in truth.items():
        assert len(classes) == len(atypia) == len(per_slide[sid][0])
        assert ((atypia >= 0) & (atypia <= 1)).all()
    ckpt = tmp_path / "random.pt"
    save_random_encoder(ckpt, FitConfig(arch="resnet18_trunc", input_size=64, seed=0))
    positive = set(df.loc[df["label"] == "tumor", "slide_id"])
    (row,) = encoder_instruments({"random": ckpt}, per_slide, truth, positive)
    assert row["encoder"] == "random" and row["dim"] == 256
    assert row["n"] == sum(len(p) for p, _ in per_slide.values())
    assert 0.0 <= row["probe_class_bal_acc"] <= 1.0
    assert np.isnan(row["probe_atypia_auc"]) or 0.0 <= row["probe_atypia_auc"] <= 1.0
    assert 0.0 < row["cos_to_mean"] <= 1.0
