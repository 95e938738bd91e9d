"""Window planning: slides -> context windows -> training and validation windows.

Each slide goes through the shared per-slide job loop: a slide without coords or without one
g x g window is skipped, an unreadable one fails; both are counted in the run summary. The
plan is a function of the config and seed alone (every rank computes the same one).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from ..clam.formats import coords_path, read_coords_h5, read_dataset_csv
from ..jobs import DONE, SkipSlide, run_slide_job
from ..slides import count_outside, find_slide, open_slide
from ..utils import ClamMcmkdError, RunSummary
from .config import FinetuneConfig
from .windows import NoWindowsError, SlideWindows, WindowRef, slide_windows

log = logging.getLogger(__name__)


@dataclass
class WindowPlan:
    slides: list[SlideWindows]  # every slide with >= 1 window
    train: list[WindowRef]
    val: list[WindowRef]
    summary: RunSummary


def plan_windows(cfg: FinetuneConfig) -> WindowPlan:
    """Slides -> windows -> (train, val) refs; bad slides are skipped and counted."""
    summary = RunSummary("finetune")
    df = read_dataset_csv(cfg.csv_path, require_label=False)
    outcomes = run_slide_job(
        list(df["slide_id"]), lambda s: _slide_windows(cfg, s), summary, catch=ClamMcmkdError
    )
    slides = [o.result for o in outcomes if o.status == DONE]
    if not slides:
        raise NoWindowsError(_no_windows(cfg, len(df), summary))
    train, val = split_windows(slides, cfg)
    summary.extra.update(
        slides_with_windows=len(slides), train_windows=len(train), val_windows=len(val)
    )
    return WindowPlan(slides, train, val, summary)


def _no_windows(cfg: FinetuneConfig, listed: int, summary: RunSummary) -> str:
    """Why no slide gave a window: the first slide failure when every slide failed (a wrong
    --slide-ext, unreadable files), else the grid."""
    counts = (f"{listed} listed, {len(summary.failed)} unreadable, "
              f"{len(summary.skipped)} without coords or windows")  # fmt: skip
    if summary.failed and not summary.skipped:
        slide_id, why = next(iter(summary.failed.items()))
        return f"no slide of {cfg.csv_path} could be read ({counts}); {slide_id}: {why}"
    return (
        f"no {cfg.grid}x{cfg.grid} window of grid-adjacent tissue patches in any slide of "
        f"{cfg.csv_path} ({counts}); use a smaller --grid or denser tiling"
    )


def _slide_windows(cfg: FinetuneConfig, slide_id: str) -> SlideWindows:
    h5 = coords_path(cfg.data_h5_dir, slide_id)
    if not h5.is_file():
        raise SkipSlide(f"no coords file {h5}", level=logging.WARNING)
    coords = read_coords_h5(h5)
    slide_path = find_slide(cfg.data_slide_dir, slide_id, cfg.slide_ext)
    with open_slide(slide_path) as slide:  # an unreadable slide fails here, not in a worker
        outside = count_outside(coords.coords, coords.patch_size_level0, slide.dimensions)
    if outside:
        log.warning("finetune: %s: %d of %d coords lie (partly) outside the slide's %dx%d "
                    "level 0; windows there read black", slide_id, outside, len(coords),
                    *slide.dimensions)  # fmt: skip
    sw = slide_windows(slide_id, slide_path, coords, cfg.grid, cfg.window_overlap)
    if len(sw) == 0:
        raise SkipSlide(f"no {cfg.grid}x{cfg.grid} window of adjacent patches")
    return sw


def split_windows(
    slides: list[SlideWindows], cfg: FinetuneConfig
) -> tuple[list[WindowRef], list[WindowRef]]:
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
        n_val = min(max(1, math.ceil(cfg.val_frac * len(all_refs))), len(all_refs) - 1)
        if n_val:
            log.warning("finetune: one slide only: validation uses %d held-out windows of that "
                        "slide", n_val)  # fmt: skip
        else:
            log.warning("finetune: one slide with one window: none left to hold out, so no "
                        "validation (val_windows=0, no val cosine in the metrics)")  # fmt: skip
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


def windows_by_slide(refs: list[WindowRef]) -> dict[int, list[int]]:
    """Slide index -> its window indices, in the order the refs list them."""
    by_slide: dict[int, list[int]] = {}
    for r in refs:
        by_slide.setdefault(r.slide, []).append(r.window)
    return by_slide
