"""Small shared helpers: atomic writes, run summaries, seeding, device choice, logging."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import logging
import os
import random
import tempfile
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger("clam_mcmkd")


class ClamMcmkdError(Exception):
    """An error the user can fix; the CLI prints it as one line, without a traceback."""


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it onto `path` only if the block succeeds.

    A killed process therefore never leaves a half-written file under the final name, which is
    what resume logic trusts ("the file exists" == "the file is complete").
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix if suffix is None else suffix
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.exists():  # mkstemp makes 0600 files; give outputs the usual umask mode
            os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_output_path(path: str | os.PathLike, *, folder: bool = True) -> Path:
    """`path` as an output folder (or, `folder=False`, an output file) every command can write:
    it may not exist yet, but it is not a file where a folder is wanted (or a folder where a
    file is), and nothing above it is a file. One line naming it otherwise, before any work."""
    path = Path(path)
    if folder and path.exists() and not path.is_dir():
        raise ClamMcmkdError(f"{path}: exists and is not a folder")
    if not folder and path.is_dir():
        raise ClamMcmkdError(f"{path}: is a folder; give a file name inside it")
    for parent in path.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise ClamMcmkdError(f"{path}: {parent} is a file, so nothing can be made in it")
            break
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def to_jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {k: to_jsonable(v) for k, v in dataclasses.asdict(obj).items()}
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item") and callable(obj.item):  # numpy / torch scalars
        try:
            return obj.item()
        except (ValueError, RuntimeError):
            pass
    return obj


def field_default(cls: type, name: str) -> Any:
    """The default of a config dataclass field, so that other configs and the CLI take it from
    there instead of typing it again."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            if f.default is not dataclasses.MISSING:
                return f.default
            if f.default_factory is not dataclasses.MISSING:
                return f.default_factory()
            raise ValueError(f"{cls.__name__}.{name} has no default")
    raise AttributeError(f"{cls.__name__} has no field {name!r}")


def save_config(config: Any, path: str | os.PathLike) -> None:
    """Save a config dataclass as JSON next to the outputs it produced."""
    atomic_write_text(path, json.dumps(to_jsonable(config), indent=2, sort_keys=True) + "\n")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % (2**32))
    except ImportError:  # pragma: no cover
        pass
    try:
        import torch

        torch.manual_seed(seed)
    except ImportError:  # pragma: no cover
        pass


def resolve_device(device: str | None) -> str:
    """'auto' (or None) means CUDA when available, else CPU; a device this machine lacks is a
    one-line :class:`DeviceError`, not PyTorch's traceback."""
    if device in (None, "", "auto"):
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return check_device(device)


class DeviceError(ClamMcmkdError):
    """A --device that this machine cannot provide (no driver, no such GPU, bad name)."""


@dataclasses.dataclass(frozen=True)
class CudaProbe:
    """What this machine's torch sees of CUDA (the facts check_device judges a --device by)."""

    available: bool
    device_count: int
    reason: str = ""  # why CUDA is unusable, when it is

    @classmethod
    def probe(cls) -> CudaProbe:
        import torch

        if torch.version.cuda is None:
            return cls(False, 0, f"torch {torch.__version__} is a CPU-only build")
        if torch.cuda.is_available():
            return cls(True, torch.cuda.device_count())
        try:
            torch.cuda.init()
            reason = "no CUDA device visible"
        except Exception as err:  # noqa: BLE001 - the driver's own words are the best reason
            reason = str(err).split(". ")[0].rstrip(".")
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible is not None:
            reason += f"; CUDA_VISIBLE_DEVICES={visible!r}"
        return cls(False, 0, f"{reason} (torch {torch.__version__}, CUDA {torch.version.cuda})")


