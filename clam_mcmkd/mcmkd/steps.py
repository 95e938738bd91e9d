"""The machinery of an optimizer step: which windows, the forward, the loss, the update.

Determinism (what makes exact resume and DDP == one process possible): the window list, the
epoch order and every mask are functions of the seed alone; an optimizer step always consumes
the same ``batch_size`` windows, whatever the number of ranks or accumulation steps; the loss
is normalised by the whole step's position counts, and gradients are summed across ranks with
one all-reduce, so the update is the same sum in every layout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..distributed import DistInfo, all_reduce_grads, all_reduce_sum
from ..encoders import PatchTransforms
from ..encoders.forward import autocast, model_input
from .config import FinetuneConfig
from .losses import TargetStandardizer, mcmkd_loss_sums
from .masking import num_masked, window_masks
from .predictor import ContextPredictor
from .windows import WindowDataset, epoch_order

VAL_MASK_EPOCH = 1_000_000  # validation masks: fixed, and never those of a training epoch


@dataclass
class Learner:
    """What an optimizer step reads and updates."""

    student: nn.Module
    student_tf: PatchTransforms
    predictor: ContextPredictor
    standardizer: TargetStandardizer
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler

    @property
    def params(self) -> list[nn.Parameter]:
        return [*self.student.parameters(), *self.predictor.parameters()]


class Batches:
    """Which windows each rank loads for each micro-batch, from a given global step on."""

    def __init__(self, n_train: int, cfg: FinetuneConfig, info: DistInfo):
        self.n = n_train
        self.cfg = cfg
        self.info = info
        self.steps_per_epoch = math.ceil(n_train / cfg.batch_size)
        self.total_steps = self.steps_per_epoch * cfg.epochs

    def step_windows(self, step: int) -> tuple[int, np.ndarray]:
        epoch, s = divmod(step, self.steps_per_epoch)
        order = epoch_order(self.n, self.cfg.seed, epoch)
        return epoch, order[s * self.cfg.batch_size : (s + 1) * self.cfg.batch_size]

    def micro_batches(self, step: int) -> tuple[int, int, list[np.ndarray]]:
        """(epoch, windows in the whole step, this rank's window indices per micro-batch)."""
        epoch, chunk = self.step_windows(step)
        micro = np.array_split(chunk, self.cfg.grad_accum)
        return epoch, len(chunk), [m[self.info.rank :: self.info.world_size] for m in micro]


def make_loader(dataset, index_lists, num_workers: int):
    """One loader over the given batches, in order (reading workers prefetch across steps)."""
    lists = [list(map(int, ix)) for ix in index_lists if len(ix)]
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=lists,
        num_workers=num_workers,
        persistent_workers=False,
        pin_memory=False,
    )


def set_student_mode(student: nn.Module, freeze_bn: bool) -> None:
    """Train mode, but BatchNorm layers keep their running statistics when frozen."""
    student.train()
    if freeze_bn:
        for m in student.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


def build_optimizer(cfg: FinetuneConfig, student: nn.Module, predictor: nn.Module):
    groups = []
    for module, lr in ((student, cfg.lr * cfg.student_lr_mult), (predictor, cfg.lr)):
        decay = [p for p in module.parameters() if p.requires_grad and p.ndim > 1]
        no_decay = [p for p in module.parameters() if p.requires_grad and p.ndim <= 1]
        groups.append({"params": decay, "lr": lr, "weight_decay": cfg.weight_decay})
        groups.append({"params": no_decay, "lr": lr, "weight_decay": 0.0})
    # fused: one kernel per step for all parameters (CPU and CUDA alike)
    return torch.optim.AdamW(groups, betas=(0.9, 0.95), fused=True)


def lr_factor(step: int, total: int, warmup_frac: float, min_ratio: float) -> float:
    """Linear warm-up, then cosine decay to `min_ratio` of the base rate."""
    warmup = max(1, round(warmup_frac * total)) if warmup_frac > 0 else 0
    if step < warmup:
        return (step + 1) / warmup
    progress_ = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * min(progress_, 1.0)))


