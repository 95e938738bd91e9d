"""The whole comparison: untuned extractor vs teacher vs MCM-KD fine-tuned, on the same folds.

tile -> splits -> fine-tune -> extract (one feature set per encoder) -> train (each MIL model on
each feature set, same splits) -> report. Every stage is one call into its own module; this file
only orders them, passes paths along and keeps the books:

- ``<out>/stages/<stage>.json`` is written (atomically) when a stage has finished, with its
  settings, wall time and a few figures. A finished stage is never run again, so rerunning on a
  finished ``--out`` only rewrites the report (from the markers, so byte for byte the same);
  a run killed mid-stage redoes that stage, whose own module skips the slides/folds it finished.
- A marker whose settings differ from the current config is an error: results made with other
  settings are never silently mixed into the report.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..clam import formats
from ..clam.runner import CLAM_EXTRACT_MODELS, CLAM_SCRIPTS, clam_extract, clam_task_for, clam_train
from ..mil.models import get_mil_model, list_mil_models
from ..utils import ClamMcmkdError, atomic_write_text, resolve_device, to_jsonable
from .config import MCMKD_ENCODER, BenchmarkConfig

log = logging.getLogger(__name__)


class BenchmarkError(ClamMcmkdError):
    """The benchmark cannot go on; the message says which stage and what to do."""


@dataclass(frozen=True)
class Layout:
    """Where each stage writes inside ``--out`` (CLAM's own layouts below each folder)."""

    out: Path

    @property
    def stages(self) -> Path:
        return self.out / "stages"

    @property
    def dataset_csv(self) -> Path:  # the labels CSV restricted to slides that have patches
        return self.out / "dataset.csv"

    @property
    def fixed_test_csv(self) -> Path:
        return self.out / "fixed_test.csv"

    @property
    def finetune_csv(self) -> Path:
        return self.out / "finetune_slides.csv"

    @property
    def splits(self) -> Path:
        return self.out / "splits"

    @property
    def checkpoint(self) -> Path:
        return self.out / "finetune" / f"{MCMKD_ENCODER}.pt"

    def features(self, encoder: str) -> Path:
        return self.out / "features" / safe_name(encoder)

    def results(self, encoder: str) -> Path:
        return self.out / "results" / safe_name(encoder)

    def run_dir(self, encoder: str, model: str, seed: int) -> Path:
        return self.results(encoder) / f"{model}_s{seed}"  # CLAM's <exp_code>_s<seed>


def safe_name(name: str) -> str:
    """A directory name for an encoder name such as ``hf-hub:org/model``."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


# ----------------------------------------------------------------------------- stage book-keeping


class Stages:
    """Runs each stage once per ``--out`` and remembers its settings and wall time."""

    def __init__(self, layout: Layout):
        self.layout = layout
        self.ran: list[str] = []
        self.skipped: list[str] = []

    def marker(self, name: str) -> Path:
        return self.layout.stages / f"{safe_name(name)}.json"

    def done(self, name: str) -> dict | None:
        path = self.marker(name)
        return json.loads(path.read_text()) if path.is_file() else None

    def run(self, name: str, settings: dict, fn: Callable[[], dict | None]) -> dict:
        settings = json.loads(json.dumps(to_jsonable(settings)))
        record = self.done(name)
        if record is not None:
            if record.get("settings") != settings:
                changed = sorted(
                    k
                    for k in set(settings) | set(record.get("settings", {}))
                    if settings.get(k) != record.get("settings", {}).get(k)
                )
                raise BenchmarkError(
                    f"{self.marker(name)}: stage '{name}' finished with other settings "
                    f"(changed: {changed}); use a new --out, or delete that marker and the "
                    "stage's outputs to redo it"
                )
            log.info("stage %s: done before, skipped", name)
            self.skipped.append(name)
            return record
        log.info("stage %s: running", name)
        started = time.time()
        info = fn() or {}
        record = {
            "stage": name,
            "settings": settings,
            "seconds": round(time.time() - started, 3),
            "info": to_jsonable(info),
        }
        atomic_write_text(self.marker(name), json.dumps(record, indent=2, sort_keys=True) + "\n")
        self.ran.append(name)
        return record


# ----------------------------------------------------------------------------- stages


def _check_inputs(cfg: BenchmarkConfig) -> None:
    for key in ("slides", "labels", "out"):
        if not getattr(cfg, key):
            raise BenchmarkError(f"the benchmark needs --{key}")
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
    resolve_device(cfg.device)  # a device this machine lacks: one line, before any stage runs


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


def stage_finetune(cfg: BenchmarkConfig, layout: Layout, slide_ext: str) -> dict:
    from ..mcmkd import FinetuneConfig, finetune, output_paths

    f = cfg.finetune
    resume = output_paths(layout.checkpoint)["state"].is_file()  # a killed run goes on
    ft_cfg = FinetuneConfig(
        data_h5_dir=str(layout.out),
        data_slide_dir=cfg.slides,
        csv_path=str(layout.finetune_csv),
        out=str(layout.checkpoint),
        slide_ext=slide_ext,
        student=f.student,
        teacher=f.teacher,
        grid=f.grid,
        mask_ratio=f.mask_ratio,
        epochs=f.epochs,
        batch_size=f.batch_size,
        input_size=f.input_size,
        max_windows=f.max_windows,
        pretrained=cfg.pretrained,
        device=cfg.device,
        num_workers=cfg.num_workers,
        resume=resume,
        **({"lr": f.lr} if f.lr is not None else {}),
        **f.options,
    )
    path = finetune(ft_cfg)
    return {"config": ft_cfg, "checkpoint": str(path)}


def _encoder_ckpt(encoder: str, layout: Layout) -> str | None:
    return str(layout.checkpoint) if encoder == MCMKD_ENCODER else None


def stage_extract(cfg: BenchmarkConfig, layout: Layout, encoder: str, slide_ext: str) -> dict:
    """One feature set; through CLAM's extract_features_fp.py with --clam-dir where it can."""
    from ..features import ExtractConfig, extract_features

    e = cfg.extraction
    feat_dir = layout.features(encoder)
    ex_cfg = ExtractConfig(
        data_h5_dir=str(layout.out),
        data_slide_dir=cfg.slides,
        csv_path=str(layout.dataset_csv),
        feat_dir=str(feat_dir),
        model=encoder,
        slide_ext=slide_ext,
        batch_size=e.batch_size,
        target_patch_size=e.target_patch_size,  # timm teachers keep their own input size
        ckpt=_encoder_ckpt(encoder, layout),
        num_workers=cfg.num_workers,
        device=cfg.device,
        pretrained=cfg.pretrained,
        **e.options,
    )
    slide_ids = formats.read_dataset_csv(layout.dataset_csv)["slide_id"].tolist()
    started = time.time()
    if cfg.clam_dir and encoder in CLAM_EXTRACT_MODELS:
        clam_extract(cfg.clam_dir, ex_cfg, cfg.device)
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
            f"{feat_dir}: feature extraction with {encoder} failed for {len(failed)} slide(s), "
            f"e.g. {dict(list(failed.items())[:3])}; fix or remove them from --labels and rerun"
        )
    return {"config": ex_cfg, "runner": runner, "patches": patches, "patches_per_s": rate,
            **_compute_figures(ex_cfg)}  # fmt: skip


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


