"""The benchmark's settings: one dataclass per stage, loaded from a named or YAML config.

Named configs (``camelyon16``, ``tcga_nsclc``, ``demo``) ship as package data in
``clam_mcmkd/configs``; a user's ``FILE.yaml`` has the same shape and may set any subset of the
fields (the rest keep the defaults below, most of them taken from the stage configs). CLI
options override both. Each stage section also takes ``options:``, a mapping passed unchanged to
that stage's own config dataclass, so every setting of a stage is reachable without this module
naming it.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from ..features import ExtractConfig
from ..mcmkd.config import FinetuneConfig
from ..mil.config import TrainConfig
from ..splits import SplitConfig
from ..tiling import TileConfig
from ..utils import ClamMcmkdError, field_default

NAMED_CONFIGS = ("camelyon16", "tcga_nsclc", "demo")
BASELINE_ENCODER = field_default(ExtractConfig, "model")  # CLAM's resnet50_trunc
MCMKD_ENCODER = "mcmkd_resnet50"


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
    teacher: str = "vit_large_patch16_224"
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
    # the untuned extractor MCM-KD starts from; the fine-tuned one is extracted as MCMKD_ENCODER
    baseline: str = BASELINE_ENCODER
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
    seed: int = field_default(TrainConfig, "seed")
    options: dict[str, Any] = field(default_factory=dict)


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
    tiling: TilingSettings = field(default_factory=TilingSettings)
    finetune: FinetuneSettings = field(default_factory=FinetuneSettings)
    extraction: ExtractionSettings = field(default_factory=ExtractionSettings)
    splits: SplitSettings = field(default_factory=SplitSettings)
    mil: MilSettings = field(default_factory=MilSettings)

    @property
    def encoders(self) -> list[str]:
        """Encoders compared, baseline first: untuned, teacher, MCM-KD fine-tuned."""
        names = [self.extraction.baseline, self.finetune.teacher, MCMKD_ENCODER]
        return list(dict.fromkeys(names))


_SECTIONS = {
    "tiling": TilingSettings,
    "finetune": FinetuneSettings,
    "extraction": ExtractionSettings,
    "splits": SplitSettings,
    "mil": MilSettings,
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
            cls = _SECTIONS[key]
            value = value or {}
            if not isinstance(value, dict):
                raise BenchmarkConfigError(f"{source}: '{key}' must be a mapping")
            known = {f.name for f in dataclasses.fields(cls)}
            bad = sorted(set(value) - known)
            if bad:
                raise BenchmarkConfigError(
                    f"{source}: unknown key(s) {bad} in '{key}' (known: {sorted(known)})"
                )
            kwargs[key] = cls(
                **{k: _coerce(cls, k, v, f"{source}: {key}.{k}") for k, v in value.items()}
            )
        else:
            kwargs[key] = value
    return BenchmarkConfig(**kwargs)


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
    """Apply CLI overrides; ``None`` means "not given". Dotted keys reach into sections."""
    cfg = copy.deepcopy(cfg)
    for key, value in overrides.items():
        if value is None:
            continue
        target: Any = cfg
        *path, leaf = key.split(".")
        for part in path:
            target = getattr(target, part)
        if not hasattr(target, leaf):
            raise BenchmarkConfigError(f"unknown config key '{key}'")
        setattr(target, leaf, value)
    return cfg