def forward_windows(
    learner: Learner, batch: dict, mask: torch.Tensor, device: str, precision: str
) -> torch.Tensor:
    """Student on each visible patch alone, then the predictor on the window: (B, g^2, Dt)."""
    patches = batch["patches"]  # (B, g^2, P, P, 3) uint8
    b = patches.shape[0]
    visible = patches[~mask.cpu()]  # (B * n_vis, P, P, 3), row-major within each window
    x = model_input(visible, learner.student_tf, device)
    with autocast(device, precision):
        tokens = learner.student(x).reshape(b, -1, learner.student.out_dim)
        return learner.predictor(tokens, mask.to(device)).float()


def train_step(
    learner: Learner, loader, micro: list[np.ndarray], epoch: int, n_step: int,
    cfg: FinetuneConfig, device: str, info: DistInfo,
) -> tuple[float, list[float]]:  # fmt: skip
    """One optimizer step over this rank's micro-batches; (loss over all ranks, group lrs)."""
    k_masked = num_masked(cfg.grid, cfg.mask_ratio)
    masked_norm = 1.0 / (n_step * k_masked)
    visible_norm = cfg.visible_weight / (n_step * (cfg.grid * cfg.grid - k_masked))
    learner.optimizer.zero_grad(set_to_none=True)
    loss_sum = 0.0
    for ix in [m for m in micro if len(m)]:
        batch = next(loader)
        mask = torch.from_numpy(
            window_masks(ix, cfg.grid, cfg.mask_ratio, cfg.mask_strategy, cfg.seed, epoch)
        )
        pred = forward_windows(learner, batch, mask, device, cfg.precision)
        target = batch["teacher"].to(device).float()
        pred, target = learner.standardizer.loss_space(pred, target, cfg.loss)
        m_sum, v_sum = mcmkd_loss_sums(pred, target, mask.to(device), cfg.loss)
        loss = m_sum * masked_norm + (v_sum * visible_norm if cfg.visible_weight > 0 else 0.0)
        loss.backward()
        loss_sum += float(loss.detach())
    params = learner.params
    all_reduce_grads(params, info)
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
    lrs = [g["lr"] for g in learner.optimizer.param_groups]
    learner.optimizer.step()
    learner.scheduler.step()
    (loss_total,) = all_reduce_sum([loss_sum], info)
    return loss_total, lrs


@torch.no_grad()
def evaluate(
    learner: Learner,
    dataset: WindowDataset,
    teacher_mean: torch.Tensor,
    cfg: FinetuneConfig,
    device: str,
    info: DistInfo,
) -> dict[str, float]:
    """Masked-patch cosine to the teacher on validation windows (fixed masks), and the
    "predict the mean teacher feature" baseline on the same positions."""
    student, predictor = learner.student, learner.predictor
    was_training = student.training, predictor.training
    student.eval()
    predictor.eval()
    idx = np.arange(len(dataset))[info.rank :: info.world_size]
    sums = [0.0, 0.0, 0.0]  # cos(pred), cos(mean), n masked
    for start in range(0, len(idx), max(1, cfg.batch_size)):
        ix = idx[start : start + cfg.batch_size]
        batch = torch.utils.data.default_collate([dataset[int(i)] for i in ix])
        mask = torch.from_numpy(
            window_masks(ix, cfg.grid, cfg.mask_ratio, cfg.mask_strategy, cfg.seed, VAL_MASK_EPOCH)
        )
        pred = learner.standardizer.inverse(
            forward_windows(learner, batch, mask, device, cfg.precision)
        )
        target = batch["teacher"].to(device).float()
        m = mask.to(device)
        cos = nn.functional.cosine_similarity(pred[m], target[m], dim=-1)
        cos_mean = nn.functional.cosine_similarity(
            teacher_mean.to(device).expand_as(target[m]), target[m], dim=-1
        )
        sums[0] += cos.sum().item()
        sums[1] += cos_mean.sum().item()
        sums[2] += float(m.sum().item())
    sums = all_reduce_sum(sums, info)
    if was_training[0]:
        set_student_mode(student, cfg.freeze_bn)
    predictor.train(was_training[1])
    n = max(sums[2], 1.0)
    return {"cosine": sums[0] / n, "mean_baseline_cosine": sums[1] / n, "positions": int(sums[2])}
