"""`doctor` on this machine: versions, GPUs (or why none), and every CPU probe with a rate."""

from __future__ import annotations

import json
import math
import tempfile

import torch
from click.testing import CliRunner

from clam_mcmkd.cli import main
from clam_mcmkd.doctor import DoctorReport, ProbeSizes, Row, probe_finetune_ranks, shm_check


def test_doctor_runs_the_cpu_half_and_says_what_it_skipped(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the probe slide is made
    result = CliRunner().invoke(
        main, ["doctor", "--device", "cpu", "--quick", "--seconds", "0.2", "--json"]
    )
    assert result.exit_code == 0, result.output
    rows = {(r["section"], r["name"]): r for r in json.loads(result.output)["rows"]}
    assert rows[("version", "torch")]["value"] == torch.__version__.split("+")[0]
    assert rows[("version", "libopenslide")]["value"]
    if not torch.cuda.is_available():
        assert "torch.cuda.is_available() is False" in rows[("gpu", "none")]["note"]
    shm = rows[("system", "/dev/shm")]  # issue 19: shared memory against the loaders' needs
    need = rows[("system", "/dev/shm needed")]["value"]
    assert shm["unit"] == "GiB" and need > 0 and "prefetch 2" in shm["note"]
    assert shm["note"].startswith("ok: " if shm["value"] is None or shm["value"] >= need else "")
    probes = [r for r in rows.values() if r["section"] == "probe"]
    names = [r["name"] for r in probes]
    for expected in (
        "loader",
        "model",
        "extraction",
        "teacher fill",
        "fine-tune step",
        "all-reduce",
    ):
        assert any(n.startswith(expected) or expected in n for n in names), (expected, names)
    for r in probes:
        assert isinstance(r["value"], float) and math.isfinite(r["value"]) and r["value"] > 0, r
        assert r["unit"] and r["note"]
    skipped = {r["name"]: r["note"] for r in rows.values() if r["section"] == "skipped"}
    assert "needs >= 2 GPUs" in skipped["2-rank NCCL all-reduce"]
    assert skipped["2-rank fine-tune step"]
    # the probe slide is cleaned up (torch 2.12 leaves its own inductor cache dir there)
    assert [p for p in tmp_path.iterdir() if not p.name.startswith("torchinductor")] == []
    report = DoctorReport([Row(**r) for r in json.loads(result.output)["rows"]])
    table = report.table()
    assert (
        all(r.name in table for r in report.rows)
        and len(table.splitlines()) == len(report.rows) + 1
    )
    again = json.loads(report.to_json())
    assert [r["name"] for r in again["rows"]] == [r.name for r in report.rows]


def test_shm_too_small_for_the_loaders_says_what_to_do():
    """Docker's default 64 MB /dev/shm cannot hold one fine-tune micro-batch (~100 MB): the
    note names --shm-size, --ipc=host and fewer workers; 8 GiB is enough for 7 workers."""
    ok, need, note = shm_check(64 * 2**20, workers=3)
    assert not ok and need > 0.5
    assert "--shm-size" in note and "--ipc=host" in note and "--num-workers" in note
    ok, need, note = shm_check(8 * 2**30, workers=7)
    assert ok and need < 8 and "Bus error" not in note


def test_two_rank_finetune_probe_runs_the_trainer_step_on_gloo():
    """The probe doctor runs on 2 GPUs (NCCL, spawned ranks), here on 2 forked gloo ranks:
    the trainer's own step, each rank half the windows, gradients summed across them."""
    sizes = ProbeSizes.for_device("cpu", quick=True)
    rate = probe_finetune_ranks("cpu", sizes)
    assert math.isfinite(rate) and rate > 0