def _train_config(cfg: BenchmarkConfig, layout: Layout, encoder: str, model: str):
    from ..mil import TrainConfig

    m = cfg.mil
    return TrainConfig(
        data_root_dir=str(layout.features(encoder)),
        csv_path=str(layout.dataset_csv),
        split_dir=str(layout.splits),
        results_dir=str(layout.results(encoder)),
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
        seed=m.seed,
        device=cfg.device,
        **m.options,
    )


def stage_train(cfg: BenchmarkConfig, layout: Layout, encoder: str, model: str) -> dict:
    """Train one MIL model on one feature set: CLAM's main.py with --clam-dir, else ours."""
    from ..mil import train

    tr_cfg = _train_config(cfg, layout, encoder, model)
    if cfg.clam_dir:
        task = clam_task_for(cfg.labels, cfg.name)
        clam_train(cfg.clam_dir, tr_cfg, task, get_mil_model(model).clam_args, cfg.device)
        summary = tr_cfg.run_dir / formats.SUMMARY_NAME
        if not summary.is_file():
            raise BenchmarkError(f"{summary}: CLAM's main.py wrote no summary")
        runner = "clam"
    else:
        summary = train(tr_cfg)
        runner = "clam-mcmkd"
    return {"config": tr_cfg, "runner": runner, "summary": str(summary)}


def _save_if_changed(cfg: BenchmarkConfig, path: Path) -> None:
    """Keep a finished run's files untouched when it is rerun with the same config."""
    text = json.dumps(to_jsonable(cfg), indent=2, sort_keys=True) + "\n"
    if not path.is_file() or path.read_text() != text:
        atomic_write_text(path, text)


def stage_seconds(stages: Stages, names: list[str]) -> dict[str, float]:
    return {n: float(stages.done(n)["seconds"]) for n in names if stages.done(n)}


# ----------------------------------------------------------------------------- the run


def run_benchmark(cfg: BenchmarkConfig) -> Path:
    """Run (or finish) the benchmark in ``cfg.out``; returns the path of ``report.md``."""
    from .report import ResultRun, write_report

    _check_inputs(cfg)
    layout = Layout(Path(cfg.out))
    layout.out.mkdir(parents=True, exist_ok=True)
    _save_if_changed(cfg, layout.out / "benchmark_config.json")
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
    stages.run("finetune", {"finetune": cfg.finetune, "pretrained": cfg.pretrained},
               lambda: stage_finetune(cfg, layout, slide_ext))  # fmt: skip

    compute = {}
    for encoder in cfg.encoders:
        rec = stages.run(
            f"extract-{encoder}",
            {"options": cfg.extraction.options, "pretrained": cfg.pretrained,
             "target_patch_size": cfg.extraction.target_patch_size},
            lambda encoder=encoder: stage_extract(cfg, layout, encoder, slide_ext),
        )  # fmt: skip
        compute[encoder] = rec["info"]

    runs = []
    train_settings = {"mil": {k: v for k, v in vars(cfg.mil).items() if k != "models"},
                      "k": s.k}  # fmt: skip
    for model in cfg.mil.models:
        for encoder in cfg.encoders:
            stages.run(
                f"train-{encoder}-{model}",
                train_settings,
                lambda encoder=encoder, model=model: stage_train(cfg, layout, encoder, model),
            )
            runs.append(ResultRun(encoder, model, layout.run_dir(encoder, model, cfg.mil.seed)))

    order = ["tile", "dataset", "splits", "finetune"]
    order += [f"extract-{e}" for e in cfg.encoders]
    order += [f"train-{e}-{m}" for m in cfg.mil.models for e in cfg.encoders]
    configs = {"benchmark": cfg}
    for name in order:
        rec = stages.done(name)
        if rec and "config" in rec["info"]:
            configs[name] = rec["info"]["config"]
    report = write_report(
        layout.out,
        runs,
        cfg.extraction.baseline,
        compute=compute,
        stage_seconds=stage_seconds(stages, order),
        configs=configs,
        title=f"clam-mcmkd benchmark: {cfg.name}",
        encoder_order=cfg.encoders,
    )
    log.info("benchmark: ran %s; finished before: %s", stages.ran, stages.skipped)
    return report
