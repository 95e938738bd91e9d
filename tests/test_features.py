"""Fast patch loader and ``extract-features``: equal to OpenSlide / CLAM, resumable, sharded."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import openslide
import pytest
import tifffile
import torch
from click.testing import CliRunner

from clam_mcmkd.clam import formats
from clam_mcmkd.cli import main
from clam_mcmkd.encoders import create_encoder
from clam_mcmkd.features import SUMMARY_NAME, ExtractConfig, extract_features
from clam_mcmkd.patch_loader import PatchReader
from clam_mcmkd.patch_pipeline import iter_patch_batches
from clam_mcmkd.slides import SlideError

torch.set_num_threads(2)
REPO = Path(__file__).resolve().parents[1]


def write_pyramid_tiff(
    path: Path, width: int, height: int, *, photometric="rgb", compression="jpeg", seed=0
) -> Path:
    """A small generic pyramidal tiled TIFF (levels as pages, 2x apart) with varied content."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    img = np.stack(
        [xx * 255 // width, yy * 255 // height, ((xx // 37 + yy // 23) % 2) * 180 + 40], -1
    )
    img = np.clip(img + rng.integers(-25, 25, img.shape), 0, 255).astype(np.uint8)
    with tifffile.TiffWriter(path) as tif:
        for level in range(3):
            kw = {"subsampling": (2, 2)} if photometric == "ycbcr" else {}
            tif.write(
                img[:: 2**level, :: 2**level],
                tile=(256, 256),
                compression=compression,
                photometric=photometric,
                subfiletype=0 if level == 0 else 1,
                resolution=(2e4 / 2**level, 2e4 / 2**level),
                resolutionunit="CENTIMETER",
                **kw,
            )
    return path


def write_coords(path: Path, slide: Path, coords, patch_size: int, patch_level: int = 0) -> Path:
    osr = openslide.OpenSlide(str(slide))
    ds = osr.level_downsamples[patch_level]
    return formats.write_coords_h5(
        path,
        np.asarray(coords),
        patch_size=patch_size,
        patch_level=patch_level,
        downsample=(ds, ds),
        downsampled_level_dim=osr.level_dimensions[patch_level],
        level_dim=osr.level_dimensions[0],
        name=slide.stem,
    )


def openslide_patches(slide, coords, level, size) -> np.ndarray:
    """CLAM's read: one ``read_region(...).convert('RGB')`` per patch."""
    osr = openslide.OpenSlide(str(slide))
    return np.stack(
        [
            np.asarray(osr.read_region((int(x), int(y)), level, (size, size)).convert("RGB"))
            for x, y in coords
        ]
    )


def assert_same_pixels(ours: np.ndarray, ref: np.ndarray) -> None:
    """Same libjpeg-turbo on both sides: equal, up to decoder rounding if it ever differs."""
    assert ours.shape == ref.shape and ours.dtype == np.uint8
    diff = np.abs(ours.astype(np.int16) - ref.astype(np.int16))
    assert diff.max() <= 2 and diff.mean() < 0.05, (diff.max(), diff.mean())


# ----------------------------------------------------------------------------- loader


def test_loader_equals_openslide_on_cmu_svs(cmu_slide):
    rng = np.random.default_rng(0)
    coords = np.concatenate(
        [
            rng.integers(0, 2000, (24, 2)),
            [[0, 0], [2100, 2850], [2219, 2966], [2400, 100], [1000, 3100], [239, 479]],
        ]
    )  # inside, across the clipped right/bottom tiles, and past the edges (black)
    with PatchReader(cmu_slide, 0, 256) as reader:
        assert reader.is_fast, reader.stats.fallback_reason
        ours = reader.read_batch(coords)
        assert reader.stats.fast_patches == len(coords) and reader.stats.fallback_patches == 0
        assert reader.stats.tile_cache_hits > 0  # overlapping patches shared decoded tiles
    assert_same_pixels(ours, openslide_patches(cmu_slide, coords, 0, 256))
    assert (ours[-3] == 0).all()  # entirely outside the slide


