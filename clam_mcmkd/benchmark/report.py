"""The benchmark report: encoders x MIL models, compared on the same folds.

Inputs are CLAM results directories (``summary.csv`` + ``split_<k>_results.pkl``), so a report
can be made from runs of CLAM's own ``main.py`` as well as ours. Outputs are deterministic
(no dates, fixed plot metadata): rewriting a report from the same inputs gives the same files.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..clam.formats import (
    SUMMARY_NAME,
    ClamFormatError,
    fold_results_path,
    read_pkl,
    read_summary,
)
from ..utils import ClamMcmkdError, atomic_path, atomic_write_text, to_jsonable

METRICS = ("test_auc", "test_acc", "val_auc", "val_acc")
PAIRED_METRICS = ("test_auc", "test_acc")


@dataclass(frozen=True)
class ResultRun:
    """One MIL model trained on one encoder's features: where its CLAM results live."""

    encoder: str
    model: str
    results_dir: Path


# ----------------------------------------------------------------------------- collecting


def collect_folds(runs: Sequence[ResultRun]):
    """Per-fold rows (encoder, model, fold, test_auc, test_acc, val_auc, val_acc)."""
    import pandas as pd

    frames = []
    for run in runs:
        df = read_summary(Path(run.results_dir) / SUMMARY_NAME)
        frame = pd.DataFrame(
            {
                "encoder": run.encoder,
                "model": run.model,
                "fold": df["folds"].astype(int),
                **{m: df[m].astype(float) for m in METRICS},
            }
        )
        frames.append(frame)
    if not frames:
        raise ClamMcmkdError("no results to report")
    return pd.concat(frames, ignore_index=True)


def wilcoxon_p(differences: Sequence[float]) -> float:
    """Two-sided Wilcoxon signed-rank p-value; NaN when it is undefined (fewer than 2 pairs)."""
    from scipy.stats import wilcoxon

    diffs = np.asarray([d for d in differences if np.isfinite(d)], dtype=float)
    if len(diffs) < 2:
        return math.nan
    if np.allclose(diffs, 0.0):
        return 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return float(wilcoxon(diffs).pvalue)
        except ValueError:
            return math.nan


def paired_differences(folds, baseline: str):
    """Per-fold ``encoder - baseline`` for each paired metric, matched on (model, fold)."""
    import pandas as pd

    base = folds[folds["encoder"] == baseline].set_index(["model", "fold"])
    rows = []
    for rec in folds[folds["encoder"] != baseline].itertuples(index=False):
        key = (rec.model, rec.fold)
        if key not in base.index:
            continue
        row = {"encoder": rec.encoder, "model": rec.model, "fold": rec.fold}
        for m in PAIRED_METRICS:
            row[f"delta_{m}"] = getattr(rec, m) - float(base.loc[key, m])
        rows.append(row)
    columns = ["encoder", "model", "fold"] + [f"delta_{m}" for m in PAIRED_METRICS]
    return pd.DataFrame(rows, columns=columns)


def summarize(
    folds,
    baseline: str,
    compute: Mapping[str, Mapping[str, Any]] | None = None,
    encoder_order: Sequence[str] | None = None,
    model_order: Sequence[str] | None = None,
):
    """One row per encoder x model: mean/std (ddof=1) of each metric and the paired tests."""
    import pandas as pd

    diffs = paired_differences(folds, baseline)
    encoders = _ordered(folds["encoder"], encoder_order)
    models = _ordered(folds["model"], model_order)
    rows = []
    for model in models:
        for encoder in encoders:
            sel = folds[(folds["encoder"] == encoder) & (folds["model"] == model)]
            if sel.empty:
                continue
            row: dict[str, Any] = {"encoder": encoder, "model": model, "n_folds": len(sel)}
            for m in METRICS:
                row[f"{m}_mean"] = float(sel[m].mean())
                row[f"{m}_std"] = float(sel[m].std(ddof=1)) if len(sel) > 1 else math.nan
            d = diffs[(diffs["encoder"] == encoder) & (diffs["model"] == model)]
            for m in PAIRED_METRICS:
                values = d[f"delta_{m}"].to_numpy() if encoder != baseline else np.array([])
                row[f"delta_{m}_mean"] = float(values.mean()) if len(values) else math.nan
                row[f"wilcoxon_p_{m}"] = wilcoxon_p(values)
            info = (compute or {}).get(encoder, {})
            for key in ("params_m", "gflops_per_patch", "patches_per_s"):
                row[key] = float(info[key]) if info.get(key) is not None else math.nan
            rows.append(row)
    return pd.DataFrame(rows)


def _ordered(values, order: Sequence[str] | None) -> list[str]:
    present = list(dict.fromkeys(values))
    first = [v for v in (order or []) if v in present]
    return first + [v for v in present if v not in first]


