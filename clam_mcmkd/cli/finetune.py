"""``clam-mcmkd finetune``: every option of :class:`~clam_mcmkd.mcmkd.FinetuneConfig`."""

from __future__ import annotations

import json
import os

import click

from ..mcmkd.config import OBJECTIVES, TARGETS, FinetuneConfig
from ..mcmkd.losses import LOSSES
from ..mcmkd.masking import MASK_STRATEGIES
from .options import (
    OUTPUT_FILE,
    OUTPUT_FOLDER,
    config_option,
    device_option,
    dist_timeout_option,
    option,
    precision_option,
    shard_option,
    workers_option,
)


def _opt(field: str, *names: str, **kwargs):
    return config_option(FinetuneConfig, field, *names, **kwargs)


@click.command("finetune")
@option("--data-h5-dir", required=True, help="Directory with CLAM's patches/<slide_id>.h5.")
@option("--data-slide-dir", required=True, help="Directory with the slides.")
@option("--csv-path", required=True, help="Dataset CSV (slide_id column; labels are not used).")
@_opt("slide_ext", help="Slide file extension, e.g. .svs (default: found per slide).")
@option("--teacher", required=True,
        help="Frozen teacher: any timm name (hf-hub:... too) or registered encoder.")  # fmt: skip
@option("--teacher-ckpt", default=None, help="Local weights for the teacher (state dict).")
@option("--teacher-input-size", default=None, type=int,
        help="Teacher input size (default: its own).")  # fmt: skip
@_opt("student", help="Student: resnet50_trunc or resnet18_trunc.")
@option("--student-ckpt", default=None, type=click.Path(exists=True, dir_okay=False),
        help="Start the student from this encoder checkpoint (of --student at --input-size).")  # fmt: skip
@_opt("objective", type=click.Choice(OBJECTIVES),
      help="mcmkd: masked context -> teacher features of masked patches; patch_kd (control): "
      "no mask, no context, each patch predicts its own teacher feature.")  # fmt: skip
@_opt("targets", type=click.Choice(TARGETS),
      help="teacher; sham (control): the teacher features permuted across patches (seeded).")  # fmt: skip
@_opt("input_size", help="Student input size (as at extraction).")
@_opt("grid", help="Context window side g (g x g patches).")
@option("--window-overlap", is_flag=True,
        help="Take every valid window corner (default: non-overlapping windows).")  # fmt: skip
@_opt("mask_ratio", help="Share of window positions masked.")
@_opt("mask_strategy", type=click.Choice(MASK_STRATEGIES))
@_opt("predictor_width")
@_opt("predictor_depth")
@_opt("predictor_heads")
@_opt("loss", type=click.Choice(list(LOSSES)))
@_opt("visible_weight", help="Loss weight on visible positions.")
@_opt("epochs")
@_opt("batch_size", help="Windows per optimizer step (all ranks together).")
@_opt("grad_accum", help="Micro-batches per optimizer step.")
@_opt("lr", help="Predictor learning rate.")
@_opt(
    "student_lr_mult",
    help="Student lr = lr x this (0: a frozen student, the reference "
    "that shows what the predictor alone learns).",
)
@_opt("weight_decay")
@_opt("warmup_frac", help="Share of steps of linear warm-up.")
@_opt("min_lr_ratio", help="Cosine decay floor (x lr).")
@_opt("grad_clip", help="Gradient norm clip (0: off).")
@option("--no-freeze-bn", is_flag=True,
        help="Update the student's BatchNorm statistics (frozen by default).")  # fmt: skip
@option("--teacher-cache", default=None, type=OUTPUT_FOLDER,
        help="Teacher-feature cache dir (default: <out>_teacher_cache/).")  # fmt: skip
@option("--max-windows", default=None, type=int, help="Train on at most N windows (seeded choice).")
@_opt("val_frac", help="Share of slides held out for validation.")
@_opt("max_val_windows")
@option("--no-student-probes", is_flag=True,
        help="Skip the ridge probes of the student's own features on the validation windows "
        "(R² of each patch's teacher feature and of its neighbours' mean, before and after).")  # fmt: skip
