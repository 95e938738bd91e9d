"""What an encoder knows, measured on a synthetic cohort's generator truth: feature health and
linear probes of each patch's tissue class and of lying in the atypical region.

Diagnostics, never training targets. They check the instruments before a comparison (are the
features collapsed? does the teacher carry more than the baseline?) on slides the encoders
never saw: the demo picks and reports its teacher with them, and the effect experiment
(``benchmarks/bench_mcmkd_effect.py``) measures every arm's encoder with them.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def slide_patches(
    slides_dir: str | os.PathLike, patches_dir: str | os.PathLike, slide_ids, slide_ext=".tif"
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """uint8 patches (N, P, P, 3) and level-0 coords of each tiled slide (slides without a
    coords file, i.e. without tissue, are left out)."""
    from ..clam.formats import read_coords_h5
    from ..patch_pipeline import iter_patch_batches

    out = {}
    for sid in slide_ids:
        h5 = Path(patches_dir) / f"{sid}.h5"
        if not h5.is_file():
            continue
        coords = read_coords_h5(h5)
        slide = Path(slides_dir) / f"{sid}{slide_ext}"
        imgs = np.concatenate([b.numpy() for b in iter_patch_batches(slide, coords, 512)])
        out[sid] = (imgs, coords.coords)
    return out


def patch_truth_per_slide(
    cohort_dir: str | os.PathLike, per_slide: dict, patch_level0: int
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The generator's (tissue class, atypia) under each patch of :func:`slide_patches`."""
    from ..cohort_fields import patch_truth, read_maps

    return {
        sid: patch_truth(read_maps(cohort_dir, sid), coords, patch_level0)
        for sid, (_, coords) in per_slide.items()
    }


def linear_probe(feats: dict, targets: dict, kind: str) -> float:
    """Linear probe with a slide split (even / odd slides by sorted id): AUC (``kind="auc"``,
    binary targets) or balanced accuracy; NaN where a side lacks a class."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score, roc_auc_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    sids = sorted(feats)
    parts = [sids[0::2], sids[1::2]]
    (xtr, ytr), (xte, yte) = (
        (np.concatenate([feats[s] for s in p]), np.concatenate([targets[s] for s in p]))
        for p in parts
    )
    if len(set(ytr)) < 2 or len(set(yte)) < 2:
        return float("nan")
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000, C=0.1)).fit(xtr, ytr)
    if kind == "auc":
        return float(roc_auc_score(yte, clf.predict_proba(xte)[:, 1]))
    return float(balanced_accuracy_score(yte, clf.predict(xte)))


def encoder_instruments(
    encoders: dict[str, str | os.PathLike], per_slide: dict, truth: dict, positive: set
) -> list[dict]:
    """Per encoder checkpoint: feature health on every patch, the tissue-class probe over all
    slides and the atypia probe (patch atypia > 0.5) over the positive slides."""
    from ..encoders import create_encoder, encode_patches
    from .stats import feature_health

    rows = []
    for name, ckpt in encoders.items():
        enc = create_encoder("checkpoint", ckpt=str(ckpt))
        feats = {s: encode_patches(enc, p, batch_size=256) for s, (p, _) in per_slide.items()}
        pos = {s: f for s, f in feats.items() if s in positive}
        rows.append(
            {
                "encoder": name,
                **feature_health(np.concatenate(list(feats.values()))),
                "probe_class_bal_acc": linear_probe(feats, {s: truth[s][0] for s in feats}, "acc"),
                "probe_atypia_auc": linear_probe(pos, {s: truth[s][1] > 0.5 for s in pos}, "auc"),
            }
        )
    return rows
