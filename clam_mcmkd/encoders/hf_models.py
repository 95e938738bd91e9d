"""Patch encoders published as Hugging Face transformers models (``AutoModel``), by spec.

Their architecture is the hub repo's ``config.json``, which this project could not read
offline, so it is not transcribed: the spec holds the preprocessing and output rule (from the
official loader), the network comes from the config (downloaded once with the weights, then
cached; or a local copy of the repo via ``--ckpt DIR`` / the name's variable). Without either,
even ``--no-pretrained`` cannot build it: one line says so.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from .catalog import FoundationModelSpec
from .foundation import FoundationEncoder, pool_tokens
from .registry import EncoderError, reaching_weights

log = logging.getLogger(__name__)


class TransformersEncoder(FoundationEncoder):
    """``AutoModel`` -> ``last_hidden_state`` (after the final norm) -> the card's output rule."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.model(pixel_values=x).last_hidden_state
        return pool_tokens(tokens, 1, self.output_rule)  # class token, then patches


def _repo_dir(ckpt: str | os.PathLike) -> str:
    """A local copy of the repo: the directory, or the directory of a file in it (TRIDENT's)."""
    path = Path(ckpt)
    if not path.exists():
        raise EncoderError(f"{path}: no such local copy of a transformers model repo")
    return str(path if path.is_dir() else path.parent)


def build_transformers_network(
    spec: FoundationModelSpec, *, pretrained: bool, ckpt: str | os.PathLike | None
) -> TransformersEncoder:
    """The spec's network from its config (hub or local copy), weights loaded unless it is a
    random init (``pretrained=False`` without ``ckpt``) or a meta-device build (shapes only)."""
    from transformers import AutoConfig, AutoModel

    source = _repo_dir(ckpt) if ckpt is not None else spec.hub_id
    try:
        config = AutoConfig.from_pretrained(source)
    except Exception as err:  # noqa: BLE001 - hub, HTTP, cache and parse errors alike
        reason = (str(err).strip().splitlines() or [""])[0][:160]
        raise EncoderError(
            f"{spec.name}: its architecture is {source}'s config.json, which cannot be read "
            f"({type(err).__name__}: {reason}); run once where the hub is reachable (it is then "
            f"cached), or pass --ckpt DIR (or set ${spec.ckpt_env}) to a local copy of the repo"
        ) from None
    meta = torch.empty(0).is_meta  # built under torch.device("meta"): shapes only
    if meta or (not pretrained and ckpt is None):
        model = AutoModel.from_config(config)
    else:
        with reaching_weights(spec.name, f"hf:{source}", spec.ckpt_env):
            model = AutoModel.from_pretrained(source)
    width = int(config.hidden_size) * (2 if spec.output == "cls+mean_patch" else 1)
    if width != spec.out_dim:
        log.warning("%s: %s gives %d-d features, not the card's %d", spec.name, source, width,
                    spec.out_dim)  # fmt: skip
    return TransformersEncoder(model, spec.output, width)
