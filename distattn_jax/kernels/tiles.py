"""The tile core: the one place where attention numerics live.

Every kernel computes attention the same way, and the pieces are here once:

* the online softmax over key tiles (:func:`online_step`: running max ``m``, normaliser ``l``, the rescaling of
  the accumulator) and its finalisation into the output and the log-sum-exp (:func:`finalize`); the
  materialised softmax of the reference kernel (:func:`masked_softmax`) shares the finalisation;
* the merge of two partial results through their log-sum-exps (:func:`merge`), for kernels that split the keys
  (the ring);
* the per-row term of the backward pass, ``delta = rowsum(dO * O) - d_lse`` (:func:`row_terms`);
* forward mode: one (query tile, key tile) step of the tangent of ``(out, lse)`` given the final ``lse``
  (:func:`tangent_step`), its loop (:func:`tangent_sums`) and the output's tangent from its sums
  (:func:`tangent_out`); the sums over parts of the keys add up, as the gradients' shares do;
* padding to whole tiles and the grouping of query heads onto their key/value head (:func:`pad_axis`,
  :func:`group_operand`);
* the tile loops themselves over a padded, grouped layout (:func:`forward`, :func:`gradients`,
  :func:`tangent_sums`), which the blockwise kernel wraps in a ``custom_jvp`` (its tangent map transposing to
  :func:`gradients`) and the ring kernel runs on each pair of sequence chunks.

The mask rule is :func:`distattn_jax.kernels.common.allowed_pairs`, evaluated per tile. The fused Pallas kernels
call :func:`online_step`, :func:`finalize` and :func:`row_terms` inside their Triton programs, on ``[block_q,
block_k]`` tiles instead of the ``[B, K, block_q, G, block_k]`` tiles of the loops below.

The module is long because it is the one place: the forward, backward and forward-mode loops share the tile
slicing, the mask and the logits, and splitting them would put the numerics of one kernel in several files.

Layout of the loops:
  q [B, K, Tp, G, D], k [B, K, Sp, D], v [B, K, Sp, Dv], lam [1, K, 1, G, 1],
  bias/mask [B|1, K|1, Tp|1, G|1, Sp|1], and a :class:`TileSegments`; Tp, Sp multiples of the block sizes.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from distattn_jax import metrics
from distattn_jax.kernels import common
from distattn_jax.kernels import dropout as dropout_lib

Array = jax.Array


class TileConfig(NamedTuple):
  """Everything static about one call of the tile loops (hashable: a ``custom_jvp`` non-differentiable
  argument)."""

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


class TileSegments(NamedTuple):
  """The per-position masks of the loops: ids ``[B, Tp]`` / ``[B, Sp]`` and lengths ``[B]`` (each None when
  unused), and optionally the int32 global positions ``[Tp]`` / ``[Sp]`` of the rows and keys passed in, which
  replace ``0..Tp-1`` / ``0..Sp-1`` in every position-based mask (the ring passes chunks from anywhere)."""

  q_ids: Array | None = None
  kv_ids: Array | None = None
  q_lengths: Array | None = None
  kv_lengths: Array | None = None
  q_positions: Array | None = None
  kv_positions: Array | None = None


class Residuals(NamedTuple):
  """What the backward loops need: the forward's inputs, and its final ``out`` and ``lse`` (``out`` may be None
  when the caller passes the row terms ``delta`` instead)."""

  q: Array
  k: Array
  v: Array
  lam5: Array
  bias5: Array | None
  mask5: Array | None
  seg: TileSegments
  p: Array | None
  rng: Array | None
  out: Array | None
  lse: Array


class Tangents(NamedTuple):
  """Tangents of the loops' differentiable inputs, shaped as they are (``bias5`` and ``p`` None when the input
  is absent or ``p`` is static)."""

  q: Array
  k: Array
  v: Array
  lam5: Array
  bias5: Array | None
  p: Array | None


# ------------------------------------------------------------------------------------------------------------
# Softmax numerics.


def online_step(m: Array, l: Array, logits: Array, *, base2: bool = False) -> tuple[Array, Array, Array, Array]:
  """One key tile of the online softmax over the last axis of ``logits``: returns ``(m_new, probs,
  correction, l_new)``; the caller rescales its accumulator by ``correction`` and adds ``probs @ v``. A row
  that has seen only masked keys (``-inf``) keeps ``m = -inf``, ``l = 0`` and contributes nothing.

  ``base2``: the logits are in log2 units (multiplied by log2(e)) and the step uses ``exp2``, which a GPU
  evaluates in one instruction where ``exp`` also multiplies by log2(e) per element; a fused kernel folds that
  factor into its logit scale instead."""
  exp = jnp.exp2 if base2 else jnp.exp
  m_new = jnp.maximum(m, jnp.max(logits, axis=-1))
  m_safe = jnp.where(jnp.isneginf(m_new), 0.0, m_new)
  probs = exp(logits - m_safe[..., None])
  correction = exp(m - m_safe)
  return m_new, probs, correction, l * correction + jnp.sum(probs, axis=-1)


def finalize(acc: Array, m: Array, l: Array, *, base2: bool = False) -> tuple[Array, Array]:
  """``(out, lse)`` from the accumulator ``acc [..., Dv]`` and the statistics ``m``, ``l``: ``out = acc / l``,
  ``lse = m + log(l)``; a row that saw no key gets output 0 and ``lse = -inf``. With ``base2`` (``m`` from
  :func:`online_step` in log2 units) the lse is in log2 units too: ``m + log2(l)``."""
  has_any = l > 0
  safe = jnp.where(has_any, l, 1.0)
  log = jnp.log2 if base2 else jnp.log
  return acc / safe[..., None], jnp.where(has_any, m + log(safe), -jnp.inf)


def masked_softmax(logits: Array, mask: Array | None) -> tuple[Array, Array]:
  """Softmax over the last axis with masked entries excluded; returns ``(weights, lse)``: the materialised
  softmax, finalised by :func:`finalize` as the tiled one is.

  A row with no unmasked entry gets weights 0 and ``lse = -inf`` (not NaN), with zero gradients: the mask is
  applied to the logits before ``exp``, so no masked entry ever produces an ``inf`` to multiply by 0. NaN
  logits propagate. The shift by the row maximum is a ``stop_gradient``: the softmax does not depend on it, so
  this is exact and routes no gradient to ties.
  """
  if mask is not None:
    logits = jnp.where(mask, logits, -jnp.inf)
  row_max = jax.lax.stop_gradient(jnp.max(logits, axis=-1))
  e = jnp.exp(logits - jnp.where(jnp.isneginf(row_max), 0.0, row_max)[..., None])
  return finalize(e, row_max, jnp.sum(e, axis=-1))


def merge(out_a: Array, lse_a: Array, out_b: Array, lse_b: Array) -> tuple[Array, Array]:
  """Two results normalised over disjoint key sets, merged into the result over their union through their
  log-sum-exps; ``-inf`` (nothing seen) on both sides stays ``-inf`` with output 0."""
  top = jnp.maximum(lse_a, lse_b)
  top = jnp.where(jnp.isneginf(top), 0.0, top)
  w_a, w_b = jnp.exp(lse_a - top), jnp.exp(lse_b - top)
  return finalize(out_a * w_a[..., None] + out_b * w_b[..., None], top, w_a + w_b)


def row_terms(out: Array, d_out: Array, d_lse: Array) -> Array:
  """``rowsum(dO * O) - d_lse`` in the accumulation dtype: the per-row term of the softmax gradient
  (``d lse_i / d logits_ij = P_ij``)."""
  acc = metrics.accumulation_dtype(out.dtype)
  return jnp.sum(d_out.astype(acc) * out.astype(acc), axis=-1) - d_lse.astype(acc)


def tangent_out(d_acc: Array, d_lse: Array, out: Array) -> Array:
  """The output's tangent from the sums of :func:`tangent_step` over every key: ``d_out = sum_j P_ij (dS_ij
  - d_lse_i) v_j + P_ij dv_j``, with ``sum_j P_ij v_j = out_i`` (dropout included). A row that saw no key has
  all sums 0 and tangent 0."""
  return d_acc - d_lse[..., None] * out.astype(d_acc.dtype)


# ------------------------------------------------------------------------------------------------------------
# Layout: padding to whole tiles, query heads grouped onto their key/value head.


def round_up(n: int, block: int) -> int:
  return -(-n // block) * block


def pad_axis(x: Array, axis: int, size: int, value=0, broadcast_ok: bool = False) -> Array:
  """Pads ``axis`` to ``size``; with ``broadcast_ok`` a size-1 axis (a broadcast mask/bias dim) stays 1."""
  if x.shape[axis] == size or (broadcast_ok and x.shape[axis] == 1):
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, widths, constant_values=value)


def group_operand(x: Array | None, num_kv: int, group: int, t_pad: int, s_pad: int, fill) -> Array | None:
  """``[B|1, H|1, T|1, S|1]`` -> ``[B|1, K|1, Tp|1, G|1, Sp|1]``."""
  if x is None:
    return None
  b, h, t, s = x.shape
  if h == 1:
    x = x.reshape(b, 1, t, 1, s)
  else:
    x = x.reshape(b, num_kv, group, t, s).transpose(0, 1, 3, 2, 4)
  return pad_axis(pad_axis(x, 2, t_pad, fill, broadcast_ok=True), 4, s_pad, fill, broadcast_ok=True)


# ------------------------------------------------------------------------------------------------------------
# One (query tile, key tile) step.


def _dropout_multiplier(cfg: TileConfig, rng: Array, batch: int, num_kv: int, q_start, k_start) -> Array:
  """``keep / keep_prob`` for the tile [batch|1, kv_heads|1, block_q, group|1, block_k] at (q_start, k_start)."""
  return dropout_lib.tile_multiplier(
      common.Dropout(cfg.dropout_rate, rng, cfg.broadcast_dropout), batch=batch, num_kv=num_kv, group=cfg.group,
      q_len=cfg.q_len, kv_len=cfg.kv_len, q_start=q_start, block_q=cfg.block_q, k_start=k_start,
      block_k=cfg.block_k)


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


def _tile_scores(cfg: TileConfig, q_blk, k_blk, p, with_vjp: bool = False):
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


def _tile_score_tangents(cfg: TileConfig, q_blk, k_blk, p, dq_blk, dk_blk, dp):
  """Scores ``[B, K, bq, G, bk]`` and their tangent for the tangents of the query rows, the keys and ``p``
  (the metric's own forward-mode rule: a feature loop for the elementwise forms, matmuls for the gram ones)."""
  batch, num_kv = q_blk.shape[:2]
  rows_shape = (batch, num_kv, cfg.block_q * cfg.group, q_blk.shape[-1])
  score_fn = functools.partial(metrics.score, metric=cfg.metric, precision=cfg.precision)
  tile_shape = (batch, num_kv, cfg.block_q, cfg.group, cfg.block_k)
  rows, d_rows = q_blk.reshape(rows_shape), dq_blk.reshape(rows_shape)
  if p is None:
    scores, d_scores = jax.jvp(lambda x, y: score_fn(x, y, p=cfg.p), (rows, k_blk), (d_rows, dk_blk))
  else:
    scores, d_scores = jax.jvp(lambda x, y, p: score_fn(x, y, p=p), (rows, k_blk, p), (d_rows, dk_blk, dp))
  return scores.reshape(tile_shape), d_scores.reshape(tile_shape)


def _tile_mask(cfg: TileConfig, mask_blk, seg: TileSegments, q_start, k_start):
  """Bool ``[B|1, 1, bq, 1, bk]`` (or the user mask's broadcast form) of the tile: the mask rule
  (:func:`common.allowed_pairs`: causal, window, segment ids, lengths, padded keys) and the user mask."""
  q_pos = q_start + jnp.arange(cfg.block_q) if seg.q_positions is None else \
      jax.lax.dynamic_slice_in_dim(seg.q_positions, q_start, cfg.block_q)
  k_pos = k_start + jnp.arange(cfg.block_k) if seg.kv_positions is None else \
      jax.lax.dynamic_slice_in_dim(seg.kv_positions, k_start, cfg.block_k)
  ids = lambda x, start, size, shape: None if x is None else jax.lax.dynamic_slice_in_dim(
      x, start, size, 1).reshape(shape)
  lengths = lambda x: None if x is None else x.reshape(-1, 1, 1, 1, 1)
  allowed = common.allowed_pairs(
      q_pos.reshape(1, 1, cfg.block_q, 1, 1), k_pos.reshape(1, 1, 1, 1, cfg.block_k), is_causal=cfg.is_causal,
      local_window=cfg.local_window, q_ids=ids(seg.q_ids, q_start, cfg.block_q, (-1, 1, cfg.block_q, 1, 1)),
      kv_ids=ids(seg.kv_ids, k_start, cfg.block_k, (-1, 1, 1, 1, cfg.block_k)), q_lengths=lengths(seg.q_lengths),
      kv_lengths=lengths(seg.kv_lengths), kv_len=cfg.kv_len)
  return allowed if mask_blk is None else jnp.logical_and(allowed, mask_blk)


def _tile_logits(cfg: TileConfig, scores, lam5, bias_blk, allowed, scale):
  logits = scores * (lam5 * scale)
  if bias_blk is not None:
    logits = logits + bias_blk
  return jnp.where(allowed, logits, -jnp.inf)


def _right_reach(cfg: TileConfig) -> int | None:
  """How far right of its own position a query may see (None: unbounded)."""
  if cfg.is_causal and cfg.causal_skip:
    return 0
  return None if cfg.local_window is None else cfg.local_window[1]


def kv_block_range(cfg: TileConfig, q_block, num_k_blocks: int):
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


def q_block_range(cfg: TileConfig, k_block, num_q_blocks: int):
  """``[first, end)`` query blocks that can see key block ``k_block``: the transpose of :func:`kv_block_range`."""
  first, end = 0, num_q_blocks
  right = _right_reach(cfg)
  if right is not None:
    first = jnp.maximum(0, (k_block * cfg.block_k - right) // cfg.block_q)
  if cfg.local_window is not None:
    last_key = (k_block + 1) * cfg.block_k - 1
    end = jnp.minimum(num_q_blocks, (last_key + cfg.local_window[0]) // cfg.block_q + 1)
  return first, end


# ------------------------------------------------------------------------------------------------------------
# The loops.


def forward(cfg: TileConfig, q, k, v, lam5, bias5, mask5, seg: TileSegments, p, rng) -> tuple[Array, Array]:
  """``(out [B, K, Tp, G, Dv], lse [B, K, Tp, G])``, both in the accumulation dtype: for each query block, the
  online softmax over the key blocks it can see."""
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
      m, probs, correction, l = online_step(m, l, logits)
      if rng is not None:
        probs = probs * _dropout_multiplier(cfg, rng, batch, num_kv, q_start, k_start)
      pv = jnp.einsum("bkxgs,bksd->bkxgd", probs.astype(v.dtype), v_blk, precision=cfg.precision,
                      preferred_element_type=acc)
      return m, l, o * correction[..., None] + pv

    stats_shape = (batch, num_kv, cfg.block_q, cfg.group)
    init = (jnp.full(stats_shape, -jnp.inf, acc), jnp.zeros(stats_shape, acc),
            jnp.zeros(stats_shape + (v_dim,), acc))
    m, l, o = jax.lax.fori_loop(*kv_block_range(cfg, i, num_k_blocks), kv_step, init)
    out, lse = finalize(o, m, l)
    # The output stays in the accumulation dtype here (the caller casts it): the backward pass's row terms
    # rowsum(dO * O) multiply scores that can be large (sqeuclidean), and a bfloat16 O made the lam gradient
    # 3% off the float64 oracle (experiments/selfcheck.py), against 0.5% for the reference kernel.
    return out, lse

  outs, lses = jax.lax.map(q_block, jnp.arange(t_pad // cfg.block_q))
  # [nq, B, K, bq, G, ...] -> [B, K, Tp, G, ...]
  out = jnp.moveaxis(outs, 0, 2).reshape(batch, num_kv, t_pad, cfg.group, v_dim)
  lse = jnp.moveaxis(lses, 0, 2).reshape(batch, num_kv, t_pad, cfg.group)
  return out, lse


def gradients(cfg: TileConfig, res: Residuals, d_out: Array, d_lse: Array | None = None,
              delta: Array | None = None):
  """``(dq, dk, dv, dlam, dbias, dp)`` in the accumulation dtype (dbias, dp None when absent): for each key
  block, the query blocks that can see it. ``res.out`` and ``res.lse`` are the final ones, so a caller that
  splits the keys into parts (the ring kernel) gets each part's exact share and sums them. Such a caller may
  pass the row terms ``delta`` (:func:`row_terms`) instead of ``res.out`` and ``d_lse``."""
  q, k, v, lam5, bias5, mask5, seg, p, rng = res[:9]
  batch, num_kv, t_pad, _, head_dim = q.shape
  acc = metrics.accumulation_dtype(q.dtype)
  scale = 1.0 / math.sqrt(head_dim)
  num_q_blocks, num_k_blocks = t_pad // cfg.block_q, k.shape[2] // cfg.block_k
  d_out = d_out.astype(acc)
  if delta is None:
    delta = row_terms(res.out, d_out, d_lse)
  lse_safe = jnp.where(jnp.isneginf(res.lse), 0.0, res.lse)

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
        *q_block_range(cfg, j, num_q_blocks), q_step, (dq, zeros_k, zeros_v, dlam, dbias_k, dp))
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


# ------------------------------------------------------------------------------------------------------------
# Forward mode. With the final log-sum-exp known (a residual of the forward pass), P_ij = exp(S_ij - lse_i) is
# exact on every tile, so the tangent needs no online rescaling: one pass over the key tiles accumulates
# d_lse_i = sum_j P_ij dS_ij and sum_j P_ij (dS_ij v_j + dv_j), and tangent_out subtracts d_lse_i * out_i. The
# same sums over a part of the keys are that part's exact share (the ring adds its steps' shares).


def tangent_step(cfg: TileConfig, scale: float, q_blk, k_blk, v_blk, lam5, bias_blk, allowed, lse_blk, p,
                 dq_blk, dk_blk, dv_blk, dlam5, dbias_blk, dp, multiplier=None) -> tuple[Array, Array]:
  """One (query tile, key tile) of the tangent: ``(sum_j P dS [..., bq, G], sum_j M P (dS v_j + dv_j) [..., bq,
  G, Dv])`` in the accumulation dtype, where ``dS`` is the tangent of the logits (metric, ``lam``, bias),
  ``P = exp(logits - lse)`` with ``lse_blk`` the final log-sum-exp (-inf rows: 0 everywhere) and ``M`` the
  dropout ``multiplier`` (None: 1). Masked pairs contribute nothing."""
  acc = metrics.accumulation_dtype(q_blk.dtype)
  scores, d_scores = _tile_score_tangents(cfg, q_blk, k_blk, p, dq_blk, dk_blk, dp)
  logits = _tile_logits(cfg, scores, lam5, bias_blk, allowed, scale)
  probs = jnp.exp(logits - jnp.where(jnp.isneginf(lse_blk), 0.0, lse_blk)[..., None])
  d_logits = (d_scores * lam5 + scores * dlam5) * scale
  if dbias_blk is not None:
    d_logits = d_logits + dbias_blk
  weighted = probs * jnp.where(allowed, d_logits, 0.0)
  mixing, mixing_d = (probs, weighted) if multiplier is None else (probs * multiplier, weighted * multiplier)
  d_acc = jnp.einsum("bkxgs,bksd->bkxgd", mixing_d, v_blk.astype(acc), precision=cfg.precision)
  d_acc = d_acc + jnp.einsum("bkxgs,bksd->bkxgd", mixing, dv_blk.astype(acc), precision=cfg.precision)
  return jnp.sum(weighted, axis=-1), d_acc


def tangent_sums(cfg: TileConfig, res: Residuals, dots: Tangents) -> tuple[Array, Array]:
  """``(d_lse [B, K, Tp, G], d_acc [B, K, Tp, G, Dv])``: the sums of :func:`tangent_step` over the key blocks
  each query block can see, with ``res.lse`` the final log-sum-exp (``res.out`` is not read). For each query
  block, a loop over key blocks: memory linear in the lengths, as the forward pass."""
  q, k, v, lam5, bias5, mask5, seg, p, rng = res[:9]
  batch, num_kv, t_pad, _, _ = q.shape
  acc = metrics.accumulation_dtype(q.dtype)
  scale = 1.0 / math.sqrt(q.shape[-1])
  num_k_blocks = k.shape[2] // cfg.block_k

  def q_block(i):
    q_start = i * cfg.block_q
    q_blk = jax.lax.dynamic_slice_in_dim(q, q_start, cfg.block_q, 2)
    dq_blk = jax.lax.dynamic_slice_in_dim(dots.q, q_start, cfg.block_q, 2)
    lse_blk = jax.lax.dynamic_slice_in_dim(res.lse, q_start, cfg.block_q, 2)
    bias_q, dbias_q = _slice(bias5, 2, q_start, cfg.block_q), _slice(dots.bias5, 2, q_start, cfg.block_q)
    mask_q = _slice(mask5, 2, q_start, cfg.block_q)

    def kv_step(j, carry):
      d_lse, d_acc = carry
      k_start = j * cfg.block_k
      blocks = [jax.lax.dynamic_slice_in_dim(x, k_start, cfg.block_k, 2) for x in (k, v, dots.k, dots.v)]
      allowed = _tile_mask(cfg, _slice(mask_q, 4, k_start, cfg.block_k), seg, q_start, k_start)
      multiplier = None if rng is None else _dropout_multiplier(cfg, rng, batch, num_kv, q_start, k_start)
      part_lse, part_acc = tangent_step(
          cfg, scale, q_blk, blocks[0], blocks[1], lam5, _slice(bias_q, 4, k_start, cfg.block_k), allowed,
          lse_blk, p, dq_blk, blocks[2], blocks[3], dots.lam5, _slice(dbias_q, 4, k_start, cfg.block_k), dots.p,
          multiplier)
      return d_lse + part_lse, d_acc + part_acc

    stats_shape = (batch, num_kv, cfg.block_q, cfg.group)
    init = (jnp.zeros(stats_shape, acc), jnp.zeros(stats_shape + (v.shape[-1],), acc))
    return jax.lax.fori_loop(*kv_block_range(cfg, i, num_k_blocks), kv_step, init)

  d_lses, d_accs = jax.lax.map(q_block, jnp.arange(t_pad // cfg.block_q))
  d_lse = jnp.moveaxis(d_lses, 0, 2).reshape(batch, num_kv, t_pad, cfg.group)
  d_acc = jnp.moveaxis(d_accs, 0, 2).reshape(batch, num_kv, t_pad, cfg.group, v.shape[-1])
  return d_lse, d_acc
