"""Test set-up: eight simulated CPU devices (set before JAX starts its backend), rank promotion as an error, a
persistent compilation cache, and shared helpers."""

import os
import pathlib

# The suite is compile-bound: XLA's executables persist in the user's cache folder (not the checkout, so a fresh
# clone of the same code loads them too; JAX keys each entry by the program, the compile options and the jax
# version, so a changed kernel compiles afresh), and every pytest-xdist worker and every program the tests start
# as a subprocess (they inherit these variables) loads what an earlier run compiled. Small compiles count too:
# the threshold is 0 s. A variable already set wins; JAX_ENABLE_COMPILATION_CACHE=false turns the cache off.
CACHE = pathlib.Path(os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache") / "distattn_jax"
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(CACHE / "jax_compilation_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import jax  # noqa: E402

jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs",
                  float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))
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


def kernel_sweep_metrics() -> tuple[str, ...]:
  """The shipped metrics a kernel's sweep runs. A weighted metric at its default weights (all ones) computes
  exactly its base metric, so those sweeps leave weighted_l1 and weighted_l2 to tests/test_weighted_metrics.py,
  which runs them with weights through every kernel."""
  import distattn_jax as da  # after the device count is set above
  return tuple(m for m in da.metrics.available() if da.metrics.get(m).feature_scale is None)


def normal(seed: int, shape, dtype=np.float64, scale: float = 1.0) -> np.ndarray:
  return (scale * np.random.default_rng(seed).standard_normal(shape)).astype(dtype)
