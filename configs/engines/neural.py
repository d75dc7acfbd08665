"""The neural engine alone (``distattn_jax.engines.neural.default_config()``); every field can be set by flag.

  .venv/bin/python experiments/ecosystem_demo.py --config=configs/engines/neural.py --out=runs/neural.json
"""

from distattn_jax.engines import neural


def get_config(arg=None):
  del arg  # no variants: set fields by flag, e.g. --config.stages=...
  return neural.default_config()
