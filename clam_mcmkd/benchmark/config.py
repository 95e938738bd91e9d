"""The benchmark's settings: one dataclass per stage, loaded from a named or YAML config.

Named configs (``camelyon16``, ``tcga_nsclc``, ``demo``) ship as package data in
``clam_mcmkd/configs``; a user's ``FILE.yaml`` has the same shape and may set any subset of the
fields (the rest keep the defaults below, most of them taken from the stage configs). CLI
options override both. Each stage section also takes ``options:``, a mapping passed unchanged to
that stage's own config dataclass, so every setting of a stage is reachable without this module
naming it.

``arms:`` lists the encoders compared (one report row each), every one against ``baseline``:
``untuned`` (the student as fine-tuning starts from it), ``finetune`` (the student after
``finetune`` with this arm's objective / targets / teacher), ``teacher`` (the teacher as is)
and ``encoder`` (any registered encoder, e.g. another foundation model). Controls such as a
sham fine-tune or an untrained teacher are more ``finetune`` arms (docs/benchmarks.md).
"""

from __future__ import annotations

import copy
import dataclasses
import os
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from ..features import ExtractConfig
from ..mcmkd.config import OBJECTIVES, TARGETS, FinetuneConfig
from ..mil.config import FEATURE_NORMS, TrainConfig
from ..splits import SplitConfig
from ..tiling import TileConfig
from ..utils import ClamMcmkdError, field_default

NAMED_CONFIGS = ("camelyon16", "tcga_nsclc", "demo")
ARM_KINDS = ("untuned", "finetune", "teacher", "encoder")
# without `arms:` in a config: the comparison of issue 13
DEFAULT_ARMS = (
    {"name": "untuned", "kind": "untuned"},
    {"name": "mcmkd", "kind": "finetune", "objective": "mcmkd"},
    {"name": "patch_kd", "kind": "finetune", "objective": "patch_kd"},
    {"name": "teacher", "kind": "teacher"},
)


class BenchmarkConfigError(ClamMcmkdError):
    """A benchmark config that cannot be used; the message names the file and the key."""


@dataclass
class TilingSettings:
    patch_size: int = field_default(TileConfig, "patch_size")
    step_size: int = field_default(TileConfig, "step_size")
    mag: float = field_default(TileConfig, "mag")
    min_tissue: float = field_default(TileConfig, "min_tissue")
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class FinetuneSettings:
    student: str = field_default(FinetuneConfig, "student")
    student_ckpt: str | None = None  # start (and the untuned arm) from this encoder checkpoint
    teacher: str = "uni_v1"
    teacher_ckpt: str | None = None  # a local checkpoint of the teacher (else $..._CKPT_PATH/hub)
    grid: int = field_default(FinetuneConfig, "grid")
    mask_ratio: float = field_default(FinetuneConfig, "mask_ratio")
    epochs: int = field_default(FinetuneConfig, "epochs")
    batch_size: int = field_default(FinetuneConfig, "batch_size")
    input_size: int = field_default(FinetuneConfig, "input_size")
    max_windows: int | None = field_default(FinetuneConfig, "max_windows")
    lr: float | None = None  # predictor learning rate; None: finetune's default
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class ExtractionSettings:
    batch_size: int = field_default(ExtractConfig, "batch_size")
    target_patch_size: int = field_default(ExtractConfig, "target_patch_size")
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class SplitSettings:
    k: int = field_default(SplitConfig, "k")
    val_frac: float = field_default(SplitConfig, "val_frac")
    test_frac: float = field_default(SplitConfig, "test_frac")
    patient_strat: bool = True
    # a labels-CSV column whose value "test" marks a fixed test set shared by every fold
    # (CAMELYON16's official test slides); the folds are then drawn from the other slides
    fixed_test_column: str | None = None
    seed: int = field_default(SplitConfig, "seed")
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class MilSettings:
    models: list[str] = field(default_factory=lambda: ["abmil", "clam_sb"])
    max_epochs: int = field_default(TrainConfig, "max_epochs")
    lr: float = field_default(TrainConfig, "lr")
    reg: float = field_default(TrainConfig, "reg")
    drop_out: float = field_default(TrainConfig, "drop_out")
    early_stopping: bool = True
    weighted_sample: bool = True
    # each seed trains every fold again; a test slide's probability is averaged over both
    seeds: list[int] = field(default_factory=lambda: [field_default(TrainConfig, "seed")])
    # MIL inputs: zscore = per fold, per dimension, with the training slides' mean/std (the
    # benchmark's default: encoders are compared on content, not feature scale); none = CLAM's
    feature_norm: str = "zscore"
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class ArmSettings:
    """One encoder of the comparison (a row of the report). ``name`` names its directories."""

    name: str
    kind: str = "finetune"  # untuned | finetune | teacher | encoder
    objective: str = field_default(FinetuneConfig, "objective")  # finetune: mcmkd | patch_kd
    targets: str = field_default(FinetuneConfig, "targets")  # finetune: teacher | sham
    teacher: str | None = None  # finetune / teacher: default finetune.teacher
    teacher_ckpt: str | None = None  # ... and finetune.teacher_ckpt
    encoder: str | None = None  # encoder: a registered encoder name (or timm name)
    ckpt: str | None = None  # encoder: its checkpoint (e.g. with encoder `checkpoint`)
    options: dict[str, Any] = field(default_factory=dict)  # finetune: this arm's FinetuneConfig


