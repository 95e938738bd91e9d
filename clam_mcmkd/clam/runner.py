"""Runs CLAM's own scripts in a checkout patched by ``patch-clam`` (the benchmark's ``--clam-dir``).

Each run is ``python script.py ...`` in the checkout, with this Python (so ``clam_mcmkd`` is
importable there) and CLAM's argument names; our stage configs are translated here, once.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

from ..utils import ClamMcmkdError
from . import formats

log = logging.getLogger(__name__)

# encoders CLAM's (patched) extract_features_fp.py can build; others are extracted by ours
CLAM_EXTRACT_MODELS = ("resnet50_trunc", "uni_v1", "conch_v1", "mcmkd_resnet50")
CLAM_SCRIPTS = ("extract_features_fp.py", "main.py")

# Runs a CLAM script as `python script.py ...` would, with pandas >= 3's string dtype switched
# off: CLAM's datasets write integer labels into the label column, which that dtype refuses.
_CLAM_LAUNCHER = """
import runpy, sys
try:
    import pandas
    pandas.set_option("future.infer_string", False)
except Exception:
    pass
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


class ClamRunError(ClamMcmkdError):
    """A CLAM script failed or cannot be given this run's data; the message says which."""


def run_clam_script(clam_dir: str, args: list[str], env: dict[str, str], device: str) -> None:
    """Run one of CLAM's scripts in its checkout, with this Python (clam_mcmkd importable)."""
    full_env = {**os.environ, **env}
    if device not in ("auto", "cpu") and device.startswith("cuda:"):
        full_env.setdefault("CUDA_VISIBLE_DEVICES", device.split(":", 1)[1])
    elif device == "cpu":
        full_env["CUDA_VISIBLE_DEVICES"] = ""
    cmd = [sys.executable, "-c", _CLAM_LAUNCHER, *args]
    log.info("running CLAM: python %s (in %s)", " ".join(args), clam_dir)
    proc = subprocess.run(cmd, cwd=clam_dir, env=full_env)
    if proc.returncode != 0:
        raise ClamRunError(
            f"CLAM's {args[0]} in {clam_dir} exited with status {proc.returncode} "
            f"(command: python {' '.join(args)})"
        )


def clam_extract(clam_dir: str, ex_cfg, device: str) -> None:
    """CLAM's extract_features_fp.py with the settings of an ``ExtractConfig``."""
    args = [
        "extract_features_fp.py",
        "--data_h5_dir", ex_cfg.data_h5_dir,
        "--data_slide_dir", ex_cfg.data_slide_dir,
        "--csv_path", ex_cfg.csv_path,
        "--feat_dir", ex_cfg.feat_dir,
        "--model_name", ex_cfg.model,
        "--batch_size", str(ex_cfg.batch_size),
        "--slide_ext", ex_cfg.slide_ext,
        "--target_patch_size", str(ex_cfg.target_patch_size),
    ]  # fmt: skip
    env = {}
    if ex_cfg.ckpt:
        env["MCMKD_CKPT_PATH"] = str(Path(ex_cfg.ckpt).resolve())
    run_clam_script(clam_dir, args, env, device)


def clam_task_for(labels_csv: str, name: str) -> str:
    """The patched CLAM task whose label dict matches these labels (or is named `name`)."""
    from .compat import CLAM_TASKS

    labels = set(formats.read_dataset_csv(labels_csv)["label"])
    for task, label_dict in CLAM_TASKS.items():
        if task == name or (labels <= set(label_dict) and name not in CLAM_TASKS):
            return task
    raise ClamRunError(
        f"{labels_csv}: labels {sorted(labels)} match no task of the patched CLAM "
        f"({', '.join(CLAM_TASKS)}); run without --clam-dir"
    )


def clam_train(clam_dir: str, tr, task: str, model_args: tuple[str, ...], device: str) -> None:
    """CLAM's main.py with the settings of a MIL ``TrainConfig``; `model_args` are the main.py
    arguments that select the model (the MIL registry's ``clam_args``)."""
    sample = formats.read_dataset_csv(tr.csv_path)["slide_id"].iloc[0]
    embed_dim = formats.read_features(tr.data_root_dir, sample).shape[1]
    Path(tr.results_dir).mkdir(parents=True, exist_ok=True)  # CLAM makes only the last level
    args = [
        "main.py",
        "--task", task,
        "--csv_path", str(Path(tr.csv_path).resolve()),
        "--data_root_dir", str(Path(tr.data_root_dir).resolve()),
        "--split_dir", str(Path(tr.split_dir).resolve()),
        "--results_dir", str(Path(tr.results_dir).resolve()),
        "--exp_code", tr.exp_code,
        "--k", str(tr.k),
        "--seed", str(tr.seed),
        "--max_epochs", str(tr.max_epochs),
        "--lr", str(tr.lr),
        "--reg", str(tr.reg),
        "--drop_out", str(tr.drop_out),
        "--bag_loss", tr.bag_loss,
        "--inst_loss", tr.inst_loss,
        "--bag_weight", str(tr.bag_weight),
        "--embed_dim", str(embed_dim),
        *model_args,
    ]  # fmt: skip
    args += ["--early_stopping"] if tr.early_stopping else []
    args += ["--weighted_sample"] if tr.weighted_sample else []
    run_clam_script(clam_dir, args, {}, device)
