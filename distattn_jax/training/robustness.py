"""Robustness per metric: classifiers trained per metric and seed at an ablation suite's budget, measured clean,
under Gaussian input noise, under L-inf adversarial perturbations (FGSM and PGD) and by a local Lipschitz
estimate of their logits; a resumable results file, a markdown report and a plot (``experiments/robustness.py``).

Each cell (task, metric, seed) trains an encoder exactly as an ablation cell does (:func:`cells.train_cell`),
saves its parameters (``<suite>.cells/<cell>.msgpack``, Flax's msgpack) and then measures, on the first
``eval.examples`` test examples:

* ``clean``: accuracy;
* ``noise``: accuracy with ``N(0, sigma^2)`` added to every real input feature, per level in ``eval.noise``;
* ``fgsm`` and ``pgd``: robust accuracy under an L-inf perturbation of radius ``epsilon`` of the model's input
  features (MNIST-1D's steps, Fashion-MNIST's standardised patch pixels; no clipping to a pixel range). FGSM
  takes one signed-gradient step of the cross-entropy; PGD takes ``eval.pgd_steps`` steps of
  ``pgd_step_factor * epsilon / pgd_steps`` from the clean input, each projected back into the ball. An example
  counts as robust when it is classified correctly at the clean input and at every point the attack visited, so
  robust accuracy never exceeds clean accuracy;
* ``lipschitz``: the spectral norm of the Jacobian of the logits with respect to the input
  (:func:`distattn_jax.analysis.jacobian_norm`) at ``eval.lipschitz_points`` test points, taken at once: the
  examples are independent, so the Jacobian of the stacked points is block diagonal and its norm is the largest
  of the points' norms (``max``); ``mean`` is the mean of the per-point norms.

``<results_dir>/<suite>.json`` holds one record per cell and is rewritten atomically after each; a rerun skips
cells whose record matches the current settings (a fingerprint of the cell, the training budget, the data and
the evaluation settings), and reuses saved parameters when only the evaluation changed. A run with other metrics
(or seeds, or tasks) adds them to the same file; one with another budget or evaluation is refused. The report
(mean +- std over seeds; each metric against dot, judged against the seed spread) and the plot are rewritten
from the whole file at the end. One runner at a time per folder and suite (the ablation grid's lock).

This module is long because it holds the whole study (cells, measurements, resumable runner, report and plot)
in one place, as the ablation grid's modules do together.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import pathlib
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization

from distattn_jax import analysis
from distattn_jax import metrics as metrics_lib
from distattn_jax.data import tasks as tasks_lib
from distattn_jax.training import ablation, cells, writers
from distattn_jax.training.ablation import grid
from distattn_jax.training.ablation import report as ablation_report

# Fields of the config that do not decide what a cell computes, or that several runs may differ in while
# writing one results file (cells are keyed by task, metric and seed).
NOT_DEFINITION = ("tasks", "metrics", "seeds", "cache_dir")
TIE = 1e-9  # differences below this are rounding (an accuracy moves in steps of 1 / examples)
Cell = tuple[str, str, int]  # (task, metric, seed)


def _floats(value: str) -> list[float]:
  return [float(v) for v in str(value).split(",") if v.strip()]


def _names(value: str) -> list[str]:
  return [v.strip() for v in str(value).split(",") if v.strip()]


def level_key(value: float) -> str:
  """A level's key in a record (``0.1`` -> ``"0.1"``)."""
  return f"{value:g}"


# ---------------------------------------------------------------------------------------------- definition ---


