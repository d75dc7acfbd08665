"""The Flax drop-ins: make_attention_fn inside Flax's own modules, DistanceBasedAttention against
nn.MultiHeadDotProductAttention, the KV cache against full causal attention, lambda and p parameters."""

import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import distattn_jax as da
from conftest import normal

METRICS = da.metrics.available()
FEATURES, HEADS = 16, 4


def one_fast(values, fast):
  """``values`` for parametrize, every one but ``fast`` marked slow: `make test-fast` runs one case of a sweep,
  `make test` all of them."""
  return [v if v == fast else pytest.param(v, marks=pytest.mark.slow) for v in values]


def tokens(seed, batch=2, length=6, features=FEATURES):
  return jnp.asarray(normal(seed, (batch, length, features), np.float32))


def project(params, x, heads):
  """Flax's DenseGeneral projection written out: [B, L, F] x [F, H, D] + [H, D]."""
  return jnp.einsum("blf,fhd->blhd", x, params["kernel"]) + params["bias"][None, None]


@pytest.mark.slow
def test_linen_attention_fn_dot_equals_flax_default_with_mask_and_dropout():
  x = tokens(0)
  mask = nn.make_attention_mask(jnp.ones((2, 6)), jnp.asarray([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]]))
  flax_mha = nn.MultiHeadDotProductAttention(num_heads=HEADS, dropout_rate=0.3)
  ours = nn.MultiHeadDotProductAttention(num_heads=HEADS, dropout_rate=0.3,
                                         attention_fn=da.make_attention_fn("dot"))
  params = flax_mha.init(jax.random.key(0), x, deterministic=True)
  rngs = {"dropout": jax.random.key(1)}
  want = flax_mha.apply(params, x, mask=mask, deterministic=False, rngs=rngs)
  got = ours.apply(params, x, mask=mask, deterministic=False, rngs=rngs)
  chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-6)


# The metric only passes through the drop-in here (lam is fixed, so no calibration): one metric without an order
# other than the default l1, and lp, whose p must reach it. Every metric inside Flax's modules, calibrated, is the
# next test's subject.
@pytest.mark.parametrize("metric", ["cosine", "lp"])
def test_linen_attention_fn_equals_distance_attention_on_the_projections(metric):
  x = tokens(1)
  mha = nn.MultiHeadDotProductAttention(num_heads=HEADS, attention_fn=da.make_attention_fn(metric, lam=0.7, p=3.0))
  params = mha.init(jax.random.key(2), x)
  got, state = mha.apply(params, x, sow_weights=True, mutable=["intermediates"])
  p = params["params"]
  heads, w = da.distance_attention(project(p["query"], x, HEADS), project(p["key"], x, HEADS),
                                   project(p["value"], x, HEADS), metric=metric, lam=0.7, p=3.0,
                                   return_weights=True)
  want = jnp.einsum("blhd,hdf->blf", heads, p["out"]["kernel"]) + p["out"]["bias"][None, None]
  chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-5)
  sown = state["intermediates"]["attention_weights"][0]
  chex.assert_trees_all_close(sown, w, rtol=1e-6)


@pytest.mark.parametrize("metric", one_fast(METRICS, "l1"))
def test_every_metric_inside_nnx_multi_head_attention(metric):
  x = tokens(3)
  mha = nnx.MultiHeadAttention(num_heads=HEADS, in_features=FEATURES, decode=False, num_kv_heads=2,
                               attention_fn=da.make_attention_fn(metric, p=3.0), rngs=nnx.Rngs(0))
  got, intermediates = nnx.capture(lambda m, x: m(x, sow_weights=True), nnx.Intermediate)(mha, x)
  q = jnp.einsum("blf,fhd->blhd", x, mha.query.kernel[...]) + mha.query.bias[...][None, None]
  k = jnp.einsum("blf,fhd->blhd", x, mha.key.kernel[...]) + mha.key.bias[...][None, None]
  v = jnp.einsum("blf,fhd->blhd", x, mha.value.kernel[...]) + mha.value.bias[...][None, None]
  # The drop-in starts from the calibrated lam of the metric at this head_dim (and the fixed p).
  lam = da.initializers.default_lambda(metric, q.shape[-1], 3.0)
  heads, w = da.distance_attention(q, k, v, metric=metric, p=3.0, lam=lam, return_weights=True)
  want = jnp.einsum("blhd,hdf->blf", heads, mha.out.kernel[...]) + mha.out.bias[...][None, None]
  chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-5)
  chex.assert_trees_all_close(intermediates["attention_weights"][0], w, rtol=1e-6)


