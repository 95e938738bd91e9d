"""``clam-mcmkd doctor``: what this machine has, and how fast each part of the pipeline runs on it.

One table (and the same as a JSON dict): library versions, GPUs and bf16 support, then a short
throughput probe on a generated slide: the patch loader alone, the model alone, extraction end
to end, the teacher (a ViT-L/16), one MCM-KD training step, and a 2-rank all-reduce. On a GPU
the probes use the real sizes (resnet50_trunc, ViT-L/16, bf16, channels_last); on a CPU they
shrink (each row says what ran) and the rows a CPU cannot answer say why they were skipped.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace

PACKAGES = ("torch", "torchvision", "timm", "tiatoolbox", "openslide-python", "tifffile",
            "imagecodecs", "h5py", "numpy", "clam-mcmkd")  # fmt: skip


def _project() -> SimpleNamespace:
    """The project pieces the probes use, imported in ONE place (several are being moved)."""
    from .clam.formats import write_coords_h5
    from .encoders import create_encoder
    from .encoders.forward import encode_batch, prepare_encoder
    from .mcmkd.predictor import ContextPredictor

    return SimpleNamespace(
        write_coords_h5=write_coords_h5,
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

    from .utils import CudaProbe

    probe = CudaProbe.probe()
    if not probe.available:
        report.add("gpu", "none", None, note=f"torch.cuda.is_available() is False: {probe.reason}")
        return 0
    for i in range(probe.device_count):
        p = torch.cuda.get_device_properties(i)
        bf16 = p.major >= 8
        report.add(
            "gpu", f"cuda:{i}", p.name, note=f"{p.total_memory / 2**30:.0f} GiB, "
            f"compute {p.major}.{p.minor}, bf16 {'yes' if bf16 else 'no (fp16 autocast)'}",
        )  # fmt: skip
    return probe.device_count


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
    import numpy as np

    from .cohort import make_slide
    from .patch_pipeline import SlideJob

    slide = workdir / f"probe_{sizes.slide}.tif"
    if not slide.is_file():
        make_slide(slide, size=sizes.slide, seed=0, positive=True)
    ys, xs = np.mgrid[0 : sizes.slide // 256, 0 : sizes.slide // 256]
    coords = np.stack([xs.ravel(), ys.ravel()], 1) * 256  # row by row, as tiling writes them
    paths = {}
    for name, rows in (("all", coords), ("e2e", coords[: sizes.e2e_patches or None])):
        paths[name] = _project().write_coords_h5(
            workdir / f"probe_{name}.h5", rows, patch_size=256, patch_level=0,
            downsample=(1.0, 1.0), downsampled_level_dim=(sizes.slide,) * 2,
            level_dim=(sizes.slide,) * 2, name="probe",
        )  # fmt: skip
    jobs = [SlideJob(f"probe{i}", str(slide), str(paths["all"])) for i in range(sizes.copies)]
    return jobs, [SlideJob("probe_e2e", str(slide), str(paths["e2e"]))]


def _sync(device: str) -> None:
    if str(device).startswith("cuda"):
        import torch

        torch.cuda.synchronize(device)


def timed_rate(step, per_call: int, seconds: float, device: str, max_calls: int = 10_000):
    """Items/s of `step()` after one warm-up call, over at least `seconds` (and >= 2 calls)."""
    step()
    _sync(device)
    calls, t0 = 0, time.perf_counter()
    while calls < max_calls and (calls < 2 or time.perf_counter() - t0 < seconds):
        step()
        calls += 1
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
    """Patches/s from slide to features: the cohort loader feeding the encoder."""
    from .patch_pipeline import iter_cohort_batches

    p = _project()
    enc = p.create_encoder(sizes.student, pretrained=False, target_img_size=sizes.input_size)
    p.prepare_encoder(enc, device)
    cuda = str(device).startswith("cuda")
    n, t0 = 0, time.perf_counter()
    for rec in iter_cohort_batches(jobs, sizes.batch, num_workers=workers, pin_memory=cuda):
        n += len(p.encode_batch(enc, rec.patches, device))
    _sync(device)
    return n / (time.perf_counter() - t0)


def probe_finetune_step(sizes: ProbeSizes, device: str, teacher_dim: int = 1024) -> float:
    """Windows/s of one MCM-KD optimizer step: student forward + backward on the visible
    patches, context predictor, cosine loss on the masked ones (teacher targets as if cached)."""
    import torch

    p = _project()
    enc = p.create_encoder(sizes.student, pretrained=False, target_img_size=sizes.input_size)
    student = p.prepare_encoder(enc, device).train()
    predictor = p.ContextPredictor(enc.out_dim, teacher_dim, sizes.grid).to(device)
    params = list(student.parameters()) + list(predictor.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4)
    b, g2 = sizes.windows, sizes.grid**2
    gen = torch.Generator().manual_seed(0)
    mask = torch.rand(b, g2, generator=gen).argsort(1) < g2 // 2  # half masked in each window
    mask = mask.to(device)
    patches = torch.randint(0, 256, (int((~mask).sum()), 256, 256, 3), dtype=torch.uint8)
    patches = patches.to(device)
    target = torch.randn(b, g2, teacher_dim, device=device)
    cuda = str(device).startswith("cuda")

    def step():
        x = enc.transforms.batch(patches)
        if cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            tokens = student(x).reshape(b, -1, enc.out_dim)
            pred = predictor(tokens, mask).float()
        loss = 1 - torch.nn.functional.cosine_similarity(pred[mask], target[mask], dim=-1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return timed_rate(step, b, sizes.seconds, device)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _allreduce_rank(rank: int, port: int, device: str, numel: int, out_dir: str) -> None:
    """One rank of the all-reduce probe (module level: spawn must import it)."""
    import torch

    from . import distributed as du

    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip
    info = du.init_distributed(device, timeout_s=120)
    dev = du.rank_device(device, info)
    grads = torch.ones(numel, dtype=torch.float32, device=dev)
    seconds = timed_rate(lambda: du.all_reduce_(grads, info), 1, 1.0, dev, max_calls=50)
    ranks = du.all_reduce_sum([1.0], info)[0]  # the CPU-side path, on the same group
    du.barrier(info)
    du.cleanup(info)
    Path(out_dir, f"rank{rank}.json").write_text(
        json.dumps({"calls_per_s": seconds, "ranks": ranks})
    )


def probe_allreduce(device: str, numel: int) -> tuple[float, str]:
    """Bus bandwidth (GB/s) of a 2-rank all-reduce of `numel` float32 through our helpers."""
    import torch.multiprocessing as mp

    from .distributed import process_group_backend

    with tempfile.TemporaryDirectory() as out:
        # CUDA cannot be forked; on CPU a fork is quick (the rank goes single-threaded first,
        # as DataLoader workers do: a forked OpenMP pool can hang)
        method = "spawn" if str(device).startswith("cuda") else "fork"
        mp.start_processes(_allreduce_rank, args=(_free_port(), device, numel, out), nprocs=2,
                           start_method=method)  # fmt: skip
        result = json.loads(Path(out, "rank0.json").read_text())
    if result["ranks"] != 2:
        raise RuntimeError(f"2-rank all-reduce probe summed {result['ranks']} ranks")
    rate = result["calls_per_s"]
    algbw = numel * 4 * rate / 1e9
    return algbw * 2 * (2 - 1) / 2, process_group_backend(device)


# ----------------------------------------------------------------------------- the report


def run_doctor(device: str = "auto", *, workdir=None, quick: bool = False) -> DoctorReport:
    """Versions, GPUs, then every probe this machine can run (the rest listed as skipped)."""
    from .patch_pipeline import default_num_workers
    from .utils import resolve_device

    report = DoctorReport()
    add_versions(report)
    n_gpus = add_gpus(report)
    device = resolve_device(device)
    cuda = device.startswith("cuda")
    sizes = ProbeSizes.for_device(device, quick)
    workers = default_num_workers()
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
    else:
        bw, backend = probe_allreduce("cpu", numel)
        report.add("probe", "2-rank all-reduce (CPU)", bw, "GB/s",
                   f"{backend} on CPU, {numel * 4 / 1e6:.0f} MB: the collective path, not NCCL")  # fmt: skip
        report.add("skipped", "2-rank NCCL all-reduce", note=f"needs >= 2 GPUs ({n_gpus} here)")
    report.add("skipped", "2-rank fine-tune step", note="needs the DDP trainer wiring (phase 2)")
    return report