def definition(config) -> dict[str, Any]:
  """The study's definition as plain JSON values: the config less the fields a merged run may change
  (:data:`NOT_DEFINITION`). Checks the task, metric and lambda-mode names and the evaluation settings."""
  for t in _names(config.tasks):
    if tasks_lib.spec(t).kind != "classify":
      raise ValueError(f"task {t!r} is not a classification task; robustness is measured on classifiers")
  for m in _names(config.metrics):
    if m not in metrics_lib.available():
      raise ValueError(f"unknown metric {m!r}; valid metrics (shipped and registered): "
                       f"{', '.join(metrics_lib.available())}")
  if config.lambda_mode not in cells.LAMBDA_MODES:
    raise ValueError(f"lambda_mode={config.lambda_mode!r}; valid: {', '.join(cells.LAMBDA_MODES)}")
  if not isinstance(config.seeds, int) or config.seeds < 1:
    raise ValueError(f"seeds={config.seeds!r} must be a positive int")
  e = config.eval
  if any(s < 0 for s in _floats(e.noise)) or any(x <= 0 for x in _floats(e.epsilons)):
    raise ValueError(f"eval.noise={e.noise!r} must be >= 0 and eval.epsilons={e.epsilons!r} > 0")
  if e.pgd_steps < 1 or e.examples < 1 or e.lipschitz_points < 1:
    raise ValueError("eval.pgd_steps, eval.examples and eval.lipschitz_points must be positive")
  d = json.loads(config.to_json())
  for key in NOT_DEFINITION:
    d.pop(key, None)
  if not d.get("register"):
    d.pop("register", None)
  return d


def study_cells(config) -> list[Cell]:
  """Seed by seed (a study stopped early has every metric at fewer seeds); a model's compilations are cached in
  the process, so its seeds share them wherever they fall."""
  return [(t, m, s) for s in range(config.seeds) for t in _names(config.tasks) for m in _names(config.metrics)]


def cell_key(task: str, metric: str, seed: int) -> str:
  return f"{task}/{metric}/{seed}"


def record_key(record: dict[str, Any]) -> str:
  return cell_key(record["task"], record["metric"], record["seed"])


def train_budget(config) -> dict[str, Any]:
  """What ``cells.train_cell`` trains a cell with: the budget plus ``p`` and pooling (as an ablation cell)."""
  return dict(config.budget.to_dict(), p=float(config.p), pooling=config.pooling)


def fingerprints(cell: Cell, config, data_print: str, register_print: str | None) -> tuple[str, str]:
  """``(training, evaluation)`` fingerprints of ``cell``: the ablation grid's cell fingerprint of the training
  (cell, lambda mode, budget, data, registered metrics), and that hashed with the evaluation settings."""
  task, metric, seed = cell
  train = ablation.cell_fingerprint((task, metric, config.lambda_mode, seed), train_budget(config), data_print,
                                    register_print)
  evaluation = hashlib.sha256(json.dumps({"train": train, "eval": config.eval.to_dict()}, sort_keys=True)
                              .encode()).hexdigest()
  return train, evaluation


# ------------------------------------------------------------------------------------------------ measures ---


@functools.lru_cache(maxsize=32)
def functions(model) -> dict[str, Callable]:
  """Jitted measurements of ``model`` (a Linen module: hashes by value, so seeds share the compilations), each
  taking ``params`` and a classification batch (``inputs [B, T, F]``, ``lengths``, ``labels``, ``weights``):

  * ``correct(params, batch, inputs)``: ``[B]`` bool, argmax of the logits at ``inputs`` is the label;
  * ``noisy(params, batch, sigma, key)``: ``[B]`` bool at ``inputs + sigma * N(0, 1)`` on the real positions;
  * ``fgsm(params, batch, eps)``: the perturbed inputs ``inputs + eps * sign(grad)`` (real positions);
  * ``pgd(params, batch, eps, step, steps)``: ``(inputs after the last step, [B] bool robust)``; robust means
    correct at the clean input and at every step's point.
  """

  def real(batch):
    t = batch["inputs"].shape[1]
    return (jnp.arange(t)[None, :] < batch["lengths"][:, None]).astype(jnp.float32)[:, :, None]

  def logits(params, batch, inputs):
    return model.apply({"params": params}, inputs, batch["lengths"])

  def correct(params, batch, inputs):
    return jnp.argmax(logits(params, batch, inputs), -1) == batch["labels"]

  def loss(inputs, params, batch):
    ce = optax.softmax_cross_entropy_with_integer_labels(logits(params, batch, inputs), batch["labels"])
    return jnp.sum(ce * batch["weights"])

  grad = jax.grad(loss)

  def noisy(params, batch, sigma, key):
    noise = jax.random.normal(key, batch["inputs"].shape, batch["inputs"].dtype)
    return correct(params, batch, batch["inputs"] + sigma * noise * real(batch))

  def fgsm(params, batch, eps):
    x = batch["inputs"]
    return x + eps * jnp.sign(grad(x, params, batch)) * real(batch)

  def pgd(params, batch, eps, step, steps):
    x0 = batch["inputs"]

    def body(_, carry):
      x, ok = carry
      x = x + step * jnp.sign(grad(x, params, batch)) * real(batch)
      x = jnp.clip(x, x0 - eps, x0 + eps)
      return x, ok & correct(params, batch, x)

    return jax.lax.fori_loop(0, steps, body, (x0, correct(params, batch, x0)))

  def point_norms(params, batch):
    def one(x, length):
      f = lambda x: model.apply({"params": params}, x[None], length[None])[0]  # noqa: E731
      jac = jax.jacrev(f)(x)
      return jnp.linalg.norm(jac.reshape(jac.shape[0], -1), 2)
    return jax.vmap(one)(batch["inputs"], batch["lengths"])

  return {"logits": jax.jit(logits), "correct": jax.jit(correct), "noisy": jax.jit(noisy), "fgsm": jax.jit(fgsm),
          "pgd": jax.jit(pgd, static_argnums=4), "point_norms": jax.jit(point_norms)}