@_opt("probe_alpha", help="Ridge penalty of the student probes (x patches, standardised).")
@option("--val-at-steps", multiple=True, type=int,
        help="Also validate (pretext and student probes) after step N; repeat for a curve "
        "(final_metrics.json: val_curve).")  # fmt: skip
@workers_option(FinetuneConfig, "Window")
@_opt("teacher_batch_size")
@_opt("save_every", help="Steps between resumable states.")
@option("--stop-after-steps", default=None, type=int,
        help="Stop (resumable) after N steps, e.g. to time-box a job.")  # fmt: skip
@option("--resume", is_flag=True, help="Continue an interrupted run from <out>.state.pt.")
@option("--teacher-cache-only", is_flag=True,
        help="Only fill the teacher-feature cache (e.g. on GPU nodes before the training run).")  # fmt: skip
@shard_option("With --teacher-cache-only, as HPC array jobs: fill part I of N of the cache "
              "(0-based, slides balanced by patch count).")  # fmt: skip
@option("--no-pretrained", is_flag=True, help="Random (seeded) weights: builds models offline.")
@device_option(FinetuneConfig)
@precision_option(FinetuneConfig)
@dist_timeout_option(FinetuneConfig)
@_opt("seed")
@option("--out", required=True, type=OUTPUT_FILE, help="Output checkpoint, e.g. mcmkd_resnet50.pt.")
def finetune_cmd(**kw) -> None:
    """MCM-KD: fine-tune the patch encoder to predict a teacher's features of masked patches.

    Writes OUT (load it with `extract-features --model mcmkd_resnet50 --ckpt OUT`), plus
    OUT-stem .metrics.csv, .loss.png, .config.json, .final_metrics.json, .summary.json.
    Works under `torchrun --nproc_per_node N $(which clam-mcmkd) finetune ...`. With
    --teacher-cache-only it only fills the teacher cache (--shard I/N: as array jobs); a later
    run with the same options then never builds the teacher.
    """
    from ..mcmkd import finetune, output_paths

    kw["pretrained"] = not kw.pop("no_pretrained")
    kw["freeze_bn"] = not kw.pop("no_freeze_bn")
    kw["student_probes"] = not kw.pop("no_student_probes")
    path = finetune(FinetuneConfig(**kw))
    if int(os.environ.get("RANK", "0")) != 0:
        return
    if kw["teacher_cache_only"]:
        extra = json.loads(path.read_text())["extra"]
        click.echo(f"teacher cache {path.parent}: {extra['patches_computed']} patches computed, "
                   f"{extra['patches_cached']} already cached; summary {path.name}")  # fmt: skip
        return
    if path == output_paths(kw["out"])["state"]:
        click.echo(f"stopped early; state in {path} (continue with --resume)")
        return
    _echo_metrics(path, json.loads(output_paths(kw["out"])["final_metrics"].read_text()))


def _echo_metrics(path, metrics: dict) -> None:
    """The numbers a user reads first: the pretext (the predictor's) and the student's own."""
    click.echo(f"wrote {path}")
    if "val_cosine_after" in metrics:
        click.echo(
            "val masked cosine to teacher: before {val_cosine_before:.4f}, after "
            "{val_cosine_after:.4f}, mean-feature baseline {val_cosine_mean_baseline:.4f}".format(
                **metrics
            )
        )
    if metrics.get("student_teacher_r2_after") is not None:
        click.echo(
            "student probes (held-out R²): teacher feature {student_teacher_r2_before:.3f} -> "
            "{student_teacher_r2_after:.3f}, neighbours' mean {student_context_r2_before:.3f} -> "
            "{student_context_r2_after:.3f}".format(**metrics)
        )


COMMANDS = (finetune_cmd,)
