"""Where an ablation grid's results live.

``<dir>/<suite>.json`` holds the grid's definition and one record per finished cell; ``<dir>/<suite>.cells/``
one file per cell, written by the process that trained it as soon as it finished (so a killed grid loses at
most the running cells). Every write goes through :func:`writers.write_text_atomically`. A results file of
another grid definition is refused (:class:`GridMismatchError`).
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

from distattn_jax.training import writers
from distattn_jax.training.ablation import grid


class GridMismatchError(ValueError):
  """A results file holds cells of a different grid definition."""


def results_path(results_dir: pathlib.Path, suite: str) -> pathlib.Path:
  return pathlib.Path(results_dir) / f"{suite}.json"


def cell_dir(results_dir: pathlib.Path, suite: str) -> pathlib.Path:
  return pathlib.Path(results_dir) / f"{suite}.cells"


def cell_path(cells: pathlib.Path, cell: grid.Cell) -> pathlib.Path:
  return pathlib.Path(cells) / (grid.cell_key(*cell).replace("/", "__") + ".json")


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
    raise GridMismatchError(f"{path} holds results of a different grid definition; refusing to mix them. "
                            f"Differing fields: {'; '.join(diffs)}. Use another suite name or results dir, "
                            "or delete the file to start over.")
  return doc


def save_cell(cells: pathlib.Path, cell: grid.Cell, record: dict[str, Any]) -> None:
  writers.write_text_atomically(cell_path(cells, cell), json.dumps(record))


def saved_cell(cells: pathlib.Path, cell: grid.Cell) -> dict[str, Any] | None:
  """The record a killed run saved for ``cell`` (None when there is none)."""
  path = cell_path(cells, cell)
  return json.loads(path.read_text()) if path.exists() else None
