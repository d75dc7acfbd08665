"""The tiles and the static description of one call (hashable: the custom_jvp's non-differentiable argument)."""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax

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
  dp = max(MIN_BLOCK, next_pow2(head_dim))
  if isinstance(form, metrics.Gram):
    if dp <= 64:
      return Tiles(block_q=128, block_k=64, block_d=dp, num_warps=4, num_stages=2)
    return Tiles(block_q=64, block_k=64, block_d=dp, num_warps=8, num_stages=2)
  return Tiles(block_q=64, block_k=32, block_d=min(8, dp), num_warps=4, num_stages=1)


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



def check_block(owner: str, name: str, value: Any):
  if value is not None and not (is_pow2(value) and value >= MIN_BLOCK):
    raise ValueError(f"{owner}: {name} must be None or a power of two >= {MIN_BLOCK} (Triton tiles are "
                     f"powers of two and tl.dot needs 16); got {value!r}")

