"""The pure functions of a distance attention module, shared by the Linen module (:mod:`distattn_jax.layers`)
and the NNX module (:mod:`distattn_jax.nnx`): configuration checks, the initial lam, lam and p from their
log-parameters (a weighted metric's feature weights likewise), Flax's input defaults, rotary positions, the KV
cache update, and the call into :func:`distattn_jax.attention.distance_attention`. They are all a module does
besides holding parameters; the two modules are parameter containers around them."""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from distattn_jax import attention, initializers, metrics

Array = jax.Array


def apply_rotary(x: Array, positions: Array, base: float) -> Array:
  """Rotary position embedding of ``x [batch..., length, heads, head_dim]`` at integer ``positions [length]``.

  Feature pairs ``(x_i, x_{i + D/2})`` turn by the angle ``position * base^(-2i/D)`` (the half-split
  layout), computed in float32. Rotations preserve norms, so for the rotation-invariant metrics (dot, l2,
  sqeuclidean, cosine) the logit between positions ``m`` and ``n`` depends only on ``m - n``; l1, chebyshev and
  lp see rotated coordinates and so get a position-dependent, not purely relative, signal.
  """
  positions = jnp.asarray(positions)
  if x.ndim < 3 or positions.shape != (x.shape[-3],):
    raise ValueError(f"apply_rotary: positions must have shape (length,) = ({x.shape[-3] if x.ndim >= 3 else '?'},) "
                     f"for x of shape {x.shape} [batch..., length, heads, head_dim]; got shape {positions.shape}")
  half = x.shape[-1] // 2
  freqs = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angles = positions.astype(jnp.float32)[:, None] * freqs[None, :]  # [length, half]
  angles = angles.reshape((1,) * (x.ndim - 3) + (x.shape[-3], 1, half))
  cos, sin = jnp.cos(angles), jnp.sin(angles)
  x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


class KVCache(NamedTuple):
  """A decoding cache: keys and values ``[batch..., max_length, kv_heads, head_dim]`` and the filled count."""
  key: Array
  value: Array
  index: Array


