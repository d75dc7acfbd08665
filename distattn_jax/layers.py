"""Flax Linen modules: thin shells over :func:`distattn_jax.attention.distance_attention`.

The pure functions here (configuration checks, lam and p from their log-parameters, rotary positions, the KV
cache update, the call into ``distance_attention``) are all a module does besides holding parameters; the Linen
module below and the NNX module in :mod:`distattn_jax.nnx` are two parameter containers around them."""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.linear import DenseGeneral, default_kernel_init

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
                 rotary_base: float | None) -> tuple[str, int]:
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


def resolve_inputs(name: str, inputs_q: Array, inputs_k: Array | None,
                   inputs_v: Array | None) -> tuple[Array, Array, Array]:
  """Flax's defaults: keys from the queries' inputs, values from the keys'."""
  if inputs_k is None:
    if inputs_v is not None:
      raise ValueError(f"{name}: inputs_v was given without inputs_k")
    inputs_k = inputs_q
  return inputs_q, inputs_k, inputs_k if inputs_v is None else inputs_v


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
           mask: Array | None = None, metric: str, lam: Array | float, p: Array | float, is_causal: bool = False,
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
                                   is_causal=is_causal, **position_args, **attention_kwargs)
  return x, cache


class DistanceBasedAttention(nn.Module):
  """Multi-head distance attention with the interface of ``flax.linen.MultiHeadDotProductAttention``.

  Projections, parameter names (``query``, ``key``, ``value``, ``out``) and the call signature are Flax's, so a
  model swaps ``nn.MultiHeadDotProductAttention(num_heads=8)`` for ``DistanceBasedAttention(num_heads=8,
  metric="l1")``. The logits are ``-lam_h * distance(q, k) / sqrt(head_dim)``; with ``metric="dot"`` and
  ``lam = 1`` the module computes exactly what Flax's does. (A PyTorch-style ``DistanceBasedAttention(
  hidden_size, num_heads, distance_type, lambda_param)`` maps to ``qkv_features``, ``num_heads``, ``metric``
  (a ``DistanceType`` or its name) and ``lambda_init``.)

  Attributes beyond Flax's:
    metric: a name in ``metrics.available()`` (shipped or registered) or a ``DistanceType``.
    lambda_init: the initial lam of every head. None picks ``initializers.default_lambda(metric, head_dim, p)``, the
      lam at which, for unit-variance queries and keys, the logits spread across keys as much as dot-product
      attention's logits do (std over keys ~= 1), so swapping the metric keeps the softmax's initial sharpness.
      Derivation, for ``q, k ~ N(0, I_D)`` and a fixed query: the dot logit ``q.k / sqrt(D)`` has variance
      ``|q|^2 / D ~= 1`` over keys. For a distance the variance over keys of ``d(q, k) / sqrt(D)`` is
      ``Var_k[d] / D``, so lam = ``sqrt(D / E_q Var_k[d(q, k)])``. Closed forms where they exist:
      sqeuclidean ``1/sqrt(6) = 0.408`` (``Var_k |q - k|^2 = sum_d (2 + 4 q_d^2)``, mean ``6D``); cosine ``D``
      (``q^.k^`` has variance ``1/D`` over the sphere); l2 ``~= 2 sqrt(D/3)`` (delta method on the sqrt of the
      sqeuclidean); l1 ``1/sqrt(2 - E_q m(q)^2) = 1.332`` with ``m(q) = E_k |q - k| = q(2 Phi(q) - 1) +
      2 phi(q)``. Chebyshev and general lp have none, so every value is measured the same way, on fixed
      samples by ``initializers.logit_spread`` (``initializers.default_lambda_table()`` prints this table; the
      tests check it against the closed forms):

      ====  =====  =====  ===========  =======  ======  =========  ===
      D     l1     l2     sqeuclidean  lp, p=3  cosine  chebyshev  dot
      ====  =====  =====  ===========  =======  ======  =========  ===
      16    1.345  4.695  0.4096       6.267    16.20   6.405      1
      32    1.339  6.579  0.4093       9.684    32.11   9.504      1
      64    1.333  9.253  0.4085       15.18    63.92   14.31      1
      128   1.342  13.16  0.4096       24.10    128.8   21.39      1
      ====  =====  =====  ===========  =======  ======  =========  ===

    learnable_lambda: learn one lam per head, stored as ``params['log_lambda']`` so it stays positive. False
      keeps lam fixed at its initial value.
    p: the order of a metric that has one (``metric="lp"``, or a user's parametric record).
    learnable_p: learn ``p`` (a metric with an order only), stored as ``params['log_p']`` so it stays positive.
    num_kv_heads: key/value heads for grouped-query attention (default: ``num_heads``).
    implementation: kernel name passed to ``distance_attention`` (None = automatic).
    rotary_base: rotate queries and keys by their positions (:func:`apply_rotary`) with this base; None = off.
      Query positions are ``arange(q_length)`` (offset by the cache index while decoding) unless the call passes
      ``positions``; key positions are the keys' own, ``arange(kv_length)`` (offset likewise), unless it passes
      ``key_positions``. Passing ``positions`` alone applies them to the keys too, which needs
      ``kv_length == q_length`` (self-attention); otherwise it is a ValueError asking for ``key_positions``.

  ``decode=True`` keeps a KV cache in the ``cache`` collection exactly as Flax does, generalised to chunks: a
  call with ``L`` new positions writes them at the cache index and lets position ``i`` of the chunk attend to
  every cached position up to its own. Writing past the cache's end is an error, never an overwrite: a
  ValueError at trace time when the index is concrete, else (the index is traced under jit, as in a decoding
  loop) a host callback that raises when the step runs, so the jitted call fails with a ``JaxRuntimeError``
  carrying the same message. ``sow_weights=True`` stores the attention weights in ``intermediates``.
  """

  num_heads: int
  metric: str | metrics.DistanceType = "l1"
  lambda_init: float | None = None
  learnable_lambda: bool = True
  p: float = 2.0
  learnable_p: bool = False
  num_kv_heads: int | None = None
  implementation: str | None = None
  rotary_base: float | None = None
  dtype: Any = None
  param_dtype: Any = jnp.float32
  qkv_features: int | None = None
  out_features: int | None = None
  broadcast_dropout: bool = True
  dropout_rate: float = 0.0
  deterministic: bool | None = None
  precision: Any = None
  kernel_init: Callable = default_kernel_init
  out_kernel_init: Callable | None = None
  bias_init: Callable = nn.initializers.zeros_init()
  out_bias_init: Callable | None = None
  use_bias: bool = True
  decode: bool = False
  normalize_qk: bool = False

  def _lam_and_p(self, metric: str, head_dim: int) -> tuple[Array | float, Array | float]:
    """The current lam (``[num_heads]`` or a float) and p, from their parameters when they are learned."""
    lam_init = initial_lambda(metric, head_dim, self.p, self.lambda_init)
    log_lam = log_p = None
    if self.learnable_lambda:
      log_lam = self.param("log_lambda", nn.initializers.constant(math.log(lam_init)), (self.num_heads,),
                           self.param_dtype)
    if self.learnable_p:
      log_p = self.param("log_p", nn.initializers.constant(math.log(self.p)), (), self.param_dtype)
    return lam_and_p(log_lam, lam_init, log_p, self.p)

  @nn.compact
  def __call__(self, inputs_q: Array, inputs_k: Array | None = None, inputs_v: Array | None = None, *,
               inputs_kv: Array | None = None, mask: Array | None = None, deterministic: bool | None = None,
               dropout_rng: Array | None = None, sow_weights: bool = False, is_causal: bool = False,
               positions: Array | None = None, key_positions: Array | None = None,
               q_segment_ids: Array | None = None, kv_segment_ids: Array | None = None,
               query_seq_lengths: Array | None = None, key_value_seq_lengths: Array | None = None,
               local_window_size: Any = None) -> Array:
    """Like ``nn.MultiHeadDotProductAttention.__call__``; ``is_causal`` adds a causal mask that kernels can use
    to skip blocks (ignored while decoding, where the cache index already masks the future); ``positions``
    ``[q_length]`` and ``key_positions`` ``[kv_length]`` are the positions ``rotary_base`` rotates by (see the
    class docstring for their defaults). The segment ids, sequence lengths and ``local_window_size`` go to
    ``distance_attention`` unchanged (padding and packing without a dense mask); they index the call's own
    positions, so a decode step (which attends to the cache) refuses them."""
    name = type(self).__name__
    if inputs_kv is not None:
      if inputs_k is not None or inputs_v is not None:
        raise ValueError(f"{name}: pass inputs_kv or inputs_k/inputs_v, not both")
      inputs_k = inputs_v = inputs_kv
    inputs_q, inputs_k, inputs_v = resolve_inputs(name, inputs_q, inputs_k, inputs_v)

    qkv_features = self.qkv_features or inputs_q.shape[-1]
    metric, num_kv_heads = check_config(
        name, num_heads=self.num_heads, num_kv_heads=self.num_kv_heads, qkv_features=qkv_features,
        metric=self.metric, p=self.p, learnable_p=self.learnable_p, lambda_init=self.lambda_init,
        dropout_rate=self.dropout_rate, rotary_base=self.rotary_base)
    head_dim = qkv_features // self.num_heads
    dense = functools.partial(DenseGeneral, axis=-1, dtype=self.dtype, param_dtype=self.param_dtype,
                              kernel_init=self.kernel_init, bias_init=self.bias_init, use_bias=self.use_bias,
                              precision=self.precision)
    query = dense(features=(self.num_heads, head_dim), name="query")(inputs_q)
    key = dense(features=(num_kv_heads, head_dim), name="key")(inputs_k)
    value = dense(features=(num_kv_heads, head_dim), name="value")(inputs_v)
    if self.normalize_qk:
      query = nn.LayerNorm(name="query_ln", use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype)(query)
      key = nn.LayerNorm(name="key_ln", use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype)(key)

    cache = None
    if self.decode:
      # The first (init) call only shapes the cache; later calls decode into it.
      initialized = self.has_variable("cache", "cached_key")
      cached_key = self.variable("cache", "cached_key", jnp.zeros, key.shape, key.dtype)
      cached_value = self.variable("cache", "cached_value", jnp.zeros, value.shape, value.dtype)
      cache_index = self.variable("cache", "cache_index", lambda: jnp.array(0, dtype=jnp.int32))
      if initialized:
        cache = KVCache(cached_key.value, cached_value.value, cache_index.value)

    if self.dropout_rate > 0.0:
      deterministic = nn.merge_param("deterministic", self.deterministic, deterministic)
      if not deterministic and dropout_rng is None:
        dropout_rng = self.make_rng("dropout")
    else:
      deterministic = True

    lam, p = self._lam_and_p(metric, head_dim)
    x, cache = attend(
        name, query, key, value, cache=cache, mask=mask, metric=metric, lam=lam, p=p, is_causal=is_causal,
        rotary_base=self.rotary_base, positions=positions, key_positions=key_positions,
        q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids, query_seq_lengths=query_seq_lengths,
        key_value_seq_lengths=key_value_seq_lengths, local_window_size=local_window_size,
        broadcast_dropout=self.broadcast_dropout, dropout_rng=dropout_rng, dropout_rate=self.dropout_rate,
        deterministic=deterministic, dtype=self.dtype, precision=self.precision,
        implementation=self.implementation, module=self if sow_weights else None)
    if cache is not None:
      cached_key.value, cached_value.value, cache_index.value = cache
    return DenseGeneral(features=self.out_features or inputs_q.shape[-1], axis=(-2, -1),
                        kernel_init=self.out_kernel_init or self.kernel_init,
                        bias_init=self.out_bias_init or self.bias_init, use_bias=self.use_bias, dtype=self.dtype,
                        param_dtype=self.param_dtype, precision=self.precision, name="out")(x)


def _check_cache_room(index, *, name: str, chunk: int, max_length: int) -> None:
  """Raises unless ``chunk`` positions written at ``index`` fit a cache of ``max_length`` (``dynamic_update_slice``
  would clamp the start and silently overwrite the newest entries)."""
  index = int(index)
  if index + chunk > max_length:
    raise ValueError(f"{name}: the KV cache holds {max_length} positions and {index} are filled; "
                     f"{chunk} more do not fit (size the cache for every position by the length given to init)")
