"""Runs an ablation suite (configs/ablate.py) and writes its results, table and plots.

  .venv/bin/python experiments/ablate.py --config=configs/ablate.py:suite=quick --workers=2

A plain run writes to a folder of its own, runs/ablate/<suite>/ (git-ignored). The tables committed under
results/ are reproduced, or regenerated from their JSON when every cell is there, by naming that folder:

  .venv/bin/python experiments/ablate.py --config=configs/ablate.py:suite=quick --workers=2 --results_dir=results

Resumable: finished cells in <results_dir>/<suite>.json are skipped. One runner at a time per suite and folder.
"""

import os

from absl import flags

from distattn_jax.training import ablation

import cli  # experiments/cli.py, beside this file

_CONFIG = cli.define_config_file("config", "configs/ablate.py:suite=quick", "ablation suite config")
_RESULTS = flags.DEFINE_string("results_dir", None, "folder for <suite>.json, .md and the plots (default: "
                               "runs/ablate/<suite>; --results_dir=results reproduces the committed tables)")
_WORKERS = flags.DEFINE_integer("workers", None, "processes training cells in parallel (default: the config's)")


def results_dir(suite: str) -> str:
  return _RESULTS.value or os.path.join("runs", "ablate", suite)


def main(argv):
  del argv
  config = _CONFIG.value
  if _WORKERS.value is not None:
    config.workers = _WORKERS.value
  out = results_dir(config.suite)
  # Compiled steps persist across processes and reruns (workers and resumed grids compile each model once).
  os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(out, ".xla_cache"))
  import jax  # pylint: disable=import-outside-toplevel
  jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
  ablation.run_grid(config, out, log=lambda m: print(m, flush=True))


if __name__ == "__main__":
  cli.run(main)
