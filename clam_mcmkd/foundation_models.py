"""Pathology foundation models by name: architecture, preprocessing and output rule of each.

Each entry is a frozen :class:`FoundationModelSpec` transcribed from the model's card and
official loader (``source`` names them). Builders return the registry's ``Encoder(model,
transforms, out_dim)``, so the encoder registry only has to register them. The specs never ask
timm for a data config: offline, timm answers mean 0.5 / 518 px for these architectures, which
silently ruins a teacher.

Weights come from, in order: ``ckpt=`` (a local file), the spec's ``*_CKPT_PATH`` variable (CLAM's
habit), the hub id (``pretrained=True``), or a seeded random init (``pretrained=False``, offline).
A hub download that fails is one line naming the model and the ways out.

torch and timm are imported inside functions: listing the specs costs nothing.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Any

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BIOPTIMUS_MEAN = (0.707223, 0.578729, 0.703617)
BIOPTIMUS_STD = (0.211883, 0.230117, 0.177517)

OUTPUT_RULES = ("cls", "cls+mean_patch")
# Layer classes named in specs as strings, so that this module imports without torch/timm.
_LAYERS = {"SwiGLUPacked": ("timm.layers", "SwiGLUPacked"), "SiLU": ("torch.nn", "SiLU")}


@dataclass(frozen=True)
class FoundationTransforms:
    """Eval preprocessing: Resize(shorter side) -> CenterCrop -> ToTensor -> Normalize.

    Same interface as ``encoders.PatchTransforms`` (``input_size``, ``mean``, ``std``,
    ``__call__`` on one image, ``batch`` on a uint8 batch), plus the resize size and
    interpolation that some cards prescribe (Prov-GigaPath: bicubic 256 then crop 224).
    """

    input_size: int = 224  # the crop fed to the model
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    resize_size: int = 224
    interpolation: str = "bilinear"  # "bilinear" | "bicubic" (torchvision InterpolationMode)

    def to_torchvision(self):
        from torchvision import transforms

        mode = transforms.InterpolationMode(self.interpolation)
        return transforms.Compose(
            [
                transforms.Resize(self.resize_size, interpolation=mode),
                transforms.CenterCrop(self.input_size),
                transforms.ToTensor(),
                transforms.Normalize(self.mean, self.std),
            ]
        )

    def __call__(self, img):
        import numpy as np
        from PIL import Image

        if isinstance(img, np.ndarray):
            img = Image.fromarray(img)
        return self.to_torchvision()(img)

    def batch(self, images):
        """uint8 (or 0-255 float) (N, H, W, 3) or (N, 3, H, W) -> normalised float (N, 3, S, S).

        torchvision v2 resizes the whole batch at once, antialiased, within one grey level of
        PIL's per-image chain. A uint8 batch on the CPU takes torch's uint8 kernel; a CUDA batch
        is resized as float (the antialiased uint8 kernels are CPU-only). Bicubic float then
        runs PIL's two passes, width then height, rounded and clipped to 0-255 in between as
        PIL's uint8 intermediate is: in one float pass the bicubic overshoot at sharp edges
        reaches ~10 grey levels. Bilinear has no overshoot and needs no such step.
        """
        import torch
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms.v2 import functional as F

        BICUBIC = InterpolationMode.BICUBIC
        if images.ndim != 4:
            raise ValueError(f"expected a 4-D image batch, got shape {tuple(images.shape)}")
        if images.shape[-1] == 3 and images.shape[1] != 3:
            images = images.permute(0, 3, 1, 2)
        mode = InterpolationMode(self.interpolation)
        cpu_uint8 = images.dtype == torch.uint8 and images.device.type == "cpu"
        if cpu_uint8 or mode != BICUBIC:
            x = images if cpu_uint8 else images.float()
            x = F.resize(x, [self.resize_size], interpolation=mode, antialias=True)
        else:  # bicubic off the CPU: PIL's two passes with its uint8 intermediate
            h, w = images.shape[-2:]
            size = self.resize_size  # torchvision's Resize(int): the shorter side -> size
            out_h, out_w = (size, int(size * w / h)) if h <= w else (int(size * h / w), size)
            x = images.float()
            for shape in ((h, out_w), (out_h, out_w)):
                if tuple(x.shape[-2:]) != shape:
                    x = F.resize(x, list(shape), interpolation=mode, antialias=True)
                    x = x.add_(0.5).floor_().clamp_(0.0, 255.0)  # PIL: round half up, clip
        x = F.center_crop(x, [self.input_size, self.input_size]).float()
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return (x / 255.0 - mean) / std


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
        """``timm_kwargs`` with layer names resolved to classes (imports timm/torch)."""
        import importlib

        out = {}
        for key, value in self.timm_kwargs:
            if key in ("mlp_layer", "act_layer"):
                module, attr = _LAYERS[value]
                value = getattr(importlib.import_module(module), attr)
            out[key] = value
        return out

    def transforms(self) -> FoundationTransforms:
        return FoundationTransforms(
            self.input_size, self.mean, self.std, self.resize_size, self.interpolation
        )

    def describe(self) -> dict[str, Any]:
        """One row of ``list-encoders --json``."""
        return {
            "name": self.name,
            "out_dim": self.out_dim,
            "input_size": self.input_size,
            "mean": list(self.mean),
            "std": list(self.std),
            "source": self.source,
            "resize_size": self.resize_size,
            "interpolation": self.interpolation,
            "output": self.output,
            "hub_id": self.hub_id,
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
    from .encoders import EncoderError

    if name not in SPECS:
        raise EncoderError(f"unknown foundation model '{name}' (known: {', '.join(SPECS)})")
    return SPECS[name]


def pool_tokens(tokens, num_prefix_tokens: int, rule: str):
    """The card's output rule on a ViT token sequence (B, T, D) after the final norm.

    ``cls``: the class token. ``cls+mean_patch`` (Virchow2): class token concatenated with the
    mean of the patch tokens, leaving out the class and register tokens -> (B, 2D).
    """
    import torch

    if rule == "cls":
        return tokens[:, 0]
    if rule == "cls+mean_patch":
        return torch.cat([tokens[:, 0], tokens[:, num_prefix_tokens:].mean(dim=1)], dim=-1)
    raise ValueError(f"unknown output rule {rule!r} (choose from {OUTPUT_RULES})")


@functools.cache
def _encoder_class():
    """The nn.Module wrapper, defined on first use so that importing this module needs no torch."""
    from torch import nn

    class FoundationEncoder(nn.Module):
        """A timm ViT plus its card's output rule; ``.model`` holds the published weights."""

        def __init__(self, model: nn.Module, output: str, out_dim: int):
            super().__init__()
            self.model = model
            self.output = output
            self.out_dim = int(out_dim)

        def forward(self, x):
            if self.output == "cls":  # timm's global_pool='token' head: the normed class token
                return self.model(x)
            tokens = self.model.forward_features(x)
            return pool_tokens(tokens, int(self.model.num_prefix_tokens), self.output)

    return FoundationEncoder


