"""MCM-KD fine-tuning: windows, masks, learning, teacher cache, exact resume, DDP, errors.

Tiny real models (ResNet-18 student and teacher, random seeded init, 64 px) on the real CMU
slide and on the synthetic cohort; no mocks.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from clam_mcmkd.clam.formats import read_coords_h5, write_coords_h5, write_dataset_csv
from clam_mcmkd.encoders import EncoderError, create_encoder, read_student_checkpoint
from clam_mcmkd.mcmkd import FinetuneConfig, finetune, output_paths, plan_windows, trainer
from clam_mcmkd.mcmkd.masking import make_mask, num_masked, window_masks
from clam_mcmkd.mcmkd.teacher_cache import (
    TeacherCache,
    TeacherCacheError,
    file_sha256,
    teacher_spec,
)
from clam_mcmkd.mcmkd.windows import (
    NoWindowsError,
    WindowDataset,
    WindowRef,
    find_window_origins,
    read_window,
    slide_windows,
)
from clam_mcmkd.slides import open_slide
from clam_mcmkd.utils import ClamMcmkdError

REPO = Path(__file__).resolve().parents[1]
TINY = dict(
    teacher="resnet18",
    teacher_input_size=64,
    student="resnet18_trunc",
    input_size=64,
    pretrained=False,
    grid=2,
    batch_size=8,
    predictor_width=64,
    predictor_depth=2,
    predictor_heads=4,
    progress=False,
)


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)


@contextlib.contextmanager
def count_teacher_builds():
    """Counts the teacher networks the trainer builds (a list that grows with each build)."""
    builds = []
    real = trainer.build_teacher

    def counting(*args, **kwargs):
        builds.append(args[0] if args else kwargs.get("name"))
        return real(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(trainer, "build_teacher", counting)
        yield builds


# ----------------------------------------------------------------------------- data


@pytest.fixture(scope="module")
def cmu_coords(cmu_slide, tmp_path_factory) -> Path:
    """CLAM coords for the CMU slide: a regular 64 px grid over its tissue (darker than 215)."""
    root = tmp_path_factory.mktemp("cmu_coords")
    patch = 64
    with open_slide(cmu_slide) as slide:
        w, h = slide.dimensions
        img = slide.read_region((0, 0), 0, (w, h))
    coords = [
        (x, y)
        for y in range(0, h - patch + 1, patch)
        for x in range(0, w - patch + 1, patch)
        if img[y : y + patch, x : x + patch].mean() < 215
    ]
    sid = cmu_slide.stem
    write_coords_h5(
        root / "patches" / f"{sid}.h5",
        np.asarray(coords),
        patch_size=patch,
        patch_level=0,
        downsample=(1.0, 1.0),
        downsampled_level_dim=(w, h),
        level_dim=(w, h),
        name=sid,
    )
    write_dataset_csv(root / "data.csv", [{"case_id": "c0", "slide_id": sid, "label": "tumor"}])
    return root


def cmu_cfg(cmu_coords: Path, cmu_slide: Path, out: Path, **kw) -> FinetuneConfig:
    base = dict(
        TINY,
        data_h5_dir=str(cmu_coords),
        data_slide_dir=str(cmu_slide.parent),
        csv_path=str(cmu_coords / "data.csv"),
        slide_ext=".svs",
        out=str(out),
        teacher_cache=str(cmu_coords / "teacher_cache"),
    )
    base.update(kw)
    return FinetuneConfig(**base)


def cohort_cfg(small_cohort: Path, tiled: Path, out: Path, **kw) -> FinetuneConfig:
    base = dict(
        TINY,
        data_h5_dir=str(tiled),
        data_slide_dir=str(small_cohort / "slides"),
        csv_path=str(small_cohort / "dataset.csv"),
        slide_ext=".tif",
        out=str(out),
        teacher_cache=str(out.parent.parent / "cohort_teacher_cache"),
        max_windows=16,
        batch_size=4,
        val_frac=0.2,
        max_val_windows=8,
        lr=2e-3,
    )
    base.update(kw)
    return FinetuneConfig(**base)


# ----------------------------------------------------------------------------- windows, masks


def test_windows_found_on_any_grid_offset_without_overlap():
    step = 10
    # a 3x2 block at offset (0, 0) and a 2x2 block on another grid offset (CLAM tiles each
    # contour from its own corner), plus a lone patch
    block_a = [(x * step, y * step) for y in range(2) for x in range(3)]
    block_b = [(103 + x * step, 57 + y * step) for y in range(2) for x in range(2)]
    coords = np.asarray(block_a + block_b + [(500, 500)])
    origins = find_window_origins(coords, step, grid=2)
    assert sorted(map(tuple, origins)) == [(0, 0), (103, 57)]  # (10, 0) would overlap (0, 0)
    overlapping = find_window_origins(coords, step, grid=2, overlap=True)
    assert sorted(map(tuple, overlapping)) == [(0, 0), (10, 0), (103, 57)]
    assert len(find_window_origins(coords, step, grid=3)) == 0


def test_one_read_region_cut_equals_per_patch_reads(cmu_coords, cmu_slide):
    coords = read_coords_h5(cmu_coords / "patches" / f"{cmu_slide.stem}.h5")
    sw = slide_windows(cmu_slide.stem, cmu_slide, coords, grid=3, overlap=False)
    assert len(sw) > 5
    present = {tuple(c) for c in coords.coords}
    with open_slide(cmu_slide) as slide:
        patches = read_window(slide, sw, 3, 3)
        assert patches.shape == (9, 64, 64, 3) and patches.dtype == np.uint8
        for p, (x, y) in enumerate(sw.patch_coords(3, 3)):
            assert (int(x), int(y)) in present  # every window patch is a tissue patch
            single = slide.read_region((int(x), int(y)), 0, (64, 64))
            np.testing.assert_array_equal(patches[p], single)
    # what training reads: the same window through the slide's JPEG tiles
    item = WindowDataset([sw], [WindowRef(0, 3)], grid=3)[0]
    np.testing.assert_array_equal(item["patches"].numpy(), patches)


@pytest.mark.parametrize("strategy", ["random", "block"])
def test_masks_count_contiguity_and_determinism(strategy):
    for grid, ratio in [(2, 0.5), (3, 0.5), (4, 0.5), (4, 0.05), (4, 0.99)]:
        k = num_masked(grid, ratio)
        assert 1 <= k <= grid * grid - 1
        masks = window_masks(np.arange(50), grid, ratio, strategy, seed=3, epoch=0)
        assert (masks.sum(1) == k).all()
        again = window_masks(np.arange(50), grid, ratio, strategy, seed=3, epoch=0)
        np.testing.assert_array_equal(masks, again)
        other_epoch = window_masks(np.arange(50), grid, ratio, strategy, seed=3, epoch=1)
        assert (masks != other_epoch).any()
    if strategy == "block":  # masked cells form one 4-connected region
        from scipy import ndimage

        for i in range(30):
            m = make_mask(4, 0.5, "block", np.random.default_rng(i)).reshape(4, 4)
            assert ndimage.label(m)[1] == 1


# ----------------------------------------------------------------------------- learning


@pytest.fixture(scope="module")
def cmu_run(cmu_coords, cmu_slide, tmp_path_factory):
    out = tmp_path_factory.mktemp("cmu_run") / "mcmkd_resnet50.pt"
    cfg = cmu_cfg(cmu_coords, cmu_slide, out, epochs=3, lr=1e-3, val_frac=0.2)
    with count_teacher_builds() as builds:
        path = finetune(cfg)
    metrics = json.loads(output_paths(out)["final_metrics"].read_text())
    return cfg, path, metrics, len(builds)


def test_loss_goes_down_and_beats_untrained_and_mean_baseline(cmu_run):
    cfg, path, metrics, _ = cmu_run
    import pandas as pd

    hist = pd.read_csv(output_paths(cfg.out)["metrics"])
    assert list(hist.columns) == ["step", "epoch", "loss", "lr", "lr_student", "windows_per_s"]
    assert len(hist) == metrics["steps"] > 20
    assert hist["loss"].iloc[-8:].mean() < hist["loss"].iloc[:8].mean()
    # the student's lr is the predictor's x student_lr_mult; warm-up then cosine decay
    np.testing.assert_allclose(hist["lr_student"], hist["lr"] * cfg.student_lr_mult, rtol=1e-6)
    assert hist["lr"].iloc[-1] < hist["lr"].max()
    assert metrics["val_windows"] > 5
    assert metrics["val_cosine_after"] > metrics["val_cosine_before"]
    assert metrics["val_cosine_after"] > metrics["val_cosine_mean_baseline"]


def test_outputs_and_checkpoint_loads_as_mcmkd_resnet50(cmu_run, cmu_slide):
    cfg, path, metrics, _ = cmu_run
    paths = output_paths(cfg.out)
    assert path == paths["checkpoint"]
    for key in ("metrics", "plot", "config", "summary", "final_metrics"):
        assert paths[key].is_file(), key
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(paths["config"].read_text())["teacher"] == "resnet18"
    payload = read_student_checkpoint(path)
    assert payload["arch"] == "resnet18_trunc" and payload["input_size"] == 64
    assert payload["metrics"]["val_cosine_after"] == metrics["val_cosine_after"]
    assert "predictor" not in json.dumps(list(payload["state_dict"]))  # student weights only

    tuned = create_encoder("mcmkd_resnet50", ckpt=path)
    base = create_encoder("resnet18_trunc", pretrained=False, target_img_size=64)
    assert tuned.out_dim == 256 and tuned.transforms.input_size == 64
    with open_slide(cmu_slide) as slide:
        img = torch.from_numpy(np.array(slide.read_region((1000, 1500), 0, (64, 64))))[None]
    with torch.no_grad():
        f_tuned = tuned.model(tuned.transforms.batch(img))
        f_base = base.model(base.transforms.batch(img))
    assert f_tuned.shape == (1, 256)
    assert not torch.allclose(f_tuned, f_base)  # fine-tuning changed the encoder
    # BatchNorm statistics were frozen: running stats equal the untrained student's
    sd_t, sd_b = tuned.model.state_dict(), base.model.state_dict()
    bn_keys = [k for k in sd_b if k.endswith("running_mean")]
    assert bn_keys and all(torch.equal(sd_t[k], sd_b[k]) for k in bn_keys)


def test_teacher_cache_written_once_and_reused(cmu_run, cmu_coords, cmu_slide, tmp_path):
    cfg, _, metrics, builds = cmu_run
    assert builds == 1 and metrics["teacher_patches_computed"] > 0
    cache_file = Path(cfg.teacher_cache) / f"{cmu_slide.stem}.h5"
    with h5py.File(cache_file) as f:
        n_cached = len(f["coords"])
        assert f["features"].shape == (n_cached, 512)
        assert json.loads(f.attrs["teacher"])["name"] == "resnet18"
    mtime = cache_file.stat().st_mtime_ns
    again = replace(cfg, out=str(tmp_path / "again.pt"), stop_after_steps=1)
    with count_teacher_builds() as builds:
        finetune(again)
    assert builds == []  # the teacher was never built
    assert cache_file.stat().st_mtime_ns == mtime


def test_mismatched_or_stale_teacher_cache_is_an_error(cmu_run, tmp_path):
    cfg, _, _, _ = cmu_run
    with pytest.raises(TeacherCacheError, match="teacher cache was made by"):
        finetune(replace(cfg, out=str(tmp_path / "x.pt"), teacher_input_size=48))
    with pytest.raises(TeacherCacheError, match="teacher cache was made by"):
        finetune(replace(cfg, out=str(tmp_path / "x.pt"), teacher="resnet34"))
    # a cache made for another patch geometry (the coords were re-tiled since)
    stale = tmp_path / "stale_cache"
    stale.mkdir()
    for f in Path(cfg.teacher_cache).glob("*.h5"):
        (stale / f.name).write_bytes(f.read_bytes())
        with h5py.File(stale / f.name, "a") as h:
            h.attrs["patch_size"] = 128
    with pytest.raises(TeacherCacheError, match="stale teacher cache"):
        finetune(replace(cfg, out=str(tmp_path / "x.pt"), teacher_cache=str(stale)))


def test_teacher_cache_filled_by_array_jobs(cohort_reference, tmp_path):
    """finetune --teacher-cache-only --shard I/N: two array jobs fill disjoint halves of the
    cache (by window count), each writes its own summary, and the training run that follows
    never builds the teacher; the features equal a cache filled in one go."""
    from click.testing import CliRunner

    from clam_mcmkd.cli import main

    cfg = cohort_reference
    cache = tmp_path / "cache"
    args = [
        "finetune", "--data-h5-dir", cfg.data_h5_dir, "--data-slide-dir", cfg.data_slide_dir,
        "--csv-path", cfg.csv_path, "--slide-ext", ".tif", "--teacher", "resnet18",
        "--teacher-input-size", "64", "--student", "resnet18_trunc", "--input-size", "64",
        "--no-pretrained", "--grid", "2", "--batch-size", "4", "--predictor-width", "64",
        "--max-windows", "16", "--val-frac", "0.2", "--max-val-windows", "8",
        "--teacher-cache", str(cache), "--out", str(tmp_path / "ft.pt"), "--device", "cpu",
    ]  # fmt: skip
    result = CliRunner().invoke(main, [*args, "--shard", "0/2"])
    assert result.exit_code != 0 and "--shard needs --teacher-cache-only" in result.output
    files = []
    for shard in ("0/2", "1/2"):
        with count_teacher_builds() as builds:
            result = CliRunner().invoke(main, [*args, "--teacher-cache-only", "--shard", shard])
        assert result.exit_code == 0, result.output
        assert builds == ["resnet18"] and "patches computed" in result.output
        i = shard[0]
        summary = json.loads((cache / f"teacher_cache_summary.shard-{i}-of-2.json").read_text())
        files.append({f"{s}.h5" for s in summary["done"]})
        assert summary["extra"]["patches_computed"] > 0
    assert files[0] and files[1] and not files[0] & files[1]
    assert {p.name for p in cache.glob("*.h5")} == files[0] | files[1]
    assert not Path(tmp_path / "ft.pt").exists()  # nothing was trained
    mtimes = {p: p.stat().st_mtime_ns for p in cache.glob("*.h5")}
    with count_teacher_builds() as builds:
        result = CliRunner().invoke(main, args)
    assert result.exit_code == 0 and builds == [], result.output
    assert {p: p.stat().st_mtime_ns for p in cache.glob("*.h5")} == mtimes
    ref = Path(cfg.teacher_cache)  # filled by one process for the same windows
    for path in cache.glob("*.h5"):
        with h5py.File(path) as ours, h5py.File(ref / path.name) as theirs:
            rows = {tuple(c): i for i, c in enumerate(theirs["coords"][:])}
            idx = [rows[tuple(c)] for c in ours["coords"][:]]
            np.testing.assert_allclose(
                ours["features"][:], theirs["features"][:][idx], rtol=1e-4, atol=1e-5
            )


# ----------------------------------------------------------------------------- resume, DDP


@pytest.fixture(scope="module")
def cohort_reference(small_cohort, small_cohort_tiled, tmp_path_factory):
    """An uninterrupted run on the synthetic cohort (2 epochs of 4 steps)."""
    out = tmp_path_factory.mktemp("cohort_ref") / "ref.pt"
    cfg = cohort_cfg(small_cohort, small_cohort_tiled, out, epochs=2)
    finetune(cfg)
    return cfg


def _student_state(path) -> dict:
    return read_student_checkpoint(path)["state_dict"]


def test_validation_windows_come_from_held_out_slides(cohort_reference):
    plan = plan_windows(cohort_reference)
    train_slides = {r.slide for r in plan.train}
    val_slides = {r.slide for r in plan.val}
    assert train_slides and val_slides and not train_slides & val_slides
    metrics = json.loads(output_paths(cohort_reference.out)["final_metrics"].read_text())
    assert metrics["val_windows"] == len(plan.val) > 0
    assert metrics["train_windows"] == 16 and metrics["steps"] == 8


def test_killed_run_resumes_to_identical_weights(cohort_reference, tmp_path):
    from click.testing import CliRunner

    from clam_mcmkd.cli import main

    cfg = replace(cohort_reference, out=str(tmp_path / "resumed.pt"))
    state = finetune(replace(cfg, stop_after_steps=3, save_every=2))
    assert state == output_paths(cfg.out)["state"] and not Path(cfg.out).exists()
    args = [
        "finetune", "--data-h5-dir", cfg.data_h5_dir, "--data-slide-dir", cfg.data_slide_dir,
        "--csv-path", cfg.csv_path, "--slide-ext", ".tif", "--teacher", "resnet18",
        "--teacher-input-size", "64", "--student", "resnet18_trunc", "--input-size", "64",
        "--no-pretrained", "--grid", "2", "--batch-size", "4", "--predictor-width", "64",
        "--max-windows", "16", "--val-frac", "0.2", "--max-val-windows", "8", "--lr", "2e-3",
        "--epochs", "2", "--teacher-cache", cfg.teacher_cache, "--out", cfg.out, "--resume",
    ]  # fmt: skip
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    ref, resumed = _student_state(cohort_reference.out), _student_state(cfg.out)
    assert ref.keys() == resumed.keys()
    for k in ref:
        assert torch.equal(ref[k], resumed[k]), k
    # a resume with different options is refused rather than silently mixing runs
    finetune(replace(cfg, out=str(tmp_path / "other.pt"), stop_after_steps=1))
    with pytest.raises(Exception, match="cannot --resume"):
        finetune(replace(cfg, out=str(tmp_path / "other.pt"), lr=1e-3, resume=True))


def test_ddp_two_ranks_match_one_process(cohort_reference, tmp_path):
    cfg = cohort_reference
    out = tmp_path / "ddp.pt"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_port", str(29500 + os.getpid() % 1000), "-m", "clam_mcmkd.cli", "finetune",
        "--data-h5-dir", cfg.data_h5_dir, "--data-slide-dir", cfg.data_slide_dir,
        "--csv-path", cfg.csv_path, "--slide-ext", ".tif", "--teacher", "resnet18",
        "--teacher-input-size", "64", "--student", "resnet18_trunc", "--input-size", "64",
        "--no-pretrained", "--grid", "2", "--batch-size", "4", "--predictor-width", "64",
        "--max-windows", "16", "--val-frac", "0.2", "--max-val-windows", "8", "--lr", "2e-3",
        "--epochs", "2", "--teacher-cache", cfg.teacher_cache, "--out", str(out),
        "--device", "cpu",
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", CLAM_MCMKD_NO_PROGRESS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref, ddp = _student_state(cfg.out), _student_state(out)
    moved = 0
    init = create_encoder("resnet18_trunc", pretrained=False).model.state_dict()
    for k in ref:
        torch.testing.assert_close(ddp[k], ref[k], rtol=1e-4, atol=1e-5)
        moved += not torch.equal(ref[k], init[k])
    assert moved > 10  # the comparison is between trained weights, not two untouched inits
    m_ref = json.loads(output_paths(cfg.out)["final_metrics"].read_text())
    m_ddp = json.loads(output_paths(out)["final_metrics"].read_text())
    assert m_ddp["world_size"] == 2
    assert m_ddp["val_cosine_after"] == pytest.approx(m_ref["val_cosine_after"], abs=1e-4)
    for key in (
        "student_teacher_r2_before",
        "student_teacher_r2_after",
        "student_context_r2_after",
    ):
        assert m_ddp[key] == pytest.approx(m_ref[key], abs=1e-4), key  # sums over ranks, exact


def _finetune_rank(rank, cfg: dict, nccl_shaped: bool) -> dict:
    """One torchrun-like rank of `finetune`, counting the training forwards it runs.

    nccl_shaped: the process group serves only CUDA tensors (as NCCL does), so any collective
    the trainer makes on a CPU tensor outside distributed.py's helpers fails."""
    from datetime import timedelta

    import torch.distributed as dist

    from clam_mcmkd.mcmkd import steps

    if nccl_shaped:
        dist.init_process_group("cuda:gloo", timeout=timedelta(seconds=120))
    forwards = []
    real = steps.forward_windows

    def counting(learner, batch, *args):
        if learner.student.training:
            forwards.append(int(batch["patches"].shape[0]))
        return real(learner, batch, *args)

    steps.forward_windows = counting
    finetune(FinetuneConfig(**cfg))
    return {"forwards": forwards}


