"""``clam-mcmkd demo``: the whole benchmark on a synthetic cohort, offline, on CPU, in minutes.

No weights can be downloaded offline, and random-init encoders are no baseline (every patch
gets nearly the same feature), so the demo first trains its own two encoders on this machine
(:mod:`.proxy_pretrain`), into ``OUT/encoders``:

- ``proxy_baseline.pt``: a ResNet-18 (truncated) pretrained on procedural non-histology images
  (shapes x background patterns): ImageNet's role, the untuned arm and the students' start;
- ``proxy_teacher.pt``: that network trained further on the tissue classes AND the
  pixel-measured nuclear morphometry (:func:`.proxy_pretrain.patch_morphometry`) of a separate
  synthetic cohort whose slides carry unlabelled atypia (never a slide label, never the atypia
  map): a pathology foundation model's role. A ResNet-18, not a larger network, because a
  ResNet-50 costs ~3x as much per patch on 2 cores.

Before the cohort, both encoders are measured on a third, held-out cohort
(:mod:`.instruments`: linear probes of tissue class and of atypia, generator truth) and the
numbers go into ``encoders.json`` and the report's note: a demo of distillation needs a teacher
that carries more than its student's start, shown on slides neither encoder nor the demo's MIL
ever saw (the teacher recipe was chosen on that instrument, never on the demo's MIL outcome).

Then a ``kind="fields"`` cohort (tissue classes as smooth fields, a regional label whose
difficulty is ``contrast``), a fixed test set of ``test_per_class`` slides per class, and the
``demo`` config's arms: untuned, mcmkd, patch_kd, teacher. The report says plainly what this
can and cannot show. ``--smallest`` is the size CI runs end to end.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..utils import atomic_write_text, check_output_path, resolve_device
from .config import BenchmarkConfig, load_config, with_overrides
from .proxy_pretrain import FitConfig

ENCODER_FILES = {"baseline": "proxy_baseline.pt", "teacher": "proxy_teacher.pt"}
PATCH = 64  # level-0 px at 20x = the encoders' input size (no resize: CPU budget)
TEACHER_COHORT_SEED = 9000  # never a demo cohort seed
# the held-out instrument's cohort: no encoder trains on it, no demo MIL sees it, and it is not
# the cohort (9200) on which the teacher's recipe was chosen (benchmarks/RESULTS.md)
INSTRUMENT_COHORT_SEED = 9300


@dataclass
class DemoConfig:
    out: str = "clam_mcmkd_demo"
    n_slides: int = 64
    size: int = 1024  # level-0 side of each slide, pixels
    seed: int = 0  # cohort seed (generator seed 1000 + seed)
    contrast: float = 0.25  # atypical region visibility (0-1): the experiment's calibration
    test_per_class: int = 12  # fixed test slides per class (the slides the statistics use)
    k: int | None = None  # folds (default: the demo config's)
    max_epochs: int | None = None  # MIL epochs (default: the demo config's)
    max_windows: int | None = None  # fine-tuning windows (default: the demo config's)
    mil_seeds: int | None = None  # MIL seeds 1..n (default: the demo config's)
    baseline_steps: int = 400  # proxy pretraining steps (batch 32): what the experiment used;
    # at 150 the baseline stayed at chance on its own task (benchmarks/RESULTS.md, "Demo, issue 13")
    teacher_steps: int = 600  # tissue class + morphometry training steps (batch 32)
    teacher_slides: int = 24  # slides of the teacher's own cohort
    # unlabelled atypia variation in the teacher's cohort, and morphometry targets: with them
    # the teacher carries more than the baseline on the held-out instrument (RESULTS.md)
    teacher_contrast: float = 0.5
    teacher_morphometry: bool = True
    instrument_slides: int = 24  # held-out cohort of the encoders' instrument
    device: str = "cpu"
    # CPU threads for torch: its default (one per core) made every stage 2-7x slower on a
    # 2-core machine shared with other jobs (benchmarks/RESULTS.md, "Demo, issue 13")
    threads: int = 1
    smallest: bool = False


# what --smallest changes: as little as still runs every stage of every arm
SMALLEST = {"n_slides": 12, "test_per_class": 2, "k": 2, "max_epochs": 3, "max_windows": 8,
            "mil_seeds": 1, "baseline_steps": 3, "teacher_steps": 3, "teacher_slides": 2,
            "instrument_slides": 4}  # fmt: skip


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


def demo_note(cfg: DemoConfig, encoders: dict | None = None) -> str:
    """What the demo is and what it cannot show (printed, and at the top of report.md);
    `encoders`: ``encoders.json``'s record, whose training figures are quoted."""
    return (
        "Demo, not evidence. No weights were downloaded: the baseline is a ResNet-18 "
        f"(truncated) pretrained here for {cfg.baseline_steps} steps on synthetic shapes and "
        "patterns (a stand-in for ImageNet), the teacher is that network trained "
        f"{cfg.teacher_steps} more steps on the tissue classes"
        + (" and nuclear morphometry" if cfg.teacher_morphometry else "")
        + " of a separate synthetic cohort "
        "(a stand-in for a pathology foundation model such as UNI), and the slides are "
        f"synthetic (fields cohort, contrast {cfg.contrast:g}). With {2 * cfg.test_per_class} "
        "test slides the confidence intervals are wide: the demo shows the pipeline, the arms "
        "and the statistics; it cannot show whether MCM-KD helps, on these slides or on real "
        "ones. What this project measured: benchmarks/RESULTS.md. Real cohorts: "
        "`clam-mcmkd benchmark --config camelyon16|tcga_nsclc` (docs/benchmarks.md)."
        + _encoder_figures(encoders or {})
    )


