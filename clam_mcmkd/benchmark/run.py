"""The whole comparison: the config's arms (untuned, MCM-KD, controls, teacher) on the same folds.

tile -> splits -> fine-tune (one per fine-tuned arm) -> extract (one feature set per arm) ->
train (each MIL model on each feature set, same splits, every MIL seed) -> report. Every stage
is one call into its own module; this file only orders them, passes paths along and keeps the
books (stages.py):

- ``<out>/stages/<stage>.json`` is written (atomically) when a stage has finished, with its
  settings, wall time and a few figures. A finished stage is never run again, so rerunning on a
  finished ``--out`` only rewrites the report (from the markers, so byte for byte the same);
  a run killed mid-stage redoes that stage, whose own module skips the slides/folds it finished.
- A marker whose settings differ from the current config is an error: results made with other
  settings are never silently mixed into the report.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

from ..clam import formats
from ..clam.runner import CLAM_EXTRACT_MODELS, CLAM_SCRIPTS, clam_extract, clam_task_for, clam_train
from ..mil.models import get_mil_model, list_mil_models
from ..utils import check_output_path, resolve_device
from .arms import (
    CHECKPOINT_ENCODERS,
    arm_encoder,
    arm_label,
    finetune_arms,
    missing_checkpoints,
    unknown_encoders,
)
from .arms import teacher_of as arm_teacher
from .config import ArmSettings, BenchmarkConfig
from .stages import BenchmarkError, Layout, Stages, save_if_changed, stage_seconds

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- stages


def _check_inputs(cfg: BenchmarkConfig) -> None:
    for key in ("slides", "labels", "out"):
        if not getattr(cfg, key):
            raise BenchmarkError(f"the benchmark needs --{key}")
    resolve_device(cfg.device)  # a device this machine lacks: one line, before any stage runs
    check_output_path(cfg.out)
    if not Path(cfg.slides).is_dir():
        raise BenchmarkError(f"{cfg.slides}: --slides is not a directory")
    if not Path(cfg.labels).is_file():
        raise BenchmarkError(f"{cfg.labels}: --labels file does not exist")
    if cfg.clam_dir:
        for script in CLAM_SCRIPTS:
            if not (Path(cfg.clam_dir) / script).is_file():
                raise BenchmarkError(f"{cfg.clam_dir}: not a CLAM checkout (no {script})")
    unknown = [m for m in cfg.mil.models if m not in list_mil_models()]
    if unknown:
        raise BenchmarkError(f"unknown MIL model(s) {unknown} (choices: {list_mil_models()})")
    if cfg.clam_dir:
        no_clam = [m for m in cfg.mil.models if get_mil_model(m).clam_args is None]
        if no_clam:
            raise BenchmarkError(f"CLAM's main.py cannot train {no_clam}; run without --clam-dir")
        if cfg.mil.feature_norm != "none":
            raise BenchmarkError(
                f"--clam-dir: CLAM's main.py feeds raw features, but mil.feature_norm is "
                f"'{cfg.mil.feature_norm}'; set it to none (--feature-norm none) or run without "
                "--clam-dir"
            )
    unknown = unknown_encoders(cfg)
    if unknown:
        raise BenchmarkError(f"unknown encoder(s) {unknown}: not registered, not timm models")
    missing = missing_checkpoints(cfg)
    if missing:
        raise BenchmarkError(f"{missing[0]}: checkpoint named by the config does not exist")


def _slide_ext(cfg: BenchmarkConfig) -> str:
    """The configured extension, else the one the first labelled slide has on disk."""
    if cfg.slide_ext:
        return cfg.slide_ext
    df = formats.read_dataset_csv(cfg.labels)
    for path in sorted(Path(cfg.slides).iterdir()):
        if formats.slide_id_of(path.name) in set(df["slide_id"]) and path.suffix:
            return "".join(path.suffixes[-1:])
    raise BenchmarkError(f"{cfg.slides}: no slide file for any slide_id of {cfg.labels}")


def stage_tile(cfg: BenchmarkConfig, layout: Layout, slide_ext: str) -> dict:
    """Coords into ``<out>/patches`` (CLAM coords already there are kept, as CLAM keeps them)."""
    from ..tiling import TileConfig, tile_slides

    t = cfg.tiling
    tile_cfg = TileConfig(
        source=cfg.slides,
        save_dir=str(layout.out),
        patch_size=t.patch_size,
        step_size=t.step_size,
        mag=t.mag,
        min_tissue=t.min_tissue,
        slide_ext=slide_ext,
        **t.options,
    )
    summary = tile_slides(tile_cfg)
    return {"config": tile_cfg, "done": len(summary.done), "skipped": len(summary.skipped),
            "failed": summary.failed}  # fmt: skip


def stage_dataset(cfg: BenchmarkConfig, layout: Layout) -> dict:
    """The labels CSV restricted to slides with a non-empty coords file (same rows for all)."""
    df = formats.read_dataset_csv(cfg.labels, label_dict=cfg.label_dict)
    keep, dropped = [], {}
    for slide_id in df["slide_id"]:
        path = formats.coords_path(layout.out, slide_id)
        try:
            n = len(formats.read_coords_h5(path))
        except formats.ClamFormatError as err:
            dropped[slide_id] = err.problem
            continue
        if n == 0:
            dropped[slide_id] = "no tissue patches"
        else:
            keep.append(slide_id)
    for slide_id, why in dropped.items():
        log.warning("benchmark: slide %s left out: %s", slide_id, why)
    rows = df[df["slide_id"].isin(keep)]
    if rows.empty:
        raise BenchmarkError(f"{cfg.labels}: no slide has tissue patches in {layout.out}/patches")
    columns = ["case_id", "slide_id", "label"]
    formats.write_dataset_csv(layout.dataset_csv, rows[columns].to_dict("records"))
    fixed_test: list[str] = []
    if cfg.splits.fixed_test_column:
        col = cfg.splits.fixed_test_column
        if col not in rows.columns:
            raise BenchmarkError(
                f"{cfg.labels}: no '{col}' column, which marks the fixed test set "
                f"(splits.fixed_test_column); columns: {list(df.columns)}"
            )
        is_test = rows[col].str.strip().str.lower() == "test"
        fixed_test = rows["slide_id"][is_test].tolist()
        if not fixed_test:
            raise BenchmarkError(f"{cfg.labels}: no slide has '{col}' = test")
        _write_id_csv(layout.fixed_test_csv, fixed_test)
    # MCM-KD uses no labels, but never sees a fixed (official) test set either
    _write_id_csv(layout.finetune_csv, [s for s in rows["slide_id"] if s not in set(fixed_test)])
    return {"slides": len(rows), "dropped": dropped, "fixed_test": len(fixed_test)}


def _write_id_csv(path: Path, slide_ids: list[str]) -> None:
    formats.write_dataset_csv(path, [{"case_id": s, "slide_id": s, "label": ""} for s in slide_ids])


def stage_splits(cfg: BenchmarkConfig, layout: Layout) -> dict:
    from ..splits import SplitConfig, make_splits

    s = cfg.splits
    split_cfg = SplitConfig(
        csv_path=str(layout.dataset_csv),
        split_dir=str(layout.splits),
        k=s.k,
        val_frac=s.val_frac,
        test_frac=s.test_frac,
        seed=s.seed,
        patient_strat=s.patient_strat,
        fixed_test=str(layout.fixed_test_csv) if s.fixed_test_column else None,
        label_dict=cfg.label_dict,
        **s.options,
    )
    make_splits(split_cfg)
    return {"config": split_cfg}


def stage_finetune(cfg: BenchmarkConfig, layout: Layout, arm: ArmSettings, slide_ext: str) -> dict:
    """One fine-tuned arm: the student from its start, this arm's objective/targets/teacher."""
    from ..mcmkd import FinetuneConfig, finetune, output_paths

    f = cfg.finetune
    out = layout.checkpoint(arm.name)
    teacher = arm_teacher(cfg, arm)
    ft_cfg = FinetuneConfig(
        data_h5_dir=str(layout.out),
        data_slide_dir=cfg.slides,
        csv_path=str(layout.finetune_csv),
        out=str(out),
        slide_ext=slide_ext,
        student=f.student,
        student_ckpt=cfg.resolve_path(f.student_ckpt),
        teacher=teacher.model,
        teacher_ckpt=teacher.ckpt,
        teacher_cache=str(layout.teacher_cache(_teacher_key(cfg, arm))),
        objective=arm.objective,
        targets=arm.targets,
        grid=f.grid,
        mask_ratio=f.mask_ratio,
        epochs=f.epochs,
        batch_size=f.batch_size,
        input_size=f.input_size,
        max_windows=f.max_windows,
        pretrained=cfg.pretrained,
        device=cfg.device,
        num_workers=cfg.num_workers,
        resume=output_paths(out)["state"].is_file(),  # a killed run goes on
        **({"lr": f.lr} if f.lr is not None else {}),
        **{**f.options, **arm.options},
    )
    path = finetune(ft_cfg)
    return {"config": ft_cfg, "checkpoint": str(path), "encoder": arm_label(cfg, arm)}


