"""GPU-path defects reproduced on the CPU (issue 19): the mechanism each one needs, on real
modules and real gloo ranks. CUDA itself does not run here; where a CUDA call is the whole
point (binding a device), the call is recorded instead of made."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from clam_mcmkd.distributed import DistInfo
from clam_mcmkd.encoders import create_encoder
from clam_mcmkd.encoders.forward import autocast_dtype
from clam_mcmkd.mcmkd import FinetuneConfig
from clam_mcmkd.mcmkd.config import validate_config
from clam_mcmkd.mcmkd.losses import TargetStandardizer
from clam_mcmkd.mcmkd.objectives import build_predictor
from clam_mcmkd.mcmkd.steps import Learner, build_optimizer, forward_windows, sync_batch_norm
from clam_mcmkd.utils import ClamMcmkdError


class BatchNormInputs(TorchFunctionMode):
    """Records the dtype of every ``F.batch_norm`` input (what SyncBatchNorm computes its
    statistics from, and so the dtype an empty rank sends them in)."""

    def __init__(self):
        super().__init__()
        self.dtypes: list[torch.dtype] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is nn.functional.batch_norm:
            self.dtypes.append(args[0].dtype)
        return func(*args, **(kwargs or {}))


def _student(size: int = 32) -> nn.Module:
    torch.manual_seed(0)
    return create_encoder("resnet18_trunc", pretrained=False, target_img_size=size).model


@pytest.mark.parametrize("n", [2, 0])
def test_sync_batch_norm_runs_in_float32_under_bf16_autocast(n):
    """Defect 3: under bf16 autocast a plain SyncBatchNorm gets bf16 input, so an empty rank
    would all-gather bf16 statistics against the float32 ones of ranks with data; ours gets
    float32 on a rank with data and on an empty one, and hands back autocast's dtype."""
    x = torch.randn(n, 3, 32, 32)
    plain = nn.SyncBatchNorm.convert_sync_batchnorm(_student()).train()
    with BatchNormInputs() as seen, torch.autocast("cpu", dtype=torch.bfloat16):
        plain(x)
    assert set(seen.dtypes) == {torch.bfloat16}  # the defect's condition, reproduced
    ours = sync_batch_norm(_student()).train()
    assert ours.state_dict().keys() == _student().state_dict().keys()
    with BatchNormInputs() as seen, torch.autocast("cpu", dtype=torch.bfloat16):
        out = ours(x)
    assert seen.dtypes and set(seen.dtypes) == {torch.float32}
    assert out.shape[0] == n and out.dtype == torch.bfloat16


def _learner(grid: int = 2, teacher_dim: int = 16) -> Learner:
    cfg = FinetuneConfig("", "", "", "t", student="resnet18_trunc", input_size=32, grid=grid,
                         predictor_width=32, predictor_heads=4)  # fmt: skip
    enc = create_encoder("resnet18_trunc", pretrained=False, target_img_size=32)
    predictor = build_predictor(cfg, enc.out_dim, teacher_dim)
    opt = build_optimizer(cfg, enc.model, predictor)
    std = TargetStandardizer(torch.zeros(teacher_dim), torch.ones(teacher_dim))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return Learner(enc.model.train(), enc.transforms, predictor.train(), std, opt, sched)


def test_an_empty_micro_batch_never_reaches_the_predictors_attention():
    """Defect 4: a rank with 0 windows runs the student (its collectives) but not the
    predictor (flash attention raised on batch 0 before torch 2.6); its output keeps the
    student's graph, so backward runs and gives zero gradients."""
    learner = _learner()
    calls = []
    learner.predictor.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    patches = torch.zeros((0, 4, 32, 32, 3), dtype=torch.uint8)
    mask = torch.zeros((0, 4), dtype=torch.bool)
    pred = forward_windows(learner, {"patches": patches}, mask, "cpu", "bf16")
    assert calls == [] and pred.shape == (0, 4, 16) and pred.dtype == torch.float32
    pred.sum().backward()
    grads = [p.grad for p in learner.student.parameters() if p.grad is not None]
    assert grads and all(float(g.abs().sum()) == 0.0 for g in grads)
    full = torch.randint(0, 255, (2, 4, 32, 32, 3), dtype=torch.uint8)
    mask = torch.tensor([[True, False, False, True], [False, True, True, False]])
    assert forward_windows(learner, {"patches": full}, mask, "cpu", "bf16").shape == (2, 4, 16)
    assert calls == [2]


