"""The settings of an MCM-KD fine-tuning run (saved with its outputs), checked before any work.

torch-free at import: the CLI takes its option defaults from :class:`FinetuneConfig`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

from ..ranges import RANGES, first_refusal
from ..utils import ClamMcmkdError

OBJECTIVES = ("mcmkd", "patch_kd")  # what is learnt: see objectives.py
TARGETS = ("teacher", "sham")


class FinetuneError(ClamMcmkdError):
    pass


@dataclass
class FinetuneConfig:
    data_h5_dir: str
    data_slide_dir: str
    csv_path: str
    teacher: str
    out: str = "mcmkd_resnet50.pt"
    slide_ext: str | None = None  # None: each slide's extension, found in data_slide_dir
    teacher_ckpt: str | None = None
    teacher_input_size: int | None = None  # None: the teacher's own (timm) input size
    student: str = "resnet50_trunc"
    student_ckpt: str | None = None  # start the student from this encoder checkpoint
    input_size: int = 224  # student input size (what extraction will use)
    pretrained: bool = True
    # what is learnt (objectives.py): mcmkd | patch_kd (no mask, no context); teacher | sham
    objective: str = "mcmkd"
    targets: str = "teacher"
    # context windows and masking
    grid: int = 4
    window_overlap: bool = False
    mask_ratio: float = 0.5
    mask_strategy: str = "random"
    # predictor
    predictor_width: int = 256
    predictor_depth: int = 2
    predictor_heads: int = 4
    # loss
    loss: str = "cosine"
    visible_weight: float = 0.0
    # optimisation
    epochs: int = 1
    batch_size: int = 32  # windows per optimizer step, over all ranks and accumulation steps
    grad_accum: int = 1
    lr: float = 5e-4  # predictor; the student gets lr * student_lr_mult
    student_lr_mult: float = 0.1
    weight_decay: float = 0.05
    warmup_frac: float = 0.05
    min_lr_ratio: float = 0.01
    grad_clip: float = 1.0  # 0 disables
    freeze_bn: bool = True
    # data
    teacher_cache: str | None = None  # default: <out stem>_teacher_cache/ next to --out
    max_windows: int | None = None
    val_frac: float = 0.05
    max_val_windows: int = 256
    # did the student itself move? ridge probes of its features on the validation windows
    # (probes.py): R² of the teacher's feature of the patch and of its neighbours' mean
    student_probes: bool = True
    probe_alpha: float = 1.0  # ridge penalty x patches of the fold (standardised features)
    val_at_steps: tuple[int, ...] = ()  # also validate (+ probes) after these steps: a curve
    num_workers: int | None = None  # None: the cores this process may use, less one
    teacher_batch_size: int = 64
    # run control
    resume: bool = False
    teacher_cache_only: bool = False  # fill the teacher cache, train nothing
    shard: str | None = None  # with teacher_cache_only: "I/N", this array job's part
    save_every: int = 50  # optimizer steps between resumable states
    stop_after_steps: int | None = None  # stop cleanly (resumable) after this many steps
    device: str = "auto"
    precision: str = "auto"  # auto: bf16 where the GPU has it, else fp32; fp16 refused
    dist_timeout: str = "2h"  # torchrun: how long a rank waits for the others in a collective
    seed: int = 0
    progress: bool = True


# Fields that must not change between a run and its --resume.
RESUME_KEYS = (
    "teacher", "teacher_ckpt", "teacher_input_size", "student", "student_ckpt", "input_size",
    "pretrained", "objective", "targets",
    "grid", "window_overlap", "mask_ratio", "mask_strategy", "predictor_width",
    "predictor_depth", "predictor_heads", "loss", "visible_weight", "epochs", "batch_size",
    "lr", "student_lr_mult", "weight_decay", "warmup_frac", "min_lr_ratio", "grad_clip",
    "freeze_bn", "max_windows", "val_frac", "max_val_windows", "seed",
)  # fmt: skip


def output_paths(out: str | Path) -> dict[str, Path]:
    """The files a run writes next to its checkpoint."""
    out = Path(out)
    stem = out.with_suffix("")
    return {
        "checkpoint": out,
        "state": Path(f"{stem}.state.pt"),
        "metrics": Path(f"{stem}.metrics.csv"),
        "plot": Path(f"{stem}.loss.png"),
        "config": Path(f"{stem}.config.json"),
        "summary": Path(f"{stem}.summary.json"),
        "final_metrics": Path(f"{stem}.final_metrics.json"),
        "teacher_cache": Path(f"{stem}_teacher_cache"),
    }


def teacher_cache_dir(cfg: FinetuneConfig) -> Path:
    return Path(cfg.teacher_cache) if cfg.teacher_cache else output_paths(cfg.out)["teacher_cache"]


# the settings validate_config checks against the table of ranges the CLI's options use
RANGED_FIELDS = tuple(f.name for f in fields(FinetuneConfig) if f.name in RANGES)


def validate_config(cfg: FinetuneConfig) -> None:
    """Every option checked before any slide is read or model built."""
    from ..distributed import parse_shard, parse_timeout
    from ..encoders import STUDENT_ARCHS, EncoderError
    from ..encoders.forward import autocast_dtype
    from ..utils import check_output_path
    from .losses import LOSSES
    from .masking import MASK_STRATEGIES

    check_output_path(cfg.out, folder=False)
    check_output_path(teacher_cache_dir(cfg))
    if cfg.student not in STUDENT_ARCHS:
        raise EncoderError(
            f"unknown student '{cfg.student}': MCM-KD fine-tunes {sorted(STUDENT_ARCHS)}"
        )
    _check_teacher_name(cfg.teacher)
    if cfg.objective not in OBJECTIVES:
        raise FinetuneError(f"--objective must be one of {OBJECTIVES}, got {cfg.objective!r}")
    if cfg.targets not in TARGETS:
        raise FinetuneError(f"--targets must be one of {TARGETS}, got {cfg.targets!r}")
    if cfg.student_ckpt is not None:
        _check_student_ckpt(cfg)
    refusal = first_refusal(cfg, RANGED_FIELDS)  # the CLI's ranges, for Python callers too
    if refusal:
        raise FinetuneError(refusal)
    if cfg.mask_strategy not in MASK_STRATEGIES:
        raise FinetuneError(f"--mask-strategy must be one of {MASK_STRATEGIES}")
    if cfg.loss not in LOSSES:
        raise FinetuneError(f"--loss must be one of {tuple(LOSSES)}")
    if cfg.teacher_ckpt is not None and not Path(cfg.teacher_ckpt).is_file():
        raise EncoderError(f"{cfg.teacher_ckpt}: teacher checkpoint does not exist")
    autocast_dtype("cpu", cfg.precision, training=True)  # fp16 cannot train (no loss scaling)
    parse_timeout(cfg.dist_timeout)
    if cfg.shard:
        parse_shard(cfg.shard)
        if not cfg.teacher_cache_only:
            raise FinetuneError(
                "--shard needs --teacher-cache-only: training is not split into array jobs "
                "(use torchrun); array jobs fill the teacher cache"
            )


def _check_student_ckpt(cfg: FinetuneConfig) -> None:
    """The starting checkpoint must be the configured student at the configured input size
    (what the fine-tuned checkpoint will say it is)."""
    from ..encoders import read_student_checkpoint

    payload = read_student_checkpoint(cfg.student_ckpt)
    if payload["arch"] != cfg.student or int(payload["input_size"]) != cfg.input_size:
        raise FinetuneError(
            f"{cfg.student_ckpt}: a {payload['arch']} at {payload['input_size']} px, but the "
            f"run's student is {cfg.student} at {cfg.input_size} px (--student, --input-size)"
        )


def _check_teacher_name(name: str) -> None:
    """Fail before any slide is read, without building the (large) teacher."""
    import timm

    from ..encoders import EncoderError, list_encoders
    from ..encoders.registry import canonical_name

    known = list_encoders()  # (registers the built-ins, and with them their aliases)
    if canonical_name(name) in known or name.startswith("hf-hub:") or timm.is_model(name):
        return
    raise EncoderError(
        f"unknown teacher '{name}': not a registered encoder ({', '.join(list_encoders())}) "
        "and not a timm model name"
    )
