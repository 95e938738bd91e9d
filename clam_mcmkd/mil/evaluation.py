"""``clam-mcmkd eval``: saved fold checkpoints on a split or on any CSV of slides."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from ..clam import formats
from ..splits import canonical_labels
from ..utils import ClamMcmkdError, check_output_path, progress, resolve_device, save_config
from .config import EvalConfig
from .data import (
    Bag,
    BagStore,
    all_bags,
    fold_range,
    labelled_dataset,
    loader_seed_draw,
    read_split_bags,
    resolve_embed_dim,
)
from .feature_norm import NormalizedBags, load_feature_norm
from .models import build_model
from .nets import load_weights
from .results import (
    EVAL_CONFIG_NAME,
    SetResult,
    checkpoint_path,
    fold_row,
    run_config,
    summary_name,
    write_fold_outputs,
)

log = logging.getLogger(__name__)


@torch.inference_mode()
def run_bags(model, bags: Sequence[Bag], store, device, n_classes, loss_fn=None) -> SetResult:
    """One pass of `model` over `bags` (eval mode): per-slide probabilities and the mean loss."""
    model.eval()
    loader_seed_draw()
    probs = np.zeros((len(bags), n_classes))
    loss_sum = 0.0
    for i, bag in enumerate(bags):
        data = store[bag.slide_id].to(device, non_blocking=True)
        logits, Y_prob, _, _, _ = model(data)
        probs[i] = Y_prob.float().cpu().numpy()[0]
        if loss_fn is not None:
            loss_sum += float(loss_fn(logits.float(), torch.tensor([bag.label], device=device)))
    return SetResult(
        slide_ids=[b.slide_id for b in bags],
        labels=np.array([b.label for b in bags], dtype=int),
        probs=probs,
        loss=loss_sum / len(bags) if (loss_fn is not None and bags) else float("nan"),
    )


def _with_run_defaults(cfg: EvalConfig, run: dict) -> EvalConfig:
    """Settings not given come from the train run's config, else CLAM's defaults."""
    return replace(
        cfg,
        k=cfg.k or run.get("k", 10),
        model_type=cfg.model_type or run.get("model_type", "clam_sb"),
        drop_out=run.get("drop_out", 0.25) if cfg.drop_out is None else cfg.drop_out,
        model_size=cfg.model_size or run.get("model_size", "small"),
    )


def _eval_sets(cfg: EvalConfig, df, fold: int) -> tuple[list[Bag], list[Bag] | None]:
    """(bags evaluated as 'test', validation bags or None)."""
    if cfg.split_dir is None:
        return all_bags(df), None
    bags = read_split_bags(df, cfg.split_dir, fold)
    if cfg.split == "all":
        wanted = {b.slide_id for v in bags.values() for b in v}
        return [b for b in all_bags(df) if b.slide_id in wanted], None
    if cfg.split not in bags:
        raise ClamMcmkdError(f"unknown split '{cfg.split}' (train, val, test or all)")
    return bags[cfg.split], (bags["val"] if cfg.split == "test" and bags["val"] else None)


def _load_fold_model(cfg: EvalConfig, fold: int, n_classes: int, embed_dim: int):
    """The fold's model, with a clear error when the checkpoint does not fit the settings."""
    path = checkpoint_path(cfg.models_dir, fold)
    model = build_model(
        cfg.model_type, n_classes, embed_dim, cfg.drop_out, size_arg=cfg.model_size, subtyping=None
    )
    try:
        load_weights(model, path)
    except RuntimeError as err:
        raise ClamMcmkdError(
            f"{path} does not fit a {cfg.model_type} with {n_classes} classes and "
            f"{embed_dim}-d input ({str(err).splitlines()[0]})"
        ) from err
    return model


def evaluate(cfg: EvalConfig) -> Path:
    """Evaluate saved fold checkpoints; writes summary.csv, per-fold predictions and pkl."""
    resolve_device(cfg.device)  # a device this machine lacks: before anything is read
    check_output_path(cfg.eval_dir)
    models_dir = Path(cfg.models_dir)
    run = run_config(models_dir)
    cfg = _with_run_defaults(cfg, run)
    device = resolve_device(cfg.device)
    df, label_dict = labelled_dataset(cfg.csv_path, cfg.label_dict or run.get("label_dict"))
    class_names = canonical_labels(label_dict)
    n_classes = len(class_names)
    folds = fold_range(cfg.k, cfg.k_start, cfg.k_end)
    missing = [f for f in folds if not checkpoint_path(models_dir, f).is_file()]
    if missing:
        raise ClamMcmkdError(
            f"{models_dir}: no checkpoint s_<k>_checkpoint.pt for fold(s) {missing}"
        )
    sets = {fold: _eval_sets(cfg, df, fold) for fold in folds}
    needed = [b.slide_id for s in sets.values() for part in s if part for b in part]
    store = BagStore(cfg.data_root_dir, needed)
    embed_dim = resolve_embed_dim(
        cfg.embed_dim if cfg.embed_dim != "auto" else run.get("embed_dim", "auto"), store
    )
    cfg = replace(cfg, label_dict=label_dict, embed_dim=embed_dim)
    eval_dir = Path(cfg.eval_dir)
    eval_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, eval_dir / EVAL_CONFIG_NAME)
    rows = []
    for fold in progress(folds, desc="evaluating", unit="fold"):
        model = _load_fold_model(cfg, fold, n_classes, embed_dim).to(device)
        test_bags, val_bags = sets[fold]
        inputs = NormalizedBags(store, load_feature_norm(models_dir, fold))  # as trained
        test = run_bags(model, test_bags, inputs, device, n_classes)
        val = run_bags(model, val_bags, inputs, device, n_classes) if val_bags else None
        row = fold_row(fold, test, val)
        write_fold_outputs(eval_dir, fold, row, test, class_names)
        log.info("fold %d: auc %.4f acc %.4f on %d slides",
                 fold, row["test_auc"], row["test_acc"], len(test_bags))  # fmt: skip
        rows.append(row)
    return formats.write_summary(eval_dir, rows, name=summary_name(folds, cfg.k))
