"""``clam-mcmkd doctor``: what this machine has and how fast each stage runs on it."""

from __future__ import annotations

import click

from .options import option


@click.command("doctor")
@option("--device", default="auto", show_default=True,
        help="Device to probe: auto, cpu, cuda, cuda:1 ...")  # fmt: skip
@option("--json", "as_json", is_flag=True, help="Print the report as JSON instead of a table.")
@option("--quick", is_flag=True, help="The smallest probes (seconds on a CPU).")
@option("--seconds", default=None, type=float,
        help="Seconds per throughput probe [default: 4 on a GPU, 2 on a CPU].")  # fmt: skip
def doctor_cmd(device: str, as_json: bool, quick: bool, seconds: float | None) -> None:
    """Versions (torch, CUDA, cuDNN, NCCL, timm, tiatoolbox, OpenSlide), GPUs and bf16, then
    throughput probes on a generated slide: loader, model, extraction end to end, teacher,
    fine-tune step, and with >= 2 GPUs a 2-rank NCCL all-reduce and fine-tune step.

    Expected figures for one H100 are in docs/gpu.md. Rows a machine cannot run are listed as
    skipped, with the reason.
    """
    from ..doctor import run_doctor

    report = run_doctor(device, quick=quick, seconds=seconds)
    click.echo(report.to_json() if as_json else report.table())


COMMANDS = (doctor_cmd,)
