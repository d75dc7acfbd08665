"""The ablation grid: metrics x lambda modes x tasks x seeds at a fixed budget per cell, resumable, with a
results file, a markdown table and plots.

``run_grid(config, results_dir)`` expands the config into cells, skips the ones ``results/<suite>.json``
already holds, trains the rest (in ``workers`` processes when > 1) and rewrites the JSON after every finished
cell through a temporary file and a rename, so a killed grid loses at most the cells that were running. A
results file written for a different grid definition (tasks, metrics, modes, seeds, budget) is refused with
the fields that differ. The markdown table and the PNG plots are rewritten from the JSON at the end.
"""

from __future__ import annotations

import concurrent.futures
import json
import multiprocessing
import os
import pathlib
import platform
import runpy
import tempfile
import time
from typing import Any

import ml_collections
import numpy as np

from distattn_jax import initializers
from distattn_jax import metrics as metrics_lib
from distattn_jax.data import tasks as tasks_lib
from distattn_jax.training import cells

SHIPPED_METRICS = ("dot", "l1", "l2", "sqeuclidean", "cosine", "chebyshev", "lp")
# Fields that do not change what a cell computes: where and how fast it runs.
NOT_DEFINITION = ("workers", "cache_dir")


class GridMismatchError(ValueError):
  """A results file holds cells of a different grid definition."""


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


def grid_cells(d: dict[str, Any]) -> list[tuple[str, str, str, int]]:
  """Cells ordered so that those sharing a compiled model (task, metric, mode) run one after another."""
  return [(t, m, mode, s) for t in d["tasks"] for m in d["metrics"] for mode in d["lambda_modes"]
          for s in range(d["seeds"])]


def machine() -> dict[str, Any]:
  cpu = platform.processor() or platform.machine()
  try:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        cpu = line.split(":", 1)[1].strip()
        break
  except OSError:
    pass
  import jax  # pylint: disable=import-outside-toplevel
  return {"cpu": cpu, "cores": os.cpu_count(), "backend": jax.default_backend(), "python": platform.python_version(),
          "jax": jax.__version__}


def _now() -> str:
  return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


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


def write_atomic(path: pathlib.Path, text: str) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
  umask = os.umask(0)
  os.umask(umask)
  try:
    os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes the file private; results are shared like any other file
    with os.fdopen(fd, "w") as f:
      f.write(text)
    os.replace(tmp, path)
  except BaseException:
    pathlib.Path(tmp).unlink(missing_ok=True)
    raise


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
  if isinstance(old, dict) and isinstance(new, dict):
    out = []
    for k in sorted(set(old) | set(new)):
      out += _differences(old.get(k, "<absent>"), new.get(k, "<absent>"), f"{prefix}{k}.")
    return out
  return [] if old == new else [f"{prefix[:-1]}: {old!r} (file) vs {new!r} (this run)"]


def load_results(path: pathlib.Path, d: dict[str, Any]) -> dict[str, Any]:
  """The results at ``path`` if they belong to grid ``d`` (a fresh document when there are none);
  :class:`GridMismatchError` listing the differing fields otherwise."""
  if not path.exists():
    return {"grid": d, "records": []}
  doc = json.loads(path.read_text())
  diffs = _differences(doc.get("grid", {}), d)
  if diffs:
    raise GridMismatchError(f"{path} holds results of a different grid definition; refusing to mix them. "
                            f"Differing fields: {'; '.join(diffs)}. Use another suite name or results dir, "
                            "or delete the file to start over.")
  return doc


def _cell_path(cell_dir: pathlib.Path, cell: tuple[str, str, str, int]) -> pathlib.Path:
  return cell_dir / (cell_key(*cell).replace("/", "__") + ".json")


def _run_group(group: list[tuple[str, str, str, int]], budget: dict[str, Any], cache_dir: str | None,
               cell_dir: str, register: str = "") -> list[dict[str, Any]]:
  """Runs cells that share a compiled model one after another in this process; each record is saved to its own
  file as soon as it exists, so a killed grid loses at most the running cell."""
  register_metrics(register)
  out = []
  for cell in group:
    record = cells.run_cell(*cell, budget, cache_dir=cache_dir)
    write_atomic(_cell_path(pathlib.Path(cell_dir), cell), json.dumps(record))
    out.append(record)
  return out


