"""Fine-tuning at cohort scale without a GPU: step planning and window reading.

Two things that only show on a real cohort (issue 19):

- planning: the step plan of one epoch of >= 1,000,000 windows (refs are synthetic: planning
  needs their number only), walked as the trainer walks it (the training loop, the micro-batch
  stream and the loader's batch sampler), in ms per optimizer step; against it, in the same run,
  the old way (one epoch shuffle per step) timed on a few steps;
- reading: windows spread over >= 200 small JPEG-tiled slides (2 per slide, shuffled), read with
  their teacher features through ONE DataLoader worker, which reports its own open readers, open
  files and RSS as it goes.

    python benchmarks/bench_scale.py                     # 1,000,000 windows, 200 slides
    python benchmarks/bench_scale.py --windows 2000000 --slides 400

The last line is ``scale: slides=N windows=M readers_max=R open_files_growth=F rss_growth_mb=G
plan_ms_per_step=P``; the goals: R <= 32, F <= 64, G <= 1024, P <= 2.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from clam_mcmkd.distributed import DistInfo
from clam_mcmkd.mcmkd import FinetuneConfig
from clam_mcmkd.mcmkd.steps import Batches, StepRange
from clam_mcmkd.mcmkd.teacher_cache import CacheReader, TeacherCache, TeacherSpec
from clam_mcmkd.mcmkd.windows import (
    SlideWindows,
    WindowDataset,
    WindowRef,
    epoch_order,
    find_window_origins,
)
from clam_mcmkd.synthetic_tiff import halve, write_pyramid

GOALS = {"readers_max": 32, "open_files_growth": 64, "rss_growth_mb": 1024, "plan_ms_per_step": 2}


def plan_epoch(n_windows: int, batch_size: int, grad_accum: int, world_size: int) -> dict:
    """ms per step of planning one epoch as the trainer does (rank 0 of `world_size`)."""
    cfg = FinetuneConfig("", "", "", "t", batch_size=batch_size, grad_accum=grad_accum)
    batches = Batches(n_windows, cfg, DistInfo(0, world_size, 0, world_size))
    steps = StepRange(batches, 0, batches.steps_per_epoch)
    t0 = time.perf_counter()
    sampler = iter(steps)  # the loader's batch sampler, the micro-batch stream, the loop
    stream = (m for *_, micro in steps.steps() for m in micro)
    n_windows_seen = 0
    for _step, _epoch, n_step, micro in steps.steps():
        for ix in micro:
            if len(ix):
                next(sampler)
            next(stream)
        n_windows_seen += n_step
    planned = (time.perf_counter() - t0) * 1e3 / batches.steps_per_epoch
    assert n_windows_seen == n_windows, (n_windows_seen, n_windows)
    t0 = time.perf_counter()
    old_steps = 5
    for _ in range(old_steps):  # what every step cost before: the epoch's shuffle again
        epoch_order(n_windows, cfg.seed, 0)[:batch_size]
    old = (time.perf_counter() - t0) * 1e3 / old_steps
    return {"steps": batches.steps_per_epoch, "plan_ms_per_step": planned,
            "reshuffle_ms_per_step": old}  # fmt: skip


def write_slides(root: Path, n: int, side: int, tile: int) -> list[Path]:
    """`n` copies of one seeded JPEG-tiled Aperio-layout slide (each its own file)."""
    rng = np.random.default_rng(0)
    coarse = rng.integers(0, 255, size=(side // 16, side // 16, 3), dtype=np.uint8)
    img = np.repeat(np.repeat(coarse, 16, axis=0), 16, axis=1)  # blocky: small files
    cfg = SimpleNamespace(tile_size=tile, jpeg_quality=80, mpp=0.5, write_objective_power=True,
                          min_level_side=side // 2)  # fmt: skip
    tiles = (img[y : y + tile, x : x + tile] for y in range(0, side, tile)
             for x in range(0, side, tile))  # fmt: skip
    first = root / "s0000.tif"
    write_pyramid(first, tiles, halve(img), side, side, cfg)
    paths = [first]
    for i in range(1, n):
        paths.append(root / f"s{i:04d}.tif")
        shutil.copyfile(first, paths[-1])
    return paths


def _fake_spec(dim: int) -> TeacherSpec:
    return TeacherSpec(name="bench", weights="none", input_size=224, resize_size=None,
                       crop=False, interpolation="bilinear", mean=(0.5, 0.5, 0.5),
                       std=(0.5, 0.5, 0.5), output="", out_dim=dim, precision="fp32")  # fmt: skip


def cohort_windows(paths: list[Path], side: int, patch: int, grid: int, cache_dir: Path, dim: int):
    """SlideWindows of every slide, and a teacher cache with a feature for each patch."""
    xs = np.arange(0, side, patch)
    coords = np.stack(np.meshgrid(xs, xs, indexing="xy"), -1).reshape(-1, 2)
    origins = find_window_origins(coords, patch, grid)
    slides = [SlideWindows(p.stem, str(p), origins, patch, patch, 0) for p in paths]
    cache = TeacherCache(cache_dir, _fake_spec(dim))
    feats = np.random.default_rng(1).standard_normal((len(coords), dim)).astype(np.float32)
    for sw in slides:
        cache.merge(sw, coords, feats)
    return slides, cache


class Measured(torch.utils.data.Dataset):
    """A WindowDataset whose items also carry what the reading process holds at that moment."""

    def __init__(self, inner: WindowDataset):
        self.inner = inner
        self.base: tuple[int, float] | None = None

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, k: int) -> dict:
        if self.base is None:
            self.base = (open_files(), rss_mb())
        item = self.inner[k]
        readers = self.inner.readers
        return {"readers": len(readers), "teacher_files": len(self.inner.teacher._files),
                "open_files_growth": open_files() - self.base[0],
                "rss_growth_mb": rss_mb() - self.base[1], "n_patches": len(item["patches"])}  # fmt: skip


def open_files() -> int:
    return len(os.listdir("/proc/self/fd"))


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def read_spread(slides, cache, grid: int, per_slide: int) -> dict:
    """Read `per_slide` windows of every slide, shuffled, in one worker: the worst it held."""
    reader = CacheReader(cache, slides, range(len(slides)))
    refs = [WindowRef(s, w) for s in range(len(slides)) for w in range(per_slide)]
    order = np.random.default_rng(0).permutation(len(refs))
    dataset = Measured(WindowDataset(slides, [refs[i] for i in order], grid, teacher=reader))
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=1)
    worst = {"readers_max": 0, "teacher_files_max": 0, "open_files_growth": 0,
             "rss_growth_mb": 0.0}  # fmt: skip
    t0 = time.perf_counter()
    n = 0
    for item in loader:
        n += 1
        worst["readers_max"] = max(worst["readers_max"], item["readers"])
        worst["teacher_files_max"] = max(worst["teacher_files_max"], item["teacher_files"])
        worst["open_files_growth"] = max(worst["open_files_growth"], item["open_files_growth"])
        worst["rss_growth_mb"] = max(worst["rss_growth_mb"], item["rss_growth_mb"])
    worst["windows_read"] = n
    worst["windows_per_s"] = n / (time.perf_counter() - t0)
    return worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=1_000_000)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--world-size", type=int, default=1)
    ap.add_argument("--slides", type=int, default=200)
    ap.add_argument("--side", type=int, default=2048, help="slide side in pixels")
    ap.add_argument("--patch", type=int, default=256)
    ap.add_argument("--grid", type=int, default=4)
    ap.add_argument("--per-slide", type=int, default=2, help="windows read per slide")
    ap.add_argument("--teacher-dim", type=int, default=64)
    args = ap.parse_args()
    torch.set_num_threads(1)

    plan = plan_epoch(args.windows, args.batch_size, args.grad_accum, args.world_size)
    print(f"planning: {args.windows} windows, {plan['steps']} steps of {args.batch_size}: "
          f"{plan['plan_ms_per_step']:.4f} ms/step (old, one shuffle per step: "
          f"{plan['reshuffle_ms_per_step']:.2f} ms/step, "
          f"{plan['reshuffle_ms_per_step'] / plan['plan_ms_per_step']:.0f}x)", flush=True)  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="bench_scale_") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        paths = write_slides(root, args.slides, args.side, args.patch)
        slides, cache = cohort_windows(paths, args.side, args.patch, args.grid,
                                       root / "cache", args.teacher_dim)  # fmt: skip
        print(f"cohort: {args.slides} slides of {args.side}px, {len(slides[0])} windows of "
              f"{args.grid}x{args.grid} each, written in {time.perf_counter() - t0:.1f}s",
              flush=True)  # fmt: skip
        per_slide = min(args.per_slide, len(slides[0]))
        read = read_spread(slides, cache, args.grid, per_slide)
    print(
        f"reading: {read['windows_read']} windows over {args.slides} slides in one worker, "
        f"{read['windows_per_s']:.1f} windows/s; slide readers open at most "
        f"{read['readers_max']}, teacher-cache files at most {read['teacher_files_max']}"
    )
    figures = {"readers_max": read["readers_max"], "open_files_growth": read["open_files_growth"],
               "rss_growth_mb": read["rss_growth_mb"], "plan_ms_per_step": plan["plan_ms_per_step"]}  # fmt: skip
    missed = [k for k, goal in GOALS.items() if figures[k] > goal]
    print("goals: " + ("all met" if not missed else "MISSED " + ", ".join(missed))
          + " (" + ", ".join(f"{k} <= {v}" for k, v in GOALS.items()) + ")")  # fmt: skip
    print(
        f"scale: slides={args.slides} windows={args.windows} readers_max={read['readers_max']} "
        f"open_files_growth={read['open_files_growth']} "
        f"rss_growth_mb={read['rss_growth_mb']:.0f} "
        f"plan_ms_per_step={plan['plan_ms_per_step']:.4f}"
    )


if __name__ == "__main__":
    main()
