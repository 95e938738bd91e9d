"""The range of every numeric setting, by its name, written once.

The CLI makes each numeric option's type from it (:mod:`.cli.options`, so a value out of range
is refused in one line while the command line is parsed), and config validation checks Python
callers against the same table (:func:`.mcmkd.config.validate_config`,
:func:`.mil.mhim.check_mhim_config`), so the two cannot
disagree. Imports nothing of the package.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Range:
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    integer: bool = False

    def __contains__(self, value) -> bool:
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        if self.high is not None:
            return value < self.high if self.high_open else value <= self.high
        return True

    def describe(self) -> str:
        """'>= 1', '> 0', 'in (0, 1)', 'in [0, 1)': the words of every refusal."""
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {_num(self.low)}"
        left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
        return f"in {left}{_num(self.low)}, {_num(self.high)}{right}"


def _num(x: float | None) -> str:
    return str(int(x)) if x is not None and float(x).is_integer() else str(x)


def at_least(n: int) -> Range:
    return Range(low=n, integer=True)


def fraction(open_low: bool = False, open_high: bool = False) -> Range:
    return Range(0.0, 1.0, low_open=open_low, high_open=open_high)


POSITIVE = Range(low=0.0, low_open=True)
NON_NEGATIVE = Range(low=0.0)

RANGES: dict[str, Range] = {
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
        at_least(1),
    ),  # fmt: skip
    **dict.fromkeys(("num_workers", "max_val_windows", "fold"), at_least(0)),
    **dict.fromkeys(("k_start", "k_end"), at_least(-1)),  # -1: from the first / to the last
    **dict.fromkeys(
        ("input_size", "teacher_input_size", "target_patch_size", "patch_size"), at_least(16)
    ),  # fmt: skip
    "grid": at_least(2),
    "size": at_least(512),
    "thumb_max_size": at_least(64),
    # rates, weights and fractions
    **dict.fromkeys(("lr", "mpp", "mag", "seconds"), POSITIVE),
    **dict.fromkeys(
        ("visible_weight", "student_lr_mult", "weight_decay", "grad_clip", "reg"), NON_NEGATIVE
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
        fraction(),
    ),  # fmt: skip
    **dict.fromkeys(("val_frac", "test_frac", "drop_out"), fraction(open_high=True)),
    **dict.fromkeys(("tumor_frac", "label_frac"), fraction(open_low=True)),
    "mask_ratio": fraction(open_low=True, open_high=True),
    # student probes (finetune)
    "probe_alpha": POSITIVE,
    "val_at_steps": at_least(1),
    # MHIM-MIL (train; mil.mhim.check_mhim_config reads these too)
    **dict.fromkeys(
        ("mhim_mask_ratio", "mhim_mask_ratio_l", "mhim_mask_ratio_h"), fraction(open_high=True)
    ),  # fmt: skip
    "mhim_mask_ratio_hr": fraction(open_low=True),
    "mhim_momentum": fraction(),
    "mhim_cl_alpha": NON_NEGATIVE,
    **dict.fromkeys(("mhim_temp_t", "mhim_temp_s"), POSITIVE),
}


def out_of_range(name: str, value) -> str | None:
    """The one-line refusal of `value` for setting `name` (as its ``--option``), or None when
    it is allowed, unset (None) or not a ranged setting. Tuples are checked element-wise."""
    rng = RANGES.get(name)
    if rng is None or value is None:
        return None
    values = value if isinstance(value, (tuple, list)) else (value,)
    if all(v in rng for v in values):
        return None
    shown = list(value) if isinstance(value, (tuple, list)) else value
    return f"--{name.replace('_', '-')} must be {rng.describe()}, got {shown}"


def first_refusal(settings, names) -> str | None:
    """:func:`out_of_range` of the first of `names` (attributes of `settings`) that is out of
    its range, or None: the config checks raise it as their own error type."""
    for name in names:
        message = out_of_range(name, getattr(settings, name))
        if message:
            return message
    return None
