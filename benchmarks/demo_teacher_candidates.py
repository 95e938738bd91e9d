"""Which recipe gives the demo a teacher that carries more than its baseline? (issue 18, item 4)

Each candidate teacher is the demo's baseline trained further on a separate synthetic cohort
(generator seed 9000, as the demo's), with the tissue classes alone or with the pixel-measured
nuclear morphometry too; candidates differ in the cohort's unlabelled atypia contrast, its
slide count and the steps. All are measured with the baseline on a held-out instrument cohort
(generator seed 9200 by default, the demo's contrast 0.25; never the demo's own instrument,
seed 9300, nor a demo cohort): linear probes of each patch's tissue class and, in positive
slides, of lying in the atypical region (:mod:`clam_mcmkd.benchmark.instruments`). No MIL
result is read. Results: benchmarks/RESULTS.md, "Demo, issue 18".

    python benchmarks/demo_teacher_candidates.py --workdir W --instrument-slides 24 \\
        tissue:0:150:12 morph:0.5:300:12 morph:0.5:600:12 morph:1:600:12 morph:0.5:600:24

A candidate is ``targets:contrast:steps:slides`` (targets ``tissue`` or ``morph``). Encoders and
cohorts resume from their files; torch runs on one thread, as the demo does.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pandas as pd


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--instrument-seed", type=int, default=9200)
    ap.add_argument("--instrument-slides", type=int, default=24)
    ap.add_argument("candidates", nargs="+", metavar="TARGETS:CONTRAST:STEPS:SLIDES")
    args = ap.parse_args()
    import torch

    from clam_mcmkd.benchmark.demo import PATCH, TEACHER_COHORT_SEED, _tiled_fields_cohort
    from clam_mcmkd.benchmark.instruments import (
        encoder_instruments,
        patch_truth_per_slide,
        slide_patches,
    )
    from clam_mcmkd.benchmark.proxy_pretrain import (
        FitConfig,
        patch_morphometry,
        pretrain_baseline,
        tissue_class_patches,
        train_teacher,
    )

    torch.set_num_threads(1)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    baseline = work / "baseline.pt"
    if not baseline.is_file():  # the demo's baseline, with the demo's settings
        pretrain_baseline(baseline, FitConfig(input_size=PATCH, steps=400, seed=0,
                                              heldout_images=256))  # fmt: skip
    encoders, info = {"baseline": baseline}, {}
    for spec in args.candidates:
        targets, contrast, steps, n_slides = spec.split(":")
        contrast, steps, n_slides = float(contrast), int(steps), int(n_slides)
        out = work / f"teacher_{spec.replace(':', '_')}.pt"
        started = time.time()
        if not out.is_file():
            root = work / f"teacher_cohort_c{contrast:g}_n{n_slides}"
            _tiled_fields_cohort(root, n_slides, 1024, TEACHER_COHORT_SEED, contrast)
            patches, classes = tissue_class_patches(root / "cohort", root / "tiles" / "patches")
            morph = patch_morphometry(patches) if targets == "morph" else None
            fit = FitConfig(input_size=PATCH, steps=steps, lr=1e-3, augment=True, seed=2,
                            init_ckpt=str(baseline))  # fmt: skip
            train_teacher(out, patches, classes, fit, morph)
            info[spec] = round(time.time() - started, 1)
        encoders[spec] = out
    root = work / f"instrument_s{args.instrument_seed}_n{args.instrument_slides}"
    csv = _tiled_fields_cohort(root, args.instrument_slides, 1024, args.instrument_seed, 0.25)
    df = pd.read_csv(csv)
    per_slide = slide_patches(root / "cohort" / "slides", root / "tiles" / "patches",
                              df["slide_id"])  # fmt: skip
    truth = patch_truth_per_slide(root / "cohort", per_slide, PATCH)
    positive = set(df.loc[df["label"] == "tumor", "slide_id"])
    table = pd.DataFrame(encoder_instruments(encoders, per_slide, truth, positive))
    table["train_seconds"] = table["encoder"].map(info)
    print(json.dumps({"instrument_seed": args.instrument_seed, "slides": len(per_slide),
                      "patches": int(sum(len(p) for p, _ in per_slide.values()))}))  # fmt: skip
    cols = ["encoder", "probe_atypia_auc", "probe_class_bal_acc", "cos_to_mean", "train_seconds"]
    print(table[cols].to_string(index=False, float_format="%.3f"))


if __name__ == "__main__":
    main()
