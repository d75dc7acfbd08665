"""The ablation suites: every metric x {learned lam, fixed calibrated lam} x tasks x 3 seeds at a fixed budget.

  # MNIST-1D and ItalyPowerDemand, 84 cells (4 min 30 s on an idle 2-core machine; see docs/research.md)
  .venv/bin/python experiments/ablate.py --config=configs/ablate.py:suite=quick --workers=2
  # the CPU-sized suite (ListOps 50-150 tokens, MNIST-1D, Fashion-MNIST, GunPoint, ItalyPowerDemand, text)
  .venv/bin/python experiments/ablate.py --config=configs/ablate.py:suite=cpu --workers=2
  # MNIST-1D and Fashion-MNIST at ten times the CPU suite's steps (84 cells)
  .venv/bin/python experiments/ablate.py --config=configs/ablate.py:suite=long --workers=2
  # LRA-length ListOps (500-2000 tokens, 96k training examples): an accelerator's job
  .venv/bin/python experiments/ablate.py --config=configs/ablate.py:suite=full

Results go to runs/ablate/<suite>/: <suite>.json (one record per cell), <suite>.md and <suite>_*.png; a rerun
skips finished cells. The tables committed under results/ are reproduced (or, with every cell there, regenerated
from their JSON) by adding ``--results_dir=results``, e.g.

  .venv/bin/python experiments/ablate.py --config=configs/ablate.py:suite=quick --workers=2 --results_dir=results

Any field can be overridden by flag, e.g. ``--config.metrics=dot,l1,huber`` (a metric registered by the file
``--config.register=my_metrics.py`` joins by name) or ``--config.seeds=5``; a changed definition needs a new
``suite`` name (``--config.suite=mine``), since one results file never mixes grids. Fashion-MNIST needs
``apt-get install dataset-fashion-mnist``; the UCR series need ``pip install -e .[tasks]``.
"""

import ml_collections

from distattn_jax.training import ablation

SUITES = {
    "quick": dict(tasks="mnist1d,italypowerdemand", steps=150, batch_size=32, eval_every=50,
                  width=64, depth=2, num_heads=4, mlp_dim=128),
    "cpu": dict(tasks="listops_cpu,mnist1d,fashion_mnist,gunpoint,italypowerdemand,text", steps=300,
                batch_size=32, eval_every=100, width=64, depth=2, num_heads=4, mlp_dim=128),
    # The CPU suite's model at ten times the steps, on the two tasks whose curves were still rising at 300.
    "long": dict(tasks="mnist1d,fashion_mnist", steps=3000, batch_size=32, eval_every=500, width=64, depth=2,
                 num_heads=4, mlp_dim=128),
    "full": dict(tasks="listops_full,mnist1d,fashion_mnist,gunpoint,italypowerdemand,text", steps=5000,
                 batch_size=32, eval_every=500, width=256, depth=4, num_heads=4, mlp_dim=1024),
}


def get_config(arg=None):
  suite = dict(s.split("=", 1) for s in (arg or "suite=quick").split(",")).get("suite", "quick")
  if suite not in SUITES:
    raise ValueError(f"config argument suite={suite!r} is not a suite; valid suites: {', '.join(SUITES)}")
  s = SUITES[suite]
  c = ml_collections.ConfigDict()
  c.suite = suite  # names the results files
  c.tasks = s["tasks"]
  c.metrics = ",".join(ablation.SHIPPED_METRICS)
  c.lambda_modes = "learned,fixed"
  c.seeds = 3
  c.register = ""  # a Python file that registers user metrics (da.metrics.register) before the grid runs
  c.p = 3.0  # the order of lp (and of any registered parametric metric)
  c.pooling = "mean"
  c.budget = ml_collections.ConfigDict(dict(
      steps=s["steps"], batch_size=s["batch_size"], learning_rate=3e-3, lambda_learning_rate=1e-2,
      warmup_steps=max(s["steps"] // 10, 1), weight_decay=0.01, eval_every=s["eval_every"],
      width=s["width"], depth=s["depth"], num_heads=s["num_heads"], mlp_dim=s["mlp_dim"],
      eval_batch_size=250,
      curve_eval_examples=500,  # held-out examples scored at each eval_every (the learning curve)
      eval_examples=0))  # examples in the final score; 0 = the whole test split
  c.workers = 1  # processes training cells in parallel (not part of the grid's definition)
  c.cache_dir = ""  # generated and converted data; "" = $DISTATTN_DATA_DIR or ~/.cache/distattn_jax
  return c
