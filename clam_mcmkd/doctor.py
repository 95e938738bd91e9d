"""``clam-mcmkd doctor``: what this machine has, and how fast each part of the pipeline runs on it.

One table (and the same as a JSON dict): library versions, GPUs and bf16 support, then a short
throughput probe on a generated slide: the patch loader alone, the model alone, extraction end
to end, the teacher (a ViT-L/16), MCM-KD training steps, and with 2 GPUs a 2-rank all-reduce
and 2-rank training steps (a CPU runs the all-reduce on gloo ranks). On a GPU
the probes use the real sizes (resnet50_trunc, ViT-L/16, bf16, channels_last); on a CPU they
shrink (each row says what ran) and the rows a CPU cannot answer say why they were skipped.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace

PACKAGES = ("torch", "torchvision", "timm", "tiatoolbox", "openslide-python", "tifffile",
            "imagecodecs", "h5py", "numpy", "clam-mcmkd")  # fmt: skip


def _project() -> SimpleNamespace:
    """The project pieces the probes use, imported in ONE place (several are being moved)."""
    from .clam.formats import write_grid_coords_h5
    from .encoders import create_encoder
    from .encoders.forward import encode_batch, prepare_encoder
    from .mcmkd.predictor import ContextPredictor

    return SimpleNamespace(
        write_grid_coords_h5=write_grid_coords_h5,
        create_encoder=create_encoder,
        encode_batch=encode_batch,
        prepare_encoder=prepare_encoder,
        ContextPredictor=ContextPredictor,
    )


@dataclass
class Row:
    section: str  # version, gpu, probe, skipped
    name: str
    value: str | float | None = None
    unit: str = ""
    note: str = ""


@dataclass
class DoctorReport:
    rows: list[Row] = field(default_factory=list)

    def add(self, *args, **kwargs) -> Row:
        self.rows.append(Row(*args, **kwargs))
        return self.rows[-1]

    def to_dict(self) -> dict:
        return {"rows": [asdict(r) for r in self.rows]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def table(self) -> str:
        def fmt(v):
            return "-" if v is None else f"{v:.1f}" if isinstance(v, float) else str(v)

        cells = [(r.section, r.name, f"{fmt(r.value)} {r.unit}".strip(), r.note) for r in self.rows]
        cells.insert(0, ("section", "item", "value", "note"))
        widths = [max(len(c[i]) for c in cells) for i in range(3)]
        return "\n".join(
            "  ".join(c[i].ljust(widths[i]) for i in range(3)) + "  " + c[3] for c in cells
        )


# ----------------------------------------------------------------------------- what is here


def add_versions(report: DoctorReport) -> None:
    from importlib.metadata import PackageNotFoundError, version

    import torch

    for name in PACKAGES:
        try:
            report.add("version", name, version(name))
        except PackageNotFoundError:
            report.add("version", name, None, note="not installed")
    try:
        import openslide

        report.add("version", "libopenslide", openslide.__library_version__)
    except Exception as err:  # noqa: BLE001 - a missing C library is what this row reports
        report.add("version", "libopenslide", None, note=str(err))
    report.add("version", "CUDA (torch build)", torch.version.cuda or "none (CPU-only build)")
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    report.add("version", "cuDNN", cudnn)
    try:
        nccl = ".".join(map(str, torch.cuda.nccl.version()))
    except Exception:  # noqa: BLE001
        nccl = None
    report.add("version", "NCCL", nccl)
    report.add("version", "cores / torch threads", f"{len(os.sched_getaffinity(0))} / "
               f"{torch.get_num_threads()}")  # fmt: skip


def add_gpus(report: DoctorReport) -> int:
    """One row per visible GPU; returns how many."""
    import torch

    from .encoders.forward import bf16_supported
    from .utils import CudaProbe

    probe = CudaProbe.probe()
    if not probe.available:
        report.add("gpu", "none", None, note=f"torch.cuda.is_available() is False: {probe.reason}")
        return 0
    for i in range(probe.device_count):
        p = torch.cuda.get_device_properties(i)
        bf16 = bf16_supported(f"cuda:{i}")  # what precision auto decides from
        how = "yes" if bf16 else "no (auto: extraction fp16, fine-tuning float32)"
        report.add(
            "gpu", f"cuda:{i}", p.name, note=f"{p.total_memory / 2**30:.0f} GiB, "
            f"compute {p.major}.{p.minor}, bf16 {how}",
        )  # fmt: skip
    return probe.device_count


# A DataLoader worker hands each batch over in shared memory (/dev/shm), and holds
# prefetch_factor (2) of them before the consumer takes one: uint8 256 px patches, at the
# default sizes.
PREFETCH = 2
PATCH_BYTES = 256 * 256 * 3
LOADER_BATCHES = {
    "extraction": (256 * PATCH_BYTES, "batch 256"),  # extract-features --batch-size
    "fine-tune": (32 * 16 * PATCH_BYTES, "32 windows of 4x4"),  # a finetune micro-batch
}


def shm_check(free_bytes: int | None, workers: int) -> tuple[bool, float, str]:
    """(enough?, GiB needed, note) for loaders with `workers` reading processes."""
    need = {k: b * max(workers, 1) * PREFETCH for k, (b, _) in LOADER_BATCHES.items()}
    worst = max(need.values())
    what = ", ".join(f"{k} ({LOADER_BATCHES[k][1]}) {v / 2**20:.0f} MiB"
                     for k, v in need.items())  # fmt: skip
    note = f"loaders with {workers} workers x prefetch {PREFETCH} hold {what}"
    if free_bytes is None:
        return True, worst / 2**30, f"no /dev/shm here; {note}"
    ok = free_bytes >= worst
    if not ok:
        note += (f"; only {free_bytes / 2**20:.0f} MiB free: loader workers die with 'Bus error'. "
                 "In Docker: --shm-size=8g or --ipc=host; else fewer --num-workers")  # fmt: skip
    return ok, worst / 2**30, note


def add_shm(report: DoctorReport, workers: int, path: str = "/dev/shm") -> None:
    """/dev/shm's size and free space against what the loaders will hold."""
    try:
        st = os.statvfs(path)
        total, free = st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize
    except OSError:
        total = free = None
    ok, need, note = shm_check(free, workers)
    value = None if total is None else round(total / 2**30, 3)
    report.add("system", "/dev/shm", value, "GiB", ("ok: " if ok else "TOO SMALL: ") + note)
    report.add("system", "/dev/shm needed", round(need, 3), "GiB", f"workers={workers}")


