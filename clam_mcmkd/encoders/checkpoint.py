"""Checkpoints: the one place checkpoint files are read, and the MCM-KD student's.

:func:`load_checkpoint` reads encoder weights, MCM-KD student checkpoints, fine-tuning resume
states and MIL fold weights alike, so a missing or unreadable file is the same one clear line
everywhere. The student checkpoint holds only what extraction needs (weights, architecture,
input size, normalisation) plus the run's config and metrics.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..utils import atomic_path, to_jsonable
from .registry import EncoderError
from .transforms import PatchTransforms

CHECKPOINT_FORMAT = "clam_mcmkd.encoder/1"
# Student architectures MCM-KD can fine-tune: registry name -> timm name of the truncated CNN.
STUDENT_ARCHS = {"resnet50_trunc": "resnet50.tv_in1k", "resnet18_trunc": "resnet18.tv_in1k"}


def load_checkpoint(
    path: str | os.PathLike,
    *,
    what: str = "torch checkpoint",
    error: type[Exception] = EncoderError,
    hint: str = "",
    weights_only: bool = False,
    map_location: Any = "cpu",
) -> Any:
    """``torch.load`` a checkpoint; a missing or unreadable file raises `error` naming it."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: {what} does not exist{hint}")
    try:
        return torch.load(path, map_location=map_location, weights_only=weights_only)
    except Exception as err:  # noqa: BLE001 - torch raises many types for corrupt files
        raise error(f"{path}: not a readable {what} ({err}){hint}") from err


def _unwrap_state_dict(state: Any) -> Any:
    """The weights inside layouts timm's reader leaves wrapped ({'module'|'teacher': ...}: DDP
    pickles, DINO-style self-supervised checkpoints)."""
    for key in ("module", "teacher"):
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


def read_state_dict(path: str | os.PathLike) -> dict[str, Any]:
    """The weights in a checkpoint file of any common layout, read by timm's ``load_state_dict``
    (``.safetensors`` too; 'state_dict'/'model' keys, 'module.'/'_orig_mod.' prefixes; non-EMA
    weights), then unwrapped from the layouts timm leaves as they are."""
    from timm.models import load_state_dict as timm_load_state_dict

    path = Path(path)
    if not path.is_file():
        raise EncoderError(f"{path}: torch checkpoint does not exist")
    try:
        state = timm_load_state_dict(str(path), use_ema=False, weights_only=False)
    except Exception as err:  # noqa: BLE001 - torch/safetensors raise many types for bad files
        raise EncoderError(f"{path}: not a readable torch checkpoint ({err})") from err
    state = _unwrap_state_dict(state)
    if not isinstance(state, dict):
        raise EncoderError(f"{path}: expected a state dict, got {type(state).__name__}")
    return state


def load_state_dict(model: nn.Module, ckpt: str | os.PathLike, strict: bool = True) -> None:
    """Load weights from a checkpoint file in any common layout into `model`.

    A model built on the meta device (to read its shapes: a teacher's identity, list-encoders)
    cannot hold weights: the file is only checked to exist, not read.
    """
    path = Path(ckpt)
    if any(p.is_meta for p in model.parameters()):
        if not path.is_file():
            raise EncoderError(f"{path}: torch checkpoint does not exist")
        return
    state = _strip_prefixes(read_state_dict(path), set(model.state_dict()))
    # A classifier head in the checkpoint is fine: feature extractors are built without one.
    head = (
        getattr(model, "pretrained_cfg", {}).get("classifier")
        if hasattr(model, "pretrained_cfg")
        else None
    )
    heads = (head,) if isinstance(head, str) else tuple(head or ())
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:
        raise EncoderError(f"{path}: weights do not fit the architecture ({err})") from err
    unexpected = [k for k in unexpected if not any(k.startswith(h + ".") for h in heads)]
    if strict and (missing or unexpected):
        raise EncoderError(
            f"{path}: weights do not fit the architecture ({len(missing)} missing, e.g. "
            f"{list(missing)[:3]}; {len(unexpected)} unexpected, e.g. {list(unexpected)[:3]})"
        )


# ----------------------------------------------------------------------------- MCM-KD student


def save_student_checkpoint(
    path: str | os.PathLike,
    student: nn.Module,
    *,
    arch: str,
    transforms: PatchTransforms,
    config: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
) -> Path:
    """Write what extraction needs, and nothing of the training scaffolding (predictor, optimiser)."""
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
    payload = load_checkpoint(path, what="MCM-KD checkpoint")
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise EncoderError(
            f"{path}: not an MCM-KD encoder checkpoint (format {found!r}, expected {CHECKPOINT_FORMAT!r};"
            " make one with `clam-mcmkd finetune`)"
        )
    if payload.get("arch") not in STUDENT_ARCHS:
        raise EncoderError(f"{path}: unknown student architecture {payload.get('arch')!r}")
    return payload