def load_test_predictions(results_dir: str | os.PathLike, folds: Sequence[int]):
    """Pooled test-set (labels, probabilities (N, C)) from CLAM's ``split_<k>_results.pkl``."""
    labels, probs = [], []
    for fold in folds:
        path = fold_results_path(results_dir, fold)
        if not path.is_file():
            raise ClamFormatError(path, "per-fold predictions file does not exist")
        try:
            results = read_pkl(path)
        except Exception as err:  # noqa: BLE001 - pickle raises many types
            raise ClamFormatError(path, f"not a readable pickle ({err})") from err
        if not isinstance(results, Mapping):
            raise ClamFormatError(
                path, f"expected {{slide_id: {{prob, label}}}}, got {type(results).__name__}"
            )
        for slide_id, rec in results.items():
            try:
                prob = np.asarray(rec["prob"], dtype=float).reshape(-1)
                label = int(np.asarray(rec["label"]).reshape(-1)[0])
            except (KeyError, TypeError, ValueError, IndexError) as err:
                raise ClamFormatError(
                    path, f"slide {slide_id!r}: no usable 'prob'/'label' ({err})"
                ) from err
            probs.append(prob)
            labels.append(label)
    if not probs:
        return np.zeros(0, dtype=int), np.zeros((0, 2))
    width = {len(p) for p in probs}
    if len(width) != 1:
        raise ClamFormatError(
            results_dir, f"predictions have differing class counts {sorted(width)}"
        )
    return np.asarray(labels, dtype=int), np.stack(probs)


def roc_points(labels: np.ndarray, probs: np.ndarray):
    """(fpr, tpr, auc): class 1 vs rest for two classes, micro-averaged one-vs-rest otherwise."""
    from sklearn.metrics import auc, roc_curve

    if len(labels) == 0 or len(np.unique(labels)) < 2:
        return None
    if probs.shape[1] == 2:
        y, score = labels == 1, probs[:, 1]
    else:
        y = (labels[:, None] == np.arange(probs.shape[1])[None, :]).ravel()
        score = probs.ravel()
    fpr, tpr, _ = roc_curve(y, score)
    return fpr, tpr, float(auc(fpr, tpr))


def plot_roc(curves: Mapping[str, Any], title: str, path: str | os.PathLike) -> Path:
    """One ROC curve per encoder; written atomically with fixed metadata (reproducible bytes)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=100)
    ax.plot([0, 1], [0, 1], linestyle=":", color="grey", linewidth=1)
    for name, pts in curves.items():
        if pts is None:
            continue
        fpr, tpr, area = pts
        ax.plot(fpr, tpr, linewidth=1.5, label=f"{name} (pooled AUC {area:.3f})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title, fontsize=10)
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", metadata={"Software": None})
    plt.close(fig)
    return Path(path)


# ----------------------------------------------------------------------------- formatting


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    try:
        value = float(value)
    except (TypeError, ValueError):
        return str(value)
    return "n/a" if not math.isfinite(value) else f"{value:.{digits}f}"


def _pm(row, metric: str) -> str:
    mean, std = row[f"{metric}_mean"], row[f"{metric}_std"]
    return _fmt(mean) + ("" if not math.isfinite(std) else f" ± {_fmt(std)}")


def _markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def results_table(summary, baseline: str) -> str:
    """The headline table, plain text for the terminal (also used in report.md)."""
    header = ["model", "encoder", "folds", "test AUC", "test acc", "ΔAUC vs base", "p (Wilcoxon)"]
    rows = []
    for _, r in summary.iterrows():
        is_base = r["encoder"] == baseline
        rows.append(
            [
                r["model"],
                r["encoder"] + (" (baseline)" if is_base else ""),
                str(int(r["n_folds"])),
                _pm(r, "test_auc"),
                _pm(r, "test_acc"),
                "" if is_base else _signed(r["delta_test_auc_mean"]),
                "" if is_base else _fmt(r["wilcoxon_p_test_auc"]),
            ]
        )
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)


def _signed(value: float) -> str:
    return "n/a" if not math.isfinite(value) else f"{value:+.3f}"


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
    encoder_order: Sequence[str] | None = None,
) -> Path:
    """Write ``report.md``, ``report.csv``, ``report_folds.csv`` and ``roc_<model>.png``."""
    out_dir = Path(out_dir)
    folds = collect_folds(runs)
    if baseline not in set(folds["encoder"]):
        raise ClamMcmkdError(f"baseline encoder '{baseline}' has no results to compare against")
    model_order = list(dict.fromkeys(r.model for r in runs))
    summary = summarize(folds, baseline, compute, encoder_order, model_order)
    diffs = paired_differences(folds, baseline)

    with atomic_path(out_dir / "report.csv") as tmp:
        summary.to_csv(tmp, index=False, float_format="%.6g")
    with atomic_path(out_dir / "report_folds.csv") as tmp:
        folds.sort_values(["model", "encoder", "fold"]).to_csv(
            tmp, index=False, float_format="%.6g"
        )
    roc_files = _write_roc_plots(out_dir, runs, folds, model_order, encoder_order)

    parts = [f"# {title}", ""]
    parts += _results_section(summary, baseline)
    parts += _paired_section(summary, diffs, baseline)
    parts += ["## ROC curves (test sets pooled over folds)", ""]
    parts += [f"![{m}]({p.name})" for m, p in roc_files.items()]
    parts += _compute_section(_ordered(folds["encoder"], encoder_order), compute or {})
    if stage_seconds:
        parts += ["## Wall time per stage", ""]
        parts += [
            _markdown_table(
                ["stage", "seconds"],
                [[s, _fmt(t, 1)] for s, t in stage_seconds.items()]
                + [["total", _fmt(sum(stage_seconds.values()), 1)]],
            ),
            "",
        ]
    if configs:
        parts += ["## Configuration", "", "```json"]
        parts += [json.dumps(to_jsonable(configs), indent=2, sort_keys=True), "```", ""]
    report = out_dir / "report.md"
    atomic_write_text(report, "\n".join(parts))
    return report


def _write_roc_plots(out_dir: Path, runs, folds, model_order, encoder_order) -> dict[str, Path]:
    """One ``roc_<model>.png`` per MIL model: every encoder's test ROC, pooled over folds."""
    roc_files = {}
    for model in model_order:
        curves = {}
        for run in runs:
            if run.model != model:
                continue
            fold_ids = folds[(folds["encoder"] == run.encoder) & (folds["model"] == model)]["fold"]
            labels, probs = load_test_predictions(run.results_dir, fold_ids.tolist())
            curves[run.encoder] = roc_points(labels, probs)
        order = _ordered(list(curves), encoder_order)
        roc_files[model] = plot_roc(
            {e: curves[e] for e in order},
            f"{model}: test ROC, pooled over folds",
            out_dir / f"roc_{model}.png",
        )
    return roc_files


