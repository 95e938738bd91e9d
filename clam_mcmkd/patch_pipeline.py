"""A whole cohort's patches through one pool of reading workers (the GPU-shaped data path).

CLAM (and ``iter_patch_batches``) builds a DataLoader per slide: its workers fork, open the
slide, read a few batches and die, and the model waits at every slide boundary. Here ONE
DataLoader walks the whole cohort, batch by batch in slide order:

- workers start once; each keeps its last few slides' readers (:class:`PatchReader`) and coords
  open, so a slide is opened once per worker, not once per batch;
- the loader's prefetch runs across slide boundaries: the next slide is opened and read while
  the consumer drains the current one;
- batches are handed over as uint8 ``(B, P, P, 3)`` (4x less to copy than float, resize and
  normalise happen on the consumer's device), in pinned memory when asked (CUDA), so the
  consumer's ``.to(device, non_blocking=True)`` is a true async copy;
- a slide that cannot be read (missing file, bad coords h5, corrupt tile) yields ONE error
  record and the rest of the cohort goes on.

The stream is exact: for every slide it yields exactly the rows of its coords h5, in order, with
the pixels :class:`PatchReader` (== OpenSlide) gives.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .clam.formats import CoordsH5, read_coords_h5
from .utils import ClamMcmkdError, OpenFiles

log = logging.getLogger(__name__)
READERS_PER_WORKER = 2  # the slide being read and the next one


@dataclass(frozen=True)
class SlideJob:
    """One slide to read: its id, image file and CLAM coords h5, or coords given in memory
    (``coords`` (N, 2) level-0 with their ``patch_level`` and ``patch_size``: e.g. the patches
    of a teacher cache still to compute)."""

    slide_id: str
    slide_path: str
    coords_path: str = ""
    coords: np.ndarray | None = field(default=None, compare=False, repr=False)
    patch_level: int = 0
    patch_size: int = 0

    @classmethod
    def of(cls, slide_id: str, slide_path, coords: CoordsH5) -> SlideJob:
        """A job over coords already read (kept in memory, handed to the workers)."""
        return cls(slide_id, str(slide_path), str(coords.path or ""),
                   np.asarray(coords.coords, dtype=np.int64), int(coords.patch_level),
                   int(coords.patch_size))  # fmt: skip


@dataclass
class PatchBatch:
    """Rows [start, start + len) of one slide's coords, or that slide's error.

    ``patches`` is uint8 (B, P, P, 3) (or whatever ``transform`` made of it), ``coords`` int64
    (B, 2). After an error record no more records of that slide follow.
    """

    slide_id: str
    start: int
    n_patches: int  # rows of the slide's coords h5 (0 when it could not be read)
    patches: object = None
    coords: np.ndarray | None = None
    error: str | None = None
    dimensions: tuple[int, int] | None = None  # the slide's level-0 (width, height)

    @property
    def last(self) -> bool:
        """The slide's last record: its final batch or its error."""
        return self.error is not None or self.start + len(self.coords) >= self.n_patches


