"""Orbax checkpoints of the train state: every k steps, the last n kept, atomic, verified, with fallback on damage.

Atomicity is orbax's: a step is written into ``<step>.orbax-checkpoint-tmp-*`` and renamed to ``<step>`` only
once every file is on disk (``AtomicRenameTemporaryPath`` on local file systems), and a directory with the
temporary suffix is never listed as a step. A run killed while saving therefore leaves the previous checkpoint
as the latest, and the leftover temporary directory is removed when the manager next opens the folder.

Each step can carry a small JSON ``metadata`` dict beside its arrays (orbax's per-step custom metadata, in the
step's ``_CHECKPOINT_METADATA`` file, written inside the same atomic step directory); the trainer stores the
config fingerprint there (:func:`distattn_jax.training.config.fingerprint`) and ``restore_latest``'s ``check``
compares it before any array is read. Beside it, under the reserved key ``digests``, every save records the
SHA-256 of each array's bytes (with its dtype and shape) and a SHA-256 of that metadata itself. A restore
verifies both: the metadata before ``check`` sees it, each array once it is read back. So a damaged step
metadata file is never mistaken for a changed config, and a flipped bit in a saved array is never restored.

A step whose files do not read as a checkpoint (a truncated or corrupted file; a missing, unparsable or altered
``_CHECKPOINT_METADATA``; missing array metadata; an array whose bytes differ from its recorded digest) is moved
aside into ``<directory>.corrupt/<step>`` with a warning saying why, and the previous step is restored instead.
When no step is readable, :class:`NoReadableCheckpoint` names the folder and each step's error; and since the
unreadable steps are then all in ``<directory>.corrupt``, a later ``restore_latest`` on a folder with no step
but set-aside ones raises it again instead of reporting an empty folder: a run whose checkpoints were all
unreadable never silently starts over. Only that class of failure moves anything (:func:`is_unreadable`): an
error of the machine or the process (a permission or other I/O error, ``MemoryError``, ``KeyboardInterrupt``, a
storage status such as ``PERMISSION_DENIED``) propagates unchanged and leaves every step where it is. A readable
step whose arrays do not match the state being restored (another model size or optimizer) is not corruption
either: it is a CheckpointError at once, and nothing is moved. A step saved before digests were recorded
restores unverified, with a warning.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import re
import shutil
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils


class CheckpointError(RuntimeError):
  pass


class NoReadableCheckpoint(CheckpointError):
  """The folder had checkpoints, and none of them is readable (each is set aside in ``<directory>.corrupt``)."""


class UnreadableCheckpoint(ValueError):
  """A step's files exist but hold no readable checkpoint (raised inside ``restore_latest``, then set aside)."""