def accuracy(flags_: list[np.ndarray], batches: list[dict[str, np.ndarray]]) -> float:
  """The weighted fraction of true ``flags_`` (one ``[B]`` array per batch; filler rows weigh 0)."""
  hits = sum(float(np.sum(np.asarray(f, np.float64) * b["weights"])) for f, b in zip(flags_, batches))
  return hits / sum(float(np.sum(b["weights"])) for b in batches)


def lipschitz(model, params, batch: dict[str, np.ndarray], points: int) -> dict[str, Any]:
  """The Jacobian's spectral norm of the logits with respect to the input at the batch's first ``points``
  examples: ``max`` by ``analysis.jacobian_norm`` on the stacked points (block diagonal: the largest
  point's norm), ``mean`` and ``points`` from each point's exact norm."""
  points = min(points, int(np.sum(batch["weights"] > 0)))
  sub = {k: v[:points] for k, v in batch.items()}
  lengths = sub["lengths"]
  fn = lambda x: model.apply({"params": params}, x, lengths)  # noqa: E731
  norm = analysis.jacobian_norm(fn, sub["inputs"], ord=2)
  each = np.asarray(functions(model)["point_norms"](params, sub), np.float64)
  return {"max": float(norm.value), "method": norm.method, "mean": float(np.mean(each)),
          "points": each.tolist()}


def measure(model, params, batches: list[dict[str, np.ndarray]], e) -> dict[str, Any]:
  """Every measurement of one trained model on ``batches`` with the evaluation settings ``e``."""
  f = functions(model)
  clean = [f["correct"](params, b, b["inputs"]) for b in batches]
  out: dict[str, Any] = {"clean": accuracy(clean, batches), "noise": {}, "fgsm": {}, "pgd": {}}
  for i, sigma in enumerate(_floats(e.noise)):
    keys = [jax.random.fold_in(jax.random.fold_in(jax.random.key(e.noise_seed), i), j) for j in range(len(batches))]
    out["noise"][level_key(sigma)] = accuracy([f["noisy"](params, b, sigma, k) for b, k in zip(batches, keys)],
                                              batches)
  for eps in _floats(e.epsilons):
    hits = []
    for b, ok in zip(batches, clean):
      x = f["fgsm"](params, b, eps)
      hits.append(np.asarray(ok) & np.asarray(f["correct"](params, b, x)))
    out["fgsm"][level_key(eps)] = accuracy(hits, batches)
    step = e.pgd_step_factor * eps / e.pgd_steps
    out["pgd"][level_key(eps)] = accuracy([f["pgd"](params, b, eps, step, e.pgd_steps)[1] for b in batches],
                                          batches)
  out["lipschitz"] = lipschitz(model, params, batches[0], e.lipschitz_points)
  return out


# ------------------------------------------------------------------------------------------------ the study ---


