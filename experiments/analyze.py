"""Attention statistics of a run's newest checkpoint: JSON and PNG heatmaps in ``<workdir>/analysis``.

  .venv/bin/python experiments/analyze.py --workdir=runs/lm_tiny_l1

Writes ``attention.json`` (per layer and head: entropy, max weight, mean attended distance |i - j|, lam, p, on
``config.analysis.batch_size`` validation windows), ``statistics.png`` (layer x head heatmaps),
``attention_maps.png`` (every head's weights on the first window) and ``lambda.png`` (lam over training, from
``metrics.jsonl``). The body is ``distattn_jax.training.analyze_run``. The config is the one the run saved
(``<workdir>/config.json``); ``--config=configs/lm.py:metric=l1,size=tiny`` names one instead, which must describe
the model the checkpoint holds (``cli.run``).
"""

from absl import flags
from ml_collections import config_flags

from distattn_jax import training

import cli  # experiments/cli.py, beside this file

config_flags.DEFINE_config_file("config", None, "The run's config file, e.g. configs/lm.py:metric=l1,size=tiny "
                                "(default: the config the run saved, <workdir>/config.json).", lock_config=True)
flags.DEFINE_string("workdir", None, "The run's directory (its checkpoints/ and metrics.jsonl are read).")
flags.mark_flags_as_required(["workdir"])


def main(argv) -> None:
  del argv  # flags only: cli.run refuses positional arguments
  training.hide_orbax_info_logs()
  out = training.analyze_run(flags.FLAGS.config, flags.FLAGS.workdir)
  print(f"analysis written to {out}: {', '.join(sorted(p.name for p in out.iterdir()))}")


if __name__ == "__main__":
  cli.run(main, validate=training.validate, run_config=True)
