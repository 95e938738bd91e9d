"""Slide-level statistics for comparing encoders: averaged predictions, DeLong, bootstrap CIs.

How the field compares two feature extractors on one fixed test set (pROC's conventions):

1. :func:`average_slide_probabilities` - every test slide gets ONE probability per encoder, the
   mean over folds and MIL seeds. Folds and seeds are training noise; the slides are the
   sample. (Pooling k folds' predictions into one ROC counts each slide k times.)
2. :func:`delong_test` - DeLong's test for two correlated AUCs on the same slides, with the
   fast O(n log n) structural components of Sun & Xu (2014).
3. :func:`paired_bootstrap_delta_auc` - a paired, label-stratified percentile bootstrap CI of
   ΔAUC over test slides (pROC's ``boot.stratified=TRUE``, 2000 resamples by default).
4. :func:`pooled_delta_auc` - the same over several cohort seeds (independent replicate
   cohorts): the estimand is the unweighted mean of the per-seed ΔAUC.

Plus :func:`feature_health` (how collapsed an encoder's features are) and, re-exported from
the trainer's own metrics, :func:`pretext_scores` (masked-patch prediction against the
predict-the-mean baseline). numpy, scipy and pandas only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..mcmkd.metrics import pretext_scores, rowwise_cosine

__all__ = [
    "BootstrapResult", "DeLongResult", "PooledResult", "auc", "average_slide_probabilities",
    "delong_components", "delong_test", "feature_health", "paired_bootstrap_delta_auc",
    "pooled_delta_auc", "pretext_scores", "stratified_resample_indices",
]  # fmt: skip

# --------------------------------------------------------------------------- predictions


def average_slide_probabilities(
    rows,
    keys: Sequence[str] = (),
    slide_col: str = "slide_id",
    label_col: str = "label",
    prob_col: str = "prob",
):
    """One probability per (keys..., slide): the mean over every other replicate (fold, seed).

    `rows` is a long table (pandas DataFrame), one row per slide per run. Returns a DataFrame
    with ``keys + [slide_col, label_col, prob_col, "n_runs"]``. A slide whose label differs
    between runs is an error (the runs disagree about the data).
    """
    import pandas as pd

    rows = pd.DataFrame(rows)
    group = [*keys, slide_col]
    labels = rows.groupby(group, sort=True)[label_col].nunique()
    if (labels > 1).any():
        bad = labels[labels > 1].index[0]
        raise ValueError(f"slide {bad} has different labels in different runs")
    out = rows.groupby(group, sort=True).agg(
        **{
            label_col: (label_col, "first"),
            prob_col: (prob_col, "mean"),
            "n_runs": (prob_col, "size"),
        }
    )
    return out.reset_index()


# --------------------------------------------------------------------------- AUC and DeLong


def _check_binary(labels, *scores) -> tuple[np.ndarray, list[np.ndarray]]:
    y = np.asarray(labels).astype(int).ravel()
    if not set(np.unique(y)) <= {0, 1}:
        raise ValueError(f"labels must be 0/1, got {sorted(set(np.unique(y)))}")
    if y.sum() == 0 or y.sum() == len(y):
        raise ValueError("AUC needs at least one positive and one negative slide")
    out = []
    for s in scores:
        s = np.asarray(s, dtype=float).ravel()
        if s.shape != y.shape:
            raise ValueError(f"{len(s)} scores for {len(y)} labels")
        if not np.isfinite(s).all():
            raise ValueError("scores must be finite")
        out.append(s)
    return y, out


def _midranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n with ties given their average rank (Sun & Xu's midrank, along the last axis)."""
    from scipy.stats import rankdata

    return rankdata(x, axis=-1)


