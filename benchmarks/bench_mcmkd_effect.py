"""Does MCM-KD make better features for MIL? An experiment that can fail (issue 13).

Protocol, pre-registered endpoints and every choice made before the arms ran:
``benchmarks/mcmkd_effect_protocol.md``; results: ``benchmarks/RESULTS.md``. Every stage
resumes from its files, so a run can be stopped, split over workers by cohort seed, and
re-read (pass 3 below) without retraining anything.

- shared encoders (``<workdir>/encoders``): ``baseline`` = resnet18_trunc pretrained on
  procedural non-histology images (ImageNet's role; the ``untuned`` arm and every student's
  start); ``teacher`` = resnet50_trunc trained on the tissue classes of a separate fields
  cohort (never a label); ``teacher_morph`` = that teacher trained further on tissue classes +
  pixel-measured nuclear morphometrics (``--teacher-morph``; the experiment's teacher via
  ``--teacher-encoder``); ``random_teacher`` = resnet50_trunc untrained; ``random_init`` =
  resnet18_trunc at its seeded init (instrument check only).
- per cohort seed (``<workdir>/c<contrast>/seed<s>``): a fields cohort tiled at 64 px / 20x
  (1:1 encoder input), a fixed stratified test set (``--test-per-class`` per class), k folds
  of train/val over the rest; per arm an encoder (fine-tuned arms: ``finetune_stage`` on the
  non-test slides' windows), its features, ABMIL for each MIL seed with ``train
  --feature-norm`` zscore and none.
- outputs per contrast (and in ``--results``): ``mcmkd_effect_runs.csv.gz`` (one row per arm,
  cohort seed, MIL seed, norm, fold, test slide: the probability; ``mcmkd_effect_report.py
  --runs`` rebuilds every table from it), ``mcmkd_effect.csv``,
  ``mcmkd_effect_summary.csv``, ``mcmkd_effect_forest.png``, ``mcmkd_effect_pretext.csv``,
  ``mcmkd_effect_instruments.csv`` (``--instruments-arms``), ``timings.csv``
  (``--results-name`` renames the ``mcmkd_effect`` prefix).
- ``--tuned-from ARM=CKPT,...`` takes a tuned arm's student from finished fine-tunes instead of
  training one per cohort seed (issue 18's confirmation: ``mcmkd_confirm_protocol.md``).

    python benchmarks/bench_mcmkd_effect.py --workdir W --contrast 0.25 \\
        --cohort-seeds 0 1 2 3 4 --mil-seeds 1 2 3 --norms zscore none \\
        --teacher-encoder teacher_morph --ft-windows 240 \\
        --arms untuned mcmkd patch_kd random_teacher sham teacher \\
        --instruments-arms --results benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
from mcmkd_effect_report import write_results

from clam_mcmkd.benchmark.instruments import (
    encoder_instruments,
    patch_truth_per_slide,
    slide_patches,
)
from clam_mcmkd.clam.formats import read_dataset_csv
from clam_mcmkd.cohort import make_cohort
from clam_mcmkd.utils import atomic_path, atomic_write_text

PATCH = 64  # level-0 px at 20x = the encoders' input size (no resize: CPU budget)
TEACHER_COHORT_SEED = 9000  # the teacher's cohort: never a cohort seed of the experiment
MORPH_TEACHER_COHORT_SEED = 9100  # the morphometry teacher's cohort (phase 2 candidate)
MORPH_TEACHER_CONTRAST = 0.5  # unlabelled atypia variation in its slides (never a label)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Timer:
    """Wall time per stage, appended to a CSV (what the full-run estimate is built from)."""

    def __init__(self, path: Path, **tags):
        self.path, self.tags = path, tags

    def __call__(self, stage: str, fn, *args, **kw):
        t0 = time.perf_counter()
        out = fn(*args, **kw)
        row = {**self.tags, "stage": stage, "seconds": round(time.perf_counter() - t0, 2)}
        pd.DataFrame([row]).to_csv(self.path, mode="a", header=not self.path.is_file(), index=False)
        log(f"{stage}: {row['seconds']} s")
        return out


# --------------------------------------------------------------------------- data


def cohort_stage(root: Path, n: int, seed: int, args, contrast: float) -> Path:
    """Fields cohort + 64 px tiling; returns the dataset CSV (resumes inside both calls)."""
    from clam_mcmkd.tiling import TileConfig, tile_slides

    csv = make_cohort(
        root / "cohort", n_slides=n, size=args.size, seed=seed, kind="fields",
        tumor_contrast=contrast, tumor_frac=args.region_frac, two_slide_case_frac=0.0,
        texture_source=args.texture_source,
    )  # fmt: skip
    tile_slides(
        TileConfig(
            source=str(root / "cohort" / "slides"), save_dir=str(root / "tiles"),
            patch_size=PATCH, step_size=PATCH,
        )
    )  # fmt: skip
    return csv


def cohort_patches(root: Path, slide_ids) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """uint8 patches and coords per slide of a cohort made by :func:`cohort_stage`."""
    return slide_patches(root / "cohort" / "slides", root / "tiles" / "patches", slide_ids)


def patch_labels(root: Path, per_slide: dict) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return patch_truth_per_slide(root / "cohort", per_slide, PATCH)


# --------------------------------------------------------------------------- encoders


def encoders_stage(work: Path, args) -> dict[str, Path]:
    """The shared encoder checkpoints (made once, reused by every cohort seed and contrast)."""
    from clam_mcmkd.benchmark.proxy_pretrain import (
        FitConfig,
        pretrain_baseline,
        save_random_encoder,
        train_teacher,
    )  # fmt: skip

    out = work / "encoders"
    out.mkdir(parents=True, exist_ok=True)
    timer = Timer(work / "timings_encoders.csv")
    names = ("baseline", "teacher", "teacher_morph", "random_teacher", "random_init")
    paths = {k: out / f"{k}.pt" for k in names}
    info = (
        json.loads((out / "encoders.json").read_text()) if (out / "encoders.json").is_file() else {}
    )
    if not paths["baseline"].is_file():
        cfg = FitConfig(steps=args.baseline_steps, input_size=PATCH, seed=0)
        info["baseline"] = timer("pretrain_baseline", pretrain_baseline, paths["baseline"], cfg)
    if not paths["random_init"].is_file():
        save_random_encoder(paths["random_init"], FitConfig(input_size=PATCH, seed=0))
    if not paths["random_teacher"].is_file():
        cfg = FitConfig(arch="resnet50_trunc", input_size=PATCH, seed=1)
        info["random_teacher"] = save_random_encoder(paths["random_teacher"], cfg)
    if not paths["teacher"].is_file() and (args.instruments or "teacher" in args.arms):
        root = work / "teacher_cohort"
        csv = timer("teacher_cohort", cohort_stage, root, args.teacher_slides,
                    TEACHER_COHORT_SEED, args, 0.0)  # fmt: skip
        per_slide = cohort_patches(root, read_dataset_csv(csv)["slide_id"])
        truth = patch_labels(root, per_slide)
        x = np.concatenate([p for p, _ in per_slide.values()])
        y = np.concatenate([truth[s][0] for s in per_slide])
        cfg = FitConfig(arch="resnet50_trunc", steps=args.teacher_steps, input_size=PATCH,
                        lr=1e-3, augment=True, seed=2)  # fmt: skip
        info["teacher"] = timer("train_teacher", train_teacher, paths["teacher"], x, y, cfg)
        info["teacher"]["class_counts"] = np.bincount(y, minlength=4).tolist()
    if not paths["teacher_morph"].is_file() and args.teacher_morph:
        info["teacher_morph"] = morph_teacher_stage(work, args, paths, timer)
    atomic_write_text(out / "encoders.json", json.dumps(info, indent=2) + "\n")
    return paths


def morph_teacher_stage(work: Path, args, paths: dict[str, Path], timer) -> dict:
    """The phase-2 teacher candidate: the phase-1 teacher trained on (longer, wider task) the
    tissue classes AND pixel-measured nuclear morphometry of a separate cohort whose slides
    carry unlabelled atypia (contrast 0.5, half of them): never the label, never the atypia
    map. Chosen or not on development cohorts only (benchmarks/mcmkd_effect_protocol.md, D1)."""
    from clam_mcmkd.benchmark.proxy_pretrain import FitConfig, patch_morphometry, train_teacher

    root = work / "teacher_cohort_morph"
    csv = timer("teacher_cohort_morph", cohort_stage, root, args.teacher_slides,
                MORPH_TEACHER_COHORT_SEED, args, MORPH_TEACHER_CONTRAST)  # fmt: skip
    per_slide = cohort_patches(root, read_dataset_csv(csv)["slide_id"])
    truth = patch_labels(root, per_slide)
    x = np.concatenate([p for p, _ in per_slide.values()])
    y = np.concatenate([truth[s][0] for s in per_slide])
    morph = patch_morphometry(x)
    cfg = FitConfig(arch="resnet50_trunc", steps=args.teacher_steps, input_size=PATCH, lr=5e-4,
                    augment=True, seed=3, init_ckpt=str(paths["teacher"]))  # fmt: skip
    info = timer("train_teacher_morph", train_teacher, paths["teacher_morph"], x, y, cfg, morph)
    info["class_counts"] = np.bincount(y, minlength=4).tolist()
    return info


def features_stage(root: Path, csv: Path, name: str, ckpt: Path) -> Path:
    from clam_mcmkd.features import ExtractConfig, extract_features

    feat_dir = root / "feats" / name
    extract_features(
        ExtractConfig(
            data_h5_dir=str(root / "tiles"), data_slide_dir=str(root / "cohort" / "slides"),
            csv_path=str(csv), feat_dir=str(feat_dir), model="checkpoint", ckpt=str(ckpt),
            slide_ext=".tif", pretrained=False, device="cpu", batch_size=256,
        )
    )  # fmt: skip
    return feat_dir


# --------------------------------------------------------------------------- splits


def splits_stage(root: Path, csv: Path, args, seed: int) -> Path:
    """A fixed test set (`--test-per-class` slides per class, drawn with the cohort seed) and
    k folds of train/val over the other slides."""
    from clam_mcmkd.splits import SplitConfig, make_splits

    split_dir = root / "splits"
    if (split_dir / f"splits_{args.folds - 1}.csv").is_file():
        return split_dir
    df = read_dataset_csv(csv)
    rng = np.random.default_rng(seed)
    test = []
    for label in sorted(df["label"].unique()):
        ids = df.loc[df["label"] == label, "slide_id"].to_numpy()
        test += sorted(rng.choice(ids, args.test_per_class, replace=False).tolist())
    fixed = root / "fixed_test.csv"
    atomic_write_text(fixed, "slide_id\n" + "\n".join(test) + "\n")
    make_splits(
        SplitConfig(
            csv_path=str(csv), split_dir=str(split_dir), k=args.folds, val_frac=args.val_frac,
            test_frac=0.0, seed=1, fixed_test=str(fixed),
        )
    )  # fmt: skip
    return split_dir


# --------------------------------------------------------------------------- MIL


def _mil_run(data_dir: Path, csv: Path, split_dir: Path, results: Path, exp: str, seed: int,
             norm: str, args) -> list[pd.DataFrame]:  # fmt: skip
    """ABMIL on every fold for one MIL seed; `norm`: ``train --feature-norm`` (z-score
    statistics per fold from its training slides, saved with the model)."""
    from clam_mcmkd.mil import TrainConfig, train

    cfg = TrainConfig(
        data_root_dir=str(data_dir), csv_path=str(csv), split_dir=str(split_dir),
        results_dir=str(results), exp_code=exp, model_type="abmil", k=args.folds,
        max_epochs=args.mil_epochs, seed=seed, device="cpu", feature_norm=norm,
        label_dict={"normal": 0, "tumor": 1},
    )  # fmt: skip
    train(cfg)
    frames = []
    for fold in range(args.folds):
        pred = pd.read_csv(cfg.run_dir / f"fold_{fold}_predictions.csv")
        frames.append(pred.assign(fold=fold, mil_seed=seed, feature_norm=norm))
    return frames


def mil_stage(root: Path, csv: Path, split_dir: Path, arm: str, args) -> pd.DataFrame:
    """ABMIL per MIL seed and feature_norm: per-slide test probabilities of every fold."""
    import torch

    torch.set_num_threads(args.mil_threads)  # tiny ops: more threads only spin on 2 busy cores
    frames = []
    for norm in args.norms:
        seeds = args.none_mil_seeds if (norm == "none" and args.none_mil_seeds) else args.mil_seeds
        for seed in seeds:
            frames += _mil_run(root / "feats" / arm, csv, split_dir, root / "mil", f"{arm}_{norm}",
                               seed, norm, args)  # fmt: skip
    torch.set_num_threads(args.threads)
    runs = pd.concat(frames, ignore_index=True).rename(columns={"p_1": "prob", "Y": "y"})
    return runs.assign(arm=arm)[
        ["arm", "feature_norm", "mil_seed", "fold", "slide_id", "y", "prob"]
    ]


# --------------------------------------------------------------------------- instruments


def instruments_stage(
    root: Path, csv: Path, encoders: dict[str, Path], max_slides: int = 24,
    out_name: str = "instruments.csv",
):  # fmt: skip
    """Before any comparison: is each encoder collapsed, and what does it know? Feature health
    on the cohort's patches; linear probes for the patch's tissue class and, in positive
    slides, for lying in the atypical region (ground truth of the generator; diagnostics only,
    never used for training). After the arms ran, the same on each arm's encoder
    (``instruments_arms.csv``): did a fine-tune collapse the features?"""
    out = root / out_name
    if out.is_file():
        return pd.read_csv(out)
    df = read_dataset_csv(csv)
    sids = df["slide_id"].tolist()[:max_slides]
    per_slide = cohort_patches(root, sids)
    truth = patch_labels(root, per_slide)
    positive = set(df.loc[df["label"] == "tumor", "slide_id"])
    present = {name: ckpt for name, ckpt in encoders.items() if Path(ckpt).is_file()}
    rows = encoder_instruments(present, per_slide, truth, positive)
    table = pd.DataFrame(rows)
    atomic_write_text(out, table.to_csv(index=False))
    return table


ARMS = ("untuned", "mcmkd", "patch_kd", "random_teacher", "sham", "teacher", "teacher_morph")
# the fine-tuned arms: (objective, targets, teacher encoder); "teacher" = the chosen teacher
TUNED = {
    "mcmkd": ("mcmkd", "teacher", "teacher"),
    "patch_kd": ("patch_kd", "teacher", "teacher"),
    "random_teacher": ("mcmkd", "teacher", "random_teacher"),
    "sham": ("mcmkd", "sham", "teacher"),
}


def teacher_of(name: str, encoders: dict[str, Path], args) -> Path:
    """The chosen teacher (``--teacher-encoder``) stands for "teacher" in every arm."""
    return encoders[args.teacher_encoder if name == "teacher" else name]


def finetune_stage(root: Path, csv: Path, arm: str, encoders: dict[str, Path], args) -> Path:
    """One fine-tune per tuned arm and cohort seed, equal budget for all (the ``--ft-*``
    options), the student starting from the untuned arm's encoder, on the windows of the
    cohort's non-test slides (never a test slide, no label used); resumable."""
    from clam_mcmkd.mcmkd import FinetuneConfig, finetune

    objective, targets, teacher = TUNED[arm]
    out = root / "finetune" / f"{arm}.pt"
    if out.is_file():
        return out
    df = read_dataset_csv(csv)
    test = set(pd.read_csv(root / "fixed_test.csv")["slide_id"])
    slides = root / "finetune" / "slides.csv"
    slides.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(slides, df[~df["slide_id"].isin(test)].to_csv(index=False))
    finetune(
        FinetuneConfig(
            data_h5_dir=str(root / "tiles"), data_slide_dir=str(root / "cohort" / "slides"),
            csv_path=str(slides), slide_ext=".tif", out=str(out), teacher="checkpoint",
            teacher_ckpt=str(teacher_of(teacher, encoders, args)),
            teacher_cache=str(root / "finetune" / f"cache_{teacher_of(teacher, encoders, args).stem}"),
            student="resnet18_trunc", student_ckpt=str(encoders["baseline"]), input_size=PATCH,
            pretrained=False, objective=objective, targets=targets, grid=args.ft_grid,
            window_overlap=True, batch_size=8, lr=args.ft_lr, student_lr_mult=0.3,
            epochs=args.ft_epochs, max_windows=args.ft_windows, val_frac=0.1,
            predictor_width=128, loss=args.ft_loss, device="cpu", progress=False, resume=True,
        )
    )  # fmt: skip
    return out


