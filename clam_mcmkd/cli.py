"""The ``clam-mcmkd`` command line: parses options and calls the stage modules.

torch, timm and tiatoolbox are imported inside the commands that need them, so ``--help``
answers at once. Every dashed option also accepts CLAM's underscore spelling
(``--data-h5-dir`` and ``--data_h5_dir``).
"""

from __future__ import annotations

import logging
import sys

import click

from . import __version__
from .utils import ClamMcmkdError


class _Group(click.Group):
    """Turns user-fixable errors into one clear line instead of a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except ClamMcmkdError as err:
            raise click.ClickException(str(err)) from err


def option(*names: str, **kwargs):
    """click.option that also accepts the underscore spelling of each ``--long-name``."""
    aliases = []
    for name in names:
        if name.startswith("--") and "-" in name[2:] and "/" not in name:
            aliases.append("--" + name[2:].replace("-", "_"))
    return click.option(*names, *aliases, **kwargs)


def _device_option():
    return option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:1 ...")


@click.group(
    cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100}
)
@click.version_option(__version__, prog_name="clam-mcmkd")
@click.option("-v", "--verbose", count=True, help="More logging (-vv for debug).")
def main(verbose: int) -> None:
    """MCM-KD fine-tuning of patch encoders for CLAM, and the CLAM pipeline around it.

    \b
    Typical run:
      clam-mcmkd tile --source SLIDES --save-dir OUT
      clam-mcmkd finetune --data-h5-dir OUT --data-slide-dir SLIDES --csv-path data.csv \\
          --teacher vit_large_patch16_224 --out mcmkd_resnet50.pt
      clam-mcmkd extract-features --data-h5-dir OUT --data-slide-dir SLIDES --csv-path data.csv \\
          --feat-dir FEATS --model mcmkd_resnet50 --ckpt mcmkd_resnet50.pt
      clam-mcmkd splits --csv-path data.csv --split-dir SPLITS --k 10
      clam-mcmkd train --data-root-dir FEATS --csv-path data.csv --split-dir SPLITS \\
          --results-dir RESULTS --exp-code mcmkd
    """
    level = logging.WARNING - 10 * verbose
    logging.basicConfig(
        level=max(level, logging.DEBUG), format="%(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("clam_mcmkd").setLevel(
        max(logging.INFO - 10 * max(verbose - 1, 0), logging.DEBUG)
    )


# ==== make-cohort, tile (issue 2) ====


@main.command("make-cohort")
@click.argument("out_dir", type=click.Path(file_okay=False))
@option("--n-slides", type=int, default=24, show_default=True, help="Number of slides.")
@option("--size", type=int, default=4096, show_default=True, help="Slide side, level-0 px.")
@option("--seed", type=int, default=0, show_default=True)
@option(
    "--positive-frac", type=float, default=0.5, show_default=True, help="Share of tumor slides."
)
@option(
    "--tumor-frac",
    type=float,
    default=0.04,
    show_default=True,
    help="Tumour area / tissue area in tumor slides.",
)
@option(
    "--tumor-contrast",
    type=float,
    default=1.0,
    show_default=True,
    help="Difficulty: 1 = distinct tumour texture, lower = closer to normal tissue (0-1).",
)
@option("--mpp", type=float, default=0.5, show_default=True, help="Microns per pixel (0.5 = 20x).")
def make_cohort_cmd(out_dir, n_slides, size, seed, positive_frac, tumor_frac, tumor_contrast, mpp):
    """Generate a seeded synthetic cohort: OUT_DIR/slides/*.tif and OUT_DIR/dataset.csv."""
    from .cohort import make_cohort

    if n_slides < 1 or size < 512:
        raise click.BadParameter("need --n-slides >= 1 and --size >= 512")
    if not 0.0 <= tumor_contrast <= 1.0:
        raise click.BadParameter("--tumor-contrast must be in [0, 1]")
    csv_path = make_cohort(
        out_dir,
        n_slides=n_slides,
        size=size,
        seed=seed,
        positive_frac=positive_frac,
        tumor_frac=tumor_frac,
        tumor_contrast=tumor_contrast,
        mpp=mpp,
    )
    click.echo(f"wrote {n_slides} slides to {csv_path.parent / 'slides'} and {csv_path}")


@main.command("tile")
@option("--source", required=True, type=click.Path(exists=True), help="Slide directory (or file).")
@option("--save-dir", required=True, type=click.Path(file_okay=False), help="Output directory.")
@option("--patch-size", type=int, default=256, show_default=True, help="Pixels at target mag.")
@option("--step-size", type=int, default=256, show_default=True, help="Grid step at target mag.")
@option("--mag", type=float, default=None, help="Target magnification [default: 20].")
@option("--mpp", type=float, default=None, help="Target microns per pixel (instead of --mag).")
@option("--min-tissue", type=float, default=0.5, show_default=True, help="Tissue fraction to keep.")
@option(
    "--mask-method",
    type=click.Choice(["otsu", "morphological"]),
    default="otsu",
    show_default=True,
    help="tiatoolbox tissue masker.",
)
@option("--slide-ext", multiple=True, help="Only these extensions (repeatable), e.g. .svs")
@option("--no-auto-skip", is_flag=True, help="Re-tile slides whose h5 exists.")
def tile_cmd(source, save_dir, patch_size, step_size, mag, mpp, min_tissue, mask_method, slide_ext,
             no_auto_skip):  # fmt: skip
    """Tissue mask + patch grid: SAVE_DIR/patches/<id>.h5 (CLAM coords), masks/, process_list.csv."""
    from .tiling import TileConfig, tile_slides

    if mag is not None and mpp is not None:
        raise click.UsageError("give --mag or --mpp, not both")
    exts = [e for item in slide_ext for e in item.split(",") if e.strip()] or None
    cfg = TileConfig(
        source=source,
        save_dir=save_dir,
        patch_size=patch_size,
        step_size=step_size,
        mag=None if mpp is not None else (mag or 20.0),
        mpp=mpp,
        min_tissue=min_tissue,
        mask_method=mask_method,
        slide_ext=exts,
        no_auto_skip=no_auto_skip,
    )
    summary = tile_slides(cfg)
    click.echo(summary.line())
    for slide_id, error in summary.failed.items():
        click.echo(f"  {slide_id}: {error}", err=True)
    if not summary.done and not summary.skipped:
        raise click.ClickException(f"no slide could be tiled; see {save_dir}/process_list.csv")


# (end make-cohort, tile (issue 2))


# ==== extract-features, list-encoders (issue 3) ====
@main.command("extract-features")
@option("--data-h5-dir", required=True, help="Directory with CLAM's patches/<slide_id>.h5.")
@option("--data-slide-dir", required=True, help="Directory with the slides.")
@option("--slide-ext", default=".svs", show_default=True, help="Slide file extension.")
@option("--csv-path", default=None, help="CSV with a slide_id column (default: every coords h5).")
@option("--feat-dir", required=True, help="Output: h5_files/ and pt_files/ go here.")
@option("--model", "--model-name", default="resnet50_trunc", show_default=True,
        help="Encoder: resnet50_trunc, mcmkd_resnet50, uni_v1, ... or any timm name.")  # fmt: skip
@option("--batch-size", default=256, show_default=True, type=int)
@option("--no-auto-skip", is_flag=True, help="Recompute slides whose features exist.")
@option("--target-patch-size", default=224, show_default=True, type=int,
        help="Encoder input size (patches are resized to it).")  # fmt: skip
@option("--ckpt", default=None, help="Encoder checkpoint (mcmkd_resnet50: else MCMKD_CKPT_PATH).")
@option("--num-workers", default=0, show_default=True, type=int, help="Patch-reading processes.")
@_device_option()
@option("--precision", default="auto", show_default=True,
        type=click.Choice(["auto", "bf16", "fp16", "fp32"]),
        help="Autocast on CUDA (auto = bf16); CPU always runs float32.")  # fmt: skip
@option("--no-pretrained", is_flag=True, help="Random (seeded) weights: builds models offline.")
def extract_features_cmd(**kw) -> None:
    """Patch features for every slide, in CLAM's h5_files/ + pt_files/ layout.

    Works under `torchrun --nproc_per_node N` (slides are shared out across ranks).
    """
    import os

    from .features import ExtractConfig, extract_features

    kw["pretrained"] = not kw.pop("no_pretrained")
    summary = extract_features(ExtractConfig(**kw))
    if int(os.environ.get("RANK", "0")) == 0:
        click.echo(summary.line())
    if summary.failed and not summary.done and not summary.skipped:
        sys.exit(1)


@main.command("list-encoders")
def list_encoders_cmd() -> None:
    """Registered encoder names (any timm model name works as well)."""
    from .encoders import list_encoders

    for name, desc in list_encoders().items():
        click.echo(f"{name:18s} {desc}")
    click.echo("<timm name>        any timm model (hf-hub:... too), pooled features; --ckpt FILE")


# (end extract-features, list-encoders (issue 3))


# ==== finetune (issue 4) ====
@main.command("finetune")
@option("--data-h5-dir", required=True, help="Directory with CLAM's patches/<slide_id>.h5.")
@option("--data-slide-dir", required=True, help="Directory with the slides.")
@option("--csv-path", required=True, help="Dataset CSV (slide_id column; labels are not used).")
@option("--slide-ext", default=".svs", show_default=True, help="Slide file extension.")
@option(
    "--teacher",
    required=True,
    help="Frozen teacher: any timm name (hf-hub:... too) or registered encoder.",
)
@option("--teacher-ckpt", default=None, help="Local weights for the teacher (state dict).")
@option(
    "--teacher-input-size", default=None, type=int, help="Teacher input size (default: its own)."
)
@option(
    "--student",
    default="resnet50_trunc",
    show_default=True,
    help="Student: resnet50_trunc or resnet18_trunc.",
)
@option(
    "--input-size",
    default=224,
    show_default=True,
    type=int,
    help="Student input size (as at extraction).",
)
@option(
    "--grid", default=4, show_default=True, type=int, help="Context window side g (g x g patches)."
)
@option(
    "--window-overlap",
    is_flag=True,
    help="Take every valid window corner (default: non-overlapping windows).",
)
@option(
    "--mask-ratio",
    default=0.5,
    show_default=True,
    type=float,
    help="Share of window positions masked.",
)
@option(
    "--mask-strategy", default="random", show_default=True, type=click.Choice(["random", "block"])
)
@option("--predictor-width", default=256, show_default=True, type=int)
@option("--predictor-depth", default=2, show_default=True, type=int)
@option("--predictor-heads", default=4, show_default=True, type=int)
@option("--loss", default="cosine", show_default=True, type=click.Choice(["cosine", "smooth_l1"]))
@option(
    "--visible-weight",
    default=0.0,
    show_default=True,
    type=float,
    help="Loss weight on visible positions.",
)
@option("--epochs", default=1, show_default=True, type=int)
@option(
    "--batch-size",
    default=32,
    show_default=True,
    type=int,
    help="Windows per optimizer step (all ranks together).",
)
@option(
    "--grad-accum", default=1, show_default=True, type=int, help="Micro-batches per optimizer step."
)
@option("--lr", default=5e-4, show_default=True, type=float, help="Predictor learning rate.")
@option(
    "--student-lr-mult", default=0.1, show_default=True, type=float, help="Student lr = lr x this."
)
@option("--weight-decay", default=0.05, show_default=True, type=float)
@option(
    "--warmup-frac",
    default=0.05,
    show_default=True,
    type=float,
    help="Share of steps of linear warm-up.",
)
@option(
    "--min-lr-ratio", default=0.01, show_default=True, type=float, help="Cosine decay floor (x lr)."
)
@option(
    "--grad-clip", default=1.0, show_default=True, type=float, help="Gradient norm clip (0: off)."
)
@option(
    "--no-freeze-bn",
    is_flag=True,
    help="Update the student's BatchNorm statistics (frozen by default).",
)
@option(
    "--teacher-cache",
    default=None,
    help="Teacher-feature cache dir (default: <out>_teacher_cache/).",
)
@option("--max-windows", default=None, type=int, help="Train on at most N windows (seeded choice).")
@option(
    "--val-frac",
    default=0.05,
    show_default=True,
    type=float,
    help="Share of slides held out for validation.",
)
@option("--max-val-windows", default=256, show_default=True, type=int)
@option("--num-workers", default=0, show_default=True, type=int, help="Window-reading processes.")
@option("--teacher-batch-size", default=64, show_default=True, type=int)
@option(
    "--save-every", default=50, show_default=True, type=int, help="Steps between resumable states."
)
@option(
    "--stop-after-steps",
    default=None,
    type=int,
    help="Stop (resumable) after N steps, e.g. to time-box a job.",
)
@option("--resume", is_flag=True, help="Continue an interrupted run from <out>.state.pt.")
@option("--no-pretrained", is_flag=True, help="Random (seeded) weights: builds models offline.")
@_device_option()
@option("--seed", default=0, show_default=True, type=int)
@option("--out", required=True, help="Output checkpoint, e.g. mcmkd_resnet50.pt.")
def finetune_cmd(**kw) -> None:
    """MCM-KD: fine-tune the patch encoder to predict a teacher's features of masked patches.

    Writes OUT (load it with `extract-features --model mcmkd_resnet50 --ckpt OUT`), plus
    OUT-stem .metrics.csv, .loss.png, .config.json, .final_metrics.json, .summary.json.
    Works under `torchrun --nproc_per_node N $(which clam-mcmkd) finetune ...`.
    """
    import json
    import os

    from .mcmkd import FinetuneConfig, finetune, output_paths

    kw["pretrained"] = not kw.pop("no_pretrained")
    kw["freeze_bn"] = not kw.pop("no_freeze_bn")
    path = finetune(FinetuneConfig(**kw))
    if int(os.environ.get("RANK", "0")) == 0:
        if path == output_paths(kw["out"])["state"]:
            click.echo(f"stopped early; state in {path} (continue with --resume)")
            return
        metrics = json.loads(output_paths(kw["out"])["final_metrics"].read_text())
        click.echo(f"wrote {path}")
        if "val_cosine_after" in metrics:
            click.echo(
                "val masked cosine to teacher: before {val_cosine_before:.4f}, after "
                "{val_cosine_after:.4f}, mean-feature baseline {val_cosine_mean_baseline:.4f}".format(
                    **metrics
                )
            )


# (end finetune (issue 4))

# ==== splits, train, eval (issue 5) ====


def _label_dict_option():
    return option(
        "--label-dict",
        default=None,
        help='Label -> class index as JSON, e.g. \'{"normal":0,"tumor":1}\'. Default: sorted labels.',
    )


@main.command("splits")
@option("--csv-path", required=True, help="Dataset CSV (case_id, slide_id, label).")
@option("--split-dir", required=True, help="Output folder for splits_<k>*.csv.")
@option("--k", default=10, show_default=True, help="Number of folds.")
@option("--val-frac", default=0.1, show_default=True, help="Validation fraction per class.")
@option("--test-frac", default=0.1, show_default=True, help="Test fraction per class.")
@option("--label-frac", default=1.0, show_default=True, help="Fraction of training labels kept.")
@option("--seed", default=1, show_default=True, help="Random seed (CLAM's default 1).")
@option("--patient-strat", is_flag=True, help="Keep all slides of a case_id in one set.")
@option("--fixed-test", default=None, help="CSV of slide ids forming a fixed test set.")
@_label_dict_option()
def splits_cmd(csv_path, split_dir, k, val_frac, test_frac, label_frac, seed, patient_strat,
               fixed_test, label_dict):  # fmt: skip
    """Draw CLAM-format k-fold splits (label-stratified, as CLAM's create_splits_seq.py)."""
    from .mil import parse_label_dict
    from .splits import SplitConfig, make_splits

    cfg = SplitConfig(
        csv_path=csv_path, split_dir=split_dir, k=k, val_frac=val_frac, test_frac=test_frac,
        label_frac=label_frac, seed=seed, patient_strat=patient_strat, fixed_test=fixed_test,
        label_dict=parse_label_dict(label_dict),
    )  # fmt: skip
    paths = make_splits(cfg)
    click.echo(f"wrote {len(paths)} fold(s) to {split_dir}")


def _embed_dim(value: str):
    if value == "auto":
        return value
    if not value.isdigit():
        raise click.BadParameter(
            f"expected an integer or 'auto', got {value!r}", param_hint="--embed-dim"
        )
    return int(value)


def _mil_common_options(func):
    for decorator in reversed(
        [
            option(
                "--data-root-dir", required=True, help="Feature dir with pt_files/ (or h5_files/)."
            ),
            option("--csv-path", required=True, help="Dataset CSV (case_id, slide_id, label)."),
            option("--k-start", default=-1, show_default=True, help="First fold (-1: 0)."),
            option("--k-end", default=-1, show_default=True, help="End fold, exclusive (-1: k)."),
            _label_dict_option(),
            option("--embed-dim", default="auto", show_default=True, help="Feature width or auto."),
            _device_option(),
        ]
    ):
        func = decorator(func)
    return func


@main.command("train")
@_mil_common_options
@option("--split-dir", required=True, help="Folder with splits_<k>.csv (ours or CLAM's).")
@option("--results-dir", default="./results", show_default=True, help="Results root.")
@option(
    "--exp-code", required=True, help="Run name: results go to <results-dir>/<exp-code>_s<seed>."
)
@option("--model-type", type=click.Choice(["abmil", "clam_sb", "clam_mb"]), default="clam_sb",
        show_default=True, help="abmil = CLAM-SB without instance clustering.")  # fmt: skip
@option("--k", default=10, show_default=True, help="Number of folds.")
@option("--max-epochs", default=200, show_default=True)
@option(
    "--early-stopping", is_flag=True, help="CLAM's early stopping (patience 20, after epoch 50)."
)
@option("--weighted-sample", is_flag=True, help="Class-balanced bag sampling.")
@option("--opt", type=click.Choice(["adam", "sgd"]), default="adam", show_default=True)
@option("--lr", default=2e-4, show_default=True, help="Learning rate (CLAM's README recipe).")
@option("--reg", default=1e-5, show_default=True, help="Weight decay.")
@option("--drop-out", default=0.25, show_default=True)
@option("--bag-loss", type=click.Choice(["ce", "svm"]), default="ce", show_default=True)
@option("--inst-loss", type=click.Choice(["svm", "ce"]), default="svm", show_default=True)
@option("--bag-weight", default=0.7, show_default=True, help="Bag loss weight (clam_*).")
@option("--B", "B", default=8, show_default=True, help="Instances per class for clustering.")
@option("--subtyping/--no-subtyping", default=None, help="Default: on for >2 classes.")
@option("--model-size", type=click.Choice(["small", "big"]), default="small", show_default=True)
@option("--seed", default=1, show_default=True)
@option("--no-cache", is_flag=True, help="Re-read feature files every epoch (low memory).")
def train_cmd(data_root_dir, csv_path, k_start, k_end, label_dict, embed_dim, device, split_dir,
              results_dir, exp_code, model_type, k, max_epochs, early_stopping, weighted_sample,
              opt, lr, reg, drop_out, bag_loss, inst_loss, bag_weight, B, subtyping, model_size,
              seed, no_cache):  # fmt: skip
    """Train ABMIL / CLAM-SB / CLAM-MB on k-fold splits (CLAM's main.py semantics)."""
    from .mil import TrainConfig, parse_label_dict, train

    cfg = TrainConfig(
        data_root_dir=data_root_dir, csv_path=csv_path, split_dir=split_dir,
        results_dir=results_dir, exp_code=exp_code, model_type=model_type, k=k, k_start=k_start,
        k_end=k_end, label_dict=parse_label_dict(label_dict), max_epochs=max_epochs,
        early_stopping=early_stopping, weighted_sample=weighted_sample, opt=opt, lr=lr, reg=reg,
        drop_out=drop_out, bag_loss=bag_loss, inst_loss=inst_loss, bag_weight=bag_weight, B=B,
        subtyping=subtyping, model_size=model_size, seed=seed,
        embed_dim=_embed_dim(embed_dim), device=device,
        cache_features=not no_cache,
    )  # fmt: skip
    summary = train(cfg)
    click.echo(f"summary: {summary}")


@main.command("eval")
@_mil_common_options
@option("--models-dir", required=True, help="A train run dir with s_<k>_checkpoint.pt.")
@option("--eval-dir", required=True, help="Output folder (summary.csv, predictions).")
@option("--split-dir", default=None, help="Splits folder; without it every CSV slide is used.")
@option("--split", type=click.Choice(["train", "val", "test", "all"]), default="test",
        show_default=True)  # fmt: skip
@option("--k", default=None, type=int, help="Number of folds (default: the run's).")
@option("--model-type", type=click.Choice(["abmil", "clam_sb", "clam_mb"]), default=None,
        help="Default: from the run's train_config.json, else clam_sb.")  # fmt: skip
@option("--drop-out", default=None, type=float)
@option("--model-size", type=click.Choice(["small", "big"]), default=None)
def eval_cmd(data_root_dir, csv_path, k_start, k_end, label_dict, embed_dim, device, models_dir,
             eval_dir, split_dir, split, k, model_type, drop_out, model_size):  # fmt: skip
    """Evaluate saved fold checkpoints on a split or on any CSV of slides."""
    from .mil import EvalConfig, evaluate, parse_label_dict

    cfg = EvalConfig(
        data_root_dir=data_root_dir, csv_path=csv_path, models_dir=models_dir, eval_dir=eval_dir,
        split_dir=split_dir, split=split, k=k, k_start=k_start, k_end=k_end,
        model_type=model_type, label_dict=parse_label_dict(label_dict), drop_out=drop_out,
        model_size=model_size, embed_dim=_embed_dim(embed_dim),
        device=device,
    )  # fmt: skip
    summary = evaluate(cfg)
    click.echo(f"summary: {summary}")


# (end splits, train, eval (issue 5))


# ==== patch-clam (issue 6) ====
@main.command("patch-clam")
@click.argument("clam_dir")
@click.option("--check", "action", flag_value="check", help="Only report each patch's state.")
@click.option("--revert", "action", flag_value="revert", help="Remove the patches.")
@option(
    "--patches-dir",
    default=None,
    help="Patch directory (default: the installed patches/, or $CLAM_MCMKD_PATCHES_DIR).",
)
def patch_clam_cmd(clam_dir: str, action: str | None, patches_dir: str | None) -> None:
    """Add MCM-KD to a CLAM checkout: the mcmkd_resnet50 encoder and the camelyon16/tcga_nsclc tasks.

    Idempotent: a second run changes nothing. Refuses a directory that is not CLAM, or a CLAM
    whose files differ where the patches go (then nothing is changed).
    """
    from .clam.patch import CONFLICT, PatchError, patch_clam

    run = patch_clam(clam_dir, action or "apply", patches_dir)
    for line in run.lines():
        click.echo(line)
    conflicts = [s for s in run.states if s.state == CONFLICT]
    if conflicts:
        raise PatchError(
            f"{len(conflicts)} of {len(run.states)} patches do not apply to {clam_dir}"
        )


# (end patch-clam (issue 6))


# ==== benchmark, demo (issue 7) ====
def _print_report(report) -> None:
    import json

    from .benchmark.report import read_report_table

    cfg = json.loads((report.parent / "benchmark_config.json").read_text())
    click.echo(read_report_table(report.parent, cfg["extraction"]["baseline"]))
    click.echo(f"\nreport: {report}")


@main.command("benchmark")
@option("--config", "config_name", required=True,
        help="camelyon16, tcga_nsclc, demo, or a FILE.yaml of the same shape.")  # fmt: skip
@option("--slides", default=None, help="Directory with the slides.")
@option("--labels", default=None,
        help="Dataset CSV: case_id, slide_id, label (camelyon16 also: split = train|test).")  # fmt: skip
@option("--out", default=None, help="Output directory; a rerun resumes from what is in it.")
@option("--teacher", default=None, help="Teacher encoder (timm name); default: the config's.")
@option("--models", default=None, help="MIL models, comma-separated: abmil,clam_sb,clam_mb.")
@option("--k", default=None, type=int, help="Number of folds; default: the config's.")
@option("--slide-ext", default=None, help="Slide extension; default: the config's, else guessed.")
@option("--clam-dir", default=None,
        help="A CLAM checkout patched by `patch-clam`: extraction and MIL training run its scripts.")  # fmt: skip
@option("--no-pretrained", is_flag=True, help="Random (seeded) weights: runs offline.")
@option("--num-workers", default=None, type=int, help="Patch-reading processes.")
@option("--device", default=None, help="auto, cpu, cuda, cuda:1 ... (default: the config's, auto).")
def benchmark_cmd(config_name, models, k, teacher, no_pretrained, **kw) -> None:
    """Baseline vs teacher vs MCM-KD fine-tuned encoder, every MIL model, the same folds.

    tile -> splits -> finetune -> extract features (3 encoders) -> train -> report.md.
    Each stage resumes from what is already in --out.
    """
    from .benchmark.config import load_config, with_overrides
    from .benchmark.run import run_benchmark

    overrides = dict(kw)
    if models:
        overrides["mil.models"] = [m.strip() for m in models.split(",") if m.strip()]
    overrides["splits.k"] = k
    overrides["finetune.teacher"] = teacher
    overrides["pretrained"] = False if no_pretrained else None
    cfg = with_overrides(load_config(config_name), **overrides)
    _print_report(run_benchmark(cfg))


@main.command("demo")
@option("--out", default="clam_mcmkd_demo", show_default=True, help="Output directory.")
@option("--n-slides", default=24, show_default=True, type=int, help="Synthetic slides.")
@option("--size", default=4096, show_default=True, type=int, help="Slide side, level-0 pixels.")
@option("--smallest", is_flag=True, help="The smallest meaningful run (what CI runs).")
@option("--k", default=None, type=int, help="Folds (default: the demo config's).")
@option("--max-epochs", default=None, type=int, help="MIL epochs (default: the demo config's).")
@option("--seed", default=0, show_default=True, type=int, help="Cohort seed.")
@option("--device", default="cpu", show_default=True, help="cpu, cuda, auto ...")
def demo_cmd(**kw) -> None:
    """The benchmark on a synthetic cohort with small untrained models: offline, CPU, minutes."""
    from .benchmark.demo import DemoConfig, run_demo

    _print_report(run_demo(DemoConfig(**kw)))


# (end benchmark, demo (issue 7))


def run() -> None:  # pragma: no cover - console entry alias
    main(prog_name="clam-mcmkd")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
