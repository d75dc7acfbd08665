"""What a measurement ran on: one description of the machine, saved with benchmark reports and ablation results."""

from __future__ import annotations

import os
import pathlib
import platform
from typing import Any

import jax

import distattn_jax


def cpu_name() -> str:
  """The CPU's model name (``/proc/cpuinfo``'s first ``model name``), else what :mod:`platform` knows."""
  try:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
  """``{"platform", "processor" (CPU model), "cpu_count", "backend", "device" (the first device's kind),
  "python", "jax", "distattn_jax"}``."""
  return {"platform": platform.platform(), "processor": cpu_name(), "cpu_count": os.cpu_count(),
          "backend": jax.default_backend(), "device": jax.devices()[0].device_kind,
          "python": platform.python_version(), "jax": jax.__version__, "distattn_jax": distattn_jax.__version__}
