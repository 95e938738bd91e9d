"""MCM-KD fine-tuning of patch encoders for CLAM.

Heavy libraries (torch, timm, tiatoolbox) are imported lazily so that the CLI answers at once.
"""

from .utils import lazy_exports

__version__ = "0.1.0"

_EXPORTS = {"create_encoder": ".encoders", "list_encoders": ".encoders"}
__all__ = ["__version__", *_EXPORTS]
# Lazy public API: `clam_mcmkd.create_encoder` without importing torch at package import.
__getattr__ = lazy_exports(__name__, _EXPORTS)
