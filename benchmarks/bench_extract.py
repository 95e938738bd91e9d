"""Patches/s of CLAM's extraction data path vs ours, on the same slide and coords (issue 3).

    python benchmarks/bench_extract.py SLIDE COORDS_H5 [--workers N] [--batch-size B]
    python benchmarks/bench_extract.py --make-slide DIR [--size 16384]   # generate, then measure
    python benchmarks/bench_extract.py --cohort SLIDES_DIR COORDS_DIR --workers W   # a cohort

Measured, in this order, over the same patches:
  decode  bare OpenSlide: ``read_region`` of every patch, nothing else (one process)
  tiles   bare JPEG tile decoding: every TIFF tile the patches touch, decoded once (one process)
  clam    CLAM's Whole_Slide_Bag_FP reproduced: coords h5 reopened per item, ``read_region``
          + ``convert('RGB')``, torchvision Resize/ToTensor/Normalize per PIL image, collated by
          a DataLoader with --workers workers
  ours    clam_mcmkd.patch_loader batches (tile decoding, LRU tile cache, --workers workers)
          + PatchTransforms.batch on whole batches (and once more without the transforms)
  --model NAME adds end-to-end rates (model forward included) for clam and ours.

Last line: ``loader_rate=<ours> clam_rate=<clam> decode_rate=<decode> ratio=<ours/clam>``.

--cohort: every slide of COORDS_DIR/patches/*.h5 (its image found in SLIDES_DIR), loader only,
each path timed over the whole cohort with slide opening and worker start-up included:
  clam     CLAM's extract_features_fp.py loop: per slide open_slide, Whole_Slide_Bag_FP, a new
           DataLoader(batch_size, num_workers=W) (workers forked per slide), iterate
  ours     clam_mcmkd.patch_pipeline.iter_cohort_batches: one pool of W workers for the whole
           cohort, uint8 batches (what extract-features hands a GPU: resize + normalise there)
  ours+tf  patch_pipeline.extraction_batches(device="cpu"): extract-features' own data path on
           a CPU (resize + normalise in the workers)
Last line: ``loader_rate=<ours> clam_rate=<clam> ratio=<ours/clam>``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import h5py
import torch

from clam_mcmkd.clam import formats
from clam_mcmkd.encoders import PatchTransforms, create_encoder
from clam_mcmkd.encoders.forward import encode_batch, prepare_encoder
from clam_mcmkd.patch_loader import PatchReader, _tiff_pages
from clam_mcmkd.patch_pipeline import (
    SlideJob,
    extraction_batches,
    iter_cohort_batches,
    iter_patch_batches,
)

# ----------------------------------------------------------------------------- CLAM's data path


class ClamWholeSlideBagFP(torch.utils.data.Dataset):
    """CLAM's ``dataset_modules/dataset_h5.py:Whole_Slide_Bag_FP``, behaviour for behaviour."""

    def __init__(self, file_path, wsi, img_transforms):
        self.wsi = wsi
        self.roi_transforms = img_transforms
        self.file_path = file_path
        with h5py.File(self.file_path, "r") as f:
            dset = f["coords"]
            self.patch_level = f["coords"].attrs["patch_level"]
            self.patch_size = f["coords"].attrs["patch_size"]
            self.length = len(dset)

    def __len__(self):
        return self.length

    def __getitem__(self, idx):
        with h5py.File(self.file_path, "r") as hdf5_file:
            coord = hdf5_file["coords"][idx]
        img = self.wsi.read_region(
            coord, self.patch_level, (self.patch_size, self.patch_size)
        ).convert("RGB")
        img = self.roi_transforms(img)
        return {"img": img, "coord": coord}


def clam_loader(slide, coords_h5, batch_size, workers, input_size):
    import openslide

    wsi = openslide.OpenSlide(str(slide))  # CLAM opens it in the main process
    dataset = ClamWholeSlideBagFP(str(coords_h5), wsi, PatchTransforms(input_size).to_torchvision())
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers)


# ----------------------------------------------------------------------------- measurements


