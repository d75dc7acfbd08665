"""The business engine alone (``distattn_jax.engines.business.default_config()``); every field can be set by flag.

  .venv/bin/python experiments/ecosystem_demo.py --config=configs/engines/business.py --out=runs/business.json
"""

from distattn_jax.engines import business


def get_config(arg=None):
  del arg  # no variants: set fields by flag, e.g. --config.stages=...
  return business.default_config()
