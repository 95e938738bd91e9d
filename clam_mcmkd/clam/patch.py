"""Apply, check and revert the unified diffs in ``patches/`` on a CLAM checkout.

Pure Python (no git, no ``patch``), so it works wherever ``pip install clam-mcmkd`` does.
A hunk applies only where its context matches exactly (at its line number, or shifted when the
user's CLAM has lines added elsewhere); nothing fuzzy. All files are rewritten or none: new
contents are computed in memory, staged next to their targets and renamed into place together.
"""

from __future__ import annotations

import os
import re
import shutil
import site
import sys
import sysconfig
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..utils import ClamMcmkdError

PATCHES_DIR_ENV = "CLAM_MCMKD_PATCHES_DIR"
# Files every CLAM checkout has; their absence means the directory is not CLAM.
CLAM_MARKERS = ("main.py", "models/builder.py", "extract_features_fp.py")

APPLIED, APPLIES, CONFLICT = "applied", "applies", "conflict"

_HUNK_HEADER = re.compile(r"^@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@")
_NO_NEWLINE = "\\ No newline at end of file"


class PatchError(ClamMcmkdError):
    pass


# ----------------------------------------------------------------------------- parsing


@dataclass(frozen=True)
class Hunk:
    old_start: int
    old_len: int
    new_start: int
    new_len: int
    lines: tuple[tuple[str, str], ...]  # (" " | "-" | "+", text including its line ending)

    @property
    def header(self) -> str:
        return f"@@ -{self.old_start},{self.old_len} +{self.new_start},{self.new_len} @@"

    def image(self, new: bool) -> list[str]:
        """The lines the hunk expects (pre-image) or leaves (post-image)."""
        skip = "-" if new else "+"
        return [text for tag, text in self.lines if tag != skip]


@dataclass(frozen=True)
class FilePatch:
    path: str  # relative to the CLAM root, forward slashes
    hunks: tuple[Hunk, ...]


@dataclass(frozen=True)
class Patch:
    name: str
    description: str
    files: tuple[FilePatch, ...]

    @property
    def paths(self) -> list[str]:
        return [f.path for f in self.files]


def _strip_prefix(header_path: str) -> str:
    path = header_path.split("\t")[0].strip()
    if path.startswith(("a/", "b/")):
        path = path[2:]
    return path


def _is_file_header(lines: list[str], i: int) -> bool:
    return lines[i].startswith("--- ") and i + 1 < len(lines) and lines[i + 1].startswith("+++ ")