def run_grid(config: ml_collections.ConfigDict, results_dir: str | pathlib.Path, log=print) -> dict[str, Any]:
  """Runs the grid's missing cells and writes ``<suite>.json``, ``<suite>.md`` and ``<suite>_*.png``.

  Cells that share a model (task, metric, lambda mode) form a group run by one process, so its seeds reuse one
  compilation; ``config.workers`` processes run groups in parallel. Each finished cell is first saved under
  ``<suite>.cells/`` and then merged into ``<suite>.json``."""
  register_metrics(config.register)
  d = definition(config)
  results_dir = pathlib.Path(results_dir)
  path = results_dir / f"{config.suite}.json"
  cell_dir = results_dir / f"{config.suite}.cells"
  doc = load_results(path, d)
  # A task whose data is missing fails now, naming its package, not hours later.
  doc["baselines"] = {t: baseline(tasks_lib.load(t, cache_dir=config.cache_dir or None), d["budget"])
                      for t in d["tasks"]}
  doc["machine"] = machine()
  order = grid_cells(d)
  have = {cell_key(r["task"], r["metric"], r["lambda_mode"], r["seed"]) for r in doc["records"]}

  def merge(record):
    key = cell_key(record["task"], record["metric"], record["lambda_mode"], record["seed"])
    if key in have:
      return
    have.add(key)
    record["machine"] = doc["machine"]["cpu"]
    doc["records"].append(record)
    doc["records"].sort(key=lambda r: order.index((r["task"], r["metric"], r["lambda_mode"], r["seed"])))
    write_atomic(path, json.dumps(doc, indent=1))
    log(f"[{len(doc['records'])}/{len(order)}] {key}: {record['score_name']}={record['final']:.4f} "
        f"({record['wall_s']:.1f} s)")

  if path.exists() or cell_dir.exists():  # cells a killed run finished but did not merge
    for cell in order:
      if cell_key(*cell) not in have and _cell_path(cell_dir, cell).exists():
        merge(json.loads(_cell_path(cell_dir, cell).read_text()))
  todo = [c for c in order if cell_key(*c) not in have]
  groups: dict[tuple[str, str, str], list] = {}
  for cell in todo:
    groups.setdefault(cell[:3], []).append(cell)
  log(f"{config.suite}: {len(have)} cells done, {len(todo)} to run in {len(groups)} groups, "
      f"{config.workers} worker(s)")
  start, started = time.perf_counter(), _now()
  budget = dict(d["budget"], p=d["p"], pooling=d["pooling"])
  cache_dir = config.cache_dir or None
  if config.workers <= 1:
    for group in groups.values():
      for cell in group:
        _run_group([cell], budget, cache_dir, str(cell_dir))
        merge(json.loads(_cell_path(cell_dir, cell).read_text()))
  elif groups:
    context = multiprocessing.get_context("spawn")  # JAX's threads do not survive fork
    with concurrent.futures.ProcessPoolExecutor(config.workers, mp_context=context) as pool:
      futures = [pool.submit(_run_group, group, budget, cache_dir, str(cell_dir), config.register) for group in groups.values()]
      for future in concurrent.futures.as_completed(futures):
        for record in future.result():
          merge(record)
  if todo:  # a rerun that only rewrites the reports keeps the record of the runs that trained
    doc.setdefault("runs", []).append({"started": started, "finished": _now(), "cells": len(todo),
                                       "workers": config.workers, "wall_s": time.perf_counter() - start})
    doc["wall_s_last_run"] = doc["runs"][-1]["wall_s"]
  write_atomic(path, json.dumps(doc, indent=1))
  write_atomic(results_dir / f"{config.suite}.md", table(doc))
  plot(doc, results_dir, config.suite)
  return doc


def summary(doc: dict[str, Any]) -> dict[tuple[str, str, str], tuple[float, float, int]]:
  """``{(task, metric, mode): (mean, std, seeds)}`` of the final metric (std with ddof=1; 0 for one seed)."""
  groups: dict[tuple[str, str, str], list[float]] = {}
  for r in doc["records"]:
    groups.setdefault((r["task"], r["metric"], r["lambda_mode"]), []).append(r["final"])
  return {k: (float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0, len(v)) for k, v in groups.items()}


