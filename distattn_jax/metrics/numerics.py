"""Dtype and shape rules and argument checks shared by the metrics, the kernels and the layers.

``accumulation_dtype`` (reductions accumulate in at least float32), ``sum_to_shape`` (a broadcast cotangent back to
its primal's shape), ``concrete_value`` (a value known at trace time), ``check_p`` (the lp order),
``check_metric_weights`` (a weighted metric's feature weights) and ``check_pair`` (the two point sets a metric
compares).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def check_p(p: Any, argname: str = "p") -> float | Array:
  """Validates the lp order: a concrete ``p`` must be a positive number (``inf`` allowed); NaN or ``p <= 0`` is
  a ValueError. A traced ``p`` (learned) is returned as a float32-or-wider scalar array and is not checked."""
  value = concrete_value(p)
  if value is None:
    p = jnp.asarray(p)
    if p.ndim != 0:
      raise ValueError(f"{argname} must be a scalar; got an array of shape {p.shape}")
    if not jnp.issubdtype(p.dtype, jnp.floating):
      raise TypeError(f"{argname} must be a float; got dtype {p.dtype}")
    return p
  if value.ndim != 0:
    raise ValueError(f"{argname} must be a scalar; got an array of shape {value.shape}")
  if value.dtype == bool or not np.issubdtype(value.dtype, np.number) or np.iscomplexobj(value):
    raise TypeError(f"{argname} must be a positive real number; got {p!r}")
  p = float(value)
  if math.isnan(p) or p <= 0:
    raise ValueError(f"{argname} must be > 0 (inf allowed); got {p}")
  return p


def check_metric_weights(metric_weights: Any, owner: str) -> tuple[Array, bool]:
  """Validates a weighted metric's feature weights: a real floating-point (or integer) array whose concrete
  entries are all ``>= 0`` and finite. Returns the weights as a floating-point array and whether they are concrete
  (a traced array, a learned parameter, is returned unchecked; callers check it at run time). Messages start with
  ``owner``."""
  value = concrete_value(metric_weights)
  arr = jnp.asarray(metric_weights)
  if arr.dtype == bool or not jnp.issubdtype(arr.dtype, jnp.number) or jnp.issubdtype(arr.dtype,
                                                                                      jnp.complexfloating):
    raise TypeError(f"{owner}: metric_weights must be a real array of non-negative feature weights; got dtype "
                    f"{arr.dtype}")
  if not jnp.issubdtype(arr.dtype, jnp.floating):
    arr = arr.astype(jnp.float32)
  if value is not None:
    bad = ~(np.isfinite(value) & (value >= 0))
    if np.any(bad):
      where = np.argwhere(bad)[:3]
      shown = ", ".join(f"{value[tuple(i)].item()!r} at index {tuple(int(j) for j in i)}" for i in where)
      raise ValueError(f"{owner}: metric_weights must be >= 0 and finite (non-negative feature weights, 1 = the "
                       f"unweighted metric); got {shown}" + (f" and {int(bad.sum()) - 3} more" if bad.sum() > 3
                                                            else ""))
  return arr, value is not None


def concrete_value(x: Any) -> np.ndarray | None:
  """``x`` as a numpy array when its value is known at trace time, else None."""
  if isinstance(x, jax.core.Tracer):
    return None
  try:
    return np.asarray(x)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return None


def accumulation_dtype(dtype: Any) -> jnp.dtype:
  """The dtype reductions use for inputs of ``dtype``: float32 for 16-bit floats, else the dtype itself."""
  return jnp.promote_types(dtype, jnp.float32)


def sum_to_shape(t: Array, shape: tuple[int, ...]) -> Array:
  """Sums a broadcast cotangent back to the shape of the primal it came from (leading or size-1 axes)."""
  if t.shape == shape:
    return t
  lead = t.ndim - len(shape)
  axes = tuple(range(lead)) + tuple(i + lead for i, s in enumerate(shape) if s == 1 and t.shape[i + lead] != 1)
  return jnp.sum(t, axis=axes, keepdims=True).reshape(shape)


def check_pair(x: Any, y: Any, fn: str) -> tuple[Array, Array]:
  """``x``, ``y`` as arrays after checking dtype and shapes; errors name the function and the argument."""
  x = jnp.asarray(x)
  y = jnp.asarray(y)
  for name, a in (("x", x), ("y", y)):
    if jnp.issubdtype(a.dtype, jnp.complexfloating):
      raise TypeError(f"{fn}: {name} is complex (dtype {a.dtype}); complex inputs are not supported, pass a "
                      "real floating-point array (e.g. stack the real and imaginary parts as features)")
    if not jnp.issubdtype(a.dtype, jnp.floating):
      raise TypeError(f"{fn}: {name} must be a floating-point array; got dtype {a.dtype}")
    if a.ndim < 2:
      raise ValueError(f"{fn}: {name} must have shape [..., length, dim]; got shape {a.shape}")
  if x.shape[-1] != y.shape[-1]:
    raise ValueError(f"{fn}: x and y must have the same last (feature) dimension; got x.shape={x.shape}, "
                     f"y.shape={y.shape}")
  try:
    np.broadcast_shapes(x.shape[:-2], y.shape[:-2])
  except ValueError:
    raise ValueError(f"{fn}: the batch dimensions of x and y do not broadcast; got x.shape={x.shape}, "
                     f"y.shape={y.shape}") from None
  return x, y
