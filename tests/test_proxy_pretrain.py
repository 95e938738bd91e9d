"""Offline baseline and teacher: deterministic, loadable through the encoder registry."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from clam_mcmkd.benchmark.proxy_pretrain import (
    FitConfig,
    pretrain_baseline,
    proxy_images,
    save_random_encoder,
    train_teacher,
)
from clam_mcmkd.encoders import (
    EncoderError,
    create_encoder,
    encode_patches,
    read_student_checkpoint,
)


def test_proxy_images_are_seeded_and_labelled():
    a, la = proxy_images(np.random.default_rng(1), 12, 32)
    b, lb = proxy_images(np.random.default_rng(1), 12, 32)
    assert a.dtype == np.uint8 and a.shape == (12, 32, 32, 3)
    assert np.array_equal(a, b) and np.array_equal(la, lb)
    assert set(la) <= set(range(12)) and len(set(la)) > 4
    assert a.reshape(12, -1).std(axis=1).min() > 5  # no blank images


def test_baseline_is_deterministic_and_loads_through_the_registry(tmp_path):
    cfg = FitConfig(steps=2, batch_size=4, input_size=32, heldout_images=48)
    m1 = pretrain_baseline(tmp_path / "a.pt", cfg)
    pretrain_baseline(tmp_path / "b.pt", cfg)
    sa = read_student_checkpoint(tmp_path / "a.pt")["state_dict"]
    sb = read_student_checkpoint(tmp_path / "b.pt")["state_dict"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    init = create_encoder("resnet18_trunc", pretrained=False, init_seed=0).model.state_dict()
    assert any(not torch.equal(sa[k], init[k]) for k in sa if sa[k].is_floating_point())
    assert 0.0 <= m1["heldout_linear_acc"] <= 1.0
    enc = create_encoder("mcmkd_resnet50", ckpt=tmp_path / "a.pt")
    assert enc.out_dim == 256 and enc.transforms.input_size == 32
    feats = encode_patches(enc, proxy_images(np.random.default_rng(5), 6, 48)[0])
    assert feats.shape == (6, 256) and np.isfinite(feats).all()
    neutral = create_encoder("checkpoint", ckpt=tmp_path / "a.pt")  # the name claims no MCM-KD
    assert neutral.transforms == enc.transforms
    again = encode_patches(neutral, proxy_images(np.random.default_rng(5), 6, 48)[0])
    np.testing.assert_array_equal(again, feats)
    with pytest.raises(EncoderError, match="checkpoint needs an encoder checkpoint file"):
        create_encoder("checkpoint")


def test_teacher_and_random_control_are_larger_encoders(tmp_path):
    rng = np.random.default_rng(0)
    patches = rng.integers(0, 255, (20, 32, 32, 3), dtype=np.uint8)
    classes = np.array([0, 2] * 10)  # class 1 and 3 absent: remapped to 2 outputs
    cfg = FitConfig(arch="resnet50_trunc", steps=1, batch_size=4, input_size=32, augment=True)
    metrics = train_teacher(tmp_path / "t.pt", patches, classes, cfg)
    assert metrics["classes"] == [0, 2] and metrics["n_patches"] == 20
    save_random_encoder(tmp_path / "r.pt", FitConfig(arch="resnet50_trunc", input_size=32))
    for name in ("t.pt", "r.pt"):
        enc = create_encoder("mcmkd_resnet50", ckpt=tmp_path / name)
        assert enc.out_dim == 1024 and enc.transforms.input_size == 32
    teacher = read_student_checkpoint(tmp_path / "t.pt")["state_dict"]
    random = read_student_checkpoint(tmp_path / "r.pt")["state_dict"]
    assert any(not torch.equal(teacher[k], random[k]) for k in teacher)


def test_morphometry_counts_and_measures_drawn_nuclei(tmp_path):
    """Dark hematoxylin discs of known size on pink stroma: count, area, area fraction."""
    import cv2

    from clam_mcmkd.benchmark.proxy_pretrain import MORPHOMETRY, patch_morphometry

    patches = np.empty((4, 64, 64, 3), np.uint8)
    for i, (n, r) in enumerate([(3, 3), (3, 5), (6, 3), (0, 0)]):
        img = np.full((64, 64, 3), (236, 170, 206), np.uint8)
        for k in range(n):
            cv2.circle(img, (10 + 20 * (k % 3), 12 + 24 * (k // 3)), r, (70, 36, 120), -1)
        patches[i] = img
    m = patch_morphometry(patches)
    assert m.shape == (4, len(MORPHOMETRY))
    np.testing.assert_array_equal(m[:, 1], [3, 3, 6, 0])  # nuclei per patch
    area = m[:, 2]
    assert area[1] > 2 * area[0] and abs(area[0] - area[2]) < 3  # size, not number
    assert abs(area[1] - np.pi * 5**2) < 0.3 * np.pi * 5**2
    np.testing.assert_allclose(m[:3, 0], m[:3, 1] * m[:3, 2] / 64**2, rtol=0.05)  # fraction
    # the teacher learns them next to its classes, warm-started from another checkpoint
    cfg = FitConfig(steps=2, batch_size=4, input_size=32, seed=1)
    pretrain_baseline(tmp_path / "start.pt", FitConfig(steps=1, batch_size=4, input_size=32))
    start = read_student_checkpoint(tmp_path / "start.pt")["state_dict"]
    cfg.init_ckpt = str(tmp_path / "start.pt")
    metrics = train_teacher(tmp_path / "t.pt", patches[:, ::2, ::2], np.array([0, 1, 0, 1]), cfg, m)
    assert "morphometry" in metrics["task"] and metrics["init"] == cfg.init_ckpt
    after = read_student_checkpoint(tmp_path / "t.pt")["state_dict"]
    random = create_encoder("resnet18_trunc", pretrained=False, init_seed=1).model.state_dict()
    moved = [
        k for k in start if start[k].is_floating_point() and not torch.equal(start[k], after[k])
    ]
    assert moved  # trained ...
    k = moved[0]  # ... from the checkpoint, not from a fresh init: close to where it started
    assert (after[k] - start[k]).abs().mean() < (after[k] - random[k]).abs().mean()
