"""Guarantees at the edges of the attention contract: hidden keys and queries never leak (garbage, huge, inf and
NaN values in them change nothing), the drop-in's calibrated lam, run-time checks of traced arguments, empty
sequences, re-registering a metric, and Flax's einsum hooks."""

import itertools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify

import distattn_jax as da
from conftest import kernel_sweep_metrics, normal

USER_METRIC = "hidden_test_logcosh"

B, T, S, H, KV, D, DV = 4, 6, 10, 4, 2, 8, 5


@pytest.fixture(scope="module", autouse=True)
def user_metric():
  logcosh = lambda t: jnp.logaddexp(t, -t) - jnp.log(2.0)
  da.metrics.register(da.metrics.Metric(USER_METRIC, da.metrics.Elementwise(phi=logcosh),
                                        translation_invariant=True), overwrite=True)
  yield
  da.metrics.unregister(USER_METRIC)


def hidden_positions():
  """Masking that hides keys by every mechanism, one batch row each, and the [B, S] / [B, T] truth of it.

  Row 0: nothing but causality (T < S: keys T.. are seen by no query). Row 1: key lengths and segment ids.
  Row 2: a dense key mask. Row 3: query lengths (rows 4, 5 see nothing) and the window variant's reach."""
  kv_lengths = np.array([S, S - 3, S, S], np.int32)
  q_lengths = np.array([T, T, T, 4], np.int32)
  q_ids = np.ones((B, T), np.int32)
  kv_ids = np.ones((B, S), np.int32)
  kv_ids[1, [2, 5]] = 7  # a segment no query belongs to
  mask = np.ones((B, 1, 1, S), bool)
  mask[2, ..., [0, 4]] = False
  kw = dict(mask=mask, q_segment_ids=q_ids, kv_segment_ids=kv_ids, key_value_seq_lengths=kv_lengths,
            query_seq_lengths=q_lengths)
  hidden_k = np.zeros((B, S), bool)
  hidden_k[1, S - 3:] = hidden_k[1, [2, 5]] = hidden_k[2, [0, 4]] = True
  hidden_q = np.zeros((B, T), bool)
  hidden_q[3, 4:] = True
  return kw, hidden_k, hidden_q


def garbage_runs(impl, metric, window: bool):
  """For clean inputs and for hidden positions filled with 1e5, inf and NaN: the output at visible rows and the
  gradients of every input (lam and, for lp, a traced p included)."""
  kw, hidden_k, hidden_q = hidden_positions()
  if window:  # (1, 1) without causality: keys past T reach no query
    kw, reach = dict(kw, local_window_size=(1, 1)), T + 1
  else:
    kw, reach = dict(kw, is_causal=True), T
  hidden_k = hidden_k.copy()
  hidden_k[:, reach:] = True
  hidden_k[3, 4 + (1 if window else 0):] = True  # only queries 0..3 of row 3 remain
  q, k, v = normal(1, (B, T, H, D), np.float32), normal(2, (B, S, KV, D), np.float32), normal(3, (B, S, KV, DV),
                                                                                              np.float32)
  cot = normal(4, (B, T, H, DV), np.float32)
  p = jnp.float32(3.0) if metric == "lp" else 2.0

  def loss(q, k, v, lam, p):
    out = da.distance_attention(q, k, v, metric=metric, lam=lam, p=p, implementation=impl, **kw)
    return jnp.sum(out * cot), out

  argnums = (0, 1, 2, 3) + ((4,) if metric == "lp" else ())
  run = jax.jit(jax.value_and_grad(loss, argnums, has_aux=True))
  lam = jnp.linspace(0.7, 1.3, H, dtype=jnp.float32)
  results = []
  for fill in (None, 1e5, np.inf, np.nan):
    qg, kg, vg = q.copy(), k.copy(), v.copy()
    if fill is not None:
      kg[hidden_k], vg[hidden_k], qg[hidden_q] = fill, fill, fill
    (_, out), grads = run(qg, kg, vg, lam, p)
    results.append((np.where(hidden_q[:, :, None, None], 0, out),) + tuple(np.asarray(g) for g in grads))
  return results, hidden_k, hidden_q


def assert_no_leak(results, hidden_k, hidden_q):
  # Exact equality: hidden positions are zeroed before any kernel runs, so clean and garbage runs hand the
  # kernel identical arrays. The gradient of a hidden input itself is 0.
  clean = results[0]
  for got in results[1:]:
    for a, b in zip(got, clean):
      np.testing.assert_array_equal(a, b)
  out, dq, dk, dv = clean[:4]
  assert np.all(np.isfinite(out)) and np.all(dk[hidden_k] == 0) and np.all(dv[hidden_k] == 0)
  assert np.all(dq[hidden_q] == 0)


ALL_METRICS = kernel_sweep_metrics() + (USER_METRIC,)


# make test-fast runs one case per kernel (the causal variant on the reference, the window one on blockwise);
# make test every metric on both.
FAST_LEAK_CASES = [("cosine", "reference"), ("dot", "blockwise")]


