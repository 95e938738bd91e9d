"""MCM-KD losses: how far the predicted features are from the teacher's.

:data:`LOSSES` maps a ``--loss`` name to a per-position loss and the space it compares in (the
teacher's own features, or per-dimension standardised ones). To add a loss, write the
per-position function and add it there. Losses are summed over the positions they score; the
trainer divides by the global number of scored positions, which keeps gradient accumulation and
DDP sharding exact. torch-free at import (the CLI reads the names).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def _cosine(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    import torch.nn.functional as F

    return 1.0 - F.cosine_similarity(pred, target, dim=-1, eps=1e-6)


def _smooth_l1(pred: torch.Tensor, target: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
    import torch.nn.functional as F

    return F.smooth_l1_loss(pred, target, reduction="none", beta=beta).mean(-1)


@dataclass(frozen=True)
class PositionLoss:
    fn: Callable[..., torch.Tensor]  # (..., D) x (..., D) -> (...)
    standardized: bool  # compare standardised targets (else predictions in the teacher's space)


LOSSES: dict[str, PositionLoss] = {
    "cosine": PositionLoss(_cosine, standardized=False),
    "smooth_l1": PositionLoss(_smooth_l1, standardized=True),
}


def position_losses(pred: torch.Tensor, target: torch.Tensor, loss: str) -> torch.Tensor:
    """Per-position loss (..., D) x (..., D) -> (...)."""
    if loss not in LOSSES:
        raise ValueError(f"unknown loss '{loss}' (choices: {tuple(LOSSES)})")
    return LOSSES[loss].fn(pred.float(), target.float())


def mcmkd_loss_sums(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, loss: str = "cosine"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum over masked positions, sum over visible positions) of the per-position loss.

    The training loss is ``masked_sum / n_masked + visible_weight * visible_sum / n_visible``
    with the counts taken over the whole optimizer step (all ranks, all micro-batches).
    """
    import torch

    per_pos = position_losses(pred, target, loss)
    # where, not per_pos[mask]: boolean indexing would wait for the GPU to count the mask
    return torch.where(mask, per_pos, 0.0).sum(), torch.where(mask, 0.0, per_pos).sum()


class TargetStandardizer:
    """Per-dimension standardisation of teacher features (the space of standardised losses)."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor):
        self.mean = mean.float()
        self.std = std.float().clamp_min(1e-6)

    def to(self, device) -> TargetStandardizer:
        return TargetStandardizer(self.mean.to(device), self.std.to(device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() - self.mean) / self.std

    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        return z.float() * self.std + self.mean

    def loss_space(self, pred: torch.Tensor, target: torch.Tensor, loss: str):
        """(prediction, target) in the space `loss` compares them in; predictions are
        standardised, targets the teacher's own features."""
        if LOSSES[loss].standardized:
            return pred, self.forward(target)
        return self.inverse(pred), target
