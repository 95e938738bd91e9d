"""What each arm of the comparison is: its encoder, its fine-tune, and its name in the report.

An arm's report name says what the encoder is, never what it was meant to be: a registry name
(``resnet50_trunc``, ``uni_v1``), ``[random]`` for a random init, ``arch[file]`` for a
checkpoint (``resnet18_trunc[proxy_baseline]``, the file's stem), and for a fine-tuned student
``objective(student←teacher)``, e.g. ``mcmkd(resnet50_trunc←uni_v1)``,
``patch_kd(resnet18_trunc[proxy_baseline]←resnet18_trunc[proxy_teacher])``; a sham
fine-tune is ``mcmkd+sham(...)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .config import ArmSettings, BenchmarkConfig

CHECKPOINT_ENCODERS = ("checkpoint", "mcmkd_resnet50")  # names whose weights come from a file


@dataclass(frozen=True)
class EncoderSpec:
    """What extracts an arm's features: a registry name and, for some, a checkpoint."""

    model: str
    ckpt: str | None = None


def teacher_of(cfg: BenchmarkConfig, arm: ArmSettings) -> EncoderSpec:
    """The arm's teacher (its own, else the fine-tune section's)."""
    if arm.teacher:
        return EncoderSpec(arm.teacher, cfg.resolve_path(arm.teacher_ckpt))
    ckpt = arm.teacher_ckpt or cfg.finetune.teacher_ckpt
    return EncoderSpec(cfg.finetune.teacher, cfg.resolve_path(ckpt))


def student_start(cfg: BenchmarkConfig) -> EncoderSpec:
    """The student before fine-tuning: the untuned arm's encoder."""
    f = cfg.finetune
    if f.student_ckpt:
        return EncoderSpec("checkpoint", cfg.resolve_path(f.student_ckpt))
    return EncoderSpec(f.student)


def arm_encoder(cfg: BenchmarkConfig, arm: ArmSettings, finetuned: Path | None) -> EncoderSpec:
    """The encoder that extracts `arm`'s features (`finetuned`: its fine-tuned checkpoint)."""
    if arm.kind == "untuned":
        return student_start(cfg)
    if arm.kind == "teacher":
        return teacher_of(cfg, arm)
    if arm.kind == "encoder":
        return EncoderSpec(arm.encoder, cfg.resolve_path(arm.ckpt))
    return EncoderSpec("checkpoint", str(finetuned))


def spec_label(spec: EncoderSpec, pretrained: bool, arch: str | None = None) -> str:
    """``name``, ``name[random]``, or ``arch[file stem]`` for a checkpoint-only encoder (`arch`: the
    file's architecture; without it, read from the file)."""
    if spec.ckpt and spec.model in CHECKPOINT_ENCODERS:
        return f"{arch or checkpoint_arch(spec.ckpt) or spec.model}[{Path(spec.ckpt).stem}]"
    if spec.ckpt:  # a named model's weights from a local file (e.g. UNI_CKPT_PATH's)
        return spec.model
    return spec.model if pretrained else f"{spec.model}[random]"


def checkpoint_arch(path: str) -> str | None:
    """The architecture recorded in an encoder checkpoint, None if there is no such file."""
    if not Path(path).is_file():
        return None
    from ..encoders import read_student_checkpoint

    return str(read_student_checkpoint(path)["arch"])


def arm_label(cfg: BenchmarkConfig, arm: ArmSettings) -> str:
    """The name the report gives `arm`: what its encoder is (see the module docstring)."""
    student = spec_label(student_start(cfg), cfg.pretrained, cfg.finetune.student)
    if arm.kind == "untuned":
        return student
    if arm.kind == "finetune":
        method = arm.objective + ("+sham" if arm.targets == "sham" else "")
        return f"{method}({student}←{spec_label(teacher_of(cfg, arm), cfg.pretrained)})"
    return spec_label(arm_encoder(cfg, arm, None), cfg.pretrained)


def finetune_arms(cfg: BenchmarkConfig) -> list[ArmSettings]:
    return [a for a in cfg.arms if a.kind == "finetune"]


def unknown_encoders(cfg: BenchmarkConfig) -> list[str]:
    """Encoder names in the config (arms, teachers, the student) that no registry or timm knows:
    found before any stage runs, not after tiling and extraction."""
    import timm

    from ..encoders import STUDENT_ARCHS, list_encoders

    known = set(list_encoders())
    names = {student_start(cfg).model}
    for arm in cfg.arms:
        if arm.kind in ("finetune", "teacher"):
            names.add(teacher_of(cfg, arm).model)
        if arm.kind in ("untuned", "teacher", "encoder"):
            names.add(arm_encoder(cfg, arm, None).model)
    bad = [n for n in sorted(names)
           if n not in known and not n.startswith("hf-hub:") and not timm.is_model(n)]  # fmt: skip
    if finetune_arms(cfg) and cfg.finetune.student not in STUDENT_ARCHS:
        bad.append(f"{cfg.finetune.student} (student: one of {sorted(STUDENT_ARCHS)})")
    return bad


def missing_checkpoints(cfg: BenchmarkConfig) -> list[str]:
    """Checkpoint files the config names that do not exist (checked before any stage runs)."""
    paths = [student_start(cfg).ckpt]
    for arm in cfg.arms:
        if arm.kind in ("finetune", "teacher"):
            paths.append(teacher_of(cfg, arm).ckpt)
        elif arm.kind == "encoder":
            paths.append(cfg.resolve_path(arm.ckpt))
    return sorted({p for p in paths if p and not Path(p).is_file()})
