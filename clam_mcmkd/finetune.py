"""``clam-mcmkd finetune``: Masked Context Modelling with Knowledge Distillation (DESIGN.md §3).

A g x g window of grid-adjacent tissue patches is read with one ``read_region``; some positions
are masked; the student encodes each VISIBLE patch on its own (exactly as at extraction time);
a small context predictor turns the visible tokens into predictions of a frozen teacher's
features at the masked positions. Only the student is kept.

Determinism (what makes exact resume and DDP == one process possible): the window list, the
epoch order and every mask are functions of the seed alone; an optimizer step always consumes
the same ``batch_size`` windows, whatever the number of ranks or accumulation steps; the loss
is normalised by the whole step's position counts, and gradients are summed across ranks with
one all-reduce, so the update is the same sum in every layout.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import distributed as dist_utils
from .clam.formats import coords_path, read_coords_h5, read_dataset_csv
from .encoders import STUDENT_ARCHS, EncoderError, create_encoder, list_encoders
from .encoders.forward import prepare_encoder
from .mcmkd.losses import LOSSES, TargetStandardizer, mcmkd_loss_sums
from .mcmkd.masking import MASK_STRATEGIES, num_masked, window_masks
from .mcmkd.predictor import ContextPredictor
from .mcmkd.teacher_cache import (
    CacheReader,
    TeacherCache,
    TeacherCacheError,
    build_teacher,
    fill_cache,
    teacher_spec,
)
from .mcmkd.windows import (
    NoWindowsError,
    WindowDataset,
    WindowRef,
    epoch_order,
    slide_windows,
)
from .slides import open_slide
from .utils import (
    ClamMcmkdError,
    RunSummary,
    atomic_path,
    atomic_write_text,
    progress,
    resolve_device,
    save_config,
)

log = logging.getLogger("clam_mcmkd.finetune")

STATE_FORMAT = "clam_mcmkd.finetune_state/1"
VAL_MASK_EPOCH = 1_000_000  # validation masks: fixed, and never those of a training epoch


class FinetuneError(ClamMcmkdError):
    pass


@dataclass
class FinetuneConfig:
    data_h5_dir: str
    data_slide_dir: str
    csv_path: str
    teacher: str
    out: str = "mcmkd_resnet50.pt"
    slide_ext: str = ".svs"
    teacher_ckpt: str | None = None
    teacher_input_size: int | None = None  # None: the teacher's own (timm) input size
    student: str = "resnet50_trunc"
    input_size: int = 224  # student input size (what extraction will use)
    pretrained: bool = True
    # context windows and masking
    grid: int = 4
    window_overlap: bool = False
    mask_ratio: float = 0.5
    mask_strategy: str = "random"
    # predictor
    predictor_width: int = 256
    predictor_depth: int = 2
    predictor_heads: int = 4
    # loss
    loss: str = "cosine"
    visible_weight: float = 0.0
    # optimisation
    epochs: int = 1
    batch_size: int = 32  # windows per optimizer step, over all ranks and accumulation steps
    grad_accum: int = 1
    lr: float = 5e-4  # predictor; the student gets lr * student_lr_mult
    student_lr_mult: float = 0.1
    weight_decay: float = 0.05
    warmup_frac: float = 0.05
    min_lr_ratio: float = 0.01
    grad_clip: float = 1.0  # 0 disables
    freeze_bn: bool = True
    # data
    teacher_cache: str | None = None  # default: <out stem>_teacher_cache/ next to --out
    max_windows: int | None = None
    val_frac: float = 0.05
    max_val_windows: int = 256
    num_workers: int = 0
    teacher_batch_size: int = 64
    # run control
    resume: bool = False
    save_every: int = 50  # optimizer steps between resumable states
    stop_after_steps: int | None = None  # stop cleanly (resumable) after this many steps
    device: str = "auto"
    seed: int = 0
    progress: bool = True


# Fields that must not change between a run and its --resume.
_RESUME_KEYS = (
    "teacher", "teacher_ckpt", "teacher_input_size", "student", "input_size", "pretrained",
    "grid", "window_overlap", "mask_ratio", "mask_strategy", "predictor_width",
    "predictor_depth", "predictor_heads", "loss", "visible_weight", "epochs", "batch_size",
    "lr", "student_lr_mult", "weight_decay", "warmup_frac", "min_lr_ratio", "grad_clip",
    "freeze_bn", "max_windows", "val_frac", "max_val_windows", "seed",
)  # fmt: skip


def output_paths(out: str | Path) -> dict[str, Path]:
    """The files a run writes next to its checkpoint."""
    out = Path(out)
    stem = out.with_suffix("")
    return {
        "checkpoint": out,
        "state": Path(f"{stem}.state.pt"),
        "metrics": Path(f"{stem}.metrics.csv"),
        "plot": Path(f"{stem}.loss.png"),
        "config": Path(f"{stem}.config.json"),
        "summary": Path(f"{stem}.summary.json"),
        "final_metrics": Path(f"{stem}.final_metrics.json"),
        "teacher_cache": Path(f"{stem}_teacher_cache"),
    }


# ----------------------------------------------------------------------------- validation


def validate_config(cfg: FinetuneConfig) -> None:
    if cfg.student not in STUDENT_ARCHS:
        raise EncoderError(
            f"unknown student '{cfg.student}': MCM-KD fine-tunes {sorted(STUDENT_ARCHS)}"
        )
    _check_teacher_name(cfg.teacher)
    if cfg.grid < 2:
        raise FinetuneError(f"--grid must be >= 2, got {cfg.grid}")
    if not 0.0 < cfg.mask_ratio < 1.0:
        raise FinetuneError(f"--mask-ratio must be in (0, 1), got {cfg.mask_ratio}")
    if cfg.mask_strategy not in MASK_STRATEGIES:
        raise FinetuneError(f"--mask-strategy must be one of {MASK_STRATEGIES}")
    if cfg.loss not in LOSSES:
        raise FinetuneError(f"--loss must be one of {LOSSES}")
    if cfg.batch_size < 1 or cfg.grad_accum < 1 or cfg.epochs < 1:
        raise FinetuneError("--batch-size, --grad-accum and --epochs must be >= 1")
    if not 0.0 <= cfg.val_frac < 1.0:
        raise FinetuneError(f"--val-frac must be in [0, 1), got {cfg.val_frac}")
    if cfg.teacher_ckpt is not None and not Path(cfg.teacher_ckpt).is_file():
        raise EncoderError(f"{cfg.teacher_ckpt}: teacher checkpoint does not exist")


def _check_teacher_name(name: str) -> None:
    """Fail before any slide is read, without building the (large) teacher."""
    import timm

    if name in list_encoders() or name.startswith("hf-hub:") or timm.is_model(name):
        return
    raise EncoderError(
        f"unknown teacher '{name}': not a registered encoder ({', '.join(list_encoders())}) "
        "and not a timm model name"
    )


# ----------------------------------------------------------------------------- windows


@dataclass
class WindowPlan:
    slides: list  # list[SlideWindows], every slide with >= 1 window
    train: list[WindowRef]
    val: list[WindowRef]
    summary: RunSummary


def plan_windows(cfg: FinetuneConfig) -> WindowPlan:
    """Slides -> windows -> (train, val) refs; bad slides are skipped and counted."""
    summary = RunSummary("finetune")
    df = read_dataset_csv(cfg.csv_path, require_label=False)
    slides = []
    for slide_id in df["slide_id"]:
        h5 = coords_path(cfg.data_h5_dir, slide_id)
        slide_path = Path(cfg.data_slide_dir) / f"{slide_id}{cfg.slide_ext}"
        if not h5.is_file():
            summary.skipped.append(slide_id)
            log.warning("finetune: %s has no coords file %s: skipped", slide_id, h5)
            continue
        try:
            coords = read_coords_h5(h5)
            with open_slide(slide_path):
                pass
        except ClamMcmkdError as err:
            summary.fail(slide_id, err)
            continue
        sw = slide_windows(slide_id, slide_path, coords, cfg.grid, cfg.window_overlap)
        if len(sw) == 0:
            summary.skipped.append(slide_id)
            log.info(
                "finetune: %s: no %dx%d window of adjacent patches", slide_id, cfg.grid, cfg.grid
            )
            continue
        summary.done.append(slide_id)
        slides.append(sw)
    if not slides:
        raise NoWindowsError(
            f"no {cfg.grid}x{cfg.grid} window of grid-adjacent tissue patches in any slide of "
            f"{cfg.csv_path} ({len(df)} listed, {len(summary.failed)} unreadable, "
            f"{len(summary.skipped)} without coords or windows); use a smaller --grid or denser tiling"
        )
    train, val = _split_windows(slides, cfg)
    summary.extra.update(
        slides_with_windows=len(slides), train_windows=len(train), val_windows=len(val)
    )
    return WindowPlan(slides, train, val, summary)


def _split_windows(slides: list, cfg: FinetuneConfig) -> tuple[list[WindowRef], list[WindowRef]]:
    """Validation windows come from held-out slides; with one slide, from held-out windows."""
    rng = np.random.default_rng([cfg.seed, 0xA1])
    all_refs = [WindowRef(s, w) for s, sw in enumerate(slides) for w in range(len(sw))]
    if cfg.val_frac <= 0:
        train, val = all_refs, []
    elif len(slides) >= 2:
        n_val = min(max(1, round(cfg.val_frac * len(slides))), len(slides) - 1)
        val_slides = set(rng.permutation(len(slides))[:n_val].tolist())
        train = [r for r in all_refs if r.slide not in val_slides]
        val = [r for r in all_refs if r.slide in val_slides]
    else:
        log.warning("finetune: one slide only: validation uses held-out windows of that slide")
        n_val = min(max(1, math.ceil(cfg.val_frac * len(all_refs))), len(all_refs) - 1)
        perm = rng.permutation(len(all_refs))
        val_idx = set(perm[:n_val].tolist())
        train = [r for i, r in enumerate(all_refs) if i not in val_idx]
        val = [r for i, r in enumerate(all_refs) if i in val_idx]
    if not train:
        raise NoWindowsError("no training window left after holding out validation windows")
    if cfg.max_windows is not None and len(train) > cfg.max_windows:
        keep = np.sort(
            np.random.default_rng([cfg.seed, 0xB2]).permutation(len(train))[: cfg.max_windows]
        )
        train = [train[i] for i in keep]
    if len(val) > cfg.max_val_windows:
        keep = np.sort(
            np.random.default_rng([cfg.seed, 0xC3]).permutation(len(val))[: cfg.max_val_windows]
        )
        val = [val[i] for i in keep]
    return train, val


# ----------------------------------------------------------------------------- models


def build_student(cfg: FinetuneConfig, device: str):
    enc = create_encoder(cfg.student, pretrained=cfg.pretrained, target_img_size=cfg.input_size)
    return enc, prepare_encoder(enc, device)


def set_student_mode(student: nn.Module, freeze_bn: bool) -> None:
    """Train mode, but BatchNorm layers keep their running statistics when frozen."""
    student.train()
    if freeze_bn:
        for m in student.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


def build_optimizer(cfg: FinetuneConfig, student: nn.Module, predictor: nn.Module):
    groups = []
    for module, lr in ((student, cfg.lr * cfg.student_lr_mult), (predictor, cfg.lr)):
        decay = [p for p in module.parameters() if p.requires_grad and p.ndim > 1]
        no_decay = [p for p in module.parameters() if p.requires_grad and p.ndim <= 1]
        groups.append({"params": decay, "lr": lr, "weight_decay": cfg.weight_decay})
        groups.append({"params": no_decay, "lr": lr, "weight_decay": 0.0})
    # fused: one kernel per step for all parameters (CPU and CUDA alike)
    return torch.optim.AdamW(groups, betas=(0.9, 0.95), fused=True)


def lr_factor(step: int, total: int, warmup_frac: float, min_ratio: float) -> float:
    """Linear warm-up, then cosine decay to `min_ratio` of the base rate."""
    warmup = max(1, round(warmup_frac * total)) if warmup_frac > 0 else 0
    if step < warmup:
        return (step + 1) / warmup
    progress_ = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * min(progress_, 1.0)))


# ----------------------------------------------------------------------------- steps


class Batches:
    """Which windows each rank loads for each micro-batch, from a given global step on."""

    def __init__(self, n_train: int, cfg: FinetuneConfig, info: dist_utils.DistInfo):
        self.n = n_train
        self.cfg = cfg
        self.info = info
        self.steps_per_epoch = math.ceil(n_train / cfg.batch_size)
        self.total_steps = self.steps_per_epoch * cfg.epochs

    def step_windows(self, step: int) -> tuple[int, np.ndarray]:
        epoch, s = divmod(step, self.steps_per_epoch)
        order = epoch_order(self.n, self.cfg.seed, epoch)
        return epoch, order[s * self.cfg.batch_size : (s + 1) * self.cfg.batch_size]

    def micro_batches(self, step: int) -> tuple[int, int, list[np.ndarray]]:
        """(epoch, windows in the whole step, this rank's window indices per micro-batch)."""
        epoch, chunk = self.step_windows(step)
        micro = np.array_split(chunk, self.cfg.grad_accum)
        return epoch, len(chunk), [m[self.info.rank :: self.info.world_size] for m in micro]


def _loader(dataset, index_lists, num_workers):
    lists = [list(map(int, ix)) for ix in index_lists if len(ix)]
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=lists,
        num_workers=num_workers,
        persistent_workers=False,
        pin_memory=False,
    )


