"""Encoder registry in the style of timm's ``create_model``.

A name maps to a builder returning :class:`Encoder` ``(model, transforms, out_dim)``:

* ``resnet50_trunc`` - exactly CLAM's: timm ``resnet50.tv_in1k``, ``features_only=True,
  out_indices=(3,)``, global average pool, 1024-d, Resize(224) -> ToTensor -> ImageNet Normalize.
* ``resnet18_trunc`` - the same truncation of a ResNet-18 (256-d): a CPU-sized student for tests
  and the demo.
* ``mcmkd_resnet50`` - an MCM-KD fine-tuned student, loaded from ``ckpt=`` or ``MCMKD_CKPT_PATH``.
* ``uni_v1`` - CLAM's UNI, from ``UNI_CKPT_PATH``, built as CLAM builds it.
* any other name - a timm model (``hf-hub:`` names too) as a pooled feature extractor, optionally
  with weights from a local checkpoint; used for teachers.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from .utils import ClamMcmkdError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MCMKD_CKPT_ENV = "MCMKD_CKPT_PATH"
CHECKPOINT_FORMAT = "clam_mcmkd.encoder/1"


class EncoderError(ClamMcmkdError):
    pass


@dataclass(frozen=True)
class PatchTransforms:
    """CLAM's eval transforms (Resize -> ToTensor -> Normalize), per image and per batch.

    ``__call__`` follows CLAM's chain on one PIL image (the reference path); :meth:`batch` does
    the same on a uint8 tensor batch at once (antialiased bilinear resize), for fast extraction.
    """

    input_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def to_torchvision(self):
        from torchvision import transforms

        steps = []
        if self.input_size > 0:
            steps.append(transforms.Resize(self.input_size))
        steps += [transforms.ToTensor(), transforms.Normalize(self.mean, self.std)]
        return transforms.Compose(steps)

    def __call__(self, img) -> torch.Tensor:
        from PIL import Image

        if isinstance(img, np.ndarray):
            img = Image.fromarray(img)
        return self.to_torchvision()(img)

    def batch(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, H, W, 3) or (N, 3, H, W) -> normalised float (N, 3, S, S).

        On the CPU a uint8 batch is resized in uint8 (torch's antialiased bilinear kernel, which
        rounds like PIL, within one grey level, and is ~20x faster than resizing floats).
        """
        if images.ndim != 4:
            raise ValueError(f"expected a 4-D image batch, got shape {tuple(images.shape)}")
        if images.shape[-1] == 3 and images.shape[1] != 3:
            images = images.permute(0, 3, 1, 2)  # NHWC memory seen as channels-last NCHW
        size = self.input_size
        h, w = images.shape[-2:]
        if size > 0 and (h != size or w != size):
            # torchvision's Resize(int) sets the *shorter* side to `size`.
            out = (size, int(size * w / h)) if h <= w else (int(size * h / w), size)
            if images.dtype != torch.uint8 or images.device.type != "cpu":
                images = images.float()
            images = torch.nn.functional.interpolate(
                images, size=out, mode="bilinear", antialias=True, align_corners=False
            )
        x = images.float() if images.dtype != torch.float32 else images.clone()
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        # (x / 255 - mean) / std, in place on the one float copy
        return x.mul_(1.0 / (255.0 * std)).add_(-mean / std)


class Encoder(NamedTuple):
    model: nn.Module
    transforms: PatchTransforms
    out_dim: int


