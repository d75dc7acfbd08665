"""Performance statistics: compile time, step time, tokens per second and peak memory.

``compile_with_stats`` compiles a jitted function ahead of time and reports how long that took and what XLA
says the program needs; :class:`Throughput` turns wall-clock intervals into step time and tokens per second;
``memory_stats`` reads the device's peak (GPUs and TPUs report it, the CPU backend does not) and the host
process's peak resident memory. :func:`get_performance_stats` collects them in one dict, the record the
training loop writes with its metrics.
"""

from __future__ import annotations

import resource
import sys
import time
from typing import Any, Callable

import jax


def compile_with_stats(fn: Callable, *args: Any) -> tuple[Callable, dict[str, float]]:
  """``jax.jit``-ed ``fn`` compiled for ``args``; returns the executable and ``compile_seconds`` plus, where the
  backend reports them, XLA's ``temp_bytes`` / ``argument_bytes`` / ``output_bytes`` for one call."""
  start = time.perf_counter()
  compiled = fn.lower(*args).compile()
  stats: dict[str, float] = {"compile_seconds": time.perf_counter() - start}
  try:
    analysis = compiled.memory_analysis()
  except (NotImplementedError, jax.errors.JaxRuntimeError):
    analysis = None
  for name in ("temp", "argument", "output"):
    value = getattr(analysis, f"{name}_size_in_bytes", None)
    if value is not None:
      stats[f"{name}_bytes"] = float(value)
  return compiled, stats


def memory_stats() -> dict[str, float]:
  """``device_peak_bytes`` where the backend reports it; ``host_peak_rss_bytes`` of this process always."""
  stats = {}
  device = jax.local_devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in device:
    stats["device_peak_bytes"] = float(device["peak_bytes_in_use"])
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  stats["host_peak_rss_bytes"] = float(rss if sys.platform == "darwin" else rss * 1024)
  return stats


class Throughput:
  """Step time and tokens/s over the steps between two calls of :meth:`mark` (the caller makes sure the work is
  finished, e.g. by fetching the last step's metrics, before marking)."""

  def __init__(self, tokens_per_step: int, step: int):
    self.tokens_per_step = tokens_per_step
    self._step, self._time = step, time.perf_counter()
    self._total_steps, self._total_seconds = 0, 0.0

  def mark(self, step: int) -> dict[str, float]:
    now = time.perf_counter()
    steps, seconds = step - self._step, now - self._time
    self._step, self._time = step, now
    self._total_steps += steps
    self._total_seconds += seconds
    return self._rates(steps, seconds)

  def overall(self) -> dict[str, float]:
    """The rates over every marked interval so far (restarts excluded)."""
    return self._rates(self._total_steps, self._total_seconds)

  def _rates(self, steps: int, seconds: float) -> dict[str, float]:
    if steps <= 0 or seconds <= 0:
      return {}
    return {"step_seconds": seconds / steps, "tokens_per_second": steps * self.tokens_per_step / seconds}

  def restart(self, step: int) -> None:
    """Excludes what happens until now (evaluation, checkpointing) from the next interval."""
    self._step, self._time = step, time.perf_counter()


def get_performance_stats(throughput: dict[str, float], compile_stats: dict[str, float]) -> dict[str, float]:
  """The seed's ``get_performance_stats``: step time, tokens/s, compile time and peak memory in one record."""
  return {**throughput, **compile_stats, **memory_stats()}
