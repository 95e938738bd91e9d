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
