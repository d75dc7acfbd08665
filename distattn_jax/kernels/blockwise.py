"""Memory-linear attention for every metric: a tiled online softmax in plain JAX (CPU, GPU and TPU).

A thin user of the tile core (:mod:`distattn_jax.kernels.tiles`, where the loops and the softmax numerics
live): this module lays the canonical arrays out in tiles and gives the loops their derivatives.

Forward: for each block of ``block_q`` query positions, stream over blocks of ``block_k`` keys keeping the
online-softmax statistics (running max ``m``, normaliser ``l``, float32 accumulator), and save only the output
and the log-sum-exp ``lse``. Backward (the transpose of the tangent map below): for each key block, stream
over the query blocks that can see it, recompute the score tile, ``P = exp(logits - lse)``, and accumulate
``dV``, ``dK``, ``dQ``, ``dlam``, ``dbias`` (and ``dp`` for a learned ``p``). Nothing of size ``T x S`` is ever
held; the largest temporaries are ``[batch, heads, block_q, block_k]`` tiles.

The score tile and its gradient come from :func:`distattn_jax.metrics.score` and its VJP, so the metric code
(gram forms as matmuls, elementwise forms with memory-lean derivatives, gradient conventions) is shared with
the reference kernel. With ``is_causal`` the loops skip key blocks entirely above the diagonal, and with a
``local_window`` those entirely outside the window. Segment ids and sequence lengths are evaluated per tile
from ``[B, T]``/``[B, S]``/``[B]`` arrays, never as a ``[T, S]`` mask.

Derivatives in both modes (``jax.custom_jvp``). The tangent of ``(out, lse)`` for tangents of q, k, v, lam,
the bias and a learned ``p`` is computed tile by tile (:func:`tiles.tangent_sums`): with the final ``lse`` a
residual of the forward pass, ``P = exp(logits - lse)`` is exact on every tile, so one pass over the key tiles
accumulates ``d_lse_i = sum_j P_ij dS_ij`` and ``sum_j P_ij (dS_ij v_j + dv_j)``, where ``dS`` is the logits'
tangent (the metric's own forward-mode rule on the score tile, and lam and the bias); then ``d_out_i`` is that
sum minus ``d_lse_i * out_i``. Memory stays linear in the lengths, and masks, segments, lengths, windows, GQA
and dropout are the forward pass's own tile rules. That tangent map is an
:func:`distattn_jax.autodiff.linear_call` whose transpose is the backward pass above, so reverse mode, which JAX
derives by transposing the tangent map, runs these backward loops on these residuals (q, k, v, lam, bias, p,
out, lse), exactly what a ``custom_vjp`` would run and hold. Why not a ``custom_vjp`` for the tangent map
inside the ``custom_jvp``: JAX cannot transpose a ``custom_vjp`` call, so ``jax.grad`` would fail. Second derivatives
(``jax.hessian``, ``jvp`` of ``grad``) differentiate these loops with JAX's autodiff.

Dropout draws each weight's keep bit tile by tile from the stream ``jax.random.bernoulli`` uses for the whole
array (:mod:`distattn_jax.kernels.dropout`), so the result equals the reference kernel's (and Flax's) bit for
bit; keys (or ``jax_enable_x64``) that draw cannot reproduce are declined, and ``implementation="auto"`` sends
such calls to the reference.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from distattn_jax import autodiff, metrics
from distattn_jax.kernels import base, common, registry, tiles

Array = jax.Array


def default_blocks(metric: str, p: Any = 2.0) -> tuple[int, int]:
  """Tile sizes for ``metric`` at order ``p``: the record's own, else the default of its form (gram or
  elementwise; ``metrics.GRAM_BLOCKS``, ``metrics.ELEMENTWISE_BLOCKS``)."""
  return metrics.get(metric).blocks(p)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _flash(cfg, q, k, v, lam5, bias5, mask5, seg, p, rng):
  return tiles.forward(cfg, q, k, v, lam5, bias5, mask5, seg, p, rng)


@_flash.defjvp
def _flash_jvp(cfg, primals, tangents):
  out, lse = tiles.forward(cfg, *primals)
  res = tiles.Residuals(*primals, out, lse)
  dq, dk, dv, dlam, dbias, _, _, dp, _ = tangents  # the mask, segments and dropout key have no tangent
  dots = tiles.Tangents(dq, dk, dv, dlam, dbias, dp)
  d_out, d_lse = autodiff.linear_call(functools.partial(_tangent, cfg), functools.partial(_cotangent, cfg), res,
                                      dots)
  return (out, lse), (d_out, d_lse)


def _tangent(cfg, res: tiles.Residuals, dots: tiles.Tangents):
  d_lse, d_acc = tiles.tangent_sums(cfg, res, dots)
  return tiles.tangent_out(d_acc, d_lse, res.out), d_lse


def _cotangent(cfg, res: tiles.Residuals, cotangents) -> tiles.Tangents:
  d_out, d_lse = cotangents
  dq, dk, dv, dlam, dbias, dp = tiles.gradients(cfg, res, d_out, d_lse)
  return tiles.Tangents(dq.astype(res.q.dtype), dk.astype(res.k.dtype), dv.astype(res.v.dtype),
                        dlam.astype(res.lam5.dtype), None if res.bias5 is None else dbias.astype(res.bias5.dtype),
                        None if res.p is None else dp.astype(res.p.dtype))


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
    # Called only for requests unsupported() accepted (base.Kernel): no weights, a dropout key the tile draw
    # reproduces.
    batch, q_len, num_heads, head_dim = q.shape
    kv_len, num_kv = k.shape[1], k.shape[2]
    group = num_heads // num_kv
    default_q, default_k = default_blocks(metric, p)
    block_q = min(self.block_q or default_q, tiles.round_up(q_len, 8))
    block_k = min(self.block_k or default_k, tiles.round_up(kv_len, 8))
    t_pad, s_pad = tiles.round_up(q_len, block_q), tiles.round_up(kv_len, block_k)
    cfg = tiles.TileConfig(
        metric=metric, p=p if isinstance(p, float) else None, is_causal=is_causal, block_q=block_q,
        block_k=block_k, q_len=q_len, kv_len=kv_len, group=group,
        dropout_rate=0.0 if dropout is None else float(dropout.rate),
        broadcast_dropout=True if dropout is None else bool(dropout.broadcast), precision=precision,
        local_window=None if local_window is None else tuple(local_window))
    acc = metrics.accumulation_dtype(q.dtype)
    qg = tiles.pad_axis(q, 1, t_pad).reshape(batch, t_pad, num_kv, group, head_dim).transpose(0, 2, 1, 3, 4)
    kt = tiles.pad_axis(k, 1, s_pad).transpose(0, 2, 1, 3)
    vt = tiles.pad_axis(v, 1, s_pad).transpose(0, 2, 1, 3)
    lam5 = lam.astype(acc).reshape(1, num_kv, 1, group, 1)
    bias5 = tiles.group_operand(None if bias is None else bias.astype(acc), num_kv, group, t_pad, s_pad, 0.0)
    mask5 = tiles.group_operand(mask, num_kv, group, t_pad, s_pad, False)
    segments = segments or common.Segments()
    seg = tiles.TileSegments(
        None if segments.q_ids is None else tiles.pad_axis(segments.q_ids, 1, t_pad),
        None if segments.kv_ids is None else tiles.pad_axis(segments.kv_ids, 1, s_pad),
        segments.q_lengths, segments.kv_lengths)
    p_array = None if isinstance(p, float) else jnp.asarray(p, acc)
    out, lse = _flash(cfg, qg, kt, vt, lam5, bias5, mask5, seg, p_array,
                      None if dropout is None else dropout.rng)
    out = out.transpose(0, 2, 1, 3, 4).reshape(batch, t_pad, num_heads, v.shape[-1])[:, :q_len].astype(v.dtype)
    lse = lse.transpose(0, 1, 3, 2).reshape(batch, num_heads, t_pad)[:, :, :q_len]
    return common.AttentionResult(out, lse, None)


registry.register("blockwise", Blockwise())
