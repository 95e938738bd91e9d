"""MIL data: feature bags by slide, labels from the dataset CSV, splits as bags, bag order."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..clam import formats
from ..utils import ClamMcmkdError, progress

log = logging.getLogger(__name__)


class MilDataError(ClamMcmkdError):
    """Splits, labels or feature files that training cannot use; the message says which."""


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


def labelled_dataset(csv_path: str, label_dict: Mapping[str, int] | None):
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


def all_bags(df) -> list[Bag]:
    """Every slide of a labelled dataset CSV, in CSV order."""
    return [Bag(s, int(y)) for s, y in zip(df["slide_id"], df["label_index"])]


def split_bags(df, split: Mapping[str, Sequence[str]], source: str) -> dict[str, list[Bag]]:
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


def read_split_bags(df, split_dir: str, fold: int) -> dict[str, list[Bag]]:
    """The bags of ``splits_<fold>.csv`` (ours or CLAM's)."""
    source = str(formats.split_paths(split_dir, fold)[0])
    return split_bags(df, formats.read_splits(split_dir, fold), source)


def fold_range(k: int, k_start: int, k_end: int) -> list[int]:
    start = 0 if k_start == -1 else k_start
    end = k if k_end == -1 else k_end
    if not 0 <= start < end:
        raise ClamMcmkdError(f"empty fold range: k_start={k_start}, k_end={k_end}, k={k}")
    return list(range(start, end))


def resolve_embed_dim(requested: int | str, store: BagStore) -> int:
    if requested in (None, "auto", ""):
        return store.embed_dim
    requested = int(requested)
    if store.embed_dim and requested != store.embed_dim:
        raise MilDataError(
            f"--embed-dim {requested} but the features in {store.feat_dir} are {store.embed_dim}-d"
        )
    return requested


def loader_seed_draw() -> None:
    """The one draw a torch DataLoader takes from the global RNG per pass (its base seed).

    Taking it too keeps the global RNG stream, hence bag order and dropout masks, in step with
    CLAM's loaders, so a seeded CPU run retraces CLAM's.
    """
    torch.empty((), dtype=torch.int64).random_()


def bag_order(bags: Sequence[Bag], weighted: bool, n_classes: int) -> list[int]:
    """One epoch's bag order: CLAM's RandomSampler, or WeightedRandomSampler with weight
    N / count(class) per bag and replacement (make_weights_for_balanced_classes_split)."""
    loader_seed_draw()
    n = len(bags)
    if weighted:
        counts = np.bincount([b.label for b in bags], minlength=n_classes)
        weights = torch.tensor([n / counts[b.label] for b in bags], dtype=torch.double)
        return torch.multinomial(weights, n, replacement=True).tolist()
    seed = int(torch.empty((), dtype=torch.int64).random_().item())
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