@pytest.mark.parametrize("metric,impl", [
    case if case in FAST_LEAK_CASES else pytest.param(*case, marks=pytest.mark.slow)
    for case in itertools.product(ALL_METRICS, ["reference", "blockwise"])])
def test_hidden_keys_and_queries_never_leak(impl, metric):
  assert_no_leak(*garbage_runs(impl, metric, window=metric in ("l1", "sqeuclidean", "dot")))


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["pallas", "ring"])
@pytest.mark.parametrize("metric", ["sqeuclidean", "cosine", "chebyshev", USER_METRIC])
def test_hidden_keys_never_leak_in_the_fused_and_ring_kernels(impl, metric):
  # One metric per form (centred gram, normalised gram, max-reduced and user elementwise); the hiding happens
  # before dispatch, so these check that each kernel is handed and honours it.
  if impl == "pallas":
    impl = da.kernels.Pallas(interpret=True)
  else:
    impl = da.kernels.Ring(mesh=jax.make_mesh((2,), ("seq",), devices=jax.devices()[:2]))
  assert_no_leak(*garbage_runs(impl, metric, window=False))


def test_padded_keys_no_longer_move_sqeuclidean():
  # The reported case: 5 of 8 keys real; padded keys at 1e3 used to move the output by 0.17.
  q, k, v = normal(5, (1, 8, 2, 8), np.float32), normal(6, (1, 8, 2, 8), np.float32), normal(7, (1, 8, 2, 8),
                                                                                            np.float32)
  lengths = np.array([5], np.int32)
  want = da.distance_attention(q, k, v, metric="sqeuclidean", key_value_seq_lengths=lengths)
  k[:, 5:] = 1e3
  got = da.distance_attention(q, k, v, metric="sqeuclidean", key_value_seq_lengths=lengths)
  np.testing.assert_array_equal(got, want)


# ------------------------------------------------------------------------------------------------------------
# The drop-in's lam.


def entropy(weights):
  return float(np.mean(-np.sum(weights * np.log(np.maximum(weights, 1e-30)), axis=-1)))


@pytest.mark.slow
def test_drop_in_starts_from_the_calibrated_lambda():
  # At lam = 1, cosine at head_dim 64 over 64 keys is uniform attention (entropy log 64 = 4.159); the drop-in
  # uses default_lambda (about 64) and is as sharp as dot-product attention.
  x = normal(8, (2, 64, 4, 64), np.float32)
  captured = {}

  class Capture(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.MultiHeadDotProductAttention(num_heads=4, qkv_features=256,
                                             attention_fn=da.make_attention_fn("cosine"))(x, sow_weights=True)

  flat = x.reshape(2, 64, 256)
  params = Capture().init(jax.random.key(0), flat)
  _, state = Capture().apply(params, flat, mutable=["intermediates"])
  weights = np.asarray(jax.tree.leaves(state)[0])
  captured["calibrated"] = entropy(weights)
  q = normal(9, (2, 64, 4, 64), np.float32)
  _, uniform = da.distance_attention(q, q, q, metric="cosine", lam=1.0, return_weights=True)
  assert entropy(np.asarray(uniform)) > 0.99 * np.log(64)
  assert captured["calibrated"] < 0.9 * np.log(64)
  # Fixed lam is honoured, and dot stays Flax's attention exactly (lam 1).
  lam = da.initializers.default_lambda("cosine", 64)
  np.testing.assert_allclose(lam, 64.0, rtol=0.05)
  fixed = da.make_attention_fn("cosine", lam=lam)(q, q, q)
  calibrated = da.make_attention_fn("cosine")(q, q, q)
  np.testing.assert_array_equal(fixed, calibrated)
  chex.assert_trees_all_close(da.make_attention_fn("dot")(q, q, q), nn.dot_product_attention(q, q, q),
                              rtol=1e-5, atol=1e-6)


def test_stock_flax_module_learns_lambda_through_a_fixed_traced_lam():
  # The documented recipe: a parameter of the enclosing module, fixed into the drop-in, gets a gradient.
  class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
      log_lam = self.param("log_lam", lambda _: jnp.log(da.initializers.default_lambda("l2", 8)))
      attn_fn = da.make_attention_fn("l2", lam=jnp.exp(log_lam))
      return nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=16, attention_fn=attn_fn)(x)

  x = normal(10, (2, 5, 16), np.float32)
  params = Block().init(jax.random.key(0), x)
  grads = jax.grad(lambda p: jnp.sum(Block().apply(p, x) ** 2))(params)
  g = float(grads["params"]["log_lam"])
  eps = 1e-3
  bumped = jax.tree.map(lambda a: a, params)
  bumped["params"]["log_lam"] = params["params"]["log_lam"] + eps
  lower = jax.tree.map(lambda a: a, params)
  lower["params"]["log_lam"] = params["params"]["log_lam"] - eps
  finite_difference = (jnp.sum(Block().apply(bumped, x) ** 2) - jnp.sum(Block().apply(lower, x) ** 2)) / (2 * eps)
  assert g != 0.0
  np.testing.assert_allclose(g, float(finite_difference), rtol=2e-2)  # float32 central difference