@pytest.mark.parametrize("photometric", ["rgb", "ycbcr"])
def test_loader_equals_openslide_on_generated_pyramid(tmp_path, photometric):
    slide = write_pyramid_tiff(tmp_path / "s.tif", 1300, 1000, photometric=photometric)
    rng = np.random.default_rng(1)
    for level, size in ((0, 256), (1, 180), (2, 100)):
        coords = rng.integers(0, 330, (12, 2)) * 4  # multiples of 4: whole pixels at level 2
        with PatchReader(slide, level, size) as reader:
            assert reader.is_fast, reader.stats.fallback_reason
            ours = reader.read_batch(coords)
            assert reader.stats.fallback_patches == 0
        assert_same_pixels(ours, openslide_patches(slide, coords, level, size))


def test_loader_falls_back_to_openslide(tmp_path):
    # between two level-1 pixels OpenSlide interpolates: those patches go through OpenSlide
    slide = write_pyramid_tiff(tmp_path / "s.tif", 900, 700)
    coords = np.array([[101, 33], [100, 32], [3, 3]])
    with PatchReader(slide, 1, 128) as reader:
        ours = reader.read_batch(coords)
        assert reader.stats.fast_patches == 1 and reader.stats.fallback_patches == 2
    assert_same_pixels(ours, openslide_patches(slide, coords, 1, 128))
    # no JPEG tiles at all (deflate): the whole slide goes through OpenSlide
    flate = write_pyramid_tiff(tmp_path / "z.tif", 600, 500, compression="zlib")
    with PatchReader(flate, 0, 128) as reader:
        assert not reader.is_fast and "not JPEG" in reader.stats.fallback_reason
        ours = reader.read_batch(coords)
    np.testing.assert_array_equal(ours, openslide_patches(flate, coords, 0, 128))
    with pytest.raises(SlideError, match="z.tif.*patch_level 3 does not exist"):
        PatchReader(flate, 3, 128)


def test_batches_in_coords_order_with_workers(cmu_slide):
    coords = formats.CoordsH5(
        coords=np.array([[x, y] for y in range(0, 2900, 400) for x in range(0, 2200, 300)])[:23],
        patch_size=128,
        patch_level=0,
    )
    ref = openslide_patches(cmu_slide, coords.coords, 0, 128)
    for workers in (0, 2):
        batches = list(iter_patch_batches(cmu_slide, coords, 5, num_workers=workers))
        assert [len(b) for b in batches] == [5, 5, 5, 5, 3]
        assert_same_pixels(torch.cat(batches).numpy(), ref)


# ----------------------------------------------------------------------------- CLAM equivalence


def _clam_reference_features(slide, coords, patch_size) -> np.ndarray:
    """CLAM's chain, rebuilt without our code: openslide per patch, PIL transforms, its model."""
    import timm
    from torch import nn
    from torchvision import transforms

    class ClamTimmCNNEncoder(nn.Module):  # models/timm_wrapper.py, as CLAM writes it
        def __init__(self):
            super().__init__()
            self.model = timm.create_model(
                "resnet50.tv_in1k",
                features_only=True,
                out_indices=(3,),
                pretrained=False,
                num_classes=0,
            )
            self.pool = nn.AdaptiveAvgPool2d(1)

        def forward(self, x):
            out = self.model(x)
            out = out[0] if isinstance(out, list) else out
            return self.pool(out).squeeze(-1).squeeze(-1)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # the seeded init create_encoder(pretrained=False) uses
        model = ClamTimmCNNEncoder().eval()
    tf = transforms.Compose(
        [
            transforms.Resize(224),
            transforms.ToTensor(),
            transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        ]
    )
    wsi = openslide.OpenSlide(str(slide))
    feats = []
    with torch.inference_mode():
        for x, y in coords:
            img = wsi.read_region((int(x), int(y)), 0, (patch_size, patch_size)).convert("RGB")
            feats.append(model(tf(img).unsqueeze(0))[0].numpy())
    return np.stack(feats)


