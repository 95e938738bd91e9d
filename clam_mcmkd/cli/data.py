"""Data commands: ``make-cohort``, ``tile``, ``splits``."""

from __future__ import annotations

import click

from ..cohort import KINDS, CohortConfig
from ..splits import SplitConfig
from ..tiling import TileConfig
from ..tissue import MASK_METHODS
from ..utils import field_default
from .options import OUTPUT_FOLDER, config_option, label_dict_option, option


@click.command("make-cohort")
@click.argument("out_dir", type=OUTPUT_FOLDER)
@config_option(CohortConfig, "n_slides", help="Number of slides.")
@config_option(CohortConfig, "size", help="Slide side, level-0 px.")
@config_option(CohortConfig, "seed")
@config_option(CohortConfig, "positive_frac", help="Share of tumor slides.")
@config_option(CohortConfig, "tumor_frac", help="Tumour area / tissue area in tumor slides.")
@config_option(CohortConfig, "tumor_contrast",
               help="Difficulty: 1 = distinct tumour texture, lower = closer to normal tissue (0-1).")  # fmt: skip
@config_option(CohortConfig, "mpp", help="Microns per pixel (0.5 = 20x).")
@config_option(CohortConfig, "kind", type=click.Choice(KINDS),
               help="blobs: a tumour blob of distinct texture; fields: tissue classes as smooth "
               "random fields and a regional label, where context can matter.")  # fmt: skip
@option("--texture-source", type=click.Path(exists=True, dir_okay=False),
        help="fields: a slide to take real texture from (e.g. an H&E svs).")  # fmt: skip
def make_cohort_cmd(out_dir, n_slides, size, seed, positive_frac, tumor_frac, tumor_contrast, mpp,
                    kind, texture_source):  # fmt: skip
    """Generate a seeded synthetic cohort: OUT_DIR/slides/*.tif and OUT_DIR/dataset.csv."""
    from ..cohort import make_cohort

    csv_path = make_cohort(
        out_dir, n_slides=n_slides, size=size, seed=seed, positive_frac=positive_frac,
        tumor_frac=tumor_frac, tumor_contrast=tumor_contrast, mpp=mpp, kind=kind,
        texture_source=texture_source,
    )  # fmt: skip
    click.echo(f"wrote {n_slides} slides to {csv_path.parent / 'slides'} and {csv_path}")


DEFAULT_MAG = field_default(TileConfig, "mag")


@click.command("tile")
@option("--source", required=True, type=click.Path(exists=True), help="Slide directory (or file).")
@option("--save-dir", required=True, type=OUTPUT_FOLDER, help="Output directory.")
@config_option(TileConfig, "patch_size", help="Pixels at target mag.")
@config_option(TileConfig, "step_size", help="Grid step at target mag.")
@option("--mag", type=float, default=None, help=f"Target magnification [default: {DEFAULT_MAG:g}].")
@option("--mpp", type=float, default=None, help="Target microns per pixel (instead of --mag).")
@config_option(TileConfig, "min_tissue", help="Tissue fraction to keep.")
@config_option(TileConfig, "mask_method", type=click.Choice(MASK_METHODS),
               help="tiatoolbox tissue masker.")  # fmt: skip
@option("--slide-ext", multiple=True, help="Only these extensions (repeatable), e.g. .svs")
@option("--no-auto-skip", is_flag=True, help="Re-tile slides whose h5 exists.")
def tile_cmd(source, save_dir, patch_size, step_size, mag, mpp, min_tissue, mask_method, slide_ext,
             no_auto_skip):  # fmt: skip
    """Tissue mask + patch grid: SAVE_DIR/patches/<id>.h5 (CLAM coords), masks/, process_list.csv."""
    from ..tiling import tile_slides

    if mag is not None and mpp is not None:
        raise click.UsageError("give --mag or --mpp, not both")
    exts = [e for item in slide_ext for e in item.split(",") if e.strip()] or None
    cfg = TileConfig(
        source=source, save_dir=save_dir, patch_size=patch_size, step_size=step_size,
        mag=None if mpp is not None else (mag or DEFAULT_MAG), mpp=mpp, min_tissue=min_tissue,
        mask_method=mask_method, slide_ext=exts, no_auto_skip=no_auto_skip,
    )  # fmt: skip
    summary = tile_slides(cfg)
    click.echo(summary.line())
    for slide_id, error in summary.failed.items():
        click.echo(f"  {slide_id}: {error}", err=True)
    if not summary.done and not summary.skipped:
        raise click.ClickException(f"no slide could be tiled; see {save_dir}/process_list.csv")


@click.command("splits")
@option("--csv-path", required=True, help="Dataset CSV (case_id, slide_id, label).")
@option("--split-dir", required=True, type=OUTPUT_FOLDER, help="Output folder for splits_<k>*.csv.")
@config_option(SplitConfig, "k", "--k", help="Number of folds.")
@config_option(SplitConfig, "val_frac", help="Validation fraction per class.")
@config_option(SplitConfig, "test_frac", help="Test fraction per class.")
@config_option(SplitConfig, "label_frac", help="Fraction of training labels kept.")
@config_option(SplitConfig, "seed", help="Random seed (CLAM's default 1).")
@option("--patient-strat", is_flag=True, help="Keep all slides of a case_id in one set.")
@option("--fixed-test", default=None, help="CSV of slide ids forming a fixed test set.")
@label_dict_option()
def splits_cmd(**kw):
    """Draw CLAM-format k-fold splits (label-stratified, as CLAM's create_splits_seq.py)."""
    from ..mil.config import parse_label_dict
    from ..splits import make_splits

    kw["label_dict"] = parse_label_dict(kw["label_dict"])
    paths = make_splits(SplitConfig(**kw))
    click.echo(f"wrote {len(paths)} fold(s) to {kw['split_dir']}")


COMMANDS = (make_cohort_cmd, tile_cmd, splits_cmd)
