"""Patch encoders: the registry, the built-in builders, transforms, checkpoints, the forward path.

* :mod:`.registry` - ``create_encoder(name)``, ``register_encoder``, ``list_encoders``.
* :mod:`.builders` - the built-in encoders (CLAM's ``resnet50_trunc``, ``mcmkd_resnet50``, ...).
* :mod:`.catalog` - what each built-in is, as plain data (:class:`FoundationModelSpec`, the
  ``list-encoders`` rows): no torch import, so listing answers at once.
* :mod:`.zoo` - the table of pathology foundation models (UNI, Virchow, H-optimus, H0-mini,
  kaiko, Lunit, GPFM, Prov-GigaPath, CONCH v1.5, ...): each card's architecture, preprocessing,
  output rule, width and sources.
* :mod:`.foundation` - builds and registers them; :mod:`.conch` - CONCH v1.5's tower.
* :mod:`.transforms` - :class:`PatchTransforms`, Resize [-> CenterCrop] -> ToTensor -> Normalize.
* :mod:`.checkpoint` - the one checkpoint loader, and the MCM-KD student checkpoint.
* :mod:`.forward` - the one forward path (device, channels-last, precision, batching).

Names are exported lazily: ``from clam_mcmkd.encoders.forward import PRECISIONS`` imports no torch.
"""

from ..utils import lazy_exports

_EXPORTS = {
    **dict.fromkeys(
        (
            "Encoder",
            "EncoderError",
            "PretrainedWeightsError",
            "create_encoder",
            "describe_encoders",
            "list_encoders",
            "register_encoder",
            "weights_source",
        ),
        ".registry",
    ),  # fmt: skip
    **dict.fromkeys(("FoundationModelSpec", "describe_all", "descriptions"), ".catalog"),
    **dict.fromkeys(("SPECS",), ".zoo"),
    **dict.fromkeys(("build_foundation_model",), ".foundation"),
    **dict.fromkeys(("PatchTransforms", "IMAGENET_MEAN", "IMAGENET_STD"), ".transforms"),
    **dict.fromkeys(("TimmCNNEncoder", "TimmPooledEncoder", "MCMKD_CKPT_ENV"), ".builders"),
    **dict.fromkeys(
        (
            "STUDENT_ARCHS",
            "CHECKPOINT_FORMAT",
            "load_checkpoint",
            "load_state_dict",
            "read_state_dict",
            "read_student_checkpoint",
            "save_student_checkpoint",
        ),
        ".checkpoint",
    ),  # fmt: skip
    **dict.fromkeys(
        (
            "PRECISIONS",
            "autocast",
            "prepare_encoder",
            "model_input",
            "encode_batch",
            "encode_batches",
            "encode_patches",
            "encoder_flops_params",
        ),
        ".forward",
    ),  # fmt: skip
}
__all__ = list(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
