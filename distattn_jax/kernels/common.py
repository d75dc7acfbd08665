"""Pieces every kernel shares: the result type, the dropout and segment descriptions, masks and the masked softmax.

Canonical kernel shapes (``distattn_jax.attention`` produces them from the public Flax layout):

* ``q [B, T, H, D]``, ``k [B, S, K, D]``, ``v [B, S, K, Dv]`` with ``H`` a multiple of ``K``; query head ``h``
  reads key/value head ``h // (H // K)`` (grouped-query attention; ``K == H`` is plain multi-head);
* ``lam [H]`` in the accumulation dtype; ``bias`` ``None`` or float ``[B|1, H|1, T|1, S|1]``; ``mask`` ``None``
  or bool of the same form, True = attend;
* ``segments`` ``None`` or :class:`Segments` (int32 ids ``[B, T]``/``[B, S]`` and lengths ``[B]``), and
  ``local_window`` ``None`` or a static ``(left, right)`` pair of ints: per-position masks a kernel evaluates
  tile by tile with :func:`position_mask` instead of receiving a dense ``[B, H, T, S]`` mask;
* the result: ``out [B, T, H, Dv]`` in ``v``'s dtype; ``lse [B, H, T]``, the natural log of the softmax
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


class Segments(NamedTuple):
  """Which query may see which key, by position: query ``t`` of batch row ``b`` sees key ``s`` only if
  ``q_ids[b, t] == kv_ids[b, s]``, ``t < q_lengths[b]`` and ``s < kv_lengths[b]``. Each field is None when
  unused; ``q_ids`` and ``kv_ids`` are both set or both None. All int32."""

  q_ids: Array | None = None       # [B, T]
  kv_ids: Array | None = None      # [B, S]
  q_lengths: Array | None = None   # [B]
  kv_lengths: Array | None = None  # [B]


def position_mask(q_pos: Array, kv_pos: Array, *, is_causal: bool = False,
                  local_window: tuple[int, int] | None = None, q_ids: Array | None = None,
                  kv_ids: Array | None = None, q_lengths: Array | None = None,
                  kv_lengths: Array | None = None) -> Array | None:
  """Bool ``[B|1, tq, tk]``, True where query position ``q_pos [tq]`` may see key position ``kv_pos [tk]``:
  causal (``s <= t``), inside the window (``t - left <= s <= t + right``), equal ids (``q_ids [B, tq]``,
  ``kv_ids [B, tk]``, the ids at those positions) and inside the lengths (``[B]``). None when nothing masks."""
  t = q_pos.reshape(1, -1, 1)
  s = kv_pos.reshape(1, 1, -1)
  allowed = None

  def both(m):
    return m if allowed is None else jnp.logical_and(allowed, m)

  if is_causal:
    allowed = both(s <= t)
  if local_window is not None:
    left, right = local_window
    allowed = both(jnp.logical_and(s >= t - left, s <= t + right))
  if q_ids is not None:
    allowed = both(q_ids[:, :, None] == kv_ids[:, None, :])
  if q_lengths is not None:
    allowed = both(t < q_lengths.reshape(-1, 1, 1))
  if kv_lengths is not None:
    allowed = both(s < kv_lengths.reshape(-1, 1, 1))
  return allowed


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
