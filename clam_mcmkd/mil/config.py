"""The settings of ``clam-mcmkd train`` and ``eval`` (saved with their outputs). torch-free."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..utils import ClamMcmkdError

FEATURE_NORMS = ("none", "zscore")  # see mil/feature_norm.py


@dataclass
class TrainConfig:
    data_root_dir: str  # CLAM's feature dir: <data_root_dir>/pt_files/<slide_id>.pt (or h5_files)
    csv_path: str
    split_dir: str
    results_dir: str
    exp_code: str
    model_type: str = "clam_sb"  # a registered MIL model (mil.models): abmil | clam_sb | clam_mb
    # | transmil | mhim_abmil
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
    feature_norm: str = "none"  # none (CLAM's raw features) | zscore (per fold, training slides)
    # MHIM-MIL (model_type mhim_abmil; mil/mhim.py). Defaults: the v1 code's CAMELYON16 ABMIL
    # recipe (its README: --cl_alpha 0.1 --mask_ratio 0.5 --mask_ratio_h 0.01
    # --mask_ratio_hr 0.5 --mrh_sche --init_stu_type fc; main.py: --mm 0.9999 --temp_t 0.1).
    mhim_teacher_init: str | None = None  # a finished baseline run dir (s_<k>_checkpoint.pt per
    # fold); None: the baseline is trained first, as <exp_code>_baseline, in the same command
    mhim_mask_ratio: float = 0.5  # random masking: share of all instances
    mhim_mask_ratio_l: float = 0.0  # share of the lowest-attention instances masked
    mhim_mask_ratio_h: float = 0.01  # share of the highest-attention instances masked ...
    mhim_mask_ratio_hr: float = 0.5  # ... picked at random from the top ratio_h / ratio_hr
    mhim_mrh_schedule: bool = True  # ratio_h decays to 0 on a cosine over all training steps
    mhim_cl_alpha: float = 0.1  # weight of the teacher-student consistency term
    mhim_temp_t: float = 0.1  # teacher temperature of the consistency term
    mhim_temp_s: float = 1.0  # student temperature
    mhim_momentum: float = 0.9999  # EMA: teacher <- m teacher + (1 - m) student, every step
    mhim_student_init: str = "fc"  # none | fc (the baseline's first layer) | all

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
