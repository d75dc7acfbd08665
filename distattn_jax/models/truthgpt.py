"""TruthGPT: a pre-norm transformer whose attention is :class:`distattn_jax.DistanceBasedAttention`.

:class:`TruthGPT`, the decoder-only language model, runs a :class:`Trunk` (positions, ``depth`` pre-norm blocks
of attention + MLP, final norm) over a token embedding it owns: causal attention, logits through the tied token
embedding, ``decode=True`` for generation with the attention layers' KV cache. The same trunk, bidirectional, is
the body of the classifier, :class:`distattn_jax.models.encoders.Encoder`.

Every choice a run can change (metric, lam, p, kernel, sizes, positions, dtypes) is a field of
:class:`TruthGPTConfig`, which checks itself when built, so a bad value fails before anything is traced. The
models know nothing of data or training; ``apply`` is a pure function of parameters, tokens and rngs.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

import distattn_jax as da

Array = jax.Array

POSITIONS = ("learned", "rotary")
DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class TruthGPTConfig:
  """The model's hyperparameters; ``TruthGPTConfig(**config.model)`` builds it from an ml_collections config.

  ``num_kv_heads=None`` means one kv head per query head; ``lambda_init=None`` starts every head at
  ``da.initializers.default_lambda`` (the lam whose initial softmax is as sharp as dot-product attention's).
  ``dtype`` is the compute dtype; parameters (and so the optimizer's master copy) are always float32.
  """

  vocab_size: int = 256
  width: int = 128
  depth: int = 2
  num_heads: int = 4
  num_kv_heads: int | None = None
  mlp_dim: int = 512
  max_len: int = 256
  positions: str = "learned"
  rotary_base: float = 10000.0
  metric: str = "l1"
  lambda_init: float | None = None
  learnable_lambda: bool = True
  p: float = 2.0
  learnable_p: bool = False
  implementation: str = "auto"
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  dtype: str = "float32"

  def __post_init__(self):
    def fail(field: str, allowed: str):
      raise ValueError(f"model.{field}={getattr(self, field)!r} is invalid: {allowed}")

    for field in ("vocab_size", "width", "depth", "num_heads", "mlp_dim", "max_len"):
      value = getattr(self, field)
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        fail(field, "must be a positive int")
    if self.width % self.num_heads:
      fail("num_heads", f"must divide model.width={self.width}")
    kv = self.num_kv_heads
    if kv is not None and (not isinstance(kv, int) or kv < 1 or self.num_heads % kv):
      fail("num_kv_heads", f"must be None or a positive divisor of model.num_heads={self.num_heads}")
    if self.positions not in POSITIONS:
      fail("positions", f"must be one of {', '.join(POSITIONS)}")
    if self.positions == "rotary" and self.head_dim % 2:
      fail("positions", f"'rotary' needs an even head dimension; width/num_heads = {self.head_dim}")
    if not self.rotary_base > 1:
      fail("rotary_base", "must be > 1")
    da.metrics.canonical_name(self.metric, argname="model.metric")
    da.metrics.check_p(self.p, argname="model.p")
    if self.learnable_p and not da.metrics.get(self.metric).parametric:
      fail("learnable_p", f"needs a model.metric with an order p, such as 'lp' (got metric={self.metric!r})")
    if self.lambda_init is not None and not 0 < self.lambda_init < math.inf:
      fail("lambda_init", "must be None (the metric's default) or a positive finite number")
    if self.implementation != "auto" and self.implementation not in da.kernels.available():
      fail("implementation", f"must be one of {', '.join(('auto',) + da.kernels.available())}")
    for field in ("dropout_rate", "attention_dropout_rate"):
      if not 0.0 <= getattr(self, field) < 1.0:
        fail(field, "must be in [0, 1)")
    if self.dtype not in DTYPES:
      fail("dtype", f"must be one of {', '.join(DTYPES)}")

  @property
  def head_dim(self) -> int:
    return self.width // self.num_heads

  @property
  def compute_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.dtype)


class Mlp(nn.Module):
  config: TruthGPTConfig

  @nn.compact
  def __call__(self, x: Array, deterministic: bool) -> Array:
    c = self.config
    x = nn.Dense(c.mlp_dim, dtype=c.compute_dtype, name="fc_in")(x)
    x = nn.Dense(c.width, dtype=c.compute_dtype, name="fc_out")(nn.gelu(x))
    return nn.Dropout(c.dropout_rate)(x, deterministic=deterministic)


class Block(nn.Module):
  """``x + attention(norm(x))``, then ``x + mlp(norm(x))``."""

  config: TruthGPTConfig
  causal: bool
  decode: bool = False

  @nn.compact
  def __call__(self, x: Array, mask: Array | None, positions: Array, deterministic: bool,
               sow_weights: bool, segments: dict[str, Array] | None = None) -> Array:
    c = self.config
    attention = da.DistanceBasedAttention(
        num_heads=c.num_heads, metric=c.metric, lambda_init=c.lambda_init, learnable_lambda=c.learnable_lambda,
        p=c.p, learnable_p=c.learnable_p, num_kv_heads=c.num_kv_heads, implementation=c.implementation,
        rotary_base=c.rotary_base if c.positions == "rotary" else None, dtype=c.compute_dtype,
        dropout_rate=c.attention_dropout_rate, decode=self.decode, name="attention")
    y = nn.LayerNorm(dtype=c.compute_dtype, name="ln_attention")(x)
    y = attention(y, mask=mask, deterministic=deterministic, sow_weights=sow_weights, is_causal=self.causal,
                  positions=positions, **(segments or {}))
    x = x + nn.Dropout(c.dropout_rate)(y, deterministic=deterministic)
    return x + Mlp(c, name="mlp")(nn.LayerNorm(dtype=c.compute_dtype, name="ln_mlp")(x), deterministic)


class Trunk(nn.Module):
  """Learned positions (if configured), the blocks and the final norm, over already embedded tokens; the
  models own the token embedding so that the decoder can reuse it as its output layer."""

  config: TruthGPTConfig
  causal: bool
  decode: bool = False

  @nn.compact
  def __call__(self, x: Array, mask: Array | None, deterministic: bool, sow_weights: bool,
               segments: dict[str, Array] | None = None) -> Array:
    """``segments``: keyword arguments of ``DistanceBasedAttention`` (segment ids, sequence lengths) shared by
    every block."""
    c = self.config
    length = x.shape[-2]
    positions = jnp.arange(length) + self._decode_offset(length)
    x = x.astype(c.compute_dtype)
    if c.positions == "learned":
      if length > c.max_len:
        raise ValueError(f"TruthGPT: a sequence of {length} tokens exceeds model.max_len={c.max_len}")
      table = self.param("pos_embed", nn.initializers.normal(stddev=c.width ** -0.5), (c.max_len, c.width))
      learned = jnp.take(table, positions, axis=0).astype(c.compute_dtype)  # [length, width]
      x = x + learned.reshape((1,) * (x.ndim - 2) + learned.shape)
    x = nn.Dropout(c.dropout_rate)(x, deterministic=deterministic)
    for i in range(c.depth):
      x = Block(c, self.causal, self.decode, name=f"block_{i}")(x, mask, positions, deterministic, sow_weights,
                                                                segments)
    return nn.LayerNorm(dtype=c.compute_dtype, name="ln_final")(x)

  def _decode_offset(self, length: int) -> Array:
    """0 when not decoding; else the number of positions already in the cache (advanced by ``length``)."""
    if not self.decode:
      return jnp.zeros((), jnp.int32)
    initialized = self.has_variable("cache", "position")
    position = self.variable("cache", "position", lambda: jnp.zeros((), jnp.int32))
    offset = position.value
    if initialized:
      position.value = offset + length
    return offset


def _embedding(config: TruthGPTConfig) -> nn.Embed:
  return nn.Embed(config.vocab_size, config.width, name="embed")


class TruthGPT(nn.Module):
  """Decoder-only language model: ``tokens [batch, length] -> logits [batch, length, vocab]`` (float32).

  The output layer is the token embedding, transposed (tied). With ``decode=True`` every attention layer keeps a
  KV cache (the ``cache`` collection) sized by the tokens given to ``init``; each later call appends its tokens
  (a prompt chunk, then one token at a time) and returns their logits, exactly as the full causal pass would.

  ``segment_ids [batch, length]`` (int) packs several documents into one row: a token attends only to earlier
  tokens with the same id (not while decoding). Positions stay those of the row.
  """

  config: TruthGPTConfig
  decode: bool = False

  @nn.compact
  def __call__(self, tokens: Array, *, deterministic: bool = True, sow_weights: bool = False,
               segment_ids: Array | None = None) -> Array:
    embed = _embedding(self.config)
    segments = None if segment_ids is None else dict(q_segment_ids=segment_ids, kv_segment_ids=segment_ids)
    x = Trunk(self.config, causal=True, decode=self.decode, name="trunk")(embed(tokens), None, deterministic,
                                                                          sow_weights, segments)
    return embed.attend(x.astype(jnp.float32))


def count_params(params: Any) -> int:
  return sum(int(a.size) for a in jax.tree.leaves(params))
