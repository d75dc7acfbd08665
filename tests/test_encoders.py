"""The Encoder classifier: each embedding and pooling against a numpy oracle that runs every example alone,
unpadded; garbage in the padding changes nothing, while the same padding without lengths does; errors name the
field."""

import jax
import numpy as np
import pytest

from distattn_jax.models import Encoder, TruthGPTConfig
from distattn_jax.models.truthgpt import Trunk

CONFIG = TruthGPTConfig(vocab_size=12, width=16, depth=1, num_heads=2, mlp_dim=32, max_len=24, metric="l2")
LENGTHS = np.array([9, 4, 13], np.int32)
PADDED_LENGTH = 16


def padded_inputs(embedding: str, seed: int = 0) -> np.ndarray:
  """Real values in the first ``LENGTHS[i]`` positions of row ``i``, garbage (not zeros) after them."""
  rng = np.random.default_rng(seed)
  if embedding == "tokens":
    return rng.integers(0, CONFIG.vocab_size, (len(LENGTHS), PADDED_LENGTH)).astype(np.int32)
  features = 6
  values = rng.standard_normal((len(LENGTHS), PADDED_LENGTH, features)).astype(np.float32)
  real = np.arange(PADDED_LENGTH)[None, :, None] < LENGTHS[:, None, None]
  return np.where(real, values, np.float32(50.0))  # far outside the real values' range


def oracle_logits(params: dict, inputs: np.ndarray, embedding: str, pooling: str) -> np.ndarray:
  """Each example alone and unpadded: the embedding, the CLS row and the pooling in numpy float64; only the
  trunk (tested on its own in test_truthgpt.py) runs through Flax, with no lengths and no mask at all."""
  trunk = jax.jit(Trunk(CONFIG, causal=False).apply, static_argnums=(3, 4))
  logits = []
  for row, length in zip(inputs, LENGTHS):
    real = row[:length]
    if embedding == "tokens":
      x = np.asarray(params["embed"]["embedding"], np.float64)[real]
    else:
      x = real.astype(np.float64) @ np.asarray(params["embed"]["kernel"]) + np.asarray(params["embed"]["bias"])
    if pooling == "cls":
      x = np.concatenate([np.asarray(params["cls"], np.float64)[None, :], x], axis=0)
    hidden = np.asarray(trunk({"params": params["trunk"]}, x[None].astype(np.float32), None, True, False)[0],
                        np.float64)
    pooled = hidden[0] if pooling == "cls" else hidden.mean(axis=0)
    logits.append(pooled @ np.asarray(params["head"]["kernel"]) + np.asarray(params["head"]["bias"]))
  return np.stack(logits)


# Every embedding and every pooling once (the pooling does not depend on the embedding), at a few seconds each.
@pytest.mark.parametrize("embedding,pooling", [pytest.param("tokens", "mean", marks=pytest.mark.slow),
                                               pytest.param("patches", "cls", marks=pytest.mark.slow),
                                               ("steps", "mean")])  # make test-fast runs the last one
def test_each_pooling_matches_the_oracle_and_ignores_garbage_padding(embedding, pooling):
  model = Encoder(CONFIG, num_classes=3, embedding=embedding, pooling=pooling)
  inputs = padded_inputs(embedding)
  params = jax.jit(model.init)(jax.random.key(0), inputs, LENGTHS)["params"]
  apply = jax.jit(model.apply)
  got = np.asarray(apply({"params": params}, inputs, LENGTHS))
  assert got.shape == (len(LENGTHS), 3) and got.dtype == np.float32
  # float32 trunk and embedding against float64 numpy around it: a few float32 ulps of logits of order 1.
  np.testing.assert_allclose(got, oracle_logits(params, inputs, embedding, pooling), rtol=1e-5, atol=1e-5)
  # Without lengths the garbage is attended to (and, under "mean", averaged in) and every prediction moves, so
  # the agreement above is the lengths' doing, not a padding too small to matter.
  unmasked = np.asarray(apply({"params": params}, inputs))
  assert np.all(np.abs(unmasked - got).max(axis=1) > 1e-3)


@pytest.mark.parametrize("fields,inputs,message", [
    (dict(pooling="first"), np.zeros((1, 4), np.int32), r"Encoder: pooling='first' must be one of mean, cls"),
    (dict(embedding="pixels"), np.zeros((1, 4), np.int32),
     r"Encoder: embedding='pixels' must be one of tokens, patches, steps"),
    (dict(embedding="steps"), np.zeros((1, 4), np.float32),
     r"Encoder: embedding='steps' takes inputs of rank 3; got shape \(1, 4\)"),
])
def test_configuration_errors_name_the_field(fields, inputs, message):
  with pytest.raises(ValueError, match=message):
    Encoder(CONFIG, num_classes=3, **fields).init(jax.random.key(0), inputs)
