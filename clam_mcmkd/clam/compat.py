"""What CLAM's scripts call once ``clam-mcmkd patch-clam`` has patched them.

The patches in ``patches/`` stay a few lines each; the logic they need lives here, so that a
fix reaches CLAM users through ``pip install -U clam-mcmkd`` without re-patching CLAM.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..utils import ClamMcmkdError

CSV_ENV = "CLAM_MCMKD_CSV"
FEAT_DIR_ENV = "CLAM_MCMKD_FEAT_DIR"

# CLAM task name -> label dict (label string in the dataset CSV -> class index).
CLAM_TASKS: dict[str, dict[str, int]] = {
    "camelyon16": {"normal": 0, "tumor": 1},
    "tcga_nsclc": {"LUAD": 0, "LUSC": 1},
}


class ClamTaskError(ClamMcmkdError):
    pass


def get_clam_encoder(model_name: str = "mcmkd_resnet50", target_img_size: int = 224):
    """CLAM's ``get_encoder`` contract: ``(model in eval mode, torchvision transforms)``.

    ``mcmkd_resnet50`` reads its checkpoint from ``MCMKD_CKPT_PATH``; the checkpoint's own input
    size and normalisation win over ``target_img_size``, so CLAM extracts exactly as
    ``clam-mcmkd extract-features`` does.
    """
    from ..encoders import create_encoder

    encoder = create_encoder(model_name, pretrained=True, target_img_size=target_img_size)
    return encoder.model, encoder.transforms.to_torchvision()


def encoder_names() -> list[str]:
    """The names CLAM's patched ``get_encoder`` hands to :func:`get_clam_encoder`: every
    encoder clam-mcmkd builds (read from the static catalog: no torch import at argparse time)."""
    from ..encoders import catalog
    from ..encoders.zoo import SPECS

    return [n for n in catalog.descriptions() if n not in SPECS or SPECS[n].buildable]


@dataclass(frozen=True)
class ClamTask:
    """The dataset arguments one of our tasks gives CLAM's ``Generic_*_Dataset``."""

    name: str
    csv_path: str
    data_dir: str | None
    label_dict: dict[str, int]

    @property
    def n_classes(self) -> int:
        return len(set(self.label_dict.values()))


def clam_task(
    name: str,
    csv_path: str | os.PathLike | None = None,
    data_root_dir: str | os.PathLike | None = None,
    need_features: bool = True,
) -> ClamTask:
    """Resolve a task's CSV and feature directory (arguments first, then environment) and check them.

    ``data_root_dir`` is the directory holding ``pt_files/`` (what ``--feat-dir`` of
    ``clam-mcmkd extract-features`` or CLAM's ``extract_features_fp.py`` wrote).
    """
    from .formats import read_dataset_csv

    if name not in CLAM_TASKS:
        raise ClamTaskError(f"unknown task '{name}' (choices: {', '.join(CLAM_TASKS)})")
    label_dict = dict(CLAM_TASKS[name])
    csv_path = csv_path or os.environ.get(CSV_ENV)
    if not csv_path:
        raise ClamTaskError(f"task {name} needs its dataset CSV: pass --csv_path or set {CSV_ENV}")
    read_dataset_csv(csv_path, label_dict=label_dict)  # names the file and any unknown label
    data_dir = None
    if need_features:
        data_dir = data_root_dir or os.environ.get(FEAT_DIR_ENV)
        if not data_dir:
            raise ClamTaskError(
                f"task {name} needs its features: pass --data_root_dir (the directory with"
                f" pt_files/) or set {FEAT_DIR_ENV}"
            )
        if not (Path(data_dir) / "pt_files").is_dir():
            raise ClamTaskError(f"{data_dir}: no pt_files/ directory (extract features first)")
        data_dir = str(data_dir)
    return ClamTask(name, str(csv_path), data_dir, label_dict)
