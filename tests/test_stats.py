"""Slide-level statistics: DeLong against an O(n^2) reference and a hand-computed case, the
stratified bootstrap against direct resampling and its coverage, pooling, pretext metrics."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.stats import norm
from sklearn.metrics import r2_score, roc_auc_score

from clam_mcmkd.benchmark.stats import (
    auc,
    average_slide_probabilities,
    delong_components,
    delong_test,
    paired_bootstrap_delta_auc,
    pooled_delta_auc,
    pretext_scores,
    stratified_resample_indices,
)


def _delong_reference(y, scores):
    """DeLong et al. (1988) as written: psi over all (positive, negative) pairs, O(m n)."""
    y = np.asarray(y)
    v10, v01, aucs = [], [], []
    for s in scores:
        x, z = s[y == 1], s[y == 0]
        psi = np.array([[1.0 if xi > zj else 0.5 if xi == zj else 0.0 for zj in z] for xi in x])
        aucs.append(psi.mean())
        v10.append(psi.mean(axis=1))
        v01.append(psi.mean(axis=0))
    m, n = (y == 1).sum(), (y == 0).sum()
    return np.array(aucs), np.cov(np.array(v10)) / m + np.cov(np.array(v01)) / n


def _tied_case(seed=0, n=23):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.45).astype(int)
    y[:2] = [0, 1]
    a = np.round(y * 0.8 + rng.normal(0, 1, n), 1)  # rounded: ties within and across classes
    b = np.round(y * 0.3 + 0.5 * a + rng.normal(0, 1, n), 1)
    return y, a, b


def test_delong_matches_quadratic_reference_with_ties():
    for seed in range(4):
        y, a, b = _tied_case(seed)
        aucs, cov = delong_components(y, np.stack([a, b]))
        ref_aucs, ref_cov = _delong_reference(y, [a, b])
        np.testing.assert_allclose(aucs, ref_aucs, rtol=0, atol=1e-12)
        np.testing.assert_allclose(cov, ref_cov, rtol=1e-10, atol=1e-14)
        res = delong_test(y, a, b)
        var = ref_cov[0, 0] + ref_cov[1, 1] - 2 * ref_cov[0, 1]
        assert res.delta == pytest.approx(ref_aucs[0] - ref_aucs[1], abs=1e-12)
        assert res.var == pytest.approx(var, rel=1e-10)
        assert res.z == pytest.approx(res.delta / np.sqrt(var), rel=1e-10)
        assert res.p == pytest.approx(2 * norm.sf(abs(res.z)), rel=1e-10)


def test_delong_hand_computed_case():
    # positives 0.9, 0.4; negatives 0.5, 0.1: psi = [[1, 1], [0, 1]], AUC 3/4;
    # V10 = (1, 1/2), V01 = (1/2, 1): S10 = S01 = 1/8, var = 1/8 / 2 + 1/8 / 2 = 1/8
    y = [1, 1, 0, 0]
    aucs, cov = delong_components(y, np.array([[0.9, 0.4, 0.5, 0.1]]))
    assert aucs[0] == pytest.approx(0.75)
    assert cov[0, 0] == pytest.approx(0.125)
    # b ranks every pair right: var(b) = 0, cov(a, b) = 0, so var(delta) = var(a)
    res = delong_test(y, [0.9, 0.4, 0.5, 0.1], [0.9, 0.8, 0.5, 0.1])
    assert (res.auc_a, res.auc_b, res.delta) == pytest.approx((0.75, 1.0, -0.25))
    assert res.var == pytest.approx(0.125)
    assert res.z == pytest.approx(-0.25 / np.sqrt(0.125))


def test_auc_equals_sklearn_and_identical_predictors_give_no_difference():
    for seed in range(3):
        y, a, b = _tied_case(seed, n=40)
        assert auc(y, a) == pytest.approx(roc_auc_score(y, a), abs=1e-12)
        assert auc(y, b) == pytest.approx(roc_auc_score(y, b), abs=1e-12)
    res = delong_test(y, a, a)
    assert (res.delta, res.var, res.z, res.p) == (0.0, 0.0, 0.0, 1.0)
    with pytest.raises(ValueError, match="positive and one negative"):
        auc([1, 1, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="scores for"):
        delong_test([0, 1], [0.1, 0.2], [0.3])


def test_stratified_resamples_keep_class_counts():
    y = np.array([0, 1, 1, 0, 0, 1, 0, 0, 0])
    idx = stratified_resample_indices(y, 500, np.random.default_rng(3))
    assert idx.shape == (500, len(y))
    assert (y[idx].sum(axis=1) == y.sum()).all()  # every resample: 3 positives, 6 negatives
    assert len(np.unique(idx[:, 0])) == 3 and len(np.unique(idx[:, -1])) == 6  # real draws


def test_bootstrap_draws_equal_direct_resampling():
    """The einsum shortcut equals scoring each resample with sklearn."""
    from clam_mcmkd.benchmark.stats import _stratified_delta_draws

    y, a, b = _tied_case(1, n=30)
    draws = _stratified_delta_draws(y, a, b, 50, np.random.default_rng(9))
    idx = stratified_resample_indices(y, 50, np.random.default_rng(9))
    direct = [roc_auc_score(y[i], a[i]) - roc_auc_score(y[i], b[i]) for i in idx]
    np.testing.assert_allclose(draws, direct, atol=1e-12)


def test_bootstrap_identical_predictors_collapse_and_seeded():
    y, a, b = _tied_case(2, n=30)
    same = paired_bootstrap_delta_auc(y, a, a, n_resamples=2000, seed=0)
    assert (same.delta, same.ci_low, same.ci_high) == (0.0, 0.0, 0.0)
    one = paired_bootstrap_delta_auc(y, a, b, n_resamples=2000, seed=5)
    two = paired_bootstrap_delta_auc(y, a, b, n_resamples=2000, seed=5)
    assert one == two
    assert one.ci_low < one.delta < one.ci_high
    assert one.delta == pytest.approx(auc(y, a) - auc(y, b))


def test_bootstrap_ci_covers_the_true_delta():
    """Binormal scores with known AUCs: Phi(mu / sqrt(2)); the 95 % CI covers the true ΔAUC in
    about 95 % of 60 simulated test sets (and is not so wide that it always does)."""
    mu_a, mu_b = 1.2, 0.6
    true = norm.cdf(mu_a / np.sqrt(2)) - norm.cdf(mu_b / np.sqrt(2))
    rng = np.random.default_rng(0)
    hits, widths = 0, []
    for rep in range(60):
        y = np.repeat([0, 1], 40)
        common = rng.normal(0, 1, 80)  # the two predictors are correlated, as two encoders are
        a = mu_a * y + 0.6 * common + 0.8 * rng.normal(0, 1, 80)
        b = mu_b * y + 0.6 * common + 0.8 * rng.normal(0, 1, 80)
        res = paired_bootstrap_delta_auc(y, a, b, n_resamples=500, seed=rep)
        hits += res.ci_low <= true <= res.ci_high
        widths.append(res.ci_high - res.ci_low)
    assert 0.85 <= hits / 60 <= 1.0
    assert 0.05 < np.mean(widths) < 0.4


def test_pooling_over_seeds():
    g1, g2 = _tied_case(0, n=30), _tied_case(1, n=30)
    single = pooled_delta_auc([g1], n_resamples=1000, seed=4)
    boot = paired_bootstrap_delta_auc(*g1, n_resamples=1000, seed=4)
    dl = delong_test(*g1)
    assert (single.ci_low, single.ci_high) == (boot.ci_low, boot.ci_high)
    assert (single.delta, single.var, single.p) == pytest.approx((dl.delta, dl.var, dl.p))
    both = pooled_delta_auc([g1, g2], n_resamples=1000, seed=4)
    d2 = delong_test(*g2)
    assert both.delta == pytest.approx((dl.delta + d2.delta) / 2)
    assert both.var == pytest.approx((dl.var + d2.var) / 4)
    assert both.ci_low < both.delta < both.ci_high
    twice = pooled_delta_auc([g1, g1], n_resamples=1000, seed=4)  # two equal replicates
    assert twice.delta == pytest.approx(dl.delta) and twice.var == pytest.approx(dl.var / 2)
    assert twice.ci_high - twice.ci_low < single.ci_high - single.ci_low


def test_mde_is_2_8_bootstrap_se_and_agrees_with_delong():
    g1, g2 = _tied_case(0, n=30), _tied_case(1, n=30)
    both = pooled_delta_auc([g1, g2], n_resamples=2000, seed=4)
    assert both.mde() == pytest.approx(2.8016 * both.se_boot, rel=1e-3)
    # the bootstrap SE and the DeLong SE estimate the same thing on the same slides
    assert both.se_boot == pytest.approx(np.sqrt(both.var), rel=0.25)
    # a percentile CI spans about 2 x 1.96 bootstrap SEs
    assert both.ci_high - both.ci_low == pytest.approx(3.92 * both.se_boot, rel=0.2)
    assert both.mde(power=0.9) > both.mde() > both.mde(alpha=0.2)


def test_average_slide_probabilities_over_folds_and_seeds():
    rows = pd.DataFrame(
        {
            "arm": ["u"] * 6 + ["m"] * 2,
            "fold": [0, 1, 0, 1, 0, 1, 0, 0],
            "seed": [1, 1, 2, 2, 1, 1, 1, 2],
            "slide_id": ["s1", "s1", "s1", "s1", "s2", "s2", "s1", "s1"],
            "label": [1, 1, 1, 1, 0, 0, 1, 1],
            "prob": [0.2, 0.4, 0.6, 0.8, 0.1, 0.3, 0.9, 0.7],
        }
    )
    out = average_slide_probabilities(rows, keys=["arm"])
    got = {(r.arm, r.slide_id): (r.prob, r.n_runs) for r in out.itertuples()}
    assert got[("u", "s1")] == (pytest.approx(0.5), 4)
    assert got[("u", "s2")] == (pytest.approx(0.2), 2)
    assert got[("m", "s1")] == (pytest.approx(0.8), 2)
    rows.loc[1, "label"] = 0
    with pytest.raises(ValueError, match="different labels"):
        average_slide_probabilities(rows, keys=["arm"])


def test_pretext_scores_against_the_mean_baseline():
    rng = np.random.default_rng(0)
    common = 5 + rng.random(32)  # a large shared component: raw cosine flatters the mean
    target = common + 0.3 * rng.normal(0, 1, (200, 32)) * rng.uniform(0.1, 3, 32)
    mean_guess = np.broadcast_to(target.mean(axis=0), target.shape)
    base = pretext_scores(mean_guess, target)
    assert base["r2"] == pytest.approx(0.0, abs=1e-12)
    assert base["cos_std"] == 0.0
    assert base["cos_raw"] > 0.98 and base["cos_raw_mean_baseline"] == pytest.approx(
        base["cos_raw"]
    )
    perfect = pretext_scores(target, target)
    assert perfect["r2"] == pytest.approx(1.0) and perfect["cos_std"] == pytest.approx(1.0)
    noisy = target + 0.5 * (target - target.mean(axis=0)) + rng.normal(0, 0.3, target.shape)
    got = pretext_scores(noisy, target)
    sd = target.std(axis=0)
    mu = target.mean(axis=0)
    expected = r2_score((target - mu) / sd, (noisy - mu) / sd, multioutput="variance_weighted")
    assert got["r2"] == pytest.approx(expected)
    # a reference set (the training targets): its mean is a worse constant than the test mean
    ref = target[:100] + 0.2
    with_ref = pretext_scores(mean_guess, target, reference=ref)
    assert with_ref["r2_mean_baseline"] < 0
    with pytest.raises(ValueError, match="same"):
        pretext_scores(target[:, :3], target)


def test_streamed_pretext_sums_equal_the_scores_of_the_masked_positions():
    """What fine-tune validation accumulates per batch (and per rank) gives pretext_scores'
    R², its mean baseline and the standardised cosine of exactly the masked positions."""
    import torch

    from clam_mcmkd.mcmkd.metrics import pretext_sums, scores_from_sums

    rng = np.random.default_rng(3)
    ref = rng.normal(2.0, 3.0, (300, 6))
    target = rng.normal(2.4, 3.0, (5, 9, 6))  # 5 windows x 9 positions
    pred = target + rng.normal(0.0, 2.0, target.shape)
    mask = rng.random((5, 9)) < 0.5
    mu, sd = ref.mean(0), ref.std(0)
    zp, zt = (torch.from_numpy((x - mu) / sd) for x in (pred, target))
    m = torch.from_numpy(mask)
    sums = pretext_sums(zp[:2], zt[:2], m[:2]) + pretext_sums(zp[2:], zt[2:], m[2:])
    got = scores_from_sums(sums)
    want = pretext_scores(pred[mask], target[mask], reference=ref)
    for key in ("r2", "r2_mean_baseline", "cos_std"):
        assert got[key] == pytest.approx(want[key], rel=1e-10), key
    assert want["r2_mean_baseline"] < 0 < want["r2"]


def test_feature_health_tells_collapsed_from_spread_features():
    from clam_mcmkd.benchmark.stats import feature_health

    rng = np.random.default_rng(0)
    collapsed = 10 + 0.05 * rng.normal(0, 1, (300, 64))  # one big shared vector
    spread = rng.normal(0, 1, (300, 64))
    low_rank = rng.normal(0, 1, (300, 3)) @ rng.normal(0, 1, (3, 64))
    c, s, r = feature_health(collapsed), feature_health(spread), feature_health(low_rank)
    assert c["cos_to_mean"] > 0.99 and s["cos_to_mean"] < 0.3
    assert c["rel_std"] < 0.01 < s["rel_std"]
    assert s["effective_rank"] > 45 and r["effective_rank"] < 3.5
    with pytest.raises(ValueError):
        feature_health(spread[:1])
