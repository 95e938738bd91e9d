"""Pathology foundation models by name: the specs of :mod:`.zoo`, built and registered.

Each name is a frozen :class:`~.catalog.FoundationModelSpec` transcribed from the model's card
and official loader (``source`` names them), registered in the encoder registry under its name
(and its hub id), so it works for ``extract-features --model``, ``finetune --teacher``, the
teacher cache and CLAM. The specs never ask timm for a data config: offline, timm answers mean
0.5 / 518 px for these architectures, which silently ruins a teacher.

Weights come from, in order: ``ckpt=`` (a local file), the spec's ``*_CKPT_PATH`` variable (CLAM's
habit), the hub (``pretrained=True``: a timm ``hf-hub:`` repo, or a state-dict file in a hub
repo), or a seeded random init (``pretrained=False``, offline). A hub download that fails is
one line naming the model and the ways out.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
from typing import Any

import torch
from torch import nn

from .catalog import BIOPTIMUS_MEAN, BIOPTIMUS_STD, OUTPUT_RULES, FoundationModelSpec
from .registry import Encoder, EncoderError, reaching_weights, register_encoder
from .zoo import SPECS

__all__ = ["BIOPTIMUS_MEAN", "BIOPTIMUS_STD", "OUTPUT_RULES", "FoundationModelSpec", "SPECS"]
log = logging.getLogger(__name__)
# Layer classes named in specs as strings: specs stay plain, hashable, torch-free data.
_LAYERS = {"SwiGLUPacked": ("timm.layers", "SwiGLUPacked"), "SiLU": ("torch.nn", "SiLU")}


def resolve_layer(name: str) -> Any:
    module, attr = _LAYERS[name]
    return getattr(importlib.import_module(module), attr)


def get_spec(name: str) -> FoundationModelSpec:
    if name not in SPECS:
        raise EncoderError(f"unknown foundation model '{name}' (known: {', '.join(SPECS)})")
    return SPECS[name]


def pool_tokens(tokens, num_prefix_tokens: int, rule: str):
    """The card's output rule on a ViT token sequence (B, T, D) after the final norm.

    ``cls``: the class token. ``cls+mean_patch`` (Virchow2): class token concatenated with the
    mean of the patch tokens, leaving out the class and register tokens -> (B, 2D).
    """
    if rule == "cls":
        return tokens[:, 0]
    if rule == "cls+mean_patch":
        return torch.cat([tokens[:, 0], tokens[:, num_prefix_tokens:].mean(dim=1)], dim=-1)
    raise ValueError(f"unknown output rule {rule!r} (choose from {OUTPUT_RULES})")


class FoundationEncoder(nn.Module):
    """A published network plus its card's output rule; ``.model`` holds the published weights
    (so hub and local state dicts load unprefixed)."""

    def __init__(self, model: nn.Module, output: str, out_dim: int):
        super().__init__()
        self.model = model
        self.output_rule = output
        self.out_dim = int(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.output_rule not in OUTPUT_RULES:  # a network with its own head (CONCH v1.5)
            return self.model(x)
        if self.output_rule == "cls" and getattr(self.model, "global_pool", "") == "token":
            return self.model(x)  # timm's global_pool='token' head: the normed class token
        tokens = self.model.forward_features(x)
        return pool_tokens(tokens, int(self.model.num_prefix_tokens), self.output_rule)


def _network(spec: FoundationModelSpec, *, from_hub: bool) -> nn.Module:
    """The spec's network, random (or, ``from_hub``, with timm's hub weights)."""
    import timm

    if spec.kind == "conch_v15":
        from .conch import ConchV15Tower

        return ConchV15Tower(spec.arch, spec.model_kwargs())
    name = spec.hub_id if from_hub else spec.arch
    return timm.create_model(name, pretrained=from_hub, **spec.model_kwargs())


def _hub_file(spec: FoundationModelSpec) -> str:
    """Download (or find in the cache) the spec's state-dict file; its local path."""
    from huggingface_hub import hf_hub_download

    with reaching_weights(spec.name, weights_of(spec), spec.ckpt_env):
        return hf_hub_download(spec.hub_id, spec.hub_file)


def weights_of(spec: FoundationModelSpec) -> str:
    """Where ``pretrained=True`` takes the spec's weights from (a teacher's identity)."""
    if spec.kind == "transformers":
        return f"hf:{spec.hub_id}"
    return f"hf-hub:{spec.hub_id}/{spec.hub_file}" if spec.hub_file else spec.hub_id


def build_foundation_model(
    spec: str | FoundationModelSpec,
    *,
    pretrained: bool = True,
    ckpt: str | os.PathLike | None = None,
    target_img_size: int | None = None,
    **_: Any,
) -> Encoder:
    """Build a spec (or its name) as ``Encoder(model, transforms, out_dim)``, in eval mode.

    ``ckpt`` (or ``$<ckpt_env>``) wins over the hub; ``pretrained=False`` without a checkpoint is
    a random init (seed it with ``create_encoder(init_seed=...)``). The card's input size is
    used: another ``target_img_size`` is ignored with a warning.
    """
    from .checkpoint import load_state_dict

    spec = get_spec(spec) if isinstance(spec, str) else spec
    if not spec.buildable:
        raise EncoderError(f"{spec.name} ({spec.hub_id}) is listed, not built: {spec.reason}")
    if target_img_size not in (None, spec.input_size):
        log.warning("%s: input size is the card's %d px; %d ignored",
                    spec.name, spec.input_size, target_img_size)  # fmt: skip
    ckpt = ckpt or (os.environ.get(spec.ckpt_env) if spec.ckpt_env else None) or None
    if spec.kind == "transformers":  # the architecture is the hub repo's config.json
        from .hf_models import build_transformers_network

        net = build_transformers_network(spec, pretrained=pretrained, ckpt=ckpt).eval()
        return Encoder(net, spec.transforms(), net.out_dim)
    if ckpt is None and pretrained and spec.hub_file:
        ckpt = _hub_file(spec)
    if ckpt is None and pretrained:  # the published weights through timm's hub loader
        with reaching_weights(spec.name, spec.hub_id, spec.ckpt_env):
            model = _network(spec, from_hub=True)
    else:
        model = _network(spec, from_hub=False)
        if ckpt is not None:
            load_state_dict(model, ckpt, strict=True)
    wrapped = FoundationEncoder(model, spec.output, spec.out_dim).eval()
    return Encoder(wrapped, spec.transforms(), spec.out_dim)


def builder(name: str):
    """A registry builder for ``name`` (``register_encoder(name)(builder(name))``)."""
    get_spec(name)
    return functools.partial(build_foundation_model, name)


def _aliases(spec: FoundationModelSpec) -> tuple[str, ...]:
    """Hub ids that name the spec (variants have none: the id means the card's default)."""
    if spec.variant_of:
        return ()
    return (
        (spec.hub_id,)
        if spec.hub_id.startswith("hf-hub:")
        else (spec.hub_id, f"hf-hub:{spec.hub_id}")
    )


for _spec in SPECS.values():
    register_encoder(
        _spec.name,
        _spec.one_line(),
        ckpt_env=_spec.ckpt_env or None,
        source=weights_of(_spec),
        aliases=_aliases(_spec),
        describe=_spec.describe,
    )(builder(_spec.name))
