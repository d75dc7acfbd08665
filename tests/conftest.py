"""Test set-up: eight simulated CPU devices (set before JAX starts its backend) and shared helpers."""

import jax

jax.config.update("jax_num_cpu_devices", 8)

import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def x64():
  """Runs a test with float64 enabled, for oracles that need it; restores the default afterwards."""
  with jax.enable_x64(True):
    yield


def normal(seed: int, shape, dtype=np.float64, scale: float = 1.0) -> np.ndarray:
  return (scale * np.random.default_rng(seed).standard_normal(shape)).astype(dtype)
