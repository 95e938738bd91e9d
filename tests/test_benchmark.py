"""`clam-mcmkd demo` / `benchmark` end to end at the smallest size: report, resume, rerun."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

from clam_mcmkd.benchmark.arms import arm_label
from clam_mcmkd.benchmark.config import (
    NAMED_CONFIGS,
    BenchmarkConfigError,
    config_from_dict,
    load_config,
    with_overrides,
)
from clam_mcmkd.benchmark.demo import DemoConfig, benchmark_config, resolve, run_demo
from clam_mcmkd.benchmark.run import BenchmarkError, run_benchmark
from clam_mcmkd.cli import main
from clam_mcmkd.mil.config import TrainConfig

REPORT_FILES = ("report.md", "report.csv", "report_folds.csv")


# ----------------------------------------------------------------------------- configs (fast)


def test_named_configs_load_and_differ_where_the_datasets_do():
    cfgs = {name: load_config(name) for name in NAMED_CONFIGS}
    assert cfgs["camelyon16"].splits.fixed_test_column == "split"
    assert cfgs["camelyon16"].label_dict == {"normal": 0, "tumor": 1}
    assert cfgs["tcga_nsclc"].splits.patient_strat and cfgs["tcga_nsclc"].splits.k == 10
    assert cfgs["tcga_nsclc"].label_dict == {"LUAD": 0, "LUSC": 1}
    for cfg in cfgs.values():
        assert cfg.arm_names[0] == cfg.baseline == "untuned"
        assert cfg.arm_names == ["untuned", "mcmkd", "patch_kd", "teacher"]
        assert cfg.pairs[-1] == ("mcmkd", "patch_kd") and len(cfg.pairs) == 4
        assert cfg.mil.feature_norm == "zscore" and cfg.report.n_resamples == 2000
    assert cfgs["demo"].pretrained is False
    for name in ("camelyon16", "tcga_nsclc"):  # named for what they are
        labels = [arm_label(cfgs[name], a) for a in cfgs[name].arms]
        assert labels == ["resnet50_trunc", "mcmkd(resnet50_trunc←uni_v1)",
                          "patch_kd(resnet50_trunc←uni_v1)", "uni_v1"]  # fmt: skip
    assert TrainConfig.feature_norm == "none"  # `train` keeps CLAM's raw features by default


def test_arms_are_checked_and_named_for_what_they_are(tmp_path):
    """A config's arms: errors name the arm and key; labels never claim another architecture
    (a ResNet-18 student is no "mcmkd_resnet50"); controls are more arms."""
    cases = [
        ({"arms": [{"kind": "untuned"}]}, "arm 0 has no 'name'"),
        ({"arms": [{"name": "a", "kind": "magic"}]}, "arm 'a': kind must be one of"),
        ({"arms": [{"name": "a", "objective": "mae"}]}, "arm 'a': objective must be one of"),
        ({"arms": [{"name": "a b", "kind": "untuned"}]}, "arm 'a b': a name is letters"),
        ({"arms": [{"name": "a", "kind": "untuned"}] * 2}, "arm names must be unique"),
        ({"baseline": "nope"}, r"baseline 'nope' is not an arm"),
        ({"comparisons": [["mcmkd", "sham"]]}, "comparisons takes pairs of two different arms"),
        ({"mil": {"feature_norm": "l2"}}, "mil.feature_norm must be one of"),
        ({"arms": [{"name": "a", "kind": "untuned", "teachr": "x"}]}, r"\['teachr'\] in arm 0"),
    ]
    for data, message in cases:
        with pytest.raises(BenchmarkConfigError, match=message):
            config_from_dict(data, "x.yaml")
    from clam_mcmkd.benchmark.proxy_pretrain import FitConfig, save_random_encoder

    save_random_encoder(tmp_path / "rand.pt", FitConfig(arch="resnet18_trunc", steps=0))
    cfg = with_overrides(
        load_config("demo"), ckpt_dir=str(tmp_path),
        arms=[{"name": "untuned", "kind": "untuned"},
              {"name": "sham", "kind": "finetune", "targets": "sham"},
              {"name": "random_teacher", "kind": "finetune", "teacher": "checkpoint",
               "teacher_ckpt": "rand.pt"},
              {"name": "uni", "kind": "encoder", "encoder": "uni2_h"}],
        **{"finetune.student_ckpt": "rand.pt", "finetune.teacher": "vit_tiny_patch16_224"},
    )  # fmt: skip
    cfg.finetune.teacher_ckpt = None  # (an override of None means "not given")
    labels = [arm_label(cfg, a) for a in cfg.arms]
    assert labels == ["resnet18_trunc[rand]", "mcmkd+sham(resnet18_trunc[rand]←vit_tiny_patch16_224[random])",
                      "mcmkd(resnet18_trunc[rand]←resnet18_trunc[rand])", "uni2_h[random]"]  # fmt: skip
    assert cfg.pairs == [("sham", "untuned"), ("random_teacher", "untuned"), ("uni", "untuned")]
    only = with_overrides(load_config("demo"), only_arms=["untuned", "teacher"])
    assert only.arm_names == ["untuned", "teacher"] and only.pairs == [("teacher", "untuned")]
    with pytest.raises(BenchmarkConfigError, match="is not an arm"):
        with_overrides(load_config("demo"), only_arms=["mcmkd"])


def test_config_errors_name_the_key_and_overrides_do_not_leak(tmp_path):
    with pytest.raises(BenchmarkConfigError, match=r"unknown key\(s\) \['epoch'\] in 'finetune'"):
        config_from_dict({"finetune": {"epoch": 1}}, "x.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("splits: [1, 2\n")
    with pytest.raises(BenchmarkConfigError, match="bad.yaml: not valid YAML"):
        load_config(bad)
    with pytest.raises(BenchmarkConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    base = load_config("tcga_nsclc")
    changed = with_overrides(base, **{"splits.k": 3, "mil.models": ["abmil"], "teacher": None})
    assert changed.splits.k == 3 and changed.mil.models == ["abmil"]
    assert base.splits.k == 10 and base.mil.models == ["abmil", "clam_sb"]


def test_smallest_demo_keeps_explicit_options():
    cfg = resolve(DemoConfig(smallest=True, n_slides=16))
    assert cfg.n_slides == 16 and cfg.k == 2
    bench = benchmark_config(cfg)
    assert bench.splits.k == 2 and bench.pretrained is False and bench.device == "cpu"
    result = CliRunner().invoke(main, ["demo", "--threads", "0"])
    assert result.exit_code == 2 and "--threads" in result.output  # before any work


def test_bad_inputs_fail_before_any_work(tmp_path):
    labels = tmp_path / "labels.csv"
    labels.write_text("case_id,slide_id,label\na,a,normal\n")
    slides = tmp_path / "slides"
    slides.mkdir()
    base = with_overrides(
        load_config("demo"), slides=str(slides), labels=str(labels), out=str(tmp_path / "out")
    )
    fake_clam = tmp_path / "CLAM"
    fake_clam.mkdir()
    for script in ("extract_features_fp.py", "main.py"):
        (fake_clam / script).write_text("")
    cases = [
        ({"slides": str(tmp_path / "nope")}, "nope: --slides is not a directory"),
        ({"labels": str(tmp_path / "x.csv")}, r"x.csv: --labels file does not exist"),
        ({"mil.models": ["abmil", "dsmil"]}, r"unknown MIL model\(s\) \['dsmil'\]"),
        ({"clam_dir": str(tmp_path)}, "not a CLAM checkout"),
        ({"clam_dir": str(fake_clam)}, "CLAM's main.py feeds raw features"),
        ({}, "proxy_baseline.pt: checkpoint named by the config does not exist"),
    ]
    for overrides, message in cases:
        with pytest.raises(BenchmarkError, match=message):
            run_benchmark(with_overrides(base, **overrides))
    assert not (tmp_path / "out").exists()


def test_camelyon16_fixed_test_set_is_in_every_fold_and_never_fine_tuned_on(tmp_path):
    """The official split column: test slides are every fold's test set, folds use the rest."""
    import numpy as np

    from clam_mcmkd.benchmark.run import Layout, stage_dataset, stage_splits
    from clam_mcmkd.clam.formats import read_dataset_csv, read_splits, write_coords_h5

    out = tmp_path / "out"
    rows = []
    for i in range(20):
        split = "test" if i >= 14 else "train"
        label = "tumor" if i % 2 else "normal"
        rows.append(f"s{i:02d},s{i:02d},{label},{split}")
    rows.append("empty,empty,normal,train")  # a slide without tissue patches is left out
    labels = tmp_path / "camelyon16.csv"
    labels.write_text("case_id,slide_id,label,split\n" + "\n".join(rows) + "\n")
    for i in range(21):
        sid = f"s{i:02d}" if i < 20 else "empty"
        coords = np.zeros((0 if sid == "empty" else 3, 2), dtype=np.int64)
        write_coords_h5(out / "patches" / f"{sid}.h5", coords, patch_size=256, patch_level=0,
                        downsample=(1, 1), downsampled_level_dim=(1024, 1024),
                        level_dim=(1024, 1024), name=sid)  # fmt: skip
    cfg = with_overrides(
        load_config("camelyon16"), slides=str(tmp_path), labels=str(labels), out=str(out),
        **{"splits.k": 3, "splits.val_frac": 0.2},
    )  # fmt: skip
    layout = Layout(out)
    info = stage_dataset(cfg, layout)
    assert info["slides"] == 20 and set(info["dropped"]) == {"empty"} and info["fixed_test"] == 6
    stage_splits(cfg, layout)
    official_test = {f"s{i:02d}" for i in range(14, 20)}
    for fold in range(3):
        split = read_splits(layout.splits, fold)
        assert set(split["test"]) == official_test
        assert not official_test & (set(split["train"]) | set(split["val"]))
        assert len(split["train"]) + len(split["val"]) == 14
    finetune_ids = set(read_dataset_csv(layout.finetune_csv, require_label=False)["slide_id"])
    assert finetune_ids == {f"s{i:02d}" for i in range(14)}

    no_column = tmp_path / "nocol.csv"
    no_column.write_text("case_id,slide_id,label\ns00,s00,normal\n")
    with pytest.raises(BenchmarkError, match="no 'split' column"):
        stage_dataset(with_overrides(cfg, labels=str(no_column)), layout)


