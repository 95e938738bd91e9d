"""Context predictor: from the student's visible tokens to the teacher's masked features.

Discarded after training: only the student is exported.
"""

from __future__ import annotations

import torch
from torch import nn


class ContextPredictor(nn.Module):
    """Project student tokens to width d, add 2-D position embeddings, put a learned mask token
    at masked positions, run a small transformer, and map every position to the teacher width.

    The output lives in the teacher's standardised feature space (per-dimension mean 0, std 1
    over the training patches); the training loop maps it back with the teacher statistics.
    Teacher features often vary little around a large mean, so predicting raw features would
    start far from the targets and learn the context-dependent part slowly.
    """

    def __init__(
        self,
        student_dim: int,
        teacher_dim: int,
        grid: int,
        width: int = 256,
        depth: int = 2,
        heads: int = 4,
        mlp_ratio: float = 2.0,
    ):
        super().__init__()
        if width % heads:
            raise ValueError(f"predictor width {width} must be divisible by heads {heads}")
        self.grid = grid
        self.proj = nn.Linear(student_dim, width)
        self.mask_token = nn.Parameter(torch.zeros(width))
        # 2-D position: a row embedding plus a column embedding
        self.row_embed = nn.Parameter(torch.zeros(grid, width))
        self.col_embed = nn.Parameter(torch.zeros(grid, width))
        layer = nn.TransformerEncoderLayer(
            width,
            heads,
            dim_feedforward=int(width * mlp_ratio),
            dropout=0.0,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, teacher_dim)
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        nn.init.trunc_normal_(self.row_embed, std=0.02)
        nn.init.trunc_normal_(self.col_embed, std=0.02)
        # start near "predict the mean teacher feature" (0 in standardised space): a head whose
        # output spread is 0.1 x the features' own, so training learns the context's share
        nn.init.normal_(self.head.weight, std=0.1 / width**0.5)
        nn.init.zeros_(self.head.bias)

    def position_embedding(self) -> torch.Tensor:
        g = self.grid
        return (self.row_embed[:, None, :] + self.col_embed[None, :, :]).reshape(g * g, -1)

    def forward(self, visible_tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """visible_tokens (B, n_vis, Ds) in row-major order of the visible positions,
        mask (B, g^2) bool -> predictions (B, g^2, Dt) at every position."""
        b, n_pos = mask.shape
        proj = self.proj(visible_tokens)
        # the visible positions of each window in row-major order: a stable sort puts the
        # unmasked (0) ones first. On the device, with no boolean indexing (no host sync).
        visible = torch.argsort(mask.to(torch.uint8), dim=1, stable=True)[:, : proj.shape[1]]
        x = self.mask_token.to(proj.dtype).expand(b, n_pos, -1)
        x = x.scatter(1, visible.unsqueeze(-1).expand(-1, -1, proj.shape[-1]), proj)
        x = x + self.position_embedding().to(x.dtype)
        x = self.blocks(x)
        return self.head(self.norm(x))
