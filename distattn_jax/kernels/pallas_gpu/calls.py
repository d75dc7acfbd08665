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

from distattn_jax import autodiff, metrics
from distattn_jax.kernels import tiles as tile_core
from distattn_jax.kernels.pallas_gpu.config import CallConfig
from distattn_jax.kernels.pallas_gpu.programs import dkv_program, dq_program, forward_program


def in_specs(cfg: CallConfig, names: list[str], shapes: dict, *, by_q: bool):
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
      grid=(batch, num_heads, t_pad // bq),
      in_specs=in_specs(cfg, names, shapes, by_q=True),
      out_specs=[pl.BlockSpec((None, bq, None, v_dim), lambda b, h, t: (b, t, h, 0)),
                 pl.BlockSpec((None, None, bq), lambda b, h, t: (b, h, t))],
      out_shape=[jax.ShapeDtypeStruct((batch, t_pad, num_heads, v_dim), jnp.float32),
                 jax.ShapeDtypeStruct((batch, num_heads, t_pad), jnp.float32)],
      compiler_params=compiler_params(cfg), interpret=cfg.interpret, name="distance_attention_fwd",
  )(*inputs.values())


def call_backward(cfg: CallConfig, inputs: dict, do, lse, delta):
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
      functools.partial(dq_program, cfg=cfg, names=names),
      grid=(batch, num_heads, t_pad // bq),
      in_specs=in_specs(cfg, all_names, shapes, by_q=True),
      out_specs=out_specs, out_shape=out_shape,
      compiler_params=compiler_params(cfg), interpret=cfg.interpret, name="distance_attention_dq",
  )(*every.values())
  dk, dv = pl.pallas_call(
      functools.partial(dkv_program, cfg=cfg, names=names),
      grid=(batch, num_heads, s_pad // bk),
      in_specs=in_specs(cfg, all_names, shapes, by_q=False),
      out_specs=[pl.BlockSpec((None, bk, None, dim), lambda b, h, t: (b, t, h, 0)),
                 pl.BlockSpec((None, bk, None, v_dim), lambda b, h, t: (b, t, h, 0))],
      out_shape=[jax.ShapeDtypeStruct((batch, s_pad, num_heads, dim), jnp.float32),
                 jax.ShapeDtypeStruct((batch, s_pad, num_heads, v_dim), jnp.float32)],
      compiler_params=compiler_params(cfg), interpret=cfg.interpret, name="distance_attention_dkv",
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
  out, lse = call_forward(cfg, inputs)
  linear = {name: dots[name] for name in DIFFERENTIABLE if name in inputs}
  d_out, d_lse = autodiff.linear_call(functools.partial(_tangents, cfg), functools.partial(_cotangents, cfg),
                                      (inputs, out, lse), linear)
  return (out, lse), (d_out, d_lse)


def _tangents(cfg: CallConfig, res, dots: dict):
  """``(d_out [B, Tp, H, Dvp], d_lse [B, H, Tp])`` from the tile core's tangent loop, on the operands laid out
  as it wants them: heads grouped onto their kv head, the zero-padded features cut off (a user's ``phi(0)``
  need not be 0, and the scale reads the feature count), masks as booleans, the valid keys as lengths."""
  inputs, out, lse = res
  q, k, v = inputs["q"], inputs["k"], inputs["v"]
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
  residuals = tile_core.Residuals(
      queries(q), keys(k, dim), keys(v), heads(inputs["lam"]), grouped(inputs.get("bias"), 0.0),
      grouped(None if mask is None else mask != 0, False), seg, None if p is None else p[0], None, None, lse5)
  d_bias, d_p = dots.get("bias"), dots.get("p")
  tangents = tile_core.Tangents(
      queries(dots["q"]), keys(dots["k"], dim), keys(dots["v"]), heads(dots["lam"]), grouped(d_bias, 0.0),
      None if d_p is None else d_p[0])
  d_lse, d_acc = tile_core.tangent_sums(tile_cfg, residuals, tangents)
  out5 = out.reshape(batch, t_pad, num_kv, group, out.shape[-1]).transpose(0, 2, 1, 3, 4)
  d_out = tile_core.tangent_out(d_acc, d_lse, out5)
  d_out = d_out.transpose(0, 2, 1, 3, 4).reshape(out.shape).astype(out.dtype)
  return d_out, d_lse.transpose(0, 1, 3, 2).reshape(lse.shape).astype(lse.dtype)


def _cotangents(cfg: CallConfig, res, cotangents) -> dict:
  inputs, out, lse = res
  d_out, d_lse = cotangents
  delta = tile_core.row_terms(out, d_out, d_lse.transpose(0, 2, 1)).transpose(0, 2, 1)
  do = d_out.astype(inputs["v"].dtype)
  dq_outs, dk, dv = call_backward(cfg, inputs, do, lse, delta)
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
  return {name: grads[name] for name in DIFFERENTIABLE if name in inputs}