def _download(spec: FoundationModelSpec, kwargs: dict[str, Any]):
    """The published weights through timm's hub loader; any failure is one actionable line."""
    import timm

    from .encoders import EncoderError

    try:
        return timm.create_model(spec.hub_id, pretrained=True, **kwargs)
    except Exception as err:  # noqa: BLE001 - offline, gated (401), missing cache, bad token...
        reason = (str(err).strip().splitlines() or [""])[0][:160]
        raise EncoderError(
            f"{spec.name}: cannot load pretrained weights from {spec.hub_id} "
            f"({type(err).__name__}: {reason}); use --no-pretrained (random init), "
            f"--ckpt PATH, or set ${spec.ckpt_env} to a local checkpoint (gated models: accept "
            "the terms on the model page and log in to the hub)"
        ) from None


def build_foundation_model(
    spec: str | FoundationModelSpec,
    *,
    pretrained: bool = True,
    ckpt: str | os.PathLike | None = None,
    **_: Any,
):
    """Build a spec (or its name) as ``encoders.Encoder(model, transforms, out_dim)``, in eval mode.

    ``ckpt`` (or ``$<ckpt_env>``) wins over the hub; ``pretrained=False`` without a checkpoint is
    a random init (seed it with ``encoders.create_encoder(init_seed=...)``). The card's input size
    is used whatever ``target_img_size`` the caller passes.
    """
    import timm

    from .encoders import Encoder, _load_state_dict

    spec = get_spec(spec) if isinstance(spec, str) else spec
    ckpt = ckpt or os.environ.get(spec.ckpt_env) or None
    kwargs = spec.model_kwargs()
    if ckpt is not None:
        model = timm.create_model(spec.arch, pretrained=False, **kwargs)
        _load_state_dict(model, ckpt, strict=True)
    elif pretrained:
        model = _download(spec, kwargs)
    else:
        model = timm.create_model(spec.arch, pretrained=False, **kwargs)
    wrapped = _encoder_class()(model, spec.output, spec.out_dim).eval()
    return Encoder(wrapped, spec.transforms(), spec.out_dim)


def builder(name: str):
    """A registry builder for ``name`` (``encoders.register_encoder(name)(builder(name))``)."""
    get_spec(name)
    return functools.partial(build_foundation_model, name)


# ----------------------------------------------------------------------------- list-encoders


_NON_FM_SOURCES = {
    "resnet50_trunc": "CLAM models/builder.py + models/timm_wrapper.py: timm resnet50.tv_in1k, "
    "features_only, out_indices=(3,), global average pool",
    "resnet18_trunc": "CLAM's resnet50_trunc recipe on timm resnet18.tv_in1k (small student)",
    "mcmkd_resnet50": "an MCM-KD checkpoint from `clam-mcmkd finetune` (--ckpt / MCMKD_CKPT_PATH); "
    "width, input size and normalisation are read from it (shown: the resnet50_trunc student)",
}


def list_encoders_json() -> list[dict[str, Any]]:
    """``[{name, out_dim, input_size, mean, std, source}, ...]`` for every registered name.

    Foundation models come from their specs; other registry entries are built on the meta
    device (no weights, no memory) so their width and transforms are read, not restated.
    """
    import torch

    from . import encoders

    rows: dict[str, dict[str, Any]] = {n: s.describe() for n, s in SPECS.items()}
    for name, description in encoders.list_encoders().items():
        if name in rows:
            continue
        built = "resnet50_trunc" if name == "mcmkd_resnet50" else name
        with torch.device("meta"):
            enc = encoders.create_encoder(built, pretrained=False, init_seed=None)
        rows[name] = {
            "name": name,
            "out_dim": int(enc.out_dim),
            "input_size": int(enc.transforms.input_size),
            "mean": list(enc.transforms.mean),
            "std": list(enc.transforms.std),
            "source": _NON_FM_SOURCES.get(name, description),
        }
    return [rows[name] for name in sorted(rows)]
