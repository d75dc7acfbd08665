"""What an ablation grid is: its definition from a config, its cells, and the fingerprint of each cell.

A cell's fingerprint hashes everything that decides what the cell computes: its task, metric, lambda mode and
seed, the budget (model size, steps, batch, learning rates, ``p``, pooling), the task's data as loaded (a hash
of its arrays, so another data variant or version differs) and the content of the file that registers user
metrics. A saved cell whose fingerprint differs from the one this grid would compute is never reused.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import runpy
from typing import Any

import ml_collections
import numpy as np

from distattn_jax import metrics as metrics_lib
from distattn_jax.data import tasks as tasks_lib
from distattn_jax.training import cells

SHIPPED_METRICS = ("dot", "l1", "l2", "sqeuclidean", "cosine", "chebyshev", "lp")
# Fields that do not change what a cell computes: where and how fast it runs.
NOT_DEFINITION = ("workers", "cache_dir")

Cell = tuple[str, str, str, int]  # (task, metric, lambda mode, seed)


def _names(value: str | tuple | list) -> list[str]:
  if isinstance(value, str):
    return [v.strip() for v in value.split(",") if v.strip()]
  return list(value)


_REGISTERED_FILES: set[str] = set()


def register_metrics(path: str) -> None:
  """Runs the Python file ``path`` once per process: it registers the user's metrics
  (``da.metrics.register``), so their names join the grid, here and in every worker process."""
  if path and path not in _REGISTERED_FILES:
    if not pathlib.Path(path).is_file():
      raise ValueError(f"register={path!r}: no such file (a Python file that calls da.metrics.register)")
    runpy.run_path(path)
    _REGISTERED_FILES.add(path)


def definition(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The grid's definition as plain JSON values: everything in the config but where and how fast it runs.
  Checks the task, metric and lambda-mode names (a ValueError lists the valid ones)."""
  d = json.loads(config.to_json())
  for key in NOT_DEFINITION:
    d.pop(key, None)
  if not d.get("register"):  # no user metrics: the definition of a grid of shipped metrics only
    d.pop("register", None)
  d["tasks"], d["metrics"], d["lambda_modes"] = (_names(config.tasks), _names(config.metrics),
                                                 _names(config.lambda_modes))
  for t in d["tasks"]:
    tasks_lib.spec(t)
  for m in d["metrics"]:
    if m not in metrics_lib.available():
      raise ValueError(f"unknown metric {m!r} in the grid; valid metrics (shipped and registered): "
                       f"{', '.join(metrics_lib.available())}")
  for mode in d["lambda_modes"]:
    if mode not in cells.LAMBDA_MODES:
      raise ValueError(f"unknown lambda mode {mode!r}; valid: {', '.join(cells.LAMBDA_MODES)}")
  if not isinstance(d["seeds"], int) or d["seeds"] < 1:
    raise ValueError(f"seeds={d['seeds']!r} must be a positive int (the number of seeds per cell)")
  return d


def cell_key(task: str, metric: str, mode: str, seed: int) -> str:
  return f"{task}/{metric}/{mode}/{seed}"


def record_key(record: dict[str, Any]) -> str:
  return cell_key(record["task"], record["metric"], record["lambda_mode"], record["seed"])


def grid_cells(d: dict[str, Any]) -> list[Cell]:
  """Cells ordered so that those sharing a compiled model (task, metric, mode) run one after another."""
  return [(t, m, mode, s) for t in d["tasks"] for m in d["metrics"] for mode in d["lambda_modes"]
          for s in range(d["seeds"])]


def cell_budget(d: dict[str, Any]) -> dict[str, Any]:
  """What :func:`cells.run_cell` trains a cell of grid ``d`` with: the budget plus ``p`` and pooling."""
  return dict(d["budget"], p=d["p"], pooling=d["pooling"])


def baseline(data: Any, budget: dict[str, Any]) -> dict[str, Any]:
  """What a model that ignores its input scores on the examples a cell is scored on: for classification the
  uniform guess (1 / classes) and always answering the most frequent class of those test examples; for text a
  uniform guess over the 256 byte values (8 bits per byte)."""
  if getattr(data, "kind", "classify") == "lm":
    return {"kind": "lm", "uniform": float(np.log2(data.vocab_size))}
  labels = np.asarray(data.test.labels)
  if budget.get("eval_examples"):
    labels = labels[:budget["eval_examples"]]
  counts = np.bincount(labels, minlength=data.num_classes)
  return {"kind": "classify", "classes": int(data.num_classes), "uniform": 1.0 / data.num_classes,
          "majority": float(counts.max() / counts.sum()), "majority_class": int(counts.argmax())}


def data_fingerprint(data: Any) -> str:
  """A hash of a loaded task's data: every array of its splits (dtype, shape and bytes) and the sizes a model
  is built from, so another variant, version or corpus of a task hashes differently wherever its files lie."""
  h = hashlib.sha256()

  def add(array) -> None:
    array = np.ascontiguousarray(array)
    h.update(f"{array.dtype.str}{array.shape}".encode())
    h.update(array.tobytes())

  if getattr(data, "kind", "classify") == "lm":
    h.update(json.dumps({"vocab_size": data.vocab_size, "max_len": data.max_len}).encode())
    add(data.corpus.train)
    add(data.corpus.validation)
  else:
    h.update(json.dumps({"num_classes": data.num_classes, "buckets": list(data.buckets),
                         "vocab_size": data.vocab_size, "features": data.features}).encode())
    for split in (data.train, data.test):
      for array in (split.inputs, split.lengths, split.labels):
        add(array)
  return h.hexdigest()


def file_fingerprint(path: str) -> str | None:
  """A hash of the content of the file at ``path`` (None for no file)."""
  return hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest() if path else None


def cell_fingerprint(cell: Cell, budget: dict[str, Any], data: str, register: str | None) -> str:
  """The hash of what defines ``cell``: its coordinates, ``budget`` (:func:`cell_budget`), the data's
  :func:`data_fingerprint` and the registering file's :func:`file_fingerprint`."""
  fields = {"cell": list(cell), "budget": budget, "data": data, "register": register}
  return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()
