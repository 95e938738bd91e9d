"""How long ``clam-mcmkd list-encoders --json`` takes in a fresh interpreter (issue 20: < 2 s).

Each command runs in a new process, as a user types it; the figure is the wall time to exit.
Measured in the same run: ``--help`` (the CLI's floor), and the registry path the command took
before issue 20 (``describe_encoders()``: imports torch and timm, builds the non-foundation
built-ins on the meta device) as the baseline; ``--before DIR`` also times the whole command
from an older source tree (e.g. ``git archive`` of the commit before).

    python benchmarks/bench_list_encoders.py [--repeats 5] [--before /path/to/old/tree]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
_REGISTRY_PATH = (
    "import json; from clam_mcmkd.encoders import describe_encoders; "
    "print(json.dumps(describe_encoders()))"
)


def _time(cmd: list[str], repeats: int, pythonpath: Path) -> list[float]:
    env = {**os.environ, "PYTHONPATH": str(pythonpath)}
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=pythonpath)
        times.append(time.perf_counter() - t0)
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--before", type=Path, default=None, help="an older source tree to time")
    args = ap.parse_args()
    cli = [sys.executable, "-m", "clam_mcmkd.cli"]
    cases = {
        "list-encoders --json": (cli + ["list-encoders", "--json"], REPO),
        "list-encoders": (cli + ["list-encoders"], REPO),
        "--help": (cli + ["--help"], REPO),
        "baseline: describe_encoders()": ([sys.executable, "-c", _REGISTRY_PATH], REPO),
    }
    if args.before is not None:
        cases["before: list-encoders --json"] = (cli + ["list-encoders", "--json"], args.before)
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, {args.repeats} fresh runs each")
    medians = {}
    for label, (cmd, path) in cases.items():
        times = _time(cmd, args.repeats, path)
        medians[label] = statistics.median(times)
        print(f"{label:32s} median {medians[label]:6.2f} s  (min {min(times):.2f}, "
              f"max {max(times):.2f})")  # fmt: skip
    new = medians["list-encoders --json"]
    for label in [k for k in medians if k.startswith(("baseline", "before"))]:
        print(f"{label} / list-encoders --json = {medians[label] / new:.1f}x")


if __name__ == "__main__":
    main()
