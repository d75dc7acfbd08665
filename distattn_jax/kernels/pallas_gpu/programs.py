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
from distattn_jax.kernels.pallas_gpu.tile import (LN2, LOG2E, feature_chunks, feature_major, form_vjp, loader,
                                                  logits_to_values, order_params, pair)


def forward_program(*refs, cfg: CallConfig, names: list[str]):
  r = dict(zip(names, refs))
  out_ref, lse_ref = refs[len(names):]
  bq, bk = cfg.tiles.block_q, cfg.tiles.block_k
  q_ref, k_ref, v_ref = r["q"], r["k"], r["v"]
  dim = q_ref.shape[-1]
  num_k = k_ref.shape[0] // bk
  i = jax.lax.convert_element_type(pl.program_id(0), jnp.int32)
  q_start = i * bq
  lam = r["lam"][0].astype(jnp.float32)
  params = order_params(r)
  load_q = loader(cfg, q_ref, dim)

  def body(j, carry):
    o, m, l = carry
    k_start = j * bk
    k_slice = pl.ds(k_start, bk)
    _, _, logits = pair(cfg, r, load_q, loader(cfg, k_ref, dim, k_slice), dim, params, lam, q_start, k_start,
                         slice(None), k_slice)
    m, probs, correction, l = tile_core.online_step(m, l, logits, base2=True)
    v = v_ref[k_slice, :]
    o = o * correction[:, None] + dot(probs.astype(v.dtype), v, precision=cfg.precision)
    return o, m, l

  init = (jnp.zeros((bq, v_ref.shape[-1]), jnp.float32), jnp.full((bq,), -jnp.inf, jnp.float32),
          jnp.zeros((bq,), jnp.float32))
  o, m, l = jax.lax.fori_loop(*tile_core.kv_block_range(cfg.geometry, i, num_k), body, init)
  out, lse2 = tile_core.finalize(o, m, l, base2=True)
  out_ref[...] = out.astype(out_ref.dtype)
  lse_ref[...] = lse2 * LN2  # natural units at the interface (-inf stays -inf)


def gradient_init(cfg: CallConfig, chunks, rows: int):
  """Zero accumulators of a gradient kept per feature chunk: ``[rows, size]``, or ``[size, rows]`` where the
  form works feature-major."""
  major = feature_major(cfg)
  return tuple(jnp.zeros((size, rows) if major else (rows, size), jnp.float32) for _, size in chunks)


def store_chunks(cfg: CallConfig, ref, chunks, parts, dim: int) -> None:
  """Writes a gradient accumulated per feature chunk (``chunks``; feature-major parts are transposed once, here)
  into its output tile, and zeros into the features past the last chunk (padding the form never computed: the
  caller cuts them off, but an unwritten GPU buffer could hold NaNs), one chunk's width at a time (power-of-two
  stores)."""
  if feature_major(cfg):
    parts = [part.T for part in parts]
  for (c, size), part in zip(chunks, parts):
    if size == dim:
      ref[...] = part
    else:
      ref[:, pl.ds(c, size)] = part
  c, size = chunks[-1]
  rows = parts[-1].shape[0]
  for start in range(c + size, dim, size):
    ref[:, pl.ds(start, size)] = jnp.zeros((rows, size), jnp.float32)


class Picked:
  """A ref with some axes fixed at traced indices (the batch or head a dq pass works on), indexed and stored
  through like the ref of the remaining axes; how one dq program loops over the batch and heads a broadcast
  bias sums over."""

  def __init__(self, ref, fixed: dict):
    self.ref, self.fixed = ref, fixed
    self.shape = tuple(n for axis, n in enumerate(ref.shape) if axis not in fixed)

  def _index(self, idx):
    idx = idx if isinstance(idx, tuple) else (idx,)
    if any(x is Ellipsis for x in idx):
      at = idx.index(Ellipsis)
      idx = idx[:at] + (slice(None),) * (len(self.shape) - len(idx) + 1) + idx[at + 1:]
    idx = idx + (slice(None),) * (len(self.shape) - len(idx))
    free = iter(idx)
    return tuple(self.fixed[axis] if axis in self.fixed else next(free) for axis in range(len(self.ref.shape)))

  def __getitem__(self, idx):
    return self.ref[self._index(idx)]

  def __setitem__(self, idx, value):
    self.ref[self._index(idx)] = value


