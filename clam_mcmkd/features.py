"""``clam-mcmkd extract-features``: CLAM's ``extract_features_fp.py`` with a faster data path.

Same inputs and outputs as CLAM (coords from ``<data_h5_dir>/patches/<id>.h5``, features to
``<feat_dir>/h5_files`` and ``<feat_dir>/pt_files``), same encoders and transforms, but patches
come from :mod:`clam_mcmkd.patch_loader` (tile-level JPEG decoding) and are resized and
normalised as whole batches on the device, through the one forward path
(:mod:`clam_mcmkd.encoders.forward`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .clam import formats
from .distributed import DistInfo, barrier, distributed_run, gather_objects, shard
from .encoders.forward import autocast_dtype, encode_batches
from .jobs import DONE, Outcome, run_slide_job
from .slides import count_outside, find_slide
from .utils import ClamMcmkdError, RunSummary, resolve_device, save_config

log = logging.getLogger(__name__)

CONFIG_NAME = "extract_config.json"
SUMMARY_NAME = "extract_summary.json"


@dataclass
class ExtractConfig:
    data_h5_dir: str
    data_slide_dir: str
    csv_path: str | None
    feat_dir: str
    model: str = "resnet50_trunc"
    slide_ext: str | None = None  # None: each slide's extension, found in data_slide_dir
    batch_size: int = 256
    no_auto_skip: bool = False
    target_patch_size: int = 224
    ckpt: str | None = None
    num_workers: int = 0
    device: str = "auto"
    pretrained: bool = True
    precision: str = "auto"  # auto: bf16 autocast on CUDA, float32 on CPU
    init_seed: int = 0  # weights of pretrained=False models (same in every rank/run)


# ----------------------------------------------------------------------------- one slide


def slide_path(cfg: ExtractConfig, slide_id: str) -> Path:
    return find_slide(cfg.data_slide_dir, slide_id, cfg.slide_ext)


def extract_slide(
    encoder,
    slide_file: str | Path,
    coords: formats.CoordsH5,
    *,
    batch_size: int = 256,
    num_workers: int = 0,
    device: str = "cpu",
    precision: str = "auto",
) -> np.ndarray:
    """Features (N, D) of every patch of one slide, in coords order."""
    from .patch_loader import PatchReader, iter_patch_batches

    # Open once here so a bad slide fails with its own message, not a worker's traceback.
    with PatchReader(slide_file, coords.patch_level, coords.patch_size) as reader:
        if not reader.is_fast:
            log.info("%s: read through OpenSlide (%s)", Path(slide_file).name,
                     reader.stats.fallback_reason)  # fmt: skip
        dims = reader.slide.dimensions
    outside = count_outside(coords.coords, coords.patch_size_level0, dims)
    if outside:
        log.warning("%s: %d of %d coords lie (partly) outside the slide's %dx%d level 0; "
                    "those patches are read as black", Path(slide_file).name, outside,
                    len(coords), *dims)  # fmt: skip
    cuda = str(device).startswith("cuda")
    batches = iter_patch_batches(
        slide_file,
        coords,
        batch_size,
        num_workers=num_workers,
        pin_memory=cuda,
        # CPU: resize + normalise in the reading workers; CUDA: uint8 goes to the GPU (4x less
        # to copy) and is transformed there.
        transform=None if cuda else encoder.transforms.batch,
    )
    feats = encode_batches(encoder, batches, device, precision)
    if len(feats) != len(coords):
        raise ClamMcmkdError(f"{slide_file}: {len(feats)} features for {len(coords)} coords")
    return feats


# ----------------------------------------------------------------------------- the stage


def slide_ids_for(cfg: ExtractConfig) -> list[str]:
    """Slide ids from the CSV (CLAM's), or every coords file when no CSV is given."""
    if cfg.csv_path:
        df = formats.read_dataset_csv(cfg.csv_path, require_label=False)
        return [formats.slide_id_of(s, cfg.slide_ext) for s in df["slide_id"]]
    patch_dir = Path(cfg.data_h5_dir) / "patches"
    if not patch_dir.is_dir():
        raise ClamMcmkdError(f"{patch_dir}: no coords directory (expected CLAM's patches/ folder)")
    return sorted(p.stem for p in patch_dir.glob("*.h5"))


def _check_config(cfg: ExtractConfig) -> None:
    if cfg.batch_size < 1:
        raise ClamMcmkdError(f"--batch-size must be >= 1, got {cfg.batch_size}")
    if cfg.num_workers < 0:
        raise ClamMcmkdError(f"--num-workers must be >= 0, got {cfg.num_workers}")
    if not Path(cfg.data_h5_dir).is_dir():
        raise ClamMcmkdError(f"{cfg.data_h5_dir}: --data-h5-dir does not exist")
    if not Path(cfg.data_slide_dir).is_dir():
        raise ClamMcmkdError(f"{cfg.data_slide_dir}: --data-slide-dir does not exist")
    autocast_dtype("cpu", cfg.precision)


def _extract_one(cfg, encoder, slide_id: str, device: str) -> int:
    coords = formats.read_coords_h5(formats.coords_path(cfg.data_h5_dir, slide_id))
    if len(coords) == 0:
        raise formats.ClamFormatError(coords.path, "no patches in the coords file")
    feats = extract_slide(
        encoder,
        slide_path(cfg, slide_id),
        coords,
        batch_size=cfg.batch_size,
        num_workers=cfg.num_workers,
        device=device,
        precision=cfg.precision,
    )
    attrs = {
        "model": cfg.model,
        "patch_level": coords.patch_level,
        "patch_size": coords.patch_size,
        "target_patch_size": encoder.transforms.input_size,
    }
    formats.write_features(cfg.feat_dir, slide_id, feats, coords.coords, attrs=attrs)
    return len(feats)


def _extracted_before(cfg: ExtractConfig, slide_id: str) -> bool | None:
    """True when both feature files exist (skip the slide), None when it must be extracted."""
    if cfg.no_auto_skip or not formats.features_done(cfg.feat_dir, slide_id):
        return None
    return True


def _run_summary(local: RunSummary, outcomes: list[Outcome], info: DistInfo) -> RunSummary:
    """One summary for the whole run, from every rank's outcomes (the same on every rank)."""
    done = [o for o in outcomes if o.status == DONE]
    part = (local.done, local.skipped, local.failed, sum(o.result for o in done),
            sum(o.seconds for o in done))  # fmt: skip
    summary = RunSummary(stage=local.stage, started=local.started)
    total_patches, busiest = 0, 0.0
    for done_ids, skipped, failed, n, secs in gather_objects(part, info):
        summary.done += done_ids
        summary.skipped += skipped
        summary.failed.update(failed)
        total_patches += n
        busiest = max(busiest, secs)
    summary.extra.update(
        patches=total_patches,
        patches_per_s=round(total_patches / busiest, 2) if busiest > 0 else 0.0,
    )
    return summary


def extract_features(cfg: ExtractConfig) -> RunSummary:
    """Extract features for every slide of the CSV; each rank takes its share under torchrun."""
    from .encoders import create_encoder, prepare_encoder

    _check_config(cfg)
    with distributed_run(resolve_device(cfg.device)) as (device, info):
        feat_dir = Path(cfg.feat_dir)
        slide_ids = slide_ids_for(cfg)
        encoder = create_encoder(
            cfg.model,
            pretrained=cfg.pretrained,
            ckpt=cfg.ckpt,
            target_img_size=cfg.target_patch_size,
            init_seed=cfg.init_seed,
        )
        prepare_encoder(encoder, device)
        if info.is_main:  # after the encoder: a run that cannot start leaves nothing behind
            feat_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, feat_dir / CONFIG_NAME)
        local = RunSummary(stage="extract-features")
        outcomes = run_slide_job(
            shard(slide_ids, info),
            lambda slide_id: _extract_one(cfg, encoder, slide_id, device),
            local,
            finished=lambda slide_id: _extracted_before(cfg, slide_id),
            desc=f"features[{info.rank}]" if info.enabled else "features",
        )
        summary = _run_summary(local, outcomes, info)
        summary.extra.update(
            model=cfg.model, device=device if not info.enabled else f"{device} x{info.world_size}"
        )
        barrier(info)
        if info.is_main:
            summary.write(feat_dir / SUMMARY_NAME)
        return summary
