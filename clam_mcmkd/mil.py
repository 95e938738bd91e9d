"""ABMIL / CLAM-SB / CLAM-MB training and evaluation on CLAM's k-fold splits.

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

import json
import logging
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .clam import formats
from .mil_models import attention_scores, build_model, load_weights, make_loss
from .splits import canonical_labels
from .utils import (
    ClamMcmkdError,
    atomic_path,
    atomic_write_text,
    progress,
    resolve_device,
    save_config,
    seed_everything,
)

log = logging.getLogger(__name__)

__all__ = [
    "TrainConfig", "EvalConfig", "train", "evaluate", "bag_auc", "BagStore", "MilDataError",
    "parse_label_dict", "attention_scores",
]  # fmt: skip

TRAIN_CONFIG_NAME = "train_config.json"
EVAL_CONFIG_NAME = "eval_config.json"


class MilDataError(ClamMcmkdError):
    """Splits, labels or feature files that training cannot use; the message says which."""


# ----------------------------------------------------------------------------- configs


@dataclass
class TrainConfig:
    data_root_dir: str  # CLAM's feature dir: <data_root_dir>/pt_files/<slide_id>.pt (or h5_files)
    csv_path: str
    split_dir: str
    results_dir: str
    exp_code: str
    model_type: str = "clam_sb"  # abmil | clam_sb | clam_mb
    k: int = 10
    k_start: int = -1
    k_end: int = -1
    label_dict: dict[str, int] | None = None  # default: sorted labels -> 0..C-1
    max_epochs: int = 200
    early_stopping: bool = False
    patience: int = 20  # CLAM's EarlyStopping(patience=20, stop_epoch=50)
    stop_epoch: int = 50
    weighted_sample: bool = False
    opt: str = "adam"
    lr: float = 2e-4  # CLAM's README recipe (its main.py default is 1e-4)
    reg: float = 1e-5
    drop_out: float = 0.25
    bag_loss: str = "ce"
    inst_loss: str = "svm"
    bag_weight: float = 0.7
    B: int = 8
    subtyping: bool | None = None  # None: on for more than two classes (CLAM's tasks)
    model_size: str = "small"
    seed: int = 1
    embed_dim: int | str = "auto"
    device: str = "auto"
    cache_features: bool = True

    @property
    def run_dir(self) -> Path:
        return Path(self.results_dir) / f"{self.exp_code}_s{self.seed}"


@dataclass
class EvalConfig:
    data_root_dir: str
    csv_path: str  # dataset CSV (labels); without split_dir every slide in it is evaluated
    models_dir: str  # a train run dir holding s_<k>_checkpoint.pt (+ train_config.json)
    eval_dir: str
    split_dir: str | None = None
    split: str = "test"  # train | val | test | all
    k: int | None = None  # default: the run's k
    k_start: int = -1
    k_end: int = -1
    model_type: str | None = None  # default: from the run's train_config.json, else clam_sb
    label_dict: dict[str, int] | None = None
    drop_out: float | None = None
    model_size: str | None = None
    embed_dim: int | str = "auto"
    device: str = "auto"


# ----------------------------------------------------------------------------- data


@dataclass
class Bag:
    slide_id: str
    label: int  # class index


class BagStore:
    """Feature bags by slide id, all read and validated up front (existence, width, emptiness,
    NaN) so a bad file fails the run before any training; kept in memory unless `cache` is off.
    """

    def __init__(self, feat_dir: str | Path, slide_ids: Sequence[str], cache: bool = True):
        self.feat_dir = Path(feat_dir)
        self.cache = cache
        self._bags: dict[str, torch.Tensor] = {}
        missing = [s for s in slide_ids if not self._exists(s)]
        if missing:
            raise MilDataError(
                f"{len(missing)} slide(s) have no feature file in {self.feat_dir}/pt_files "
                f"or h5_files, e.g. {missing[:5]}"
            )
        self.widths: dict[str, int] = {}
        ids = list(dict.fromkeys(slide_ids))
        for slide_id in progress(ids, desc="reading features", unit="slide"):
            feats = self._read(slide_id)
            if cache:
                self._bags[slide_id] = feats
        self.embed_dim = self._check_widths()

    def _exists(self, slide_id: str) -> bool:
        return any(p.is_file() for p in formats.feature_paths(self.feat_dir, slide_id))

    def _read(self, slide_id: str) -> torch.Tensor:
        feats = torch.from_numpy(formats.read_features(self.feat_dir, slide_id))
        self.widths[slide_id] = feats.shape[1]
        return feats

    def _check_widths(self) -> int:
        by_width: dict[int, str] = {}
        for slide_id, width in self.widths.items():
            by_width.setdefault(width, slide_id)
        if len(by_width) > 1:
            examples = ", ".join(f"{s}: {w}" for w, s in by_width.items())
            raise MilDataError(
                f"feature widths differ between slides in {self.feat_dir} ({examples})"
            )
        return next(iter(by_width)) if by_width else 0

    def __getitem__(self, slide_id: str) -> torch.Tensor:
        if self.cache:
            return self._bags[slide_id]
        return self._read(slide_id)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._bags.values())

    def to_device(self, device: str) -> None:
        """Keep the cache on the GPU when it fits in half the free memory, else pin it."""
        if not self._bags:
            return
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        if self.nbytes() < free // 2:
            self._bags = {s: t.to(device) for s, t in self._bags.items()}
        else:
            log.info("features (%.1f GB) stay in pinned CPU memory", self.nbytes() / 1e9)
            self._bags = {s: t.pin_memory() for s, t in self._bags.items()}


def _labelled_dataset(csv_path: str, label_dict: Mapping[str, int] | None):
    """Dataset CSV with ``label_index``; the label dict is validated against it."""
    raw = formats.read_dataset_csv(csv_path)
    label_dict = dict(label_dict or formats.default_label_dict(raw["label"].tolist()))
    indices = sorted(set(label_dict.values()))
    if indices != list(range(len(indices))):
        raise MilDataError(f"label dict class indices must be 0..C-1, got {label_dict}")
    unknown = sorted(set(raw["label"]) - set(label_dict))
    if unknown:
        raise MilDataError(f"{csv_path}: label(s) {unknown} are not in the label dict {label_dict}")
    return formats.read_dataset_csv(csv_path, label_dict=label_dict), label_dict


def _split_bags(df, split: Mapping[str, Sequence[str]], source: str) -> dict[str, list[Bag]]:
    """Bags of each split in dataset-CSV order (CLAM's ``get_split_from_df``)."""
    labels = dict(zip(df["slide_id"], df["label_index"]))
    out = {}
    for key, ids in split.items():
        unknown = [s for s in ids if s not in labels]
        if unknown:
            raise MilDataError(
                f"{source}: {len(unknown)} '{key}' slide(s) are not in the dataset CSV, "
                f"e.g. {unknown[:5]}"
            )
        wanted = set(ids)
        out[key] = [Bag(s, int(labels[s])) for s in df["slide_id"] if s in wanted]
    return out


def _fold_range(k: int, k_start: int, k_end: int) -> list[int]:
    start = 0 if k_start == -1 else k_start
    end = k if k_end == -1 else k_end
    if not 0 <= start < end:
        raise ClamMcmkdError(f"empty fold range: k_start={k_start}, k_end={k_end}, k={k}")
    return list(range(start, end))


def _summary_name(folds: Sequence[int], k: int) -> str:
    if len(folds) == k:
        return "summary.csv"
    return f"summary_partial_{folds[0]}_{folds[-1] + 1}.csv"


def _resolve_embed_dim(requested: int | str, store: BagStore) -> int:
    if requested in (None, "auto", ""):
        return store.embed_dim
    requested = int(requested)
    if store.embed_dim and requested != store.embed_dim:
        raise MilDataError(
            f"--embed-dim {requested} but the features in {store.feat_dir} are {store.embed_dim}-d"
        )
    return requested


# ----------------------------------------------------------------------------- metrics


@dataclass
class SetResult:
    """One pass over a set of bags: per-slide probabilities and CLAM's summary numbers."""

    slide_ids: list[str]
    labels: np.ndarray  # (n,) int
    probs: np.ndarray  # (n, C)
    loss: float = float("nan")

    @property
    def preds(self) -> np.ndarray:
        return self.probs.argmax(axis=1)

    @property
    def acc(self) -> float:
        return float((self.preds == self.labels).mean()) if len(self.labels) else float("nan")

    @property
    def auc(self) -> float:
        return bag_auc(self.labels, self.probs)

    def patient_results(self) -> dict:
        """CLAM's ``split_<k>_results.pkl`` dict."""
        return {
            s: {
                "slide_id": np.array(s),
                "prob": self.probs[i : i + 1].astype(np.float32),
                "label": int(y),
            }
            for i, (s, y) in enumerate(zip(self.slide_ids, self.labels))
        }


def bag_auc(labels: np.ndarray, probs: np.ndarray) -> float:
    """CLAM's AUC; NaN where it is undefined (a set with one class), where CLAM would crash."""
    from sklearn.metrics import auc, roc_auc_score, roc_curve

    labels = np.asarray(labels)
    n_classes = probs.shape[1]
    if len(np.unique(labels)) < 2:
        return float("nan")
    if n_classes == 2:
        return float(roc_auc_score(labels, probs[:, 1]))
    aucs = []
    for c in range(n_classes):
        if c in labels:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fpr, tpr, _ = roc_curve(labels == c, probs[:, c])
            aucs.append(auc(fpr, tpr))
        else:
            aucs.append(float("nan"))
    return float(np.nanmean(aucs))


# ----------------------------------------------------------------------------- loops


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
        save_state(model, self.ckpt_path)


def save_state(model: torch.nn.Module, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, tmp)


def _loader_seed_draw() -> None:
    """The one draw a torch DataLoader takes from the global RNG per pass (its base seed).

    Taking it too keeps the global RNG stream, hence bag order and dropout masks, in step with
    CLAM's loaders, so a seeded CPU run retraces CLAM's.
    """
    torch.empty((), dtype=torch.int64).random_()


def _order(bags: Sequence[Bag], weighted: bool, n_classes: int) -> list[int]:
    """One epoch's bag order: CLAM's RandomSampler, or WeightedRandomSampler with weight
    N / count(class) per bag and replacement (make_weights_for_balanced_classes_split)."""
    _loader_seed_draw()
    n = len(bags)
    if weighted:
        counts = np.bincount([b.label for b in bags], minlength=n_classes)
        weights = torch.tensor([n / counts[b.label] for b in bags], dtype=torch.double)
        return torch.multinomial(weights, n, replacement=True).tolist()
    seed = int(torch.empty((), dtype=torch.int64).random_().item())
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()


def train_epoch(model, bags, store, optimizer, loss_fn, cfg: TrainConfig, n_classes, device):
    model.train()
    instance_loss = cfg.model_type in ("clam_sb", "clam_mb")
    totals = {"loss": 0.0, "inst_loss": 0.0, "error": 0.0}
    for idx in _order(bags, cfg.weighted_sample, n_classes):
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


@torch.inference_mode()
def run_bags(model, bags: Sequence[Bag], store, device, n_classes, loss_fn=None) -> SetResult:
    model.eval()
    _loader_seed_draw()
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


# ----------------------------------------------------------------------------- outputs


def write_predictions(path: Path, result: SetResult, class_names: Mapping[int, str]) -> Path:
    """Per-slide probabilities for ROC curves (CLAM's eval ``fold_<k>.csv`` columns + label)."""
    import pandas as pd

    df = pd.DataFrame(
        {
            "slide_id": result.slide_ids,
            "label": [class_names[int(y)] for y in result.labels],
            "Y": result.labels,
            "Y_hat": result.preds,
        }
    )
    for c in range(result.probs.shape[1]):
        df[f"p_{c}"] = result.probs[:, c]
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)
    return path


