"""One (query tile, key tile) pair as the three programs see it: the metric form's value and VJP (dispatched to
:mod:`distattn_jax.kernels.pallas_gpu.gram` or :mod:`distattn_jax.kernels.pallas_gpu.elementwise`), the mask
rule per tile (:func:`distattn_jax.kernels.common.allowed_pairs` plus key validity and a dense mask), the bias,
and the logits."""

from __future__ import annotations

import math

import jax.numpy as jnp
from jax.experimental import pallas as pl

from distattn_jax import metrics
from distattn_jax.kernels import common
from distattn_jax.kernels.pallas_gpu import elementwise, gram
from distattn_jax.kernels.pallas_gpu.config import CallConfig


def form_of(cfg: CallConfig):
  return metrics.get(cfg.metric).resolve(cfg.p)


def feature_chunks(cfg: CallConfig, dim: int) -> list[tuple[int, int]]:
  """The feature chunks the form works in: ``block_d`` at a time for an elementwise form, up to the last one
  holding a real feature (``head_dim`` is static, so a chunk entirely in the padding of ``dim`` is never
  computed); all ``dim`` at once for a gram form (``tl.dot`` takes a power-of-two inner dimension, see
  :mod:`distattn_jax.kernels.pallas_gpu.gram`)."""
  if isinstance(form_of(cfg), metrics.Elementwise):
    return elementwise.chunks(cfg.tiles.block_d, dim, cfg.head_dim)
  return [(0, dim)]


def form_value(cfg: CallConfig, load_q, load_k, dim: int, params: tuple, shape):
  """The form's value ``[bq, bk]`` (float32) and what its VJP needs."""
  form = form_of(cfg)
  if isinstance(form, metrics.Gram):
    return gram.value(form, load_q, load_k, dim, shape, cfg.gram_pieces)
  return elementwise.value(form, load_q, load_k, feature_chunks(cfg, dim), cfg.head_dim, params)


def form_vjp(cfg: CallConfig, load_q, load_k, dim: int, params: tuple, aux, g, *, want_q: bool, want_k: bool):
  """Cotangents of the form's value tile for cotangent ``g [bq, bk]``: lists of per-chunk ``dq``, ``dk`` (None
  when not wanted; ``[bq, c]`` and ``[bk, c]``, or ``[c, bq]`` and ``[c, bk]`` where :func:`feature_major`) and the
  p cotangent per query row ``[bq]`` (None for no p)."""
  form = form_of(cfg)
  if isinstance(form, metrics.Gram):
    return gram.vjp(form, load_q, load_k, dim, aux, g, want_q=want_q, want_k=want_k, pieces=cfg.gram_pieces)
  return elementwise.vjp(form, load_q, load_k, feature_chunks(cfg, dim), cfg.head_dim, params, aux, g,
                         want_q=want_q, want_k=want_k)


def broadcast_tile(ref, shape, q_slice, k_slice, tq, tk):
  """The ``[tq, tk]`` tile of a ``[.., T|1, S|1]`` operand whose block is ``[Tblk|1, Sblk|1]``."""
  rows = q_slice if shape[2] != 1 else slice(None)
  cols = k_slice if shape[3] != 1 else slice(None)
  return jnp.broadcast_to(ref[rows, cols], (tq, tk))


def tile_allowed(cfg: CallConfig, r: dict, q_start, k_start, q_slice, k_slice, tq: int, tk: int):
  """Bool ``[tq, tk]`` (or None): the mask rule (:func:`common.allowed_pairs`: padded keys, causal, window,
  ids), key validity and the dense mask."""
  q_pos = (q_start + jnp.arange(tq))[:, None]
  k_pos = (k_start + jnp.arange(tk))[None, :]
  allowed = common.allowed_pairs(
      q_pos, k_pos, is_causal=cfg.is_causal, local_window=cfg.geometry.local_window,
      q_ids=r["q_ids"][q_slice][:, None] if cfg.has_ids else None,
      kv_ids=r["kv_ids"][k_slice][None, :] if cfg.has_ids else None,
      kv_len=cfg.kv_len if cfg.kv_len < cfg.kv_pad else None)
  for extra in ((r["kv_valid"][k_slice][None, :] != 0) if cfg.has_kv_valid else None,
                (broadcast_tile(r["mask"], cfg.mask_shape, q_slice, k_slice, tq, tk) != 0)
                if cfg.mask_shape is not None else None):
    if extra is not None:
      allowed = extra if allowed is None else jnp.logical_and(allowed, extra)
  return None if allowed is None else jnp.broadcast_to(allowed, (tq, tk))


