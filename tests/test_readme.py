"""The README's set-up commands are the ones CI runs and the CLI actually has."""

from __future__ import annotations

import re
from pathlib import Path

from click.testing import CliRunner

from clam_mcmkd.cli import main

REPO = Path(__file__).resolve().parents[1]


def _setup_commands() -> list[str]:
    readme = (REPO / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", readme, re.S).group(1)
    return [line for line in block.splitlines() if line and not line.startswith("#")]


def test_readme_opens_with_two_setup_commands_and_ci_runs_the_test_one():
    demo_cmd, test_cmd = _setup_commands()
    assert demo_cmd.endswith("clam-mcmkd demo --out demo_run")
    assert "pytest" in test_cmd
    ci_lines = (REPO / ".ci" / "run").read_text().splitlines()
    assert test_cmd in ci_lines, ".ci/run must run exactly the README's test command"


def test_every_command_named_in_readme_exists():
    readme = (REPO / "README.md").read_text()
    named = set(re.findall(r"clam-mcmkd ([a-z][a-z-]+)", readme))
    commands = set(main.commands)
    assert named <= commands, f"README names unknown commands: {named - commands}"
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    for name in named & commands:
        assert name in result.output


def test_a_clam_checkout_where_the_readme_puts_it_is_ignored_by_git_and_ruff(tmp_path):
    """README: `git clone .../CLAM && clam-mcmkd patch-clam CLAM` in the repository root. Its
    2000-odd lint findings must not fail `ruff check .`, nor its files show up in git."""
    import shutil
    import subprocess
    import sys

    assert "git clone https://github.com/mahmoodlab/CLAM" in (REPO / "README.md").read_text()
    assert "/CLAM/" in (REPO / ".gitignore").read_text().splitlines()
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    (tmp_path / "CLAM").mkdir()
    (tmp_path / "CLAM" / "bad.py").write_text("import os, sys\nx=1;y = ( 2 )\n")  # E401, F401...
    (tmp_path / "ours.py").write_text('"""Fine."""\n')
    ruff = [shutil.which("ruff")] if shutil.which("ruff") else [sys.executable, "-m", "ruff"]
    proc = subprocess.run([*ruff, "check", "."], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (tmp_path / "elsewhere").mkdir()  # the same file outside CLAM/ is reported: ruff does run
    shutil.copy(tmp_path / "CLAM" / "bad.py", tmp_path / "elsewhere" / "bad.py")
    proc = subprocess.run([*ruff, "check", "."], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode != 0 and "elsewhere/bad.py" in proc.stdout and "CLAM" not in proc.stdout
