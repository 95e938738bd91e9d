"""``clam-mcmkd demo``: the whole benchmark on a synthetic cohort, offline, on CPU, in minutes.

Small untrained models (``--no-pretrained``), a few fine-tuning windows and MIL epochs: the
numbers show that every stage runs and the comparison is made, not what MCM-KD does on real
slides. ``--smallest`` is the size CI runs end to end.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from ..cohort import CohortConfig
from ..utils import field_default, resolve_device
from .config import BenchmarkConfig, load_config, with_overrides


@dataclass
class DemoConfig:
    out: str = "clam_mcmkd_demo"
    n_slides: int = field_default(CohortConfig, "n_slides")
    size: int = field_default(CohortConfig, "size")  # level-0 side of each slide, pixels
    seed: int = field_default(CohortConfig, "seed")
    k: int | None = None  # folds (default: the demo config's)
    max_epochs: int | None = None  # MIL epochs (default: the demo config's)
    max_windows: int | None = None  # MCM-KD windows (default: the demo config's)
    device: str = "cpu"
    smallest: bool = False


# what --smallest changes: as little as still trains every model on every encoder on 2 folds
SMALLEST = {"n_slides": 12, "size": 2048, "k": 2, "max_epochs": 3, "max_windows": 8}


def resolve(cfg: DemoConfig) -> DemoConfig:
    """Apply --smallest (explicit options still win over it)."""
    if not cfg.smallest:
        return cfg
    defaults = DemoConfig()
    changes = {
        key: value
        for key, value in SMALLEST.items()
        if getattr(cfg, key) == getattr(defaults, key)  # not set by the user
    }
    return dataclasses.replace(cfg, **changes)


def benchmark_config(cfg: DemoConfig) -> BenchmarkConfig:
    out = Path(cfg.out)
    bench = with_overrides(
        load_config("demo"),
        slides=str(out / "cohort" / "slides"),
        labels=str(out / "cohort" / "dataset.csv"),
        out=str(out / "benchmark"),
        device=cfg.device,
        pretrained=False,
        **{
            "splits.k": cfg.k,
            "mil.max_epochs": cfg.max_epochs,
            "finetune.max_windows": cfg.max_windows,
        },
    )
    return bench


def run_demo(cfg: DemoConfig) -> Path:
    """Make (or reuse) the cohort, run the benchmark; returns report.md. Resumes like benchmark."""
    from ..cohort import make_cohort
    from .run import run_benchmark

    cfg = resolve(cfg)
    resolve_device(cfg.device)  # before the cohort is made
    out = Path(cfg.out)
    make_cohort(out / "cohort", n_slides=cfg.n_slides, size=cfg.size, seed=cfg.seed)
    return run_benchmark(benchmark_config(cfg))
