"""Trains a config in a workdir, resuming from its newest checkpoint; prints validation bits per byte.

  .venv/bin/python experiments/train.py --config=configs/lm.py:metric=l1,size=tiny --workdir=runs/lm_tiny_l1

Resuming with a config whose model, optimizer, data, seed or step budget differ from the checkpoint's is an
error listing the changed fields; ``--config.train.allow_config_change=True`` accepts the changes (all but
``train.steps``) and ``--config.train.allow_steps_change=True`` a new ``train.steps``, whose learning-rate
schedule then applies from the checkpoint's step on, e.g. to train the run above for 2000 steps in all:

  .venv/bin/python experiments/train.py --config=configs/lm.py:metric=l1,size=tiny,steps=2000 \
      --config.train.allow_steps_change=True --workdir=runs/lm_tiny_l1

Data parallel on every device of this machine (``mesh.data=-1``), and two processes on one machine with 4 CPU
devices each (``distributed.*``: process 0 listens at the coordinator address; run both, same workdir):

  .venv/bin/python experiments/train.py --config=configs/lm.py:metric=l1,size=tiny --config.mesh.data=-1 \
      --workdir=runs/lm_tiny_l1_dp
  JAX_NUM_CPU_DEVICES=4 .venv/bin/python experiments/train.py --config=configs/lm.py:metric=l1,size=tiny \
      --config.mesh.data=-1 --config.distributed.coordinator_address=localhost:12355 \
      --config.distributed.num_processes=2 --config.distributed.process_id=0 --workdir=runs/lm_tiny_l1_2p &
  (the same with --config.distributed.process_id=1)

All logic is in ``distattn_jax.training`` (``train_and_evaluate``); this is the absl shell around it. A mistake in
the flags (an unknown key, a value of the wrong type or out of range, a missing config file) is a usage error
with exit status 2, found before anything starts (``cli.run``). JAX's distributed runtime starts first
(``training.initialize_distributed``): nothing before it touches a device.
"""

from absl import flags, logging
from ml_collections import config_flags

from distattn_jax import training

import cli  # experiments/cli.py, beside this file

config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/lm.py:metric=l1,size=tiny.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the run's summary.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv) -> None:
  del argv  # flags only: cli.run refuses positional arguments
  training.initialize_distributed(flags.FLAGS.config)  # first: before anything touches a device
  logging.set_verbosity(logging.INFO)
  training.hide_orbax_info_logs()
  summary = training.train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir)
  trained = summary["steps"] - summary["resumed_from_step"]
  speed = f"{summary['tokens_per_second']:,.0f} tokens/s, " if "tokens_per_second" in summary else ""
  print(f"validation bits per byte: {summary['untrained_validation_bits_per_byte']:.4f} untrained -> "
        f"{summary['validation_bits_per_byte']:.4f} after {summary['steps']} steps ({trained} in this run, "
        f"{speed}{summary['wall_seconds']:.0f} s; {flags.FLAGS.workdir}/summary.json)")


if __name__ == "__main__":
  cli.run(main, validate=training.validate)
