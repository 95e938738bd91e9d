"""The GPU paths, run on a GPU: extraction's numbers against the CPU's, and a real fine-tune.

What the CPU suite can only reproduce by mechanism (bf16 autocast on CUDA, pinned uint8
hand-over with on-device resize, cuDNN kernels, a teacher cache filled on the GPU, resume on
the GPU), run once on the real thing, with numbers:

1. extraction: the same seeded ``resnet50_trunc`` encodes the same patches of a generated slide
   on the CPU (float32) and on the GPU (float32, bf16); per-patch cosine and relative L2;
2. a fine-tune (``finetune``, the CLI's own function) on generated slides with a coords grid
   (no tissue masking: tiatoolbox need not be installed): ViT-L/16 teacher, resnet50_trunc
   student, bf16, random weights; its windows/s and the four student probes;
3. resume on the GPU: the same run stopped at half its steps and resumed, against the straight
   run (max |Δ| of the student's weights; cuDNN's backward kernels are not bit-deterministic).

Writes ``gpu_check.json`` in ``--out``. On a CPU it runs with tiny models (to test the script).

    python benchmarks/gpu_check.py --out /tmp/gpu_check                 # the GPU machine
    python benchmarks/gpu_check.py --out /tmp/gpu_check --device cpu --tiny
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from bench_mcmkd_effect import log

from clam_mcmkd.clam.formats import write_dataset_csv, write_grid_coords_h5
from clam_mcmkd.cohort import make_slide
from clam_mcmkd.encoders import create_encoder, read_student_checkpoint
from clam_mcmkd.mcmkd import FinetuneConfig, finetune, output_paths
from clam_mcmkd.patch_pipeline import SlideJob, encode_cohort
from clam_mcmkd.utils import atomic_write_text


def make_cohort(root: Path, n_slides: int, size: int) -> tuple[Path, Path, Path]:
    """Generated JPEG-tiled slides, a full 256 px grid on each (CLAM's coords h5), a csv."""
    slides, h5 = root / "slides", root / "h5"
    slides.mkdir(parents=True, exist_ok=True)
    (h5 / "patches").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n_slides):
        sid = f"gen{i:02d}"
        if not (slides / f"{sid}.tif").is_file():
            make_slide(slides / f"{sid}.tif", size=size, seed=i, positive=bool(i % 2))
        write_grid_coords_h5(h5 / "patches" / f"{sid}.h5", size, name=sid)
        rows.append({"case_id": sid, "slide_id": sid, "label": "tumor" if i % 2 else "normal"})
    csv = write_dataset_csv(root / "dataset.csv", rows)
    return h5, slides, csv


def extraction_check(h5: Path, slides: Path, device: str, student: str, size: int) -> dict:
    job = [SlideJob("gen00", str(slides / "gen00.tif"), str(h5 / "patches" / "gen00.h5"))]

    def features(dev: str, precision: str) -> np.ndarray:
        enc = create_encoder(student, pretrained=False, target_img_size=size)
        (res,) = list(encode_cohort(enc, job, batch_size=64, device=dev, precision=precision))
        assert res.error is None, res.error
        return np.asarray(res.features, dtype=np.float64)

    ref = features("cpu", "fp32")
    out = {"student": student, "n_patches": len(ref)}
    if not device.startswith("cuda"):
        return out
    for precision in ("fp32", "bf16"):
        got = features(device, precision)
        cos = (ref * got).sum(1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1))
        rel = np.linalg.norm(ref - got, axis=1) / np.linalg.norm(ref, axis=1)
        out[precision] = {"cos_min": float(cos.min()), "cos_mean": float(cos.mean()),
                          "rel_l2_max": float(rel.max()), "rel_l2_mean": float(rel.mean())}  # fmt: skip
        log(f"extraction {precision} vs CPU fp32: {out[precision]}")
    return out


def finetune_check(cfg: FinetuneConfig) -> dict:
    t0 = time.perf_counter()
    finetune(cfg)
    wall = time.perf_counter() - t0
    metrics = json.loads(output_paths(cfg.out)["final_metrics"].read_text())
    keep = ("steps", "windows_seen", "windows_per_s", "train_seconds", "val_r2_before",
            "val_r2_after", "student_teacher_r2_before", "student_teacher_r2_after",
            "student_context_r2_before", "student_context_r2_after", "precision", "device")  # fmt: skip
    out = {k: metrics[k] for k in keep if k in metrics}
    out["wall_s"] = round(wall, 1)
    log(f"finetune {Path(cfg.out).name}: {out}")
    return out


def max_abs_diff(a: str, b: str) -> float:
    sa, sb = read_student_checkpoint(a)["state_dict"], read_student_checkpoint(b)["state_dict"]
    return max(float((sa[k].float() - sb[k].float()).abs().max()) for k in sa)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny models and slides (a CPU test)")
    ap.add_argument("--slides", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=4)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.tiny:
        student, teacher, size, slide_px, n = "resnet18_trunc", "resnet18", 64, 2048, 4
    else:
        student, teacher, size, slide_px, n = (
            "resnet50_trunc",
            "vit_large_patch16_224",
            224,
            4096,
            args.slides,
        )
    report = {"torch": torch.__version__, "device": args.device}
    if args.device.startswith("cuda"):
        report["gpu"] = torch.cuda.get_device_name(0)
    t0 = time.perf_counter()
    h5, slides, csv = make_cohort(out / "cohort", n, slide_px)
    log(f"cohort: {n} slides of {slide_px}^2 in {time.perf_counter() - t0:.1f} s")
    report["extraction"] = extraction_check(h5, slides, args.device, student, size)

    cfg = FinetuneConfig(
        str(h5), str(slides), str(csv), teacher, out=str(out / "straight.pt"), student=student,
        input_size=size, teacher_input_size=size, pretrained=False, epochs=args.epochs,
        batch_size=32, val_frac=0.25, device=args.device, progress=False,
        teacher_cache=str(out / "teacher_cache"), save_every=5, seed=0,
    )  # fmt: skip
    report["finetune"] = finetune_check(cfg)  # fills the teacher cache; the next two read it
    steps = report["finetune"]["steps"]
    half = replace(cfg, out=str(out / "resumed.pt"), stop_after_steps=steps // 2)
    finetune(half)
    report["resume"] = finetune_check(replace(half, stop_after_steps=None, resume=True))
    report["resume"]["stopped_at"] = steps // 2
    report["resume"]["student_max_abs_diff_vs_straight"] = max_abs_diff(cfg.out, half.out)
    log(f"resume: {report['resume']}")
    atomic_write_text(out / "gpu_check.json", json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