# ----------------------------------------------------------------------------- probe set-up


@dataclass(frozen=True)
class ProbeSizes:
    """How big each probe is: real sizes on a GPU, small ones on a CPU."""

    slide: int = 8192
    copies: int = 4  # the probe slide read this many times (as many slide ids)
    batch: int = 256
    seconds: float = 4.0
    student: str = "resnet50_trunc"
    teacher: str = "vit_large_patch16_224"
    input_size: int = 224
    teacher_batch: int = 128
    windows: int = 32  # per fine-tune step
    grid: int = 4
    e2e_patches: int = 0  # 0: every patch of the probe slides

    @classmethod
    def for_device(cls, device: str, quick: bool = False) -> ProbeSizes:
        if str(device).startswith("cuda"):
            return cls()
        if quick:  # the test suite's
            return cls(2048, 1, 8, 0.3, "resnet18_trunc", "vit_tiny_patch16_224", 64, 2, 2, 2, 8)
        return cls(4096, 2, 8, 2.0, "resnet50_trunc", "vit_small_patch16_224", 224, 4, 2, 2, 24)


def make_probe_slide(workdir: Path, sizes: ProbeSizes):
    """A generated JPEG-tiled pyramid and a full 256 px grid on it: SlideJobs (copies of it)."""
    from .cohort import make_slide
    from .patch_pipeline import SlideJob

    slide = workdir / f"probe_{sizes.slide}.tif"
    if not slide.is_file():
        make_slide(slide, size=sizes.slide, seed=0, positive=True)
    paths = {
        name: _project().write_grid_coords_h5(
            workdir / f"probe_{name}.h5", sizes.slide, name="probe", n_patches=n
        )
        for name, n in (("all", None), ("e2e", sizes.e2e_patches or None))
    }
    jobs = [SlideJob(f"probe{i}", str(slide), str(paths["all"])) for i in range(sizes.copies)]
    return jobs, [SlideJob("probe_e2e", str(slide), str(paths["e2e"]))]


