"""What the fine-tuner learns: MCM-KD and the controls that take one ingredient away.

- ``objective="mcmkd"`` (the method): mask positions of the window, the student encodes the
  visible patches, the context predictor predicts the teacher's features at the masked ones.
- ``objective="patch_kd"`` (is context what helps?): the same teacher, windows, steps and
  optimiser, but nothing is masked and nothing is shared between positions: every patch's
  student token goes through a per-token head (:class:`PatchHead`: no positional embedding,
  no attention) to predict that patch's own teacher feature; the loss scores every position.
- ``targets="sham"`` (is it just the extra optimisation?): the same schedule and loss, but the
  teacher features are permuted across all cached patches once, with the seed
  (:class:`ShamReader`): the targets keep their distribution and scale and carry no
  information about the patch they are paired with.
- An untrained teacher (is it the teacher's knowledge?) needs no option: MCM-KD with
  ``--teacher-ckpt`` of a random-init checkpoint.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .config import OBJECTIVES, TARGETS
from .masking import num_masked, window_masks

__all__ = ["OBJECTIVES", "TARGETS", "PatchHead", "ShamReader", "build_predictor"]


class PatchHead(nn.Module):
    """patch_kd's predictor: Linear-GELU-Linear on each student token alone (no context).

    Same call as :class:`~.predictor.ContextPredictor` (tokens of the visible positions and
    the mask, which patch_kd leaves all False) and the same output space (standardised teacher
    features, head initialised near "predict the mean")."""

    def __init__(self, student_dim: int, teacher_dim: int, width: int = 256):
        super().__init__()
        self.proj = nn.Linear(student_dim, width)
        self.act = nn.GELU()
        self.head = nn.Linear(width, teacher_dim)
        nn.init.normal_(self.head.weight, std=0.1 / width**0.5)
        nn.init.zeros_(self.head.bias)

    def forward(self, visible_tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, n_pos = mask.shape
        out = self.head(self.act(self.proj(visible_tokens)))
        return out.reshape(b, n_pos, -1)


def build_predictor(cfg, student_dim: int, teacher_dim: int) -> nn.Module:
    """The predictor of `cfg.objective` (discarded after training either way)."""
    if cfg.objective == "patch_kd":
        return PatchHead(student_dim, teacher_dim, width=cfg.predictor_width)
    from .predictor import ContextPredictor

    return ContextPredictor(
        student_dim, teacher_dim, cfg.grid, width=cfg.predictor_width,
        depth=cfg.predictor_depth, heads=cfg.predictor_heads,
    )  # fmt: skip


def input_masks(cfg, indices: np.ndarray, epoch: int) -> np.ndarray:
    """(B, g^2) bool: the positions the student does NOT see (patch_kd: none)."""
    if cfg.objective == "patch_kd":
        return np.zeros((len(np.asarray(indices).ravel()), cfg.grid * cfg.grid), dtype=bool)
    return window_masks(indices, cfg.grid, cfg.mask_ratio, cfg.mask_strategy, cfg.seed, epoch)


def scored_positions(cfg, mask: torch.Tensor) -> torch.Tensor:
    """(B, g^2) bool: the positions the loss and validation score (mcmkd: the masked ones;
    patch_kd: every position)."""
    if cfg.objective == "patch_kd":
        return torch.ones_like(mask)
    return mask


def scored_per_window(cfg) -> int:
    """How many positions of each window the loss scores (its normaliser)."""
    if cfg.objective == "patch_kd":
        return cfg.grid * cfg.grid
    return num_masked(cfg.grid, cfg.mask_ratio)


class ShamReader:
    """A teacher-cache reader whose features are permuted across every patch it knows.

    The permutation is drawn once from `seed` over all (slide, cached row) pairs of the run's
    slides (training and validation alike), so a patch always gets the same target, of the
    teacher's distribution, and that target belongs to another patch (of any slide). The
    source slides' features are held in memory once read (a control for experiments: the
    whole cache of the run's slides may end up there).
    """

    def __init__(self, reader, seed: int):
        self.reader = reader
        keys = [(s, r) for s in sorted(reader.rows) for r in sorted(reader.rows[s].values())]
        perm = np.random.default_rng([seed, 0x5A4D]).permutation(len(keys))
        self.source = {key: keys[j] for key, j in zip(keys, perm)}
        self.rows = reader.rows  # coords -> row per slide, as the reader's
        self._held: dict[int, np.ndarray] = {}

    def _slide(self, s: int) -> np.ndarray:
        if s not in self._held:
            self._held[s] = self.reader.all_features(s)
        return self._held[s]

    def _rows_features(self, s: int, rows) -> np.ndarray:
        sources = [self.source[(s, int(r))] for r in rows]
        out = None
        for src in sorted({src_s for src_s, _ in sources}):
            pick = [i for i, (src_s, _) in enumerate(sources) if src_s == src]
            block = self._slide(src)[[sources[i][1] for i in pick]]
            if out is None:
                out = np.empty((len(rows), block.shape[1]), dtype=np.float32)
            out[pick] = block
        return out

    def features(self, s: int, coords: np.ndarray) -> np.ndarray:
        rows = [self.rows[s][(int(x), int(y))] for x, y in coords]
        return self._rows_features(s, rows)

    def all_features(self, s: int) -> np.ndarray:
        return self._rows_features(s, range(len(self.rows[s])))

    def __getstate__(self):  # reading workers read their own copies
        return {**self.__dict__, "_held": {}}

    def close(self) -> None:
        self._held.clear()
        self.reader.close()
