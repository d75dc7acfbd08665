"""The marketing engine alone (``distattn_jax.engines.marketing.default_config()``); every field can be set by flag.

  .venv/bin/python experiments/ecosystem_demo.py --config=configs/engines/marketing.py --out=runs/marketing.json
"""

from distattn_jax.engines import marketing


def get_config(arg=None):
  del arg  # no variants: set fields by flag, e.g. --config.stages=...
  return marketing.default_config()