def _teacher_key(cfg: BenchmarkConfig, arm: ArmSettings) -> str:
    """One teacher-feature cache per teacher (name and checkpoint file)."""
    teacher = arm_teacher(cfg, arm)
    return teacher.model + (f"_{Path(teacher.ckpt).stem}" if teacher.ckpt else "")


def stage_extract(cfg: BenchmarkConfig, layout: Layout, arm: ArmSettings, slide_ext: str) -> dict:
    """One arm's feature set; through CLAM's extract_features_fp.py with --clam-dir where it can."""
    from ..features import ExtractConfig, extract_features

    e = cfg.extraction
    feat_dir = layout.features(arm.name)
    spec = arm_encoder(cfg, arm, layout.checkpoint(arm.name))
    ex_cfg = ExtractConfig(
        data_h5_dir=str(layout.out),
        data_slide_dir=cfg.slides,
        csv_path=str(layout.dataset_csv),
        feat_dir=str(feat_dir),
        model=spec.model,
        slide_ext=slide_ext,
        batch_size=e.batch_size,
        target_patch_size=e.target_patch_size,  # timm teachers keep their own input size
        ckpt=spec.ckpt,
        num_workers=cfg.num_workers,
        device=cfg.device,
        pretrained=cfg.pretrained,
        **e.options,
    )
    slide_ids = formats.read_dataset_csv(layout.dataset_csv)["slide_id"].tolist()
    started = time.time()
    clam_model = "mcmkd_resnet50" if spec.model in CHECKPOINT_ENCODERS else spec.model
    if (
        cfg.clam_dir
        and clam_model in CLAM_EXTRACT_MODELS
        and (clam_model != spec.model or not spec.ckpt)
    ):
        clam_extract(cfg.clam_dir, dataclasses.replace(ex_cfg, model=clam_model), cfg.device)
        runner = "clam"
        missing = [s for s in slide_ids if not formats.features_done(feat_dir, s)]
        failed = {s: "CLAM wrote no features" for s in missing}
        patches = sum(len(formats.read_coords_h5(formats.coords_path(layout.out, s)))
                      for s in slide_ids)  # fmt: skip
        rate = patches / max(time.time() - started, 1e-9)
    else:
        summary = extract_features(ex_cfg)
        runner = "clam-mcmkd"
        failed = dict(summary.failed)
        patches = summary.extra.get("patches", 0)
        rate = summary.extra.get("patches_per_s", 0.0)
    if failed:
        raise BenchmarkError(
            f"{feat_dir}: feature extraction for arm {arm.name} ({spec.model}) failed for "
            f"{len(failed)} slide(s), e.g. {dict(list(failed.items())[:3])}; fix or remove them "
            "from --labels and rerun"
        )
    return {"config": ex_cfg, "runner": runner, "patches": patches, "patches_per_s": rate,
            "encoder": arm_label(cfg, arm), **_compute_figures(ex_cfg)}  # fmt: skip


