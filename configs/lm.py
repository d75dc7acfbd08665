"""TruthGPT byte-level language model on the Python standard library's source (or ``data.path``).

The ``make run`` job (under 3 minutes on a 2-core CPU, then a sample from experiments/generate.py):

  .venv/bin/python experiments/train.py --config=configs/lm.py:metric=l1,size=tiny --workdir=runs/lm_tiny_l1

Arguments: ``metric`` (any of ``da.metrics.available()``), ``size`` (tiny, small, base: model and batch
presets), ``positions`` (learned, rotary), ``steps`` (0 = the size's default). Every other field is set by flag,
e.g. ``--config.optim.lambda_learning_rate=3e-2`` or ``--config.data.path=/some/text``.
"""

from distattn_jax import training

# Model width/depth/heads, context and batch, and the step count and peak learning rate that suit them.
SIZES = {
    "tiny": dict(width=128, depth=2, num_heads=4, mlp_dim=512, seq_len=64, batch_size=32, steps=1000,
                 learning_rate=3e-3),
    "small": dict(width=256, depth=4, num_heads=8, mlp_dim=1024, seq_len=256, batch_size=32, steps=10000,
                  learning_rate=1e-3),
    "base": dict(width=512, depth=8, num_heads=8, mlp_dim=2048, seq_len=512, batch_size=64, steps=50000,
                 learning_rate=6e-4),
}


def get_config(arg=None):
  arg = training.parse_arg(arg, metric="l1", size="tiny", positions="learned", steps=0)
  if arg["size"] not in SIZES:
    raise ValueError(f"config argument size={arg['size']!r} is not a preset; valid sizes: {', '.join(SIZES)}")
  size = SIZES[arg["size"]]
  config = training.default_config()
  config.model.metric = arg["metric"]
  config.model.positions = arg["positions"]
  for field in ("width", "depth", "num_heads", "mlp_dim"):
    config.model[field] = size[field]
  config.model.max_len = size["seq_len"]
  config.data.seq_len = size["seq_len"]
  config.data.batch_size = size["batch_size"]
  config.optim.learning_rate = size["learning_rate"]
  config.train.steps = arg["steps"] or size["steps"]
  # A sample fills the trained context: learned positions beyond data.seq_len were never trained.
  config.sample.length = size["seq_len"] - len(config.sample.prompt.encode())
  # Four evaluations and checkpoints per run, on multiples of the logging interval.
  quarter = max(config.train.steps // 4 // config.train.log_every, 1) * config.train.log_every
  config.train.eval_every = config.train.checkpoint_every = quarter
  return config