def _sync(device: str) -> None:
    if str(device).startswith("cuda"):
        import torch

        torch.cuda.synchronize(device)


def timed_rate(
    step, per_call: int, seconds: float, device: str, max_calls: int = 10_000, info=None
):
    """Items/s of `step()` after one warm-up call, over at least `seconds` (and >= 2 calls).

    Under several ranks (`info`) every step is a collective, so the number of steps is agreed
    first: rank 0 times one more step and decides for all. Ranks that each read their own
    clock disagree by a step now and then, and one of them waits forever in a collective."""
    from .distributed import DistInfo, from_main

    info = info or DistInfo()
    step()
    _sync(device)
    if not info.enabled:
        calls, t0 = 0, time.perf_counter()
        while calls < max_calls and (calls < 2 or time.perf_counter() - t0 < seconds):
            step()
            calls += 1
    else:
        t0 = time.perf_counter()
        step()
        _sync(device)
        one = time.perf_counter() - t0
        todo = from_main(lambda: int(min(max_calls, max(2, seconds / max(one, 1e-9)))), info)
        for _ in range(todo - 1):
            step()
        calls = todo
    _sync(device)
    return per_call * calls / (time.perf_counter() - t0)


# ----------------------------------------------------------------------------- probes


def probe_loader(jobs, sizes: ProbeSizes, workers: int, pin: bool) -> float:
    from .patch_pipeline import iter_cohort_batches

    n, t0 = 0, time.perf_counter()
    for rec in iter_cohort_batches(jobs, sizes.batch, num_workers=workers, pin_memory=pin):
        if rec.error:
            raise RuntimeError(rec.error)
        n += len(rec.patches)
    return n / (time.perf_counter() - t0)


def probe_model(name: str, sizes: ProbeSizes, device: str, batch: int) -> float:
    """Patches/s of the encoder alone on uint8 patches already on the device."""
    import torch

    p = _project()
    enc = p.create_encoder(name, pretrained=False, target_img_size=sizes.input_size)
    p.prepare_encoder(enc, device)
    x = torch.randint(0, 256, (batch, 256, 256, 3), dtype=torch.uint8, device=device)
    return timed_rate(lambda: p.encode_batch(enc, x, device), batch, sizes.seconds, device)


def probe_end_to_end(jobs, sizes: ProbeSizes, device: str, workers: int) -> float:
    """Patches/s from slide to features: extraction's own data path (``encode_cohort``)."""
    from .patch_pipeline import encode_cohort

    p = _project()
    enc = p.create_encoder(sizes.student, pretrained=False, target_img_size=sizes.input_size)
    n, t0 = 0, time.perf_counter()
    for res in encode_cohort(enc, jobs, batch_size=sizes.batch, num_workers=workers,
                             device=device):  # fmt: skip
        if res.error:
            raise RuntimeError(res.error)
        n += len(res.features)
    return n / (time.perf_counter() - t0)


