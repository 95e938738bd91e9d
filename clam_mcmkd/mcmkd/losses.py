"""MCM-KD losses: how far the predicted features are from the teacher's.

Each function returns the SUM over the positions it scores; the caller divides by the global
number of scored positions, which keeps gradient accumulation and DDP sharding exact.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSSES = ("cosine", "smooth_l1")


def position_losses(
    pred: torch.Tensor, target: torch.Tensor, loss: str, beta: float = 1.0
) -> torch.Tensor:
    """Per-position loss (..., D) x (..., D) -> (...)."""
    pred, target = pred.float(), target.float()
    if loss == "cosine":
        return 1.0 - F.cosine_similarity(pred, target, dim=-1, eps=1e-6)
    if loss == "smooth_l1":
        return F.smooth_l1_loss(pred, target, reduction="none", beta=beta).mean(-1)
    raise ValueError(f"unknown loss '{loss}' (choices: {LOSSES})")


def mcmkd_loss_sums(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, loss: str = "cosine"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum over masked positions, sum over visible positions) of the per-position loss.

    The training loss is ``masked_sum / n_masked + visible_weight * visible_sum / n_visible``
    with the counts taken over the whole optimizer step (all ranks, all micro-batches).
    """
    per_pos = position_losses(pred, target, loss)
    return per_pos[mask].sum(), per_pos[~mask].sum()


class TargetStandardizer:
    """Per-dimension standardisation of teacher features (for smooth-L1 on standardised targets)."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor):
        self.mean = mean.float()
        self.std = std.float().clamp_min(1e-6)

    def to(self, device) -> TargetStandardizer:
        return TargetStandardizer(self.mean.to(device), self.std.to(device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() - self.mean) / self.std

    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        return z.float() * self.std + self.mean
