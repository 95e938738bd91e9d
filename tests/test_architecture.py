"""The package's shape: size limits, what each part may import, and a CLI that starts at once.

These read the source (ast) or run a fresh interpreter; each rule names the offender when broken.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "clam_mcmkd"
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 100
HEAVY = ("torch", "timm", "tiatoolbox")

# What each part of the package may import from the rest of it (docs/architecture.md).
# A part is a subpackage or a top-level module; importing from within the same part is free.
STAGES = {
    "slides",
    "tissue",
    "tiling",
    "patch_loader",
    "patch_pipeline",
    "features",
    "splits",
    "cohort",
    "heatmap",
}
STAGES |= {"cohort_fields", "synthetic_tiff"}
CORE = {"utils", "ranges", "jobs", "distributed", "clam", "encoders"}
ALLOWED = {
    "__init__": {"utils"},
    "utils": set(),
    "ranges": set(),
    "distributed": {"utils"},
    "jobs": {"utils"},
    "encoders": {"utils"},
    "clam": {"utils", "encoders"},
    "clam_compat": {"clam"},
    "slides": {"utils", "clam"},
    "tissue": {"utils"},
    "patch_loader": {"utils", "clam", "slides"},
    "patch_pipeline": {"utils", "clam", "encoders", "slides", "patch_loader"},
    "tiling": {"utils", "jobs", "clam", "slides", "tissue"},
    "cohort": {"utils", "clam", "cohort_fields", "synthetic_tiff"},
    "cohort_fields": {"utils", "slides", "cohort", "synthetic_tiff"},
    "synthetic_tiff": {"utils"},
    "splits": {"utils", "clam"},
    "features": {"utils", "jobs", "distributed", "clam", "encoders", "patch_pipeline", "slides"},
    "heatmap": {"utils", "jobs", "clam", "encoders", "slides", "splits", "mil"},
    "mcmkd": CORE | {"slides", "patch_loader", "patch_pipeline"},
    "mil": {"utils", "ranges", "clam", "encoders", "splits"},
    "doctor": CORE | STAGES | {"mcmkd"},
    "benchmark": CORE | STAGES | {"mcmkd", "mil"},
    "cli": CORE | STAGES | {"mcmkd", "mil", "benchmark", "doctor", "__init__"},
}


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _part(module: str) -> str:
    """'clam_mcmkd.mcmkd.steps' -> 'mcmkd'; 'clam_mcmkd' -> '__init__'."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _submodule_or_package(package: str, name: str) -> str:
    base = REPO.joinpath(*package.split("."), name)
    return f"{package}.{name}" if base.is_dir() or base.with_suffix(".py").is_file() else package


def _imports(path: Path) -> set[str]:
    """Absolute names of the clam_mcmkd modules `path` imports (anywhere in the file)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            targets = [target]
            if not node.module:  # `from . import x`: x is a module of the package, or a name
                targets = [_submodule_or_package(target, alias.name) for alias in node.names]
            found.update(t for t in targets if t.split(".")[0] == "clam_mcmkd")
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "clam_mcmkd")
    return found


def test_no_module_over_500_lines():
    long = {
        str(p.relative_to(REPO)): n
        for p in _modules()
        if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert not long, f"modules over {MAX_MODULE_LINES} lines: {long}"


def test_no_function_over_100_lines():
    long = {}
    for path in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                first = min([node.lineno] + [d.lineno for d in node.decorator_list])
                n = node.end_lineno - first + 1
                if n > MAX_FUNCTION_LINES:
                    long[f"{path.relative_to(REPO)}:{node.lineno} {node.name}"] = n
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines (decorators included): {long}"


def test_every_part_imports_only_what_it_may():
    wrong = []
    for path in _modules():
        part = _part(_module_name(path))
        assert part in ALLOWED, f"{path}: a new part of the package; add it to ALLOWED and docs"
        for target in _imports(path):
            dep = _part(target)
            if dep != part and dep not in ALLOWED[part]:
                wrong.append(f"{path.relative_to(REPO)} imports {target}")
    assert not wrong, "imports across the architecture's rules:\n" + "\n".join(wrong)


def test_checkpoints_are_loaded_in_one_place():
    """torch.load: the checkpoint loader, and CLAM's .pt feature files in the formats module."""
    allowed = {PACKAGE / "encoders" / "checkpoint.py", PACKAGE / "clam" / "formats.py"}
    users = {p for p in _modules() if "torch.load(" in p.read_text()}
    assert users <= allowed, f"torch.load outside the loader: {sorted(map(str, users - allowed))}"


_LIGHT_IMPORTS = """
import sys
from click.testing import CliRunner
import clam_mcmkd, clam_mcmkd.cli, clam_mcmkd.encoders, clam_mcmkd.mcmkd, clam_mcmkd.mil
from clam_mcmkd.cli import main
runner = CliRunner()
assert runner.invoke(main, ["--help"]).exit_code == 0
for name in main.commands:
    result = runner.invoke(main, [name, "--help"])
    assert result.exit_code == 0, (name, result.output)
heavy = sorted({m.split(".")[0] for m in sys.modules} & set(sys.argv[1:]))
print(",".join(heavy))
"""


@pytest.mark.parametrize("entry", ["help"])
def test_cli_help_imports_no_torch_timm_or_tiatoolbox(entry):
    proc = subprocess.run(
        [sys.executable, "-c", _LIGHT_IMPORTS, *HEAVY],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "", f"`clam-mcmkd --help` imported {proc.stdout.strip()}"


def test_lazy_package_exports_resolve():
    """The names each package ``__init__`` exports lazily exist where it says."""
    import importlib

    for package in ("clam_mcmkd", "clam_mcmkd.encoders", "clam_mcmkd.mcmkd", "clam_mcmkd.mil"):
        module = importlib.import_module(package)
        missing = [n for n in module.__all__ if n != "__version__" and not hasattr(module, n)]
        assert not missing, f"{package} exports missing names {missing}"
