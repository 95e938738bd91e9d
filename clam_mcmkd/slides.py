"""One small interface for reading slides: OpenSlide first, tiatoolbox for what it cannot open.

Every stage reads pixels through :func:`open_slide`, so a format fix lands everywhere at once.
Regions come back as RGB ``uint8`` arrays (H, W, 3), read at a pyramid level with the location
in level-0 pixels, which is the convention of OpenSlide and of CLAM's coords files.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .utils import ClamMcmkdError


class SlideError(ClamMcmkdError):
    """A slide that cannot be opened or read; the message names the file."""

    def __init__(self, path: str | os.PathLike, problem: str):
        self.path = str(path)
        super().__init__(f"{path}: {problem}")


class Slide:
    """A whole-slide image opened once and read many times."""

    backend = "base"

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.level_dimensions: list[tuple[int, int]] = []
        self.level_downsamples: list[float] = []
        self.mpp: float | None = None
        self.objective_power: float | None = None

    # -- geometry
    @property
    def dimensions(self) -> tuple[int, int]:
        return self.level_dimensions[0]

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    # -- pixels
    def read_region(
        self, location: tuple[int, int], level: int, size: tuple[int, int]
    ) -> np.ndarray:
        raise NotImplementedError

    def get_thumbnail(self, max_size: int) -> np.ndarray:
        """RGB thumbnail whose longer side is at most `max_size`."""
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.path.name!r}, dims={self.dimensions}, "
            f"levels={self.level_count}, mpp={self.mpp}, mag={self.objective_power})"
        )


class OpenSlideSlide(Slide):
    backend = "openslide"

    def __init__(self, path: str | os.PathLike):
        super().__init__(path)
        import openslide

        try:
            self._osr = openslide.OpenSlide(str(path))
        except (openslide.OpenSlideError, OSError) as err:
            raise SlideError(path, f"OpenSlide cannot open it ({err})") from err
        self.level_dimensions = [tuple(map(int, d)) for d in self._osr.level_dimensions]
        self.level_downsamples = [float(d) for d in self._osr.level_downsamples]
        props = self._osr.properties
        self.properties = dict(props)
        self.mpp = _mpp_from_properties(props)
        power = props.get("openslide.objective-power")
        self.objective_power = float(power) if power not in (None, "") else None

    def read_region(self, location, level, size):
        try:
            region = self._osr.read_region(
                (int(location[0]), int(location[1])), int(level), tuple(map(int, size))
            )
        except Exception as err:  # noqa: BLE001 - openslide raises OpenSlideError on corrupt tiles
            raise SlideError(
                self.path, f"cannot read region {location} at level {level} ({err})"
            ) from err
        return np.asarray(region.convert("RGB"))

    def get_thumbnail(self, max_size):
        return np.asarray(self._osr.get_thumbnail((max_size, max_size)).convert("RGB"))

    def close(self):
        self._osr.close()


class TiatoolboxSlide(Slide):
    """Fallback for formats OpenSlide does not open (plain images, some DICOM, OME-TIFF...)."""

    backend = "tiatoolbox"

    def __init__(self, path: str | os.PathLike):
        super().__init__(path)
        from tiatoolbox.wsicore.wsireader import WSIReader

        try:
            self._reader = WSIReader.open(str(path))
            info = self._reader.info
        except Exception as err:  # noqa: BLE001
            raise SlideError(path, f"not a readable slide ({type(err).__name__}: {err})") from err
        self.level_dimensions = [tuple(map(int, d)) for d in info.level_dimensions]
        self.level_downsamples = [float(d) for d in info.level_downsamples]
        mpp = info.mpp
        self.mpp = float(np.mean(mpp)) if mpp is not None else None
        self.objective_power = float(info.objective_power) if info.objective_power else None

    def read_region(self, location, level, size):
        try:
            region = self._reader.read_region(
                location=(int(location[0]), int(location[1])),
                level=int(level),
                size=tuple(map(int, size)),
            )
        except Exception as err:  # noqa: BLE001
            raise SlideError(
                self.path, f"cannot read region {location} at level {level} ({err})"
            ) from err
        return np.ascontiguousarray(np.asarray(region)[..., :3])

    def get_thumbnail(self, max_size):
        w, h = self.dimensions
        scale = min(1.0, max_size / max(w, h))  # tiatoolbox "baseline" units: 1.0 = level 0
        thumb = self._reader.slide_thumbnail(resolution=scale, units="baseline")
        return np.ascontiguousarray(np.asarray(thumb)[..., :3])


def _mpp_from_properties(props) -> float | None:
    for key in ("openslide.mpp-x", "aperio.MPP"):
        value = props.get(key)
        if value not in (None, ""):
            try:
                return float(value)
            except ValueError:
                pass
    res, unit = props.get("tiff.XResolution"), props.get("tiff.ResolutionUnit")
    if res and unit:
        try:
            per_unit = float(res)
        except ValueError:
            return None
        microns = {"centimeter": 1e4, "inch": 25400.0, "millimeter": 1e3}.get(str(unit).lower())
        if microns and per_unit > 0:
            return microns / per_unit
    return None


def open_slide(path: str | os.PathLike) -> Slide:
    """Open a slide with OpenSlide, else tiatoolbox; a file neither can read is a SlideError."""
    path = Path(path)
    if not path.exists():
        if path.is_symlink():
            raise SlideError(path, f"broken symbolic link (to {os.readlink(path)})")
        raise SlideError(path, "slide file does not exist")
    try:
        return OpenSlideSlide(path)
    except SlideError as first:
        try:
            return TiatoolboxSlide(path)
        except SlideError:
            raise first from None


def find_slide(slide_dir: str | os.PathLike, slide_id: str, slide_ext: str | None = None) -> Path:
    """``<dir>/<id><ext>``; without `slide_ext` the one ``<id>.<slide extension>`` there.

    A missing file names what the directory does hold, so a wrong or default ``--slide-ext``
    reads as such ("no a.svs in DIR; it has *.tif slides"), not as a later, stranger error.
    """
    from .clam.formats import SLIDE_EXTENSIONS

    slide_dir = Path(slide_dir)
    if slide_ext:
        path = slide_dir / f"{slide_id}{slide_ext}"
        if path.is_file():
            return path
        exts = sorted({p.suffix.lower() for p in slide_dir.glob("*")
                       if p.suffix.lower() in SLIDE_EXTENSIONS and p.is_file()})  # fmt: skip
        found = f"; {slide_dir} has {', '.join('*' + e for e in exts)} slides" if exts else ""
        hint = " (pass that --slide-ext, or leave it out to detect it)" if exts else ""
        raise SlideError(path, f"slide file does not exist{found}{hint}")
    found = [
        p for p in sorted(slide_dir.glob(f"{slide_id}.*"))
        if p.name[len(slide_id):].lower() in SLIDE_EXTENSIONS and p.is_file()
    ]  # fmt: skip
    if len(found) != 1:
        what = "no slide" if not found else f"{len(found)} slides ({[p.name for p in found]})"
        raise SlideError(slide_dir, f"{what} named {slide_id}.<ext>; pass --slide-ext")
    return found[0]


def count_outside(coords: np.ndarray, size: int, dimensions: tuple[int, int]) -> int:
    """How many (x, y) level-0 patch corners put a `size` square (partly) outside the slide;
    such patches read as black, which no encoder should silently see."""
    xy = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
    w, h = dimensions
    outside = (xy < 0).any(axis=1) | (xy[:, 0] + size > w) | (xy[:, 1] + size > h)
    return int(outside.sum())
