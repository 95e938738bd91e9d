"""Feature commands: ``extract-features``, ``list-encoders``."""

from __future__ import annotations

import os
import sys

import click

from ..features import ExtractConfig
from .options import (
    OUTPUT_FOLDER,
    config_option,
    device_option,
    dist_timeout_option,
    option,
    precision_option,
    shard_option,
    workers_option,
)


@click.command("extract-features")
@option("--data-h5-dir", required=True, help="Directory with CLAM's patches/<slide_id>.h5.")
@option("--data-slide-dir", required=True, help="Directory with the slides.")
@config_option(ExtractConfig, "slide_ext",
               help="Slide file extension, e.g. .svs (default: found per slide).")  # fmt: skip
@option("--csv-path", default=None, help="CSV with a slide_id column (default: every coords h5).")
@option("--feat-dir", required=True, type=OUTPUT_FOLDER,
        help="Output: h5_files/ and pt_files/ go here.")  # fmt: skip
@config_option(ExtractConfig, "model", "--model", "--model-name",
               help="Encoder: resnet50_trunc, mcmkd_resnet50, uni_v1, virchow, kaiko_vitb8, ... "
               "(see list-encoders) or any timm name.")  # fmt: skip
@config_option(ExtractConfig, "batch_size")
@option("--no-auto-skip", is_flag=True, help="Recompute slides whose features exist.")
@config_option(ExtractConfig, "target_patch_size",
               help="Encoder input size (patches are resized to it).")  # fmt: skip
@option("--ckpt", default=None,
        help="Encoder checkpoint; else the model's variable (MCMKD_CKPT_PATH, UNI_CKPT_PATH, "
        "UNI2_CKPT_PATH, VIRCHOW2_CKPT_PATH, ...: see list-encoders), else its hub weights.")  # fmt: skip
@workers_option(ExtractConfig, "Patch")
@device_option(ExtractConfig)
@precision_option(ExtractConfig)
@dist_timeout_option(ExtractConfig)
@shard_option("HPC array jobs without torchrun: extract part I of N (0-based, e.g. "
              "$SLURM_ARRAY_TASK_ID/N), slides balanced by patch count; run files get .shard-I-of-N")  # fmt: skip
@option("--no-pretrained", is_flag=True, help="Random (seeded) weights: builds models offline.")
def extract_features_cmd(**kw) -> None:
    """Patch features for every slide, in CLAM's h5_files/ + pt_files/ layout.

    Works under `torchrun --nproc_per_node N` (slides are shared out across ranks, by patch
    count) and as N array jobs with --shard I/N; finished slides are skipped on a rerun.
    """
    from ..features import extract_features

    kw["pretrained"] = not kw.pop("no_pretrained")
    summary = extract_features(ExtractConfig(**kw))
    if int(os.environ.get("RANK", "0")) == 0:
        click.echo(summary.line())
    if summary.failed and not summary.done and not summary.skipped:
        sys.exit(1)


@click.command("list-encoders")
@option("--json", "as_json", is_flag=True,
        help="One JSON list: name, out_dim, input_size, mean, std, source, ... per encoder.")  # fmt: skip
def list_encoders_cmd(as_json: bool) -> None:
    """Built-in encoder names (any timm model name works as well); reads a static table, so it
    answers at once (no torch, timm or tiatoolbox import)."""
    from ..encoders import catalog

    if as_json:
        import json

        click.echo(json.dumps(catalog.describe_all(), indent=2))
        return
    for name, desc in catalog.descriptions().items():
        click.echo(f"{name:20s} {desc}")
    click.echo("<timm name>          any timm model (hf-hub:... too), pooled features; --ckpt FILE")


COMMANDS = (extract_features_cmd, list_encoders_cmd)
