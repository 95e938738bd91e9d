"""Option helpers shared by the commands: CLAM's underscore spellings, defaults from configs,
and what every numeric option may be and every output may point at, checked as the command
line is parsed (before a command reads or writes anything)."""

from __future__ import annotations

import click

from ..ranges import RANGES as SETTING_RANGES
from ..ranges import Range
from ..utils import ClamMcmkdError, check_output_path, field_default

_INT = {int, click.INT}
_FLOAT = {float, click.FLOAT}


def _click_type(rng: Range) -> click.ParamType:
    if rng.integer:
        return click.IntRange(min=rng.low, max=rng.high, min_open=rng.low_open,
                              max_open=rng.high_open)  # fmt: skip
    return click.FloatRange(min=rng.low, max=rng.high, min_open=rng.low_open,
                            max_open=rng.high_open)  # fmt: skip


# The type of every numeric option, by its name, whichever command has it: made from the one
# table of ranges (clam_mcmkd.ranges, which config validation reads too), so a value out of
# range is one line naming it, before any work.
RANGES: dict[str, click.ParamType] = {name: _click_type(r) for name, r in SETTING_RANGES.items()}
UNBOUNDED = {"seed", "init_seed"}  # numeric options any value of which is fine


def _dest(names: tuple[str, ...]) -> str:
    """The parameter name click gives an option declared with `names`."""
    plain = [n for n in names if not n.startswith("-")]
    if plain:
        return plain[0]
    longest = max(names, key=len).lstrip("-").split("/")[0]
    return longest.replace("-", "_")


class OutputPath(click.ParamType):
    """An output folder (or file) that can be made: checked by the one helper every command
    uses (:func:`~clam_mcmkd.utils.check_output_path`), while the command line is parsed."""

    def __init__(self, folder: bool = True):
        self.folder = folder
        self.name = "folder" if folder else "file"

    def convert(self, value, param, ctx):
        try:
            check_output_path(value, folder=self.folder)
        except ClamMcmkdError as err:
            self.fail(str(err), param, ctx)
        return str(value)


OUTPUT_FOLDER = OutputPath(folder=True)
OUTPUT_FILE = OutputPath(folder=False)


def option(*names: str, **kwargs):
    """click.option that also accepts the underscore spelling of each ``--long-name``; a
    numeric option gets its type (range) from :data:`RANGES`."""
    aliases = []
    for name in names:
        if name.startswith("--") and "-" in name[2:] and "/" not in name:
            aliases.append("--" + name[2:].replace("-", "_"))
    kind = kwargs.get("type")
    if kind is None and not kwargs.get("is_flag"):
        default = kwargs.get("default")
        kind = type(default) if isinstance(default, (int, float)) else None
        kind = None if kind is bool else kind
    if kind in _INT | _FLOAT and _dest(names) in RANGES:
        kwargs["type"] = RANGES[_dest(names)]
    return click.option(*names, *aliases, **kwargs)


def config_option(cls: type, field: str, *names: str, **kwargs):
    """An option for `field` of config dataclass `cls`, with the field's default (shown in
    ``--help``) and, unless given, its type; the name defaults to ``--field-name``."""
    default = field_default(cls, field)
    if default is not None:
        kwargs.setdefault("show_default", True)
        if not isinstance(default, bool) and "type" not in kwargs:
            kwargs["type"] = type(default)
    return option(*(names or ("--" + field.replace("_", "-"),)), default=default, **kwargs)


def device_option(cls: type):
    return config_option(cls, "device", help="auto, cpu, cuda, cuda:1 ...")


def precision_option(cls: type):
    from ..encoders.forward import PRECISIONS

    return config_option(
        cls,
        "precision",
        type=click.Choice(PRECISIONS),
        help="Autocast: auto = bf16 on a GPU that has it (compute capability >= 8), else fp16 "
        "(inference) or fp32 (fine-tuning); float32 on the CPU unless bf16 is asked for.",
    )


def workers_option(cls: type, what: str):
    return config_option(cls, "num_workers", type=int,
                         help=f"{what}-reading processes [default: the cores this process may "
                         "use, less one; under torchrun the node's cores are shared]")  # fmt: skip


def shard_option(help: str):
    return option("--shard", default=None, metavar="I/N", help=help)


def dist_timeout_option(cls: type):
    return config_option(
        cls,
        "dist_timeout",
        help="Under torchrun: how long a rank waits for the others (seconds, or 90m, 2h, 1d).",
    )


def label_dict_option():
    return option(
        "--label-dict",
        default=None,
        help='Label -> class index as JSON, e.g. \'{"normal":0,"tumor":1}\'. Default: sorted labels.',
    )


def parse_embed_dim(ctx, param, value: str):
    """``--embed-dim``: an integer, or ``auto`` (the features' own width)."""
    if value == "auto":
        return value
    if not value.isdigit():
        raise click.BadParameter(
            f"expected an integer or 'auto', got {value!r}", param_hint="--embed-dim"
        )
    return int(value)


def stack(*decorators):
    """Several option decorators applied as one, in the order listed (top to bottom)."""

    def apply(func):
        for decorator in reversed(decorators):
            func = decorator(func)
        return func

    return apply
