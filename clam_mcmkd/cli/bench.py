"""Benchmark commands: ``benchmark``, ``demo``."""

from __future__ import annotations

import click

from ..benchmark.demo import DemoConfig
from ..mil.config import FEATURE_NORMS
from ..mil.models import list_mil_models
from .options import OUTPUT_FOLDER, config_option, option


def _print_report(report) -> None:
    import json

    from ..benchmark.report import read_report_table

    cfg = json.loads((report.parent / "benchmark_config.json").read_text())
    click.echo(read_report_table(report.parent, cfg["baseline"]))
    if cfg.get("note"):
        click.echo("\n" + cfg["note"].strip())
    click.echo(f"\nreport: {report}")


@click.command("benchmark")
@option("--config", "config_name", required=True,
        help="camelyon16, tcga_nsclc, demo, or a FILE.yaml of the same shape.")  # fmt: skip
@option("--slides", default=None, help="Directory with the slides.")
@option("--labels", default=None,
        help="Dataset CSV: case_id, slide_id, label (camelyon16 also: split = train|test).")  # fmt: skip
@option("--out", default=None, type=OUTPUT_FOLDER,
        help="Output directory; a rerun resumes from what is in it.")  # fmt: skip
@option("--teacher", default=None,
        help="Teacher of the fine-tuned and teacher arms (a registered or timm name, e.g. "
        "uni_v1, uni2_h); default: the config's.")  # fmt: skip
@option("--arms", "only_arms", default=None,
        help="Run only these arms of the config, comma-separated (the baseline among them).")  # fmt: skip
@option("--feature-norm", default=None, type=click.Choice(FEATURE_NORMS),
        help="MIL inputs: zscore (per fold, training slides' mean/std; the benchmark's default) "
        "or none (raw, CLAM's).")  # fmt: skip
@option("--models", default=None,
        help=f"MIL models, comma-separated: {','.join(list_mil_models())}.")  # fmt: skip
@option("--k", default=None, type=int, help="Number of folds; default: the config's.")
@option("--slide-ext", default=None, help="Slide extension; default: the config's, else guessed.")
@option("--clam-dir", default=None,
        help="A CLAM checkout patched by `patch-clam`: extraction and MIL training run its scripts.")  # fmt: skip
@option("--no-pretrained", is_flag=True, help="Random (seeded) weights: runs offline.")
@option("--num-workers", default=None, type=int, help="Patch-reading processes.")
@option("--device", default=None, help="auto, cpu, cuda, cuda:1 ... (default: the config's, auto).")
def benchmark_cmd(config_name, models, k, teacher, no_pretrained, only_arms, feature_norm,
                  **kw) -> None:  # fmt: skip
    """The config's arms (untuned, MCM-KD, patch-KD, teacher, ...), every MIL model, the same
    folds; slide-level ΔAUC vs the baseline with bootstrap CIs and DeLong p.

    tile -> splits -> finetune (per fine-tuned arm) -> extract features (per arm) -> train ->
    report.md. Each stage resumes from what is already in --out.
    """
    from ..benchmark import load_config, run_benchmark, with_overrides

    overrides = dict(kw)
    if models:
        overrides["mil.models"] = _names(models)
    if only_arms:
        overrides["only_arms"] = _names(only_arms)
    overrides["splits.k"] = k
    overrides["finetune.teacher"] = teacher
    overrides["mil.feature_norm"] = feature_norm
    overrides["pretrained"] = False if no_pretrained else None
    cfg = with_overrides(load_config(config_name), **overrides)
    if teacher:  # the config's teacher checkpoint belongs to the config's teacher
        cfg.finetune.teacher_ckpt = None
    _print_report(run_benchmark(cfg))


def _names(text: str) -> list[str]:
    return [m.strip() for m in text.split(",") if m.strip()]


@click.command("demo")
@config_option(DemoConfig, "out", type=OUTPUT_FOLDER, help="Output directory.")
@config_option(DemoConfig, "n_slides", help="Synthetic slides.")
@config_option(DemoConfig, "size", help="Slide side, level-0 pixels.")
@option("--smallest", is_flag=True, help="The smallest meaningful run (what CI runs).")
@option("--k", default=None, type=int, help="Folds (default: the demo config's).")
@option("--max-epochs", default=None, type=int, help="MIL epochs (default: the demo config's).")
@config_option(DemoConfig, "contrast", help="How visible the atypical region is (0-1).")
@config_option(DemoConfig, "test_per_class", help="Fixed test slides per class.")
@config_option(DemoConfig, "seed", help="Cohort seed.")
@config_option(DemoConfig, "device", help="cpu, cuda, auto ...")
@config_option(DemoConfig, "threads", type=click.IntRange(min=1), help="CPU threads for torch.")
def demo_cmd(**kw) -> None:
    """The benchmark on a synthetic cohort with encoders trained offline here: untuned,
    MCM-KD, patch-KD and teacher rows with slide-level CIs (CPU, ~6 minutes on 2 cores; the
    pipeline, not evidence)."""
    from ..benchmark import run_demo

    _print_report(run_demo(DemoConfig(**kw)))


COMMANDS = (benchmark_cmd, demo_cmd)
