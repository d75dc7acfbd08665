"""The gram tile form: each term ``sum_d x^a y^b`` of a :class:`~distattn_jax.metrics.Gram` record is a matmul on
the tensor cores, or a row sum where an exponent is 0; the record's ``fn`` is applied to the tiles, and its
derivative comes from ``jax.vjp`` of ``fn`` on the tile.

Tensor cores, not IEEE float32. ``tl.dot`` of two float32 tiles at ``Precision.HIGHEST`` lowers to Triton's
``inputPrecision = ieee``: scalar FMA loops on the CUDA cores, an order of magnitude slower than the tensor
cores (an H100 has 67 TFLOP/s of float32 FMA against 990 of bfloat16 MMA). Every gram matmul therefore meets
the tensor cores in 16-bit operands with float32 accumulation (:func:`gram_dot`):

* A 16-bit operand (bfloat16 or float16 inputs of a form that is neither centred nor normalised, such as
  ``dot``) is one piece: the products are exact in the float32 accumulator.
* A float32 operand is split into ``pieces`` bfloat16 terms, ``x = x_0 + x_1 + ...`` (``x_0 = bf16(x)``,
  ``x_1 = bf16(x - x_0)``, ...), and the matmul is the sum of the piece products ``x_i y_j`` with
  ``i + j < pieces``, smallest first (what ``jax.lax.DotAlgorithmPreset.BF16_BF16_F32_X3`` and ``_X6`` do
  inside Triton's lowering; written out here so that the interpreter on CPU computes the same arithmetic and
  the lowered module shows plain bfloat16 ``tt.dot`` operations whatever the Triton version). Three pieces (6
  matmuls) carry 24 bits, float32's own precision: float32 inputs, whose distances the library computes at
  ``Precision.HIGHEST``. Two pieces (3 matmuls, 16 bits, about 1e-5 relative) where the inputs were 16-bit and
  a centred or normalised form made them float32: the distances of the inputs' own values, far finer than
  their 2^-9 rounding (rounding the centred values back to bfloat16 instead would move every distance by up to
  2^-8 of ``|x - c|``, see :func:`distattn_jax.metrics.gram.centered`).
* The score cotangent ``dS`` meets a 16-bit operand in that dtype (FlashAttention-2's choice) and a float32
  operand as float32 split the same way.

bfloat16 pieces keep float32's exponent range (float16 pieces would flush small remainders). Measured against
float64 (docs/kernels.md gives the figures of the whole kernel and the commands): a score at three pieces is
within 8.5e-8 of ``|x||y|`` at 8, 64 and 128 features (IEEE float32: 1.8e-7), at two pieces within 1.1e-5.

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

HALF = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def is_half(x) -> bool:
  return jnp.dtype(x.dtype) in HALF


def power(x, a: int, keep: bool = False):
  """``x ** a`` in float32; a first power keeps the input dtype when ``keep`` (16-bit products are exact in the
  float32 accumulator of the matmul)."""
  if a == 1:
    return x if keep else x.astype(jnp.float32)
  return jax.lax.integer_pow(x.astype(jnp.float32), a)


def dot(a, b, trans_a=False, trans_b=False, precision=jax.lax.Precision.HIGHEST):
  """A tile matmul (``tl.dot``) in the operands' common dtype, accumulated in float32 (the programs' ``P V``
  and ``dO V^T`` products, at the caller's ``precision``)."""
  dtype = jnp.promote_types(a.dtype, b.dtype)
  return plgpu.dot(a.astype(dtype), b.astype(dtype), trans_a=trans_a, trans_b=trans_b, precision=precision)


def split(x, pieces: int) -> list:
  """``x`` as tensor-core operands: itself if 16-bit, else ``pieces`` bfloat16 terms of decreasing size whose
  float32 sum is ``x`` to ``8 * pieces`` bits."""
  if is_half(x):
    return [x]
  x = x.astype(jnp.float32)
  out = []
  for _ in range(pieces):
    part = x.astype(jnp.bfloat16)
    out.append(part)
    x = x - part.astype(jnp.float32)
  return out


def gram_dot(a, b, *, pieces: int, trans_a=False, trans_b=False):
  """``a @ b`` (transposed as asked) on the tensor cores with float32 accumulation: both operands split
  (:func:`split`) and the piece products ``a_i b_j`` with ``i + j < pieces`` summed, smallest first. Two 16-bit
  operands of one dtype are one matmul; a 16-bit operand meeting a float32 one or another 16-bit dtype is
  widened to float32 and split."""
  if is_half(a) and is_half(b) and a.dtype == b.dtype:
    return plgpu.dot(a, b, trans_a=trans_a, trans_b=trans_b, precision=jax.lax.Precision.HIGHEST)
  if is_half(a) != is_half(b) or a.dtype != b.dtype:
    a, b = (x if is_half(x) and x.dtype == jnp.bfloat16 else x.astype(jnp.float32) for x in (a, b))
  xs, ys = split(a, pieces), split(b, pieces)
  pairs = sorted(((i, j) for i in range(len(xs)) for j in range(len(ys)) if i + j < pieces),
                 key=lambda ij: -(ij[0] + ij[1]))
  out = None
  for i, j in pairs:
    part = plgpu.dot(xs[i], ys[j], trans_a=trans_a, trans_b=trans_b, precision=jax.lax.Precision.HIGHEST)
    out = part if out is None else out + part
  return out


def cotangent_operand(g, other):
  """The score cotangent as the matmul against ``other`` takes it: in ``other``'s dtype when that is 16-bit
  (rounded as FlashAttention-2 rounds it), else float32 (split by :func:`gram_dot`)."""
  return g.astype(other.dtype) if is_half(other) else g


def parts(form: metrics.Gram, q, k, pieces: int):
  """The gram tiles of the record's terms: ``[bq, bk]`` matmuls, ``[bq, 1]`` / ``[1, bk]`` row sums."""
  grams = []
  for a, b in form.terms:
    if b == 0:
      grams.append(jnp.sum(power(q, a), axis=1)[:, None])
    elif a == 0:
      grams.append(jnp.sum(power(k, b), axis=1)[None, :])
    else:
      grams.append(gram_dot(power(q, a, keep=True), power(k, b, keep=True), pieces=pieces, trans_b=True))
  return grams


def value(form: metrics.Gram, load_q, load_k, dim: int, shape, pieces: int):
  """The form's value ``[bq, bk]`` (float32) and the gram tiles its VJP needs."""
  grams = parts(form, load_q(0, dim), load_k(0, dim), pieces)
  return jnp.broadcast_to(jnp.asarray(form.fn(*grams)).astype(jnp.float32), shape), grams


def vjp(form: metrics.Gram, load_q, load_k, dim: int, grams, g, *, want_q: bool, want_k: bool, pieces: int):
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
      if b == 0:
        inner = jnp.sum(dg, axis=1)[:, None]
      else:
        kb = power(k, b, keep=True)
        inner = gram_dot(cotangent_operand(dg, kb), kb, pieces=pieces)
      dq = dq + (inner if a == 1 else a * power(q, a - 1) * inner)
    if b > 0 and want_k:
      if a == 0:
        inner = jnp.sum(dg, axis=0)[:, None]
      else:
        qa = power(q, a, keep=True)
        inner = gram_dot(cotangent_operand(dg, qa), qa, pieces=pieces, trans_a=True)
      dk = dk + (inner if b == 1 else b * power(k, b - 1) * inner)
  return [dq], [dk], None
