"""ABMIL / CLAM training on synthetic bags whose label is "contains positive instances".

Real CLAM-format files throughout: features written as pt + h5 with formats.write_features,
splits as CSVs, results read back the way CLAM's own scripts read them.
"""

from __future__ import annotations

import json
import pickle
import shutil
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from sklearn.metrics import roc_auc_score

from clam_mcmkd.clam import formats
from clam_mcmkd.cli import main
from clam_mcmkd.mil import (
    EarlyStopping,
    EvalConfig,
    MilDataError,
    TrainConfig,
    attention_scores,
    bag_auc,
    build_model,
    evaluate,
    load_weights,
    train,
)
from clam_mcmkd.mil.data import bag_order as _order
from clam_mcmkd.mil.feature_norm import fit_feature_norm
from clam_mcmkd.mil.nets import SmoothTop1SVM
from clam_mcmkd.splits import SplitConfig, make_splits
from clam_mcmkd.utils import ClamMcmkdError

DIM = 32
N_SLIDES = 40


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """40 bags of 150-250 instances; tumour bags hide 5 % instances from a shifted Gaussian
    (at least CLAM's B=8 of them, as in real slides with a tumour region)."""
    root = tmp_path_factory.mktemp("mil")
    rng = np.random.default_rng(0)
    rows, positives = [], {}
    for i in range(N_SLIDES):
        slide_id, tumour = f"slide_{i:03d}", i % 2 == 1
        n = int(rng.integers(150, 251))
        feats = rng.normal(size=(n, DIM)).astype(np.float32)
        pos = rng.choice(n, round(0.05 * n), replace=False) if tumour else []
        feats[pos] += 1.5
        positives[slide_id] = np.asarray(pos, dtype=int)
        coords = np.stack([np.arange(n) * 256, np.zeros(n)], axis=1)
        formats.write_features(root / "feats", slide_id, feats, coords)
        rows.append(
            {
                "case_id": f"case_{i:03d}",
                "slide_id": slide_id,
                "label": "tumor" if tumour else "normal",
            }
        )
    csv = formats.write_dataset_csv(root / "dataset.csv", rows)
    make_splits(SplitConfig(str(csv), str(root / "splits"), k=2, val_frac=0.2, test_frac=0.3))
    return {"root": root, "csv": csv, "feats": root / "feats", "splits": root / "splits",
            "positives": positives}  # fmt: skip


def _cfg(cohort, model_type, **kw):
    defaults = {"max_epochs": 12, "k": 2, "split_dir": str(cohort["splits"]),
                "results_dir": str(cohort["root"] / "results"), "exp_code": model_type}  # fmt: skip
    return TrainConfig(
        data_root_dir=str(cohort["feats"]),
        csv_path=str(cohort["csv"]),
        model_type=model_type,
        device="cpu",
        **{**defaults, **kw},
    )


@pytest.fixture(scope="module")
def trained(cohort):
    """abmil and clam_sb, both folds, CLAM's defaults apart from 12 epochs."""
    return {mt: (_cfg(cohort, mt), train(_cfg(cohort, mt))) for mt in ("abmil", "clam_sb")}


@pytest.mark.parametrize("model_type", ["abmil", "clam_sb"])
def test_learns_bag_label_and_writes_clam_layout(trained, model_type):
    cfg, summary_path = trained[model_type]
    run_dir = cfg.run_dir
    assert summary_path == run_dir / "summary.csv" and run_dir.name == f"{model_type}_s1"
    # main.py / CLAM's analysis notebooks read it with a plain read_csv (index column unnamed)
    summary = pd.read_csv(summary_path)
    assert list(summary.columns) == [
        "Unnamed: 0",
        "folds",
        "test_auc",
        "val_auc",
        "test_acc",
        "val_acc",
    ]
    assert summary["folds"].tolist() == [0, 1]
    assert (summary["test_auc"] >= 0.95).all(), summary
    for fold in (0, 1):
        split = formats.read_splits(cfg.split_dir, fold)
        with open(run_dir / f"split_{fold}_results.pkl", "rb") as f:
            results = pickle.load(f)
        assert set(results) == set(split["test"])
        one = results[split["test"][0]]
        assert one["prob"].shape == (1, 2) and isinstance(one["label"], int)
        assert str(one["slide_id"]) == split["test"][0]
        preds = pd.read_csv(run_dir / f"fold_{fold}_predictions.csv")
        assert list(preds.columns) == ["slide_id", "label", "Y", "Y_hat", "p_0", "p_1"]
        assert np.allclose(preds[["p_0", "p_1"]].sum(axis=1), 1, atol=1e-5)
        auc = roc_auc_score(preds["Y"], preds["p_1"])
        assert auc == pytest.approx(summary.loc[fold, "test_auc"])
        assert (preds["label"] == np.where(preds["Y"] == 1, "tumor", "normal")).all()
        # CLAM's train writes the fold's split next to the results
        written = formats.read_splits(run_dir, fold)
        assert {k: sorted(v) for k, v in written.items()} == {
            k: sorted(v) for k, v in split.items()
        }
        model = build_model("clam_sb", 2, DIM, inst_loss="ce")
        load_weights(model, run_dir / f"s_{fold}_checkpoint.pt")  # strict: CLAM's module layout
    saved = json.loads((run_dir / "train_config.json").read_text())
    assert saved["embed_dim"] == DIM and saved["label_dict"] == {"normal": 0, "tumor": 1}
    assert saved["lr"] == 2e-4 and saved["reg"] == 1e-5 and saved["drop_out"] == 0.25


