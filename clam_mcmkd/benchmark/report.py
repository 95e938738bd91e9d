"""The benchmark report: arms x MIL models, compared at the slide level on the same test slides.

Inputs are CLAM results directories (``summary.csv`` + ``split_<k>_results.pkl``), so a report
can be made from runs of CLAM's own ``main.py`` as well as ours. The headline numbers are
slide-level (:mod:`.slide_level`): each test slide's probability averaged over folds and MIL
seeds, its AUC, and ΔAUC against the baseline with a bootstrap CI and DeLong's p. Per-fold
numbers are kept, labelled as what they are (training noise). Outputs are deterministic (no
dates, a seeded bootstrap, fixed plot metadata): rewriting a report gives the same files.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..clam.formats import SUMMARY_NAME, ClamFormatError, read_summary
from ..utils import ClamMcmkdError, atomic_path, atomic_write_text, to_jsonable
from . import slide_level
from .config import ReportSettings
from .slide_level import ResultRun

__all__ = ["ResultRun", "read_report_table", "summarize", "write_report"]

METRICS = ("test_auc", "test_acc", "val_auc", "val_acc")


# ----------------------------------------------------------------------------- collecting


def collect_folds(runs: Sequence[ResultRun]):
    """Per-fold rows (arm, encoder, model, mil_seed, fold, test/val AUC and accuracy)."""
    import pandas as pd

    frames = []
    for run in runs:
        df = read_summary(Path(run.results_dir) / SUMMARY_NAME)
        frame = pd.DataFrame(
            {
                "arm": run.key,
                "encoder": run.encoder,
                "model": run.model,
                "mil_seed": run.mil_seed,
                "fold": df["folds"].astype(int),
                **{m: df[m].astype(float) for m in METRICS},
            }
        )
        frames.append(frame)
    if not frames:
        raise ClamMcmkdError("no results to report")
    return pd.concat(frames, ignore_index=True)


def compare_pairs(avg, runs, pairs, settings) -> dict[tuple, slide_level.Comparison]:
    """ΔAUC(a − b) per (model, a, b) for each pair of arms the model has, each computed once
    (the summary's baseline column and the comparisons table read the same results)."""
    diffs = {}
    for model in _ordered(r.model for r in runs):
        present = {r.key for r in runs if r.model == model}
        for a, b in _ordered(pairs):
            if {a, b} <= present:
                diffs[(model, a, b)] = slide_level.compare(avg, model, a, b, settings)
    return diffs


def summarize(runs, folds, avg, baseline: str, diffs, compute=None):
    """One row per model x arm: slide-level AUC, ΔAUC vs the baseline (CI, DeLong p; from
    `diffs`, see :func:`compare_pairs`), the fold-level mean ± std (ddof=1) and the compute
    figures."""
    import pandas as pd

    rows = []
    for model in _ordered(r.model for r in runs):
        for arm in _ordered(r.key for r in runs if r.model == model):
            sel = folds[(folds["arm"] == arm) & (folds["model"] == model)]
            first = next(r for r in runs if r.key == arm and r.model == model)
            row: dict[str, Any] = {"model": model, "arm": arm, "encoder": first.encoder,
                                   "feature_norm": first.feature_norm,
                                   "n_folds": sel["fold"].nunique(),
                                   "n_mil_seeds": sel["mil_seed"].nunique(dropna=False)}  # fmt: skip
            row.update(slide_level.arm_row(avg, model, arm))
            diff = diffs.get((model, arm, baseline), slide_level.Comparison())
            row.update(comparison="" if arm == baseline else baseline, delta_auc=diff.delta_auc,
                       ci_low=diff.ci_low, ci_high=diff.ci_high, p_delong=diff.p_delong)  # fmt: skip
            for m in METRICS:
                row[f"{m}_mean"] = float(sel[m].mean())
                row[f"{m}_std"] = float(sel[m].std(ddof=1)) if len(sel) > 1 else math.nan
            info = (compute or {}).get(arm, {})
            for key in ("params_m", "gflops_per_patch", "patches_per_s"):
                row[key] = float(info[key]) if info.get(key) is not None else math.nan
            rows.append(row)
    return pd.DataFrame(rows)


def comparisons_table(summary, diffs, pairs):
    """ΔAUC(a − b) for each pair of arms (every arm vs the baseline first), per model."""
    import pandas as pd

    label = dict(zip(summary["arm"], summary["encoder"]))
    rows = []
    for model in _ordered(summary["model"]):
        for a, b in pairs:
            c = diffs.get((model, a, b))
            if c is None:  # the model lacks one of the two arms
                continue
            rows.append({"model": model, "arm": a, "comparison": b, "encoder": label[a],
                         "comparison_encoder": label[b], "n_test_slides": c.n_test_slides,
                         "delta_auc": c.delta_auc, "ci_low": c.ci_low, "ci_high": c.ci_high,
                         "p_delong": c.p_delong})  # fmt: skip
    return pd.DataFrame(rows)


def _ordered(values) -> list[str]:
    return list(dict.fromkeys(values))


# ----------------------------------------------------------------------------- plots


def plot_roc(curves: Mapping[str, Any], title: str, path: str | os.PathLike) -> Path:
    """One ROC curve per encoder, ``{name: (fpr, tpr, auc)}``; the legend shows the AUC given
    (the table's). Written atomically with fixed metadata (reproducible bytes)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4.5), dpi=100)
    ax.plot([0, 1], [0, 1], linestyle=":", color="grey", linewidth=1)
    for name, pts in curves.items():
        if pts is None:
            continue
        fpr, tpr, area = pts
        ax.plot(fpr, tpr, linewidth=1.5, label=f"{name} (AUC {area:.3f})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title, fontsize=9)
    if any(pts is not None for pts in curves.values()):
        ax.legend(loc="lower right", fontsize=6)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", metadata={"Software": None})
    plt.close(fig)
    return Path(path)


def _write_roc_plots(out_dir: Path, summary, avg) -> dict[str, Path]:
    """``roc_<model>.png``: each arm's ROC of its fold/seed-averaged slide probabilities."""
    files = {}
    for model in _ordered(summary["model"]):
        curves = {}
        for _, r in summary[summary["model"] == model].iterrows():
            pts = slide_level.roc_curve_points(avg, model, r["arm"])
            curves[r["encoder"]] = None if pts is None else (*pts, r["test_auc"])
        files[model] = plot_roc(
            curves,
            f"{model}: test ROC, each slide's probability averaged over folds and MIL seeds",
            out_dir / f"roc_{model}.png",
        )
    return files


# ----------------------------------------------------------------------------- formatting


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    try:
        value = float(value)
    except (TypeError, ValueError):
        return str(value)
    return "n/a" if not math.isfinite(value) else f"{value:.{digits}f}"


def _signed(value: float) -> str:
    return "n/a" if not math.isfinite(value) else f"{value:+.3f}"


def _ci(row) -> str:
    if not math.isfinite(row["delta_auc"]):
        return "n/a"
    return f"{_signed(row['delta_auc'])} [{_signed(row['ci_low'])}, {_signed(row['ci_high'])}]"


def _pm(row, metric: str) -> str:
    mean, std = row[f"{metric}_mean"], row[f"{metric}_std"]
    return _fmt(mean) + ("" if not math.isfinite(std) else f" ± {_fmt(std)}")


def _markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def results_table(summary, baseline: str) -> str:
    """The headline table, plain text for the terminal (also used in report.md)."""
    header = ["model", "encoder", "slides", "AUC", "ΔAUC vs baseline [95% CI]", "p (DeLong)",
              "fold AUC (mean ± sd)"]  # fmt: skip
    rows = []
    for _, r in summary.iterrows():
        arm = r["arm"] if "arm" in summary.columns else r["encoder"]
        is_base = arm == baseline
        rows.append(
            [
                str(r["model"]),
                str(r["encoder"]) + (" (baseline)" if is_base else ""),
                str(int(r["n_test_slides"])),
                _fmt(r["test_auc"]),
                "" if is_base else _ci(r),
                "" if is_base else _fmt(r["p_delong"]),
                _pm(r, "test_auc"),
            ]
        )
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines)


