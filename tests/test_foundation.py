"""Foundation-model specs: published architectures (built on the meta device), the output rules
on a real small ViT, preprocessing against torchvision's PIL chain, and the ways to get weights
(local checkpoint, CLAM-style variable, hub offline -> one line)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import openslide
import pytest
import torch

from clam_mcmkd import encoders
from clam_mcmkd.encoders import EncoderError, PatchTransforms
from clam_mcmkd.encoders import foundation as fm
from clam_mcmkd.utils import ClamMcmkdError

# Published parameter counts (model cards / papers) live in each spec's ``params_m`` (with their
# source): a wrong depth, width, MLP ratio or token layout moves these by far more than 0.5%.
# Token sequence the cards state for a 224 px input: class + registers + patches.
TOKENS = {
    "uni_v1": 197,
    "uni2_h": 265,
    "virchow2": 261,
    "h_optimus_0": 261,
    "prov_gigapath": 197,
    "virchow": 257,
    "h0_mini": 261,
    "kaiko_vitl14": 261,
    "gpfm": 257,
    "conch_v15": 197,
}


@pytest.mark.parametrize("name", sorted(n for n, s in fm.SPECS.items() if s.offline))
def test_published_architecture_width_and_tokens_on_meta(name):
    spec = fm.SPECS[name]
    with torch.device("meta"):
        enc = fm.build_foundation_model(name, pretrained=False)
        out = enc.model(torch.zeros(2, 3, spec.input_size, spec.input_size))
        tokens = enc.model.model.forward_features(torch.zeros(1, 3, 224, 224))
    assert tuple(out.shape) == (2, spec.out_dim) == (2, enc.out_dim)
    params_m = sum(p.numel() for p in enc.model.parameters()) / 1e6
    assert params_m == pytest.approx(spec.params_m, rel=0.005)
    if name in TOKENS:
        assert tokens.shape[1] == TOKENS[name]
    assert isinstance(enc.transforms, PatchTransforms)
    assert enc.transforms.input_size == spec.input_size and enc.transforms.mean == spec.mean


def test_timms_offline_data_config_would_be_wrong_for_every_spec():
    """Offline, timm's data config for these archs is mean 0.5 or 518 px: never use it."""
    import timm

    for spec in map(fm.SPECS.get, ("uni_v1", "uni2_h", "virchow2", "h_optimus_0", "prov_gigapath")):
        with torch.device("meta"):
            model = timm.create_model(spec.arch, pretrained=False, **spec.model_kwargs())
        timm_cfg = timm.data.resolve_data_config({}, model=model)
        assert (tuple(timm_cfg["mean"]), timm_cfg["input_size"][-1]) != (spec.mean, 224)
        assert spec.transforms().input_size == 224
    assert fm.SPECS["h_optimus_0"].mean == (0.707223, 0.578729, 0.703617)
    assert fm.SPECS["prov_gigapath"].transforms().resize_size == 256
    assert fm.SPECS["virchow2"].interpolation == "bicubic"


# --------------------------------------------------------------------- a small stand-in, numerics

TINY_VIRCHOW = fm.FoundationModelSpec(
    name="tiny_virchow",
    hub_id="hf-hub:example/none",
    arch="vit_tiny_patch16_224",
    timm_kwargs=(
        ("img_size", 64),
        ("init_values", 1e-5),
        ("num_classes", 0),
        ("reg_tokens", 4),
        ("mlp_ratio", 5.3375),
        ("global_pool", ""),
        ("mlp_layer", "SwiGLUPacked"),
        ("act_layer", "SiLU"),
    ),  # fmt: skip
    out_dim=384,
    ckpt_env="TINY_VIRCHOW_CKPT_PATH",
    source="test stand-in with Virchow2's token layout",
    output="cls+mean_patch",
    input_size=64,
    resize_size=64,
)


def _tiny(**kw):
    torch.manual_seed(0)
    return fm.build_foundation_model(TINY_VIRCHOW, pretrained=False, **kw)