# ----------------------------------------------------------------------------- end to end


def _mtimes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def _start_demo(out: Path) -> subprocess.Popen:
    env = {**os.environ, "CLAM_MCMKD_NO_PROGRESS": "1"}
    cmd = [sys.executable, "-m", "clam_mcmkd.cli", "demo", "--out", str(out), "--smallest"]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _kill_when(proc: subprocess.Popen, ready, timeout: float = 480.0) -> None:
    """SIGKILL `proc` as soon as `ready()` holds (a real crash: no cleanup runs)."""
    deadline = time.time() + timeout
    while not ready():
        if proc.poll() is not None:
            err = proc.stderr.read().decode() if proc.stderr else ""
            pytest.fail(f"demo ended (status {proc.returncode}) before the kill point:\n{err}")
        if time.time() > deadline:
            proc.kill()
            pytest.fail("demo did not reach the kill point in time")
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


@pytest.mark.slow
def test_demo_killed_mid_stage_resumes_and_reruns_identically(tmp_path):
    out = tmp_path / "demo"
    bench = out / "benchmark"
    stages = bench / "stages"
    baseline = load_config("demo").baseline
    baseline_pt = bench / "features" / baseline / "pt_files"

    # 1. kill the run while it extracts the baseline's features (some slides done, not all)
    proc = _start_demo(out)
    _kill_when(proc, lambda: baseline_pt.is_dir() and any(baseline_pt.glob("*.pt")))
    assert (stages / "finetune-mcmkd.json").is_file()
    assert (stages / "finetune-patch_kd.json").is_file()
    assert not (stages / f"extract-{baseline}.json").is_file()
    before = {
        p.name: (p.read_bytes(), p.stat().st_mtime_ns)
        for p in stages.glob("*.json")  # tile, dataset, splits, finetune-*
    }
    ckpt = bench / "finetune" / "mcmkd.pt"
    done_slides = {p.name: p.stat().st_mtime_ns for p in baseline_pt.glob("*.pt")}
    coords_before = _mtimes(bench / "patches")
    encoders_before = _mtimes(out / "encoders")

    # 2. rerun: finishes without redoing finished stages, finished slides or the encoders
    ckpt_mtime = ckpt.stat().st_mtime_ns
    import torch

    threads = torch.get_num_threads()
    report = run_demo(DemoConfig(out=str(out), smallest=True, threads=1))
    assert torch.get_num_threads() == threads  # the demo's thread count does not leak
    for name, (data, mtime) in before.items():
        assert (stages / name).read_bytes() == data and (stages / name).stat().st_mtime_ns == mtime
    assert ckpt.stat().st_mtime_ns == ckpt_mtime
    assert _mtimes(bench / "patches") == coords_before
    assert _mtimes(out / "encoders") == encoders_before
    for name, mtime in done_slides.items():
        assert (baseline_pt / name).stat().st_mtime_ns == mtime

    # 3. the report: a row per arm x model, numbers in [0, 1], one ROC png per model
    cfg = benchmark_config(resolve(DemoConfig(out=str(out), smallest=True)))
    df = pd.read_csv(bench / "report.csv")
    expected = {(a, m) for a in cfg.arm_names for m in cfg.mil.models}
    assert set(zip(df["arm"], df["model"])) == expected and len(df) == len(expected)
    assert (df["n_folds"] == cfg.splits.k).all()
    for col in ("test_auc_mean", "test_acc_mean", "val_auc_mean", "val_acc_mean"):
        assert df[col].between(0, 1).all(), col
    assert df["gflops_per_patch"].gt(0).all() and df["patches_per_s"].gt(0).all()
    for model in cfg.mil.models:
        png = bench / f"roc_{model}.png"
        assert png.read_bytes()[:4] == b"\x89PNG"
    text = report.read_text()
    assert "## Wall time per stage" in text and "finetune" in text and "## Configuration" in text
    # the student's own probes, per fine-tuned arm, as finetune measured them
    metrics = json.loads((bench / "finetune" / "mcmkd.final_metrics.json").read_text())
    moved = (
        f"{metrics['student_teacher_r2_before']:.3f} → {metrics['student_teacher_r2_after']:.3f}"
    )
    assert "student → teacher" in text and moved in text
    # every encoder was trained and tested on the same folds
    folds = pd.read_csv(bench / "report_folds.csv")
    assert folds.groupby(["encoder", "model"])["fold"].apply(sorted).map(tuple).nunique() == 1
    _check_slide_statistics(cfg, bench, df)
    assert "Demo, not evidence" in text and "cannot show whether MCM-KD helps" in text
    assert "baseline held-out linear accuracy 0." in text  # the offline encoders' own figures
    # the teacher measured against the baseline on a held-out cohort, recorded and quoted
    record = json.loads((out / "encoders" / "encoders.json").read_text())
    probe = record["instrument"]
    assert probe["n_slides"] >= 2 and probe["n_patches"] > 0
    for name in ("baseline", "teacher"):
        assert 0 < probe[name]["probe_class_bal_acc"] <= 1 and 0 < probe[name]["cos_to_mean"] <= 1
    assert "held-out slides, linear probes of patch atypia" in text

    # 4. rerunning `benchmark` (CLI, config written by the run) on the finished out: no work,
    #    the same report byte for byte
    reports = {p.name: p.read_bytes() for p in bench.glob("report*")}
    pngs = {p.name: p.read_bytes() for p in bench.glob("roc_*.png")}
    work = {k: v for k, v in _mtimes(bench).items() if not k.startswith(("report", "roc_"))}
    result = CliRunner().invoke(
        main, ["benchmark", "--config", str(bench / "benchmark_config.json")]
    )
    assert result.exit_code == 0, result.output
    assert (
        "(baseline)" in result.output and "mcmkd(resnet18_trunc[proxy_baseline]←" in result.output
    )
    assert "mcmkd_resnet50" not in result.output and "Demo, not evidence" in result.output
    after = {k: v for k, v in _mtimes(bench).items() if not k.startswith(("report", "roc_"))}
    assert after == work
    assert {p.name: p.read_bytes() for p in bench.glob("report*")} == reports
    assert {p.name: p.read_bytes() for p in bench.glob("roc_*.png")} == pngs

    # 5. a config that contradicts a finished stage is refused, naming the stage
    with pytest.raises(BenchmarkError, match="stage 'splits' finished with other settings"):
        run_benchmark(with_overrides(cfg, **{"splits.k": cfg.splits.k + 1}))
    assert {p.name: p.read_bytes() for p in bench.glob("report*")} == reports


