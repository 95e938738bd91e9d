"""Teacher features, computed at most once per patch and kept on disk.

Teacher features do not depend on the mask, so they are a pure function of (teacher, patch).
The cache holds one h5 per slide (``<cache_dir>/<slide_id>.h5``: ``coords`` (N, 2) level-0 and
``features`` (N, D) float32, row-aligned) and records on the file everything that made them
(:class:`TeacherSpec`: name, weights, input size, resize, crop, interpolation, mean/std, output
rule, width, precision), the slide file it read (id, size, a hash of its first and last MiB) and
the patch size and level. A run that differs in any of these stops with one line naming the
field and the way out, instead of silently mixing features. The run's spec comes from a build
on the meta device (no weights, no memory, nothing downloaded), so a run whose cache is
complete never builds the teacher. Patches missing from a file are computed and merged in (the
file is rewritten atomically).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import h5py
import numpy as np

from ..encoders import Encoder, PatchTransforms, create_encoder, weights_source
from ..encoders.forward import autocast_dtype
from ..utils import ClamMcmkdError, OpenFiles, atomic_path, progress
from .windows import SLIDES_OPEN_PER_WORKER

CACHE_FORMAT = "clam_mcmkd.teacher_cache/2"
_FIX = "delete {dir} or use a new --teacher-cache"


class TeacherCacheError(ClamMcmkdError):
    pass


@dataclass(frozen=True)
class TeacherSpec:
    """Everything that decides a teacher feature, besides the pixels."""

    name: str
    weights: str  # sha256:<checkpoint file>, the pretrained source (hub id), or random-init(seed)
    input_size: int
    resize_size: int | None  # None: Resize(input_size), no crop
    crop: bool
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    output: str  # the encoder's output rule (class token, class + mean patch token, pooled...)
    out_dim: int
    precision: str  # fp32 | bf16 | fp16: what the teacher's forward pass ran in

    def record(self) -> dict:
        return json.loads(json.dumps(asdict(self), sort_keys=True))

    def attrs(self) -> dict:
        return {"teacher": json.dumps(self.record(), sort_keys=True)}

    def differences(self, recorded: dict) -> list[str]:
        """``field cached (cache) vs wanted (this run)`` for every field that differs."""
        return [
            f"{key} {recorded.get(key)!r} (cache) vs {value!r} (this run)"
            for key, value in self.record().items()
            if recorded.get(key) != value
        ]


def file_sha256(path: str | os.PathLike | None) -> str:
    if path is None:
        return ""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def slide_identity(slide_id: str, path: str | os.PathLike) -> dict:
    """A slide file's identity, cheap for multi-GB slides: id, size and a SHA-256 of its first
    and last MiB (a re-scan or another file under the same name differs there)."""
    path = Path(path)
    ident = {"slide_id": slide_id, "size": None, "head_tail_sha256": ""}
    if path.is_file():
        size = path.stat().st_size
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            digest.update(f.read(1 << 20))
            if size > 1 << 20:
                f.seek(max(size - (1 << 20), 1 << 20))
                digest.update(f.read())
        ident.update(size=size, head_tail_sha256=digest.hexdigest())
    return ident


def teacher_transforms(transforms: PatchTransforms, input_size: int | None) -> PatchTransforms:
    """The teacher's transforms with ``--teacher-input-size``: the crop and the resize before
    it scale together, so a card's resize-then-crop and interpolation are kept."""
    if not input_size or int(input_size) == transforms.input_size:
        return transforms
    scale = int(input_size) / transforms.input_size
    resize = None if transforms.resize_size is None else round(transforms.resize_size * scale)
    return replace(transforms, input_size=int(input_size), resize_size=resize)


def build_teacher(
    name: str,
    *,
    ckpt: str | os.PathLike | None,
    pretrained: bool,
    input_size: int | None,
    device: str,
) -> Encoder:
    """A frozen eval-mode teacher; `input_size` overrides its transforms' size."""
    from ..encoders import PretrainedWeightsError

    try:
        enc = create_encoder(name, pretrained=pretrained, ckpt=ckpt)
    except PretrainedWeightsError as err:  # finetune names its checkpoint option differently
        raise err.for_option("--teacher-ckpt") from None
    model = enc.model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return Encoder(model, teacher_transforms(enc.transforms, input_size), enc.out_dim)