def forward_windows(
    batch: dict,
    mask: torch.Tensor,
    student: nn.Module,
    student_tf,
    predictor: ContextPredictor,
    device: str,
) -> torch.Tensor:
    """Student on each visible patch alone, then the predictor on the window: (B, g^2, Dt)."""
    patches = batch["patches"]  # (B, g^2, P, P, 3) uint8
    b = patches.shape[0]
    visible = patches[~mask.cpu()]  # (B * n_vis, P, P, 3), row-major within each window
    x = student_tf.batch(visible.to(device, non_blocking=True))
    if str(device).startswith("cuda"):
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=str(device).startswith("cuda")):
        tokens = student(x).reshape(b, -1, student.out_dim)
        return predictor(tokens, mask.to(device)).float()


def _allreduce_grads(params: list[nn.Parameter], info: dist_utils.DistInfo) -> None:
    if not info.enabled:
        return
    import torch.distributed as dist

    grads = []
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def _allreduce_sum(values: list[float], info: dist_utils.DistInfo, device: str) -> list[float]:
    if not info.enabled:
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


@torch.no_grad()
def evaluate(
    dataset: WindowDataset,
    student: nn.Module,
    student_tf,
    predictor: ContextPredictor,
    standardizer: TargetStandardizer,
    teacher_mean: torch.Tensor,
    cfg: FinetuneConfig,
    device: str,
    info: dist_utils.DistInfo,
) -> dict[str, float]:
    """Masked-patch cosine to the teacher on validation windows (fixed masks), and the
    "predict the mean teacher feature" baseline on the same positions."""
    was_training = student.training, predictor.training
    student.eval()
    predictor.eval()
    idx = np.arange(len(dataset))[info.rank :: info.world_size]
    sums = [0.0, 0.0, 0.0]  # cos(pred), cos(mean), n masked
    for start in range(0, len(idx), max(1, cfg.batch_size)):
        ix = idx[start : start + cfg.batch_size]
        batch = torch.utils.data.default_collate([dataset[int(i)] for i in ix])
        mask = torch.from_numpy(
            window_masks(ix, cfg.grid, cfg.mask_ratio, cfg.mask_strategy, cfg.seed, VAL_MASK_EPOCH)
        )
        pred = standardizer.inverse(
            forward_windows(batch, mask, student, student_tf, predictor, device)
        )
        target = batch["teacher"].to(device).float()
        m = mask.to(device)
        cos = nn.functional.cosine_similarity(pred[m], target[m], dim=-1)
        cos_mean = nn.functional.cosine_similarity(
            teacher_mean.to(device).expand_as(target[m]), target[m], dim=-1
        )
        sums[0] += cos.sum().item()
        sums[1] += cos_mean.sum().item()
        sums[2] += float(m.sum().item())
    sums = _allreduce_sum(sums, info, device)
    if was_training[0]:
        set_student_mode(student, cfg.freeze_bn)
    predictor.train(was_training[1])
    n = max(sums[2], 1.0)
    return {"cosine": sums[0] / n, "mean_baseline_cosine": sums[1] / n, "positions": int(sums[2])}


