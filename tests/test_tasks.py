"""Research tasks: the ListOps generator against an independent evaluator, each data module's batches as
functions of the seed and step, the readers against the files' own formats, and the encoder's padding."""

import gzip
import importlib.metadata
import math
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distattn_jax.data import classification, fashion_mnist, listops, mnist1d, tasks, timeseries
from distattn_jax.models import Encoder, TruthGPTConfig


def stack_evaluate(source: str) -> tuple[int, int, int, int]:
  """Oracle: an iterative stack machine (the generator recurses). Returns (value, tokens, operator nesting
  depth, most arguments of any operator); the median sorts and averages the middle pair, floored."""
  stack, depth, deepest, most_args = [], 0, 0, 0
  tokens = source.split(" ")
  for tok in tokens:
    if tok.startswith("["):
      stack.append(tok)
      depth += 1
      deepest = max(deepest, depth)
    elif tok == "]":
      args = []
      while not isinstance(stack[-1], str):
        args.append(stack.pop())
      op = stack.pop()
      depth -= 1
      most_args = max(most_args, len(args))
      s = sorted(args)
      n = len(s)
      value = {"[MIN": s[0], "[MAX": s[-1], "[SM": sum(s) % 10,
               "[MED": s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) // 2}[op]
      stack.append(value)
    else:
      stack.append(int(tok))
  assert len(stack) == 1 and depth == 0, source
  return stack[0], len(tokens), deepest, most_args


@pytest.mark.parametrize("bounds,count", [
    pytest.param(dict(min_length=20, max_length=100), 2000, marks=pytest.mark.slow),
    (dict(min_length=5, max_length=60, max_depth=3, max_args=4), 1000)])
def test_listops_labels_match_an_independent_evaluator_within_bounds(bounds, count):
  sources, labels = listops.generate(count, seed=1, **bounds)
  max_depth, max_args = bounds.get("max_depth", 10), bounds.get("max_args", 10)
  depths, arg_counts = [], []
  for source, label in zip(sources, labels):
    value, length, depth, args = stack_evaluate(source)
    assert value == label, source
    assert bounds["min_length"] < length < bounds["max_length"]
    assert 1 <= depth <= max_depth and 2 <= args <= max_args
    depths.append(depth)
    arg_counts.append(args)
  assert labels.dtype == np.int32 and set(labels.tolist()) == set(range(10))
  # The bounds are reached, not merely respected: the draws cover the allowed range.
  assert max(arg_counts) == max_args and max(depths) >= min(max_depth - 1, 5)


def test_listops_is_seeded_and_prefix_stable():
  a, la = listops.generate(50, seed=3, min_length=10, max_length=50)
  b, lb = listops.generate(80, seed=3, min_length=10, max_length=50)
  c, _ = listops.generate(50, seed=4, min_length=10, max_length=50)
  assert a == b[:50] and np.array_equal(la, lb[:50]) and a != c
  with pytest.raises(ValueError, match="max_length=10 must be an int > min_length"):
    listops.generate(1, seed=0, min_length=10, max_length=10)


@pytest.fixture
def tiny_listops(monkeypatch, tmp_path):
  monkeypatch.setitem(listops.VARIANTS, "tiny", dict(min_length=5, max_length=40, splits=(120, 10, 30),
                                                     buckets=(16, 40)))
  return listops.load("tiny", seed=0, cache_dir=tmp_path), tmp_path


def test_listops_cache_and_bucketed_batches(tiny_listops):
  data, cache = tiny_listops
  files = list((cache / "listops").glob("*.npz"))
  assert len(files) == 1 and not list((cache / "listops").glob("*.tmp*"))
  again = listops.load("tiny", seed=0, cache_dir=cache)  # read back from the cache
  assert np.array_equal(again.train.inputs, data.train.inputs)
  sources, labels = listops.generate(160, seed=0, min_length=5, max_length=40)
  for i in (0, 7, 119):  # train rows are the first examples, tokenised and zero-padded
    want = listops.tokenize(sources[i])
    assert data.train.lengths[i] == len(want) and np.array_equal(data.train.inputs[i, :len(want)], want)
    assert not data.train.inputs[i, len(want):].any() and data.train.labels[i] == labels[i]
  assert np.array_equal(data.test.labels, labels[130:])
  b1, b2 = data.train_batch(5, 8, seed=2), data.train_batch(5, 8, seed=2)
  assert all(np.array_equal(b1[k], b2[k]) for k in b1)
  assert not np.array_equal(data.train_batch(6, 8, seed=2)["labels"], b1["labels"]) or not np.array_equal(
      data.train_batch(6, 8, seed=2)["inputs"], b1["inputs"])
  for step in range(20):  # the bucket is the smallest that holds the longest example
    b = data.train_batch(step, 8, seed=0)
    assert b["inputs"].shape[1] == (16 if b["lengths"].max() <= 16 else 40)
  evals = data.eval_batches(8)
  assert [float(b["weights"].sum()) for b in evals] == [8, 8, 8, 6]
  assert np.array_equal(np.concatenate([b["labels"][b["weights"] > 0] for b in evals]), data.test.labels)


