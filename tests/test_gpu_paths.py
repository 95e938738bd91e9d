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