def test_ragged_last_step_every_rank_runs_every_micro_batch(cohort_reference, tmp_path):
    """13 windows, 4 per step, 2 micro-batches: the last step has 1 window, so rank 1 has none
    in it. Both ranks must still run both micro-batches (SyncBatchNorm and any collective inside
    a forward hang otherwise), on a group shaped like NCCL's, and match one process."""
    from dataclasses import asdict

    from test_distributed import run_two_ranks

    cfg = replace(
        cohort_reference, out=str(tmp_path / "one.pt"), max_windows=13, epochs=1, grad_accum=2
    )
    finetune(cfg)
    ddp = replace(cfg, out=str(tmp_path / "ddp.pt"))
    ranks = run_two_ranks(_finetune_rank, tmp_path, cfg=asdict(ddp), nccl_shaped=True)
    assert ranks[0]["forwards"] == [1, 1, 1, 1, 1, 1, 1, 0]
    assert ranks[1]["forwards"] == [1, 1, 1, 1, 1, 1, 0, 0]
    ref, two = _student_state(cfg.out), _student_state(ddp.out)
    init = create_encoder("resnet18_trunc", pretrained=False).model.state_dict()
    assert sum(not torch.equal(ref[k], init[k]) for k in ref) > 10
    for k in ref:
        torch.testing.assert_close(two[k], ref[k], rtol=1e-4, atol=1e-5)


