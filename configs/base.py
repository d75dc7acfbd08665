"""The base config: every field a run can change, at its default (``distattn_jax.training.default_config``).

Any field can be set in the argument, dotted, and any other way ml_collections allows:

  .venv/bin/python experiments/train.py --config=configs/base.py:model.metric=l2,train.steps=100 \
      --workdir=runs/base_l2

Task configs (``configs/lm.py``) start from the same defaults and add presets.
"""

from distattn_jax import training


def get_config(arg=None):
  config = training.default_config()
  flat = training.config.flatten(config)
  overrides = training.parse_arg(arg, **flat)
  for key, value in overrides.items():
    if value != flat[key]:
      group, _, field = key.rpartition(".")
      (config[group] if group else config)[field] = value
  return config