def _fold_row(fold: int, test: SetResult, val: SetResult | None) -> dict:
    nan = float("nan")
    return {
        "folds": fold,
        "test_auc": test.auc,
        "val_auc": val.auc if val is not None else nan,
        "test_acc": test.acc,
        "val_acc": val.acc if val is not None else nan,
    }


def _write_fold_outputs(run_dir: Path, fold: int, row: dict, test: SetResult, class_names):
    write_predictions(run_dir / f"fold_{fold}_predictions.csv", test, class_names)
    atomic_write_text(_metrics_path(run_dir, fold), json.dumps(row, indent=2) + "\n")
    formats.write_pkl(run_dir / f"split_{fold}_results.pkl", test.patient_results())  # last


# ----------------------------------------------------------------------------- train


def _make_optimizer(model, cfg: TrainConfig):
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.opt == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.reg)
    if cfg.opt == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.reg)
    raise ClamMcmkdError(f"unknown optimiser '{cfg.opt}' (adam or sgd)")


def _build(
    model_type, n_classes, embed_dim, drop_out, B=8, inst_loss="svm", subtyping=None, size="small"
):
    return build_model(
        model_type,
        n_classes=n_classes,
        embed_dim=embed_dim,
        dropout=drop_out,
        k_sample=B,
        inst_loss=inst_loss,
        subtyping=(n_classes > 2) if subtyping is None else subtyping,
        size_arg=size,
    )