def rate(n: int, seconds: float) -> float:
    return n / seconds if seconds > 0 else float("nan")


def bench_decode(slide, coords: formats.CoordsH5) -> float:
    import openslide

    wsi = openslide.OpenSlide(str(slide))
    size = (coords.patch_size, coords.patch_size)
    t0 = time.perf_counter()
    for x, y in coords.coords:
        wsi.read_region((int(x), int(y)), coords.patch_level, size)
    return rate(len(coords), time.perf_counter() - t0)


def bench_tiles(slide, coords: formats.CoordsH5) -> tuple[float, int]:
    """Raw JPEG decode of the distinct tiles the patches cover: tiles/s and patches/s."""
    reader = PatchReader(slide, coords.patch_level, coords.patch_size)
    if not reader.is_fast:
        return float("nan"), 0
    level = reader.level
    tw, th, ds = level.tile_width, level.tile_height, reader.downsample
    tiles = set()
    for x, y in coords.coords:
        lx, ly = int(x / ds), int(y / ds)
        for ty in range(
            ly // th, min((ly + coords.patch_size - 1) // th, level.tiles_down - 1) + 1
        ):
            for tx in range(
                lx // tw, min((lx + coords.patch_size - 1) // tw, level.tiles_across - 1) + 1
            ):
                tiles.add(ty * level.tiles_across + tx)
    page = next(p for p in _tiff_pages(reader._tif) if p.imagewidth == level.width)
    with open(slide, "rb") as fh:
        blobs = []
        for i in sorted(tiles):
            fh.seek(int(level.offsets[i]))
            blobs.append((i, fh.read(int(level.bytecounts[i]))))
    t0 = time.perf_counter()
    for i, data in blobs:
        page.decode(data, i, jpegtables=page.jpegtables)
    seconds = time.perf_counter() - t0
    reader.close()
    return rate(len(blobs), seconds), len(blobs)


def bench_clam(slide, coords_h5, n, batch_size, workers, input_size, encoder=None) -> float:
    loader = clam_loader(slide, coords_h5, batch_size, workers, input_size)
    seen = 0
    t0 = time.perf_counter()
    with torch.inference_mode():
        for batch in loader:
            seen += len(batch["img"])
            if encoder is not None:
                encoder.model(batch["img"])
    assert seen == n
    return rate(n, time.perf_counter() - t0)


def bench_ours(
    slide, coords, batch_size, workers, input_size, encoder=None, transforms=True
) -> float:
    tf = PatchTransforms(input_size)
    seen = 0
    t0 = time.perf_counter()
    batches = iter_patch_batches(
        slide, coords, batch_size, num_workers=workers, transform=tf.batch if transforms else None
    )  # as extract-features runs it on CPU: transforms in the reading processes
    for batch in batches:
        seen += len(batch)
        if encoder is not None:
            encode_batch(encoder, batch, "cpu")
    assert seen == len(coords)
    return rate(len(coords), time.perf_counter() - t0)


# ----------------------------------------------------------------------------- test slide


def make_slide_and_coords(out_dir: Path, size: int) -> tuple[Path, Path]:
    """A generated size x size JPEG-tiled pyramidal TIFF and its tissue coords (CLAM h5)."""
    from clam_mcmkd.cohort import make_slide
    from clam_mcmkd.tiling import TileConfig, tile_slides

    slide = out_dir / "slides" / f"bench_{size}.tif"
    coords = out_dir / "coords" / "patches" / f"bench_{size}.h5"
    if not slide.is_file():
        slide.parent.mkdir(parents=True, exist_ok=True)
        make_slide(slide, size=size, seed=0, positive=True)
    if not coords.is_file():
        tile_slides(TileConfig(source=str(slide.parent), save_dir=str(out_dir / "coords")))
    return slide, coords


# ----------------------------------------------------------------------------- a whole cohort


