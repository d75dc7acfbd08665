"""The quantum engine alone (``distattn_jax.engines.quantum.default_config()``); every field can be set by flag.

  .venv/bin/python experiments/ecosystem_demo.py --config=configs/engines/quantum.py --out=runs/quantum.json
"""

from distattn_jax.engines import quantum


def get_config(arg=None):
  del arg  # no variants: set fields by flag, e.g. --config.stages=...
  return quantum.default_config()