def _higher_is_better(doc, task) -> bool:
  return next(r["score_name"] for r in doc["records"] if r["task"] == task) == "accuracy"


def table(doc: dict[str, Any]) -> str:
  """Markdown: per task and lambda mode, mean +- std over seeds per metric (best in bold), then per task the
  winning cell, its margin over the best cell of another metric and whether the margin exceeds the seed spread (the sum of the two
  standard deviations)."""
  g = doc["grid"]
  s = summary(doc)
  lines = [f"Suite `{g['suite']}`: {g['seeds']} seeds per cell, {g['budget']['steps']} steps of batch "
           f"{g['budget']['batch_size']}, model width {g['budget']['width']}, depth {g['budget']['depth']}, "
           f"{g['budget']['num_heads']} heads. Accuracy (%) on the test split, higher is better; text: bits per "
           "byte on validation, lower is better. mean +- std over seeds.", "",
           "| task | lam | " + " | ".join(g["metrics"]) + " |", "|---|---|" + "---|" * len(g["metrics"])]
  verdicts = []
  for task in g["tasks"]:
    if not any(r["task"] == task for r in doc["records"]):
      continue
    higher = _higher_is_better(doc, task)
    scale = 100.0 if higher else 1.0
    present = {k: v for k, v in s.items() if k[0] == task and not np.isnan(v[0])}
    for mode in g["lambda_modes"]:
      row = {m: s.get((task, m, mode)) for m in g["metrics"]}
      vals = {m: v[0] for m, v in row.items() if v and not np.isnan(v[0])}
      best = (max if higher else min)(vals, key=vals.get) if vals else None
      cells_ = []
      for m in g["metrics"]:
        v = row[m]
        text = "-" if v is None else f"{v[0] * scale:.2f} +- {v[1] * scale:.2f}"
        cells_.append(f"**{text}**" if m == best else text)
      lines.append(f"| {task} | {mode} | " + " | ".join(cells_) + " |")
    ranked = sorted(present.items(), key=lambda kv: kv[1][0], reverse=higher)
    others = [kv for kv in ranked if kv[0][1] != ranked[0][0][1]] if ranked else []
    if others:  # the winner against the best cell of any other metric
      (k1, (m1, s1, _)), (k2, (m2, s2, _)) = ranked[0], others[0]
      margin = abs(m1 - m2) * scale
      exceeds = abs(m1 - m2) > s1 + s2
      # Every other metric at its best lam mode, and whether the winner clears it by more than the spread.
      best_of = {}
      for (_, metric, mode), v in ranked:
        best_of.setdefault(metric, (mode, v))
      beaten = [f"{metric} ({mode} lam, {m * scale:.2f})" for metric, (mode, (m, sd, _)) in best_of.items()
                if metric != k1[1] and abs(m1 - m) > s1 + sd]
      verdicts.append(f"- **{task}**: {k1[1]} ({k1[2]} lam) wins with {m1 * scale:.2f}; best other metric {k2[1]} "
                      f"({k2[2]} lam) {m2 * scale:.2f}; margin {margin:.2f} "
                      + ("exceeds" if exceeds else "does not exceed")
                      + f" the seed spread ({(s1 + s2) * scale:.2f} = sum of the two stds). Metrics it beats by more "
                      "than the seed spread, each at its better lam mode: " + (", ".join(beaten) or "none") + ".")
  if len(g["lambda_modes"]) == 2:
    verdicts += ["", _modes_line(doc, s)]
  floor = _floor_lines(doc)
  if floor:
    verdicts += ["", "Against a model that ignores its input (uniform guess; always the most frequent class of the "
                 "scored test examples), the weakest cell of each task:", "", *floor]
  verdicts += ["", "Was the budget enough? The held-out metric of the learning curve over the last "
               f"{g['budget']['eval_every']} steps, the training loss, and how far learned lam moved from its "
               "calibrated start:", "",
               *_budget_lines(doc)]
  nonfinite = [cell_key(r["task"], r["metric"], r["lambda_mode"], r["seed"]) for r in doc["records"]
               if not r["finite"]]
  lines += ["", *verdicts, "", "Non-finite cells: " + (", ".join(nonfinite) if nonfinite else "none") + "."]
  m = doc.get("machine", {})
  walls = sum(r["wall_s"] for r in doc["records"])
  lines.append(f"Machine: {m.get('cpu')} ({m.get('cores')} cores, {m.get('backend')}); summed cell wall time "
               f"{walls / 60:.1f} min over {len(doc['records'])} cells.")
  return "\n".join(lines) + "\n"