def default_num_workers(local_world_size: int = 1) -> int:
    """Reading workers for one process: the cores this process may use, shared among the
    ranks on the node, less one for the process itself (at least 1)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS, Windows
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, local_world_size) - 1)


def _coords_rows(job: SlideJob) -> tuple[int, str | None]:
    """(rows, None), or (0, why) for a coords h5 that cannot be used."""
    import h5py

    if job.coords is not None:
        return (len(job.coords), None) if len(job.coords) else (0, f"{job.slide_id}: no patches")
    p = Path(job.coords_path)
    if not p.is_file():
        return 0, f"{p}: coords file does not exist"
    try:
        with h5py.File(p, "r") as f:
            if "coords" not in f:
                return 0, f"{p}: no 'coords' dataset"
            rows = int(f["coords"].shape[0])
    except OSError as err:
        return 0, f"{p}: not a readable HDF5 file ({err})"
    return (rows, None) if rows else (0, f"{p}: no patches in the coords file")


class CohortPatchDataset:
    """Map-style dataset over the cohort's batches: item u = (slide, first row) unit u.

    Picklable recipe; readers and coords open lazily in whichever process reads, cached per
    process (a DataLoader worker keeps its own).
    """

    def __init__(
        self,
        jobs: Sequence[SlideJob],
        batch_size: int,
        *,
        fast: bool = True,
        transform: Callable | None = None,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.jobs = list(jobs)
        self.batch_size = int(batch_size)
        self.fast = fast
        self.transform = transform
        self.rows: list[int] = []
        self.units: list[tuple[int, int]] = []  # (job index, first row); row -1: an error unit
        self.errors: dict[int, str] = {}
        for j, job in enumerate(self.jobs):
            rows, error = _coords_rows(job)
            self.rows.append(rows)
            if error:
                self.errors[j] = error
                self.units.append((j, -1))
            else:
                self.units.extend((j, s) for s in range(0, rows, self.batch_size))
        self._open = OpenFiles(READERS_PER_WORKER, self._open_job)  # job -> _OpenJob
        self._failed: dict[int, str] = {}
        self._pid: int | None = None

    def __len__(self) -> int:
        return len(self.units)

    def _slide(self, j: int) -> _OpenJob:
        if self._pid != os.getpid():  # a fresh worker: nothing inherited is ours
            self._failed, self._pid = {}, os.getpid()
        return self._open.get(j)

    def _open_job(self, j: int) -> _OpenJob:
        from .patch_loader import PatchReader

        job = self.jobs[j]
        if job.coords is None:
            job = SlideJob.of(job.slide_id, job.slide_path, read_coords_h5(job.coords_path))
        reader = PatchReader(job.slide_path, job.patch_level, job.patch_size, fast=self.fast)
        if self.fast and not reader.is_fast:
            log.info("%s: read through OpenSlide (%s)", Path(job.slide_path).name,
                     reader.stats.fallback_reason)  # fmt: skip
        return _OpenJob(reader, job.coords)

    def __getitem__(self, u: int) -> dict:
        import torch

        j, start = self.units[u]
        if start < 0:
            return {"job": j, "start": 0, "error": self.errors[j]}
        if self._pid == os.getpid() and j in self._failed:
            return {"job": j, "start": start, "error": self._failed[j]}
        try:
            opened = self._slide(j)
            reader, coords = opened.reader, opened.coords
            rows = coords[start : start + self.batch_size]
            patches = torch.from_numpy(reader.read_batch(rows))
            if self.transform is not None:
                patches = self.transform(patches)
        except Exception as err:  # noqa: BLE001 - one bad slide must not stop the cohort
            msg = str(err) if isinstance(err, ClamMcmkdError) else _name_file(self.jobs[j], err)
            self._failed[j] = msg
            return {"job": j, "start": start, "error": msg}
        dims = tuple(int(v) for v in reader.slide.dimensions)
        return {"job": j, "start": start, "patches": patches, "coords": rows, "dimensions": dims}

    def close(self) -> None:
        self._open.close()

    def __getstate__(self):  # workers get the recipe, never an open file (OpenFiles: empty)
        state = dict(self.__dict__)
        state["_failed"], state["_pid"] = {}, None
        return state


@dataclass
class _OpenJob:
    """A slide's reader and coords, open in one worker."""

    reader: object  # PatchReader
    coords: np.ndarray

    def close(self) -> None:
        self.reader.close()


def _name_file(job: SlideJob, err: BaseException) -> str:
    return f"{job.slide_path}: {type(err).__name__}: {err}"


def _preload_readers() -> None:
    """Import the readers' libraries once here, so forked workers inherit them."""
    import imagecodecs  # noqa: F401
    import openslide  # noqa: F401
    import tifffile  # noqa: F401


def _as_is(item):
    return item


def iter_cohort_batches(
    jobs: Sequence[SlideJob],
    batch_size: int = 256,
    *,
    num_workers: int | None = None,
    pin_memory: bool = False,
    transform: Callable | None = None,
    prefetch_factor: int = 2,
    fast: bool = True,
) -> Iterator[PatchBatch]:
    """Every slide's patches as :class:`PatchBatch` records, slide after slide in `jobs` order.

    ``num_workers`` reading processes for the whole cohort (None: :func:`default_num_workers`;
    0: read in this process). ``transform`` runs in the readers on each uint8 tensor batch (on
    CPU-only runs; leave it None when a GPU resizes). ``pin_memory``: page-locked batches for
    ``non_blocking`` copies to CUDA.
    """
    dataset = CohortPatchDataset(jobs, batch_size, fast=fast, transform=transform)
    if len(dataset) == 0:
        return
    workers = default_num_workers() if num_workers is None else int(num_workers)
    if workers <= 0:
        items = (dataset[u] for u in range(len(dataset)))
    else:
        from torch.utils.data import DataLoader

        _preload_readers()
        items = DataLoader(
            dataset,
            batch_size=None,
            shuffle=False,
            num_workers=min(workers, len(dataset)),
            collate_fn=_as_is,
            pin_memory=pin_memory,
            prefetch_factor=prefetch_factor,
        )
    failed: set[int] = set()
    try:
        for item in items:
            j = item["job"]
            if j in failed:
                continue
            job = dataset.jobs[j]
            if "error" in item:
                failed.add(j)
                yield PatchBatch(job.slide_id, item["start"], dataset.rows[j], error=item["error"])
                continue
            yield PatchBatch(job.slide_id, item["start"], dataset.rows[j], item["patches"],
                             item["coords"], dimensions=item["dimensions"])  # fmt: skip
    finally:
        dataset.close()