def parse_patch(text: str, name: str = "<patch>") -> Patch:
    """Parse a (git-style) unified diff; text before the first file header is its description."""
    lines = text.splitlines(keepends=True)
    files: list[FilePatch] = []
    description: list[str] = []
    i = 0

    def fail(msg: str) -> PatchError:
        return PatchError(f"{name}: line {i + 1}: {msg}")

    while i < len(lines):
        line = lines[i]
        if not _is_file_header(lines, i):
            if not files and not line.startswith(("diff --git", "index ")):
                description.append(line)
            i += 1
            continue
        old_path, new_path = _strip_prefix(line[4:]), _strip_prefix(lines[i + 1][4:])
        if "/dev/null" in (old_path, new_path) or old_path != new_path:
            raise fail("only in-place edits are supported (no created, deleted or renamed files)")
        if Path(new_path).is_absolute() or ".." in Path(new_path).parts:
            raise fail(f"path {new_path!r} leaves the CLAM directory")
        i += 2
        hunks: list[Hunk] = []
        while i < len(lines) and lines[i].startswith("@@"):
            match = _HUNK_HEADER.match(lines[i])
            if not match:
                raise fail(f"malformed hunk header {lines[i].rstrip()!r}")
            o_start, o_len, n_start, n_len = (
                int(g) if g is not None else 1 for g in match.groups()
            )
            i += 1
            body: list[tuple[str, str]] = []
            o_left, n_left = o_len, n_len
            while o_left > 0 or n_left > 0:
                if i >= len(lines):
                    raise fail(f"hunk {o_start} ends early")
                raw = lines[i]
                tag, content = (" ", raw) if raw in ("\n", "\r\n") else (raw[0], raw[1:])
                if tag == "\\":
                    if not body:
                        raise fail("'\\ No newline' before any line")
                    body[-1] = (body[-1][0], body[-1][1].rstrip("\r\n"))
                    i += 1
                    continue
                if tag not in " -+":
                    raise fail(f"unexpected line in hunk: {raw.rstrip()!r}")
                if tag != "+":
                    o_left -= 1
                if tag != "-":
                    n_left -= 1
                if o_left < 0 or n_left < 0:
                    raise fail("hunk longer than its header says")
                body.append((tag, content))
                i += 1
            if i < len(lines) and lines[i].startswith(_NO_NEWLINE):
                body[-1] = (body[-1][0], body[-1][1].rstrip("\r\n"))
                i += 1
            if i < len(lines) and lines[i][:1] in " +-" and not _is_file_header(lines, i):
                raise fail("hunk longer than its header says")
            hunks.append(Hunk(o_start, o_len, n_start, n_len, tuple(body)))
        if not hunks:
            raise fail(f"no hunks for {new_path}")
        files.append(FilePatch(new_path, tuple(hunks)))
    if not files:
        raise PatchError(f"{name}: not a unified diff (no '--- a/...' / '+++ b/...' headers)")
    return Patch(name, "".join(description).strip(), tuple(files))


def default_patches_dir() -> Path:
    """Where the patches are: $CLAM_MCMKD_PATCHES_DIR, the source tree, or the installed copy."""
    candidates = []
    if os.environ.get(PATCHES_DIR_ENV):
        candidates.append(Path(os.environ[PATCHES_DIR_ENV]))
    source_root = Path(__file__).resolve().parents[2]
    if (source_root / "setup.cfg").is_file():  # a checkout or editable install, not site-packages
        candidates.append(source_root / "patches")
    # `pip install` puts setup.cfg's [options.data_files] under <data>/share/clam-mcmkd/patches.
    data_roots = [sys.prefix, site.USER_BASE or ""]
    data_roots += [sysconfig.get_path("data", scheme) for scheme in sysconfig.get_scheme_names()]
    candidates += [Path(root) / "share" / "clam-mcmkd" / "patches" for root in data_roots if root]
    for cand in candidates:
        if cand.is_dir() and any(cand.glob("*.patch")):
            return cand
    raise PatchError(
        f"cannot find the clam-mcmkd patches (looked in {', '.join(map(str, candidates))});"
        f" set {PATCHES_DIR_ENV}"
    )


def load_patches(patches_dir: str | os.PathLike | None = None) -> list[Patch]:
    """All ``*.patch`` files of the directory, in name order; no two may touch the same file."""
    directory = Path(patches_dir) if patches_dir is not None else default_patches_dir()
    paths = sorted(directory.glob("*.patch"))
    if not paths:
        raise PatchError(f"{directory}: no *.patch files")
    patches = [parse_patch(_read(p), p.name) for p in paths]
    owner: dict[str, str] = {}
    for patch in patches:
        for path in patch.paths:
            if path in owner:
                raise PatchError(f"{patch.name} and {owner[path]} both change {path}")
            owner[path] = patch.name
    return patches


# ----------------------------------------------------------------------------- applying


class _HunkMismatch(Exception):
    def __init__(self, index: int, hunk: Hunk):
        super().__init__(index)
        self.index, self.hunk = index, hunk


