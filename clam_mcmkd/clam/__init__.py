"""Everything that talks to CLAM (mahmoodlab/CLAM).

* :mod:`.formats` - the only module that reads and writes CLAM's files (coords h5, features,
  dataset and split CSVs, results).
* :mod:`.patch` - ``patch-clam``: applies ``patches/*.patch`` to a CLAM checkout.
* :mod:`.compat` - what the patched CLAM scripts call (``clam_mcmkd.clam_compat`` re-exports it).
* :mod:`.runner` - runs CLAM's own scripts for the benchmark (``--clam-dir``).
"""