def iter_patch_batches(
    slide_path: str | os.PathLike,
    coords: CoordsH5,
    batch_size: int = 256,
    *,
    num_workers: int = 0,
    pin_memory: bool = False,
    fast: bool = True,
    transform: Callable | None = None,
) -> Iterator:
    """One slide's patches as uint8 (B, P, P, 3) tensors in coords order (or ``transform`` of
    them): the cohort path with one job; a read error is raised, not yielded."""
    job = SlideJob.of(Path(slide_path).stem, slide_path, coords)
    if not len(job.coords):
        return
    for rec in iter_cohort_batches([job], batch_size, num_workers=num_workers,
                                   pin_memory=pin_memory, transform=transform, fast=fast):  # fmt: skip
        if rec.error:
            raise ClamMcmkdError(rec.error)
        yield rec.patches


# ----------------------------------------------------------------------------- features


@dataclass
class SlideFeatures:
    """One slide's encoded patches (rows in coords order) or why it could not be read."""

    slide_id: str
    features: np.ndarray | None = None  # (N, D) float32
    coords: np.ndarray | None = None  # (N, 2) level-0
    error: str | None = None
    seconds: float = 0.0  # from the slide's first batch to its last
    dimensions: tuple[int, int] | None = None  # the slide's level-0 (width, height)


def extraction_batches(
    jobs: Sequence[SlideJob],
    transforms,
    *,
    batch_size: int = 256,
    num_workers: int | None = None,
    device: str = "cpu",
) -> Iterator[PatchBatch]:
    """The batches extraction encodes on `device`: for CUDA pinned uint8 (4x less to copy;
    resized and normalised on the GPU), for the CPU resized and normalised by the workers."""
    cuda = str(device).startswith("cuda")
    return iter_cohort_batches(jobs, batch_size, num_workers=num_workers, pin_memory=cuda,
                               transform=None if cuda else transforms.batch)  # fmt: skip


def encode_cohort(
    encoder,
    jobs: Sequence[SlideJob],
    *,
    batch_size: int = 256,
    num_workers: int | None = None,
    device: str = "cpu",
    precision: str = "auto",
) -> Iterator[SlideFeatures]:
    """Every job's patches through `encoder`: exactly one :class:`SlideFeatures` per job, in
    order. On CUDA the workers hand over pinned uint8 batches (copied without blocking, resized
    and normalised on the device) and features stay on the device until the slide's last batch:
    one download per slide. On the CPU the workers resize and normalise too."""
    import torch

    from .encoders.forward import encode_on_device, prepare_encoder

    if not jobs:
        return
    prepare_encoder(encoder, device)
    stream = extraction_batches(jobs, encoder.transforms, batch_size=batch_size,
                                num_workers=num_workers, device=device)  # fmt: skip
    feats, coords, started, failed = [], [], None, None
    for rec in stream:
        if rec.slide_id == failed:  # the rest of a slide the encoder failed on
            continue
        error = rec.error
        if not error:
            try:
                feats.append(encode_on_device(encoder, rec.patches, device, precision))
            except Exception as err:  # noqa: BLE001 - one slide fails, the cohort goes on
                error, failed = f"{type(err).__name__}: {err}", rec.slide_id
        if error:
            feats, coords, started = [], [], None  # a partial slide is dropped
            yield SlideFeatures(rec.slide_id, error=error)
            continue
        started = started or time.perf_counter()
        coords.append(rec.coords)
        if rec.last:
            with torch.inference_mode():
                out = torch.cat(feats).float().cpu().numpy()  # the slide's one host sync
            yield SlideFeatures(rec.slide_id, out, np.concatenate(coords), None,
                                time.perf_counter() - started, rec.dimensions)  # fmt: skip
            feats, coords, started = [], [], None
