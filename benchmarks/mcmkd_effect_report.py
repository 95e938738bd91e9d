"""Tables and the forest plot of the MCM-KD effect experiment (bench_mcmkd_effect.py).

- ``mcmkd_effect.csv``: test AUC per arm, cohort seed, MIL seed ("all" = averaged over MIL
  seeds too) and feature_norm, from fold-averaged slide probabilities.
- ``mcmkd_effect_summary.csv``: ΔAUC of each comparison pooled over cohort seeds, 95 %
  bootstrap CI (2000 paired, label-stratified resamples within cohort seed) and pooled DeLong
  p: every arm vs ``untuned`` and the controls vs ``mcmkd`` (primary endpoints: mcmkd vs
  untuned and mcmkd vs patch_kd, feature_norm zscore; mcmkd_effect_protocol.md).
- ``mcmkd_effect_pretext.csv``: each fine-tune's validation R² before/after vs the mean.
- ``mcmkd_effect_forest.png``: the summary's ΔAUC with CIs, zscore and none.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from clam_mcmkd.utils import atomic_path, atomic_write_text

PRIMARY = (("mcmkd", "untuned"), ("mcmkd", "patch_kd"))
CONTROLS = ("patch_kd", "sham", "random_teacher", "teacher")


def auc_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Test AUC per (arm, cohort seed, MIL seed, norm) of fold-averaged probabilities, and per
    (arm, cohort seed, norm) of fold- and seed-averaged ones (mil_seed = "all")."""
    from clam_mcmkd.benchmark.stats import auc, average_slide_probabilities

    keys = ["arm", "cohort_seed", "feature_norm"]
    rows = []
    for by, tag in ((keys + ["mil_seed"], None), (keys, "all")):
        avg = average_slide_probabilities(runs, keys=by, label_col="y")
        for key, g in avg.groupby(by):
            rec = dict(zip(by, key if isinstance(key, tuple) else (key,)))
            rec.setdefault("mil_seed", tag)
            rec.update(test_auc=auc(g["y"], g["prob"]), n_test_slides=len(g))
            rows.append(rec)
    cols = ["arm", "cohort_seed", "mil_seed", "feature_norm", "test_auc", "n_test_slides"]
    return pd.DataFrame(rows)[cols]


def delta_summary(runs: pd.DataFrame, pairs, n_resamples: int = 2000) -> pd.DataFrame:
    """ΔAUC of (arm_a, norm_a) - (arm_b, norm_b) pooled over cohort seeds (the pre-registered
    statistics: fold/seed-averaged slide probabilities, paired label-stratified bootstrap CI
    stratified by cohort seed, DeLong pooled with equal weights). The two primary endpoints
    (zscore) also get Holm-adjusted p values over the pair of them."""
    from clam_mcmkd.benchmark.stats import average_slide_probabilities, pooled_delta_auc

    avg = average_slide_probabilities(
        runs, keys=["arm", "feature_norm", "cohort_seed"], label_col="y"
    )
    rows = []
    for (arm_a, norm_a), (arm_b, norm_b) in pairs:
        groups = []
        for _, g in avg.groupby("cohort_seed"):
            a = g[(g.arm == arm_a) & (g.feature_norm == norm_a)].set_index("slide_id")
            b = g[(g.arm == arm_b) & (g.feature_norm == norm_b)].set_index("slide_id")
            if a.empty or b.empty:
                continue
            b = b.loc[a.index]  # paired: the same test slides in the same order
            groups.append((a["y"].to_numpy(), a["prob"].to_numpy(), b["prob"].to_numpy()))
        if not groups:
            continue
        res = pooled_delta_auc(groups, n_resamples=n_resamples, seed=0)
        same = norm_a == norm_b
        primary = same and norm_a == "zscore" and (arm_a, arm_b) in PRIMARY
        rows.append(
            {
                "arm": arm_a if same else f"{arm_a}:{norm_a}",
                "comparison": arm_b if same else f"{arm_b}:{norm_b}",
                "feature_norm": norm_a if same else "mixed",
                "endpoint": f"primary {PRIMARY.index((arm_a, arm_b)) + 1}" if primary
                else "secondary",
                "delta_auc": res.delta, "ci_low": res.ci_low, "ci_high": res.ci_high,
                "p_delong": res.p, "mde": res.mde(), "n_cohort_seeds": len(groups),
                "n_test_slides": int(sum(len(y) for y, _, _ in groups)),
                "per_seed_delta": " ".join(f"{r.delta:+.3f}" for r in res.per_group),
            }
        )  # fmt: skip
    table = pd.DataFrame(rows)
    if not table.empty:
        table["p_holm"] = holm(table["p_delong"].where(table["endpoint"] != "secondary"))
    return table


