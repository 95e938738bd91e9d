"""Pathology foundation models by name: architecture, preprocessing and output rule of each.

Each entry is a frozen :class:`FoundationModelSpec` transcribed from the model's card and
official loader (``source`` names them), registered in the encoder registry under its name (and
its hub id), so it works for ``extract-features --model``, ``finetune --teacher`` and CLAM. The
specs never ask timm for a data config: offline, timm answers mean 0.5 / 518 px for these
architectures, which silently ruins a teacher.

Weights come from, in order: ``ckpt=`` (a local file), the spec's ``*_CKPT_PATH`` variable (CLAM's
habit), the hub id (``pretrained=True``), or a seeded random init (``pretrained=False``, offline).
A hub download that fails is one line naming the model and the ways out.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .registry import Encoder, EncoderError, reaching_weights, register_encoder
from .transforms import IMAGENET_MEAN, IMAGENET_STD, PatchTransforms

log = logging.getLogger(__name__)
BIOPTIMUS_MEAN = (0.707223, 0.578729, 0.703617)
BIOPTIMUS_STD = (0.211883, 0.230117, 0.177517)

OUTPUT_RULES = ("cls", "cls+mean_patch")
# Layer classes named in specs as strings: specs stay plain, hashable data.
_LAYERS = {"SwiGLUPacked": ("timm.layers", "SwiGLUPacked"), "SiLU": ("torch.nn", "SiLU")}


@dataclass(frozen=True)
class FoundationModelSpec:
    """Everything needed to rebuild one published patch encoder exactly."""

    name: str
    hub_id: str  # timm ``hf-hub:`` name of the published weights
    arch: str  # timm architecture the weights fit (built offline with ``timm_kwargs``)
    timm_kwargs: tuple[tuple[str, Any], ...]  # layer classes as names from _LAYERS
    out_dim: int
    ckpt_env: str  # CLAM-style variable holding a local checkpoint path
    source: str  # model card + official loader this spec was transcribed from
    output: str = "cls"  # "cls": class token; "cls+mean_patch": class token ++ mean patch token
    input_size: int = 224
    resize_size: int = 224
    interpolation: str = "bilinear"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def model_kwargs(self) -> dict[str, Any]:
        """``timm_kwargs`` with layer names resolved to classes."""
        import importlib

        out = {}
        for key, value in self.timm_kwargs:
            if key in ("mlp_layer", "act_layer"):
                module, attr = _LAYERS[value]
                value = getattr(importlib.import_module(module), attr)
            out[key] = value
        return out

    def transforms(self) -> PatchTransforms:
        """Resize(resize_size) -> CenterCrop(input_size) -> ToTensor -> Normalize, as the card."""
        return PatchTransforms(
            self.input_size, self.mean, self.std, self.resize_size, self.interpolation
        )

    def describe(self) -> dict[str, Any]:
        """One row of ``list-encoders --json``."""
        return {
            "name": self.name,
            "out_dim": self.out_dim,
            "input_size": self.input_size,
            "resize_size": self.resize_size,
            "crop": True,
            "interpolation": self.interpolation,
            "mean": list(self.mean),
            "std": list(self.std),
            "output": self.output,
            "source": self.source,
            "weights": self.hub_id,
            "ckpt_env": self.ckpt_env,
        }


_UNI_KWARGS = (
    ("img_size", 224), ("patch_size", 16), ("init_values", 1e-5), ("num_classes", 0),
    ("dynamic_img_size", True),
)  # fmt: skip
_UNI2_KWARGS = (
    ("img_size", 224), ("patch_size", 14), ("depth", 24), ("num_heads", 24),
    ("init_values", 1e-5), ("embed_dim", 1536), ("mlp_ratio", 2.66667 * 2), ("num_classes", 0),
    ("no_embed_class", True), ("mlp_layer", "SwiGLUPacked"), ("act_layer", "SiLU"),
    ("reg_tokens", 8), ("dynamic_img_size", True),
)  # fmt: skip
_VIRCHOW2_KWARGS = (
    ("img_size", 224), ("init_values", 1e-5), ("num_classes", 0), ("reg_tokens", 4),
    ("mlp_ratio", 5.3375), ("global_pool", ""), ("dynamic_img_size", True),
    ("mlp_layer", "SwiGLUPacked"), ("act_layer", "SiLU"),
)  # fmt: skip
_H_OPTIMUS_KWARGS = (
    ("img_size", 224), ("init_values", 1e-5), ("num_classes", 0), ("global_pool", "token"),
    ("dynamic_img_size", False),
)  # fmt: skip
_GIGAPATH_KWARGS = (
    ("img_size", 224), ("in_chans", 3), ("patch_size", 16), ("embed_dim", 1536), ("depth", 40),
    ("num_heads", 24), ("init_values", 1e-5), ("mlp_ratio", 5.33334), ("num_classes", 0),
)  # fmt: skip
_TRIDENT = "github.com/mahmoodlab/TRIDENT trident/patch_encoder_models/load.py"
_STAMP = "github.com/KatherLab/STAMP src/stamp/preprocessing/extractor"

SPECS: dict[str, FoundationModelSpec] = {
    s.name: s
    for s in (
        FoundationModelSpec(
            name="uni_v1",
            hub_id="hf-hub:MahmoodLab/uni",
            arch="vit_large_patch16_224",
            timm_kwargs=_UNI_KWARGS,
            out_dim=1024,
            ckpt_env="UNI_CKPT_PATH",
            source="huggingface.co/MahmoodLab/UNI card; github.com/mahmoodlab/UNI README + "
            f"uni/get_encoder/get_encoder.py; CLAM models/builder.py; {_TRIDENT} UNIInferenceEncoder",
        ),
        FoundationModelSpec(
            name="uni2_h",
            hub_id="hf-hub:MahmoodLab/UNI2-h",
            arch="vit_giant_patch14_224",
            timm_kwargs=_UNI2_KWARGS,
            out_dim=1536,
            ckpt_env="UNI2_CKPT_PATH",
            source="huggingface.co/MahmoodLab/UNI2-h card; github.com/mahmoodlab/UNI README "
            f"(manual loading of UNI2-h); {_TRIDENT} UNIv2InferenceEncoder; {_STAMP}/uni2.py",
        ),
        FoundationModelSpec(
            name="virchow2",
            hub_id="hf-hub:paige-ai/Virchow2",
            arch="vit_huge_patch14_224",
            timm_kwargs=_VIRCHOW2_KWARGS,
            out_dim=2560,
            ckpt_env="VIRCHOW2_CKPT_PATH",
            output="cls+mean_patch",
            interpolation="bicubic",
            source="huggingface.co/paige-ai/Virchow2 card (output[:, 0] ++ output[:, 5:].mean(1); "
            "config.json: bicubic, crop_pct 1.0, ImageNet mean/std); "
            f"{_TRIDENT} Virchow2InferenceEncoder",
        ),
        FoundationModelSpec(
            name="h_optimus_0",
            hub_id="hf-hub:bioptimus/H-optimus-0",
            arch="vit_giant_patch14_reg4_dinov2",
            timm_kwargs=_H_OPTIMUS_KWARGS,
            out_dim=1536,
            ckpt_env="H_OPTIMUS_0_CKPT_PATH",
            mean=BIOPTIMUS_MEAN,
            std=BIOPTIMUS_STD,
            source="huggingface.co/bioptimus/H-optimus-0 card (224 px at 0.5 um/px, bioptimus "
            f"mean/std); {_TRIDENT} HOptimus0InferenceEncoder; {_STAMP}/h_optimus_0.py",
        ),
        FoundationModelSpec(
            name="h_optimus_1",
            hub_id="hf-hub:bioptimus/H-optimus-1",
            arch="vit_giant_patch14_reg4_dinov2",
            timm_kwargs=_H_OPTIMUS_KWARGS,
            out_dim=1536,
            ckpt_env="H_OPTIMUS_1_CKPT_PATH",
            mean=BIOPTIMUS_MEAN,
            std=BIOPTIMUS_STD,
            source="huggingface.co/bioptimus/H-optimus-1 card; "
            f"{_TRIDENT} HOptimus1InferenceEncoder; {_STAMP}/h_optimus_1.py",
        ),
        FoundationModelSpec(
            name="prov_gigapath",
            hub_id="hf-hub:prov-gigapath/prov-gigapath",
            arch="vit_giant_patch14_dinov2",
            timm_kwargs=_GIGAPATH_KWARGS,
            out_dim=1536,
            ckpt_env="PROV_GIGAPATH_CKPT_PATH",
            resize_size=256,
            interpolation="bicubic",
            source="huggingface.co/prov-gigapath/prov-gigapath card + config.json; "
            "github.com/prov-gigapath/prov-gigapath README + gigapath/pipeline.py; "
            f"{_TRIDENT} GigaPathInferenceEncoder; {_STAMP}/gigapath.py",
        ),
    )
}


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
    """A timm ViT plus its card's output rule; ``.model`` holds the published weights (so hub
    and local state dicts load unprefixed)."""

    def __init__(self, model: nn.Module, output: str, out_dim: int):
        super().__init__()
        self.model = model
        self.output_rule = output
        self.out_dim = int(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.output_rule == "cls":  # timm's global_pool='token' head: the normed class token
            return self.model(x)
        tokens = self.model.forward_features(x)
        return pool_tokens(tokens, int(self.model.num_prefix_tokens), self.output_rule)


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
    import timm

    from .checkpoint import load_state_dict

    spec = get_spec(spec) if isinstance(spec, str) else spec
    if target_img_size not in (None, spec.input_size):
        log.warning("%s: input size is the card's %d px; %d ignored",
                    spec.name, spec.input_size, target_img_size)  # fmt: skip
    ckpt = ckpt or os.environ.get(spec.ckpt_env) or None
    kwargs = spec.model_kwargs()
    if ckpt is None and pretrained:  # the published weights through timm's hub loader
        with reaching_weights(spec.name, spec.hub_id, spec.ckpt_env):
            model = timm.create_model(spec.hub_id, pretrained=True, **kwargs)
    else:
        model = timm.create_model(spec.arch, pretrained=False, **kwargs)
        if ckpt is not None:
            load_state_dict(model, ckpt, strict=True)
    wrapped = FoundationEncoder(model, spec.output, spec.out_dim).eval()
    return Encoder(wrapped, spec.transforms(), spec.out_dim)


def builder(name: str):
    """A registry builder for ``name`` (``register_encoder(name)(builder(name))``)."""
    get_spec(name)
    return functools.partial(build_foundation_model, name)


for _spec in SPECS.values():
    register_encoder(
        _spec.name,
        f"{_spec.hub_id.removeprefix('hf-hub:')}: {_spec.out_dim}-d, {_spec.input_size} px",
        ckpt_env=_spec.ckpt_env,
        source=_spec.hub_id,
        aliases=(_spec.hub_id,),
        describe=_spec.describe,
    )(builder(_spec.name))
