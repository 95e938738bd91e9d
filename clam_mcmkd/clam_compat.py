"""What CLAM's scripts import once ``clam-mcmkd patch-clam`` has patched them (a stable path).

The code lives in :mod:`clam_mcmkd.clam.compat`; this module keeps the import path that the
patches in ``patches/`` (and CLAM checkouts patched by older versions) use.
"""

from .clam.compat import (  # noqa: F401
    CLAM_TASKS,
    CSV_ENV,
    FEAT_DIR_ENV,
    ClamTask,
    ClamTaskError,
    clam_task,
    encoder_names,
    get_clam_encoder,
)
