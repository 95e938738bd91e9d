"""``python -m clam_mcmkd.cli`` (what ``torchrun -m clam_mcmkd.cli`` runs)."""

import sys

from . import main

sys.exit(main())
