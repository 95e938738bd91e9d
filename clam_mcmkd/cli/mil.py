"""MIL commands: ``train``, ``eval``, ``heatmap`` (model names from the MIL model registry)."""

from __future__ import annotations

import sys

import click

from ..heatmap import HeatmapConfig
from ..mil.config import FEATURE_NORMS, EvalConfig, TrainConfig
from ..mil.models import MIL_LOSSES, SIZES, list_mil_models
from .options import (
    OUTPUT_FOLDER,
    config_option,
    device_option,
    label_dict_option,
    option,
    parse_embed_dim,
    stack,
)


def _common_options(cls: type):
    """The options `train` and `eval` share: features, labels, fold range, device."""
    return stack(
        option("--data-root-dir", required=True, help="Feature dir with pt_files/ (or h5_files/)."),
        option("--csv-path", required=True, help="Dataset CSV (case_id, slide_id, label)."),
        config_option(cls, "k_start", help="First fold (-1: 0)."),
        config_option(cls, "k_end", help="End fold, exclusive (-1: k)."),
        label_dict_option(),
        config_option(
            cls, "embed_dim", type=str, callback=parse_embed_dim, help="Feature width or auto."
        ),  # fmt: skip
        device_option(cls),
    )


def _opt(field: str, *names: str, **kwargs):
    return config_option(TrainConfig, field, *names, **kwargs)


@click.command("train")
@_common_options(TrainConfig)
@option("--split-dir", required=True, help="Folder with splits_<k>.csv (ours or CLAM's).")
@option("--results-dir", default="./results", show_default=True, type=OUTPUT_FOLDER,
        help="Results root.")  # fmt: skip
@option("--exp-code", required=True,
        help="Run name: results go to <results-dir>/<exp-code>_s<seed>.")  # fmt: skip
@_opt("model_type", type=click.Choice(list_mil_models()),
      help="abmil = CLAM-SB without instance clustering; see the command's help.")  # fmt: skip
@_opt("k", "--k", help="Number of folds.")
@_opt("max_epochs")
@option(
    "--early-stopping", is_flag=True, help="CLAM's early stopping (patience 20, after epoch 50)."
)
@option("--weighted-sample", is_flag=True, help="Class-balanced bag sampling.")
@_opt("opt", type=click.Choice(["adam", "sgd"]))
@_opt("lr", help="Learning rate (CLAM's README recipe).")
@_opt("reg", help="Weight decay.")
@_opt("drop_out")
@_opt("bag_loss", type=click.Choice(MIL_LOSSES))
@_opt("inst_loss", type=click.Choice(MIL_LOSSES))
@_opt("bag_weight", help="Bag loss weight (clam_*).")
@_opt("B", "--B", "B", help="Instances per class for clustering.")
@option("--subtyping/--no-subtyping", default=None, help="Default: on for >2 classes.")
@_opt("model_size", type=click.Choice(list(SIZES)))
@_opt("seed")
@_opt("feature_norm", type=click.Choice(FEATURE_NORMS),
      help="zscore: standardise each feature dimension with the mean/std of the fold's "
      "training patches (saved as s_<k>_feature_norm.npz; eval and heatmap apply it). "
      "none: raw features, as CLAM.")  # fmt: skip
@option("--no-cache", is_flag=True, help="Re-read feature files every epoch (low memory).")
@_opt("mhim_teacher_init", type=str,
      help="mhim_abmil: a finished abmil run dir (s_<k>_checkpoint.pt per fold) to start the "
      "teacher from. Without it the abmil baseline is trained first, in this command, as "
      "<exp-code>_baseline (same settings; resumes).")  # fmt: skip
@_opt("mhim_mask_ratio", help="mhim_abmil: share of all instances masked at random.")
@_opt("mhim_mask_ratio_l", help="mhim_abmil: share of the lowest-attention instances masked.")
@_opt("mhim_mask_ratio_h", help="mhim_abmil: share of the highest-attention instances masked.")
@_opt("mhim_mask_ratio_hr",
      help="mhim_abmil: those are drawn at random from the top ratio_h/ratio_hr.")  # fmt: skip
@option("--mhim-mrh-schedule/--no-mhim-mrh-schedule", default=True, show_default=True,
        help="mhim_abmil: decay mask_ratio_h to 0 on a cosine over training.")  # fmt: skip
@_opt("mhim_cl_alpha", help="mhim_abmil: weight of the student-teacher consistency loss.")
@_opt("mhim_temp_t", help="mhim_abmil: teacher temperature.")
@_opt("mhim_temp_s", help="mhim_abmil: student temperature.")
@_opt("mhim_momentum", help="mhim_abmil: EMA momentum of the teacher.")
@_opt("mhim_student_init", type=click.Choice(["none", "fc", "all"]),
      help="mhim_abmil: start the student from the baseline's first layer (fc), all of it, or "
      "not.")  # fmt: skip
