"""The benchmark report on synthetic CLAM results directories (fast: no models)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy.stats import wilcoxon

from clam_mcmkd.benchmark.report import (
    ResultRun,
    load_test_predictions,
    read_report_table,
    wilcoxon_p,
    write_report,
)
from clam_mcmkd.clam.formats import ClamFormatError, write_pkl, write_summary

ENCODERS = ("resnet50_trunc", "teacher_vit", "mcmkd_resnet50")
MODELS = ("abmil", "clam_sb")


def _write_results(results_dir, fold_metrics, n_test=12, seed=0, separation=1.0):
    """CLAM layout: summary.csv + split_<k>_results.pkl with {slide_id: {slide_id, prob, label}}."""
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
            sid = f"slide_{fold}_{i}"
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
        if run.encoder == "resnet50_trunc":
            assert math.isnan(row["wilcoxon_p_test_auc"])
            continue
        base = pd.read_csv(
            next(
                r for r in runs if r.encoder == "resnet50_trunc" and r.model == run.model
            ).results_dir
            / "summary.csv"
        )
        diffs = summary["test_auc"] - base["test_auc"]
        assert row["delta_test_auc_mean"] == pytest.approx(diffs.mean(), abs=1e-5)
        assert row["wilcoxon_p_test_auc"] == pytest.approx(wilcoxon(diffs).pvalue, rel=1e-4)
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


def test_report_is_byte_identical_when_rewritten(tmp_path, runs):
    first = tmp_path / "a"
    write_report(first, runs, "resnet50_trunc", stage_seconds={"tile": 1.0})
    before = {p.name: p.read_bytes() for p in first.iterdir()}
    write_report(first, runs, "resnet50_trunc", stage_seconds={"tile": 1.0})
    after = {p.name: p.read_bytes() for p in first.iterdir()}
    assert before == after
    assert not [p for p in first.iterdir() if p.name.startswith(".")]  # no temp files left


def test_pooled_predictions_and_errors(tmp_path, runs):
    labels, probs = load_test_predictions(runs[0].results_dir, [0, 1, 2])
    assert labels.shape == (36,) and probs.shape == (36, 2)
    assert np.allclose(probs.sum(1), 1.0)
    with pytest.raises(ClamFormatError, match="split_9_results.pkl"):
        load_test_predictions(runs[0].results_dir, [9])
    with pytest.raises(Exception, match="baseline encoder 'nope'"):
        write_report(tmp_path / "x", runs, "nope")


def test_wilcoxon_edge_cases():
    assert math.isnan(wilcoxon_p([]))
    assert math.isnan(wilcoxon_p([0.3]))
    assert wilcoxon_p([0.0, 0.0, 0.0]) == 1.0
    assert 0 < wilcoxon_p([0.1, 0.2, 0.3, 0.15, 0.05]) < 0.1


def test_single_fold_has_no_std_and_no_test(tmp_path):
    runs = []
    for enc in ("resnet50_trunc", "mcmkd_resnet50"):
        d = tmp_path / enc
        d.mkdir()
        _write_results(d, [(0.7, 0.6)])
        runs.append(ResultRun(enc, "abmil", d))
    write_report(tmp_path / "r", runs, "resnet50_trunc")
    df = pd.read_csv(tmp_path / "r" / "report.csv")
    assert df["test_auc_std"].isna().all() and df["wilcoxon_p_test_auc"].isna().all()
    assert "n/a" in (tmp_path / "r" / "report.md").read_text()
