"""Option helpers shared by the commands: CLAM's underscore spellings, defaults from configs."""

from __future__ import annotations

import click

from ..utils import field_default


def option(*names: str, **kwargs):
    """click.option that also accepts the underscore spelling of each ``--long-name``."""
    aliases = []
    for name in names:
        if name.startswith("--") and "-" in name[2:] and "/" not in name:
            aliases.append("--" + name[2:].replace("-", "_"))
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
