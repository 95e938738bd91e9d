"""What a finished fine-tuning run writes next to its checkpoint (see ``config.output_paths``).

The student checkpoint (what extraction loads), the run's config, the loss history as CSV and a
plot, the final metrics and the run summary. Only rank 0 writes, all of it or nothing: a run that
fails while writing leaves no config or metrics that would pass for a finished run (its resume
state stays, so ``--resume`` writes them again).
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import asdict
from pathlib import Path

import numpy as np

from ..encoders.checkpoint import save_student_checkpoint
from ..utils import atomic_path, atomic_write_text, save_config
from .config import FinetuneConfig

log = logging.getLogger(__name__)

METRICS_COLUMNS = ["step", "epoch", "loss", "lr", "lr_student", "windows_per_s"]


def run_metrics(
    plan, history: list[dict], total_steps: int, windows_per_s: float, teacher_dim: int,
    teacher_stats: dict, world_size: int, val_before: dict | None, val_after: dict | None,
    probes: tuple[dict | None, dict | None] = (None, None),
) -> dict:  # fmt: skip
    """The run's final metrics (``<out>.final_metrics.json``, also inside the checkpoint)."""
    metrics = {
        "steps": total_steps,
        "train_windows": len(plan.train),
        "val_windows": len(plan.val),
        "slides_used": len(plan.slides),
        "slides_failed": len(plan.summary.failed),
        "slides_skipped": len(plan.summary.skipped),
        # the per-step loss is noisy (one batch): besides the first and last steps' losses (the
        # first and last rows of metrics.csv), the mean of the last 10 steps
        "first_loss": history[0]["loss"] if history else None,
        "last_loss": history[-1]["loss"] if history else None,
        "mean_loss_last_10_steps": (
            float(np.mean([h["loss"] for h in history[-10:]])) if history else None
        ),
        "windows_per_s": windows_per_s,
        "teacher_dim": teacher_dim,
        "teacher_patches_computed": int(teacher_stats["patches_computed"]),
        "teacher_patches_cached": int(teacher_stats["patches_cached"]),
        "world_size": world_size,
    }
    if val_before is not None and val_after is not None:
        metrics.update(
            val_cosine_before=val_before["cosine"],
            val_cosine_after=val_after["cosine"],
            val_cosine_mean_baseline=val_after["mean_baseline_cosine"],
            val_masked_positions=val_after["positions"],
            # on standardised teacher features, where predicting the mean scores <= 0
            val_r2_before=val_before.get("r2"),
            val_r2_after=val_after.get("r2"),
            val_r2_mean_baseline=val_after.get("r2_mean_baseline"),
            val_cos_std_before=val_before.get("cos_std"),
            val_cos_std_after=val_after.get("cos_std"),
        )
    if probes[0] is not None and probes[1] is not None:
        # the student's own features (probes.py): held-out ridge R² of the teacher's feature of
        # each validation patch, and of the mean teacher feature of its window neighbours
        for key, name in (("teacher", "student_teacher_r2"), ("context", "student_context_r2")):
            metrics[f"{name}_before"] = probes[0][key]
            metrics[f"{name}_after"] = probes[1][key]
    return metrics


def write_run_outputs(
    cfg: FinetuneConfig, paths: dict[str, Path], plan, history: list[dict], metrics: dict,
    student, student_tf, cache_dir: Path,
) -> None:  # fmt: skip
    """The student checkpoint, metrics CSV, loss plot, summary, final metrics, then the config;
    on any failure the files written so far are removed again."""
    plan.summary.extra.update(
        teacher_patches_computed=metrics["teacher_patches_computed"],
        teacher_patches_cached=metrics["teacher_patches_cached"],
    )
    config = asdict(cfg)
    config["teacher_cache"] = str(cache_dir)
    writes = [  # the checkpoint first, the config last
        ("checkpoint", lambda p: save_student_checkpoint(
            p, student, arch=cfg.student, transforms=student_tf, config=config, metrics=metrics)),
        ("metrics", lambda p: write_metrics_csv(p, history)),
        ("plot", lambda p: plot_loss(p, history, metrics)),
        ("summary", plan.summary.write),
        ("final_metrics", lambda p: atomic_write_text(p, json.dumps(metrics, indent=2) + "\n")),
        ("config", lambda p: save_config(cfg, p)),
    ]  # fmt: skip
    written: list[Path] = []
    try:
        for key, write in writes:
            write(paths[key])
            written.append(paths[key])
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    log.info("%s", plan.summary.line())
    if metrics["last_loss"] is not None:
        log.info("finetune: loss %.4f at step 1, %.4f at step %d (mean of the last 10 steps "
                 "%.4f)", metrics["first_loss"], metrics["last_loss"], len(history),
                 metrics["mean_loss_last_10_steps"])  # fmt: skip
    if "val_cosine_after" in metrics:
        log.info(
            "finetune: val masked cosine %.4f -> %.4f (mean-feature baseline %.4f)",
            metrics["val_cosine_before"],
            metrics["val_cosine_after"],
            metrics["val_cosine_mean_baseline"],
        )
    if "student_teacher_r2_after" in metrics:
        log.info(
            "finetune: the student's own features (held-out ridge R², validation patches): "
            "teacher feature %.4f -> %.4f, neighbours' mean teacher feature %.4f -> %.4f",
            metrics["student_teacher_r2_before"], metrics["student_teacher_r2_after"],
            metrics["student_context_r2_before"], metrics["student_context_r2_after"],
        )  # fmt: skip


def write_metrics_csv(path: Path, history: list[dict]) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=METRICS_COLUMNS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(history)


def plot_loss(path: Path, history: list[dict], val: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    losses = [h["loss"] for h in history]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, losses, lw=0.8, alpha=0.5, label="loss per step")
    if len(losses) >= 5:
        k = max(2, len(losses) // 20)
        smooth = np.convolve(losses, np.ones(k) / k, mode="valid")
        ax.plot(steps[k - 1 :], smooth, lw=1.6, label=f"moving mean ({k})")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("MCM-KD loss")
    title = "MCM-KD fine-tuning"
    if val:
        title += (
            f"\nval masked cosine {val.get('val_cosine_before', float('nan')):.3f} -> "
            f"{val.get('val_cosine_after', float('nan')):.3f} "
            f"(mean baseline {val.get('val_cosine_mean_baseline', float('nan')):.3f})"
        )
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
