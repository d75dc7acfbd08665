"""What differs between the jax versions this package supports (0.10 to 0.12), in one place.

pyproject.toml allows jax and jaxlib ``>=0.10,<0.13``. The package is written against the API those versions
share; where a name moved or a backend changed status between them, the code asks this module instead of
testing ``jax.__version__`` itself, so that the next move is one edit here. Nothing in the package uses an API
that jax 0.10 to 0.12 deprecate: ``tests/test_deprecations.py`` imports every module with jax's
DeprecationWarnings as errors.

What moved, from the jax changelogs:

* Mesh context: ``with mesh:`` is deprecated since jax 0.10.1; the mesh is set with ``jax.set_mesh`` (a global
  setter and a context manager, in every supported version; ``jax.sharding.use_mesh`` was removed in 0.7.1). The
  functions that read or set the mesh while tracing (``get_abstract_mesh``, ``use_abstract_mesh``,
  ``get_mesh``) are in ``jax.sharding`` in every supported version and also at the top level of ``jax`` from
  0.11 on; :func:`get_abstract_mesh`, :func:`use_abstract_mesh` and :func:`get_mesh` take the top-level ones
  where they exist.
* Pallas: ``jax.pallas`` is the preferred import path from jax 0.12.1 on (``jax.experimental.pallas`` stays
  valid and re-exports it); the Triton-specific APIs stay in ``jax.experimental.pallas.triton``. ``pl.dot`` is
  deprecated in 0.10.2 and gone in 0.11.2 and 0.12 (``jax.experimental.pallas.triton.dot`` is the Triton
  matmul). Pallas'
  Triton backend is deprecated from jax 0.11 on: lowering a Triton kernel there emits a DeprecationWarning
  (:data:`PALLAS_TRITON_DEPRECATED`). Lowering a Triton kernel for a GPU on a machine without one
  (``.lower(lowering_platforms=("cuda",))``) took the GPU's generation from a fallback in jax 0.10; from 0.11 on
  it must be named by an abstract device on the abstract mesh (:func:`gpu_lowering_target`).
* Pytree leaves that are dict views, generators, ``zip`` objects or other iterators are deprecated since jax
  0.10.1; the package passes tuples, lists and dicts only.
"""

from __future__ import annotations

import contextlib
import importlib
import types
from typing import Any, Callable

import jax

#: ``(major, minor, patch)`` of the running jax.
JAX_VERSION: tuple[int, ...] = tuple(jax.__version_info__)

#: Whether this jax deprecates Pallas' Triton backend (0.11 and later), so that lowering the fused GPU kernel
#: emits a DeprecationWarning from jax.
PALLAS_TRITON_DEPRECATED: bool = JAX_VERSION >= (0, 11)


def _mesh_function(name: str) -> Callable[..., Any]:
  # Top level from jax 0.11 on; jax.sharding in 0.10 (and still in 0.12).
  found = getattr(jax, name, None)
  return found if found is not None else getattr(jax.sharding, name)


def set_mesh(mesh: jax.sharding.Mesh | None):
  """``jax.set_mesh(mesh)``: sets the mesh globally, or for a ``with`` block (never ``with mesh:``, which jax
  deprecates)."""
  return jax.set_mesh(mesh)


def get_abstract_mesh() -> Any:
  """The abstract mesh set while tracing (``jax.get_abstract_mesh`` or ``jax.sharding.get_abstract_mesh``); an
  empty mesh when none is set."""
  return _mesh_function("get_abstract_mesh")()


def use_abstract_mesh(mesh: Any):
  """A context that makes ``mesh`` the abstract mesh while tracing (``jax.use_abstract_mesh`` or
  ``jax.sharding.use_abstract_mesh``)."""
  return _mesh_function("use_abstract_mesh")(mesh)


def get_mesh() -> Any:
  """The concrete mesh set with :func:`set_mesh` (``jax.get_mesh`` or ``jax.sharding.get_mesh``)."""
  return _mesh_function("get_mesh")()


def pallas() -> types.ModuleType:
  """The Pallas module: ``jax.pallas`` where this jax has it (0.12.1 and later, the preferred path), else
  ``jax.experimental.pallas``. Imported on first use, so ``import distattn_jax`` does not load Pallas for it."""
  try:
    return importlib.import_module("jax.pallas")
  except ImportError:
    return importlib.import_module("jax.experimental.pallas")


def pallas_triton() -> types.ModuleType:
  """Pallas' Triton-specific module (``CompilerParams``, ``dot``, ``load``, ``store``): in
  ``jax.experimental.pallas.triton`` in every supported version."""
  return importlib.import_module("jax.experimental.pallas.triton")


def gpu_lowering_target(device_kind: str = "NVIDIA H100"):
  """A context in which Pallas' Triton kernels lower for a GPU of ``device_kind`` without one on this machine,
  as ``jax.jit(f).trace(...).lower(lowering_platforms=("cuda",))`` does.

  jax 0.10 lowers for compute capability 9.0 (the H100's) when no GPU is present. From jax 0.11 on the lowering
  reads the GPU from the abstract mesh and refuses without one, so this sets an abstract mesh with no axes whose
  abstract device is ``device_kind``; enter it around ``.lower(...)``, where the kernels lower. On a machine with
  a GPU, as in jax 0.10, nothing is set and the lowering targets that GPU.
  """
  if JAX_VERSION < (0, 11) or any(d.platform == "gpu" for d in jax.devices()):
    return contextlib.nullcontext()
  device = jax.sharding.AbstractDevice(device_kind=device_kind, num_cores=None, platform="gpu")
  return use_abstract_mesh(jax.sharding.AbstractMesh((), (), abstract_device=device))
