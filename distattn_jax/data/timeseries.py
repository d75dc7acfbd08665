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


def parse_ts(text: str) -> tuple[list[np.ndarray], list[str], list[str]]:
  """``(series, labels, class_names)``: each series ``[length, dims]`` float64, labels as written, and the
  header's class labels (in order; the labels seen, sorted, if the header lists none)."""
  header, series, labels = {}, [], []
  in_data = False
  for line in text.splitlines():
    line = line.strip()
    if not line or line.startswith("#"):
      continue
    if not in_data:
      if line.lower() == "@data":
        in_data = True
      elif line.startswith("@"):
        key, _, value = line[1:].partition(" ")
        header[key.lower()] = value.strip()
      continue
    *dims, label = line.split(":")
    values = [np.asarray([float(v) for v in d.split(",")], np.float64) for d in dims]
    if len({len(v) for v in values}) != 1:
      raise ValueError(f".ts case {len(series)}: dimensions of unequal length {[len(v) for v in values]}")
    series.append(np.stack(values, axis=-1))
    labels.append(label.strip())
  if not in_data:
    raise ValueError(".ts text has no @data line")
  declared = header.get("classlabel", "").split()
  names = declared[1:] if declared[:1] == ["true"] else sorted(set(labels))
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
  parsed = {}
  for split in ("TRAIN", "TEST"):
    path = folder / name / f"{name}_{split}.ts"
    if not path.exists():
      raise ValueError(f"UCR file {str(path)!r} is missing: {INSTALL}")
    parsed[split] = parse_ts(path.read_text())
  names = parsed["TRAIN"][2]
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
