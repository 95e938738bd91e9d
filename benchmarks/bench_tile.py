"""Seconds per slide to tile a generated 16k x 16k slide (and, optionally, CLAM on the same one).

    python benchmarks/bench_tile.py [--size 16384] [--slide PATH] [--clam-dir /path/to/CLAM]

Prints one line per measurement. With --clam-dir, upstream CLAM's
``create_patches_fp.py --seg --patch --stitch`` runs on the same slide in the same run (same
Python), so the two numbers are comparable; its patch count is printed too.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py


def tile_once(slide: Path, out: Path, patch_size: int) -> tuple[float, int]:
    from clam_mcmkd.tiling import TileConfig, tile_slides

    started = time.perf_counter()
    summary = tile_slides(
        TileConfig(
            source=str(slide), save_dir=str(out), patch_size=patch_size, step_size=patch_size
        )
    )
    seconds = time.perf_counter() - started
    if summary.failed:
        raise SystemExit(f"tiling failed: {summary.failed}")
    return seconds, int(summary.extra["patches"])


def run_clam(clam_dir: Path, slide: Path, out: Path, patch_size: int) -> tuple[float, int]:
    src = out / "src"
    src.mkdir(parents=True, exist_ok=True)
    (src / slide.name).symlink_to(slide.resolve())
    cmd = [
        sys.executable, "create_patches_fp.py", "--source", str(src), "--save_dir", str(out / "res"),
        "--patch_size", str(patch_size), "--step_size", str(patch_size),
        "--seg", "--patch", "--stitch",
    ]  # fmt: skip
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=clam_dir, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-2000:]
        raise SystemExit(f"CLAM's create_patches_fp.py failed (rc {proc.returncode}):\n{tail}")
    h5_path = out / "res" / "patches" / f"{slide.stem}.h5"
    n = 0
    if h5_path.is_file():
        with h5py.File(h5_path, "r") as f:
            n = len(f["coords"])
    for line in proc.stdout.splitlines():
        if "average" in line.lower():
            print(f"  CLAM says: {line.strip()}")
    return seconds, n


def _fresh(work: Path, prefix: str) -> Path:
    """A new, empty output directory (a reused one would only measure resume)."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir=work))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=16384, help="generated slide side (px)")
    parser.add_argument("--slide", type=Path, default=None, help="tile this slide instead")
    parser.add_argument("--patch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--clam-dir", type=Path, default=None, help="an upstream CLAM checkout")
    parser.add_argument("--work-dir", type=Path, default=None)
    args = parser.parse_args()

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="bench_tile_"))
    work.mkdir(parents=True, exist_ok=True)
    slide = args.slide
    if slide is None:
        from clam_mcmkd.cohort import make_slide

        slide = work / f"synthetic_{args.size}.tif"
        if not slide.is_file():
            started = time.perf_counter()
            make_slide(slide, size=args.size, seed=0, positive=True)
            print(f"generate {args.size}x{args.size} slide: {time.perf_counter() - started:.1f} s "
                  f"({slide.stat().st_size / 1e6:.0f} MB)")  # fmt: skip
    print(f"slide: {slide}")

    started = time.perf_counter()
    from clam_mcmkd.tissue import _tiatoolbox_tissuemask

    _tiatoolbox_tissuemask()
    print(f"one-off import of tiatoolbox's tissue masker: {time.perf_counter() - started:.1f} s")

    times = []
    for i in range(args.repeats):
        seconds, n = tile_once(slide, _fresh(work, "ours_"), args.patch_size)
        times.append(seconds)
        print(f"clam-mcmkd tile run {i + 1}: {seconds:.2f} s/slide, {n} patches")
    print(
        f"clam-mcmkd tile: best {min(times):.2f} s/slide, median {sorted(times)[len(times) // 2]:.2f}"
    )

    # the whole command, process start-up included (comparable with CLAM's process time)
    cli = [sys.executable, "-m", "clam_mcmkd.cli", "tile", "--source", str(slide), "--save-dir"]
    started = time.perf_counter()
    subprocess.run([*cli, str(_fresh(work, "cli_"))], check=True, capture_output=True)
    print(f"clam-mcmkd tile (whole process): {time.perf_counter() - started:.2f} s")

    if args.clam_dir:
        clam_times = []
        for i in range(args.repeats):
            seconds, n = run_clam(args.clam_dir, slide, _fresh(work, "clam_"), args.patch_size)
            clam_times.append(seconds)
            print(f"CLAM create_patches_fp.py run {i + 1}: {seconds:.2f} s (process), {n} patches")
        print(f"CLAM create_patches_fp.py: best {min(clam_times):.2f} s/slide (incl. start-up)")


if __name__ == "__main__":
    main()
