"""Bad input is refused before any work (issue 19): every command's numeric options at 0 and -1,
every output option pointed at a file (or a folder where a file goes), and the careless user's
inputs the issue lists. Each refusal is one line and leaves nothing behind."""

from __future__ import annotations

import json
import os
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from clam_mcmkd.cli import main
from clam_mcmkd.cli.options import UNBOUNDED, OutputPath

NUMERIC = (click.types.IntParamType, click.types.FloatParamType)


def _params(kinds) -> list[tuple[str, str]]:
    return [
        (name, p.name)
        for name, cmd in sorted(main.commands.items())
        for p in cmd.params
        if isinstance(p.type, kinds)
    ]


def _flag(cmd: click.Command, name: str) -> click.Parameter:
    return next(p for p in cmd.params if p.name == name)


def _value(param: click.Parameter, root: Path) -> str:
    """A value that parses for a required parameter (a folder or file that exists if it must)."""
    kind = param.type
    if isinstance(kind, click.Choice):
        return str(kind.choices[0])
    if isinstance(kind, click.Path) and kind.exists:
        return str(root / ("in_file.txt" if not kind.dir_okay else "in_dir"))
    return str(root / f"arg_{param.name}")


def _args(command: str, root: Path, **given: str) -> list[str]:
    """`command` with its required parameters filled and `given` (param name -> value)."""
    cmd = main.commands[command]
    args: list[str] = []
    for p in cmd.params:
        if p.name not in given and not p.required:
            continue
        value = given.get(p.name) or _value(p, root)
        args += [value] if isinstance(p, click.Argument) else [p.opts[0], value]
    return [command, *args]


@pytest.fixture
def root(tmp_path) -> Path:
    (tmp_path / "in_dir").mkdir()
    (tmp_path / "in_file.txt").write_text("x\n")
    (tmp_path / "a_file").write_text("keep me\n")
    return tmp_path


def _refused_in_one_line(result, root: Path, before: set[str], *words: str) -> None:
    assert result.exit_code != 0, result.output
    assert (
        "Traceback" not in result.output
        and result.exception is None
        or isinstance(result.exception, SystemExit)
    ), result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:"), result.output
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert {p.name for p in root.iterdir()} == before  # nothing written
    assert (root / "a_file").read_text() == "keep me\n"


def test_every_numeric_option_has_a_declared_range():
    """No numeric option takes any number unless it is listed as such (seeds)."""
    ranged = set(_params((click.IntRange, click.FloatRange)))
    plain = [(c, n) for c, n in _params(NUMERIC) if (c, n) not in ranged and n not in UNBOUNDED]
    assert plain == []
    ranged = _params((click.IntRange, click.FloatRange))
    assert len(ranged) > 60


@pytest.mark.parametrize("command,name", _params((click.IntRange, click.FloatRange)))
def test_numeric_options_at_zero_and_minus_one(command, name, root):
    """0 and -1 for every ranged option: where the range excludes them, the command stops
    while parsing, in one line naming the option, before it reads or writes anything."""
    param = _flag(main.commands[command], name)
    before = {p.name for p in root.iterdir()}
    tried = 0
    for value in ("0", "-1"):
        try:
            param.type.convert(value, param, None)
            continue  # in range (e.g. --num-workers 0, --k-start -1): a legitimate value
        except click.BadParameter:
            pass
        tried += 1
        result = CliRunner().invoke(main, _args(command, root, **{name: value}))
        _refused_in_one_line(result, root, before, f"'{param.opts[0]}'", "range")
    if name in {"batch_size", "max_windows", "save_every", "stop_after_steps", "lr", "epochs"}:
        assert tried == 2


@pytest.mark.parametrize("command,name", _params(OutputPath))
def test_every_output_option_pointed_at_a_file(command, name, root):
    """An output folder that is a file, an output under a file, an output file that is a
    folder: one line naming the path, nothing written, the file untouched."""
    param = _flag(main.commands[command], name)
    before = {p.name for p in root.iterdir()}
    cases = [(str(root / "a_file" / "sub"), "a_file is a file")]
    if param.type.folder:
        cases.append((str(root / "a_file"), "exists and is not a folder"))
    else:
        cases.append((str(root / "in_dir"), "is a folder"))
    for value, words in cases:
        result = CliRunner().invoke(main, _args(command, root, **{name: value}))
        _refused_in_one_line(result, root, before, words)