def _modes_line(doc: dict[str, Any], s: dict) -> str:
  """The (task, metric) pairs whose two lam modes differ by more than the seed spread."""
  g = doc["grid"]
  a, b = g["lambda_modes"]
  out = []
  for task in g["tasks"]:
    if not any(r["task"] == task for r in doc["records"]):
      continue
    scale = 100.0 if _higher_is_better(doc, task) else 1.0
    for metric in g["metrics"]:
      va, vb = s.get((task, metric, a)), s.get((task, metric, b))
      if va and vb and abs(va[0] - vb[0]) > va[1] + vb[1]:
        out.append(f"{task}/{metric} ({a} {va[0] * scale:.2f}, {b} {vb[0] * scale:.2f})")
  return (f"{a.capitalize()} against {b} lam, same metric: differences beyond the seed spread in {len(out)} of "
          f"{sum(1 for t in g['tasks'] for m in g['metrics'] if (t, m, a) in s and (t, m, b) in s)} pairs"
          + (": " + ", ".join(out) if out else "") + ".")


def _floor_lines(doc: dict[str, Any]) -> list[str]:
  """Per task: the weakest cell against the uniform and majority-class baselines (results files written before
  baselines were recorded have none, and get no lines)."""
  out = []
  for task, b in doc.get("baselines", {}).items():
    rs = [r for r in doc["records"] if r["task"] == task and r["finite"]]
    if not rs:
      continue
    if b["kind"] == "lm":
      worst = max(rs, key=lambda r: r["final"])
      out.append(f"- **{task}**: uniform over bytes {b['uniform']:.2f} bits per byte; weakest cell "
                 f"{cell_key(worst['task'], worst['metric'], worst['lambda_mode'], worst['seed'])} "
                 f"{worst['final']:.4f} ({'beats' if worst['final'] < b['uniform'] else 'does not beat'} it).")
    else:
      worst = min(rs, key=lambda r: r["final"])
      floor = b["majority"]  # never below uniform: the most frequent class holds at least 1 / classes
      out.append(f"- **{task}**: {b['classes']} classes; uniform {100 * b['uniform']:.2f}%, majority class "
                 f"{100 * b['majority']:.2f}%; weakest cell "
                 f"{cell_key(worst['task'], worst['metric'], worst['lambda_mode'], worst['seed'])} "
                 f"{100 * worst['final']:.2f}% ({'beats' if worst['final'] > floor else 'does not beat'} both).")
  return out


def _budget_lines(doc: dict[str, Any]) -> list[str]:
  """Per task: in how many cells the learning curve still improved over its last interval (and the median
  improvement), the median training loss over that interval (near 0: the training set is memorised), and the
  largest factor by which any learned lam ended away from ``initializers.default_lambda``."""
  g = doc["grid"]
  head_dim = g["budget"]["width"] // g["budget"]["num_heads"]
  out = []
  for task in g["tasks"]:
    rs = [r for r in doc["records"] if r["task"] == task and r["finite"] and len(r["curve"]["eval"]) >= 2]
    if not rs:
      continue
    higher = _higher_is_better(doc, task)
    scale, unit = (100.0, " points") if higher else (1.0, " bits per byte")
    change = np.array([r["curve"]["eval"][-1] - r["curve"]["eval"][-2] for r in rs]) * (1 if higher else -1)
    loss = np.median([r["curve"]["train_loss"][-1] for r in rs])
    text = (f"- **{task}**: improved in {int(np.sum(change > 0))} of {len(rs)} cells (median improvement "
            f"{np.median(change) * scale:+.2f}{unit}); median training loss over those steps {loss:.3f} nats")
    moves = []
    for r in rs:
      if r["lambda_mode"] == "learned":
        start = initializers.default_lambda(r["metric"], head_dim, float(g["p"]))
        moves.append(float(np.max(np.abs(np.log(np.asarray(r["final_lambda"]) / start)))))
    if moves:
      text += (f"; learned lam ended within a factor {np.exp(max(moves)):.2f} of its start in every head "
               f"(median over cells of the largest factor {np.exp(np.median(moves)):.2f})")
    out.append(text + ".")
  return out


