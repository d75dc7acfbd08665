"""UCR time-series classification sets read from the data folder of an installed ``aeon`` (or ``sktime``)
package: the archive's ``<Name>/<Name>_TRAIN.ts`` and ``_TEST.ts`` files, parsed here without importing the
library (``pip install -e .[tasks]`` installs aeon; its dependencies are not needed for reading).

A ``.ts`` file is ``@key value`` header lines, then ``@data``, then one case per line: each dimension's values
comma-separated, dimensions separated by ``:``, the class label last. Cases become ``[length, dims]`` float32
sequences (variable lengths are right-padded and carried as lengths); labels are indexed in the order of the
header's ``@classLabel`` list. Each series is z-normalised per dimension over its own steps (the archive's
univariate sets mostly are already).
"""

from __future__ import annotations

import importlib.metadata
import pathlib

import numpy as np

from distattn_jax.data import classification

PACKAGES = ("aeon", "sktime")
DATA_FOLDERS = {"aeon": "aeon/datasets/data", "sktime": "sktime/datasets/data"}
INSTALL = "pip install -e .[tasks] (installs aeon, whose installed data folder ships them)"
DATASETS = ("GunPoint", "ItalyPowerDemand", "ArrowHead", "BasicMotions")


CASE_FORMAT = ("a case is one line: each dimension's values comma-separated, dimensions separated by ':', the "
               "class label last")


def parse_ts(text: str, source: str = "<text>", class_names: list[str] | None = None
             ) -> tuple[list[np.ndarray], list[str], list[str]]:
  """``(series, labels, class_names)``: each series ``[length, dims]`` float64, labels as written, and the
  header's class labels (in order; the labels seen, sorted, if the header lists none).

  A label must be one of the header's, if it lists any, and of ``class_names`` if given (a test file's labels are
  the training file's classes). Every value must be a finite number, every case must have the first case's
  number of dimensions, each of one length, and there must be at least one case; a ValueError names ``source``,
  the line, the value and what is allowed.
  """
  header, series, labels = {}, [], []
  in_data = False
  declared: list[str] | None = None
  dims_first = None
  for number, line in enumerate(text.splitlines(), 1):
    line = line.strip()
    if not line or line.startswith("#"):
      continue
    where = f"{source}, line {number}"
    if not in_data:
      if line.lower() == "@data":
        in_data = True
        words = header.get("classlabel", "").split()
        declared = words[1:] if words[:1] == ["true"] else None
      elif line.startswith("@"):
        key, _, value = line[1:].partition(" ")
        header[key.lower()] = value.strip()
      continue
    *dims, label = line.split(":")
    label = label.strip()
    if not dims:
      raise ValueError(f"{where}: case {line!r} has no values before its class label; {CASE_FORMAT}")
    for allowed, said in ((declared, "the header's @classLabel list"),
                          (class_names, "the training file's classes")):
      if allowed is not None and label not in allowed:
        raise ValueError(f"{where}: class label {label!r} is not one of {said}; allowed: {', '.join(allowed)}")
    values = []
    for d, text_values in enumerate(dims):
      row = []
      for i, v in enumerate(text_values.split(",")):
        try:
          x = float(v)
        except ValueError:
          raise ValueError(f"{where}: value {v.strip()!r} (dimension {d}, position {i}) is not a number; "
                           f"{CASE_FORMAT}") from None
        if not np.isfinite(x):
          raise ValueError(f"{where}: value {v.strip()!r} (dimension {d}, position {i}) is not finite; values "
                           "must be finite numbers (missing values are not supported)")
        row.append(x)
      values.append(np.asarray(row, np.float64))
    if dims_first is None:
      dims_first = len(values)
    elif len(values) != dims_first:
      raise ValueError(f"{where}: case has {len(values)} dimensions, but the first case has {dims_first}; every "
                       "case must have the same number")
    if len({len(v) for v in values}) != 1:
      raise ValueError(f"{where}: dimensions of unequal length {[len(v) for v in values]}; every dimension of a "
                       "case must have the same number of values")
    series.append(np.stack(values, axis=-1))
    labels.append(label)
  if not in_data:
    raise ValueError(f"{source}: has no @data line; a .ts file is @key value header lines, then @data, then one "
                     "case per line")
  if not series:
    raise ValueError(f"{source}: the @data section holds no cases; {CASE_FORMAT}")
  names = declared if declared is not None else sorted(set(labels))
  return series, labels, names


def data_folder() -> pathlib.Path:
  """The installed package data folder holding the UCR sets; ValueError naming the package when none is."""
  for package in PACKAGES:
    try:
      dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
      continue
    folder = pathlib.Path(dist.locate_file(DATA_FOLDERS[package]))
    if folder.is_dir():
      return folder
  raise ValueError(f"task timeseries needs the UCR files of the PyPI package 'aeon' (or 'sktime'), which is not "
                   f"installed: {INSTALL}")


