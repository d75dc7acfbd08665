"""Flax NNX module: :class:`DistanceBasedAttention`, a drop-in for ``flax.nnx.MultiHeadAttention``.

It is ``nnx.MultiHeadAttention`` (same constructor, same submodules ``query``, ``key``, ``value``, ``out``,
``query_ln``, ``key_ln``, same cache variables and ``init_cache``), plus a per-head ``log_lambda`` (and
``log_p``) parameter, with a ``__call__`` that runs the pure functions of :mod:`distattn_jax.module_helpers`, the
same functions the Linen module runs.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx as flax_nnx
from flax.nnx import rnglib
from flax.nnx.module import first_from

from distattn_jax import metrics, module_helpers

Array = jax.Array


class DistanceBasedAttention(flax_nnx.MultiHeadAttention):
  """Multi-head distance attention with the interface and parameters of ``flax.nnx.MultiHeadAttention``.

  A model swaps ``nnx.MultiHeadAttention(num_heads, in_features, ..., rngs=rngs)`` for
  ``DistanceBasedAttention(num_heads, in_features, ..., metric="l1", rngs=rngs)`` and keeps its checkpoint: the
  projections and norms are created by ``nnx.MultiHeadAttention`` itself, so their names, shapes and
  initialisation are Flax's; lam (``log_lambda [num_heads]``) and p (``log_p``) are added at their initial
  values, and for a weighted metric its feature weights (``log_metric_weights [kv_heads, head_dim]``, 0: ``w =
  1``, as in the Linen module). The keyword arguments ``metric``, ``lambda_init``, ``learnable_lambda``, ``p``,
  ``learnable_p``, ``implementation`` and ``rotary_base`` mean what they mean in the Linen
  :class:`distattn_jax.layers.DistanceBasedAttention` (``lambda_init=None`` is the calibrated
  ``initializers.default_lambda``); every other argument is passed to ``nnx.MultiHeadAttention`` (except
  ``attention_fn``: the attention is this module's). With ``metric="dot"`` and ``lambda_init=1.0`` it computes
  what ``nnx.MultiHeadAttention`` computes, dropout draws included.

  ``tied_qk=True`` shares the ``query`` projection (and ``query_ln``) with the keys as the Linen module's
  ``tied_qk`` does: the module has no ``key`` (nor ``key_ln``), ``num_kv_heads`` must be None or ``num_heads``
  and ``in_kv_features`` None or ``in_features``. Its other parameters are drawn as the untied module's are
  (``nnx.MultiHeadAttention`` builds the key projection from the same ``rngs`` before it is dropped), so the
  same seed gives the same ``query``, ``value`` and ``out``.

  Decoding follows NNX: ``init_cache(input_shape)`` sizes the cache, then calls with ``decode=True`` (or the
  constructor's ``decode``) write their keys and values into it. A call may carry a chunk of several positions
  (a prefill), each attending to the cache up to its own position; writing past the cache's end is an error
  (a ``ValueError``, or a ``JaxRuntimeError`` with the same message under ``nnx.jit``), never an overwrite.
  """

  def __init__(self, num_heads: int, in_features: int, qkv_features: int | None = None,
               out_features: int | None = None, num_kv_heads: int | None = None, in_kv_features: int | None = None,
               *, metric: str | metrics.DistanceType = "l1", lambda_init: float | None = None,
               learnable_lambda: bool = True, p: float = 2.0, learnable_p: bool = False,
               implementation: Any = None, rotary_base: float | None = None, tied_qk: bool = False,
               dropout_rate: float = 0.0, param_dtype: Any = jnp.float32, rngs: rnglib.Rngs,
               **flax_kwargs: Any):
    name = type(self).__name__
    if "attention_fn" in flax_kwargs:
      raise TypeError(f"{name}: attention_fn is not an argument (the attention is distance attention; use "
                      "nnx.MultiHeadAttention(attention_fn=distattn_jax.make_attention_fn(...)) for a fixed lam)")
    qkv = in_features if qkv_features is None else qkv_features
    metric, kv_heads = module_helpers.check_config(
        name, num_heads=num_heads, num_kv_heads=num_kv_heads, qkv_features=qkv, metric=metric, p=p,
        learnable_p=learnable_p, lambda_init=lambda_init, dropout_rate=dropout_rate, rotary_base=rotary_base,
        tied_qk=tied_qk)
    if tied_qk and in_kv_features not in (None, in_features):
      raise ValueError(f"{name}: tied_qk=True projects the keys' inputs with the query projection, so "
                       f"in_kv_features must be None or in_features ({in_features}); got {in_kv_features!r}")
    super().__init__(num_heads, in_features, qkv_features, out_features, num_kv_heads, in_kv_features,
                     dropout_rate=dropout_rate, param_dtype=param_dtype, rngs=rngs, **flax_kwargs)
    self.metric = metric
    self.p = float(p)
    self.implementation = implementation
    self.rotary_base = rotary_base
    self.tied_qk = bool(tied_qk)
    if self.tied_qk:
      # The queries' projection and norm make the keys; dropping Flax's keeps the parameter tree honest.
      self.key = flax_nnx.data(None)
      self.key_ln = flax_nnx.data(None)
    self.lambda_init = module_helpers.initial_lambda(metric, self.head_dim, p, lambda_init)
    self.log_lambda: flax_nnx.Param | None = flax_nnx.data(None)
    self.log_p: flax_nnx.Param | None = flax_nnx.data(None)
    if learnable_lambda:
      self.log_lambda = flax_nnx.Param(jnp.full((num_heads,), math.log(self.lambda_init), param_dtype))
    if learnable_p:
      self.log_p = flax_nnx.Param(jnp.full((), math.log(p), param_dtype))
    self.log_metric_weights: flax_nnx.Param | None = flax_nnx.data(None)
    weights_shape = module_helpers.metric_weights_shape(metric, kv_heads, self.head_dim)
    if weights_shape is not None:
      self.log_metric_weights = flax_nnx.Param(jnp.zeros(weights_shape, param_dtype))

  def lam_and_p(self) -> tuple[Array | float, Array | float]:
    """The current lam (``[num_heads]`` when learned, else a float) and p."""
    return module_helpers.lam_and_p(None if self.log_lambda is None else self.log_lambda[...], self.lambda_init,
                                    None if self.log_p is None else self.log_p[...], self.p)

  def metric_weights(self) -> Array | None:
    """The current feature weights of a weighted metric (``[kv_heads, head_dim]``), None for another."""
    return module_helpers.metric_weights(None if self.log_metric_weights is None else self.log_metric_weights[...])

  def __call__(self, inputs_q: Array, inputs_k: Array | None = None, inputs_v: Array | None = None, *,
               mask: Array | None = None, deterministic: bool | None = None,
               rngs: rnglib.Rngs | rnglib.RngStream | None = None, sow_weights: bool = False,
               decode: bool | None = None, is_causal: bool = False, out_sharding: Any = None,
               qkv_sharding: Any = None, positions: Array | None = None, key_positions: Array | None = None,
               q_segment_ids: Array | None = None, kv_segment_ids: Array | None = None,
               query_seq_lengths: Array | None = None, key_value_seq_lengths: Array | None = None,
               local_window_size: Any = None) -> Array:
    """``nnx.MultiHeadAttention.__call__``'s arguments, plus those of the Linen module's call: ``positions`` /
    ``key_positions`` for ``rotary_base``, and segment ids, sequence lengths and ``local_window_size`` for
    ``distance_attention`` (not in a decode step, whose keys are the cache's)."""
    name = type(self).__name__
    rngs = self.rngs if rngs is None else (rngs.dropout if isinstance(rngs, rnglib.Rngs) else rngs)
    inputs_q, inputs_k, inputs_v = module_helpers.resolve_inputs(name, inputs_q, inputs_k, inputs_v)
    if inputs_q.shape[-1] != self.in_features:
      raise ValueError(f"{name}: inputs_q has {inputs_q.shape[-1]} features; the module was built for "
                       f"in_features={self.in_features}")

    query = self.query(inputs_q, out_sharding=qkv_sharding)
    if self.tied_qk:
      module_helpers.check_tied_inputs(name, inputs_q, inputs_k)
      key = self.query(inputs_k, out_sharding=qkv_sharding)
    else:
      key = self.key(inputs_k, out_sharding=qkv_sharding)
    value = self.value(inputs_v, out_sharding=qkv_sharding)
    if self.normalize_qk:
      key_ln = self.query_ln if self.tied_qk else self.key_ln
      query, key = self.query_ln(query), key_ln(key)

    decode = bool(self.decode if decode is None else decode)
    cache = None
    if decode:
      if self.cached_key is None or self.cached_value is None or self.cache_index is None:
        raise ValueError(f"{name}: decode=True needs a cache; call init_cache(input_shape) first")
      cache = module_helpers.KVCache(self.cached_key[...], self.cached_value[...], self.cache_index[...])

    dropout_rng = None
    if self.dropout_rate > 0.0:
      deterministic = first_from(deterministic, self.deterministic,
                                 error_msg=f"{name}: dropout_rate > 0 needs deterministic= in the call or the "
                                           "constructor")
      if not deterministic:
        if rngs is None:
          raise ValueError(f"{name}: dropout needs rngs= in the call (the module was built with keep_rngs=False)")
        dropout_rng = rngs()
    else:
      deterministic = True

    lam, p = self.lam_and_p()
    x, cache = module_helpers.attend(
        name, query, key, value, cache=cache, mask=mask, metric=self.metric, lam=lam, p=p,
        metric_weights=self.metric_weights(), is_causal=is_causal,
        rotary_base=self.rotary_base, positions=positions, key_positions=key_positions,
        q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids, query_seq_lengths=query_seq_lengths,
        key_value_seq_lengths=key_value_seq_lengths, local_window_size=local_window_size,
        broadcast_dropout=self.broadcast_dropout, dropout_rng=dropout_rng, dropout_rate=self.dropout_rate,
        deterministic=deterministic, dtype=self.dtype, precision=self.precision,
        implementation=self.implementation, module=self if sow_weights else None)
    if cache is not None:
      self.cached_key[...], self.cached_value[...], self.cache_index[...] = cache
    return self.out(x, out_sharding=out_sharding)
