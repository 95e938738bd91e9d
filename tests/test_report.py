"""The benchmark report on synthetic CLAM results directories (fast: no models).

Slide-level statistics are recomputed here from the same files by another route (pandas
averaging, scikit-learn's AUC) and compared with report.csv; DeLong and the bootstrap
themselves are tested against known cases in test_stats.py.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import auc as trapezoid_auc
from sklearn.metrics import roc_auc_score

from clam_mcmkd.benchmark import stats
from clam_mcmkd.benchmark.report import ResultRun, read_report_table, write_report
from clam_mcmkd.benchmark.slide_level import (
    average_over_runs,
    collect_predictions,
    read_fold_predictions,
    roc_curve_points,
)
from clam_mcmkd.clam.formats import ClamFormatError, read_pkl, write_pkl, write_summary

ENCODERS = ("resnet50_trunc", "teacher_vit", "mcmkd_resnet50")
MODELS = ("abmil", "clam_sb")


def _write_results(results_dir, fold_metrics, n_test=12, seed=0, separation=1.0, fixed_test=False):
    """CLAM layout: summary.csv + split_<k>_results.pkl with {slide_id: {slide_id, prob, label}};
    `fixed_test`: every fold predicts the same slides (else each fold its own)."""
    rng = np.random.default_rng(seed)
    rows = []
    for fold, (test_auc, test_acc) in enumerate(fold_metrics):
        rows.append(
            {
                "folds": fold,
                "test_auc": test_auc,
                "val_auc": 0.5,
                "test_acc": test_acc,
                "val_acc": 0.5,
            }
        )
        results = {}
        for i in range(n_test):
            label = i % 2
            p1 = 1.0 / (1.0 + math.exp(-(separation * (2 * label - 1) + rng.normal())))
            sid = f"slide_{i}" if fixed_test else f"slide_{fold}_{i}"
            results[sid] = {
                "slide_id": np.array(sid),
                "prob": np.array([[1 - p1, p1]]),
                "label": label,
            }
        write_pkl(results_dir / f"split_{fold}_results.pkl", results)
    write_summary(results_dir, rows)


@pytest.fixture()
def runs(tmp_path):
    rng = np.random.default_rng(1)
    base_auc = rng.uniform(0.6, 0.8, size=5)
    shift = {"resnet50_trunc": 0.0, "teacher_vit": 0.05, "mcmkd_resnet50": 0.1}
    out = []
    for m, model in enumerate(MODELS):
        for e, enc in enumerate(ENCODERS):
            d = tmp_path / "results" / enc / model
            d.mkdir(parents=True)
            noise = rng.normal(0, 0.02, size=5)
            aucs = np.clip(base_auc + shift[enc] + noise, 0, 1)
            accs = np.clip(aucs - 0.1, 0, 1)
            _write_results(d, list(zip(aucs, accs)), seed=10 * m + e, separation=1 + e)
            out.append(ResultRun(enc, model, d))
    return out


def test_report_numbers_match_the_inputs(tmp_path, runs):
    out = tmp_path / "report"
    report = write_report(
        out,
        runs,
        "resnet50_trunc",
        compute={
            "resnet50_trunc": {"params_m": 8.5, "gflops_per_patch": 6.4, "patches_per_s": 9.1}
        },
        stage_seconds={"tile": 1.5, "finetune": 10.0},
        configs={"k": 5},
    )
    df = pd.read_csv(out / "report.csv")
    assert len(df) == len(ENCODERS) * len(MODELS)
    assert set(zip(df["encoder"], df["model"])) == {(e, m) for e in ENCODERS for m in MODELS}
    for run in runs:
        summary = pd.read_csv(run.results_dir / "summary.csv")
        row = df[(df["encoder"] == run.encoder) & (df["model"] == run.model)].iloc[0]
        assert row["test_auc_mean"] == pytest.approx(summary["test_auc"].mean(), abs=1e-5)
        assert row["test_auc_std"] == pytest.approx(summary["test_auc"].std(ddof=1), abs=1e-5)
        assert row["test_acc_mean"] == pytest.approx(summary["test_acc"].mean(), abs=1e-5)
        # slide level: every test slide once (each fold its own slides here), scored by sklearn
        y, p = _slide_probs(run)
        assert row["n_test_slides"] == len(y) == 60
        assert row["test_auc"] == pytest.approx(roc_auc_score(y, p), abs=1e-5)
        if run.encoder == "resnet50_trunc":
            assert math.isnan(row["delta_auc"]) and math.isnan(row["p_delong"])
            continue
        base = next(r for r in runs if r.encoder == "resnet50_trunc" and r.model == run.model)
        y_b, p_b = _slide_probs(base)
        assert (y_b == y).all()
        assert row["delta_auc"] == pytest.approx(
            roc_auc_score(y, p) - roc_auc_score(y, p_b), abs=1e-5
        )
        assert row["p_delong"] == pytest.approx(stats.delong_test(y, p, p_b).p, rel=1e-4)
        boot = stats.paired_bootstrap_delta_auc(y, p, p_b, n_resamples=2000, seed=0)
        assert (row["ci_low"], row["ci_high"]) == pytest.approx(
            (boot.ci_low, boot.ci_high), abs=1e-5
        )
        assert row["ci_low"] <= row["delta_auc"] <= row["ci_high"]
        assert row["comparison"] == "resnet50_trunc"
    # baseline compute figures reach the table; the others are unknown, not invented
    base_row = df[df["encoder"] == "resnet50_trunc"].iloc[0]
    assert base_row["gflops_per_patch"] == pytest.approx(6.4)
    assert df[df["encoder"] == "teacher_vit"]["params_m"].isna().all()

    text = report.read_text()
    for model in MODELS:
        png = out / f"roc_{model}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"roc_{model}.png" in text
    assert "finetune" in text and '"k": 5' in text
    table = read_report_table(out, "resnet50_trunc")
    assert table.count("\n") == 1 + len(df)  # header, rule, one line per row
    assert "mcmkd_resnet50" in table and "(baseline)" in table
    assert "Wilcoxon" not in text and "wilcoxon" not in " ".join(df.columns)
    comparisons = pd.read_csv(out / "report_comparisons.csv")
    assert len(comparisons) == (len(ENCODERS) - 1) * len(MODELS)  # every arm vs the baseline
    assert (df["feature_norm"] == "none").all()  # no train_config.json: CLAM's raw features


def _slide_probs(run):
    """(labels, class-1 probability) per slide, averaged over folds with pandas, sorted by id."""
    rows = []
    for pkl in sorted(run.results_dir.glob("split_*_results.pkl")):
        for sid, rec in read_pkl(pkl).items():
            rows.append({"slide_id": sid, "y": rec["label"], "p": float(rec["prob"][0, 1])})
    df = pd.DataFrame(rows).groupby("slide_id").agg(y=("y", "first"), p=("p", "mean"))
    return df["y"].to_numpy(), df["p"].to_numpy()


def test_report_is_byte_identical_when_rewritten(tmp_path, runs):
    first = tmp_path / "a"
    write_report(first, runs, "resnet50_trunc", stage_seconds={"tile": 1.0})
    before = {p.name: p.read_bytes() for p in first.iterdir()}
    write_report(first, runs, "resnet50_trunc", stage_seconds={"tile": 1.0})
    after = {p.name: p.read_bytes() for p in first.iterdir()}
    assert before == after
    assert not [p for p in first.iterdir() if p.name.startswith(".")]  # no temp files left


def test_predictions_and_errors(tmp_path, runs):
    preds = collect_predictions([runs[0]])
    assert len(preds) == 60 and preds["fold"].nunique() == 5  # 12 test slides x 5 folds
    assert np.allclose(preds["p_0"] + preds["p_1"], 1.0)
    assert len(read_fold_predictions(runs[0].results_dir, 0)) == 12
    with pytest.raises(ClamFormatError, match="split_9_results.pkl"):
        read_fold_predictions(runs[0].results_dir, 9)
    with pytest.raises(Exception, match="baseline encoder 'nope'"):
        write_report(tmp_path / "x", runs, "nope")


def test_fixed_test_set_is_averaged_over_folds_and_seeds_and_the_roc_matches_the_table(tmp_path):
    """Every fold and MIL seed predicts the same 12 slides: each slide counts once, with the
    mean of its 3 x 2 probabilities; the ROC drawn is of those (its AUC = the table's)."""
    runs = []
    for e, enc in enumerate(("base", "tuned")):
        for seed in (1, 2):
            d = tmp_path / enc / f"abmil_s{seed}"
            d.mkdir(parents=True)
            _write_results(d, [(0.7, 0.6)] * 3, seed=10 * e + seed, separation=1 + e,
                           fixed_test=True)  # fmt: skip
            runs.append(ResultRun(f"{enc}(resnet)", "abmil", d, arm=enc, mil_seed=seed))
    write_report(tmp_path / "r", runs, "base")
    df = pd.read_csv(tmp_path / "r" / "report.csv").set_index("arm")
    assert (df["n_test_slides"] == 12).all() and (df["n_folds"] == 3).all()
    assert (df["n_mil_seeds"] == 2).all() and df.loc["tuned", "encoder"] == "tuned(resnet)"
    slides = pd.read_csv(tmp_path / "r" / "report_slides.csv")
    assert (slides["n_runs"] == 6).all() and len(slides) == 24
    for arm in ("base", "tuned"):
        probs = [
            (sid, rec["label"], float(rec["prob"][0, 1]))
            for run in runs if run.arm == arm
            for pkl in run.results_dir.glob("split_*_results.pkl")
            for sid, rec in read_pkl(pkl).items()
        ]  # fmt: skip
        avg = pd.DataFrame(probs, columns=["s", "y", "p"]).groupby("s").mean()
        assert df.loc[arm, "test_auc"] == pytest.approx(roc_auc_score(avg["y"], avg["p"]), abs=1e-5)
        averaged = average_over_runs(collect_predictions([r for r in runs if r.arm == arm]))
        fpr, tpr = roc_curve_points(averaged, "abmil", arm)
        assert trapezoid_auc(fpr, tpr) == pytest.approx(df.loc[arm, "test_auc"], abs=1e-5)


def test_identical_arms_and_undefined_statistics(tmp_path):
    """The same predictions under two names: ΔAUC 0, CI [0, 0], p 1. A test set with one
    class: no AUC, no ΔAUC (n/a), not a crash."""
    d = tmp_path / "a"
    d.mkdir()
    _write_results(d, [(0.7, 0.6), (0.8, 0.7)])
    same = [ResultRun("base", "abmil", d), ResultRun("copy", "abmil", d)]
    write_report(tmp_path / "r", same, "base")
    row = pd.read_csv(tmp_path / "r" / "report.csv").set_index("arm").loc["copy"]
    assert (row["delta_auc"], row["ci_low"], row["ci_high"], row["p_delong"]) == (0, 0, 0, 1)

    one_class = tmp_path / "b"
    one_class.mkdir()
    write_pkl(one_class / "split_0_results.pkl",
              {f"s{i}": {"prob": np.array([[0.4, 0.6]]), "label": 1} for i in range(4)})  # fmt: skip
    write_summary(one_class, [{"folds": 0, "test_auc": math.nan, "val_auc": math.nan,
                               "test_acc": 1.0, "val_acc": math.nan}])  # fmt: skip
    runs = [ResultRun("base", "abmil", one_class), ResultRun("copy", "abmil", one_class)]
    write_report(tmp_path / "r1", runs, "base")
    row = pd.read_csv(tmp_path / "r1" / "report.csv").set_index("arm").loc["copy"]
    assert math.isnan(row["test_auc"]) and math.isnan(row["delta_auc"])
    assert "n/a" in read_report_table(tmp_path / "r1", "base")


def test_single_fold_has_no_std_and_no_test(tmp_path):
    runs = []
    for enc in ("resnet50_trunc", "mcmkd_resnet50"):
        d = tmp_path / enc
        d.mkdir()
        _write_results(d, [(0.7, 0.6)])
        runs.append(ResultRun(enc, "abmil", d))
    write_report(tmp_path / "r", runs, "resnet50_trunc")
    df = pd.read_csv(tmp_path / "r" / "report.csv")
    # no spread over one fold; the slide-level statistics need slides, not folds
    assert df["test_auc_std"].isna().all()
    assert np.isfinite(df.set_index("arm").loc["mcmkd_resnet50", ["delta_auc", "p_delong"]]).all()
    assert "n/a" in (tmp_path / "r" / "report.md").read_text()
