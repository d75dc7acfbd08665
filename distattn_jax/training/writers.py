"""Metric writers: ``workdir/metrics.jsonl`` (one JSON object per record) and TensorBoard event files.

A resumed run restarts at its checkpoint's step and recomputes the steps after it, so the writer drops the
records a killed run wrote past that step (the JSONL file is rewritten atomically; TensorBoard gets a
``purge_step``), and the files read as if the run had never stopped.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import tempfile
from typing import Any

import numpy as np
from tensorboardX import SummaryWriter


def write_text_atomically(path: str | pathlib.Path, text: str, mode: int = 0o644) -> None:
  """Writes ``text`` (UTF-8) to ``path`` so that a reader sees the old file or the new one, never half of one.

  The text goes to a temporary file of a name of its own in the same folder (two writers never share one),
  reaches the disk (fsync) and is renamed over ``path``; the file gets permissions ``mode`` explicitly (the
  process umask is neither read nor changed). The folder is created if missing. On an error the temporary file
  is removed and ``path`` is untouched."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      os.fchmod(f.fileno(), mode)  # mkstemp makes the file private (0600)
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    pathlib.Path(tmp).unlink(missing_ok=True)
    raise
  folder = os.open(path.parent, os.O_RDONLY)  # the rename itself reaches the disk with the folder's entry
  try:
    os.fsync(folder)
  finally:
    os.close(folder)


def read_jsonl(path: str | pathlib.Path) -> list[dict[str, Any]]:
  path = pathlib.Path(path)
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _jsonable(value: Any) -> Any:
  value = np.asarray(value)
  if value.ndim:
    return value.tolist()
  value = value.item()
  return value if not isinstance(value, float) or math.isfinite(value) else str(value)


class MetricWriter:
  """Appends ``{"step", "split", **values}`` records to ``metrics.jsonl`` and scalars to TensorBoard."""

  def __init__(self, workdir: str | pathlib.Path, start_step: int = 0):
    workdir = pathlib.Path(workdir)
    self.path = workdir / "metrics.jsonl"
    kept = [r for r in read_jsonl(self.path) if r["step"] <= start_step]
    write_text_atomically(self.path, "".join(json.dumps(r) + "\n" for r in kept))
    self._file = open(self.path, "a")
    # A file of its own per start (event file names otherwise differ only by the second they were opened in).
    self._tb = SummaryWriter(str(workdir / "tensorboard"), purge_step=start_step + 1 if start_step else None,
                             filename_suffix=f".from_step_{start_step}")

  def write(self, step: int, split: str, values: dict[str, Any]) -> None:
    record = {"step": int(step), "split": split, **{k: _jsonable(v) for k, v in values.items()}}
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()
    for name, value in values.items():
      value = np.asarray(value)
      if value.ndim == 0 and np.issubdtype(value.dtype, np.number):
        self._tb.add_scalar(f"{split}/{name}", float(value), int(step))
      elif value.ndim == 1 and np.issubdtype(value.dtype, np.floating):  # per-head values, e.g. lam
        for i, v in enumerate(value):
          self._tb.add_scalar(f"{split}/{name}/{i}", float(v), int(step))
    self._tb.flush()

  def close(self) -> None:
    self._file.close()
    self._tb.close()
