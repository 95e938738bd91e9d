"""The one per-slide job loop: skip what is finished, try the rest, record every outcome once.

Tiling, feature extraction and MCM-KD window planning all run through :func:`run_slide_job`.
Every outcome goes through one place (:func:`record`, in the spirit of TRIDENT's
``Processor._record_outcome``): the run summary and the stage's own record (a process list, a
progress bar) are updated from the same :class:`Outcome`, so they can never drift. A slide that
fails is logged and the batch goes on.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

from .utils import ClamMcmkdError, RunSummary, progress

log = logging.getLogger("clam_mcmkd")

T = TypeVar("T")
DONE, SKIPPED, FAILED = "done", "skipped", "failed"


class SkipSlide(ClamMcmkdError):
    """Raised by a task: the slide is left out (no coords, no window), which is not a failure."""

    def __init__(self, message: str, level: int = logging.INFO):
        super().__init__(message)
        self.level = level


class SlideFailed(ClamMcmkdError):
    """Raised by a task: the slide failed; the message is recorded as it is, with what the task
    produced (e.g. a process-list row for a slide without tissue)."""

    def __init__(self, message: str, result: Any = None):
        super().__init__(message)
        self.result = result


@dataclass
class Outcome:
    slide_id: str
    status: str  # DONE, SKIPPED or FAILED
    result: Any = None  # the task's return value; for SKIPPED what `finished` returned
    message: str = ""  # why it was skipped or failed
    seconds: float = 0.0


def record(summary: RunSummary, outcome: Outcome) -> None:
    """The one place an outcome enters the run summary."""
    if outcome.status == DONE:
        summary.done.append(outcome.slide_id)
    elif outcome.status == SKIPPED:
        summary.skipped.append(outcome.slide_id)
    else:
        summary.fail(outcome.slide_id, outcome.message)


def run_slide_job(
    items: Iterable[T],
    task: Callable[[T], Any],
    summary: RunSummary,
    *,
    slide_id: Callable[[T], str] = str,
    finished: Callable[[T], Any] | None = None,
    on_outcome: Callable[[Outcome], None] | None = None,
    catch: type[BaseException] | tuple[type[BaseException], ...] = Exception,
    desc: str | None = None,
    postfix: Callable[[], dict] | None = None,
) -> list[Outcome]:
    """Run `task` on each item; returns every outcome, in order.

    ``finished(item)`` returns None when the slide must be run, anything else (True, a patch
    count) when it is finished already: it is then skipped with that as its result. A task
    raises :class:`SkipSlide` to leave a slide out, :class:`SlideFailed` to fail it with its own
    message; any other exception of a `catch` type fails it with ``Type: message``. `desc`
    shows a progress bar (`postfix` adds figures to it).
    """
    outcomes = []
    bar = progress(items, desc=desc, unit="slide", **({} if desc else {"disable": True}))
    for item in bar:
        outcome = _run_one(item, task, slide_id(item), finished, catch, summary.stage)
        record(summary, outcome)
        if on_outcome is not None:
            on_outcome(outcome)
        outcomes.append(outcome)
        if postfix is not None and outcome.status != SKIPPED:
            bar.set_postfix(**postfix())
    bar.close()
    return outcomes


def _run_one(item, task, key: str, finished, catch, stage: str) -> Outcome:
    started = time.perf_counter()
    if finished is not None:
        done_before = finished(item)
        if done_before is not None:
            return Outcome(key, SKIPPED, done_before, seconds=time.perf_counter() - started)
    try:
        result = task(item)
    except SkipSlide as err:
        log.log(err.level, "%s: %s skipped: %s", stage, key, err)
        return Outcome(key, SKIPPED, None, str(err), time.perf_counter() - started)
    except SlideFailed as err:
        return Outcome(key, FAILED, err.result, str(err), time.perf_counter() - started)
    except catch as err:  # one bad slide must not stop the batch
        message = f"{type(err).__name__}: {err}"
        return Outcome(key, FAILED, None, message, time.perf_counter() - started)
    return Outcome(key, DONE, result, seconds=time.perf_counter() - started)
