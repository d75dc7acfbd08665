"""Attention dropout bits: the whole-array draw of the reference kernel and Flax, and the same bits one tile at a
time for kernels that never hold the ``[T, S]`` weights.

``jax.random.bernoulli(rng, keep_prob, shape)`` draws ``shape`` float32 uniforms from a counter-based Threefry
stream where element ``n`` (row-major linear index) depends only on ``(rng, n)`` under JAX's default
``jax_threefry_partitionable`` keys. :func:`tile_multiplier` evaluates that stream at a tile's linear indices,
so a tiled kernel drops exactly the weights the reference drops. Under ``jax_enable_x64`` bernoulli draws
float64 uniforms from 64-bit words, which a tile-wise float32 draw cannot reproduce: :func:`check_rng` refuses
it, and ``implementation="auto"`` then keeps the reference.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from distattn_jax.kernels.common import Dropout

Array = jax.Array


def multiplier(dropout: Dropout, weights_shape: tuple[int, ...], dtype) -> Array:
  """The ``keep / (1 - rate)`` multiplier, drawn exactly as ``flax.linen.dot_product_attention`` draws it (the
  same bits for the same rng, whatever the batch rank, since the draw depends only on the element count)."""
  keep_prob = 1.0 - dropout.rate
  shape = (1,) * (len(weights_shape) - 2) + tuple(weights_shape[-2:]) if dropout.broadcast else weights_shape
  keep = jax.random.bernoulli(dropout.rng, keep_prob, shape)
  return keep.astype(dtype) / jnp.asarray(keep_prob, dtype=dtype)


def mul_u32(a: Array, b: int) -> tuple[Array, Array]:
  """``a * b`` for uint32 ``a`` and a Python int ``b < 2**32``, as (high, low) uint32 words."""
  b_hi, b_lo = np.uint32(b >> 16), np.uint32(b & 0xFFFF)
  a_hi, a_lo = a >> 16, a & 0xFFFF
  lo_lo = a_lo * b_lo
  cross = a_hi * b_lo + ((lo_lo >> 16) & 0xFFFF)  # < 2**32: (2**16-1)^2 + 2**16 - 1
  cross2 = a_lo * b_hi + (cross & 0xFFFF)
  low = (cross2 << 16) | (lo_lo & 0xFFFF)
  high = a_hi * b_hi + (cross >> 16) + (cross2 >> 16)
  return high, low


def keep_mask(rng: Array, keep_prob: float, rows: Array, cols: Array, row_stride: int) -> Array:
  """Keep bits of the elements at linear index ``rows * row_stride + cols`` of the array
  ``jax.random.bernoulli(rng, keep_prob, shape)`` would draw (``rows``, ``cols`` uint32 of equal rank)."""
  high, low = mul_u32(rows, row_stride)
  low2 = low + cols
  high = high + (low2 < low).astype(jnp.uint32)  # carry
  high, low = jnp.broadcast_arrays(high, low2)
  k1, k2 = jax.random.key_data(rng) if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key) else rng
  n = high.size
  out = jax.extend.random.threefry_2x32((k1, k2), jnp.concatenate([high.ravel(), low.ravel()]))
  bits = (out[:n] ^ out[n:]).reshape(high.shape)
  # jax.random.uniform's float32 construction: 23 random mantissa bits in [1, 2), minus 1.
  floats = jax.lax.bitcast_convert_type((bits >> 9) | np.uint32(0x3F800000), jnp.float32) - 1.0
  return floats < jnp.float32(keep_prob)


def tile_draw_problem(rng: Any) -> str | None:
  """Why :func:`tile_multiplier` cannot reproduce ``jax.random.bernoulli`` for this key, or None if it can."""
  impl = jax.random.key_impl(rng) if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key) else None
  threefry = (impl is None and rng.shape[-1:] == (2,)) or (impl is not None and "threefry" in str(impl))
  if not threefry or not jax.config.jax_threefry_partitionable:
    return (f"tile-wise dropout needs a threefry dropout_rng with jax_threefry_partitionable=True (got key "
            f"implementation {impl}); use implementation='reference'")
  if jax.config.jax_enable_x64:
    return ("tile-wise dropout cannot reproduce jax.random.bernoulli under jax_enable_x64 (it draws float64 "
            "uniforms from 64-bit words); use implementation='reference'")
  return None


def check_rng(rng: Any) -> None:
  """Raises ValueError unless the tile-wise draw reproduces ``jax.random.bernoulli`` for this key."""
  problem = tile_draw_problem(rng)
  if problem is not None:
    raise ValueError(problem)


def tile_multiplier(dropout: Dropout, *, batch: int, num_kv: int, group: int, q_len: int, kv_len: int,
                    q_start, block_q: int, k_start, block_k: int) -> Array:
  """``keep / keep_prob`` (float32) of the tile ``[batch|1, kv_heads|1, block_q, group|1, block_k]`` at
  ``(q_start, k_start)`` of the ``[B, H, T, S]`` weights (``[T, S]`` with ``dropout.broadcast``), query head
  ``h = kv_head * group + g``. Padded positions (``t >= q_len``, ``s >= kv_len``) get arbitrary bits."""
  keep_prob = 1.0 - dropout.rate
  t = (jnp.asarray(q_start, jnp.uint32) + jnp.arange(block_q, dtype=jnp.uint32)).reshape(1, 1, block_q, 1, 1)
  s = (jnp.asarray(k_start, jnp.uint32) + jnp.arange(block_k, dtype=jnp.uint32)).reshape(1, 1, 1, 1, block_k)
  if dropout.broadcast:
    rows = t
  else:
    heads = num_kv * group
    b = jnp.arange(batch, dtype=jnp.uint32).reshape(batch, 1, 1, 1, 1)
    h = (jnp.arange(num_kv, dtype=jnp.uint32).reshape(num_kv, 1) * group
         + jnp.arange(group, dtype=jnp.uint32).reshape(1, group)).reshape(1, num_kv, 1, group, 1)
    rows = (b * heads + h) * np.uint32(q_len) + t
  keep = keep_mask(dropout.rng, keep_prob, rows, s, kv_len)
  return keep.astype(jnp.float32) / jnp.float32(keep_prob)
