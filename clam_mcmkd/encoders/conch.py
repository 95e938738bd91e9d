"""CONCH v1.5's vision tower from timm and a small head, without the CONCH package.

The published tower (TRIDENT vendors it as ``model_zoo/conchv1_5/conchv1_5.py``) is a timm
ViT-L/16 trunk built at 224 px (layer scale 1.0) whose position embedding is interpolated,
DINO-style (bicubic, ``scale_factor`` with a +0.1 guard), to the 448 px input; all tokens go
through an attentional pooler (one query, 8 heads, 1024 -> 768) and a LayerNorm: 768-d.
Attribute names follow the published state dict (``trunk.*``, ``attn_pool_contrast.*``,
``ln_contrast.*``), so ``pytorch_model_vision.bin`` loads with ``strict=True``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class AttentionalPooler(nn.Module):
    """Learned queries cross-attending over the tokens (CoCa's pooler), plain torch."""

    def __init__(self, d_model: int = 768, context_dim: int = 1024, n_head: int = 8,
                 n_queries: int = 1):  # fmt: skip
        super().__init__()
        self.query = nn.Parameter(torch.randn(n_queries, d_model))
        self.heads = n_head
        self.scale = (d_model // n_head) ** -0.5
        self.ln_k = nn.LayerNorm(context_dim)
        self.ln_q = nn.LayerNorm(d_model)
        self.to_q = nn.Linear(d_model, d_model, bias=False)
        self.to_kv = nn.Linear(context_dim, 2 * d_model, bias=False)
        self.to_out = nn.Linear(d_model, d_model, bias=False)

    def _split(self, t: torch.Tensor) -> torch.Tensor:  # (B, N, H*D) -> (B, H, N, D)
        return t.unflatten(-1, (self.heads, -1)).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, context_dim) -> (B, n_queries, d_model)."""
        x = self.ln_k(x)
        q = self.to_q(self.ln_q(self.query)).expand(x.shape[0], -1, -1)
        k, v = self.to_kv(x).chunk(2, dim=-1)
        q, k, v = (self._split(t) for t in (q, k, v))
        attn = (q * self.scale) @ k.transpose(-2, -1)
        out = attn.softmax(dim=-1) @ v
        return self.to_out(out.transpose(1, 2).flatten(2))


class ConchV15Tower(nn.Module):
    """trunk (timm ViT) -> all tokens -> attentional pooler -> LayerNorm."""

    def __init__(self, arch: str, trunk_kwargs: dict[str, Any]):
        super().__init__()
        import timm

        self.trunk = timm.create_model(arch, pretrained=False, **trunk_kwargs)
        width = int(self.trunk.num_features)
        self.attn_pool_contrast = AttentionalPooler(768, width, n_head=8, n_queries=1)
        self.ln_contrast = nn.LayerNorm(768)
        self.out_dim = 768
        self.num_prefix_tokens = int(self.trunk.num_prefix_tokens)
        self._register_load_state_dict_pre_hook(self._fit_pos_embed)

    def _fit_pos_embed(self, state, prefix, *args) -> None:
        """A checkpoint's position embedding on another grid is resampled to the trunk's 224 px
        grid (bilinear, no antialias), as the published loader does."""
        from timm.layers import resample_abs_pos_embed

        key = prefix + "trunk.pos_embed"
        own = self.trunk.pos_embed
        if key in state and state[key].shape != own.shape and not own.is_meta:
            state[key] = resample_abs_pos_embed(
                state[key], new_size=list(self.trunk.patch_embed.grid_size),
                num_prefix_tokens=self.num_prefix_tokens, interpolation="bilinear",
                antialias=False, verbose=False,
            )  # fmt: skip

    def position_embedding(self, height: int, width: int) -> torch.Tensor:
        """The trunk's pos embed at an input of (height, width) px, DINO's interpolation."""
        pos = self.trunk.pos_embed
        n = pos.shape[1] - 1
        side = int(math.sqrt(n))
        patch = self.trunk.patch_embed.patch_size[0]
        h0, w0 = height // patch, width // patch
        if h0 * w0 == n and height == width:
            return pos
        grid = pos[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
        scale = ((h0 + 0.1) / side, (w0 + 0.1) / side)
        grid = F.interpolate(grid, scale_factor=scale, mode="bicubic")
        grid = grid.permute(0, 2, 3, 1).reshape(1, -1, pos.shape[-1])
        return torch.cat([pos[:, :1], grid], dim=1)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The trunk's normed token sequence (B, 1 + patches, 1024)."""
        t = self.trunk
        tokens = t.patch_embed.proj(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([t.cls_token.expand(x.shape[0], -1, -1), tokens], dim=1)
        tokens = t.norm_pre(tokens + self.position_embedding(x.shape[-2], x.shape[-1]))
        return t.norm(t.blocks(tokens))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.attn_pool_contrast(self.forward_features(x))[:, 0]
        return self.ln_contrast(pooled)