def dq_program(*refs, cfg: CallConfig, names: list[str], fixed: dict, want_bias: bool, passes: tuple[int, int]):
  """dq, the lam and p row sums and (``want_bias``) the bias gradient of one query tile.

  ``passes = (nb, nh)``: the program loops over ``nb`` batch entries and ``nh`` heads itself (the axes a
  broadcast bias sums its gradient over; ``fixed`` names the axes of each ref it indexes per pass) and adds each
  pass's bias gradient into its output tile; with one pass the tile is stored once."""
  names = names + ["do", "lse", "delta"]
  raw = dict(zip(names, refs))
  outs = list(refs[len(names):])
  raw["dq"], raw["dlam"] = outs[0], outs[1]
  if "p" in raw:
    raw["dp"] = outs[2]
  dbias_ref = outs[-1] if want_bias else None
  bq, bk = cfg.tiles.block_q, cfg.tiles.block_k
  nb, nh = passes
  accumulate = nb * nh > 1
  i = jax.lax.convert_element_type(pl.program_id(0), jnp.int32)
  q_start = i * bq
  scale = 1.0 / math.sqrt(cfg.head_dim)
  num_k = Picked(raw["k"], dict.fromkeys(fixed["k"], 0)).shape[0] // bk
  begin, end = tile_core.kv_block_range(cfg.geometry, i, num_k)
  if want_bias:
    # The bias gradient reduced to the bias's axes inside the tile: summed over the rows where it broadcasts over
    # the queries (one row per query tile), over the columns where it broadcasts over the keys.
    rows_b, cols_b = cfg.bias_shape[2] == 1, cfg.bias_shape[3] == 1
    tb = 1 if rows_b else bq

    def reduce_bias(d_logits):
      if rows_b:
        d_logits = jnp.sum(d_logits, axis=0, keepdims=True)
      if cols_b:
        d_logits = jnp.sum(d_logits, axis=1, keepdims=True)
      return d_logits

    def zero(j, carry):
      dbias_ref[:, pl.ds(j * bk, bk)] = jnp.zeros((tb, bk), jnp.float32)
      return carry

    if accumulate:
      # Every pass adds into the tile, so it starts at zero (key tiles a causal mask skips stay zero).
      if cols_b:
        dbias_ref[...] = jnp.zeros((tb, 1), jnp.float32)
      else:
        jax.lax.fori_loop(0, num_k, zero, 0)
    elif not cols_b and (cfg.is_causal or cfg.geometry.local_window is not None):
      jax.lax.fori_loop(0, begin, zero, 0)
      jax.lax.fori_loop(end, num_k, zero, 0)

  def one_pass(n, carry):
    # lax.div/rem, not // and % (jnp's floor division lowers to a sign select Triton's lowering rejects); the
    # pass index is never negative.
    b, h = jax.lax.div(n, nh), jax.lax.rem(n, nh)
    where = {"b": b, "h": h, "kv": jax.lax.div(h, cfg.group)}
    r = {name: Picked(ref, {axis: where[role] for axis, role in fixed[name].items()}) if fixed.get(name) else ref
         for name, ref in raw.items()}
    q_ref, k_ref, v_ref = r["q"], r["k"], r["v"]
    dim = q_ref.shape[-1]
    lam = (raw["lam"][h] if fixed["lam"] else raw["lam"][0]).astype(jnp.float32)
    params = order_params(r)
    load_q = loader(cfg, q_ref, dim)
    do = r["do"][...]
    lse = r["lse"][...]
    lse_safe = jnp.where(jnp.isneginf(lse), 0.0, lse) * LOG2E  # log2 units, as the logits
    delta = r["delta"][...]
    chunks = feature_chunks(cfg, dim)

    def body(j, carry):
      dq, dlam, dp, dbias_cols = carry
      k_start = j * bk
      k_slice = pl.ds(k_start, bk)
      load_k = loader(cfg, k_ref, dim, k_slice)
      aux, score, logits = pair(cfg, r, load_q, load_k, dim, params, lam, q_start, k_start, slice(None),
                                k_slice)
      probs = jnp.exp2(logits - lse_safe[:, None])
      v = v_ref[k_slice, :]
      d_probs = dot(do, v, trans_b=True, precision=cfg.precision)
      d_logits = probs * (d_probs - delta[:, None])
      dlam = dlam + jnp.sum(d_logits * score, axis=1) * scale
      if want_bias:
        part = reduce_bias(d_logits)
        if cols_b:
          dbias_cols = dbias_cols + part
        elif accumulate:
          dbias_ref[:, k_slice] = dbias_ref[:, k_slice] + part
        else:
          dbias_ref[:, k_slice] = part
      g = d_logits * (lam * logits_to_values(cfg))
      dqs, _, dp_rows = form_vjp(cfg, load_q, load_k, dim, params, aux, g, want_q=True, want_k=False)
      dq = tuple(a + b for a, b in zip(dq, dqs))
      if dp is not None:
        dp = dp + dp_rows
      return dq, dlam, dp, dbias_cols

    init = (gradient_init(cfg, chunks, bq), jnp.zeros((bq,), jnp.float32),
            jnp.zeros((bq,), jnp.float32) if params else None,
            jnp.zeros((tb, 1), jnp.float32) if want_bias and cols_b else None)
    dq, dlam, dp, dbias_cols = jax.lax.fori_loop(begin, end, body, init)
    store_chunks(cfg, r["dq"], chunks, dq, dim)
    r["dlam"][...] = dlam
    if "dp" in r:
      r["dp"][...] = dp
    if dbias_cols is not None:
      dbias_ref[...] = dbias_ref[...] + dbias_cols if accumulate else dbias_cols
    return carry

  if accumulate:
    jax.lax.fori_loop(0, nb * nh, one_pass, 0)
  else:
    one_pass(jnp.int32(0), 0)


