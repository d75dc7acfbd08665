"""Byte-level text data: the standard-library corpus, the hash split, batches as functions of the step, errors."""

import hashlib
import os
import pathlib
import sysconfig

import numpy as np
import pytest

from distattn_jax.data import text


@pytest.fixture(scope="module")
def stdlib():
  return text.load_corpus("", val_fraction=0.05)


def test_stdlib_corpus_is_the_interpreters_library_source_without_tests(stdlib):
  root = pathlib.Path(sysconfig.get_paths()["stdlib"])
  # Oracle: an os.walk that prunes the excluded folders as it descends.
  want = []
  for folder, dirs, files in os.walk(root):
    dirs[:] = [d for d in dirs if d not in ("test", "tests", "idle_test", "site-packages", "dist-packages",
                                            "__pycache__")]
    want += [pathlib.Path(folder, f) for f in files if f.endswith(".py")]
  files = text.stdlib_files(root)
  assert files == sorted(want)
  assert not any(part in ("test", "tests") for f in files for part in f.relative_to(root).parts[:-1])
  nonempty = [f for f in files if f.stat().st_size]
  assert stdlib.info["files"] == len(nonempty) > 100
  assert stdlib.info["bytes"] == sum(f.stat().st_size for f in nonempty)
  # The splits hold every byte plus one separator between neighbouring files of the same split.
  assert stdlib.info["train_files"] + stdlib.info["validation_files"] == stdlib.info["files"]
  assert len(stdlib.train) + len(stdlib.validation) == stdlib.info["bytes"] + stdlib.info["files"] - 2
  assert stdlib.info["source"] == "python-stdlib" and stdlib.info["path"] == str(root)


def test_validation_files_are_chosen_by_a_hash_of_their_path(stdlib):
  root = text.stdlib_root()
  names = [f.relative_to(root).as_posix() for f in text.stdlib_files(root) if f.stat().st_size]
  # Oracle: SHA-256 of the relative path, first 8 bytes as an integer, below the fraction of 2^64.
  chosen = [n for n in names if int(hashlib.sha256(n.encode()).hexdigest()[:16], 16) < 0.05 * 2**64]
  assert stdlib.info["validation_files"] == len(chosen)
  assert 0.02 < len(chosen) / len(names) < 0.10  # a hash split lands near the requested 5%
  first = (root / chosen[0]).read_bytes()
  assert stdlib.validation[:len(first)].tobytes() == first  # files keep their sorted order within a split


def test_a_files_split_does_not_depend_on_the_other_files(tmp_path):
  for i in range(40):
    (tmp_path / f"f{i:02d}.txt").write_text(f"file {i} " * 20)
  before = text.load_corpus(str(tmp_path), val_fraction=0.3)
  (tmp_path / "zz_new.txt").write_text("a new file " * 20)
  after = text.load_corpus(str(tmp_path), val_fraction=0.3)
  assert before.info["split"] == after.info["split"] == "hash of relative path"
  old_val = before.validation.tobytes().split(text.SEPARATOR)
  new_val = after.validation.tobytes().split(text.SEPARATOR)
  assert [v for v in new_val if not v.startswith(b"a new")] == old_val


def test_hidden_files_are_skipped_and_subfolders_are_read(tmp_path):
  (tmp_path / "sub").mkdir()
  (tmp_path / "sub" / "a.txt").write_bytes(b"x" * 50)
  (tmp_path / ".git").mkdir()
  (tmp_path / ".git" / "config").write_bytes(b"secret" * 50)
  (tmp_path / ".hidden").write_bytes(b"h" * 50)
  corpus = text.load_corpus(str(tmp_path), val_fraction=0.2)
  assert corpus.info["files"] == 1 and corpus.info["bytes"] == 50


def test_a_single_file_gives_its_last_bytes_to_validation(tmp_path):
  data = bytes(range(256)) * 4
  path = tmp_path / "corpus.bin"
  path.write_bytes(data)
  corpus = text.load_corpus(str(path), val_fraction=0.25)
  assert corpus.info["split"] == "last bytes"
  assert corpus.train.tobytes() == data[:768] and corpus.validation.tobytes() == data[768:]


def test_train_batches_are_a_function_of_the_step(stdlib):
  a, b = (text.TextData(stdlib, seq_len=32, batch_size=8, seed=3) for _ in range(2))
  np.testing.assert_array_equal(a.train_batch(17), b.train_batch(17))  # a fresh loader (a resumed run) agrees
  assert not np.array_equal(a.train_batch(17), a.train_batch(18))
  assert not np.array_equal(a.train_batch(17), text.TextData(stdlib, 32, 8, seed=4).train_batch(17))
  batch = a.train_batch(5)
  assert batch.shape == (8, 33) and batch.dtype == np.int32
  train = stdlib.train.tobytes()
  assert all(train.find(row.astype(np.uint8).tobytes()) >= 0 for row in batch)


def test_eval_batches_are_fixed_evenly_spaced_validation_windows(stdlib):
  data = text.TextData(stdlib, seq_len=16, batch_size=4, seed=0)
  batches = data.eval_batches(3)
  assert len(batches) == 3 and all(b.shape == (4, 17) for b in batches)
  windows = np.concatenate(batches)
  validation = stdlib.validation
  starts = np.linspace(0, len(validation) - 17, 12).astype(int)
  np.testing.assert_array_equal(windows, np.stack([validation[s:s + 17] for s in starts]).astype(np.int32))
  np.testing.assert_array_equal(np.concatenate(text.TextData(stdlib, 16, 4, seed=9).eval_batches(3)), windows)


def test_a_missing_path_is_an_error_naming_it(tmp_path):
  missing = str(tmp_path / "nope")
  with pytest.raises(FileNotFoundError, match=f"data.path='{missing}': no such file or folder"):
    text.load_corpus(missing)


@pytest.mark.parametrize("make", ["empty folder", "empty files"])
def test_an_empty_corpus_is_an_error_naming_it(tmp_path, make):
  if make == "empty files":
    (tmp_path / "a.txt").write_bytes(b"")
  with pytest.raises(ValueError, match=f"corpus at '{tmp_path}' is empty"):
    text.load_corpus(str(tmp_path))


def test_a_corpus_too_small_for_one_window_per_split_is_an_error(tmp_path):
  (tmp_path / "a.txt").write_bytes(b"0123456789")
  with pytest.raises(ValueError, match=r"has 10 bytes: too small for train and validation windows of 65 bytes"):
    text.load_corpus(str(tmp_path), min_split_bytes=65)
