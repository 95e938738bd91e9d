"""MCM-KD fine-tuning of patch encoders for CLAM.

Heavy libraries (torch, timm, tiatoolbox) are imported lazily so that the CLI answers at once.
"""

__version__ = "0.1.0"

__all__ = ["__version__", "create_encoder", "list_encoders"]


def __getattr__(name):
    # Lazy public API: `clam_mcmkd.create_encoder` without importing torch at package import.
    if name in ("create_encoder", "list_encoders"):
        from . import encoders

        return getattr(encoders, name)
    raise AttributeError(name)
