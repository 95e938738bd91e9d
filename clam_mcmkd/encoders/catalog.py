"""What every built-in encoder is, as plain data: ``list-encoders`` reads it without torch.

:class:`FoundationModelSpec` holds one published patch encoder (architecture kwargs,
preprocessing, output rule, width, weights), transcribed from its card and official loader; the
table of them is :mod:`.zoo`. :data:`BUILTIN_ROWS` are the ``list-encoders --json`` rows of the
other built-ins (CLAM's truncated ResNets, the MCM-KD student); a test checks them against a
meta-device build, so they cannot drift from what the builders make.

Nothing here imports torch, timm or tiatoolbox: ``clam-mcmkd list-encoders`` answers in well
under two seconds (a fresh interpreter importing torch and timm alone takes 4-9 s).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BIOPTIMUS_MEAN = (0.707223, 0.578729, 0.703617)
BIOPTIMUS_STD = (0.211883, 0.230117, 0.177517)
HALF = (0.5, 0.5, 0.5)  # kaiko.ai's models: mean = std = 0.5
LUNIT_MEAN = (0.70322989, 0.53606487, 0.66096631)
LUNIT_STD = (0.21716536, 0.26081574, 0.20723464)

OUTPUT_RULES = ("cls", "cls+mean_patch")
# How a spec is built: a timm ViT (+ the output rule), CONCH v1.5's tower (a timm ViT trunk and
# its attentional-pooler head), a transformers AutoModel from the hub repo's config.json (not
# transcribed: needs the hub or a local copy once), or not at all here (listed with the reason).
KINDS = ("timm", "conch_v15", "transformers", "listed")


@dataclass(frozen=True)
class FoundationModelSpec:
    """Everything needed to rebuild one published patch encoder exactly."""

    name: str
    hub_id: str  # where pretrained weights come from: timm ``hf-hub:`` name, or the HF repo
    arch: str  # timm architecture the weights fit (built offline with ``timm_kwargs``)
    timm_kwargs: tuple[tuple[str, Any], ...]  # layer classes as names (foundation._LAYERS)
    out_dim: int
    ckpt_env: str  # CLAM-style variable holding a local checkpoint path
    source: str  # model card + official loader each figure was transcribed from
    output: str = "cls"  # "cls": class token; "cls+mean_patch": class token ++ mean patch token
    input_size: int = 224
    resize_size: int = 224
    crop: bool = True  # False: Resize(input_size) only (CLAM's chain), as GPFM's loader does
    interpolation: str = "bilinear"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    params_m: float = 0.0  # published parameter count (millions), source in `source`
    licence: str = ""
    gated: bool = False  # the hub asks users to accept terms before downloading
    hub_file: str = ""  # a file in repo `hub_id` holding a bare state dict (not a timm repo)
    kind: str = "timm"
    variant_of: str = ""  # the same weights under another output rule
    reason: str = ""  # kind "listed": why it is not built here, and what to do instead

    @property
    def buildable(self) -> bool:
        return self.kind != "listed"

    @property
    def offline(self) -> bool:
        """Built from the spec alone (``--no-pretrained`` needs nothing from the hub)."""
        return self.kind in ("timm", "conch_v15")

    def model_kwargs(self) -> dict[str, Any]:
        """``timm_kwargs`` with layer names resolved to classes."""
        from .foundation import resolve_layer

        return {
            key: resolve_layer(value) if key in ("mlp_layer", "act_layer") else value
            for key, value in self.timm_kwargs
        }

    def transforms(self):
        """Resize(resize_size) [-> CenterCrop(input_size)] -> ToTensor -> Normalize, as the card."""
        from .transforms import PatchTransforms

        resize = self.resize_size if self.crop else None
        return PatchTransforms(self.input_size, self.mean, self.std, resize, self.interpolation)

    def describe(self) -> dict[str, Any]:
        """One row of ``list-encoders --json``."""
        return {
            "name": self.name,
            "out_dim": self.out_dim,
            "input_size": self.input_size,
            "resize_size": self.resize_size if self.crop else self.input_size,
            "crop": self.crop,
            "interpolation": self.interpolation,
            "mean": list(self.mean),
            "std": list(self.std),
            "output": self.output,
            "source": self.source,
            "weights": f"hf-hub:{self.hub_id}/{self.hub_file}" if self.hub_file else self.hub_id,
            "ckpt_env": self.ckpt_env,
            "params_m": self.params_m,
            "licence": self.licence,
            "gated": self.gated,
            "buildable": self.buildable,
            "offline": self.offline,
            "variant_of": self.variant_of,
            "reason": self.reason,
        }

    def one_line(self) -> str:
        """``list-encoders``' description of the name."""
        hub = self.hub_id.removeprefix("hf-hub:")
        if not self.buildable:
            return f"{hub}: {self.out_dim}-d, listed, not built here: {self.reason}"
        rule = "" if self.output == "cls" else f", {self.output}"
        hf = "" if self.offline else ", transformers (architecture from the hub's config.json)"
        return f"{hub}: {self.out_dim}-d, {self.input_size} px{rule}{hf}"


