"""The one atomic file writer (training/writers.py), which the trainer and the ablation grid both use."""

import os
import stat

import pytest

from distattn_jax.training import writers


def test_atomic_writes_interleave_set_their_mode_and_leave_the_umask_alone(tmp_path, monkeypatch):
  path = tmp_path / "sub" / "results.json"
  previous = os.umask(0o077)  # a private umask would make a plain write 0600
  try:
    def no_umask(*args):
      raise AssertionError("the writer changed the process umask (a race for every other thread)")
    monkeypatch.setattr(os, "umask", no_umask)
    # A second writer renames its file while the first is between writing and renaming: each has a temporary
    # file of its own, so both renames succeed and the last one wins.
    real_replace, nested = os.replace, []

    def replace(src, dst):
      if not nested:
        nested.append(src)
        writers.write_text_atomically(path, "second")
      real_replace(src, dst)
    monkeypatch.setattr(os, "replace", replace)
    writers.write_text_atomically(path, "first \u03bb")
  finally:
    monkeypatch.undo()
    os.umask(previous)
  assert path.read_text(encoding="utf-8") == "first \u03bb"
  assert stat.S_IMODE(path.stat().st_mode) == 0o644
  assert os.listdir(path.parent) == ["results.json"]  # no temporary file left behind
  assert os.path.dirname(nested[0]) == str(path.parent)  # renamed within the folder


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
  path = tmp_path / "a.txt"
  writers.write_text_atomically(path, "old")
  with pytest.raises(TypeError):
    writers.write_text_atomically(path, b"bytes are not text")
  assert path.read_text() == "old" and os.listdir(tmp_path) == ["a.txt"]
