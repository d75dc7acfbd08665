"""The kernel object: the protocol's capabilities and checks, the tiles of a call, and the layout it hands the
``pallas_call`` programs (padding, centring and normalisation of gram forms, the mask operands)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from distattn_jax import metrics
from distattn_jax.kernels import base, common
from distattn_jax.kernels import tiles as tile_core
from distattn_jax.kernels.pallas_gpu.calls import fused
from distattn_jax.kernels.pallas_gpu.config import (DTYPES, MIN_BLOCK, CallConfig, Tiles, check_block,
                                                    check_launch, default_tiles, next_pow2)

INT32_MAX = 2**31 - 1
from distattn_jax.metrics import gram as gram_lib


@dataclasses.dataclass(frozen=True)
class Pallas:
  """The fused GPU kernel (registered as ``"pallas"``); ``None`` tiles pick :func:`default_tiles`, per program
  (forward, dq, dk/dv); a value set here applies to all three.

  Attributes:
    block_q, block_k: query and key positions per tile (powers of two, at least 16; clipped to the lengths).
    block_d: features per step of an elementwise form's difference tile (a power of two; clipped to the
      padded width). Gram forms take every feature at once and ignore it.
    num_warps, num_stages: Triton's launch parameters (a power of two up to 32; at least 1).
    interpret: run the kernel through Pallas' interpreter (any backend, slow): how the tests check it on CPU.
      Without it the kernel needs a CUDA GPU (the Triton lowering).
  """

  block_q: int | None = None
  block_k: int | None = None
  interpret: bool = False
  block_d: int | None = None
  num_warps: int | None = None
  num_stages: int | None = None

  def __post_init__(self):
    check_block("Pallas", "block_q", self.block_q)
    check_block("Pallas", "block_k", self.block_k)
    check_launch("Pallas", self.block_d, self.num_warps, self.num_stages)
    if not isinstance(self.interpret, bool):
      raise TypeError(f"Pallas: interpret must be a bool; got {self.interpret!r}")

  capabilities = base.Capabilities(weights=False, dropout=False, memory="linear")

  def unsupported(self, request: base.Request) -> str | None:
    reason = base.unsupported(self.capabilities, request)
    if reason is None and request.dtype is not None and request.dtype not in DTYPES:
      reason = f"cannot take {request.dtype} inputs (only {', '.join(DTYPES)})"
    if reason is None:
      reason = self._too_large(request)
    return reason

  def _too_large(self, request: base.Request) -> str | None:
    """Why an operand is too large for Triton's int32 offsets, or None.

    The Triton programs index every operand with int32 element offsets (block index times block size times
    stride); the byte offset is formed by the pointer arithmetic at pointer width. An operand of more than
    2^31 - 1 elements would wrap (an int8 mask of [2, 1, 32768, 32768] has 2^31), so such a call is declined
    rather than reading or writing the wrong place. The sizes are those of the padded layout the programs see,
    bounded from above where the tiles are not known yet (lengths padded to 128, the largest default tile, or
    to the kernel's own larger block; an unknown width counts as the smallest tile, 16).
    """
    bq = max(self.block_q or 128, 128)
    bk = max(self.block_k or 128, 128)
    t_pad = -(-request.q_len // bq) * bq
    s_pad = -(-request.kv_len // bk) * bk
    d_pad = max(MIN_BLOCK, next_pow2(request.head_dim or MIN_BLOCK))
    dv_pad = max(MIN_BLOCK, next_pow2(request.v_dim or request.head_dim or MIN_BLOCK))
    b, h, kv = request.batch, request.num_heads, request.num_kv_heads
    sizes = {
        "query (and its gradient)": b * t_pad * h * d_pad,
        "key": b * s_pad * kv * d_pad,
        "value": b * s_pad * kv * dv_pad,
        "output": b * t_pad * h * dv_pad,
        # The dk/dv program writes one gradient per query head, summed over the group afterwards.
        "key/value gradient per query head": b * s_pad * h * max(d_pad, dv_pad),
    }
    for name, shape in (("bias (and its gradient)", request.bias_shape), ("mask", request.mask_shape)):
      if shape is not None:
        bb, hh, tt, ss = shape
        sizes[name] = bb * hh * (t_pad if tt > 1 else 1) * (s_pad if ss > 1 else 1)
    for name, size in sizes.items():
      if size > INT32_MAX:
        return (f"cannot index a {name} of {size} elements in its padded layout (more than 2^31 - 1: the Triton "
                f"programs' int32 offsets would wrap); use implementation='blockwise'")
    return None

  def tiles(self, metric: str, p: Any, head_dim: int, q_len: int, kv_len: int, dtype: Any = "float32",
            role: str = "forward") -> Tiles:
    """The tiles program ``role`` (``"forward"``, ``"dq"``, ``"dkv"``) uses for one call: the defaults for the
    form, width and the ``dtype`` the programs load, overridden by the kernel's (which apply to every program),
    clipped to the lengths and the padded width."""
    default = default_tiles(metric, p, head_dim, dtype, role)
    block_q = min(self.block_q or default.block_q, max(MIN_BLOCK, next_pow2(q_len)))
    block_k = min(self.block_k or default.block_k, max(MIN_BLOCK, next_pow2(kv_len)))
    block_d = default.block_d
    gram = isinstance(metrics.get(metric).resolve(p if isinstance(p, float) else None), metrics.Gram)
    if self.block_d is not None and not gram:  # a gram form takes every feature at once
      block_d = min(self.block_d, max(MIN_BLOCK, next_pow2(head_dim)))
    return dataclasses.replace(
        default, block_q=block_q, block_k=block_k, block_d=block_d,
        num_warps=self.num_warps or default.num_warps, num_stages=self.num_stages or default.num_stages)

  def __call__(self, q, k, v, *, lam, bias=None, mask=None, segments: common.Segments | None = None,
               local_window: tuple[int, int] | None = None, metric: str, p: Any = 2.0, is_causal: bool = False,
               dropout: common.Dropout | None = None, precision: Any = None,
               return_weights: bool = False) -> common.AttentionResult:
    # Called only for requests unsupported() accepted (base.Kernel): no weights, no dropout, a float dtype
    # Triton computes in.
    batch, q_len, num_heads, head_dim = q.shape
    kv_len, num_kv, v_dim = k.shape[1], k.shape[2], v.shape[-1]
    record = metrics.get(metric)
    if not record.parametric:
      p = 2.0  # ignored by the form; a traced value must not become a kernel operand
    form = record.resolve(p if isinstance(p, float) else None)
    # The dtype the programs load: a centred or normalised gram form gets float32 operands (below).
    in_dtype = q.dtype
    loads = (jnp.float32 if isinstance(form, metrics.Gram) and (record.translation_invariant or form.normalize)
             else q.dtype)
    tiles, dq_tiles, dkv_tiles = (self.tiles(metric, p, head_dim, q_len, kv_len, loads, role)
                                  for role in ("forward", "dq", "dkv"))
    # The lengths are padded to the largest tile of the three programs (powers of two: a multiple of each).
    bq = max(t.block_q for t in (tiles, dq_tiles, dkv_tiles))
    bk = max(t.block_k for t in (tiles, dq_tiles, dkv_tiles))
    t_pad = -(-q_len // bq) * bq
    s_pad = -(-kv_len // bk) * bk
    d_pad = max(MIN_BLOCK, next_pow2(head_dim))
    dv_pad = max(MIN_BLOCK, next_pow2(v_dim))

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
    cfg = CallConfig(metric=metric, p=p if isinstance(p, float) else None, is_causal=bool(is_causal), tiles=tiles,
                  q_len=q_len, kv_len=kv_len, head_dim=head_dim, group=num_heads // num_kv, precision=precision,
                  bias_shape=None if bias is None else inputs["bias"].shape,
                  mask_shape=None if mask is None else inputs["mask"].shape, has_ids=has_ids,
                  has_kv_valid=has_kv_valid, interpret=self.interpret,
                  geometry=tile_core.TileConfig(
                      metric=metric, p=None, is_causal=bool(is_causal), block_q=tiles.block_q,
                      block_k=tiles.block_k, q_len=q_len, kv_len=kv_len, group=num_heads // num_kv,
                      dropout_rate=0.0, broadcast_dropout=True, precision=None,
                      local_window=None if local_window is None else tuple(local_window)),
                  dq_tiles=dq_tiles, dkv_tiles=dkv_tiles, kv_pad=s_pad,
                  # float32 inputs get float32-level gram matmuls (three bfloat16 pieces); 16-bit inputs that a
                  # centred or normalised form made float32 get two (about 1e-5, far below their own rounding).
                  gram_pieces=3 if jnp.dtype(in_dtype) == jnp.float32 else 2)
    out, lse = fused(cfg, inputs)
    out = out[:, :q_len, :, :v_dim]
    lse = lse[:, :, :q_len]
    if segments.q_lengths is not None:
      # Rows past a query length see no key: zeroed here (their cotangent then is 0, so is their gradient).
      real = jnp.arange(q_len).reshape(1, q_len) < segments.q_lengths.reshape(batch, 1)
      out = jnp.where(real[:, :, None, None], out, 0.0)
      lse = jnp.where(real[:, None, :], lse, -jnp.inf)
    return common.AttentionResult(out.astype(v.dtype), lse, None)
