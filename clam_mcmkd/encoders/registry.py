"""Encoder registry in the style of timm's ``create_model``.

A name maps to a builder returning :class:`Encoder` ``(model, transforms, out_dim)``. The
built-in builders (:mod:`.builders`, :mod:`.foundation`) register themselves on import; any name
that is not registered is built as a timm model (``hf-hub:`` names too), a pooled feature
extractor. Pretrained weights that cannot be reached are one line naming the model and the ways
out (:class:`PretrainedWeightsError`), whatever the name.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import torch
from torch import nn

from ..utils import ClamMcmkdError
from .transforms import PatchTransforms


class EncoderError(ClamMcmkdError):
    pass


class PretrainedWeightsError(EncoderError):
    """Pretrained weights that cannot be reached (offline, gated, not cached): one line."""

    def __init__(self, name: str, source: str, reason: str, ckpt_env: str | None = None,
                 ckpt_option: str = "--ckpt"):  # fmt: skip
        self._parts = (name, source, reason, ckpt_env)
        ways = f"--no-pretrained (random init), {ckpt_option} PATH (a local checkpoint)"
        if ckpt_env:
            ways += f", or set ${ckpt_env} to a local checkpoint"
        gated = "; gated models: accept the terms on the model page and log in to the hub"
        super().__init__(
            f"{name}: cannot load pretrained weights from {source} ({reason}); use {ways}"
            + (gated if source.startswith("hf-hub:") else "")
        )

    def for_option(self, ckpt_option: str) -> PretrainedWeightsError:
        """The same error naming another checkpoint option (``finetune --teacher-ckpt``)."""
        return PretrainedWeightsError(*self._parts, ckpt_option=ckpt_option)


@contextlib.contextmanager
def reaching_weights(
    name: str, source: str, ckpt_env: str | None = None, *, enabled: bool = True
) -> Iterator[None]:
    """Around a ``timm.create_model(..., pretrained=True)``: a failure to fetch the weights (no
    network, HF_HUB_OFFLINE, a gated repo, a closed client...) becomes one actionable line.
    ``enabled=False`` (no download asked for) lets every error through as it is."""
    try:
        yield
    except ClamMcmkdError:
        raise
    except Exception as err:  # noqa: BLE001 - hub, HTTP, cache and torch.hub errors alike
        if not enabled or (isinstance(err, RuntimeError) and "Unknown model" in str(err)):
            raise
        reason = (str(err).strip().splitlines() or [""])[0][:160]
        raise PretrainedWeightsError(
            name, source, f"{type(err).__name__}: {reason}", ckpt_env
        ) from None


class Encoder(NamedTuple):
    model: nn.Module
    transforms: PatchTransforms
    out_dim: int


Builder = Callable[..., Encoder]
_REGISTRY: dict[str, tuple[Builder, str]] = {}
_CKPT_ENV: dict[str, str] = {}  # name -> variable holding a local checkpoint (CLAM's habit)
_PRETRAINED_SOURCE: dict[str, str] = {}  # name -> where pretrained=True takes the weights from
_ALIASES: dict[str, str] = {}  # e.g. a foundation model's hub id -> its registered name
_DESCRIBE: dict[str, Callable[[], dict]] = {}  # name -> its list-encoders --json row


def register_encoder(
    name: str,
    description: str = "",
    *,
    ckpt_env: str | None = None,
    source: str | None = None,
    aliases: tuple[str, ...] = (),
    describe: Callable[[], dict] | None = None,
) -> Callable[[Builder], Builder]:
    """Decorator: ``builder(pretrained, ckpt, target_img_size, **kwargs) -> Encoder`` as `name`.

    ``ckpt_env``: the variable the builder reads a checkpoint from; ``source``: where its
    pretrained weights come from (both feed :func:`weights_source`); ``aliases``: other names
    that build it (a hub id, so ``hf-hub:...`` never falls through to timm's defaults);
    ``describe``: its ``list-encoders --json`` row, when a meta-device build cannot give it.
    """

    def wrap(fn: Builder) -> Builder:
        _REGISTRY[name] = (fn, description or (fn.__doc__ or "").strip().split("\n")[0])
        for table, value in ((_CKPT_ENV, ckpt_env), (_PRETRAINED_SOURCE, source),
                             (_DESCRIBE, describe)):  # fmt: skip
            if value:
                table[name] = value
        _ALIASES.update(dict.fromkeys(aliases, name))
        return fn

    return wrap


def canonical_name(name: str) -> str:
    """The registered name `name` stands for (itself, unless it is an alias)."""
    return _ALIASES.get(name, name)


def _builtins():
    """The built-in builders, which register themselves when their module is first imported."""
    from . import builders, foundation  # noqa: F401 - imported to register

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
    name = canonical_name(name)
    builder = _REGISTRY[name][0] if name in _REGISTRY else builtins.timm_builder(name)
    with _seeded(init_seed):
        if init_seed is not None:
            torch.manual_seed(init_seed)
        encoder = builder(
            pretrained=pretrained, ckpt=ckpt, target_img_size=target_img_size, **kwargs
        )
    encoder.model.eval()
    return encoder


def weights_source(
    name: str, *, pretrained: bool, ckpt: str | os.PathLike | None = None, init_seed: int = 0
) -> str:
    """Where :func:`create_encoder` with these arguments takes the weights from, without
    building anything: ``file:<path>`` (``ckpt`` or the name's variable), ``random-init(seed=N)``,
    or the pretrained source (a hub id; for timm names, timm's default tag)."""
    _builtins()
    name = canonical_name(name)
    env = _CKPT_ENV.get(name)
    ckpt = ckpt or (os.environ.get(env) if env else None) or None
    if ckpt is not None:
        return f"file:{os.path.abspath(ckpt)}"
    if not pretrained:
        return f"random-init(seed={init_seed})"
    if name in _PRETRAINED_SOURCE:
        return _PRETRAINED_SOURCE[name]
    if name.startswith(("hf-hub:", "hf_hub:")):
        return name
    from timm.models import get_pretrained_cfg

    try:
        cfg = get_pretrained_cfg(name)
    except RuntimeError:  # an invalid tag: timm's own build will say so
        cfg = None
    return (cfg.hf_hub_id or cfg.url or name) if cfg is not None else name


def describe_encoders() -> list[dict[str, Any]]:
    """``{name, out_dim, input_size, mean, std, source, ...}`` for every registered name: the
    built-ins' rows from :mod:`.catalog` (what ``list-encoders --json`` prints without torch),
    any other registered name read off a meta-device build (no weights, no memory)."""
    from .catalog import BUILTIN_ROWS

    _builtins()
    return [
        BUILTIN_ROWS[name] if name in BUILTIN_ROWS
        else _DESCRIBE[name]() if name in _DESCRIBE
        else describe_built(name, name)
        for name in sorted(_REGISTRY)
    ]  # fmt: skip


def describe_built(name: str, built: str, **build_kwargs: Any) -> dict[str, Any]:
    """A ``list-encoders --json`` row for `name`, read off a meta-device build of `built`."""
    with torch.device("meta"):
        enc = create_encoder(built, pretrained=False, init_seed=None, **build_kwargs)
    tf = enc.transforms
    return {
        "name": name,
        "out_dim": int(enc.out_dim),
        "input_size": int(tf.input_size),
        "resize_size": int(tf.resize_size or tf.input_size),
        "crop": tf.crop,
        "interpolation": tf.interpolation,
        "mean": list(tf.mean),
        "std": list(tf.std),
        "output": getattr(enc.model, "output_rule", ""),
        "source": _REGISTRY[name][1],
        "weights": _PRETRAINED_SOURCE.get(name, ""),
        "ckpt_env": _CKPT_ENV.get(name, ""),
    }
