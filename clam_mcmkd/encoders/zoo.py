"""The pathology foundation models, one :class:`~.catalog.FoundationModelSpec` each (no torch).

Transcribed from each model card and official loader, mostly TRIDENT's
(``trident/patch_encoder_models/load.py``); ``source`` says where each figure came from, and
where a figure could not be checked offline (a hub ``config.json`` this machine cannot read).
``params_m`` is the published parameter count that tests/test_encoder_zoo.py checks a meta-device
build against (0.5 %). Names ending ``_cls`` / ``_cls_mean`` are the same weights under the
card's other output rule (``variant_of``).
"""

from __future__ import annotations

from .catalog import (
    BIOPTIMUS_MEAN,
    BIOPTIMUS_STD,
    HALF,
    LUNIT_MEAN,
    LUNIT_STD,
    FoundationModelSpec,
    other_output,
)

_TRIDENT = "github.com/mahmoodlab/TRIDENT trident/patch_encoder_models/load.py"
_STAMP = "github.com/KatherLab/STAMP src/stamp/preprocessing/extractor"
_KAIKO = "github.com/kaiko-ai/towards_large_pathology_fms hubconf.py + README (Resize 224, " \
    "CenterCrop 224, mean=std=0.5, class token)"  # fmt: skip
_NOT_OFFLINE = "not verified offline"

_UNI_KWARGS = (
    ("img_size", 224), ("patch_size", 16), ("init_values", 1e-5), ("num_classes", 0),
    ("dynamic_img_size", True),
)  # fmt: skip
_UNI2_KWARGS = (
    ("img_size", 224), ("patch_size", 14), ("depth", 24), ("num_heads", 24),
    ("init_values", 1e-5), ("embed_dim", 1536), ("mlp_ratio", 2.66667 * 2), ("num_classes", 0),
    ("no_embed_class", True), ("mlp_layer", "SwiGLUPacked"), ("act_layer", "SiLU"),
    ("reg_tokens", 8), ("dynamic_img_size", True),
)  # fmt: skip
_VIRCHOW_KWARGS = (
    ("img_size", 224), ("init_values", 1e-5), ("num_classes", 0), ("mlp_ratio", 5.3375),
    ("global_pool", ""), ("dynamic_img_size", True), ("mlp_layer", "SwiGLUPacked"),
    ("act_layer", "SiLU"),
)  # fmt: skip
_VIRCHOW2_KWARGS = _VIRCHOW_KWARGS + (("reg_tokens", 4),)
_H_OPTIMUS_KWARGS = (
    ("img_size", 224), ("init_values", 1e-5), ("num_classes", 0), ("global_pool", "token"),
    ("dynamic_img_size", False),
)  # fmt: skip
_GIGAPATH_KWARGS = (
    ("img_size", 224), ("in_chans", 3), ("patch_size", 16), ("embed_dim", 1536), ("depth", 40),
    ("num_heads", 24), ("init_values", 1e-5), ("mlp_ratio", 5.33334), ("num_classes", 0),
)  # fmt: skip
# H0-mini: a ViT-B/14 with 4 registers and SwiGLU; the card passes SwiGLUPacked + SiLU and gets
# (B, 261, 768) tokens. Its config.json (mlp_ratio) is not readable offline: 2.66667 * 2 is the
# one SwiGLU ratio that gives the published 86M (ratio 4 gives 71.6M).
_H0_MINI_KWARGS = (
    ("img_size", 224), ("init_values", 1e-5), ("num_classes", 0), ("mlp_ratio", 2.66667 * 2),
    ("global_pool", ""), ("dynamic_img_size", True), ("mlp_layer", "SwiGLUPacked"),
    ("act_layer", "SiLU"),
)  # fmt: skip
_DYNAMIC = (("num_classes", 0), ("dynamic_img_size", True))
_GPFM_KWARGS = (("img_size", 224), ("init_values", 1e-5)) + _DYNAMIC
_CONCH_TRUNK_KWARGS = (("img_size", 224), ("init_values", 1.0), ("num_classes", 0))


def _kaiko(name: str, arch: str, hub: str, width: int, params: float, size: str, **kw):
    return FoundationModelSpec(
        name=name, hub_id=f"hf-hub:1aurent/{hub}.kaiko_ai_towards_large_pathology_fms",
        arch=arch, timm_kwargs=kw.pop("timm_kwargs", _DYNAMIC), out_dim=width,
        ckpt_env=f"{name.upper()}_CKPT_PATH", mean=HALF, std=HALF, params_m=params,
        licence="kaiko-non-commercial", gated=False,
        source=f"{_KAIKO}; {_TRIDENT} Kaiko*InferenceEncoder (dynamic_img_size); "
        f"params: hub model.safetensors {size} fp32 / 4 bytes", **kw,
    )  # fmt: skip


