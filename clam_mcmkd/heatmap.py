"""Attention heatmaps of a trained MIL fold: PNG overlay, QuPath GeoJSON and an h5 of scores.

Per slide the model reads the slide's features once and gives its raw attention per patch (one
map for ABMIL / CLAM-SB, one per class branch for CLAM-MB), ranked into percentiles as CLAM's
``to_percentiles`` does (``rankdata(scores, "average") / N``, so the top patch is 1.0). Written
into ``<out>/<slide_id>/``:

* ``<slide_id>_attention.png``: thumbnail with the percentiles as a colour map, a colour bar,
  one panel per attention branch;
* ``<slide_id>_attention.geojson``: one square per patch (level-0 pixels), QuPath detections
  carrying the attention as measurements (QuPath >= 0.4's GeoJSON: ``objectType``,
  ``measurements`` as a name -> value object);
* ``<slide_id>_blockmap.h5``: CLAM's blockmap datasets (``attention_scores`` (N, 1) raw scores
  of the predicted class's branch, ``coords``) plus every branch raw and as percentiles.

Every file is written atomically and the h5 last: a slide whose h5 exists is done (resume).
Slides go through the shared per-slide job loop: one that fails is logged and skipped; the run
ends with a summary. Seconds per slide: the features are already extracted, so this is one
forward pass and some drawing.

A stage of its own, after ``train``: it needs a MIL fold (``mil/``) and the slides
(``slides.py``), and ``mil/`` itself works on features alone.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .clam import formats
from .jobs import DONE, run_slide_job
from .utils import (
    ClamMcmkdError,
    RunSummary,
    atomic_path,
    check_output_path,
    resolve_device,
    save_config,
)

CONFIG_NAME = "heatmap_config.json"
SUMMARY_NAME = "heatmap_summary.json"


class HeatmapError(ClamMcmkdError):
    """A run directory, slide or feature file heatmaps cannot use; the message names it."""


@dataclass
class HeatmapConfig:
    models_dir: str  # a train run dir: s_<fold>_checkpoint.pt + train_config.json
    data_root_dir: str  # features: <dir>/h5_files/<id>.h5 (coords) and/or pt_files/<id>.pt
    data_h5_dir: str  # coords: <dir>/patches/<id>.h5 (patch size and level)
    data_slide_dir: str
    csv_path: str  # dataset CSV: which slides (and their labels, for the summary)
    out: str
    fold: int = 0
    slide_ext: str | None = None  # None: find <id>.<any slide extension> in data_slide_dir
    slide_ids: list[str] | None = None  # default: every slide in the CSV
    cmap: str = "jet"  # CLAM's heatmap config default
    alpha: float = 0.6  # weight of the colour over the slide (CLAM blends the slide at 0.4)
    thumb_max_size: int = 2048  # longer side of the thumbnail under each panel
    device: str = "auto"
    no_auto_skip: bool = False  # redo slides whose blockmap h5 exists
    model_type: str | None = None  # default: the run's train_config.json


# ----------------------------------------------------------------------------- model + norm


def load_feature_norm(models_dir: str | Path, fold: int):
    """The standardisation the fold was trained with (``train --feature-norm``), or None:
    exactly what ``eval`` applies (:func:`clam_mcmkd.mil.feature_norm.load_feature_norm`)."""
    from .mil.feature_norm import load_feature_norm as load

    return load(models_dir, fold, error=HeatmapError)


def load_fold_model(cfg: HeatmapConfig, csv_labels: list[str]):
    """The fold's model in eval mode, its class names and model type.

    Class names and model type come from the run's train_config.json; a run trained by CLAM's
    own main.py has none, so they fall back to the CSV's sorted labels and the checkpoint's
    layout (per-class bag classifiers: CLAM-MB). The input width is read from the weights.
    """
    from .encoders.checkpoint import load_checkpoint
    from .mil.models import build_model, get_mil_model
    from .mil.nets import clean_state_dict
    from .mil.results import run_config
    from .splits import canonical_labels

    run = Path(cfg.models_dir)
    named = cfg.model_type or run_config(run).get("model_type")
    if named and not get_mil_model(named).attention_map:
        raise HeatmapError(
            f"{run}: a {named} run has no per-patch attention that pooled the bag; "
            "heatmap draws ABMIL / CLAM / MHIM-ABMIL attention only"
        )
    ckpt = formats.fold_checkpoint_path(run, cfg.fold)
    if not ckpt.is_file():
        raise HeatmapError(f"{ckpt}: no checkpoint for fold {cfg.fold} in --models-dir")
    state = load_checkpoint(ckpt, what="MIL checkpoint", error=HeatmapError, weights_only=True)
    try:
        state = clean_state_dict(state)
        embed_dim = int(state["attention_net.0.weight"].shape[1])
    except Exception as err:  # noqa: BLE001 - not a CLAM/ABMIL state dict
        raise HeatmapError(f"{ckpt}: not a CLAM/ABMIL checkpoint ({err!r})") from err
    train_cfg = run_config(run)
    names = canonical_labels(train_cfg.get("label_dict") or formats.default_label_dict(csv_labels))
    inferred = "clam_mb" if "classifiers.0.weight" in state else "clam_sb"
    model_type = cfg.model_type or train_cfg.get("model_type") or inferred
    model = build_model(
        model_type, n_classes=len(names), embed_dim=embed_dim,
        dropout=float(train_cfg.get("drop_out", 0.25)),  # module layout only: eval() turns it off
        size_arg=train_cfg.get("model_size", "small"),
    )  # fmt: skip
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise HeatmapError(
            f"{ckpt}: does not fit a {model_type} with {len(names)} classes and {embed_dim}-d "
            f"input ({str(err).splitlines()[0]})"
        ) from err
    return model.eval(), names, model_type


# ----------------------------------------------------------------------------- scores


def to_percentiles(scores: np.ndarray) -> np.ndarray:
    """CLAM's ``to_percentiles`` / 100: average rank over N, in (0, 1]; the top patch is 1."""
    from scipy.stats import rankdata

    scores = np.asarray(scores, dtype=np.float64)
    return rankdata(scores, method="average") / len(scores)