class TimmCNNEncoder(nn.Module):
    """CLAM's ``TimmCNNEncoder``: a truncated timm CNN + global average pooling.

    Attribute names match CLAM's class so state dicts are interchangeable.
    """

    def __init__(
        self, model_name: str = "resnet50.tv_in1k", out_indices=(3,), pretrained=True, pool=True
    ):
        super().__init__()
        import timm

        self.model = timm.create_model(
            model_name,
            features_only=True,
            out_indices=tuple(out_indices),
            pretrained=pretrained,
            num_classes=0,
        )
        self.pool = nn.AdaptiveAvgPool2d(1) if pool else None
        self.out_dim = int(self.model.feature_info.channels()[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        if isinstance(out, list):
            out = out[-1]
        if self.pool is not None:
            out = self.pool(out).flatten(1)
        return out


class TimmPooledEncoder(nn.Module):
    """A timm model with its classifier removed: one pooled feature vector per image."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.out_dim = int(model.num_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


# ----------------------------------------------------------------------------- registry

Builder = Callable[..., Encoder]
_REGISTRY: dict[str, tuple[Builder, str]] = {}


def register_encoder(name: str, description: str = "") -> Callable[[Builder], Builder]:
    def wrap(fn: Builder) -> Builder:
        _REGISTRY[name] = (fn, description or (fn.__doc__ or "").strip().split("\n")[0])
        return fn

    return wrap


def list_encoders() -> dict[str, str]:
    """Registered names -> one-line description (any timm name works too)."""
    return {name: desc for name, (_, desc) in sorted(_REGISTRY.items())}


def _seeded(init_seed: int | None):
    """Deterministic random init for pretrained=False, without disturbing the global RNG."""
    return torch.random.fork_rng(devices=[]) if init_seed is not None else _nullcontext()


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


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
    if name in _REGISTRY:
        builder = _REGISTRY[name][0]
    else:
        builder = _timm_builder(name)
    with _seeded(init_seed):
        if init_seed is not None:
            torch.manual_seed(init_seed)
        encoder = builder(
            pretrained=pretrained, ckpt=ckpt, target_img_size=target_img_size, **kwargs
        )
    encoder.model.eval()
    return encoder


def _trunc_builder(timm_name: str):
    def build(pretrained=True, ckpt=None, target_img_size=224, **_):
        model = TimmCNNEncoder(timm_name, pretrained=pretrained and ckpt is None)
        if ckpt is not None:
            _load_state_dict(model, ckpt)
        return Encoder(model, PatchTransforms(target_img_size), model.out_dim)

    return build


register_encoder("resnet50_trunc", "CLAM's ResNet-50 truncated after layer3, 1024-d (ImageNet)")(
    _trunc_builder("resnet50.tv_in1k")
)
register_encoder("resnet18_trunc", "ResNet-18 truncated after layer3, 256-d (small student)")(
    _trunc_builder("resnet18.tv_in1k")
)

# Student architectures MCM-KD can fine-tune: registry name -> timm name of the truncated CNN.
STUDENT_ARCHS = {"resnet50_trunc": "resnet50.tv_in1k", "resnet18_trunc": "resnet18.tv_in1k"}


@register_encoder("uni_v1", "UNI ViT-L/16 from UNI_CKPT_PATH, 1024-d, as CLAM builds it")
def _build_uni(pretrained=True, ckpt=None, target_img_size=224, **_):
    import timm

    ckpt = ckpt or os.environ.get("UNI_CKPT_PATH")
    if pretrained and not ckpt:
        raise EncoderError("uni_v1 needs its checkpoint: set UNI_CKPT_PATH (or pass --ckpt)")
    model = timm.create_model(
        "vit_large_patch16_224",
        img_size=224,
        patch_size=16,
        init_values=1e-5,
        num_classes=0,
        dynamic_img_size=True,
    )
    if ckpt:  # with --no-pretrained and no checkpoint: seeded random weights, offline
        _load_state_dict(model, ckpt, strict=True)
    return Encoder(
        TimmPooledEncoder(model), PatchTransforms(target_img_size), int(model.num_features)
    )


def _timm_builder(name: str) -> Builder:
    def build(pretrained=True, ckpt=None, target_img_size=224, **kwargs):
        import timm

        try:
            model = timm.create_model(
                name, pretrained=pretrained and ckpt is None, num_classes=0, **kwargs
            )
        except RuntimeError as err:
            if "Unknown model" in str(err) or "not found" in str(err).lower():
                raise EncoderError(
                    f"unknown encoder '{name}': not registered ({', '.join(_REGISTRY)}) and not a timm model"
                ) from err
            raise
        except Exception as err:  # noqa: BLE001 - download/network failures
            raise EncoderError(
                f"cannot build encoder '{name}' ({type(err).__name__}: {err})"
            ) from err
        if ckpt is not None:
            _load_state_dict(model, ckpt)
        cfg = timm.data.resolve_data_config({}, model=model)
        size = int(cfg["input_size"][-1])
        transforms = PatchTransforms(size, tuple(cfg["mean"]), tuple(cfg["std"]))
        return Encoder(TimmPooledEncoder(model), transforms, int(model.num_features))

    return build


def _unwrap_state_dict(state: Any) -> Any:
    """The weights inside common checkpoint layouts ({'state_dict'|'model'|'module': ...})."""
    for key in ("state_dict", "model", "module", "teacher"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            inner = state[key]
            if inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                return inner
    return state


def _strip_prefixes(state: dict[str, Any], expected: set[str]) -> dict[str, Any]:
    """Drop wrapper prefixes (DDP's 'module.', 'model.', 'backbone.') when that makes keys fit."""
    for prefix in ("module.", "model.", "backbone.", "encoder."):
        if not (set(state) & expected) and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def _load_state_dict(model: nn.Module, ckpt: str | os.PathLike, strict: bool = True) -> None:
    path = Path(ckpt)
    if not path.is_file():
        raise EncoderError(f"{path}: checkpoint file does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001
        raise EncoderError(f"{path}: not a readable torch checkpoint ({err})") from err
    state = _unwrap_state_dict(state)
    if not isinstance(state, dict):
        raise EncoderError(f"{path}: expected a state dict, got {type(state).__name__}")
    target = model.model if isinstance(model, TimmPooledEncoder) else model
    state = _strip_prefixes(state, set(target.state_dict()))
    # A classifier head in the checkpoint is fine: feature extractors are built without one.
    head = (
        getattr(target, "pretrained_cfg", {}).get("classifier")
        if hasattr(target, "pretrained_cfg")
        else None
    )
    heads = (head,) if isinstance(head, str) else tuple(head or ())
    try:
        missing, unexpected = target.load_state_dict(state, strict=False)
    except RuntimeError as err:
        raise EncoderError(f"{path}: weights do not fit the architecture ({err})") from err
    unexpected = [k for k in unexpected if not any(k.startswith(h + ".") for h in heads)]
    if strict and (missing or unexpected):
        raise EncoderError(
            f"{path}: weights do not fit the architecture ({len(missing)} missing, e.g. "
            f"{list(missing)[:3]}; {len(unexpected)} unexpected, e.g. {list(unexpected)[:3]})"
        )


# ----------------------------------------------------------------------------- MCM-KD student checkpoint


def save_student_checkpoint(
    path: str | os.PathLike,
    student: TimmCNNEncoder,
    *,
    arch: str,
    transforms: PatchTransforms,
    config: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
) -> Path:
    """Write what extraction needs, and nothing of the training scaffolding (predictor, optimiser)."""
    from .utils import atomic_path, to_jsonable

    if arch not in STUDENT_ARCHS:
        raise EncoderError(
            f"unknown student architecture '{arch}' (choices: {sorted(STUDENT_ARCHS)})"
        )
    payload = {
        "format": CHECKPOINT_FORMAT,
        "arch": arch,
        "timm_name": STUDENT_ARCHS[arch],
        "out_dim": int(student.out_dim),
        "input_size": int(transforms.input_size),
        "mean": list(transforms.mean),
        "std": list(transforms.std),
        "state_dict": {k: v.detach().cpu() for k, v in student.state_dict().items()},
        "config": to_jsonable(config or {}),
        "metrics": to_jsonable(metrics or {}),
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return Path(path)


def read_student_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise EncoderError(f"{path}: MCM-KD checkpoint does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001
        raise EncoderError(f"{path}: not a readable torch checkpoint ({err})") from err
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise EncoderError(
            f"{path}: not an MCM-KD encoder checkpoint (format {found!r}, expected {CHECKPOINT_FORMAT!r};"
            " make one with `clam-mcmkd finetune`)"
        )
    if payload.get("arch") not in STUDENT_ARCHS:
        raise EncoderError(f"{path}: unknown student architecture {payload.get('arch')!r}")
    return payload


@register_encoder(
    "mcmkd_resnet50", "MCM-KD fine-tuned ResNet-50 trunc from --ckpt / MCMKD_CKPT_PATH"
)
def _build_mcmkd(pretrained=True, ckpt=None, target_img_size=224, **_):
    ckpt = ckpt or os.environ.get(MCMKD_CKPT_ENV)
    if not ckpt:
        raise EncoderError(
            f"mcmkd_resnet50 needs a checkpoint: pass --ckpt or set {MCMKD_CKPT_ENV}"
            " (made by `clam-mcmkd finetune`)"
        )
    payload = read_student_checkpoint(ckpt)
    model = TimmCNNEncoder(payload["timm_name"], pretrained=False)
    try:
        model.load_state_dict(payload["state_dict"], strict=True)
    except RuntimeError as err:
        raise EncoderError(f"{ckpt}: student weights do not fit {payload['arch']} ({err})") from err
    transforms = PatchTransforms(
        int(payload["input_size"]), tuple(payload["mean"]), tuple(payload["std"])
    )
    return Encoder(model, transforms, int(payload["out_dim"]))


def encoder_flops_params(encoder: Encoder, device: str = "cpu") -> dict[str, float]:
    """Parameters (M) and GFLOPs per patch (forward, multiply-adds x2) for the compute table."""
    from torch.utils.flop_counter import FlopCounterMode

    params = sum(p.numel() for p in encoder.model.parameters()) / 1e6
    size = encoder.transforms.input_size or 224
    x = torch.zeros(1, 3, size, size, device=device)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        encoder.model.to(device)(x)
    return {"params_m": params, "gflops_per_patch": counter.get_total_flops() / 1e9}