def check_device(device: str, probe: CudaProbe | None = None) -> str:
    """`device` unchanged if this machine has it; else one DeviceError line saying what it has."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as err:
        raise DeviceError(f"--device {device}: not a device name ({err})") from None
    if dev.type != "cuda":
        return str(device)
    probe = probe or CudaProbe.probe()
    if not probe.available:
        raise DeviceError(
            f"--device {device} asked, but torch.cuda.is_available() is False: {probe.reason}. "
            "Use --device cpu (or auto)."
        )
    if dev.index is not None and dev.index >= probe.device_count:
        raise DeviceError(
            f"--device {device} asked, but only {probe.device_count} CUDA device(s) are visible "
            f"(indices 0-{probe.device_count - 1})"
        )
    return str(device)


@dataclasses.dataclass
class RunSummary:
    """What a batch job did: per-item status plus totals, printed and written at the end."""

    stage: str
    done: list[str] = dataclasses.field(default_factory=list)
    skipped: list[str] = dataclasses.field(default_factory=list)
    failed: dict[str, str] = dataclasses.field(default_factory=dict)
    started: float = dataclasses.field(default_factory=time.time)
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def seconds(self) -> float:
        return time.time() - self.started

    def fail(self, item: str, error: BaseException | str) -> None:
        msg = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
        self.failed[item] = msg
        log.warning("%s: %s failed: %s", self.stage, item, msg)

    def line(self) -> str:
        extra = "".join(f", {k}={v}" for k, v in self.extra.items())
        return (
            f"{self.stage}: {len(self.done)} done, {len(self.skipped)} skipped, "
            f"{len(self.failed)} failed in {self.seconds:.1f}s{extra}"
        )

    def write(self, path: str | os.PathLike) -> None:
        data = to_jsonable(self)
        data["seconds"] = round(self.seconds, 3)
        atomic_write_text(path, json.dumps(data, indent=2) + "\n")


class OpenFiles:
    """At most `max_open` open handles (slide readers, h5 files) in this process, the least
    recently used closed first: a worker that visits a 1,000-slide cohort holds a bounded
    number of file handles and tile caches, not one per slide it ever read.

    `opener(key)` opens, `value.close()` closes. A copy in another process (a forked or spawned
    DataLoader worker) starts empty: handles never cross a process boundary.
    """

    def __init__(self, max_open: int, opener: Callable[[Any], Any]):
        if max_open < 1:
            raise ValueError(f"max_open must be >= 1, got {max_open}")
        self.max_open = int(max_open)
        self.opener = opener
        self._open: OrderedDict[Any, Any] = OrderedDict()
        self._pid = os.getpid()
        self.opened = 0  # handles opened in this process (the tests and benchmarks read it)
        self.peak = 0  # most handles open at once

    def __len__(self) -> int:
        return len(self._open) if self._pid == os.getpid() else 0

    def get(self, key):
        if self._pid != os.getpid():  # inherited by a fork: nothing here is ours to use
            self._open, self._pid = OrderedDict(), os.getpid()
        if key in self._open:
            self._open.move_to_end(key)
            return self._open[key]
        while len(self._open) >= self.max_open:
            self._open.popitem(last=False)[1].close()
        value = self.opener(key)
        self._open[key] = value
        self.opened += 1
        self.peak = max(self.peak, len(self._open))
        return value

    def close(self) -> None:
        if self._pid == os.getpid():
            for value in self._open.values():
                value.close()
        self._open.clear()

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_open"], state["_pid"] = OrderedDict(), None
        return state


def progress(iterable=None, **kwargs):
    """tqdm progress bar that stays quiet when stderr is not a terminal unless forced."""
    from tqdm.auto import tqdm

    kwargs.setdefault("dynamic_ncols", True)
    kwargs.setdefault("mininterval", 1.0)
    kwargs.setdefault("disable", os.environ.get("CLAM_MCMKD_NO_PROGRESS") == "1")
    return tqdm(iterable, **kwargs)


def lazy_exports(package: str, exports: dict[str, str]) -> Callable[[str], Any]:
    """A package ``__getattr__`` that imports each public name from its module on first use.

    Package ``__init__`` files use it so that importing a light module of the package (a config
    dataclass, a list of names) for the CLI does not import torch.
    """

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(exports[name], package), name)

    return __getattr__