def test_nnx_causal_flag_reaches_the_attention():
  x = tokens(4)
  mha = nnx.MultiHeadAttention(num_heads=HEADS, in_features=FEATURES, decode=False,
                               attention_fn=da.make_attention_fn("l1"), rngs=nnx.Rngs(0))
  causal = mha(x, is_causal=True)
  masked = mha(x, mask=nn.make_causal_mask(jnp.ones((2, 6))))
  chex.assert_trees_all_close(causal, masked, rtol=1e-5, atol=1e-6)
  assert not np.allclose(causal, mha(x))


def test_distance_module_with_dot_and_unit_lambda_equals_flax_module():
  x = tokens(5)
  mask = nn.make_causal_mask(jnp.ones((2, 6)))
  flax_mha = nn.MultiHeadDotProductAttention(num_heads=HEADS, dropout_rate=0.2)
  ours = da.DistanceBasedAttention(num_heads=HEADS, metric=da.DistanceType.DOT, lambda_init=1.0, dropout_rate=0.2)
  flax_params = flax_mha.init(jax.random.key(3), x, deterministic=True)
  our_params = ours.init(jax.random.key(3), x, deterministic=True)
  # Same parameter names and shapes as Flax's, plus the per-head log lambda.
  assert set(our_params["params"]) == set(flax_params["params"]) | {"log_lambda"}
  chex.assert_trees_all_equal_shapes(flax_params["params"], {k: v for k, v in our_params["params"].items()
                                                               if k != "log_lambda"})
  params = {"params": {**flax_params["params"], "log_lambda": our_params["params"]["log_lambda"]}}
  np.testing.assert_array_equal(params["params"]["log_lambda"], 0.0)
  rngs = {"dropout": jax.random.key(4)}
  want = flax_mha.apply(flax_params, x, mask=mask, deterministic=False, rngs=rngs)
  got = ours.apply(params, x, mask=mask, deterministic=False, rngs=rngs)
  chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-6)
  # Cross-attention with separate key and value inputs follows Flax too.
  kv = tokens(6, length=9)
  chex.assert_trees_all_close(ours.apply(params, x, kv, deterministic=True),
                              flax_mha.apply(flax_params, x, kv, deterministic=True), rtol=1e-5, atol=1e-6)


# The cache logic does not depend on the metric: one elementwise, one matmul-form and the dot baseline.
@pytest.mark.parametrize("metric", one_fast(["l1", "sqeuclidean", "dot"], "dot"))
def test_decoding_with_the_cache_equals_causal_attention(metric):
  x = tokens(7, length=7)
  kw = dict(num_heads=HEADS, num_kv_heads=2, metric=metric, p=3.0)
  full_module = da.DistanceBasedAttention(**kw)
  params = full_module.init(jax.random.key(5), x)["params"]
  want = full_module.apply({"params": params}, x, is_causal=True)

  decoder = da.DistanceBasedAttention(decode=True, **kw)
  cache = decoder.init(jax.random.key(5), x)["cache"]  # shapes the cache for 7 positions
  step = jax.jit(lambda cache, chunk: decoder.apply({"params": params, "cache": cache}, chunk, mutable=["cache"]))
  outputs = []
  # A 3-token chunk (prefill), then one token at a time.
  for start, stop in ((0, 3), (3, 4), (4, 5), (5, 6), (6, 7)):
    out, state = step(cache, x[:, start:stop])
    cache = state["cache"]
    outputs.append(out)
  chex.assert_trees_all_close(jnp.concatenate(outputs, axis=1), want, rtol=2e-5, atol=2e-5)
  assert int(cache["cache_index"]) == 7