def test_every_command_that_writes_a_folder_checks_it():
    """Each command's output options use the one output helper (OutputPath)."""
    outputs = {c for c, _ in _params(OutputPath)}
    assert outputs >= {"tile", "make-cohort", "splits", "extract-features", "finetune", "train",
                       "eval", "heatmap", "benchmark", "demo"}  # fmt: skip


# ----------------------------------------------------------------------------- the issue's list


@pytest.mark.parametrize(
    "command,args,words",
    [
        ("finetune", {"max_windows": "-3"}, "'--max-windows'"),
        ("finetune", {"save_every": "0"}, "'--save-every'"),
        ("finetune", {"stop_after_steps": "0"}, "'--stop-after-steps'"),
        ("make-cohort", {"tumor_frac": "2"}, "'--tumor-frac'"),
        ("heatmap", {"thumb_max_size": "0"}, "'--thumb-max-size'"),
    ],
)
def test_the_issues_out_of_range_options(command, args, words, root):
    before = {p.name for p in root.iterdir()}
    result = CliRunner().invoke(main, _args(command, root, **args))
    _refused_in_one_line(result, root, before, words)


def test_finetune_config_refuses_the_same_ranges_from_python():
    from clam_mcmkd.mcmkd import FinetuneConfig
    from clam_mcmkd.mcmkd.config import FinetuneError, validate_config

    for field in ("max_windows", "save_every", "stop_after_steps"):
        cfg = FinetuneConfig("h", "s", "c.csv", "resnet18", student="resnet18_trunc",
                             **{field: 0})  # fmt: skip
        with pytest.raises(FinetuneError, match=f"--{field.replace('_', '-')} must be >= 1"):
            validate_config(cfg)


@pytest.fixture
def mil_run(root) -> dict[str, Path]:
    """A MIL run folder with a real fold-0 checkpoint and a truncated train_config.json."""
    import torch

    from clam_mcmkd.mil.models import build_model

    run = root / "run"
    run.mkdir()
    model = build_model("clam_sb", n_classes=2, embed_dim=32)
    torch.save(model.state_dict(), run / "s_0_checkpoint.pt")
    (run / "train_config.json").write_text('{"model_type": "clam_sb", "label_di')
    csv = root / "data.csv"
    csv.write_text("case_id,slide_id,label\nc0,s0,normal\nc1,s1,tumor\n")
    return {"run": run, "csv": csv}


@pytest.mark.parametrize("command", ["eval", "heatmap"])
def test_a_truncated_train_config_is_one_line(command, root, mil_run):
    out = root / "out"
    given = {"models_dir": str(mil_run["run"]), "csv_path": str(mil_run["csv"])}
    given["eval_dir" if command == "eval" else "out"] = str(out)
    before = {p.name for p in root.iterdir()}
    result = CliRunner().invoke(main, _args(command, root, **given) + ["--device", "cpu"])
    _refused_in_one_line(result, root, before, "train_config.json: not a readable train config")


def test_heatmap_unknown_cmap_refused_before_anything_is_written(root, mil_run):
    given = {"models_dir": str(mil_run["run"]), "csv_path": str(mil_run["csv"]),
             "out": str(root / "out")}  # fmt: skip
    before = {p.name for p in root.iterdir()}
    result = CliRunner().invoke(main, _args("heatmap", root, **given) + ["--cmap", "nope"])
    _refused_in_one_line(result, root, before, "--cmap 'nope'")


def test_a_broken_symlink_among_the_slides_is_listed_as_failed(tmp_path):
    """It used to be skipped silently: not in process_list.csv at all."""
    import pandas as pd

    from clam_mcmkd.tiling import TileConfig, tile_slides

    slides = tmp_path / "slides"
    slides.mkdir()
    os.symlink(tmp_path / "gone.svs", slides / "lost.svs")
    out = tmp_path / "tiles"
    summary = tile_slides(TileConfig(source=str(slides), save_dir=str(out)))
    assert list(summary.failed) == ["lost"] and "broken symbolic link" in summary.failed["lost"]
    rows = pd.read_csv(out / "process_list.csv")
    assert rows[["slide_id", "status"]].values.tolist() == [["lost", "failed"]]
    assert "broken symbolic link" in rows.loc[0, "error"]


