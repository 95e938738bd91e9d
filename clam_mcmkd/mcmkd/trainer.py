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
from functools import partial
from pathlib import Path

import torch

from ..distributed import (
    DistInfo,
    all_reduce_sum,
    barrier,
    distributed_run,
    from_main,
    parse_shard,
    parse_timeout,
    shard,
    shard_file_name,
    shard_of,
)
from ..encoders import create_encoder
from ..encoders.forward import prepare_encoder
from ..patch_pipeline import default_num_workers
from ..utils import RunSummary, progress, resolve_device
from .config import FinetuneConfig, output_paths, teacher_cache_dir, validate_config
from .losses import TargetStandardizer
from .objectives import ShamReader, build_predictor, input_masks
from .outputs import run_metrics, write_run_outputs
from .planning import WindowPlan, plan_windows, windows_by_slide
from .probes import student_probes
from .state import fingerprint, resume_state, rng_state, save_state, set_rng_state
from .steps import (
    Batches,
    Learner,
    StepRange,
    build_optimizer,
    empty_batch,
    evaluate,
    lr_factor,
    make_loader,
    micro_batch_stream,
    set_student_mode,
    sync_batch_norm,
    train_step,
)
from .teacher_cache import (
    CacheReader,
    TeacherCache,
    build_teacher,
    fill_cache,
    missing_counts,
    teacher_spec,
    teacher_stats,
)
from .windows import WindowDataset

log = logging.getLogger(__name__)
LOG_EVERY = 25  # optimizer steps between reads of the loss (each read waits for the device)


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
    empty: dict  # the micro-batch of a rank with no window in it
    teacher_mean: torch.Tensor  # what validation's "predict the mean" baseline predicts


@dataclass
class Progress:
    fingerprint: dict
    step: int = 0
    history: list[dict] = field(default_factory=list)
    val_before: dict | None = None
    probes_before: dict | None = None  # the student's ridge probes (probes.py) at the start
    val_curve: list[dict] = field(default_factory=list)  # validation after --val-at-steps
    windows_seen: int = 0  # in this process (for the throughput figure)
    train_seconds: float = 0.0


def finetune(cfg: FinetuneConfig) -> Path:
    """Run MCM-KD and write the student checkpoint (+ metrics, plot, config); returns its path.

    A run stopped by ``stop_after_steps`` returns the path of its resume state instead; a
    ``teacher_cache_only`` run (its ``shard`` of) the teacher cache's summary file.
    """
    validate_config(cfg)
    timeout_s = parse_timeout(cfg.dist_timeout)
    with distributed_run(resolve_device(cfg.device), timeout_s=timeout_s) as (device, info):
        paths = output_paths(cfg.out)
        plan = plan_windows(cfg)
        log.info("%s", plan.summary.line())
        cache, stats = fill_teacher_cache(cfg, plan, device, info)
        if cfg.teacher_cache_only:
            return write_fill_summary(cfg, plan, stats, info)
        targets = teacher_targets(cfg, plan, cache, stats)
        run = build(cfg, plan, targets, device, info)
        prog = restore(cfg, plan, run, targets, paths, device, info)
        if not train_steps(cfg, run, prog, paths, device, info):
            return paths["state"]
        return write_outputs(cfg, plan, targets, run, prog, paths, device, info)


def reading_workers(cfg: FinetuneConfig, info: DistInfo) -> int:
    """--num-workers, or the cores this rank may use less one (the node's cores shared)."""
    if cfg.num_workers is not None:
        return cfg.num_workers
    return default_num_workers(info.local_world_size)


def cache_work(cfg: FinetuneConfig, plan: WindowPlan) -> list[tuple[int, list[int]]]:
    """(slide index, windows) whose patches this job caches: every training and validation
    window, or its ``--shard`` of them (slides balanced by window count)."""
    items = sorted(windows_by_slide(plan.train + plan.val).items())
    if cfg.shard:
        items = shard_of(items, *parse_shard(cfg.shard), [len(ws) for _, ws in items])
    return items