def read_report_table(out_dir: str | os.PathLike, baseline: str) -> str:
    """The terminal table of an existing report (from ``report.csv``)."""
    import pandas as pd

    path = Path(out_dir) / "report.csv"
    if not path.is_file():
        raise ClamFormatError(path, "report does not exist")
    return results_table(pd.read_csv(path), baseline)


# ----------------------------------------------------------------------------- the report


def write_report(
    out_dir: str | os.PathLike,
    runs: Sequence[ResultRun],
    baseline: str,
    *,
    compute: Mapping[str, Mapping[str, Any]] | None = None,
    stage_seconds: Mapping[str, float] | None = None,
    configs: Mapping[str, Any] | None = None,
    title: str = "clam-mcmkd benchmark",
    pairs: Sequence[tuple[str, str]] | None = None,
    pretext: Mapping[str, Mapping[str, Any]] | None = None,
    report: ReportSettings | None = None,
    note: str = "",
) -> Path:
    """Write ``report.md``, ``report.csv`` (one row per model x arm), ``report_comparisons.csv``
    (ΔAUC of each pair), ``report_slides.csv`` (the averaged slide probabilities),
    ``report_folds.csv`` (per fold, per MIL seed) and ``roc_<model>.png``."""
    out_dir = Path(out_dir)
    settings = report or ReportSettings()
    folds = collect_folds(runs)
    if baseline not in set(folds["arm"]):
        raise ClamMcmkdError(f"baseline encoder '{baseline}' has no results to compare against")
    avg = slide_level.average_over_runs(slide_level.collect_predictions(runs))
    vs_baseline = [(a, baseline) for a in _ordered(r.key for r in runs) if a != baseline]
    pairs = list(pairs) if pairs is not None else vs_baseline
    diffs = compare_pairs(avg, runs, vs_baseline + pairs, settings)
    summary = summarize(runs, folds, avg, baseline, diffs, compute)
    comparisons = comparisons_table(summary, diffs, pairs)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, df in (("report.csv", summary), ("report_comparisons.csv", comparisons),
                     ("report_slides.csv", avg), ("report_folds.csv", folds)):  # fmt: skip
        with atomic_path(out_dir / name) as tmp:
            df.to_csv(tmp, index=False, float_format="%.6g")
    roc_files = _write_roc_plots(out_dir, summary, avg)

    parts = [f"# {title}", ""]
    parts += [f"> {line}" if line else ">" for line in note.strip().splitlines()]
    parts += [""] if note.strip() else []
    parts += _results_section(summary, baseline, settings)
    parts += _comparisons_section(comparisons)
    parts += ["## ROC curves (each test slide's probability averaged over folds and MIL seeds)", ""]
    parts += [f"![{m}]({p.name})" for m, p in roc_files.items()] + [""]
    parts += _pretext_section(pretext or {}, dict(zip(summary["arm"], summary["encoder"])))
    parts += _folds_section(summary)
    parts += _compute_section(summary, compute or {})
    if stage_seconds:
        parts += ["## Wall time per stage", ""]
        rows = [[s, _fmt(t, 1)] for s, t in stage_seconds.items()]
        rows += [["total", _fmt(sum(stage_seconds.values()), 1)]]
        parts += [_markdown_table(["stage", "seconds"], rows), ""]
    if configs:
        parts += ["## Configuration", "", "```json"]
        parts += [json.dumps(to_jsonable(configs), indent=2, sort_keys=True), "```", ""]
    path = out_dir / "report.md"
    atomic_write_text(path, "\n".join(parts))
    return path


