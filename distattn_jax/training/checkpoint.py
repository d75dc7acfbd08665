"""Orbax checkpoints of the train state: every k steps, the last n kept, atomic, with fallback on corruption.

Atomicity is orbax's: a step is written into ``<step>.orbax-checkpoint-tmp-*`` and renamed to ``<step>`` only
once every file is on disk (``AtomicRenameTemporaryPath`` on local file systems), and a directory with the
temporary suffix is never listed as a step. A run killed while saving therefore leaves the previous checkpoint
as the latest, and the leftover temporary directory is removed when the manager next opens the folder.

A step that exists but cannot be read (a truncated or corrupted file) is moved aside into
``<directory>.corrupt/<step>`` with a warning, and the previous step is restored instead; when no step is
readable, :class:`CheckpointError` names the folder and each step's error. A readable step whose arrays do not
match the state being restored (another model size or optimizer) is not corruption: it is a CheckpointError at
once, and nothing is moved.
"""

from __future__ import annotations

import pathlib
import shutil
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging


class CheckpointError(RuntimeError):
  pass


class Checkpoints:
  """A thin shell over ``ocp.CheckpointManager`` that saves and restores ``{"step", "params", "opt_state"}``."""

  def __init__(self, directory: str | pathlib.Path, keep: int):
    self.directory = pathlib.Path(directory).absolute()
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, cleanup_tmp_directories=True,
                                           enable_async_checkpointing=False)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_handlers=ocp.StandardCheckpointHandler())

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def save(self, state: Any) -> int:
    step = int(state.step)
    if step not in self.manager.all_steps():
      self.manager.save(step, args=ocp.args.StandardSave(_payload(state)), force=True)
    return step

  def restore_latest(self, state: Any) -> Any | None:
    """The newest readable checkpoint restored into ``state``'s structure, or None when there is none."""
    errors = []
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, _payload(state))
    for step in reversed(self.steps()):
      try:
        saved = _shapes(self.manager.item_metadata(step))
        if saved is None:
          raise ValueError("the checkpoint has no readable metadata")
        self._check_structure(step, saved, _shapes(target))
        return state.replace(**self.manager.restore(step, args=ocp.args.StandardRestore(target)))
      except CheckpointError:
        raise
      except Exception as e:  # orbax and tensorstore raise many types for unreadable files
        errors.append(f"step {step}: {type(e).__name__}: {e}")
        self._set_aside(step, e)
    if errors:
      raise CheckpointError(f"no readable checkpoint in {self.directory}; every step failed to restore:\n  "
                            + "\n  ".join(errors))
    return None

  def _check_structure(self, step: int, saved: dict[str, tuple], wanted: dict[str, tuple]) -> None:
    if saved == wanted:
      return
    missing, unexpected = sorted(set(wanted) - set(saved)), sorted(set(saved) - set(wanted))
    reshaped = [f"{k}: saved {saved[k]}, expected {wanted[k]}" for k in sorted(set(saved) & set(wanted))
                if saved[k] != wanted[k]]
    details = "; ".join(f"{label} {', '.join(items[:4])}{' ...' if len(items) > 4 else ''}"
                        for label, items in (("missing", missing), ("unexpected", unexpected),
                                             ("shapes differ:", reshaped)) if items)
    raise CheckpointError(f"checkpoint {self.directory}/{step} was written by a different model or optimizer "
                          f"configuration ({details}); train in another workdir or with the config it was trained "
                          "with (see config.json beside the checkpoints)")

  def _set_aside(self, step: int, error: Exception) -> None:
    aside = self.directory.with_name(self.directory.name + ".corrupt")
    aside.mkdir(exist_ok=True)
    target = aside / str(step)
    shutil.rmtree(target, ignore_errors=True)
    shutil.move(str(self.directory / str(step)), str(target))
    self.manager.reload()
    logging.warning("checkpoint %s/%d could not be restored (%s: %s); moved it to %s and trying the previous one",
                    self.directory, step, type(error).__name__, error, target)

  def close(self) -> None:
    self.manager.close()


def _payload(state: Any) -> dict[str, Any]:
  return {"step": state.step, "params": state.params, "opt_state": state.opt_state}


def _shapes(tree: Any) -> dict[str, tuple[int, ...]] | None:
  """``{"params/trunk/.../kernel": shape}`` for a state or for a checkpoint's metadata (None if it has none)."""
  if tree is None:
    return None
  return {jax.tree_util.keystr(path, simple=True, separator="/"): tuple(getattr(leaf, "shape", np.shape(leaf)))
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}