def _znorm(x: np.ndarray) -> np.ndarray:
  std = x.std(axis=0, keepdims=True)
  return (x - x.mean(axis=0, keepdims=True)) / np.where(std > 0, std, 1.0)


def load(name: str, *, folder: str | pathlib.Path | None = None) -> classification.ClassificationData:
  if name not in DATASETS:
    raise ValueError(f"UCR dataset {name!r} is not one this module reads; valid: {', '.join(DATASETS)}")
  folder = pathlib.Path(folder) if folder else data_folder()
  parsed, names = {}, None
  for split in ("TRAIN", "TEST"):
    path = folder / name / f"{name}_{split}.ts"
    if not path.exists():
      raise ValueError(f"UCR file {str(path)!r} is missing: {INSTALL}")
    # The test file's labels must be the training file's classes (a label seen only in testing has no output).
    parsed[split] = parse_ts(path.read_text(), str(path), class_names=names)
    names = parsed[split][2] if names is None else names
  dims = {split: p[0][0].shape[1] for split, p in parsed.items()}
  if dims["TRAIN"] != dims["TEST"]:
    raise ValueError(f"{folder / name / f'{name}_TEST.ts'}: cases have {dims['TEST']} dimensions, but the training "
                     f"file's have {dims['TRAIN']}; both files must have the same number")
  index = {c: i for i, c in enumerate(names)}
  max_len = max(len(s) for series, _, _ in parsed.values() for s in series)

  def split(series, labels):
    x, lengths = classification.pad_sequences([_znorm(s).astype(np.float32) for s in series], max_len, np.float32)
    return classification.Split(x, lengths, np.asarray([index[l] for l in labels], np.int32))

  train, test = split(*parsed["TRAIN"][:2]), split(*parsed["TEST"][:2])
  return classification.ClassificationData(
      name=f"ucr_{name}", train=train, test=test, num_classes=len(names), buckets=(max_len,),
      features=train.inputs.shape[-1],
      info={"source": str(folder / name), "classes": names, "train": len(train), "test": len(test)})


def dtw_distances(x: np.ndarray, y: np.ndarray) -> np.ndarray:
  """Dynamic time warping distance, unconstrained window, between every series of ``x`` [N, T, C] and of ``y``
  [M, U, C]: the smallest sum of squared pointwise differences (summed over channels) along a warping path, as
  in the UCR archive's 1-NN DTW baseline. Returns [N, M] float64.

  The recurrence runs over the steps of ``x`` and ``y`` with every pair at once, keeping one row of the cost
  table: O(N M T U) arithmetic in O(N M U) memory.
  """
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  if x.ndim != 3 or y.ndim != 3 or x.shape[2] != y.shape[2]:
    raise ValueError(f"dtw_distances: x {x.shape} and y {y.shape} must be [N, T, C] and [M, U, C] with equal C")
  n, t, _ = x.shape
  m, u, _ = y.shape
  previous = np.full((n, m, u + 1), np.inf)
  previous[:, :, 0] = 0.0  # the corner (0, 0) of the table; the rest of row 0 is unreachable
  for i in range(t):
    cost = ((x[:, None, i, None, :] - y[None, :, :, :]) ** 2).sum(-1)  # [N, M, U]
    current = np.full((n, m, u + 1), np.inf)
    # Diagonal and vertical moves come from the previous row; the horizontal one from this row, in order.
    from_previous = np.minimum(previous[:, :, :-1], previous[:, :, 1:])
    for j in range(u):
      current[:, :, j + 1] = cost[:, :, j] + np.minimum(from_previous[:, :, j], current[:, :, j])
    previous = current
  return previous[:, :, u]


def nearest_neighbour_accuracy(data: classification.ClassificationData, distance: str = "dtw") -> float:
  """Test accuracy of the 1-nearest-neighbour classifier under ``distance`` ("dtw", unconstrained window, or
  "euclidean"): the UCR archive's standard baselines, computed on the data this module loads."""
  if distance not in ("dtw", "euclidean"):
    raise ValueError(f"nearest_neighbour_accuracy: distance={distance!r}; valid: dtw, euclidean")
  train, test = data.train, data.test
  if len(set(train.lengths.tolist()) | set(test.lengths.tolist())) != 1:
    raise ValueError(f"nearest_neighbour_accuracy: {data.name} has series of unequal length")
  if distance == "dtw":
    d = dtw_distances(test.inputs, train.inputs)
  else:
    d = ((test.inputs[:, None] - train.inputs[None]) ** 2).sum((-1, -2))
  return float(np.mean(train.labels[np.argmin(d, axis=1)] == test.labels))