def test_decoding_rejects_a_chunk_of_the_wrong_shape():
  module = da.DistanceBasedAttention(num_heads=HEADS, decode=True)
  x = tokens(8, length=4)
  variables = module.init(jax.random.key(0), x)
  with pytest.raises(ValueError, match=r"decoding expects inputs of shape \(2,\) \+ \(chunk <= 4, features\)"):
    module.apply(variables, tokens(9, batch=3, length=1), mutable=["cache"])


@pytest.mark.slow
def test_writing_past_the_end_of_the_cache_is_an_error_eagerly_and_under_jit():
  module = da.DistanceBasedAttention(num_heads=HEADS, decode=True)
  x = tokens(16, length=5)
  variables = module.init(jax.random.key(0), x[:, :4])  # a cache of 4 positions
  params = variables["params"]
  message = r"the KV cache holds 4 positions and 3 are filled; 2 more do not fit"

  def run(step):
    cache = variables["cache"]
    for start, stop in ((0, 3), (3, 5)):
      out, state = step(cache, x[:, start:stop])
      cache = state["cache"]
    return jax.block_until_ready(out)

  def apply(cache, chunk):
    return module.apply({"params": params, "cache": cache}, chunk, mutable=["cache"])

  with pytest.raises(ValueError, match=message):  # the index is concrete: checked while tracing
    run(apply)
  with pytest.raises(jax.errors.JaxRuntimeError, match=message):  # traced: checked when the step runs
    run(jax.jit(apply))
  # Filling it exactly is fine, and the cache holds every position written.
  out, state = jax.jit(apply)(variables["cache"], x[:, :4])
  assert int(state["cache"]["cache_index"]) == 4


@pytest.mark.slow
def test_rotary_cross_attention_rotates_keys_by_their_own_positions():
  q_in, kv_in = tokens(17, length=5), tokens(18, length=7)
  module = da.DistanceBasedAttention(num_heads=HEADS, metric="l2", rotary_base=100.0, learnable_lambda=False,
                                     lambda_init=1.0)
  params = module.init(jax.random.key(0), q_in, kv_in)["params"]

  def by_hand(q_positions, k_positions):
    q = da.layers.apply_rotary(project(params["query"], q_in, HEADS), q_positions, 100.0)
    k = da.layers.apply_rotary(project(params["key"], kv_in, HEADS), k_positions, 100.0)
    heads = da.distance_attention(q, k, project(params["value"], kv_in, HEADS), metric="l2", lam=1.0)
    return jnp.einsum("blhd,hdf->blf", heads, params["out"]["kernel"]) + params["out"]["bias"][None, None]

  got = module.apply({"params": params}, q_in, kv_in)
  chex.assert_trees_all_close(got, by_hand(jnp.arange(5), jnp.arange(7)), rtol=1e-5, atol=1e-5)
  q_pos, k_pos = jnp.array([3, 4, 5, 6, 7]), jnp.arange(2, 9)
  got = module.apply({"params": params}, q_in, kv_in, positions=q_pos, key_positions=k_pos)
  chex.assert_trees_all_close(got, by_hand(q_pos, k_pos), rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match=r"positions \(for 5 queries\) cannot rotate 7 keys; pass key_positions"):
    module.apply({"params": params}, q_in, kv_in, positions=q_pos)
  with pytest.raises(ValueError, match=r"apply_rotary: positions must have shape \(length,\) = \(7,\) .* got "
                                       r"shape \(5,\)"):
    module.apply({"params": params}, q_in, kv_in, positions=q_pos, key_positions=q_pos)


@pytest.mark.parametrize("metric", one_fast(METRICS, "cosine"))
def test_default_lambda_is_the_spread_matching_value(metric):
  module = da.DistanceBasedAttention(num_heads=2, qkv_features=32, metric=metric, p=3.0)
  log_lam = module.init(jax.random.key(0), tokens(10))["params"]["log_lambda"]
  np.testing.assert_allclose(np.exp(log_lam), da.initializers.default_lambda(metric, 16, 3.0), rtol=1e-6)


@pytest.mark.slow
def test_lambda_table_in_the_docstring_is_what_the_code_measures():
  doc = da.DistanceBasedAttention.__doc__
  for d in (16, 32, 64, 128):
    row = next(line.split() for line in doc.splitlines() if line.strip().startswith(f"{d} "))
    for name, text in zip(METRICS, row[1:]):
      value = da.initializers.default_lambda(name, d, 3.0)
      assert abs(float(text) / value - 1) < 2e-3, (d, name, text, value)


