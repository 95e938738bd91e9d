"""Exact resume: what a fine-tuning run saves between optimizer steps, and checks on load.

The state holds the student, predictor, optimizer and schedule, every RNG, the loss history and
a fingerprint (the settings of :data:`~.config.RESUME_KEYS`, the slides and the training
windows); a ``--resume`` whose fingerprint differs is refused rather than mixing two runs.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from ..encoders.checkpoint import load_checkpoint
from ..utils import atomic_path
from .config import RESUME_KEYS, FinetuneConfig, FinetuneError

STATE_FORMAT = "clam_mcmkd.finetune_state/1"


def rng_state() -> dict:
    return {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def fingerprint(cfg: FinetuneConfig, plan) -> dict:
    """What must be equal for a resumed run to continue the interrupted one exactly."""
    return {
        "config": {k: getattr(cfg, k) for k in RESUME_KEYS},
        "slides": [sw.slide_id for sw in plan.slides],
        "train": [(r.slide, r.window) for r in plan.train],
    }


def save_state(path: Path, **state) -> None:
    with atomic_path(path) as tmp:
        torch.save({"format": STATE_FORMAT, **state}, tmp)


def resume_state(path: Path, expected_fingerprint: dict, resume: bool, info) -> dict | None:
    """The state to resume from (None: start), decided and read by rank 0 alone and handed to
    every rank: with a node-local --out only rank 0's node has the file, and ranks that each
    looked for themselves started at different steps. A refusal reaches every rank."""
    from ..distributed import from_main

    def read():
        if not (resume and path.is_file()):
            return None
        try:
            return load_state(path, expected_fingerprint)
        except FinetuneError as err:
            return {"error": str(err)}

    state = from_main(read, info)
    if state is not None and "error" in state:
        raise FinetuneError(state["error"])
    return state


def load_state(path: Path, expected_fingerprint: dict) -> dict:
    state = load_checkpoint(
        path, what="resume state", error=FinetuneError, hint="; delete it to start over"
    )
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise FinetuneError(f"{path}: not a finetune resume state; delete it to start over")
    old, new = state["fingerprint"], expected_fingerprint
    if old != new:
        changed = [k for k in new["config"] if old["config"].get(k) != new["config"][k]]
        what = f"options {changed}" if changed else "the slides or windows"
        raise FinetuneError(
            f"{path}: cannot --resume: {what} differ from the interrupted run; "
            "use the same options or delete the state to start over"
        )
    return state