def _node_local_rank(rank, cfg: dict, root: str) -> dict:
    """One rank of a resumed run whose --out is on this rank's own disk (node-local)."""
    finetune(FinetuneConfig(**dict(cfg, out=str(Path(root, f"node{rank}", "m.pt")))))
    return {}


def test_resume_with_a_node_local_out_under_two_ranks(cohort_reference, tmp_path):
    """Defect 8 end to end: only rank 0's node has the state of the stopped run (rank 0 saves
    it). Both ranks resume from it at the same step (each rank decided from its own disk
    before, and the ranks fell out of step) and finish as the uninterrupted run does."""
    from dataclasses import asdict

    from test_distributed import run_two_ranks

    base = replace(cohort_reference, epochs=1, dist_timeout="90s")
    ref = replace(base, out=str(tmp_path / "ref.pt"))
    finetune(ref)
    finetune(replace(base, out=str(tmp_path / "node0" / "m.pt"), stop_after_steps=2))
    (tmp_path / "node1").mkdir()
    assert not output_paths(tmp_path / "node1" / "m.pt")["state"].exists()
    run_two_ranks(_node_local_rank, tmp_path, cfg=asdict(replace(base, resume=True)),
                  root=str(tmp_path))  # fmt: skip
    history = json.loads(output_paths(tmp_path / "node0" / "m.pt")["final_metrics"].read_text())
    assert history["world_size"] == 2
    ref_state, resumed = _student_state(ref.out), _student_state(tmp_path / "node0" / "m.pt")
    for k in ref_state:
        torch.testing.assert_close(resumed[k], ref_state[k], rtol=1e-4, atol=1e-5)


