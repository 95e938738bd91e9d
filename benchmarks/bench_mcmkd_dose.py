"""Does the fine-tuner move its *student*? A dose-response study (issue 18).

Protocol, endpoints and the rule that picks the confirmation's dose and settings:
``benchmarks/mcmkd_dose_protocol.md``; results: ``benchmarks/RESULTS.md`` and
``benchmarks/results/mcmkd_dose.csv`` (+ ``mcmkd_dose.png``).

Per development seed, one unlabelled pool of ``--pool-slides`` fields slides (generator seed
7000 + seed: never a seed of issue 13 or of the confirmation). Its first ``--probe-slides``
slides are never fine-tuned on: the secondary tissue-class / atypia probes read them. Every
run starts from the same offline baseline student and distils the same teacher (the encoders
of ``bench_mcmkd_effect.py``, made once under ``<workdir>/encoders``). Each arm is ONE
fine-tune of max(``--budgets``) steps at a constant lr after a 30-step warm-up, validated
after every budget (``finetune --val-at-steps``): the dose N is the state after N steps. Each
setting has a ``*_frozen`` twin that trains the same predictor with the student's lr at 0, so
``student_gain_r2`` = pretext R² (tuned) - pretext R² (frozen twin), same seed and budget.
The student's own instruments come from ``finetune`` itself: held-out ridge R² of each
validation patch's teacher feature (``student_teacher_r2``) and of its window neighbours' mean
(``student_context_r2``), before and after.

Every run resumes (``finetune --resume``; a finished run is read back), so the study can be
stopped and restarted, or split over processes by ``--dev-seeds`` / ``--arms``.

    python benchmarks/bench_mcmkd_dose.py --workdir W --dev-seeds 0 1 \\
        --budgets 30 150 500 1500 --results benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
from bench_mcmkd_effect import cohort_stage, encoders_stage, instruments_stage, log

from clam_mcmkd.clam.formats import read_dataset_csv
from clam_mcmkd.utils import atomic_path, atomic_write_text

POOL_SEED0 = 7000  # generator seed of dev seed 0's pool (issue 13: 1000+, its dev seeds 1100+)
BATCH = 8  # windows per optimizer step
WARMUP_STEPS = 30  # then a constant lr: the state after N steps is the dose N (see protocol)
# setting -> FinetuneConfig overrides; each has a "_frozen" twin (student_lr_mult 0)
SETTINGS = {
    "mcmkd": {"objective": "mcmkd", "loss": "cosine"},  # issue 13's
    "mcmkd_std": {"objective": "mcmkd", "loss": "smooth_l1"},  # loss on standardised targets
    "mcmkd_light_std": {
        "objective": "mcmkd",
        "loss": "smooth_l1",
        "predictor_depth": 1,
        "predictor_width": 64,
    },  # fmt: skip
    "patch_kd": {"objective": "patch_kd", "loss": "cosine"},
}
# arm -> (setting, student lr multiplier)
ARMS = {  # in the order they run (the most informative first)
    "mcmkd_frozen": ("mcmkd", 0.0),
    "mcmkd_lr1": ("mcmkd", 1.0),
    "mcmkd_lr0.3": ("mcmkd", 0.3),
    "mcmkd_std_frozen": ("mcmkd_std", 0.0),
    "mcmkd_std_lr1": ("mcmkd_std", 1.0),
    "patch_kd_lr0.3": ("patch_kd", 0.3),
    "patch_kd_frozen": ("patch_kd", 0.0),
    "mcmkd_light_std_frozen": ("mcmkd_light_std", 0.0),
    "mcmkd_light_std_lr1": ("mcmkd_light_std", 1.0),
}


def encoder_args(args) -> SimpleNamespace:
    """bench_mcmkd_effect's encoder settings (issue 13's baseline and morphometry teacher)."""
    return SimpleNamespace(
        baseline_steps=400, instruments=False, arms=["teacher"], teacher_slides=24,
        teacher_steps=240, teacher_morph=True, size=args.size, region_frac=0.15,
        texture_source=None,
    )  # fmt: skip


def pool_stage(work: Path, seed: int, args) -> tuple[Path, Path, Path]:
    """The seed's pool (tiled), its fine-tuning slides CSV and its probe slides CSV."""
    root = work / f"pool{seed}"
    csv = cohort_stage(root, args.pool_slides, POOL_SEED0 + seed, encoder_args(args), args.contrast)
    df = read_dataset_csv(csv)
    probe, tune = root / "probe_slides.csv", root / "finetune_slides.csv"
    atomic_write_text(probe, df.iloc[: args.probe_slides].to_csv(index=False))
    atomic_write_text(tune, df.iloc[args.probe_slides :].to_csv(index=False))
    return root, tune, probe


