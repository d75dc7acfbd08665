"""MNIST-1D (Greydanus 2020): the ten digits as 40-step 1-D signals, built by the ``mnist1d`` package's own
generator with its default parameters (5,000 examples, seed 42, 4,000 train / 1,000 test).

The package's ``get_dataset`` downloads a pickle by default; this module never does: it calls the generator
(``mnist1d.data.make_dataset``) and caches the arrays under the data cache. Each example is a sequence of 40
one-feature steps, embedded by the series encoder (a linear map of each step).
"""

from __future__ import annotations

import pathlib

import numpy as np

from distattn_jax.data import classification

PACKAGE = "mnist1d"
INSTALL = "pip install mnist1d (in requirements.lock; or pip install -e .[tasks])"


def _generate() -> dict[str, np.ndarray]:
  try:
    from mnist1d import data as mnist1d_data  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ValueError(f"task mnist1d needs the PyPI package {PACKAGE!r}, which is not installed: {INSTALL}") from e
  args = mnist1d_data.get_dataset_args()
  state = np.random.get_state()  # the generator seeds numpy's global RNG; leave the caller's as it was
  try:
    d = mnist1d_data.make_dataset(args)
  finally:
    np.random.set_state(state)
  return {"x": d["x"].astype(np.float32), "y": d["y"].astype(np.int32), "x_test": d["x_test"].astype(np.float32),
          "y_test": d["y_test"].astype(np.int32)}


def load(*, cache_dir: str | pathlib.Path | None = None) -> classification.ClassificationData:
  cache = pathlib.Path(cache_dir) if cache_dir else classification.default_cache_dir()
  path = cache / "mnist1d" / "default_args.npz"
  a = classification.cached_arrays(path, _generate)

  def split(x, y):
    return classification.Split(x[..., None], np.full(len(y), x.shape[1], np.int32), y)

  length = a["x"].shape[1]
  return classification.ClassificationData(
      name="mnist1d", train=split(a["x"], a["y"]), test=split(a["x_test"], a["y_test"]), num_classes=10,
      buckets=(length,), features=1,
      info={"source": "mnist1d.data.make_dataset(get_dataset_args())", "cache": str(path), "train": len(a["y"]),
            "test": len(a["y_test"])})
