"""Fashion-MNIST from the files of Debian's ``dataset-fashion-mnist`` package (no download), as patches for a
small ViT.

``sudo apt-get install dataset-fashion-mnist`` puts the four IDX files in ``/usr/share/datasets/fashion-mnist``;
``root`` points elsewhere. A 28x28 image becomes ``(28 / patch)^2`` patches of ``patch^2`` pixels in row-major
order, scaled to [0, 1] and centred by the training set's mean and standard deviation; the model embeds each
patch linearly (a ViT's patch embedding).
"""

from __future__ import annotations

import gzip
import pathlib

import numpy as np

from distattn_jax.data import classification

DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
INSTALL = "sudo apt-get install dataset-fashion-mnist (Debian/Ubuntu package; files in " + DEFAULT_ROOT + ")"
NUM_CLASSES = 10
FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
         "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


def read_idx(path: pathlib.Path) -> np.ndarray:
  """An IDX file (gzipped): magic ``0 0 dtype ndim``, ``ndim`` big-endian int32 sizes, then uint8 data."""
  with gzip.open(path, "rb") as f:
    raw = f.read()
  if len(raw) < 4 or raw[:2] != b"\x00\x00" or raw[2] != 0x08:
    raise ValueError(f"{path}: not an unsigned-byte IDX file (header {raw[:4].hex()}; allowed: 0000 08 then the "
                     "number of dimensions)")
  ndim = raw[3]
  if len(raw) < 4 + 4 * ndim:
    raise ValueError(f"{path}: the header declares {ndim} dimensions but the file ends within their sizes")
  shape = tuple(int(s) for s in np.frombuffer(raw, ">i4", count=ndim, offset=4))
  data = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
  if data.size != int(np.prod(shape)):
    raise ValueError(f"{path}: header says shape {shape} but holds {data.size} values")
  return data.reshape(shape)


def check_split(images_path: pathlib.Path, images: np.ndarray, labels_path: pathlib.Path, labels: np.ndarray,
                image_shape: tuple[int, ...] | None = None) -> None:
  """One split's arrays as read: images ``[n, H, W]`` (of ``image_shape`` when given: the training images'),
  labels ``[n]`` in ``[0, NUM_CLASSES)``; a ValueError names the file, the field, the value and what is
  allowed."""
  if images.ndim != 3:
    raise ValueError(f"{images_path}: images have shape {images.shape}; allowed: [n, height, width] (3 dimensions)")
  if image_shape is not None and images.shape[1:] != tuple(image_shape):
    raise ValueError(f"{images_path}: images are {images.shape[1]}x{images.shape[2]}, but the training images are "
                     f"{image_shape[0]}x{image_shape[1]}; both splits must have one image size")
  if labels.ndim != 1:
    raise ValueError(f"{labels_path}: labels have shape {labels.shape}; allowed: [n] (one label per image)")
  if len(labels) != len(images):
    raise ValueError(f"{labels_path}: {len(labels)} labels for the {len(images)} images of {images_path}; each "
                     "image needs one label")
  bad = np.flatnonzero(labels >= NUM_CLASSES)  # uint8: never negative
  if bad.size:
    raise ValueError(f"{labels_path}: label {int(labels[bad[0]])} at index {int(bad[0])} is out of range ({bad.size} "
                     f"of {len(labels)} labels are); allowed: 0 to {NUM_CLASSES - 1} ({NUM_CLASSES} classes)")


def patchify(images: np.ndarray, patch: int) -> np.ndarray:
  """``[n, H, W] -> [n, (H/patch) * (W/patch), patch * patch]``, patches in row-major order."""
  n, h, w = images.shape
  if h % patch or w % patch:
    raise ValueError(f"patch={patch} must divide the image size {h}x{w}")
  x = images.reshape(n, h // patch, patch, w // patch, patch).transpose(0, 1, 3, 2, 4)
  return x.reshape(n, (h // patch) * (w // patch), patch * patch)


def available(root: str | pathlib.Path = DEFAULT_ROOT) -> bool:
  return all((pathlib.Path(root) / f).exists() for pair in FILES.values() for f in pair)


def load(*, patch: int = 7, root: str | pathlib.Path = DEFAULT_ROOT, train_limit: int | None = None,
         test_limit: int | None = None) -> classification.ClassificationData:
  """``train_limit`` / ``test_limit`` keep the first examples of each split (the files' order)."""
  root = pathlib.Path(root)
  if not available(root):
    raise ValueError(f"task fashion_mnist needs the Fashion-MNIST files in {str(root)!r}, which are missing: "
                     f"install them with {INSTALL}")
  splits = {}
  for name, (images, labels) in FILES.items():
    x, y = read_idx(root / images), read_idx(root / labels)
    check_split(root / images, x, root / labels, y, splits["train"][0].shape[1:] if splits else None)
    x, y = x.astype(np.float32) / 255.0, y.astype(np.int32)
    limit = train_limit if name == "train" else test_limit
    splits[name] = (x[:limit], y[:limit])
  mean, std = float(splits["train"][0].mean()), float(splits["train"][0].std())

  def split(x, y):
    p = patchify((x - mean) / std, patch)
    return classification.Split(p, np.full(len(y), p.shape[1], np.int32), y)

  train, test = split(*splits["train"]), split(*splits["test"])
  return classification.ClassificationData(
      name="fashion_mnist", train=train, test=test, num_classes=NUM_CLASSES, buckets=(train.inputs.shape[1],),
      features=patch * patch,
      info={"source": str(root), "patch": patch, "train": len(train), "test": len(test)})
