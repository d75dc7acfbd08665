"""Evaluating a record: :func:`score` for the kernels, and the validated call behind ``metric(x, y)``."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from distattn_jax.metrics import elementwise, gram, numerics, record

Array = jax.Array


def _same_rank(x: Array, y: Array) -> tuple[Array, Array]:
  """Leading size-1 axes so that ``x`` and ``y`` have the same rank (their batch dims broadcast)."""
  rank = max(x.ndim, y.ndim)
  return x.reshape((1,) * (rank - x.ndim) + x.shape), y.reshape((1,) * (rank - y.ndim) + y.shape)


def form_value(metric: record.Metric, x: Array, y: Array, p: Any = None) -> Array:
  """The value of ``metric``'s form at order ``p`` (not negated), ``[..., N, M]`` in the accumulation dtype."""
  form = metric.resolve(p)
  x, y = _same_rank(x, y)
  if isinstance(form, record.Gram):
    return gram.evaluate(form, x, y, center=metric.translation_invariant)
  params = () if not metric.parametric or isinstance(p, float) else (p,)
  return elementwise.evaluate(form, x, y, params)


def score(x: Array, y: Array, metric: str | record.DistanceType | record.Metric, *, p: float | Array = 2.0,
          precision: Any = None) -> Array:
  """The attention score before scaling: ``-distance(x, y)``, or ``+similarity`` for a similarity (``dot``), in
  the accumulation dtype (float32 for 16-bit inputs). ``p`` is used by a parametric metric only and must
  already be checked. ``precision`` is accepted for the kernels' convenience and ignored: gram forms always
  run at ``Precision.HIGHEST``."""
  del precision
  entry = record.get(metric)
  s = form_value(entry, x, y, p)
  return s if entry.similarity else -s


def _unsigned(x: Array, y: Array, p_array: Array | None, *, metric: record.Metric, p_static: float | None) -> Array:
  return form_value(metric, x, y, p_static if p_array is None else p_array).astype(jnp.result_type(x, y))


# Jitted so that XLA fuses the elementwise reductions even when called eagerly.
_jitted = jax.jit(_unsigned, static_argnames=("metric", "p_static"))


def scale_features(metric: record.Metric, metric_weights: Array, p: Any) -> Array:
  """The factors ``feature_scale(w, p)`` of a weighted metric, computed in the weights' accumulation dtype."""
  w = metric_weights.astype(numerics.accumulation_dtype(metric_weights.dtype))
  return jnp.asarray(metric.feature_scale(w, p), w.dtype)


def _weighted_pair(metric: record.Metric, x: Array, y: Array, metric_weights: Any, p: Any) -> tuple[Array, Array]:
  """``s * x`` and ``s * y`` for the weights of a weighted metric (validated; ``s`` broadcast over the rows)."""
  if not metric.weighted:
    raise ValueError(f"{metric.name}: metric_weights is only for a weighted metric (a record with a "
                     f"feature_scale, such as weighted_l1 or weighted_l2); {metric.name!r} has none")
  w, _ = numerics.check_metric_weights(metric_weights, metric.name)
  try:
    np.broadcast_shapes(w.shape, x.shape[:-2] + x.shape[-1:], y.shape[:-2] + y.shape[-1:])
  except ValueError:
    raise ValueError(f"{metric.name}: metric_weights of shape {w.shape} must broadcast to [..., D] against "
                     f"x.shape={x.shape} and y.shape={y.shape} without their row axis") from None
  s = scale_features(metric, w, p)
  s = s[..., None, :] if s.ndim else s

  def scaled(a):
    return (a * s.reshape((1,) * (a.ndim - s.ndim) + s.shape)).astype(dtype)

  dtype = jnp.result_type(x, y)
  return scaled(x), scaled(y)


def public_call(metric: record.Metric, x: Any, y: Any, p: Any, precision: Any, metric_weights: Any = None) -> Array:
  """``metric(x, y[, p], metric_weights=w)``: validated, in the inputs' dtype."""
  del precision  # the gram forms always run at Precision.HIGHEST
  x, y = numerics.check_pair(x, y, metric.name)
  if not metric.parametric:
    if p is not None:
      raise TypeError(f"{metric.name}: takes no order p (got p={p!r}); only parametric metrics such as lp do")
    if metric_weights is not None:
      x, y = _weighted_pair(metric, x, y, metric_weights, 2.0)
    return _jitted(x, y, None, metric=metric, p_static=None)
  p = numerics.check_p(2.0 if p is None else p)
  if metric_weights is not None:
    x, y = _weighted_pair(metric, x, y, metric_weights, p)
  if isinstance(p, float):
    return _jitted(x, y, None, metric=metric, p_static=p)
  return _jitted(x, y, p, metric=metric, p_static=None)


record.install_evaluation(record.Evaluation(call=public_call, form_value=form_value))