def test_virchow_rule_is_class_token_plus_mean_of_patch_tokens_without_registers():
    enc = _tiny()
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        tokens = enc.model.model(x)  # global_pool='' -> (B, 1 + 4 + 16, 192), after the norm
        out = enc.model(x)
    assert tokens.shape == (3, 21, 192)
    expected = torch.cat([tokens[:, 0], tokens[:, 5:].mean(dim=1)], dim=-1)
    torch.testing.assert_close(out, expected)
    assert out.shape == (3, enc.out_dim)
    # the registers really are left out: including them gives a different vector
    assert not torch.allclose(out[:, 192:], tokens[:, 1:].mean(dim=1), atol=1e-4)


def test_cls_rule_is_timms_normed_class_token():
    spec = dataclasses.replace(
        TINY_VIRCHOW,
        timm_kwargs=tuple(
            (k, "token" if k == "global_pool" else v) for k, v in TINY_VIRCHOW.timm_kwargs
        ),
        output="cls",
        out_dim=192,
    )
    torch.manual_seed(0)
    enc = fm.build_foundation_model(spec, pretrained=False)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        tokens = enc.model.model.forward_features(x)
        torch.testing.assert_close(enc.model(x), fm.pool_tokens(tokens, 5, "cls"))


def test_local_checkpoint_from_arg_or_variable_loads_the_weights(tmp_path, monkeypatch):
    reference = _tiny()
    path = tmp_path / "pytorch_model.bin"
    torch.save(reference.model.model.state_dict(), path)  # the hub layout: a bare state dict
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = reference.model(x)
    torch.manual_seed(123)  # a different random init underneath: the file must win
    from_arg = fm.build_foundation_model(TINY_VIRCHOW, pretrained=True, ckpt=path)
    monkeypatch.setenv("TINY_VIRCHOW_CKPT_PATH", str(path))
    from_env = fm.build_foundation_model(TINY_VIRCHOW, pretrained=True)
    with torch.no_grad():
        torch.testing.assert_close(from_arg.model(x), want)
        torch.testing.assert_close(from_env.model(x), want)