def _compute_figures(ex_cfg) -> dict:
    """Parameters and GFLOPs/patch of the encoder as extraction built it (random init suffices)."""
    from ..encoders import create_encoder, encoder_flops_params

    encoder = create_encoder(
        ex_cfg.model, pretrained=False, ckpt=ex_cfg.ckpt, target_img_size=ex_cfg.target_patch_size
    )
    figures = encoder_flops_params(encoder)
    return {
        "params_m": round(figures["params_m"], 4),
        "gflops_per_patch": round(figures["gflops_per_patch"], 4),
        "out_dim": int(encoder.out_dim),
        "input_size": int(encoder.transforms.input_size),
    }


def _train_config(cfg: BenchmarkConfig, layout: Layout, arm: str, model: str, seed: int):
    from ..mil import TrainConfig

    m = cfg.mil
    return TrainConfig(
        data_root_dir=str(layout.features(arm)),
        csv_path=str(layout.dataset_csv),
        split_dir=str(layout.splits),
        results_dir=str(layout.results(arm)),
        exp_code=model,
        model_type=model,
        k=cfg.splits.k,
        label_dict=cfg.label_dict,
        max_epochs=m.max_epochs,
        early_stopping=m.early_stopping,
        weighted_sample=m.weighted_sample,
        lr=m.lr,
        reg=m.reg,
        drop_out=m.drop_out,
        seed=seed,
        feature_norm=m.feature_norm,
        device=cfg.device,
        **m.options,
    )


def stage_train(cfg: BenchmarkConfig, layout: Layout, arm: str, model: str) -> dict:
    """One MIL model on one arm's features, every MIL seed: CLAM's main.py with --clam-dir,
    else ours."""
    from ..mil import train

    configs, summaries = [], []
    for seed in cfg.mil.seeds:
        tr_cfg = _train_config(cfg, layout, arm, model, seed)
        if cfg.clam_dir:
            task = clam_task_for(cfg.labels, cfg.name)
            clam_train(cfg.clam_dir, tr_cfg, task, get_mil_model(model).clam_args, cfg.device)
            summary = tr_cfg.run_dir / formats.SUMMARY_NAME
            if not summary.is_file():
                raise BenchmarkError(f"{summary}: CLAM's main.py wrote no summary")
        else:
            summary = train(tr_cfg)
        configs.append(tr_cfg)
        summaries.append(str(summary))
    return {"config": configs, "runner": "clam" if cfg.clam_dir else "clam-mcmkd",
            "summary": summaries}  # fmt: skip


