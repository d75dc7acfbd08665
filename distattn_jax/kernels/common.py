"""Pieces every kernel shares: the result type, the dropout description, masks and the masked softmax.

Canonical kernel shapes (``distattn_jax.attention`` produces them from the public Flax layout):

* ``q [B, T, H, D]``, ``k [B, S, K, D]``, ``v [B, S, K, Dv]`` with ``H`` a multiple of ``K``; query head ``h``
  reads key/value head ``h // (H // K)`` (grouped-query attention; ``K == H`` is plain multi-head);
* ``lam [H]`` in the accumulation dtype; ``bias`` ``None`` or float ``[B|1, H|1, T|1, S|1]``; ``mask`` ``None``
  or bool of the same form, True = attend;
* the result: ``out [B, T, H, Dv]`` in ``q``'s dtype; ``lse [B, H, T]``, the natural log of the softmax
  normaliser (``-inf`` on a fully masked row), so partial results over key shards can be merged; and
  ``weights [B, H, T, S]`` when asked for. ``lse`` and ``weights`` are in the accumulation dtype (float32, or
  float64 for float64 inputs).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array


class AttentionResult(NamedTuple):
  out: Array
  lse: Array
  weights: Array | None = None


class Dropout(NamedTuple):
  """Attention dropout as Flax applies it: after the softmax, keep each weight with probability ``1 - rate``
  and rescale by ``1 / (1 - rate)``; ``broadcast`` shares one ``[T, S]`` pattern across batch and heads."""

  rate: float
  rng: Array
  broadcast: bool = True


def causal_mask(q_len: int, kv_len: int) -> Array:
  """``[T, S]`` bool, True where key ``j <= i`` (aligned at the first position, as ``jax.nn.dot_product_attention``)."""
  return jnp.arange(q_len)[:, None] >= jnp.arange(kv_len)[None, :]


def combine_masks(mask: Array | None, is_causal: bool, q_len: int, kv_len: int) -> Array | None:
  if is_causal:
    causal = causal_mask(q_len, kv_len)
    return causal if mask is None else jnp.logical_and(mask, causal)
  return mask


def masked_softmax(logits: Array, mask: Array | None) -> tuple[Array, Array]:
  """Softmax over the last axis with masked entries excluded; returns ``(weights, lse)``.

  A row with no unmasked entry gets weights 0 and ``lse = -inf`` (not NaN), with zero gradients: the mask is
  applied to the logits before ``exp``, so no masked entry ever produces an ``inf`` to multiply by 0. NaN
  logits propagate.
  """
  if mask is not None:
    logits = jnp.where(mask, logits, -jnp.inf)
  row_max = jnp.max(logits, axis=-1, keepdims=True)
  # The softmax does not depend on the shift, so stop_gradient is exact and avoids routing gradient to ties.
  row_max = jax.lax.stop_gradient(jnp.where(jnp.isneginf(row_max), 0.0, row_max))
  e = jnp.exp(logits - row_max)
  denom = jnp.sum(e, axis=-1, keepdims=True)
  has_any = denom > 0
  safe_denom = jnp.where(has_any, denom, 1.0)
  weights = e / safe_denom
  lse = jnp.where(has_any, row_max + jnp.log(safe_denom), -jnp.inf)[..., 0]
  return weights, lse


def dropout_multiplier(dropout: Dropout, weights_shape: tuple[int, ...], dtype) -> Array:
  """The ``keep / (1 - rate)`` multiplier, drawn exactly as ``flax.linen.dot_product_attention`` draws it (the
  same bits for the same rng, whatever the batch rank, since the draw depends only on the element count)."""
  keep_prob = 1.0 - dropout.rate
  shape = (1,) * (len(weights_shape) - 2) + tuple(weights_shape[-2:]) if dropout.broadcast else weights_shape
  keep = jax.random.bernoulli(dropout.rng, keep_prob, shape)
  return keep.astype(dtype) / jnp.asarray(keep_prob, dtype=dtype)