def test_benchmark_checks_encoder_names_before_any_stage(root, tmp_path):
    """An arm's unknown encoder is found before tiling and extraction run."""
    config = tmp_path / "bench.yaml"
    config.write_text(
        json.dumps(
            {"arms": [{"name": "a", "kind": "encoder", "encoder": "no_such_encoder"}],
             "baseline": "a"}
        )
    )  # fmt: skip
    labels = root / "labels.csv"
    labels.write_text("slide_id,label\ns0,normal\n")
    out = root / "bench_out"
    before = {p.name for p in root.iterdir()}
    result = CliRunner().invoke(
        main,
        ["benchmark", "--config", str(config), "--slides", str(root / "in_dir"), "--labels",
         str(labels), "--out", str(out), "--device", "cpu"],
    )  # fmt: skip
    _refused_in_one_line(result, root, before, "no_such_encoder")


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a GPU is present")
def test_heatmap_on_a_missing_gpu_writes_no_config(root, mil_run):
    """Defect 10: with a run folder heatmap can load, --device cuda on a machine without a GPU
    stopped only after heatmap_config.json was written."""
    (mil_run["run"] / "train_config.json").unlink()  # a run of CLAM's own main.py: no config
    out = root / "out"
    given = {"models_dir": str(mil_run["run"]), "csv_path": str(mil_run["csv"]), "out": str(out)}
    before = {p.name for p in root.iterdir()}
    result = CliRunner().invoke(main, _args("heatmap", root, **given) + ["--device", "cuda"])
    _refused_in_one_line(result, root, before, "--device cuda asked")
    assert not out.exists()


def test_every_ranged_finetune_setting_is_refused_from_python_as_on_the_command_line():
    """One table of ranges (clam_mcmkd.ranges): the option's click type and validate_config
    refuse the same just-out-of-range value, and both accept the bound itself."""
    import click

    from clam_mcmkd.cli.options import RANGES as OPTION_TYPES
    from clam_mcmkd.mcmkd import FinetuneConfig
    from clam_mcmkd.mcmkd.config import RANGED_FIELDS, FinetuneError, validate_config
    from clam_mcmkd.ranges import RANGES

    assert {"grid", "mask_ratio", "val_frac", "student_lr_mult", "probe_alpha"} <= set(
        RANGED_FIELDS
    )
    for name in RANGED_FIELDS:
        rng = RANGES[name]
        step = 1 if rng.integer else 0.5
        bad = rng.low if rng.low_open else rng.low - step
        value = (bad,) if name == "val_at_steps" else bad
        cfg = FinetuneConfig("h", "s", "c.csv", "resnet18", student="resnet18_trunc",
                             **{name: value})  # fmt: skip
        with pytest.raises(FinetuneError, match=f"--{name.replace('_', '-')} must be "):
            validate_config(cfg)
        with pytest.raises(click.BadParameter):
            OPTION_TYPES[name].convert(bad, None, None)
        if not rng.low_open:
            assert OPTION_TYPES[name].convert(rng.low, None, None) == rng.low


def test_mhim_settings_are_refused_from_python_with_the_cli_ranges():
    from clam_mcmkd.mil import TrainConfig
    from clam_mcmkd.mil.mhim import MHIM_RANGED, check_mhim_config
    from clam_mcmkd.ranges import RANGES
    from clam_mcmkd.utils import ClamMcmkdError

    paths = dict(data_root_dir="d", csv_path="c.csv", split_dir="s", results_dir="r", exp_code="e")
    check_mhim_config(TrainConfig(**paths))  # the defaults are in range
    assert {"mhim_momentum", "mhim_mask_ratio"} <= set(MHIM_RANGED)
    for name in MHIM_RANGED:
        rng = RANGES[name]
        bad = [rng.low if rng.low_open else rng.low - 0.5]
        if rng.high is not None:
            bad.append(rng.high if rng.high_open else rng.high + 0.5)
        for value in bad:
            with pytest.raises(ClamMcmkdError, match=f"--{name.replace('_', '-')} must be "):
                check_mhim_config(TrainConfig(**paths, **{name: value}))
