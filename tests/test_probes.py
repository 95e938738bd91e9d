"""The student probes (mcmkd/probes.py): closed-form ridge from streamed sums, and what
``finetune`` reports with them (a frozen student does not move; the predictor still learns)."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from test_finetune import TINY, _student_state, cohort_cfg  # noqa: F401

from clam_mcmkd.encoders import create_encoder
from clam_mcmkd.mcmkd import finetune, output_paths
from clam_mcmkd.mcmkd.probes import _add, _zero_sums, probe_r2


def _fold_sums(x_folds, y_folds):
    """probes.py's sums for explicit folds; the neighbour probe gets the same targets."""
    out = []
    for x, y in zip(x_folds, y_folds):
        sums = _zero_sums(x.shape[1], y.shape[1], "cpu")
        xt, yt = torch.from_numpy(x), torch.from_numpy(y)
        _add(sums, xt, {"teacher": yt, "context": yt})
        out.append(sums)
    return out


def _explicit_ridge_r2(x_folds, y_folds, alpha):
    """The same estimate written out on the data: standardise x with the pooled mean/std, fit
    ridge (intercept not shrunk) on one fold, score the other, pool SSE and SST."""
    x_all = np.concatenate(x_folds)
    mu, sd = x_all.mean(0), x_all.std(0)
    sse = sst = 0.0
    for fit, test in ((0, 1), (1, 0)):
        z = np.c_[(x_folds[fit] - mu) / sd, np.ones(len(x_folds[fit]))]
        pen = np.eye(z.shape[1])
        pen[-1, -1] = 0
        w = np.linalg.solve(z.T @ z + alpha * len(z) * pen, z.T @ y_folds[fit])
        zt = np.c_[(x_folds[test] - mu) / sd, np.ones(len(x_folds[test]))]
        yt = y_folds[test]
        sse += ((yt - zt @ w) ** 2).sum()
        sst += ((yt - yt.mean(0)) ** 2).sum()
    return 1 - sse / sst


@pytest.mark.parametrize("alpha", [0.01, 1.0])
def test_streamed_ridge_equals_the_explicit_fit(alpha):
    rng = np.random.default_rng(0)
    x = [rng.normal(size=(n, 12)) * rng.uniform(0.1, 5, 12) + 3 for n in (70, 55)]
    m = rng.normal(size=(12, 5))
    y = [xi @ m + rng.normal(size=(len(xi), 5)) * 4 for xi in x]
    got = probe_r2(_fold_sums(x, y), alpha)
    want = _explicit_ridge_r2(x, y, alpha)
    assert got["teacher"] == pytest.approx(want, abs=1e-9)
    assert 0.0 < want < 1.0


def test_probe_finds_a_linear_map_and_nothing_in_noise():
    rng = np.random.default_rng(1)
    x = [rng.normal(size=(200, 16)) for _ in range(2)]
    m = rng.normal(size=(16, 6))
    linear = probe_r2(_fold_sums(x, [xi @ m + 0.05 * rng.normal(size=(200, 6)) for xi in x]), 0.01)
    noise = probe_r2(_fold_sums(x, [rng.normal(size=(200, 6)) for _ in x]), 1.0)
    assert linear["teacher"] > 0.99
    assert -0.05 < noise["teacher"] < 0.01  # held out: no better than the scored fold's mean


def test_finetune_reports_the_students_own_probes(small_cohort, small_cohort_tiled, tmp_path):
    """A tuned run reports the four probe values; the frozen-student reference (lr x 0) keeps
    the student bit for bit, so its probes do not move, while its predictor is trained."""
    cfg = cohort_cfg(small_cohort, small_cohort_tiled, tmp_path / "tuned.pt", epochs=2,
                     student_lr_mult=1.0, val_at_steps=(3,))  # fmt: skip
    finetune(cfg)
    tuned = json.loads(output_paths(cfg.out)["final_metrics"].read_text())
    keys = [f"student_{p}_r2_{w}" for p in ("teacher", "context") for w in ("before", "after")]
    assert all(np.isfinite(tuned[k]) for k in keys), tuned
    assert tuned["student_teacher_r2_after"] != tuned["student_teacher_r2_before"]
    # --val-at-steps: a curve from before (step 0) to after, the ends being the run's own
    curve = tuned["val_curve"]
    assert [p["step"] for p in curve] == [0, 3, tuned["steps"]]
    assert curve[0]["student_teacher_r2"] == tuned["student_teacher_r2_before"]
    assert curve[-1]["student_teacher_r2"] == tuned["student_teacher_r2_after"]
    assert curve[-1]["val_r2"] == tuned["val_r2_after"]
    assert len({p["student_teacher_r2"] for p in curve}) == 3  # the student moved at each

    frozen_cfg = replace(cfg, out=str(tmp_path / "frozen.pt"), student_lr_mult=0.0)
    finetune(frozen_cfg)
    frozen = json.loads(output_paths(frozen_cfg.out)["final_metrics"].read_text())
    start = create_encoder("resnet18_trunc", pretrained=False, target_img_size=64)
    init = start.model.state_dict()
    for k, v in _student_state(frozen_cfg.out).items():
        assert torch.equal(v, init[k]), k
    for p in ("teacher", "context"):
        assert frozen[f"student_{p}_r2_after"] == pytest.approx(
            frozen[f"student_{p}_r2_before"], abs=1e-9
        )
        assert frozen[f"student_{p}_r2_before"] == pytest.approx(
            tuned[f"student_{p}_r2_before"], abs=1e-9
        )  # the same starting student, the same probe
    # ... while its predictor was trained (the pretext numbers move without the student)
    assert abs(frozen["val_cos_std_after"] - frozen["val_cos_std_before"]) > 1e-3
