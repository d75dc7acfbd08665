"""The elementwise tile form of an :class:`~distattn_jax.metrics.Elementwise` record: the difference tile is reduced
on the CUDA cores in float32, ``bd`` features at a time; ``phi``'s and ``root``'s derivatives come from
``jax.jvp`` of the record's own functions, with the conventions of :mod:`distattn_jax.metrics.elementwise` (ties
of ``reduce="max"`` share the gradient, a non-finite root derivative gives 0, ``rescale``).

Feature-major layout. The loaders hand this module each feature chunk transposed, ``q^T [bd, bq]`` and ``k^T
[bd, bk]``, and the difference tile is ``q^T[:, :, None] - k^T[:, None, :]``, ``[bd, bq, bk]`` with the features
outermost. Triton's default layout of a tensor spreads its last axes over the lanes and warps and leaves the
first in each thread's registers, so here the ``[bq, bk]`` pairs go to the threads and each thread holds the
``bd`` features of its pairs: the feature sum (or max) is a chain of adds in registers, once per pair, and the
reduced ``[bq, bk]`` tile is spread over the threads without copies. With the features last (``[bq, bk, bd]``),
as a NumPy user would write it, the ``bd`` features lie across lanes: every sum becomes warp shuffles and the
reduced tile is replicated ``bd`` times. The gradients of the resident tile (dq in the query programs, dk in the
key program) are accumulated feature-major as well (``[bd, bq]`` per chunk), reduced over the streamed axis, and
transposed once when stored.

The program's own tile is loaded (and transposed) once, chunk by chunk, before the loop over the other side's
tiles and stays in registers (:func:`distattn_jax.kernels.pallas_gpu.tile.loader`); only the streamed tile is
loaded per step, which Triton may pipeline (``num_stages``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from distattn_jax import metrics


def chunks(block_d: int, dim: int, head_dim: int | None = None) -> list[tuple[int, int]]:
  """``(start, size)`` of the feature chunks a difference tile is reduced over, ``block_d`` at a time, over the
  ``dim`` features of the padded layout. Chunks that start at or past ``head_dim`` hold padding only and are
  left out (80 features padded to 128 take 10 chunks of 8, not 16); the last chunk kept may still end in
  padding, which :func:`feature_valid` masks."""
  end = dim if head_dim is None else min(dim, head_dim)
  return [(c, min(block_d, dim - c)) for c in range(0, end, block_d)]


def feature_valid(head_dim: int, start: int, size: int):
  """``[size, 1, 1]`` True on real features, or None when the chunk has no padded feature."""
  if start + size <= head_dim:
    return None
  return (start + jnp.arange(size) < head_dim).reshape(size, 1, 1)


def difference(load_q, load_k, c: int, size: int):
  """``q - k`` over features ``[c, c + size)``, feature-major ``[size, bq, bk]``, in float32 (the loaders give
  ``[size, bq]`` and ``[size, bk]`` chunks)."""
  return load_q(c, size).astype(jnp.float32)[:, :, None] - load_k(c, size).astype(jnp.float32)[:, None, :]


def param_slope(fn, p, shape):
  """``d fn(p) / dp`` elementwise over ``shape``. The order is broadcast to the tile first: a scalar tangent
  would be a literal, and Triton's lowering cannot negate a literal."""
  full = jnp.broadcast_to(p, shape)
  return jax.jvp(fn, (full,), (jnp.ones_like(full),))[1]