def fill_teacher_cache(
    cfg: FinetuneConfig, plan: WindowPlan, device: str, info: DistInfo
) -> tuple[TeacherCache, dict]:
    """Teacher features computed at most once per patch: each ``--shard`` fills its share of
    the cache (by window count), each rank its share of that (by the patches still missing);
    the teacher is built only when some patch is not cached. Returns the cache and the counts
    summed over ranks."""
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
    items = cache_work(cfg, plan)
    # ranks share the patches still to compute (rank 0 counts them, before anyone writes)
    left = None
    if info.enabled:
        left = from_main(lambda: missing_counts(cache, plan.slides, items, cfg.grid), info)
    mine = dict(shard(items, info, sizes=left))
    show = cfg.progress and info.is_main
    stats = fill_cache(cache, plan.slides, mine, cfg.grid, make_teacher, device,
                       cfg.teacher_batch_size, show_progress=show,
                       precision=cfg.precision, num_workers=reading_workers(cfg, info))  # fmt: skip
    built.clear()  # the teacher is not needed any more: free its memory
    barrier(info)
    stats = dict(zip(stats, all_reduce_sum([float(v) for v in stats.values()], info)))
    return cache, stats


def teacher_targets(
    cfg: FinetuneConfig, plan: WindowPlan, cache: TeacherCache, stats: dict
) -> TeacherTargets:
    """The teacher feature of every training and validation patch, read from the cache, and
    their statistics over the training patches."""
    reader = CacheReader(cache, plan.slides, windows_by_slide(plan.train + plan.val))
    if cfg.targets == "sham":  # the same features, each given to another patch
        reader = ShamReader(reader, cfg.seed)
    dim, mean, std = teacher_stats(reader, plan.slides, windows_by_slide(plan.train), cfg.grid)
    return TeacherTargets(reader, dim, mean, std, stats, cache.dir)


def write_fill_summary(cfg: FinetuneConfig, plan: WindowPlan, stats: dict, info: DistInfo) -> Path:
    """A --teacher-cache-only run's record (one per --shard): what it computed and found."""
    path = teacher_cache_dir(cfg) / shard_file_name("teacher_cache_summary.json", cfg.shard)
    if info.is_main:
        done = [plan.slides[s].slide_id for s, _ in cache_work(cfg, plan)]
        summary = RunSummary(stage="teacher-cache", done=done)
        summary.extra.update({k: int(v) for k, v in stats.items()}, shard=cfg.shard,
                             teacher=cfg.teacher)  # fmt: skip
        summary.write(path)
        log.warning("teacher cache %s: %s", path.parent, summary.line())
    barrier(info)
    return path


def build(
    cfg: FinetuneConfig, plan: WindowPlan, targets: TeacherTargets, device: str, info: DistInfo
) -> Run:
    """Student (seeded), context predictor, optimiser, lr schedule and the window datasets."""
    torch.manual_seed(cfg.seed)
    student_enc = build_student(cfg)
    if cfg.student_lr_mult == 0:  # the frozen-student reference: no student gradients at all
        student_enc.model.requires_grad_(False)
    student = prepare_encoder(student_enc, device)
    predictor = build_predictor(cfg, student_enc.out_dim, targets.dim).to(device)
    average_bn = False
    if not cfg.freeze_bn and info.enabled:
        if str(device).startswith("cuda"):  # SyncBatchNorm raises on CPU tensors
            student = sync_batch_norm(student)  # in float32: see Float32SyncBatchNorm
        else:
            average_bn = True
            if info.is_main:
                log.info("finetune: --no-freeze-bn on CPU ranks: BatchNorm normalises with each "
                         "rank's batch; running statistics are averaged after every step")  # fmt: skip
    optimizer = build_optimizer(cfg, student, predictor)
    batches = Batches(len(plan.train), cfg, info)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: lr_factor(s, batches.total_steps, cfg.warmup_frac, cfg.min_lr_ratio),
    )
    standardizer = TargetStandardizer(targets.mean, targets.std).to(device)
    learner = Learner(
        student, student_enc.transforms, predictor, standardizer, optimizer, scheduler, average_bn
    )
    masks = partial(input_masks, cfg)  # the loader reads the visible patches only
    train_set = WindowDataset(plan.slides, plan.train, cfg.grid, targets.reader, masks)
    val_set = WindowDataset(plan.slides, plan.val, cfg.grid, targets.reader, masks)
    empty = empty_batch(plan.slides[0].patch_size, cfg.grid, targets.dim)
    return Run(learner, student_enc.out_dim, batches, train_set, val_set, empty, targets.mean)


