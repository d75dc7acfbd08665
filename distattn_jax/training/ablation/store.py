"""Where an ablation grid's results live, and who may write them.

``<dir>/<suite>.json`` holds the grid's definition and one record per finished cell; ``<dir>/<suite>.cells/``
one file per cell, written by the process that trained it as soon as it finished (so a killed grid loses at
most the running cells). Every write goes through :func:`writers.write_text_atomically`. A results file of
another grid definition is refused (:class:`GridMismatchError`, whose message holds the one command that starts
over); a saved cell is reused only when its fingerprint matches. One runner at a time writes a suite's results:
it holds an exclusive ``flock`` on ``<dir>/<suite>.cells/.lock``, which the kernel releases when the process
ends, however it ends, so a crash never leaves them locked.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pathlib
import shlex
from typing import Any, Iterator

from distattn_jax.training import writers
from distattn_jax.training.ablation import grid

LOCK_NAME = ".lock"


class GridMismatchError(ValueError):
  """A results file holds cells of a different grid definition."""


class RunnerBusyError(RuntimeError):
  """Another live runner holds the results folder."""


def results_path(results_dir: pathlib.Path, suite: str) -> pathlib.Path:
  return pathlib.Path(results_dir) / f"{suite}.json"


def cell_dir(results_dir: pathlib.Path, suite: str) -> pathlib.Path:
  return pathlib.Path(results_dir) / f"{suite}.cells"


def cell_path(cells: pathlib.Path, cell: grid.Cell) -> pathlib.Path:
  return pathlib.Path(cells) / (grid.cell_key(*cell).replace("/", "__") + ".json")


def start_over_command(results_dir: pathlib.Path, suite: str) -> str:
  """The shell command that deletes a suite's results and saved cells (its reports are rewritten by the next
  run)."""
  return "rm -rf " + " ".join(shlex.quote(str(p)) for p in (results_path(results_dir, suite),
                                                           cell_dir(results_dir, suite)))


@contextlib.contextmanager
def results_lock(results_dir: str | pathlib.Path, suite: str) -> Iterator[pathlib.Path]:
  """Holds a suite's results for one runner: :class:`RunnerBusyError` (naming the holder's pid) while another
  live process holds them. The lock is released on exit, and by the kernel when the process dies."""
  cells = cell_dir(results_dir, suite)
  cells.mkdir(parents=True, exist_ok=True)
  path = cells / LOCK_NAME
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by child processes (PEP 446)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
      raise RunnerBusyError(f"another ablation runner (pid {holder}) is writing suite {suite!r} in {results_dir}; "
                            "wait for it to end or stop it, or give this run another --results_dir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    yield path
  finally:
    os.close(fd)  # closing the only descriptor releases the lock


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
  path = pathlib.Path(path)
  if not path.exists():
    return {"grid": d, "records": []}
  doc = json.loads(path.read_text())
  diffs = _differences(doc.get("grid", {}), d)
  if diffs:
    suite = path.name[:-len(".json")]
    raise GridMismatchError(
        f"{path} holds results of a different grid definition; refusing to mix them. Differing fields: "
        f"{'; '.join(diffs)}. Use another suite name (--config.suite) or --results_dir, or start over, deleting "
        f"this suite's results and saved cells: {start_over_command(path.parent, suite)}")
  return doc


def save_cell(cells: pathlib.Path, cell: grid.Cell, record: dict[str, Any]) -> None:
  writers.write_text_atomically(cell_path(cells, cell), json.dumps(record))


def saved_cell(cells: pathlib.Path, cell: grid.Cell, fingerprint: str) -> tuple[dict[str, Any] | None, str]:
  """``(record, "")`` for a saved cell of this fingerprint; ``(None, why)`` when there is none to reuse: no
  file (``why`` empty), or one that is unreadable or made by another grid (data, budget, code-relevant
  settings)."""
  path = cell_path(cells, cell)
  if not path.exists():
    return None, ""
  try:
    record = json.loads(path.read_text())
  except (OSError, ValueError) as e:
    return None, f"{path} is unreadable ({e})"
  if record.get("fingerprint") != fingerprint:
    return None, (f"{path} was made by another grid (its fingerprint {record.get('fingerprint')!r} is not this "
                  "grid's: budget, data or registered metrics differ)")
  return record, ""
