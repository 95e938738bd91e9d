"""Attention-MIL networks with CLAM's semantics: ABMIL, CLAM-SB, CLAM-MB (built by name in
:mod:`.models`), their losses, and their weights on disk.

Written for this project (not copied from CLAM) but with the same layer order, module names and
defaults, so that a state dict saved here loads into CLAM's ``CLAM_SB``/``CLAM_MB`` (and back),
and a fixed seed initialises the same weights. ``abmil`` is CLAM-SB trained without its instance
loss (CLAM's ``--no_inst_cluster``): same module, so CLAM's ``eval.py --model_type clam_sb``
reads its checkpoints.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..encoders.checkpoint import load_checkpoint
from ..utils import ClamMcmkdError, atomic_path
from .models import MIL_LOSSES, SIZES


class SmoothTop1SVM(nn.Module):
    """Smooth top-1 multiclass SVM loss (Berrada et al. 2018), CLAM's ``svm`` bag/instance loss.

    loss = tau * logsumexp((s + alpha * [j != y] - s_y) / tau), switching to the hard hinge
    max_j(s + alpha * [j != y]) - s_y where the top-2 gap makes the smooth form numerically
    identical (as the ``topk`` package does). Averaged over the batch.
    """

    def __init__(self, n_classes: int, alpha: float = 1.0, tau: float = 1.0, thresh: float = 1e3):
        super().__init__()
        self.n_classes = n_classes
        self.alpha = alpha
        self.tau = tau
        self.hard_gap = tau * math.log(thresh)

    def forward(self, scores: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        margin = self.alpha * (1.0 - F.one_hot(target, self.n_classes).to(scores.dtype))
        shifted = scores + margin - scores.gather(1, target[:, None])
        smooth = self.tau * torch.logsumexp(shifted / self.tau, dim=1)
        hard = shifted.max(dim=1).values
        top2 = scores.topk(min(2, scores.shape[1]), dim=1).values
        use_hard = (top2[:, 0] - top2[:, -1]) >= self.hard_gap
        return torch.where(use_hard.detach(), hard, smooth).mean()


def make_loss(name: str, n_classes: int) -> nn.Module:
    if name == "ce":
        return nn.CrossEntropyLoss()
    if name == "svm":
        return SmoothTop1SVM(n_classes)
    raise ValueError(f"unknown loss '{name}' (choose {' or '.join(MIL_LOSSES)})")


class AttnNet(nn.Module):
    """Two-layer attention scorer (CLAM's ``Attn_Net``): returns (scores N x K, input)."""

    def __init__(self, L: int, D: int, dropout: bool, n_classes: int = 1):
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(L, D), nn.Tanh()]
        if dropout:
            layers.append(nn.Dropout(0.25))
        layers.append(nn.Linear(D, n_classes))
        self.module = nn.Sequential(*layers)

    def forward(self, x):
        return self.module(x), x


class GatedAttnNet(nn.Module):
    """Gated attention scorer (Ilse et al.; CLAM's ``Attn_Net_Gated``), same parameter names."""

    def __init__(self, L: int, D: int, dropout: bool, n_classes: int = 1):
        super().__init__()

        def tail():  # CLAM: a fixed p=0.25 whenever dropout is on
            return [nn.Dropout(0.25)] if dropout else []

        self.attention_a = nn.Sequential(nn.Linear(L, D), nn.Tanh(), *tail())
        self.attention_b = nn.Sequential(nn.Linear(L, D), nn.Sigmoid(), *tail())
        self.attention_c = nn.Linear(D, n_classes)

    def forward(self, x):
        return self.attention_c(self.attention_a(x) * self.attention_b(x)), x


