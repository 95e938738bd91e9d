"""``clam-mcmkd finetune``: Masked Context Modelling with Knowledge Distillation.

A g x g window of grid-adjacent tissue patches is read with one ``read_region``; some positions
are masked; the student encodes each VISIBLE patch on its own (exactly as at extraction time);
a small context predictor turns the visible tokens into predictions of a frozen teacher's
features at the masked positions. Only the student is kept.

A run is five phases, one function each: :func:`teacher_targets` (the teacher's features of
every patch, from the on-disk cache or computed once), :func:`build` (student, predictor,
optimiser, schedule, datasets), :func:`restore` (a resume state, or the starting point),
:func:`train_steps` (the optimizer steps, with resumable states) and :func:`write_outputs`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..distributed import DistInfo, all_reduce_sum, barrier, distributed_run, shard
from ..encoders import create_encoder
from ..encoders.forward import prepare_encoder
from ..utils import progress, resolve_device
from .config import FinetuneConfig, output_paths, teacher_cache_dir, validate_config
from .losses import TargetStandardizer
from .outputs import run_metrics, write_run_outputs
from .planning import WindowPlan, plan_windows, windows_by_slide
from .predictor import ContextPredictor
from .state import fingerprint, load_state, rng_state, save_state, set_rng_state
from .steps import (
    Batches,
    Learner,
    build_optimizer,
    evaluate,
    lr_factor,
    make_loader,
    set_student_mode,
    train_step,
)
from .teacher_cache import (
    CacheReader,
    TeacherCache,
    build_teacher,
    fill_cache,
    teacher_spec,
    teacher_stats,
)
from .windows import WindowDataset

log = logging.getLogger(__name__)


@dataclass
class TeacherTargets:
    reader: CacheReader  # teacher feature of every training and validation patch
    dim: int
    mean: torch.Tensor  # per-dimension mean / std over the training patches
    std: torch.Tensor
    stats: dict[str, float]  # patches_computed, patches_cached (all ranks)
    cache_dir: Path


@dataclass
class Run:
    """What the build phase makes: the learner, the step plan and the datasets."""

    learner: Learner
    student_out_dim: int
    batches: Batches
    train_set: WindowDataset
    val_set: WindowDataset


@dataclass
class Progress:
    fingerprint: dict
    step: int = 0
    history: list[dict] = field(default_factory=list)
    val_before: dict | None = None
    windows_seen: int = 0  # in this process (for the throughput figure)
    train_seconds: float = 0.0


def finetune(cfg: FinetuneConfig) -> Path:
    """Run MCM-KD and write the student checkpoint (+ metrics, plot, config); returns its path.

    A run stopped by ``stop_after_steps`` returns the path of its resume state instead.
    """
    validate_config(cfg)
    with distributed_run(resolve_device(cfg.device)) as (device, info):
        paths = output_paths(cfg.out)
        plan = plan_windows(cfg)
        log.info("%s", plan.summary.line())
        targets = teacher_targets(cfg, plan, device, info)
        run = build(cfg, plan, targets, device, info)
        prog = restore(cfg, plan, run, targets, paths, device, info)
        if not train_steps(cfg, run, prog, paths, device, info):
            return paths["state"]
        return write_outputs(cfg, plan, targets, run, prog, paths, device, info)


def teacher_targets(
    cfg: FinetuneConfig, plan: WindowPlan, device: str, info: DistInfo
) -> TeacherTargets:
    """Teacher features, computed at most once per patch (each rank fills its share of the
    cache), then read from disk; the teacher is built only when some patch is not cached."""
    cache_dir = teacher_cache_dir(cfg)
    built: dict = {}

    def make_teacher():
        if "teacher" not in built:
            built["teacher"] = build_teacher(
                cfg.teacher, ckpt=cfg.teacher_ckpt, pretrained=cfg.pretrained,
                input_size=cfg.teacher_input_size, device=device,
            )  # fmt: skip
        return built["teacher"]

    spec = teacher_spec(
        cfg.teacher, ckpt=cfg.teacher_ckpt, pretrained=cfg.pretrained,
        input_size=cfg.teacher_input_size, device=device, precision=cfg.precision,
    )  # fmt: skip
    cache = TeacherCache(cache_dir, spec)
    needed = windows_by_slide(plan.train + plan.val)
    mine = dict(shard(sorted(needed.items()), info))
    show = cfg.progress and info.is_main
    stats = fill_cache(cache, plan.slides, mine, cfg.grid, make_teacher, device,
                       cfg.teacher_batch_size, show_progress=show,
                       precision=cfg.precision)  # fmt: skip
    built.clear()  # the teacher is not needed any more: free its memory
    barrier(info)
    stats = dict(zip(stats, all_reduce_sum([float(v) for v in stats.values()], info)))
    reader = CacheReader(cache, plan.slides, needed)
    dim, mean, std = teacher_stats(reader, plan.slides, windows_by_slide(plan.train), cfg.grid)
    return TeacherTargets(reader, dim, mean, std, stats, cache_dir)


def build(
    cfg: FinetuneConfig, plan: WindowPlan, targets: TeacherTargets, device: str, info: DistInfo
) -> Run:
    """Student (seeded), context predictor, optimiser, lr schedule and the window datasets."""
    torch.manual_seed(cfg.seed)
    student_enc = create_encoder(
        cfg.student, pretrained=cfg.pretrained, target_img_size=cfg.input_size
    )
    student = prepare_encoder(student_enc, device)
    predictor = ContextPredictor(
        student_enc.out_dim,
        targets.dim,
        cfg.grid,
        width=cfg.predictor_width,
        depth=cfg.predictor_depth,
        heads=cfg.predictor_heads,
    ).to(device)
    if not cfg.freeze_bn and info.enabled:
        student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
    optimizer = build_optimizer(cfg, student, predictor)
    batches = Batches(len(plan.train), cfg, info)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: lr_factor(s, batches.total_steps, cfg.warmup_frac, cfg.min_lr_ratio),
    )
    standardizer = TargetStandardizer(targets.mean, targets.std).to(device)
    learner = Learner(
        student, student_enc.transforms, predictor, standardizer, optimizer, scheduler
    )
    train_set = WindowDataset(plan.slides, plan.train, cfg.grid, teacher=targets.reader)
    val_set = WindowDataset(plan.slides, plan.val, cfg.grid, teacher=targets.reader)
    return Run(learner, student_enc.out_dim, batches, train_set, val_set)


def restore(
    cfg: FinetuneConfig, plan: WindowPlan, run: Run, targets: TeacherTargets,
    paths: dict[str, Path], device: str, info: DistInfo,
) -> Progress:  # fmt: skip
    """Continue an interrupted run exactly (``--resume``), else start: validate before training."""
    prog = Progress(fingerprint(cfg, plan))
    learner = run.learner
    if cfg.resume and paths["state"].is_file():
        state = load_state(paths["state"], prog.fingerprint)
        learner.student.load_state_dict(state["student"])
        learner.predictor.load_state_dict(state["predictor"])
        learner.optimizer.load_state_dict(state["optimizer"])
        learner.scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        prog.step, prog.history, prog.val_before = (
            state["step"],
            state["history"],
            state["val_before"],
        )
        if info.is_main:
            log.warning("finetune: resuming at step %d/%d", prog.step, run.batches.total_steps)
    elif cfg.resume and info.is_main:
        log.warning("finetune: --resume but no state at %s: starting from scratch", paths["state"])
    if prog.val_before is None and len(run.val_set):
        # masked cosine on the held-out windows, before and after training
        prog.val_before = evaluate(learner, run.val_set, targets.mean, cfg, device, info)
    return prog


def train_steps(
    cfg: FinetuneConfig, run: Run, prog: Progress, paths: dict[str, Path], device: str,
    info: DistInfo,
) -> bool:  # fmt: skip
    """The optimizer steps from ``prog.step`` on, saving resumable states; False when stopped
    early by ``stop_after_steps``."""
    learner, total = run.learner, run.batches.total_steps
    set_student_mode(learner.student, cfg.freeze_bn)
    learner.predictor.train()
    start = prog.step
    end = total if cfg.stop_after_steps is None else min(total, start + cfg.stop_after_steps)
    show = cfg.progress and info.is_main
    bar = progress(total=total, initial=start, desc="MCM-KD", unit="step",
                   **({} if show else {"disable": True}))  # fmt: skip
    t0 = time.perf_counter()
    # one loader for the whole run, so reading workers prefetch across optimizer steps
    step_plan = [run.batches.micro_batches(s) for s in range(start, end)]
    loader = iter(make_loader(run.train_set, [m for *_, micro in step_plan for m in micro],
                              cfg.num_workers))  # fmt: skip
    for step, (epoch, n_step, micro) in zip(range(start, end), step_plan):
        loss, lrs = train_step(learner, loader, micro, epoch, n_step, cfg, device, info)
        prog.step, prog.windows_seen = step + 1, prog.windows_seen + n_step
        rate = prog.windows_seen / max(time.perf_counter() - t0, 1e-9)
        prog.history.append({"step": step + 1, "epoch": epoch, "loss": loss, "lr": lrs[2],
                             "lr_student": lrs[0], "windows_per_s": rate})  # fmt: skip
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", win_s=f"{rate:.1f}")
        if info.is_main and (step + 1 in (total, end) or (step + 1) % cfg.save_every == 0):
            save_state(
                paths["state"], fingerprint=prog.fingerprint, step=step + 1,
                student=learner.student.state_dict(), predictor=learner.predictor.state_dict(),
                optimizer=learner.optimizer.state_dict(), scheduler=learner.scheduler.state_dict(),
                rng=rng_state(), history=prog.history, val_before=prog.val_before,
            )  # fmt: skip
    bar.close()
    del loader  # stops reading workers
    barrier(info)
    prog.train_seconds = time.perf_counter() - t0
    if end < total:
        log.warning("finetune: stopped after step %d/%d; continue with --resume", end, total)
        return False
    return True


def write_outputs(
    cfg: FinetuneConfig, plan: WindowPlan, targets: TeacherTargets, run: Run, prog: Progress,
    paths: dict[str, Path], device: str, info: DistInfo,
) -> Path:  # fmt: skip
    """Validate after training, then (rank 0) the checkpoint, config, metrics, plot, summary."""
    val_after = None
    if len(run.val_set):
        val_after = evaluate(run.learner, run.val_set, targets.mean, cfg, device, info)
    run.train_set.close()
    run.val_set.close()
    metrics = run_metrics(
        plan, prog.history, run.batches.total_steps,
        prog.windows_seen / max(prog.train_seconds, 1e-9), targets.dim, targets.stats,
        info.world_size, prog.val_before, val_after,
    )  # fmt: skip
    if info.is_main:
        write_run_outputs(cfg, paths, plan, prog.history, metrics, run.learner.student,
                          run.learner.student_tf, targets.cache_dir)  # fmt: skip
    barrier(info)
    return paths["checkpoint"]
