"""The ``clam-mcmkd`` command line: commands only; each parses options and calls its stage.

One module per command group (:mod:`.data`, :mod:`.extract`, :mod:`.finetune`, :mod:`.mil`,
:mod:`.clam`, :mod:`.bench`, :mod:`.doctor`); option defaults come from the stages' config
dataclasses (:mod:`.options`). torch, timm and tiatoolbox are imported inside the commands that need them,
so ``--help`` answers at once. Every dashed option also accepts CLAM's underscore spelling
(``--data-h5-dir`` and ``--data_h5_dir``).
"""

from __future__ import annotations

import logging

import click

from .. import __version__
from ..utils import ClamMcmkdError
from . import bench, clam, data, doctor, extract, finetune, mil


class _Group(click.Group):
    """Turns user-fixable errors into one clear line instead of a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except ClamMcmkdError as err:
            raise click.ClickException(str(err)) from err
        except click.BadParameter as err:  # a value out of range, an output that cannot be
            if err.param is not None and err.param.opts:  # made: one line, no usage text
                err.param_hint = f"'{err.param.opts[0]}'"
            raise click.UsageError(err.format_message()) from err


@click.group(
    cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100}
)
@click.version_option(__version__, prog_name="clam-mcmkd")
@click.option("-v", "--verbose", count=True, help="More logging (-vv for debug).")
def main(verbose: int) -> None:
    """MCM-KD fine-tuning of patch encoders for CLAM, and the CLAM pipeline around it.

    \b
    Typical run:
      clam-mcmkd tile --source SLIDES --save-dir OUT
      clam-mcmkd finetune --data-h5-dir OUT --data-slide-dir SLIDES --csv-path data.csv \\
          --teacher vit_large_patch16_224 --out mcmkd_resnet50.pt
      clam-mcmkd extract-features --data-h5-dir OUT --data-slide-dir SLIDES --csv-path data.csv \\
          --feat-dir FEATS --model mcmkd_resnet50 --ckpt mcmkd_resnet50.pt
      clam-mcmkd splits --csv-path data.csv --split-dir SPLITS --k 10
      clam-mcmkd train --data-root-dir FEATS --csv-path data.csv --split-dir SPLITS \\
          --results-dir RESULTS --exp-code mcmkd
    """
    level = logging.WARNING - 10 * verbose
    logging.basicConfig(
        level=max(level, logging.DEBUG), format="%(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("clam_mcmkd").setLevel(
        max(logging.INFO - 10 * max(verbose - 1, 0), logging.DEBUG)
    )


for _group in (data, extract, finetune, mil, clam, bench, doctor):
    for _command in _group.COMMANDS:
        main.add_command(_command)


def run() -> None:  # pragma: no cover - console entry alias
    main(prog_name="clam-mcmkd")