class ClamSB(nn.Module):
    """Single-branch CLAM: gated attention pooling + bag classifier + per-class instance heads.

    ``forward`` has CLAM's signature and return value
    ``(logits, Y_prob, Y_hat, A_raw, results_dict)`` so CLAM's own code can drive it.
    """

    n_branches = 1

    def __init__(
        self,
        gate: bool = True,
        size_arg: str = "small",
        dropout: float = 0.0,
        k_sample: int = 8,
        n_classes: int = 2,
        instance_loss_fn: nn.Module | None = None,
        subtyping: bool = False,
        embed_dim: int = 1024,
    ):
        super().__init__()
        hidden, attn = SIZES[size_arg]
        scorer = GatedAttnNet if gate else AttnNet
        self.attention_net = nn.Sequential(
            nn.Linear(embed_dim, hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            scorer(hidden, attn, dropout=bool(dropout), n_classes=self.n_branches_for(n_classes)),
        )
        self.classifiers = self._bag_classifiers(hidden, n_classes)
        self.instance_classifiers = nn.ModuleList([nn.Linear(hidden, 2) for _ in range(n_classes)])
        self.k_sample = k_sample
        self.instance_loss_fn = instance_loss_fn or nn.CrossEntropyLoss()
        self.n_classes = n_classes
        self.subtyping = subtyping

    @staticmethod
    def n_branches_for(n_classes: int) -> int:
        return 1

    def _bag_classifiers(self, hidden: int, n_classes: int) -> nn.Module:
        return nn.Linear(hidden, n_classes)

    def _bag_logits(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.classifiers(pooled)

    def _instance_loss(self, attention: torch.Tensor, h: torch.Tensor, label: torch.Tensor):
        """CLAM's clustering loss: the k most attended instances of the bag's class are pseudo-
        positive and the k least attended pseudo-negative for that class's instance head; with
        ``subtyping`` the k most attended are also negatives for every other class's head."""
        total = h.new_zeros(())
        preds, targets = [], []
        k = min(self.k_sample, h.shape[0])
        true_class = int(label.reshape(-1)[0])
        for c, head in enumerate(self.instance_classifiers):
            branch = attention[c] if attention.shape[0] > 1 else attention[0]
            top = torch.topk(branch, k).indices
            if c == true_class:
                bottom = torch.topk(-branch, k).indices
                inst = torch.cat([h[top], h[bottom]])
                tgt = torch.cat([h.new_ones(k, dtype=torch.long), h.new_zeros(k, dtype=torch.long)])
            elif self.subtyping:
                inst, tgt = h[top], h.new_zeros(k, dtype=torch.long)
            else:
                continue
            logits = head(inst)
            total = total + self.instance_loss_fn(logits, tgt)
            preds.append(logits.argmax(dim=1))
            targets.append(tgt)
        if self.subtyping:
            total = total / len(self.instance_classifiers)
        return total, torch.cat(preds), torch.cat(targets)

    def forward(
        self, h, label=None, instance_eval=False, return_features=False, attention_only=False
    ):
        scores, h = self.attention_net(h)
        A_raw = scores.transpose(1, 0)  # K x N
        if attention_only:
            return A_raw
        A = F.softmax(A_raw, dim=1)
        results: dict = {}
        if instance_eval:
            loss, preds, targets = self._instance_loss(A, h, label)
            results.update(
                instance_loss=loss,
                inst_labels=targets.cpu().numpy(),
                inst_preds=preds.cpu().numpy(),
            )
        pooled = A @ h  # K x hidden
        logits = self._bag_logits(pooled)
        Y_hat = logits.argmax(dim=1, keepdim=True)
        Y_prob = F.softmax(logits, dim=1)
        if return_features:
            results["features"] = pooled
        return logits, Y_prob, Y_hat, A_raw, results


class ClamMB(ClamSB):
    """Multi-branch CLAM: one attention branch and one scalar bag classifier per class."""

    @staticmethod
    def n_branches_for(n_classes: int) -> int:
        return n_classes

    def _bag_classifiers(self, hidden: int, n_classes: int) -> nn.Module:
        return nn.ModuleList([nn.Linear(hidden, 1) for _ in range(n_classes)])

    def _bag_logits(self, pooled: torch.Tensor) -> torch.Tensor:
        return torch.cat([head(pooled[c]) for c, head in enumerate(self.classifiers)])[None, :]


def clean_state_dict(state: dict) -> dict:
    """Drop loss-function buffers and DataParallel prefixes, as CLAM's eval does."""
    return {
        key.replace(".module", ""): value
        for key, value in state.items()
        if "instance_loss_fn" not in key
    }


def save_weights(model: nn.Module, path) -> None:
    """The model's state dict on the CPU (CLAM's ``s_<k>_checkpoint.pt``), written atomically."""
    with atomic_path(path) as tmp:
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, tmp)


def load_weights(model: nn.Module, path, map_location="cpu") -> nn.Module:
    state = load_checkpoint(
        path, what="MIL checkpoint", error=ClamMcmkdError, weights_only=True,
        map_location=map_location,
    )  # fmt: skip
    model.load_state_dict(clean_state_dict(state), strict=True)
    return model


@torch.no_grad()
def attention_scores(model: ClamSB, feats, softmax: bool = False) -> np.ndarray:
    """Raw attention score per instance (what CLAM's heatmaps draw): shape (N,) for one branch,
    (n_classes, N) for CLAM-MB. `feats` is an (N, D) tensor or array."""
    was_training = model.training
    model.eval()
    param = next(model.parameters())
    x = torch.as_tensor(np.asarray(feats) if not torch.is_tensor(feats) else feats)
    x = x.to(device=param.device, dtype=param.dtype)
    A = model(x, attention_only=True)
    if softmax:
        A = F.softmax(A, dim=1)
    model.train(was_training)
    A = A.float().cpu().numpy()
    return A[0] if A.shape[0] == 1 else A
