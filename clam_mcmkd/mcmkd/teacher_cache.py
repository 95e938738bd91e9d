"""Teacher features, computed at most once per patch and kept on disk.

Teacher features do not depend on the mask, so they are a pure function of (teacher, patch).
The cache holds one h5 per slide (``<cache_dir>/<slide_id>.h5``: ``coords`` (N, 2) level-0 and
``features`` (N, D) float32, row-aligned) and records on the file what made it: teacher name,
checkpoint SHA-256, input size and normalisation, patch size and level. A run whose teacher or
patch geometry differs from what a file records stops with :class:`TeacherCacheError` instead of
silently mixing features. Patches missing from a file are computed and merged in (the file is
rewritten atomically), so a later run that needs no new patch never builds the teacher.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import h5py
import numpy as np

from ..encoders import Encoder, PatchTransforms, create_encoder
from ..encoders.forward import encode_patches
from ..utils import ClamMcmkdError, atomic_path, progress

CACHE_FORMAT = "clam_mcmkd.teacher_cache/1"


class TeacherCacheError(ClamMcmkdError):
    pass


@dataclass(frozen=True)
class TeacherSpec:
    """Everything that decides a teacher feature, besides the pixels."""

    name: str
    ckpt_sha256: str
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def attrs(self) -> dict:
        return {"teacher": json.dumps(asdict(self), sort_keys=True)}


def file_sha256(path: str | os.PathLike | None) -> str:
    if path is None:
        return ""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def build_teacher(
    name: str,
    *,
    ckpt: str | os.PathLike | None,
    pretrained: bool,
    input_size: int | None,
    device: str,
) -> Encoder:
    """A frozen eval-mode teacher; `input_size` overrides its transforms' resize."""
    enc = create_encoder(name, pretrained=pretrained, ckpt=ckpt)
    transforms = enc.transforms
    if input_size:
        transforms = PatchTransforms(int(input_size), transforms.mean, transforms.std)
    model = enc.model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return Encoder(model, transforms, enc.out_dim)


def teacher_spec(
    name: str, ckpt: str | os.PathLike | None, transforms: PatchTransforms
) -> TeacherSpec:
    return TeacherSpec(
        name=name,
        ckpt_sha256=file_sha256(ckpt),
        input_size=int(transforms.input_size),
        mean=tuple(float(v) for v in transforms.mean),
        std=tuple(float(v) for v in transforms.std),
    )


def cached_spec(
    cache_dir: Path,
    slide_ids: Iterable[str],
    name: str,
    ckpt: str | os.PathLike | None,
    input_size: int | None,
) -> TeacherSpec | None:
    """The teacher's spec as a cache file records it, without building the teacher.

    timm models expose their data config without weights only once built; the cache records the
    spec, so a run whose cache already matches name + checkpoint takes the transforms from
    there. None when no slide has a cache file; an error when a file names another teacher.
    """
    ckpt_hash = file_sha256(ckpt)
    for slide_id in slide_ids:
        path = Path(cache_dir) / f"{slide_id}.h5"
        if not path.is_file():
            continue
        try:
            with h5py.File(path, "r") as f:
                if f.attrs.get("format") != CACHE_FORMAT:
                    raise TeacherCacheError(f"{path}: not a teacher-feature cache file")
                recorded = json.loads(f.attrs["teacher"])
        except OSError as err:
            raise TeacherCacheError(f"{path}: unreadable teacher cache file ({err})") from err
        want_size = input_size or recorded["input_size"]
        if (recorded["name"], recorded["ckpt_sha256"], recorded["input_size"]) == (
            name,
            ckpt_hash,
            want_size,
        ):
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
            f"this run asks for {name!r} (ckpt sha256 {ckpt_hash[:12] or 'none'}, "
            f"input {want_size}); use another --teacher-cache or delete it"
        )
    return None