def _results_section(summary, baseline: str, settings: ReportSettings) -> list[str]:
    runs = summary.iloc[0]
    norms = ", ".join(sorted(set(summary["feature_norm"])))
    return [
        f"Slide level. Each test slide's probability is averaged over the folds and MIL seeds "
        f"that predicted it ({int(runs['n_folds'])} folds x {int(runs['n_mil_seeds'])} MIL "
        f"seed(s)); AUC is computed once on those probabilities. ΔAUC is against the baseline "
        f"on the same slides, with a {settings.confidence:.0%} CI from a paired, "
        f"label-stratified bootstrap of the test slides ({settings.n_resamples} resamples, "
        f"seed {settings.seed}) and DeLong's two-sided p for correlated AUCs. MIL inputs: "
        f"feature_norm = {norms}. Fold AUC (mean ± sd over folds and seeds) is training noise "
        "on the same slides, not a measure of test uncertainty.",
        "",
        "```",
        results_table(summary, baseline),
        "```",
        "",
    ]


def _comparisons_section(comparisons) -> list[str]:
    if comparisons.empty:
        return []
    rows = [
        [r["model"], f"{r['arm']} − {r['comparison']}", _ci(r), _fmt(r["p_delong"]),
         int(r["n_test_slides"])]
        for _, r in comparisons.iterrows()
    ]  # fmt: skip
    return [
        "## Comparisons (ΔAUC, slide level)",
        "",
        _markdown_table(["model", "arms", "ΔAUC [95% CI]", "p (DeLong)", "slides"], rows),
        "",
    ]