def _bn_rank(rank, cfg: dict) -> dict:
    """One gloo rank of `finetune`: its student's BatchNorm running statistics at the end."""
    from clam_mcmkd.mcmkd import steps

    seen = {}
    real = steps.forward_windows

    def keep(learner, *args):
        seen["student"] = learner.student
        return real(learner, *args)

    steps.forward_windows = keep
    finetune(FinetuneConfig(**cfg))
    stats = steps.bn_statistics(seen["student"])
    return {"stats": [t.double().sum().item() for t in stats], "n": len(stats)}


def test_no_freeze_bn_under_two_ranks_averages_statistics(cohort_reference, tmp_path):
    """--no-freeze-bn with 2 CPU ranks and a ragged last step: no crash (SyncBatchNorm only on
    CUDA), no hang (every rank runs every micro-batch); each rank normalises with its own batch
    and the running statistics are averaged after every step: both ranks end with the same
    ones, and they moved (with the averaging off, the ranks' statistics differ)."""
    from dataclasses import asdict

    from test_distributed import run_two_ranks

    cfg = replace(cohort_reference, out=str(tmp_path / "bn.pt"), max_windows=13, epochs=1,
                  grad_accum=2, freeze_bn=False)  # fmt: skip
    ranks = run_two_ranks(_bn_rank, tmp_path, cfg=asdict(cfg))
    assert ranks[0]["n"] == ranks[1]["n"] > 10
    np.testing.assert_allclose(ranks[0]["stats"], ranks[1]["stats"], rtol=1e-6)
    state = _student_state(cfg.out)
    init = create_encoder("resnet18_trunc", pretrained=False).model.state_dict()
    stats = [k for k in state if k.endswith("running_mean")]
    assert stats and all(not torch.equal(state[k], init[k]) for k in stats)
    assert all(torch.isfinite(state[k]).all() for k in state if state[k].is_floating_point())


