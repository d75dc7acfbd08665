"""The research tasks by name: what each one loads, how a model embeds it and which package provides it.

``load(name, cache_dir=...)`` returns a :class:`~distattn_jax.data.classification.ClassificationData` for the
classification tasks and a :class:`TextTask` for ``text`` (byte-level language modelling, scored in bits per
byte). Every loader reads local files or generates its data; nothing touches the network. An unknown name is a
ValueError listing the valid ones; a task whose data is not installed is a ValueError naming the package.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any, Callable

import numpy as np

from distattn_jax.data import classification, fashion_mnist, listops, mnist1d, text, timeseries


@dataclasses.dataclass(frozen=True)
class TaskSpec:
  kind: str  # "classify" or "lm"
  embedding: str  # models.Encoder's embedding: tokens, patches or steps
  load: Callable[[pathlib.Path], Any]
  provider: str  # where the data comes from, for messages and the docs


class TextTask:
  """The byte-level corpus as a task: windows of ``seq_len + 1`` bytes (:class:`text.TextData`)."""

  name = "text"
  kind = "lm"

  def __init__(self, corpus: text.Corpus, seq_len: int):
    self.corpus, self.seq_len = corpus, seq_len
    self.vocab_size, self.max_len, self.info = 256, seq_len, dict(corpus.info, seq_len=seq_len)

  def train_batch(self, step: int, batch_size: int, seed: int) -> dict[str, np.ndarray]:
    return {"windows": text.TextData(self.corpus, self.seq_len, batch_size, seed).train_batch(step)}

  def eval_batches(self, batch_size: int, limit: int | None = None) -> list[dict[str, np.ndarray]]:
    num = max(1, (limit or 16 * batch_size) // batch_size)
    return [{"windows": w} for w in text.TextData(self.corpus, self.seq_len, batch_size, 0).eval_batches(num)]


TEXT_SEQ_LEN = 64

TASKS: dict[str, TaskSpec] = {
    "text": TaskSpec("lm", "tokens", lambda cache: TextTask(text.load_corpus(""), TEXT_SEQ_LEN),
                     "the Python standard library's source (bundled with the interpreter)"),
    **{f"listops_{v}": TaskSpec("classify", "tokens", (lambda v: lambda cache: listops.load(v, cache_dir=cache))(v),
                                f"generated (ListOps, variant {v!r})") for v in listops.VARIANTS},
    "mnist1d": TaskSpec("classify", "steps", lambda cache: mnist1d.load(cache_dir=cache),
                        f"the PyPI package 'mnist1d' ({mnist1d.INSTALL})"),
    "fashion_mnist": TaskSpec("classify", "patches", lambda cache: fashion_mnist.load(),
                              f"Debian's dataset-fashion-mnist ({fashion_mnist.INSTALL})"),
    **{name.lower(): TaskSpec("classify", "steps", (lambda n: lambda cache: timeseries.load(n))(name),
                              f"UCR {name} from the PyPI package 'aeon' ({timeseries.INSTALL})")
       for name in timeseries.DATASETS},
}


def available() -> tuple[str, ...]:
  return tuple(TASKS)


def spec(name: str) -> TaskSpec:
  if name not in TASKS:
    raise ValueError(f"unknown task {name!r}; valid tasks: {', '.join(TASKS)}")
  return TASKS[name]


def load(name: str, *, cache_dir: str | pathlib.Path | None = None) -> Any:
  cache = pathlib.Path(cache_dir) if cache_dir else classification.default_cache_dir()
  return spec(name).load(cache)