def _pretext_section(pretext: Mapping[str, Mapping[str, Any]], labels: dict) -> list[str]:
    """Did each fine-tune learn, and did its student? Validation R² of the predictions of the
    teacher's features (standardised) before and after, against predicting the training mean
    (<= 0); and the student's own probes (``finetune``'s ``student_*_r2``), because the
    pretext R² can be the context predictor's alone."""
    if not pretext:
        return []
    rows = [
        [arm, labels.get(arm, arm), _fmt(m.get("val_r2_before")), _fmt(m.get("val_r2_after")),
         _fmt(m.get("val_r2_mean_baseline")),
         f"{_fmt(m.get('student_teacher_r2_before'))} → {_fmt(m.get('student_teacher_r2_after'))}",
         f"{_fmt(m.get('student_context_r2_before'))} → {_fmt(m.get('student_context_r2_after'))}",
         m.get("steps", "n/a")]
        for arm, m in pretext.items()
    ]  # fmt: skip
    return [
        "## Fine-tuning pretext (held-out windows)",
        "",
        "R² of the predicted teacher features (standardised) of the scored positions; "
        "predicting the training mean scores <= 0, so an R² near 0 after training means the "
        "pretext did not learn. A rising R² can be the context predictor's alone: the student "
        "columns say whether the student itself moved towards the teacher (held-out ridge R² "
        "of a patch's teacher feature, and of its window neighbours' mean, from the student's "
        "feature of that patch; before → after).",
        "",
        _markdown_table(
            [
                "arm",
                "encoder",
                "R² before",
                "R² after",
                "R² of the mean",
                "student → teacher",
                "student → context",
                "steps",
            ],
            rows,
        ),  # fmt: skip
        "",
    ]


def _folds_section(summary) -> list[str]:
    rows = [
        [r["model"], r["encoder"], int(r["n_folds"]), int(r["n_mil_seeds"])]
        + [_pm(r, m) for m in METRICS]
        for _, r in summary.iterrows()
    ]
    return [
        "## Per fold and MIL seed (their spread is training noise, not test uncertainty)",
        "",
        _markdown_table(
            [
                "model",
                "encoder",
                "folds",
                "MIL seeds",
                "test AUC",
                "test acc",
                "val AUC",
                "val acc",
            ],
            rows,
        ),  # fmt: skip
        "",
    ]


def _compute_section(summary, compute: Mapping[str, Mapping[str, Any]]) -> list[str]:
    rows = []
    for arm, encoder in dict(zip(summary["arm"], summary["encoder"])).items():
        info = compute.get(arm, {})
        rows.append([encoder, _fmt(info.get("params_m"), 2), _fmt(info.get("gflops_per_patch"), 2),
                     _fmt(info.get("patches_per_s"), 1)])  # fmt: skip
    return [
        "## Compute",
        "",
        _markdown_table(
            ["encoder", "parameters (M)", "GFLOPs / patch", "patches/s (extraction)"], rows
        ),
        "",
    ]