@pytest.mark.parametrize("model_type", ["abmil", "clam_sb"])
def test_attention_ranks_positive_instances_first(cohort, trained, model_type):
    cfg, _ = trained[model_type]
    model = build_model("clam_sb", 2, DIM, inst_loss="ce")
    load_weights(model, cfg.run_dir / "s_0_checkpoint.pt")
    tumour_bags = [
        s
        for s in formats.read_splits(cfg.split_dir, 0)["test"]
        if s.endswith(("1", "3", "5", "7", "9"))
    ]
    assert tumour_bags
    hits = total = 0
    for slide_id in tumour_bags:
        pos = cohort["positives"][slide_id]
        scores = attention_scores(model, formats.read_features(cohort["feats"], slide_id))
        top = np.argsort(-scores)[: len(pos)]
        hits += len(set(top) & set(pos))
        total += len(pos)
    assert hits / total >= 0.8, (hits, total)


def test_eval_reproduces_train_and_runs_on_any_csv(cohort, trained, tmp_path):
    cfg, summary_path = trained["clam_sb"]
    out = evaluate(
        EvalConfig(
            data_root_dir=str(cohort["feats"]),
            csv_path=str(cohort["csv"]),
            models_dir=str(cfg.run_dir),
            eval_dir=str(tmp_path / "eval"),
            split_dir=str(cohort["splits"]),
            device="cpu",
        )  # fmt: skip
    )
    train_summary, eval_summary = pd.read_csv(summary_path), pd.read_csv(out)
    pd.testing.assert_frame_equal(train_summary, eval_summary)
    for fold in (0, 1):
        a = pd.read_csv(cfg.run_dir / f"fold_{fold}_predictions.csv")
        b = pd.read_csv(tmp_path / "eval" / f"fold_{fold}_predictions.csv")
        pd.testing.assert_frame_equal(a, b)
    assert (
        json.loads((tmp_path / "eval" / "eval_config.json").read_text())["model_type"] == "clam_sb"
    )

    subset = formats.read_dataset_csv(cohort["csv"]).iloc[:12]
    subset.to_csv(tmp_path / "some.csv", index=False)
    out = evaluate(
        EvalConfig(
            data_root_dir=str(cohort["feats"]),
            csv_path=str(tmp_path / "some.csv"),
            models_dir=str(cfg.run_dir),
            eval_dir=str(tmp_path / "any"),
            k_start=1,
            k_end=2,
        )  # fmt: skip
    )
    assert out.name == "summary_partial_1_2.csv"
    preds = pd.read_csv(tmp_path / "any" / "fold_1_predictions.csv")
    assert preds["slide_id"].tolist() == subset["slide_id"].tolist()
    assert np.isnan(pd.read_csv(out)["val_auc"]).all()


def test_resume_skips_finished_folds(cohort, trained):
    cfg, summary_path = trained["abmil"]
    before = pd.read_csv(summary_path)
    ckpts = {f: (cfg.run_dir / f"s_{f}_checkpoint.pt").stat().st_mtime_ns for f in (0, 1)}
    (cfg.run_dir / "split_1_results.pkl").unlink()  # fold 1 looks unfinished
    (cfg.run_dir / "fold_0_metrics.json").unlink()  # fold 0: metrics recomputed from checkpoint
    train(cfg)
    after = pd.read_csv(summary_path)
    assert (cfg.run_dir / "s_0_checkpoint.pt").stat().st_mtime_ns == ckpts[0]
    assert (cfg.run_dir / "s_1_checkpoint.pt").stat().st_mtime_ns != ckpts[1]
    pd.testing.assert_frame_equal(before, after)  # seeded CPU training gives the same fold 1


