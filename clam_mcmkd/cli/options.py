"""Option helpers shared by the commands: CLAM's underscore spellings, defaults from configs,
and what every numeric option may be and every output may point at, checked as the command
line is parsed (before a command reads or writes anything)."""

from __future__ import annotations

import click

from ..utils import ClamMcmkdError, check_output_path, field_default

_INT = {int, click.INT}
_FLOAT = {float, click.FLOAT}


def _at_least(n: int) -> click.IntRange:
    return click.IntRange(min=n)


def _fraction(open_low: bool = False, open_high: bool = False) -> click.FloatRange:
    return click.FloatRange(0.0, 1.0, min_open=open_low, max_open=open_high)


_POSITIVE = click.FloatRange(min=0.0, min_open=True)
_NON_NEGATIVE = click.FloatRange(min=0.0)

# The range of every numeric option, by its name, whichever command has it: an option's type is
# made from here, so a value out of range is one line naming it, before any work.
RANGES: dict[str, click.ParamType] = {
    # counts and sizes
    **dict.fromkeys(
        (
            "batch_size",
            "B",
            "epochs",
            "max_epochs",
            "grad_accum",
            "max_windows",
            "save_every",
            "stop_after_steps",
            "teacher_batch_size",
            "predictor_width",
            "predictor_depth",
            "predictor_heads",
            "n_slides",
            "test_per_class",
            "k",
            "step_size",
        ),
        _at_least(1),
    ),  # fmt: skip
    **dict.fromkeys(("num_workers", "max_val_windows", "fold"), _at_least(0)),
    **dict.fromkeys(("k_start", "k_end"), _at_least(-1)),  # -1: from the first / to the last
    **dict.fromkeys(
        ("input_size", "teacher_input_size", "target_patch_size", "patch_size"), _at_least(16)
    ),  # fmt: skip
    "grid": _at_least(2),
    "size": _at_least(512),
    "thumb_max_size": _at_least(64),
    # rates, weights and fractions
    **dict.fromkeys(("lr", "mpp", "mag", "seconds"), _POSITIVE),
    **dict.fromkeys(
        ("visible_weight", "student_lr_mult", "weight_decay", "grad_clip", "reg"), _NON_NEGATIVE
    ),  # fmt: skip
    **dict.fromkeys(
        (
            "warmup_frac",
            "min_lr_ratio",
            "positive_frac",
            "tumor_contrast",
            "contrast",
            "min_tissue",
            "alpha",
            "bag_weight",
        ),
        _fraction(),
    ),  # fmt: skip
    **dict.fromkeys(("val_frac", "test_frac", "drop_out"), _fraction(open_high=True)),
    **dict.fromkeys(("tumor_frac", "label_frac"), _fraction(open_low=True)),
    "mask_ratio": _fraction(open_low=True, open_high=True),
    # student probes (finetune)
    "probe_alpha": _POSITIVE,
    "val_at_steps": _at_least(1),
    # MHIM-MIL (train): as mil.mhim.check_mhim_config
    **dict.fromkeys(
        ("mhim_mask_ratio", "mhim_mask_ratio_l", "mhim_mask_ratio_h"), _fraction(open_high=True)
    ),  # fmt: skip
    "mhim_mask_ratio_hr": _fraction(open_low=True),
    "mhim_momentum": _fraction(),
    "mhim_cl_alpha": _NON_NEGATIVE,
    **dict.fromkeys(("mhim_temp_t", "mhim_temp_s"), _POSITIVE),
}
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
