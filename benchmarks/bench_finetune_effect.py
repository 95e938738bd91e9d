"""Does MCM-KD carry a teacher's knowledge into the student? A controlled CPU experiment.

Setup (all seeded, no downloaded weights):
1. Two synthetic cohorts: a "teacher" cohort whose tumour annotations give patch labels, and an
   "evaluation" cohort for slide-level MIL (its annotations are never used for training).
2. Teacher: a ResNet-18 trained on teacher-cohort patches, tumour vs normal (it knows what
   tumour looks like). Student: a random-init ResNet-18 trunc (stands in for the generic
   ImageNet extractor, which cannot be downloaded here).
3. MCM-KD fine-tunes the student on the evaluation cohort's windows (label-free).
4. Features with the student before and after MCM-KD and with the teacher; ABMIL on CLAM-style
   Monte-Carlo splits of the evaluation cohort, several MIL seeds; test AUC per encoder.

    python benchmarks/bench_finetune_effect.py --workdir /tmp/mcmkd_effect
    # not at ceiling: a subtler tumour; replicates with --cohort-seed; control arm with an
    # untrained teacher: --teacher-epochs 0
    python benchmarks/bench_finetune_effect.py --tumor-contrast 0.2 --cohort-seed 1
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from matplotlib.path import Path as PolyPath

from clam_mcmkd.clam.formats import read_coords_h5, read_dataset_csv, write_features
from clam_mcmkd.cohort import make_cohort, read_annotation
from clam_mcmkd.encoders import PatchTransforms, create_encoder
from clam_mcmkd.encoders.forward import encode_patches
from clam_mcmkd.features import ExtractConfig, extract_features
from clam_mcmkd.mcmkd import FinetuneConfig, finetune, output_paths
from clam_mcmkd.mil import TrainConfig, train
from clam_mcmkd.slides import open_slide
from clam_mcmkd.splits import SplitConfig, make_splits
from clam_mcmkd.tiling import TileConfig, tile_slides

SIZE = 64  # every encoder's input size here (CPU budget); --input-size changes it
TUMOR_FRAC = 0.08


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def cohort(
    work: Path, name: str, n: int, seed: int, tumor_frac: float, tumor_contrast: float
) -> tuple[Path, Path]:
    root = work / name
    csv = make_cohort(
        root,
        n_slides=n,
        size=3072,
        seed=seed,
        tumor_frac=tumor_frac,
        tumor_contrast=tumor_contrast,
    )
    tile_slides(TileConfig(source=str(root / "slides"), save_dir=str(root / "tiles")))
    return csv, root


def read_patches(slide_path: Path, coords_path: Path) -> tuple[np.ndarray, np.ndarray]:
    c = read_coords_h5(coords_path)
    with open_slide(slide_path) as s:
        imgs = np.stack(
            [s.read_region(tuple(xy), c.patch_level, (c.patch_size,) * 2) for xy in c.coords]
        )
    return imgs, c.coords


def patch_labels(root: Path, slide_id: str, coords: np.ndarray, patch: int) -> np.ndarray:
    """1 where the patch centre lies inside a tumour contour (ground truth of the generator)."""
    ann = read_annotation(root, slide_id)
    centres = coords + patch / 2
    inside = np.zeros(len(coords), dtype=bool)
    for contour in ann.get("tumor_contours", []):
        inside |= PolyPath(np.asarray(contour, dtype=float).reshape(-1, 2)).contains_points(centres)
    return inside.astype(np.int64)


def cohort_patches(root: Path, csv: Path, with_labels: bool):
    xs, ys, per_slide = [], [], {}
    for sid in read_dataset_csv(csv)["slide_id"]:
        h5 = root / "tiles" / "patches" / f"{sid}.h5"
        if not h5.is_file():
            continue
        imgs, coords = read_patches(root / "slides" / f"{sid}.tif", h5)
        per_slide[sid] = (imgs, coords)
        xs.append(imgs)
        if with_labels:
            ys.append(patch_labels(root, sid, coords, read_coords_h5(h5).patch_size_level0))
    return np.concatenate(xs), (np.concatenate(ys) if ys else None), per_slide


def train_teacher(x: np.ndarray, y: np.ndarray, out: Path, epochs: int, seed: int) -> dict:
    """ResNet-18 (timm, random init) trained on tumour vs normal patches; saves the backbone."""
    import timm

    torch.manual_seed(seed)
    model = timm.create_model("resnet18", pretrained=False, num_classes=2)
    tf = PatchTransforms(SIZE)
    xt = tf.batch(torch.from_numpy(x))
    yt = torch.from_numpy(y)
    pos = yt.float().mean().item()
    weight = torch.tensor([1.0 / max(1 - pos, 1e-3), 1.0 / max(pos, 1e-3)])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(xt), generator=g).split(64):
            flip = torch.rand(1, generator=g).item() < 0.5
            xb = xt[idx].flip(-1) if flip else xt[idx]
            loss = torch.nn.functional.cross_entropy(model(xb), yt[idx], weight=weight)
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("fc.")}
    torch.save(state, out)
    with torch.no_grad():
        acc = (model(xt).argmax(1) == yt).float().mean().item()
    return {"train_patches": len(y), "tumour_patches": int(y.sum()), "train_acc": acc}


def teacher_features(teacher_ckpt: Path, per_slide: dict, feat_dir: Path) -> None:
    """Teacher features at SIZE px (extract-features would resize timm models to 224)."""
    enc = create_encoder("resnet18", pretrained=False, ckpt=teacher_ckpt)
    enc = enc._replace(transforms=PatchTransforms(SIZE, enc.transforms.mean, enc.transforms.std))
    for sid, (imgs, coords) in per_slide.items():
        feats = encode_patches(enc, imgs, batch_size=128, device="cpu")
        write_features(feat_dir, sid, feats, coords)


def patch_probe(per_slide: dict, labels: dict, feat_dirs: dict) -> dict:
    """Patch-level tumour linear probe (diagnostic; 50/50 slide split): which features know."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    from clam_mcmkd.clam.formats import read_features

    sids = sorted(labels)
    train_s, test_s = sids[::2], sids[1::2]
    out = {}
    for name, d in feat_dirs.items():

        def stack(ss, d=d):
            x = np.concatenate([read_features(d, s) for s in ss])
            return x, np.concatenate([labels[s] for s in ss])

        xtr, ytr = stack(train_s)
        xte, yte = stack(test_s)
        if len(set(ytr)) < 2 or len(set(yte)) < 2:
            out[name] = float("nan")
            continue
        clf = LogisticRegression(max_iter=2000, C=1.0).fit(xtr, ytr)
        out[name] = roc_auc_score(yte, clf.predict_proba(xte)[:, 1])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--teacher-slides", type=int, default=10)
    ap.add_argument("--eval-slides", type=int, default=24)
    ap.add_argument(
        "--teacher-epochs", type=int, default=4, help="0 = untrained teacher (control arm)"
    )
    ap.add_argument("--mcmkd-epochs", type=int, default=3)
    ap.add_argument("--max-windows", type=int, default=600)
    ap.add_argument("--folds", type=int, default=3)
    ap.add_argument("--mil-seeds", type=int, default=3)
    ap.add_argument("--mil-epochs", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--input-size", type=int, default=64, help="every encoder's input size")
    ap.add_argument("--tumor-frac", type=float, default=0.08, help="tumour share of tissue")
    ap.add_argument("--teacher-tumor-frac", type=float, default=0.15, help="same, teacher cohort")
    ap.add_argument(
        "--tumor-contrast",
        type=float,
        default=1.0,
        help="cohort difficulty: 1 = distinct tumour texture, lower = closer to normal tissue",
    )
    ap.add_argument(
        "--teacher-tumor-contrast", type=float, default=None, help="[default: --tumor-contrast]"
    )
    ap.add_argument(
        "--cohort-seed", type=int, default=0, help="offset of both cohorts' seeds (replicates)"
    )
    ap.add_argument("--student-lr-mult", type=float, default=0.3)
    args = ap.parse_args()
    global SIZE, TUMOR_FRAC
    SIZE, TUMOR_FRAC = args.input_size, args.tumor_frac
    torch.set_num_threads(args.threads)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="mcmkd_effect_"))
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    log("cohorts")
    teacher_contrast = args.teacher_tumor_contrast
    if teacher_contrast is None:
        teacher_contrast = args.tumor_contrast
    t_csv, t_root = cohort(
        work,
        "teacher_cohort",
        args.teacher_slides,
        101 + args.cohort_seed,
        args.teacher_tumor_frac,
        teacher_contrast,
    )
    e_csv, e_root = cohort(
        work,
        "eval_cohort",
        args.eval_slides,
        202 + args.cohort_seed,
        TUMOR_FRAC,
        args.tumor_contrast,
    )

    log("teacher: tumour-vs-normal ResNet-18 on the teacher cohort's patches")
    tx, ty, _ = cohort_patches(t_root, t_csv, with_labels=True)
    teacher_ckpt = work / "teacher_resnet18.pt"
    teacher_info = train_teacher(tx, ty, teacher_ckpt, args.teacher_epochs, seed=args.cohort_seed)
    log(f"teacher: {teacher_info}")

    log("MCM-KD fine-tuning of the student on the evaluation cohort (label-free)")
    out = work / "mcmkd" / "mcmkd_resnet18.pt"
    cfg = FinetuneConfig(
        data_h5_dir=str(e_root / "tiles"),
        data_slide_dir=str(e_root / "slides"),
        csv_path=str(e_csv),
        slide_ext=".tif",
        teacher="resnet18",
        teacher_ckpt=str(teacher_ckpt),
        teacher_input_size=SIZE,
        student="resnet18_trunc",
        input_size=SIZE,
        pretrained=False,
        grid=2,
        window_overlap=True,  # a small cohort: every valid window, for more steps
        batch_size=8,
        lr=1e-3,
        student_lr_mult=args.student_lr_mult,
        epochs=args.mcmkd_epochs,
        max_windows=args.max_windows,
        val_frac=0.15,
        predictor_width=128,
        progress=False,
        out=str(out),
    )
    finetune(cfg)
    ft_metrics = json.loads(output_paths(out)["final_metrics"].read_text())
    log(f"MCM-KD: {ft_metrics}")

    log("features: student before / after MCM-KD, teacher")
    teacher_name = (
        "teacher (patch-label-trained ResNet-18)"
        if args.teacher_epochs > 0
        else "teacher (untrained random-init ResNet-18: control)"
    )
    feats = {
        "student (random init, before MCM-KD)": work / "feats_before",
        "student after MCM-KD": work / "feats_after",
        teacher_name: work / "feats_teacher",
    }
    common = dict(
        data_h5_dir=str(e_root / "tiles"),
        data_slide_dir=str(e_root / "slides"),
        csv_path=str(e_csv),
        slide_ext=".tif",
        target_patch_size=SIZE,
        pretrained=False,
        device="cpu",
        batch_size=128,
    )
    names = list(feats)
    extract_features(ExtractConfig(feat_dir=str(feats[names[0]]), model="resnet18_trunc", **common))
    extract_features(
        ExtractConfig(
            feat_dir=str(feats[names[1]]), model="mcmkd_resnet50", ckpt=str(out), **common
        )
    )
    _, _, e_per_slide = cohort_patches(e_root, e_csv, with_labels=False)
    teacher_features(teacher_ckpt, e_per_slide, feats[names[2]])
    e_labels = {
        sid: patch_labels(e_root, sid, coords, 256) for sid, (_, coords) in e_per_slide.items()
    }
    probe = patch_probe(e_per_slide, e_labels, feats)

    log("ABMIL on Monte-Carlo splits")
    split_dir = work / "splits"
    make_splits(
        SplitConfig(
            csv_path=str(e_csv),
            split_dir=str(split_dir),
            k=args.folds,
            val_frac=0.2,
            test_frac=0.3,
            seed=1,
        )
    )
    import pandas as pd

    results = {}
    for name, d in feats.items():
        aucs = []
        for seed in range(1, args.mil_seeds + 1):
            summary = train(
                TrainConfig(
                    data_root_dir=str(d),
                    csv_path=str(e_csv),
                    split_dir=str(split_dir),
                    results_dir=str(work / "results"),
                    exp_code=d.name,
                    model_type="abmil",
                    k=args.folds,
                    max_epochs=args.mil_epochs,
                    seed=seed,
                    device="cpu",
                )
            )
            aucs += pd.read_csv(summary)["test_auc"].tolist()
        results[name] = aucs

    print()
    print(
        f"machine: 2-core CPU dev VM, no GPU; total {time.perf_counter() - t_start:.0f}s; workdir {work}"
    )
    print(
        f"teacher: {teacher_info}; input size {SIZE}px; eval tumour frac {TUMOR_FRAC}; args {vars(args)}"
    )
    print(
        "MCM-KD val masked cosine to teacher: before {val_cosine_before:.4f}, after "
        "{val_cosine_after:.4f}, mean-feature baseline {val_cosine_mean_baseline:.4f}; "
        "{train_windows} windows x {steps} steps".format(**ft_metrics)
    )
    print()
    print(
        f"| features | ABMIL test AUC mean ± std (n={args.folds} folds x {args.mil_seeds} seeds) | patch tumour probe AUC |"
    )
    print("|---|---|---|")
    for name, aucs in results.items():
        print(f"| {name} | {np.mean(aucs):.3f} ± {np.std(aucs):.3f} | {probe[name]:.3f} |")


if __name__ == "__main__":
    main()