def test_clam_mb_weighted_svm_and_clam_written_splits(cohort, tmp_path):
    """CLAM-MB with smooth-SVM bag loss, weighted sampling and early stopping, on a split CSV
    written by hand in CLAM's exact format (unnamed index column, ragged columns)."""
    df = formats.read_dataset_csv(cohort["csv"])
    ids = df["slide_id"].tolist()
    train_ids, val_ids, test_ids = ids[:24], ids[24:30], ids[30:]
    split_dir = tmp_path / "clam_splits"
    split_dir.mkdir()
    lines = [",train,val,test"]
    for i in range(len(train_ids)):
        cells = [lst[i] if i < len(lst) else "" for lst in (train_ids, val_ids, test_ids)]
        lines.append(",".join([str(i), *cells]))
    (split_dir / "splits_0.csv").write_text("\n".join(lines) + "\n")
    cfg = _cfg(
        cohort, "clam_mb", k=1, max_epochs=8, split_dir=str(split_dir), bag_loss="svm",
        weighted_sample=True, early_stopping=True, patience=2, stop_epoch=3,
        results_dir=str(tmp_path / "res"),
    )  # fmt: skip
    summary = pd.read_csv(train(cfg))
    assert summary["test_auc"].iloc[0] >= 0.9
    assert formats.read_splits(cfg.run_dir, 0) == {
        "train": train_ids,
        "val": val_ids,
        "test": test_ids,
    }
    model = build_model("clam_mb", 2, DIM, inst_loss="ce")
    load_weights(model, cfg.run_dir / "s_0_checkpoint.pt")
    assert attention_scores(model, torch.randn(7, DIM)).shape == (2, 7)