def _encoder_figures(record: dict) -> str:
    """How far the offline encoders got on their own tasks (so a weak one is seen as weak)."""
    base, teacher = record.get("baseline", {}), record.get("teacher", {})
    parts = []
    probe = record.get("instrument", {})
    if {"baseline", "teacher"} <= set(probe):
        b, t = probe["baseline"], probe["teacher"]
        parts.append(
            f"on {probe['n_slides']} held-out slides, linear probes of patch atypia (AUC) "
            f"{t['probe_atypia_auc']:.3f} teacher vs {b['probe_atypia_auc']:.3f} baseline and of "
            f"tissue class (balanced accuracy) {t['probe_class_bal_acc']:.3f} vs "
            f"{b['probe_class_bal_acc']:.3f}"
            + _teacher_verdict(t["probe_atypia_auc"], b["probe_atypia_auc"])
        )
    if "heldout_linear_acc" in base:
        parts.append(f"baseline held-out linear accuracy {base['heldout_linear_acc']:.2f} on its "
                     "12-class proxy task (chance 0.08)")  # fmt: skip
    if "train_acc" in teacher:
        parts.append(f"teacher training accuracy {teacher['train_acc']:.2f} on "
                     f"{len(teacher.get('classes', []))} tissue classes")  # fmt: skip
    return f" Offline encoders as trained: {'; '.join(parts)}." if parts else ""


def _teacher_verdict(teacher_auc: float, baseline_auc: float) -> str:
    if np.isnan(teacher_auc) or np.isnan(baseline_auc):
        return " (too few held-out slides to compare them)"
    if teacher_auc <= baseline_auc:
        return " - this teacher carries no more atypia than the baseline: nothing to distil"
    return ""


def benchmark_config(cfg: DemoConfig, encoders: dict | None = None) -> BenchmarkConfig:
    out = Path(cfg.out)
    seeds = list(range(1, cfg.mil_seeds + 1)) if cfg.mil_seeds else None
    return with_overrides(
        load_config("demo"),
        slides=str(out / "cohort" / "slides"),
        labels=str(out / "cohort" / "labels.csv"),
        out=str(out / "benchmark"),
        ckpt_dir=str(out / "encoders"),
        device=cfg.device,
        pretrained=False,
        note=demo_note(cfg, encoders),
        **{
            "splits.k": cfg.k,
            "mil.max_epochs": cfg.max_epochs,
            "mil.seeds": seeds,
            "finetune.max_windows": cfg.max_windows,
        },
    )


def _tiled_fields_cohort(root: Path, n: int, size: int, seed: int, contrast: float) -> Path:
    """A fields cohort and its 64 px tiles; both resume (finished slides are kept)."""
    from ..cohort import make_cohort
    from ..tiling import TileConfig, tile_slides

    csv = make_cohort(root / "cohort", n_slides=n, size=size, seed=seed, kind="fields",
                      tumor_contrast=contrast, tumor_frac=0.15, two_slide_case_frac=0.0)  # fmt: skip
    tile_slides(TileConfig(source=str(root / "cohort" / "slides"), save_dir=str(root / "tiles"),
                           patch_size=PATCH, step_size=PATCH))  # fmt: skip
    return csv


