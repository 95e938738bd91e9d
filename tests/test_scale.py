"""Cohort scale on small inputs (benchmarks/bench_scale.py's checks, smaller): a reading process
holds a bounded number of slides and teacher-cache files whatever the cohort's size, and an
epoch's step plan is computed once, not once per step."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from clam_mcmkd.distributed import DistInfo
from clam_mcmkd.mcmkd import FinetuneConfig, steps
from clam_mcmkd.mcmkd.teacher_cache import CacheReader, TeacherCache, TeacherSpec
from clam_mcmkd.mcmkd.windows import (
    SlideWindows,
    WindowDataset,
    WindowRef,
    epoch_order,
    find_window_origins,
)
from clam_mcmkd.patch_loader import PatchReader
from clam_mcmkd.synthetic_tiff import halve, write_pyramid

SIDE, PATCH, GRID, DIM = 512, 128, 2, 8
N_SLIDES = 40
MAX_FD_GROWTH = 32  # 40 slides read: one reader and one h5 each would be 120 files


def _write_slides(root: Path, n: int) -> list[Path]:
    rng = np.random.default_rng(3)
    img = np.repeat(np.repeat(rng.integers(0, 255, (SIDE // 8, SIDE // 8, 3), np.uint8), 8, 0),
                    8, 1)  # fmt: skip
    cfg = SimpleNamespace(tile_size=128, jpeg_quality=85, mpp=0.5, write_objective_power=True,
                          min_level_side=256)  # fmt: skip
    tiles = (
        img[y : y + 128, x : x + 128] for y in range(0, SIDE, 128) for x in range(0, SIDE, 128)
    )
    paths = [root / "s000.tif"]
    write_pyramid(paths[0], tiles, halve(img), SIDE, SIDE, cfg)
    for i in range(1, n):
        paths.append(root / f"s{i:03d}.tif")
        shutil.copyfile(paths[0], paths[-1])
    return paths


@pytest.fixture(scope="module")
def spread_cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("scale")
    xs = np.arange(0, SIDE, PATCH)
    coords = np.stack(np.meshgrid(xs, xs, indexing="xy"), -1).reshape(-1, 2)
    origins = find_window_origins(coords, PATCH, GRID)
    slides = [SlideWindows(p.stem, str(p), origins, PATCH, PATCH, 0)
              for p in _write_slides(root, N_SLIDES)]  # fmt: skip
    spec = TeacherSpec("t", "none", 224, None, False, "bilinear", (0.5,) * 3, (0.5,) * 3, "",
                       DIM, "fp32")  # fmt: skip
    cache = TeacherCache(root / "cache", spec)
    feats = np.random.default_rng(4).standard_normal((len(coords), DIM)).astype(np.float32)
    for k, sw in enumerate(slides):
        cache.merge(sw, coords, feats + k)  # slide k's features: feats + k
    return slides, cache, feats


def _open_files() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_window_reading_holds_bounded_files_over_many_slides(spread_cohort):
    """Two windows of each of 40 slides, shuffled: the process's open files stay bounded, and
    slides closed and reopened read the same pixels and teacher features."""
    slides, cache, feats = spread_cohort
    refs = [WindowRef(s, w) for s in range(len(slides)) for w in (0, 3)]
    order = np.random.default_rng(0).permutation(len(refs))
    refs = [refs[i] for i in order] * 2  # every slide visited again after it was closed
    dataset = WindowDataset(slides, refs, GRID, teacher=CacheReader(cache, slides, range(N_SLIDES)))
    base = _open_files()
    growth = 0
    try:
        for k, ref in enumerate(refs):
            item = dataset[k]
            growth = max(growth, _open_files() - base)
            x, y = slides[ref.slide].origins[ref.window]
            with PatchReader(slides[ref.slide].slide_path, 0, PATCH) as fresh:
                np.testing.assert_array_equal(item["patches"].numpy(),
                                              fresh.read_window(int(x), int(y), GRID))  # fmt: skip
            rows = [int(cy) // PATCH * (SIDE // PATCH) + int(cx) // PATCH
                    for cx, cy in item["coords"].numpy()]  # fmt: skip
            np.testing.assert_allclose(item["teacher"].numpy(), feats[rows] + ref.slide)
    finally:
        dataset.close()
    assert growth <= MAX_FD_GROWTH, f"{growth} files opened for {N_SLIDES} slides"
    assert _open_files() <= base


def test_extraction_and_windows_share_one_bounded_policy(spread_cohort):
    """Readers are opened on demand and the least recently used one is closed first."""
    slides, _, _ = spread_cohort
    dataset = WindowDataset(slides, [WindowRef(s, 0) for s in range(N_SLIDES)], GRID)
    for k in range(N_SLIDES):
        dataset[k]
    readers = dataset.readers
    assert readers.opened == N_SLIDES and readers.peak == len(readers) == readers.max_open
    dataset[N_SLIDES - 1]  # the most recent slide is still open
    assert readers.opened == N_SLIDES
    dataset[0]  # the first one was closed long ago: opened again
    assert readers.opened == N_SLIDES + 1
    dataset.close()
    assert len(readers) == 0


def test_an_epoch_is_shuffled_once_not_once_per_step(monkeypatch):
    """Walking every step of two epochs computes two epoch orders (it was one per step: 57 ms
    a step at 1M windows), and the plan is the seeded order, cut in batches and ranks."""
    calls = []

    def counted(n, seed, epoch):
        calls.append(epoch)
        return epoch_order(n, seed, epoch)

    monkeypatch.setattr(steps, "epoch_order", counted)
    cfg = FinetuneConfig("", "", "", "t", batch_size=8, grad_accum=2, epochs=2, seed=5)
    n = 1003
    batches = steps.Batches(n, cfg, DistInfo(1, 2, 1, 2))
    seen = {0: [], 1: []}
    for step in range(batches.total_steps):
        epoch, n_step, micro = batches.micro_batches(step)
        seen[epoch].extend(int(i) for m in micro for i in m)
    assert calls == [0, 1]
    for epoch in (0, 1):
        order = epoch_order(n, 5, epoch)
        chunks = [np.array_split(order[s : s + 8], 2) for s in range(0, n, 8)]
        want = [int(i) for chunk in chunks for m in chunk for i in m[1::2]]
        assert seen[epoch] == want


def test_a_window_read_for_training_holds_its_visible_patches_only(spread_cohort):
    """With masks, an item (k, epoch) is the visible patches of window k, row-major: equal to
    the whole window's with the masked ones left out; the mask is that epoch's."""
    from functools import partial

    from clam_mcmkd.mcmkd.objectives import input_masks

    slides, _, _ = spread_cohort
    cfg = FinetuneConfig("", "", "", "t", grid=GRID, mask_ratio=0.5, seed=3)
    refs = [WindowRef(s, w) for s in range(3) for w in range(len(slides[s]))]
    dataset = WindowDataset(slides, refs, GRID, masks=partial(input_masks, cfg))
    for k in range(len(refs)):
        whole = dataset[k]["patches"].numpy()
        for epoch in (0, 1):
            mask = input_masks(cfg, np.asarray([k]), epoch)[0]
            visible = dataset[(k, epoch)]["patches"].numpy()
            assert len(visible) == (~mask).sum() == 2
            np.testing.assert_array_equal(visible, whole[~mask])
    dataset.close()
