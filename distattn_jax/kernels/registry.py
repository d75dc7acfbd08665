"""Maps implementation names to kernels, so that a new kernel only has to register itself."""

from __future__ import annotations

from typing import Callable

_KERNELS: dict[str, Callable] = {}


def register(name: str, kernel: Callable) -> Callable:
  if name in _KERNELS and _KERNELS[name] is not kernel:
    raise ValueError(f"implementation {name!r} is already registered")
  _KERNELS[name] = kernel
  return kernel


def available() -> tuple[str, ...]:
  """Registered names, sorted (import order must not change error messages)."""
  return tuple(sorted(_KERNELS))


def get(name: str) -> Callable:
  """The kernel registered as ``name``; ValueError listing the registered names otherwise."""
  if not isinstance(name, str) or name not in _KERNELS:
    raise ValueError(f"implementation={name!r} is not registered; valid names: "
                     f"{', '.join(('auto',) + available())}")
  return _KERNELS[name]
