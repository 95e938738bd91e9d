"""Seconds per MIL training epoch per 100 bags of 5000 instances (1024-d), CPU and GPU.

Times `clam_mcmkd.mil.train_epoch` (one bag per optimiser step, as CLAM; MHIM-MIL's epoch for
mhim_abmil, with a teacher) and one evaluation pass over the same bags, on in-memory random
bags (feature I/O is excluded: `train` reads every bag once per run). A run with fewer bags is
scaled to 100 (each bag is one independent step, so time is linear in the bag count). The
last column is each model's training time over the first model's, measured in the same run.
Example (issue 21: TransMIL vs ABMIL on bags of 10k instances):

    python benchmarks/bench_train.py --n-bags 4 --n-inst 10000 --epochs 1 \
        --models abmil,transmil,mhim_abmil --threads 1
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from clam_mcmkd.mil import Bag, TrainConfig, build_model, run_bags, save_weights, train_epoch
from clam_mcmkd.mil.mhim import MhimTrainer
from clam_mcmkd.mil.models import get_mil_model
from clam_mcmkd.mil.nets import make_loss


def epoch_fn(model, cfg: TrainConfig, n_bags: int, tmp: Path):
    """The model's training epoch: plain, or MHIM-MIL's with a teacher from its initial weights."""
    if not get_mil_model(cfg.model_type).mhim_base:
        return lambda *a: train_epoch(*a[:5], cfg, *a[5:])
    save_weights(model, tmp / "s_0_checkpoint.pt")
    (tmp / "train_config.json").write_text(json.dumps({"feature_norm": "none"}))
    cfg.mhim_teacher_init = str(tmp)
    trainer = MhimTrainer(model, cfg, 0, n_bags)
    return lambda m, b, st, o, lf, n, d: trainer.train_epoch(m, b, st, o, lf, n, d, 0)


def bench(device: str, model_type: str, n_bags: int, n_inst: int, dim: int, epochs: int):
    gen = torch.Generator().manual_seed(0)
    store = {f"b{i}": torch.randn(n_inst, dim, generator=gen).to(device) for i in range(n_bags)}
    bags = [Bag(f"b{i}", i % 2) for i in range(n_bags)]
    cfg = TrainConfig("", "", "", "", "bench", model_type=model_type)
    torch.manual_seed(0)
    model = build_model(model_type, 2, dim, inst_loss=cfg.inst_loss).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.reg)
    loss_fn = make_loss("ce", 2)
    tmp = Path(tempfile.mkdtemp(prefix="bench_train_"))
    run_epoch = epoch_fn(model, cfg, n_bags, tmp)

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    run_epoch(model, bags[:2], store, opt, loss_fn, 2, device)  # warm-up
    sync()
    times = []
    for _ in range(epochs):
        start = time.perf_counter()
        run_epoch(model, bags, store, opt, loss_fn, 2, device)
        sync()
        times.append(time.perf_counter() - start)
    start = time.perf_counter()
    run_bags(model, bags, store, device, 2, loss_fn)
    sync()
    eval_s = time.perf_counter() - start
    scale = 100 / n_bags
    return min(times) * scale, eval_s * scale


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-bags", type=int, default=100)
    parser.add_argument("--n-inst", type=int, default=5000)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs (best is reported)")
    parser.add_argument("--models", default="abmil,clam_sb,clam_mb")
    parser.add_argument("--devices", default=None, help="default: cpu, plus cuda when present")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = args.devices.split(",") if args.devices else ["cpu"]
    if args.devices is None and torch.cuda.is_available():
        devices.append("cuda")
    print(
        f"{args.n_bags} bags x {args.n_inst} instances x {args.dim}-d, torch "
        f"{torch.__version__}, {torch.get_num_threads()} CPU threads; times scaled to 100 bags"
    )
    models = args.models.split(",")
    print(f"{'device':8} {'model':10} {'train s/epoch':>14} {'eval s/pass':>12} "
          f"{'train x ' + models[0]:>16}")  # fmt: skip
    for device in devices:
        first = None
        for model_type in models:
            train_s, eval_s = bench(
                device, model_type, args.n_bags, args.n_inst, args.dim, args.epochs
            )
            first = first or train_s
            print(f"{device:8} {model_type:10} {train_s:14.2f} {eval_s:12.2f} "
                  f"{train_s / first:16.2f}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
