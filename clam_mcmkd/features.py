"""``clam-mcmkd extract-features``: CLAM's ``extract_features_fp.py`` with a faster data path.

Same inputs and outputs as CLAM (coords from ``<data_h5_dir>/patches/<id>.h5``, features to
``<feat_dir>/h5_files`` and ``<feat_dir>/pt_files``), same encoders and transforms. The data
path is :func:`clam_mcmkd.patch_pipeline.encode_cohort`: one pool of reading workers for the
whole cohort (tile-level JPEG decoding, the next slide read while one drains), resize and
normalise on the device through the one forward path, features kept on the device until a
slide is done; a writer thread writes each slide's h5 + pt while the next one is encoded.

Slides are shared out by patch count: across torchrun ranks, and across HPC array jobs with
``--shard I/N`` (each job its own slides and its own run files, resume-safe).
"""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass
from pathlib import Path

from .clam import formats
from .distributed import (
    DistInfo,
    barrier,
    coords_patch_counts,
    distributed_run,
    from_main,
    gather_objects,
    parse_shard,
    parse_timeout,
    shard,
    shard_file_name,
    shard_of,
)
from .encoders.forward import autocast_dtype
from .jobs import DONE, FAILED, Outcome, SlideFailed, run_slide_job
from .patch_pipeline import SlideJob, default_num_workers, encode_cohort
from .slides import count_outside, find_slide
from .utils import ClamMcmkdError, RunSummary, check_output_path, resolve_device, save_config

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
    num_workers: int | None = None  # None: the cores this process may use, less one
    device: str = "auto"
    pretrained: bool = True
    precision: str = "auto"  # auto: bf16 on GPUs that have it, else fp16; CPU float32
    init_seed: int = 0  # weights of pretrained=False models (same in every rank/run)
    shard: str | None = None  # "I/N": this array job's part of the cohort (by patch count)
    dist_timeout: str = "2h"  # torchrun: how long a rank waits for the others


def slide_path(cfg: ExtractConfig, slide_id: str) -> Path:
    return find_slide(cfg.data_slide_dir, slide_id, cfg.slide_ext)


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
    check_output_path(cfg.feat_dir)
    if cfg.batch_size < 1:
        raise ClamMcmkdError(f"--batch-size must be >= 1, got {cfg.batch_size}")
    if cfg.num_workers is not None and cfg.num_workers < 0:
        raise ClamMcmkdError(f"--num-workers must be >= 0, got {cfg.num_workers}")
    if not Path(cfg.data_h5_dir).is_dir():
        raise ClamMcmkdError(f"{cfg.data_h5_dir}: --data-h5-dir does not exist")
    if not Path(cfg.data_slide_dir).is_dir():
        raise ClamMcmkdError(f"{cfg.data_slide_dir}: --data-slide-dir does not exist")
    autocast_dtype("cpu", cfg.precision)
    parse_timeout(cfg.dist_timeout)
    if cfg.shard:
        parse_shard(cfg.shard)


def my_slides(cfg: ExtractConfig, slide_ids: list[str], info: DistInfo) -> list[str]:
    """This job's (``--shard``) and this rank's part of the cohort, balanced by patch count.

    Array jobs split by every slide's patches (jobs start at different moments and could not
    agree on what is left: a slide could fall between two views); the ranks of a job split by
    the patches still to extract, as rank 0 sees them (a resumed run stays balanced)."""
    sizes = coords_patch_counts([formats.coords_path(cfg.data_h5_dir, s) for s in slide_ids])
    if cfg.shard:
        index, count = parse_shard(cfg.shard)
        size_of = dict(zip(slide_ids, sizes))
        slide_ids = shard_of(slide_ids, index, count, sizes)
        sizes = [size_of[s] for s in slide_ids]
    if info.enabled:
        sizes = from_main(
            lambda: [0 if _extracted_before(cfg, s) else n for s, n in zip(slide_ids, sizes)],
            info,
        )
    return shard(slide_ids, info, sizes)


class FeatureWriter:
    """Writes each slide's h5 + pt (atomically) on a background thread, so the model never
    waits for the disk; a slide whose write fails is kept in :attr:`failed`."""

    def __init__(self, feat_dir: str | Path, depth: int = 2):
        self.feat_dir = feat_dir
        self.failed: dict[str, str] = {}
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._thread = threading.Thread(target=self._run, name="feature-writer", daemon=True)
        self._thread.start()

    def put(self, slide_id: str, features, coords, attrs: dict) -> None:
        self._queue.put((slide_id, features, coords, attrs))

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            slide_id, features, coords, attrs = item
            try:
                formats.write_features(self.feat_dir, slide_id, features, coords, attrs=attrs)
            except Exception as err:  # noqa: BLE001 - recorded as the slide's failure
                self.failed[slide_id] = f"{type(err).__name__}: {err}"
                log.error("extract-features: %s not written: %s", slide_id, err)

    def close(self) -> dict[str, str]:
        """Write what is queued, stop; the failed slides."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        return self.failed

    def __enter__(self) -> FeatureWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _SlideStream:
    """Hands each slide's :class:`SlideFeatures` to its job-loop task, in order."""

    def __init__(self, results):
        self.results = results
        self.stopped: str | None = None

    def take(self, slide_id: str):
        if self.stopped:
            raise SlideFailed(f"not read: patch reading stopped earlier ({self.stopped})")
        try:
            res = next(self.results)
        except Exception as err:  # a reading worker died: every later slide fails with this
            self.stopped = f"{type(err).__name__}: {err}"
            raise SlideFailed(self.stopped) from err
        if res.slide_id != slide_id:  # pragma: no cover - the stream follows the job order
            raise RuntimeError(f"features of {res.slide_id} arrived for {slide_id}")
        if res.error:
            raise SlideFailed(res.error)
        return res