def test_bf16_autocast_training_runs_on_the_cpu(one_window, cmu_slide, tmp_path):
    """--precision bf16 trains under bf16 autocast on the CPU too (the GPU default, in the
    suite): finite losses, near float32's and not equal to them; the teacher cache records it."""
    losses = {}
    for precision in ("fp32", "bf16"):
        cfg = cmu_cfg(one_window, cmu_slide, tmp_path / precision / "m.pt", precision=precision,
                      epochs=3, batch_size=1, val_frac=0.0,
                      teacher_cache=str(tmp_path / precision / "cache"))  # fmt: skip
        finetune(cfg)
        import pandas as pd

        losses[precision] = pd.read_csv(output_paths(cfg.out)["metrics"])["loss"].to_numpy()
        cache = next((tmp_path / precision / "cache").glob("*.h5"))
        with h5py.File(cache, "r") as f:
            assert json.loads(f.attrs["teacher"])["precision"] == precision
    assert np.isfinite(losses["bf16"]).all() and len(losses["bf16"]) == 3
    assert not np.array_equal(losses["bf16"], losses["fp32"])
    np.testing.assert_allclose(losses["bf16"], losses["fp32"], rtol=0.05, atol=0.02)


# ----------------------------------------------------------------------------- controls


def test_patch_kd_sees_every_patch_and_predicts_each_from_its_own_token(cohort_reference, tmp_path):
    """The patch_kd control: no mask, no context, every position scored; R² reported for it
    and for MCM-KD (against predicting the mean)."""
    from clam_mcmkd.mcmkd.objectives import PatchHead, input_masks

    head = PatchHead(8, 5, width=16)
    tokens = torch.randn(2, 4, 8)
    out = head(tokens.reshape(-1, 8), torch.zeros(2, 4, dtype=torch.bool))
    moved = tokens.clone()
    moved[0, 2] += 5.0  # another position's token changes: position 0's prediction does not
    again = head(moved.reshape(-1, 8), torch.zeros(2, 4, dtype=torch.bool))
    torch.testing.assert_close(again[0, :2], out[0, :2])
    assert not torch.allclose(again[0, 2], out[0, 2])
    cfg = replace(cohort_reference, out=str(tmp_path / "patch_kd.pt"), objective="patch_kd")
    assert not input_masks(cfg, np.arange(3), 0).any()
    finetune(cfg)
    m = json.loads(output_paths(cfg.out)["final_metrics"].read_text())
    ref = json.loads(output_paths(cohort_reference.out)["final_metrics"].read_text())
    assert m["val_masked_positions"] == m["val_windows"] * cfg.grid**2  # every position
    assert ref["val_masked_positions"] == ref["val_windows"] * num_masked(cfg.grid, 0.5)
    for metrics in (m, ref):
        assert np.isfinite([metrics[k] for k in ("val_r2_before", "val_r2_after",
                            "val_r2_mean_baseline", "val_cos_std_after")]).all()  # fmt: skip
        assert metrics["val_r2_mean_baseline"] <= 1e-9  # a constant scores <= 0
    saved = read_student_checkpoint(cfg.out)
    assert saved["config"]["objective"] == "patch_kd"
    mcmkd = _student_state(cohort_reference.out)
    init = create_encoder("resnet18_trunc", pretrained=False).model.state_dict()
    weights = [k for k in init if init[k].is_floating_point()]
    assert any(not torch.equal(saved["state_dict"][k], init[k]) for k in weights)
    assert any(not torch.equal(saved["state_dict"][k], mcmkd[k]) for k in weights)