def _write_bytes_atomically(path: pathlib.Path, data: bytes) -> None:
  tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
  try:
    with open(tmp, "wb") as fh:
      fh.write(data)
      fh.flush()
      os.fsync(fh.fileno())
    os.replace(tmp, path)
  except BaseException:
    tmp.unlink(missing_ok=True)
    raise


def params_path(cell_dir: pathlib.Path, cell: Cell) -> pathlib.Path:
  return cell_dir / (cell_key(*cell).replace("/", "__") + ".msgpack")


def load_params(cell_dir: pathlib.Path, cell: Cell, train_print: str) -> tuple[Any, dict[str, Any]] | None:
  """The saved ``(params, training record)`` of ``cell`` if they were trained with fingerprint ``train_print``."""
  path, meta = params_path(cell_dir, cell), params_path(cell_dir, cell).with_suffix(".json")
  if not (path.exists() and meta.exists()):
    return None
  try:
    record = json.loads(meta.read_text())
    if record.get("fingerprint") != train_print:
      return None
    return serialization.msgpack_restore(path.read_bytes()), record
  except (OSError, ValueError):
    return None


def save_params(cell_dir: pathlib.Path, cell: Cell, params: Any, record: dict[str, Any]) -> None:
  """The parameters (Flax msgpack) and, after them, the training record naming their fingerprint."""
  cell_dir.mkdir(parents=True, exist_ok=True)
  _write_bytes_atomically(params_path(cell_dir, cell),
                          serialization.msgpack_serialize(jax.tree.map(np.asarray, params)))
  writers.write_text_atomically(params_path(cell_dir, cell).with_suffix(".json"), json.dumps(record))


def eval_batches(data, e) -> list[dict[str, np.ndarray]]:
  return data.eval_batches(min(e.batch_size, e.examples), limit=e.examples)


def run_study(config, results_dir: str | pathlib.Path, plot_path: str | pathlib.Path | None = None,
              log: Callable[[str], Any] = print) -> dict[str, Any]:
  """Trains and measures the missing cells and writes ``<suite>.json``, ``<suite>.md`` and the plot; returns the
  results document. One runner at a time per folder and suite (the ablation grid's lock)."""
  results_dir = pathlib.Path(results_dir)
  with ablation.results_lock(results_dir, config.suite):
    return _run_locked(config, results_dir, pathlib.Path(plot_path or results_dir / f"{config.suite}.png"), log)