def test_resnet50_trunc_features_match_clams_chain(cmu_slide, tmp_path):
    slide_dir = tmp_path / "slides"
    slide_dir.mkdir()
    shutil.copy(cmu_slide, slide_dir / "cmu.svs")
    coords = np.array([[700, 800], [1200, 1500], [1500, 600], [400, 2200], [1900, 2600], [10, 5]])
    write_coords(tmp_path / "h5" / "patches" / "cmu.h5", slide_dir / "cmu.svs", coords, 256)
    cfg = ExtractConfig(
        data_h5_dir=str(tmp_path / "h5"),
        data_slide_dir=str(slide_dir),
        csv_path=None,
        feat_dir=str(tmp_path / "feats"),
        model="resnet50_trunc",
        pretrained=False,
        batch_size=4,
        device="cpu",
    )
    summary = extract_features(cfg)
    assert summary.done == ["cmu"]
    ours, our_coords = formats.read_features(cfg.feat_dir, "cmu", with_coords=True)
    np.testing.assert_array_equal(our_coords, coords)
    ref = _clam_reference_features(slide_dir / "cmu.svs", coords, 256)
    assert ours.shape == ref.shape == (6, 1024)
    cos = (ours * ref).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(ref, axis=1)
    rel = np.linalg.norm(ours - ref, axis=1) / np.linalg.norm(ref, axis=1)
    assert cos.min() >= 0.9999, cos
    assert rel.max() <= 0.01, rel
    # different patches give different features: the comparison is not trivially satisfied
    assert np.linalg.norm(ref[0] - ref[1]) > 10 * np.linalg.norm(ours[0] - ref[0])


# ----------------------------------------------------------------------------- the stage


@pytest.fixture(scope="module")
def tiny_cohort(tmp_path_factory):
    """Four small generated pyramidal TIFFs with 7, 9, 11 and 13 patches, and a dataset CSV."""
    root = tmp_path_factory.mktemp("cohort")
    slides, patches = root / "slides", root / "coords" / "patches"
    slides.mkdir()
    rows = []
    for i, (w, h) in enumerate([(700, 600), (900, 500), (600, 800), (520, 520)]):
        sid = f"s{i}"
        slide = write_pyramid_tiff(slides / f"{sid}.tif", w, h, seed=i)
        grid = np.array([[x, y] for y in range(0, h - 64, 90) for x in range(0, w - 64, 110)])
        write_coords(patches / f"{sid}.h5", slide, grid[: 7 + 2 * i], 96)
        rows.append({"case_id": f"c{i}", "slide_id": f"{sid}.tif", "label": "normal"})
    formats.write_dataset_csv(root / "dataset.csv", rows)
    return root


def _cli_args(root: Path, feat_dir: Path, *extra: str) -> list[str]:
    return [
        "extract-features",
        "--data_h5_dir", str(root / "coords"),
        "--data_slide_dir", str(root / "slides"),
        "--slide_ext", ".tif",
        "--csv_path", str(root / "dataset.csv"),
        "--feat_dir", str(feat_dir),
        "--model", "resnet18_trunc",
        "--target_patch_size", "64",
        "--no-pretrained",
        "--device", "cpu",
        *extra,
    ]  # fmt: skip


def _features(feat_dir: Path, ids=("s0", "s1", "s2", "s3")) -> dict[str, np.ndarray]:
    return {sid: formats.read_features(feat_dir, sid) for sid in ids}


def test_extract_features_cli_outputs_resume_and_invariance(tiny_cohort, tmp_path):
    feat_dir = tmp_path / "feats"
    result = CliRunner().invoke(main, _cli_args(tiny_cohort, feat_dir, "--batch-size", "4"))
    assert result.exit_code == 0, result.output
    assert "4 done, 0 skipped, 0 failed" in result.output
    for i in range(4):
        sid = f"s{i}"
        with h5py.File(feat_dir / "h5_files" / f"{sid}.h5") as f:
            feats, coords = f["features"][:], f["coords"][:]
        expected = formats.read_coords_h5(tiny_cohort / "coords" / "patches" / f"{sid}.h5")
        np.testing.assert_array_equal(coords, expected.coords)  # coords order kept
        assert feats.shape == (len(expected.coords), 256) and feats.dtype == np.float32
        pt = torch.load(feat_dir / "pt_files" / f"{sid}.pt", weights_only=True)
        np.testing.assert_array_equal(pt.numpy(), feats)
    config = json.loads((feat_dir / "extract_config.json").read_text())
    assert config["model"] == "resnet18_trunc" and config["batch_size"] == 4
    summary = json.loads((feat_dir / SUMMARY_NAME).read_text())
    assert summary["extra"]["patches"] == 7 + 9 + 11 + 13 and summary["extra"]["patches_per_s"] > 0
    first = _features(feat_dir)

    # resume: finished slides are skipped; a half-written temp file is not "done"
    (feat_dir / "pt_files" / "s2.pt").rename(feat_dir / "pt_files" / ".s2.abc.tmp.pt")
    mtime = (feat_dir / "h5_files" / "s0.h5").stat().st_mtime_ns
    result = CliRunner().invoke(main, _cli_args(tiny_cohort, feat_dir))
    assert "1 done, 3 skipped, 0 failed" in result.output, result.output
    assert (feat_dir / "h5_files" / "s0.h5").stat().st_mtime_ns == mtime
    np.testing.assert_allclose(_features(feat_dir)["s2"], first["s2"], rtol=1e-4, atol=1e-5)

    # batch size and worker count do not change the features
    other = tmp_path / "feats_b7_w2"
    result = CliRunner().invoke(
        main, _cli_args(tiny_cohort, other, "--batch-size", "7", "--num-workers", "2")
    )
    assert "4 done" in result.output, result.output
    for sid, feats in _features(other).items():
        np.testing.assert_allclose(feats, first[sid], rtol=1e-4, atol=1e-5)

    # --no-auto-skip recomputes everything
    result = CliRunner().invoke(main, _cli_args(tiny_cohort, other, "--no-auto-skip"))
    assert "4 done, 0 skipped" in result.output, result.output


