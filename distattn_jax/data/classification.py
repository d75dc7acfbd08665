"""Labelled examples in memory and their batches: the shared shape of every classification task.

An example is a sequence of tokens (int) or of feature vectors (float) of some length, and an integer label.
Batches are numpy dicts:

* ``inputs``: ``[batch, bucket]`` int32 tokens or ``[batch, bucket, features]`` float32, right-padded with 0;
* ``lengths``: ``[batch]`` int32, each example's real length (the model's ``key_value_seq_lengths``: padding is
  described by lengths, never by a dense ``[T, T]`` mask);
* ``labels``: ``[batch]`` int32; ``weights``: ``[batch]`` float32, 1 for a real example and 0 for the fillers
  that complete the last evaluation batch.

``bucket`` is the smallest of the task's bucket lengths that holds the batch's longest example, so a task with
variable lengths compiles one step per bucket rather than one per batch. The training batch of step ``s`` is
drawn from ``np.random.default_rng([seed, s])``: a function of the seed and the step alone.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import tempfile
from typing import Any, Callable

import numpy as np


@dataclasses.dataclass(frozen=True)
class Split:
  inputs: np.ndarray  # [n, max_len] int32 or [n, max_len, features] float32, zero-padded
  lengths: np.ndarray  # [n] int32
  labels: np.ndarray  # [n] int32

  def __post_init__(self):
    n = len(self.labels)
    if len(self.inputs) != n or len(self.lengths) != n:
      raise ValueError(f"split has {len(self.inputs)} inputs, {len(self.lengths)} lengths, {n} labels")

  def __len__(self) -> int:
    return len(self.labels)


@dataclasses.dataclass(frozen=True)
class ClassificationData:
  """A task's splits plus what a model needs to know of them (``vocab_size`` for tokens, ``features`` for
  vectors), and ``info`` (source, sizes) saved with results."""

  name: str
  train: Split
  test: Split
  num_classes: int
  buckets: tuple[int, ...]
  vocab_size: int | None = None
  features: int | None = None
  info: dict[str, Any] = dataclasses.field(default_factory=dict)

  @property
  def max_len(self) -> int:
    return self.buckets[-1]

  def _batch(self, split: Split, index: np.ndarray, weights: np.ndarray) -> dict[str, np.ndarray]:
    lengths = split.lengths[index]
    longest = int(lengths.max())
    bucket = next(b for b in self.buckets if b >= longest)
    inputs = split.inputs[index, :bucket]
    if inputs.shape[1] < bucket:
      pad = [(0, 0), (0, bucket - inputs.shape[1])] + [(0, 0)] * (inputs.ndim - 2)
      inputs = np.pad(inputs, pad)
    return {"inputs": inputs, "lengths": lengths.astype(np.int32), "labels": split.labels[index].astype(np.int32),
            "weights": weights.astype(np.float32)}

  def train_batch(self, step: int, batch_size: int, seed: int) -> dict[str, np.ndarray]:
    index = np.random.default_rng([seed, step]).integers(0, len(self.train), size=batch_size)
    return self._batch(self.train, index, np.ones(batch_size))

  def eval_batches(self, batch_size: int, limit: int | None = None) -> list[dict[str, np.ndarray]]:
    """The first ``limit`` (default all) test examples in order; the last batch is completed with weight-0
    copies of the first example so every batch has ``batch_size`` rows."""
    n = len(self.test) if limit is None else min(limit, len(self.test))
    batches = []
    for start in range(0, n, batch_size):
      index = np.arange(start, min(start + batch_size, n))
      weights = np.ones(batch_size)
      weights[len(index):] = 0
      index = np.concatenate([index, np.zeros(batch_size - len(index), np.int64)])
      batches.append(self._batch(self.test, index, weights))
    return batches


def pad_sequences(sequences: list[np.ndarray], max_len: int, dtype: Any) -> tuple[np.ndarray, np.ndarray]:
  """Right-pads ``sequences`` (each ``[length, ...]``) with 0 to ``[n, max_len, ...]``; returns it and the
  lengths."""
  tail = sequences[0].shape[1:] if sequences else ()
  out = np.zeros((len(sequences), max_len) + tail, dtype)
  lengths = np.zeros(len(sequences), np.int32)
  for i, s in enumerate(sequences):
    out[i, :len(s)] = s
    lengths[i] = len(s)
  return out, lengths


def cached_arrays(path: pathlib.Path, build: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  """The arrays saved at ``path`` (an ``.npz``), building and saving them first if absent. The file is written
  to a temporary name in the same folder and renamed, so a killed writer never leaves a truncated cache."""
  path = pathlib.Path(path)
  if path.exists():
    with np.load(path, allow_pickle=False) as f:
      return {k: f[k] for k in f.files}
  arrays = build()
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp.npz")
  try:
    with os.fdopen(fd, "wb") as f:
      np.savez(f, **arrays)
    os.replace(tmp, path)
  except BaseException:
    pathlib.Path(tmp).unlink(missing_ok=True)
    raise
  return arrays


def default_cache_dir() -> pathlib.Path:
  """``$DISTATTN_DATA_DIR`` if set, else ``~/.cache/distattn_jax``."""
  return pathlib.Path(os.environ.get("DISTATTN_DATA_DIR") or pathlib.Path.home() / ".cache" / "distattn_jax")