def cohort_jobs(slides_dir: Path, coords_dir: Path) -> list[SlideJob]:
    """Every coords h5 with its slide (any extension) beside it in `slides_dir`."""
    patch_dir = coords_dir / "patches" if (coords_dir / "patches").is_dir() else coords_dir
    jobs = []
    for h5 in sorted(patch_dir.glob("*.h5")):
        images = sorted(p for p in slides_dir.glob(h5.stem + ".*") if p.suffix != ".h5")
        if not images:
            raise SystemExit(f"{slides_dir}: no slide for {h5.name}")
        jobs.append(SlideJob(h5.stem, str(images[0]), str(h5)))
    if not jobs:
        raise SystemExit(f"{patch_dir}: no coords h5 files")
    return jobs


def bench_clam_cohort(jobs, batch_size, workers, input_size) -> tuple[float, int]:
    """CLAM's per-slide loop, loader only: (patches/s, patches)."""
    n = 0
    t0 = time.perf_counter()
    for job in jobs:
        for batch in clam_loader(job.slide_path, job.coords_path, batch_size, workers, input_size):
            n += len(batch["img"])
    return rate(n, time.perf_counter() - t0), n


def bench_ours_cohort(jobs, batch_size, workers, input_size=0) -> tuple[float, int]:
    """One pool for the cohort. input_size > 0: extract-features' own CPU data path
    (``extraction_batches`` on "cpu": resize + normalise in the workers); else the uint8 batches
    a GPU run hands over (the same stream without the transforms; pinning needs CUDA)."""
    n = 0
    t0 = time.perf_counter()
    if input_size:
        batches = extraction_batches(jobs, PatchTransforms(input_size), batch_size=batch_size,
                                     num_workers=workers, device="cpu")  # fmt: skip
    else:
        batches = iter_cohort_batches(jobs, batch_size, num_workers=workers)
    for rec in batches:
        if rec.error:
            raise SystemExit(f"{rec.slide_id}: {rec.error}")
        n += len(rec.patches)
    return rate(n, time.perf_counter() - t0), n