def probe_finetune_step(sizes: ProbeSizes, device: str, info=None, teacher_dim: int = 1024):
    """Windows/s of MCM-KD optimizer steps (the trainer's own ``train_step``): the windows'
    patches copied to the device, student forward + backward on the visible ones, context
    predictor, cosine on the masked ones (1024-d targets, as if cached), gradient all-reduce
    and update. Under 2 ranks each runs its half of every step."""
    import itertools

    import numpy as np
    import torch

    from .distributed import DistInfo
    from .mcmkd.config import FinetuneConfig
    from .mcmkd.losses import TargetStandardizer
    from .mcmkd.steps import Learner, build_optimizer, set_student_mode, train_step

    info = info or DistInfo()
    p = _project()
    cfg = FinetuneConfig("", "", "", "probe", student=sizes.student, input_size=sizes.input_size,
                         grid=sizes.grid, batch_size=sizes.windows, progress=False)  # fmt: skip
    enc = p.create_encoder(sizes.student, pretrained=False, target_img_size=sizes.input_size)
    student = p.prepare_encoder(enc, device)
    predictor = p.ContextPredictor(enc.out_dim, teacher_dim, sizes.grid).to(device)
    optimizer = build_optimizer(cfg, student, predictor)
    learner = Learner(
        student, enc.transforms, predictor,
        TargetStandardizer(torch.zeros(teacher_dim), torch.ones(teacher_dim)).to(device),
        optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0),
    )  # fmt: skip
    set_student_mode(student, cfg.freeze_bn)
    mine = np.arange(sizes.windows)[info.rank :: info.world_size]
    g2 = sizes.grid**2
    batch = {"patches": torch.randint(0, 256, (len(mine), g2, 256, 256, 3), dtype=torch.uint8),
             "teacher": torch.randn(len(mine), g2, teacher_dim)}  # fmt: skip
    if str(device).startswith("cuda"):  # as the loader hands them over
        batch = {k: v.pin_memory() for k, v in batch.items()}

    def step():
        train_step(learner, itertools.repeat(batch), [mine], 0, sizes.windows, cfg, device, info)

    return timed_rate(step, sizes.windows, sizes.seconds, device, info=info)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _join_ranks(rank: int, port: int, device: str):
    """Become rank `rank` of 2 (as torchrun would make it): (DistInfo, this rank's device)."""
    import torch

    from . import distributed as du

    torch.set_num_threads(1)  # a forked OpenMP pool can hang (as DataLoader workers avoid)
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip
    info = du.init_distributed(device, timeout_s=300)
    return info, du.rank_device(device, info)


def _allreduce_rank(rank: int, port: int, device: str, out_dir: str, numel: int) -> None:
    """One rank of the all-reduce probe (module level: spawn must import it)."""
    import torch

    from . import distributed as du

    info, dev = _join_ranks(rank, port, device)
    grads = torch.ones(numel, dtype=torch.float32, device=dev)
    calls = timed_rate(lambda: du.all_reduce_(grads, info), 1, 1.0, dev, max_calls=50, info=info)
    ranks = du.all_reduce_sum([1.0], info)[0]  # the CPU-side path, on the same group
    du.barrier(info)
    du.cleanup(info)
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps({"rate": calls, "ranks": ranks}))


def _finetune_rank(rank: int, port: int, device: str, out_dir: str, sizes: dict) -> None:
    """One rank of the 2-rank fine-tune step probe."""
    from . import distributed as du

    info, dev = _join_ranks(rank, port, device)
    rate = probe_finetune_step(ProbeSizes(**sizes), dev, info)
    ranks = du.all_reduce_sum([1.0], info)[0]
    du.barrier(info)
    du.cleanup(info)
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps({"rate": rate, "ranks": ranks}))


def run_two_ranks(rank_fn, device: str, *args) -> float:
    """Rank 0's rate from `rank_fn` run by 2 processes (spawned for CUDA, which cannot be
    forked; forked on the CPU, which is quick)."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as out:
        method = "spawn" if str(device).startswith("cuda") else "fork"
        mp.start_processes(rank_fn, args=(_free_port(), device, out, *args), nprocs=2,
                           start_method=method)  # fmt: skip
        result = json.loads(Path(out, "rank0.json").read_text())
    if result["ranks"] != 2:
        raise RuntimeError(f"2-rank probe summed {result['ranks']} ranks")
    return result["rate"]


def probe_allreduce(device: str, numel: int) -> tuple[float, str]:
    """Bus bandwidth (GB/s) of a 2-rank all-reduce of `numel` float32 through our helpers."""
    from .distributed import process_group_backend

    algbw = numel * 4 * run_two_ranks(_allreduce_rank, device, numel) / 1e9
    return algbw * 2 * (2 - 1) / 2, process_group_backend(device)


def probe_finetune_ranks(device: str, sizes: ProbeSizes) -> float:
    """Windows/s of MCM-KD steps over 2 ranks (each its half of every step), gradients summed
    through the project's collectives."""
    return run_two_ranks(_finetune_rank, device, asdict(sizes))


