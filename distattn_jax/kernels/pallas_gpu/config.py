"""The tiles and the static description of one call (hashable: the custom_jvp's non-differentiable argument)."""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from distattn_jax import metrics
from distattn_jax.kernels import tiles as tile_core

Array = jax.Array

MIN_BLOCK = 16  # tl.dot needs every matmul dimension to be at least 16
DTYPES = ("float32", "bfloat16", "float16")  # Triton has no float64 tensor-core or exp path worth taking


def next_pow2(n: int) -> int:
  return 1 << max(0, int(n) - 1).bit_length()


def is_pow2(n: Any) -> bool:
  return isinstance(n, int) and not isinstance(n, bool) and n >= 1 and (n & (n - 1)) == 0


@dataclasses.dataclass(frozen=True)
class Tiles:
  """The kernel's tiles and launch parameters (all powers of two; Triton loads power-of-two tiles only).

  Attributes:
    block_q, block_k: query and key positions per tile.
    block_d: features per step of an elementwise form's ``[block_d, block_q, block_k]`` difference tile.
    num_warps, num_stages: Triton launch parameters.
  """

  block_q: int
  block_k: int
  block_d: int
  num_warps: int = 4
  num_stages: int = 2


ROLES = ("forward", "dq", "dkv")


def _roles(forward: Tiles, dq: Tiles, dkv: Tiles) -> dict[str, Tiles]:
  return {"forward": forward, "dq": dq, "dkv": dkv}


# The defaults, keyed by (form, padded head_dim class, dtype class), one entry per program ("forward"; "dq", one
# program per query tile streaming key tiles; "dkv", one program per key tile streaming query tiles): "gram" or
# "elementwise"; 64 for up to 64 features, 128 for more (head_dim is padded to a power of two, at least 16);
# "16bit" (bfloat16, float16) or "float32" (the dtype the programs load: a centred or normalised gram form is
# centred or normalised in float32 before the kernel, so cosine and sqeuclidean load float32 whatever the
# inputs). The programs of one call may differ in block_q and block_k: the lengths are padded to the largest
# of them (all powers of two, so a multiple of every one). None of them is measured yet:
# experiments/gpu_report.py sweeps tiles on a GPU, and what it finds replaces these. The reasoning they stand on:
#
# * gram forward, 16-bit, up to 64 features: FlashAttention-2's Triton tiles, 128 x 64, 4 warps; three
#   pipeline stages, since a 64 x 64 bfloat16 key (and value) tile is 8 KiB and three of each fit shared
#   memory easily, hiding the load latency behind two score matmuls.
# * gram forward, float32 loads: each score matmul is six bfloat16 matmuls of the split operands (gram.py), and
#   the splits of the q tile and of each key tile take registers of their own, so 64 x 64 halves the registers
#   the q tile and the accumulator take; two stages (a float32 key tile is twice the bytes).
# * gram forward, more than 64 features: the q tile and the [block_q, head_dim] float32 accumulator double, so
#   64 x 64 with 8 warps keeps them in registers (64 x 128 float32 over 256 threads is 32 registers each).
# * gram backward: the dq program keeps q, dO and the dq accumulator on chip and streams keys, the dk/dv program
#   keeps k, v and two accumulators and streams queries, each with four matmuls per step. As in Triton's fused
#   attention backward (its tutorial's 128 x 32 / 32 x 128), the resident side is the long one, so its tiles
#   are loaded once for many streamed steps, and the streamed side is short, so the [block_q, block_k] score,
#   probability and cotangent tiles stay small: dq 64 x 32 and dk/dv 32 x 64 (64 features, 16-bit: 128 x 32 and
#   32 x 128, as the tutorial; 4 warps, 8 past 64 features); two stages (a third would hold two more streamed
#   tiles of each of two operands).
# * elementwise forward: the [block_d, block_q, block_k] difference tile is computed feature-major (see
#   elementwise.py), so its feature sum stays inside each thread; at 64 x 32 x 8 it is 16K float32 values, 128 per
#   thread at 4 warps, besides the resident q tile (64 x 64 as 16 registers a thread in 16-bit, 32 in float32):
#   about two thirds of the 255-register budget, so it does not spill. Past 64 features the q tile doubles, so 8
#   warps. block_d = 8 keeps the unrolled feature loop short (8 chunks at 64 features). Two stages: the key
#   tile of the next step is loaded while this one is reduced (32 x 64 float32 is 8 KiB a stage).
# * elementwise backward: each step computes the difference tile twice (value, then its cotangent) and keeps
#   per-chunk gradient accumulators of the resident tile besides it, so both programs take 32 x 32 tiles (8
#   values of the [8, 32, 32] tile per thread-chunk at 4 warps), 8 warps past 64 features (the resident tile,
#   its accumulator and dO or v are then 32 x 128 each); two stages.
def _gram16(width: int) -> dict[str, Tiles]:
  w = 4 if width <= 64 else 8
  if width <= 64:
    return _roles(Tiles(128, 64, width, 4, 3), Tiles(128, 32, width, w, 2), Tiles(32, 128, width, w, 2))
  return _roles(Tiles(64, 64, width, 8, 2), Tiles(64, 32, width, w, 2), Tiles(32, 64, width, w, 2))