def demo_encoders(enc_dir: Path, cfg: DemoConfig) -> dict:
    """The offline baseline and teacher (skipped where their file exists; written atomically)
    and their held-out instrument. Returns what ``encoders.json`` records: each encoder's
    training metrics and seconds, and ``instrument`` (:func:`encoder_instrument`)."""
    from .proxy_pretrain import (
        patch_morphometry,
        pretrain_baseline,
        tissue_class_patches,
        train_teacher,
    )  # fmt: skip

    enc_dir.mkdir(parents=True, exist_ok=True)
    record_path = enc_dir / "encoders.json"
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    baseline, teacher = (enc_dir / ENCODER_FILES[k] for k in ("baseline", "teacher"))
    if not baseline.is_file():
        started = time.time()
        fit = FitConfig(input_size=PATCH, steps=cfg.baseline_steps, seed=0, heldout_images=256)
        record["baseline"] = {**pretrain_baseline(baseline, fit),
                              "seconds": round(time.time() - started, 1)}  # fmt: skip
        record.pop("instrument", None)  # measured again below, on the new encoders
    if not teacher.is_file():
        started = time.time()
        root = enc_dir / "teacher_cohort"
        _tiled_fields_cohort(root, cfg.teacher_slides, cfg.size, TEACHER_COHORT_SEED,
                             cfg.teacher_contrast)  # fmt: skip
        patches, classes = tissue_class_patches(root / "cohort", root / "tiles" / "patches")
        morphometry = patch_morphometry(patches) if cfg.teacher_morphometry else None
        fit = FitConfig(input_size=PATCH, steps=cfg.teacher_steps, lr=1e-3, augment=True, seed=2,
                        init_ckpt=str(baseline))  # fmt: skip
        record["teacher"] = {**train_teacher(teacher, patches, classes, fit, morphometry),
                             "seconds": round(time.time() - started, 1)}  # fmt: skip
        record.pop("instrument", None)
    if "instrument" not in record:
        started = time.time()
        record["instrument"] = {
            **encoder_instrument(enc_dir / "instrument_cohort", cfg, baseline, teacher),
            "seconds": round(time.time() - started, 1),
        }
    text = json.dumps(record, indent=2, sort_keys=True) + "\n"
    if not record_path.is_file() or record_path.read_text() != text:  # a rerun touches nothing
        atomic_write_text(record_path, text)
    return record


def encoder_instrument(root: Path, cfg: DemoConfig, baseline: Path, teacher: Path) -> dict:
    """Does the teacher carry more than the baseline? Both encoders' linear probes (tissue
    class; atypia in positive slides) on a held-out cohort at the demo's contrast, a cohort no
    encoder trained on and no MIL model sees."""
    import pandas as pd

    from .instruments import encoder_instruments, patch_truth_per_slide, slide_patches

    csv = _tiled_fields_cohort(root, cfg.instrument_slides, cfg.size, INSTRUMENT_COHORT_SEED,
                               cfg.contrast)  # fmt: skip
    df = pd.read_csv(csv)
    per_slide = slide_patches(root / "cohort" / "slides", root / "tiles" / "patches",
                              df["slide_id"])  # fmt: skip
    truth = patch_truth_per_slide(root / "cohort", per_slide, PATCH)
    positive = set(df.loc[df["label"] == "tumor", "slide_id"])
    rows = encoder_instruments({"baseline": baseline, "teacher": teacher}, per_slide, truth,
                               positive)  # fmt: skip
    keep = ("probe_class_bal_acc", "probe_atypia_auc", "cos_to_mean", "effective_rank")
    out = {row["encoder"]: {k: float(row[k]) for k in keep} for row in rows}
    n_patches = int(sum(len(p) for p, _ in per_slide.values()))
    return {**out, "cohort_seed": INSTRUMENT_COHORT_SEED, "contrast": cfg.contrast,
            "n_slides": len(per_slide), "n_patches": n_patches}  # fmt: skip


def demo_labels(cohort_csv: Path, out_csv: Path, test_per_class: int, seed: int) -> Path:
    """The cohort's dataset CSV with a ``split`` column: a fixed, label-stratified test set of
    `test_per_class` slides per class (drawn with `seed`), ``train`` for the rest."""
    import pandas as pd

    df = pd.read_csv(cohort_csv)
    rng = np.random.default_rng(seed)
    test = set()
    for label in sorted(df["label"].unique()):
        ids = sorted(df.loc[df["label"] == label, "slide_id"])
        test |= set(rng.choice(ids, min(test_per_class, len(ids) - 2), replace=False).tolist())
    df["split"] = ["test" if s in test else "train" for s in df["slide_id"]]
    text = df[["case_id", "slide_id", "label", "split"]].to_csv(index=False)
    if not out_csv.is_file() or out_csv.read_text() != text:
        atomic_write_text(out_csv, text)
    return out_csv


def run_demo(cfg: DemoConfig) -> Path:
    """Train (or reuse) the offline encoders, make (or reuse) the cohort, run the benchmark;
    returns report.md. Resumes like benchmark."""
    import torch

    from ..cohort import make_cohort
    from .run import run_benchmark

    cfg = resolve(cfg)
    resolve_device(cfg.device)  # before anything is made
    out = check_output_path(cfg.out)
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        encoders = demo_encoders(out / "encoders", cfg)
        csv = make_cohort(out / "cohort", n_slides=cfg.n_slides, size=cfg.size,
                          seed=1000 + cfg.seed, kind="fields", tumor_contrast=cfg.contrast,
                          tumor_frac=0.15, two_slide_case_frac=0.0)  # fmt: skip
        demo_labels(csv, out / "cohort" / "labels.csv", cfg.test_per_class, cfg.seed)
        return run_benchmark(benchmark_config(cfg, encoders))
    finally:
        torch.set_num_threads(threads)  # the caller's setting (tests run the demo in-process)