def run_cohort(args) -> int:
    slides_dir, coords_dir = (Path(p) for p in args.cohort)
    jobs = cohort_jobs(slides_dir, coords_dir)
    for job in jobs:  # page cache warm for every path alike
        with open(job.slide_path, "rb") as fh:
            while fh.read(1 << 24):
                pass
    print(
        f"cohort={coords_dir} slides={len(jobs)} workers={args.workers} batch={args.batch_size} "
        f"input={args.input_size} repeats={args.repeats} cpus={len(os.sched_getaffinity(0))}",
        flush=True,
    )
    best = {"clam": 0.0, "ours": 0.0, "ours+tf": 0.0}
    for r in range(args.repeats):  # alternate, so load changes hit every path alike
        clam, n = bench_clam_cohort(jobs, args.batch_size, args.workers, args.input_size)
        ours, n2 = bench_ours_cohort(jobs, args.batch_size, args.workers)
        tf, n3 = bench_ours_cohort(jobs, args.batch_size, args.workers, args.input_size)
        assert n == n2 == n3, (n, n2, n3)
        print(
            f"run {r + 1}: {n} patches  clam {clam:.1f}  ours {ours:.1f}  ours+tf {tf:.1f} "
            f"patches/s  (x{ours / clam:.2f}, with transforms x{tf / clam:.2f})",
            flush=True,
        )
        for key, value in (("clam", clam), ("ours", ours), ("ours+tf", tf)):
            best[key] = max(best[key], value)
    print(
        f"best of {args.repeats}: ours+tf={best['ours+tf']:.1f} "
        f"ratio_with_transforms={best['ours+tf'] / best['clam']:.2f}"
    )
    print(
        f"loader_rate={best['ours']:.1f} clam_rate={best['clam']:.1f} "
        f"ratio={best['ours'] / best['clam']:.2f}"
    )
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("slide", nargs="?")
    parser.add_argument("coords_h5", nargs="?")
    parser.add_argument("--make-slide", metavar="DIR", help="generate a slide + coords in DIR")
    parser.add_argument(
        "--cohort", nargs=2, metavar=("SLIDES_DIR", "COORDS_DIR"), help="measure a whole cohort"
    )
    parser.add_argument("--repeats", type=int, default=1, help="cohort: runs (best kept)")
    parser.add_argument("--size", type=int, default=16384, help="side of the generated slide")
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--max-patches", type=int, default=0, help="first N coords (0: all)")
    parser.add_argument("--model", default=None, help="also measure end to end with this model")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (main process)")
    parser.add_argument(
        "--shift", type=int, default=0, help="move every coord by (+S, +S): a grid off the tiles"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.cohort:
        return run_cohort(args)

    if args.make_slide:
        slide, coords_h5 = make_slide_and_coords(Path(args.make_slide), args.size)
    elif args.slide and args.coords_h5:
        slide, coords_h5 = Path(args.slide), Path(args.coords_h5)
    else:
        parser.error("give SLIDE COORDS_H5, or --make-slide DIR")
    coords = formats.read_coords_h5(coords_h5)
    rewrite = bool(args.max_patches or args.shift)
    if rewrite:
        coords.coords = coords.coords[: args.max_patches or None] + args.shift
        coords_h5 = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench_coords_{os.getpid()}.h5"
        formats.write_coords_h5(
            coords_h5,
            coords.coords,
            patch_size=coords.patch_size,
            patch_level=coords.patch_level,
            downsample=coords.downsample,
            downsampled_level_dim=coords.attrs.get("downsampled_level_dim", (0, 0)),
            level_dim=coords.attrs.get("level_dim", (0, 0)),
            name=coords.name,
        )
    n = len(coords)
    with open(slide, "rb") as fh:  # page cache warm for every path alike
        while fh.read(1 << 24):
            pass
    with PatchReader(slide, coords.patch_level, coords.patch_size) as reader:
        path = "tiles" if reader.is_fast else f"OpenSlide ({reader.stats.fallback_reason})"
    print(
        f"slide={slide.name} patches={n} patch_size={coords.patch_size} "
        f"level={coords.patch_level} shift={args.shift} workers={args.workers} batch={args.batch_size} "
        f"our_path={path} cpus={os.cpu_count()}",
        flush=True,
    )

    decode = bench_decode(slide, coords)
    print(f"decode (OpenSlide read_region only, 1 process): {decode:.1f} patches/s", flush=True)
    tiles_rate, n_tiles = bench_tiles(slide, coords)
    print(
        f"tiles  (raw JPEG tile decode, 1 process): {tiles_rate:.1f} tiles/s "
        f"({n_tiles} distinct tiles for {n} patches = {rate(n, n_tiles / tiles_rate):.1f} "
        "patches/s)",
        flush=True,
    )
    clam = bench_clam(slide, coords_h5, n, args.batch_size, args.workers, args.input_size)
    print(f"clam   (Whole_Slide_Bag_FP + PIL transforms): {clam:.1f} patches/s", flush=True)
    ours = bench_ours(slide, coords, args.batch_size, args.workers, args.input_size)
    print(f"ours   (patch_loader + batched transforms): {ours:.1f} patches/s", flush=True)
    raw = bench_ours(slide, coords, args.batch_size, args.workers, 0, transforms=False)
    print(f"ours   (patch_loader alone, uint8 patches): {raw:.1f} patches/s", flush=True)

    if args.model:
        encoder = create_encoder(args.model, pretrained=False, target_img_size=args.input_size)
        prepare_encoder(encoder, "cpu")
        e2e_clam = bench_clam(
            slide, coords_h5, n, args.batch_size, args.workers, args.input_size, encoder
        )
        e2e_ours = bench_ours(
            slide, coords, args.batch_size, args.workers, args.input_size, encoder
        )
        print(
            f"end-to-end {args.model}: clam={e2e_clam:.1f} ours={e2e_ours:.1f} patches/s "
            f"(x{e2e_ours / e2e_clam:.2f})",
            flush=True,
        )
    if rewrite:
        coords_h5.unlink(missing_ok=True)
    print(
        f"loader_rate={ours:.1f} clam_rate={clam:.1f} decode_rate={decode:.1f} "
        f"ratio={ours / clam:.2f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