def _gram32(width: int) -> dict[str, Tiles]:
  w = 4 if width <= 64 else 8
  return _roles(Tiles(64, 64, width, w, 2), Tiles(64, 32, width, w, 2), Tiles(32, 64, width, w, 2))


def _elementwise(width: int) -> dict[str, Tiles]:
  w = 4 if width <= 64 else 8
  return _roles(Tiles(64, 32, 8, w, 2), Tiles(32, 32, 8, w, 2), Tiles(32, 32, 8, w, 2))


DEFAULT_TILES: dict[tuple[str, int, str], dict[str, Tiles]] = {
    ("gram", 64, "16bit"): _gram16(64),
    ("gram", 64, "float32"): _gram32(64),
    ("gram", 128, "16bit"): _gram16(128),
    ("gram", 128, "float32"): _gram32(128),
    ("elementwise", 64, "16bit"): _elementwise(64),
    ("elementwise", 64, "float32"): _elementwise(64),
    ("elementwise", 128, "16bit"): _elementwise(128),
    ("elementwise", 128, "float32"): _elementwise(128),
}


def default_tiles(metric: str, p: Any, head_dim: int, dtype: Any = "float32", role: str = "forward") -> Tiles:
  """The default tiles of program ``role`` (``"forward"``, ``"dq"`` or ``"dkv"``) for ``metric`` at order
  ``p``, ``head_dim`` features and the ``dtype`` the programs load: ``DEFAULT_TILES``'s entry (its comment gives
  the reasoning; none is measured yet), with a gram form's ``block_d`` the padded width (a gram form takes every
  feature at once) and an elementwise form's at most that."""
  if role not in ROLES:
    raise ValueError(f"default_tiles: role must be one of {ROLES}; got {role!r}")
  form = metrics.get(metric).resolve(p if isinstance(p, float) else None)
  dp = max(MIN_BLOCK, next_pow2(head_dim))
  kind = "gram" if isinstance(form, metrics.Gram) else "elementwise"
  name = jnp.dtype(dtype).name if dtype is not None else "float32"
  entry = DEFAULT_TILES[(kind, 64 if dp <= 64 else 128, "16bit" if name in ("bfloat16", "float16") else "float32")]
  tiles = entry[role]
  return dataclasses.replace(tiles, block_d=dp if kind == "gram" else min(tiles.block_d, dp))


class CallConfig(NamedTuple):
  """Everything static about one call (hashable: the custom_jvp's non-differentiable argument)."""

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
  # The tile geometry as the tile core sees it (which tiles a causal mask or a window lets a query tile skip),
  # at the forward program's tiles; :func:`for_role` gives a backward program's.
  geometry: tile_core.TileConfig
  # The backward programs' tiles (None: the forward's), the padded key length and the bfloat16 pieces a float32
  # gram operand is split into for the tensor cores (gram.py).
  dq_tiles: Tiles | None = None
  dkv_tiles: Tiles | None = None
  kv_pad: int | None = None
  gram_pieces: int = 3


def for_role(cfg: CallConfig, role: str) -> CallConfig:
  """``cfg`` as program ``role`` sees it: its tiles in ``tiles`` and in the geometry's block sizes."""
  tiles = {"forward": cfg.tiles, "dq": cfg.dq_tiles, "dkv": cfg.dkv_tiles}[role] or cfg.tiles
  geometry = cfg.geometry if cfg.geometry is None else cfg.geometry._replace(
      block_q=tiles.block_q, block_k=tiles.block_k)
  return cfg._replace(tiles=tiles, geometry=geometry)



def check_block(owner: str, name: str, value: Any):
  if value is not None and not (is_pow2(value) and value >= MIN_BLOCK):
    raise ValueError(f"{owner}: {name} must be None or a power of two >= {MIN_BLOCK} (Triton tiles are "
                     f"powers of two and tl.dot needs 16); got {value!r}")


def check_launch(owner: str, block_d: Any, num_warps: Any, num_stages: Any):
  """Checks the feature chunk and Triton's launch parameters a user may set (None: the default)."""
  if block_d is not None and not is_pow2(block_d):
    raise ValueError(f"{owner}: block_d must be None or a power of two (the features an elementwise form "
                     f"reduces per step; Triton tiles are powers of two); got {block_d!r}")
  if num_warps is not None and not (is_pow2(num_warps) and num_warps <= 32):
    raise ValueError(f"{owner}: num_warps must be None or a power of two from 1 to 32 (a Triton program has at "
                     f"most 1024 threads); got {num_warps!r}")
  if num_stages is not None and not (isinstance(num_stages, int) and not isinstance(num_stages, bool)
                                     and num_stages >= 1):
    raise ValueError(f"{owner}: num_stages must be None or an int >= 1 (Triton's software pipeline depth); got "
                     f"{num_stages!r}")

