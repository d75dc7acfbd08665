"""TruthGPTCompleteSystem: the TruthGPT model behind the neural engine's presets, plus the quantum, marketing
and business engines, each switched on by a config flag and each reporting what it computed and checked."""

from __future__ import annotations

import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from distattn_jax import monitoring
from distattn_jax.engines import business, marketing, neural, pipeline, quantum
from distattn_jax.models import TruthGPT, TruthGPTConfig, count_params

ENGINES = {"quantum": quantum.run, "neural": neural.run, "marketing": marketing.run, "business": business.run}


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  for name in ENGINES:
    c[f"enable_{name}_optimization"] = True
  c.neural = neural.default_config()
  c.quantum = quantum.default_config()
  c.marketing = marketing.default_config()
  c.business = business.default_config()
  return c


class TruthGPTCompleteSystem:
  """``TruthGPTCompleteSystem(config)`` (see :func:`default_config`): the model is built from ``config.neural``
  (its ``model`` fields and ``seed``); ``forward_with_optimization`` runs it through a neural preset;
  ``run_engines`` returns each enabled engine's report."""

  def __init__(self, config: ml_collections.ConfigDict):
    unknown = sorted(set(config.keys()) - set(default_config().keys()))
    if unknown:
      raise ValueError(f"TruthGPTCompleteSystem: unknown config keys {unknown}; valid keys: "
                       f"{', '.join(sorted(default_config().keys()))}")
    self.config = config
    self.model_config = TruthGPTConfig(**config.neural.model.to_dict())
    tokens = jnp.zeros((1, min(self.model_config.max_len, config.neural.seq_len)), jnp.int32)
    self.params = jax.jit(TruthGPT(self.model_config).init)(jax.random.key(config.neural.seed), tokens)["params"]
    self._levels: dict[str, Callable] = {}
    self._forward_seconds: dict[str, list[float]] = {}
    self._engine_seconds: dict[str, float] = {}
    self._compile: dict[str, dict[str, float]] = {}

  @property
  def enabled(self) -> tuple[str, ...]:
    return tuple(name for name in ENGINES if self.config[f"enable_{name}_optimization"])

  def _apply(self, level: str, tokens: jax.Array) -> Callable:
    if level not in self._levels:
      options = {name: self.config.neural[name].to_dict() for name in ("kernel", "remat")}
      pipe = neural.build_level(level, options, self.config.neural.levels.to_dict())
      self._levels[level] = neural.apply_fn(pipe(neural.base_setup(self.model_config, self.params, tokens)))
    return self._levels[level]

  def forward_with_optimization(self, input_ids, attention_mask=None, optimization_level: str = "basic"):
    """Logits ``[batch, length, vocab]`` of ``input_ids [batch, length]`` through the preset's pipeline.

    ``attention_mask`` (1 = token, 0 = padding) must be right padding: the model is causal, so padding after a
    row's tokens cannot change their logits; the padded positions' logits are returned as 0. Every id, padded
    positions' too, must be in ``[0, model.vocab_size)`` (checked when ``input_ids`` are concrete, not traced).
    """
    tokens = jnp.asarray(input_ids)
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise ValueError(f"forward_with_optimization: input_ids must be an int array [batch, length]; got shape "
                       f"{tokens.shape}, dtype {tokens.dtype}")
    if tokens.shape[1] > self.model_config.max_len:
      raise ValueError(f"forward_with_optimization: length {tokens.shape[1]} exceeds model.max_len="
                       f"{self.model_config.max_len}")
    vocab = self.model_config.vocab_size
    if not isinstance(tokens, jax.core.Tracer) and tokens.size:  # values are known unless traced
      ids = np.asarray(tokens)
      bad = np.argwhere((ids < 0) | (ids >= vocab))
      if bad.size:
        row, col = (int(i) for i in bad[0])
        raise ValueError(f"forward_with_optimization: input_ids[{row}, {col}]={int(ids[row, col])} is outside the "
                         f"vocabulary ({len(bad)} of {ids.size} ids are); allowed: 0 to {vocab - 1} (model.vocab_size={vocab})")
    if attention_mask is not None:
      mask = np.asarray(attention_mask).astype(bool)
      if mask.shape != tokens.shape:
        raise ValueError(f"forward_with_optimization: attention_mask shape {mask.shape} must equal input_ids "
                         f"shape {tokens.shape}")
      if np.any(mask[:, 1:] & ~mask[:, :-1]):
        raise ValueError("forward_with_optimization: attention_mask must be right padding (ones then zeros in "
                         "every row)")
    apply = self._apply(optimization_level, tokens)
    start = time.perf_counter()
    logits = jax.block_until_ready(apply(self.params, tokens))
    self._forward_seconds.setdefault(optimization_level, []).append(time.perf_counter() - start)
    if attention_mask is not None:
      logits = jnp.where(jnp.asarray(mask)[..., None], logits, 0.0)
    return logits

  def run_engines(self, progress: Callable[[str, int, int], None] | None = None) -> dict[str, pipeline.EngineReport]:
    """Each enabled engine's report, in the order quantum, neural, marketing, business."""
    reports = {}
    for name in self.enabled:
      start = time.perf_counter()
      reports[name] = ENGINES[name](self.config[name], progress=progress)
      self._engine_seconds[name] = time.perf_counter() - start
    return reports

  def get_performance_stats(self) -> dict[str, Any]:
    """Parameter count, forward calls and mean seconds per level (first call includes compiling), engine wall
    times, and the process's memory."""
    forward = {level: {"calls": len(t), "first_call_seconds": t[0],
                       "mean_seconds_after_first": float(np.mean(t[1:])) if len(t) > 1 else None}
               for level, t in self._forward_seconds.items()}
    return {"parameters": count_params(self.params), "enabled_engines": list(self.enabled), "forward": forward,
            "engine_seconds": dict(self._engine_seconds), **monitoring.memory_stats()}