def apply_hunks(lines: Sequence[str], hunks: Iterable[Hunk], reverse: bool = False) -> list[str]:
    """Lines after the hunks (or before them, with ``reverse``); raises _HunkMismatch."""
    out: list[str] = []
    pos = 0  # first line of `lines` not yet copied
    offset = 0  # how far the previous hunk sat from its header's line number
    for index, hunk in enumerate(hunks):
        expect, result = hunk.image(new=reverse), hunk.image(new=not reverse)
        start = (hunk.new_start if reverse else hunk.old_start) - (1 if expect else 0)
        at = _find(lines, expect, start + offset, pos)
        if at is None:
            raise _HunkMismatch(index, hunk)
        out += lines[pos:at]
        out += result
        pos, offset = at + len(expect), at - start
    return out + list(lines[pos:])


def _find(lines: Sequence[str], block: list[str], near: int, lowest: int) -> int | None:
    """The start nearest to `near` (not before `lowest`) where `block` matches exactly."""
    last = len(lines) - len(block)
    for dist in range(max(near - lowest, last - near, 0) + 1):
        for at in (near - dist, near + dist) if dist else (near,):
            if lowest <= at <= last and list(lines[at : at + len(block)]) == block:
                return at
    return None


@dataclass
class PatchState:
    patch: Patch
    state: str  # APPLIED, APPLIES or CONFLICT
    detail: str = ""
    new_texts: dict[str, str] = field(default_factory=dict)  # path -> text after the action

    def line(self, action: str = "check") -> str:
        files = ", ".join(self.patch.paths)
        words = {
            ("check", APPLIED): "applied",
            ("check", APPLIES): "not applied, applies cleanly",
            ("apply", APPLIED): "already applied, unchanged",
            ("apply", APPLIES): "applied now",
            ("revert", APPLIED): "reverted",
            ("revert", APPLIES): "not applied, unchanged",
        }
        word = words.get((action, self.state), f"conflict: {self.detail}")
        return f"{self.patch.name}: {word} ({files})"


def ensure_clam_dir(clam_dir: str | os.PathLike) -> Path:
    root = Path(clam_dir)
    if not root.is_dir():
        raise PatchError(f"{root}: not a directory")
    missing = [m for m in CLAM_MARKERS if not (root / m).is_file()]
    if missing:
        raise PatchError(f"{root}: not a CLAM checkout (missing {', '.join(missing)})")
    return root


def patch_state(root: Path, patch: Patch, reverse: bool = False) -> PatchState:
    """Is the patch applied, applicable, or neither; with the texts that `reverse` or not gives."""
    states: dict[str, str] = {}
    texts: dict[str, dict[str, str]] = {APPLIED: {}, APPLIES: {}}
    for fp in patch.files:
        target = root / fp.path
        if not target.is_file():
            return PatchState(patch, CONFLICT, f"{fp.path} is missing")
        lines = _read(target).splitlines(keepends=True)
        try:
            texts[APPLIED][fp.path] = "".join(apply_hunks(lines, fp.hunks, reverse=True))
            states[fp.path] = APPLIED
            continue
        except _HunkMismatch:
            pass
        try:
            texts[APPLIES][fp.path] = "".join(apply_hunks(lines, fp.hunks))
            states[fp.path] = APPLIES
        except _HunkMismatch as err:
            changed = [t for tag, t in err.hunk.lines if tag == "-"] or err.hunk.image(new=False)
            first = next((t.strip() for t in changed if t.strip()), "")
            return PatchState(
                patch,
                CONFLICT,
                f"{fp.path} differs where hunk {err.index + 1} ({err.hunk.header}) goes,"
                f" near line {err.hunk.old_start}: {first!r}",
            )
    kinds = set(states.values())
    if len(kinds) > 1:
        done = [p for p, s in states.items() if s == APPLIED]
        return PatchState(patch, CONFLICT, f"partly applied (only {', '.join(done)})")
    state = kinds.pop()
    wanted = texts[APPLIED] if reverse else texts[APPLIES]
    return PatchState(patch, state, new_texts=wanted)