def plot(doc: dict[str, Any], results_dir: pathlib.Path, suite: str) -> list[pathlib.Path]:
  """Four PNGs, one panel per task: learning curves (held-out metric per metric, learned lam, mean over seeds),
  bars with error bars (every metric and mode), mean lam over training (learned lam) and attention entropy per
  layer at the end."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  g = doc["grid"]
  task_list = [t for t in g["tasks"] if any(r["task"] == t for r in doc["records"])]
  colors = {m: plt.cm.tab10(i % 10) for i, m in enumerate(g["metrics"])}
  mode = "learned" if "learned" in g["lambda_modes"] else g["lambda_modes"][0]

  def records(task, metric, m=mode):
    return [r for r in doc["records"] if r["task"] == task and r["metric"] == metric and r["lambda_mode"] == m
            and r["finite"]]

  def panels(title):
    fig, axes = plt.subplots(1, len(task_list), figsize=(4.5 * len(task_list), 3.6), squeeze=False)
    fig.suptitle(f"{suite}: {title}")
    return fig, axes[0]

  out = []

  def save(fig, name):
    fig.tight_layout()
    path = results_dir / f"{suite}_{name}.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    out.append(path)

  fig, axes = panels(f"held-out metric over training ({mode} lam, mean over seeds)")
  for ax, task in zip(axes, task_list):
    for metric in g["metrics"]:
      rs = records(task, metric)
      if rs:
        n = min(len(r["curve"]["step"]) for r in rs)
        ax.plot(rs[0]["curve"]["step"][:n], np.mean([r["curve"]["eval"][:n] for r in rs], 0), label=metric,
                color=colors[metric])
    ax.set_title(task)
    ax.set_xlabel("step")
    ax.set_ylabel("accuracy" if _higher_is_better(doc, task) else "bits per byte")
  axes[-1].legend(fontsize=7)
  save(fig, "curves")

  s = summary(doc)
  fig, axes = panels("final metric, mean +- std over seeds")
  width = 0.8 / len(g["lambda_modes"])
  for ax, task in zip(axes, task_list):
    x = np.arange(len(g["metrics"]))
    for j, m in enumerate(g["lambda_modes"]):
      vals = [s.get((task, metric, m), (np.nan, 0, 0)) for metric in g["metrics"]]
      ax.bar(x + j * width, [v[0] for v in vals], width, yerr=[v[1] for v in vals], label=f"{m} lam", capsize=2)
    ax.set_xticks(x + width * (len(g["lambda_modes"]) - 1) / 2, g["metrics"], rotation=45, fontsize=7)
    ax.set_title(task)
  axes[-1].legend(fontsize=7)
  save(fig, "bars")

  fig, axes = panels("lam over training (learned; mean over layers, heads and seeds)")
  for ax, task in zip(axes, task_list):
    for metric in g["metrics"]:
      rs = records(task, metric, "learned")
      if rs:
        n = min(len(r["curve"]["step"]) for r in rs)
        lam = np.mean([[np.mean(l) for l in r["curve"]["lambda"][:n]] for r in rs], 0)
        ax.plot(rs[0]["curve"]["step"][:n], lam, label=metric, color=colors[metric])
    ax.set_yscale("log")
    ax.set_title(task)
    ax.set_xlabel("step")
  axes[-1].legend(fontsize=7)
  save(fig, "lambda")

  fig, axes = panels(f"attention entropy per layer at the end ({mode} lam, nats, mean over seeds)")
  for ax, task in zip(axes, task_list):
    for metric in g["metrics"]:
      rs = records(task, metric)
      if rs and rs[0]["attention_entropy"]:
        ent = np.mean([r["attention_entropy"] for r in rs], 0)
        ax.plot(np.arange(len(ent)), ent, marker="o", label=metric, color=colors[metric])
    ax.set_title(task)
    ax.set_xlabel("layer")
  axes[-1].legend(fontsize=7)
  save(fig, "entropy")
  return out
