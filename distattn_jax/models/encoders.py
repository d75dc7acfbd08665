"""Encoder classifiers over TruthGPT's trunk for the research tasks: tokens, image patches or time steps in,
class logits out.

:class:`Encoder` embeds its inputs by kind, runs :class:`~distattn_jax.models.truthgpt.Trunk` (bidirectional
blocks of ``DistanceBasedAttention`` + MLP), pools and applies a linear head:

* ``embedding="tokens"``: ``inputs [batch, T]`` int, a learned table (ListOps, text);
* ``embedding="patches"``: ``inputs [batch, T, patch_pixels]``, a linear map of each flattened patch, which is
  a ViT's patch embedding (a convolution with stride = kernel = patch);
* ``embedding="steps"``: ``inputs [batch, T, channels]``, a linear map of each time step's values.

Padding is described by ``lengths [batch]`` (real steps; the rest is right padding), passed to every attention
layer as ``key_value_seq_lengths``, so no ``[T, T]`` mask is built and padded keys get no weight: a padded batch
gives each example the logits it gets alone, unpadded. ``pooling="mean"`` averages the real positions' states;
``"cls"`` prepends a learned token at position 0 and reads its state.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from distattn_jax.models.truthgpt import Trunk, TruthGPTConfig

Array = jax.Array
EMBEDDINGS = ("tokens", "patches", "steps")
POOLINGS = ("mean", "cls")


class Encoder(nn.Module):
  """``(inputs, lengths) -> [batch, num_classes]`` float32 logits."""

  config: TruthGPTConfig
  num_classes: int
  embedding: str = "tokens"
  pooling: str = "mean"

  @nn.compact
  def __call__(self, inputs: Array, lengths: Array | None = None, *, deterministic: bool = True,
               sow_weights: bool = False) -> Array:
    c = self.config
    if self.embedding not in EMBEDDINGS:
      raise ValueError(f"Encoder: embedding={self.embedding!r} must be one of {', '.join(EMBEDDINGS)}")
    if self.pooling not in POOLINGS:
      raise ValueError(f"Encoder: pooling={self.pooling!r} must be one of {', '.join(POOLINGS)}")
    want_ndim = 2 if self.embedding == "tokens" else 3
    if inputs.ndim != want_ndim:
      raise ValueError(f"Encoder: embedding={self.embedding!r} takes inputs of rank {want_ndim}; got shape "
                       f"{inputs.shape}")
    if self.embedding == "tokens":
      x = nn.Embed(c.vocab_size, c.width, name="embed")(inputs)
    else:
      x = nn.Dense(c.width, dtype=c.compute_dtype, name="embed")(inputs.astype(jnp.float32))
    batch, length = x.shape[:2]
    if lengths is not None:
      lengths = jnp.asarray(lengths, jnp.int32)
    if self.pooling == "cls":
      cls = self.param("cls", nn.initializers.normal(stddev=c.width ** -0.5), (c.width,))
      x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype).reshape(1, 1, -1), (batch, 1, c.width)), x], axis=1)
      length += 1
      if lengths is not None:
        lengths = lengths + 1
    segments = None if lengths is None else {"key_value_seq_lengths": lengths}
    x = Trunk(c, causal=False, name="trunk")(x, None, deterministic, sow_weights, segments).astype(jnp.float32)
    if self.pooling == "cls":
      pooled = x[:, 0, :]
    else:
      real = (jnp.ones((batch, length), jnp.float32) if lengths is None
              else (jnp.arange(length)[None, :] < lengths[:, None]).astype(jnp.float32))
      pooled = jnp.sum(x * real[:, :, None], axis=1) / jnp.maximum(jnp.sum(real, axis=1, keepdims=True), 1.0)
    return nn.Dense(self.num_classes, name="head")(pooled)
