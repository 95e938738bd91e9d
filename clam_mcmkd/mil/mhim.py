"""MHIM-MIL (Tang et al., ICCV 2023): masked hard instance mining with a momentum teacher.

Follows the v1 code of ``DearCaat/MHIM-MIL`` (``modules/mhim.py``: ``select_mask_fn``,
``get_mask``, ``SoftTargetCrossEntropy_v2``; ``utils.py``: ``ema_update``,
``cosine_scheduler``; ``main.py``: the training step). Per bag:

1. the teacher (an EMA of the student, initialised from a trained baseline of the same
   architecture) scores every instance with its attention and gives its bag embedding;
2. masked: a random share of all instances (``mask_ratio``), the lowest-attention share
   (``mask_ratio_l``) and the highest-attention share (``mask_ratio_h``, of which a random
   ``mask_ratio_hr`` is kept masked; decayed to 0 on a cosine over training);
3. the student sees the rest; loss = CE + ``cl_alpha`` x soft-target CE between the student's
   and the teacher's bag embeddings (temperatures ``temp_s``, ``temp_t``);
4. after the optimiser step, teacher <- momentum x teacher + (1 - momentum) x student.

Here the student and the teacher are this package's ABMIL (CLAM-SB's module), so a checkpoint is
an ABMIL checkpoint that ``eval``, ``heatmap`` and CLAM's ``eval.py`` read. The masking and the
EMA draw random numbers in the reference's order, so with one seed and the same attention they
select the same instances (``benchmarks/parity_mil_reference.py``).
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..ranges import RANGES, first_refusal
from ..utils import ClamMcmkdError
from .data import bag_order
from .nets import load_weights
from .results import checkpoint_path, run_config

STUDENT_INITS = ("none", "fc", "all")  # v1's --init_stu_type
FIRST_LAYER = "attention_net.0."  # ABMIL's instance embedding (v1's patch_to_emb)


def _topk_masked(attn, n, k, largest, random_ratio):
    """v1's ``select_mask_fn`` core: the k most (least) attended, then a random share of them."""
    idx = torch.topk(attn, k, largest=largest).indices.squeeze(0)
    if random_ratio < 1.0:
        perm = torch.randperm(idx.size(0), device=idx.device)
        idx = torch.gather(idx, 0, perm[: int(np.ceil(idx.size(0) * random_ratio))])
    return idx


def _select(attn, n, ratio, largest, masked=None, random_ratio=1.0):
    """Indices to mask for one criterion, united with those already masked (v1's arithmetic:
    ``ratio / random_ratio`` of the bag is ranked, then ``random_ratio`` of those is drawn)."""
    scaled = ratio / random_ratio
    if scaled > 1:
        random_ratio, scaled = ratio, 1.0
    idx = _topk_masked(attn, n, int(np.ceil(n * scaled)), largest, random_ratio)
    return idx if masked is None else torch.cat([idx, masked]).unique()


def mask_instances(
    attn: torch.Tensor, ratio: float, ratio_l: float, ratio_h: float, ratio_hr: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept, masked) instance indices of one bag from the teacher's attention ``attn`` (1, N).

    v1's ``get_mask`` (single attention head, ``select_inv`` off): random masking of ``ratio``
    (ranked by attention, then shuffled: v1 passes ``random_ratio=0.001``), low-attention
    ``ratio_l``, high-attention ``ratio_h`` with a random ``ratio_hr`` of them. Kept indices
    are in bag order.
    """
    attn = attn.reshape(1, -1)
    n = attn.shape[1]
    masked = None
    if ratio > 0:
        masked = _select(attn, n, ratio, largest=False, random_ratio=0.001)
    if ratio_l > 0:
        masked = _select(attn, n, ratio_l, largest=False, masked=masked)
    if ratio_h > 0:
        masked = _select(attn, n, ratio_h, largest=True, masked=masked, random_ratio=ratio_hr)
    if masked is None:
        return torch.arange(n, device=attn.device), attn.new_zeros(0, dtype=torch.long)
    keep = torch.ones(n, dtype=torch.bool, device=attn.device)
    keep[masked] = False
    return keep.nonzero().squeeze(1), masked


def cosine_schedule(base: float, final: float, n_steps: int) -> np.ndarray:
    """v1's ``cosine_scheduler`` without warm-up: step i -> final + (base-final)(1+cos(pi i/n))/2."""
    steps = np.arange(n_steps)
    return final + 0.5 * (base - final) * (1 + np.cos(np.pi * steps / max(n_steps, 1)))