def delong_components(labels, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AUCs and their DeLong covariance matrix for k predictors of the same slides.

    `scores` is (k, n). Fast DeLong (Sun & Xu 2014, IEEE SPL 21:1389): the structural
    components V10 (one per positive) and V01 (one per negative) come from midranks within the
    positives, within the negatives and over all slides, so the cost is O(k n log n).
    Returns ``(aucs (k,), cov (k, k))`` with cov = S10 / m + S01 / n.
    """
    scores = np.atleast_2d(np.asarray(scores, dtype=float))
    y, rows = _check_binary(labels, *scores)
    s = np.stack(rows)
    pos, neg = s[:, y == 1], s[:, y == 0]
    m, n = pos.shape[1], neg.shape[1]
    t_pos, t_neg = _midranks(pos), _midranks(neg)
    t_all = _midranks(np.concatenate([pos, neg], axis=1))
    aucs = (t_all[:, :m].sum(axis=1) - m * (m + 1) / 2) / (m * n)
    v10 = (t_all[:, :m] - t_pos) / n  # P(score of this positive > a random negative)
    v01 = 1.0 - (t_all[:, m:] - t_neg) / m  # P(a random positive > this negative)
    s10 = np.atleast_2d(np.cov(v10)) if m > 1 else np.zeros((len(s), len(s)))
    s01 = np.atleast_2d(np.cov(v01)) if n > 1 else np.zeros((len(s), len(s)))
    return aucs, s10 / m + s01 / n


def auc(labels, scores) -> float:
    """ROC AUC (Mann-Whitney, ties count one half): equals sklearn's roc_auc_score."""
    return float(delong_components(labels, np.asarray(scores, dtype=float)[None])[0][0])


def _two_sided(z: float) -> float:
    from scipy.stats import norm

    return float(2 * norm.sf(abs(z)))


@dataclass(frozen=True)
class DeLongResult:
    auc_a: float
    auc_b: float
    delta: float  # auc_a - auc_b
    var: float  # DeLong variance of delta
    z: float
    p: float  # two-sided

    @property
    def se(self) -> float:
        return float(np.sqrt(max(self.var, 0.0)))


def _z_test(delta: float, var: float) -> tuple[float, float]:
    if var <= 0:  # identical predictors, or both perfect: no evidence of a difference
        if delta == 0:
            return 0.0, 1.0
        return float(np.sign(delta) * np.inf), 0.0
    z = delta / np.sqrt(var)
    return float(z), _two_sided(z)


def delong_test(labels, scores_a, scores_b) -> DeLongResult:
    """DeLong's test for two correlated AUCs (same slides): H0 AUC_a == AUC_b.

    As pROC's ``roc.test(method="delong", paired=TRUE)``; identical predictors give z = 0,
    p = 1.
    """
    y, (a, b) = _check_binary(labels, scores_a, scores_b)
    aucs, cov = delong_components(y, np.stack([a, b]))
    delta = float(aucs[0] - aucs[1])
    var = float(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    var = 0.0 if abs(var) < 1e-15 else var  # rounding of equal components
    z, p = _z_test(delta, var)
    return DeLongResult(float(aucs[0]), float(aucs[1]), delta, var, z, p)


# --------------------------------------------------------------------------- bootstrap


@dataclass(frozen=True)
class BootstrapResult:
    delta: float  # on the original slides
    ci_low: float
    ci_high: float
    n_resamples: int
    confidence: float


def _pair_matrix(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """psi[i, j] = 1 if positive i outranks negative j, 1/2 on a tie, else 0."""
    d = pos[:, None] - neg[None, :]
    return (d > 0) + 0.5 * (d == 0)


def stratified_resample_indices(labels, n_resamples: int, rng: np.random.Generator) -> np.ndarray:
    """(n_resamples, N) slide indices: each row draws the positives from the positives and the
    negatives from the negatives, with replacement (pROC's stratified bootstrap)."""
    y = np.asarray(labels).astype(int).ravel()
    parts = [np.flatnonzero(y == c) for c in (1, 0)]
    return np.concatenate(
        [p[rng.integers(0, len(p), size=(n_resamples, len(p)))] for p in parts], axis=1
    )


def _stratified_delta_draws(labels, a, b, n_resamples: int, rng: np.random.Generator):
    """ΔAUC on `n_resamples` label-stratified resamples of the slides.

    Why not ``scipy.stats.bootstrap(paired=True)``: it resamples slides from the pooled set,
    so the class counts vary between resamples (and a resample can lack a class, where AUC is
    undefined). pROC's stratified bootstrap keeps m positives and n negatives in every
    resample. With the pair matrix psi, a resample's AUC is w_pos' psi w_neg / (m n), w being
    how often each slide was drawn, so all resamples cost one einsum.
    """
    y, (a, b) = _check_binary(labels, a, b)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    psi = _pair_matrix(a[pos], a[neg]) - _pair_matrix(b[pos], b[neg])
    idx = stratified_resample_indices(y, n_resamples, rng)
    counts = np.zeros((n_resamples, len(y)))
    np.add.at(counts, (np.arange(n_resamples)[:, None], idx), 1)
    return np.einsum("ri,ij,rj->r", counts[:, pos], psi, counts[:, neg]) / (len(pos) * len(neg))


def _percentile_ci(draws: np.ndarray, confidence: float) -> tuple[float, float]:
    alpha = (1 - confidence) / 2
    low, high = np.quantile(draws, [alpha, 1 - alpha])
    return float(low), float(high)


def paired_bootstrap_delta_auc(
    labels, scores_a, scores_b, n_resamples: int = 2000, seed: int = 0, confidence: float = 0.95
) -> BootstrapResult:
    """Percentile CI of AUC_a - AUC_b from a paired, label-stratified bootstrap of slides.

    Paired: each resample draws slides, and both predictors are scored on the same draw, so the
    correlation between the two AUCs is kept. Seeded: the same inputs and seed give the same CI.
    """
    if n_resamples < 1:
        raise ValueError("n_resamples must be >= 1")
    draws = _stratified_delta_draws(
        labels, scores_a, scores_b, n_resamples, np.random.default_rng(seed)
    )
    delta = auc(labels, scores_a) - auc(labels, scores_b)
    low, high = _percentile_ci(draws, confidence)
    return BootstrapResult(float(delta), low, high, int(n_resamples), float(confidence))


# --------------------------------------------------------------------------- pooling over seeds


@dataclass(frozen=True)
class PooledResult:
    delta: float  # unweighted mean over groups of the per-group ΔAUC
    ci_low: float
    ci_high: float
    var: float  # DeLong variance of that mean: sum(var_g) / G^2
    z: float
    p: float
    per_group: tuple[DeLongResult, ...]
    n_resamples: int
    se_boot: float  # standard deviation of the bootstrap draws of the pooled ΔAUC

    def mde(self, power: float = 0.8, alpha: float = 0.05) -> float:
        """Minimum detectable |ΔAUC| of this design (two-sided `alpha`, `power`), from the
        bootstrap SE: (z_{1-alpha/2} + z_power) * se, 2.80 se at the defaults. What a null
        result rules out, stated with it."""
        from statistics import NormalDist

        z = NormalDist().inv_cdf
        return float((z(1 - alpha / 2) + z(power)) * self.se_boot)


def pooled_delta_auc(
    groups: Sequence[tuple], n_resamples: int = 2000, seed: int = 0, confidence: float = 0.95
) -> PooledResult:
    """ΔAUC pooled over independent cohort seeds; `groups` = [(labels, scores_a, scores_b), ...].

    The estimand is the unweighted mean of the per-seed ΔAUC (each seed is an exchangeable
    replicate cohort of the same design and test-set size). Both statistics target it:

    - bootstrap: stratified by seed, then by label - every resample redraws each seed's test
      slides within their class and averages the per-seed ΔAUC; percentile CI.
    - DeLong: the per-seed ΔAUCs are independent (different slides), so var(mean) =
      sum(var_g) / G^2 and z = mean / sqrt(var) (a Stouffer-type combination with equal weights).

    Why not inverse-variance weights: the DeLong variance shrinks towards 0 as an AUC nears 1,
    so a seed at the ceiling would get almost all of the weight; and why not one ROC over all
    seeds' slides: scores from different cohorts' MIL models are not on one scale.
    """
    if not groups:
        raise ValueError("no groups to pool")
    rng = np.random.default_rng(seed)
    per_group = tuple(delong_test(*g) for g in groups)
    draws = np.mean([_stratified_delta_draws(*g, n_resamples, rng) for g in groups], axis=0)
    delta = float(np.mean([r.delta for r in per_group]))
    var = float(sum(r.var for r in per_group) / len(per_group) ** 2)
    z, p = _z_test(delta, var)
    low, high = _percentile_ci(draws, confidence)
    se_boot = float(np.std(draws, ddof=1)) if len(draws) > 1 else float("nan")
    return PooledResult(delta, low, high, var, z, p, per_group, int(n_resamples), se_boot)


# --------------------------------------------------------------------------- feature health


def feature_health(features) -> dict[str, float]:
    """Is an encoder an instrument at all? Collapse checks on (N, D) patch features.

    - ``cos_to_mean``: mean cosine of each feature to the mean feature (random-init encoders
      scored 0.96-0.998: every patch nearly the same vector);
    - ``rel_std``: mean per-dimension std across patches / norm of the mean feature;
    - ``effective_rank``: exp of the entropy of the normalised singular values of the centred
      features (Roy & Vetterli 2007): 1 = one direction of variation, D = isotropic.
    """
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"need (N >= 2, D) features, got shape {x.shape}")
    mean = x.mean(axis=0)
    sv = np.linalg.svd(x - mean, compute_uv=False)
    p = sv / sv.sum() if sv.sum() > 0 else np.ones(1)
    p = p[p > 0]
    return {
        "cos_to_mean": float(np.mean(rowwise_cosine(mean[None, :], x))),
        "rel_std": float(x.std(axis=0).mean() / (np.linalg.norm(mean) + 1e-12)),
        "effective_rank": float(np.exp(-(p * np.log(p)).sum())),
        "n": int(len(x)),
        "dim": int(x.shape[1]),
    }
