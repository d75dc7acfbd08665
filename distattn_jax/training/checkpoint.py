"""Orbax checkpoints of the train state: every k steps, the last n kept, atomic, with fallback on corruption.

Atomicity is orbax's: a step is written into ``<step>.orbax-checkpoint-tmp-*`` and renamed to ``<step>`` only
once every file is on disk (``AtomicRenameTemporaryPath`` on local file systems), and a directory with the
temporary suffix is never listed as a step. A run killed while saving therefore leaves the previous checkpoint
as the latest, and the leftover temporary directory is removed when the manager next opens the folder.

Each step can carry a small JSON ``metadata`` dict beside its arrays (orbax's per-step custom metadata, written
inside the same atomic step directory); the trainer stores the config fingerprint there
(:func:`distattn_jax.training.config.fingerprint`) and ``restore_latest``'s ``check`` compares it before any
array is read.

A step whose files do not read as a checkpoint (a truncated or corrupted file, missing metadata) is moved aside
into ``<directory>.corrupt/<step>`` with a warning, and the previous step is restored instead; when no step is
readable, :class:`CheckpointError` names the folder and each step's error. Only that class of failure moves
anything (:func:`is_unreadable`): an error of the machine or the process (a permission or other I/O error,
``MemoryError``, ``KeyboardInterrupt``, a storage status such as ``PERMISSION_DENIED``) propagates unchanged and
leaves every step where it is. A readable step whose arrays do not match the state being restored (another
model size or optimizer) is not corruption either: it is a CheckpointError at once, and nothing is moved.
"""

from __future__ import annotations

import pathlib
import re
import shutil
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging


class CheckpointError(RuntimeError):
  pass


class UnreadableCheckpoint(ValueError):
  """A step's files exist but hold no readable checkpoint (raised inside ``restore_latest``, then set aside)."""


# Storage statuses (tensorstore's, at the start of its ValueError messages) that report the machine, not the
# files' contents: a checkpoint that fails with one of them may be perfectly good.
SYSTEM_STATUSES = ("PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "UNAVAILABLE", "DEADLINE_EXCEEDED", "CANCELLED",
                   "ABORTED", "UNAUTHENTICATED")
# What orbax, tensorstore and json raise for bytes that do not parse as a checkpoint (truncated, corrupted or
# missing parts). Orbax wraps tensorstore's errors in a bare Exception, so the causes are looked at too.
FORMAT_ERRORS = (UnreadableCheckpoint, FileNotFoundError, ValueError, KeyError, IndexError, TypeError, EOFError)


def is_unreadable(error: BaseException) -> bool:
  """Whether ``error``, raised while reading a step, says its files are not a readable checkpoint (so the step
  may be set aside) rather than that reading failed for another reason (which must propagate)."""
  chain, e = [], error
  while e is not None and len(chain) < 16:
    chain.append(e)
    e = e.__cause__ or e.__context__
  for e in chain:
    if isinstance(e, FileNotFoundError):
      continue  # a missing part of the step (an OSError, but one about the files)
    if isinstance(e, (OSError, MemoryError)) or not isinstance(e, Exception):
      return False
    status = re.match(r"([A-Z_]+): ", str(e))
    if status and status.group(1) in SYSTEM_STATUSES:
      return False
  wrapped = type(error) is Exception and any(isinstance(e, FORMAT_ERRORS) for e in chain[1:])
  return isinstance(error, FORMAT_ERRORS) or wrapped


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

  def save(self, state: Any, metadata: dict[str, Any] | None = None) -> int:
    """Saves ``state`` as its step (once) with ``metadata``, a JSON-serialisable dict stored beside it."""
    step = int(state.step)
    if step not in self.manager.all_steps():
      self.manager.save(step, args=ocp.args.StandardSave(_payload(state)), custom_metadata=metadata or {},
                        force=True)
    return step

  def metadata(self, step: int) -> dict[str, Any]:
    """The ``metadata`` saved with ``step`` (``{}`` when none was, or when orbax could not read it)."""
    return dict(self.manager.metadata(step).custom_metadata or {})

  def restore_latest(self, state: Any, check: Callable[[int, dict[str, Any]], None] | None = None) -> Any | None:
    """The newest readable checkpoint restored into ``state``'s structure, or None when there is none.

    ``check(step, metadata)`` runs on the newest readable step before its arrays are read; whatever it raises
    propagates (a refusal to resume is not corruption, and nothing is moved).
    """
    errors = []
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, _payload(state))
    for step in reversed(self.steps()):
      try:
        saved = _shapes(self.manager.item_metadata(step))
        if saved is None:
          raise UnreadableCheckpoint("the checkpoint has no readable metadata")
        metadata = self.metadata(step)
      except Exception as e:
        if not is_unreadable(e):
          raise
        errors.append(f"step {step}: {type(e).__name__}: {e}")
        self._set_aside(step, e)
        continue
      if check is not None:
        check(step, metadata)
      self._check_structure(step, saved, _shapes(target))
      try:
        return state.replace(**self.manager.restore(step, args=ocp.args.StandardRestore(target)))
      except Exception as e:
        if not is_unreadable(e):
          raise
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