def teacher_spec(
    name: str,
    *,
    ckpt: str | os.PathLike | None,
    pretrained: bool,
    input_size: int | None,
    device: str,
    precision: str,
) -> TeacherSpec:
    """The spec of the teacher a run asks for, read off a build on the meta device (no weights
    read, no memory, nothing downloaded): what :func:`build_teacher` would build."""
    import torch

    with torch.device("meta"):
        enc = create_encoder(name, pretrained=False, ckpt=ckpt)
    tf = teacher_transforms(enc.transforms, input_size)
    weights = weights_source(name, pretrained=pretrained, ckpt=ckpt)
    if weights.startswith("file:"):
        weights = "sha256:" + file_sha256(weights[len("file:") :])
    dtype = autocast_dtype(device, precision)
    return TeacherSpec(
        name=name, weights=weights, input_size=int(tf.input_size), resize_size=tf.resize_size,
        crop=tf.crop, interpolation=tf.interpolation, mean=tuple(float(v) for v in tf.mean),
        std=tuple(float(v) for v in tf.std), output=getattr(enc.model, "output_rule", ""),
        out_dim=int(enc.out_dim),
        precision={None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype],
    )  # fmt: skip


class TeacherCache:
    """One directory of per-slide teacher-feature files for one teacher."""

    def __init__(self, cache_dir: str | os.PathLike, spec: TeacherSpec):
        self.dir = Path(cache_dir)
        self.spec = spec
        self._slides: dict[str, dict] = {}  # slide path -> its identity (hashed once)

    def path(self, slide_id: str) -> Path:
        return self.dir / f"{slide_id}.h5"

    def slide_identity(self, sw) -> dict:
        if sw.slide_path not in self._slides:
            self._slides[sw.slide_path] = slide_identity(sw.slide_id, sw.slide_path)
        return self._slides[sw.slide_path]

    def _check_attrs(self, path: Path, attrs, sw) -> None:
        fix = _FIX.format(dir=self.dir)
        if attrs.get("format") != CACHE_FORMAT:
            raise TeacherCacheError(
                f"{path}: not a teacher-feature cache of this version (format "
                f"{attrs.get('format')!r}, expected {CACHE_FORMAT!r}); {fix}"
            )
        diff = self.spec.differences(json.loads(attrs["teacher"]))
        if diff:
            raise TeacherCacheError(
                f"{path}: teacher cache was made by a different teacher setup: "
                f"{'; '.join(diff)}; {fix}"
            )
        recorded, now = json.loads(attrs["slide"]), self.slide_identity(sw)
        if recorded != now:
            what = [f"{k} {recorded.get(k)!r} vs {v!r}" for k, v in now.items()
                    if recorded.get(k) != v]  # fmt: skip
            raise TeacherCacheError(
                f"{path}: teacher cache was made from another slide file than {sw.slide_path} "
                f"({'; '.join(what)}); {fix}"
            )
        geom = (int(attrs["patch_size"]), int(attrs["patch_level"]))
        if geom != (sw.patch_size, sw.patch_level):
            raise TeacherCacheError(
                f"{path}: stale teacher cache: made for patch_size/level {geom}, the coords now "
                f"say {(sw.patch_size, sw.patch_level)}; {fix}"
            )

    def read_index(self, sw) -> np.ndarray:
        """Cached coords (N, 2) of a slide (empty when there is no file), after validation."""
        path = self.path(sw.slide_id)
        if not path.is_file():
            return np.zeros((0, 2), dtype=np.int64)
        try:
            with h5py.File(path, "r") as f:
                self._check_attrs(path, dict(f.attrs), sw)
                coords = np.asarray(f["coords"][:], dtype=np.int64)
                n_feat = f["features"].shape[0]
        except (OSError, KeyError) as err:
            raise TeacherCacheError(f"{path}: unreadable teacher cache file ({err})") from err
        if n_feat != len(coords):
            raise TeacherCacheError(f"{path}: {len(coords)} coords but {n_feat} feature rows")
        return coords

    def merge(self, sw, coords: np.ndarray, features: np.ndarray) -> None:
        """Add rows to a slide's file (rewritten atomically: a killed run leaves the old one)."""
        old_coords = self.read_index(sw)
        old_feats = None
        if len(old_coords):
            with h5py.File(self.path(sw.slide_id), "r") as f:
                old_feats = np.asarray(f["features"][:])
        all_coords = np.concatenate([old_coords, np.asarray(coords, dtype=np.int64)])
        all_feats = (
            features
            if old_feats is None
            else np.concatenate([old_feats, features.astype(old_feats.dtype)])
        )
        with atomic_path(self.path(sw.slide_id)) as tmp:
            with h5py.File(tmp, "w") as f:
                f.create_dataset("coords", data=all_coords)
                f.create_dataset("features", data=np.asarray(all_feats, dtype=np.float32))
                f.attrs["format"] = CACHE_FORMAT
                f.attrs["patch_size"] = int(sw.patch_size)
                f.attrs["patch_level"] = int(sw.patch_level)
                f.attrs["slide"] = json.dumps(self.slide_identity(sw), sort_keys=True)
                for k, v in self.spec.attrs().items():
                    f.attrs[k] = v


