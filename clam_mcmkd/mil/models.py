"""The MIL model registry: a name -> a builder, how it trains, and what CLAM's main.py calls it.

abmil, clam_sb, clam_mb (:mod:`.nets`), transmil (:mod:`.transmil`) and mhim_abmil (ABMIL's
module trained by :mod:`.mhim`).

torch-free at import (the CLI takes its ``--model-type`` choices from here); each builder
imports its network from :mod:`.nets`. To add a model, write its ``nn.Module`` with CLAM's
forward contract (``forward(h, label=None, instance_eval=False)`` -> ``(logits, Y_prob, Y_hat,
A_raw, results_dict)``) and register a builder below.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..utils import ClamMcmkdError

SIZES = {"small": (512, 256), "big": (512, 384)}  # CLAM's size_arg -> (hidden, attention)
MIL_LOSSES = ("ce", "svm")  # bag / instance losses (nets.make_loss)


@dataclass(frozen=True)
class MilModel:
    name: str
    build: Callable[..., Any]  # keyword arguments of :func:`build_model` -> nn.Module
    description: str
    instance_loss: bool  # trained with CLAM's instance-clustering loss (needs instance heads)
    clam_args: tuple[str, ...] | None  # CLAM main.py arguments that train it (None: CLAM can't)
    mhim_base: str | None = None  # MHIM-MIL: the baseline its teacher starts from (mil/mhim.py)
    attention_map: bool = True  # one attention score per patch pooled the bag (heatmap draws it)


_REGISTRY: dict[str, MilModel] = {}


def register_mil_model(
    name: str,
    description: str,
    *,
    instance_loss: bool,
    clam_args: tuple[str, ...] | None = None,
    mhim_base: str | None = None,
    attention_map: bool = True,
) -> Callable:
    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        _REGISTRY[name] = MilModel(
            name, fn, description, instance_loss, clam_args, mhim_base, attention_map
        )
        return fn

    return wrap


def list_mil_models() -> list[str]:
    """Registered MIL model names, in registration order."""
    return list(_REGISTRY)


def get_mil_model(name: str) -> MilModel:
    if name not in _REGISTRY:
        raise ClamMcmkdError(f"unknown model type '{name}' ({', '.join(_REGISTRY)})")
    return _REGISTRY[name]


def build_model(
    model_type: str,
    n_classes: int,
    embed_dim: int,
    dropout: float = 0.25,
    k_sample: int = 8,
    inst_loss: str = "svm",
    subtyping: bool | None = False,
    size_arg: str = "small",
    gate: bool = True,
):
    """A fresh model; module creation order equals CLAM's, so seeds give CLAM's init.

    ``subtyping=None`` means CLAM's default: on for more than two classes.
    """
    from .nets import make_loss

    return get_mil_model(model_type).build(
        gate=gate,
        size_arg=size_arg,
        dropout=dropout,
        k_sample=k_sample,
        n_classes=n_classes,
        instance_loss_fn=make_loss(inst_loss, 2),
        subtyping=(n_classes > 2) if subtyping is None else subtyping,
        embed_dim=embed_dim,
    )


def _clam_sb(**kwargs):
    from .nets import ClamSB

    return ClamSB(**kwargs)


def _transmil(**kwargs):
    from .transmil import TransMIL

    return TransMIL(n_classes=kwargs["n_classes"], embed_dim=kwargs["embed_dim"])


def _clam_mb(**kwargs):
    from .nets import ClamMB

    return ClamMB(**kwargs)


# abmil is CLAM-SB's module trained without its instance loss, so CLAM's eval.py
# (--model_type clam_sb) reads its checkpoints.
register_mil_model(
    "abmil",
    "CLAM-SB trained without instance clustering (CLAM's --no_inst_cluster)",
    instance_loss=False,
    clam_args=("--model_type", "clam_sb", "--no_inst_cluster"),
)(_clam_sb)
register_mil_model(
    "clam_sb",
    "single-branch CLAM: gated attention pooling + instance clustering",
    instance_loss=True,
    clam_args=("--model_type", "clam_sb"),
)(_clam_sb)
register_mil_model(
    "clam_mb",
    "multi-branch CLAM: one attention branch and bag classifier per class",
    instance_loss=True,
    clam_args=("--model_type", "clam_mb"),
)(_clam_mb)
register_mil_model(
    "transmil",
    "TransMIL: Nystrom self-attention, PPEG position encoding, class token (Shao et al. 2021)",
    instance_loss=False,
    attention_map=False,
)(_transmil)
# MHIM-MIL's student is ABMIL's module: CLAM's eval.py (--model_type clam_sb) reads it too,
# but CLAM's main.py cannot train it (clam_args None).
register_mil_model(
    "mhim_abmil",
    "ABMIL trained by MHIM-MIL: teacher-guided hard-instance masking (Tang et al. 2023)",
    instance_loss=False,
    mhim_base="abmil",
)(_clam_sb)