def _run_locked(config, results_dir: pathlib.Path, plot_path: pathlib.Path, log) -> dict[str, Any]:
  ablation.register_metrics(config.register)
  d = definition(config)
  path = results_dir / f"{config.suite}.json"
  cell_dir = results_dir / f"{config.suite}.cells"
  doc = ablation.load_results(path, d)
  cache_dir = config.cache_dir or None
  data = {t: tasks_lib.load(t, cache_dir=cache_dir) for t in _names(config.tasks)}
  data_prints = {t: ablation.data_fingerprint(v) for t, v in data.items()}
  register = grid.file_fingerprint(config.register)
  order = study_cells(config)
  prints = {cell_key(*c): fingerprints(c, config, data_prints[c[0]], register) for c in order}
  records = {record_key(r): r for r in doc["records"]}
  for key, (_, evaluation) in prints.items():
    if key in records and records[key].get("fingerprint") != evaluation:
      log(f"{key}: the record was made with other settings or data; measuring it again")
      del records[key]
  todo = [c for c in order if cell_key(*c) not in records]
  log(f"{config.suite}: {len(order) - len(todo)} of {len(order)} cells done, {len(todo)} to run")
  machine = ablation.machine()
  start, started, trained = time.perf_counter(), time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), 0
  budget = train_budget(config)
  for n, cell in enumerate(todo, 1):
    task, metric, seed = cell
    t0 = time.perf_counter()
    train_print, eval_print = prints[cell_key(*cell)]
    saved = load_params(cell_dir, cell, train_print)
    if saved is None:
      train_record, params = cells.train_cell(task, metric, config.lambda_mode, seed, budget, cache_dir=cache_dir)
      train_record = {k: v for k, v in train_record.items() if k != "curve"}
      train_record["fingerprint"] = train_print
      save_params(cell_dir, cell, params, train_record)
      trained += 1
    else:
      params, train_record = saved
    model = cells.model_for(task, data[task], metric, config.lambda_mode, budget)
    t1 = time.perf_counter()
    result = measure(model, params, eval_batches(data[task], config.eval), config.eval)
    record = {"task": task, "metric": metric, "seed": seed, "lambda_mode": config.lambda_mode, **result,
              "examples": config.eval.examples, "train": train_record, "eval_wall_s": time.perf_counter() - t1,
              "wall_s": time.perf_counter() - t0, "machine": machine["processor"], "fingerprint": eval_print}
    records[cell_key(*cell)] = record
    doc["records"] = _ordered(records, config)
    doc["machine"] = machine
    writers.write_text_atomically(path, json.dumps(doc, indent=1))
    log(f"[{n}/{len(todo)}] {cell_key(*cell)}: clean {result['clean']:.3f}, pgd "
        + ", ".join(f"{k}: {v:.3f}" for k, v in result["pgd"].items())
        + f", lipschitz {result['lipschitz']['max']:.3g} ({record['wall_s']:.1f} s"
        + (", trained" if saved is None else ", saved parameters") + ")")
  doc["records"] = _ordered(records, config)
  if todo:
    doc.setdefault("runs", []).append({"started": started, "cells": len(todo), "trained": trained,
                                       "wall_s": time.perf_counter() - start})
  doc.setdefault("machine", machine)
  writers.write_text_atomically(path, json.dumps(doc, indent=1))
  writers.write_text_atomically(results_dir / f"{config.suite}.md", report(doc))
  plot(doc, plot_path)
  return doc


def _ordered(records: dict[str, dict[str, Any]], config) -> list[dict[str, Any]]:
  """Records by task, metric (dot first, then the config's order, then any merged earlier) and seed."""
  tasks, metrics = _names(config.tasks), _names(config.metrics)
  rank = lambda v, order: (order.index(v) if v in order else len(order), v)  # noqa: E731
  return sorted(records.values(), key=lambda r: (rank(r["task"], tasks), r["metric"] != "dot",
                                                 rank(r["metric"], metrics), r["seed"]))


# ------------------------------------------------------------------------------------------------ reporting ---


def columns(doc: dict[str, Any]) -> list[tuple[str, str, Callable[[dict], float]]]:
  """``(label, kind, value of a record)`` per measured quantity: kind ``"accuracy"`` (higher is better) or
  ``"lipschitz"``."""
  g = doc["grid"]["eval"]
  out = [("clean", "accuracy", lambda r: r["clean"])]
  out += [(f"noise {level_key(s)}", "accuracy", (lambda k: lambda r: r["noise"][k])(level_key(s)))
          for s in _floats(g["noise"])]
  for attack in ("fgsm", "pgd"):
    out += [(f"{attack.upper()} {level_key(x)}", "accuracy", (lambda a, k: lambda r: r[a][k])(attack, level_key(x)))
            for x in _floats(g["epsilons"])]
  out.append(("Lipschitz max", "lipschitz", lambda r: r["lipschitz"]["max"]))
  out.append(("Lipschitz mean", "lipschitz", lambda r: r["lipschitz"]["mean"]))
  return out


def summary(doc: dict[str, Any]) -> dict[tuple[str, str, str], tuple[float, float, int]]:
  """``{(task, metric, column label): (mean, std with ddof=1 (0 for one seed), seeds)}``, and for every
  accuracy column but clean also ``"drop <label>"``: clean minus it, per seed."""
  groups: dict[tuple[str, str, str], list[float]] = {}
  for r in doc["records"]:
    for label, kind, value in columns(doc):
      groups.setdefault((r["task"], r["metric"], label), []).append(value(r))
      if kind == "accuracy" and label != "clean":
        groups.setdefault((r["task"], r["metric"], f"drop {label}"), []).append(r["clean"] - value(r))
  return {k: (float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0, len(v)) for k, v in groups.items()}


