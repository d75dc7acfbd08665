"""The gram tile form: each term ``sum_d x^a y^b`` of a :class:`~distattn_jax.metrics.Gram` record is a matmul on
the tensor cores, or a row sum where an exponent is 0; the record's ``fn`` is applied to the tiles, and its
derivative comes from ``jax.vjp`` of ``fn`` on the tile.

The cost of padding: Triton loads power-of-two tiles and ``tl.dot`` takes a power-of-two inner dimension, so a
head_dim that is not a power of two is zero-padded to the next one (80 and 96 to 128) and every matmul of the
score tile and of its cotangent runs over the padded width: 128 / 80 = 1.6 and 128 / 96 = 1.33 times the
tensor-core work of the real features (the zeros add nothing to the terms, so the values are exact). Splitting
the inner dimension into power-of-two pieces (64 + 16 for 80) would remove it at the price of a second dot per
term and of keeping two q tiles; not done until a GPU run measures that the padded matmuls, not the softmax and
the memory traffic, bound the kernel at those widths. Elementwise forms do not pay it: their feature chunks
that hold padding only are skipped (:func:`distattn_jax.kernels.pallas_gpu.elementwise.chunks`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.pallas import triton as plgpu

from distattn_jax import metrics


def power(x, a: int, keep: bool = False):
  """``x ** a`` in float32; a first power keeps the input dtype when ``keep`` (bf16 products are exact in the
  float32 accumulator of the matmul)."""
  if a == 1:
    return x if keep else x.astype(jnp.float32)
  return jax.lax.integer_pow(x.astype(jnp.float32), a)


def dot(a, b, trans_a=False, trans_b=False, precision=jax.lax.Precision.HIGHEST):
  """A tile matmul (``tl.dot``) in the operands' common dtype, accumulated in float32."""
  dtype = jnp.promote_types(a.dtype, b.dtype)
  return plgpu.dot(a.astype(dtype), b.astype(dtype), trans_a=trans_a, trans_b=trans_b, precision=precision)


def operand_dtype(x):
  # The score cotangent meets bf16 operands in bf16 on the tensor cores (as in FlashAttention-2), float32 ones
  # in float32.
  return x.dtype if x.dtype == jnp.bfloat16 else jnp.float32


def parts(form: metrics.Gram, q, k):
  """The gram tiles of the record's terms: ``[bq, bk]`` matmuls, ``[bq, 1]`` / ``[1, bk]`` row sums."""
  grams = []
  for a, b in form.terms:
    if b == 0:
      grams.append(jnp.sum(power(q, a), axis=1)[:, None])
    elif a == 0:
      grams.append(jnp.sum(power(k, b), axis=1)[None, :])
    else:
      grams.append(dot(power(q, a, keep=True), power(k, b, keep=True), trans_b=True))
  return grams


def value(form: metrics.Gram, load_q, load_k, dim: int, shape):
  """The form's value ``[bq, bk]`` (float32) and the gram tiles its VJP needs."""
  grams = parts(form, load_q(0, dim), load_k(0, dim))
  return jnp.broadcast_to(jnp.asarray(form.fn(*grams)).astype(jnp.float32), shape), grams


def vjp(form: metrics.Gram, load_q, load_k, dim: int, grams, g, *, want_q: bool, want_k: bool):
  """Cotangents of the value tile for cotangent ``g [bq, bk]``: ``[dq [bq, dim]]``, ``[dk [bk, dim]]`` (None
  when not wanted) and None (a gram form has no order p)."""
  shape = g.shape
  full = [jnp.broadcast_to(x, shape) for x in grams]
  _, fn_vjp = jax.vjp(lambda *xs: jnp.broadcast_to(jnp.asarray(form.fn(*xs)).astype(jnp.float32), shape),
                      *full)
  dgrams = fn_vjp(g)
  q, k = load_q(0, dim), load_k(0, dim)
  dq = jnp.zeros((shape[0], dim), jnp.float32) if want_q else None
  dk = jnp.zeros((shape[1], dim), jnp.float32) if want_k else None
  for (a, b), dg in zip(form.terms, dgrams):
    if a > 0 and want_q:
      inner = (jnp.sum(dg, axis=1)[:, None] if b == 0 else
               dot(dg.astype(operand_dtype(k)), power(k, b, keep=True)))
      dq = dq + (inner if a == 1 else a * power(q, a - 1) * inner)
    if b > 0 and want_k:
      inner = (jnp.sum(dg, axis=0)[:, None] if a == 0 else
               dot(dg.astype(operand_dtype(q)), power(q, a, keep=True), trans_a=True))
      dk = dk + (inner if b == 1 else b * power(k, b - 1) * inner)
  return [dq], [dk], None
