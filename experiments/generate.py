"""Samples text from the newest checkpoint of a run, with the attention layers' KV cache.

  .venv/bin/python experiments/generate.py --workdir=runs/lm_tiny_l1 --config.sample.temperature=0.8 \
      --config.sample.top_k=20 --config.sample.seed=1

Prompt, length, temperature (0 = greedy), top-k (0 = all) and seed are ``config.sample``; the body is
``distattn_jax.training.sample_text``. The config is the one the run saved (``<workdir>/config.json``), so no
training flag is repeated; ``--config=configs/lm.py:metric=l1,size=tiny`` names one instead, which must describe
the model the checkpoint holds (``cli.run``).
"""

from absl import flags
from ml_collections import config_flags

from distattn_jax import training

import cli  # experiments/cli.py, beside this file

config_flags.DEFINE_config_file("config", None, "The run's config file, e.g. configs/lm.py:metric=l1,size=tiny "
                                "(default: the config the run saved, <workdir>/config.json).", lock_config=True)
flags.DEFINE_string("workdir", None, "The run's directory (its checkpoints/ are read).")
flags.mark_flags_as_required(["workdir"])


def main(argv) -> None:
  del argv  # flags only: cli.run refuses positional arguments
  training.hide_orbax_info_logs()
  s = flags.FLAGS.config.sample
  text, step = training.sample_text(flags.FLAGS.config, flags.FLAGS.workdir)
  print(f"sample (step {step}, temperature {s.temperature}, top_k {s.top_k}, seed {s.seed}):\n{s.prompt}{text}")


if __name__ == "__main__":
  cli.run(main, validate=training.validate, run_config=True)