def reduced(form: metrics.Elementwise, load_q, load_k, chunks: list, head_dim: int, params: tuple):
  """The reduced value ``s`` and, with ``rescale``, ``(scale, inv_scale)`` of the tile."""

  def diff(c, size):
    return difference(load_q, load_k, c, size)

  scale = inv = None
  if form.rescale:
    largest = None
    for c, size in chunks:
      m = jnp.max(jnp.abs(diff(c, size)), axis=0)
      largest = m if largest is None else jnp.maximum(largest, m)
    scale = jnp.where(largest == 0, 1.0, largest)
    inv = 1.0 / scale
  s = None
  for c, size in chunks:
    u = diff(c, size)
    if inv is not None:
      u = u * inv[None, :, :]
    ph = form.phi(u, *params).astype(jnp.float32)
    valid = feature_valid(head_dim, c, size)
    if form.reduce == "sum":
      if valid is not None:
        ph = jnp.where(valid, ph, 0.0)
      part = jnp.sum(ph, axis=0)
      s = part if s is None else s + part
    else:
      if valid is not None:
        ph = jnp.where(valid, ph, -jnp.inf)
      part = jnp.max(ph, axis=0)
      s = part if s is None else jnp.maximum(s, part)
  return s, scale, inv


def value(form: metrics.Elementwise, load_q, load_k, chunks: list, head_dim: int, params: tuple):
  """The form's value ``[bq, bk]`` (float32) and what its VJP needs."""
  s, scale, inv = reduced(form, load_q, load_k, chunks, head_dim, params)
  out = s if form.root is None else form.root(s, *params).astype(jnp.float32)
  if scale is not None:
    out = scale * out
  return out, (s, scale, inv)


def vjp(form: metrics.Elementwise, load_q, load_k, chunks: list, head_dim: int, params: tuple, aux, g, *,
        want_q: bool, want_k: bool):
  """Cotangents of the value tile for cotangent ``g [bq, bk]``: lists of per-chunk ``dq^T [c, bq]``, ``dk^T [c,
  bk]`` (feature-major; None when not wanted) and the p cotangent per query row ``[bq]`` (None for no p)."""
  s, scale, inv = aux
  dp_rows = None
  if form.root is None:
    c = g
  else:
    _, slope = jax.jvp(lambda x: form.root(x, *params), (s,), (jnp.ones_like(s),))
    finite = jnp.isfinite(slope)
    c = jnp.where(finite, g * jnp.where(finite, slope, 0.0), 0.0)
    if params:
      root_p = param_slope(lambda pp: form.root(s, pp), params[0], s.shape)
      pair = jnp.where(finite, g * root_p * (1.0 if scale is None else scale), 0.0)
      dp_rows = jnp.sum(pair, axis=1)

  def scaled(cc, size):
    u = difference(load_q, load_k, cc, size)
    return u if inv is None else u * inv[None, :, :]

  if form.reduce == "max":
    ties = None
    for cc, size in chunks:
      hit = form.phi(scaled(cc, size), *params) == s[None, :, :]
      valid = feature_valid(head_dim, cc, size)
      if valid is not None:
        hit = jnp.logical_and(hit, valid)
      n = jnp.sum(hit.astype(jnp.float32), axis=0)
      ties = n if ties is None else ties + n
    c = c / jnp.maximum(ties, 1.0)
  dqs, dks = [], []
  for cc, size in chunks:
    u = scaled(cc, size)
    value, slope = jax.jvp(lambda x: form.phi(x, *params), (u,), (jnp.ones_like(u),))
    coef = c[None, :, :]
    if form.reduce == "max":
      coef = jnp.where(value == s[None, :, :], coef, 0.0)
    w = coef * slope
    valid = feature_valid(head_dim, cc, size)
    if valid is not None:
      w = jnp.where(valid, w, 0.0)
    dqs.append(jnp.sum(w, axis=2) if want_q else None)
    dks.append(-jnp.sum(w, axis=1) if want_k else None)
    if params:
      phi_p = param_slope(lambda pp: form.phi(u, pp), params[0], u.shape)
      extra = coef * phi_p
      if valid is not None:
        extra = jnp.where(valid, extra, 0.0)
      extra = jnp.sum(extra, axis=0)
      if scale is not None:
        extra = extra * scale
      extra = jnp.sum(extra, axis=1)
      dp_rows = extra if dp_rows is None else dp_rows + extra
  return dqs, dks, dp_rows