# The programs' logits are in log2 units, so that the softmax takes exp2 (one instruction on a GPU; exp is exp2
# after a multiply by log2(e) per element): the factor is folded into the per-head scale here (and multiplies the
# bias tile), and the forward converts its lse back to natural units at the interface (lse = lse2 * ln 2), the
# backward the other way per row.
LOG2E = math.log2(math.e)
LN2 = math.log(2.0)


def masked_logits(cfg: CallConfig, r: dict, value, lam, q_slice, k_slice, allowed, tq, tk):
  """The score (the negated distance, or the similarity) and the masked logits in log2 units."""
  scale = LOG2E / math.sqrt(cfg.head_dim)
  score = value if metrics.get(cfg.metric).similarity else -value
  logits = score * (lam * scale)
  if cfg.bias_shape is not None:
    logits = logits + broadcast_tile(r["bias"], cfg.bias_shape, q_slice, k_slice, tq, tk).astype(
        jnp.float32) * LOG2E
  if allowed is not None:
    logits = jnp.where(allowed, logits, -jnp.inf)
  return score, logits


def order_params(r: dict) -> tuple:
  return (r["p"][0],) if "p" in r else ()


def feature_major(cfg: CallConfig) -> bool:
  """Whether the form works feature-major (an elementwise form: its chunks are ``[size, rows]``, its gradients
  ``[size, rows]`` per chunk) rather than row-major (a gram form: ``[rows, dim]`` for the matmuls)."""
  return isinstance(form_of(cfg), metrics.Elementwise)


def loader(cfg: CallConfig, ref, dim: int, rows=None):
  """``load(c, size)``: features ``[c, c + size)`` of a tile, ``[rows, size]`` for a gram form and transposed,
  ``[size, rows]``, for an elementwise form (see :mod:`distattn_jax.kernels.pallas_gpu.elementwise`). The
  program's own tile (``rows=None``) is read once, chunk by chunk, before the loop and stays on chip for the
  whole loop; the loop's tiles are read as sliced, each step."""
  if not feature_major(cfg):
    if rows is None:
      tile = ref[...]
      return lambda c, size: tile
    return lambda c, size: ref[rows, pl.ds(c, size)]
  if rows is None:
    held = {(c, size): (ref[...] if size == dim else ref[:, pl.ds(c, size)]).T
            for c, size in feature_chunks(cfg, dim)}
    return lambda c, size: held[(c, size)]
  return lambda c, size: ref[rows, pl.ds(c, size)].T


def pair(cfg: CallConfig, r: dict, load_q, load_k, dim: int, params: tuple, lam, q_start, k_start, q_slice,
          k_slice):
  """One (query tile, key tile) pair as all three kernels see it: the form's residuals, the score (the negated
  distance, or the similarity) and the masked logits in log2 units, ``[block_q, block_k]``."""
  bq, bk = cfg.tiles.block_q, cfg.tiles.block_k
  value, aux = form_value(cfg, load_q, load_k, dim, params, (bq, bk))
  allowed = tile_allowed(cfg, r, q_start, k_start, q_slice, k_slice, bq, bk)
  score, logits = masked_logits(cfg, r, value, lam, q_slice, k_slice, allowed, bq, bk)
  return aux, score, logits


def logits_to_values(cfg: CallConfig) -> float:
  """``d logits / d value`` per unit lam: the scale, signed by whether the form is a similarity."""
  return (1.0 if metrics.get(cfg.metric).similarity else -1.0) / math.sqrt(cfg.head_dim)