# ----------------------------------------------------------------------------- the report


def run_doctor(
    device: str = "auto", *, workdir=None, quick: bool = False, seconds: float | None = None
) -> DoctorReport:
    """Versions, GPUs, then every probe this machine can run (the rest listed as skipped);
    `seconds` per throughput probe overrides the device's default."""
    from .patch_pipeline import default_num_workers
    from .utils import resolve_device

    report = DoctorReport()
    add_versions(report)
    n_gpus = add_gpus(report)
    device = resolve_device(device)
    cuda = device.startswith("cuda")
    sizes = ProbeSizes.for_device(device, quick)
    if seconds is not None:
        sizes = replace(sizes, seconds=float(seconds))
    workers = default_num_workers()
    add_shm(report, workers)
    where = "GPU bf16 + channels_last" if cuda else "CPU float32, small probe sizes"
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        jobs, e2e_jobs = make_probe_slide(Path(tmp), sizes)
        rate = probe_loader(jobs, sizes, workers, cuda)
        report.add("probe", "loader (uint8 patches)", rate, "patches/s",
                   f"workers={workers}, {sizes.copies} x generated {sizes.slide}^2 JPEG TIFF")  # fmt: skip
        rate = probe_model(sizes.student, sizes, device, sizes.batch)
        report.add("probe", f"model {sizes.student}", rate, "patches/s",
                   f"{where}, batch {sizes.batch}, {sizes.input_size} px")  # fmt: skip
        rate = probe_end_to_end(e2e_jobs, sizes, device, workers)
        report.add("probe", f"extraction {sizes.student}", rate, "patches/s",
                   f"slide -> features, workers={workers}, {where}")  # fmt: skip
        rate = probe_model(sizes.teacher, sizes, device, sizes.teacher_batch)
        stand_in = "" if sizes.teacher == "vit_large_patch16_224" else ", stands in for ViT-L/16"
        report.add("probe", f"teacher fill {sizes.teacher}", rate, "patches/s",
                   f"model only, {where}, batch {sizes.teacher_batch}{stand_in}")  # fmt: skip
    rate = probe_finetune_step(sizes, device)
    report.add("probe", f"fine-tune step {sizes.student}", rate, "windows/s",
               f"{sizes.grid}x{sizes.grid} windows, half masked, {sizes.windows} per step, "
               f"1024-d targets (a ViT-L/16 teacher's width), {where}")  # fmt: skip
    numel = 8_500_000 if not quick else 1_000_000  # resnet50_trunc's gradients
    if n_gpus >= 2:
        bw, backend = probe_allreduce("cuda", numel)
        report.add("probe", "2-rank all-reduce", bw, "GB/s", f"{backend}, {numel * 4 / 1e6:.0f} MB")
        rate = probe_finetune_ranks("cuda", sizes)
        report.add("probe", f"2-rank fine-tune step {sizes.student}", rate, "windows/s",
                   f"{backend}, {sizes.windows} windows per step over both ranks")  # fmt: skip
    else:
        bw, backend = probe_allreduce("cpu", numel)
        report.add("probe", "2-rank all-reduce (CPU)", bw, "GB/s",
                   f"{backend} on CPU, {numel * 4 / 1e6:.0f} MB: the collective path, not NCCL")  # fmt: skip
        why = f"needs >= 2 GPUs ({n_gpus} here)"
        report.add("skipped", "2-rank NCCL all-reduce", note=why)
        report.add("skipped", "2-rank fine-tune step", note=f"{why}; the same probe runs on gloo "
                   "CPU ranks in the test suite")  # fmt: skip
    return report