def slide_attention(model, feats: np.ndarray) -> dict:
    """Raw attention (K, N), percentiles (K, N), class probabilities and the predicted class."""
    import torch

    from .mil.nets import attention_scores

    param = next(model.parameters())
    x = torch.from_numpy(np.ascontiguousarray(feats, dtype=np.float32)).to(param.device)
    with torch.inference_mode():
        _, y_prob, y_hat, _, _ = model(x)
    raw = np.atleast_2d(attention_scores(model, x)).astype(np.float32)
    return {
        "raw": raw,
        "percentile": np.stack([to_percentiles(a) for a in raw]).astype(np.float32),
        "probs": y_prob.float().cpu().numpy()[0],
        "y_hat": int(y_hat.item()),
    }


def branch_names(n_branches: int, class_names: dict[int, str]) -> list[str]:
    return (
        ["attention"]
        if n_branches == 1
        else [f"attention_{class_names[c]}" for c in range(n_branches)]
    )


# ----------------------------------------------------------------------------- outputs


def write_geojson(path: Path, coords: np.ndarray, patch_size: int, measurements: dict) -> Path:
    """One square detection per patch, level-0 pixels, attention values as measurements."""
    features = []
    for i, (x, y) in enumerate(coords.tolist()):
        ring = [
            [x, y],
            [x + patch_size, y],
            [x + patch_size, y + patch_size],
            [x, y + patch_size],
            [x, y],
        ]
        features.append(
            {
                "type": "Feature",
                "geometry": {"type": "Polygon", "coordinates": [ring]},
                "properties": {
                    "objectType": "detection",
                    "name": f"patch {i}",
                    "measurements": {k: round(float(v[i]), 6) for k, v in measurements.items()},
                },
            }
        )
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    return path


def write_scores_h5(path: Path, coords: np.ndarray, att: dict, attrs: dict) -> Path:
    """CLAM's blockmap layout (attention_scores (N, 1), coords) plus all branches."""
    import h5py

    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("attention_scores", data=att["raw"][att["branch"]][:, None])
            f.create_dataset("coords", data=coords.astype(np.int64))
            f.create_dataset("attention", data=att["raw"])
            f.create_dataset("attention_percentile", data=att["percentile"])
            for key, value in attrs.items():
                f.attrs[key] = value
    return path