def test_checkpoint_of_another_architecture_is_one_line(tmp_path):
    path = tmp_path / "other.bin"
    torch.save({"blocks.0.weight": torch.zeros(3)}, path)
    with pytest.raises(EncoderError) as err:
        fm.build_foundation_model(TINY_VIRCHOW, ckpt=path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_unreachable_hub_is_one_line_with_the_ways_out(monkeypatch, hub_offline):
    monkeypatch.delenv("UNI2_CKPT_PATH", raising=False)
    with pytest.raises(ClamMcmkdError) as err:
        with torch.device("meta"):
            fm.build_foundation_model("uni2_h", pretrained=True)
    msg = str(err.value)
    assert isinstance(err.value, EncoderError)
    assert "\n" not in msg and msg.startswith("uni2_h: cannot load pretrained weights")
    for way_out in (
        "hf-hub:MahmoodLab/UNI2-h",
        "--no-pretrained",
        "--ckpt PATH",
        "$UNI2_CKPT_PATH",
    ):
        assert way_out in msg
    assert err.value.__cause__ is None and err.value.__suppress_context__


def test_registry_builder_and_unknown_name():
    build = fm.builder("virchow2")
    with torch.device("meta"):
        enc = build(pretrained=False, ckpt=None, target_img_size=224)
    assert enc.out_dim == 2560
    with pytest.raises(EncoderError, match="unknown foundation model 'virchow3'"):
        fm.builder("virchow3")


# --------------------------------------------------------------------- preprocessing


def _cmu_patches(cmu_slide, n=3, size=256, height=None) -> np.ndarray:
    osr = openslide.OpenSlide(str(cmu_slide))
    shape = (size, height or size)
    return np.stack(
        [np.asarray(osr.read_region((900 + 300 * i, 1300), 0, shape).convert("RGB"))
         for i in range(n)]
    )  # fmt: skip


@pytest.mark.parametrize(
    "name, height",
    [
        ("uni_v1", 256),
        ("virchow2", 256),
        ("virchow2", 300),
        ("h_optimus_0", 256),
        ("prov_gigapath", 256),
    ],
)
def test_batched_preprocessing_matches_the_cards_pil_chain(cmu_slide, name, height):
    t = fm.SPECS[name].transforms()
    patches = _cmu_patches(cmu_slide, height=height)  # 300 high: a non-square resize + crop
    ref = torch.stack([t(p) for p in patches])
    out = t.batch(torch.from_numpy(patches))
    assert out.shape == ref.shape == (3, 3, 224, 224)
    one_grey_level = 1.0 / 255 / min(t.std) + 1e-5
    assert (out - ref).abs().max() <= one_grey_level
    assert (out - ref).abs().mean() < 0.01 * one_grey_level
    # the float path (what a CUDA batch takes) agrees too; bilinear floats are not rounded
    as_float = t.batch(torch.from_numpy(patches).float())
    assert (as_float - ref).abs().max() <= 1.5 * one_grey_level
    assert (as_float - ref).abs().mean() < 0.3 * one_grey_level  # 0.25: PIL's rounding


def test_gigapath_crops_the_centre_of_a_256_patch(cmu_slide):
    t = fm.SPECS["prov_gigapath"].transforms()
    patch = _cmu_patches(cmu_slide, n=1)
    out = t.batch(torch.from_numpy(patch))
    centre = torch.from_numpy(patch[:, 16:240, 16:240]).permute(0, 3, 1, 2).float() / 255
    mean = torch.tensor(t.mean).view(1, 3, 1, 1)
    std = torch.tensor(t.std).view(1, 3, 1, 1)
    torch.testing.assert_close(out, (centre - mean) / std)  # 256 px: no resize, exact crop


# --------------------------------------------------------------------- list-encoders --json


def test_list_encoders_json_covers_every_name_with_its_numbers():
    from click.testing import CliRunner

    from clam_mcmkd.cli import main

    result = CliRunner().invoke(main, ["list-encoders", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    by_name = {r["name"]: r for r in rows}
    assert set(by_name) == set(fm.SPECS) | set(encoders.list_encoders())
    assert set(fm.SPECS) <= set(encoders.list_encoders())  # every spec is registered
    for row in rows:
        assert {"name", "out_dim", "input_size", "mean", "std", "source"} <= set(row)
        assert len(row["mean"]) == len(row["std"]) == 3 and row["source"]
    assert by_name["resnet50_trunc"]["out_dim"] == 1024
    assert by_name["resnet18_trunc"]["out_dim"] == 256
    assert by_name["mcmkd_resnet50"]["out_dim"] == 1024
    assert by_name["virchow2"]["out_dim"] == 2560
    assert by_name["h_optimus_1"]["mean"] == list(fm.BIOPTIMUS_MEAN)
    assert by_name["uni_v1"]["source"].startswith("huggingface.co/MahmoodLab/UNI")
    gigapath = by_name["prov_gigapath"]
    assert (gigapath["resize_size"], gigapath["input_size"], gigapath["interpolation"]) == (
        256,
        224,
        "bicubic",
    )
    assert by_name["uni2_h"]["ckpt_env"] == "UNI2_CKPT_PATH"
    assert by_name["resnet50_trunc"]["mean"] == [0.485, 0.456, 0.406]


# --------------------------------------------------------------------- the registry


@pytest.mark.parametrize("name", ["uni_v1", "virchow2", "prov_gigapath"])
def test_registry_names_and_hub_ids_build_the_spec(name):
    spec = fm.SPECS[name]
    with torch.device("meta"):
        by_name = encoders.create_encoder(name, pretrained=False)
        by_hub_id = encoders.create_encoder(spec.hub_id, pretrained=False)
    for enc in (by_name, by_hub_id):  # a hub id never falls through to timm's defaults
        assert isinstance(enc.model, fm.FoundationEncoder)
        assert enc.out_dim == spec.out_dim and enc.transforms == spec.transforms()
    assert encoders.weights_source(name, pretrained=True) == spec.hub_id
    assert encoders.weights_source(name, pretrained=False) == "random-init(seed=0)"


def test_uni_v1_replaces_clams_builder_without_changing_its_model(monkeypatch):
    """The old uni_v1 builder (CLAM's kwargs, TimmPooledEncoder) and the spec give the same
    network: same state-dict keys and shapes, same features for the same weights."""
    import timm

    torch.manual_seed(0)
    clams = timm.create_model(
        "vit_large_patch16_224", img_size=224, patch_size=16, init_values=1e-5, num_classes=0,
        dynamic_img_size=True, depth=2,
    )  # fmt: skip
    spec = dataclasses.replace(
        fm.SPECS["uni_v1"], timm_kwargs=fm.SPECS["uni_v1"].timm_kwargs + (("depth", 2),)
    )
    ours = fm.build_foundation_model(spec, pretrained=False)
    keys = {k.removeprefix("model."): v.shape for k, v in ours.model.state_dict().items()}
    assert keys == {k: v.shape for k, v in clams.state_dict().items()}
    ours.model.model.load_state_dict(clams.state_dict())
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(ours.model(x), clams.eval()(x))
    assert ours.transforms.to_torchvision is not None and ours.out_dim == 1024


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "resnet18_trunc"])
def test_any_unreachable_pretrained_weights_are_one_line(name, hub_offline):
    """timm names and built-ins alike (offline, timm's hub client fails deep inside)."""
    with pytest.raises(encoders.PretrainedWeightsError) as err:
        encoders.create_encoder(name, pretrained=True)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"{name}: cannot load pretrained weights from timm")
    assert "--no-pretrained" in msg and "--ckpt PATH" in msg
    assert err.value.__cause__ is None and err.value.__suppress_context__
    assert "--teacher-ckpt PATH" in str(err.value.for_option("--teacher-ckpt"))