def metrics_of(doc: dict[str, Any], task: str) -> list[str]:
  seen = []
  for r in doc["records"]:
    if r["task"] == task and r["metric"] not in seen:
      seen.append(r["metric"])
  return seen


def tasks_of(doc: dict[str, Any]) -> list[str]:
  seen = []
  for r in doc["records"]:
    if r["task"] not in seen:
      seen.append(r["task"])
  return seen


def verdicts(doc: dict[str, Any], task: str, baseline: str = "dot") -> list[str]:
  """Per metric of ``task`` other than ``baseline``: the quantities (accuracy per perturbation, its drop from
  clean, the Lipschitz estimate) whose mean differs from the baseline's by more than the seed spread (the sum of
  the two standard deviations, as in the ablation report), or that it is within the spread in all of them."""
  s = summary(doc)
  labels = [c[0] for c in columns(doc)]
  labels += [f"drop {c[0]}" for c in columns(doc) if c[1] == "accuracy" and c[0] != "clean"]
  out = []
  if (task, baseline, "clean") not in s:
    return [f"- no {baseline} cells on {task}: no comparison"]
  for metric in metrics_of(doc, task):
    if metric == baseline:
      continue
    if s[(task, metric, "clean")][2] < 2 or s[(task, baseline, "clean")][2] < 2:
      out.append(f"- **{metric}**: {ablation_report.NO_SPREAD}.")
      continue
    beyond = []
    for label in labels:
      (m, sd, _), (mb, sdb, _) = s[(task, metric, label)], s[(task, baseline, label)]
      if abs(m - mb) > sd + sdb + TIE:
        scale = 1.0 if label.startswith("Lipschitz") else 100.0
        unit = "" if label.startswith("Lipschitz") else " points"
        name = label if label.startswith(("drop", "Lipschitz")) else f"accuracy {label}"
        beyond.append(f"{name} {m * scale:.2f} vs {mb * scale:.2f} ({'higher' if m > mb else 'lower'} by "
                      f"{abs(m - mb) * scale:.2f}{unit}; spread {(sd + sdb) * scale:.2f})")
    if beyond:
      out.append(f"- **{metric}** differs from {baseline} by more than the seed spread in {len(beyond)} of "
                 f"{len(labels)} quantities: " + "; ".join(beyond) + ". Within the spread in the rest.")
    else:
      out.append(f"- **{metric}**: within the seed spread of {baseline} in all {len(labels)} quantities.")
  return out


def report(doc: dict[str, Any]) -> str:
  """Markdown: per task, accuracy (%) mean +- std over seeds per metric and perturbation with the Lipschitz
  estimate; the drop from clean per perturbation; and each metric's verdict against dot."""
  g = doc["grid"]
  b, e = g["budget"], g["eval"]
  s = summary(doc)
  cols = columns(doc)
  lines = [f"Suite `{g['suite']}`: {b['steps']} steps of batch {b['batch_size']}, width {b['width']}, depth "
           f"{b['depth']}, {b['num_heads']} heads, {g['lambda_mode']} lam; measured on the first {e['examples']} "
           f"test examples. Accuracy in %, mean +- std over seeds. noise s: Gaussian noise of standard deviation s "
           f"on every input feature; FGSM / PGD e: robust accuracy under an L-inf perturbation of radius e "
           f"(PGD: {e['pgd_steps']} steps of {e['pgd_step_factor']:g} e / {e['pgd_steps']}). Lipschitz max / "
           f"mean: the largest and the mean spectral norm of the logits' Jacobian with respect to the input over "
           f"{e['lipschitz_points']} test points (lower is smoother).", ""]
  for task in tasks_of(doc):
    metrics = metrics_of(doc, task)
    seeds = sorted({r["seed"] for r in doc["records"] if r["task"] == task})
    lines += [f"**{task}** ({len(seeds)} seeds):", "", "| metric | " + " | ".join(c[0] for c in cols) + " |",
              "|---|" + "---|" * len(cols)]
    for metric in metrics:
      row = []
      for label, kind, _ in cols:
        m, sd, _ = s[(task, metric, label)]
        row.append(f"{m:.3g} +- {sd:.2g}" if kind == "lipschitz" else f"{100 * m:.1f} +- {100 * sd:.1f}")
      lines.append(f"| {metric} | " + " | ".join(row) + " |")
    drops = [c[0] for c in cols if c[1] == "accuracy" and c[0] != "clean"]
    lines += ["", f"Drop from clean accuracy on {task} (points, mean +- std over seeds):", "",
              "| metric | " + " | ".join(drops) + " |", "|---|" + "---|" * len(drops)]
    for metric in metrics:
      lines.append(f"| {metric} | " + " | ".join(
          "{:.1f} +- {:.1f}".format(100 * s[(task, metric, f"drop {c}")][0], 100 * s[(task, metric, f"drop {c}")][1])
          for c in drops) + " |")
    lines += ["", f"Against dot on {task}:", "", *verdicts(doc, task), ""]
  m = doc.get("machine", {})
  wall = sum(run["wall_s"] for run in doc.get("runs", []))
  lines.append(f"Machine: {m.get('processor')} ({m.get('cpu_count')} cores, {m.get('backend')}); "
               f"{len(doc['records'])} cells; wall time of the runs that wrote them {wall / 60:.1f} min.")
  return "\n".join(lines) + "\n"


