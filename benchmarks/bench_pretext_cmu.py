"""Does the MCM-KD pretext learn on a real slide? Masked-patch R² before/after, vs the mean.

The CMU H&E slide (tests/data, 20x) tiled at 64 px; the offline encoders of the effect
experiment (bench_mcmkd_effect.py): student = the untuned baseline, teacher = the chosen
offline teacher. One slide, so validation uses held-out windows of the same slide. Printed:
validation R² of the teacher's standardised features at the scored positions (masked ones;
patch_kd: all) before and after the fine-tune, and the R² of predicting the training mean
(a constant scores <= 0), plus the raw cosines that a constant already gets high.

    python benchmarks/bench_pretext_cmu.py --encoders /tmp/effect/encoders \\
        --teacher teacher_morph --out /tmp/pretext_cmu --csv benchmarks/results/pretext_cmu.csv
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SLIDE = REPO / "tests" / "data" / "CMU-1-Small-Region.svs"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--encoders", required=True, help="dir with baseline.pt and the teacher")
    ap.add_argument("--teacher", default="teacher", help="teacher checkpoint name in --encoders")
    ap.add_argument("--out", required=True)
    ap.add_argument("--objectives", nargs="+", default=["mcmkd", "patch_kd"])
    ap.add_argument("--grid", type=int, default=3)
    ap.add_argument("--windows", type=int, default=240)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--loss", default="cosine")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--csv", default=None, help="also write the table here")
    args = ap.parse_args()
    import torch

    from clam_mcmkd.clam.formats import write_dataset_csv
    from clam_mcmkd.mcmkd import FinetuneConfig, finetune
    from clam_mcmkd.tiling import TileConfig, tile_slides

    torch.set_num_threads(args.threads)
    out, enc = Path(args.out), Path(args.encoders)
    tile_slides(TileConfig(source=str(SLIDE), save_dir=str(out / "tiles"), patch_size=64,
                           step_size=64))  # fmt: skip
    csv = write_dataset_csv(
        out / "slides.csv", [{"case_id": "c", "slide_id": SLIDE.stem, "label": "unlabelled"}]
    )
    rows = []
    for objective in args.objectives:
        t0 = time.perf_counter()
        cfg = FinetuneConfig(
            data_h5_dir=str(out / "tiles"), data_slide_dir=str(SLIDE.parent), csv_path=str(csv),
            slide_ext=".svs", out=str(out / f"{objective}.pt"), teacher="checkpoint",
            teacher_ckpt=str(enc / f"{args.teacher}.pt"), teacher_cache=str(out / "cache"),
            student="resnet18_trunc", student_ckpt=str(enc / "baseline.pt"), input_size=64,
            pretrained=False, objective=objective, grid=args.grid, window_overlap=True,
            batch_size=8, lr=args.lr, student_lr_mult=0.3, epochs=args.epochs,
            max_windows=args.windows, val_frac=0.1, predictor_width=128, loss=args.loss,
            device="cpu", progress=False, resume=True,
        )  # fmt: skip
        if not Path(cfg.out).is_file():
            finetune(cfg)
        m = json.loads((out / f"{objective}.final_metrics.json").read_text())
        rows.append({"objective": objective, "seconds": round(time.perf_counter() - t0, 1),
                     **{k: m.get(k) for k in m if k.startswith("val_") or k == "steps"}})  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    print(f"{'objective':10s} {'R2 before':>10s} {'R2 after':>10s} {'mean R2':>8s} "
          f"{'cos after':>10s} {'mean cos':>9s} {'positions':>9s}")  # fmt: skip
    for r in rows:
        print(f"{r['objective']:10s} {r['val_r2_before']:10.3f} {r['val_r2_after']:10.3f} "
              f"{r['val_r2_mean_baseline']:8.3f} {r['val_cosine_after']:10.3f} "
              f"{r['val_cosine_mean_baseline']:9.3f} {r['val_masked_positions']:9d}")  # fmt: skip
    if args.csv:
        import pandas as pd

        from clam_mcmkd.utils import atomic_write_text

        table = pd.DataFrame(rows).drop(
            columns="seconds"
        )  # a resumed run's seconds are not its cost
        atomic_write_text(Path(args.csv), table.to_csv(index=False, float_format="%.4f"))


if __name__ == "__main__":
    main()