def test_sham_targets_are_the_teachers_features_given_to_other_patches(cohort_reference, tmp_path):
    from clam_mcmkd.mcmkd.objectives import ShamReader
    from clam_mcmkd.mcmkd.teacher_cache import CacheReader

    cfg = replace(cohort_reference, out=str(tmp_path / "sham.pt"), targets="sham")
    plan = plan_windows(cfg)
    spec = teacher_spec(cfg.teacher, ckpt=None, pretrained=False, input_size=64, device="cpu",
                        precision=cfg.precision)  # fmt: skip
    needed = trainer.windows_by_slide(plan.train + plan.val)
    real = CacheReader(TeacherCache(cfg.teacher_cache, spec), plan.slides, needed)
    sham = ShamReader(real, cfg.seed)
    slides = sorted(needed)
    a = np.concatenate([real.all_features(s) for s in slides])
    b = np.concatenate([sham.all_features(s) for s in slides])
    assert a.shape == b.shape and not np.array_equal(a, b)
    np.testing.assert_array_equal(np.sort(a, axis=0), np.sort(b, axis=0))  # same features
    assert (np.abs(a - b).max(axis=1) == 0).mean() < 0.1  # almost all given to another patch
    sw = plan.slides[slides[0]]
    coords = sw.patch_coords(needed[slides[0]][0], cfg.grid)
    np.testing.assert_array_equal(  # a window's targets: those rows of the permuted table
        sham.features(slides[0], coords),
        sham.all_features(slides[0])[[real.rows[slides[0]][(int(x), int(y))] for x, y in coords]],
    )
    finetune(cfg)
    m = json.loads(output_paths(cfg.out)["final_metrics"].read_text())
    assert np.isfinite(m["val_r2_after"]) and read_student_checkpoint(cfg.out)["config"][
        "targets"] == "sham"  # fmt: skip


def test_student_starts_from_an_encoder_checkpoint(cohort_reference, tmp_path):
    from clam_mcmkd.mcmkd.config import FinetuneError

    cfg = replace(cohort_reference, student_ckpt=cohort_reference.out)
    start = trainer.build_student(cfg).model.state_dict()
    for k, v in _student_state(cohort_reference.out).items():
        assert torch.equal(start[k], v), k
    with pytest.raises(FinetuneError, match="a resnet18_trunc at 64 px, but the run's student"):
        finetune(replace(cfg, input_size=96, out=str(tmp_path / "x.pt")))
    with pytest.raises(FinetuneError, match="--objective must be one of"):
        finetune(replace(cohort_reference, objective="mae", out=str(tmp_path / "y.pt")))


# ----------------------------------------------------------------------------- errors


def test_unknown_names_are_clear_errors(cmu_coords, cmu_slide, tmp_path):
    from click.testing import CliRunner

    from clam_mcmkd.cli import main

    with pytest.raises(EncoderError, match="unknown teacher 'no_such_net'"):
        finetune(cmu_cfg(cmu_coords, cmu_slide, tmp_path / "x.pt", teacher="no_such_net"))
    with pytest.raises(EncoderError, match="unknown student 'resnet7'"):
        finetune(cmu_cfg(cmu_coords, cmu_slide, tmp_path / "x.pt", student="resnet7"))
    result = CliRunner().invoke(
        main,
        ["finetune", "--data-h5-dir", str(cmu_coords), "--data-slide-dir", str(cmu_slide.parent),
         "--csv-path", str(cmu_coords / "data.csv"), "--teacher", "no_such_net",
         "--out", str(tmp_path / "x.pt")],
    )  # fmt: skip
    assert result.exit_code != 0 and "unknown teacher 'no_such_net'" in result.output
    assert "Traceback" not in result.output


def test_no_window_fits_is_an_error(cmu_coords, cmu_slide, tmp_path):
    with pytest.raises(NoWindowsError, match="no 30x30 window"):
        finetune(cmu_cfg(cmu_coords, cmu_slide, tmp_path / "x.pt", grid=30))


def test_unreadable_slide_is_skipped_and_counted(cmu_coords, cmu_slide, tmp_path):
    slides = tmp_path / "slides"
    slides.mkdir()
    (slides / f"{cmu_slide.stem}.svs").symlink_to(cmu_slide)
    (slides / "broken.svs").write_bytes(b"not a slide at all")
    h5 = tmp_path / "h5"
    (h5 / "patches").mkdir(parents=True)
    src = cmu_coords / "patches" / f"{cmu_slide.stem}.h5"
    (h5 / "patches" / src.name).write_bytes(src.read_bytes())
    (h5 / "patches" / "broken.h5").write_bytes(src.read_bytes())
    write_dataset_csv(
        tmp_path / "data.csv",
        [{"case_id": "a", "slide_id": cmu_slide.stem, "label": "x"},
         {"case_id": "b", "slide_id": "broken", "label": "x"},
         {"case_id": "c", "slide_id": "no_coords", "label": "x"}],
    )  # fmt: skip
    cfg = cmu_cfg(
        h5, cmu_slide, tmp_path / "x.pt", data_h5_dir=str(h5), data_slide_dir=str(slides),
        csv_path=str(tmp_path / "data.csv"),
    )  # fmt: skip
    plan = plan_windows(cfg)
    assert list(plan.summary.failed) == ["broken"] and "broken.svs" in plan.summary.failed["broken"]
    assert plan.summary.skipped == ["no_coords"] and plan.summary.done == [cmu_slide.stem]
    assert len(plan.train) > 0


def test_cache_at_one_input_size_is_not_reused_at_another(cmu_run, tmp_path):
    """A cache written at the teacher's 64 px must not serve a run that omits
    --teacher-input-size (the teacher's own 224 px): the cache would answer for itself."""
    cfg, _, _, _ = cmu_run
    assert cfg.teacher_input_size == 64
    run_224 = replace(cfg, out=str(tmp_path / "x.pt"), teacher_input_size=None,
                      stop_after_steps=1)  # fmt: skip
    with count_teacher_builds() as builds:
        with pytest.raises(TeacherCacheError, match="input_size") as err:
            finetune(run_224)
    assert builds == []  # refused before the (large) teacher is built
    msg = str(err.value)
    assert "\n" not in msg and "64" in msg and "224" in msg
    assert "--teacher-cache" in msg and "delete" in msg


# ----------------------------------------------------------------------------- teacher identity