@dataclass
class PatchRun:
    action: str
    clam_dir: Path
    states: list[PatchState]
    changed: list[str]

    def lines(self) -> list[str]:
        out = [s.line(self.action) for s in self.states]
        n = len(self.states)
        if self.action == "check":
            counts = {k: sum(s.state == k for s in self.states) for k in (APPLIED, APPLIES)}
            out.append(
                f"{self.clam_dir}: {counts[APPLIED]}/{n} patches applied,"
                f" {counts[APPLIES]} apply cleanly"
            )
        elif not self.changed:
            verb = "has all" if self.action == "apply" else "has none of"
            out.append(f"{self.clam_dir} already {verb} the {n} patches: nothing changed")
        else:
            verb = "patched" if self.action == "apply" else "reverted"
            out.append(f"{self.clam_dir}: {verb} {len(self.changed)} files")
        return out


def installed_pandas() -> str | None:
    """The pandas version of this environment (read from its metadata: pandas is not imported)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("pandas")
    except PackageNotFoundError:
        return None


def pandas_warning(pandas_version: str | None) -> str | None:
    """One line when CLAM's ``main.py`` will fail here: under pandas >= 3 its
    ``dataset_generic.df_prep`` writes integer labels into a string column (TypeError: Invalid
    value '0' for dtype 'str'); None otherwise."""
    if not pandas_version or int(pandas_version.split(".")[0]) < 3:
        return None
    return (
        f"note: pandas {pandas_version} is installed: CLAM's main.py fails under pandas >= 3 "
        "(dataset_generic.py: TypeError: Invalid value '0' for dtype 'str'); in CLAM's "
        "environment `pip install 'pandas<3'`, or run pandas.set_option('future.infer_string', "
        "False) before CLAM reads its CSV (e.g. in a sitecustomize.py)"
    )


def patch_clam(
    clam_dir: str | os.PathLike,
    action: str = "apply",
    patches_dir: str | os.PathLike | None = None,
) -> PatchRun:
    """``apply``, ``check`` or ``revert`` the patches on a CLAM checkout; all files or none change."""
    if action not in ("apply", "check", "revert"):
        raise ValueError(f"unknown action {action!r}")
    root = ensure_clam_dir(clam_dir)
    patches = load_patches(patches_dir)
    states = [patch_state(root, p, reverse=action == "revert") for p in patches]
    conflicts = [s for s in states if s.state == CONFLICT]
    if action == "check":
        return PatchRun(action, root, states, [])
    if conflicts:
        raise PatchError(
            f"{root}: this CLAM differs from the one the patches were made for; nothing changed: "
            + "; ".join(f"{s.patch.name}: {s.detail}" for s in conflicts)
        )
    todo = APPLIES if action == "apply" else APPLIED
    new_texts = {
        path: text for s in states if s.state == todo for path, text in s.new_texts.items()
    }
    _write_all(root, new_texts)
    return PatchRun(action, root, states, sorted(new_texts))


# ----------------------------------------------------------------------------- files


def _read(path: Path) -> str:
    # newline="" keeps line endings as they are; surrogateescape keeps odd bytes round-trippable.
    with open(path, encoding="utf-8", errors="surrogateescape", newline="") as f:
        return f.read()


def _write_all(root: Path, new_texts: dict[str, str]) -> None:
    """Stage every file next to its target, then rename them all; undo the renames on failure."""
    staged: list[tuple[Path, Path]] = []
    originals: dict[Path, str] = {}
    try:
        for rel, text in new_texts.items():
            target = root / rel
            originals[target] = _read(target)
            fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
            with os.fdopen(fd, "w", encoding="utf-8", errors="surrogateescape", newline="") as f:
                f.write(text)
            shutil.copymode(target, tmp)
            staged.append((target, Path(tmp)))
        replaced: list[Path] = []
        try:
            for target, tmp in staged:
                os.replace(tmp, target)
                replaced.append(target)
        except BaseException:
            for target in replaced:
                with open(target, "w", encoding="utf-8", errors="surrogateescape", newline="") as f:
                    f.write(originals[target])
            raise
    finally:
        for _, tmp in staged:
            tmp.unlink(missing_ok=True)