@pytest.mark.slow
def test_learnable_lambda_and_p_get_gradients_and_stay_positive():
  x = tokens(11)
  module = da.DistanceBasedAttention(num_heads=HEADS, metric="lp", p=1.5, learnable_p=True)
  params = module.init(jax.random.key(0), x)["params"]
  assert params["log_lambda"].shape == (HEADS,) and params["log_p"].shape == ()
  np.testing.assert_allclose(np.exp(params["log_p"]), 1.5, rtol=1e-6)

  def loss(params):
    return jnp.mean(module.apply({"params": params}, x, is_causal=True) ** 2)

  grads = jax.grad(loss)(params)
  assert np.all(np.asarray(grads["log_lambda"]) != 0) and float(grads["log_p"]) != 0
  # A central difference on log_lambda[0] confirms the gradient's value (float32: 2% tolerance).
  e = 1e-2
  shifted = lambda delta: {**params, "log_lambda": params["log_lambda"].at[0].add(delta)}
  numeric = (loss(shifted(e)) - loss(shifted(-e))) / (2 * e)
  np.testing.assert_allclose(grads["log_lambda"][0], numeric, rtol=2e-2)
  # However far log_lambda falls, lambda stays positive: at exp(-50) every logit is ~0 and each query averages
  # the values it may see, which is finite and equals a uniform causal average through the same projections.
  flat = {**params, "log_lambda": params["log_lambda"] - 50.0}
  uniform = da.DistanceBasedAttention(num_heads=HEADS, metric="dot", lambda_init=1e-30, learnable_lambda=False)
  chex.assert_trees_all_close(
      module.apply({"params": flat}, x, is_causal=True),
      uniform.apply({"params": {k: v for k, v in params.items() if k.startswith(("q", "k", "v", "o"))}}, x,
                    is_causal=True), rtol=1e-5, atol=1e-6)


def test_fixed_lambda_is_not_a_parameter():
  module = da.DistanceBasedAttention(num_heads=HEADS, metric="l2", learnable_lambda=False, lambda_init=2.0)
  params = module.init(jax.random.key(0), tokens(12))["params"]
  assert "log_lambda" not in params
  assert set(params) == {"query", "key", "value", "out"}


def test_grouped_query_module_has_fewer_kv_parameters():
  module = da.DistanceBasedAttention(num_heads=HEADS, num_kv_heads=1, metric="cosine")
  params = module.init(jax.random.key(0), tokens(13))["params"]
  assert params["query"]["kernel"].shape == (FEATURES, HEADS, 4)
  assert params["key"]["kernel"].shape == (FEATURES, 1, 4)
  assert params["value"]["kernel"].shape == (FEATURES, 1, 4)


def test_rotate_turns_feature_pairs_like_complex_multiplication():
  rng = np.random.default_rng(2)
  x = rng.standard_normal((2, 5, 3, 8)).astype(np.float32)
  positions = np.array([0, 1, 4, 9, 100])
  base = 10000.0
  # Oracle: pair (x_i, x_{i+4}) is the complex number x_i + 1j x_{i+4}, multiplied by exp(1j pos base^(-i/4)).
  z = x[..., :4] + 1j * x[..., 4:]
  theta = positions[:, None] * base ** (-np.arange(4) / 4)
  z = z * np.exp(1j * theta)[None, :, None, :]
  want = np.concatenate([z.real, z.imag], axis=-1)
  np.testing.assert_allclose(da.layers.apply_rotary(jnp.asarray(x), jnp.asarray(positions), base), want, rtol=1e-4, atol=1e-4)


def test_rotary_dot_scores_depend_only_on_the_relative_position():
  rng = np.random.default_rng(3)
  q, k = (jnp.asarray(rng.standard_normal((1, 1, 1, 16)), jnp.float32) for _ in range(2))

  def score(m, n):
    return float(jnp.sum(da.layers.apply_rotary(q, jnp.array([m]), 100.0) * da.layers.apply_rotary(k, jnp.array([n]), 100.0)))

  reference = score(7, 3)
  for shift in (1, 10, 50):
    np.testing.assert_allclose(score(7 + shift, 3 + shift), reference, rtol=1e-4)
  assert abs(score(7, 4) - reference) > 1e-3