@pytest.fixture(scope="module")
def one_window(cmu_slide, tmp_path_factory) -> Path:
    """CLAM coords of one 2x2 block of 64 px patches on the CMU slide: a single grid-2 window."""
    root = tmp_path_factory.mktemp("one_window")
    coords = np.array([(1000, 1500), (1064, 1500), (1000, 1564), (1064, 1564)])
    write_coords_h5(
        root / "patches" / f"{cmu_slide.stem}.h5", coords, patch_size=64, patch_level=0,
        downsample=(1.0, 1.0), downsampled_level_dim=(2220, 2967), level_dim=(2220, 2967),
        name=cmu_slide.stem,
    )  # fmt: skip
    write_dataset_csv(
        root / "data.csv", [{"case_id": "c", "slide_id": cmu_slide.stem, "label": "x"}]
    )
    return root


def _spec(name="resnet18", **kw):
    args = dict(ckpt=None, pretrained=False, input_size=64, device="cpu", precision="auto")
    return teacher_spec(name, **{**args, **kw})


def test_teacher_spec_and_cache_refuse_any_difference(one_window, cmu_slide, tmp_path):
    spec = _spec()
    assert (spec.name, spec.weights, spec.input_size, spec.resize_size, spec.crop) == (
        "resnet18",
        "random-init(seed=0)",
        64,
        None,
        False,
    )
    assert (spec.out_dim, spec.precision, spec.interpolation) == (512, "fp32", "bilinear")
    assert spec.mean == (0.485, 0.456, 0.406) and spec.output
    sw = plan_windows(cmu_cfg(one_window, cmu_slide, tmp_path / "x.pt")).slides[0]
    cache = TeacherCache(tmp_path / "cache", spec)
    cache.merge(sw, sw.patch_coords(0, 2), np.zeros((4, 512), np.float32))
    assert len(cache.read_index(sw)) == 4
    ckpt = tmp_path / "teacher.pth"
    torch.save(create_encoder("resnet18", pretrained=False).model.model.state_dict(), ckpt)
    others = {
        "name": _spec("resnet34"),
        "weights": _spec(pretrained=True),  # timm's default resnet18 weights
        "input_size": _spec(input_size=48),
        "precision": _spec(device="cuda"),  # bf16 autocast there (a spec only: nothing runs)
        "mean": replace(spec, mean=(0.5, 0.5, 0.5)),
        "interpolation": replace(spec, interpolation="bicubic"),
        "resize_size": replace(spec, resize_size=72, crop=True),
        "output": replace(spec, output="cls"),
    }
    assert others["weights"].weights == "timm/resnet18.a1_in1k"
    assert others["precision"].precision == "bf16"
    assert _spec(ckpt=ckpt).weights == f"sha256:{file_sha256(ckpt)}"
    for field, other in others.items():
        with pytest.raises(TeacherCacheError, match=f"teacher cache was made by.* {field} ") as err:
            TeacherCache(tmp_path / "cache", other).read_index(sw)
        msg = str(err.value)
        assert "\n" not in msg and "delete" in msg and "--teacher-cache" in msg
    # the same slide copied elsewhere is the same slide; another file under its name is not
    copy = tmp_path / "copy" / cmu_slide.name
    copy.parent.mkdir()
    copy.write_bytes(cmu_slide.read_bytes())
    assert (
        len(TeacherCache(tmp_path / "cache", spec).read_index(replace(sw, slide_path=str(copy))))
        == 4
    )
    copy.write_bytes(cmu_slide.read_bytes() + b"rescanned")
    with pytest.raises(TeacherCacheError, match="another slide file .*size 1938955 vs 1938964"):
        TeacherCache(tmp_path / "cache", spec).read_index(replace(sw, slide_path=str(copy)))


def test_teacher_input_size_scales_a_cards_resize_and_crop():
    with torch.device("meta"):
        spec = _spec("prov_gigapath", input_size=112)
    assert (spec.resize_size, spec.input_size, spec.crop, spec.interpolation) == (
        128,
        112,
        True,
        "bicubic",
    )
    assert (spec.out_dim, spec.output, spec.weights) == (1536, "cls", "random-init(seed=0)")
    assert _spec("prov_gigapath", input_size=None, pretrained=True).weights == (
        "hf-hub:prov-gigapath/prov-gigapath"
    )


@pytest.fixture
def tiny_foundation_teacher(monkeypatch):
    """A registered foundation-model spec of CPU size with Virchow2's layout (4 registers, class
    + mean patch token) and Prov-GigaPath's preprocessing (bicubic resize, centre crop)."""
    import functools

    from clam_mcmkd.encoders import foundation, registry

    for table in ("_REGISTRY", "_CKPT_ENV", "_PRETRAINED_SOURCE", "_ALIASES", "_DESCRIBE"):
        monkeypatch.setattr(registry, table, dict(getattr(registry, table)))
    spec = foundation.FoundationModelSpec(
        name="tiny_fm", hub_id="hf-hub:example/tiny-fm", arch="vit_tiny_patch16_224",
        timm_kwargs=(("img_size", 64), ("init_values", 1e-5), ("num_classes", 0),
                     ("reg_tokens", 4), ("global_pool", ""), ("mlp_layer", "SwiGLUPacked"),
                     ("act_layer", "SiLU")),
        out_dim=384, ckpt_env="TINY_FM_CKPT_PATH", source="test stand-in",
        output="cls+mean_patch", input_size=64, resize_size=72, interpolation="bicubic",
    )  # fmt: skip
    registry.register_encoder("tiny_fm", ckpt_env=spec.ckpt_env, source=spec.hub_id)(
        functools.partial(foundation.build_foundation_model, spec)
    )
    return spec