def check_config(name: str, *, num_heads: Any, num_kv_heads: Any, qkv_features: int, metric: Any, p: float,
                 learnable_p: bool, lambda_init: Any, dropout_rate: float,
                 rotary_base: float | None, tied_qk: bool = False) -> tuple[str, int]:
  """The checks of a distance attention module's configuration (Linen and NNX share them); returns (metric
  name, kv heads). Messages start with the module's ``name``."""
  if not isinstance(num_heads, int) or num_heads < 1:
    raise ValueError(f"{name}: num_heads must be a positive int; got {num_heads!r}")
  if qkv_features % num_heads:
    raise ValueError(f"{name}: qkv_features ({qkv_features}) must be divisible by num_heads ({num_heads})")
  kv_heads = num_heads if num_kv_heads is None else num_kv_heads
  if not isinstance(kv_heads, int) or kv_heads < 1 or num_heads % kv_heads:
    raise ValueError(f"{name}: num_kv_heads must be a positive divisor of num_heads ({num_heads}); "
                     f"got {num_kv_heads!r}")
  if tied_qk and kv_heads != num_heads:
    # One projection makes the queries and the keys, so they have the same heads.
    raise ValueError(f"{name}: tied_qk=True shares the query projection with the keys, so num_kv_heads must be "
                     f"None or num_heads ({num_heads}); got {num_kv_heads!r}")
  metric = metrics.canonical_name(metric)
  metrics.check_p(p)
  if learnable_p and not metrics.get(metric).parametric:
    raise ValueError(f"{name}: learnable_p=True needs a metric with an order p (such as 'lp'); got "
                     f"metric={metric!r}")
  if learnable_p and math.isinf(p):
    raise ValueError(f"{name}: learnable_p=True needs a finite initial p; got p={p}")
  if lambda_init is not None and not (isinstance(lambda_init, (int, float)) and 0 < lambda_init < math.inf):
    raise ValueError(f"{name}: lambda_init must be None or a positive finite number; got {lambda_init!r}")
  if not 0.0 <= dropout_rate < 1.0:
    raise ValueError(f"{name}: dropout_rate must be in [0, 1); got {dropout_rate!r}")
  if rotary_base is not None:
    if not rotary_base > 1:
      raise ValueError(f"{name}: rotary_base must be None or > 1; got {rotary_base!r}")
    if (qkv_features // num_heads) % 2:
      raise ValueError(f"{name}: rotary positions need an even head dimension; got {qkv_features // num_heads}")
  return metric, kv_heads


def initial_lambda(metric: str, head_dim: int, p: float, lambda_init: float | None) -> float:
  """``lambda_init``, or the calibrated default of ``metric`` at ``head_dim`` when it is None."""
  if lambda_init is None:
    return initializers.default_lambda(metric, head_dim, float(p))
  return float(lambda_init)


def lam_and_p(log_lambda: Array | None, lam_init: float, log_p: Array | None,
              p: float) -> tuple[Array | float, Array | float]:
  """The current lam and p: ``exp`` of their log-parameters when learned (None when not), else the fixed values."""
  lam = float(lam_init) if log_lambda is None else jnp.exp(log_lambda)
  return lam, (float(p) if log_p is None else jnp.exp(log_p))


def metric_weights_shape(metric: str, num_kv_heads: int, head_dim: int) -> tuple[int, int] | None:
  """The shape of a module's ``log_metric_weights`` parameter: ``(num_kv_heads, head_dim)`` for a weighted
  metric (one weight vector per key/value head, shared by the query heads of its group, so grouped-query
  attention keeps its smaller keys and values; ``num_kv_heads == num_heads`` without grouping), None for an
  unweighted one (no parameter). Initialised to 0: ``w = exp(0) = 1``, the unweighted metric."""
  return (num_kv_heads, head_dim) if metrics.get(metric).weighted else None


def metric_weights(log_metric_weights: Array | None) -> Array | None:
  """The current feature weights of a weighted metric: ``exp`` of their log-parameter (None when there is none,
  which ``distance_attention`` reads as all ones)."""
  return None if log_metric_weights is None else jnp.exp(log_metric_weights)


def resolve_inputs(name: str, inputs_q: Array, inputs_k: Array | None,
                   inputs_v: Array | None) -> tuple[Array, Array, Array]:
  """Flax's defaults: keys from the queries' inputs, values from the keys'."""
  if inputs_k is None:
    if inputs_v is not None:
      raise ValueError(f"{name}: inputs_v was given without inputs_k")
    inputs_k = inputs_q
  return inputs_q, inputs_k, inputs_k if inputs_v is None else inputs_v


def check_tied_inputs(name: str, inputs_q: Array, inputs_k: Array) -> None:
  """With ``tied_qk=True`` the query projection also projects ``inputs_k`` (cross-attention included), so both
  need its input features; raises a ValueError naming them otherwise (rather than an XLA shape error)."""
  if inputs_k.shape[-1] != inputs_q.shape[-1]:
    raise ValueError(f"{name}: tied_qk=True projects inputs_k with the query projection, which takes "
                     f"{inputs_q.shape[-1]} features (inputs_q's); inputs_k has {inputs_k.shape[-1]}")


def rotate_query_key(name: str, query: Array, key: Array, positions: Array | None, key_positions: Array | None,
                     base: float, offset: Any = 0) -> tuple[Array, Array]:
  """Rotary positions for a call: queries at ``positions`` (default ``offset + arange``), keys at
  ``key_positions`` (default: the queries' given positions in self-attention, else ``offset + arange``)."""
  q_len, kv_len = query.shape[-3], key.shape[-3]
  if key_positions is None:
    if positions is not None and kv_len != q_len:
      raise ValueError(f"{name}: positions (for {q_len} queries) cannot rotate {kv_len} keys; "
                       "pass key_positions [kv_length] as well (or neither, for arange positions)")
    key_positions = offset + jnp.arange(kv_len) if positions is None else positions
  if positions is None:
    positions = offset + jnp.arange(q_len)
  return apply_rotary(query, positions, base), apply_rotary(key, key_positions, base)


def update_cache(name: str, cache: KVCache, query: Array, key: Array, value: Array,
                 mask: Array | None) -> tuple[Array, Array, Array, KVCache]:
  """Writes a chunk of new keys/values at the cache index; returns (all keys, all values, the mask that lets
  chunk position ``i`` see every cached position up to its own, the new cache)."""
  *batch_dims, max_length, _, _ = cache.key.shape
  chunk = query.shape[-3]
  if tuple(query.shape[:-3]) != tuple(batch_dims) or key.shape[-3] != chunk or chunk > max_length:
    raise ValueError(f"{name}: decoding expects inputs of shape {tuple(batch_dims)} + "
                     f"(chunk <= {max_length}, features); got query shape {query.shape}")
  index = cache.index
  check = functools.partial(_check_cache_room, name=name, chunk=chunk, max_length=max_length)
  if isinstance(index, jax.core.Tracer):
    jax.debug.callback(check, index)
  else:
    check(index)
  start = (0,) * len(batch_dims) + (index, 0, 0)
  key = jax.lax.dynamic_update_slice(cache.key, key.astype(cache.key.dtype), start)
  value = jax.lax.dynamic_update_slice(cache.value, value.astype(cache.value.dtype), start)
  visible = jnp.arange(max_length)[None, :] <= index + jnp.arange(chunk)[:, None]
  visible = jnp.broadcast_to(visible, tuple(batch_dims) + (1, chunk, max_length))
  mask = visible if mask is None else jnp.logical_and(jnp.asarray(mask) != 0, visible)
  return key, value, mask, KVCache(key, value, index + chunk)


def attend(name: str, query: Array, key: Array, value: Array, *, cache: KVCache | None = None,
           mask: Array | None = None, metric: str, lam: Array | float, p: Array | float,
           metric_weights: Array | None = None, is_causal: bool = False,
           rotary_base: float | None = None, positions: Array | None = None, key_positions: Array | None = None,
           q_segment_ids: Array | None = None, kv_segment_ids: Array | None = None,
           query_seq_lengths: Array | None = None, key_value_seq_lengths: Array | None = None,
           local_window_size: Any = None, **attention_kwargs: Any) -> tuple[Array, KVCache | None]:
  """Everything a distance attention module does between its projections: rotary positions, the cache update
  (when ``cache`` is given) and :func:`distance_attention`. Returns the heads' outputs
  ``[batch..., q_length, heads, head_dim]`` and the updated cache (None when none was given).
  ``attention_kwargs`` (dropout, dtype, precision, implementation, module) go to ``distance_attention``."""
  if rotary_base is not None:
    offset = 0 if cache is None else cache.index
    query, key = rotate_query_key(name, query, key, positions, key_positions, rotary_base, offset)
  position_args = dict(q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
                       query_seq_lengths=query_seq_lengths, key_value_seq_lengths=key_value_seq_lengths,
                       local_window_size=local_window_size)
  if cache is not None:
    given = sorted(arg for arg, v in position_args.items() if v is not None)
    if given:
      raise ValueError(f"{name}: {', '.join(given)} index the call's own positions and "
                       "cannot be used in a decode step (pass mask= over the cache instead)")
    key, value, mask, cache = update_cache(name, cache, query, key, value, mask)
    is_causal = False  # the cache mask already hides the future
  x = attention.distance_attention(query, key, value, mask=mask, metric=metric, lam=lam, p=p,
                                   metric_weights=metric_weights, is_causal=is_causal, **position_args,
                                   **attention_kwargs)
  return x, cache


def _check_cache_room(index, *, name: str, chunk: int, max_length: int) -> None:
  """Raises unless ``chunk`` positions written at ``index`` fit a cache of ``max_length`` (``dynamic_update_slice``
  would clamp the start and silently overwrite the newest entries)."""
  index = int(index)
  if index + chunk > max_length:
    raise ValueError(f"{name}: the KV cache holds {max_length} positions and {index} are filled; "
                     f"{chunk} more do not fit (size the cache for every position by the length given to init)")