def other_output(spec: FoundationModelSpec, name: str) -> FoundationModelSpec:
    """`spec` under the card's other output rule (its width halves or doubles)."""
    from dataclasses import replace

    if spec.output == "cls":
        return replace(spec, name=name, output="cls+mean_patch", out_dim=2 * spec.out_dim,
                       variant_of=spec.name)  # fmt: skip
    return replace(spec, name=name, output="cls", out_dim=spec.out_dim // 2, variant_of=spec.name)


# The other built-ins (encoders/builders.py registers these descriptions): their rows as a
# meta-device build gives them (tests/test_encoder_zoo.py checks that it still does).
_TRUNC_ROW = {
    "input_size": 224, "resize_size": 224, "crop": False, "interpolation": "bilinear",
    "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "output": "features(3,)+avgpool",
}  # fmt: skip
BUILTIN_DESCRIPTIONS = {
    "resnet50_trunc": "CLAM's ResNet-50 truncated after layer3, 1024-d (ImageNet)",
    "resnet18_trunc": "ResNet-18 truncated after layer3, 256-d (small student)",
    "mcmkd_resnet50": "MCM-KD fine-tuned ResNet-50 trunc from --ckpt / MCMKD_CKPT_PATH (the "
    "checkpoint's input size and normalisation win; shown: the resnet50_trunc student's)",
    "checkpoint": "Any encoder checkpoint from --ckpt (a `finetune` student of any architecture, "
    "or one written by save_student_checkpoint): architecture, input size and normalisation "
    "from the file; shown: a resnet50_trunc's",
}
BUILTIN_ROWS = {
    name: {
        "name": name,
        "out_dim": width,
        **_TRUNC_ROW,
        "source": BUILTIN_DESCRIPTIONS[name],
        "weights": weights,
        "ckpt_env": env,
    }  # fmt: skip
    for name, width, weights, env in (
        ("resnet50_trunc", 1024, "timm/resnet50.tv_in1k", ""),
        ("resnet18_trunc", 256, "timm/resnet18.tv_in1k", ""),
        ("mcmkd_resnet50", 1024, "", "MCMKD_CKPT_PATH"),
        ("checkpoint", 1024, "", ""),
    )
}


def describe_all() -> list[dict[str, Any]]:
    """``list-encoders --json``: every built-in name's row, sorted by name, without torch."""
    from .zoo import SPECS

    rows = {**BUILTIN_ROWS, **{name: spec.describe() for name, spec in SPECS.items()}}
    return [rows[name] for name in sorted(rows)]


def descriptions() -> dict[str, str]:
    """``list-encoders``: every built-in name -> its one-line description, without torch."""
    from .zoo import SPECS

    lines = {**BUILTIN_DESCRIPTIONS, **{n: s.one_line() for n, s in SPECS.items()}}
    return {name: lines[name] for name in sorted(lines)}
