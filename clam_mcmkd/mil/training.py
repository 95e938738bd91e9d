"""``clam-mcmkd train``: ABMIL / CLAM-SB / CLAM-MB on CLAM's k-fold splits.

Follows CLAM's ``main.py`` + ``utils/core_utils.py`` semantics so numbers are comparable: one bag
per step, Adam(lr, weight_decay=reg), CE or smooth-SVM bag loss, CLAM's instance clustering loss
weighted ``bag_weight``, class-balanced sampling with replacement (``--weighted-sample``),
early stopping on validation loss (patience 20, not before epoch 50; the best checkpoint is
kept), AUC (binary: ROC AUC of p(class 1); multiclass: mean of the per-class one-vs-rest AUCs
present) and accuracy, and CLAM's results layout
``<results_dir>/<exp_code>_s<seed>/{summary.csv, split_<k>_results.pkl, s_<k>_checkpoint.pt}``.
Bags are read once per run and kept in memory.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path

import torch

from ..clam import formats
from ..splits import canonical_labels
from ..utils import (
    ClamMcmkdError,
    check_output_path,
    progress,
    resolve_device,
    save_config,
    seed_everything,
)
from .config import TrainConfig
from .data import (
    BagStore,
    MilDataError,
    bag_order,
    fold_range,
    labelled_dataset,
    read_split_bags,
    resolve_embed_dim,
)
from .evaluation import run_bags
from .feature_norm import (
    FEATURE_NORMS,
    NormalizedBags,
    feature_norm_path,
    fit_feature_norm,
    load_feature_norm,
)
from .mhim import MhimTrainer, check_mhim_config
from .models import build_model, get_mil_model
from .nets import load_weights, make_loss, save_weights
from .results import (
    TRAIN_CONFIG_NAME,
    checkpoint_path,
    fold_done,
    fold_row,
    run_config,
    saved_metrics,
    summary_name,
    write_fold_outputs,
)

log = logging.getLogger(__name__)


class EarlyStopping:
    """CLAM's rule: stop once val loss has not improved for `patience` epochs, after
    `stop_epoch`; a tie counts as an improvement; the best model is saved each time."""

    def __init__(self, patience: int, stop_epoch: int, ckpt_path: Path):
        self.patience, self.stop_epoch, self.ckpt_path = patience, stop_epoch, ckpt_path
        self.best = None
        self.counter = 0
        self.stop = False

    def __call__(self, epoch: int, val_loss: float, model: torch.nn.Module) -> None:
        if self.best is not None and val_loss > self.best:
            self.counter += 1
            self.stop = self.counter >= self.patience and epoch > self.stop_epoch
            return
        self.best = val_loss
        self.counter = 0
        save_weights(model, self.ckpt_path)


def make_optimizer(model, cfg: TrainConfig):
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.opt == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.reg)
    if cfg.opt == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.reg)
    raise ClamMcmkdError(f"unknown optimiser '{cfg.opt}' (adam or sgd)")


def _model(cfg: TrainConfig, n_classes: int, embed_dim: int):
    return build_model(
        cfg.model_type, n_classes, embed_dim, cfg.drop_out, cfg.B, cfg.inst_loss, cfg.subtyping,
        cfg.model_size,
    )  # fmt: skip


def train_epoch(model, bags, store, optimizer, loss_fn, cfg: TrainConfig, n_classes, device):
    model.train()
    instance_loss = get_mil_model(cfg.model_type).instance_loss
    totals = {"loss": 0.0, "inst_loss": 0.0, "error": 0.0}
    for idx in bag_order(bags, cfg.weighted_sample, n_classes):
        bag = bags[idx]
        data = store[bag.slide_id].to(device, non_blocking=True)
        label = torch.tensor([bag.label], device=device)
        logits, _, Y_hat, _, inst = model(data, label=label, instance_eval=instance_loss)
        loss = loss_fn(logits, label)
        total = loss
        if instance_loss:
            total = cfg.bag_weight * loss + (1 - cfg.bag_weight) * inst["instance_loss"]
            totals["inst_loss"] += float(inst["instance_loss"].detach())
        totals["loss"] += float(loss.detach())
        totals["error"] += float(int(Y_hat) != bag.label)
        total.backward()
        optimizer.step()
        optimizer.zero_grad()
    return {key: value / max(len(bags), 1) for key, value in totals.items()}


def train_fold(fold, bags, store, cfg: TrainConfig, n_classes, embed_dim, device, run_dir):
    """Train one fold; returns (test SetResult, val SetResult)."""
    seed_everything(cfg.seed)  # CLAM re-seeds before every fold
    for key in ("train", "val", "test"):
        if not bags[key]:
            raise MilDataError(f"{cfg.split_dir}/splits_{fold}.csv: the '{key}' split is empty")
    model = _model(cfg, n_classes, embed_dim).to(device)
    loss_fn = make_loss(cfg.bag_loss, n_classes)
    optimizer = make_optimizer(model, cfg)
    ckpt = checkpoint_path(run_dir, fold)
    stopper = EarlyStopping(cfg.patience, cfg.stop_epoch, ckpt) if cfg.early_stopping else None
    mhim = None
    if get_mil_model(cfg.model_type).mhim_base:
        mhim = MhimTrainer(model, cfg, fold, len(bags["train"]))
    log.info(
        "fold %d: %d train, %d val, %d test slides",
        fold, len(bags["train"]), len(bags["val"]), len(bags["test"]),
    )  # fmt: skip
    bar = progress(range(cfg.max_epochs), desc=f"fold {fold}", unit="epoch")
    for epoch in bar:
        if mhim is not None:
            stats = mhim.train_epoch(
                model, bags["train"], store, optimizer, loss_fn, n_classes, device, epoch
            )
        else:
            stats = train_epoch(
                model, bags["train"], store, optimizer, loss_fn, cfg, n_classes, device
            )
        val = run_bags(model, bags["val"], store, device, n_classes, loss_fn)
        bar.set_postfix(
            loss=f"{stats['loss']:.3f}", val_loss=f"{val.loss:.3f}", val_auc=f"{val.auc:.3f}"
        )
        log.debug(  # per epoch: the progress bar shows it; -vv logs it
            "fold %d epoch %d: train_loss %.4f inst_loss %.4f train_error %.4f | "
            "val_loss %.4f val_error %.4f val_auc %.4f",
            fold, epoch, stats["loss"], stats["inst_loss"], stats["error"],
            val.loss, 1 - val.acc, val.auc,
        )  # fmt: skip
        if stopper is not None:
            stopper(epoch, val.loss, model)
            if stopper.stop:
                log.info("fold %d: early stopping at epoch %d", fold, epoch)
                break
    if stopper is not None:
        load_weights(model, ckpt, map_location=device)
    else:
        save_weights(model, ckpt)
    val = run_bags(model, bags["val"], store, device, n_classes)
    test = run_bags(model, bags["test"], store, device, n_classes)
    return test, val


def train(cfg: TrainConfig) -> Path:
    """Train every fold in [k_start, k_end) and write CLAM's results layout; returns the summary.

    A fold whose checkpoint and results pkl both exist is not trained again (resume).
    MHIM-MIL without ``mhim_teacher_init`` first trains (or resumes) its baseline as
    ``<exp_code>_baseline`` beside this run.
    """
    base = get_mil_model(cfg.model_type).mhim_base  # an unknown name fails before any data is read
    check_output_path(cfg.results_dir)
    if base:
        check_mhim_config(cfg)
        if cfg.mhim_teacher_init is None:
            base_cfg = replace(cfg, model_type=base, exp_code=f"{cfg.exp_code}_baseline")
            log.info("MHIM: training the teacher's %s baseline in %s", base, base_cfg.run_dir)
            train(base_cfg)
            cfg = replace(cfg, mhim_teacher_init=str(base_cfg.run_dir))
    device = resolve_device(cfg.device)
    df, label_dict = labelled_dataset(cfg.csv_path, cfg.label_dict)
    class_names = canonical_labels(label_dict)
    n_classes = len(class_names)
    folds = fold_range(cfg.k, cfg.k_start, cfg.k_end)
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg_saved = TrainConfig(**{**cfg.__dict__, "label_dict": label_dict})
    _check_feature_norm(cfg, run_dir, folds)

    fold_bags = {fold: read_split_bags(df, cfg.split_dir, fold) for fold in folds}
    todo = [f for f in folds if not fold_done(run_dir, f)]
    need_data = todo + [f for f in folds if f not in todo and saved_metrics(run_dir, f) is None]
    needed = [b.slide_id for f in need_data for bags in fold_bags[f].values() for b in bags]
    store = BagStore(cfg.data_root_dir, needed, cache=cfg.cache_features)
    if need_data:
        cfg_saved.embed_dim = resolve_embed_dim(cfg.embed_dim, store)
        save_config(cfg_saved, run_dir / TRAIN_CONFIG_NAME)
    embed_dim = cfg_saved.embed_dim
    if device.startswith("cuda") and cfg.cache_features and todo:
        store.to_device(device)

    rows = []
    for fold in folds:
        bags = fold_bags[fold]
        if fold in todo:
            started = time.time()
            formats.write_splits(
                run_dir, fold, {k: [b.slide_id for b in v] for k, v in bags.items()},
                {s: class_names[i] for s, i in zip(df["slide_id"], df["label_index"])},
                {n: i for i, n in class_names.items()},
            )  # fmt: skip
            fold_store = _fold_store(cfg, store, bags, run_dir, fold)
            test, val = train_fold(
                fold, bags, fold_store, cfg, n_classes, embed_dim, device, run_dir
            )
            row = fold_row(fold, test, val)
            write_fold_outputs(run_dir, fold, row, test, class_names)
            log.info(
                "fold %d done in %.1fs: test_auc %.4f val_auc %.4f test_acc %.4f val_acc %.4f",
                fold, time.time() - started, row["test_auc"], row["val_auc"], row["test_acc"],
                row["val_acc"],
            )  # fmt: skip
        else:
            log.info("fold %d: checkpoint and results exist, skipped", fold)
            row = _saved_row(run_dir, fold, bags, store, cfg_saved, n_classes, device)
        rows.append(row)
    return formats.write_summary(run_dir, rows, name=summary_name(folds, cfg.k))


def _saved_row(run_dir, fold, bags, store, cfg: TrainConfig, n_classes, device) -> dict:
    """Metrics of a finished fold: its metrics JSON, else re-evaluated from the checkpoint
    (folds trained by CLAM's own main.py have no JSON)."""
    row = saved_metrics(run_dir, fold)
    if row is not None:
        return row
    model = build_model(
        cfg.model_type, n_classes, cfg.embed_dim, cfg.drop_out, size_arg=cfg.model_size,
        subtyping=None,
    )  # fmt: skip
    load_weights(model, checkpoint_path(run_dir, fold)).to(device)
    store = NormalizedBags(store, load_feature_norm(run_dir, fold))
    test = run_bags(model, bags["test"], store, device, n_classes)
    val = run_bags(model, bags["val"], store, device, n_classes)
    return fold_row(fold, test, val)


def _fold_store(cfg: TrainConfig, store, bags, run_dir: Path, fold: int):
    """The fold's inputs: raw, or standardised with statistics of its training slides only
    (saved before the checkpoint, so a finished fold always has them)."""
    if cfg.feature_norm == "none":
        return store
    norm = fit_feature_norm(store[b.slide_id] for b in bags["train"])
    norm.save(feature_norm_path(run_dir, fold))
    return NormalizedBags(store, norm)


def _check_feature_norm(cfg: TrainConfig, run_dir: Path, folds) -> None:
    """Unknown names fail at once; a finished fold of this run dir trained with another
    feature_norm would be resumed as if it were this run's, so that is refused."""
    if cfg.feature_norm not in FEATURE_NORMS:
        raise ClamMcmkdError(f"unknown feature_norm {cfg.feature_norm!r} (one of {FEATURE_NORMS})")
    before = run_config(run_dir).get("feature_norm", "none")
    if before != cfg.feature_norm and any(fold_done(run_dir, f) for f in folds):
        raise MilDataError(
            f"{run_dir}: its finished folds were trained with feature_norm={before!r}, not "
            f"{cfg.feature_norm!r}; use another --exp-code or --results-dir"
        )