def test_flax_einsum_hooks_are_refused_not_dropped():
  class Quantised(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.MultiHeadDotProductAttention(
          num_heads=2, qkv_features=8, attention_fn=da.make_attention_fn("l1"),
          qk_attn_weights_einsum_cls=lambda: jnp.einsum, attn_weights_value_einsum_cls=lambda: jnp.einsum)(x)

  with pytest.raises(TypeError, match="qk_attn_weights_einsum must be None"):
    Quantised().init(jax.random.key(0), jnp.ones((1, 3, 8)))


# ------------------------------------------------------------------------------------------------------------
# Traced arguments, checked at run time on request.


@pytest.mark.parametrize("argname,bad,message", [
    ("lam", -1.0, "lam must be > 0 and finite"),
    ("p", -3.0, r"p must be > 0 \(inf allowed\)"),
    ("key_value_seq_lengths", 9, r"key_value_seq_lengths must be in \[0, 6\]"),
])
def test_checked_mode_reports_traced_values(argname, bad, message):
  q = normal(11, (2, 6, 2, 8), np.float32)

  def f(value):
    kw = dict(metric="lp", lam=1.0, p=2.0)
    if argname == "key_value_seq_lengths":
      kw[argname] = jnp.stack([value, value]).astype(jnp.int32)
    else:
      kw[argname] = value
    return da.distance_attention(q, q, q, **kw)

  good = dict(lam=1.0, p=2.0, key_value_seq_lengths=4)[argname]
  checked = da.checked(jax.jit(f))
  chex.assert_trees_all_close(checked(jnp.asarray(good)), jax.jit(f)(jnp.asarray(good)))
  jax.jit(f)(jnp.asarray(bad))  # without checked(): traced values pass, as the docstring says
  with pytest.raises(checkify.JaxRuntimeError, match=message):
    checked(jnp.asarray(bad))


def test_p_is_ignored_where_the_metric_has_none():
  q = normal(12, (1, 4, 2, 8), np.float32)
  np.testing.assert_array_equal(da.distance_attention(q, q, q, metric="l1", p=-3.0),
                                da.distance_attention(q, q, q, metric="l1"))


# ------------------------------------------------------------------------------------------------------------
# Empty sequences.


@pytest.mark.parametrize("impl", ["reference", "blockwise", "pallas", "ring"])
def test_empty_queries_keys_and_batch(impl):
  if impl == "pallas":
    impl = da.kernels.Pallas(interpret=True)
  elif impl == "ring":
    impl = da.kernels.Ring(mesh=jax.make_mesh((2,), ("seq",), devices=jax.devices()[:2]))
  for q_shape, k_shape in (((1, 0, 2, 8), (1, 5, 2, 8)), ((1, 4, 2, 8), (1, 0, 2, 8)), ((0, 4, 2, 8), (0, 5, 2, 8))):
    q, k = jnp.ones(q_shape), jnp.ones(k_shape)
    out = da.distance_attention(q, k, k, implementation=impl)
    assert out.shape == q_shape and not np.any(np.asarray(out))  # no key: every row is 0, like a masked row
    grad = jax.grad(lambda q: jnp.sum(da.distance_attention(q, k, k, implementation=impl)))(q)
    assert grad.shape == q_shape and not np.any(np.asarray(grad))


# ------------------------------------------------------------------------------------------------------------
# Registering again under one name.


@pytest.mark.slow
def test_register_overwrite_and_unregister_take_effect_in_compiled_code():
  name = "hidden_test_scaled_l1"
  q = normal(13, (1, 5, 2, 4), np.float32)
  attend = jax.jit(lambda q: da.distance_attention(q, q, q, metric=name))
  da.metrics.register(da.metrics.Metric(name, da.metrics.Elementwise(phi=jnp.abs)))
  try:
    first = attend(q)
    with pytest.raises(ValueError, match="already registered; pass overwrite=True"):
      da.metrics.register(da.metrics.Metric(name, da.metrics.Elementwise(phi=jnp.abs)))
    da.metrics.register(da.metrics.Metric(name, da.metrics.Elementwise(phi=lambda t: 2.0 * jnp.abs(t))),
                        overwrite=True)
    # The same jitted function now runs the new form: logits doubled, as lam = 2 with the old one.
    chex.assert_trees_all_close(attend(q), da.distance_attention(q, q, q, metric="l1", lam=2.0), rtol=1e-6)
    assert not np.allclose(attend(q), first)
    assert da.initializers.default_lambda(name, 4) == pytest.approx(da.initializers.default_lambda("l1", 4) / 2,
                                                                   rel=1e-6)
  finally:
    da.metrics.unregister(name)
  assert name not in da.metrics.available()
  with pytest.raises(ValueError, match="is a shipped metric and cannot be replaced"):
    da.metrics.register(da.metrics.Metric("l1", da.metrics.Elementwise(phi=jnp.abs)), overwrite=True)
  with pytest.raises(ValueError, match="is not registered"):
    da.metrics.unregister(name)