def build_student(cfg: FinetuneConfig):
    """The student encoder at its starting point: ``student_ckpt`` (checked against
    ``student``/``input_size`` by validate_config), else the named init."""
    if cfg.student_ckpt:
        return create_encoder("checkpoint", ckpt=cfg.student_ckpt)
    return create_encoder(cfg.student, pretrained=cfg.pretrained, target_img_size=cfg.input_size)


def restore(
    cfg: FinetuneConfig, plan: WindowPlan, run: Run, targets: TeacherTargets,
    paths: dict[str, Path], device: str, info: DistInfo,
) -> Progress:  # fmt: skip
    """Continue an interrupted run exactly (``--resume``), else start: validate before training."""
    prog = Progress(fingerprint(cfg, plan))
    learner = run.learner
    state = resume_state(paths["state"], prog.fingerprint, cfg.resume, info)
    if state is not None:
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
        prog.probes_before = state.get("probes_before")
        prog.val_curve = state.get("val_curve", [])
        if info.is_main:
            log.warning("finetune: resuming at step %d/%d", prog.step, run.batches.total_steps)
    elif cfg.resume and info.is_main:
        log.warning("finetune: --resume but no state at %s: starting from scratch", paths["state"])
    if prog.val_before is None and len(run.val_set):
        # masked cosine on the held-out windows, before and after training
        prog.val_before = evaluate(learner, run.val_set, targets.mean, cfg, device, info)
    if prog.probes_before is None and cfg.student_probes and len(run.val_set):
        prog.probes_before = student_probes(learner, run.val_set, cfg, device, info)
    return prog


def train_steps(
    cfg: FinetuneConfig, run: Run, prog: Progress, paths: dict[str, Path], device: str,
    info: DistInfo,
) -> bool:  # fmt: skip
    """The optimizer steps from ``prog.step`` on, saving resumable states; False when stopped
    early by ``stop_after_steps``. Losses stay on the device until a state is saved or
    ``LOG_EVERY`` steps have passed (one host sync then, not one per step)."""
    learner, total = run.learner, run.batches.total_steps
    set_student_mode(learner.student, cfg.freeze_bn)
    learner.predictor.train()
    start = prog.step
    end = total if cfg.stop_after_steps is None else min(total, start + cfg.stop_after_steps)
    show = cfg.progress and info.is_main
    desc = {"mcmkd": "MCM-KD", "patch_kd": "patch-KD"}[cfg.objective]
    desc += " (sham targets)" if cfg.targets == "sham" else ""
    bar = progress(total=total, initial=start, desc=desc, unit="step",
                   **({} if show else {"disable": True}))  # fmt: skip
    t0 = time.perf_counter()
    # one loader for the whole run, so reading workers prefetch across optimizer steps; the
    # steps are planned lazily, each epoch's order once
    steps = StepRange(run.batches, start, end)
    cuda = str(device).startswith("cuda")
    loader = iter(make_loader(run.train_set, steps, reading_workers(cfg, info), pin_memory=cuda))
    stream = micro_batch_stream(loader, (m for *_, micro in steps.steps() for m in micro),
                                run.empty)  # fmt: skip
    pending: list = []  # history rows whose loss is still a device tensor
    for step, epoch, n_step, micro in steps.steps():
        loss, lrs = train_step(learner, stream, micro, epoch, n_step, cfg, device, info)
        prog.step, prog.windows_seen = step + 1, prog.windows_seen + n_step
        rate = prog.windows_seen / max(time.perf_counter() - t0, 1e-9)
        row = {"step": step + 1, "epoch": epoch, "loss": loss, "lr": lrs[2],
               "lr_student": lrs[0], "windows_per_s": rate}  # fmt: skip
        prog.history.append(row)
        pending.append(row)
        bar.update(1)
        if step + 1 in cfg.val_at_steps and step + 1 < total and len(run.val_set):
            prog.val_curve.append(validation_point(cfg, run, step + 1, device, info))
        save = info.is_main and (step + 1 in (total, end) or (step + 1) % cfg.save_every == 0)
        if save or len(pending) >= LOG_EVERY or step + 1 == end:
            _read_losses(pending)
            bar.set_postfix(loss=f"{row['loss']:.4f}", win_s=f"{rate:.1f}")
        if save:
            save_state(
                paths["state"], fingerprint=prog.fingerprint, step=step + 1,
                student=learner.student.state_dict(), predictor=learner.predictor.state_dict(),
                optimizer=learner.optimizer.state_dict(), scheduler=learner.scheduler.state_dict(),
                rng=rng_state(), history=prog.history, val_before=prog.val_before,
                probes_before=prog.probes_before, val_curve=prog.val_curve,
            )  # fmt: skip
    bar.close()
    del loader, stream  # stops reading workers
    barrier(info)
    prog.train_seconds = time.perf_counter() - t0
    if end < total:
        log.warning("finetune: stopped after step %d/%d; continue with --resume", end, total)
        return False
    return True


