"""The whole comparison: untuned extractor vs teacher vs MCM-KD fine-tuned, on the same folds.

* :mod:`.config` - ``BenchmarkConfig``: one settings section per stage, named configs / YAML.
* :mod:`.run` - ``run_benchmark``: orders the stages, with per-stage resume markers.
* :mod:`.report` - ``report.md`` / ``report.csv`` / ROC plots from CLAM results directories.
* :mod:`.demo` - ``clam-mcmkd demo``: the benchmark on a synthetic cohort, offline.
"""

from .config import BenchmarkConfig, load_config, with_overrides
from .demo import DemoConfig, run_demo
from .run import BenchmarkError, run_benchmark

__all__ = [
    "BenchmarkConfig", "BenchmarkError", "DemoConfig", "load_config", "run_benchmark",
    "run_demo", "with_overrides",
]  # fmt: skip
