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
    block_d: features per step of an elementwise form's ``[block_q, block_k, block_d]`` difference tile.
    num_warps, num_stages: Triton launch parameters.
  """

  block_q: int
  block_k: int
  block_d: int
  num_warps: int = 4
  num_stages: int = 2


# The defaults, keyed by (form, padded head_dim class, dtype class): "gram" or "elementwise"; 64 for up to 64
# features, 128 for more (head_dim is padded to a power of two, at least 16); "16bit" (bfloat16, float16) or
# "float32" (the dtype the programs load: a translation-invariant or normalised gram form is centred or
# normalised in float32 before the kernel, so cosine and sqeuclidean load float32 whatever the inputs). None of
# them is measured yet: experiments/gpu_report.py sweeps tiles on a GPU, and what it finds replaces these. The
# reasoning they stand on:
#
# * gram, 16-bit, up to 64 features: FlashAttention-2's Triton tiles, 128 x 64, 4 warps; three pipeline
#   stages, since a 64 x 64 bfloat16 key (and value) tile is 8 KiB and three of each fit shared memory easily,
#   hiding the load latency behind two score matmuls.
# * gram, float32, up to 64 features: the tiles are twice the bytes and tl.dot in float32 has a quarter of the
#   tensor-core rate (or none at Precision.HIGHEST), so the kernel is bound by the matmuls, not the loads: 64 x 64
#   halves the registers the q tile and the accumulator take, and two stages are enough.
# * gram, more than 64 features: the q tile and the [block_q, head_dim] float32 accumulator double, so 64 x 64
#   with 8 warps keeps them in registers (64 x 128 float32 over 256 threads is 32 registers each); two stages,
#   as each stage now holds 16 KiB (16-bit) or 32 KiB (float32) per operand.
# * elementwise (any width and dtype: the difference tile is float32 whatever the loads): a [bq, bk, bd] float32
#   difference tile in registers besides the [bq, bk] scores: 64 x 32 x 8 is 16K values, 128 per thread at 4
#   warps, about half of the 255-register budget, so the tile neither spills nor leaves the multiprocessor idle;
#   bd = 8 also keeps the feature loop short (8 steps at 64 features). One pipeline stage: the key tile is read
#   feature chunk by feature chunk inside the loop body, so a second buffer would only take registers.
DEFAULT_TILES: dict[tuple[str, int, str], Tiles] = {
    ("gram", 64, "16bit"): Tiles(block_q=128, block_k=64, block_d=64, num_warps=4, num_stages=3),
    ("gram", 64, "float32"): Tiles(block_q=64, block_k=64, block_d=64, num_warps=4, num_stages=2),
    ("gram", 128, "16bit"): Tiles(block_q=64, block_k=64, block_d=128, num_warps=8, num_stages=2),
    ("gram", 128, "float32"): Tiles(block_q=64, block_k=64, block_d=128, num_warps=8, num_stages=2),
    ("elementwise", 64, "16bit"): Tiles(block_q=64, block_k=32, block_d=8, num_warps=4, num_stages=1),
    ("elementwise", 64, "float32"): Tiles(block_q=64, block_k=32, block_d=8, num_warps=4, num_stages=1),
    ("elementwise", 128, "16bit"): Tiles(block_q=64, block_k=32, block_d=8, num_warps=4, num_stages=1),
    ("elementwise", 128, "float32"): Tiles(block_q=64, block_k=32, block_d=8, num_warps=4, num_stages=1),
}


def default_tiles(metric: str, p: Any, head_dim: int, dtype: Any = "float32") -> Tiles:
  """The default tiles for ``metric`` at order ``p``, ``head_dim`` features and the ``dtype`` the programs load:
  ``DEFAULT_TILES``'s entry (its comment gives the reasoning; none is measured yet), with a gram form's
  ``block_d`` the padded width (a gram form takes every feature at once) and an elementwise form's at most
  that."""
  form = metrics.get(metric).resolve(p if isinstance(p, float) else None)
  dp = max(MIN_BLOCK, next_pow2(head_dim))
  kind = "gram" if isinstance(form, metrics.Gram) else "elementwise"
  name = jnp.dtype(dtype).name if dtype is not None else "float32"
  tiles = DEFAULT_TILES[(kind, 64 if dp <= 64 else 128, "16bit" if name in ("bfloat16", "float16") else "float32")]
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
  # The tile geometry as the tile core sees it (which tiles a causal mask or a window lets a query tile skip).
  geometry: tile_core.TileConfig
  # The bfloat16 pieces a float32 gram operand is split into for the tensor cores (gram.py).
  gram_pieces: int = 3



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