# ----------------------------------------------------------------------------- the run


def run_benchmark(cfg: BenchmarkConfig) -> Path:
    """Run (or finish) the benchmark in ``cfg.out``; returns the path of ``report.md``."""
    _check_inputs(cfg)
    layout = Layout(Path(cfg.out))
    layout.out.mkdir(parents=True, exist_ok=True)
    save_if_changed(cfg, layout.out / "benchmark_config.json")
    stages = Stages(layout)
    slide_ext = _slide_ext(cfg)
    t, s = cfg.tiling, cfg.splits
    tile_settings = {"patch_size": t.patch_size, "step_size": t.step_size, "mag": t.mag,
                     "min_tissue": t.min_tissue, "options": t.options}  # fmt: skip
    stages.run("tile", tile_settings, lambda: stage_tile(cfg, layout, slide_ext))
    stages.run("dataset", {"fixed_test_column": s.fixed_test_column, "label_dict": cfg.label_dict},
               lambda: stage_dataset(cfg, layout))  # fmt: skip
    stages.run("splits", {"splits": s, "label_dict": cfg.label_dict},
               lambda: stage_splits(cfg, layout))  # fmt: skip
    for arm in finetune_arms(cfg):
        stages.run(f"finetune-{arm.name}",
                   {"finetune": cfg.finetune, "arm": arm, "pretrained": cfg.pretrained,
                    "ckpt_dir": cfg.ckpt_dir},
                   lambda arm=arm: stage_finetune(cfg, layout, arm, slide_ext))  # fmt: skip
    compute = {}
    for arm in cfg.arms:
        rec = stages.run(
            f"extract-{arm.name}",
            {"options": cfg.extraction.options, "pretrained": cfg.pretrained, "arm": arm,
             "target_patch_size": cfg.extraction.target_patch_size, "ckpt_dir": cfg.ckpt_dir},
            lambda arm=arm: stage_extract(cfg, layout, arm, slide_ext),
        )  # fmt: skip
        compute[arm.name] = rec["info"]
    train_settings = {"mil": {k: v for k, v in vars(cfg.mil).items() if k != "models"},
                      "k": s.k}  # fmt: skip
    for model in cfg.mil.models:
        for arm in cfg.arm_names:
            stages.run(f"train-{arm}-{model}", train_settings,
                       lambda arm=arm, model=model: stage_train(cfg, layout, arm, model))  # fmt: skip
    report = _write_report(cfg, layout, stages, compute)
    log.info("benchmark: ran %s; finished before: %s", stages.ran, stages.skipped)
    return report


def _write_report(cfg: BenchmarkConfig, layout: Layout, stages: Stages, compute: dict) -> Path:
    """The report from the finished stages' records and the runs' own files."""
    from .report import ResultRun, write_report

    labels = {a.name: compute[a.name].get("encoder") or arm_label(cfg, a) for a in cfg.arms}
    runs = [
        ResultRun(labels[arm], model, layout.run_dir(arm, model, seed), arm=arm, mil_seed=seed)
        for model in cfg.mil.models
        for arm in cfg.arm_names
        for seed in cfg.mil.seeds
    ]
    order = ["tile", "dataset", "splits"] + [f"finetune-{a.name}" for a in finetune_arms(cfg)]
    order += [f"extract-{a}" for a in cfg.arm_names]
    order += [f"train-{a}-{m}" for m in cfg.mil.models for a in cfg.arm_names]
    configs = {"benchmark": cfg}
    for name in order:
        rec = stages.done(name)
        if rec and "config" in rec["info"]:
            configs[name] = rec["info"]["config"]
    return write_report(
        layout.out,
        runs,
        cfg.baseline,
        compute=compute,
        stage_seconds=stage_seconds(stages, order),
        configs=configs,
        title=f"clam-mcmkd benchmark: {cfg.name}",
        pairs=cfg.pairs,
        pretext=_pretext(cfg, layout),
        report=cfg.report,
        note=cfg.note,
    )


def _pretext(cfg: BenchmarkConfig, layout: Layout) -> dict[str, dict]:
    """Each fine-tuned arm's validation numbers (masked-patch R² before/after vs the mean)."""
    from ..mcmkd.config import output_paths

    out = {}
    for arm in finetune_arms(cfg):
        path = output_paths(layout.checkpoint(arm.name))["final_metrics"]
        if path.is_file():
            out[arm.name] = json.loads(path.read_text())
    return out
