"""One task at one metric: the ablation grid cut to a single task, metric and lam mode (3 seeds), at a suite's
budget. For example, l1 attention with learned lam on the CPU-sized ListOps:

  .venv/bin/python experiments/ablate.py --config=configs/task.py:task=listops_cpu,metric=l1,size=cpu

Arguments: ``task`` (any of ``da.data.tasks.available()``), ``metric``, ``lam`` (learned or fixed), ``size``
(a suite of configs/ablate.py whose budget to use: quick, cpu, full). Results go to
runs/ablate/<task>_<metric>_<lam>_<size>/ (the folder experiments/ablate.py picks; --results_dir=... sets another).
"""

import importlib.util
import pathlib


def _ablate():
  spec = importlib.util.spec_from_file_location("config_ablate", pathlib.Path(__file__).with_name("ablate.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config(arg=None):
  given = dict(s.split("=", 1) for s in (arg or "").split(",") if s)
  unknown = sorted(set(given) - {"task", "metric", "lam", "size"})
  if unknown:
    raise ValueError(f"config arguments {unknown} are unknown; valid: task, metric, lam, size")
  arg = {"task": "listops_cpu", "metric": "dot", "lam": "learned", "size": "cpu", **given}
  c = _ablate().get_config(f"suite={arg['size']}")
  c.suite = f"{arg['task']}_{arg['metric']}_{arg['lam']}_{arg['size']}"
  c.tasks, c.metrics, c.lambda_modes = arg["task"], arg["metric"], arg["lam"]
  return c