def pretext_row(ckpt: Path, arm: str, seed: int) -> dict:
    """The fine-tune's validation numbers (before/after, vs predicting the mean; the student
    probes), read from the ``final_metrics.json`` beside its checkpoint."""
    metrics = json.loads(ckpt.with_suffix(".final_metrics.json").read_text())
    keys = [k for k in metrics if k.startswith(("val_", "student_"))]
    keys += ["steps", "train_windows"]
    return {"arm": arm, "cohort_seed": seed, "checkpoint": str(ckpt),
            **{k: metrics.get(k) for k in keys}}  # fmt: skip


def parse_tuned_from(items: list[str] | None) -> dict[str, list[Path]]:
    """``ARM=CKPT[,CKPT...]`` -> {arm: [checkpoints]}; checked before any work."""
    out = {}
    for item in items or []:
        arm, sep, paths = item.partition("=")
        if not sep or arm not in TUNED:
            raise SystemExit(
                f"--tuned-from {item}: expected ARM=CKPT with ARM one of {list(TUNED)}"
            )
        out[arm] = [Path(p) for p in paths.split(",")]
        for path in out[arm]:
            if not path.is_file() or not path.with_suffix(".final_metrics.json").is_file():
                raise SystemExit(f"--tuned-from {path}: no checkpoint with its final_metrics.json")
    return out


