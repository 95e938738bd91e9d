"""TransMIL and MHIM-MIL: parity with the reference code (golden numbers written by
``benchmarks/parity_mil_reference.py`` from the fetched references), the masking and EMA rules,
and both models through ``train`` / ``eval`` / ``heatmap`` in CLAM's formats on real files."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from clam_mcmkd.clam import formats
from clam_mcmkd.cli import main
from clam_mcmkd.heatmap import HeatmapConfig, HeatmapError, load_fold_model
from clam_mcmkd.mil import EvalConfig, TrainConfig, build_model, evaluate, load_weights, train
from clam_mcmkd.mil.mhim import cosine_schedule, ema_update, mask_instances, soft_target_ce
from clam_mcmkd.mil.models import get_mil_model
from clam_mcmkd.mil.nets import ClamSB, attention_scores
from clam_mcmkd.mil.transmil import TransMIL
from clam_mcmkd.splits import SplitConfig, make_splits
from clam_mcmkd.utils import ClamMcmkdError

GOLDEN = json.loads((Path(__file__).parent / "data" / "mil_reference_golden.json").read_text())
DIM = 32


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ----------------------------------------------------------------------------- parity


def test_transmil_has_the_reference_layout_init_and_logits():
    g = GOLDEN["transmil"]
    torch.manual_seed(g["seed"])
    model = build_model("transmil", 2, g["embed_dim"]).eval()
    assert isinstance(model, TransMIL)
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert shapes == g["state_dict"]  # names, order and shapes of the reference's state dict
    x = torch.randn(
        g["n_instances"], g["embed_dim"], generator=torch.Generator().manual_seed(g["input_seed"])
    )
    with torch.no_grad():
        logits, prob, y_hat, _, _ = model(x)
    assert np.allclose(logits[0].numpy(), g["logits"], atol=1e-5, rtol=0)
    assert prob.shape == (1, 2) and int(y_hat) == int(np.argmax(g["logits"]))


@pytest.mark.parametrize("case", GOLDEN["mhim_masks"], ids=lambda c: f"{c['recipe']}-{c['n']}")
def test_mhim_masking_picks_the_reference_instances(case):
    attn = torch.randn(1, case["n"], generator=torch.Generator().manual_seed(case["attn_seed"]))
    torch.manual_seed(case["seed"])
    kept, masked = mask_instances(attn.softmax(-1), *case["ratios"])
    assert kept.tolist() == case["kept"]
    assert sorted(kept.tolist() + masked.tolist()) == list(range(case["n"]))


def test_mhim_masking_rules():
    n = 1000
    attn = torch.arange(n, dtype=torch.float32)[None]  # instance i has attention rank i
    torch.manual_seed(0)
    kept, masked = mask_instances(attn, 0.0, 0.0, 0.05, 1.0)  # top 5 %, all of them
    assert sorted(masked.tolist()) == list(range(950, 1000)) and len(kept) == 950
    kept, masked = mask_instances(attn, 0.0, 0.3, 0.0, 1.0)  # lowest 30 %
    assert sorted(masked.tolist()) == list(range(300))
    kept, masked = mask_instances(attn, 0.0, 0.0, 0.02, 0.5)  # half of the top 4 %
    assert len(masked) == 20 and set(masked.tolist()) <= set(range(960, 1000))
    kept, masked = mask_instances(attn, 0.5, 0.0, 0.0, 1.0)  # random half, not the lowest half
    assert len(masked) == 500 and 0 < (masked >= 500).sum() < 500
    kept, masked = mask_instances(attn, 0.0, 0.0, 0.0, 1.0)
    assert kept.tolist() == list(range(n)) and masked.numel() == 0


def test_ema_schedule_and_consistency_loss():
    torch.manual_seed(0)
    student, teacher = build_model("abmil", 2, DIM), build_model("abmil", 2, DIM)
    before = [p.detach().clone() for p in teacher.parameters()]
    ema_update(student, teacher, 0.9)
    for b, s, t in zip(before, student.parameters(), teacher.parameters()):
        assert torch.allclose(t, 0.9 * b + 0.1 * s, atol=1e-7)
    ema_update(student, teacher, 0.0)
    assert all(torch.equal(s, t) for s, t in zip(student.parameters(), teacher.parameters()))
    with pytest.raises(ValueError, match="momentum"):
        ema_update(student, teacher, 1.5)
    sched = cosine_schedule(0.01, 0.0, 100)
    assert sched[0] == 0.01 and sched[50] == pytest.approx(0.005) and sched[-1] > 0
    same = torch.randn(1, 8)
    p = same.softmax(-1)
    entropy = float(-(p * p.log()).sum())
    # cross-entropy against the teacher's softmax: the entropy when equal, more otherwise (Gibbs)
    assert float(soft_target_ce(same, same, 1.0, 1.0)) == pytest.approx(entropy, abs=1e-6)
    assert float(soft_target_ce(torch.randn(1, 8), same, 1.0, 1.0)) > entropy
    target = torch.tensor([[0.0, 10.0]])
    assert float(soft_target_ce(torch.tensor([[0.0, 10.0]]), target, 1.0, 1.0)) < float(
        soft_target_ce(torch.tensor([[10.0, 0.0]]), target, 1.0, 1.0)
    )


def test_registry_entries():
    assert get_mil_model("mhim_abmil").mhim_base == "abmil"
    assert isinstance(build_model("mhim_abmil", 2, DIM), ClamSB)  # its checkpoints are ABMIL's
    assert get_mil_model("transmil").attention_map is False
    assert get_mil_model("transmil").clam_args is None  # CLAM's main.py cannot train it


# ----------------------------------------------------------------------------- train / eval


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """24 bags of 60-100 instances; tumour bags hide 8 instances from a shifted Gaussian."""
    root = tmp_path_factory.mktemp("milmodels")
    rng = np.random.default_rng(1)
    rows = []
    for i in range(24):
        slide_id, tumour = f"slide_{i:03d}", i % 2 == 1
        n = int(rng.integers(60, 101))
        feats = rng.normal(size=(n, DIM)).astype(np.float32)
        if tumour:
            feats[rng.choice(n, 8, replace=False)] += 2.0
        coords = np.stack([np.arange(n) * 256, np.zeros(n)], axis=1)
        formats.write_features(root / "feats", slide_id, feats, coords)
        rows.append({"case_id": f"case_{i:03d}", "slide_id": slide_id,
                     "label": "tumor" if tumour else "normal"})  # fmt: skip
    csv = formats.write_dataset_csv(root / "dataset.csv", rows)
    make_splits(SplitConfig(str(csv), str(root / "splits"), k=2, val_frac=0.2, test_frac=0.3))
    return {"root": root, "csv": csv, "feats": root / "feats", "splits": root / "splits"}


def _cfg(cohort, model_type, **kw):
    return TrainConfig(
        data_root_dir=str(cohort["feats"]), csv_path=str(cohort["csv"]),
        split_dir=str(cohort["splits"]), results_dir=str(cohort["root"] / "results"),
        model_type=model_type, k=2, device="cpu", **{"exp_code": model_type, **kw},
    )  # fmt: skip


def _eval_matches_train(cohort, cfg, trained_summary, tmp_path, folds):
    summary = evaluate(EvalConfig(
        data_root_dir=str(cohort["feats"]), csv_path=str(cohort["csv"]),
        models_dir=str(cfg.run_dir), eval_dir=str(tmp_path / "eval"),
        split_dir=str(cohort["splits"]), k_end=folds,
    ))  # fmt: skip
    trained = pd.read_csv(trained_summary)
    assert np.allclose(pd.read_csv(summary)["test_auc"], trained["test_auc"])
    for fold in range(folds):
        with open(cfg.run_dir / f"split_{fold}_results.pkl", "rb") as f:
            a = pickle.load(f)
        with open(tmp_path / "eval" / f"split_{fold}_results.pkl", "rb") as f:
            b = pickle.load(f)
        assert set(a) == set(b)
        assert all(np.allclose(a[s]["prob"], b[s]["prob"], atol=1e-6) for s in a)


def test_transmil_trains_and_eval_reads_it(cohort, tmp_path):
    """One fold, one epoch (a TransMIL step costs ~1 s on one CPU thread whatever the bag size:
    256 Nystrom landmarks); learning is not asserted here, parity is (above)."""
    cfg = _cfg(cohort, "transmil", max_epochs=1, k_end=1, feature_norm="zscore")
    summary = train(cfg)
    assert pd.read_csv(summary)["folds"].tolist() == [0]
    state = torch.load(cfg.run_dir / "s_0_checkpoint.pt", weights_only=True)
    torch.manual_seed(0)
    fresh = TransMIL(n_classes=2, embed_dim=DIM)
    assert not torch.equal(fresh.state_dict()["_fc2.weight"], state["_fc2.weight"])
    load_weights(fresh, cfg.run_dir / "s_0_checkpoint.pt")  # strict
    assert json.loads((cfg.run_dir / "train_config.json").read_text())["model_type"] == "transmil"
    _eval_matches_train(cohort, cfg, summary, tmp_path, folds=1)
    heat = HeatmapConfig(models_dir=str(cfg.run_dir), data_root_dir="x", data_h5_dir="x",
                         data_slide_dir="x", csv_path=str(cohort["csv"]), out=str(tmp_path))  # fmt: skip
    with pytest.raises(HeatmapError, match="transmil run has no per-patch attention"):
        load_fold_model(heat, ["normal", "tumor"])


def test_mhim_trains_its_baseline_first_learns_and_is_an_abmil(cohort, tmp_path):
    cfg = _cfg(cohort, "mhim_abmil", max_epochs=10, exp_code="mhim")
    summary = train(cfg)
    baseline = cohort["root"] / "results" / "mhim_baseline_s1"
    assert (baseline / "s_0_checkpoint.pt").is_file() and (baseline / "s_1_checkpoint.pt").is_file()
    assert json.loads((baseline / "train_config.json").read_text())["model_type"] == "abmil"
    saved = json.loads((cfg.run_dir / "train_config.json").read_text())
    assert saved["mhim_teacher_init"] == str(baseline) and saved["mhim_momentum"] == 0.9999
    assert (pd.read_csv(summary)["test_auc"] >= 0.9).all()
    student = build_model("abmil", 2, DIM)
    load_weights(student, cfg.run_dir / "s_0_checkpoint.pt")  # strict: ABMIL's layout
    base = load_weights(build_model("abmil", 2, DIM), baseline / "s_0_checkpoint.pt")
    assert not torch.equal(student.classifiers.weight, base.classifiers.weight)
    _eval_matches_train(cohort, cfg, summary, tmp_path, folds=2)
    heat = HeatmapConfig(models_dir=str(cfg.run_dir), data_root_dir="x", data_h5_dir="x",
                         data_slide_dir="x", csv_path=str(cohort["csv"]), out=str(tmp_path))  # fmt: skip
    model, _, model_type = load_fold_model(heat, ["normal", "tumor"])
    assert model_type == "mhim_abmil"
    scores = attention_scores(model, formats.read_features(cohort["feats"], "slide_001"))
    assert scores.shape == (formats.read_features(cohort["feats"], "slide_001").shape[0],)


def test_mhim_refuses_a_missing_or_mismatched_teacher(cohort, tmp_path):
    missing = _cfg(cohort, "mhim_abmil", max_epochs=1, mhim_teacher_init=str(tmp_path / "none"))
    with pytest.raises(ClamMcmkdError, match="teacher's baseline checkpoint is missing"):
        train(missing)
    base = cohort["root"] / "results" / "mhim_baseline_s1"
    if not base.is_dir():
        pytest.skip("needs the baseline of the test above")
    other = _cfg(cohort, "mhim_abmil", max_epochs=1, mhim_teacher_init=str(base),
                 feature_norm="zscore", exp_code="mhim_z")  # fmt: skip
    with pytest.raises(ClamMcmkdError, match="feature_norm='none'"):
        train(other)
    with pytest.raises(ClamMcmkdError, match="--mhim-mask-ratio-h must be in"):
        train(_cfg(cohort, "mhim_abmil", mhim_mask_ratio_h=1.5))


def test_cli_help_lists_the_models_and_the_mhim_options():
    out = " ".join(CliRunner().invoke(main, ["train", "--help"]).output.split())
    assert "transmil" in out and "mhim_abmil" in out
    assert "--mhim-teacher-init" in out and "baseline is trained first" in out
