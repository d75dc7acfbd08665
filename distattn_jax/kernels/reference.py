"""The materialised oracle: every logit, weight and (under autodiff) every intermediate is an explicit array.

It is the definition the other kernels are tested against, and the kernel that can return attention weights.
Memory is ``O(B * H * T * S)`` for the logits; the elementwise metric forms (l1, l2, chebyshev, lp, a user's)
reduce their ``[..., D]`` differences feature by feature in the forward pass, and their custom VJPs recompute
them in the backward pass, so nothing of size ``T x S x D`` is held.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from distattn_jax import metrics
from distattn_jax.kernels import base, common, registry, tiles
from distattn_jax.kernels import dropout as dropout_lib


@dataclasses.dataclass(frozen=True)
class Reference:
  """The materialised kernel (registered as ``"reference"``): every capability, quadratic memory."""

  capabilities = base.Capabilities(weights=True, memory="quadratic")

  def unsupported(self, request: base.Request) -> str | None:
    return base.unsupported(self.capabilities, request)

  def __call__(self, q, k, v, *, lam, bias=None, mask=None, segments: common.Segments | None = None,
               local_window: tuple[int, int] | None = None, metric: str, p: Any = 2.0, is_causal: bool = False,
               dropout: common.Dropout | None = None, precision: Any = None,
               return_weights: bool = False) -> common.AttentionResult:
    batch, q_len, num_heads, head_dim = q.shape
    kv_len, num_kv_heads, v_dim = k.shape[1], k.shape[2], v.shape[-1]
    group = num_heads // num_kv_heads
    acc = metrics.accumulation_dtype(q.dtype)

    # [B, T, K, G, D] -> [B, K, G*T, D]: each kv head scores its whole query group in one pairwise call.
    q_grouped = q.reshape(batch, q_len, num_kv_heads, group, head_dim).transpose(0, 2, 3, 1, 4)
    q_grouped = q_grouped.reshape(batch, num_kv_heads, group * q_len, head_dim)
    scores = metrics.score(q_grouped, k.transpose(0, 2, 1, 3), metric, p=p, precision=precision)
    scores = scores.reshape(batch, num_heads, q_len, kv_len)

    logits = scores * (lam.astype(acc) / math.sqrt(head_dim)).reshape(1, num_heads, 1, 1)
    if bias is not None:
      logits = logits + bias.astype(acc)
    segments = segments or common.Segments()
    positions = common.position_mask(
        jnp.arange(q_len), jnp.arange(kv_len), is_causal=is_causal, local_window=local_window,
        q_ids=segments.q_ids, kv_ids=segments.kv_ids, q_lengths=segments.q_lengths,
        kv_lengths=segments.kv_lengths)
    if positions is not None:
      positions = positions[:, None]
      mask = positions if mask is None else jnp.logical_and(mask, positions)
    weights, lse = tiles.masked_softmax(logits, mask)

    mixing = weights
    if dropout is not None:
      mixing = mixing * dropout_lib.multiplier(dropout, mixing.shape, mixing.dtype)
    mixing = mixing.astype(v.dtype).reshape(batch, num_kv_heads, group, q_len, kv_len)
    out = jnp.einsum("bkgts,bskd->btkgd", mixing, v, precision=precision, preferred_element_type=acc)
    out = out.reshape(batch, q_len, num_heads, v_dim).astype(v.dtype)
    return common.AttentionResult(out, lse, weights if return_weights else None)


attention = registry.register("reference", Reference())
