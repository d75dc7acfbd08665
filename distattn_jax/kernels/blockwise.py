"""Memory-linear attention for every metric: a tiled online softmax in plain JAX (CPU, GPU and TPU).

Forward: for each block of ``block_q`` query positions, stream over blocks of ``block_k`` keys keeping the
online-softmax statistics (running max ``m``, normaliser ``l``, float32 accumulator), and save only the output
and the log-sum-exp ``lse``. Backward (``jax.custom_vjp``): for each key block, stream over the query blocks
that can see it, recompute the score tile, ``P = exp(logits - lse)``, and accumulate ``dV``, ``dK``, ``dQ``,
``dlam``, ``dbias`` (and ``dp`` for a learned ``p``). Nothing of size ``T x S`` is ever held; the largest
temporaries are ``[batch, heads, block_q, block_k]`` tiles.

The score tile and its gradient come from :func:`distattn_jax.metrics.score` and its VJP, so the metric code
(gram forms as matmuls, elementwise forms with memory-lean custom VJPs, gradient conventions) is shared with
the reference kernel. With ``is_causal`` the loops skip key blocks entirely above the diagonal, and with a
``local_window`` those entirely outside the window. Segment ids and sequence lengths are evaluated per tile
from ``[B, T]``/``[B, S]``/``[B]`` arrays, never as a ``[T, S]`` mask.

Dropout draws each weight's keep bit tile by tile from the stream ``jax.random.bernoulli`` uses for the whole
array (:mod:`distattn_jax.kernels.dropout`), so the result equals the reference kernel's (and Flax's) bit for
bit; keys (or ``jax_enable_x64``) that draw cannot reproduce are declined, and ``implementation="auto"`` sends
such calls to the reference.
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
from distattn_jax.kernels import base, common, registry
from distattn_jax.kernels import dropout as dropout_lib

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
  local_window: tuple[int, int] | None = None
  # False when the query and key blocks passed in do not start at the same position (a sequence-parallel
  # caller passes chunks from anywhere in the sequence): block indices then say nothing about the diagonal,
  # so the causal mask is evaluated on every tile from the positions instead of skipping tiles by index.
  causal_skip: bool = True


def _dropout_multiplier(cfg: _Config, rng: Array, batch: int, num_kv: int, q_start, k_start) -> Array:
  """``keep / keep_prob`` for the tile [batch|1, kv_heads|1, block_q, group|1, block_k] at (q_start, k_start)."""
  return dropout_lib.tile_multiplier(
      common.Dropout(cfg.dropout_rate, rng, cfg.broadcast_dropout), batch=batch, num_kv=num_kv, group=cfg.group,
      q_len=cfg.q_len, kv_len=cfg.kv_len, q_start=q_start, block_q=cfg.block_q, k_start=k_start,
      block_k=cfg.block_k)


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


def _tile_mask(cfg: _Config, mask_blk, seg, q_start, k_start):
  """Bool ``[B|1, 1, bq, 1, bk]`` (or the user mask's broadcast form) of the tile: user mask, causal, window,
  segment ids, lengths and padded keys."""
  q_ids, kv_ids, q_lengths, kv_lengths = seg[:4]
  q_positions, kv_positions = seg[4:] if len(seg) > 4 else (None, None)
  q_pos = q_start + jnp.arange(cfg.block_q) if q_positions is None else \
      jax.lax.dynamic_slice_in_dim(q_positions, q_start, cfg.block_q)
  k_pos = k_start + jnp.arange(cfg.block_k) if kv_positions is None else \
      jax.lax.dynamic_slice_in_dim(kv_positions, k_start, cfg.block_k)
  positions = common.position_mask(
      q_pos, k_pos, is_causal=cfg.is_causal, local_window=cfg.local_window,
      q_ids=None if q_ids is None else jax.lax.dynamic_slice_in_dim(q_ids, q_start, cfg.block_q, 1),
      kv_ids=None if kv_ids is None else jax.lax.dynamic_slice_in_dim(kv_ids, k_start, cfg.block_k, 1),
      q_lengths=q_lengths, kv_lengths=kv_lengths)
  allowed = (k_pos < cfg.kv_len).reshape(1, 1, 1, 1, cfg.block_k)
  if positions is not None:
    allowed = jnp.logical_and(allowed, positions[:, None, :, None, :])
  return allowed if mask_blk is None else jnp.logical_and(allowed, mask_blk)


def _tile_logits(cfg: _Config, scores, lam5, bias_blk, allowed, scale):
  logits = scores * (lam5 * scale)
  if bias_blk is not None:
    logits = logits + bias_blk
  return jnp.where(allowed, logits, -jnp.inf)


def _right_reach(cfg: _Config) -> int | None:
  """How far right of its own position a query may see (None: unbounded)."""
  if cfg.is_causal and cfg.causal_skip:
    return 0
  return None if cfg.local_window is None else cfg.local_window[1]


def _kv_block_range(cfg: _Config, q_block, num_k_blocks: int):
  """``[first, end)`` key blocks query block ``q_block`` can see: those not entirely above the causal diagonal
  or outside the window."""
  first, end = 0, num_k_blocks
  right = _right_reach(cfg)
  if right is not None:
    last_position = (q_block + 1) * cfg.block_q - 1
    end = jnp.minimum(num_k_blocks, (last_position + right) // cfg.block_k + 1)
  if cfg.local_window is not None:
    first = jnp.maximum(0, (q_block * cfg.block_q - cfg.local_window[0]) // cfg.block_k)
  return first, end


def _q_block_range(cfg: _Config, k_block, num_q_blocks: int):
  """``[first, end)`` query blocks that can see key block ``k_block``: the transpose of :func:`_kv_block_range`."""
  first, end = 0, num_q_blocks
  right = _right_reach(cfg)
  if right is not None:
    first = jnp.maximum(0, (k_block * cfg.block_k - right) // cfg.block_q)
  if cfg.local_window is not None:
    last_key = (k_block + 1) * cfg.block_k - 1
    end = jnp.minimum(num_q_blocks, (last_key + cfg.local_window[0]) // cfg.block_q + 1)
  return first, end


# ------------------------------------------------------------------------------------------------------------
# Forward and backward passes over the prepared layout:
#   q [B, K, Tp, G, D], k [B, K, Sp, D], v [B, K, Sp, Dv], lam [1, K, 1, G, 1],
#   bias/mask [B|1, K|1, Tp|1, G|1, Sp|1]; seg = (q_ids [B, Tp] | None, kv_ids [B, Sp] | None,
#   q_lengths [B] | None, kv_lengths [B] | None[, q_positions [Tp], kv_positions [Sp]]); Tp, Sp multiples of
#   the block sizes. The optional positions (int32) replace 0..Tp-1 / 0..Sp-1 in every position-based mask
#   (causal, window, lengths, padded keys): the ring kernel passes chunks with their global positions.


def _forward(cfg: _Config, q, k, v, lam5, bias5, mask5, seg, p, rng):
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
      allowed = _tile_mask(cfg, _slice(mask_q, 4, k_start, cfg.block_k), seg, q_start, k_start)
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
    m, l, o = jax.lax.fori_loop(*_kv_block_range(cfg, i, num_k_blocks), kv_step, init)
    has_any = l > 0
    out = o / jnp.where(has_any, l, 1.0)[..., None]
    lse = jnp.where(has_any, m + jnp.log(jnp.where(has_any, l, 1.0)), -jnp.inf)
    # The output stays in the accumulation dtype here (the caller casts it): the backward pass's row terms
    # rowsum(dO * O) multiply scores that can be large (sqeuclidean), and a bfloat16 O made the lam gradient
    # 3% off the float64 oracle (experiments/selfcheck.py), against 0.5% for the reference kernel.
    return out, lse

  outs, lses = jax.lax.map(q_block, jnp.arange(t_pad // cfg.block_q))
  # [nq, B, K, bq, G, ...] -> [B, K, Tp, G, ...]
  out = jnp.moveaxis(outs, 0, 2).reshape(batch, num_kv, t_pad, cfg.group, v_dim)
  lse = jnp.moveaxis(lses, 0, 2).reshape(batch, num_kv, t_pad, cfg.group)
  return out, lse


def _backward(cfg: _Config, res, cotangents):
  q, k, v, lam5, bias5 = res[:5]
  p = res[7]
  dq, dk, dv, dlam, dbias, dp = _gradients(cfg, res, cotangents)
  return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dlam.astype(lam5.dtype),
          None if bias5 is None else dbias.astype(bias5.dtype), None, None,
          None if p is None else dp.astype(p.dtype), None)


def row_terms(out, d_out, d_lse):
  """``rowsum(dO * O) - d_lse`` in the accumulation dtype: the per-row term of the softmax gradient."""
  acc = metrics.accumulation_dtype(out.dtype)
  return jnp.sum(d_out.astype(acc) * out.astype(acc), axis=-1) - d_lse.astype(acc)


def _gradients(cfg: _Config, res, cotangents, delta=None):
  """``(dq, dk, dv, dlam, dbias, dp)`` in the accumulation dtype (dbias, dp None when absent); ``out`` and
  ``lse`` in ``res`` are the final ones, so a caller that splits the keys into parts (the ring kernel) gets each
  part's exact share and sums them. Such a caller may pass the row terms ``delta`` (below) instead of ``out``
  and ``d_lse``."""
  q, k, v, lam5, bias5, mask5, seg, p, rng, out, lse = res
  d_out, d_lse = cotangents
  batch, num_kv, t_pad, _, head_dim = q.shape
  acc = metrics.accumulation_dtype(q.dtype)
  scale = 1.0 / math.sqrt(head_dim)
  num_q_blocks, num_k_blocks = t_pad // cfg.block_q, k.shape[2] // cfg.block_k
  d_out = d_out.astype(acc)
  # D_i = rowsum(dO * O), less the lse cotangent (d lse_i / d logits_ij = P_ij).
  if delta is None:
    delta = row_terms(out, d_out, d_lse)
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
      allowed = _tile_mask(cfg, _slice(mask_k, 2, q_start, cfg.block_q), seg, q_start, k_start)
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
        *_q_block_range(cfg, j, num_q_blocks), q_step, (dq, zeros_k, zeros_v, dlam, dbias_k, dp))
    if dbias is not None:
      dbias = _add_slice(dbias, dbias_k, 4, k_start)
    return (dq, dlam, dbias, dp), (dk_blk, dv_blk)

  init = (jnp.zeros(q.shape, acc), jnp.zeros(lam5.shape, acc),
          None if bias5 is None else jnp.zeros(bias5.shape, acc),
          None if p is None else jnp.zeros((), acc))
  (dq, dlam, dbias, dp), (dks, dvs) = jax.lax.scan(kv_block, init, jnp.arange(num_k_blocks))
  dk = jnp.moveaxis(dks, 0, 2).reshape(k.shape)
  dv = jnp.moveaxis(dvs, 0, 2).reshape(v.shape)
  return dq, dk, dv, dlam, dbias, dp


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(cfg, q, k, v, lam5, bias5, mask5, seg, p, rng):
  return _forward(cfg, q, k, v, lam5, bias5, mask5, seg, p, rng)


def _flash_fwd(cfg, q, k, v, lam5, bias5, mask5, seg, p, rng):
  out, lse = _forward(cfg, q, k, v, lam5, bias5, mask5, seg, p, rng)
  return (out, lse), (q, k, v, lam5, bias5, mask5, seg, p, rng, out, lse)


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

  capabilities = base.Capabilities(weights=False, tile_dropout=True, memory="linear")

  def unsupported(self, request: base.Request) -> str | None:
    reason = base.unsupported(self.capabilities, request)
    if reason is None and request.dropout is not None and not request.dropout.broadcast and (
        request.batch * request.num_heads * request.q_len >= 2**32):
      reason = "apply dropout without broadcast_dropout when batch * heads * q_len >= 2**32"
    return reason

  def __call__(self, q, k, v, *, lam, bias=None, mask=None, segments: common.Segments | None = None,
               local_window: tuple[int, int] | None = None, metric: str, p: Any = 2.0, is_causal: bool = False,
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
      dropout_lib.check_rng(dropout.rng)
      if not dropout.broadcast and batch * num_heads * q_len >= 2**32:
        raise ValueError("blockwise dropout without broadcast_dropout supports batch * heads * q_len < 2**32")
    cfg = _Config(metric=metric, p=p if isinstance(p, float) else None, is_causal=is_causal, block_q=block_q,
                  block_k=block_k, q_len=q_len, kv_len=kv_len, group=group,
                  dropout_rate=0.0 if dropout is None else float(dropout.rate),
                  broadcast_dropout=True if dropout is None else bool(dropout.broadcast), precision=precision,
                  local_window=None if local_window is None else tuple(local_window))
    acc = metrics.accumulation_dtype(q.dtype)
    qg = _pad_axis(q, 1, t_pad).reshape(batch, t_pad, num_kv, group, head_dim).transpose(0, 2, 1, 3, 4)
    kt = _pad_axis(k, 1, s_pad).transpose(0, 2, 1, 3)
    vt = _pad_axis(v, 1, s_pad).transpose(0, 2, 1, 3)
    lam5 = lam.astype(acc).reshape(1, num_kv, 1, group, 1)
    bias5 = _group_operand(None if bias is None else bias.astype(acc), num_kv, group, t_pad, s_pad, 0.0)
    mask5 = _group_operand(mask, num_kv, group, t_pad, s_pad, False)
    segments = segments or common.Segments()
    seg = (None if segments.q_ids is None else _pad_axis(segments.q_ids, 1, t_pad),
           None if segments.kv_ids is None else _pad_axis(segments.kv_ids, 1, s_pad),
           segments.q_lengths, segments.kv_lengths)
    p_array = None if isinstance(p, float) else jnp.asarray(p, acc)
    out, lse = _flash(cfg, qg, kt, vt, lam5, bias5, mask5, seg, p_array,
                      None if dropout is None else dropout.rng)
    out = out.transpose(0, 2, 1, 3, 4).reshape(batch, t_pad, num_heads, v.shape[-1])[:, :q_len].astype(v.dtype)
    lse = lse.transpose(0, 1, 3, 2).reshape(batch, num_heads, t_pad)[:, :, :q_len]
    return common.AttentionResult(out, lse, None)


registry.register("blockwise", Blockwise())
