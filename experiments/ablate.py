"""Runs an ablation suite (configs/ablate.py) and writes its results, table and plots.

  .venv/bin/python experiments/ablate.py --config=configs/ablate.py:suite=quick --workers=2

Resumable: finished cells in results/<suite>.json are skipped.
"""

import os

from absl import flags
from ml_collections import config_flags

from distattn_jax.training import ablation

import cli  # experiments/cli.py, beside this file

_CONFIG = config_flags.DEFINE_config_file("config", "configs/ablate.py:suite=quick", "ablation suite config")
_RESULTS = flags.DEFINE_string("results_dir", "results", "folder for <suite>.json, .md and the plots")
_WORKERS = flags.DEFINE_integer("workers", None, "processes training cells in parallel (default: the config's)")


def main(argv):
  del argv
  config = _CONFIG.value
  if _WORKERS.value is not None:
    config.workers = _WORKERS.value
  # Compiled steps persist across processes and reruns (workers and resumed grids compile each model once).
  os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(_RESULTS.value, ".xla_cache"))
  import jax  # pylint: disable=import-outside-toplevel
  jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
  ablation.run_grid(config, _RESULTS.value, log=lambda m: print(m, flush=True))


if __name__ == "__main__":
  cli.run(main)