def overlay(thumb, scale, coords, patch_size, percentile, cmap: str, alpha: float) -> np.ndarray:
    """The thumbnail with each patch's percentile drawn in `cmap` (overlaps averaged, as CLAM)."""
    from matplotlib import colormaps

    h, w = thumb.shape[:2]
    total = np.zeros((h, w), np.float64)
    count = np.zeros((h, w), np.uint16)
    x0 = np.clip(np.floor(coords[:, 0] * scale[0]).astype(int), 0, w)
    y0 = np.clip(np.floor(coords[:, 1] * scale[1]).astype(int), 0, h)
    x1 = np.clip(np.ceil((coords[:, 0] + patch_size) * scale[0]).astype(int), 0, w)
    y1 = np.clip(np.ceil((coords[:, 1] + patch_size) * scale[1]).astype(int), 0, h)
    for i in range(len(coords)):
        total[y0[i] : y1[i], x0[i] : x1[i]] += percentile[i]
        count[y0[i] : y1[i], x0[i] : x1[i]] += 1
    covered = count > 0
    colour = colormaps[cmap](total[covered] / count[covered])[:, :3] * 255.0
    out = thumb.astype(np.float64)
    out[covered] = (1.0 - alpha) * out[covered] + alpha * colour
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def save_png(path: Path, panels: list[np.ndarray], titles: list[str], cmap: str) -> Path:
    """Panels side by side with one colour bar (matplotlib, no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    h, w = panels[0].shape[:2]
    dpi = 100
    fig = Figure(figsize=(len(panels) * w / dpi + 1.2, h / dpi + 0.5), dpi=dpi)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, panel, title in zip(axes, panels, titles):
        ax.imshow(panel)
        ax.set_title(title, fontsize=12)
        ax.set_axis_off()
    bar = fig.colorbar(ScalarMappable(Normalize(0, 1), cmap), ax=list(axes), fraction=0.04)
    bar.set_label("attention percentile")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png", bbox_inches="tight", pad_inches=0.1)
    return path


# ----------------------------------------------------------------------------- one slide


def slide_inputs(cfg: HeatmapConfig, slide_id: str):
    """Features (N, D) and the coords file, checked to describe the same patches in order."""
    coords = formats.read_coords_h5(formats.coords_path(cfg.data_h5_dir, slide_id))
    h5_path, _ = formats.feature_paths(cfg.data_root_dir, slide_id)
    if h5_path.is_file():
        feats, feat_coords = formats.read_features(cfg.data_root_dir, slide_id, with_coords=True)
        if feat_coords.shape != coords.coords.shape or (feat_coords != coords.coords).any():
            raise HeatmapError(f"{h5_path}: its coords are not those of {coords.path}")
    else:
        feats = formats.read_features(cfg.data_root_dir, slide_id)
    if len(feats) != len(coords):
        raise HeatmapError(
            f"{cfg.data_root_dir}: {slide_id} has {len(feats)} feature rows but {coords.path} "
            f"has {len(coords)} patches"
        )
    return feats, coords


def heatmap_slide(cfg: HeatmapConfig, slide_id: str, model, class_names, norm) -> dict:
    """All three outputs of one slide; returns its prediction and patch count."""
    from .slides import find_slide, open_slide

    feats, coords = slide_inputs(cfg, slide_id)
    att = slide_attention(model, norm(feats) if norm is not None else feats)
    att["branch"] = att["y_hat"] if len(att["raw"]) > 1 else 0
    names = branch_names(len(att["raw"]), class_names)
    size = coords.patch_size_level0
    with open_slide(find_slide(cfg.data_slide_dir, slide_id, cfg.slide_ext)) as slide:
        thumb, dims = slide.get_thumbnail(cfg.thumb_max_size), slide.dimensions
    scale = (thumb.shape[1] / dims[0], thumb.shape[0] / dims[1])
    pred, prob = class_names[att["y_hat"]], float(att["probs"][att["y_hat"]])
    out = Path(cfg.out) / slide_id
    panels = [
        overlay(thumb, scale, coords.coords, size, p, cfg.cmap, cfg.alpha)
        for p in att["percentile"]
    ]
    titles = [f"{slide_id}: {n} (predicted {pred}, p={prob:.2f})" for n in names]
    save_png(out / f"{slide_id}_attention.png", panels, titles, cfg.cmap)
    measurements = {}
    for k, name in enumerate(names):
        measurements[name] = att["raw"][k]
        measurements[f"{name}_percentile"] = att["percentile"][k]
    write_geojson(out / f"{slide_id}_attention.geojson", coords.coords, size, measurements)
    attrs = {
        "slide_id": slide_id, "fold": cfg.fold, "predicted": pred, "probs": att["probs"],
        "branches": json.dumps(names), "patch_size_level0": size,
        "feature_norm": "saved statistics" if norm is not None else "none",
    }  # fmt: skip
    write_scores_h5(out / f"{slide_id}_blockmap.h5", coords.coords, att, attrs)  # last: "done"
    return {"predicted": pred, "prob": prob, "patches": len(coords)}


# ----------------------------------------------------------------------------- run


def check_config(cfg: HeatmapConfig) -> None:
    """The drawing options, before any slide is drawn (they failed on every slide after the
    work, with the config already written)."""
    import matplotlib

    if cfg.cmap not in matplotlib.colormaps:
        raise HeatmapError(f"--cmap {cfg.cmap!r}: not a matplotlib colour map (e.g. jet, viridis)")
    if cfg.thumb_max_size < 64:
        raise HeatmapError(f"--thumb-max-size must be >= 64, got {cfg.thumb_max_size}")
    if not 0.0 <= cfg.alpha <= 1.0:
        raise HeatmapError(f"--alpha must be in [0, 1], got {cfg.alpha}")


def run_heatmaps(cfg: HeatmapConfig) -> RunSummary:
    """Heatmaps for every selected slide; a bad slide is logged and skipped (see the summary)."""
    out = check_output_path(cfg.out)
    check_config(cfg)
    device = resolve_device(cfg.device)  # first: a run that cannot start writes nothing
    df = formats.read_dataset_csv(cfg.csv_path, require_label=False)
    labels = dict(zip(df["slide_id"], df["label"])) if "label" in df.columns else {}
    ids = list(cfg.slide_ids or df["slide_id"])
    unknown = sorted(set(ids) - set(df["slide_id"]))
    if unknown:
        raise HeatmapError(f"{cfg.csv_path}: --slide-ids not in the CSV: {unknown[:5]}")
    model, class_names, model_type = load_fold_model(cfg, sorted(set(labels.values())))
    norm = load_feature_norm(cfg.models_dir, cfg.fold)
    out.mkdir(parents=True, exist_ok=True)  # only once the model loads: a bad run writes nothing
    save_config(cfg, out / CONFIG_NAME)
    model.to(device)
    summary = RunSummary("heatmap", extra={"model_type": model_type, "fold": cfg.fold})
    outcomes = run_slide_job(
        ids, lambda slide_id: heatmap_slide(cfg, slide_id, model, class_names, norm), summary,
        finished=lambda slide_id: _done_before(cfg, slide_id), desc="heatmaps",
    )  # fmt: skip
    done = [o for o in outcomes if o.status == DONE]
    summary.extra["seconds_per_slide"] = (
        round(float(np.mean([o.seconds for o in done])), 2) if done else None
    )
    summary.extra["predictions"] = {
        o.slide_id: {**o.result, "label": labels.get(o.slide_id)} for o in done
    }
    summary.write(out / SUMMARY_NAME)
    summary.extra.pop("predictions")  # per slide, in the file; the summary line stays one line
    return summary


def _done_before(cfg: HeatmapConfig, slide_id: str) -> bool | None:
    """True (skip) when the slide's blockmap h5, written last, exists; None: draw it."""
    done = (Path(cfg.out) / slide_id / f"{slide_id}_blockmap.h5").is_file()
    return True if done and not cfg.no_auto_skip else None
