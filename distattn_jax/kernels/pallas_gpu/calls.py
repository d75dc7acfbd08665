"""The ``pallas_call`` plumbing over the padded layout, and the custom_jvp joining the forward to the two
backward programs:
  q [B, Tp, H, Dp], k [B, Sp, K, Dp], v [B, Sp, K, Dvp], lam [H], bias/mask [B|1, H|1, Tp|1, Sp|1],
  q_ids [B, Tp], kv_ids [B, Sp], kv_valid [B, Sp], p [1].

Forward mode has no Triton program: the tangent of ``(out, lse)`` is the tile core's XLA loop
(:func:`tiles.tangent_sums`, the blockwise kernel's) on the same operands laid out as the tile core wants them,
with ``P`` from the fused forward's ``lse``, so its memory is linear in the lengths but it runs at XLA's speed.
That tangent map is a :func:`distattn_jax.autodiff.linear_call` whose transpose is the two fused backward
programs, so ``jax.grad`` runs exactly the Triton backward it ran as a ``custom_vjp``."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from distattn_jax import autodiff
from distattn_jax.kernels import tiles as tile_core
from distattn_jax.kernels.pallas_gpu.config import CallConfig, for_role
from distattn_jax.kernels.pallas_gpu.programs import dkv_program, dq_program, forward_program


# The role of each axis of an operand in the padded layout: the batch, query heads ("h"), key/value heads
# ("kv", query head // group), query positions ("t"), key positions ("s"), features ("d"), the per-head lam
# ("lam", kept as a length-1 block) and a scalar operand ("one").
ROLES = {
    "q": ("b", "t", "h", "d"), "do": ("b", "t", "h", "d"), "dq": ("b", "t", "h", "d"),
    "k": ("b", "s", "kv", "d"), "v": ("b", "s", "kv", "d"),
    "lam": ("lam",), "p": ("one",),
    "bias": ("b", "h", "t", "s"), "mask": ("b", "h", "t", "s"),
    "q_ids": ("b", "t"), "kv_ids": ("b", "s"), "kv_valid": ("b", "s"),
    "lse": ("b", "h", "t"), "delta": ("b", "h", "t"), "dlam": ("b", "h", "t"), "dp": ("b", "h", "t"),
}


def spec_and_fixed(cfg: CallConfig, name: str, shape, *, by_q: bool, t_pad: int, s_pad: int,
                   loop_b: bool = False, loop_h: bool = False):
  """The BlockSpec of operand ``name`` over the grid (tile, head, batch) (``GRID_ORDER``), and the axes its
  program must index itself (``{axis: "b" | "h" | "kv"}``).

  ``by_q`` tiles the queries (forward, dq), else the keys. ``loop_b``/``loop_h``: the program loops over the
  batch/heads itself (the grid has one position there), so it gets the whole axis and indexes it per pass. An
  axis of size 1 (a broadcast bias or mask, one batch) is always squeezed at index 0.
  """
  bq, bk, g = cfg.tiles.block_q, cfg.tiles.block_k, cfg.group
  tq = bq if by_q else t_pad
  tk = s_pad if by_q else bk
  looped = {"b": loop_b, "h": loop_h, "kv": loop_h}
  block, fixed = [], {}
  for axis, (role, n) in enumerate(zip(ROLES[name], shape)):
    if role in looped:
      if n > 1 and looped[role]:
        block.append(n)
        fixed[axis] = role
      else:
        block.append(None)
    elif role == "lam":
      block.append(n if loop_h else 1)
      if loop_h:
        fixed[axis] = "h"
    elif role == "t":
      block.append(tq if n > 1 else 1)
    elif role == "s":
      block.append(tk if n > 1 else 1)
    else:
      block.append(n)

  def index_map(t, h, b, roles=ROLES[name], shape=tuple(shape)):
    where = {"b": b, "h": h, "kv": h // g, "lam": h,
             "t": t if by_q else 0, "s": 0 if by_q else t, "d": 0, "one": 0}
    out = []
    for role, n in zip(roles, shape):
      if role in ("t", "s"):
        out.append(where[role] if n > 1 else 0)
      elif role in looped:
        out.append(where[role] if n > 1 and not looped[role] else 0)
      elif role == "lam":
        out.append(0 if loop_h else h)
      else:
        out.append(0)
    return tuple(out)

  # The program's ref has the squeezed (None) axes removed: number the fixed axes as it sees them.
  kept = [axis for axis, size in enumerate(block) if size is not None]
  return pl.BlockSpec(tuple(block), index_map), {kept.index(axis): role for axis, role in fixed.items()}


def in_specs(cfg: CallConfig, names: list[str], shapes: dict, *, by_q: bool):
  """BlockSpecs over the grid (tile, head, batch): ``by_q`` tiles the queries (forward, dq), else the keys."""
  t_pad, s_pad = shapes["q"][1], shapes["k"][1]
  return [spec_and_fixed(cfg, n, shapes[n], by_q=by_q, t_pad=t_pad, s_pad=s_pad)[0] for n in names]


# The grid is (tile, head, batch), tiles fastest. Triton launches program_id(0) as CUDA's x axis, and blocks are
# dispatched x fastest, so the programs resident at one time are the query tiles (forward, dq) or key tiles
# (dk/dv) of one head: they stream the same key/value (or query) tiles of that head, which are then read from
# DRAM once and served to the others from L2 (at N = 32768, 64 features, 16-bit, one head's K and V are 8 MiB,
# which fits an H100's 50 MiB L2; the whole batch's, at 8 x 32 heads, do not). Heads come next, so the heads
# of one grouped-query group (adjacent, h // group) follow each other while their kv head is still in L2.
# jax's own Triton flash attention orders its grid (query tile, batch, head) for the first reason. The batch is
# the slowest (CUDA's z axis, at most 65535, as the heads on y: the tiles, x, have 2^31 - 1).
GRID_ORDER = ("tile", "head", "batch")


def compiler_params(cfg: CallConfig):
  return plgpu.CompilerParams(num_warps=cfg.tiles.num_warps, num_stages=cfg.tiles.num_stages)


def call_forward(cfg: CallConfig, inputs: dict):
  names = list(inputs)
  shapes = {n: x.shape for n, x in inputs.items()}
  batch, t_pad, num_heads, _ = shapes["q"]
  v_dim = shapes["v"][-1]
  bq = cfg.tiles.block_q
  return pl.pallas_call(
      functools.partial(forward_program, cfg=cfg, names=names),
      grid=(t_pad // bq, num_heads, batch),
      in_specs=in_specs(cfg, names, shapes, by_q=True),
      out_specs=[pl.BlockSpec((None, bq, None, v_dim), lambda t, h, b: (b, t, h, 0)),
                 pl.BlockSpec((None, None, bq), lambda t, h, b: (b, h, t))],
      out_shape=[jax.ShapeDtypeStruct((batch, t_pad, num_heads, v_dim), jnp.float32),
                 jax.ShapeDtypeStruct((batch, num_heads, t_pad), jnp.float32)],
      compiler_params=compiler_params(cfg), interpret=cfg.interpret, name="distance_attention_fwd",
  )(*inputs.values())


def bias_grad_loops(cfg: CallConfig, batch: int, num_heads: int) -> tuple[bool, bool]:
  """Whether the dq program loops over the batch and over the heads itself, so that the bias gradient, summed
  over the axes the bias broadcasts along, is one program's sum (a sum across programs would need atomics or a
  second pass over a ``[B, H, T, S]`` partial). It costs parallelism: a ``[1, 1, T, S]`` bias gives
  ``T / block_q`` programs of ``B * H`` passes each, against ``B * H * T / block_q`` programs without a bias
  gradient; at the lengths where a ``T x S`` bias is worth keeping that is still hundreds of programs."""
  bb, hh = cfg.bias_shape[:2]
  return bb == 1 and batch > 1, hh == 1 and num_heads > 1


def call_backward(cfg: CallConfig, inputs: dict, do, lse, delta, *, want_dq: bool = True,
                  want_bias: bool = True, want_dkv: bool = True):
  """The dq program (dq, the lam and p row sums, and with ``want_bias`` the bias gradient in the bias's own
  shape, except that a bias broadcast over the queries gets one row per query tile, summed by the caller) and
  the dk/dv program; either is left out (None) when not wanted."""
  dq_cfg, dkv_cfg = for_role(cfg, "dq"), for_role(cfg, "dkv")
  names = list(inputs)
  every = dict(inputs, do=do, lse=lse, delta=delta)
  shapes = {n: x.shape for n, x in every.items()}
  batch, t_pad, num_heads, dim = shapes["q"]
  s_pad, v_dim = shapes["k"][1], shapes["v"][-1]
  bq, bk = dq_cfg.tiles.block_q, dkv_cfg.tiles.block_k
  all_names = names + ["do", "lse", "delta"]
  want_bias = want_bias and cfg.bias_shape is not None
  dq_outs = dk = dv = None
  if want_dq or want_bias:
    loop_b, loop_h = bias_grad_loops(cfg, batch, num_heads) if want_bias else (False, False)
    specs_fixed = [spec_and_fixed(dq_cfg, n, shapes[n], by_q=True, t_pad=t_pad, s_pad=s_pad, loop_b=loop_b,
                                  loop_h=loop_h) for n in all_names]
    rows = jax.ShapeDtypeStruct((batch, num_heads, t_pad), jnp.float32)
    out_names = ["dq", "dlam"] + (["dp"] if "p" in inputs else [])
    out_shape = [jax.ShapeDtypeStruct((batch, t_pad, num_heads, dim), jnp.float32)]
    out_shape += [rows] * (len(out_names) - 1)
    out_fixed = [spec_and_fixed(dq_cfg, n, o.shape, by_q=True, t_pad=t_pad, s_pad=s_pad, loop_b=loop_b,
                                loop_h=loop_h) for n, o in zip(out_names, out_shape)]
    out_specs = [spec for spec, _ in out_fixed]
    if want_bias:
      bb, hh, tt, ss = cfg.bias_shape
      # One row per query tile where the bias broadcasts over the queries (the caller sums them): T / block_q
      # rows, not T.
      out_shape.append(jax.ShapeDtypeStruct((bb, hh, t_pad // bq if tt == 1 else t_pad, ss), jnp.float32))
      out_specs.append(pl.BlockSpec(
          (None, None, 1 if tt == 1 else bq, ss),
          lambda t, h, b, bb=bb, hh=hh: (b if bb > 1 else 0, h if hh > 1 else 0, t, 0)))
    fixed = {n: f for n, (_, f) in zip(all_names, specs_fixed)}
    fixed.update({n: f for n, (_, f) in zip(out_names, out_fixed)})
    dq_outs = pl.pallas_call(
        functools.partial(dq_program, cfg=dq_cfg, names=names, fixed=fixed, want_bias=want_bias,
                          passes=(batch if loop_b else 1, num_heads if loop_h else 1)),
        grid=(t_pad // bq, 1 if loop_h else num_heads, 1 if loop_b else batch),
        in_specs=[spec for spec, _ in specs_fixed],
        out_specs=out_specs, out_shape=out_shape,
        compiler_params=compiler_params(dq_cfg), interpret=cfg.interpret, name="distance_attention_dq",
    )(*every.values())
  if want_dkv:
    dk, dv = pl.pallas_call(
        functools.partial(dkv_program, cfg=dkv_cfg, names=names),
        grid=(s_pad // bk, num_heads, batch),
        in_specs=in_specs(dkv_cfg, all_names, shapes, by_q=False),
        out_specs=[pl.BlockSpec((None, bk, None, dim), lambda t, h, b: (b, t, h, 0)),
                   pl.BlockSpec((None, bk, None, v_dim), lambda t, h, b: (b, t, h, 0))],
        out_shape=[jax.ShapeDtypeStruct((batch, s_pad, num_heads, dim), jnp.float32),
                   jax.ShapeDtypeStruct((batch, s_pad, num_heads, v_dim), jnp.float32)],
        compiler_params=compiler_params(dkv_cfg), interpret=cfg.interpret, name="distance_attention_dkv",
    )(*every.values())
  return dq_outs, dk, dv


# The operands with a tangent; the mask, the ids and the valid keys are integers.
DIFFERENTIABLE = ("q", "k", "v", "lam", "bias", "p")


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def fused(cfg: CallConfig, inputs: dict):
  return call_forward(cfg, inputs)


@fused.defjvp
def _fused_jvp(cfg: CallConfig, primals, tangents):
  (inputs,), (dots,) = primals, tangents
  # ``fused`` again, not ``call_forward``: differentiated once more (a Hessian), the forward is this rule's.
  out, lse = fused(cfg, inputs)
  linear = {name: dots[name] for name in DIFFERENTIABLE if name in inputs}
  # The transpose is told which cotangents are needed: a pallas_call keeps all its outputs under dead code
  # elimination, so the bias gradient (T x S) and the programs no needed cotangent comes from are left out here.
  # A pallas_call has no forward-mode rule, so forward over reverse (Hessian-vector products) differentiates
  # the transpose of the XLA tangent loop in its place: same values, autodiff's memory.
  d_out, d_lse = autodiff.linear_call(functools.partial(_tangents, cfg), functools.partial(_cotangents, cfg),
                                      (inputs, out, lse), linear, transpose_needs=True,
                                      derivable_transpose=functools.partial(_cotangents_by_autodiff, cfg))
  return (out, lse), (d_out, d_lse)


def _tile_operands(cfg: CallConfig, res):
  """The fused call's residuals laid out as the tile core wants them: heads grouped onto their kv head, the
  zero-padded features cut off (a user's ``phi(0)`` need not be 0, and the scale reads the feature count), masks
  as booleans, the valid keys as lengths. Returns ``(tile_config, residuals, layout)``, ``layout`` the linear map
  from the call's tangents (a dict) to the tile core's."""
  inputs, out, lse = res
  q, k = inputs["q"], inputs["k"]
  batch, t_pad, num_heads, _ = q.shape
  num_kv, group, dim = k.shape[2], cfg.group, cfg.head_dim
  s_pad = k.shape[1]

  def queries(x):  # [B, Tp, H, Dp] -> [B, K, Tp, G, D]
    return x[..., :dim].reshape(batch, t_pad, num_kv, group, dim).transpose(0, 2, 1, 3, 4)

  def keys(x, features=None):  # [B, Sp, K, D'] -> [B, K, Sp, D']
    return (x if features is None else x[..., :features]).transpose(0, 2, 1, 3)

  def heads(x):  # [H] -> [1, K, 1, G, 1]
    return x.reshape(1, num_kv, 1, group, 1)

  def grouped(x, fill):
    return None if x is None else tile_core.group_operand(x, num_kv, group, t_pad, s_pad, fill)

  mask = inputs.get("mask")
  kv_valid = inputs.get("kv_valid")
  seg = tile_core.TileSegments(
      q_ids=inputs.get("q_ids"), kv_ids=inputs.get("kv_ids"),
      kv_lengths=None if kv_valid is None else jnp.sum(kv_valid, axis=1))
  p = inputs.get("p")
  tile_cfg = cfg.geometry._replace(p=cfg.p, precision=cfg.precision)
  lse5 = lse.reshape(batch, num_kv, group, t_pad).transpose(0, 1, 3, 2)
  out5 = out.reshape(batch, t_pad, num_kv, group, out.shape[-1]).transpose(0, 2, 1, 3, 4)
  residuals = tile_core.Residuals(
      queries(q), keys(k, dim), keys(inputs["v"]), heads(inputs["lam"]), grouped(inputs.get("bias"), 0.0),
      grouped(None if mask is None else mask != 0, False), seg, None if p is None else p[0], None, out5, lse5)

  def layout(dots: dict) -> tile_core.Tangents:
    d_bias, d_p = dots.get("bias"), dots.get("p")
    return tile_core.Tangents(
        queries(dots["q"]), keys(dots["k"], dim), keys(dots["v"]), heads(dots["lam"]), grouped(d_bias, 0.0),
        None if d_p is None else d_p[0])

  return tile_cfg, residuals, layout


def _tangents(cfg: CallConfig, res, dots: dict):
  """``(d_out [B, Tp, H, Dvp], d_lse [B, H, Tp])`` from the tile core's tangent loop (:func:`_tile_operands`)."""
  _, out, lse = res
  tile_cfg, residuals, layout = _tile_operands(cfg, res)
  d_lse, d_acc = tile_core.tangent_sums(tile_cfg, residuals, layout(dots))
  d_out = tile_core.tangent_out(d_acc, d_lse, residuals.out)
  d_out = d_out.transpose(0, 2, 1, 3, 4).reshape(out.shape).astype(out.dtype)
  return d_out, d_lse.transpose(0, 1, 3, 2).reshape(lse.shape).astype(lse.dtype)


def _cotangents_by_autodiff(cfg: CallConfig, res, cotangents, needed: dict) -> dict:
  """:func:`_cotangents` computed by the tile core's XLA backward loops, which JAX can differentiate (forward
  mode through a ``lax.while_loop``), mapped back to the call's layout by the transpose of that layout."""
  del needed  # every cotangent is computed; the caller drops those it does not need
  inputs, out, lse = res
  tile_cfg, residuals, layout = _tile_operands(cfg, res)
  d_out, d_lse = cotangents
  batch, t_pad, num_heads, _ = out.shape
  num_kv, group = inputs["k"].shape[2], cfg.group
  d_out5 = d_out.reshape(batch, t_pad, num_kv, group, out.shape[-1]).transpose(0, 2, 1, 3, 4)
  d_lse5 = d_lse.reshape(batch, num_kv, group, t_pad).transpose(0, 1, 3, 2)
  tile_grads = tile_core.gradients(tile_cfg, residuals, d_out5, d_lse5)
  linear = {name: jnp.zeros_like(inputs[name]) for name in DIFFERENTIABLE if name in inputs}
  shapes = jax.eval_shape(layout, linear)
  tile_cts = jax.tree.map(lambda g, s: g.astype(s.dtype), tile_core.Tangents(*tile_grads), shapes)
  return jax.linear_transpose(layout, linear)(tile_cts)[0]


def _cotangents(cfg: CallConfig, res, cotangents, needed: dict) -> dict:
  inputs, out, lse = res
  d_out, d_lse = cotangents
  delta = tile_core.row_terms(out, d_out, d_lse.transpose(0, 2, 1)).transpose(0, 2, 1)
  do = d_out.astype(inputs["v"].dtype)
  want_bias = needed.get("bias", False)
  dq_outs, dk, dv = call_backward(
      cfg, inputs, do, lse, delta, want_dq=any(needed.get(n, False) for n in ("q", "lam", "p")),
      want_bias=want_bias, want_dkv=needed["k"] or needed["v"])
  # What is not needed is returned as zeros, which the caller drops.
  grads = {name: jnp.zeros_like(inputs[name]) for name in DIFFERENTIABLE if name in inputs}
  q, k, v = inputs["q"], inputs["k"], inputs["v"]
  if dq_outs is not None:
    grads["q"] = dq_outs[0].astype(q.dtype)
    grads["lam"] = jnp.sum(dq_outs[1], axis=(0, 2)).astype(inputs["lam"].dtype)
    if "p" in inputs:
      grads["p"] = jnp.sum(dq_outs[2]).reshape(1).astype(inputs["p"].dtype)
    if want_bias:
      dbias = dq_outs[-1]
      if cfg.bias_shape[2] == 1:
        dbias = jnp.sum(dbias, axis=2, keepdims=True)  # the per-query-tile rows
      grads["bias"] = dbias.astype(inputs["bias"].dtype)
  if dk is not None:
    batch, s_pad, num_heads, dim = dk.shape
    num_kv = k.shape[2]
    grads["k"] = dk.reshape(batch, s_pad, num_kv, cfg.group, dim).sum(3).astype(k.dtype)
    grads["v"] = dv.reshape(batch, s_pad, num_kv, cfg.group, dv.shape[-1]).sum(3).astype(v.dtype)
  return grads
