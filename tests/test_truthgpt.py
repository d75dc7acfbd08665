"""TruthGPT: tied output, causality, rotary positions against hand-built attention, the KV cache against the full
forward pass, sampling, compute dtype and configuration errors."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import distattn_jax as da
from distattn_jax.models import TruthGPT, TruthGPTConfig, generate, sample_logits
from distattn_jax.kernels import blockwise
from distattn_jax.layers import apply_rotary as rotate
from distattn_jax.models.truthgpt import Trunk

SMALL = dict(width=32, depth=2, num_heads=4, mlp_dim=64, max_len=24)


def tokens(seed, batch=2, length=10):
  return jnp.asarray(np.random.default_rng(seed).integers(0, 256, (batch, length)), jnp.int32)


def init(model, x, seed=0):
  return model.init(jax.random.key(seed), x)["params"]


def test_output_layer_is_the_transposed_token_embedding():
  config = TruthGPTConfig(**SMALL)
  x = tokens(0)
  params = init(TruthGPT(config), x)
  assert set(params) == {"embed", "trunk"}  # no separate output projection
  embedding = params["embed"]["embedding"]
  hidden = Trunk(config, causal=True).apply({"params": params["trunk"]}, embedding[x], None, True, False)
  chex.assert_trees_all_close(TruthGPT(config).apply({"params": params}, x), hidden @ embedding.T,
                              rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("positions", ["learned", "rotary"])
def test_logits_do_not_depend_on_later_tokens(positions):
  model = TruthGPT(TruthGPTConfig(**SMALL, positions=positions))
  x = tokens(1)
  params = init(model, x)
  changed = x.at[:, 6:].set((x[:, 6:] + 1) % 256)
  a, b = model.apply({"params": params}, x), model.apply({"params": params}, changed)
  chex.assert_trees_all_close(a[:, :6], b[:, :6], rtol=1e-6, atol=1e-6)
  assert not np.allclose(a[:, 6:], b[:, 6:])


def test_rotary_attention_equals_hand_built_attention_on_rotated_projections():
  config = TruthGPTConfig(**{**SMALL, "depth": 1}, positions="rotary", metric="l2", rotary_base=50.0)
  model = TruthGPT(config)
  x = tokens(4, length=7)
  params = init(model, x)
  _, state = model.apply({"params": params}, x, capture_intermediates=True, mutable=["intermediates"])
  block = state["intermediates"]["trunk"]["block_0"]
  y = block["ln_attention"]["__call__"][0]
  p = params["trunk"]["block_0"]["attention"]
  project = lambda w: jnp.einsum("blf,fhd->blhd", y, w["kernel"]) + w["bias"][None, None]
  positions = jnp.arange(7)
  heads = da.distance_attention(rotate(project(p["query"]), positions, 50.0), rotate(project(p["key"]), positions, 50.0),
                                project(p["value"]), metric="l2", lam=jnp.exp(p["log_lambda"]), is_causal=True)
  want = jnp.einsum("blhd,hdf->blf", heads, p["out"]["kernel"]) + p["out"]["bias"][None, None]
  chex.assert_trees_all_close(block["attention"]["__call__"][0], want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("positions,metric", [("learned", "l1"),
                                              pytest.param("rotary", "cosine", marks=pytest.mark.slow)])
def test_decoding_with_the_cache_equals_the_full_forward_pass(positions, metric):
  config = TruthGPTConfig(**SMALL, positions=positions, metric=metric, num_kv_heads=2)
  x = tokens(5, length=9)
  params = init(TruthGPT(config), x)
  want = TruthGPT(config).apply({"params": params}, x)
  decoder = TruthGPT(config, decode=True)
  cache = decoder.init(jax.random.key(0), x)["cache"]
  step = jax.jit(lambda cache, chunk: decoder.apply({"params": params, "cache": cache}, chunk, mutable=["cache"]))
  outputs = []
  for start, stop in ((0, 4), (4, 5), (5, 6), (6, 7), (7, 8), (8, 9)):  # a prompt chunk, then one at a time
    logits, state = step(cache, x[:, start:stop])
    cache = state["cache"]
    outputs.append(logits)
  chex.assert_trees_all_close(jnp.concatenate(outputs, axis=1), want, rtol=2e-5, atol=2e-5)
  assert int(cache["trunk"]["position"]) == 9


@pytest.mark.parametrize("positions", ["learned", pytest.param("rotary", marks=pytest.mark.slow)])
def test_greedy_generation_with_the_cache_equals_argmax_of_full_recomputation(positions):
  model = TruthGPT(TruthGPTConfig(**SMALL, positions=positions))
  prompt = tokens(6, length=5)
  params = init(model, prompt)
  got = generate(model, params, prompt, jax.random.key(0), max_new_tokens=8, temperature=0.0)
  # The model is causal, so one full pass over prompt + generated tokens gives, at each position, the logits a
  # recomputation from that prefix alone would give: every greedy token must be their argmax.
  logits = jax.jit(model.apply)({"params": params}, jnp.concatenate([prompt, got[:, :-1]], axis=1))
  np.testing.assert_array_equal(got, jnp.argmax(logits[:, 4:], axis=-1))


@pytest.mark.slow
def test_generation_with_the_blockwise_kernel_equals_full_recomputation_by_the_reference(monkeypatch):
  # 8 x 8 tiles: the 13-position cache spans two key tiles, so decoding streams over tiles with the cache mask.
  monkeypatch.setattr(blockwise, "default_blocks", lambda metric, p=2.0: (8, 8))
  config = TruthGPTConfig(**SMALL, positions="rotary", metric="l1", num_kv_heads=2)
  prompt = tokens(11, length=5)
  params = init(TruthGPT(config), prompt)
  got = generate(TruthGPT(dataclasses.replace(config, implementation="blockwise")), params, prompt,
                 jax.random.key(0), max_new_tokens=8, temperature=0.0)
  reference = TruthGPT(dataclasses.replace(config, implementation="reference"))
  logits = jax.jit(reference.apply)({"params": params}, jnp.concatenate([prompt, got[:, :-1]], axis=1))[:, 4:]
  # Greedy tokens are the reference's argmax; the kernels differ by float32 rounding (~1e-6), far below the
  # gap between the two largest logits at every step (checked, so a near tie cannot make this pass by luck).
  np.testing.assert_array_equal(got, jnp.argmax(logits, axis=-1))
  top2 = jax.lax.top_k(logits, 2)[0]
  assert float(jnp.min(top2[..., 0] - top2[..., 1])) > 1e-4


def test_top_k_sampling_draws_only_the_k_largest_logits_and_follows_the_softmax():
  logits = jnp.log(jnp.asarray([[0.05, 0.4, 0.1, 0.3, 0.15]]))
  draws = jax.vmap(lambda k: sample_logits(logits, k, 1.0, 3))(jax.random.split(jax.random.key(0), 4000))[:, 0]
  counts = np.bincount(np.asarray(draws), minlength=5) / 4000
  assert counts[0] == 0 and counts[2] == 0  # outside the top 3
  # Renormalised over the top 3: 0.4/0.85, 0.3/0.85, 0.15/0.85; 4000 draws give a standard error below 0.008.
  np.testing.assert_allclose(counts[[1, 3, 4]], np.array([0.4, 0.3, 0.15]) / 0.85, atol=0.03)
  np.testing.assert_array_equal(sample_logits(logits, jax.random.key(1), 0.0, 0), [1])


def test_generation_rejects_a_cache_longer_than_the_learned_positions():
  model = TruthGPT(TruthGPTConfig(**SMALL))
  prompt = tokens(7, length=20)
  with pytest.raises(ValueError, match=r"prompt \(20\) \+ max_new_tokens \(5\) = 25 exceeds model.max_len=24"):
    generate(model, init(model, prompt), prompt, jax.random.key(0), max_new_tokens=5)
  with pytest.raises(ValueError, match=r"prompt must be token ids of shape \[batch, prompt_len >= 1\]; got shape "
                                       r"\(2, 0\)"):
    generate(model, init(model, prompt), prompt[:, :0], jax.random.key(0), max_new_tokens=5)


def test_bfloat16_compute_keeps_float32_parameters_and_close_logits():
  x = tokens(9)
  params = init(TruthGPT(TruthGPTConfig(**SMALL, dtype="bfloat16")), x)
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(params))
  low = TruthGPT(TruthGPTConfig(**SMALL, dtype="bfloat16")).apply({"params": params}, x)
  high = TruthGPT(TruthGPTConfig(**SMALL)).apply({"params": params}, x)
  assert low.dtype == jnp.float32
  # bf16 keeps 8 mantissa bits (relative error 2^-8 per rounding); two blocks of it move logits by a few 1e-2.
  np.testing.assert_allclose(low, high, atol=0.1)
  assert not np.array_equal(low, high)


@pytest.mark.parametrize("fields,message", [
    (dict(num_heads=3), r"model.num_heads=3 is invalid: must divide model.width=32"),
    (dict(num_kv_heads=3), r"model.num_kv_heads=3 is invalid: must be None or a positive divisor"),
    (dict(metric="euclid"), r"model.metric='euclid' is not a registered metric; valid names: l1, l2"),
    (dict(positions="alibi"), r"model.positions='alibi' is invalid: must be one of learned, rotary"),
    (dict(width=36, num_heads=4, positions="rotary"), r"'rotary' needs an even head dimension; width/num_heads = 9"),
    (dict(depth=0), r"model.depth=0 is invalid: must be a positive int"),
    (dict(learnable_p=True), r"model.learnable_p=True is invalid: needs a model.metric with an order p, such as 'lp'"),
    (dict(implementation="fast"), r"model.implementation='fast' is invalid: must be one of auto, blockwise, pallas, reference, ring"),
    (dict(dtype="float16"), r"model.dtype='float16' is invalid: must be one of float32, bfloat16"),
    (dict(p=0.0), r"model.p must be > 0"),
])
def test_configuration_errors_name_the_field(fields, message):
  with pytest.raises(ValueError, match=message):
    TruthGPTConfig(**{**SMALL, **fields})


def test_a_sequence_longer_than_the_learned_positions_is_rejected():
  model = TruthGPT(TruthGPTConfig(**SMALL))
  with pytest.raises(ValueError, match=r"a sequence of 30 tokens exceeds model.max_len=24"):
    model.init(jax.random.key(0), tokens(10, length=30))


def test_packed_rows_keep_documents_apart():
  # Two documents packed into one row with segment ids: the first document's logits equal the document run
  # alone (same positions, causal), and the second's do not depend on the first's tokens.
  model = TruthGPT(TruthGPTConfig(**SMALL, metric="l1"))
  first, second = tokens(20, batch=1, length=7), tokens(21, batch=1, length=5)
  params = init(model, jnp.concatenate([first, second], axis=1))
  ids = jnp.asarray([[1] * 7 + [2] * 5], jnp.int32)
  apply = jax.jit(model.apply, static_argnames=())
  packed = apply({"params": params}, jnp.concatenate([first, second], axis=1), segment_ids=ids)
  chex.assert_trees_all_close(packed[:, :7], apply({"params": params}, first), rtol=1e-5, atol=1e-5)
  other = apply({"params": params}, jnp.concatenate([tokens(22, batch=1, length=7), second], axis=1),
                segment_ids=ids)
  chex.assert_trees_all_close(other[:, 7:], packed[:, 7:], rtol=1e-5, atol=1e-5)