@pytest.mark.slow
def test_mnist1d_is_the_packages_generator_with_default_args(tmp_path):
  from mnist1d import data as m  # the oracle: the package itself, called directly
  want = m.make_dataset(m.get_dataset_args())
  got = mnist1d.load(cache_dir=tmp_path)
  np.testing.assert_allclose(got.train.inputs[..., 0], want["x"], rtol=1e-6, atol=1e-6)
  assert np.array_equal(got.test.labels, want["y_test"]) and got.train.inputs.shape == (4000, 40, 1)
  b = got.train_batch(3, 16, seed=1)
  assert all(np.array_equal(b[k], got.train_batch(3, 16, seed=1)[k]) for k in b)
  index = np.random.default_rng([1, 3]).integers(0, 4000, size=16)
  assert np.array_equal(b["labels"], want["y"][index])


def _require_fashion():
  if not fashion_mnist.available():
    pytest.skip(f"Fashion-MNIST files absent: {fashion_mnist.INSTALL}")


def test_fashion_mnist_reads_idx_files_and_patches_row_major():
  _require_fashion()
  path = f"{fashion_mnist.DEFAULT_ROOT}/t10k-images-idx3-ubyte.gz"
  raw = gzip.open(path).read()
  magic, n, rows, cols = struct.unpack(">IIII", raw[:16])  # oracle: the IDX header by struct
  images = fashion_mnist.read_idx(path)
  assert magic == 2051 and images.shape == (n, rows, cols) == (10000, 28, 28)
  assert images[3, 10, 17] == raw[16 + 3 * 784 + 10 * 28 + 17]
  p = fashion_mnist.patchify(images[:2].astype(np.float32), 7)
  assert p.shape == (2, 16, 49)
  for patch, r, c in ((0, 0, 0), (5, 3, 6), (15, 6, 2)):
    assert p[1, patch, r * 7 + c] == images[1, (patch // 4) * 7 + r, (patch % 4) * 7 + c]
  data = fashion_mnist.load(train_limit=500, test_limit=100)
  assert data.train.inputs.shape == (500, 16, 49) and data.num_classes == 10
  b = data.train_batch(2, 4, seed=0)
  assert np.array_equal(b["inputs"], data.train_batch(2, 4, seed=0)["inputs"])


def test_ts_parser_reads_multivariate_variable_length_cases():
  text = ("# comment\n@problemName Toy\n@univariate false\n@classLabel true b a\n@data\n"
          "1,2,3:4,5,6:a\n-1.5,2e-1:0,0:b\n")
  series, labels, names = timeseries.parse_ts(text)
  assert names == ["b", "a"] and labels == ["a", "b"]
  np.testing.assert_array_equal(series[0], [[1, 4], [2, 5], [3, 6]])
  np.testing.assert_array_equal(series[1], [[-1.5, 0], [0.2, 0]])


UCR_HEADER = "@problemName GunPoint\n@classLabel true 1 2\n@data\n"


def _write_ucr(folder, train, test="1,2,3:1\n", header=UCR_HEADER):
  (folder / "GunPoint").mkdir(exist_ok=True)
  for split, cases in (("TRAIN", train), ("TEST", test)):
    (folder / "GunPoint" / f"GunPoint_{split}.ts").write_text(header + cases)


@pytest.mark.parametrize("train,test,where,message", [
    ("1,nan,3:1\n", None, "TRAIN.ts, line 4", r"value 'nan' \(dimension 0, position 1\) is not finite; values must "
     "be finite numbers"),
    ("1,2,3:1\n4,-inf,6:2\n", None, "TRAIN.ts, line 5", r"value '-inf' \(dimension 0, position 1\) is not finite"),
    ("1,2,3:1\n1,2,3:7\n", None, "TRAIN.ts, line 5", r"class label '7' is not one of the header's @classLabel list; "
     "allowed: 1, 2"),
    ("1,2,3:1\n1,x,3:2\n", None, "TRAIN.ts, line 5", r"value 'x' \(dimension 0, position 1\) is not a number; a case "
     "is one line: each dimension's values comma-separated"),
    ("", None, "TRAIN.ts", "the @data section holds no cases"),
    ("1,2:1\n", "1,2:1\n1,2:3:1\n", "TEST.ts, line 5", "case has 2 dimensions, but the first case has 1"),
], ids=["nan", "inf", "undeclared_label", "not_a_number", "empty", "dimensions"])
def test_bad_ucr_files_are_errors_naming_the_file_line_value_and_what_is_allowed(tmp_path, train, test, where,
                                                                                  message):
  _write_ucr(tmp_path, train, *([test] if test else []))
  with pytest.raises(ValueError, match=message) as error:
    timeseries.load("GunPoint", folder=tmp_path)
  assert str(error.value).startswith(f"{tmp_path}/GunPoint/GunPoint_{where}: "), str(error.value)


def test_a_test_label_the_training_file_lacks_is_an_error_without_a_header_list(tmp_path):
  _write_ucr(tmp_path, "1,2,3:a\n4,5,6:b\n", "1,2,3:c\n", header="@problemName GunPoint\n@data\n")
  with pytest.raises(ValueError, match=r"GunPoint_TEST.ts, line 3: class label 'c' is not one of the training "
                     r"file's classes; allowed: a, b"):
    timeseries.load("GunPoint", folder=tmp_path)


def _write_idx(path, array):
  array = np.asarray(array, np.uint8)
  with gzip.open(path, "wb") as f:
    f.write(bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes())


@pytest.mark.parametrize("split,field,array,message", [
    ("train", 1, [0, 1, 200], r"train-labels-idx1-ubyte.gz: label 200 at index 2 is out of range \(1 of 3 labels "
     r"are\); allowed: 0 to 9 \(10 classes\)"),
    ("train", 1, [[0], [1], [2]], r"train-labels-idx1-ubyte.gz: labels have shape \(3, 1\); allowed: \[n\]"),
    ("test", 0, np.zeros((3, 14, 14)), "t10k-images-idx3-ubyte.gz: images are 14x14, but the training images are "
     "28x28"),
    ("train", 0, np.zeros((3, 784)), r"train-images-idx3-ubyte.gz: images have shape \(3, 784\); allowed: "
     r"\[n, height, width\]"),
    ("test", 1, [0, 1], "t10k-labels-idx1-ubyte.gz: 2 labels for the 3 images of"),
], ids=["label_200", "labels_n_by_1", "test_14x14", "images_2d", "count"])
def test_bad_fashion_mnist_files_are_errors_naming_the_file_value_and_what_is_allowed(tmp_path, split, field,
                                                                                      array, message):
  good = {0: np.zeros((3, 28, 28)), 1: [0, 1, 2]}
  for name, files in fashion_mnist.FILES.items():
    for i, file in enumerate(files):
      _write_idx(tmp_path / file, array if (name, i) == (split, field) else good[i])
  with pytest.raises(ValueError, match=message) as error:
    fashion_mnist.load(root=tmp_path)
  assert str(error.value).startswith(str(tmp_path / fashion_mnist.FILES[split][field])), str(error.value)


def test_ucr_sets_have_the_archives_sizes():
  try:
    importlib.metadata.distribution("aeon")
  except importlib.metadata.PackageNotFoundError:
    pytest.skip(f"UCR files absent: {timeseries.INSTALL}")
  # Oracle: the UCR archive's published sizes (train, test, length, classes).
  for name, want in {"GunPoint": (50, 150, 150, 2), "ItalyPowerDemand": (67, 1029, 24, 2)}.items():
    d = timeseries.load(name)
    assert (len(d.train), len(d.test), d.max_len, d.num_classes) == want
    np.testing.assert_allclose(d.train.inputs.mean(axis=1), 0, atol=1e-5)  # z-normalised per series
    b = d.train_batch(4, 8, seed=0)
    assert np.array_equal(b["inputs"], d.train_batch(4, 8, seed=0)["inputs"])


def _dtw_by_the_book(a, b):
  """The textbook O(T U) table in plain Python, one pair at a time."""
  table = [[math.inf] * (len(b) + 1) for _ in range(len(a) + 1)]
  table[0][0] = 0.0
  for i in range(1, len(a) + 1):
    for j in range(1, len(b) + 1):
      cost = float(((a[i - 1] - b[j - 1]) ** 2).sum())
      table[i][j] = cost + min(table[i - 1][j - 1], table[i - 1][j], table[i][j - 1])
  return table[-1][-1]


def test_dtw_distances_equal_the_textbook_table():
  rng = np.random.default_rng(0)
  x, y = rng.normal(size=(3, 7, 2)), rng.normal(size=(4, 5, 2))  # unequal lengths, two channels
  want = np.array([[_dtw_by_the_book(a, b) for b in y] for a in x])
  np.testing.assert_allclose(timeseries.dtw_distances(x, y), want, rtol=1e-12)  # same sums, float64
  # The diagonal path is one warping path, so DTW never exceeds the squared Euclidean distance.
  z = rng.normal(size=(3, 7, 2))
  assert np.all(timeseries.dtw_distances(x, z) <= ((x[:, None] - z[None]) ** 2).sum((-1, -2)) + 1e-12)


@pytest.mark.slow
def test_ucr_nearest_neighbour_baselines_match_the_archive():
  try:
    importlib.metadata.distribution("aeon")
  except importlib.metadata.PackageNotFoundError:
    pytest.skip(f"UCR files absent: {timeseries.INSTALL}")
  # Oracle: the UCR archive's table of 1-NN test errors, ItalyPowerDemand: Euclidean 0.045, DTW (unconstrained
  # window) 0.050, rounded to three places. Tolerance: the rounding (5e-4) plus one of the 1029 test series.
  d = timeseries.load("ItalyPowerDemand")
  assert abs(timeseries.nearest_neighbour_accuracy(d, "euclidean") - 0.955) <= 1 / 1029 + 5e-4
  assert abs(timeseries.nearest_neighbour_accuracy(d, "dtw") - 0.950) <= 1 / 1029 + 5e-4


def test_text_task_batches_are_the_corpus_windows():
  task = tasks.load("text")
  b = task.train_batch(7, 4, seed=2)["windows"]
  rng = np.random.default_rng([2, 7])
  starts = rng.integers(0, len(task.corpus.train) - task.seq_len, size=4)
  assert np.array_equal(b, np.stack([task.corpus.train[s:s + task.seq_len + 1] for s in starts]))


def test_unknown_task_and_missing_package_messages(monkeypatch, tmp_path):
  with pytest.raises(ValueError, match="valid tasks: text, listops_full"):
    tasks.spec("imagenet")
  with pytest.raises(ValueError, match="dataset-fashion-mnist"):
    fashion_mnist.load(root=tmp_path)
  monkeypatch.setattr(timeseries, "PACKAGES", ("not_a_real_package_xyz",))
  with pytest.raises(ValueError, match="PyPI package 'aeon'"):
    timeseries.data_folder()


# tests/test_encoders.py checks every embedding and pooling against a numpy oracle with garbage padding; this is
# the one combination it leaves out (tokens with a CLS row), on a two-block trunk.
@pytest.mark.slow
@pytest.mark.parametrize("embedding,pooling,metric", [("tokens", "cls", "l1")])
def test_padded_and_unpadded_batches_give_the_same_logits(embedding, pooling, metric):
  config = TruthGPTConfig(vocab_size=12, width=16, depth=2, num_heads=2, mlp_dim=32, max_len=24, metric=metric)
  model = Encoder(config, num_classes=5, embedding=embedding, pooling=pooling)
  rng = np.random.default_rng(0)
  lengths = np.array([9, 4, 13], np.int32)
  shape = (3, 16) if embedding == "tokens" else (3, 16, 6)
  inputs = rng.integers(1, 12, shape) if embedding == "tokens" else rng.standard_normal(shape).astype(np.float32)
  real = np.arange(16)[None, :] < lengths[:, None]
  inputs = inputs * (real if embedding == "tokens" else real[:, :, None])
  params = jax.jit(model.init)(jax.random.key(0), inputs, lengths)
  padded = model.apply(params, inputs, lengths)
  for i, n in enumerate(lengths):  # oracle: each example alone, unpadded, no lengths at all
    alone = model.apply(params, inputs[i:i + 1, :n])
    np.testing.assert_allclose(padded[i], alone[0], rtol=1e-5, atol=1e-5)
  # Garbage in the padding changes nothing (it is masked, not merely zero).
  noisy = np.where(real if embedding == "tokens" else real[:, :, None], inputs, 7 if embedding == "tokens" else 3.0)
  np.testing.assert_allclose(model.apply(params, noisy, lengths), padded, rtol=1e-5, atol=1e-5)