def test_visible_only_batches_predict_as_whole_windows_do():
    """The loader's visible-patches-only batch gives the same predictions as whole windows."""
    learner = _learner()
    learner.student.eval()
    full = torch.randint(0, 255, (3, 4, 32, 32, 3), dtype=torch.uint8)
    mask = torch.tensor([[True, False, False, True], [False, True, True, False]] * 2)[:3]
    visible = full[~mask].reshape(3, 2, 32, 32, 3)
    with torch.no_grad():
        a = forward_windows(learner, {"patches": full}, mask, "cpu", "fp32")
        b = forward_windows(learner, {"patches": visible}, mask, "cpu", "fp32")
    torch.testing.assert_close(a, b)


def test_precision_auto_follows_the_gpu_and_fp16_never_trains():
    """Defect 6: auto is bf16 only where the GPU has it; elsewhere fp16 for inference and
    float32 for training; fp16 training (no GradScaler) is refused before any work; bf16 runs
    on the CPU when asked (so the suite runs that path)."""
    assert autocast_dtype("cuda:0", "auto", bf16=True) == torch.bfloat16
    assert autocast_dtype("cuda:0", "auto", bf16=False) == torch.float16
    assert autocast_dtype("cuda:0", "auto", bf16=False, training=True) is None
    assert autocast_dtype("cpu", "auto") is None and autocast_dtype("cpu", "fp16") is None
    assert autocast_dtype("cpu", "bf16", training=True) == torch.bfloat16
    with pytest.raises(ClamMcmkdError, match="fp16 cannot train"):
        autocast_dtype("cuda:0", "fp16", training=True)
    cfg = FinetuneConfig("h5", "slides", "d.csv", "resnet18", student="resnet18_trunc",
                         precision="fp16")  # fmt: skip
    with pytest.raises(ClamMcmkdError, match="fp16 cannot train"):
        validate_config(cfg)


def test_single_process_cuda_n_binds_that_device(monkeypatch):
    """Defect 7: without torchrun, --device cuda:1 makes cuda:1 the current device before any
    loader thread starts (pin memory opened a context on GPU 0 otherwise). No GPU here: the
    binding call is recorded."""
    from clam_mcmkd import distributed as du

    bound = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: bound.append(str(d)))
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with du.distributed_run("cuda:1") as (device, info):
        assert device == "cuda:1" and not info.enabled
    assert bound == ["cuda:1"]
    with du.distributed_run("cpu"):
        pass
    assert bound == ["cuda:1"]


def test_plan_of_a_ragged_step_keeps_every_rank_in_every_micro_batch():
    """The trainer's side of defects 3-4: the last step's micro-batches exist on every rank,
    some of them empty (this is what sends an empty batch through the student)."""
    from clam_mcmkd.mcmkd.steps import Batches

    cfg = FinetuneConfig("", "", "", "t", batch_size=4, grad_accum=2)
    plans = [Batches(13, cfg, DistInfo(r, 2, r, 2)).micro_batches(3) for r in range(2)]
    assert [len(m) for m in plans[0][2]] == [1, 0] and [len(m) for m in plans[1][2]] == [0, 0]
    assert np.concatenate([*plans[0][2], *plans[1][2]]).size == 1


# ----------------------------------------------------------------------------- 2 gloo ranks


def _agreed_steps(rank, seconds: float) -> dict:
    import time

    from clam_mcmkd import distributed as du
    from clam_mcmkd.doctor import timed_rate

    info = du.init_distributed("cpu", timeout_s=30)
    rng = np.random.default_rng(rank)
    t = torch.ones(4)
    calls = []

    def step():  # a collective, then host work that differs by rank (0-4 ms, and a slow
        du.all_reduce_(t, info)  # first call on rank 1: its clock starts 0.3 s later)
        time.sleep(0.3 if rank == 1 and not calls else rng.uniform(0, 0.004))
        calls.append(1)

    timed_rate(step, 1, seconds, "cpu", info=info)
    du.barrier(info)
    du.cleanup(info)
    return {"calls": len(calls)}


def test_doctor_two_rank_probe_agrees_its_step_count(tmp_path):
    """Defect 5: every probe step is a collective; with host jitter and a slow first call the
    ranks' own clocks disagree on when to stop, and one rank waited in a collective the other
    never joined. Now rank 0 decides the count for both."""
    from test_distributed import run_two_ranks

    ranks = run_two_ranks(_agreed_steps, tmp_path, seconds=0.2)
    assert ranks[0]["calls"] == ranks[1]["calls"] >= 3