def train_fold(fold, bags, store, cfg: TrainConfig, n_classes, embed_dim, device, run_dir):
    """Train one fold; returns (test SetResult, val SetResult)."""
    seed_everything(cfg.seed)  # CLAM re-seeds before every fold
    for key in ("train", "val", "test"):
        if not bags[key]:
            raise MilDataError(f"{cfg.split_dir}/splits_{fold}.csv: the '{key}' split is empty")
    model = _build(
        cfg.model_type, n_classes, embed_dim, cfg.drop_out, cfg.B, cfg.inst_loss, cfg.subtyping,
        cfg.model_size,
    ).to(device)  # fmt: skip
    loss_fn = make_loss(cfg.bag_loss, n_classes)
    optimizer = _make_optimizer(model, cfg)
    ckpt = run_dir / f"s_{fold}_checkpoint.pt"
    stopper = EarlyStopping(cfg.patience, cfg.stop_epoch, ckpt) if cfg.early_stopping else None
    log.info(
        "fold %d: %d train, %d val, %d test slides",
        fold, len(bags["train"]), len(bags["val"]), len(bags["test"]),
    )  # fmt: skip
    bar = progress(range(cfg.max_epochs), desc=f"fold {fold}", unit="epoch")
    for epoch in bar:
        stats = train_epoch(model, bags["train"], store, optimizer, loss_fn, cfg, n_classes, device)
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
        save_state(model, ckpt)
    val = run_bags(model, bags["val"], store, device, n_classes)
    test = run_bags(model, bags["test"], store, device, n_classes)
    return test, val