def _results_section(summary, baseline: str) -> list[str]:
    return [
        f"Baseline encoder: `{baseline}`. Mean ± standard deviation over folds; ΔAUC is the mean "
        "per-fold difference to the baseline on the same fold, p the two-sided Wilcoxon "
        "signed-rank test of those differences (n/a with fewer than two folds).",
        "",
        "```",
        results_table(summary, baseline),
        "```",
        "",
        "## Results",
        "",
        _markdown_table(
            ["model", "encoder", "folds", "test AUC", "test acc", "val AUC", "val acc"],
            [
                [r["model"], r["encoder"], int(r["n_folds"])]
                + [_pm(r, m) for m in ("test_auc", "test_acc", "val_auc", "val_acc")]
                for _, r in summary.iterrows()
            ],
        ),
        "",
    ]


def _paired_section(summary, diffs, baseline: str) -> list[str]:
    paired_rows = []
    for _, r in summary[summary["encoder"] != baseline].iterrows():
        d = diffs[(diffs["encoder"] == r["encoder"]) & (diffs["model"] == r["model"])]
        per_fold = ", ".join(f"{_signed(v)}" for v in d["delta_test_auc"])
        paired_rows.append(
            [
                r["model"],
                r["encoder"],
                _signed(r["delta_test_auc_mean"]),
                _fmt(r["wilcoxon_p_test_auc"]),
                _signed(r["delta_test_acc_mean"]),
                _fmt(r["wilcoxon_p_test_acc"]),
                per_fold or "n/a",
            ]
        )
    return [
        "## Paired differences against the baseline",
        "",
        _markdown_table(
            ["model", "encoder", "ΔAUC", "p", "Δacc", "p", "ΔAUC per fold"], paired_rows
        ),
        "",
    ]


def _compute_section(encoders: list[str], compute: Mapping[str, Mapping[str, Any]]) -> list[str]:
    return [
        "",
        "## Compute",
        "",
        _markdown_table(
            ["encoder", "parameters (M)", "GFLOPs / patch", "patches/s (extraction)"],
            [
                [
                    e,
                    _fmt(compute.get(e, {}).get("params_m"), 2),
                    _fmt(compute.get(e, {}).get("gflops_per_patch"), 2),
                    _fmt(compute.get(e, {}).get("patches_per_s"), 1),
                ]
                for e in encoders
            ],
        ),
        "",
    ]


def read_report_table(out_dir: str | os.PathLike, baseline: str) -> str:
    """The terminal table of an existing report (from ``report.csv``)."""
    import pandas as pd

    path = Path(out_dir) / "report.csv"
    if not path.is_file():
        raise ClamFormatError(path, "report does not exist")
    return results_table(pd.read_csv(path), baseline)
