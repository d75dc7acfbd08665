"""Attention statistics of a run's newest checkpoint: JSON and PNG heatmaps in ``<workdir>/analysis``.

  .venv/bin/python experiments/analyze.py --config=configs/lm.py:metric=l1,size=tiny --workdir=runs/lm_tiny_l1

Writes ``attention.json`` (per layer and head: entropy, max weight, mean attended distance |i - j|, lam, p, on
``config.analysis.batch_size`` validation windows), ``statistics.png`` (layer x head heatmaps),
``attention_maps.png`` (every head's weights on the first window) and ``lambda.png`` (lam over training, from
``metrics.jsonl``). The body is ``distattn_jax.training.analyze_run``.
"""

from absl import app, flags
from ml_collections import config_flags

from distattn_jax import training

config_flags.DEFINE_config_file("config", None, "The run's config file, e.g. configs/lm.py:metric=l1,size=tiny.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "The run's directory (its checkpoints/ and metrics.jsonl are read).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  training.hide_orbax_info_logs()
  out = training.analyze_run(flags.FLAGS.config, flags.FLAGS.workdir)
  print(f"analysis written to {out}: {', '.join(sorted(p.name for p in out.iterdir()))}")


if __name__ == "__main__":
  app.run(main)