class TeacherCache:
    """One directory of per-slide teacher-feature files for one teacher."""

    def __init__(self, cache_dir: str | os.PathLike, spec: TeacherSpec | None):
        self.dir = Path(cache_dir)
        self.spec = spec  # None: adopt whatever the first file records (read-only use)

    def path(self, slide_id: str) -> Path:
        return self.dir / f"{slide_id}.h5"

    def _check_attrs(self, path: Path, attrs, patch_size: int, patch_level: int) -> None:
        if attrs.get("format") != CACHE_FORMAT:
            raise TeacherCacheError(f"{path}: not a teacher-feature cache file ({CACHE_FORMAT})")
        recorded = json.loads(attrs["teacher"])
        if self.spec is not None and recorded != json.loads(self.spec.attrs()["teacher"]):
            diff = {
                k: (recorded.get(k), v)
                for k, v in json.loads(self.spec.attrs()["teacher"]).items()
                if recorded.get(k) != v
            }
            raise TeacherCacheError(
                f"{path}: teacher cache was made by a different teacher or transform "
                f"(cached vs requested: {diff}); use another --teacher-cache or delete it"
            )
        geom = (int(attrs["patch_size"]), int(attrs["patch_level"]))
        if geom != (patch_size, patch_level):
            raise TeacherCacheError(
                f"{path}: stale teacher cache: made for patch_size/level {geom}, the coords now "
                f"say {(patch_size, patch_level)}; delete it or use another --teacher-cache"
            )

    def read_index(self, slide_id: str, patch_size: int, patch_level: int) -> np.ndarray:
        """Cached coords (N, 2) of a slide (empty when there is no file), after validation."""
        path = self.path(slide_id)
        if not path.is_file():
            return np.zeros((0, 2), dtype=np.int64)
        try:
            with h5py.File(path, "r") as f:
                self._check_attrs(path, dict(f.attrs), patch_size, patch_level)
                coords = np.asarray(f["coords"][:], dtype=np.int64)
                n_feat = f["features"].shape[0]
        except (OSError, KeyError) as err:
            raise TeacherCacheError(f"{path}: unreadable teacher cache file ({err})") from err
        if n_feat != len(coords):
            raise TeacherCacheError(f"{path}: {len(coords)} coords but {n_feat} feature rows")
        return coords

    def merge(
        self,
        slide_id: str,
        coords: np.ndarray,
        features: np.ndarray,
        patch_size: int,
        patch_level: int,
    ) -> None:
        """Add rows to a slide's file (rewritten atomically: a killed run leaves the old one)."""
        old_coords = self.read_index(slide_id, patch_size, patch_level)
        old_feats = None
        if len(old_coords):
            with h5py.File(self.path(slide_id), "r") as f:
                old_feats = np.asarray(f["features"][:])
        all_coords = np.concatenate([old_coords, np.asarray(coords, dtype=np.int64)])
        all_feats = (
            features
            if old_feats is None
            else np.concatenate([old_feats, features.astype(old_feats.dtype)])
        )
        with atomic_path(self.path(slide_id)) as tmp:
            with h5py.File(tmp, "w") as f:
                f.create_dataset("coords", data=all_coords)
                f.create_dataset("features", data=np.asarray(all_feats, dtype=np.float32))
                f.attrs["format"] = CACHE_FORMAT
                f.attrs["patch_size"] = int(patch_size)
                f.attrs["patch_level"] = int(patch_level)
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
) -> dict[str, int]:
    """Compute the teacher features missing from the cache; the teacher is built only if needed."""
    from ..slides import open_slide
    from .windows import read_window

    teacher = None
    stats = {"patches_cached": 0, "patches_computed": 0}
    todo: list[tuple[int, list[int], set]] = []
    for s, windows in needed.items():
        sw = slides[s]
        have = {tuple(c) for c in cache.read_index(sw.slide_id, sw.patch_size, sw.patch_level)}
        missing_windows, missing = [], set()
        for w in windows:
            cells = {tuple(int(v) for v in c) for c in sw.patch_coords(w, grid)}
            new = cells - have - missing
            stats["patches_cached"] += len(cells & have)
            if new:
                missing_windows.append(w)
                missing |= new
        if missing_windows:
            todo.append((s, missing_windows, missing))
    total = sum(len(ws) for _, ws, _ in todo)
    bar = progress(
        total=total,
        desc="teacher features",
        unit="win",
        **({} if show_progress else {"disable": True}),
    )
    for s, windows, missing in todo:
        sw = slides[s]
        if teacher is None:
            teacher = make_teacher()
        coords_out, feats_out = [], []
        seen: set = set()
        with open_slide(sw.slide_path) as slide:
            buf_c, buf_p = [], []
            for w in windows:
                patches = read_window(slide, sw, w, grid)
                for c, p in zip(sw.patch_coords(w, grid), patches):
                    key = (int(c[0]), int(c[1]))
                    if key in missing and key not in seen:
                        seen.add(key)
                        buf_c.append(key)
                        buf_p.append(p)
                bar.update(1)
                if len(buf_p) >= batch_size:
                    feats_out.append(encode_patches(teacher, np.stack(buf_p), batch_size, device))
                    coords_out += buf_c
                    buf_c, buf_p = [], []
            if buf_p:
                feats_out.append(encode_patches(teacher, np.stack(buf_p), batch_size, device))
                coords_out += buf_c
        cache.merge(
            sw.slide_id,
            np.asarray(coords_out),
            np.concatenate(feats_out),
            sw.patch_size,
            sw.patch_level,
        )
        stats["patches_computed"] += len(coords_out)
    bar.close()
    stats["teacher_built"] = int(teacher is not None)
    return stats


class CacheReader:
    """Looks teacher features up by level-0 coords; h5 files opened lazily (one per worker)."""

    def __init__(self, cache: TeacherCache, slides: list, slide_indices: Iterable[int]):
        self.cache = cache
        self.paths: dict[int, str] = {}
        self.rows: dict[int, dict[tuple[int, int], int]] = {}
        for s in slide_indices:
            sw = slides[s]
            coords = cache.read_index(sw.slide_id, sw.patch_size, sw.patch_level)
            self.paths[s] = str(cache.path(sw.slide_id))
            self.rows[s] = {(int(x), int(y)): i for i, (x, y) in enumerate(coords)}
        self._files: dict[int, h5py.File] = {}

    def features(self, s: int, coords: np.ndarray) -> np.ndarray:
        try:
            rows = np.asarray([self.rows[s][(int(x), int(y))] for x, y in coords])
        except KeyError as err:
            raise TeacherCacheError(
                f"{self.paths.get(s)}: no cached teacher feature for patch {err.args[0]}"
            ) from err
        if s not in self._files:
            self._files[s] = h5py.File(self.paths[s], "r")
        order = np.argsort(rows)
        uniq, inverse = np.unique(rows[order], return_inverse=True)
        block = self._files[s]["features"][uniq]
        out = np.empty((len(rows), block.shape[1]), dtype=np.float32)
        out[order] = block[inverse]
        return out

    def all_features(self, s: int) -> np.ndarray:
        with h5py.File(self.paths[s], "r") as f:
            return np.asarray(f["features"][:], dtype=np.float32)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_files"] = {}
        return state

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()


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
