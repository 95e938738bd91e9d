"""D2 of the MCM-KD effect experiment: the fine-tune budget, chosen on development cohorts.

Candidates B1..B4 (benchmarks/mcmkd_effect_protocol.md, "D2"), student = the offline
baseline, teacher = the chosen teacher; each is scored by the validation masked-patch R² of
the fine-tune (``final_metrics.json``) on development cohort seeds 100 and 101 of
``bench_mcmkd_effect.py`` (never the experiment's 0-4). The same FinetuneConfig as
``bench_mcmkd_effect.finetune_stage``; the windows come from the non-test slides.

    python benchmarks/mcmkd_effect_d2.py --dev-root /tmp/effect_dev/c0.25 \\
        --encoders /tmp/effect/encoders --out /tmp/effect_dev/d2 B1
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

CANDIDATES = {
    "B1": {"loss": "cosine", "max_windows": 240, "epochs": 1},
    "B2": {"loss": "smooth_l1", "max_windows": 240, "epochs": 1},
    "B3": {"loss": "smooth_l1", "max_windows": 960, "epochs": 1},
    "B4": {"loss": "smooth_l1", "max_windows": 960, "epochs": 2},
}


def run_candidate(name: str, seed: int, args) -> dict:
    import pandas as pd

    from clam_mcmkd.mcmkd import FinetuneConfig, finetune

    root, out = Path(args.dev_root) / f"seed{seed}", Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dataset = pd.read_csv(root / "cohort" / "dataset.csv")
    test = set(pd.read_csv(root / "fixed_test.csv")["slide_id"])
    csv = out / f"slides{seed}.csv"
    dataset[~dataset.slide_id.isin(test)].to_csv(csv, index=False)
    started = time.time()
    cfg = FinetuneConfig(
        data_h5_dir=str(root / "tiles"), data_slide_dir=str(root / "cohort" / "slides"),
        csv_path=str(csv), slide_ext=".tif", teacher="checkpoint",
        teacher_ckpt=str(Path(args.encoders) / f"{args.teacher}.pt"),
        student="resnet18_trunc", student_ckpt=str(Path(args.encoders) / "baseline.pt"),
        input_size=64, pretrained=False, grid=3, window_overlap=True, batch_size=8, lr=1e-3,
        student_lr_mult=0.3, val_frac=0.1, predictor_width=128, device="cpu", progress=False,
        resume=True, out=str(out / f"{name}_s{seed}.pt"),
        teacher_cache=str(out / f"cache_s{seed}"), **CANDIDATES[name],
    )  # fmt: skip
    if not Path(cfg.out).is_file():
        finetune(cfg)
    metrics = json.loads(Path(cfg.out).with_suffix(".final_metrics.json").read_text())
    scores = {k: round(v, 4) for k, v in metrics.items() if k.startswith(("val_r2", "val_cos"))}
    return {"candidate": name, "dev_seed": seed, "wall_s": round(time.time() - started, 1),
            "steps": metrics["steps"], "train_windows": metrics["train_windows"], **scores}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("candidates", nargs="+", choices=sorted(CANDIDATES))
    ap.add_argument("--dev-root", required=True, help="bench_mcmkd_effect's c<contrast> dir")
    ap.add_argument("--encoders", required=True, help="dir with baseline.pt and the teacher")
    ap.add_argument("--teacher", default="teacher_morph")
    ap.add_argument("--dev-seeds", type=int, nargs="+", default=[100, 101])
    ap.add_argument("--out", required=True)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    import pandas as pd
    import torch

    torch.set_num_threads(args.threads)
    rows = []
    for name in args.candidates:
        for seed in args.dev_seeds:
            rows.append(run_candidate(name, seed, args))
            print(json.dumps(rows[-1]), flush=True)
    pd.DataFrame(rows).to_csv(Path(args.out) / f"d2_{'_'.join(args.candidates)}.csv", index=False)


if __name__ == "__main__":
    main()
