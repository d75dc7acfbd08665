"""Byte-level language-model data (vocabulary 256) from local text, with no network.

The default corpus is the source of the Python standard library of the running interpreter (``sysconfig``):
``*.py`` files, sorted by relative path, without test folders. Any text file or folder works through
``data.path``. A folder's files are split into train and validation by a stable hash of their relative path, so
adding a file never moves another one between splits; a single file (or a folder too small for a hash split)
gives its last ``val_fraction`` of bytes to validation.

Batches are numpy ``int32`` windows ``[batch, seq_len + 1]``. The training batch of step ``s`` is drawn from
``np.random.default_rng([seed, s])``, a function of the step alone, so a resumed run sees exactly the batches
an uninterrupted run sees. Validation uses fixed, evenly spaced windows.
"""

from __future__ import annotations

import dataclasses
import hashlib
import pathlib
import sysconfig
from typing import Any

import numpy as np

# Folders of the standard library that hold tests or fixtures rather than library source.
EXCLUDED_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"})
SEPARATOR = b"\n"


@dataclasses.dataclass(frozen=True)
class Corpus:
  train: np.ndarray  # uint8 bytes
  validation: np.ndarray
  info: dict[str, Any]  # source, path, file counts and byte counts: saved with the run


def stdlib_root() -> pathlib.Path:
  return pathlib.Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: pathlib.Path | None = None) -> list[pathlib.Path]:
  """The standard library's ``*.py`` files under ``root``, sorted, outside test and site-packages folders."""
  root = root or stdlib_root()
  return sorted(f for f in root.rglob("*.py")
                if f.is_file() and not EXCLUDED_DIRS.intersection(f.relative_to(root).parts[:-1]))


def _text_files(folder: pathlib.Path) -> list[pathlib.Path]:
  return sorted(f for f in folder.rglob("*")
                if f.is_file() and not any(part.startswith(".") for part in f.relative_to(folder).parts))


def is_validation(relative_path: str, val_fraction: float) -> bool:
  """True for the files of the validation split: the first 8 bytes of SHA-256 of the path, read as a number in
  [0, 1), fall below ``val_fraction``. Stable across runs, machines and Python versions."""
  digest = hashlib.sha256(relative_path.encode()).digest()
  return int.from_bytes(digest[:8], "big") / 2.0**64 < val_fraction


def _tail_split(data: np.ndarray, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
  cut = len(data) - max(1, int(round(len(data) * val_fraction)))
  return data[:cut], data[cut:]


def _as_array(chunks: list[bytes]) -> np.ndarray:
  return np.frombuffer(SEPARATOR.join(chunks), np.uint8)


def load_corpus(path: str = "", val_fraction: float = 0.05, min_split_bytes: int = 2) -> Corpus:
  """Reads the corpus at ``path`` (``""``: the standard library) and splits it.

  Raises FileNotFoundError for a missing path and ValueError for a corpus with no bytes or whose splits would
  be shorter than ``min_split_bytes`` (one window, ``seq_len + 1``); both name the path.
  """
  if path:
    root = pathlib.Path(path).expanduser()
    if not root.exists():
      raise FileNotFoundError(f"data.path={path!r}: no such file or folder")
    files = [root] if root.is_file() else _text_files(root)
    source = "path"
  else:
    root = stdlib_root()
    files = stdlib_files(root)
    source = "python-stdlib"
  contents = {(f.name if f == root else f.relative_to(root).as_posix()): f.read_bytes() for f in files}
  contents = {name: data for name, data in contents.items() if data}
  total = sum(len(d) for d in contents.values())
  if not total:
    raise ValueError(f"corpus at {str(root)!r} is empty: {len(files)} file(s), none with any bytes")

  split = {name: is_validation(name, val_fraction) for name in contents}
  train = _as_array([d for name, d in contents.items() if not split[name]])
  validation = _as_array([d for name, d in contents.items() if split[name]])
  if root.is_file() or min(len(train), len(validation)) < min_split_bytes:
    split = None
    train, validation = _tail_split(_as_array(list(contents.values())), val_fraction)
  if min(len(train), len(validation)) < min_split_bytes:
    raise ValueError(f"corpus at {str(root)!r} has {total} bytes: too small for train and validation windows of "
                     f"{min_split_bytes} bytes with data.val_fraction={val_fraction}")
  info = {
      "source": source, "path": str(root), "files": len(contents), "bytes": total,
      "split": "hash of relative path" if split else "last bytes", "train_bytes": len(train),
      "validation_bytes": len(validation),
      "train_files": sum(not v for v in split.values()) if split else None,
      "validation_files": sum(split.values()) if split else None,
  }
  return Corpus(train, validation, info)


class TextData:
  """Windows of ``seq_len + 1`` bytes from a :class:`Corpus` (inputs and shifted targets in one array)."""

  def __init__(self, corpus: Corpus, seq_len: int, batch_size: int, seed: int):
    self.corpus, self.seq_len, self.batch_size, self.seed = corpus, seq_len, batch_size, seed

  def _windows(self, data: np.ndarray, starts: np.ndarray) -> np.ndarray:
    return data[starts[:, None] + np.arange(self.seq_len + 1)].astype(np.int32)

  def train_batch(self, step: int, rows: slice = slice(None)) -> np.ndarray:
    """``[batch_size, seq_len + 1]`` windows at offsets drawn from ``default_rng([seed, step])``; ``rows`` builds
    only those rows of it (one process's share of the global batch: the offsets of every row are drawn, so the
    share is exactly those rows of the whole batch)."""
    rng = np.random.default_rng([self.seed, step])
    high = len(self.corpus.train) - self.seq_len  # exclusive bound on a start that leaves seq_len + 1 bytes
    return self._windows(self.corpus.train, rng.integers(0, high, size=self.batch_size)[rows])

  def eval_batches(self, num_batches: int, rows: slice = slice(None)) -> list[np.ndarray]:
    """``num_batches`` validation batches of evenly spaced windows (they overlap only if the split is short);
    ``rows`` of each, as in :meth:`train_batch`."""
    count = num_batches * self.batch_size
    starts = np.linspace(0, len(self.corpus.validation) - self.seq_len - 1, count).astype(np.int64)
    return [self._windows(self.corpus.validation, s[rows]) for s in starts.reshape(num_batches, self.batch_size)]
