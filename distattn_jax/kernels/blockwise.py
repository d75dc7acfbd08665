"""Memory-linear attention for every metric: FlashAttention-2's schedule in plain JAX (CPU, GPU and TPU).

Forward: for each block of ``block_q`` query positions, stream over blocks of ``block_k`` keys keeping the
online-softmax statistics (running max ``m``, normaliser ``l``, float32 accumulator), and save only the output
and the log-sum-exp ``lse``. Backward (``jax.custom_vjp``): for each key block, stream over the query blocks
that can see it, recompute the score tile, ``P = exp(logits - lse)``, and accumulate ``dV``, ``dK``, ``dQ``,
``dlam``, ``dbias`` (and ``dp`` for a learned ``p``). Nothing of size ``T x S`` is ever held; the largest
temporaries are ``[batch, heads, block_q, block_k]`` tiles.

The score tile and its gradient come from :func:`distattn_jax.metrics.score` and its VJP, so the metric code
(matmul forms, elementwise reductions with memory-lean custom VJPs, gradient conventions) is shared with the
reference kernel. With ``is_causal`` the loops skip key blocks entirely above the diagonal.

Dropout draws each weight's keep bit from the same counter-based Threefry stream that
``jax.random.bernoulli`` uses for the whole ``[T, S]`` (or ``[B, H, T, S]``) array, one tile at a time, so the
result equals the reference kernel's (and Flax's) bit for bit under JAX's default ``threefry_partitionable``
keys; other key implementations raise, and ``implementation="auto"`` sends such calls to the reference.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from distattn_jax import metrics
from distattn_jax.kernels import common, registry

Array = jax.Array

def default_blocks(metric: str, p: Any = 2.0) -> tuple[int, int]:
  """Tile sizes for ``metric`` at order ``p``: the record's own, else the default of its form (gram or
  elementwise; ``metrics.GRAM_BLOCKS``, ``metrics.ELEMENTWISE_BLOCKS``)."""
  return metrics.get(metric).blocks(p)


class _Config(NamedTuple):
  """Everything static about one call (hashable: it is a ``custom_vjp`` non-differentiable argument)."""

  metric: str
  p: float | None  # None when p is traced and passed as an array
  is_causal: bool
  block_q: int
  block_k: int
  q_len: int
  kv_len: int
  group: int
  dropout_rate: float
  broadcast_dropout: bool
  precision: Any


# ------------------------------------------------------------------------------------------------------------
# Dropout bits, tile by tile, identical to jax.random.bernoulli over the whole array.


def _mul_u32(a: Array, b: int) -> tuple[Array, Array]:
  """``a * b`` for uint32 ``a`` and a Python int ``b < 2**32``, as (high, low) uint32 words."""
  b_hi, b_lo = np.uint32(b >> 16), np.uint32(b & 0xFFFF)
  a_hi, a_lo = a >> 16, a & 0xFFFF
  lo_lo = a_lo * b_lo
  cross = a_hi * b_lo + ((lo_lo >> 16) & 0xFFFF)  # < 2**32: (2**16-1)^2 + 2**16 - 1
  cross2 = a_lo * b_hi + (cross & 0xFFFF)
  low = (cross2 << 16) | (lo_lo & 0xFFFF)
  high = a_hi * b_hi + (cross >> 16) + (cross2 >> 16)
  return high, low


def _keep_mask(rng: Array, keep_prob: float, rows: Array, cols: Array, row_stride: int) -> Array:
  """Keep bits of the elements at linear index ``rows * row_stride + cols`` of the array
  ``jax.random.bernoulli(rng, keep_prob, shape)`` would draw (``rows``, ``cols`` broadcast; uint32)."""
  high, low = _mul_u32(rows, row_stride)
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


def check_dropout_rng(rng: Array) -> None:
  """Raises ValueError unless the tile-wise draw reproduces ``jax.random.bernoulli`` for this key."""
  impl = jax.random.key_impl(rng) if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key) else None
  threefry = (impl is None and rng.shape[-1:] == (2,)) or (impl is not None and "threefry" in str(impl))
  if not threefry or not jax.config.jax_threefry_partitionable:
    raise ValueError(f"blockwise dropout needs a threefry dropout_rng with jax_threefry_partitionable=True "
                     f"(got key implementation {impl}); use implementation='reference'")


def _dropout_multiplier(cfg: _Config, rng: Array, batch: int, num_kv: int, q_start, k_start) -> Array:
  """``keep / keep_prob`` for the tile [batch, kv_heads, block_q, group, block_k] at (q_start, k_start)."""
  keep_prob = 1.0 - cfg.dropout_rate
  t = (jnp.asarray(q_start, jnp.uint32) + jnp.arange(cfg.block_q, dtype=jnp.uint32))[:, None, None]  # [bq,1,1]
  s = (jnp.asarray(k_start, jnp.uint32) + jnp.arange(cfg.block_k, dtype=jnp.uint32))[None, None, :]  # [1,1,bk]
  if cfg.broadcast_dropout:
    rows = jnp.broadcast_to(t, (cfg.block_q, 1, 1))
  else:
    heads = num_kv * cfg.group
    b = jnp.arange(batch, dtype=jnp.uint32)[:, None, None, None, None]
    h = (jnp.arange(num_kv, dtype=jnp.uint32)[:, None] * cfg.group
         + jnp.arange(cfg.group, dtype=jnp.uint32)[None, :])[None, :, None, :, None]
    rows = (b * heads + h) * np.uint32(cfg.q_len) + t[None, None]
  keep = _keep_mask(rng, keep_prob, rows, s, cfg.kv_len)
  # Padded positions (t >= q_len or s >= kv_len) get arbitrary bits; they are masked or sliced away.
  return keep.astype(jnp.float32) / jnp.float32(keep_prob)


# ------------------------------------------------------------------------------------------------------------
# Tiles.


def _slice(x: Array | None, axis: int, start, size: int) -> Array | None:
  """``x[..., start:start+size, ...]`` along ``axis``, or ``x`` itself where that axis is broadcast (size 1)."""
  if x is None or x.shape[axis] == 1:
    return x
  return jax.lax.dynamic_slice_in_dim(x, start, size, axis)


def _add_slice(x: Array, tile: Array, axis: int, start) -> Array:
  """``x`` with ``tile`` added at ``start`` along ``axis``, or added whole where that axis is broadcast (size
  1): the accumulating inverse of :func:`_slice`."""
  if x.shape[axis] == 1:
    return x + tile
  current = jax.lax.dynamic_slice_in_dim(x, start, tile.shape[axis], axis)
  return jax.lax.dynamic_update_slice_in_dim(x, current + tile, start, axis)


def _tile_scores(cfg: _Config, q_blk, k_blk, p, with_vjp: bool = False):
  """Scores ``[B, K, bq, G, bk]`` (accumulation dtype), and with ``with_vjp`` the VJP of the score function
  with respect to the query rows ``[B, K, bq * G, D]``, the keys and (when traced) ``p``."""
  batch, num_kv = q_blk.shape[:2]
  rows = q_blk.reshape(batch, num_kv, cfg.block_q * cfg.group, q_blk.shape[-1])
  score_fn = functools.partial(metrics.score, metric=cfg.metric, precision=cfg.precision)
  tile_shape = (batch, num_kv, cfg.block_q, cfg.group, cfg.block_k)
  if not with_vjp:
    return score_fn(rows, k_blk, p=cfg.p if p is None else p).reshape(tile_shape), None
  if p is None:
    scores, vjp = jax.vjp(lambda x, y: score_fn(x, y, p=cfg.p), rows, k_blk)
  else:
    scores, vjp = jax.vjp(lambda x, y, p: score_fn(x, y, p=p), rows, k_blk, p)
  return scores.reshape(tile_shape), vjp


def _tile_mask(cfg: _Config, mask_blk, q_start, k_start):
  """Bool ``[.., bq, 1, bk]``-broadcastable mask of the tile: user mask, causal, and padded keys."""
  t = q_start + jnp.arange(cfg.block_q)[:, None, None]
  s = k_start + jnp.arange(cfg.block_k)[None, None, :]
  allowed = s < cfg.kv_len
  if cfg.is_causal:
    allowed = allowed & (t >= s)
  return allowed if mask_blk is None else allowed & mask_blk


def _tile_logits(cfg: _Config, scores, lam5, bias_blk, allowed, scale):
  logits = scores * (lam5 * scale)
  if bias_blk is not None:
    logits = logits + bias_blk
  return jnp.where(allowed, logits, -jnp.inf)


def _kv_block_range(cfg: _Config, q_block, num_k_blocks: int):
  """Key blocks a query block can see: all of them, or those not entirely above the causal diagonal."""
  if not cfg.is_causal:
    return num_k_blocks
  last_position = (q_block + 1) * cfg.block_q - 1
  return jnp.minimum(num_k_blocks, last_position // cfg.block_k + 1)


def _first_q_block(cfg: _Config, k_block):
  """First query block that sees key block ``k_block`` (0 unless causal)."""
  if not cfg.is_causal:
    return 0
  return (k_block * cfg.block_k) // cfg.block_q


# ------------------------------------------------------------------------------------------------------------
# Forward and backward passes over the prepared layout:
#   q [B, K, Tp, G, D], k [B, K, Sp, D], v [B, K, Sp, Dv], lam [1, K, 1, G, 1],
#   bias/mask [B|1, K|1, Tp|1, G|1, Sp|1]; Tp, Sp multiples of the block sizes.


def _forward(cfg: _Config, q, k, v, lam5, bias5, mask5, p, rng):
  batch, num_kv, t_pad, _, _ = q.shape
  v_dim = v.shape[-1]
  acc = metrics.accumulation_dtype(q.dtype)
  scale = 1.0 / math.sqrt(q.shape[-1])
  num_k_blocks = k.shape[2] // cfg.block_k

  def q_block(i):
    q_start = i * cfg.block_q
    q_blk = jax.lax.dynamic_slice_in_dim(q, q_start, cfg.block_q, 2)
    bias_q = _slice(bias5, 2, q_start, cfg.block_q)
    mask_q = _slice(mask5, 2, q_start, cfg.block_q)

    def kv_step(j, carry):
      m, l, o = carry
      k_start = j * cfg.block_k
      k_blk = jax.lax.dynamic_slice_in_dim(k, k_start, cfg.block_k, 2)
      v_blk = jax.lax.dynamic_slice_in_dim(v, k_start, cfg.block_k, 2)
      scores, _ = _tile_scores(cfg, q_blk, k_blk, p)
      allowed = _tile_mask(cfg, _slice(mask_q, 4, k_start, cfg.block_k), q_start, k_start)
      logits = _tile_logits(cfg, scores, lam5, _slice(bias_q, 4, k_start, cfg.block_k), allowed, scale)
      m_new = jnp.maximum(m, jnp.max(logits, axis=-1))
      m_safe = jnp.where(jnp.isneginf(m_new), 0.0, m_new)
      probs = jnp.exp(logits - m_safe[..., None])
      correction = jnp.exp(m - m_safe)
      l = l * correction + jnp.sum(probs, axis=-1)
      if rng is not None:
        probs = probs * _dropout_multiplier(cfg, rng, batch, num_kv, q_start, k_start)
      pv = jnp.einsum("bkxgs,bksd->bkxgd", probs.astype(v.dtype), v_blk, precision=cfg.precision,
                      preferred_element_type=acc)
      return m_new, l, o * correction[..., None] + pv

    stats_shape = (batch, num_kv, cfg.block_q, cfg.group)
    init = (jnp.full(stats_shape, -jnp.inf, acc), jnp.zeros(stats_shape, acc),
            jnp.zeros(stats_shape + (v_dim,), acc))
    m, l, o = jax.lax.fori_loop(0, _kv_block_range(cfg, i, num_k_blocks), kv_step, init)
    has_any = l > 0
    out = o / jnp.where(has_any, l, 1.0)[..., None]
    lse = jnp.where(has_any, m + jnp.log(jnp.where(has_any, l, 1.0)), -jnp.inf)
    return out.astype(q.dtype), lse

  outs, lses = jax.lax.map(q_block, jnp.arange(t_pad // cfg.block_q))
  # [nq, B, K, bq, G, ...] -> [B, K, Tp, G, ...]
  out = jnp.moveaxis(outs, 0, 2).reshape(batch, num_kv, t_pad, cfg.group, v_dim)
  lse = jnp.moveaxis(lses, 0, 2).reshape(batch, num_kv, t_pad, cfg.group)
  return out, lse


def _backward(cfg: _Config, res, cotangents):
  q, k, v, lam5, bias5, mask5, p, rng, out, lse = res
  d_out, d_lse = cotangents
  batch, num_kv, t_pad, _, head_dim = q.shape
  acc = metrics.accumulation_dtype(q.dtype)
  scale = 1.0 / math.sqrt(head_dim)
  num_q_blocks, num_k_blocks = t_pad // cfg.block_q, k.shape[2] // cfg.block_k
  d_out = d_out.astype(acc)
  # D_i = rowsum(dO * O), less the lse cotangent (d lse_i / d logits_ij = P_ij).
  delta = jnp.sum(d_out * out.astype(acc), axis=-1) - d_lse.astype(acc)
  lse_safe = jnp.where(jnp.isneginf(lse), 0.0, lse)

  def kv_block(carry, j):
    dq, dlam, dbias, dp = carry
    k_start = j * cfg.block_k
    k_blk = jax.lax.dynamic_slice_in_dim(k, k_start, cfg.block_k, 2)
    v_blk = jax.lax.dynamic_slice_in_dim(v, k_start, cfg.block_k, 2)
    bias_k = _slice(bias5, 4, k_start, cfg.block_k)
    mask_k = _slice(mask5, 4, k_start, cfg.block_k)

    def q_step(i, inner):
      dq, dk_blk, dv_blk, dlam, dbias_k, dp = inner
      q_start = i * cfg.block_q
      q_blk = jax.lax.dynamic_slice_in_dim(q, q_start, cfg.block_q, 2)
      do_blk = jax.lax.dynamic_slice_in_dim(d_out, q_start, cfg.block_q, 2)
      scores, score_vjp = _tile_scores(cfg, q_blk, k_blk, p, with_vjp=True)
      allowed = _tile_mask(cfg, _slice(mask_k, 2, q_start, cfg.block_q), q_start, k_start)
      bias_blk = _slice(bias_k, 2, q_start, cfg.block_q)
      logits = _tile_logits(cfg, scores, lam5, bias_blk, allowed, scale)
      probs = jnp.exp(logits - jax.lax.dynamic_slice_in_dim(lse_safe, q_start, cfg.block_q, 2)[..., None])
      mixing = probs
      d_probs = jnp.einsum("bkxgd,bksd->bkxgs", do_blk, v_blk.astype(acc), precision=cfg.precision)
      if rng is not None:
        multiplier = _dropout_multiplier(cfg, rng, batch, num_kv, q_start, k_start)
        mixing = probs * multiplier
        d_probs = d_probs * multiplier
      dv_blk = dv_blk + jnp.einsum("bkxgs,bkxgd->bksd", mixing.astype(v.dtype), do_blk.astype(v.dtype),
                                   precision=cfg.precision, preferred_element_type=acc)
      d_logits = probs * (d_probs - jax.lax.dynamic_slice_in_dim(delta, q_start, cfg.block_q, 2)[..., None])
      dlam = dlam + jnp.sum(d_logits * scores, axis=(0, 2, 4), keepdims=True) * scale
      if dbias_k is not None:
        dbias_k = _add_slice(dbias_k, metrics.sum_to_shape(d_logits, bias_blk.shape), 2, q_start)
      d_scores = (d_logits * (lam5 * scale)).reshape(batch, num_kv, cfg.block_q * cfg.group, cfg.block_k)
      grads = score_vjp(d_scores)
      dq_rows, dk_tile = grads[0], grads[1]
      if p is not None:
        dp = dp + grads[2]
      dq = _add_slice(dq, dq_rows.reshape(q_blk.shape).astype(acc), 2, q_start)
      return dq, dk_blk + dk_tile.astype(acc), dv_blk, dlam, dbias_k, dp

    dbias_k = None if dbias is None else jnp.zeros(_slice(dbias, 4, k_start, cfg.block_k).shape, acc)
    zeros_k = jnp.zeros(k_blk.shape, acc)
    zeros_v = jnp.zeros(v_blk.shape, acc)
    dq, dk_blk, dv_blk, dlam, dbias_k, dp = jax.lax.fori_loop(
        _first_q_block(cfg, j), num_q_blocks, q_step, (dq, zeros_k, zeros_v, dlam, dbias_k, dp))
    if dbias is not None:
      dbias = _add_slice(dbias, dbias_k, 4, k_start)
    return (dq, dlam, dbias, dp), (dk_blk, dv_blk)

  init = (jnp.zeros(q.shape, acc), jnp.zeros(lam5.shape, acc),
          None if bias5 is None else jnp.zeros(bias5.shape, acc),
          None if p is None else jnp.zeros((), acc))
  (dq, dlam, dbias, dp), (dks, dvs) = jax.lax.scan(kv_block, init, jnp.arange(num_k_blocks))
  dk = jnp.moveaxis(dks, 0, 2).reshape(k.shape)
  dv = jnp.moveaxis(dvs, 0, 2).reshape(v.shape)
  return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dlam.astype(lam5.dtype),
          None if bias5 is None else dbias.astype(bias5.dtype), None,
          None if p is None else dp.astype(p.dtype), None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(cfg, q, k, v, lam5, bias5, mask5, p, rng):
  return _forward(cfg, q, k, v, lam5, bias5, mask5, p, rng)


def _flash_fwd(cfg, q, k, v, lam5, bias5, mask5, p, rng):
  out, lse = _forward(cfg, q, k, v, lam5, bias5, mask5, p, rng)
  return (out, lse), (q, k, v, lam5, bias5, mask5, p, rng, out, lse)


_flash.defvjp(_flash_fwd, _backward)


# ------------------------------------------------------------------------------------------------------------
# Layout: canonical kernel shapes <-> the grouped, padded layout above.


def _round_up(n: int, block: int) -> int:
  return -(-n // block) * block


def _pad_axis(x: Array, axis: int, size: int, value=0, broadcast_ok: bool = False) -> Array:
  """Pads ``axis`` to ``size``; with ``broadcast_ok`` a size-1 axis (a broadcast mask/bias dim) stays 1."""
  if x.shape[axis] == size or (broadcast_ok and x.shape[axis] == 1):
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, widths, constant_values=value)


def _group_operand(x: Array | None, num_kv: int, group: int, t_pad: int, s_pad: int, fill) -> Array | None:
  """``[B|1, H|1, T|1, S|1]`` -> ``[B|1, K|1, Tp|1, G|1, Sp|1]``."""
  if x is None:
    return None
  b, h, t, s = x.shape
  if h == 1:
    x = x.reshape(b, 1, t, 1, s)
  else:
    x = x.reshape(b, num_kv, group, t, s).transpose(0, 1, 3, 2, 4)
  return _pad_axis(_pad_axis(x, 2, t_pad, fill, broadcast_ok=True), 4, s_pad, fill, broadcast_ok=True)


@dataclasses.dataclass(frozen=True)
class Blockwise:
  """The blockwise kernel with its tile sizes; ``None`` picks :func:`default_blocks` for the metric.

  Pass an instance as ``implementation=`` to choose tile sizes, e.g. ``Blockwise(block_q=128, block_k=256)``;
  the registered name ``"blockwise"`` is ``Blockwise()``. Tiles are clipped to the (8-aligned) sequence lengths.
  """

  block_q: int | None = None
  block_k: int | None = None

  def __post_init__(self):
    for name in ("block_q", "block_k"):
      value = getattr(self, name)
      if value is not None and (not isinstance(value, int) or value < 1):
        raise ValueError(f"Blockwise: {name} must be a positive int or None; got {value!r}")

  def __call__(self, q, k, v, *, lam, bias=None, mask=None, metric: str, p: Any = 2.0, is_causal: bool = False,
               dropout: common.Dropout | None = None, precision: Any = None,
               return_weights: bool = False) -> common.AttentionResult:
    if return_weights:
      raise ValueError("implementation='blockwise' never materialises the attention weights; use "
                       "implementation='reference' (or 'auto') to get them")
    batch, q_len, num_heads, head_dim = q.shape
    kv_len, num_kv = k.shape[1], k.shape[2]
    group = num_heads // num_kv
    default_q, default_k = default_blocks(metric, p)
    block_q = min(self.block_q or default_q, _round_up(q_len, 8))
    block_k = min(self.block_k or default_k, _round_up(kv_len, 8))
    t_pad, s_pad = _round_up(q_len, block_q), _round_up(kv_len, block_k)
    if dropout is not None:
      check_dropout_rng(dropout.rng)
      if not dropout.broadcast and batch * num_heads * q_len >= 2**32:
        raise ValueError("blockwise dropout without broadcast_dropout supports batch * heads * q_len < 2**32")
    cfg = _Config(metric=metric, p=p if isinstance(p, float) else None, is_causal=is_causal, block_q=block_q,
                  block_k=block_k, q_len=q_len, kv_len=kv_len, group=group,
                  dropout_rate=0.0 if dropout is None else float(dropout.rate),
                  broadcast_dropout=True if dropout is None else bool(dropout.broadcast), precision=precision)
    acc = metrics.accumulation_dtype(q.dtype)
    qg = _pad_axis(q, 1, t_pad).reshape(batch, t_pad, num_kv, group, head_dim).transpose(0, 2, 1, 3, 4)
    kt = _pad_axis(k, 1, s_pad).transpose(0, 2, 1, 3)
    vt = _pad_axis(v, 1, s_pad).transpose(0, 2, 1, 3)
    lam5 = lam.astype(acc).reshape(1, num_kv, 1, group, 1)
    bias5 = _group_operand(None if bias is None else bias.astype(acc), num_kv, group, t_pad, s_pad, 0.0)
    mask5 = _group_operand(mask, num_kv, group, t_pad, s_pad, False)
    p_array = None if isinstance(p, float) else jnp.asarray(p, acc)
    out, lse = _flash(cfg, qg, kt, vt, lam5, bias5, mask5, p_array, None if dropout is None else dropout.rng)
    out = out.transpose(0, 2, 1, 3, 4).reshape(batch, t_pad, num_heads, v.shape[-1])[:, :q_len]
    lse = lse.transpose(0, 1, 3, 2).reshape(batch, num_heads, t_pad)[:, :, :q_len]
    return common.AttentionResult(out, lse, None)


registry.register("blockwise", Blockwise())