def test_cli_train_and_eval(cohort, tmp_path):
    common = ["--data_root_dir", str(cohort["feats"]), "--csv-path", str(cohort["csv"]),
              "--k-start", "0", "--k-end", "1", "--device", "cpu",
              "--label-dict", '{"normal": 0, "tumor": 1}']  # fmt: skip
    res = CliRunner().invoke(
        main,
        ["train", *common, "--split-dir", str(cohort["splits"]), "--results-dir",
         str(tmp_path / "r"), "--exp_code", "cli", "--model-type", "abmil", "--k", "2",
         "--max-epochs", "2", "--seed", "5"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    partial = tmp_path / "r" / "cli_s5" / "summary_partial_0_1.csv"
    assert partial.is_file()
    res = CliRunner().invoke(
        main,
        ["eval", *common, "--models-dir", str(tmp_path / "r" / "cli_s5"), "--eval-dir",
         str(tmp_path / "e"), "--split-dir", str(cohort["splits"])],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    a, b = pd.read_csv(partial), pd.read_csv(tmp_path / "e" / "summary_partial_0_1.csv")
    pd.testing.assert_frame_equal(a, b)


def test_zscore_fits_on_training_slides_only_and_round_trips_through_eval(cohort, tmp_path):
    """`train --feature-norm zscore` on features that share one large offset (as an offline
    encoder's do), fold 0's test slides shifted further: the saved statistics are the
    training slides' own, and `eval` of the run reproduces train's test predictions."""
    feats, split0 = tmp_path / "feats", formats.read_splits(cohort["splits"], 0)
    ids = formats.read_dataset_csv(cohort["csv"])["slide_id"].tolist()
    for sid in ids:
        x, coords = formats.read_features(cohort["feats"], sid, with_coords=True)
        x = 0.1 * x + 40.0 + (3.0 if sid in split0["test"] else 0.0)
        formats.write_features(feats, sid, x.astype(np.float32), coords)
    common = ["--data-root-dir", str(feats), "--csv-path", str(cohort["csv"]), "--device", "cpu",
              "--split-dir", str(cohort["splits"])]  # fmt: skip
    res = CliRunner().invoke(
        main,
        ["train", *common, "--results-dir", str(tmp_path / "r"), "--exp-code", "z",
         "--model-type", "abmil", "--k", "2", "--max-epochs", "3", "--feature-norm", "zscore"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    run = tmp_path / "r" / "z_s1"
    assert json.loads((run / "train_config.json").read_text())["feature_norm"] == "zscore"
    every = np.concatenate([formats.read_features(feats, s) for s in ids]).astype(np.float64)
    for fold in (0, 1):
        train_ids = formats.read_splits(cohort["splits"], fold)["train"]
        x = np.concatenate([formats.read_features(feats, s) for s in train_ids]).astype(float)
        with np.load(run / f"s_{fold}_feature_norm.npz") as saved:
            np.testing.assert_allclose(saved["mean"], x.mean(0), rtol=1e-6)
            np.testing.assert_allclose(saved["std"], x.std(0) + 1e-6, rtol=1e-4)
            if fold == 0:  # statistics of every slide would differ
                assert np.abs(saved["mean"] - every.mean(0)).min() > 0.5
    out = evaluate(
        EvalConfig(data_root_dir=str(feats), csv_path=str(cohort["csv"]), models_dir=str(run),
                   eval_dir=str(tmp_path / "e"), split_dir=str(cohort["splits"]), device="cpu")
    )  # fmt: skip
    pd.testing.assert_frame_equal(pd.read_csv(run / "summary.csv"), pd.read_csv(out))
    for fold in (0, 1):
        a = pd.read_csv(run / f"fold_{fold}_predictions.csv")
        b = pd.read_csv(tmp_path / "e" / f"fold_{fold}_predictions.csv")
        pd.testing.assert_frame_equal(a, b)
    (run / "s_1_feature_norm.npz").unlink()  # never evaluated on raw features instead
    with pytest.raises(ClamMcmkdError, match="feature_norm='zscore' but no statistics"):
        evaluate(EvalConfig(data_root_dir=str(feats), csv_path=str(cohort["csv"]),
                            models_dir=str(run), eval_dir=str(tmp_path / "e2"), device="cpu"))  # fmt: skip


def test_feature_norm_is_one_transform_for_numpy_and_torch_and_a_run_keeps_its_own(cohort, trained):
    bags = [np.random.default_rng(i).normal(3.0, 2.0, size=(50 + i, 4)) for i in range(3)]
    norm = fit_feature_norm(bags)
    z = np.concatenate([norm(b) for b in bags])
    np.testing.assert_allclose(z.mean(0), 0.0, atol=1e-5)
    np.testing.assert_allclose(z.std(0), 1.0, atol=1e-5)
    t = norm(torch.from_numpy(bags[0].astype(np.float32)))
    np.testing.assert_allclose(t.numpy(), norm(bags[0].astype(np.float32)), rtol=1e-6)
    cfg, _ = trained["abmil"]  # finished folds trained on raw features: not resumed as zscore
    with pytest.raises(MilDataError, match="trained with feature_norm='none', not 'zscore'"):
        train(replace(cfg, feature_norm="zscore"))
    with pytest.raises(ClamMcmkdError, match="unknown feature_norm 'l2'"):
        train(replace(cfg, feature_norm="l2"))


# ----------------------------------------------------------------------------- bad input


@pytest.fixture
def small(cohort, tmp_path):
    """A private copy of 12 slides' features + a dataset CSV + a 1-fold split to break."""
    df = formats.read_dataset_csv(cohort["csv"]).iloc[:12]
    feats = tmp_path / "feats"
    for sub in ("pt_files", "h5_files"):
        (feats / sub).mkdir(parents=True)
        for s in df["slide_id"]:
            ext = "pt" if sub == "pt_files" else "h5"
            shutil.copy(cohort["feats"] / sub / f"{s}.{ext}", feats / sub / f"{s}.{ext}")
    df.to_csv(tmp_path / "data.csv", index=False)
    ids = df["slide_id"].tolist()
    formats.write_splits(
        tmp_path / "splits", 0, {"train": ids[:8], "val": ids[8:10], "test": ids[10:]},
        dict(zip(df["slide_id"], df["label"])), {"normal": 0, "tumor": 1},
    )  # fmt: skip
    cfg = TrainConfig(
        data_root_dir=str(feats), csv_path=str(tmp_path / "data.csv"),
        split_dir=str(tmp_path / "splits"), results_dir=str(tmp_path / "res"), exp_code="bad",
        model_type="abmil", k=1, max_epochs=1, device="cpu",
    )  # fmt: skip
    return cfg, ids, feats, df


def test_error_missing_feature_file(small):
    cfg, ids, feats, _ = small
    for sub, ext in (("pt_files", "pt"), ("h5_files", "h5")):
        (feats / sub / f"{ids[3]}.{ext}").unlink()
    with pytest.raises(MilDataError, match=f"no feature file.*{ids[3]}"):
        train(cfg)


def test_h5_fallback_when_pt_missing(small):
    cfg, ids, feats, _ = small
    (feats / "pt_files" / f"{ids[3]}.pt").unlink()
    assert pd.read_csv(train(cfg))["folds"].tolist() == [0]


def test_error_label_missing_from_label_dict(small):
    cfg, *_ = small
    cfg.label_dict = {"normal": 0}
    with pytest.raises(MilDataError, match="tumor.*not in the label dict"):
        train(cfg)


def test_error_feature_widths_differ(small):
    cfg, ids, feats, _ = small
    formats.write_features(feats, ids[5], np.zeros((10, DIM + 3), np.float32), np.zeros((10, 2)))
    with pytest.raises(MilDataError, match=f"widths differ.*{DIM + 3}"):
        train(cfg)


def test_error_empty_bag(small):
    cfg, ids, feats, _ = small
    torch.save(torch.zeros(0, DIM), feats / "pt_files" / f"{ids[2]}.pt")
    with pytest.raises(formats.ClamFormatError, match=f"{ids[2]}.pt.*empty bag"):
        train(cfg)


def test_error_nan_features(small):
    cfg, ids, feats, _ = small
    bad = torch.randn(20, DIM)
    bad[3, 4] = float("nan")
    torch.save(bad, feats / "pt_files" / f"{ids[9]}.pt")
    with pytest.raises(formats.ClamFormatError, match=f"{ids[9]}.pt.*NaN"):
        train(cfg)


def test_error_split_slide_not_in_dataset(small):
    cfg, ids, _, df = small
    df.iloc[1:].to_csv(cfg.csv_path, index=False)
    with pytest.raises(MilDataError, match=f"not in the dataset CSV.*{ids[0]}"):
        train(cfg)


# ----------------------------------------------------------------------------- pieces


def test_early_stopping_follows_clam_rule(tmp_path):
    model = torch.nn.Linear(2, 1)
    stopper = EarlyStopping(patience=3, stop_epoch=5, ckpt_path=tmp_path / "best.pt")
    losses = [1.0, 0.8, 0.8, 0.9, 0.9, 0.9, 0.9, 0.9]
    stopped_at = None
    for epoch, loss in enumerate(losses):
        with torch.no_grad():
            model.weight.fill_(epoch)
        stopper(epoch, loss, model)
        if stopper.stop:
            stopped_at = epoch
            break
    # best at epoch 2 (a tie counts as improvement), 3 worse epochs reached at epoch 5, but
    # stopping needs epoch > stop_epoch, so it happens at epoch 6
    assert stopped_at == 6
    assert torch.load(tmp_path / "best.pt")["weight"].flatten()[0].item() == 2


def test_weighted_sampling_balances_classes():
    from clam_mcmkd.mil import Bag

    bags = [Bag(f"s{i}", int(i < 10)) for i in range(100)]  # 10 % class 1
    torch.manual_seed(0)
    drawn = [bags[i].label for _ in range(20) for i in _order(bags, True, 2)]
    assert 0.45 < np.mean(drawn) < 0.55
    plain = _order(bags, False, 2)
    assert sorted(plain) == list(range(100)) and plain != list(range(100))


def test_smooth_svm_loss():
    loss = SmoothTop1SVM(3)
    scores = torch.tensor([[0.2, 0.1, -0.3], [50.0, 0.0, 1.0]], requires_grad=True)
    target = torch.tensor([1, 0])
    value = loss(scores, target)
    # row 0: logsumexp over (s + margin - s_y); row 1: hard hinge (gap 49 > log 1000)
    row0 = torch.logsumexp(torch.tensor([0.2 + 1 - 0.1, 0.0, -0.3 + 1 - 0.1]), 0)
    row1 = max(0.0, 0.0 + 1 - 50, 1 + 1 - 50)
    assert value.item() == pytest.approx((row0.item() + row1) / 2, rel=1e-6)
    value.backward()
    assert torch.isfinite(scores.grad).all()


def test_multiclass_auc_is_mean_of_one_vs_rest():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 3, 60)
    probs = rng.dirichlet(np.ones(3), 60) + np.eye(3)[labels] * 0.3
    probs /= probs.sum(1, keepdims=True)
    expected = np.mean([roc_auc_score(labels == c, probs[:, c]) for c in range(3)])
    assert bag_auc(labels, probs) == pytest.approx(expected)
    assert np.isnan(bag_auc(np.zeros(5, int), np.full((5, 2), 0.5)))
