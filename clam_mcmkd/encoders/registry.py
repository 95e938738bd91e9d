"""Encoder registry in the style of timm's ``create_model``.

A name maps to a builder returning :class:`Encoder` ``(model, transforms, out_dim)``. The
built-in builders (:mod:`.builders`) register themselves on import; any name that is not
registered is built as a timm model (``hf-hub:`` names too), a pooled feature extractor.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import nn

from ..utils import ClamMcmkdError
from .transforms import PatchTransforms


class EncoderError(ClamMcmkdError):
    pass


class Encoder(NamedTuple):
    model: nn.Module
    transforms: PatchTransforms
    out_dim: int


Builder = Callable[..., Encoder]
_REGISTRY: dict[str, tuple[Builder, str]] = {}


def register_encoder(name: str, description: str = "") -> Callable[[Builder], Builder]:
    """Decorator: ``builder(pretrained, ckpt, target_img_size, **kwargs) -> Encoder`` as `name`."""

    def wrap(fn: Builder) -> Builder:
        _REGISTRY[name] = (fn, description or (fn.__doc__ or "").strip().split("\n")[0])
        return fn

    return wrap


def _builtins():
    """The built-in builders, which register themselves when their module is first imported."""
    from . import builders

    return builders


def list_encoders() -> dict[str, str]:
    """Registered names -> one-line description (any timm name works too)."""
    _builtins()
    return {name: desc for name, (_, desc) in sorted(_REGISTRY.items())}


def _seeded(init_seed: int | None):
    """Deterministic random init for pretrained=False, without disturbing the global RNG."""
    return torch.random.fork_rng(devices=[]) if init_seed is not None else contextlib.nullcontext()


def create_encoder(
    name: str,
    *,
    pretrained: bool = True,
    ckpt: str | os.PathLike | None = None,
    target_img_size: int = 224,
    init_seed: int | None = 0,
    **kwargs: Any,
) -> Encoder:
    """Build an encoder by name, in eval mode. ``pretrained=False`` builds it offline.

    With ``pretrained=False`` the weights are a seeded random init (``init_seed``), so that the
    same name gives the same untrained model in every process (baseline == student init).
    """
    builtins = _builtins()
    builder = _REGISTRY[name][0] if name in _REGISTRY else builtins.timm_builder(name)
    with _seeded(init_seed):
        if init_seed is not None:
            torch.manual_seed(init_seed)
        encoder = builder(
            pretrained=pretrained, ckpt=ckpt, target_img_size=target_img_size, **kwargs
        )
    encoder.model.eval()
    return encoder