def fill_cache(
    cache: TeacherCache,
    slides: list,  # list[SlideWindows]
    needed: dict[int, list[int]],  # slide index -> window indices whose patches must be cached
    grid: int,
    make_teacher: Callable[[], Encoder],
    device: str,
    batch_size: int = 64,
    show_progress: bool = True,
    precision: str = "auto",
    num_workers: int | None = 0,
) -> dict[str, int]:
    """Compute the teacher features missing from the cache; the teacher is built only if needed.

    The missing patches are found from coords alone, then read (tile-level, in `num_workers`
    processes that read ahead while the teacher runs) and encoded through
    :func:`~clam_mcmkd.patch_pipeline.encode_cohort`; each slide's rows are merged into its file
    once the slide is done.
    """
    from ..patch_pipeline import SlideJob, encode_cohort

    stats = {"patches_cached": 0, "patches_computed": 0}
    jobs = []
    for s, windows in needed.items():
        sw = slides[s]
        have = {tuple(c) for c in cache.read_index(sw)}
        missing: dict[tuple[int, int], None] = {}  # ordered: window by window, row-major
        for w in windows:
            for c in sw.patch_coords(w, grid):
                key = (int(c[0]), int(c[1]))
                if key in have:
                    stats["patches_cached"] += 1
                else:
                    missing[key] = None
        if missing:
            coords = np.asarray(list(missing), dtype=np.int64)
            jobs.append(SlideJob(sw.slide_id, sw.slide_path, coords=coords,
                                 patch_level=sw.patch_level, patch_size=sw.patch_size))  # fmt: skip
    by_id = {slides[s].slide_id: slides[s] for s in needed}
    bar = progress(total=sum(len(j.coords) for j in jobs), desc="teacher features",
                   unit="patch", **({} if show_progress else {"disable": True}))  # fmt: skip
    teacher = make_teacher() if jobs else None
    for res in encode_cohort(teacher, jobs, batch_size=batch_size, num_workers=num_workers,
                             device=device, precision=precision):  # fmt: skip
        if res.error:
            raise TeacherCacheError(f"teacher features of {res.slide_id}: {res.error}")
        sw = by_id[res.slide_id]
        cache.merge(sw, res.coords, res.features)
        stats["patches_computed"] += len(res.coords)
        bar.update(len(res.coords))
    bar.close()
    stats["teacher_built"] = int(teacher is not None)
    return stats


def missing_counts(
    cache: TeacherCache, slides: list, items: list[tuple[int, list[int]]], grid: int
) -> list[int]:
    """Patches of each (slide, windows) item not in the cache yet: the work left to share."""
    counts = []
    for s, windows in items:
        sw = slides[s]
        have = {(int(x), int(y)) for x, y in cache.read_index(sw)}
        want = {(int(x), int(y)) for w in windows for x, y in sw.patch_coords(w, grid)}
        counts.append(len(want - have))
    return counts


class CacheReader:
    """Looks teacher features up by level-0 coords; h5 files opened lazily (one per worker)."""

    def __init__(self, cache: TeacherCache, slides: list, slide_indices: Iterable[int]):
        self.cache = cache
        self.paths: dict[int, str] = {}
        self.rows: dict[int, dict[tuple[int, int], int]] = {}
        for s in slide_indices:
            sw = slides[s]
            coords = cache.read_index(sw)
            self.paths[s] = str(cache.path(sw.slide_id))
            self.rows[s] = {(int(x), int(y)): i for i, (x, y) in enumerate(coords)}
        self._files = OpenFiles(SLIDES_OPEN_PER_WORKER, self._open_file)

    def _open_file(self, s: int) -> h5py.File:
        return h5py.File(self.paths[s], "r")

    def features(self, s: int, coords: np.ndarray) -> np.ndarray:
        try:
            rows = np.asarray([self.rows[s][(int(x), int(y))] for x, y in coords])
        except KeyError as err:
            raise TeacherCacheError(
                f"{self.paths.get(s)}: no cached teacher feature for patch {err.args[0]}"
            ) from err
        order = np.argsort(rows)
        uniq, inverse = np.unique(rows[order], return_inverse=True)
        block = self._files.get(s)["features"][uniq]
        out = np.empty((len(rows), block.shape[1]), dtype=np.float32)
        out[order] = block[inverse]
        return out

    def all_features(self, s: int) -> np.ndarray:
        with h5py.File(self.paths[s], "r") as f:
            return np.asarray(f["features"][:], dtype=np.float32)

    def close(self) -> None:
        self._files.close()


def teacher_stats(reader: CacheReader, slides: list, by_slide: dict[int, list[int]], grid: int):
    """Teacher width, and mean/std of teacher features over the given windows' patches."""
    import torch

    total, total_sq, n, dim = 0.0, 0.0, 0, 0
    for s, windows in sorted(by_slide.items()):
        sw = slides[s]
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
