"""MIL on CLAM's splits: ABMIL, CLAM-SB, CLAM-MB, TransMIL, MHIM-ABMIL (the shape of
slideflow's ``mil/``).

* :mod:`.config` - ``TrainConfig``, ``EvalConfig`` (torch-free).
* :mod:`.models` - the registry of MIL model names -> builders (torch-free).
* :mod:`.nets` - the attention networks, their losses and weights on disk.
* :mod:`.transmil` - TransMIL with the reference's module layout.
* :mod:`.mhim` - MHIM-MIL's training (teacher-guided masking, EMA, consistency loss).
* :mod:`.data` - bags, labels, splits as bags, bag order.
* :mod:`.results` - per-fold outputs and metrics; every file name a run writes.
* :mod:`.feature_norm` - ``--feature-norm zscore``: statistics per fold, saved, and one reader.
* :mod:`.training`, :mod:`.evaluation` - ``clam-mcmkd train`` and ``eval`` (the modules are not
  called ``train``/``evaluate``, which would hide the functions of those names).

Names are exported lazily, so the CLI reads configs and model names without importing torch.
"""

from ..utils import lazy_exports

_EXPORTS = {
    **dict.fromkeys(("TrainConfig", "EvalConfig", "parse_label_dict"), ".config"),
    **dict.fromkeys(
        ("MilModel", "build_model", "get_mil_model", "list_mil_models", "register_mil_model"),
        ".models",
    ),
    **dict.fromkeys(("attention_scores", "load_weights", "save_weights"), ".nets"),
    **dict.fromkeys(("Bag", "BagStore", "MilDataError"), ".data"),
    **dict.fromkeys(("SetResult", "bag_auc"), ".results"),
    **dict.fromkeys(("train", "train_epoch", "train_fold", "EarlyStopping"), ".training"),
    **dict.fromkeys(("evaluate", "run_bags"), ".evaluation"),
    **dict.fromkeys(("FeatureNorm", "fit_feature_norm", "load_feature_norm"), ".feature_norm"),
}
__all__ = list(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
