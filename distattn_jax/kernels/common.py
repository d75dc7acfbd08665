"""Pieces every kernel shares: the result type, the dropout and segment descriptions, the mask rule, and the
hiding of positions no query or key can see. The softmax numerics live in :mod:`distattn_jax.kernels.tiles`.

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


def allowed_pairs(t: Array, s: Array, *, is_causal: bool = False, local_window: tuple[int, int] | None = None,
                  q_ids: Array | None = None, kv_ids: Array | None = None, q_lengths: Array | None = None,
                  kv_lengths: Array | None = None, kv_len: int | None = None) -> Array | None:
  """The mask rule every kernel evaluates, on operands already shaped to broadcast against each other: query
  positions ``t``, key positions ``s``, the ids at those positions and the lengths. True where query ``t`` may
  see key ``s``: causal (``s <= t``), inside the window (``t - left <= s <= t + right``), equal ids, inside the
  lengths, and (``kv_len``) not a padded key. None when nothing masks. Plain ``jnp`` comparisons, so the same
  function runs in the reference, the blockwise tiles and inside the fused Pallas kernels."""
  allowed = None

  def both(m):
    return m if allowed is None else jnp.logical_and(allowed, m)

  if kv_len is not None:
    allowed = both(s < kv_len)
  if is_causal:
    allowed = both(s <= t)
  if local_window is not None:
    left, right = local_window
    allowed = both(jnp.logical_and(s >= t - left, s <= t + right))
  if q_ids is not None:
    allowed = both(q_ids == kv_ids)
  if q_lengths is not None:
    allowed = both(t < q_lengths)
  if kv_lengths is not None:
    allowed = both(s < kv_lengths)
  return allowed


def position_mask(q_pos: Array, kv_pos: Array, *, is_causal: bool = False,
                  local_window: tuple[int, int] | None = None, q_ids: Array | None = None,
                  kv_ids: Array | None = None, q_lengths: Array | None = None,
                  kv_lengths: Array | None = None) -> Array | None:
  """Bool ``[B|1, tq, tk]``, :func:`allowed_pairs` for query positions ``q_pos [tq]`` and key positions
  ``kv_pos [tk]``, with ``q_ids [B, tq]``, ``kv_ids [B, tk]`` (the ids at those positions) and lengths ``[B]``.
  None when nothing masks."""
  return allowed_pairs(
      q_pos.reshape(1, -1, 1), kv_pos.reshape(1, 1, -1), is_causal=is_causal, local_window=local_window,
      q_ids=None if q_ids is None else q_ids[:, :, None], kv_ids=None if kv_ids is None else kv_ids[:, None, :],
      q_lengths=None if q_lengths is None else q_lengths.reshape(-1, 1, 1),
      kv_lengths=None if kv_lengths is None else kv_lengths.reshape(-1, 1, 1))


# ------------------------------------------------------------------------------------------------------------
# Hidden positions: a key no query may attend to (and a query that may attend to no key) is replaced by zeros
# before any kernel sees it, so that its value -- finite, huge, inf or NaN -- can reach no output and no
# gradient: not through ``0 * value`` in ``weights @ v`` or in a score's VJP, and not through the mean over the
# keys that translation-invariant gram forms centre on. The rule is evaluated once, here, for every kernel.

# Elements of one boolean [B, H, T, block] slab of the generic pass below: small against any attention call
# that needs it (the pass runs only with segment ids or a dense mask), and large enough to keep the loop short.
_VISIBILITY_SLAB = 1 << 22


class Visibility(NamedTuple):
  """Which positions take part: ``query_sees [B|1, T, H|1]`` (query ``t`` of head ``h`` may attend to at least
  one key) and ``key_seen [B|1, S, K|1]`` (at least one query of kv head ``k``'s group may attend to key
  ``s``), bool in the kernel layout; either is None when it is True everywhere."""

  query_sees: Array | None
  key_seen: Array | None


def visibility(q_len: int, kv_len: int, num_heads: int, num_kv_heads: int, *, mask: Array | None,
               segments: Segments | None, is_causal: bool, local_window: tuple[int, int] | None) -> Visibility:
  """The :class:`Visibility` of one call: the same rule as :func:`position_mask` and ``mask`` combined, reduced
  over the other side. Closed forms for positions and lengths (``O(T + S)``); with segment ids or a dense mask a
  pass over key blocks that never holds more than ``_VISIBILITY_SLAB`` booleans."""
  segments = segments or Segments()
  left = None if local_window is None else local_window[0]
  right = None if local_window is None else local_window[1]
  if is_causal:
    right = 0 if right is None else min(right, 0)
  if mask is None and segments.q_ids is None:
    return _positional_visibility(q_len, kv_len, segments, left, right)
  return _generic_visibility(q_len, kv_len, num_heads, num_kv_heads, mask, segments, is_causal, local_window)


def _positional_visibility(q_len, kv_len, segments: Segments, left, right) -> Visibility:
  """Query ``t`` sees a key iff ``t < q_length``, ``kv_length >= 1`` and ``t - left <= kv_length - 1``; key
  ``s`` is seen iff ``s < kv_length``, ``q_length >= 1`` and ``s - right <= q_length - 1`` (the window's
  other bound, ``t + right >= 0`` and ``s + left >= 0``, always holds for ``right, left >= 0``)."""
  q_lengths, kv_lengths = segments.q_lengths, segments.kv_lengths
  # Statically: nothing can be hidden without lengths when every query reaches key 0 and key S-1 is in reach.
  query_static = left is None or q_len - 1 - left <= kv_len - 1
  key_static = right is None or kv_len - 1 - right <= q_len - 1
  query_sees = key_seen = None
  if q_lengths is not None or kv_lengths is not None or not query_static:
    t = jnp.arange(q_len).reshape(1, q_len)
    n_kv = jnp.full((1, 1), kv_len) if kv_lengths is None else kv_lengths.reshape(-1, 1)
    query_sees = n_kv >= 1
    if q_lengths is not None:
      query_sees = jnp.logical_and(query_sees, t < q_lengths.reshape(-1, 1))
    if left is not None:
      query_sees = jnp.logical_and(query_sees, t - left <= n_kv - 1)
    query_sees = jnp.broadcast_to(query_sees, (query_sees.shape[0], q_len))[..., None]
  if q_lengths is not None or kv_lengths is not None or not key_static:
    s = jnp.arange(kv_len).reshape(1, kv_len)
    n_q = jnp.full((1, 1), q_len) if q_lengths is None else q_lengths.reshape(-1, 1)
    key_seen = n_q >= 1
    if kv_lengths is not None:
      key_seen = jnp.logical_and(key_seen, s < kv_lengths.reshape(-1, 1))
    if right is not None:
      key_seen = jnp.logical_and(key_seen, s - right <= n_q - 1)
    key_seen = jnp.broadcast_to(key_seen, (key_seen.shape[0], kv_len))[..., None]
  return Visibility(query_sees, key_seen)


def _generic_visibility(q_len, kv_len, num_heads, num_kv_heads, mask, segments: Segments, is_causal,
                        local_window) -> Visibility:
  batch = 1
  for a in (segments.q_ids, segments.kv_ids, segments.q_lengths, segments.kv_lengths):
    if a is not None:
      batch = max(batch, a.shape[0])
  heads = 1
  if mask is not None:
    batch, heads = max(batch, mask.shape[0]), mask.shape[1]
  block = max(1, min(kv_len, _VISIBILITY_SLAB // max(1, batch * heads * q_len)))
  num_blocks = -(-kv_len // block)
  padded = num_blocks * block
  kv_ids = segments.kv_ids
  if kv_ids is not None and padded != kv_len:
    kv_ids = jnp.pad(kv_ids, ((0, 0), (0, padded - kv_len)))
  if mask is not None and mask.shape[3] != 1 and padded != kv_len:
    mask = jnp.pad(mask, ((0, 0), (0, 0), (0, 0), (0, padded - kv_len)))

  def key_block(sees, j):
    start = j * block
    k_pos = start + jnp.arange(block)
    allowed = position_mask(
        jnp.arange(q_len), k_pos, is_causal=is_causal, local_window=local_window, q_ids=segments.q_ids,
        kv_ids=None if kv_ids is None else jax.lax.dynamic_slice_in_dim(kv_ids, start, block, 1),
        q_lengths=segments.q_lengths, kv_lengths=segments.kv_lengths)
    in_range = (k_pos < kv_len).reshape(1, 1, 1, block)
    allowed = in_range if allowed is None else jnp.logical_and(in_range, allowed[:, None])  # [B|1, 1, T, bk]
    if mask is not None:
      mask_blk = mask if mask.shape[3] == 1 else jax.lax.dynamic_slice_in_dim(mask, start, block, 3)
      allowed = jnp.logical_and(allowed, mask_blk)
    allowed = jnp.broadcast_to(allowed, (batch, heads, q_len, block))
    return jnp.logical_or(sees, jnp.any(allowed, axis=3)), jnp.any(allowed, axis=2)  # [B, H', T], [B, H', bk]

  sees, seen = jax.lax.scan(key_block, jnp.zeros((batch, heads, q_len), bool), jnp.arange(num_blocks))
  seen = jnp.moveaxis(seen, 0, 2).reshape(batch, heads, padded)[:, :, :kv_len]  # [B, H', S]
  if heads > 1:  # a kv head's key is seen when any query head of its group sees it
    seen = jnp.any(seen.reshape(batch, num_kv_heads, heads // num_kv_heads, kv_len), axis=2)
  return Visibility(sees.transpose(0, 2, 1), seen.transpose(0, 2, 1))


def hide_unseen(q: Array, k: Array, v: Array, seen: Visibility) -> tuple[Array, Array, Array]:
  """``q``, ``k`` and ``v`` with the positions ``seen`` rules out replaced by zeros (their gradient is then 0)."""
  def keep(x, where):
    return x if where is None else jnp.where(where[..., None], x, jnp.zeros((), x.dtype))
  return keep(q, seen.query_sees), keep(k, seen.key_seen), keep(v, seen.key_seen)