def arm_checkpoint(
    arm: str, root: Path, csv: Path, encoders: dict[str, Path], args, seed: int
) -> Path:
    if arm == "untuned":
        return encoders["baseline"]
    if arm in ("teacher", "teacher_morph"):
        return teacher_of(arm, encoders, args)
    if arm in args.tuned_from:  # a finished fine-tune: cohort seed s takes the (s mod n)-th
        students = args.tuned_from[arm]
        return students[seed % len(students)]
    return finetune_stage(root, csv, arm, encoders, args)


def run_cohort_seed(work: Path, seed: int, args, encoders: dict[str, Path]) -> pd.DataFrame:
    root = work / f"c{args.contrast:g}" / f"seed{seed}"
    timer = Timer(work / f"c{args.contrast:g}" / "timings.csv", cohort_seed=seed)
    csv = timer("cohort+tile", cohort_stage, root, args.n_slides, 1000 + seed, args, args.contrast)
    if args.instruments:
        chosen = {k: v for k, v in encoders.items() if k in args.instrument_encoders}
        inst = timer("instruments", instruments_stage, root, csv, chosen)
        log("instruments:\n" + inst.to_string(index=False, float_format="%.3f"))
    split_dir = splits_stage(root, csv, args, seed)
    frames, frames_pretext = [], []
    for arm in args.arms:
        ckpt = timer(f"finetune:{arm}", arm_checkpoint, arm, root, csv, encoders, args, seed)
        if arm in TUNED:
            pretext = pretext_row(ckpt, arm, seed)
            log(f"pretext {arm}: " + json.dumps(pretext))
            frames_pretext.append(pretext)
        timer(f"features:{arm}", features_stage, root, csv, arm, ckpt)
        runs = timer(f"mil:{arm}", mil_stage, root, csv, split_dir, arm, args)
        frames.append(runs.assign(cohort_seed=seed))
    if args.instruments_arms:
        arm_encoders = {a: arm_checkpoint(a, root, csv, encoders, args, seed) for a in args.arms}
        inst = timer("instruments:arms", instruments_stage, root, csv, arm_encoders,
                     out_name="instruments_arms.csv")  # fmt: skip
        log(
            "instruments of the arms' encoders:\n"
            + inst.to_string(index=False, float_format="%.3f")
        )
    return pd.concat(frames, ignore_index=True), frames_pretext


