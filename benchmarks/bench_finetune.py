"""MCM-KD fine-tuning speed: windows/s with a cold teacher cache and with a warm one.

Also, in the same run, how fast the training windows are read (no model): one OpenSlide
``read_region`` per window (``windows.read_window``, what fine-tuning used before) against the
slide's own JPEG tiles (``WindowDataset``: ``PatchReader.read_window``, what it uses now).

The teacher is paid at most once per patch: the first run computes its features and writes the
cache, the second run (same teacher, same cache dir) reads them and never builds the teacher.

    python benchmarks/bench_finetune.py                         # CMU slide, tiny CPU models
    python benchmarks/bench_finetune.py --student resnet50_trunc --teacher vit_large_patch16_224 \
        --input-size 224 --teacher-input-size 224 --device cuda --pretrained   # a GPU machine
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from clam_mcmkd.clam.formats import write_dataset_csv
from clam_mcmkd.encoders import create_encoder, encoder_flops_params
from clam_mcmkd.mcmkd import FinetuneConfig, finetune, output_paths, trainer
from clam_mcmkd.tiling import TileConfig, tile_slides
from clam_mcmkd.utils import resolve_device

REPO = Path(__file__).resolve().parents[1]
CMU = REPO / "tests" / "data" / "CMU-1-Small-Region.svs"


@contextlib.contextmanager
def counting_teacher_builds():
    """A list that gets one entry per teacher network the trainer builds."""
    builds = []
    real = trainer.build_teacher

    def counting(*args, **kwargs):
        builds.append(args[0] if args else kwargs.get("name"))
        return real(*args, **kwargs)

    trainer.build_teacher = counting
    try:
        yield builds
    finally:
        trainer.build_teacher = real


def window_read_rates(cfg: FinetuneConfig, repeats: int = 3) -> dict[str, float]:
    """Windows/s reading every training window, OpenSlide vs tiles (best of `repeats`)."""
    from functools import partial

    from clam_mcmkd.mcmkd import plan_windows
    from clam_mcmkd.mcmkd.objectives import input_masks
    from clam_mcmkd.mcmkd.windows import WindowDataset, read_window
    from clam_mcmkd.slides import open_slide

    plan = plan_windows(cfg)
    best = {"openslide": 0.0, "tiles": 0.0, "visible": 0.0}
    for _ in range(repeats):
        t0 = time.perf_counter()
        slides = {}
        for ref in plan.train:
            sw = plan.slides[ref.slide]
            if ref.slide not in slides:
                slides[ref.slide] = open_slide(sw.slide_path)
            read_window(slides[ref.slide], sw, ref.window, cfg.grid)
        best["openslide"] = max(best["openslide"], len(plan.train) / (time.perf_counter() - t0))
        t0 = time.perf_counter()
        dataset = WindowDataset(plan.slides, plan.train, cfg.grid)
        for k in range(len(dataset)):
            dataset[k]
        dataset.close()
        best["tiles"] = max(best["tiles"], len(plan.train) / (time.perf_counter() - t0))
        # what training reads now: the patches the epoch's mask leaves visible, nothing else
        t0 = time.perf_counter()
        dataset = WindowDataset(plan.slides, plan.train, cfg.grid, masks=partial(input_masks, cfg))
        for k in range(len(dataset)):
            dataset[(k, 0)]
        dataset.close()
        best["visible"] = max(best["visible"], len(plan.train) / (time.perf_counter() - t0))
    return best


def print_reads(reads: dict[str, float], cfg: FinetuneConfig) -> None:
    print(
        f"window reads of {cfg.grid}x{cfg.grid} (best of 3, no model): openslide "
        f"{reads['openslide']:.1f} windows/s, tiles {reads['tiles']:.1f} windows/s "
        f"(x{reads['tiles'] / reads['openslide']:.2f}), visible patches only at --mask-ratio "
        f"{cfg.mask_ratio} {reads['visible']:.1f} windows/s "
        f"(x{reads['visible'] / reads['tiles']:.2f} vs whole windows from tiles)"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--slide", default=str(CMU))
    ap.add_argument("--patch-size", type=int, default=128, help="tiling patch size at 20x")
    ap.add_argument("--student", default="resnet18_trunc")
    ap.add_argument("--teacher", default="resnet50")
    ap.add_argument("--input-size", type=int, default=112)
    ap.add_argument("--teacher-input-size", type=int, default=112)
    ap.add_argument("--grid", type=int, default=2)
    ap.add_argument("--reads-only", action="store_true",
                    help="only the window-read rates (no fine-tune runs)")  # fmt: skip
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-windows", type=int, default=32)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--pretrained", action="store_true", help="download weights (default: random)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_finetune_"))
    slide = Path(args.slide)
    tiles = work / "tiles"
    tile_slides(
        TileConfig(
            source=str(slide),
            save_dir=str(tiles),
            patch_size=args.patch_size,
            step_size=args.patch_size,
        )
    )
    csv = write_dataset_csv(
        work / "data.csv", [{"case_id": "c", "slide_id": slide.stem, "label": "x"}]
    )
    cache = work / "teacher_cache"
    shutil.rmtree(cache, ignore_errors=True)
    cfg = FinetuneConfig(
        data_h5_dir=str(tiles),
        data_slide_dir=str(slide.parent),
        csv_path=str(csv),
        slide_ext=slide.suffix,
        teacher=args.teacher,
        teacher_input_size=args.teacher_input_size,
        student=args.student,
        input_size=args.input_size,
        pretrained=args.pretrained,
        grid=args.grid,
        batch_size=args.batch_size,
        max_windows=args.max_windows,
        val_frac=0.0,
        teacher_cache=str(cache),
        device=device,
        progress=False,
        out=str(work / "cold.pt"),
    )
    if args.reads_only:
        print_reads(window_read_rates(cfg), cfg)
        return
    rows = []
    for name, run_cfg in (
        ("cold cache", cfg),
        ("warm cache", replace(cfg, out=str(work / "warm.pt"))),
    ):
        with counting_teacher_builds() as builds:
            t0 = time.perf_counter()
            finetune(run_cfg)
            wall = time.perf_counter() - t0
        m = json.loads(output_paths(run_cfg.out)["final_metrics"].read_text())
        rows.append(
            {
                "run": name,
                "windows": m["train_windows"],
                "wall_s": wall,
                "windows_per_s_end_to_end": m["train_windows"] / wall,
                "windows_per_s_training": m["windows_per_s"],
                "teacher_built": len(builds),
                "teacher_patches_computed": m["teacher_patches_computed"],
                "teacher_patches_cached": m["teacher_patches_cached"],
            }
        )
    student = create_encoder(args.student, pretrained=False, target_img_size=args.input_size)
    teacher = create_encoder(args.teacher, pretrained=False)
    s_cost = encoder_flops_params(student)
    t_cost = encoder_flops_params(teacher)
    t_cost_at = (
        t_cost["gflops_per_patch"] * (args.teacher_input_size / teacher.transforms.input_size) ** 2
    )
    print(f"device={device} threads={args.threads} slide={slide.name} patch={args.patch_size}px")
    print(
        f"student {args.student}@{args.input_size}: {s_cost['gflops_per_patch']:.3f} GFLOPs/patch, "
        f"teacher {args.teacher}@{args.teacher_input_size}: ~{t_cost_at:.3f} GFLOPs/patch"
    )
    print_reads(window_read_rates(cfg), cfg)
    header = list(rows[0])
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        print(
            "| "
            + " | ".join(f"{v:.2f}" if isinstance(v, float) else str(v) for v in r.values())
            + " |"
        )


if __name__ == "__main__":
    main()