def test_bad_slide_and_bad_coords_are_logged_and_skipped(tiny_cohort, tmp_path):
    root = tmp_path / "bad"
    shutil.copytree(tiny_cohort, root)
    (root / "slides" / "s1.tif").write_bytes(b"this is not a slide")
    with h5py.File(root / "coords" / "patches" / "s3.h5", "w") as f:
        f["not_coords"] = np.zeros(3)
    (root / "coords" / "patches" / "s2.h5").unlink()
    feat_dir = tmp_path / "feats"
    result = CliRunner().invoke(main, _cli_args(root, feat_dir))
    assert result.exit_code == 0, result.output
    assert "1 done, 0 skipped, 3 failed" in result.output
    summary = json.loads((feat_dir / SUMMARY_NAME).read_text())
    assert summary["done"] == ["s0"]
    assert "s1.tif" in summary["failed"]["s1"]
    assert "coords file does not exist" in summary["failed"]["s2"]
    assert "no 'coords' dataset" in summary["failed"]["s3"]
    assert sorted(p.name for p in (feat_dir / "pt_files").iterdir()) == ["s0.pt"]


def test_extract_features_config_errors(tiny_cohort, tmp_path):
    result = CliRunner().invoke(
        main, _cli_args(tiny_cohort, tmp_path / "f", "--model", "mcmkd_resnet50")
    )
    assert result.exit_code != 0 and "MCMKD_CKPT_PATH" in result.output
    args = _cli_args(tiny_cohort, tmp_path / "f")
    args[args.index("--data_slide_dir") + 1] = str(tmp_path / "missing")
    result = CliRunner().invoke(main, args)
    assert result.exit_code != 0 and "--data-slide-dir does not exist" in result.output


def test_timm_teacher_extracts_features(tiny_cohort, tmp_path):
    args = _cli_args(tiny_cohort, tmp_path / "f", "--batch-size", "16")
    args[args.index("--model") + 1] = "resnet18"  # a timm name: pooled 512-d, its own 224 input
    result = CliRunner().invoke(main, args)
    assert "4 done, 0 skipped, 0 failed" in result.output, result.output
    feats = _features(tmp_path / "f")
    assert feats["s3"].shape == (13, 512) and np.isfinite(feats["s3"]).all()


def test_bf16_autocast_extraction_runs_on_the_cpu(tiny_cohort, tmp_path):
    """--precision bf16 runs bf16 autocast on the CPU (the GPU's default path, in the suite):
    the features are close to float32's but not equal to them (bf16 did run)."""
    for precision in ("fp32", "bf16"):
        args = _cli_args(tiny_cohort, tmp_path / precision, "--precision", precision)
        result = CliRunner().invoke(main, args)
        assert "4 done, 0 skipped, 0 failed" in result.output, result.output
    fp32, bf16 = _features(tmp_path / "fp32"), _features(tmp_path / "bf16")
    for sid in fp32:
        assert bf16[sid].dtype == np.float32 and not np.array_equal(bf16[sid], fp32[sid])
        cos = (bf16[sid] * fp32[sid]).sum(1) / np.linalg.norm(bf16[sid], axis=1)
        assert (cos / np.linalg.norm(fp32[sid], axis=1)).min() > 0.99