def dkv_program(*refs, cfg: CallConfig, names: list[str]):
  names = names + ["do", "lse", "delta"]
  r = dict(zip(names, refs))
  dk_ref, dv_ref = refs[len(names):]
  bq, bk = cfg.tiles.block_q, cfg.tiles.block_k
  q_ref, k_ref, v_ref = r["q"], r["k"], r["v"]
  dim = q_ref.shape[-1]
  num_q = q_ref.shape[0] // bq
  j = jax.lax.convert_element_type(pl.program_id(0), jnp.int32)
  k_start = j * bk
  lam = r["lam"][0].astype(jnp.float32)
  params = order_params(r)
  load_k = loader(cfg, k_ref, dim)
  v = v_ref[...]
  chunks = feature_chunks(cfg, dim)

  def body(i, carry):
    dk, dv = carry
    q_start = i * bq
    q_slice = pl.ds(q_start, bq)
    load_q = loader(cfg, q_ref, dim, q_slice)
    aux, _, logits = pair(cfg, r, load_q, load_k, dim, params, lam, q_start, k_start, q_slice, slice(None))
    lse = r["lse"][q_slice]
    probs = jnp.exp2(logits - (jnp.where(jnp.isneginf(lse), 0.0, lse) * LOG2E)[:, None])
    do = r["do"][q_slice, :]
    dv = dv + dot(probs.astype(do.dtype), do, trans_a=True, precision=cfg.precision)
    d_probs = dot(do, v, trans_b=True, precision=cfg.precision)
    d_logits = probs * (d_probs - r["delta"][q_slice][:, None])
    g = d_logits * (lam * logits_to_values(cfg))
    _, dks, _ = form_vjp(cfg, load_q, load_k, dim, params, aux, g, want_q=False, want_k=True)
    return tuple(a + b for a, b in zip(dk, dks)), dv

  init = (gradient_init(cfg, chunks, bk), jnp.zeros((bk, v_ref.shape[-1]), jnp.float32))
  dk, dv = jax.lax.fori_loop(*tile_core.q_block_range(cfg.geometry, j, num_q), body, init)
  store_chunks(cfg, dk_ref, chunks, dk, dim)
  dv_ref[...] = dv