def _metrics_path(run_dir: Path, fold: int) -> Path:
    return run_dir / f"fold_{fold}_metrics.json"


def _fold_done(run_dir: Path, fold: int) -> bool:
    return (run_dir / f"s_{fold}_checkpoint.pt").is_file() and (
        run_dir / f"split_{fold}_results.pkl"
    ).is_file()


def train(cfg: TrainConfig) -> Path:
    """Train every fold in [k_start, k_end) and write CLAM's results layout; returns the summary.

    A fold whose checkpoint and results pkl both exist is not trained again (resume).
    """
    if cfg.model_type not in ("abmil", "clam_sb", "clam_mb"):
        raise ClamMcmkdError(f"unknown model type '{cfg.model_type}' (abmil, clam_sb, clam_mb)")
    device = resolve_device(cfg.device)
    df, label_dict = _labelled_dataset(cfg.csv_path, cfg.label_dict)
    class_names = canonical_labels(label_dict)
    n_classes = len(class_names)
    folds = _fold_range(cfg.k, cfg.k_start, cfg.k_end)
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg_saved = TrainConfig(**{**cfg.__dict__, "label_dict": label_dict})

    fold_bags = {}
    for fold in folds:
        split_csv = formats.split_paths(cfg.split_dir, fold)[0]
        split = formats.read_splits(cfg.split_dir, fold)
        fold_bags[fold] = _split_bags(df, split, str(split_csv))
    todo = [f for f in folds if not _fold_done(run_dir, f)]
    need_data = todo + [
        f for f in folds if f not in todo and not _metrics_path(run_dir, f).is_file()
    ]
    needed = [b.slide_id for f in need_data for bags in fold_bags[f].values() for b in bags]
    store = BagStore(cfg.data_root_dir, needed, cache=cfg.cache_features)
    if need_data:
        cfg_saved.embed_dim = _resolve_embed_dim(cfg.embed_dim, store)
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
            test, val = train_fold(fold, bags, store, cfg, n_classes, embed_dim, device, run_dir)
            row = _fold_row(fold, test, val)
            _write_fold_outputs(run_dir, fold, row, test, class_names)
            log.info(
                "fold %d done in %.1fs: test_auc %.4f val_auc %.4f test_acc %.4f val_acc %.4f",
                fold, time.time() - started, row["test_auc"], row["val_auc"], row["test_acc"],
                row["val_acc"],
            )  # fmt: skip
        else:
            log.info("fold %d: checkpoint and results exist, skipped", fold)
            row = _saved_row(run_dir, fold, bags, store, cfg_saved, n_classes, device)
        rows.append(row)
    return formats.write_summary(run_dir, rows, name=_summary_name(folds, cfg.k))


