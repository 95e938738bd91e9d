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

from ..distributed import DistInfo, all_reduce_, all_reduce_grads, all_reduce_mean_
from ..encoders import PatchTransforms
from ..encoders.forward import autocast, model_input, to_device
from .config import FinetuneConfig
from .losses import TargetStandardizer, mcmkd_loss_sums
from .metrics import pretext_sums, scores_from_sums
from .objectives import input_masks, scored_per_window, scored_positions
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
    average_bn: bool = False  # unfrozen BatchNorm without SyncBatchNorm (CPU ranks)

    @property
    def params(self) -> list[nn.Parameter]:
        """What is trained (a frozen student, ``student_lr_mult`` 0, has no gradients)."""
        every = [*self.student.parameters(), *self.predictor.parameters()]
        return [p for p in every if p.requires_grad]


class Batches:
    """Which windows each rank loads for each micro-batch, from a given global step on.

    An epoch's shuffled order is computed once and kept (O(windows) per epoch, not per step:
    at 1M windows a per-step shuffle costs ~57 ms, half an hour of idle devices an epoch)."""

    def __init__(self, n_train: int, cfg: FinetuneConfig, info: DistInfo):
        self.n = n_train
        self.cfg = cfg
        self.info = info
        self.steps_per_epoch = math.ceil(n_train / cfg.batch_size)
        self.total_steps = self.steps_per_epoch * cfg.epochs
        # the last two epochs' orders: the loader's sampler runs a few steps ahead of training
        self._orders: dict[int, np.ndarray] = {}

    def epoch_order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            if len(self._orders) >= 2:
                del self._orders[min(self._orders)]
            self._orders[epoch] = epoch_order(self.n, self.cfg.seed, epoch)
        return self._orders[epoch]

    def step_windows(self, step: int) -> tuple[int, np.ndarray]:
        epoch, s = divmod(step, self.steps_per_epoch)
        order = self.epoch_order(epoch)
        return epoch, order[s * self.cfg.batch_size : (s + 1) * self.cfg.batch_size]

    def micro_batches(self, step: int) -> tuple[int, int, list[np.ndarray]]:
        """(epoch, windows in the whole step, this rank's window indices per micro-batch)."""
        epoch, chunk = self.step_windows(step)
        micro = np.array_split(chunk, self.cfg.grad_accum)
        return epoch, len(chunk), [m[self.info.rank :: self.info.world_size] for m in micro]


class StepRange:
    """Steps [start, end) of a run, planned lazily (nothing held per step): iterating gives
    this rank's non-empty micro-batches as index lists, in order (a DataLoader batch sampler);
    :meth:`steps` gives (step, epoch, windows in the step, micro-batches)."""

    def __init__(self, batches: Batches, start: int, end: int):
        self.batches, self.start, self.end = batches, start, end

    def steps(self):
        for step in range(self.start, self.end):
            yield (step, *self.batches.micro_batches(step))

    def __iter__(self):  # (window, epoch) items: the dataset reads the visible patches only
        for _, epoch, _, micro in self.steps():
            yield from ([(int(i), epoch) for i in ix] for ix in micro if len(ix))


def make_loader(dataset, batch_sampler, num_workers: int, pin_memory: bool = False):
    """One loader over the given batches, in order (reading workers prefetch across steps)."""
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=batch_sampler,
        num_workers=num_workers,
        persistent_workers=False,
        pin_memory=pin_memory,
    )


def micro_batch_stream(loader, micro_lists, empty: dict):
    """One batch per micro-batch, in order: the loader's for a rank's windows, `empty` (0
    windows) where the rank has none, so every rank runs every forward and collective."""
    for ix in micro_lists:
        yield next(loader) if len(ix) else empty


def empty_batch(patch_size: int, grid: int, teacher_dim: int) -> dict:
    """A micro-batch of 0 windows, shaped like the loader's."""
    return {
        "patches": torch.zeros((0, grid * grid, patch_size, patch_size, 3), dtype=torch.uint8),
        "teacher": torch.zeros((0, grid * grid, teacher_dim)),
    }


