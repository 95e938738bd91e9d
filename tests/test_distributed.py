"""torchrun plumbing on CPU: real gloo process groups of 2 ranks (forked, a few seconds each).

A group created as ``cuda:gloo`` serves only CUDA tensors, exactly like an NCCL group: a CPU
collective on it fails with NCCL's own message. That is how the GPU-only failure is reproduced
without a GPU.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from click.testing import CliRunner

from clam_mcmkd import distributed as du
from clam_mcmkd.distributed import DistInfo
from clam_mcmkd.utils import CudaProbe, DeviceError, check_device

NCCL_REFUSAL = "No backend type associated with device type cpu"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, fn, out_dir, port, kwargs):
    os.environ.update(
        RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )  # fmt: skip
    torch.set_num_threads(1)
    result = (globals()[fn] if isinstance(fn, str) else fn)(rank, **kwargs)
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))


def run_two_ranks(fn, tmp_path: Path, **kwargs) -> list:
    """Run `fn(rank, **kwargs)` (a function, or the name of one here) in 2 forked ranks, as
    torchrun would (RANK, WORLD_SIZE, ... set); their JSON results."""
    mp.start_processes(
        _rank_main,
        args=(fn, str(tmp_path), _free_port(), kwargs),
        nprocs=2,
        start_method="fork",
    )
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]


# ----------------------------------------------------------------------------- defect 1


def _collectives(rank, backend):
    info = du.init_distributed("cpu", backend=backend, timeout_s=60)
    out = {"device_types": sorted(d.type for d in dist.group.WORLD._device_types)}
    try:  # what finetune's _allreduce_sum(..., "cpu") did on the NCCL-only group
        dist.all_reduce(torch.tensor([1.0], dtype=torch.float64, device="cpu"))
        out["old_path"] = "ok"
    except RuntimeError as err:
        out["old_path"] = str(err)
    out["sums"] = du.all_reduce_sum([rank + 1.0, 10.0 * rank, 3], info)
    out["objects"] = du.gather_objects({"rank": rank, "slides": [f"s{rank}"]}, info)
    layer = torch.nn.Linear(3, 2)
    with torch.no_grad():
        layer.weight.fill_(rank + 1.0)
    layer.weight.grad = torch.full_like(layer.weight, float(rank + 1))
    du.all_reduce_grads(list(layer.parameters()), info)  # bias has no grad here: zeros
    out["weight_grad"] = layer.weight.grad.unique().tolist()
    out["bias_grad"] = layer.bias.grad.tolist()
    t = torch.arange(4.0) * (rank + 1)
    out["tensor"] = du.all_reduce_(t, info).tolist()
    stats = [torch.full((2,), 2.0 * rank), torch.full((3,), 4.0 * rank + 1, dtype=torch.float64)]
    du.all_reduce_mean_(stats, info)  # e.g. BatchNorm running statistics: the ranks' mean
    out["means"] = [s.tolist() for s in stats]
    du.barrier(info)
    du.cleanup(info)
    return out


def test_cpu_collectives_on_a_group_that_refuses_cpu_tensors(tmp_path):
    ranks = run_two_ranks("_collectives", tmp_path, backend="cuda:gloo")
    for out in ranks:
        assert out["device_types"] == ["cuda"]
        assert NCCL_REFUSAL in out["old_path"]  # the defect, reproduced without a GPU
        assert out["sums"] == [3.0, 10.0, 6.0]
        assert out["objects"] == [{"rank": 0, "slides": ["s0"]}, {"rank": 1, "slides": ["s1"]}]
        assert out["weight_grad"] == [3.0] and out["bias_grad"] == [0.0, 0.0]
        assert out["tensor"] == [0.0, 3.0, 6.0, 9.0]
        assert out["means"] == [[1.0, 1.0], [3.0, 3.0, 3.0]]


def test_gpu_group_spec_serves_cpu_and_cuda(tmp_path):
    assert du.process_group_backend("cuda:1") == "cpu:gloo,cuda:nccl"
    assert du.process_group_backend("cpu") == "gloo"
    # the same two-backend structure, gloo standing in for NCCL: CPU collectives run on it
    ranks = run_two_ranks("_collectives", tmp_path, backend="cpu:gloo,cuda:gloo")
    for out in ranks:
        assert out["device_types"] == ["cpu", "cuda"]
        assert out["old_path"] == "ok" and out["sums"] == [3.0, 10.0, 6.0]


def test_helpers_are_identities_in_one_process():
    info = DistInfo()
    assert du.all_reduce_sum([1, 2.5], info) == [1.0, 2.5]
    assert du.gather_objects("x", info) == ["x"]
    t = torch.ones(2)
    assert du.all_reduce_(t, info) is t
    du.barrier(info)
    assert du.init_distributed("cpu") == DistInfo()  # not under torchrun
    with du.distributed_run("cpu") as (device, info):
        assert device == "cpu" and not info.enabled


# ----------------------------------------------------------------------------- defect 4


def _timed_barrier(rank, timeout_s, delay_s):
    info = du.init_distributed("cpu", timeout_s=timeout_s)
    if rank == 1:
        time.sleep(delay_s)
    t0 = time.perf_counter()
    try:
        du.barrier(info)
        outcome = "passed"
    except RuntimeError as err:
        outcome = str(err).splitlines()[0]
    return {"outcome": outcome, "waited": time.perf_counter() - t0}


def test_dist_timeout_reaches_the_process_group(tmp_path):
    assert du.DEFAULT_TIMEOUT_S >= 2 * 3600
    assert du.parse_timeout("2h") == 7200 and du.parse_timeout("90m") == 5400
    assert du.parse_timeout(30) == 30 and du.parse_timeout("1d") == 86400
    with pytest.raises(du.ClamMcmkdError, match="--dist-timeout 'soon'"):
        du.parse_timeout("soon")
    # a 1 s timeout and a rank 3 s late: the waiting rank gives up after ~1 s, not 30 min
    ranks = run_two_ranks("_timed_barrier", tmp_path, timeout_s=1.0, delay_s=3.0)
    assert ranks[0]["outcome"] != "passed", ranks
    assert ranks[0]["waited"] < 2.8, ranks
    # a 10 s timeout and a rank 1 s late: the barrier waits for it
    ranks = run_two_ranks("_timed_barrier", tmp_path, timeout_s=10.0, delay_s=1.0)
    assert [r["outcome"] for r in ranks] == ["passed", "passed"], ranks


def _my_shard(rank, items, sizes):
    with du.distributed_run("cpu", timeout_s=30) as (device, info):
        mine = du.shard(items, info, sizes)
        everyone = du.gather_objects(mine, info)
    return {"mine": mine, "everyone": everyone, "device": device, "left": dist.is_initialized()}


def test_shard_by_patch_count_balances_ranks(tmp_path):
    items = [f"s{i}" for i in range(7)]
    sizes = [5000, 40, 4800, 60, 100, 90, 120]  # round-robin: 9990 vs 220 patches
    ranks = run_two_ranks("_my_shard", tmp_path, items=items, sizes=sizes)
    assert ranks[0]["everyone"] == ranks[1]["everyone"]  # same answer on every rank
    assert [(r["device"], r["left"]) for r in ranks] == [("cpu", False)] * 2
    parts = ranks[0]["everyone"]
    assert sorted(parts[0] + parts[1]) == items  # disjoint and covering
    loads = [sum(sizes[items.index(s)] for s in part) for part in parts]
    assert max(loads) - min(loads) <= 200, loads
    assert parts[0] == sorted(parts[0])  # each rank keeps the cohort's order
    # equal sizes (no counts known) degrade to round-robin
    assert du.shard(items, DistInfo(rank=1, world_size=3)) == items[1::3]


def test_pack_by_size_is_lpt_and_deterministic():
    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 10_000, 200).tolist()
    packed = du.pack_by_size(sizes, 8)
    assert sorted(i for p in packed for i in p) == list(range(200))
    loads = [sum(sizes[i] for i in p) for p in packed]
    assert max(loads) - min(loads) <= max(sizes)  # LPT's guarantee
    assert packed == du.pack_by_size(list(sizes), 8)
    assert du.pack_by_size([], 3) == [[], [], []]


def test_shard_i_of_n_for_array_jobs(tmp_path):
    assert du.parse_shard("0/8") == (0, 8) and du.parse_shard(" 7 / 8 ") == (7, 8)
    for bad in ("8/8", "1-8", "a/b", "-1/4"):
        with pytest.raises(du.ClamMcmkdError, match="--shard"):
            du.parse_shard(bad)
    items = [f"s{i}" for i in range(10)]
    sizes = [10, 1, 1, 1, 1, 1, 1, 1, 1, 9]
    parts = [du.shard_of(items, i, 3, sizes) for i in range(3)]
    assert sorted(sum(parts, [])) == items
    assert parts[0] == ["s0"] and parts[1] == ["s9"]  # the two big slides alone
    # the h5 row counts that drive it; an unreadable file weighs 0 (it fails in its slot)
    import h5py

    for name, n in (("a", 5), ("b", 12)):
        with h5py.File(tmp_path / f"{name}.h5", "w") as f:
            f.create_dataset("coords", data=np.zeros((n, 2), np.int64))
    (tmp_path / "c.h5").write_text("not hdf5")
    paths = [tmp_path / f"{c}.h5" for c in "abcd"]
    assert du.coords_patch_counts(paths) == [5, 12, 0, 0]


# ----------------------------------------------------------------------------- defects 5 and 6


def test_each_rank_takes_its_local_gpu():
    two_gpus = CudaProbe(True, 2)
    rank1 = DistInfo(rank=3, world_size=4, local_rank=1, local_world_size=2)
    for asked in ("cuda", "cuda:0", "cuda:1"):
        assert du.rank_device(asked, rank1, two_gpus) == "cuda:1"
    assert du.rank_device("cpu", rank1, two_gpus) == "cpu"
    assert du.rank_device("cuda:0", DistInfo(), two_gpus) == "cuda:0"  # single process
    with pytest.raises(DeviceError, match="cuda:1 asked, but only 1 CUDA device"):
        du.rank_device("cuda", rank1, CudaProbe(True, 1))  # more ranks than GPUs
    kwargs = du.init_kwargs("cuda:1", timeout_s=60)
    assert kwargs["backend"] == "cpu:gloo,cuda:nccl"
    assert kwargs["device_id"] == torch.device("cuda", 1)
    assert kwargs["timeout"].total_seconds() == 60
    assert "device_id" not in du.init_kwargs("cpu")


def test_unusable_cuda_device_is_one_clear_error():
    none = CudaProbe(False, 0, "Found no NVIDIA driver on your system")
    with pytest.raises(DeviceError, match=r"--device cuda asked, but torch.cuda.is_available"):
        check_device("cuda", none)
    with pytest.raises(DeviceError, match=r"cuda:2 asked, but only 2 CUDA device\(s\)"):
        check_device("cuda:2", CudaProbe(True, 2))
    assert check_device("cuda:1", CudaProbe(True, 2)) == "cuda:1"
    assert check_device("cpu", none) == "cpu"
    with pytest.raises(DeviceError, match="--device gpu: not a device name"):
        check_device("gpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_cuda_on_this_machine_names_what_was_found(tmp_path):
    probe = CudaProbe.probe()
    assert not probe.available and probe.reason
    with pytest.raises(DeviceError) as err:
        check_device("cuda:0")
    assert "\n" not in str(err.value) and probe.reason in str(err.value)
    from clam_mcmkd.cli import main

    result = CliRunner().invoke(
        main,
        ["extract-features", "--data_h5_dir", str(tmp_path), "--data_slide_dir", str(tmp_path),
         "--feat_dir", str(tmp_path / "f"), "--device", "cuda"],
    )  # fmt: skip
    assert result.exit_code == 1, result.output
    assert "Error: --device cuda asked, but torch.cuda.is_available() is False" in result.output
    assert "Traceback" not in result.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
@pytest.mark.parametrize(
    "command", ["finetune", "train", "eval", "heatmap", "benchmark", "demo", "doctor"]
)
def test_every_device_option_is_checked_first(command, tmp_path):
    """--device cuda on this machine: every command that takes --device answers with one line
    naming what was found, before it reads or writes anything."""
    from clam_mcmkd.cli import main

    csv = tmp_path / "data.csv"
    csv.write_text("case_id,slide_id,label\nc0,s0,normal\n")
    out = tmp_path / "out"
    args = {
        "finetune": ["--data-h5-dir", str(tmp_path), "--data-slide-dir", str(tmp_path),
                     "--csv-path", str(csv), "--teacher", "resnet18", "--out", str(out / "x.pt")],
        "train": ["--data-root-dir", str(tmp_path), "--csv-path", str(csv), "--split-dir",
                  str(tmp_path), "--exp-code", "x", "--results-dir", str(out)],
        "eval": ["--data-root-dir", str(tmp_path), "--csv-path", str(csv), "--models-dir",
                 str(tmp_path / "models"), "--eval-dir", str(out)],
        "benchmark": ["--config", "demo", "--slides", str(tmp_path), "--labels", str(csv),
                      "--out", str(out)],
        "heatmap": ["--models-dir", str(tmp_path / "models"), "--data-root-dir", str(tmp_path),
                    "--data-h5-dir", str(tmp_path), "--data-slide-dir", str(tmp_path),
                    "--csv-path", str(csv), "--out", str(out)],
        "demo": ["--out", str(out)],
        "doctor": [],
    }[command]  # fmt: skip
    result = CliRunner().invoke(main, [command, *args, "--device", "cuda"])
    assert result.exit_code == 1, result.output
    assert "Error: --device cuda asked, but torch.cuda.is_available() is False" in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
    assert not out.exists()