_BASE = (
    FoundationModelSpec(
        name="uni_v1",
        hub_id="hf-hub:MahmoodLab/uni",
        arch="vit_large_patch16_224",
        timm_kwargs=_UNI_KWARGS,
        out_dim=1024,
        ckpt_env="UNI_CKPT_PATH",
        params_m=303,
        licence="CC-BY-NC-ND-4.0",
        gated=True,
        source="huggingface.co/MahmoodLab/UNI card (ViT-L/16, 303M); github.com/mahmoodlab/UNI "
        f"README + uni/get_encoder/get_encoder.py; CLAM models/builder.py; {_TRIDENT} "
        "UNIInferenceEncoder",
    ),
    FoundationModelSpec(
        name="uni2_h",
        hub_id="hf-hub:MahmoodLab/UNI2-h",
        arch="vit_giant_patch14_224",
        timm_kwargs=_UNI2_KWARGS,
        out_dim=1536,
        ckpt_env="UNI2_CKPT_PATH",
        params_m=681,
        licence="CC-BY-NC-ND-4.0",
        gated=True,
        source="huggingface.co/MahmoodLab/UNI2-h card (ViT-H/14, 8 registers, 681M); "
        f"github.com/mahmoodlab/UNI README; {_TRIDENT} UNIv2InferenceEncoder; {_STAMP}/uni2.py",
    ),
    FoundationModelSpec(
        name="virchow",
        hub_id="hf-hub:paige-ai/Virchow",
        arch="vit_huge_patch14_224",
        timm_kwargs=_VIRCHOW_KWARGS,
        out_dim=2560,
        ckpt_env="VIRCHOW_CKPT_PATH",
        output="cls+mean_patch",
        interpolation="bicubic",
        params_m=632,
        licence="Apache-2.0 (+ terms)",
        gated=True,
        source="huggingface.co/paige-ai/Virchow card (timm SwiGLUPacked + SiLU; class token ++ "
        f"mean of patch tokens, 2560-d); {_TRIDENT} VirchowInferenceEncoder (kwargs, "
        "return_cls=False default, Resize 224 bicubic, ImageNet mean/std); Virchow paper "
        "(ViT-H/14, 632M). config.json crop_pct: not verified offline (crop at 224 = no crop "
        "on square patches)",
    ),
    FoundationModelSpec(
        name="virchow2",
        hub_id="hf-hub:paige-ai/Virchow2",
        arch="vit_huge_patch14_224",
        timm_kwargs=_VIRCHOW2_KWARGS,
        out_dim=2560,
        ckpt_env="VIRCHOW2_CKPT_PATH",
        output="cls+mean_patch",
        interpolation="bicubic",
        params_m=632,
        licence="CC-BY-NC-ND-4.0",
        gated=True,
        source="huggingface.co/paige-ai/Virchow2 card (output[:, 0] ++ output[:, 5:].mean(1); "
        "config.json: bicubic, crop_pct 1.0, ImageNet mean/std); Virchow2 paper (632M); "
        f"{_TRIDENT} Virchow2InferenceEncoder",
    ),
    FoundationModelSpec(
        name="h_optimus_0",
        hub_id="hf-hub:bioptimus/H-optimus-0",
        arch="vit_giant_patch14_reg4_dinov2",
        timm_kwargs=_H_OPTIMUS_KWARGS,
        out_dim=1536,
        ckpt_env="H_OPTIMUS_0_CKPT_PATH",
        mean=BIOPTIMUS_MEAN,
        std=BIOPTIMUS_STD,
        params_m=1130,
        licence="Apache-2.0",
        gated=True,
        source="huggingface.co/bioptimus/H-optimus-0 card (224 px at 0.5 um/px, bioptimus "
        f"mean/std, 1.1B); {_TRIDENT} HOptimus0InferenceEncoder; {_STAMP}/h_optimus_0.py",
    ),
    FoundationModelSpec(
        name="h_optimus_1",
        hub_id="hf-hub:bioptimus/H-optimus-1",
        arch="vit_giant_patch14_reg4_dinov2",
        timm_kwargs=_H_OPTIMUS_KWARGS,
        out_dim=1536,
        ckpt_env="H_OPTIMUS_1_CKPT_PATH",
        mean=BIOPTIMUS_MEAN,
        std=BIOPTIMUS_STD,
        params_m=1130,
        licence="see card",
        gated=True,
        source="huggingface.co/bioptimus/H-optimus-1 card; "
        f"{_TRIDENT} HOptimus1InferenceEncoder; {_STAMP}/h_optimus_1.py",
    ),
    FoundationModelSpec(
        name="h0_mini",
        hub_id="hf-hub:bioptimus/H0-mini",
        arch="vit_base_patch14_reg4_dinov2",
        timm_kwargs=_H0_MINI_KWARGS,
        out_dim=768,
        ckpt_env="H0_MINI_CKPT_PATH",
        interpolation="bicubic",
        mean=BIOPTIMUS_MEAN,
        std=BIOPTIMUS_STD,
        params_m=86,
        licence="see card",
        gated=True,
        source="huggingface.co/bioptimus/H0-mini card (timm SwiGLUPacked + SiLU, (1, 261, 768) "
        "tokens, cls or cls ++ mean of output[:, num_prefix_tokens:]); H0-mini paper (ViT-B/14 "
        f"distilled from H-optimus-0, 86M); {_TRIDENT} H0MiniInferenceEncoder (cls_token "
        "default); bioptimus mean/std as H-optimus-0 (kaiko-ai/eva, BREST docs). config.json "
        f"(mlp_ratio, interpolation, crop_pct): {_NOT_OFFLINE}; 224 px bicubic as H-optimus-0",
    ),
    _kaiko(
        "kaiko_vits16", "vit_small_patch16_224", "vit_small_patch16_224", 384, 21.675, "86.7 MB"
    ),  # fmt: skip
    _kaiko(
        "kaiko_vits8", "vit_small_patch8_224", "vit_small_patch8_224", 384, 21.675, "86.7 MB"
    ),  # fmt: skip
    _kaiko(
        "kaiko_vitb16", "vit_base_patch16_224", "vit_base_patch16_224", 768, 85.75, "343 MB"
    ),  # fmt: skip
    _kaiko("kaiko_vitb8", "vit_base_patch8_224", "vit_base_patch8_224", 768, 85.75, "343 MB"),
    # built at 518 px (the pos-embed grid of its weights) and run at 224, as TRIDENT does
    _kaiko(
        "kaiko_vitl14",
        "vit_large_patch14_reg4_dinov2",
        "vit_large_patch14_reg4_dinov2",
        1024,
        305.0,
        "1.22 GB",
        timm_kwargs=(("img_size", 518),) + _DYNAMIC,
    ),  # fmt: skip
    FoundationModelSpec(
        name="lunit_vits8",
        hub_id="hf-hub:1aurent/vit_small_patch8_224.lunit_dino",
        arch="vit_small_patch8_224",
        timm_kwargs=_DYNAMIC,
        out_dim=384,
        ckpt_env="LUNIT_VITS8_CKPT_PATH",
        interpolation="bicubic",
        mean=LUNIT_MEAN,
        std=LUNIT_STD,
        params_m=21.7,
        licence="lunit-non-commercial",
        gated=False,
        source="huggingface.co/1aurent/vit_small_patch8_224.lunit_dino card (ViT-S/8, 21.7M, "
        "224 px); github.com/lunit-io/benchmark-ssl-pathology README (VisionTransformer "
        "patch 8, 384-d, 6 heads); mean/std used in training: kaiko-ai/eva backbones/pathology/"
        f"lunit.py; {_TRIDENT} LunitS8InferenceEncoder (timm data config of the hub repo). "
        f"Hub config.json (interpolation, crop_pct): {_NOT_OFFLINE}",
    ),
    FoundationModelSpec(
        name="gpfm",
        hub_id="majiabo/GPFM",
        hub_file="GPFM.pth",
        arch="vit_large_patch14_dinov2",
        timm_kwargs=_GPFM_KWARGS,
        out_dim=1024,
        ckpt_env="GPFM_CKPT_PATH",
        crop=False,
        interpolation="bicubic",
        params_m=304,
        licence="see card",
        gated=False,
        source=f"{_TRIDENT} GPFMInferenceEncoder (vit_large_patch14_dinov2, img_size 224, "
        "init_values 1e-5, majiabo/GPFM GPFM.pth, Resize 224 bicubic without crop, ImageNet "
        "mean/std, class token); kaiko-ai/eva backbones/pathology/hkust.py (same kwargs); "
        "params: DINOv2 ViT-L/14, 304M",
    ),
    FoundationModelSpec(
        name="prov_gigapath",
        hub_id="hf-hub:prov-gigapath/prov-gigapath",
        arch="vit_giant_patch14_dinov2",
        timm_kwargs=_GIGAPATH_KWARGS,
        out_dim=1536,
        ckpt_env="PROV_GIGAPATH_CKPT_PATH",
        resize_size=256,
        interpolation="bicubic",
        params_m=1130,
        licence="Apache-2.0 (+ terms)",
        gated=True,
        source="huggingface.co/prov-gigapath/prov-gigapath card + config.json (1.13B); "
        "github.com/prov-gigapath/prov-gigapath README + gigapath/pipeline.py; "
        f"{_TRIDENT} GigaPathInferenceEncoder; {_STAMP}/gigapath.py",
    ),
    FoundationModelSpec(
        name="conch_v15",
        hub_id="MahmoodLab/conchv1_5",
        hub_file="pytorch_model_vision.bin",
        arch="vit_large_patch16_224",
        timm_kwargs=_CONCH_TRUNK_KWARGS,
        out_dim=768,
        ckpt_env="CONCH_V15_CKPT_PATH",
        kind="conch_v15",
        output="attn_pool",
        input_size=448,
        resize_size=448,
        params_m=303 + 2.76,
        licence="CC-BY-NC-ND-4.0 (as CONCH)",
        gated=True,
        source="huggingface.co/MahmoodLab/conchv1_5 card (ViT-L/16 trained with CoCa); "
        f"{_TRIDENT} Conchv15InferenceEncoder + model_zoo/conchv1_5/conchv1_5.py (trunk "
        "vit_large(patch 16, init_values 1.0) at 224 with its pos-embed interpolated to 448 "
        "DINO-style; AttentionalPooler(768, 1024, 8 heads, 1 query) + LayerNorm(768); Resize "
        "448 bilinear, CenterCrop 448, ImageNet mean/std); params: ViT-L/16 303M (UNI card) "
        "+ the pooler head 2.76M (our count of the vendored head)",
    ),
)
_HF_REASON = (
    "a transformers model: its config.json could not be read offline, so the architecture is "
    "not transcribed; it comes from the hub repo's config.json (downloaded with the weights, "
    "then cached) or a local copy of the repo (--ckpt DIR or the variable), and --no-pretrained "
    "needs that config too. As a teacher: --teacher with this name or its hub id (plain or "
    "hf-hub:<id>: the id names this spec, so timm never sees the transformers-format repo)"
)
_HF = dict(arch="", timm_kwargs=(), licence="see card", kind="transformers", reason=_HF_REASON)
_LISTED = (
    FoundationModelSpec(
        name="phikon_v2",
        hub_id="owkin/phikon-v2",
        out_dim=1024,
        ckpt_env="PHIKON_V2_CKPT_PATH",
        **_HF,
        source=f"{_TRIDENT} Phikonv2InferenceEncoder (AutoModel, last_hidden_state[:, 0], "
        "Resize 224 + CenterCrop 224, ImageNet mean/std); kaiko-ai/eva owkin.py; width 1024 "
        "(ViT-L, TRIDENT's docs): the architecture itself is the hub's config.json",
    ),
    FoundationModelSpec(
        name="midnight12k",
        hub_id="kaiko-ai/midnight",
        out_dim=1536,
        ckpt_env="MIDNIGHT12K_CKPT_PATH",
        mean=HALF,
        std=HALF,
        **_HF,
        source=f"{_TRIDENT} Midnight12kInferenceEncoder (AutoModel, cls_token default, "
        "cls+mean option (TRIDENT's docs: 3072), Resize 224 + CenterCrop 224, mean=std=0.5); "
        "the architecture itself is the hub's config.json",
    ),
    FoundationModelSpec(
        name="hibou_l",
        hub_id="histai/hibou-L",
        arch="",
        timm_kwargs=(),
        out_dim=1024,
        ckpt_env="",
        kind="listed",
        interpolation="bicubic",
        crop=False,
        mean=(0.7068, 0.5755, 0.722),
        std=(0.195, 0.2316, 0.1816),
        licence="see card",
        reason="its transformers model needs trust_remote_code (hist.ai's own DINOv2 with 4 "
        "registers, code run from the hub), which clam-mcmkd does not execute; --teacher "
        "hf-hub:<id> needs a timm-format repo: use a timm port of its weights (e.g. in 1aurent's "
        "Hibou collection) or an encoder checkpoint",
        source=f"{_TRIDENT} HibouLInferenceEncoder (AutoModel trust_remote_code, pooler_output, "
        "Resize 224 bicubic, hibou mean/std); kaiko-ai/eva histai.py (4 registers)",
    ),
)
_VARIANTS = {  # the card's other output rule, under its own name
    "virchow_cls": "virchow",
    "virchow2_cls": "virchow2",
    "h0_mini_cls_mean": "h0_mini",
    "midnight12k_cls_mean": "midnight12k",
}
_BY_NAME = {s.name: s for s in _BASE + _LISTED}
SPECS: dict[str, FoundationModelSpec] = {
    **_BY_NAME,
    **{name: other_output(_BY_NAME[base], name) for name, base in _VARIANTS.items()},
}