def _saved_row(run_dir, fold, bags, store, cfg: TrainConfig, n_classes, device) -> dict:
    """Metrics of a finished fold: its metrics JSON, else re-evaluated from the checkpoint
    (folds trained by CLAM's own main.py have no JSON)."""
    path = _metrics_path(run_dir, fold)
    if path.is_file():
        return json.loads(path.read_text())
    model = _build(cfg.model_type, n_classes, cfg.embed_dim, cfg.drop_out, size=cfg.model_size)
    load_weights(model, run_dir / f"s_{fold}_checkpoint.pt").to(device)
    test = run_bags(model, bags["test"], store, device, n_classes)
    val = run_bags(model, bags["val"], store, device, n_classes)
    return _fold_row(fold, test, val)


# ----------------------------------------------------------------------------- eval


def _run_config(models_dir: Path) -> dict:
    path = models_dir / TRAIN_CONFIG_NAME
    return json.loads(path.read_text()) if path.is_file() else {}


def _eval_sets(cfg: EvalConfig, df, fold: int) -> tuple[list[Bag], list[Bag] | None]:
    """(bags evaluated as 'test', validation bags or None)."""
    if cfg.split_dir is None:
        return [Bag(s, int(y)) for s, y in zip(df["slide_id"], df["label_index"])], None
    split = formats.read_splits(cfg.split_dir, fold)
    bags = _split_bags(df, split, str(formats.split_paths(cfg.split_dir, fold)[0]))
    if cfg.split == "all":
        wanted = {b.slide_id for v in bags.values() for b in v}
        chosen = [Bag(s, int(y)) for s, y in zip(df["slide_id"], df["label_index"]) if s in wanted]
        return chosen, None
    if cfg.split not in bags:
        raise ClamMcmkdError(f"unknown split '{cfg.split}' (train, val, test or all)")
    return bags[cfg.split], (bags["val"] if cfg.split == "test" and bags["val"] else None)


