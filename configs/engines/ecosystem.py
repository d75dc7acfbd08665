"""The complete system: the neural, quantum, marketing and business engines (``engines.default_config()``).

  .venv/bin/python experiments/ecosystem_demo.py --config=configs/engines/ecosystem.py --out=runs/ecosystem.json

Arguments: ``size`` (demo: the figures in docs/engines.md; test: seconds-sized settings), ``engines`` (the enabled
ones, e.g. ``engines=quantum+business``). Every field can be set by flag, e.g.
``--config.quantum.vqe.num_qubits=8 --config.quantum.vqe.model=heisenberg`` (the 8-qubit VQE check),
``--config.marketing.load.cells=my_cells.csv``, ``--config.neural.model.metric=l2``,
``--config.neural.levels.full=kernel,remat,jit``.
"""

from distattn_jax import engines, training

ALL = ("quantum", "neural", "marketing", "business")


def get_config(arg=None):
  arg = training.parse_arg(arg, size="demo", engines="+".join(ALL))
  enabled = [e for e in arg["engines"].split("+") if e]
  unknown = sorted(set(enabled) - set(ALL))
  if unknown or arg["size"] not in ("demo", "test"):
    raise ValueError(f"config argument engines={arg['engines']!r} / size={arg['size']!r}: engines are "
                     f"{'+'.join(ALL)}, sizes demo and test")
  config = engines.default_config()
  for name in ALL:
    config[f"enable_{name}_optimization"] = name in enabled
  if arg["size"] == "test":
    n = config.neural
    n.model.update(vocab_size=64, width=32, depth=1, num_heads=2, mlp_dim=64, max_len=32)
    n.seq_len, n.batch_size, n.repeats = 32, 2, 2
    config.quantum.qaoa.update(num_nodes=8, steps=100)
    config.quantum.vqe.update(num_qubits=3, steps=600)
    config.quantum.qnn.update(num_train=100, num_test=100, steps=150)
  return config
