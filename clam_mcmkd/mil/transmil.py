"""TransMIL (Shao et al., NeurIPS 2021): two Nyström-attention layers, a PPEG positional encoder
and a class token, with CLAM's forward contract (built by name in :mod:`.models`).

Written for this project with the module names, creation order and defaults of the reference
implementation (``szc19990412/TransMIL``, ``models/TransMIL.py``): its state dicts load here
strictly (and back), a fixed seed initialises the same weights, and the same weights give the
same logits (``benchmarks/parity_mil_reference.py``; the test compares golden logits). The one
change is the input width, ``embed_dim`` instead of a fixed 1024; ``drop_out`` is not used
(the reference's only dropout is 0.1 inside each attention layer). The attention layer is the
``nystrom-attention`` package, the one the reference imports: one numerical kernel fewer to
write, and the reference's parameter names for free.

No per-patch attention: the class token attends through two approximated attention layers
with a convolution (PPEG) in between, so ``heatmap`` refuses TransMIL rather than draw a map
that is not what pooled the bag.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from nystrom_attention import NystromAttention
from torch import nn

WIDTH = 512  # the reference's token width (fixed there)


class TransLayer(nn.Module):
    """Pre-norm Nyström self-attention with a residual (the reference's settings)."""

    def __init__(self, norm_layer=nn.LayerNorm, dim: int = WIDTH):
        super().__init__()
        self.norm = norm_layer(dim)
        self.attn = NystromAttention(
            dim=dim,
            dim_head=dim // 8,
            heads=8,
            num_landmarks=dim // 2,
            pinv_iterations=6,
            residual=True,
            dropout=0.1,
        )

    def forward(self, x):
        return x + self.attn(self.norm(x))


class PPEG(nn.Module):
    """Pyramid position encoding: depth-wise 7/5/3 convolutions over the tokens laid on a square."""

    def __init__(self, dim: int = WIDTH):
        super().__init__()
        self.proj = nn.Conv2d(dim, dim, 7, 1, 7 // 2, groups=dim)
        self.proj1 = nn.Conv2d(dim, dim, 5, 1, 5 // 2, groups=dim)
        self.proj2 = nn.Conv2d(dim, dim, 3, 1, 3 // 2, groups=dim)

    def forward(self, x, H: int, W: int):
        B, _, C = x.shape
        cls_token, feat_token = x[:, 0], x[:, 1:]
        cnn_feat = feat_token.transpose(1, 2).view(B, C, H, W)
        x = self.proj(cnn_feat) + cnn_feat + self.proj1(cnn_feat) + self.proj2(cnn_feat)
        x = x.flatten(2).transpose(1, 2)
        return torch.cat((cls_token.unsqueeze(1), x), dim=1)


class TransMIL(nn.Module):
    """TransMIL with CLAM's ``forward(h, label=None, instance_eval=False)`` contract.

    ``h`` is one bag, (N, embed_dim) (or (1, N, embed_dim)). The bag is padded to a square
    number of tokens by repeating its first instances, as the reference does.
    """

    def __init__(self, n_classes: int = 2, embed_dim: int = 1024, **_clam_kwargs):
        super().__init__()
        # creation order = the reference's, so a seed gives its initial weights
        self.pos_layer = PPEG(dim=WIDTH)
        self._fc1 = nn.Sequential(nn.Linear(embed_dim, WIDTH), nn.ReLU())
        self.cls_token = nn.Parameter(torch.randn(1, 1, WIDTH))
        self.n_classes = n_classes
        self.layer1 = TransLayer(dim=WIDTH)
        self.layer2 = TransLayer(dim=WIDTH)
        self.norm = nn.LayerNorm(WIDTH)
        self._fc2 = nn.Linear(WIDTH, n_classes)

    def bag_embedding(self, h: torch.Tensor) -> torch.Tensor:
        """The class token after both layers and the final norm, (1, 512)."""
        h = self._fc1(h.float()[None] if h.dim() == 2 else h.float())
        n = h.shape[1]
        side = math.ceil(math.sqrt(n))
        h = torch.cat([h, h[:, : side * side - n, :]], dim=1)
        h = torch.cat((self.cls_token.expand(h.shape[0], -1, -1), h), dim=1)
        h = self.layer1(h)
        h = self.pos_layer(h, side, side)
        h = self.layer2(h)
        return self.norm(h)[:, 0]

    def forward(self, h, label=None, instance_eval=False, return_features=False, **_):
        pooled = self.bag_embedding(h)
        logits = self._fc2(pooled)
        results: dict = {"features": pooled} if return_features else {}
        Y_hat = logits.argmax(dim=1, keepdim=True)
        return logits, F.softmax(logits, dim=1), Y_hat, None, results
