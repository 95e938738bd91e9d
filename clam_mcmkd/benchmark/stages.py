"""The benchmark's book-keeping: where each stage writes, and which stages have finished.

- ``<out>/stages/<stage>.json`` is written (atomically) when a stage has finished, with its
  settings, wall time and a few figures. A finished stage is never run again; a marker whose
  settings differ from the current config is an error (results made with other settings are
  never silently mixed into the report).
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..utils import ClamMcmkdError, atomic_write_text, to_jsonable

log = logging.getLogger(__name__)


class BenchmarkError(ClamMcmkdError):
    """The benchmark cannot go on; the message says which stage and what to do."""


@dataclass(frozen=True)
class Layout:
    """Where each stage writes inside ``--out`` (CLAM's own layouts below each folder)."""

    out: Path

    @property
    def stages(self) -> Path:
        return self.out / "stages"

    @property
    def dataset_csv(self) -> Path:  # the labels CSV restricted to slides that have patches
        return self.out / "dataset.csv"

    @property
    def fixed_test_csv(self) -> Path:
        return self.out / "fixed_test.csv"

    @property
    def finetune_csv(self) -> Path:
        return self.out / "finetune_slides.csv"

    @property
    def splits(self) -> Path:
        return self.out / "splits"

    def checkpoint(self, arm: str) -> Path:  # a fine-tuned arm's encoder
        return self.out / "finetune" / f"{safe_name(arm)}.pt"

    def teacher_cache(self, teacher: str) -> Path:  # shared by the arms with this teacher
        return self.out / "finetune" / f"teacher_cache_{safe_name(teacher)}"

    def features(self, arm: str) -> Path:
        return self.out / "features" / safe_name(arm)

    def results(self, arm: str) -> Path:
        return self.out / "results" / safe_name(arm)

    def run_dir(self, arm: str, model: str, seed: int) -> Path:
        return self.results(arm) / f"{model}_s{seed}"  # CLAM's <exp_code>_s<seed>


def safe_name(name: str) -> str:
    """A directory name for an encoder name such as ``hf-hub:org/model``."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


# ----------------------------------------------------------------------------- stage book-keeping


class Stages:
    """Runs each stage once per ``--out`` and remembers its settings and wall time."""

    def __init__(self, layout: Layout):
        self.layout = layout
        self.ran: list[str] = []
        self.skipped: list[str] = []

    def marker(self, name: str) -> Path:
        return self.layout.stages / f"{safe_name(name)}.json"

    def done(self, name: str) -> dict | None:
        path = self.marker(name)
        return json.loads(path.read_text()) if path.is_file() else None

    def run(self, name: str, settings: dict, fn: Callable[[], dict | None]) -> dict:
        settings = json.loads(json.dumps(to_jsonable(settings)))
        record = self.done(name)
        if record is not None:
            if record.get("settings") != settings:
                changed = sorted(
                    k
                    for k in set(settings) | set(record.get("settings", {}))
                    if settings.get(k) != record.get("settings", {}).get(k)
                )
                raise BenchmarkError(
                    f"{self.marker(name)}: stage '{name}' finished with other settings "
                    f"(changed: {changed}); use a new --out, or delete that marker and the "
                    "stage's outputs to redo it"
                )
            log.info("stage %s: done before, skipped", name)
            self.skipped.append(name)
            return record
        log.info("stage %s: running", name)
        started = time.time()
        info = fn() or {}
        record = {
            "stage": name,
            "settings": settings,
            "seconds": round(time.time() - started, 3),
            "info": to_jsonable(info),
        }
        atomic_write_text(self.marker(name), json.dumps(record, indent=2, sort_keys=True) + "\n")
        self.ran.append(name)
        return record


def save_if_changed(cfg, path: Path) -> None:
    """Keep a finished run's files untouched when it is rerun with the same config."""
    text = json.dumps(to_jsonable(cfg), indent=2, sort_keys=True) + "\n"
    if not path.is_file() or path.read_text() != text:
        atomic_write_text(path, text)


def stage_seconds(stages: Stages, names: list[str]) -> dict[str, float]:
    return {n: float(stages.done(n)["seconds"]) for n in names if stages.done(n)}