def test_finetune_with_a_foundation_model_teacher_on_one_window(
    one_window, cmu_slide, tmp_path, tiny_foundation_teacher, caplog
):
    """The FM path end to end (card transforms, output rule, width); one window: no validation,
    said once; the run summary at INFO, named once; final metrics say which loss is which."""
    import logging

    import pandas as pd

    cfg = cmu_cfg(one_window, cmu_slide, tmp_path / "fm.pt", teacher="tiny_fm",
                  teacher_input_size=None, teacher_cache=str(tmp_path / "cache"), batch_size=1,
                  epochs=3)  # fmt: skip
    with caplog.at_level(logging.INFO, logger="clam_mcmkd"):
        finetune(cfg)
    metrics = json.loads(output_paths(cfg.out)["final_metrics"].read_text())
    assert metrics["teacher_dim"] == 384 and metrics["val_windows"] == 0
    assert "val_cosine_after" not in metrics
    hist = pd.read_csv(output_paths(cfg.out)["metrics"])
    assert metrics["first_loss"] == pytest.approx(hist["loss"].iloc[0])
    assert metrics["last_loss"] == pytest.approx(hist["loss"].iloc[-1])
    assert metrics["mean_loss_last_10_steps"] == pytest.approx(hist["loss"].iloc[-10:].mean())
    cache_file = tmp_path / "cache" / f"{cmu_slide.stem}.h5"
    with h5py.File(cache_file) as f:
        recorded = json.loads(f.attrs["teacher"])
        cached = dict(zip(map(tuple, f["coords"][:].tolist()), f["features"][:]))
    assert (recorded["resize_size"], recorded["input_size"], recorded["crop"]) == (72, 64, True)
    assert (recorded["interpolation"], recorded["output"]) == ("bicubic", "cls+mean_patch")
    teacher = create_encoder("tiny_fm", pretrained=False)  # the same seeded init
    sw = plan_windows(cfg).slides[0]
    with open_slide(cmu_slide) as slide:
        patches = read_window(slide, sw, 0, 2)
    with torch.no_grad():
        want = teacher.model(teacher.transforms.batch(torch.from_numpy(patches))).numpy()
    got = np.stack([cached[tuple(int(v) for v in c)] for c in sw.patch_coords(0, 2)])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    messages = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert any("none left to hold out, so no validation" in m for _, m in messages)
    assert not any("held-out windows" in m for _, m in messages)
    summaries = [(lvl, m) for lvl, m in messages if m.startswith("finetune: 1 done")]
    assert summaries and all(lvl == logging.INFO for lvl, _ in summaries)
    assert not any("finetune: finetune:" in m for _, m in messages)


def test_a_run_that_fails_writing_leaves_no_outputs_behind(one_window, cmu_slide, tmp_path):
    out = tmp_path / "run" / "x.pt"
    # the final metrics cannot be written where a directory is (after the checkpoint, metrics,
    # plot and summary were); an --out that is a directory is refused before any work instead
    output_paths(out)["final_metrics"].mkdir(parents=True)
    cfg = cmu_cfg(one_window, cmu_slide, out, teacher_cache=str(tmp_path / "cache"))
    with pytest.raises(OSError):
        finetune(cfg)
    for key in ("checkpoint", "config", "metrics", "plot", "summary"):
        assert not output_paths(out)[key].exists(), key
    assert output_paths(out)["state"].is_file()  # what --resume needs stays
    with pytest.raises(ClamMcmkdError, match="is a folder"):
        finetune(replace(cfg, out=str(output_paths(out)["final_metrics"])))


def test_offline_teacher_is_one_line_naming_the_ways_out(cmu_coords, cmu_slide, tmp_path,
                                                          hub_offline):  # fmt: skip
    from click.testing import CliRunner

    from clam_mcmkd.cli import main

    result = CliRunner().invoke(
        main,
        ["finetune", "--data-h5-dir", str(cmu_coords), "--data-slide-dir", str(cmu_slide.parent),
         "--csv-path", str(cmu_coords / "data.csv"), "--teacher", "vit_large_patch16_224",
         "--grid", "2", "--teacher-cache", str(tmp_path / "cache"), "--out", str(tmp_path / "x.pt")],
    )  # fmt: skip
    assert result.exit_code != 0
    error = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(error) == 1 and "Traceback" not in result.output
    assert "vit_large_patch16_224: cannot load pretrained weights" in error[0]
    assert "--no-pretrained" in error[0] and "--teacher-ckpt PATH" in error[0]
    assert not output_paths(tmp_path / "x.pt")["config"].exists()


# ----------------------------------------------------------------------------- newcomer friction


def test_slide_extension_is_found_or_named(small_cohort, small_cohort_tiled, tmp_path):
    found = plan_windows(cohort_cfg(small_cohort, small_cohort_tiled, tmp_path / "x.pt",
                                    slide_ext=None))  # fmt: skip
    assert len(found.slides) == 6 and all(sw.slide_path.endswith(".tif") for sw in found.slides)
    with pytest.raises(NoWindowsError) as err:
        plan_windows(cohort_cfg(small_cohort, small_cohort_tiled, tmp_path / "x.pt",
                                slide_ext=".svs"))  # fmt: skip
    msg = str(err.value)
    assert "\n" not in msg and "no slide of" in msg and "smaller --grid" not in msg
    assert ".svs: slide file does not exist" in msg and "has *.tif slides" in msg


def test_coords_outside_the_slide_are_counted_per_slide(one_window, cmu_slide, tmp_path, caplog):
    import logging

    coords = read_coords_h5(one_window / "patches" / f"{cmu_slide.stem}.h5")
    shifted = np.concatenate([coords.coords, [[2200, 100], [100, 2950]]])  # past the 2220x2967 edge
    root = tmp_path / "h5"
    write_coords_h5(
        root / "patches" / f"{cmu_slide.stem}.h5", shifted, patch_size=64, patch_level=0,
        downsample=(1.0, 1.0), downsampled_level_dim=(2220, 2967), level_dim=(2220, 2967),
        name=cmu_slide.stem,
    )  # fmt: skip
    cfg = cmu_cfg(root, cmu_slide, tmp_path / "x.pt", csv_path=str(one_window / "data.csv"))
    with caplog.at_level(logging.WARNING, logger="clam_mcmkd"):
        plan_windows(cfg)
    warned = [r.getMessage() for r in caplog.records if "outside the slide" in r.getMessage()]
    assert len(warned) == 1 and f"{cmu_slide.stem}: 2 of 6 coords" in warned[0]