def plot(doc: dict[str, Any], path: pathlib.Path) -> pathlib.Path:
  """One row per task: accuracy against the noise level, robust accuracy against epsilon (FGSM dashed, PGD
  solid), and the Lipschitz estimates per metric (bars: the mean over points, with the seeds' standard deviation;
  marks: the largest point); means over seeds."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  s = summary(doc)
  e = doc["grid"]["eval"]
  noise, eps = _floats(e["noise"]), _floats(e["epsilons"])
  tasks = tasks_of(doc)
  fig, axes = plt.subplots(len(tasks), 3, figsize=(14, 3.6 * len(tasks)), squeeze=False)
  for row, task in zip(axes, tasks):
    metrics = metrics_of(doc, task)
    colors = {m: plt.cm.tab10(i % 10) for i, m in enumerate(metrics)}
    for metric in metrics:
      clean = s[(task, metric, "clean")]
      xs = [0.0] + [v for v in noise if v > 0]
      vals = [clean] + [s[(task, metric, f"noise {level_key(v)}")] for v in noise if v > 0]
      row[0].errorbar(xs, [100 * v[0] for v in vals], [100 * v[1] for v in vals], label=metric,
                      color=colors[metric], marker="o", capsize=2)
      for attack, style in (("FGSM", "--"), ("PGD", "-")):
        vals = [clean] + [s[(task, metric, f"{attack} {level_key(v)}")] for v in eps]
        row[1].errorbar([0.0] + eps, [100 * v[0] for v in vals], [100 * v[1] for v in vals], color=colors[metric],
                        linestyle=style, marker="o", capsize=2, label=f"{metric} {attack}")
    lip = [s[(task, m, "Lipschitz mean")] for m in metrics]
    row[2].bar(range(len(metrics)), [v[0] for v in lip], yerr=[v[1] for v in lip], capsize=2,
               color=[colors[m] for m in metrics], label="mean over points")
    row[2].plot(range(len(metrics)), [s[(task, m, "Lipschitz max")][0] for m in metrics], "k_", markersize=14,
                label="max over points")
    row[2].legend(fontsize=7)
    row[2].set_xticks(range(len(metrics)), metrics, rotation=45, fontsize=8)
    row[0].set(title=f"{task}: Gaussian input noise", xlabel="noise std", ylabel="accuracy (%)")
    row[1].set(title=f"{task}: L-inf attacks (FGSM dashed, PGD solid)", xlabel="epsilon", ylabel="robust accuracy (%)")
    row[1].set_xscale("symlog", linthresh=min(eps))
    row[2].set(title=f"{task}: Jacobian norm of the logits", ylabel="Lipschitz estimate (mean over seeds)")
    row[2].set_yscale("log")
    row[0].legend(fontsize=7)
  fig.suptitle(f"{doc['grid']['suite']}: mean +- std over seeds")
  fig.tight_layout()
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=80)
  plt.close(fig)
  return path
