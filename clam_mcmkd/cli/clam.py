"""``clam-mcmkd patch-clam``: add MCM-KD to a CLAM checkout."""

from __future__ import annotations

import click

from .options import option


@click.command("patch-clam")
@click.argument("clam_dir")
@click.option("--check", "action", flag_value="check", help="Only report each patch's state.")
@click.option("--revert", "action", flag_value="revert", help="Remove the patches.")
@option("--patches-dir", default=None,
        help="Patch directory (default: the installed patches/, or $CLAM_MCMKD_PATCHES_DIR).")  # fmt: skip
def patch_clam_cmd(clam_dir: str, action: str | None, patches_dir: str | None) -> None:
    """Add MCM-KD to a CLAM checkout: the mcmkd_resnet50 encoder and the camelyon16/tcga_nsclc tasks.

    Idempotent: a second run changes nothing. Refuses a directory that is not CLAM, or a CLAM
    whose files differ where the patches go (then nothing is changed).
    """
    from ..clam.patch import CONFLICT, PatchError, installed_pandas, pandas_warning, patch_clam

    run = patch_clam(clam_dir, action or "apply", patches_dir)
    for line in run.lines():
        click.echo(line)
    warning = pandas_warning(installed_pandas())
    if warning and action != "revert":
        click.echo(warning, err=True)
    conflicts = [s for s in run.states if s.state == CONFLICT]
    if conflicts:
        raise PatchError(
            f"{len(conflicts)} of {len(run.states)} patches do not apply to {clam_dir}"
        )


COMMANDS = (patch_clam_cmd,)