@torch.no_grad()
def ema_update(student: torch.nn.Module, teacher: torch.nn.Module, momentum: float) -> None:
    """teacher <- momentum x teacher + (1 - momentum) x student, parameter by parameter."""
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"EMA momentum must be in [0, 1], got {momentum}")
    for p_s, p_t in zip(student.parameters(), teacher.parameters()):
        p_t.mul_(momentum).add_(p_s.detach(), alpha=1.0 - momentum)


def soft_target_ce(student: torch.Tensor, teacher: torch.Tensor, temp_t: float, temp_s: float):
    """v1's ``SoftTargetCrossEntropy_v2``: CE of the student's embedding against the teacher's
    sharpened softmax (the consistency term)."""
    target = F.softmax(teacher.detach() / temp_t, dim=-1)
    return torch.sum(-target * F.log_softmax(student / temp_s, dim=-1), dim=-1).mean()


class MhimTrainer:
    """One fold's teacher and schedule; ``train_epoch`` replaces the plain epoch."""

    def __init__(self, student, cfg, fold: int, n_train: int):
        base_dir = Path(cfg.mhim_teacher_init)
        ckpt = checkpoint_path(base_dir, fold)
        if not ckpt.is_file():
            raise ClamMcmkdError(f"{ckpt}: the MHIM teacher's baseline checkpoint is missing")
        before = run_config(base_dir).get("feature_norm", "none")
        if before != cfg.feature_norm:
            raise ClamMcmkdError(
                f"{base_dir}: the baseline was trained with feature_norm={before!r}, "
                f"this run uses {cfg.feature_norm!r}"
            )
        device = next(student.parameters()).device
        self.teacher = copy.deepcopy(student)
        load_weights(self.teacher, ckpt, map_location=device)
        self.teacher.requires_grad_(False)
        if cfg.mhim_student_init == "all":
            student.load_state_dict(self.teacher.state_dict())
        elif cfg.mhim_student_init == "fc":
            first = {
                k: v for k, v in self.teacher.state_dict().items() if k.startswith(FIRST_LAYER)
            }
            student.load_state_dict(first, strict=False)
        n_steps = cfg.max_epochs * n_train
        h = cfg.mhim_mask_ratio_h
        self.ratio_h = cosine_schedule(h, 0.0, n_steps) if cfg.mhim_mrh_schedule else None
        self.cfg, self.step, self.n_train = cfg, 0, n_train

    def train_epoch(self, model, bags, store, optimizer, loss_fn, n_classes, device, epoch):
        cfg = self.cfg
        model.train()
        self.teacher.train()  # v1: the teacher's dropout is on while it masks
        totals = {"loss": 0.0, "inst_loss": 0.0, "error": 0.0, "kept": 0.0}
        for i, idx in enumerate(bag_order(bags, cfg.weighted_sample, n_classes)):
            bag = bags[idx]
            data = store[bag.slide_id].to(device, non_blocking=True)
            label = torch.tensor([bag.label], device=device)
            with torch.no_grad():
                _, _, _, attn, tea = self.teacher(data, return_features=True)
            step = epoch * self.n_train + i
            ratio_h = cfg.mhim_mask_ratio_h if self.ratio_h is None else self.ratio_h[step]
            kept, _ = mask_instances(
                attn, cfg.mhim_mask_ratio, cfg.mhim_mask_ratio_l, ratio_h, cfg.mhim_mask_ratio_hr
            )
            logits, _, Y_hat, _, stu = model(data[kept], return_features=True)
            loss = loss_fn(logits, label)
            consistency = soft_target_ce(
                stu["features"], tea["features"], cfg.mhim_temp_t, cfg.mhim_temp_s
            )
            (loss + cfg.mhim_cl_alpha * consistency).backward()
            optimizer.step()
            optimizer.zero_grad()
            ema_update(model, self.teacher, cfg.mhim_momentum)
            totals["loss"] += float(loss.detach())
            totals["inst_loss"] += float(consistency.detach())  # logged in the inst_loss slot
            totals["error"] += float(int(Y_hat) != bag.label)
            totals["kept"] += len(kept) / max(data.shape[0], 1)
        return {key: value / max(len(bags), 1) for key, value in totals.items()}


MHIM_RANGED = tuple(name for name in RANGES if name.startswith("mhim_"))


def check_mhim_config(cfg) -> None:
    """Bad MHIM settings fail before any data is read."""
    if cfg.mhim_student_init not in STUDENT_INITS:
        raise ClamMcmkdError(f"mhim_student_init must be one of {STUDENT_INITS}")
    refusal = first_refusal(cfg, MHIM_RANGED)  # the CLI's ranges, for Python callers too
    if refusal:
        raise ClamMcmkdError(refusal)