def evaluate(cfg: EvalConfig) -> Path:
    """Evaluate saved fold checkpoints; writes summary.csv, per-fold predictions and pkl."""
    models_dir = Path(cfg.models_dir)
    run = _run_config(models_dir)
    model_type = cfg.model_type or run.get("model_type", "clam_sb")
    drop_out = cfg.drop_out if cfg.drop_out is not None else run.get("drop_out", 0.25)
    size = cfg.model_size or run.get("model_size", "small")
    k = cfg.k or run.get("k", 10)
    device = resolve_device(cfg.device)
    df, label_dict = _labelled_dataset(cfg.csv_path, cfg.label_dict or run.get("label_dict"))
    class_names = canonical_labels(label_dict)
    n_classes = len(class_names)
    folds = _fold_range(k, cfg.k_start, cfg.k_end)
    missing = [f for f in folds if not (models_dir / f"s_{f}_checkpoint.pt").is_file()]
    if missing:
        raise ClamMcmkdError(
            f"{models_dir}: no checkpoint s_<k>_checkpoint.pt for fold(s) {missing}"
        )
    sets = {fold: _eval_sets(cfg, df, fold) for fold in folds}
    needed = [b.slide_id for s in sets.values() for part in s if part for b in part]
    store = BagStore(cfg.data_root_dir, needed)
    embed_dim = _resolve_embed_dim(
        cfg.embed_dim if cfg.embed_dim != "auto" else run.get("embed_dim", "auto"), store
    )
    eval_dir = Path(cfg.eval_dir)
    eval_dir.mkdir(parents=True, exist_ok=True)
    save_config(
        EvalConfig(**{**cfg.__dict__, "model_type": model_type, "label_dict": label_dict,
                      "drop_out": drop_out, "model_size": size, "k": k, "embed_dim": embed_dim}),
        eval_dir / EVAL_CONFIG_NAME,
    )  # fmt: skip
    rows = []
    for fold in progress(folds, desc="evaluating", unit="fold"):
        model = _build(model_type, n_classes, embed_dim, drop_out, size=size)
        try:
            load_weights(model, models_dir / f"s_{fold}_checkpoint.pt")
        except RuntimeError as err:
            raise ClamMcmkdError(
                f"{models_dir}/s_{fold}_checkpoint.pt does not fit a {model_type} with "
                f"{n_classes} classes and {embed_dim}-d input ({str(err).splitlines()[0]})"
            ) from err
        model.to(device)
        test_bags, val_bags = sets[fold]
        test = run_bags(model, test_bags, store, device, n_classes)
        val = run_bags(model, val_bags, store, device, n_classes) if val_bags else None
        row = _fold_row(fold, test, val)
        _write_fold_outputs(eval_dir, fold, row, test, class_names)
        log.info(
            "fold %d: auc %.4f acc %.4f on %d slides",
            fold,
            row["test_auc"],
            row["test_acc"],
            len(test_bags),
        )
        rows.append(row)
    return formats.write_summary(eval_dir, rows, name=_summary_name(folds, k))


def parse_label_dict(text: str | None) -> dict[str, int] | None:
    """``'{"normal":0,"tumor":1}'`` -> dict (CLI helper with a clear error)."""
    if not text:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise ClamMcmkdError(f"--label-dict is not valid JSON: {text!r} ({err})") from err
    if not isinstance(value, dict) or not all(isinstance(v, int) for v in value.values()):
        raise ClamMcmkdError(f"--label-dict must map label names to integers, got {text!r}")
    if sorted(set(value.values())) != list(range(len(set(value.values())))):
        raise ClamMcmkdError(f"--label-dict class indices must be 0..C-1, got {text!r}")
    return {str(k): int(v) for k, v in value.items()}
