"""Encoder registry: CLAM's resnet50_trunc, the MCM-KD student checkpoint, timm teachers."""

from __future__ import annotations

import numpy as np
import openslide
import pytest
import torch
from click.testing import CliRunner

from clam_mcmkd.cli import main
from clam_mcmkd.encoders import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    MCMKD_CKPT_ENV,
    EncoderError,
    PatchTransforms,
    TimmCNNEncoder,
    create_encoder,
    encoder_flops_params,
    list_encoders,
    read_student_checkpoint,
    save_student_checkpoint,
)
from clam_mcmkd.encoders.forward import encode_patches

torch.set_num_threads(2)


def _cmu_patches(cmu_slide, n=4, size=256) -> np.ndarray:
    osr = openslide.OpenSlide(str(cmu_slide))
    coords = [(600 + 300 * i, 900 + 200 * i) for i in range(n)]
    return np.stack(
        [np.asarray(osr.read_region(c, 0, (size, size)).convert("RGB")) for c in coords]
    )


def _perturb(model: torch.nn.Module, seed: int = 1) -> None:
    """Weights unlike any seeded init, so a load that silently fails cannot pass."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=gen))


def test_resnet50_trunc_is_clams_structure():
    enc = create_encoder("resnet50_trunc", pretrained=False)
    assert isinstance(enc.model, TimmCNNEncoder)
    assert enc.out_dim == 1024
    assert isinstance(enc.model.pool, torch.nn.AdaptiveAvgPool2d)
    assert enc.model.model.feature_info.out_indices == (3,)
    assert enc.transforms == PatchTransforms(224, IMAGENET_MEAN, IMAGENET_STD)
    assert not enc.model.training
    with torch.no_grad():
        assert enc.model(torch.zeros(2, 3, 64, 64)).shape == (2, 1024)
    # the same name + seed gives the same untrained weights (baseline == student init)
    again = create_encoder("resnet50_trunc", pretrained=False)
    for (k, a), (_, b) in zip(enc.model.state_dict().items(), again.model.state_dict().items()):
        assert torch.equal(a, b), k


@pytest.mark.parametrize("size", [256, 300, 224])
def test_batched_transforms_match_clams_pil_chain(cmu_slide, size):
    patches = _cmu_patches(cmu_slide, n=3, size=size)
    tf = PatchTransforms(224)
    ref = torch.stack([tf(p) for p in patches])  # CLAM: PIL Resize -> ToTensor -> Normalize
    ours = tf.batch(torch.from_numpy(patches))
    assert ours.shape == ref.shape == (3, 3, 224, 224)
    diff = (ours - ref).abs()
    # PIL rounds the resized image to uint8; we keep float: half a grey level, over the std
    assert diff.max().item() < 1.5 / 255 / min(IMAGENET_STD)
    assert diff.mean().item() < 0.3 / 255 / min(IMAGENET_STD)


def test_batched_transforms_keep_aspect_like_torchvision():
    tf = PatchTransforms(56)
    x = torch.randint(0, 255, (2, 80, 120, 3), dtype=torch.uint8)
    assert tf.batch(x).shape == (2, 3, 56, 84)
    assert tf(x[0].numpy()).shape == (3, 56, 84)


# ----------------------------------------------------------------------------- MCM-KD student


@pytest.fixture(scope="module")
def student_ckpt(tmp_path_factory):
    student = create_encoder("resnet50_trunc", pretrained=False).model
    _perturb(student)
    path = tmp_path_factory.mktemp("ckpt") / "mcmkd_resnet50.pt"
    save_student_checkpoint(
        path,
        student,
        arch="resnet50_trunc",
        transforms=PatchTransforms(224),
        config={"teacher": "vit_tiny_patch16_224"},
        metrics={"loss": 0.5},
    )
    return path, student


def test_mcmkd_student_loads_from_ckpt_and_env(student_ckpt, monkeypatch, cmu_slide):
    path, student = student_ckpt
    payload = read_student_checkpoint(path)
    assert payload["arch"] == "resnet50_trunc" and payload["metrics"] == {"loss": 0.5}
    monkeypatch.delenv(MCMKD_CKPT_ENV, raising=False)
    by_arg = create_encoder("mcmkd_resnet50", ckpt=path)
    monkeypatch.setenv(MCMKD_CKPT_ENV, str(path))
    by_env = create_encoder("mcmkd_resnet50")
    base = create_encoder("resnet50_trunc", pretrained=False)
    assert by_arg.out_dim == by_env.out_dim == base.out_dim == 1024
    assert by_arg.transforms == base.transforms
    for k, v in student.state_dict().items():
        assert torch.equal(by_arg.model.state_dict()[k], v), k
        assert torch.equal(by_env.model.state_dict()[k], v), k
    patches = _cmu_patches(cmu_slide, n=2, size=112)
    f_arg = encode_patches(by_arg, patches)
    f_env = encode_patches(by_env, patches)
    f_base = encode_patches(base, patches)
    assert f_arg.shape == (2, 1024)
    np.testing.assert_allclose(f_arg, f_env, rtol=1e-5, atol=1e-6)
    assert not np.allclose(f_arg, f_base, atol=1e-4)  # the fine-tuned weights are used


def test_mcmkd_student_errors(tmp_path, monkeypatch, student_ckpt):
    monkeypatch.delenv(MCMKD_CKPT_ENV, raising=False)
    with pytest.raises(EncoderError, match=MCMKD_CKPT_ENV):
        create_encoder("mcmkd_resnet50")
    missing = tmp_path / "nope.pt"
    with pytest.raises(EncoderError, match="nope.pt.*does not exist"):
        create_encoder("mcmkd_resnet50", ckpt=missing)
    plain = tmp_path / "plain.pt"
    torch.save(create_encoder("resnet18_trunc", pretrained=False).model.state_dict(), plain)
    with pytest.raises(EncoderError, match="plain.pt.*not an MCM-KD encoder checkpoint"):
        create_encoder("mcmkd_resnet50", ckpt=plain)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(EncoderError, match="garbage.pt.*not a readable"):
        create_encoder("mcmkd_resnet50", ckpt=garbage)
    # right format, wrong weights: a ResNet-18 body labelled as a ResNet-50 student
    payload = torch.load(student_ckpt[0], weights_only=False)
    payload["state_dict"] = torch.load(plain, weights_only=False)
    wrong = tmp_path / "wrong.pt"
    torch.save(payload, wrong)
    with pytest.raises(EncoderError, match="wrong.pt.*do not fit resnet50_trunc"):
        create_encoder("mcmkd_resnet50", ckpt=wrong)
    with pytest.raises(EncoderError, match="unknown student architecture"):
        save_student_checkpoint(
            tmp_path / "x.pt", student_ckpt[1], arch="vit9000", transforms=PatchTransforms()
        )


# ----------------------------------------------------------------------------- teachers


@pytest.mark.parametrize(("name", "dim"), [("resnet18", 512), ("vit_tiny_patch16_224", 192)])
def test_timm_teacher_offline(name, dim):
    enc = create_encoder(name, pretrained=False)
    assert enc.out_dim == dim
    size = enc.transforms.input_size
    assert size == 224
    x = torch.randint(0, 255, (2, 64, 64, 3), dtype=torch.uint8)
    with torch.no_grad():
        out = enc.model(enc.transforms.batch(x))
    assert out.shape == (2, dim) and torch.isfinite(out).all()


def test_timm_teacher_local_checkpoint(tmp_path):
    import timm

    trained = timm.create_model("resnet18", pretrained=False, num_classes=10)
    _perturb(trained)
    # a training-script checkpoint: DDP prefix, wrapped, with a classifier head
    state = {"module." + k: v for k, v in trained.state_dict().items()}
    path = tmp_path / "teacher.pth"
    torch.save({"state_dict": state, "epoch": 3}, path)
    enc = create_encoder("resnet18", pretrained=True, ckpt=path)  # no download: ckpt given
    loaded = enc.model.model.state_dict()
    for k, v in trained.state_dict().items():
        if not k.startswith("fc."):
            assert torch.equal(loaded[k], v), k
    other = tmp_path / "vit.pth"
    torch.save(timm.create_model("vit_tiny_patch16_224", pretrained=False).state_dict(), other)
    with pytest.raises(EncoderError, match="vit.pth.*do not fit"):
        create_encoder("resnet18", ckpt=other)


def test_unknown_encoder_and_uni_without_checkpoint(monkeypatch):
    with pytest.raises(EncoderError, match="unknown encoder 'no_such_net'"):
        create_encoder("no_such_net", pretrained=False)
    monkeypatch.delenv("UNI_CKPT_PATH", raising=False)
    with pytest.raises(EncoderError, match="UNI_CKPT_PATH"):
        create_encoder("uni_v1")


def test_flops_params_and_list_encoders():
    stats = encoder_flops_params(create_encoder("resnet18_trunc", pretrained=False))
    assert 2.0 < stats["params_m"] < 3.5  # ResNet-18 up to layer3: ~2.8 M parameters
    assert 0.5 < stats["gflops_per_patch"] < 5
    assert {"resnet50_trunc", "resnet18_trunc", "mcmkd_resnet50", "uni_v1"} <= set(list_encoders())
    result = CliRunner().invoke(main, ["list-encoders"])
    assert result.exit_code == 0, result.output
    assert "resnet50_trunc" in result.output and "mcmkd_resnet50" in result.output


# ----------------------------------------------------------------------------- library parity


def _previous_batch(tf: PatchTransforms, images: torch.Tensor) -> torch.Tensor:
    """PatchTransforms.batch as it was before torchvision v2 (torch's interpolate + in-place
    normalise): the reference the one transforms class must keep to the bit."""
    images = images.permute(0, 3, 1, 2)
    size = tf.input_size
    h, w = images.shape[-2:]
    if h != size or w != size:
        out = (size, int(size * w / h)) if h <= w else (int(size * h / w), size)
        if images.dtype != torch.uint8:
            images = images.float()
        images = torch.nn.functional.interpolate(
            images, size=out, mode="bilinear", antialias=True, align_corners=False
        )
    x = images.float() if images.dtype != torch.float32 else images.clone()
    std = torch.tensor(tf.std).view(1, 3, 1, 1)
    mean = torch.tensor(tf.mean).view(1, 3, 1, 1)
    return x.mul_(1.0 / (255.0 * std)).add_(-mean / std)


@pytest.mark.parametrize("size", [224, 256, 300, 112])
def test_transforms_on_torchvision_v2_equal_the_previous_code(cmu_slide, size):
    x = torch.from_numpy(_cmu_patches(cmu_slide, n=3, size=size))
    tf = PatchTransforms(224)
    assert torch.equal(tf.batch(x), _previous_batch(tf, x))  # uint8, on the CPU
    assert torch.equal(tf.batch(x.float()), _previous_batch(tf, x.float()))  # the CUDA path
    wide = torch.from_numpy(_cmu_patches(cmu_slide, n=2, size=size))[:, :, : size // 2]
    assert torch.equal(tf.batch(wide), _previous_batch(tf, wide))  # non-square: no crop


def test_checkpoint_layouts_through_timms_reader_and_ours(tmp_path):
    """timm's reader adds .safetensors and compiled ('_orig_mod.') checkpoints; the layouts it
    leaves wrapped (DINO's teacher/backbone, a 'module' key) are still unwrapped here."""
    import safetensors.torch
    import timm

    trained = timm.create_model("resnet18", pretrained=False, num_classes=0)
    _perturb(trained)
    sd = trained.state_dict()
    layouts = {
        "plain.pth": sd,
        "compiled.pth": {f"_orig_mod.{k}": v for k, v in sd.items()},
        "ema.pth": {"state_dict": sd, "state_dict_ema": {k: v * 0 for k, v in sd.items()}},
        "dino.pth": {"teacher": {f"backbone.{k}": v for k, v in sd.items()}, "epoch": 100},
        "wrapped.pth": {"module": sd},
    }
    for name, payload in layouts.items():
        torch.save(payload, tmp_path / name)
    safetensors.torch.save_file({k: v.contiguous() for k, v in sd.items()},
                                tmp_path / "hub.safetensors")  # fmt: skip
    for name in [*layouts, "hub.safetensors"]:
        enc = create_encoder("resnet18", pretrained=False, ckpt=tmp_path / name)
        loaded = enc.model.model.state_dict()
        assert all(torch.equal(loaded[k], v) for k, v in sd.items()), name  # non-EMA weights