def test_extract_features_by_foundation_model_name(cmu_slide, tmp_path):
    """`extract-features --model uni_v1`: the card's preprocessing and width, CLAM's files."""
    from click.testing import CliRunner

    from clam_mcmkd.clam.formats import read_features, write_coords_h5
    from clam_mcmkd.cli import main

    coords = np.array([[900, 1300], [1200, 1300]])
    write_coords_h5(
        tmp_path / "h5" / "patches" / f"{cmu_slide.stem}.h5", coords, patch_size=256,
        patch_level=0, downsample=(1.0, 1.0), downsampled_level_dim=(2220, 2967),
        level_dim=(2220, 2967), name=cmu_slide.stem,
    )  # fmt: skip
    torch.set_num_threads(2)
    result = CliRunner().invoke(
        main,
        ["extract-features", "--data-h5-dir", str(tmp_path / "h5"), "--data-slide-dir",
         str(cmu_slide.parent), "--feat-dir", str(tmp_path / "feats"), "--model", "uni_v1",
         "--no-pretrained", "--device", "cpu", "--batch-size", "2"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    feats, saved = read_features(tmp_path / "feats", cmu_slide.stem, with_coords=True)
    assert feats.shape == (2, 1024) and np.isfinite(feats).all()
    np.testing.assert_array_equal(saved, coords)
    # the same seeded random-init UNI on the card's transforms gives these features
    enc = encoders.create_encoder("uni_v1", pretrained=False)
    patches = _cmu_patches(cmu_slide, n=1)
    with torch.no_grad():
        want = enc.model(enc.transforms.batch(torch.from_numpy(patches))).numpy()
    np.testing.assert_allclose(feats[:1], want, rtol=1e-3, atol=1e-4)
