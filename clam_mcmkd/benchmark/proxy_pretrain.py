"""Offline stand-ins for ImageNet and for a pathology foundation model, trained on this machine.

No weights can be downloaded here, and a random-init encoder is no baseline: it gives every
patch nearly the same feature (cosine to the mean 0.96-0.998). So the MCM-KD experiment trains
its two reference encoders itself, in a few CPU minutes, deterministically:

- :func:`pretrain_baseline` - plays ImageNet's role: a ``resnet18_trunc`` trained to classify
  procedural non-histology images (shapes x background patterns, colours at random). It knows
  edges, blobs, colours and textures in general, nothing about this tissue.
- :func:`train_teacher` - plays the foundation model's role: a larger ``resnet50_trunc``
  (CLAM's architecture, 1024-d) trained to tell the four tissue classes apart on patches of a
  SEPARATE cohort whose slides carry no atypia (``kind="fields"``, ``tumor_contrast=0``).
  It is not an oracle: it never sees the slide label, its proxy (atypia), or an atypical
  region; its targets are independent of the label by construction. It knows something useful
  because the classes differ in nuclear size, density, shape and darkness - the same
  properties atypia shifts - and it learns them under stain jitter.
- :func:`save_random_encoder` - the same architecture untrained (the random-teacher control).

All three are written with :func:`encoders.save_student_checkpoint`, so they load through the
encoder registry (``checkpoint`` with ``--ckpt``) at their own input size.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

N_SHAPES, N_PATTERNS = 6, 2


# --------------------------------------------------------------------------- the proxy images


def _shape(img, kind: int, rng, size: int) -> None:
    import cv2

    s = size
    colour = tuple(int(c) for c in rng.integers(0, 256, 3))
    cx, cy = (int(v) for v in rng.uniform(0.3 * s, 0.7 * s, 2))
    r = int(rng.uniform(0.15, 0.3) * s)
    angle = rng.uniform(0, 2 * np.pi)
    if kind == 0:
        cv2.circle(img, (cx, cy), r, colour, -1, cv2.LINE_AA)
    elif kind == 1:
        cv2.circle(img, (cx, cy), r, colour, max(s // 16, 2), cv2.LINE_AA)  # ring
    elif kind in (2, 3, 5):  # triangle, square, star: polygons
        corners = {2: 3, 3: 4, 5: 10}[kind]
        t = angle + np.arange(corners) * 2 * np.pi / corners
        radius = np.where(np.arange(corners) % 2, 0.45 * r, r) if kind == 5 else np.full(corners, r)
        pts = np.stack([cx + radius * np.cos(t), cy + radius * np.sin(t)], 1).astype(np.int32)
        cv2.fillPoly(img, [pts], colour, cv2.LINE_AA)
    else:  # cross
        for a in (angle, angle + np.pi / 2):
            dx, dy = int(r * np.cos(a)), int(r * np.sin(a))
            cv2.line(img, (cx - dx, cy - dy), (cx + dx, cy + dy), colour, max(s // 12, 2))


def proxy_images(rng: np.random.Generator, n: int, size: int = 64):
    """`n` uint8 (size, size, 3) images and labels in [0, 12): shape x background pattern."""
    import cv2

    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    images = np.empty((n, size, size, 3), np.uint8)
    labels = rng.integers(0, N_SHAPES * N_PATTERNS, n)
    for i, label in enumerate(labels):
        shape, pattern = divmod(int(label), N_PATTERNS)
        base = rng.uniform(0, 255, 3).astype(np.float32)
        if pattern == 0:  # stripes of a random frequency and orientation
            a, f = rng.uniform(0, np.pi), rng.uniform(2, 8)
            wave = np.sin(2 * np.pi * f * (xx * np.cos(a) + yy * np.sin(a)))
        else:  # smooth blotches
            wave = cv2.GaussianBlur(rng.normal(0, 1, (size, size)).astype(np.float32), (0, 0), 3)
            wave /= wave.std() + 1e-6
        amp = rng.uniform(15, 50, 3).astype(np.float32)
        img = np.clip(base + wave[..., None] * amp, 0, 255).astype(np.uint8)
        _shape(img, shape, rng, size)
        images[i] = img
    return images, labels


# --------------------------------------------------------------------------- training


@dataclass
class FitConfig:
    arch: str = "resnet18_trunc"
    input_size: int = 64
    steps: int = 400
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 0.05
    seed: int = 0
    augment: bool = False  # rot90 / flips / per-image colour scaling (histology patches)
    heldout_images: int = 512  # baseline: fresh proxy images for the held-out linear probe
    init_ckpt: str | None = None  # start from this encoder checkpoint (longer training)


def _augment(x, g):
    """uint8-range float batch (B, 3, S, S): random rot90, flip, per-image channel scaling."""
    import torch

    k = int(torch.randint(4, (1,), generator=g))
    x = torch.rot90(x, k, dims=(2, 3))
    if torch.rand(1, generator=g).item() < 0.5:
        x = x.flip(3)
    scale = 1 + 0.12 * (torch.rand(x.shape[0], 3, 1, 1, generator=g) - 0.5) * 2
    return (x * scale).clamp(0, 255)


def fit_encoder(cfg: FitConfig, sample_batch, n_classes: int, n_regress: int = 0):
    """Train an encoder + linear head on ``sample_batch(rng, n) -> (uint8 NHWC, labels)``, or
    ``-> (images, labels, targets)`` with `n_regress` standardised regression targets per
    image (cross-entropy + mean squared error, one linear head for both).

    Deterministic given `cfg.seed` (seeded init, data and augmentation; CPU). Returns the
    encoder (eval mode), its transforms and the last 50 steps' training accuracy.
    """
    import torch

    from ..encoders import STUDENT_ARCHS, PatchTransforms, TimmCNNEncoder, read_student_checkpoint

    torch.manual_seed(cfg.seed)
    model = TimmCNNEncoder(STUDENT_ARCHS[cfg.arch], pretrained=False)
    if cfg.init_ckpt:
        model.load_state_dict(read_student_checkpoint(cfg.init_ckpt)["state_dict"])
    head = torch.nn.Linear(model.out_dim, n_classes + n_regress)
    transforms = PatchTransforms(cfg.input_size)
    params = list(model.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.steps)
    rng, g = np.random.default_rng(cfg.seed), torch.Generator().manual_seed(cfg.seed)
    model.train()
    correct = []
    for _ in range(cfg.steps):
        images, labels, *targets = sample_batch(rng, cfg.batch_size)
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
        if cfg.augment:
            x = _augment(x, g)
        y = torch.as_tensor(labels, dtype=torch.long)
        out = head(model(transforms.batch(x)))
        logits = out[:, :n_classes]
        loss = torch.nn.functional.cross_entropy(logits, y)
        if n_regress:
            t = torch.as_tensor(targets[0], dtype=torch.float32)
            loss = loss + torch.nn.functional.mse_loss(out[:, n_classes:], t)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        correct.append((logits.argmax(1) == y).float().mean().item())
    model.eval()
    return model, transforms, float(np.mean(correct[-50:]))


def _save(out, model, cfg: FitConfig, metrics: dict) -> Path:
    from ..encoders import save_student_checkpoint

    return save_student_checkpoint(
        out, model, arch=cfg.arch, transforms=_transforms(cfg), config=cfg, metrics=metrics
    )


def _transforms(cfg: FitConfig):
    from ..encoders import PatchTransforms

    return PatchTransforms(cfg.input_size)


def pretrain_baseline(out: str | os.PathLike, cfg: FitConfig | None = None) -> dict:
    """The offline "ImageNet" baseline: `cfg.arch` trained on :func:`proxy_images`."""
    cfg = cfg or FitConfig()
    model, _, train_acc = fit_encoder(
        cfg, lambda rng, n: proxy_images(rng, n, cfg.input_size), N_SHAPES * N_PATTERNS
    )
    held_out = _accuracy_on_fresh_images(model, cfg, cfg.heldout_images)
    metrics = {"task": "proxy shapes x patterns (12 classes)", "train_acc": train_acc,
               "heldout_linear_acc": held_out}  # fmt: skip
    _save(out, model, cfg, metrics)
    return metrics


def _accuracy_on_fresh_images(model, cfg: FitConfig, n: int = 512) -> float:
    """Linear probe on new proxy images: did the features learn the task (not memorise)?"""
    from sklearn.linear_model import LogisticRegression

    from ..encoders import Encoder, encode_patches

    images, labels = proxy_images(np.random.default_rng(cfg.seed + 10_000), n, cfg.input_size)
    enc = Encoder(model, _transforms(cfg), model.out_dim)
    feats = encode_patches(enc, images, batch_size=128)
    half = n // 2
    clf = LogisticRegression(max_iter=2000).fit(feats[:half], labels[:half])
    return float(clf.score(feats[half:], labels[half:]))


def train_teacher(
    out: str | os.PathLike, patches: np.ndarray, classes: np.ndarray, cfg: FitConfig | None = None,
    morphometry: np.ndarray | None = None,
) -> dict:  # fmt: skip
    """The offline "foundation model": tissue-class classification on another cohort's patches,
    and, with `morphometry` (N, k), regression of what :func:`patch_morphometry` measures.

    `patches` uint8 (N, S, S, 3), `classes` (N,) tissue-class index per patch (never the slide
    label or the atypia). Class-balanced sampling with rot90/flip/colour augmentation (the
    measurements do not change under rotations or flips; colour scaling changes them a little).
    """
    cfg = cfg or FitConfig(arch="resnet50_trunc", steps=300, augment=True, lr=1e-3)
    classes = np.asarray(classes)
    present = np.unique(classes)
    by_class = [np.flatnonzero(classes == c) for c in present]
    remap = {int(c): i for i, c in enumerate(present)}
    z = None
    if morphometry is not None:
        m = np.asarray(morphometry, dtype=np.float64)
        z = ((m - m.mean(0)) / (m.std(0) + 1e-9)).astype(np.float32)

    def sample(rng, n):
        pick = rng.integers(len(by_class), size=n)
        idx = np.array([by_class[c][rng.integers(len(by_class[c]))] for c in pick])
        labels = np.array([remap[int(classes[i])] for i in idx])
        return (patches[idx], labels) if z is None else (patches[idx], labels, z[idx])

    n_regress = 0 if z is None else z.shape[1]
    model, _, train_acc = fit_encoder(cfg, sample, len(present), n_regress)
    task = "tissue class of patches (no label, no atypia)"
    if n_regress:
        task += " + nuclear morphometry regression (" + ", ".join(MORPHOMETRY) + ")"
    metrics = {"task": task, "train_acc": train_acc, "n_patches": int(len(classes)),
               "classes": [int(c) for c in present], "init": cfg.init_ckpt}  # fmt: skip
    _save(out, model, cfg, metrics)
    return metrics


MORPHOMETRY = ("nuclear_fraction", "nuclei_per_patch", "mean_nuclear_area", "mean_nuclear_h")


def patch_morphometry(patches: np.ndarray, threshold: float | None = None) -> np.ndarray:
    """What a pathologist counts, measured from pixels: per patch, the hematoxylin-positive
    area fraction, the number of nuclei (connected components of >= 4 px), their mean area and
    their mean hematoxylin optical density (colour deconvolution, scikit-image's ``rgb2hed``).
    `threshold`: hematoxylin OD of a nucleus pixel (default: Otsu over all given pixels).
    Label-free: the same measurement on every patch, whatever slide it comes from."""
    from skimage.color import rgb2hed
    from skimage.filters import threshold_otsu
    from skimage.measure import label

    h = rgb2hed(np.asarray(patches))[..., 0]  # (N, S, S) hematoxylin OD
    thr = float(threshold_otsu(h[:, ::2, ::2])) if threshold is None else threshold
    out = np.zeros((len(h), len(MORPHOMETRY)), np.float64)
    for i, hi in enumerate(h):
        nuclei = hi > thr
        lab = label(nuclei, connectivity=1)
        areas = np.bincount(lab.ravel())[1:]
        areas = areas[areas >= 4]
        out[i] = (
            nuclei.mean(), len(areas), areas.mean() if len(areas) else 0.0,
            hi[nuclei].mean() if nuclei.any() else thr,
        )  # fmt: skip
    return out


def save_random_encoder(out: str | os.PathLike, cfg: FitConfig | None = None) -> dict:
    """`cfg.arch` at its seeded random init, in the same checkpoint format (a control)."""
    import torch

    from ..encoders import STUDENT_ARCHS, TimmCNNEncoder

    cfg = cfg or FitConfig(arch="resnet50_trunc", steps=0)
    torch.manual_seed(cfg.seed)
    model = TimmCNNEncoder(STUDENT_ARCHS[cfg.arch], pretrained=False).eval()
    metrics = {"task": "none (random init)"}
    _save(out, model, cfg, metrics)
    return metrics


def tissue_class_patches(cohort_dir: str | os.PathLike, patches_dir: str | os.PathLike):
    """The teacher's training data from a ``kind="fields"`` cohort: every tiled patch (uint8
    (N, P, P, 3)) and its tissue class (the generator's map under it; never the slide label)."""
    from ..clam.formats import read_coords_h5, read_dataset_csv
    from .instruments import patch_truth_per_slide, slide_patches

    ids = read_dataset_csv(Path(cohort_dir) / "dataset.csv")["slide_id"]
    per_slide = slide_patches(Path(cohort_dir) / "slides", patches_dir, ids)
    if not per_slide:
        raise ValueError(f"{patches_dir}: no tiled slide of {cohort_dir}")
    first = read_coords_h5(Path(patches_dir) / f"{next(iter(per_slide))}.h5")
    level0 = int(round(first.patch_size * first.downsample[0]))
    truth = patch_truth_per_slide(cohort_dir, per_slide, level0)
    images = np.concatenate([p for p, _ in per_slide.values()])
    return images, np.concatenate([truth[s][0] for s in per_slide])