def _check_slide_statistics(cfg, bench: Path, df) -> None:
    """report.csv against the runs' own fold_<k>_predictions.csv (not the pkl the report
    reads): fold-averaged slide probabilities, sklearn's AUC, DeLong and the bootstrap; the
    MIL inputs were z-scored per fold, as the column says."""
    from sklearn.metrics import roc_auc_score

    from clam_mcmkd.benchmark import stats

    def averaged(arm, model):
        run_dir = bench / "results" / arm / f"{model}_s1"
        preds = pd.concat(
            pd.read_csv(run_dir / f"fold_{k}_predictions.csv") for k in range(cfg.splits.k)
        )
        assert len(list(run_dir.glob("s_*_feature_norm.npz"))) == cfg.splits.k
        return preds.groupby("slide_id").agg(y=("Y", "first"), p=("p_1", "mean"))

    rows = df.set_index("arm")
    n_test = 2 * resolve(DemoConfig(smallest=True)).test_per_class
    assert (df["feature_norm"] == "zscore").all() and (df["n_test_slides"] == n_test).all()
    for model in cfg.mil.models:
        base = averaged(cfg.baseline, model)
        for arm in cfg.arm_names:
            a = averaged(arm, model)
            assert rows.loc[arm, "test_auc"] == pytest.approx(
                roc_auc_score(a["y"], a["p"]), abs=1e-4
            )
            if arm == cfg.baseline:
                continue
            delong = stats.delong_test(a["y"], a["p"], base.loc[a.index, "p"])
            assert rows.loc[arm, "delta_auc"] == pytest.approx(delong.delta, abs=1e-4)
            assert rows.loc[arm, "p_delong"] == pytest.approx(delong.p, abs=1e-4)
            boot = stats.paired_bootstrap_delta_auc(a["y"], a["p"], base.loc[a.index, "p"])
            ci = (rows.loc[arm, "ci_low"], rows.loc[arm, "ci_high"])
            assert ci == pytest.approx((boot.ci_low, boot.ci_high), abs=1e-4) and ci[0] <= ci[1]