# ----------------------------------------------------------------------------- state


def _rng_state() -> dict:
    return {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def _fingerprint(cfg: FinetuneConfig, plan: WindowPlan) -> dict:
    return {
        "config": {k: getattr(cfg, k) for k in _RESUME_KEYS},
        "slides": [sw.slide_id for sw in plan.slides],
        "train": [(r.slide, r.window) for r in plan.train],
    }


def save_state(path: Path, **state) -> None:
    with atomic_path(path) as tmp:
        torch.save({"format": STATE_FORMAT, **state}, tmp)


def load_state(path: Path, fingerprint: dict) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001
        raise FinetuneError(
            f"{path}: unreadable resume state ({err}); delete it to start over"
        ) from err
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise FinetuneError(f"{path}: not a finetune resume state; delete it to start over")
    old = state["fingerprint"]
    if old != fingerprint:
        changed = [
            k for k in fingerprint["config"] if old["config"].get(k) != fingerprint["config"][k]
        ]
        what = f"options {changed}" if changed else "the slides or windows"
        raise FinetuneError(
            f"{path}: cannot --resume: {what} differ from the interrupted run; "
            "use the same options or delete the state to start over"
        )
    return state


# ----------------------------------------------------------------------------- outputs


def write_metrics_csv(path: Path, history: list[dict]) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as f:
            fields = ["step", "epoch", "loss", "lr", "lr_student", "windows_per_s"]
            writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(history)


def plot_loss(path: Path, history: list[dict], val: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    losses = [h["loss"] for h in history]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, losses, lw=0.8, alpha=0.5, label="loss per step")
    if len(losses) >= 5:
        k = max(2, len(losses) // 20)
        smooth = np.convolve(losses, np.ones(k) / k, mode="valid")
        ax.plot(steps[k - 1 :], smooth, lw=1.6, label=f"moving mean ({k})")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("MCM-KD loss")
    title = "MCM-KD fine-tuning"
    if val:
        title += (
            f"\nval masked cosine {val.get('val_cosine_before', float('nan')):.3f} -> "
            f"{val.get('val_cosine_after', float('nan')):.3f} "
            f"(mean baseline {val.get('val_cosine_mean_baseline', float('nan')):.3f})"
        )
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


# ----------------------------------------------------------------------------- main loop


def finetune(cfg: FinetuneConfig) -> Path:
    """Run MCM-KD and write the student checkpoint (+ metrics, plot, config); returns its path."""
    validate_config(cfg)
    device = resolve_device(cfg.device)
    info = dist_utils.init_distributed(device)
    device = dist_utils.rank_device(device, info)
    try:
        return _finetune(cfg, device, info)
    finally:
        dist_utils.cleanup(info)


def _finetune(cfg: FinetuneConfig, device: str, info: dist_utils.DistInfo) -> Path:
    paths = output_paths(cfg.out)
    show = cfg.progress and info.is_main
    plan = plan_windows(cfg)
    log.info("finetune: %s", plan.summary.line())

    # ---- teacher features: computed at most once per patch, then read from disk
    cache_dir = Path(cfg.teacher_cache) if cfg.teacher_cache else paths["teacher_cache"]
    teacher_holder: dict = {}

    def make_teacher():
        teacher_holder["enc"] = build_teacher(
            cfg.teacher,
            ckpt=cfg.teacher_ckpt,
            pretrained=cfg.pretrained,
            input_size=cfg.teacher_input_size,
            device=device,
        )
        return teacher_holder["enc"]

    spec = _resolve_teacher_spec(cfg, cache_dir, plan, make_teacher)
    cache = TeacherCache(cache_dir, spec)
    needed: dict[int, list[int]] = {}
    for r in plan.train + plan.val:
        needed.setdefault(r.slide, []).append(r.window)
    mine = dict(dist_utils.shard(sorted(needed.items()), info))
    stats = fill_cache(
        cache,
        plan.slides,
        mine,
        cfg.grid,
        lambda: teacher_holder.get("enc") or make_teacher(),
        device,
        cfg.teacher_batch_size,
        show_progress=show,
    )
    teacher_holder.clear()  # the teacher is not needed any more: free its memory
    dist_utils.barrier(info)
    stats = dict(zip(stats, _allreduce_sum([float(v) for v in stats.values()], info, "cpu")))
    reader = CacheReader(cache, plan.slides, needed)
    teacher_dim, t_mean, t_std = _teacher_stats(reader, plan, cfg.grid)

    # ---- models
    torch.manual_seed(cfg.seed)
    student_enc, student = build_student(cfg, device)
    predictor = ContextPredictor(
        student_enc.out_dim,
        teacher_dim,
        cfg.grid,
        width=cfg.predictor_width,
        depth=cfg.predictor_depth,
        heads=cfg.predictor_heads,
    ).to(device)
    standardizer = TargetStandardizer(t_mean, t_std).to(device)
    if not cfg.freeze_bn and info.enabled:
        student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
    params = [p for p in student.parameters()] + [p for p in predictor.parameters()]
    optimizer = build_optimizer(cfg, student, predictor)
    batches = Batches(len(plan.train), cfg, info)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: lr_factor(s, batches.total_steps, cfg.warmup_frac, cfg.min_lr_ratio),
    )
    train_set = WindowDataset(plan.slides, plan.train, cfg.grid, teacher=reader)
    val_set = WindowDataset(plan.slides, plan.val, cfg.grid, teacher=reader)

    # ---- resume
    fingerprint = _fingerprint(cfg, plan)
    start_step, history, val_before = 0, [], None
    if cfg.resume and paths["state"].is_file():
        state = load_state(paths["state"], fingerprint)
        student.load_state_dict(state["student"])
        predictor.load_state_dict(state["predictor"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"])
        start_step, history, val_before = state["step"], state["history"], state["val_before"]
        if info.is_main:
            log.warning("finetune: resuming at step %d/%d", start_step, batches.total_steps)
    elif cfg.resume and info.is_main:
        log.warning("finetune: --resume but no state at %s: starting from scratch", paths["state"])

    def validate():  # masked cosine on the held-out windows, before and after training
        return evaluate(
            val_set,
            student,
            student_enc.transforms,
            predictor,
            standardizer,
            t_mean,
            cfg,
            device,
            info,
        )

    if val_before is None and len(val_set):
        val_before = validate()

    # ---- train
    k_masked = num_masked(cfg.grid, cfg.mask_ratio)
    k_visible = cfg.grid * cfg.grid - k_masked
    set_student_mode(student, cfg.freeze_bn)
    predictor.train()
    end_step = batches.total_steps
    if cfg.stop_after_steps is not None:
        end_step = min(end_step, start_step + cfg.stop_after_steps)
    bar = progress(
        total=batches.total_steps,
        initial=start_step,
        desc="MCM-KD",
        unit="step",
        **({} if show else {"disable": True}),
    )
    t0, windows_seen = time.perf_counter(), 0
    # one loader for the whole run, so reading workers prefetch across optimizer steps
    step_plan = [batches.micro_batches(s) for s in range(start_step, end_step)]
    loader = iter(
        _loader(train_set, [m for _, _, micro in step_plan for m in micro], cfg.num_workers)
    )
    for step, (epoch, n_step, micro) in zip(range(start_step, end_step), step_plan):
        masked_norm = 1.0 / (n_step * k_masked)
        visible_norm = cfg.visible_weight / (n_step * k_visible)
        optimizer.zero_grad(set_to_none=True)
        loss_sum = 0.0
        for ix in [m for m in micro if len(m)]:
            batch = next(loader)
            mask = torch.from_numpy(
                window_masks(ix, cfg.grid, cfg.mask_ratio, cfg.mask_strategy, cfg.seed, epoch)
            )
            pred = forward_windows(batch, mask, student, student_enc.transforms, predictor, device)
            target = batch["teacher"].to(device).float()
            if cfg.loss == "smooth_l1":  # on standardised targets
                target = standardizer.forward(target)
            else:  # cosine on the teacher's own features
                pred = standardizer.inverse(pred)
            m_sum, v_sum = mcmkd_loss_sums(pred, target, mask.to(device), cfg.loss)
            loss = m_sum * masked_norm + (v_sum * visible_norm if cfg.visible_weight > 0 else 0.0)
            loss.backward()
            loss_sum += float(loss.detach())
        _allreduce_grads(params, info)
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        lrs = [g["lr"] for g in optimizer.param_groups]
        optimizer.step()
        scheduler.step()
        (loss_total,) = _allreduce_sum([loss_sum], info, "cpu")
        windows_seen += n_step
        rate = windows_seen / max(time.perf_counter() - t0, 1e-9)
        history.append(
            {
                "step": step + 1,
                "epoch": epoch,
                "loss": loss_total,
                "lr": lrs[2],
                "lr_student": lrs[0],
                "windows_per_s": rate,
            }
        )
        bar.update(1)
        bar.set_postfix(loss=f"{loss_total:.4f}", win_s=f"{rate:.1f}")
        done = step + 1 == batches.total_steps
        if info.is_main and (done or step + 1 == end_step or (step + 1) % cfg.save_every == 0):
            save_state(
                paths["state"],
                fingerprint=fingerprint,
                step=step + 1,
                student=student.state_dict(),
                predictor=predictor.state_dict(),
                optimizer=optimizer.state_dict(),
                scheduler=scheduler.state_dict(),
                rng=_rng_state(),
                history=history,
                val_before=val_before,
            )
    bar.close()
    del loader  # stops reading workers
    dist_utils.barrier(info)
    train_s = time.perf_counter() - t0
    if end_step < batches.total_steps:
        log.warning(
            "finetune: stopped after step %d/%d; continue with --resume",
            end_step,
            batches.total_steps,
        )
        return paths["state"]

    # ---- validation after training, outputs
    val_after = validate() if len(val_set) else None
    train_set.close()
    val_set.close()
    metrics = {
        "steps": batches.total_steps,
        "train_windows": len(plan.train),
        "val_windows": len(plan.val),
        "slides_used": len(plan.slides),
        "slides_failed": len(plan.summary.failed),
        "slides_skipped": len(plan.summary.skipped),
        "first_loss": history[0]["loss"] if history else None,
        "final_loss": float(np.mean([h["loss"] for h in history[-10:]])) if history else None,
        "windows_per_s": windows_seen / max(train_s, 1e-9),
        "teacher_dim": teacher_dim,
        "teacher_patches_computed": int(stats["patches_computed"]),
        "teacher_patches_cached": int(stats["patches_cached"]),
        "world_size": info.world_size,
    }
    if val_before is not None and val_after is not None:
        metrics.update(
            val_cosine_before=val_before["cosine"],
            val_cosine_after=val_after["cosine"],
            val_cosine_mean_baseline=val_after["mean_baseline_cosine"],
            val_masked_positions=val_after["positions"],
        )
    if info.is_main:
        from .encoders.checkpoint import save_student_checkpoint

        plan.summary.extra.update(
            teacher_patches_computed=metrics["teacher_patches_computed"],
            teacher_patches_cached=metrics["teacher_patches_cached"],
        )
        config = asdict(cfg)
        config["teacher_cache"] = str(cache_dir)
        save_config(cfg, paths["config"])
        write_metrics_csv(paths["metrics"], history)
        plot_loss(paths["plot"], history, metrics)
        plan.summary.write(paths["summary"])
        atomic_write_text(
            paths["final_metrics"],
            json.dumps(metrics, indent=2) + "\n",
        )
        save_student_checkpoint(
            paths["checkpoint"],
            student,
            arch=cfg.student,
            transforms=student_enc.transforms,
            config=config,
            metrics=metrics,
        )
        log.warning("finetune: %s", plan.summary.line())
        if val_before is not None and val_after is not None:
            log.warning(
                "finetune: val masked cosine %.4f -> %.4f (mean-feature baseline %.4f)",
                metrics["val_cosine_before"],
                metrics["val_cosine_after"],
                metrics["val_cosine_mean_baseline"],
            )
    dist_utils.barrier(info)
    return paths["checkpoint"]


def _resolve_teacher_spec(cfg, cache_dir: Path, plan: WindowPlan, make_teacher):
    """The teacher's identity (name, ckpt hash, transforms) without building it when possible.

    timm models expose their data config without weights only once built; the cache records the
    spec, so a run whose cache already matches name + checkpoint takes the transforms from there.
    """
    import h5py

    from .mcmkd.teacher_cache import CACHE_FORMAT, file_sha256

    ckpt_hash = file_sha256(cfg.teacher_ckpt)
    for sw in plan.slides:
        path = cache_dir / f"{sw.slide_id}.h5"
        if not path.is_file():
            continue
        try:
            with h5py.File(path, "r") as f:
                if f.attrs.get("format") != CACHE_FORMAT:
                    raise TeacherCacheError(f"{path}: not a teacher-feature cache file")
                recorded = json.loads(f.attrs["teacher"])
        except OSError as err:
            raise TeacherCacheError(f"{path}: unreadable teacher cache file ({err})") from err
        want_size = cfg.teacher_input_size or recorded["input_size"]
        if (recorded["name"], recorded["ckpt_sha256"], recorded["input_size"]) == (
            cfg.teacher,
            ckpt_hash,
            want_size,
        ):
            from .mcmkd.teacher_cache import TeacherSpec

            return TeacherSpec(
                recorded["name"],
                recorded["ckpt_sha256"],
                int(recorded["input_size"]),
                tuple(recorded["mean"]),
                tuple(recorded["std"]),
            )
        raise TeacherCacheError(
            f"{path}: teacher cache was made by teacher {recorded['name']!r} "
            f"(ckpt sha256 {recorded['ckpt_sha256'][:12] or 'none'}, input {recorded['input_size']}), "
            f"this run asks for {cfg.teacher!r} (ckpt sha256 {ckpt_hash[:12] or 'none'}, "
            f"input {want_size}); use another --teacher-cache or delete it"
        )
    enc = make_teacher()
    return teacher_spec(cfg.teacher, cfg.teacher_ckpt, enc.transforms)


def _teacher_stats(reader: CacheReader, plan: WindowPlan, grid: int):
    """Teacher width, and mean/std of teacher features over the training windows' patches."""
    total, total_sq, n, dim = 0.0, 0.0, 0, 0
    by_slide: dict[int, list[int]] = {}
    for r in plan.train:
        by_slide.setdefault(r.slide, []).append(r.window)
    for s, windows in sorted(by_slide.items()):
        sw = plan.slides[s]
        coords = {(int(x), int(y)) for w in windows for x, y in sw.patch_coords(w, grid)}
        rows = sorted(reader.rows[s][c] for c in coords)
        sel = reader.all_features(s)[rows].astype(np.float64)
        dim = sel.shape[1]
        total = total + sel.sum(0)
        total_sq = total_sq + (sel**2).sum(0)
        n += len(sel)
    mean = total / n
    std = np.sqrt(np.maximum(total_sq / n - mean**2, 0.0))
    return dim, torch.from_numpy(mean).float(), torch.from_numpy(std).float()
