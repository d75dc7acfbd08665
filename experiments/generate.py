"""Samples text from the newest checkpoint of a run, with the attention layers' KV cache.

  .venv/bin/python experiments/generate.py --config=configs/lm.py:metric=l1,size=tiny --workdir=runs/lm_tiny_l1 \
      --config.sample.temperature=0.8 --config.sample.top_k=20 --config.sample.seed=1

Prompt, length, temperature (0 = greedy), top-k (0 = all) and seed are ``config.sample``; the body is
``distattn_jax.training.sample_text``.
"""

from absl import app, flags
from ml_collections import config_flags

from distattn_jax import training

config_flags.DEFINE_config_file("config", None, "The run's config file, e.g. configs/lm.py:metric=l1,size=tiny.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "The run's directory (its checkpoints/ are read).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  training.hide_orbax_info_logs()
  s = flags.FLAGS.config.sample
  text, step = training.sample_text(flags.FLAGS.config, flags.FLAGS.workdir)
  print(f"sample (step {step}, temperature {s.temperature}, top_k {s.top_k}, seed {s.seed}):\n{s.prompt}{text}")


if __name__ == "__main__":
  app.run(main)
