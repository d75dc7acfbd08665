"""Test set-up: eight simulated CPU devices (set before JAX starts its backend), rank promotion as an error,
and shared helpers."""

import jax

jax.config.update("jax_num_cpu_devices", 8)
# Implicit rank broadcasting is a bug magnet in attention code (a [T, S] mask silently meeting [B, H, T, S]);
# the library is written without it, and the suite keeps it that way.
jax.config.update("jax_numpy_rank_promotion", "raise")

import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def x64():
  """Runs a test with float64 enabled, for oracles that need it; restores the default afterwards."""
  with jax.enable_x64(True):
    yield


def normal(seed: int, shape, dtype=np.float64, scale: float = 1.0) -> np.ndarray:
  return (scale * np.random.default_rng(seed).standard_normal(shape)).astype(dtype)