@dataclass
class ReportSettings:
    n_resamples: int = 2000  # paired, label-stratified bootstrap of ΔAUC (pROC's default)
    confidence: float = 0.95
    seed: int = 0  # the bootstrap's seed: a rerun writes the same report


@dataclass
class BenchmarkConfig:
    name: str = "custom"
    description: str = ""
    slides: str | None = None  # slide directory
    labels: str | None = None  # dataset CSV: case_id, slide_id, label (+ the split column)
    out: str | None = None
    label_dict: dict[str, int] | None = None
    slide_ext: str | None = None
    pretrained: bool = True
    device: str = "auto"
    clam_dir: str | None = None  # a CLAM checkout patched by `clam-mcmkd patch-clam`
    num_workers: int = 0
    # relative checkpoint paths (finetune.student_ckpt / teacher_ckpt, arms' ckpt and
    # teacher_ckpt) are resolved against this directory; None: the current directory
    ckpt_dir: str | None = None
    note: str = ""  # printed at the top of report.md (the demo says what it cannot show)
    baseline: str = "untuned"  # the arm every other arm is compared against
    comparisons: list[list[str]] | None = None  # more [a, b] pairs; None: [mcmkd, patch_kd]
    arms: list[ArmSettings] = field(
        default_factory=lambda: [ArmSettings(**a) for a in DEFAULT_ARMS]
    )
    tiling: TilingSettings = field(default_factory=TilingSettings)
    finetune: FinetuneSettings = field(default_factory=FinetuneSettings)
    extraction: ExtractionSettings = field(default_factory=ExtractionSettings)
    splits: SplitSettings = field(default_factory=SplitSettings)
    mil: MilSettings = field(default_factory=MilSettings)
    report: ReportSettings = field(default_factory=ReportSettings)

    @property
    def arm_names(self) -> list[str]:
        """The arms' names, in report order."""
        return [a.name for a in self.arms]

    def arm(self, name: str) -> ArmSettings:
        return next(a for a in self.arms if a.name == name)

    @property
    def pairs(self) -> list[tuple[str, str]]:
        """Every arm vs the baseline, then the extra comparisons (a - b)."""
        pairs = [(a, self.baseline) for a in self.arm_names if a != self.baseline]
        extra = self.comparisons
        if extra is None:
            extra = [["mcmkd", "patch_kd"]] if {"mcmkd", "patch_kd"} <= set(self.arm_names) else []
        return pairs + [(a, b) for a, b in extra if (a, b) not in pairs]

    def resolve_path(self, path: str | None) -> str | None:
        if path is None or Path(path).is_absolute() or not self.ckpt_dir:
            return path
        return str(Path(self.ckpt_dir) / path)


_SECTIONS = {
    "tiling": TilingSettings,
    "finetune": FinetuneSettings,
    "extraction": ExtractionSettings,
    "splits": SplitSettings,
    "mil": MilSettings,
    "report": ReportSettings,
}


def config_from_dict(data: dict[str, Any], source: str = "<dict>") -> BenchmarkConfig:
    """Build a config from a (YAML) mapping; unknown keys are an error naming the source."""
    if not isinstance(data, dict):
        raise BenchmarkConfigError(f"{source}: expected a mapping at the top level")
    top = {f.name for f in dataclasses.fields(BenchmarkConfig)}
    unknown = sorted(set(data) - top)
    if unknown:
        raise BenchmarkConfigError(f"{source}: unknown key(s) {unknown} (known: {sorted(top)})")
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key in _SECTIONS:
            kwargs[key] = _section(_SECTIONS[key], value, source, f"'{key}'")
        elif key == "arms":
            if not isinstance(value, list) or not value:
                raise BenchmarkConfigError(f"{source}: 'arms' must be a non-empty list")
            kwargs[key] = [
                _section(ArmSettings, a, source, f"arm {i}") for i, a in enumerate(value)
            ]
        else:
            kwargs[key] = value
    cfg = BenchmarkConfig(**kwargs)
    check_config(cfg, source)
    return cfg


def _section(cls, value: Any, source: str, where: str):
    """One section (or arm) mapping -> its dataclass; unknown keys name `source` and `where`."""
    if isinstance(value, cls):
        return value
    value = value or {}
    if not isinstance(value, dict):
        raise BenchmarkConfigError(f"{source}: {where} must be a mapping")
    known = {f.name for f in dataclasses.fields(cls)}
    bad = sorted(set(value) - known)
    if bad:
        raise BenchmarkConfigError(
            f"{source}: unknown key(s) {bad} in {where} (known: {sorted(known)})"
        )
    if cls is ArmSettings and "name" not in value:
        raise BenchmarkConfigError(f"{source}: {where} has no 'name'")
    return cls(**{k: _coerce(cls, k, v, f"{source}: {where}.{k}") for k, v in value.items()})


