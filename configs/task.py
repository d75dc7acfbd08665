"""One task at one metric: the ablation grid cut to a single task, metric and lam mode (3 seeds), at a suite's
budget. For example, l1 attention with learned lam on the CPU-sized ListOps:

  .venv/bin/python experiments/ablate.py --config=configs/task.py:task=listops_cpu,metric=l1,size=cpu

Arguments: ``task`` (any of ``da.data.tasks.available()``), ``metric``, ``lam`` (learned or fixed), ``size``
(a suite of configs/ablate.py whose budget to use: quick, cpu, full). Results go to
runs/ablate/<task>_<metric>_<lam>_<size>/ (the folder experiments/ablate.py picks; --results_dir=... sets another).
"""

import pathlib

from distattn_jax import training


def _ablate():
  return training.load_config_file(pathlib.Path(__file__).with_name("ablate.py"))


def get_config(arg=None):
  arg = training.parse_arg(arg, task="listops_cpu", metric="dot", lam="learned", size="cpu")
  c = _ablate().get_config(f"suite={arg['size']}")
  c.suite = f"{arg['task']}_{arg['metric']}_{arg['lam']}_{arg['size']}"
  c.tasks, c.metrics, c.lambda_modes = arg["task"], arg["metric"], arg["lam"]
  return c
