"""Runs an ablation grid's missing cells, in this process or in worker processes, and writes its reports.

Workers never outlive the runner: each asks the kernel to kill it when its parent dies (Linux'
``PR_SET_PDEATHSIG``) and watches its parent's pid from a thread (any POSIX system), exiting as soon as it
changes.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import json
import multiprocessing
import os
import pathlib
import signal
import sys
import threading
import time
from typing import Any

import ml_collections

from distattn_jax.data import tasks as tasks_lib
from distattn_jax.training import cells, host, writers
from distattn_jax.training.ablation import grid, plots, report, store

PARENT_POLL_S = 0.5
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _now() -> str:
  return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _exit_when_parent_dies(parent_pid: int) -> None:
  """A worker's initializer: from here on the worker ends when the process that started it does."""
  if sys.platform.startswith("linux"):
    try:
      ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):
      pass  # the watcher below still ends the worker

  def watch():
    while os.getppid() == parent_pid:
      time.sleep(PARENT_POLL_S)
    os._exit(1)  # pylint: disable=protected-access

  if os.getppid() != parent_pid:  # the parent died before the watch began
    os._exit(1)  # pylint: disable=protected-access
  threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _run_group(group: list[grid.Cell], budget: dict[str, Any], cache_dir: str | None, cell_dir: str,
               fingerprints: dict[str, str], register: str = "") -> list[dict[str, Any]]:
  """Runs cells that share a compiled model one after another in this process; each record, with its cell's
  fingerprint, is saved to its own file as soon as it exists, so a killed grid loses at most the running cell."""
  grid.register_metrics(register)
  out = []
  for cell in group:
    record = cells.run_cell(*cell, budget, cache_dir=cache_dir)
    record["fingerprint"] = fingerprints[grid.cell_key(*cell)]
    store.save_cell(pathlib.Path(cell_dir), cell, record)
    out.append(record)
  return out


def run_grid(config: ml_collections.ConfigDict, results_dir: str | pathlib.Path, log=print) -> dict[str, Any]:
  """Runs the grid's missing cells and writes ``<suite>.json``, ``<suite>.md`` and ``<suite>_*.png``.

  Holds the suite's results for its whole run (:func:`store.results_lock`: a second runner is refused). Cells
  that share a model (task, metric, lambda mode) form a group run by one process, so its seeds reuse one
  compilation; ``config.workers`` processes run groups in parallel. Each finished cell is first saved under
  ``<suite>.cells/`` and then merged into ``<suite>.json``. A cell already in the results, or saved by a run
  that was killed, is reused only when its fingerprint (:func:`grid.cell_fingerprint`) is this grid's (records
  written before fingerprints existed are kept when the file's grid definition matches)."""
  results_dir = pathlib.Path(results_dir)
  with store.results_lock(results_dir, config.suite):
    return _run_locked(config, results_dir, log)


def _run_locked(config: ml_collections.ConfigDict, results_dir: pathlib.Path, log) -> dict[str, Any]:
  grid.register_metrics(config.register)
  d = grid.definition(config)
  path = store.results_path(results_dir, config.suite)
  cell_dir = store.cell_dir(results_dir, config.suite)
  doc = store.load_results(path, d)
  budget = grid.cell_budget(d)
  cache_dir = config.cache_dir or None
  # A task whose data is missing fails now, naming its package, not hours later.
  data = {t: tasks_lib.load(t, cache_dir=cache_dir) for t in d["tasks"]}
  doc["baselines"] = {t: grid.baseline(data[t], d["budget"]) for t in d["tasks"]}
  data_prints = {t: grid.data_fingerprint(data[t]) for t in d["tasks"]}
  del data
  register = grid.file_fingerprint(config.register)
  order = grid.grid_cells(d)
  fingerprints = {grid.cell_key(*c): grid.cell_fingerprint(c, budget, data_prints[c[0]], register) for c in order}

  kept = []
  for r in doc["records"]:
    if r.get("fingerprint", fingerprints[grid.record_key(r)]) == fingerprints[grid.record_key(r)]:
      kept.append(r)
    else:
      log(f"{grid.record_key(r)}: the record in {path} was made with other data or settings; training it again")
  doc["records"] = kept
  have = {grid.record_key(r) for r in doc["records"]}
  this_machine = host.machine()

  def merge(record):
    key = grid.record_key(record)
    if key in have:
      return
    have.add(key)
    record["machine"] = this_machine["processor"]
    doc["records"].append(record)
    doc["records"].sort(key=lambda r: order.index((r["task"], r["metric"], r["lambda_mode"], r["seed"])))
    doc["machine"] = this_machine
    writers.write_text_atomically(path, json.dumps(doc, indent=1))
    log(f"[{len(doc['records'])}/{len(order)}] {key}: {record['score_name']}={record['final']:.4f} "
        f"({record['wall_s']:.1f} s)")

  for cell in order:  # cells a killed run finished but did not merge
    if grid.cell_key(*cell) not in have:
      record, why = store.saved_cell(cell_dir, cell, fingerprints[grid.cell_key(*cell)])
      if record is not None:
        merge(record)
      elif why:
        log(f"{grid.cell_key(*cell)}: not reusing {why}; training it again")
  todo = [c for c in order if grid.cell_key(*c) not in have]
  groups: dict[tuple[str, str, str], list] = {}
  for cell in todo:
    groups.setdefault(cell[:3], []).append(cell)
  log(f"{config.suite}: {len(have)} cells done, {len(todo)} to run in {len(groups)} groups, "
      f"{config.workers} worker(s)")
  start, started = time.perf_counter(), _now()
  if config.workers <= 1:
    for group in groups.values():
      for cell in group:
        for record in _run_group([cell], budget, cache_dir, str(cell_dir), fingerprints):
          merge(record)
  elif groups:
    context = multiprocessing.get_context("spawn")  # JAX's threads do not survive fork
    with concurrent.futures.ProcessPoolExecutor(config.workers, mp_context=context,
                                                initializer=_exit_when_parent_dies,
                                                initargs=(os.getpid(),)) as pool:
      futures = [pool.submit(_run_group, group, budget, cache_dir, str(cell_dir), fingerprints, config.register)
                 for group in groups.values()]
      for future in concurrent.futures.as_completed(futures):
        for record in future.result():
          merge(record)
  if todo:  # a rerun that only rewrites the reports keeps the record of the runs that trained
    doc.setdefault("runs", []).append({"started": started, "finished": _now(), "cells": len(todo),
                                       "workers": config.workers, "wall_s": time.perf_counter() - start})
    doc["wall_s_last_run"] = doc["runs"][-1]["wall_s"]
  doc.setdefault("machine", this_machine)  # a rerun that trained nothing keeps the machine that did
  writers.write_text_atomically(path, json.dumps(doc, indent=1))
  writers.write_text_atomically(results_dir / f"{config.suite}.md", report.table(doc))
  plots.plot(doc, results_dir, config.suite)
  return doc
