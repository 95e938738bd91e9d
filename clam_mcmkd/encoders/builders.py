"""The built-in encoders; each registers itself under its name on import:

* ``resnet50_trunc`` - exactly CLAM's: timm ``resnet50.tv_in1k``, ``features_only=True,
  out_indices=(3,)``, global average pool, 1024-d, Resize(224) -> ToTensor -> ImageNet Normalize.
* ``resnet18_trunc`` - the same truncation of a ResNet-18 (256-d): a CPU-sized student for tests
  and the demo.
* ``mcmkd_resnet50`` - an MCM-KD fine-tuned student, loaded from ``ckpt=`` or ``MCMKD_CKPT_PATH``.
* ``checkpoint`` - the same loader under a neutral name: any encoder checkpoint (``ckpt=``),
  named for what it is by the caller (a baseline, a teacher, a control, a student).
* any other name - a timm model (``hf-hub:`` names too) as a pooled feature extractor, optionally
  with weights from a local checkpoint; used for teachers.

Pathology foundation models (``uni_v1``, ``uni2_h``, ``virchow2``, ...) are in :mod:`.foundation`.
"""

from __future__ import annotations

import logging
import os

import torch
from torch import nn

from .catalog import BUILTIN_DESCRIPTIONS
from .checkpoint import load_state_dict, read_student_checkpoint
from .registry import (
    Builder,
    Encoder,
    EncoderError,
    describe_built,
    list_encoders,
    reaching_weights,
    register_encoder,
)
from .transforms import PatchTransforms

log = logging.getLogger(__name__)
MCMKD_CKPT_ENV = "MCMKD_CKPT_PATH"


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
        self.output_rule = f"features{tuple(out_indices)}" + ("+avgpool" if pool else "")

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
        self.output_rule = "timm pooled (num_classes=0)"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def _trunc_builder(name: str, timm_name: str):
    def build(pretrained=True, ckpt=None, target_img_size=224, **_):
        download = pretrained and ckpt is None
        with reaching_weights(name, f"timm {timm_name}", enabled=download):
            model = TimmCNNEncoder(timm_name, pretrained=download)
        if ckpt is not None:
            load_state_dict(model, ckpt)
        return Encoder(model, PatchTransforms(target_img_size), model.out_dim)

    return build


for _name, _timm_name in (("resnet50_trunc", "resnet50.tv_in1k"),
                          ("resnet18_trunc", "resnet18.tv_in1k")):  # fmt: skip
    register_encoder(_name, BUILTIN_DESCRIPTIONS[_name], source=f"timm/{_timm_name}")(
        _trunc_builder(_name, _timm_name)
    )


def timm_builder(name: str) -> Builder:
    def build(pretrained=True, ckpt=None, target_img_size=224, **kwargs):
        import timm

        download = pretrained and ckpt is None
        try:
            with reaching_weights(name, f"timm {name}", enabled=download):
                model = timm.create_model(name, pretrained=download, num_classes=0, **kwargs)
        except RuntimeError as err:
            if "Unknown model" in str(err) or "not found" in str(err).lower():
                raise EncoderError(
                    f"unknown encoder '{name}': not registered ({', '.join(list_encoders())}) and not a timm model"
                ) from err
            raise
        if ckpt is not None:
            load_state_dict(model, ckpt)
        _warn_if_foundation_arch(name, ckpt)
        cfg = timm.data.resolve_data_config({}, model=model)
        size = int(cfg["input_size"][-1])
        transforms = PatchTransforms(size, tuple(cfg["mean"]), tuple(cfg["std"]))
        return Encoder(TimmPooledEncoder(model), transforms, int(model.num_features))

    return build


def _warn_if_foundation_arch(name: str, ckpt) -> None:
    """A foundation model's weights in its bare timm architecture get timm's default
    preprocessing and pooling (offline: mean 0.5, 518 px for DINOv2 archs), not the card's."""
    from .foundation import SPECS

    named = [s.name for s in SPECS.values() if s.arch and s.arch == name.split(".")[0]]
    if named and ckpt is not None:
        log.warning(
            "%s: built with timm's default preprocessing and pooling, not a foundation model "
            "card's; if %s holds %s weights, use that name instead", name, ckpt, " or ".join(named)
        )  # fmt: skip


@register_encoder(
    "mcmkd_resnet50", BUILTIN_DESCRIPTIONS["mcmkd_resnet50"], ckpt_env=MCMKD_CKPT_ENV,
    describe=lambda: describe_built("mcmkd_resnet50", "resnet50_trunc"),
)  # fmt: skip
def _build_mcmkd(pretrained=True, ckpt=None, target_img_size=224, **_):
    ckpt = ckpt or os.environ.get(MCMKD_CKPT_ENV)
    if not ckpt:
        raise EncoderError(
            f"mcmkd_resnet50 needs a checkpoint: pass --ckpt or set {MCMKD_CKPT_ENV}"
            " (made by `clam-mcmkd finetune`)"
        )
    return _from_encoder_checkpoint(ckpt)


@register_encoder(
    "checkpoint", BUILTIN_DESCRIPTIONS["checkpoint"],
    describe=lambda: describe_built("checkpoint", "resnet50_trunc"),
)  # fmt: skip
def _build_checkpoint(pretrained=True, ckpt=None, target_img_size=224, **_):
    """The same loader as ``mcmkd_resnet50`` under a name that claims nothing about how the
    weights were made (baselines, teachers, controls and students alike)."""
    if not ckpt:
        raise EncoderError("checkpoint needs an encoder checkpoint file: pass --ckpt")
    return _from_encoder_checkpoint(ckpt)


def _from_encoder_checkpoint(ckpt) -> Encoder:
    payload = read_student_checkpoint(ckpt)
    model = TimmCNNEncoder(payload["timm_name"], pretrained=False)
    try:
        if next(model.parameters()).is_meta:  # a meta-device build (teacher_spec): shapes only
            _check_shapes(model, payload["state_dict"])
        else:
            model.load_state_dict(payload["state_dict"], strict=True)
    except RuntimeError as err:
        raise EncoderError(f"{ckpt}: student weights do not fit {payload['arch']} ({err})") from err
    transforms = PatchTransforms(
        int(payload["input_size"]), tuple(payload["mean"]), tuple(payload["std"])
    )
    return Encoder(model, transforms, int(payload["out_dim"]))


def _check_shapes(model: nn.Module, state: dict) -> None:
    """What load_state_dict(strict=True) checks, without copying into meta tensors."""
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    wrong = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or wrong:
        raise RuntimeError(
            f"missing {missing[:3]}, unexpected {unexpected[:3]}, shapes {wrong[:3]}"
        )