class Float32SyncBatchNorm(nn.SyncBatchNorm):
    """SyncBatchNorm fed float32, whatever autocast makes of its input.

    A rank with 0 windows sends its statistics in its input's dtype, ranks with data send
    float32 (ATen's CUDA batch-norm statistics of bf16/fp16 input are float32): under autocast
    the all-gather sizes differ ("Received data size doesn't match expected size"). In float32
    they agree; the output goes back to the input's dtype."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if input.dtype == torch.float32:
            return super().forward(input)
        with torch.autocast(input.device.type, enabled=False):
            return super().forward(input.float()).to(input.dtype)


def sync_batch_norm(module: nn.Module) -> nn.Module:
    """`module` with every BatchNorm a :class:`Float32SyncBatchNorm` (same state dict keys)."""
    module = nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for m in module.modules():
        if type(m) is nn.SyncBatchNorm:
            m.__class__ = Float32SyncBatchNorm
    return module


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
    patches = batch["patches"]  # (B, g^2 or n_vis, P, P, 3) uint8, on the CPU like the mask
    b = patches.shape[0]
    # the visible patches (B * n_vis, P, P, 3), row-major within each window; the indices come
    # from the CPU-side mask, so the device never has to count a boolean mask
    keep = torch.nonzero(~mask.reshape(-1)).squeeze(1)
    flat = patches.reshape(-1, *patches.shape[2:])
    if patches.shape[1] == mask.shape[1]:  # whole windows: pick the visible patches
        visible = to_device(flat, device).index_select(0, to_device(keep, device))
    else:  # the loader read the visible patches only
        visible = to_device(flat, device)
    x = model_input(visible, learner.student_tf, device)
    with autocast(device, precision, training=True):
        tokens = learner.student(x)  # an empty rank too: SyncBatchNorm's collectives run here
        if b == 0:  # no predictor on 0 windows: flash attention raised "batch size must be
            # positive" before torch 2.6 (pytorch#133780); the output keeps the student's graph
            width = learner.predictor.head.out_features
            return tokens.float().sum() * 0.0 + tokens.new_zeros((0, mask.shape[1], width)).float()
        tokens = tokens.reshape(b, len(keep) // b, learner.student.out_dim)
        return learner.predictor(tokens, to_device(mask, device)).float()


def train_step(
    learner: Learner, batches, micro: list[np.ndarray], epoch: int, n_step: int,
    cfg: FinetuneConfig, device: str, info: DistInfo,
) -> tuple[torch.Tensor, list[float]]:  # fmt: skip
    """One optimizer step over this rank's micro-batches (`batches` yields one per entry of
    `micro`, empty ones included: every rank runs every forward); (loss summed over all ranks,
    a 0-d tensor on `device`, read it when logging; group lrs). No host sync inside."""
    k_scored = scored_per_window(cfg)  # masked positions (patch_kd: all) of each window
    n_rest = cfg.grid * cfg.grid - k_scored
    masked_norm = 1.0 / (n_step * k_scored)
    visible_norm = cfg.visible_weight / (n_step * n_rest) if n_rest else 0.0
    learner.optimizer.zero_grad(set_to_none=True)
    loss_sum = torch.zeros((), device=device)
    for ix in micro:
        batch = next(batches)
        mask = torch.from_numpy(input_masks(cfg, ix, epoch))
        pred = forward_windows(learner, batch, mask, device, cfg.precision)
        target = to_device(batch["teacher"], device).float()
        pred, target = learner.standardizer.loss_space(pred, target, cfg.loss)
        scored = to_device(scored_positions(cfg, mask), device)
        m_sum, v_sum = mcmkd_loss_sums(pred, target, scored, cfg.loss)
        loss = m_sum * masked_norm + (v_sum * visible_norm if visible_norm > 0 else 0.0)
        loss.backward()
        loss_sum += loss.detach()
    params = learner.params
    all_reduce_grads(params, info)
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
    lrs = [g["lr"] for g in learner.optimizer.param_groups]
    learner.optimizer.step()
    learner.scheduler.step()
    if learner.average_bn:
        all_reduce_mean_(bn_statistics(learner.student), info)
    return all_reduce_(loss_sum, info), lrs


def bn_statistics(module: nn.Module) -> list[torch.Tensor]:
    """The running means and variances of every BatchNorm layer of `module`."""
    return [
        t
        for m in module.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
        for t in (m.running_mean, m.running_var)
    ]


@torch.no_grad()
def evaluate(
    learner: Learner,
    dataset: WindowDataset,
    teacher_mean: torch.Tensor,
    cfg: FinetuneConfig,
    device: str,
    info: DistInfo,
) -> dict[str, float]:
    """The scored positions of the validation windows (masked ones, fixed masks; patch_kd:
    all): cosine to the teacher and the "predict the mean teacher feature" baseline's, and on
    standardised teacher features R², its mean baseline and the cosine (``metrics.py``)."""
    student, predictor = learner.student, learner.predictor
    was_training = student.training, predictor.training
    student.eval()
    predictor.eval()
    idx = np.arange(len(dataset))[info.rank :: info.world_size]
    mean = teacher_mean.to(device)
    # cos(pred), cos(mean), n scored, then pretext_sums: on the device, read once at the end
    sums = torch.zeros(4 + 4 + int(mean.numel()), dtype=torch.float64, device=device)
    for start in range(0, len(idx), max(1, cfg.batch_size)):
        ix = idx[start : start + cfg.batch_size]
        batch = torch.utils.data.default_collate([dataset[(int(i), VAL_MASK_EPOCH)] for i in ix])
        mask = torch.from_numpy(input_masks(cfg, ix, VAL_MASK_EPOCH))
        z_pred = forward_windows(learner, batch, mask, device, cfg.precision)
        pred = learner.standardizer.inverse(z_pred)
        target = to_device(batch["teacher"], device).float()
        m = to_device(scored_positions(cfg, mask), device)
        cos = nn.functional.cosine_similarity(pred, target, dim=-1)
        cos_mean = nn.functional.cosine_similarity(mean.expand_as(target), target, dim=-1)
        scored = [torch.where(m, c, 0.0).sum() for c in (cos, cos_mean)]  # no mask indexing
        pretext = pretext_sums(z_pred, learner.standardizer.forward(target), m)
        sums += torch.cat([torch.stack([*scored, m.sum(), torch.zeros((), device=device)])
                           .double(), pretext])  # fmt: skip
    sums = all_reduce_(sums, info).tolist()
    if was_training[0]:
        set_student_mode(student, cfg.freeze_bn)
    predictor.train(was_training[1])
    n = max(sums[2], 1.0)
    return {"cosine": sums[0] / n, "mean_baseline_cosine": sums[1] / n,
            "positions": int(sums[2]), **scores_from_sums(sums[4:])}  # fmt: skip