def _extract_one(cfg, encoder, stream: _SlideStream, writer: FeatureWriter, where: dict,
                 slide_id: str) -> int:  # fmt: skip
    if isinstance(where[slide_id], Exception):  # no slide file: fails here, as it always did
        raise where[slide_id]
    res = stream.take(slide_id)
    coords = formats.read_coords_h5(formats.coords_path(cfg.data_h5_dir, slide_id))
    outside = count_outside(coords.coords, coords.patch_size_level0, res.dimensions)
    if outside:
        log.warning("%s: %d of %d coords lie (partly) outside the slide's %dx%d level 0; "
                    "those patches are read as black", where[slide_id].name, outside,
                    len(coords), *res.dimensions)  # fmt: skip
    attrs = {
        "model": cfg.model,
        "patch_level": coords.patch_level,
        "patch_size": coords.patch_size,
        "target_patch_size": encoder.transforms.input_size,
    }
    writer.put(slide_id, res.features, res.coords, attrs)
    return len(res.features)


def _locate(cfg: ExtractConfig, slide_ids: list[str]) -> dict[str, Path | Exception]:
    """Each slide's file, or why it cannot be found (that slide fails, the others go on)."""
    where: dict[str, Path | Exception] = {}
    for slide_id in slide_ids:
        try:
            where[slide_id] = slide_path(cfg, slide_id)
        except ClamMcmkdError as err:
            where[slide_id] = err
    return where


def _extracted_before(cfg: ExtractConfig, slide_id: str) -> bool | None:
    """True when both feature files exist (skip the slide), None when it must be extracted."""
    if cfg.no_auto_skip or not formats.features_done(cfg.feat_dir, slide_id):
        return None
    return True


def _unwritten(local: RunSummary, outcomes: list[Outcome], failed: dict[str, str]) -> None:
    """Slides encoded but not written (the writer's failures) become failures."""
    for outcome in outcomes:
        if outcome.slide_id in failed and outcome.status == DONE:
            outcome.status, outcome.message = FAILED, failed[outcome.slide_id]
            local.done.remove(outcome.slide_id)
            local.fail(outcome.slide_id, outcome.message)


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
    """Extract features for every slide of the CSV; each rank (and each ``--shard``) takes its
    share, by patch count."""
    from .encoders import create_encoder, prepare_encoder

    _check_config(cfg)
    timeout_s = parse_timeout(cfg.dist_timeout)
    with distributed_run(resolve_device(cfg.device), timeout_s=timeout_s) as (device, info):
        feat_dir = Path(cfg.feat_dir)
        mine = my_slides(cfg, slide_ids_for(cfg), info)
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
            save_config(cfg, feat_dir / shard_file_name(CONFIG_NAME, cfg.shard))
        done_before = {s: _extracted_before(cfg, s) for s in mine}
        where = _locate(cfg, [s for s in mine if done_before[s] is None])
        jobs = [SlideJob(s, str(path), str(formats.coords_path(cfg.data_h5_dir, s)))
                for s, path in where.items() if isinstance(path, Path)]  # fmt: skip
        workers = cfg.num_workers
        if workers is None:
            workers = default_num_workers(info.local_world_size)
        local = RunSummary(stage="extract-features")
        with FeatureWriter(feat_dir) as writer:
            results = encode_cohort(encoder, jobs, batch_size=cfg.batch_size, num_workers=workers,
                                    device=device, precision=cfg.precision)  # fmt: skip
            stream = _SlideStream(results)
            outcomes = run_slide_job(
                mine,
                lambda slide_id: _extract_one(cfg, encoder, stream, writer, where, slide_id),
                local,
                finished=done_before.get,
                desc=f"features[{info.rank}]" if info.enabled else "features",
            )
            results.close()  # stops the reading workers
        _unwritten(local, outcomes, writer.failed)
        summary = _run_summary(local, outcomes, info)
        summary.extra.update(
            model=cfg.model, device=device if not info.enabled else f"{device} x{info.world_size}"
        )
        if cfg.shard:
            summary.extra["shard"] = cfg.shard
        barrier(info)
        if info.is_main:
            summary.write(feat_dir / shard_file_name(SUMMARY_NAME, cfg.shard))
        return summary