def test_torchrun_two_ranks_match_one_process(tiny_cohort, tmp_path):
    single = tmp_path / "single"
    assert CliRunner().invoke(main, _cli_args(tiny_cohort, single)).exit_code == 0
    multi = tmp_path / "multi"
    env = dict(os.environ, CLAM_MCMKD_NO_PROGRESS="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "clam_mcmkd.cli", *_cli_args(tiny_cohort, multi)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "4 done, 0 skipped, 0 failed" in proc.stdout
    summary = json.loads((multi / SUMMARY_NAME).read_text())
    assert sorted(summary["done"]) == ["s0", "s1", "s2", "s3"]
    assert summary["extra"]["device"] == "cpu x2"
    ref = _features(single)
    for sid, feats in _features(multi).items():
        np.testing.assert_allclose(feats, ref[sid], rtol=1e-4, atol=1e-5)


def test_array_job_shards_split_by_patch_count_and_resume(tiny_cohort, tmp_path):
    """--shard I/N: each array job extracts its slides (balanced by patch count: 7, 9, 11, 13
    patches -> {13, 7} and {11, 9}, where round-robin would give 18 and 22) into the same
    feat_dir, writes its own run files, and skips its finished slides when run again."""
    from clam_mcmkd.distributed import DistInfo
    from clam_mcmkd.features import my_slides

    single = tmp_path / "single"
    assert CliRunner().invoke(main, _cli_args(tiny_cohort, single)).exit_code == 0
    feat_dir = tmp_path / "sharded"
    for shard in ("1/2", "0/2"):
        args = _cli_args(tiny_cohort, feat_dir, "--shard", shard, "--dist-timeout", "30m")
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0 and "2 done, 0 skipped, 0 failed" in result.output, (
            result.output
        )
    summaries = [json.loads((feat_dir / f"extract_summary.shard-{i}-of-2.json").read_text())
                 for i in range(2)]  # fmt: skip
    assert [sorted(s["done"]) for s in summaries] == [["s0", "s3"], ["s1", "s2"]]
    assert [s["extra"]["patches"] for s in summaries] == [20, 20]
    assert (feat_dir / "extract_config.shard-0-of-2.json").is_file()
    assert not (feat_dir / SUMMARY_NAME).exists()  # the jobs never overwrite one another
    ref = _features(single)
    for sid, feats in _features(feat_dir).items():
        np.testing.assert_allclose(feats, ref[sid], rtol=1e-4, atol=1e-5)
    result = CliRunner().invoke(main, _cli_args(tiny_cohort, feat_dir, "--shard", "0/2"))
    assert "0 done, 2 skipped, 0 failed" in result.output, result.output
    # torchrun ranks within a shard are balanced the same way
    cfg = ExtractConfig(str(tiny_cohort / "coords"), str(tiny_cohort / "slides"), None, "x")
    ids = ["s0", "s1", "s2", "s3"]
    assert my_slides(cfg, ids, DistInfo(rank=1, world_size=2)) == ["s1", "s2"]
    cfg.shard = "0/2"
    assert my_slides(cfg, ids, DistInfo(rank=1, world_size=2)) == ["s0"]
    result = CliRunner().invoke(main, _cli_args(tiny_cohort, feat_dir, "--shard", "2/2"))
    assert result.exit_code != 0 and "--shard 2/2: need 0 <= I < N" in result.output


def test_unwritable_features_fail_their_slide_not_the_run(tiny_cohort, tmp_path):
    """The writer thread's errors reach the summary: NaN features (an encoder checkpoint with a
    NaN weight) are refused by the writer, each slide is a failure, nothing is left behind."""
    enc = create_encoder("resnet18_trunc", pretrained=False, target_img_size=64)
    state = enc.model.state_dict()
    key = next(k for k in state if k.endswith("conv1.weight"))
    state[key][0, 0, 0, 0] = float("nan")
    ckpt = tmp_path / "nan.pt"
    torch.save(state, ckpt)
    feat_dir = tmp_path / "feats"
    result = CliRunner().invoke(main, _cli_args(tiny_cohort, feat_dir, "--ckpt", str(ckpt)))
    assert result.exit_code == 1 and "0 done, 0 skipped, 4 failed" in result.output, result.output
    summary = json.loads((feat_dir / SUMMARY_NAME).read_text())
    assert all("features contain NaN" in msg for msg in summary["failed"].values()), summary
    assert not any((feat_dir / "pt_files").glob("*")) and not any((feat_dir / "h5_files").glob("*"))


def test_encoder_matches_direct_forward(tiny_cohort):
    """encode_batches is the plain model on CLAM's transforms (what finetune/benchmark reuse)."""
    from clam_mcmkd.encoders.forward import encode_batches

    enc = create_encoder("resnet18_trunc", pretrained=False, target_img_size=64)
    patches = openslide_patches(tiny_cohort / "slides" / "s0.tif", [[0, 0], [96, 96]], 0, 96)
    ours = encode_batches(enc, [patches[:1], patches[1:]])
    with torch.no_grad():
        batched = enc.model(enc.transforms.batch(torch.from_numpy(patches))).numpy()
        pil = torch.stack([enc.model(enc.transforms(p)[None])[0] for p in patches]).numpy()
    np.testing.assert_allclose(ours, batched, rtol=1e-4, atol=1e-5)
    cos = (ours * pil).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(pil, axis=1)
    assert cos.min() > 0.999  # PIL's chain rounds the resized image to uint8; we do not


# ----------------------------------------------------------------------------- newcomer friction


def test_slide_extension_is_found_or_named(tiny_cohort, tmp_path):
    args = _cli_args(tiny_cohort, tmp_path / "found")
    del args[args.index("--slide_ext") : args.index("--slide_ext") + 2]  # the default: detect
    result = CliRunner().invoke(main, args)
    assert "4 done, 0 skipped, 0 failed" in result.output, result.output
    args = _cli_args(tiny_cohort, tmp_path / "named")
    args[args.index("--slide_ext") + 1] = ".svs"
    result = CliRunner().invoke(main, args)
    assert "0 done, 0 skipped, 4 failed" in result.output, result.output
    failed = json.loads((tmp_path / "named" / SUMMARY_NAME).read_text())["failed"]
    assert "s0.svs: slide file does not exist" in failed["s0"] and "*.tif slides" in failed["s0"]


def test_offline_pretrained_encoder_is_one_line_and_writes_nothing(
    tiny_cohort, tmp_path, hub_offline
):
    args = _cli_args(tiny_cohort, tmp_path / "feats")
    args.remove("--no-pretrained")  # CLAM's ImageNet ResNet-50 weights: not reachable here
    args[args.index("--model") + 1] = "resnet50_trunc"
    result = CliRunner().invoke(main, args)
    assert result.exit_code != 0 and "Traceback" not in result.output
    error = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(error) == 1 and "resnet50_trunc: cannot load pretrained weights" in error[0]
    assert "--no-pretrained" in error[0] and "--ckpt PATH" in error[0]
    assert not (tmp_path / "feats" / "extract_config.json").exists()


def test_coords_outside_the_slide_are_counted_per_slide(tiny_cohort, tmp_path, caplog):
    import logging

    root = tmp_path / "outside"
    shutil.copytree(tiny_cohort, root)
    h5 = root / "coords" / "patches" / "s0.h5"
    coords = formats.read_coords_h5(h5).coords
    write_coords(
        h5, root / "slides" / "s0.tif", np.concatenate([coords, [[650, 10], [10, 560]]]), 96
    )
    with caplog.at_level(logging.WARNING, logger="clam_mcmkd"):
        result = CliRunner().invoke(main, _cli_args(root, tmp_path / "feats"))
    assert "4 done" in result.output, result.output
    warned = sorted(r.getMessage() for r in caplog.records if "outside the slide" in r.getMessage())
    # s0: the two added rows; s3 (520 px wide): the fixture's grid has a 64 px margin for 96 px
    # patches, so its right and bottom patches overhang the edge too (found by this warning)
    assert len(warned) == 2
    assert warned[0].startswith("s0.tif: 2 of 9 coords") and "700x600" in warned[0]
    assert warned[1].startswith("s3.tif: 2 of 13 coords") and "520x520" in warned[1]