def add_design_options(ap: argparse.ArgumentParser) -> None:
    """The cohort, split and MIL design shared with ``bench_mil_models.py``."""
    ap.add_argument("--n-slides", type=int, default=64)
    ap.add_argument("--test-per-class", type=int, default=12)
    ap.add_argument("--val-frac", type=float, default=0.125)
    ap.add_argument("--folds", type=int, default=3)
    ap.add_argument("--mil-epochs", type=int, default=20)
    ap.add_argument("--size", type=int, default=1024, help="slide side, level-0 px")
    ap.add_argument("--region-frac", type=float, default=0.15, help="atypical share of tissue")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--contrast", type=float, default=0.5, help="cohort difficulty (0-1)")
    ap.add_argument("--cohort-seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--mil-seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--norms", nargs="+", default=["zscore", "none"], choices=["zscore", "none"])
    ap.add_argument(
        "--none-mil-seeds",
        type=int,
        nargs="+",
        default=None,
        help="MIL seeds for feature_norm none (default: --mil-seeds)",
    )
    ap.add_argument("--arms", nargs="+", default=["untuned"], choices=ARMS)
    add_design_options(ap)
    ap.add_argument("--texture-source", default=None, help="real texture from this slide")
    ap.add_argument("--teacher-slides", type=int, default=24)
    ap.add_argument("--teacher-steps", type=int, default=240)
    ap.add_argument("--baseline-steps", type=int, default=400)
    ap.add_argument("--instruments", action="store_true", help="feature health + probes first")
    ap.add_argument(
        "--instruments-arms",
        action="store_true",
        help="feature health + probes of every arm's encoder after its runs",
    )
    ap.add_argument(
        "--instrument-encoders",
        nargs="+",
        default=["random_init", "baseline", "teacher", "teacher_morph", "random_teacher"],
    )
    ap.add_argument(
        "--teacher-morph",
        action="store_true",
        help="make the morphometry teacher candidate (arm teacher_morph)",
    )
    ap.add_argument(
        "--teacher-encoder",
        default="teacher",
        choices=["teacher", "teacher_morph"],
        help="the encoder that is the teacher of every teacher arm",
    )
    ap.add_argument("--ft-grid", type=int, default=3)
    ap.add_argument("--ft-windows", type=int, default=240)
    ap.add_argument("--ft-epochs", type=int, default=1)
    ap.add_argument("--ft-lr", type=float, default=1e-3)
    ap.add_argument("--ft-loss", default="cosine", choices=["cosine", "smooth_l1"])
    ap.add_argument(
        "--tuned-from",
        nargs="+",
        default=None,
        metavar="ARM=CKPT[,CKPT...]",
        help="take a tuned arm's student from finished fine-tunes (each with its "
        "final_metrics.json) instead of training one per cohort seed; with several, cohort "
        "seed s uses the (s mod n)-th",
    )
    ap.add_argument(
        "--results", default=None, help="also write the result CSVs and the forest plot here"
    )
    ap.add_argument(
        "--results-name", default="mcmkd_effect", help="prefix of the result files' names"
    )
    ap.add_argument("--threads", type=int, default=2, help="torch threads for the encoders")
    ap.add_argument("--mil-threads", type=int, default=1, help="torch threads for ABMIL")
    args = ap.parse_args()
    args.tuned_from = parse_tuned_from(args.tuned_from)
    import torch

    torch.set_num_threads(args.threads)
    work = Path(args.workdir)
    encoders = encoders_stage(work, args)
    out_dir = work / f"c{args.contrast:g}"
    done = [run_cohort_seed(work, s, args, encoders) for s in args.cohort_seeds]
    runs = pd.concat([r for r, _ in done], ignore_index=True)
    pretext = pd.DataFrame([row for _, rows in done for row in rows])
    for target in [out_dir] + ([Path(args.results)] if args.results else []):
        write_results(target, runs, pretext, args.arms, name=args.results_name)
        with atomic_path(
            target / f"{args.results_name}_runs.csv.gz"
        ) as tmp:  # what the tables are made of
            runs.to_csv(tmp, index=False, compression={"method": "gzip", "mtime": 0})
        if args.instruments_arms:  # every cohort seed's table, one file
            tables = [
                pd.read_csv(out_dir / f"seed{s}" / "instruments_arms.csv").assign(cohort_seed=s)
                for s in args.cohort_seeds
            ]
            text = pd.concat(tables, ignore_index=True).to_csv(index=False)
            atomic_write_text(target / f"{args.results_name}_instruments.csv", text)


if __name__ == "__main__":
    main()
