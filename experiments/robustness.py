"""Robustness per metric: classifiers trained per metric and seed (the ablation suite's recipe, parameters
saved), measured clean, under Gaussian input noise, under L-inf attacks (FGSM, PGD) on their input features, and
by a local Lipschitz estimate of their logits (``distattn_jax.training.robustness`` says exactly what).

  # MNIST-1D and Fashion-MNIST, 7 metrics x 3 seeds at the CPU suite's budget (docs/research.md, "Robustness")
  nice -n 10 .venv/bin/python experiments/robustness.py --config=configs/robustness.py:suite=cpu \
      --results_dir=results/robustness --plot=docs/robustness_cpu.png
  # seconds of work (plus compilation): MNIST-1D, dot and l2, one seed, 20 steps of a tiny model
  .venv/bin/python experiments/robustness.py --quick --results_dir=/tmp/robustness_quick
  # metrics added later join the same results (the report then covers every metric in the file)
  .venv/bin/python experiments/robustness.py --config=configs/robustness.py:suite=cpu \
      --config.metrics=weighted_l1,weighted_l2 --results_dir=results/robustness --plot=docs/robustness_cpu.png

A plain run writes to runs/robustness/<suite>/ (git-ignored): <suite>.json (one record per cell, rewritten
atomically after each), <suite>.md, <suite>.png and the parameters under <suite>.cells/. Resumable: a rerun skips
the cells already measured with the same settings and reuses saved parameters when only the evaluation changed.
"""

import os
import pathlib
import sys

from absl import app, flags

import cli  # experiments/cli.py, beside this file

ROOT = pathlib.Path(__file__).resolve().parents[1]
QUICK_CONFIG = "configs/robustness.py:suite=quick"
_CONFIG = cli.define_config_file("config", "configs/robustness.py:suite=cpu", "robustness study config")
_QUICK = flags.DEFINE_bool("quick", False, f"seconds: the config {QUICK_CONFIG} as it is (no --config flags)")
_RESULTS = flags.DEFINE_string("results_dir", None, "folder for <suite>.json, .md, .png and the saved parameters "
                               "(<suite>.cells/); default runs/robustness/<suite>")
_PLOT = flags.DEFINE_string("plot", None, "path of the PNG plot (default <results_dir>/<suite>.png)")


def main(argv):
  del argv
  if _QUICK.value:
    if any(a.lstrip("-").startswith("config") for a in sys.argv[1:]):
      raise app.UsageError(f"--quick runs {QUICK_CONFIG} as it is; drop the --config flags or drop --quick")
    config = cli.load_config_file(str(ROOT / QUICK_CONFIG))
  else:
    config = _CONFIG.value
  out = pathlib.Path(_RESULTS.value or os.path.join("runs", "robustness", config.suite))
  # Compiled steps persist across reruns (a resumed or merged study compiles each model once).
  os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(out / ".xla_cache"))
  import jax  # pylint: disable=import-outside-toplevel
  from distattn_jax.training import robustness  # pylint: disable=import-outside-toplevel
  jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
  try:
    robustness.run_study(config, out, _PLOT.value, log=lambda m: print(m, flush=True))
  except ValueError as e:  # a metric, task or setting the study refuses, or results of another definition
    raise app.UsageError(str(e)) from None


if __name__ == "__main__":
  cli.run(main)