def holm(p: pd.Series) -> pd.Series:
    """Holm's step-down adjustment over the non-missing p values (others stay missing)."""
    import numpy as np

    ok = p.dropna().sort_values()
    m = len(ok)
    adj = np.minimum(1.0, np.maximum.accumulate([(m - i) * v for i, v in enumerate(ok)]))
    return pd.Series(adj, index=ok.index).reindex(p.index)


def comparisons(arms) -> list[tuple[str, str]]:
    """The primary endpoints first, then every other arm vs untuned, then mcmkd vs each
    remaining control."""
    pairs = [p for p in PRIMARY if set(p) <= set(arms)]
    pairs += [(a, "untuned") for a in arms if a not in ("untuned", "mcmkd")]
    pairs += [("mcmkd", c) for c in CONTROLS if c != "patch_kd" and {"mcmkd", c} <= set(arms)]
    return pairs


def forest_plot(summary: pd.DataFrame, path: Path) -> Path:
    """ΔAUC and 95 % CI per comparison; zscore (primary) filled, none open."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = summary[summary.feature_norm != "mixed"]
    labels = list(dict.fromkeys(f"{a} − {c}" for a, c in zip(summary.arm, summary.comparison)))
    fig, ax = plt.subplots(figsize=(7.5, 0.55 * len(labels) + 1.6))
    for norm, dy, style in (("zscore", -0.15, "o"), ("none", 0.15, "s")):
        part = summary[summary.feature_norm == norm]
        for _, row in part.iterrows():
            y = labels.index(f"{row.arm} − {row.comparison}") + dy
            ax.errorbar(row.delta_auc, y, xerr=[[row.delta_auc - row.ci_low],
                        [row.ci_high - row.delta_auc]], fmt=style, capsize=3,
                        color="black" if norm == "zscore" else "grey",
                        mfc="black" if norm == "zscore" else "white",
                        label=f"feature_norm {norm}")  # fmt: skip
    ax.axvline(0, color="grey", lw=0.8, ls="--")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_ylim(len(labels) - 0.5, -0.5)
    ax.set_xlabel("ΔAUC (slide level, pooled over cohort seeds; 95 % bootstrap CI)")
    handles, names = ax.get_legend_handles_labels()
    unique = dict(zip(names, handles))
    ax.legend(unique.values(), unique.keys(), loc="lower right", fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return path


def write_results(
    out_dir: Path, runs: pd.DataFrame, pretext: pd.DataFrame, arms, name: str = "mcmkd_effect"
) -> pd.DataFrame:
    """Every output file of the experiment into `out_dir`, named `name`*; returns the summary."""
    out_dir.mkdir(parents=True, exist_ok=True)
    table = auc_table(runs)
    atomic_write_text(out_dir / f"{name}.csv", table.to_csv(index=False))
    norms = [n for n in ("zscore", "none") if n in set(runs["feature_norm"])]
    pairs = [((a, n), (b, n)) for n in norms for a, b in comparisons(arms)]
    if len(norms) == 2 and "untuned" in arms:  # does standardising MIL inputs matter?
        pairs.append((("untuned", "zscore"), ("untuned", "none")))
    summary = delta_summary(runs, pairs)
    atomic_write_text(out_dir / f"{name}_summary.csv", summary.to_csv(index=False))
    if not pretext.empty:
        atomic_write_text(out_dir / f"{name}_pretext.csv", pretext.to_csv(index=False))
    if not summary.empty:
        forest_plot(summary, out_dir / f"{name}_forest.png")
    print(summary.to_string(index=False, float_format="%.3f"))
    pooled = table[table["mil_seed"] == "all"]
    print(
        pooled.groupby(["arm", "feature_norm"])["test_auc"].agg(["mean", "std", "min", "max"])
        .to_string(float_format="%.3f")
    )  # fmt: skip
    return summary


def main() -> None:
    """Rebuild the tables and the plot from a run's ``mcmkd_effect_runs.csv.gz`` (and pretext rows)."""
    import argparse

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--runs", required=True)
    ap.add_argument("--pretext", default=None)
    ap.add_argument("--out", required=True)
    ap.add_argument("--name", default="mcmkd_effect", help="prefix of the files' names")
    args = ap.parse_args()
    runs = pd.read_csv(args.runs)
    pretext = pd.read_csv(args.pretext) if args.pretext else pd.DataFrame()
    order = ["untuned", "mcmkd", "patch_kd", "random_teacher", "sham", "teacher"]
    arms = [a for a in order if a in set(runs["arm"])]
    write_results(Path(args.out), runs, pretext, arms, name=args.name)


if __name__ == "__main__":
    main()