def check_config(cfg: BenchmarkConfig, source: str = "config") -> None:
    """The arms, the baseline and the comparisons fit together; one line naming the key."""
    names = cfg.arm_names
    for arm in cfg.arms:
        where = f"{source}: arm '{arm.name}'"
        if not arm.name or re.sub(r"[A-Za-z0-9._-]", "", arm.name):
            raise BenchmarkConfigError(f"{where}: a name is letters, digits, '.', '_', '-'")
        if arm.kind not in ARM_KINDS:
            raise BenchmarkConfigError(f"{where}: kind must be one of {ARM_KINDS}")
        if arm.kind == "finetune" and arm.objective not in OBJECTIVES:
            raise BenchmarkConfigError(f"{where}: objective must be one of {OBJECTIVES}")
        if arm.kind == "finetune" and arm.targets not in TARGETS:
            raise BenchmarkConfigError(f"{where}: targets must be one of {TARGETS}")
        if arm.kind == "encoder" and not arm.encoder:
            raise BenchmarkConfigError(f"{where}: kind 'encoder' needs 'encoder' (a name)")
    if len(set(names)) != len(names):
        raise BenchmarkConfigError(f"{source}: arm names must be unique, got {names}")
    if cfg.baseline not in names:
        raise BenchmarkConfigError(f"{source}: baseline '{cfg.baseline}' is not an arm {names}")
    for pair in cfg.comparisons or []:
        if len(pair) != 2 or not set(pair) <= set(names) or pair[0] == pair[1]:
            raise BenchmarkConfigError(
                f"{source}: comparisons takes pairs of two different arms of {names}, got {pair}"
            )
    if cfg.mil.feature_norm not in FEATURE_NORMS:
        raise BenchmarkConfigError(f"{source}: mil.feature_norm must be one of {FEATURE_NORMS}")
    if not cfg.mil.seeds or len(set(cfg.mil.seeds)) != len(cfg.mil.seeds):
        raise BenchmarkConfigError(
            f"{source}: mil.seeds must be distinct seeds, got {cfg.mil.seeds}"
        )


def _coerce(cls, name: str, value: Any, where: str) -> Any:
    """YAML 1.1 reads ``1e-5`` as a string: turn such values into the float the field holds."""
    annotation = str(next(f.type for f in dataclasses.fields(cls) if f.name == name))
    if annotation.startswith("float") and isinstance(value, (str, int)):
        if isinstance(value, bool):
            raise BenchmarkConfigError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)
        except ValueError as err:
            raise BenchmarkConfigError(f"{where}: expected a number, got {value!r}") from err
    return value


def load_config(name_or_path: str | os.PathLike) -> BenchmarkConfig:
    """A named config (camelyon16, tcga_nsclc, demo) or a YAML file of the same shape."""
    import yaml

    text_name = str(name_or_path)
    if text_name in NAMED_CONFIGS:
        text = resources.files("clam_mcmkd").joinpath("configs", f"{text_name}.yaml").read_text()
        source = f"config '{text_name}'"
    else:
        path = Path(name_or_path)
        if not path.is_file():
            raise BenchmarkConfigError(
                f"{path}: config file does not exist (named configs: {', '.join(NAMED_CONFIGS)})"
            )
        text, source = path.read_text(), str(path)
    try:  # JSON (e.g. a run's benchmark_config.json) is YAML too
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise BenchmarkConfigError(f"{source}: not valid YAML ({err})") from err
    return config_from_dict(data, source)


def with_overrides(cfg: BenchmarkConfig, **overrides: Any) -> BenchmarkConfig:
    """Apply CLI overrides; ``None`` means "not given". Dotted keys reach into sections.
    ``arms`` takes arm mappings (or ArmSettings); ``only_arms`` keeps the arms named."""
    cfg = copy.deepcopy(cfg)
    only = overrides.pop("only_arms", None)
    for key, value in overrides.items():
        if value is None:
            continue
        if key == "arms":
            value = [_section(ArmSettings, a, "arms", f"arm {i}") for i, a in enumerate(value)]
        target: Any = cfg
        *path, leaf = key.split(".")
        for part in path:
            target = getattr(target, part)
        if not hasattr(target, leaf):
            raise BenchmarkConfigError(f"unknown config key '{key}'")
        setattr(target, leaf, value)
    if only is not None:
        missing = sorted(set(only) - set(cfg.arm_names))
        if missing:
            raise BenchmarkConfigError(f"unknown arm(s) {missing} (arms: {cfg.arm_names})")
        cfg.arms = [a for a in cfg.arms if a.name in set(only)]
    if cfg.comparisons is not None and (only is not None or overrides.get("arms")):
        cfg.comparisons = [p for p in cfg.comparisons if set(p) <= set(cfg.arm_names)]
    check_config(cfg, "config")
    return cfg