def _resume_on_node_local_disks(rank, root: str) -> dict:
    from pathlib import Path

    from clam_mcmkd import distributed as du
    from clam_mcmkd.mcmkd.config import FinetuneError
    from clam_mcmkd.mcmkd.state import resume_state, save_state

    info = du.init_distributed("cpu", timeout_s=30)
    path = Path(root, f"node{rank}", "m.state.pt")  # each rank's own disk
    path.parent.mkdir(parents=True, exist_ok=True)
    fp = {"config": {"lr": 1.0}, "slides": ["a"], "train": [(0, 1)]}
    if rank == 0:  # only rank 0's node has the state (rank 0 is the one that saves it)
        save_state(path, fingerprint=fp, step=7, student={"w": torch.arange(3.0)})
    out = {}
    state = resume_state(path, fp, True, info)
    out["step"] = None if state is None else state["step"]
    out["w"] = None if state is None else state["student"]["w"].tolist()
    out["fresh"] = resume_state(path, fp, False, info)  # no --resume: start, on every rank
    try:
        resume_state(path, {**fp, "config": {"lr": 2.0}}, True, info)
        out["refused"] = ""
    except FinetuneError as err:
        out["refused"] = str(err)
    du.barrier(info)
    du.cleanup(info)
    return out


def test_resume_is_decided_by_rank_zero_for_every_rank(tmp_path):
    """Defect 8: with a node-local --out only rank 0's node has the state; every rank resumes
    from it at the same step (each rank looked for its own file before), and a refused resume
    is refused on every rank instead of leaving the others waiting."""
    from test_distributed import run_two_ranks

    ranks = run_two_ranks(_resume_on_node_local_disks, tmp_path, root=str(tmp_path))
    for out in ranks:
        assert out["step"] == 7 and out["w"] == [0.0, 1.0, 2.0] and out["fresh"] is None
        assert "cannot --resume: options ['lr']" in out["refused"]


def _my_slides(rank, root: str, sizes: list[int], done: list[str]) -> dict:
    from clam_mcmkd import distributed as du
    from clam_mcmkd.features import ExtractConfig, my_slides

    info = du.init_distributed("cpu", timeout_s=30)
    cfg = ExtractConfig(f"{root}/coords", f"{root}/slides", None, f"{root}/feats")
    ids = [f"s{i}" for i in range(len(sizes))]
    mine = my_slides(cfg, ids, info)
    du.barrier(info)
    du.cleanup(info)
    return {"mine": mine}


def test_ranks_share_the_slides_still_to_extract(tmp_path):
    """Defect 9: two big slides already extracted; the ranks split the four left by their
    patches (by every slide's count, one rank got 280 patches of work and the other 90)."""
    from test_distributed import run_two_ranks

    from clam_mcmkd.clam.formats import feature_paths, write_coords_h5

    sizes = [5000, 4800, 100, 90, 120, 60]
    done = ["s0", "s1"]
    for i, n in enumerate(sizes):
        write_coords_h5(tmp_path / "coords" / "patches" / f"s{i}.h5", np.zeros((n, 2)), patch_size=256,
                        patch_level=0, downsample=(1, 1), downsampled_level_dim=(9, 9),
                        level_dim=(9, 9), name=f"s{i}")  # fmt: skip
    for s in done:
        for p in feature_paths(tmp_path / "feats", s):
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(b"x")
    ranks = run_two_ranks(_my_slides, tmp_path, root=str(tmp_path), sizes=sizes, done=done)
    parts = [r["mine"] for r in ranks]
    assert sorted(parts[0] + parts[1]) == [f"s{i}" for i in range(6)]
    left = [sum(sizes[int(s[1:])] for s in part if s not in done) for part in parts]
    assert max(left) - min(left) <= 60, left


def test_teacher_cache_work_left_is_counted_per_slide(tmp_path):
    """Defect 9, fine-tuning's side: the ranks share the patches the cache still lacks."""
    from clam_mcmkd.mcmkd.teacher_cache import TeacherCache, TeacherSpec, missing_counts
    from clam_mcmkd.mcmkd.windows import SlideWindows, find_window_origins

    xs = np.arange(0, 512, 128)
    coords = np.stack(np.meshgrid(xs, xs, indexing="xy"), -1).reshape(-1, 2)
    origins = find_window_origins(coords, 128, 2)  # 4 windows of 4 patches
    slides = [SlideWindows(f"s{i}", str(tmp_path / f"s{i}.tif"), origins, 128, 128, 0)
              for i in range(3)]  # fmt: skip
    spec = TeacherSpec("t", "w", 224, None, False, "bilinear", (0.5,) * 3, (0.5,) * 3, "", 2,
                       "fp32")  # fmt: skip
    cache = TeacherCache(tmp_path / "cache", spec)
    cache.merge(slides[0], coords, np.zeros((16, 2), np.float32))  # all cached
    cache.merge(slides[1], coords[:4], np.zeros((4, 2), np.float32))  # a row of 4 cached
    items = [(0, [0, 1, 2, 3]), (1, [0, 1, 2, 3]), (2, [0, 1])]
    assert missing_counts(cache, slides, items, 2) == [0, 12, 8]
