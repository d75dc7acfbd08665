"""A fused GPU kernel for every metric in ``jax.experimental.pallas`` (the Triton lowering).

Forward: one program per (batch, query head, query tile). The query tile stays on chip while the program
streams the key/value tiles of its key/value head (grouped-query heads map through the BlockSpec index maps),
computes the score tile, keeps the online-softmax statistics in float32 and writes the output and ``lse``.
Backward (``jax.custom_vjp``): a dq kernel (one program per query tile, streaming key tiles; it also writes the
per-row partial sums of the ``lam`` and ``p`` gradients and the bias gradient) and a dk/dv kernel (one program
per key tile, streaming query tiles). Neither holds anything of size ``T x S`` except the bias gradient, which
is only produced when a bias (itself ``T x S``) is given.

The kernel is generated from the metric record (:mod:`distattn_jax.metrics.record`), so a user-registered
metric gets a fused kernel too:

* :class:`~distattn_jax.metrics.Gram` forms: each term ``sum_d x^a y^b`` is a matmul on the tensor cores
  (``pl.dot``), or a row sum where an exponent is 0; the record's ``fn`` is applied to the tiles, and its
  derivative comes from ``jax.vjp`` of ``fn`` on the tile. Centring (translation-invariant records) and row
  normalisation (``normalize=True``) are applied to ``q`` and ``k`` before the kernel, in float32, so autodiff
  carries their gradient.
* :class:`~distattn_jax.metrics.Elementwise` forms: the ``[bq, 1, bd] - [1, bk, bd]`` difference tile is
  reduced on the CUDA cores in float32, ``bd`` features at a time; ``phi``'s and ``root``'s derivatives come
  from ``jax.jvp`` of the record's own functions, with the same conventions as :mod:`.metrics.elementwise`
  (ties of ``reduce="max"`` share the gradient, a non-finite root derivative gives 0, ``rescale``).

With ``is_causal`` key tiles entirely above the diagonal are skipped. Segment ids and sequence lengths are
evaluated per tile from ``[B, T]``/``[B, S]`` arrays; lengths that are not multiples of the tile are padded
inside and the padding masked. ``interpret=True`` runs the same kernel through Pallas' interpreter on any
backend (CPU in the tests).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from distattn_jax import metrics
from distattn_jax.kernels import base, common, registry
from distattn_jax.kernels import tiles as tile_core
from distattn_jax.metrics import gram as gram_lib

Array = jax.Array

_MIN_BLOCK = 16  # tl.dot needs every matmul dimension to be at least 16
_DTYPES = ("float32", "bfloat16", "float16")  # Triton has no float64 tensor-core or exp path worth taking


def _next_pow2(n: int) -> int:
  return 1 << max(0, int(n) - 1).bit_length()


def _is_pow2(n: Any) -> bool:
  return isinstance(n, int) and not isinstance(n, bool) and n >= 1 and (n & (n - 1)) == 0


@dataclasses.dataclass(frozen=True)
class Tiles:
  """The kernel's tiles and launch parameters (all powers of two; Triton loads power-of-two tiles only).

  Attributes:
    block_q, block_k: query and key positions per tile.
    block_d: features per step of an elementwise form's ``[block_q, block_k, block_d]`` difference tile.
    num_warps, num_stages: Triton launch parameters.
  """

  block_q: int
  block_k: int
  block_d: int
  num_warps: int = 4
  num_stages: int = 2


def default_tiles(metric: str, p: Any, head_dim: int) -> Tiles:
  """Tiles for ``metric`` at order ``p`` and ``head_dim`` features. Not yet tuned on a GPU (no measurement
  exists; ``experiments/gpu_report.sh`` is where one would come from). The reasoning:

  * gram forms follow FlashAttention-2 on Triton: 128 x 64 tiles with 4 warps up to 64 features; at 128
    features the q tile and the float32 accumulator double, so 64 x 64 with 8 warps keeps them in registers.
  * elementwise forms hold a ``[bq, bk, bd]`` float32 difference tile in registers besides the ``[bq, bk]``
    scores: 64 x 32 x 8 is 16K values, 128 per thread at 4 warps, about half of the 255-register budget, so
    the tile neither spills nor leaves the streaming multiprocessor idle; ``bd = 8`` also keeps the feature
    loop short (8 steps at 64 features). One pipeline stage: the key tile is read feature chunk by feature
    chunk inside the loop body, so a second shared-memory buffer would only take registers from the tile.
  """
  form = metrics.get(metric).resolve(p if isinstance(p, float) else None)
  dp = max(_MIN_BLOCK, _next_pow2(head_dim))
  if isinstance(form, metrics.Gram):
    if dp <= 64:
      return Tiles(block_q=128, block_k=64, block_d=dp, num_warps=4, num_stages=2)
    return Tiles(block_q=64, block_k=64, block_d=dp, num_warps=8, num_stages=2)
  return Tiles(block_q=64, block_k=32, block_d=min(8, dp), num_warps=4, num_stages=1)


class _Config(NamedTuple):
  """Everything static about one call (hashable: the custom_vjp's non-differentiable argument)."""

  metric: str
  p: float | None  # None when p is traced
  is_causal: bool
  tiles: Tiles
  q_len: int
  kv_len: int
  head_dim: int
  group: int
  precision: Any
  bias_shape: tuple[int, ...] | None
  mask_shape: tuple[int, ...] | None
  has_ids: bool
  has_kv_valid: bool
  interpret: bool
  # The tile geometry as the tile core sees it (which tiles a causal mask or a window lets a query tile skip).
  geometry: tile_core.TileConfig


# ------------------------------------------------------------------------------------------------------------
# Score tiles generated from the metric record.


def _form(cfg: _Config):
  return metrics.get(cfg.metric).resolve(cfg.p)


def _chunks(cfg: _Config, dim: int) -> list[tuple[int, int]]:
  step = cfg.tiles.block_d if isinstance(_form(cfg), metrics.Elementwise) else dim
  return [(c, min(step, dim - c)) for c in range(0, dim, step)]


def _feature_valid(cfg: _Config, start: int, size: int):
  """``[1, 1, size]`` True on real features, or None when the chunk has no padded feature."""
  if start + size <= cfg.head_dim:
    return None
  return (start + jnp.arange(size) < cfg.head_dim).reshape(1, 1, size)


def _elementwise_parts(cfg: _Config, load_q, load_k, dim: int, params: tuple):
  """The reduced value ``s`` and, with ``rescale``, ``(scale, inv_scale)`` of an elementwise form's tile."""
  form = _form(cfg)
  chunks = _chunks(cfg, dim)

  def diff(c, size):
    return load_q(c, size).astype(jnp.float32)[:, None, :] - load_k(c, size).astype(jnp.float32)[None, :, :]

  scale = inv = None
  if form.rescale:
    largest = None
    for c, size in chunks:
      m = jnp.max(jnp.abs(diff(c, size)), axis=-1)
      largest = m if largest is None else jnp.maximum(largest, m)
    scale = jnp.where(largest == 0, 1.0, largest)
    inv = 1.0 / scale
  s = None
  for c, size in chunks:
    u = diff(c, size)
    if inv is not None:
      u = u * inv[:, :, None]
    ph = form.phi(u, *params).astype(jnp.float32)
    valid = _feature_valid(cfg, c, size)
    if form.reduce == "sum":
      if valid is not None:
        ph = jnp.where(valid, ph, 0.0)
      part = jnp.sum(ph, axis=-1)
      s = part if s is None else s + part
    else:
      if valid is not None:
        ph = jnp.where(valid, ph, -jnp.inf)
      part = jnp.max(ph, axis=-1)
      s = part if s is None else jnp.maximum(s, part)
  return s, scale, inv


def _gram_parts(cfg: _Config, q, k):
  """The gram tiles of the record's terms: ``[bq, bk]`` matmuls, ``[bq, 1]`` / ``[1, bk]`` row sums."""
  form = _form(cfg)
  grams = []
  for a, b in form.terms:
    if b == 0:
      grams.append(jnp.sum(_pow(q, a), axis=1)[:, None])
    elif a == 0:
      grams.append(jnp.sum(_pow(k, b), axis=1)[None, :])
    else:
      grams.append(_dot(_pow(q, a, keep=True), _pow(k, b, keep=True), trans_b=True))
  return grams


def _pow(x, a: int, keep: bool = False):
  """``x ** a`` in float32; a first power keeps the input dtype when ``keep`` (bf16 products are exact in the
  float32 accumulator of the matmul)."""
  if a == 1:
    return x if keep else x.astype(jnp.float32)
  return jax.lax.integer_pow(x.astype(jnp.float32), a)


def _dot(a, b, trans_a=False, trans_b=False, precision=jax.lax.Precision.HIGHEST):
  dtype = jnp.promote_types(a.dtype, b.dtype)
  return plgpu.dot(a.astype(dtype), b.astype(dtype), trans_a=trans_a, trans_b=trans_b, precision=precision)


def _form_value(cfg: _Config, load_q, load_k, dim: int, params: tuple, shape):
  """The form's value ``[bq, bk]`` (float32) and what its VJP needs."""
  form = _form(cfg)
  if isinstance(form, metrics.Gram):
    grams = _gram_parts(cfg, load_q(0, dim), load_k(0, dim))
    value = jnp.broadcast_to(jnp.asarray(form.fn(*grams)).astype(jnp.float32), shape)
    return value, grams
  s, scale, inv = _elementwise_parts(cfg, load_q, load_k, dim, params)
  value = s if form.root is None else form.root(s, *params).astype(jnp.float32)
  if scale is not None:
    value = scale * value
  return value, (s, scale, inv)


def _form_vjp(cfg: _Config, load_q, load_k, dim: int, params: tuple, aux, g, *, want_q: bool, want_k: bool):
  """Cotangents of the form's value tile for cotangent ``g [bq, bk]``: lists of per-chunk ``dq [bq, c]``,
  ``dk [bk, c]`` (None when not wanted) and the p cotangent per query row ``[bq]`` (None for no p)."""
  form = _form(cfg)
  chunks = _chunks(cfg, dim)
  if isinstance(form, metrics.Gram):
    grams = aux
    shape = g.shape
    full = [jnp.broadcast_to(x, shape) for x in grams]
    _, fn_vjp = jax.vjp(lambda *xs: jnp.broadcast_to(jnp.asarray(form.fn(*xs)).astype(jnp.float32), shape),
                        *full)
    dgrams = fn_vjp(g)
    q, k = load_q(0, dim), load_k(0, dim)
    dq = jnp.zeros((shape[0], dim), jnp.float32) if want_q else None
    dk = jnp.zeros((shape[1], dim), jnp.float32) if want_k else None
    for (a, b), dg in zip(form.terms, dgrams):
      if a > 0 and want_q:
        inner = (jnp.sum(dg, axis=1)[:, None] if b == 0 else
                 _dot(dg.astype(_operand_dtype(k)), _pow(k, b, keep=True)))
        dq = dq + (inner if a == 1 else a * _pow(q, a - 1) * inner)
      if b > 0 and want_k:
        inner = (jnp.sum(dg, axis=0)[:, None] if a == 0 else
                 _dot(dg.astype(_operand_dtype(q)), _pow(q, a, keep=True), trans_a=True))
        dk = dk + (inner if b == 1 else b * _pow(k, b - 1) * inner)
    return [dq], [dk], None

  s, scale, inv = aux
  dp_rows = None
  if form.root is None:
    c = g
  else:
    _, slope = jax.jvp(lambda x: form.root(x, *params), (s,), (jnp.ones_like(s),))
    finite = jnp.isfinite(slope)
    c = jnp.where(finite, g * jnp.where(finite, slope, 0.0), 0.0)
    if params:
      root_p = _param_slope(lambda pp: form.root(s, pp), params[0], s.shape)
      pair = jnp.where(finite, g * root_p * (1.0 if scale is None else scale), 0.0)
      dp_rows = jnp.sum(pair, axis=1)

  def unit(cc, size):
    return load_q(cc, size).astype(jnp.float32)[:, None, :] - load_k(cc, size).astype(jnp.float32)[None, :, :]

  def scaled(cc, size):
    u = unit(cc, size)
    return u if inv is None else u * inv[:, :, None]

  if form.reduce == "max":
    ties = None
    for cc, size in chunks:
      hit = form.phi(scaled(cc, size), *params) == s[:, :, None]
      valid = _feature_valid(cfg, cc, size)
      if valid is not None:
        hit = jnp.logical_and(hit, valid)
      n = jnp.sum(hit.astype(jnp.float32), axis=-1)
      ties = n if ties is None else ties + n
    c = c / jnp.maximum(ties, 1.0)
  dqs, dks = [], []
  for cc, size in chunks:
    u = scaled(cc, size)
    value, slope = jax.jvp(lambda x: form.phi(x, *params), (u,), (jnp.ones_like(u),))
    coef = c[:, :, None]
    if form.reduce == "max":
      coef = jnp.where(value == s[:, :, None], coef, 0.0)
    w = coef * slope
    valid = _feature_valid(cfg, cc, size)
    if valid is not None:
      w = jnp.where(valid, w, 0.0)
    dqs.append(jnp.sum(w, axis=1) if want_q else None)
    dks.append(-jnp.sum(w, axis=0) if want_k else None)
    if params:
      phi_p = _param_slope(lambda pp: form.phi(u, pp), params[0], u.shape)
      extra = coef * phi_p
      if valid is not None:
        extra = jnp.where(valid, extra, 0.0)
      extra = jnp.sum(extra, axis=-1)
      if scale is not None:
        extra = extra * scale
      extra = jnp.sum(extra, axis=1)
      dp_rows = extra if dp_rows is None else dp_rows + extra
  return dqs, dks, dp_rows


def _param_slope(fn, p, shape):
  """``d fn(p) / dp`` elementwise over ``shape``. The order is broadcast to the tile first: a scalar tangent
  would be a literal, and Triton's lowering cannot negate a literal."""
  full = jnp.broadcast_to(p, shape)
  return jax.jvp(fn, (full,), (jnp.ones_like(full),))[1]


def _operand_dtype(x):
  # The score cotangent meets bf16 operands in bf16 on the tensor cores (as in FlashAttention-2), float32 ones
  # in float32.
  return x.dtype if x.dtype == jnp.bfloat16 else jnp.float32


# ------------------------------------------------------------------------------------------------------------
# Masks and the tile operands (bias, dense mask, ids) of one tile.


def _broadcast_tile(ref, shape, q_slice, k_slice, tq, tk):
  """The ``[tq, tk]`` tile of a ``[.., T|1, S|1]`` operand whose block is ``[Tblk|1, Sblk|1]``."""
  rows = q_slice if shape[2] != 1 else slice(None)
  cols = k_slice if shape[3] != 1 else slice(None)
  return jnp.broadcast_to(ref[rows, cols], (tq, tk))


def _tile_allowed(cfg: _Config, r: dict, q_start, k_start, q_slice, k_slice, tq: int, tk: int):
  """Bool ``[tq, tk]`` (or None): the mask rule (:func:`common.allowed_pairs`: padded keys, causal, window,
  ids), key validity and the dense mask."""
  q_pos = (q_start + jnp.arange(tq))[:, None]
  k_pos = (k_start + jnp.arange(tk))[None, :]
  allowed = common.allowed_pairs(
      q_pos, k_pos, is_causal=cfg.is_causal, local_window=cfg.geometry.local_window,
      q_ids=r["q_ids"][q_slice][:, None] if cfg.has_ids else None,
      kv_ids=r["kv_ids"][k_slice][None, :] if cfg.has_ids else None,
      kv_len=cfg.kv_len if cfg.kv_len % cfg.tiles.block_k else None)
  for extra in ((r["kv_valid"][k_slice][None, :] != 0) if cfg.has_kv_valid else None,
                (_broadcast_tile(r["mask"], cfg.mask_shape, q_slice, k_slice, tq, tk) != 0)
                if cfg.mask_shape is not None else None):
    if extra is not None:
      allowed = extra if allowed is None else jnp.logical_and(allowed, extra)
  return None if allowed is None else jnp.broadcast_to(allowed, (tq, tk))


def _logits(cfg: _Config, r: dict, value, lam, q_slice, k_slice, allowed, tq, tk):
  scale = 1.0 / math.sqrt(cfg.head_dim)
  score = value if metrics.get(cfg.metric).similarity else -value
  logits = score * (lam * scale)
  if cfg.bias_shape is not None:
    logits = logits + _broadcast_tile(r["bias"], cfg.bias_shape, q_slice, k_slice, tq, tk).astype(
        jnp.float32)
  if allowed is not None:
    logits = jnp.where(allowed, logits, -jnp.inf)
  return score, logits


def _params(r: dict) -> tuple:
  return (r["p"][0],) if "p" in r else ()


def _loader(ref, dim: int, rows=None):
  """``load(c, size)``: features ``[c, c + size)`` of a tile. The kernel's own tile (``rows=None``) is read once
  and stays on chip for the whole loop; the loop's tiles are read as sliced."""
  if rows is None:
    tile = ref[...]
    return lambda c, size: tile if size == dim else ref[:, pl.ds(c, size)]
  return lambda c, size: ref[rows, pl.ds(c, size)]


def _pair(cfg: _Config, r: dict, load_q, load_k, dim: int, params: tuple, lam, q_start, k_start, q_slice,
          k_slice):
  """One (query tile, key tile) pair as all three kernels see it: the form's residuals, the score (the negated
  distance, or the similarity) and the masked logits, ``[block_q, block_k]``."""
  bq, bk = cfg.tiles.block_q, cfg.tiles.block_k
  value, aux = _form_value(cfg, load_q, load_k, dim, params, (bq, bk))
  allowed = _tile_allowed(cfg, r, q_start, k_start, q_slice, k_slice, bq, bk)
  score, logits = _logits(cfg, r, value, lam, q_slice, k_slice, allowed, bq, bk)
  return aux, score, logits


def _logits_to_values(cfg: _Config) -> float:
  """``d logits / d value`` per unit lam: the scale, signed by whether the form is a similarity."""
  return (1.0 if metrics.get(cfg.metric).similarity else -1.0) / math.sqrt(cfg.head_dim)


# ------------------------------------------------------------------------------------------------------------
# Kernels.


def _forward_kernel(*refs, cfg: _Config, names: list[str]):
  r = dict(zip(names, refs))
  out_ref, lse_ref = refs[len(names):]
  bq, bk = cfg.tiles.block_q, cfg.tiles.block_k
  q_ref, k_ref, v_ref = r["q"], r["k"], r["v"]
  dim = q_ref.shape[-1]
  num_k = k_ref.shape[0] // bk
  i = jax.lax.convert_element_type(pl.program_id(2), jnp.int32)
  q_start = i * bq
  lam = r["lam"][0].astype(jnp.float32)
  params = _params(r)
  load_q = _loader(q_ref, dim)

  def body(j, carry):
    o, m, l = carry
    k_start = j * bk
    k_slice = pl.ds(k_start, bk)
    _, _, logits = _pair(cfg, r, load_q, _loader(k_ref, dim, k_slice), dim, params, lam, q_start, k_start,
                         slice(None), k_slice)
    m, probs, correction, l = tile_core.online_step(m, l, logits)
    v = v_ref[k_slice, :]
    o = o * correction[:, None] + _dot(probs.astype(v.dtype), v, precision=cfg.precision)
    return o, m, l

  init = (jnp.zeros((bq, v_ref.shape[-1]), jnp.float32), jnp.full((bq,), -jnp.inf, jnp.float32),
          jnp.zeros((bq,), jnp.float32))
  o, m, l = jax.lax.fori_loop(*tile_core.kv_block_range(cfg.geometry, i, num_k), body, init)
  out, lse = tile_core.finalize(o, m, l)
  out_ref[...] = out.astype(out_ref.dtype)
  lse_ref[...] = lse


def _store_chunks(ref, chunks, parts, dim: int) -> None:
  """Writes a gradient accumulated per feature chunk (``_chunks``) into its output tile."""
  for (c, size), part in zip(chunks, parts):
    if size == dim:
      ref[...] = part
    else:
      ref[:, pl.ds(c, size)] = part


def _dq_kernel(*refs, cfg: _Config, names: list[str]):
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
  params = _params(r)
  scale = 1.0 / math.sqrt(cfg.head_dim)
  load_q = _loader(q_ref, dim)
  do = r["do"][...]
  lse = r["lse"][...]
  lse_safe = jnp.where(jnp.isneginf(lse), 0.0, lse)
  delta = r["delta"][...]
  chunks = _chunks(cfg, dim)

  def body(j, carry):
    dq, dlam, dp = carry
    k_start = j * bk
    k_slice = pl.ds(k_start, bk)
    load_k = _loader(k_ref, dim, k_slice)
    aux, score, logits = _pair(cfg, r, load_q, load_k, dim, params, lam, q_start, k_start, slice(None), k_slice)
    probs = jnp.exp(logits - lse_safe[:, None])
    v = v_ref[k_slice, :]
    d_probs = _dot(do, v, trans_b=True, precision=cfg.precision)
    d_logits = probs * (d_probs - delta[:, None])
    dlam = dlam + jnp.sum(d_logits * score, axis=1) * scale
    if dbias_ref is not None:
      dbias_ref[:, k_slice] = d_logits
    g = d_logits * (lam * _logits_to_values(cfg))
    dqs, _, dp_rows = _form_vjp(cfg, load_q, load_k, dim, params, aux, g, want_q=True, want_k=False)
    dq = tuple(a + b for a, b in zip(dq, dqs))
    if dp is not None:
      dp = dp + dp_rows
    return dq, dlam, dp

  init = (tuple(jnp.zeros((bq, size), jnp.float32) for _, size in chunks), jnp.zeros((bq,), jnp.float32),
          jnp.zeros((bq,), jnp.float32) if params else None)
  begin, end = tile_core.kv_block_range(cfg.geometry, i, num_k)
  dq, dlam, dp = jax.lax.fori_loop(begin, end, body, init)
  _store_chunks(dq_ref, chunks, dq, dim)
  dlam_ref[...] = dlam
  if dp_ref is not None:
    dp_ref[...] = dp
  if dbias_ref is not None and (cfg.is_causal or cfg.geometry.local_window is not None):
    def zero(j, carry):
      dbias_ref[:, pl.ds(j * bk, bk)] = jnp.zeros((bq, bk), jnp.float32)
      return carry
    jax.lax.fori_loop(0, begin, zero, 0)
    jax.lax.fori_loop(end, num_k, zero, 0)


def _dkv_kernel(*refs, cfg: _Config, names: list[str]):
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
  params = _params(r)
  load_k = _loader(k_ref, dim)
  v = v_ref[...]
  chunks = _chunks(cfg, dim)

  def body(i, carry):
    dk, dv = carry
    q_start = i * bq
    q_slice = pl.ds(q_start, bq)
    load_q = _loader(q_ref, dim, q_slice)
    aux, _, logits = _pair(cfg, r, load_q, load_k, dim, params, lam, q_start, k_start, q_slice, slice(None))
    lse = r["lse"][q_slice]
    probs = jnp.exp(logits - jnp.where(jnp.isneginf(lse), 0.0, lse)[:, None])
    do = r["do"][q_slice, :]
    dv = dv + _dot(probs.astype(do.dtype), do, trans_a=True, precision=cfg.precision)
    d_probs = _dot(do, v, trans_b=True, precision=cfg.precision)
    d_logits = probs * (d_probs - r["delta"][q_slice][:, None])
    g = d_logits * (lam * _logits_to_values(cfg))
    _, dks, _ = _form_vjp(cfg, load_q, load_k, dim, params, aux, g, want_q=False, want_k=True)
    return tuple(a + b for a, b in zip(dk, dks)), dv

  init = (tuple(jnp.zeros((bk, size), jnp.float32) for _, size in chunks),
          jnp.zeros((bk, v_ref.shape[-1]), jnp.float32))
  dk, dv = jax.lax.fori_loop(*tile_core.q_block_range(cfg.geometry, j, num_q), body, init)
  _store_chunks(dk_ref, chunks, dk, dim)
  dv_ref[...] = dv


# ------------------------------------------------------------------------------------------------------------
# pallas_call wrappers over the padded layout:
#   q [B, Tp, H, Dp], k [B, Sp, K, Dp], v [B, Sp, K, Dvp], lam [H], bias/mask [B|1, H|1, Tp|1, Sp|1],
#   q_ids [B, Tp], kv_ids [B, Sp], kv_valid [B, Sp], p [1].


def _in_specs(cfg: _Config, names: list[str], shapes: dict, *, by_q: bool):
  """BlockSpecs over the grid (batch, head, tile): ``by_q`` tiles the queries (forward, dq), else the keys."""
  bq, bk = cfg.tiles.block_q, cfg.tiles.block_k
  g = cfg.group
  t_pad, s_pad = shapes["q"][1], shapes["k"][1]
  tq = bq if by_q else t_pad
  tk = s_pad if by_q else bk
  qi = (lambda t: t) if by_q else (lambda t: 0)
  ki = (lambda t: 0) if by_q else (lambda t: t)
  specs = []
  for name in names:
    shape = shapes[name]
    if name == "q":
      specs.append(pl.BlockSpec((None, tq, None, shape[-1]), lambda b, h, t: (b, qi(t), h, 0)))
    elif name in ("k", "v"):
      specs.append(pl.BlockSpec((None, tk, None, shape[-1]), lambda b, h, t: (b, ki(t), h // g, 0)))
    elif name == "lam":
      specs.append(pl.BlockSpec((1,), lambda b, h, t: (h,)))
    elif name == "p":
      specs.append(pl.BlockSpec((1,), lambda b, h, t: (0,)))
    elif name in ("bias", "mask"):
      bb, hh, tt, ss = shape
      specs.append(pl.BlockSpec(
          (None, None, tq if tt > 1 else 1, tk if ss > 1 else 1),
          lambda b, h, t, bb=bb, hh=hh, tt=tt, ss=ss: (b if bb > 1 else 0, h if hh > 1 else 0,
                                                       qi(t) if tt > 1 else 0, ki(t) if ss > 1 else 0)))
    elif name == "q_ids":
      specs.append(pl.BlockSpec((None, tq), lambda b, h, t: (b, qi(t))))
    elif name in ("kv_ids", "kv_valid"):
      specs.append(pl.BlockSpec((None, tk), lambda b, h, t: (b, ki(t))))
    elif name == "do":
      specs.append(pl.BlockSpec((None, tq, None, shape[-1]), lambda b, h, t: (b, qi(t), h, 0)))
    elif name in ("lse", "delta"):
      specs.append(pl.BlockSpec((None, None, tq), lambda b, h, t: (b, h, qi(t))))
    else:
      raise AssertionError(name)
  return specs


def _compiler_params(cfg: _Config):
  return plgpu.CompilerParams(num_warps=cfg.tiles.num_warps, num_stages=cfg.tiles.num_stages)


def _call_forward(cfg: _Config, inputs: dict):
  names = list(inputs)
  shapes = {n: x.shape for n, x in inputs.items()}
  batch, t_pad, num_heads, _ = shapes["q"]
  v_dim = shapes["v"][-1]
  bq = cfg.tiles.block_q
  return pl.pallas_call(
      functools.partial(_forward_kernel, cfg=cfg, names=names),
      grid=(batch, num_heads, t_pad // bq),
      in_specs=_in_specs(cfg, names, shapes, by_q=True),
      out_specs=[pl.BlockSpec((None, bq, None, v_dim), lambda b, h, t: (b, t, h, 0)),
                 pl.BlockSpec((None, None, bq), lambda b, h, t: (b, h, t))],
      out_shape=[jax.ShapeDtypeStruct((batch, t_pad, num_heads, v_dim), jnp.float32),
                 jax.ShapeDtypeStruct((batch, num_heads, t_pad), jnp.float32)],
      compiler_params=_compiler_params(cfg), interpret=cfg.interpret, name="distance_attention_fwd",
  )(*inputs.values())


def _call_backward(cfg: _Config, inputs: dict, do, lse, delta):
  names = list(inputs)
  every = dict(inputs, do=do, lse=lse, delta=delta)
  shapes = {n: x.shape for n, x in every.items()}
  batch, t_pad, num_heads, dim = shapes["q"]
  s_pad, v_dim = shapes["k"][1], shapes["v"][-1]
  bq, bk = cfg.tiles.block_q, cfg.tiles.block_k
  all_names = names + ["do", "lse", "delta"]
  rows = jax.ShapeDtypeStruct((batch, num_heads, t_pad), jnp.float32)
  row_spec = pl.BlockSpec((None, None, bq), lambda b, h, t: (b, h, t))
  out_shape = [jax.ShapeDtypeStruct((batch, t_pad, num_heads, dim), jnp.float32), rows]
  out_specs = [pl.BlockSpec((None, bq, None, dim), lambda b, h, t: (b, t, h, 0)), row_spec]
  if "p" in inputs:
    out_shape.append(rows)
    out_specs.append(row_spec)
  if cfg.bias_shape is not None:
    out_shape.append(jax.ShapeDtypeStruct((batch, num_heads, t_pad, s_pad), jnp.float32))
    out_specs.append(pl.BlockSpec((None, None, bq, s_pad), lambda b, h, t: (b, h, t, 0)))
  dq_outs = pl.pallas_call(
      functools.partial(_dq_kernel, cfg=cfg, names=names),
      grid=(batch, num_heads, t_pad // bq),
      in_specs=_in_specs(cfg, all_names, shapes, by_q=True),
      out_specs=out_specs, out_shape=out_shape,
      compiler_params=_compiler_params(cfg), interpret=cfg.interpret, name="distance_attention_dq",
  )(*every.values())
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, cfg=cfg, names=names),
      grid=(batch, num_heads, s_pad // bk),
      in_specs=_in_specs(cfg, all_names, shapes, by_q=False),
      out_specs=[pl.BlockSpec((None, bk, None, dim), lambda b, h, t: (b, t, h, 0)),
                 pl.BlockSpec((None, bk, None, v_dim), lambda b, h, t: (b, t, h, 0))],
      out_shape=[jax.ShapeDtypeStruct((batch, s_pad, num_heads, dim), jnp.float32),
                 jax.ShapeDtypeStruct((batch, s_pad, num_heads, v_dim), jnp.float32)],
      compiler_params=_compiler_params(cfg), interpret=cfg.interpret, name="distance_attention_dkv",
  )(*every.values())
  return dq_outs, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fused(cfg: _Config, inputs: dict):
  return _call_forward(cfg, inputs)


def _fused_fwd(cfg, inputs):
  out, lse = _call_forward(cfg, inputs)
  return (out, lse), (inputs, out, lse)


def _fused_bwd(cfg, res, cotangents):
  inputs, out, lse = res
  d_out, d_lse = cotangents
  delta = tile_core.row_terms(out, d_out, d_lse.transpose(0, 2, 1)).transpose(0, 2, 1)
  do = d_out.astype(inputs["v"].dtype)
  dq_outs, dk, dv = _call_backward(cfg, inputs, do, lse, delta)
  dq, dlam_rows = dq_outs[0], dq_outs[1]
  batch, s_pad, num_heads, dim = dk.shape
  num_kv = inputs["k"].shape[2]
  grads = {name: None for name in inputs}
  q, k, v = inputs["q"], inputs["k"], inputs["v"]
  grads["q"] = dq.astype(q.dtype)
  grads["k"] = dk.reshape(batch, s_pad, num_kv, cfg.group, dim).sum(3).astype(k.dtype)
  grads["v"] = dv.reshape(batch, s_pad, num_kv, cfg.group, dv.shape[-1]).sum(3).astype(v.dtype)
  grads["lam"] = jnp.sum(dlam_rows, axis=(0, 2)).astype(inputs["lam"].dtype)
  if "p" in inputs:
    grads["p"] = jnp.sum(dq_outs[2]).reshape(1).astype(inputs["p"].dtype)
  if "bias" in inputs:
    grads["bias"] = metrics.sum_to_shape(dq_outs[-1], inputs["bias"].shape).astype(inputs["bias"].dtype)
  return (grads,)


_fused.defvjp(_fused_fwd, _fused_bwd)


# ------------------------------------------------------------------------------------------------------------
# The kernel object.


def _check_block(owner: str, name: str, value: Any):
  if value is not None and not (_is_pow2(value) and value >= _MIN_BLOCK):
    raise ValueError(f"{owner}: {name} must be None or a power of two >= {_MIN_BLOCK} (Triton tiles are "
                     f"powers of two and tl.dot needs 16); got {value!r}")


@dataclasses.dataclass(frozen=True)
class Pallas:
  """The fused GPU kernel (registered as ``"pallas"``); ``None`` tiles pick :func:`default_tiles`.

  ``interpret=True`` runs the kernel through Pallas' interpreter (any backend, slow): how the tests check it
  on CPU. Without it the kernel needs a CUDA GPU (the Triton lowering).
  """

  block_q: int | None = None
  block_k: int | None = None
  interpret: bool = False

  def __post_init__(self):
    _check_block("Pallas", "block_q", self.block_q)
    _check_block("Pallas", "block_k", self.block_k)
    if not isinstance(self.interpret, bool):
      raise TypeError(f"Pallas: interpret must be a bool; got {self.interpret!r}")

  capabilities = base.Capabilities(weights=False, dropout=False, memory="linear")

  def unsupported(self, request: base.Request) -> str | None:
    reason = base.unsupported(self.capabilities, request)
    if reason is None and request.dtype is not None and request.dtype not in _DTYPES:
      reason = f"cannot take {request.dtype} inputs (only {', '.join(_DTYPES)})"
    return reason

  def tiles(self, metric: str, p: Any, head_dim: int, q_len: int, kv_len: int) -> Tiles:
    """The tiles used for one call: the defaults, overridden by the kernel's, clipped to the lengths."""
    default = default_tiles(metric, p, head_dim)
    block_q = min(self.block_q or default.block_q, max(_MIN_BLOCK, _next_pow2(q_len)))
    block_k = min(self.block_k or default.block_k, max(_MIN_BLOCK, _next_pow2(kv_len)))
    return dataclasses.replace(default, block_q=block_q, block_k=block_k)

  def __call__(self, q, k, v, *, lam, bias=None, mask=None, segments: common.Segments | None = None,
               local_window: tuple[int, int] | None = None, metric: str, p: Any = 2.0, is_causal: bool = False,
               dropout: common.Dropout | None = None, precision: Any = None,
               return_weights: bool = False) -> common.AttentionResult:
    # Called only for requests unsupported() accepted (base.Kernel): no weights, no dropout, a float dtype
    # Triton computes in.
    batch, q_len, num_heads, head_dim = q.shape
    kv_len, num_kv, v_dim = k.shape[1], k.shape[2], v.shape[-1]
    tiles = self.tiles(metric, p, head_dim, q_len, kv_len)
    t_pad = -(-q_len // tiles.block_q) * tiles.block_q
    s_pad = -(-kv_len // tiles.block_k) * tiles.block_k
    d_pad = max(_MIN_BLOCK, _next_pow2(head_dim))
    dv_pad = max(_MIN_BLOCK, _next_pow2(v_dim))
    tiles = dataclasses.replace(tiles, block_d=min(tiles.block_d, d_pad))
    record = metrics.get(metric)
    if not record.parametric:
      p = 2.0  # ignored by the form; a traced value must not become a kernel operand
    form = record.resolve(p if isinstance(p, float) else None)

    acc = jnp.float32
    if isinstance(form, metrics.Gram):
      # Centring and normalisation are linear-memory maps of q and k: applied here, in float32, autodiff
      # carries their gradient and the kernel only sees the gram terms.
      if record.translation_invariant:
        c = jax.lax.stop_gradient(jnp.mean(k.astype(acc), axis=1, keepdims=True))  # [B, 1, K, D]
        q = q.astype(acc) - jnp.repeat(c, num_heads // num_kv, axis=2)
        k = k.astype(acc) - c
      if form.normalize:
        q = q.astype(acc) * gram_lib.inverse_norm(jnp.sum(jnp.square(q.astype(acc)), axis=-1, keepdims=True))
        k = k.astype(acc) * gram_lib.inverse_norm(jnp.sum(jnp.square(k.astype(acc)), axis=-1, keepdims=True))
    inputs = {
        "q": tile_core.pad_axis(tile_core.pad_axis(q, 1, t_pad), 3, d_pad),
        "k": tile_core.pad_axis(tile_core.pad_axis(k, 1, s_pad), 3, d_pad),
        "v": tile_core.pad_axis(tile_core.pad_axis(v, 1, s_pad), 3, dv_pad),
        "lam": lam.astype(acc).reshape(num_heads),
    }
    if bias is not None:
      bias = bias.astype(acc)
      inputs["bias"] = tile_core.pad_axis(tile_core.pad_axis(bias, 2, t_pad, broadcast_ok=True), 3, s_pad,
                                          broadcast_ok=True)
    if mask is not None:
      mask = mask.astype(jnp.int8)
      inputs["mask"] = tile_core.pad_axis(tile_core.pad_axis(mask, 2, t_pad, broadcast_ok=True), 3, s_pad,
                                          broadcast_ok=True)
    segments = segments or common.Segments()
    has_ids = segments.q_ids is not None
    if has_ids:
      inputs["q_ids"] = tile_core.pad_axis(segments.q_ids.astype(jnp.int32), 1, t_pad)
      inputs["kv_ids"] = tile_core.pad_axis(segments.kv_ids.astype(jnp.int32), 1, s_pad)
    has_kv_valid = segments.kv_lengths is not None
    if has_kv_valid:
      valid = jnp.arange(s_pad).reshape(1, s_pad) < segments.kv_lengths.reshape(batch, 1)
      inputs["kv_valid"] = valid.astype(jnp.int32)
    if not isinstance(p, float):
      inputs["p"] = jnp.asarray(p, acc).reshape(1)
    cfg = _Config(metric=metric, p=p if isinstance(p, float) else None, is_causal=bool(is_causal), tiles=tiles,
                  q_len=q_len, kv_len=kv_len, head_dim=head_dim, group=num_heads // num_kv, precision=precision,
                  bias_shape=None if bias is None else inputs["bias"].shape,
                  mask_shape=None if mask is None else inputs["mask"].shape, has_ids=has_ids,
                  has_kv_valid=has_kv_valid, interpret=self.interpret,
                  geometry=tile_core.TileConfig(
                      metric=metric, p=None, is_causal=bool(is_causal), block_q=tiles.block_q,
                      block_k=tiles.block_k, q_len=q_len, kv_len=kv_len, group=num_heads // num_kv,
                      dropout_rate=0.0, broadcast_dropout=True, precision=None,
                      local_window=None if local_window is None else tuple(local_window)))
    out, lse = _fused(cfg, inputs)
    out = out[:, :q_len, :, :v_dim]
    lse = lse[:, :, :q_len]
    if segments.q_lengths is not None:
      # Rows past a query length see no key: zeroed here (their cotangent then is 0, so is their gradient).
      real = jnp.arange(q_len).reshape(1, q_len) < segments.q_lengths.reshape(batch, 1)
      out = jnp.where(real[:, :, None, None], out, 0.0)
      lse = jnp.where(real[:, None, :], lse, -jnp.inf)
    return common.AttentionResult(out.astype(v.dtype), lse, None)


registry.register("pallas", Pallas())
