"""Tabular inputs for the marketing and business engines: CSV files (``#`` lines are notes carried into every
report, e.g. that the numbers are made-up examples) or the same rows given inline in a config."""

from __future__ import annotations

import csv
import io
import pathlib
from typing import Any, Sequence


def read_table(source: str, *, columns: dict[str, type], name: str) -> tuple[list[dict[str, Any]], list[str]]:
  """Rows of a CSV file (path) or CSV text (contains a newline) with typed ``columns``; returns (rows, notes).

  A missing column, an unparsable value or an empty table is a ValueError naming the file, row and column.
  """
  if "\n" in source:
    text, where = source, f"{name} (inline)"
  else:
    path = pathlib.Path(source)
    if not path.is_file():
      raise ValueError(f"{name}={source!r} is not a file")
    text, where = path.read_text(), str(path)
  notes = [line.lstrip("#").strip() for line in text.splitlines() if line.startswith("#")]
  body = io.StringIO("\n".join(line for line in text.splitlines() if line.strip() and not line.startswith("#")))
  reader = csv.DictReader(body)
  missing = sorted(set(columns) - set(reader.fieldnames or ()))
  if missing:
    raise ValueError(f"{where}: missing columns {missing}; expected {list(columns)}")
  rows = []
  for i, raw in enumerate(reader, start=1):
    row = {}
    for column, kind in columns.items():
      value = (raw[column] or "").strip()
      try:
        row[column] = kind(value)
      except ValueError:
        raise ValueError(f"{where}: row {i}, column {column}={value!r} is not a {kind.__name__}") from None
    rows.append(row)
  if not rows:
    raise ValueError(f"{where}: no rows")
  return rows, notes


def column(rows: Sequence[dict[str, Any]], key: str) -> list[Any]:
  return [row[key] for row in rows]
