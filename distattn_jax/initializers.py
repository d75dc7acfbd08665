"""Initial values of parameters: the default lambda, measured so every metric starts as sharp as dot-product
attention.

The measurement uses only the metric's record (its score through :func:`distattn_jax.metrics.score`), so a
metric added with :func:`distattn_jax.metrics.register` gets its default lambda the same way as the shipped ones.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from distattn_jax import metrics


@functools.partial(jax.jit, static_argnames=("metric", "p"))
def _scores(q, k, *, metric: str, p: float):
  return metrics.score(q, k, metric, p=p)


def logit_spread(metric: str | metrics.DistanceType, head_dim: int, p: float = 2.0, lam: float = 1.0,
                 num_queries: int = 512, num_keys: int = 1024, seed: int = 0) -> float:
  """Root-mean-square over queries of the standard deviation across keys of the logits
  ``lam * score(q, k) / sqrt(head_dim)`` for ``q, k ~ N(0, I)`` (a deterministic Monte-Carlo measurement;
  scores in float32, statistics in float64)."""
  name = metrics.canonical_name(metric)
  p = metrics.check_p(p)
  if not isinstance(p, float):
    raise ValueError("logit_spread needs a concrete p")
  rng = np.random.default_rng(seed)
  qs, ks = [], []
  for _ in range(max(1, num_queries // 16)):  # fresh keys for every 16 queries, so key noise averages out
    qs.append(rng.standard_normal((16, head_dim)))
    ks.append(rng.standard_normal((num_keys, head_dim)))
  # A measurement on constants: evaluated now even when called while a model's init is being traced.
  with jax.ensure_compile_time_eval():
    scores = _scores(jnp.asarray(np.stack(qs), jnp.float32), jnp.asarray(np.stack(ks), jnp.float32),
                     metric=name, p=p)
  variances = np.var(np.asarray(scores, np.float64), axis=-1)
  return float(lam * np.sqrt(np.mean(variances)) / math.sqrt(head_dim))


def default_lambda(metric: str | metrics.DistanceType, head_dim: int, p: float = 2.0) -> float:
  """The lambda at which ``metric``'s logits spread across keys as much as dot-product attention's do, for
  unit-variance queries and keys in ``head_dim`` dimensions (see ``DistanceBasedAttention`` for the table).

  Measured, not assumed: ``logit_spread("dot") / logit_spread(metric)`` on the same fixed samples, so the ratio
  is exact for those samples and within about 1% of its expectation. For ``dot`` it is 1.
  """
  name = metrics.canonical_name(metric)
  if not isinstance(head_dim, (int, np.integer)) or head_dim < 1:
    raise ValueError(f"head_dim must be a positive integer; got {head_dim!r}")
  p = metrics.check_p(p)
  if not isinstance(p, float):
    raise ValueError("default_lambda needs a concrete p")
  return _measured_lambda(metrics.get(name), int(head_dim), p if metrics.get(name).parametric else 2.0)


@functools.lru_cache(maxsize=None)
def _measured_lambda(record: metrics.Metric, head_dim: int, p: float) -> float:
  # Keyed by the record, not its name: a metric replaced with register(..., overwrite=True) is measured anew.
  return logit_spread("dot", head_dim) / logit_spread(record.name, head_dim, p)


def default_lambda_table(head_dims: tuple[int, ...] = (16, 32, 64, 128), p: float = 3.0) -> str:
  """``default_lambda`` for every registered metric (parametric ones at order ``p``) and head dimension, as a
  text table."""
  names = metrics.available()
  header = ["D"] + [f"{name}, p={p:g}" if metrics.get(name).parametric else name for name in names]
  rows = [[str(d)] + [f"{default_lambda(name, d, p):.4g}" for name in names] for d in head_dims]
  widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
  return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in [header] + rows)
