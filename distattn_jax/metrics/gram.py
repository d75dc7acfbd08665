"""Gram forms: scores from inner products ``sum_d x_d^a y_d^b``, one matmul per term.

Every matmul runs at ``jax.lax.Precision.HIGHEST`` whatever the caller's ``precision`` (which governs only the
attention's ``weights @ v``): on TPU and on GPUs with TF32 the default precision rounds the inputs to bfloat16
or TF32 first, which makes the distances themselves inexact. The products of bfloat16 or float32 inputs are
accumulated in float32 (float64 inputs in float64).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from distattn_jax.metrics import numerics, record

Array = jax.Array

SCORE_PRECISION = jax.lax.Precision.HIGHEST


def centered(x: Array, y: Array) -> tuple[Array, Array]:
  """``x - c`` and ``y - c`` for ``c`` the mean of ``y`` over its rows, in the accumulation dtype.

  A translation-invariant score is unchanged by any ``c``, so ``stop_gradient`` is exact; the gram form then
  cancels terms of size ``|x - c|^2`` instead of ``|x|^2``, which keeps inputs with a large common offset
  accurate (without it, equal vectors at offset 100 are 0.35 apart in float32). The shifted values stay in the
  accumulation dtype: rounding them back to bfloat16 would move every distance by up to 2^-8 of ``|x - c|``
  (a 4% gradient error for sqeuclidean attention, measured by experiments/selfcheck.py), so bfloat16 inputs
  get the float32 distances of their own values.
  """
  acc = numerics.accumulation_dtype(jnp.result_type(x, y))
  c = jax.lax.stop_gradient(jnp.mean(y.astype(acc), axis=-2, keepdims=True))
  return x.astype(acc) - c, y.astype(acc) - c


def _power(x: Array, a: int, acc) -> Array:
  # The first power stays in the input dtype: bfloat16 products are exact in a float32 accumulator.
  return x if a == 1 else jax.lax.integer_pow(x.astype(acc), a)


def grams(terms: tuple[tuple[int, int], ...], x: Array, y: Array) -> list[Array]:
  """``[..., N, M]`` matmuls (``[..., N, 1]`` / ``[..., 1, M]`` row sums where an exponent is 0) for ``terms``;
  ``x`` and ``y`` have the same rank."""
  acc = numerics.accumulation_dtype(jnp.result_type(x, y))
  out = []
  for a, b in terms:
    if b == 0:
      out.append(jnp.sum(_power(x, a, acc).astype(acc), axis=-1)[..., :, None])
    elif a == 0:
      out.append(jnp.sum(_power(y, b, acc).astype(acc), axis=-1)[..., None, :])
    else:
      xa, yb = _power(x, a, acc), _power(y, b, acc)
      dtype = jnp.result_type(xa, yb)
      out.append(jnp.einsum("...nd,...md->...nm", xa.astype(dtype), yb.astype(dtype), precision=SCORE_PRECISION,
                            preferred_element_type=acc))
  return out


def evaluate(form: record.Gram, x: Array, y: Array, center: bool) -> Array:
  """The form's value ``[..., N, M]`` in the accumulation dtype."""
  if center:
    x, y = centered(x, y)
  acc = numerics.accumulation_dtype(jnp.result_type(x, y))
  if form.normalize:
    x, y = x.astype(acc), y.astype(acc)
    x = x * inverse_norm(jnp.sum(x * x, axis=-1, keepdims=True))
    y = y * inverse_norm(jnp.sum(y * y, axis=-1, keepdims=True))
  return jnp.asarray(form.fn(*grams(form.terms, x, y))).astype(acc)


# ------------------------------------------------------------------------------------------------------------
# The shipped gram functions.


def inverse_norm(sq: Array) -> Array:
  """``1 / sqrt(sq)``, and 0 (with gradient 0) where ``sq == 0``; NaN stays NaN."""
  zero = sq == 0
  return jnp.where(zero, 0.0, jax.lax.rsqrt(jnp.where(zero, 1.0, sq)))


def sqeuclidean(xy: Array, xx: Array, yy: Array) -> Array:
  return jnp.maximum(xx + yy - 2.0 * xy, 0.0)


def cosine(xy: Array) -> Array:
  """``1 - x.y`` of normalised rows (``Gram(..., normalize=True)``), clamped to the range rounding can leave."""
  return jnp.clip(1.0 - xy, 0.0, 2.0)


def dot(xy: Array) -> Array:
  return xy
