"""Ring attention: the sequence split over a mesh axis, key/value blocks passed from device to device.

Global arrays in, global arrays out. Inside ``jax.shard_map`` each device of the ``axis_name`` axis keeps its
share of the queries and holds one share of the keys and values at a time: it attends to the share it holds,
passes it on to the next device with ``lax.ppermute`` and receives the previous device's, ``n`` times for an
axis of ``n`` devices. The partial results merge through their log-sum-exp (online softmax across devices);
each partial result is the blockwise kernel's own tiled computation (:mod:`distattn_jax.kernels.blockwise`)
on one pair of chunks, with the chunks' global positions, so every metric (user-registered ones included),
grouped-query attention, a traced ``lam`` and ``p``, segment ids and sequence lengths work as they do there.

The backward pass is a ring too: the key/value shares go round again, each with its ``dk``/``dv``
accumulator, which arrives home after the last hop; ``dq`` stays where its queries are and ``dlam``/``dp`` are
summed over the mesh. No device holds more than its share plus the one in flight.

Forward mode (``jax.jvp``, ``jacfwd``, ``linearize``, ``hessian``) is a third ring: the key/value shares go
round with their tangents, and each pair of chunks adds the tile core's tangent sums (:func:`tiles.tangent_sums`,
with ``P`` from the final ``lse``, so the pairs' shares add up without a merge); the output's tangent is then
:func:`tiles.tangent_out` of the sums. As in the blockwise kernel, the ring is a ``jax.custom_jvp`` whose tangent
map is a :func:`distattn_jax.autodiff.linear_call` transposing to the backward ring, so ``jax.grad`` runs the
backward ring on the forward ring's residuals.

Layout. ``layout="zigzag"`` (default) cuts the sequence into ``2n`` chunks and gives device ``i`` chunks ``i``
and ``2n-1-i``: under ``is_causal`` every device then has the same number of visible chunk pairs on every hop
(a contiguous split would leave device 0 idle while device ``n-1`` works). ``layout="contiguous"`` gives device
``i`` chunk ``i`` of ``n``. A chunk pair that the causal mask (or padding) hides entirely is skipped
(``lax.switch``), not computed; a pair that is entirely visible is computed without a mask.

Lengths that the layout does not divide are padded inside: queries and keys are padded at the end of the
sequence to a multiple of ``2n`` (zigzag) or ``n`` chunks, padded keys are masked by position, padded query rows
are dropped from the result. The batch is split over the mesh axes in ``batch_axes`` that exist, as far as they
divide it (the longest such prefix), and replicated over every other axis.

A ``bias`` or ``mask`` broadcast over the queries (``[batch|1, heads|1, 1, kv_len|1]``, e.g. a per-key bias or
key padding mask) is laid out like the keys and travels with them; the bias gradient travels with ``dk``. Not
supported (a clear error names the alternative): one that varies over queries (a ``[q_len, kv_len]`` array does
not shard with a key share; segment ids and sequence lengths express padding and packing per position),
returning weights, attention dropout (its draw is defined over the whole ``[T, S]`` array), ``local_window_size``.

The module is long because the forward ring, the backward ring, the tangent ring and the layout all read one
private plan (the chunks, the kinds of chunk pair, the hop schedule); split over files, each would reach into the
others' private helpers.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from distattn_jax import autodiff, metrics
from distattn_jax.kernels import base, blockwise, common, registry, tiles

Array = jax.Array

LAYOUTS = ("zigzag", "contiguous")

_HOW_TO_SET_A_MESH = (
    "pass one (kernels.Ring(mesh=jax.make_mesh((8,), ('seq',)))) or set one around the call "
    "(with jax.set_mesh(mesh): ...)")

# Chunk pair kinds, the branches of the lax.switch.
_SKIP, _FULL, _PARTIAL = 0, 1, 2


class _Plan(NamedTuple):
  """Everything static about one ring call (hashable: the custom_jvp's non-differentiable argument)."""

  full: tiles.TileConfig      # a chunk pair every query sees all of
  partial: tiles.TileConfig   # a chunk pair the causal mask cuts
  mesh: Any
  axis_name: str
  size: int                    # devices on the ring
  chunks: int                  # chunks per device (2 zigzag, 1 contiguous)
  q_chunk: int
  kv_chunk: int
  batch_spec: Any              # mesh axes of the batch dimension (None, a name or a tuple)
  reduce_axes: tuple[str, ...]  # axes over which lam/p gradients are summed
  is_causal: bool


def _chunk_index(plan: _Plan, device, a):
  """Global index of a device's chunk ``a`` (traced): ``i`` and ``2n-1-i`` under zig-zag, ``i`` contiguous."""
  return device if plan.chunks == 1 else jnp.where(a == 0, device, 2 * plan.size - 1 - device)


def _pair_kind(plan: _Plan, q_chunk, kv_chunk):
  """Which branch a (query chunk, key chunk) pair takes, from their global chunk indices (traced)."""
  kv_first = kv_chunk * plan.kv_chunk
  kv_last = kv_first + plan.kv_chunk - 1
  kind = jnp.asarray(_FULL)
  if plan.is_causal:
    q_first = q_chunk * plan.q_chunk
    q_last = q_first + plan.q_chunk - 1
    kind = jnp.where(kv_last <= q_first, _FULL, jnp.where(kv_first > q_last, _SKIP, _PARTIAL))
  # A chunk made only of padding is hidden from every query.
  return jnp.where(kv_first >= plan.full.kv_len, _SKIP, kind)


def _branches(plan: _Plan, skip, compute):
  branches = [skip, functools.partial(compute, plan.full)]
  return branches + [functools.partial(compute, plan.partial)] if plan.is_causal else branches


def _chunk(x, axis: int, a, size: int):
  return None if x is None else jax.lax.dynamic_slice_in_dim(x, a * size, size, axis=axis)


def _add_chunk(x, axis: int, a, tile):
  size = tile.shape[axis]
  return jax.lax.dynamic_update_slice_in_dim(x, _chunk(x, axis, a, size) + tile, a * size, axis=axis)


def _positions(plan: _Plan, device, a: int, chunk: int):
  return _chunk_index(plan, device, a) * chunk + jnp.arange(chunk, dtype=jnp.int32)


def _pair_segments(plan: _Plan, local, kv_ids, me, src, a, b) -> tiles.TileSegments:
  """The per-position masks of the pair (this device's query chunk ``a``, chunk ``b`` of device ``src``'s
  keys), with the chunks' global positions."""
  return tiles.TileSegments(
      _chunk(local.get("q_ids"), 1, a, plan.q_chunk), _chunk(kv_ids, 1, b, plan.kv_chunk), local.get("q_lengths"),
      local.get("kv_lengths"), _positions(plan, me, a, plan.q_chunk), _positions(plan, src, b, plan.kv_chunk))


def _shift(plan: _Plan, tree):
  """Sends every array of ``tree`` to the next device on the ring."""
  perm = [(i, (i + 1) % plan.size) for i in range(plan.size)]
  return jax.tree.map(lambda x: jax.lax.ppermute(x, plan.axis_name, perm), tree)


# Names of the per-position arrays and the axis their positions are on.
_SEQ_AXIS = {"q": 2, "k": 2, "v": 2, "d_out": 2, "delta": 2, "q_ids": 1, "kv_ids": 1, "dq": 2, "dk": 2, "dv": 2}


def _zigzag_dest(plan: _Plan, chunk: int) -> int:
  return chunk if chunk < plan.size else 2 * plan.size - 1 - chunk


def _to_ring(plan: _Plan, x: Array, axis: int) -> Array:
  """A device's contiguous share (chunks ``2i``, ``2i+1``) -> its zig-zag share (chunks ``i``, ``2n-1-i``).

  Chunks ``i`` and ``2n-1-i`` have opposite parities, so a device receives one even chunk (sent from slot 0
  of its holder) and one odd chunk (slot 1): two ``ppermute``s, each a permutation of the devices."""
  if plan.chunks == 1:
    return x
  n, half = plan.size, x.shape[axis] // 2
  first, second = jax.lax.split(x, (half, half), axis=axis)
  from_even = jax.lax.ppermute(first, plan.axis_name, [(e, _zigzag_dest(plan, 2 * e)) for e in range(n)])
  from_odd = jax.lax.ppermute(second, plan.axis_name, [(e, _zigzag_dest(plan, 2 * e + 1)) for e in range(n)])
  even = jax.lax.axis_index(plan.axis_name) % 2 == 0
  return jnp.concatenate([jnp.where(even, from_even, from_odd), jnp.where(even, from_odd, from_even)], axis=axis)


def _from_ring(plan: _Plan, x: Array, axis: int) -> Array:
  """The inverse of :func:`_to_ring`."""
  if plan.chunks == 1:
    return x
  n, half = plan.size, x.shape[axis] // 2
  low, high = jax.lax.split(x, (half, half), axis=axis)
  even = jax.lax.axis_index(plan.axis_name) % 2 == 0
  even_chunk, odd_chunk = jnp.where(even, low, high), jnp.where(even, high, low)
  home = lambda d, parity: (d if d % 2 == parity else 2 * n - 1 - d) // 2
  return jnp.concatenate([
      jax.lax.ppermute(even_chunk, plan.axis_name, [(d, home(d, 0)) for d in range(n)]),
      jax.lax.ppermute(odd_chunk, plan.axis_name, [(d, home(d, 1)) for d in range(n)])], axis=axis)


def _relayout(plan: _Plan, local: dict[str, Array], names) -> dict[str, Array]:
  return {name: _to_ring(plan, x, _SEQ_AXIS[name]) if name in names else x for name, x in local.items()}


def _key_operands(plan: _Plan, local):
  """``(moving, fixed)`` bias, mask (and bias tangent): one that varies over keys is laid out and travels with
  its key share (``moving``); one broadcast over keys stays (``fixed``)."""
  moving, fixed = {}, {}
  for name in ("bias", "mask", "d_bias"):
    x = local.get(name)
    if x is not None and x.shape[4] > 1:
      moving[name] = _to_ring(plan, x, 4)
    else:
      fixed[name] = x
  return moving, fixed


def _key_chunk(plan: _Plan, moving, fixed, name, b):
  return _chunk(moving[name], 4, b, plan.kv_chunk) if name in moving else fixed[name]


def _local_forward(plan: _Plan, local):
  moving, fixed = _key_operands(plan, local)
  local = _relayout(plan, local, ("q", "k", "v", "q_ids", "kv_ids"))
  q, lam5, p = local["q"], local["lam5"], local.get("p")
  me = jax.lax.axis_index(plan.axis_name)
  acc = metrics.accumulation_dtype(q.dtype)
  batch, num_kv, _, group, _ = q.shape
  v_dim = local["v"].shape[-1]
  stats_shape = (batch, num_kv, plan.q_chunk, group)

  def skip(q_a, k_b, v_b, seg, bias_b, mask_b):
    return jnp.zeros(stats_shape + (v_dim,), acc), jnp.full(stats_shape, -jnp.inf, acc)

  def compute(cfg, q_a, k_b, v_b, seg, bias_b, mask_b):
    return tiles.forward(cfg, q_a, k_b, v_b, lam5, bias_b, mask_b, seg, p, None)

  def hop(step, carry):
    k, v, kv_ids, moving, out, lse = carry
    src = (me - step) % plan.size

    # One loop over the (query chunk, key chunk) pairs, not an unrolled one, so that each branch is traced
    # (and compiled) once.
    def pair(index, state):
      out, lse = state
      a, b = index // plan.chunks, index % plan.chunks
      seg = _pair_segments(plan, local, kv_ids, me, src, a, b)
      kind = _pair_kind(plan, _chunk_index(plan, me, a), _chunk_index(plan, src, b))
      out_p, lse_p = jax.lax.switch(kind, _branches(plan, skip, compute), _chunk(q, 2, a, plan.q_chunk),
                                    _chunk(k, 2, b, plan.kv_chunk), _chunk(v, 2, b, plan.kv_chunk), seg,
                                    _key_chunk(plan, moving, fixed, "bias", b),
                                    _key_chunk(plan, moving, fixed, "mask", b))
      out_a, lse_a = tiles.merge(_chunk(out, 2, a, plan.q_chunk), _chunk(lse, 2, a, plan.q_chunk), out_p, lse_p)
      return (jax.lax.dynamic_update_slice_in_dim(out, out_a, a * plan.q_chunk, 2),
              jax.lax.dynamic_update_slice_in_dim(lse, lse_a, a * plan.q_chunk, 2))

    out, lse = jax.lax.fori_loop(0, plan.chunks ** 2, pair, (out, lse))
    # The last hop only brings every share home again; it keeps the loop body single (one trace to compile).
    k, v, kv_ids, moving = _shift(plan, (k, v, kv_ids, moving))
    return k, v, kv_ids, moving, out, lse

  rows = q.shape[2]
  init = (local["k"], local["v"], local.get("kv_ids"), moving, jnp.zeros((batch, num_kv, rows, group, v_dim), acc),
          jnp.full((batch, num_kv, rows, group), -jnp.inf, acc))
  _, _, _, _, out, lse = jax.lax.fori_loop(0, plan.size, hop, init)
  # The zig-zag q, k, v and lse are the backward pass's residuals, so it does not lay them out again.
  return _from_ring(plan, out, 2), _from_ring(plan, lse, 2), q, local["k"], local["v"], lse


def _local_backward(plan: _Plan, local):
  # q, k, v and lse arrive laid out already; the row terms are computed before the layout (no copy of out).
  moving, fixed = _key_operands(plan, local)
  local = _relayout(plan, local, ("d_out", "delta", "q_ids", "kv_ids"))
  q, k, v, lam5, p = local["q"], local["k"], local["v"], local["lam5"], local.get("p")
  lse, d_out, delta = local["lse"], local["d_out"], local["delta"]
  me = jax.lax.axis_index(plan.axis_name)
  acc = metrics.accumulation_dtype(q.dtype)

  def skip(q_a, k_b, v_b, seg, bias_b, mask_b, rows):
    return (jnp.zeros(q_a.shape, acc), jnp.zeros(k_b.shape, acc), jnp.zeros(v_b.shape, acc),
            jnp.zeros(lam5.shape, acc), None if p is None else jnp.zeros((), acc),
            None if bias_b is None else jnp.zeros(bias_b.shape, acc))

  def compute(cfg, q_a, k_b, v_b, seg, bias_b, mask_b, rows):
    lse_a, do_a, delta_a = rows
    res = tiles.Residuals(q_a, k_b, v_b, lam5, bias_b, mask_b, seg, p, rng=None, out=None, lse=lse_a)
    g_q, g_k, g_v, g_lam, g_bias, g_p = tiles.gradients(cfg, res, do_a, delta=delta_a)
    return g_q, g_k, g_v, g_lam, g_p, g_bias

  bias = local.get("bias")
  # A bias's gradient: one that travels accumulates per key chunk and travels with it (like dk); a fixed one
  # accumulates here and is summed over the mesh at the end.
  d_moving_bias = None if "bias" not in moving else jnp.zeros(moving["bias"].shape, acc)
  d_fixed_bias = None if bias is None or "bias" in moving else jnp.zeros(bias.shape, acc)

  def hop(step, carry):
    k, v, kv_ids, moving, dk, dv, d_moving_bias, dq, dlam, dp, d_fixed_bias = carry
    src = (me - step) % plan.size

    def pair(index, state):
      dk, dv, d_moving_bias, dq, dlam, dp, d_fixed_bias = state
      a, b = index // plan.chunks, index % plan.chunks
      seg = _pair_segments(plan, local, kv_ids, me, src, a, b)
      rows = tuple(_chunk(x, 2, a, plan.q_chunk) for x in (lse, d_out, delta))
      kind = _pair_kind(plan, _chunk_index(plan, me, a), _chunk_index(plan, src, b))
      g_q, g_k, g_v, g_lam, g_p, g_bias = jax.lax.switch(
          kind, _branches(plan, skip, compute), _chunk(q, 2, a, plan.q_chunk), _chunk(k, 2, b, plan.kv_chunk),
          _chunk(v, 2, b, plan.kv_chunk), seg, _key_chunk(plan, moving, fixed, "bias", b),
          _key_chunk(plan, moving, fixed, "mask", b), rows)
      if d_moving_bias is not None:
        d_moving_bias = _add_chunk(d_moving_bias, 4, b, g_bias)
      if d_fixed_bias is not None:
        d_fixed_bias = d_fixed_bias + g_bias
      return (_add_chunk(dk, 2, b, g_k), _add_chunk(dv, 2, b, g_v), d_moving_bias, _add_chunk(dq, 2, a, g_q),
              dlam + g_lam, None if p is None else dp + g_p, d_fixed_bias)

    dk, dv, d_moving_bias, dq, dlam, dp, d_fixed_bias = jax.lax.fori_loop(
        0, plan.chunks ** 2, pair, (dk, dv, d_moving_bias, dq, dlam, dp, d_fixed_bias))
    # Every share travels with its gradient accumulators; after n hops they are home again.
    k, v, kv_ids, moving, dk, dv, d_moving_bias = _shift(plan, (k, v, kv_ids, moving, dk, dv, d_moving_bias))
    return k, v, kv_ids, moving, dk, dv, d_moving_bias, dq, dlam, dp, d_fixed_bias

  init = (k, v, local.get("kv_ids"), moving, jnp.zeros(k.shape, acc), jnp.zeros(v.shape, acc), d_moving_bias,
          jnp.zeros(q.shape, acc), jnp.zeros(lam5.shape, acc), None if p is None else jnp.zeros((), acc),
          d_fixed_bias)
  _, _, _, _, dk, dv, d_moving_bias, dq, dlam, dp, d_fixed_bias = jax.lax.fori_loop(0, plan.size, hop, init)
  dlam = jax.lax.psum(dlam, plan.reduce_axes)
  dp = None if p is None else jax.lax.psum(dp, plan.reduce_axes)
  if bias is None:
    dbias = None
  else:
    # Summed over every mesh axis the bias is broadcast along: the seq axis for a fixed one, the batch axes
    # for one shared by the batch rows.
    dbias = d_fixed_bias if d_moving_bias is None else _from_ring(plan, d_moving_bias, 4)
    axes = (() if d_moving_bias is not None else (plan.axis_name,)) + (
        plan.reduce_axes[1:] if bias.shape[0] == 1 else ())
    dbias = (jax.lax.psum(dbias, axes) if axes else dbias).astype(bias.dtype)
  return (_from_ring(plan, dq.astype(q.dtype), 2), _from_ring(plan, dk.astype(k.dtype), 2),
          _from_ring(plan, dv.astype(v.dtype), 2), dlam.astype(lam5.dtype),
          None if p is None else dp.astype(p.dtype), dbias)


def _local_tangent(plan: _Plan, local):
  """The tangent's sums (:func:`tiles.tangent_sums`) over every key share, laid out as the queries are at home:
  the key shares and their tangents go round as in the forward pass; with the final ``lse`` (a residual) each
  pair's sums are its exact share, so they add up with no merge."""
  # q, k, v and lse arrive laid out already (the forward pass's residuals); their tangents are laid out here.
  moving, fixed = _key_operands(plan, local)
  local = _relayout(plan, local, ("dq", "dk", "dv", "q_ids", "kv_ids"))
  q, lam5, p, lse = local["q"], local["lam5"], local.get("p"), local["lse"]
  dq, dlam5, dp = local["dq"], local["dlam5"], local.get("dp")
  me = jax.lax.axis_index(plan.axis_name)
  acc = metrics.accumulation_dtype(q.dtype)
  batch, num_kv, rows, group, _ = q.shape
  v_dim = local["v"].shape[-1]
  stats_shape = (batch, num_kv, plan.q_chunk, group)

  def skip(q_a, dq_a, lse_a, k_b, v_b, dk_b, dv_b, seg, bias_b, mask_b, dbias_b):
    return jnp.zeros(stats_shape, acc), jnp.zeros(stats_shape + (v_dim,), acc)

  def compute(cfg, q_a, dq_a, lse_a, k_b, v_b, dk_b, dv_b, seg, bias_b, mask_b, dbias_b):
    res = tiles.Residuals(q_a, k_b, v_b, lam5, bias_b, mask_b, seg, p, rng=None, out=None, lse=lse_a)
    return tiles.tangent_sums(cfg, res, tiles.Tangents(dq_a, dk_b, dv_b, dlam5, dbias_b, dp))

  def hop(step, carry):
    k, v, dk, dv, kv_ids, moving, d_lse, d_acc = carry
    src = (me - step) % plan.size

    def pair(index, state):
      d_lse, d_acc = state
      a, b = index // plan.chunks, index % plan.chunks
      seg = _pair_segments(plan, local, kv_ids, me, src, a, b)
      kind = _pair_kind(plan, _chunk_index(plan, me, a), _chunk_index(plan, src, b))
      part_lse, part_acc = jax.lax.switch(
          kind, _branches(plan, skip, compute), *(_chunk(x, 2, a, plan.q_chunk) for x in (q, dq, lse)),
          *(_chunk(x, 2, b, plan.kv_chunk) for x in (k, v, dk, dv)), seg,
          *(_key_chunk(plan, moving, fixed, name, b) for name in ("bias", "mask", "d_bias")))
      return _add_chunk(d_lse, 2, a, part_lse), _add_chunk(d_acc, 2, a, part_acc)

    d_lse, d_acc = jax.lax.fori_loop(0, plan.chunks ** 2, pair, (d_lse, d_acc))
    k, v, dk, dv, kv_ids, moving = _shift(plan, (k, v, dk, dv, kv_ids, moving))
    return k, v, dk, dv, kv_ids, moving, d_lse, d_acc

  init = (local["k"], local["v"], local["dk"], local["dv"], local.get("kv_ids"), moving,
          jnp.zeros((batch, num_kv, rows, group), acc), jnp.zeros((batch, num_kv, rows, group, v_dim), acc))
  *_, d_lse, d_acc = jax.lax.fori_loop(0, plan.size, hop, init)
  return _from_ring(plan, d_lse, 2), _from_ring(plan, d_acc, 2)


def _specs(plan: _Plan, arrays: dict[str, Array]) -> dict[str, P]:
  b, s = plan.batch_spec, plan.axis_name
  by_name = {"q": P(b, None, s), "k": P(b, None, s), "v": P(b, None, s), "delta": P(b, None, s),
             "d_out": P(b, None, s), "lse": P(b, None, s), "d_lse": P(b, None, s), "lam5": P(), "p": P(),
             "q_ids": P(b, s), "kv_ids": P(b, s), "q_lengths": P(b), "kv_lengths": P(b), "dq": P(b, None, s),
             "dk": P(b, None, s), "dv": P(b, None, s), "dlam5": P(), "dp": P()}
  for name in ("bias", "mask", "d_bias"):
    if name in arrays:
      by_name[name] = _key_operand_spec(plan, arrays[name])
  return {name: by_name[name] for name in arrays}


def _key_operand_spec(plan: _Plan, x: Array) -> P:
  """A ``[B|1, K|1, 1, G|1, S|1]`` bias or mask: split like the batch and the keys where it is not broadcast."""
  return P(plan.batch_spec if x.shape[0] > 1 else None, None, None, None,
           plan.axis_name if x.shape[4] > 1 else None)


def _present(**arrays) -> dict[str, Array]:
  return {name: x for name, x in arrays.items() if x is not None}


def _shard_map(plan: _Plan, fn, arrays, out_specs):
  return jax.shard_map(functools.partial(fn, plan), mesh=plan.mesh, in_specs=(_specs(plan, arrays),),
                       out_specs=out_specs, check_vma=False)(arrays)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _ring(plan: _Plan, q, k, v, lam5, bias5, mask5, seg, p):
  return _ring_forward(plan, q, k, v, lam5, bias5, mask5, seg, p)[0]


@_ring.defjvp
def _ring_jvp(plan: _Plan, primals, tangents):
  # As the blockwise kernel: the tangent is a linear map whose transpose is the backward ring, so reverse mode
  # (JAX transposes the tangent map) runs the backward ring on the forward ring's residuals.
  (out, lse), res = _ring_forward(plan, *primals)
  dq, dk, dv, dlam5, dbias5, _, _, dp = tangents  # the mask and the segments have no tangent
  d_out, d_lse = autodiff.linear_call(functools.partial(_ring_tangent, plan),
                                      functools.partial(_ring_cotangent, plan), res,
                                      (dq, dk, dv, dlam5, dbias5, dp))
  return (out, lse), (d_out, d_lse)


# The forward ring with its residuals, called as one opaque function inside the custom_jvp rule: when jax.grad
# linearizes the rule, inputs that are all known pass a custom_jvp call straight to the enclosing trace, while a
# shard_map would be partially evaluated and its loops restructured (XLA then held a stacked copy of the query
# chunks, +16% of the ring's compiled gradient temporaries). Its own derivative (second order) is JAX's.
@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _ring_forward(plan: _Plan, q, k, v, lam5, bias5, mask5, seg, p):
  return _ring_forward_rule(plan, q, k, v, lam5, bias5, mask5, seg, p)


@_ring_forward.defjvp
def _ring_forward_jvp(plan: _Plan, primals, tangents):
  return jax.jvp(functools.partial(_ring_forward_rule, plan), primals, tangents)


def _ring_forward_rule(plan: _Plan, q, k, v, lam5, bias5, mask5, seg, p):
  q_ids, kv_ids, q_lengths, kv_lengths = seg
  arrays = _present(q=q, k=k, v=v, lam5=lam5, p=p, q_ids=q_ids, kv_ids=kv_ids, q_lengths=q_lengths,
                    kv_lengths=kv_lengths, bias=bias5, mask=mask5)
  row = P(plan.batch_spec, None, plan.axis_name)
  out, lse, q_z, k_z, v_z, lse_z = _shard_map(plan, _local_forward, arrays, (row,) * 6)
  return (out, lse), (q_z, k_z, v_z, lam5, bias5, mask5, seg, p, out, lse_z)


def _ring_tangent(plan: _Plan, res, dots):
  q, k, v, lam5, bias5, mask5, seg, p, out, lse = res
  dq, dk, dv, dlam5, dbias5, dp = dots
  q_ids, kv_ids, q_lengths, kv_lengths = seg
  arrays = _present(q=q, k=k, v=v, lam5=lam5, p=p, q_ids=q_ids, kv_ids=kv_ids, q_lengths=q_lengths,
                    kv_lengths=kv_lengths, bias=bias5, mask=mask5, lse=lse, dq=dq, dk=dk, dv=dv, dlam5=dlam5,
                    dp=dp, d_bias=dbias5)
  row = P(plan.batch_spec, None, plan.axis_name)
  d_lse, d_acc = _shard_map(plan, _local_tangent, arrays, (row, row))
  return tiles.tangent_out(d_acc, d_lse, out), d_lse


def _ring_cotangent(plan: _Plan, res, cotangents):
  q, k, v, lam5, bias5, mask5, seg, p, out, lse = res
  d_out, d_lse = cotangents
  q_ids, kv_ids, q_lengths, kv_lengths = seg
  arrays = _present(q=q, k=k, v=v, lam5=lam5, p=p, q_ids=q_ids, kv_ids=kv_ids, q_lengths=q_lengths,
                    kv_lengths=kv_lengths, bias=bias5, mask=mask5, lse=lse, d_out=d_out,
                    delta=tiles.row_terms(out, d_out, d_lse))
  row = P(plan.batch_spec, None, plan.axis_name)
  bias_spec = P() if bias5 is None else _key_operand_spec(plan, bias5)
  dq, dk, dv, dlam, dp, dbias = _shard_map(plan, _local_backward, arrays, (row, row, row, P(), P(), bias_spec))
  return dq, dk, dv, dlam, dbias, dp


# ------------------------------------------------------------------------------------------------------------
# Layout: global canonical arrays <-> padded arrays whose seq axis shards over the ring.


def _lay_out(plan: _Plan, x: Array | None, axis: int, chunk: int, fill=0) -> Array | None:
  """Pads ``axis`` to ``chunks * size * chunk``; the zig-zag reordering happens inside the ring
  (:func:`_to_ring`), between neighbours, so no device ever gathers the sequence."""
  return None if x is None else tiles.pad_axis(x, axis, plan.chunks * plan.size * chunk, fill)


# A tile's score temporaries must stay small against the share of the sequence a device holds, or splitting
# the sequence saves little memory: a chunk gets at least this many tiles along each axis (down to _MIN_BLOCK).
# At 16384 tokens on 8 devices (chunks of 1024) this halves the tiles from 512 to 256 and the per-device
# temporaries from 0.31 to about 0.25 of one device's (benchmark.py --mode=scaling).
_TILES_PER_CHUNK = 4
_MIN_BLOCK = 64


def _chunk_and_block(length: int, pieces: int, default_block: int) -> tuple[int, int]:
  """``(chunk, block)``: the tile (the metric's default, or smaller so that a chunk holds ``_TILES_PER_CHUNK``
  of them) and the smallest chunk, a multiple of the tile, such that ``pieces`` chunks hold ``length``."""
  need = -(-length // pieces)
  quarter = -(-need // _TILES_PER_CHUNK)
  block = min(default_block, need, max(_MIN_BLOCK, -(-quarter // 16) * 16))
  return -(-need // block) * block, block


def _is_mesh(mesh: Any) -> bool:
  return isinstance(mesh, (jax.sharding.Mesh, jax.sharding.AbstractMesh))


def _auto_axes_mesh(mesh):
  """``mesh`` with every axis Auto. The ring lays out and exchanges its own shards inside ``shard_map``; with
  Explicit axes (``jax.make_mesh``'s default) shard_map would demand that the inputs already carry exactly its
  in_specs, while with Auto axes it reshards whatever it is given."""
  auto = jax.sharding.AxisType.Auto
  if all(t == auto for t in mesh.axis_types):
    return mesh
  if isinstance(mesh, jax.sharding.AbstractMesh):
    return mesh.update_axis_types({name: auto for name in mesh.axis_names})
  return jax.sharding.Mesh(mesh.devices, mesh.axis_names, axis_types=(auto,) * len(mesh.axis_names))


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _typed_identity(x, spec):
  return x


@_typed_identity.defjvp
def _typed_identity_jvp(spec, primals, tangents):
  # The tangent passes unchanged; its transpose, the cotangent, is given the sharding type back.
  tangent = autodiff.linear_call(lambda _, t: t, lambda _, ct: jax.sharding.reshard(ct, spec), (), tangents[0])
  return primals[0], tangent


def _with_typed_cotangent(x):
  """``x``, whose cotangent is given ``x``'s own sharding type on the way back. Cotangents leaving
  ``auto_axes`` through a ``jax.jit`` boundary keep the Auto axes, and adding them to another cotangent of the
  same input (self-attention passes one array as query, key and value) then fails under an Explicit mesh."""
  if x is None or not jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact):
    return x
  return _typed_identity(x, jax.typeof(x).sharding.spec)


def _has_explicit_axes(mesh) -> bool:
  return mesh is not None and any(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types)


def _explicitly_typed(*arrays) -> bool:
  """Whether an array's type carries an Explicit sharding (set by ``jax.device_put`` on an Explicit mesh)."""
  return any(_has_explicit_axes(getattr(jax.typeof(x).sharding, "mesh", None)) for x in arrays)


def _context_mesh():
  mesh = jax.sharding.get_abstract_mesh()
  return None if mesh is None or mesh.empty else mesh


@dataclasses.dataclass(frozen=True)
class Ring:
  """Sequence-parallel attention over the mesh axis ``axis_name`` (registered as ``"ring"``).

  Args:
    mesh: a ``jax.sharding.Mesh``; None (the registered ``"ring"``) uses the mesh set with ``jax.set_mesh``
      when the kernel is called, and raises a ValueError that says how to set one if there is none.
    axis_name: the mesh axis the sequence is split over; a size-1 axis is allowed (one device, no hops).
    layout: ``"zigzag"`` (balanced causal work, the default) or ``"contiguous"``.
    batch_axes: mesh axes the batch may be split over at the same time (the longest prefix of those present
      whose product divides the batch); every other mesh axis sees the whole batch.

  Lengths the layout does not divide are padded inside (padded keys masked, padded queries dropped). Works with
  Explicit and Auto mesh axes; under an Explicit context mesh the result is sharded like ``q``.
  """

  mesh: Any = None
  axis_name: str = "seq"
  layout: str = "zigzag"
  batch_axes: tuple[str, ...] = ("data", "fsdp")

  def __post_init__(self):
    if self.mesh is not None and not _is_mesh(self.mesh):
      raise TypeError(f"Ring: mesh must be a jax.sharding.Mesh or None (the mesh set with jax.set_mesh); got "
                      f"{type(self.mesh).__name__}")
    if not isinstance(self.axis_name, str):
      raise TypeError(f"Ring: axis_name must be a mesh axis name (str); got {self.axis_name!r}")
    if self.layout not in LAYOUTS:
      raise ValueError(f"Ring: layout must be one of {', '.join(LAYOUTS)}; got {self.layout!r}")
    if isinstance(self.batch_axes, str) or not all(isinstance(a, str) for a in self.batch_axes):
      raise TypeError(f"Ring: batch_axes must be a tuple of mesh axis names; got {self.batch_axes!r}")
    object.__setattr__(self, "batch_axes", tuple(self.batch_axes))
    if self.axis_name in self.batch_axes:
      raise ValueError(f"Ring: axis_name {self.axis_name!r} cannot also be a batch axis ({self.batch_axes})")
    if self.mesh is not None:
      self._check_axis(self.mesh)

  capabilities = base.Capabilities(weights=False, dropout=False, bias=True, mask=True, segments=True,
                                   local_window=False, traced_p=True, memory="linear")

  def unsupported(self, request: base.Request) -> str | None:
    if request.dropout is not None:
      return ("cannot apply attention dropout (its draw is defined over the whole [T, S] array); use "
              "implementation='blockwise' or deterministic=True")
    if request.local_window is not None:
      return "cannot evaluate local_window_size; use implementation='blockwise'"
    for name, shape in (("bias", request.bias_shape), ("mask", request.mask_shape)):
      if shape is not None and shape[2] != 1:
        # A bias or mask broadcast over the queries travels with the keys; a [q_len, kv_len] one has no key share.
        return (f"cannot take a {name} that varies over the queries: it must be broadcast over them, of shape "
                f"[batch|1, heads|1, 1, kv_len|1] (it then travels with the keys); got kernel shape {shape}. "
                "Express padding and packing with segment ids or sequence lengths, or use "
                "implementation='blockwise'")
    return base.unsupported(self.capabilities, request)

  def _check_axis(self, mesh) -> None:
    if self.axis_name not in mesh.axis_names:
      raise ValueError(f"Ring: axis_name {self.axis_name!r} is not an axis of the mesh; its axes are "
                       f"{tuple(mesh.axis_names)}")

  def resolve_mesh(self):
    """The mesh the kernel runs on: its own, else the one set with ``jax.set_mesh``."""
    mesh = self.mesh if self.mesh is not None else _context_mesh()
    if mesh is None:
      raise ValueError(f"implementation='ring' needs a device mesh with a {self.axis_name!r} axis and none is set: "
                       + _HOW_TO_SET_A_MESH)
    self._check_axis(mesh)
    return mesh

  def __call__(self, q, k, v, *, lam, bias=None, mask=None, segments: common.Segments | None = None,
               local_window: tuple[int, int] | None = None, metric: str, p: Any = 2.0, is_causal: bool = False,
               dropout: common.Dropout | None = None, precision: Any = None,
               return_weights: bool = False) -> common.AttentionResult:
    # Called only for requests unsupported() accepted (base.Kernel).
    mesh = self.resolve_mesh()
    # Every array is an argument (none closed over), so that auto_axes below sees them all.
    run = functools.partial(self._attend, metric=metric, p_static=p if isinstance(p, float) else None,
                            is_causal=is_causal, precision=precision)
    args = (q, k, v, lam, bias, mask, segments, None if isinstance(p, float) else p)
    context = _context_mesh()
    if not (_has_explicit_axes(context) or _explicitly_typed(q, k, v)):
      return run(*args)  # shard_map on the mesh with Auto axes (_attend) reshards whatever it is given
    # The layout gathers chunks across the sequence, which Explicit sharding types cannot express: run it with
    # the mesh's axes as Auto (shard_map then reshards whatever it is given), and give the result q's sharding.
    spec = tuple(jax.typeof(q).sharding.spec) + (None,) * 4 if _explicitly_typed(q) else (None,) * 4
    args = tuple(_with_typed_cotangent(a) if i in (0, 1, 2, 3, 4, 7) else a for i, a in enumerate(args))
    run = jax.sharding.auto_axes(run, out_sharding=common.AttentionResult(
        P(spec[0], spec[1], spec[2], None), P(spec[0], spec[2], spec[1]), None))
    if context is not None:
      return run(*args)
    # Explicitly sharded inputs outside jax.set_mesh: auto_axes and shard_map read the context, so the kernel's
    # own mesh becomes it for the call.
    with jax.sharding.use_abstract_mesh(getattr(mesh, "abstract_mesh", mesh)):
      return run(*args)

  def _attend(self, q, k, v, lam, bias, mask, segments, p_traced, *, metric, p_static, is_causal,
              precision) -> common.AttentionResult:
    p = p_static if p_traced is None else p_traced
    mesh = _auto_axes_mesh(self.resolve_mesh())
    batch, q_len, num_heads, head_dim = q.shape
    kv_len, num_kv = k.shape[1], k.shape[2]
    group = num_heads // num_kv
    size = mesh.shape[self.axis_name]
    chunks = 2 if self.layout == "zigzag" else 1
    default_q, default_k = blockwise.default_blocks(metric, p)
    q_chunk, block_q = _chunk_and_block(q_len, chunks * size, default_q)
    kv_chunk, block_k = _chunk_and_block(kv_len, chunks * size, default_k)

    batch_axes, split = [], 1
    for name in self.batch_axes:
      if name not in mesh.axis_names or batch % (split * mesh.shape[name]):
        break
      batch_axes.append(name)
      split *= mesh.shape[name]
    batch_spec = None if not batch_axes else batch_axes[0] if len(batch_axes) == 1 else tuple(batch_axes)

    full = tiles.TileConfig(metric=metric, p=p if isinstance(p, float) else None, is_causal=False,
                             block_q=block_q, block_k=block_k, q_len=q_len, kv_len=kv_len, group=group,
                             dropout_rate=0.0, broadcast_dropout=True, precision=precision)
    # A partially visible pair is a diagonal one (same chunk, same positions) when q_len == kv_len, where the
    # blockwise kernel's causal tile skipping by index is valid; otherwise the mask is evaluated per tile.
    partial = full._replace(is_causal=True, causal_skip=q_len == kv_len)
    plan = _Plan(full=full, partial=partial, mesh=mesh, axis_name=self.axis_name, size=size, chunks=chunks,
                 q_chunk=q_chunk, kv_chunk=kv_chunk, batch_spec=batch_spec,
                 reduce_axes=(self.axis_name,) + tuple(batch_axes), is_causal=bool(is_causal))

    acc = metrics.accumulation_dtype(q.dtype)
    qg = q.reshape(batch, q_len, num_kv, group, head_dim).transpose(0, 2, 1, 3, 4)
    qg = _lay_out(plan, qg, 2, q_chunk)
    kt = _lay_out(plan, k.transpose(0, 2, 1, 3), 2, kv_chunk)
    vt = _lay_out(plan, v.transpose(0, 2, 1, 3), 2, kv_chunk)
    lam5 = lam.astype(acc).reshape(1, num_kv, 1, group, 1)
    segments = segments or common.Segments()
    seg = common.Segments(_lay_out(plan, segments.q_ids, 1, q_chunk), _lay_out(plan, segments.kv_ids, 1, kv_chunk),
                          segments.q_lengths, segments.kv_lengths)
    p_array = None if isinstance(p, float) else jnp.asarray(p, acc)
    bias5 = tiles.group_operand(None if bias is None else bias.astype(acc), num_kv, group, 1,
                                plan.chunks * size * kv_chunk, 0.0)
    mask5 = tiles.group_operand(mask, num_kv, group, 1, plan.chunks * size * kv_chunk, False)
    out, lse = _ring(plan, qg, kt, vt, lam5, bias5, mask5, seg, p_array)
    out = jax.lax.slice_in_dim(out, 0, q_len, axis=2)  # drops the padded query rows
    lse = jax.lax.slice_in_dim(lse, 0, q_len, axis=2)
    out = out.transpose(0, 2, 1, 3, 4).reshape(batch, q_len, num_heads, v.shape[-1]).astype(v.dtype)
    lse = lse.transpose(0, 1, 3, 2).reshape(batch, num_heads, q_len)
    return common.AttentionResult(out, lse, None)


registry.register("ring", Ring())