STEP_METADATA = "_CHECKPOINT_METADATA"  # orbax's per-step JSON file; its "custom_metadata" is ours
DIGESTS = "digests"  # the key of the custom metadata that holds the content digests


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
    """Saves ``state`` as its step (once) with ``metadata``, a JSON-serialisable dict stored beside it, and the
    SHA-256 of every array and of the metadata (under the reserved key ``digests``)."""
    metadata = dict(metadata or {})
    if DIGESTS in metadata:
      raise ValueError(f"checkpoint metadata key {DIGESTS!r} is reserved for the content digests")
    step = int(state.step)
    if step not in self.manager.all_steps():
      payload = _payload(state)
      metadata = json.loads(json.dumps(metadata))  # as it reads back (tuples as lists), so its digest matches
      arrays = _array_digests(payload)
      custom = {**metadata, DIGESTS: {"arrays": arrays, "metadata": _metadata_digest(metadata, arrays)}}
      self.manager.save(step, args=ocp.args.StandardSave(payload), custom_metadata=custom, force=True)
    return step

  def metadata(self, step: int) -> dict[str, Any]:
    """The ``metadata`` saved with ``step`` (``{}`` when none was), verified against its digest; raises
    :class:`UnreadableCheckpoint` when the step's metadata file is missing, unparsable or altered."""
    return self._read_metadata(step)[0]

  def _read_metadata(self, step: int) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The step's custom metadata and its recorded array digests (None for a step saved before digests were
    recorded). Read here rather than through orbax, which logs a damaged or missing file and returns nothing."""
    path = self.directory / str(step) / STEP_METADATA
    try:
      saved = json.loads(path.read_bytes())
    except FileNotFoundError as e:
      raise UnreadableCheckpoint(f"its {STEP_METADATA} is missing") from e
    except ValueError as e:  # json's JSONDecodeError and UnicodeDecodeError
      raise UnreadableCheckpoint(f"its {STEP_METADATA} is not valid JSON ({e})") from e
    custom = saved.get("custom_metadata") if isinstance(saved, dict) else None
    if not isinstance(custom, dict):
      raise UnreadableCheckpoint(f"its {STEP_METADATA} holds no custom_metadata object")
    digests = custom.pop(DIGESTS, None)
    if digests is None:
      logging.warning("checkpoint %s/%d was saved without content digests: its metadata and arrays are restored "
                      "unverified", self.directory, step)
      return custom, None
    arrays = digests.get("arrays") if isinstance(digests, dict) else None
    if not isinstance(arrays, dict) or digests.get("metadata") != _metadata_digest(custom, arrays):
      raise UnreadableCheckpoint(f"its {STEP_METADATA} does not match the SHA-256 recorded in it when saved")
    return custom, arrays

  def restore_latest(self, state: Any, check: Callable[[int, dict[str, Any]], None] | None = None) -> Any | None:
    """The newest readable checkpoint restored into ``state``'s structure, or None when the folder never held one.

    ``check(step, metadata)`` runs on the newest readable step, with its verified metadata, before its arrays are
    read; whatever it raises propagates (a refusal to resume is not corruption, and nothing is moved). Every array
    read back is compared with the SHA-256 recorded when it was saved. A step that fails to read or verify is set
    aside and the previous one tried; :class:`NoReadableCheckpoint` when none is left, also on every later call
    while the folder holds no step and ``<directory>.corrupt`` holds set-aside ones.
    """
    errors = []
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, _payload(state))
    for step in reversed(self.steps()):
      try:
        saved = self.manager.item_metadata(step)
        if _shapes(saved) is None:
          raise UnreadableCheckpoint("its array metadata is missing or unreadable")
        metadata, digests = self._read_metadata(step)
      except Exception as e:
        if not is_unreadable(e):
          raise
        errors.append(f"step {step}: {type(e).__name__}: {e}")
        self._set_aside(step, e)
        continue
      if check is not None:
        check(step, metadata)
      self._check_structure(step, _shapes(saved), _shapes(target))
      try:
        restored = self._restore_verified(step, target, saved, digests)
      except Exception as e:
        if not is_unreadable(e):
          raise
        errors.append(f"step {step}: {type(e).__name__}: {e}")
        self._set_aside(step, e)
        continue
      return state.replace(**restored)
    aside = self.aside_directory
    if errors:
      raise NoReadableCheckpoint(f"no readable checkpoint in {self.directory}; every step failed to restore and "
                                 f"was moved to {aside}:\n  " + "\n  ".join(errors))
    set_aside = sorted(int(p.name) for p in aside.iterdir() if p.name.isdigit()) if aside.is_dir() else []
    if set_aside:
      raise NoReadableCheckpoint(
          f"no readable checkpoint in {self.directory}; it holds no step, and {aside} holds steps "
          f"{', '.join(map(str, set_aside))} set aside as unreadable (the warnings of the run that moved them say "
          "why); nothing was restored")
    return None

  @property
  def aside_directory(self) -> pathlib.Path:
    """``<directory>.corrupt``, where unreadable steps are moved."""
    return self.directory.with_name(self.directory.name + ".corrupt")

  def _restore_verified(self, step: int, target: Any, saved: Any, digests: dict[str, Any] | None) -> dict:
    """Reads ``step`` into ``target`` and compares every array with its recorded digest. Each array is read in
    the dtype it was saved in (the bytes the digest is of) and only then cast to ``target``'s."""
    saved_dtypes = {k: getattr(leaf, "dtype", None) for k, leaf in _flat(saved).items()}

    def as_saved(path, leaf):
      dtype = saved_dtypes.get(_key(path))
      if isinstance(leaf, jax.ShapeDtypeStruct) and dtype is not None and leaf.dtype != dtype:
        return jax.ShapeDtypeStruct(leaf.shape, dtype, sharding=leaf.sharding)
      return leaf

    read = jax.tree_util.tree_map_with_path(as_saved, target)
    restored = self.manager.restore(step, args=ocp.args.StandardRestore(read))
    if digests is not None:
      _verify(restored, digests)
    return jax.tree.map(lambda x, t: x.astype(t.dtype) if isinstance(t, jax.ShapeDtypeStruct) and x.dtype != t.dtype
                        else x, restored, target)

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
    aside = self.aside_directory
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