@pytest.mark.slow
def test_rotary_decoding_rotates_each_chunk_at_its_cache_position():
  x = tokens(15, length=6)
  kw = dict(num_heads=HEADS, metric="l2", rotary_base=100.0)
  params = da.DistanceBasedAttention(**kw).init(jax.random.key(0), x)["params"]
  want = da.DistanceBasedAttention(**kw).apply({"params": params}, x, is_causal=True)
  decoder = da.DistanceBasedAttention(decode=True, **kw)
  cache = decoder.init(jax.random.key(0), x)["cache"]
  outputs = []
  for start, stop in ((0, 2), (2, 3), (3, 6)):
    out, state = decoder.apply({"params": params, "cache": cache}, x[:, start:stop], mutable=["cache"])
    cache = state["cache"]
    outputs.append(out)
  chex.assert_trees_all_close(jnp.concatenate(outputs, axis=1), want, rtol=2e-5, atol=2e-5)


# Module fields and the error each must raise; the NNX module (tests/test_nnx.py) checks the same table.
CONFIG_ERRORS = [
    (dict(num_heads=3), r"qkv_features \(16\) must be divisible by num_heads \(3\)"),
    (dict(num_heads=4, num_kv_heads=3), r"num_kv_heads must be a positive divisor of num_heads \(4\); got 3"),
    (dict(num_heads=4, metric="l1", learnable_p=True), r"learnable_p=True needs a metric with an order p \(such as 'lp'\); got metric='l1'"),
    (dict(num_heads=4, lambda_init=-1.0), r"lambda_init must be None or a positive finite number; got -1.0"),
    (dict(num_heads=4, dropout_rate=1.5), r"dropout_rate must be in \[0, 1\); got 1.5"),
    (dict(num_heads=4, metric="euclid"), r"metric='euclid' is not a registered metric"),
    (dict(num_heads=4, metric="lp", p=0.0), r"p must be > 0"),
    (dict(num_heads=4, rotary_base=1.0), r"rotary_base must be None or > 1; got 1.0"),
    (dict(num_heads=16, rotary_base=100.0), r"rotary positions need an even head dimension; got 1"),
    (dict(num_heads=4, num_kv_heads=2, tied_qk=True), r"tied_qk=True shares the query projection with the keys, "
     r"so num_kv_heads must be None or num_heads \(4\); got 2"),
]


@pytest.mark.parametrize("fields,message", CONFIG_ERRORS)
def test_module_configuration_errors(fields, message):
  with pytest.raises(ValueError, match=message):
    da.DistanceBasedAttention(**fields).init(jax.random.key(0), tokens(14))


@pytest.mark.slow
def test_segment_ids_lengths_and_window_equal_the_dense_mask_through_the_module():
  x = tokens(40, length=9)
  layer = da.DistanceBasedAttention(num_heads=HEADS, metric="l1")
  params = layer.init(jax.random.key(0), x)
  ids = jnp.asarray([[1, 1, 1, 2, 2, 2, 2, 0, 0], [3, 3, 3, 3, 3, 3, 3, 3, 3]], jnp.int32)
  lengths = jnp.asarray([7, 9], jnp.int32)
  t = jnp.arange(9)
  dense = ((ids[:, :, None] == ids[:, None, :]) & (t[None, None, :] < lengths[:, None, None])
           & (t[None, None, :] >= t[None, :, None] - 2) & (t[None, None, :] <= t[None, :, None] + 1))[:, None]
  want = layer.apply(params, x, mask=dense)
  got = layer.apply(params, x, q_segment_ids=ids, key_value_seq_lengths=lengths, local_window_size=(2, 1))
  chex.assert_trees_all_close(got, want, rtol=1e-6, atol=1e-6)


def test_decode_step_refuses_position_arguments():
  layer = da.DistanceBasedAttention(num_heads=HEADS, metric="l2", decode=True)
  x = tokens(41, length=4)
  variables = layer.init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="q_segment_ids index the call's own positions"):
    layer.apply(variables, x[:, :1], q_segment_ids=jnp.ones((2, 1), jnp.int32), mutable=["cache"])
