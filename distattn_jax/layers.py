"""Flax Linen modules: thin shells over :func:`distattn_jax.attention.distance_attention`.

The module below holds the parameters; everything else it does (configuration checks, lam and p from their
log-parameters, rotary positions, the KV cache update, the call into ``distance_attention``) is the pure functions
of :mod:`distattn_jax.module_helpers`, which the NNX module in :mod:`distattn_jax.nnx` runs as well.
``apply_rotary`` and ``KVCache`` are importable from here too."""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.linear import DenseGeneral, default_kernel_init

from distattn_jax import metrics
from distattn_jax.module_helpers import (KVCache, apply_rotary, attend, check_config, check_tied_inputs,
                                         initial_lambda, lam_and_p, metric_weights, metric_weights_shape,
                                         resolve_inputs)

__all__ = ["DistanceBasedAttention", "KVCache", "apply_rotary"]

Array = jax.Array


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

      ====  =====  =====  ===========  =======  ======  =========  ===========  ===========  ===
      D     l1     l2     sqeuclidean  lp, p=3  cosine  chebyshev  weighted_l1  weighted_l2  dot
      ====  =====  =====  ===========  =======  ======  =========  ===========  ===========  ===
      16    1.345  4.695  0.4096       6.267    16.20   6.405      1.345        4.695        1
      32    1.339  6.579  0.4093       9.684    32.11   9.504      1.339        6.579        1
      64    1.333  9.253  0.4085       15.18    63.92   14.31      1.333        9.253        1
      128   1.342  13.16  0.4096       24.10    128.8   21.39      1.342        13.16        1
      ====  =====  =====  ===========  =======  ======  =========  ===========  ===========  ===

      A weighted metric starts where its base metric does (its weights start at 1), so it has the same column.

    learnable_lambda: learn one lam per head, stored as ``params['log_lambda']`` so it stays positive. False
      keeps lam fixed at its initial value.
    p: the order of a metric that has one (``metric="lp"``, or a user's parametric record).
    learnable_p: learn ``p`` (a metric with an order only), stored as ``params['log_p']`` so it stays positive.
      A weighted metric (``"weighted_l1"``, ``"weighted_l2"`` or a registered record with a ``feature_scale``)
      learns its feature weights ``w = exp(params['log_metric_weights'])``, shape ``[kv_heads, head_dim]`` (one
      vector per key/value head, shared by the query heads of its group; ``[num_heads, head_dim]`` without
      grouped-query attention), initialised to 0 (``w = 1``, the unweighted metric). The trainer's optimizer
      puts it in the lambda group, without weight decay.
    num_kv_heads: key/value heads for grouped-query attention (default: ``num_heads``).
    implementation: kernel name passed to ``distance_attention`` (None = automatic).
    rotary_base: rotate queries and keys by their positions (:func:`apply_rotary`) with this base; None = off.
      Query positions are ``arange(q_length)`` (offset by the cache index while decoding) unless the call passes
      ``positions``; key positions are the keys' own, ``arange(kv_length)`` (offset likewise), unless it passes
      ``key_positions``. Passing ``positions`` alone applies them to the keys too, which needs
      ``kv_length == q_length`` (self-attention); otherwise it is a ValueError asking for ``key_positions``.
    tied_qk: one projection for queries and keys, ``W^Q = W^K``, as the Lipschitz L2 self-attention of Kim,
      Papamakarios and Mnih (2021) needs (in self-attention every query then lies at distance 0 from its own
      key). The parameters are ``query``, ``value``, ``out`` (and ``query_ln`` with ``normalize_qk``, shared the
      same way), with no ``key`` (nor ``key_ln``). A cross-attention call still works: the shared projection
      maps ``inputs_k`` too, which therefore needs the features of ``inputs_q`` (a ValueError otherwise).
      ``num_kv_heads`` must be None or ``num_heads``. With the key parameters set to the query's, the untied
      module computes the same.

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
  tied_qk: bool = False

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

  def _metric_weights(self, metric: str, num_kv_heads: int, head_dim: int) -> Array | None:
    """The current feature weights of a weighted metric (from ``log_metric_weights``), None for another."""
    shape = metric_weights_shape(metric, num_kv_heads, head_dim)
    if shape is None:
      return None
    return metric_weights(self.param("log_metric_weights", nn.initializers.zeros_init(), shape, self.param_dtype))

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
        dropout_rate=self.dropout_rate, rotary_base=self.rotary_base, tied_qk=self.tied_qk)
    head_dim = qkv_features // self.num_heads
    dense = functools.partial(DenseGeneral, axis=-1, dtype=self.dtype, param_dtype=self.param_dtype,
                              kernel_init=self.kernel_init, bias_init=self.bias_init, use_bias=self.use_bias,
                              precision=self.precision)
    query_proj = dense(features=(self.num_heads, head_dim), name="query")
    query = query_proj(inputs_q)
    if self.tied_qk:
      check_tied_inputs(name, inputs_q, inputs_k)
      key = query_proj(inputs_k)
    else:
      key = dense(features=(num_kv_heads, head_dim), name="key")(inputs_k)
    value = dense(features=(num_kv_heads, head_dim), name="value")(inputs_v)
    if self.normalize_qk:
      query_ln = nn.LayerNorm(name="query_ln", use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype)
      key_ln = query_ln if self.tied_qk else nn.LayerNorm(name="key_ln", use_bias=False, dtype=self.dtype,
                                                          param_dtype=self.param_dtype)
      query, key = query_ln(query), key_ln(key)

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
    weights = self._metric_weights(metric, num_kv_heads, head_dim)
    x, cache = attend(
        name, query, key, value, cache=cache, mask=mask, metric=metric, lam=lam, p=p, metric_weights=weights,
        is_causal=is_causal,
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