def train_cmd(**kw):
    """Train a MIL model on k-fold splits (CLAM's main.py semantics).

    abmil, clam_sb, clam_mb: CLAM's models. transmil: TransMIL (Nystrom attention, PPEG, class
    token). mhim_abmil: ABMIL trained by MHIM-MIL (a momentum teacher masks the most attended
    instances); defaults from the MHIM-MIL v1 code's CAMELYON16 recipe.
    """
    from ..mil import parse_label_dict, train

    kw["label_dict"] = parse_label_dict(kw["label_dict"])
    kw["cache_features"] = not kw.pop("no_cache")
    summary = train(TrainConfig(**kw))
    click.echo(f"summary: {summary}")


@click.command("eval")
@_common_options(EvalConfig)
@option("--models-dir", required=True, help="A train run dir with s_<k>_checkpoint.pt.")
@option("--eval-dir", required=True, type=OUTPUT_FOLDER,
        help="Output folder (summary.csv, predictions).")  # fmt: skip
@option("--split-dir", default=None, help="Splits folder; without it every CSV slide is used.")
@config_option(EvalConfig, "split", type=click.Choice(["train", "val", "test", "all"]))
@option("--k", default=None, type=int, help="Number of folds (default: the run's).")
@option("--model-type", type=click.Choice(list_mil_models()), default=None,
        help="Default: from the run's train_config.json, else clam_sb.")  # fmt: skip
@option("--drop-out", default=None, type=float)
@option("--model-size", type=click.Choice(list(SIZES)), default=None)
def eval_cmd(**kw):
    """Evaluate saved fold checkpoints on a split or on any CSV of slides."""
    from ..mil import evaluate, parse_label_dict

    kw["label_dict"] = parse_label_dict(kw["label_dict"])
    summary = evaluate(EvalConfig(**kw))
    click.echo(f"summary: {summary}")


def _heat(field: str, *names: str, **kwargs):
    return config_option(HeatmapConfig, field, *names, **kwargs)


def _slide_ids(ctx, param, value):
    """``--slide-ids a,b --slide-ids c`` -> [a, b, c]; none -> None (every CSV slide)."""
    ids = [s.strip() for item in value for s in item.split(",") if s.strip()]
    return ids or None


@click.command("heatmap")
@option("--models-dir", required=True, help="A train run dir (s_<k>_checkpoint.pt; CLAM's too).")
@_heat("fold", help="Which fold's model.")
@option("--data-root-dir", required=True, help="Features: h5_files/ (with coords) or pt_files/.")
@option("--data-h5-dir", required=True, help="Coords: CLAM's patches/<slide_id>.h5.")
@option("--data-slide-dir", required=True, help="Directory with the slides (thumbnails).")
@option("--csv-path", required=True, help="Dataset CSV: which slides, and their labels.")
@_heat("slide_ext", help="Slide file extension, e.g. .svs (default: found per slide).")
@option("--out", required=True, type=OUTPUT_FOLDER,
        help="Output: <out>/<slide_id>/ PNG, GeoJSON, blockmap h5.")  # fmt: skip
@option("--slide-ids", multiple=True, callback=_slide_ids,
        help="Only these slides (comma-separated or repeated; default: every CSV slide).")  # fmt: skip
@_heat("cmap", help="Matplotlib colour map.")
@_heat("alpha", help="Weight of the colour over the slide.")
@_heat("thumb_max_size", help="Longer side of the thumbnail, pixels.")
@device_option(HeatmapConfig)
@option("--no-auto-skip", is_flag=True, help="Redo slides whose blockmap h5 exists.")
@option("--model-type", type=click.Choice(list_mil_models()), default=None,
        help="Default: the run's train_config.json, else read off the checkpoint.")  # fmt: skip
def heatmap_cmd(**kw):
    """Attention heatmaps of a trained fold: PNG overlay, QuPath GeoJSON, CLAM blockmap h5.

    abmil, clam_sb, clam_mb and mhim_abmil (an ABMIL student); transmil is refused (no
    per-patch attention pooled its bags).

    Per slide: raw attention per patch (one map per class for CLAM-MB) as CLAM's percentiles;
    the feature standardisation saved with the model, if any, is applied first.
    """
    from ..heatmap import run_heatmaps

    summary = run_heatmaps(HeatmapConfig(**kw))
    click.echo(summary.line())
    if summary.failed and not summary.done and not summary.skipped:
        sys.exit(1)


COMMANDS = (train_cmd, eval_cmd, heatmap_cmd)
