"""ABMIL vs TransMIL vs MHIM-ABMIL on the same features: a comparison that can fail (issue 21).

Protocol, endpoints and the rule, fixed before the runs: ``benchmarks/mil_models_protocol.md``.
Data, encoder, splits and MIL settings are those of issue 13's ``untuned`` arm (the stages of
``bench_mcmkd_effect.py`` are reused): fields cohorts (contrast 0.25, 64 slides of 1024 px,
cohort seed s -> generator seed 1000 + s), the offline proxy ``baseline`` encoder, a fixed
stratified test set of 24 slides, 3 folds of train/val over the rest, ``--feature-norm
zscore``, 20 epochs, MIL seeds 1-3. Per arm: ``clam-mcmkd train --model-type <arm>``;
``mhim_abmil``'s teacher starts from the ``abmil`` run of the same cohort, fold and seed
(``mhim_teacher_init``), so ``abmil`` runs first.

Every stage resumes from its files (cohorts, features, finished folds). Outputs in
``--results``: ``mil_models.csv`` (arm, cohort_seed, mil_seed, test_auc, n_test_slides; one
row per MIL seed of fold-averaged probabilities, plus mil_seed ``all``), ``mil_models_summary.csv``
(arm, delta_auc, ci_low, ci_high, p_delong against abmil, pooled over cohort seeds),
``mil_models_runs.csv.gz`` (every test probability: ``--report-only`` rebuilds the tables),
``mil_models_timings.csv`` (seconds per training epoch per arm) and the encoder's instruments.

    python benchmarks/bench_mil_models.py --workdir /tmp/milcmp --results benchmarks/results \\
        --arms abmil mhim_abmil
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd
from bench_mcmkd_effect import (
    add_design_options,
    cohort_stage,
    encoders_stage,
    features_stage,
    log,
    splits_stage,
)
from mcmkd_effect_report import auc_table, delta_summary

from clam_mcmkd.utils import atomic_path

ARMS = ("abmil", "transmil", "mhim_abmil")
ENCODER = "baseline"  # issue 13's `untuned` arm
NORM = "zscore"


def encoder_instruments(feat_dir: Path, slide_ids, n_max: int = 4000) -> dict:
    """Are the MIL inputs informative at all? feature_health of a sample of patches."""
    import torch

    from clam_mcmkd.benchmark.stats import feature_health

    feats = [torch.load(feat_dir / "pt_files" / f"{s}.pt").numpy() for s in slide_ids]
    x = np.concatenate(feats)
    x = x[np.random.default_rng(0).permutation(len(x))[:n_max]]
    return {k: round(float(v), 4) for k, v in feature_health(x).items()}


def mil_arm(root: Path, csv: Path, split_dir: Path, arm: str, seed: int, args) -> pd.DataFrame:
    """One arm, one MIL seed, every fold; returns test probabilities and records the time."""
    from clam_mcmkd.mil import TrainConfig, train

    extra = {}
    if arm == "mhim_abmil":
        extra["mhim_teacher_init"] = str(root / "mil" / f"abmil_s{seed}")
    cfg = TrainConfig(
        data_root_dir=str(root / "feats" / ENCODER), csv_path=str(csv), split_dir=str(split_dir),
        results_dir=str(root / "mil"), exp_code=arm, model_type=arm, k=args.folds,
        max_epochs=args.mil_epochs, seed=seed, device="cpu", feature_norm=NORM,
        label_dict={"normal": 0, "tumor": 1}, **extra,
    )  # fmt: skip
    fresh = not any(cfg.run_dir.glob("fold_*_predictions.csv"))  # no fold resumed
    t0 = time.perf_counter()
    train(cfg)
    seconds = time.perf_counter() - t0
    if fresh:  # a resumed run's time would not be a training time
        row = {"arm": arm, "cohort_seed": args.current_seed, "mil_seed": seed,
               "seconds": round(seconds, 2), "epochs": args.folds * args.mil_epochs,
               "s_per_epoch": round(seconds / (args.folds * args.mil_epochs), 3)}  # fmt: skip
        path = Path(args.workdir) / "mil_timings.csv"
        pd.DataFrame([row]).to_csv(path, mode="a", header=not path.is_file(), index=False)
        log(f"{arm} seed {seed}: {seconds:.1f} s ({row['s_per_epoch']} s/epoch)")
    frames = []
    for fold in range(args.folds):
        pred = pd.read_csv(cfg.run_dir / f"fold_{fold}_predictions.csv")
        frames.append(pred.assign(fold=fold, mil_seed=seed))
    runs = pd.concat(frames, ignore_index=True).rename(columns={"p_1": "prob", "Y": "y"})
    return runs.assign(arm=arm, feature_norm=NORM)


def run_cohort_seed(work: Path, seed: int, args, encoders) -> pd.DataFrame:
    import torch

    root = work / f"seed{seed}"
    args.current_seed = seed
    torch.set_num_threads(args.threads)
    csv = cohort_stage(root, args.n_slides, 1000 + seed, args, args.contrast)
    split_dir = splits_stage(root, csv, args, seed)
    features_stage(root, csv, ENCODER, encoders[ENCODER])
    ids = pd.read_csv(csv)["slide_id"].tolist()
    log(f"seed {seed} instruments: {encoder_instruments(root / 'feats' / ENCODER, ids)}")
    torch.set_num_threads(1)  # tiny MIL ops: more threads only spin on a busy 2-core VM
    order = [a for a in ("abmil", "transmil", "mhim_abmil") if a in args.arms]
    frames = [
        mil_arm(root, csv, split_dir, arm, s, args) for arm in order for s in args.mil_seeds
    ]  # fmt: skip
    return pd.concat(frames, ignore_index=True).assign(cohort_seed=seed)


def write_tables(runs: pd.DataFrame, out: Path, n_resamples: int = 2000) -> pd.DataFrame:
    """mil_models.csv and mil_models_summary.csv from the per-slide probabilities."""
    out.mkdir(parents=True, exist_ok=True)
    table = auc_table(runs)[["arm", "cohort_seed", "mil_seed", "test_auc", "n_test_slides"]]
    arms = [a for a in ARMS if a in set(runs["arm"]) and a != "abmil"]
    pairs = [((arm, NORM), ("abmil", NORM)) for arm in arms]
    summary = delta_summary(runs, pairs, n_resamples=n_resamples)
    cols = ["arm", "delta_auc", "ci_low", "ci_high", "p_delong", "n_cohort_seeds",
            "n_test_slides", "per_seed_delta"]  # fmt: skip
    summary = summary[cols] if not summary.empty else pd.DataFrame(columns=cols)
    for name, frame in (("mil_models.csv", table), ("mil_models_summary.csv", summary)):
        with atomic_path(out / name) as tmp:
            frame.to_csv(tmp, index=False, float_format="%.4f")
    with atomic_path(out / "mil_models_runs.csv.gz") as tmp:
        runs.to_csv(tmp, index=False, compression={"method": "gzip", "mtime": 0})
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--results", default=None, help="also write the tables here")
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    ap.add_argument("--cohort-seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--mil-seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--contrast", type=float, default=0.25, help="cohort difficulty (0-1)")
    add_design_options(ap)
    ap.add_argument("--baseline-steps", type=int, default=400, help="proxy encoder pretraining")
    ap.add_argument("--threads", type=int, default=2, help="torch threads for the encoder")
    ap.add_argument("--report-only", action="store_true", help="tables from the runs file")
    args = ap.parse_args()
    # what bench_mcmkd_effect's stages read besides the above (their defaults there)
    args.texture_source, args.teacher_steps, args.teacher_slides = None, 240, 24
    args.instruments, args.teacher_morph = False, False
    work = Path(args.workdir)
    runs_file = work / "mil_models_runs.csv.gz"
    if args.report_only:
        runs = pd.read_csv(runs_file)
    else:
        encoders = encoders_stage(work, argparse.Namespace(**{**vars(args), "arms": []}))
        runs = pd.concat(
            [run_cohort_seed(work, s, args, encoders) for s in args.cohort_seeds],
            ignore_index=True,
        )
    for target in [work] + ([Path(args.results)] if args.results else []):
        summary = write_tables(runs, target)
    timings = work / "mil_timings.csv"
    if args.results and timings.is_file():
        with atomic_path(Path(args.results) / "mil_models_timings.csv") as tmp:
            pd.read_csv(timings).to_csv(tmp, index=False)
    log("summary:\n" + summary.to_string(index=False, float_format="%.3f"))


if __name__ == "__main__":
    main()
