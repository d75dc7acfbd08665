"""The three Pallas programs: the forward (one program per query tile, streaming key tiles through the tile
core's online-softmax step), dq (per query tile; also the row sums of the lam and p gradients and the bias
gradient) and dk/dv (per key tile, streaming query tiles)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from distattn_jax.kernels import tiles as tile_core
from distattn_jax.kernels.pallas_gpu.config import CallConfig
from distattn_jax.kernels.pallas_gpu.gram import dot
from distattn_jax.kernels.pallas_gpu.tile import (feature_chunks, form_vjp, loader, logits_to_values,
                                                  order_params, pair)


def forward_program(*refs, cfg: CallConfig, names: list[str]):
  r = dict(zip(names, refs))
  out_ref, lse_ref = refs[len(names):]
  bq, bk = cfg.tiles.block_q, cfg.tiles.block_k
  q_ref, k_ref, v_ref = r["q"], r["k"], r["v"]
  dim = q_ref.shape[-1]
  num_k = k_ref.shape[0] // bk
  i = jax.lax.convert_element_type(pl.program_id(2), jnp.int32)
  q_start = i * bq
  lam = r["lam"][0].astype(jnp.float32)
  params = order_params(r)
  load_q = loader(q_ref, dim)

  def body(j, carry):
    o, m, l = carry
    k_start = j * bk
    k_slice = pl.ds(k_start, bk)
    _, _, logits = pair(cfg, r, load_q, loader(k_ref, dim, k_slice), dim, params, lam, q_start, k_start,
                         slice(None), k_slice)
    m, probs, correction, l = tile_core.online_step(m, l, logits)
    v = v_ref[k_slice, :]
    o = o * correction[:, None] + dot(probs.astype(v.dtype), v, precision=cfg.precision)
    return o, m, l

  init = (jnp.zeros((bq, v_ref.shape[-1]), jnp.float32), jnp.full((bq,), -jnp.inf, jnp.float32),
          jnp.zeros((bq,), jnp.float32))
  o, m, l = jax.lax.fori_loop(*tile_core.kv_block_range(cfg.geometry, i, num_k), body, init)
  out, lse = tile_core.finalize(o, m, l)
  out_ref[...] = out.astype(out_ref.dtype)
  lse_ref[...] = lse


def store_chunks(ref, chunks, parts, dim: int) -> None:
  """Writes a gradient accumulated per feature chunk (``chunks``) into its output tile."""
  for (c, size), part in zip(chunks, parts):
    if size == dim:
      ref[...] = part
    else:
      ref[:, pl.ds(c, size)] = part


def dq_program(*refs, cfg: CallConfig, names: list[str]):
  names = names + ["do", "lse", "delta"]
  r = dict(zip(names, refs))
  outs = list(refs[len(names):])
  dq_ref, dlam_ref = outs[0], outs[1]
  dp_ref = outs[2] if "p" in r else None
  dbias_ref = outs[-1] if cfg.bias_shape is not None else None
  bq, bk = cfg.tiles.block_q, cfg.tiles.block_k
  q_ref, k_ref, v_ref = r["q"], r["k"], r["v"]
  dim = q_ref.shape[-1]
  num_k = k_ref.shape[0] // bk
  i = jax.lax.convert_element_type(pl.program_id(2), jnp.int32)
  q_start = i * bq
  lam = r["lam"][0].astype(jnp.float32)
  params = order_params(r)
  scale = 1.0 / math.sqrt(cfg.head_dim)
  load_q = loader(q_ref, dim)
  do = r["do"][...]
  lse = r["lse"][...]
  lse_safe = jnp.where(jnp.isneginf(lse), 0.0, lse)
  delta = r["delta"][...]
  chunks = feature_chunks(cfg, dim)

  def body(j, carry):
    dq, dlam, dp = carry
    k_start = j * bk
    k_slice = pl.ds(k_start, bk)
    load_k = loader(k_ref, dim, k_slice)
    aux, score, logits = pair(cfg, r, load_q, load_k, dim, params, lam, q_start, k_start, slice(None), k_slice)
    probs = jnp.exp(logits - lse_safe[:, None])
    v = v_ref[k_slice, :]
    d_probs = dot(do, v, trans_b=True, precision=cfg.precision)
    d_logits = probs * (d_probs - delta[:, None])
    dlam = dlam + jnp.sum(d_logits * score, axis=1) * scale
    if dbias_ref is not None:
      dbias_ref[:, k_slice] = d_logits
    g = d_logits * (lam * logits_to_values(cfg))
    dqs, _, dp_rows = form_vjp(cfg, load_q, load_k, dim, params, aux, g, want_q=True, want_k=False)
    dq = tuple(a + b for a, b in zip(dq, dqs))
    if dp is not None:
      dp = dp + dp_rows
    return dq, dlam, dp

  init = (tuple(jnp.zeros((bq, size), jnp.float32) for _, size in chunks), jnp.zeros((bq,), jnp.float32),
          jnp.zeros((bq,), jnp.float32) if params else None)
  begin, end = tile_core.kv_block_range(cfg.geometry, i, num_k)
  dq, dlam, dp = jax.lax.fori_loop(begin, end, body, init)
  store_chunks(dq_ref, chunks, dq, dim)
  dlam_ref[...] = dlam
  if dp_ref is not None:
    dp_ref[...] = dp
  if dbias_ref is not None and (cfg.is_causal or cfg.geometry.local_window is not None):
    def zero(j, carry):
      dbias_ref[:, pl.ds(j * bk, bk)] = jnp.zeros((bq, bk), jnp.float32)
      return carry
    jax.lax.fori_loop(0, begin, zero, 0)
    jax.lax.fori_loop(end, num_k, zero, 0)


def dkv_program(*refs, cfg: CallConfig, names: list[str]):
  names = names + ["do", "lse", "delta"]
  r = dict(zip(names, refs))
  dk_ref, dv_ref = refs[len(names):]
  bq, bk = cfg.tiles.block_q, cfg.tiles.block_k
  q_ref, k_ref, v_ref = r["q"], r["k"], r["v"]
  dim = q_ref.shape[-1]
  num_q = q_ref.shape[0] // bq
  j = jax.lax.convert_element_type(pl.program_id(2), jnp.int32)
  k_start = j * bk
  lam = r["lam"][0].astype(jnp.float32)
  params = order_params(r)
  load_k = loader(k_ref, dim)
  v = v_ref[...]
  chunks = feature_chunks(cfg, dim)

  def body(i, carry):
    dk, dv = carry
    q_start = i * bq
    q_slice = pl.ds(q_start, bq)
    load_q = loader(q_ref, dim, q_slice)
    aux, _, logits = pair(cfg, r, load_q, load_k, dim, params, lam, q_start, k_start, q_slice, slice(None))
    lse = r["lse"][q_slice]
    probs = jnp.exp(logits - jnp.where(jnp.isneginf(lse), 0.0, lse)[:, None])
    do = r["do"][q_slice, :]
    dv = dv + dot(probs.astype(do.dtype), do, trans_a=True, precision=cfg.precision)
    d_probs = dot(do, v, trans_b=True, precision=cfg.precision)
    d_logits = probs * (d_probs - r["delta"][q_slice][:, None])
    g = d_logits * (lam * logits_to_values(cfg))
    _, dks, _ = form_vjp(cfg, load_q, load_k, dim, params, aux, g, want_q=False, want_k=True)
    return tuple(a + b for a, b in zip(dk, dks)), dv

  init = (tuple(jnp.zeros((bk, size), jnp.float32) for _, size in chunks),
          jnp.zeros((bk, v_ref.shape[-1]), jnp.float32))
  dk, dv = jax.lax.fori_loop(*tile_core.q_block_range(cfg.geometry, j, num_q), body, init)
  store_chunks(dk_ref, chunks, dk, dim)
  dv_ref[...] = dv