def budget_plan(budget: int, n_windows: int) -> tuple[int, int]:
    """(max_windows, epochs) giving `budget` steps of BATCH windows: one pass over a subset
    while the pool is large enough, else the fewest whole passes (steps within one pass)."""
    if n_windows >= budget * BATCH:
        return budget * BATCH, 1
    epochs = math.ceil(budget * BATCH / n_windows)
    return (budget // epochs) * BATCH, epochs


def run_arm(root: Path, tune_csv: Path, arm: str, budgets: list[int], encoders: dict,
            args) -> list[dict]:  # fmt: skip
    """One fine-tune of max(budgets) steps, validated (pretext + student probes) after each
    budget (``--val-at-steps``): one row per budget. Resumable; a finished run is read back."""
    from clam_mcmkd.mcmkd import FinetuneConfig, finetune, output_paths, plan_windows

    setting, lr_mult = ARMS[arm]
    total = max(budgets)
    out = root / "dose" / f"{arm}.pt"
    out.parent.mkdir(parents=True, exist_ok=True)
    teacher = encoders[args.teacher_encoder]
    settings = dict(
        data_h5_dir=str(root / "tiles"), data_slide_dir=str(root / "cohort" / "slides"),
        csv_path=str(tune_csv), slide_ext=".tif", out=str(out), teacher="checkpoint",
        teacher_ckpt=str(teacher), teacher_cache=str(root / "dose" / f"cache_{teacher.stem}"),
        student="resnet18_trunc", student_ckpt=str(encoders["baseline"]), input_size=64,
        pretrained=False, grid=3, window_overlap=True, batch_size=BATCH, lr=1e-3,
        student_lr_mult=lr_mult, val_frac=0.1, max_val_windows=128, predictor_width=128, predictor_depth=2,
        warmup_frac=WARMUP_STEPS / total, min_lr_ratio=1.0,  # constant lr after warm-up
        val_at_steps=tuple(sorted(b for b in budgets if b < total)),
        device="cpu", progress=False, resume=True, num_workers=0, save_every=100,
    )  # fmt: skip
    cfg = FinetuneConfig(**{**settings, **SETTINGS[setting]})  # the setting overrides
    metrics_path = output_paths(out)["final_metrics"]
    started = time.perf_counter()
    if not metrics_path.is_file():
        n_train = len(plan_windows(cfg).train)
        cfg.max_windows, cfg.epochs = budget_plan(total, n_train)
        finetune(cfg)
    metrics = json.loads(metrics_path.read_text())
    config = json.loads(output_paths(out)["config"].read_text())
    before, rows = metrics["val_curve"][0], []
    for point in metrics["val_curve"][1:]:
        rows.append({
            "arm": arm, "setting": setting, "student_lr_mult": lr_mult,
            "budget_steps": point["step"], "steps": point["step"], "epochs": config["epochs"],
            "objective": config["objective"], "loss": config["loss"],
            "train_windows": metrics["train_windows"], "val_r2_before": before["val_r2"],
            "val_r2_after": point["val_r2"], "val_r2_mean_baseline": metrics["val_r2_mean_baseline"],
            "student_teacher_r2_before": before["student_teacher_r2"],
            "student_teacher_r2_after": point["student_teacher_r2"],
            "student_context_r2_before": before["student_context_r2"],
            "student_context_r2_after": point["student_context_r2"],
            "seconds": round(time.perf_counter() - started, 1), "ckpt": str(out),
        })  # fmt: skip
    return rows


def dose_table(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (arm, budget, seed) with the study's columns; student_gain_r2 against the
    frozen twin of the same setting, seed and budget."""
    df = df.copy()
    frozen = df[df.student_lr_mult == 0].set_index(["setting", "budget_steps", "cohort_seed"])
    key = list(zip(df.setting, df.budget_steps, df.cohort_seed))
    ref = frozen["val_r2_after"].reindex(key).to_numpy()
    df["pretext_r2_frozen"] = ref
    df["student_gain_r2"] = df["val_r2_after"].to_numpy() - ref
    df["student_teacher_r2"] = df["student_teacher_r2_after"]
    df["student_context_r2"] = df["student_context_r2_after"]
    first = ["arm", "budget_steps", "cohort_seed", "student_lr_mult", "student_gain_r2",
             "student_teacher_r2", "student_context_r2"]  # fmt: skip
    rest = ["setting", "objective", "loss", "steps", "epochs", "train_windows",
            "val_r2_before", "val_r2_after", "pretext_r2_frozen", "val_r2_mean_baseline",
            "student_teacher_r2_before", "student_teacher_r2_after",
            "student_context_r2_before", "student_context_r2_after",
            "probe_class_bal_acc", "probe_atypia_auc", "cos_to_mean", "seconds"]  # fmt: skip
    for col in rest:
        if col not in df:
            df[col] = np.nan
    return df[first + rest].sort_values(["arm", "budget_steps", "cohort_seed"])


def plot(df: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("student_gain_r2", "pretext R² tuned - frozen twin"),
        ("d_teacher", "Δ student→teacher ridge R² (after - before)"),
        ("d_context", "Δ student→neighbours ridge R² (after - before)"),
    ]
    df = df.assign(d_teacher=df.student_teacher_r2_after - df.student_teacher_r2_before,
                   d_context=df.student_context_r2_after - df.student_context_r2_before)  # fmt: skip
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, (col, title) in zip(axes, panels):
        for arm, g in df[df.student_lr_mult > 0].groupby("arm"):
            mean = g.groupby("budget_steps")[col].mean()
            (line,) = ax.plot(mean.index, mean.values, marker="o", label=arm)
            ax.scatter(g.budget_steps, g[col], s=10, alpha=0.5, color=line.get_color())
        ax.axhline(0, color="k", lw=0.7)
        ax.set_xscale("log")
        ax.set_xlabel("fine-tune budget (optimizer steps of 8 windows)")
        ax.set_title(title, fontsize=9)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def rows_path(work: Path, seed: int) -> Path:
    return work / f"dose_rows_seed{seed}.csv"


def run_seed(work: Path, seed: int, encoders: dict, args) -> None:
    """Every (budget, arm) of one dev seed, appended to its rows file as each finishes."""
    root, tune_csv, probe_csv = pool_stage(work, seed, args)
    base = {k: encoders[k] for k in ("baseline", args.teacher_encoder)}
    instruments_stage(root, probe_csv, base, max_slides=args.probe_slides,
                      out_name="instruments_encoders.csv")  # fmt: skip
    path = rows_path(work, seed)
    done = pd.read_csv(path) if path.is_file() else pd.DataFrame(columns=["arm", "budget_steps"])
    finished = set(zip(done.arm, done.budget_steps))
    rows = done.to_dict("records")
    for arm in args.arms:
        if all((arm, b) in finished for b in args.budgets):
            continue
        arm_rows = run_arm(root, tune_csv, arm, args.budgets, encoders, args)
        top = arm_rows[-1]
        if top["student_lr_mult"] > 0:  # a frozen twin's student is the baseline itself
            inst = instruments_stage(
                root, probe_csv, {arm: Path(top["ckpt"])}, max_slides=args.probe_slides,
                out_name=f"dose/{arm}.instruments.csv",
            )  # fmt: skip
            top.update(inst.iloc[0].drop("encoder").to_dict())
        for row in arm_rows:
            row["cohort_seed"] = seed
            log(f"seed {seed} {arm} b{row['budget_steps']}: " + json.dumps(
                {k: row.get(k) for k in ("val_r2_after", "student_teacher_r2_before",
                 "student_teacher_r2_after", "student_context_r2_after", "seconds")}))  # fmt: skip
        rows = [r for r in rows if r["arm"] != arm] + arm_rows
        atomic_write_text(path, pd.DataFrame(rows).to_csv(index=False))


def criterion(table: pd.DataFrame, seeds: list[int]) -> pd.DataFrame:
    """Per tuned arm and budget: means over seeds, and the protocol's criterion (on every dev
    seed student_gain_r2 > 0.02 and Δ student_teacher_r2 > 0.01)."""
    t = table[table.student_lr_mult > 0].assign(
        d_teacher=table.student_teacher_r2_after - table.student_teacher_r2_before,
        d_context=table.student_context_r2_after - table.student_context_r2_before,
    )
    rows = []
    for (arm, budget), g in t.groupby(["arm", "budget_steps"]):
        complete = sorted(g.cohort_seed) == sorted(seeds)
        moves = complete and bool(((g.student_gain_r2 > 0.02) & (g.d_teacher > 0.01)).all())
        rows.append({"arm": arm, "budget_steps": budget, "seeds": len(g),
                     "student_gain_r2": g.student_gain_r2.mean(), "d_teacher": g.d_teacher.mean(),
                     "d_context": g.d_context.mean(), "moves_student": moves})  # fmt: skip
    return pd.DataFrame(rows)


def pick_confirmation(crit: pd.DataFrame, top_budget: int) -> tuple[str, int, bool]:
    """The protocol's rule: (arm, budget, whether it met the criterion)."""
    mc = crit[crit.arm.str.startswith("mcmkd_")]
    lr = mc.arm.map(lambda a: ARMS[a][1])
    mc = mc.assign(lr=lr)
    met = mc[mc.moves_student]
    if len(met):
        best = met.d_teacher.max()
        near = met[met.d_teacher >= best - 0.005].sort_values(["budget_steps", "lr"])
        return near.iloc[0].arm, int(near.iloc[0].budget_steps), True
    top = mc[mc.budget_steps == top_budget].sort_values("d_teacher", ascending=False)
    return top.iloc[0].arm, top_budget, False


def report(work: Path, seeds: list[int], out: Path) -> pd.DataFrame:
    """The study's table and plot from every seed's rows (whatever has finished)."""
    frames = [pd.read_csv(rows_path(work, s)) for s in seeds if rows_path(work, s).is_file()]
    table = dose_table(pd.concat(frames, ignore_index=True))
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "mcmkd_dose.csv", table.to_csv(index=False))
    plot(table, out / "mcmkd_dose.png")
    return table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--dev-seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--budgets", type=int, nargs="+", default=[30, 150, 500, 1500])
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    ap.add_argument("--pool-slides", type=int, default=170)
    ap.add_argument("--probe-slides", type=int, default=20)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--contrast", type=float, default=0.25)
    ap.add_argument("--teacher-encoder", default="teacher_morph")
    ap.add_argument("--report-only", action="store_true", help="only rebuild the table and plot")
    ap.add_argument(
        "--results", default=None, help="write the CSV and plot here (default: workdir)"
    )
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    work = Path(args.workdir)
    if not args.report_only:
        encoders = encoders_stage(work, encoder_args(args))
        for seed in args.dev_seeds:
            run_seed(work, seed, encoders, args)
    table = report(work, args.dev_seeds, Path(args.results or work))
    log("\n" + table.to_string(index=False, float_format="%.3f"))
    crit = criterion(table, args.dev_seeds)
    log("criterion (means over dev seeds):\n" + crit.to_string(index=False, float_format="%.3f"))
    if len(crit):
        arm, budget, met = pick_confirmation(crit, max(args.budgets))
        log(f"confirmation (protocol rule): {arm} at {budget} steps; criterion met: {met}")


if __name__ == "__main__":
    main()