def _key(path) -> str:
  return jax.tree_util.keystr(path, simple=True, separator="/")


def _flat(tree: Any) -> dict[str, Any]:
  return {_key(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _shapes(tree: Any) -> dict[str, tuple[int, ...]] | None:
  """``{"params/trunk/.../kernel": shape}`` for a state or for a checkpoint's metadata (None if it has none)."""
  if tree is None:
    return None
  return {k: tuple(getattr(leaf, "shape", np.shape(leaf))) for k, leaf in _flat(tree).items()}


def _host_array(leaf: Any) -> np.ndarray:
  """The whole of ``leaf`` on this host (an array sharded over several processes is gathered: every process
  saves and restores together, so every process takes part)."""
  if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
    if leaf.is_fully_replicated:
      return np.asarray(leaf.addressable_data(0))
    return np.asarray(multihost_utils.process_allgather(leaf, tiled=True))
  return np.asarray(jax.device_get(leaf))


def _sha256(array: np.ndarray) -> str:
  return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def _array_digests(tree: Any) -> dict[str, dict[str, Any]]:
  """``{path: {"dtype", "shape", "sha256"}}`` of every leaf: the SHA-256 of its bytes in C order."""
  digests = {}
  for key, leaf in _flat(tree).items():
    array = _host_array(leaf)
    digests[key] = {"dtype": array.dtype.name, "shape": list(array.shape), "sha256": _sha256(array)}
  return digests


def _metadata_digest(metadata: dict[str, Any], arrays: dict[str, Any]) -> str:
  text = json.dumps({"arrays": arrays, "metadata": metadata}, sort_keys=True, separators=(",", ":"))
  return hashlib.sha256(text.encode()).hexdigest()


def _verify(restored: Any, digests: dict[str, Any]) -> None:
  """Raises :class:`UnreadableCheckpoint` naming the arrays of ``restored`` whose bytes differ from ``digests``.

  A leaf read back as a Python scalar (a step counter) is compared in its saved dtype."""
  leaves = _flat(restored)
  differ = sorted(set(digests) ^ set(leaves))
  for key in sorted(set(digests) & set(leaves)):
    record, array = digests[key], _host_array(leaves[key])
    try:
      dtype = jnp.dtype(record["dtype"])
      if array.dtype != dtype:
        array = array.astype(dtype)
      same = list(array.shape) == list(record["shape"]) and _sha256(array) == record["sha256"]
    except (KeyError, TypeError, ValueError):  # a digest record of another form
      same = False
    if not same:
      differ.append(key)
  if differ:
    raise UnreadableCheckpoint(f"{len(differ)} array(s) differ from the SHA-256 recorded when saved: "
                               f"{', '.join(differ[:4])}{' ...' if len(differ) > 4 else ''}")
