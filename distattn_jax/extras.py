"""The pip extras of the subpackages that need more than the core dependencies, and the check that names the
one to install.

``import distattn_jax`` needs only jax, jaxlib, flax, optax, chex and numpy. ``distattn_jax.training`` needs
the ``train`` extra, ``distattn_jax.engines`` the ``engines`` extra (which includes ``train``); each checks
that the modules its extra provides are importable before it imports anything, so a missing one is an
ImportError that says what to install rather than a ModuleNotFoundError from deep inside an import chain.
The ``tasks`` extra adds the data of two research tasks (MNIST-1D's generator, aeon's UCR files);
``distattn_jax.data`` imports without it, and those two tasks say so when they are loaded.
"""

from __future__ import annotations

import importlib.util

# The top-level modules each extra provides (pyproject.toml's [project.optional-dependencies]).
MODULES = {
    "train": ("absl", "ml_collections", "orbax.checkpoint", "tensorboardX", "tqdm"),
    "engines": ("absl", "ml_collections", "orbax.checkpoint", "tensorboardX", "tqdm", "scipy"),
    "tasks": ("mnist1d", "aeon"),
}


def installed(module: str) -> bool:
  """Whether ``module`` can be imported, without importing it (a dotted name imports its parents only)."""
  try:
    return importlib.util.find_spec(module) is not None
  except (ImportError, ValueError):  # a parent package is missing, or a module without a spec
    return False


def missing(extra: str) -> list[str]:
  """The modules of ``extra`` that cannot be imported."""
  if extra not in MODULES:
    raise ValueError(f"extra={extra!r} is not one of {', '.join(MODULES)}")
  return [m for m in MODULES[extra] if not installed(m)]


def require(subpackage: str, extra: str) -> None:
  """Raises an ImportError naming ``extra`` and the pip command that installs it if any of its modules is
  missing; ``subpackage`` is the package that needs it (for the message)."""
  absent = missing(extra)
  if absent:
    verb = "is" if len(absent) == 1 else "are"
    raise ImportError(f"{subpackage} needs the {extra!r} extra: {', '.join(absent)} {verb} not installed. "
                      f"Install it with: pip install 'distattn_jax[{extra}]' (from a checkout: pip install -e "
                      f"'.[{extra}]')", name=absent[0])
