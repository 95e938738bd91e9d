"""MCM-KD fine-tuning: the trainer and its parts.

* :mod:`.config` - ``FinetuneConfig`` (torch-free), validation, the output file names.
* :mod:`.planning` - slides -> context windows -> training / validation windows.
* :mod:`.windows`, :mod:`.masking` - g x g windows read with one ``read_region``; which
  positions are masked.
* :mod:`.teacher_cache` - teacher features, computed at most once per patch, kept on disk.
* :mod:`.predictor`, :mod:`.losses` - the context predictor and the loss registry.
* :mod:`.steps` - batches, forward, optimiser, lr schedule, one optimizer step, validation.
* :mod:`.state`, :mod:`.outputs` - exact resume; what a finished run writes.
* :mod:`.trainer` - ``finetune(cfg)``: five phases (teacher targets, build, restore, train
  steps, write outputs).

Names are exported lazily, so the CLI reads ``FinetuneConfig`` without importing torch.
"""

from ..utils import lazy_exports

_EXPORTS = {
    **dict.fromkeys(("FinetuneConfig", "FinetuneError", "output_paths"), ".config"),
    "plan_windows": ".planning",
    "finetune": ".trainer",
}
__all__ = list(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