def validation_point(cfg: FinetuneConfig, run: Run, step: int, device: str,
                     info: DistInfo) -> dict:  # fmt: skip
    """Validate now: one point of the ``--val-at-steps`` curve."""
    val = evaluate(run.learner, run.val_set, run.teacher_mean, cfg, device, info)
    probes = (
        student_probes(run.learner, run.val_set, cfg, device, info) if cfg.student_probes else None
    )
    return curve_point(step, val, probes)


def curve_point(step: int, val: dict, probes: dict | None) -> dict:
    """A validation curve's point: the pretext (R², standardised cosine) and the student's own
    probes when they were measured."""
    point = {"step": step, "val_r2": val["r2"], "val_cos_std": val["cos_std"]}
    if probes is not None:
        point.update(student_teacher_r2=probes["teacher"], student_context_r2=probes["context"])
    return point


def _read_losses(rows: list[dict]) -> None:
    """Replace the device-tensor losses of `rows` by floats, with one host sync; empties it."""
    if rows:
        for row, value in zip(rows, torch.stack([r["loss"] for r in rows]).tolist()):
            row["loss"] = value
        rows.clear()


def write_outputs(
    cfg: FinetuneConfig, plan: WindowPlan, targets: TeacherTargets, run: Run, prog: Progress,
    paths: dict[str, Path], device: str, info: DistInfo,
) -> Path:  # fmt: skip
    """Validate after training, then (rank 0) the checkpoint, config, metrics, plot, summary."""
    val_after = probes_after = None
    if len(run.val_set):
        val_after = evaluate(run.learner, run.val_set, targets.mean, cfg, device, info)
        if prog.probes_before is not None:
            probes_after = student_probes(run.learner, run.val_set, cfg, device, info)
    run.train_set.close()
    run.val_set.close()
    metrics = run_metrics(
        plan, prog.history, run.batches.total_steps,
        prog.windows_seen / max(prog.train_seconds, 1e-9), targets.dim, targets.stats,
        info.world_size, prog.val_before, val_after, (prog.probes_before, probes_after),
    )  # fmt: skip
    if cfg.val_at_steps and val_after is not None:  # the curve, from before to after training
        first = curve_point(0, prog.val_before, prog.probes_before)
        last = curve_point(prog.step, val_after, probes_after)
        metrics["val_curve"] = [first, *prog.val_curve, last]
    if info.is_main:
        write_run_outputs(cfg, paths, plan, prog.history, metrics, run.learner.student,
                          run.learner.student_tf, targets.cache_dir)  # fmt: skip
    barrier(info)
    return paths["checkpoint"]
