"""Weighted metrics (a diagonal Mahalanobis distance per head): ``weighted_l1`` and ``weighted_l2`` with
non-negative feature weights ``metric_weights``, against a float64 numpy oracle written from the explicit
weighted formulas (not from the rescaled features the library computes), outputs and gradients in q, k, v, lam
and the weights, on every kernel; finite differences and forward mode for the weights; a user's weighted metric;
hidden positions; the modules learning the weights; the errors."""

import math

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from jax.experimental import checkify

import distattn_jax as da
from conftest import normal
from distattn_jax.metrics import elementwise, record
from distattn_jax.training import optim

B, T, S, H, KV, D, DV = 2, 5, 6, 4, 2, 8, 3


# ------------------------------------------------------------------------------------------------------------
# The oracle: forward and reverse mode written out from d_w(q, k) = sum_d w_d |q_d - k_d| (weighted l1) and
# sqrt(sum_d w_d (q_d - k_d)^2) (weighted l2), in float64 numpy.


def weighted_distance(metric, q, k, w):
  """``d [T, S]`` and its partial derivatives ``dd/dq [T, S, D]`` and ``dd/dw [T, S, D]`` (``dd/dk = -dd/dq``).
  The library's convention at a weight of exactly 0 (the one-sided derivative there is |q_d - k_d|, or its
  square over 2d): the gradient with respect to that weight is 0."""
  diff = q[:, None, :] - k[None, :, :]
  if metric == "weighted_l1":
    return (w * np.abs(diff)).sum(-1), w * np.sign(diff), np.where(w > 0, np.abs(diff), 0.0)
  d = np.sqrt((w * diff ** 2).sum(-1))
  safe = np.where(d > 0, d, 1.0)[..., None]
  return d, np.where(d[..., None] > 0, w * diff / safe, 0.0), np.where((d[..., None] > 0) & (w > 0),
                                                                     diff ** 2 / (2 * safe), 0.0)


def oracle(metric, q, k, v, lam, w, cot, is_causal=False):
  """``(out, dq, dk, dv, dlam, dw)`` of ``sum(out * cot)``: ``w`` is ``[KV, D]`` (a kv head's row serves its
  query heads) or ``[H, D]`` (a row per query head)."""
  q, k, v, lam, w, cot = (np.asarray(a, np.float64) for a in (q, k, v, lam, w, cot))
  heads, kv_heads = q.shape[2], k.shape[2]
  group = heads // kv_heads
  out, dq, dk, dv = np.zeros(q.shape[:3] + v.shape[-1:]), np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
  dlam, dw = np.zeros_like(lam), np.zeros_like(w)
  allowed = np.arange(q.shape[1])[:, None] >= np.arange(k.shape[1])[None, :] if is_causal else True
  for b in range(q.shape[0]):
    for h in range(heads):
      g, row = h // group, (h if w.shape[0] == heads else h // group)
      d, dd_dq, dd_dw = weighted_distance(metric, q[b, :, h], k[b, :, g], w[row])
      logits = np.where(allowed, -lam[h] * d / math.sqrt(q.shape[-1]), -np.inf)
      a = np.exp(logits - logits.max(-1, keepdims=True))
      a /= a.sum(-1, keepdims=True)
      out[b, :, h] = a @ v[b, :, g]
      dv[b, :, g] += a.T @ cot[b, :, h]
      da_ = cot[b, :, h] @ v[b, :, g].T
      dlogits = a * (da_ - (a * da_).sum(-1, keepdims=True))
      dlam[h] += (dlogits * -d / math.sqrt(q.shape[-1])).sum()
      dd = dlogits * -lam[h] / math.sqrt(q.shape[-1])
      dq[b, :, h] += (dd[..., None] * dd_dq).sum(1)
      dk[b, :, g] -= (dd[..., None] * dd_dq).sum(0)
      dw[row] += (dd[..., None] * dd_dw).sum((0, 1))
  return out, dq, dk, dv, dlam, dw


def inputs(seed, dtype=np.float64, rows=KV):
  q, k, v = normal(seed, (B, T, H, D), dtype), normal(seed + 1, (B, S, KV, D), dtype), normal(seed + 2,
                                                                                             (B, S, KV, DV), dtype)
  w = np.random.default_rng(seed).uniform(0.2, 2.0, (rows, D)).astype(dtype)
  w[0, 1] = 0.0 if rows == KV else w[0, 1]  # a zero weight: that feature is ignored (weighted l1 stays exact)
  lam = np.linspace(0.6, 1.4, H).astype(dtype)
  return q, k, v, lam, w, normal(seed + 3, (B, T, H, DV), dtype)


def library(impl, metric, q, k, v, lam, w, cot, **kw):
  def loss(q, k, v, lam, w):
    out = da.distance_attention(q, k, v, metric=metric, lam=lam, metric_weights=w, implementation=impl, **kw)
    return jnp.sum(out * cot), out

  (_, out), grads = jax.jit(jax.value_and_grad(loss, (0, 1, 2, 3, 4), has_aux=True))(q, k, v, lam, w)
  return (out,) + grads


def assert_matches_oracle(got, want, rtol, atol):
  names = ("out", "dq", "dk", "dv", "dlam", "dw")
  for name, g, o in zip(names, got, want):
    np.testing.assert_allclose(np.asarray(g, np.float64), o, rtol=rtol, atol=atol * max(1.0, np.abs(o).max()),
                               err_msg=name)


def test_the_metric_functions_are_the_weighted_formulas():
  x, y = normal(1, (3, 5, D)), normal(2, (3, 4, D))
  w = np.random.default_rng(3).uniform(0.0, 2.0, (3, D))  # one weight vector per leading index
  diff = x[:, :, None] - y[:, None]
  want = {"weighted_l1": (w[:, None, None] * np.abs(diff)).sum(-1),
          "weighted_l2": np.sqrt((w[:, None, None] * diff ** 2).sum(-1))}
  for name, value in want.items():
    got = da.metrics.get(name)(x.astype(np.float32), y.astype(np.float32), metric_weights=w.astype(np.float32))
    np.testing.assert_allclose(got, value, rtol=2e-6, atol=2e-6, err_msg=name)
    # Without weights: the base metric.
    x0, y0 = x[0].astype(np.float32), y[0].astype(np.float32)
    np.testing.assert_array_equal(da.metrics.get(name)(x0, y0), da.metrics.get(name[len("weighted_"):])(x0, y0))
  assert da.metrics.weighted_l1.weighted and not da.metrics.l1.weighted


def fast_cases(cases, fast):
  """``cases`` for parametrize, every one not in ``fast`` marked slow (`make test-fast` runs the ``fast`` ones)."""
  return [c if c in fast else pytest.param(*c, marks=pytest.mark.slow) for c in cases]


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("impl,metric", fast_cases(
    [("reference", "weighted_l1"), ("reference", "weighted_l2"), ("blockwise", "weighted_l1"),
     ("blockwise", "weighted_l2")], fast=[("reference", "weighted_l2"), ("blockwise", "weighted_l1")]))
def test_outputs_and_gradients_match_the_oracle_per_kv_head(impl, metric):
  q, k, v, lam, w, cot = inputs(10)
  got = library(impl if impl == "reference" else da.kernels.Blockwise(block_q=2, block_k=4), metric, q, k, v, lam,
                w, cot, is_causal=True)
  assert_matches_oracle(got, oracle(metric, q, k, v, lam, w, cot, is_causal=True), rtol=1e-9, atol=1e-11)


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("impl,metric", fast_cases([("reference", "weighted_l1"), ("blockwise", "weighted_l2")],
                                                   fast=[("reference", "weighted_l1")]))
def test_per_query_head_weights_repeat_the_keys_and_match_the_oracle(impl, metric):
  q, k, v, lam, w, cot = inputs(20, rows=H)
  kernel = impl if impl == "reference" else da.kernels.Blockwise(block_q=2, block_k=4)
  assert_matches_oracle(library(kernel, metric, q, k, v, lam, w, cot), oracle(metric, q, k, v, lam, w, cot),
                        rtol=1e-9, atol=1e-11)
  # Rows equal within each group are the per-kv-head weights.
  attend = jax.jit(lambda w: da.distance_attention(q, k, v, metric=metric, lam=lam, metric_weights=w,
                                                   implementation=kernel))
  np.testing.assert_allclose(attend(np.repeat(w[::H // KV], H // KV, axis=0)), attend(w[::H // KV]), rtol=1e-12,
                             atol=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("metric", ["weighted_l1", "weighted_l2"])
def test_ring_matches_the_oracle(metric):
  q, k, v, lam, w, cot = inputs(30, np.float32)
  ring = da.kernels.Ring(mesh=jax.make_mesh((2,), ("seq",), devices=jax.devices()[:2]))
  got = library(ring, metric, q, k, v, lam, w, cot, is_causal=True)
  assert_matches_oracle(got, oracle(metric, q, k, v, lam, w, cot, is_causal=True), rtol=2e-4, atol=2e-5)


@pytest.mark.slow
@pytest.mark.parametrize("metric", ["weighted_l1", "weighted_l2"])
def test_pallas_interpreted_matches_the_oracle(metric):
  q, k, v, lam, w, cot = inputs(40, np.float32)
  pallas = da.kernels.Pallas(block_q=16, block_k=16, interpret=True)
  got = library(pallas, metric, q, k, v, lam, w, cot, is_causal=True)
  assert_matches_oracle(got, oracle(metric, q, k, v, lam, w, cot, is_causal=True), rtol=2e-4, atol=2e-5)


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("metric", ["weighted_l2", pytest.param("weighted_l1", marks=pytest.mark.slow)])
def test_weight_gradient_matches_finite_differences(metric):
  q, k, v, lam, w, cot = inputs(50)
  w = w + 0.1  # away from 0, where the gradient follows a convention (0), not the one-sided derivative
  f = jax.jit(lambda w: jnp.sum(da.distance_attention(q, k, v, metric=metric, lam=lam, metric_weights=w) * cot))
  grad = np.asarray(jax.jit(jax.grad(f))(w))
  eps = 1e-6
  fd = np.zeros_like(w)
  for i in np.ndindex(*w.shape):
    step = np.zeros_like(w)
    step[i] = eps
    fd[i] = (f(w + step) - f(w - step)) / (2 * eps)
  np.testing.assert_allclose(grad, fd, rtol=1e-6, atol=1e-9)


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("impl", ["blockwise", pytest.param("reference", marks=pytest.mark.slow)])
def test_forward_mode_matches_the_oracle(impl):
  # <cot, J t> from jax.jvp equals <J^T cot, t> from the oracle's reverse mode, for tangents in q, k, v, lam, w.
  q, k, v, lam, w, cot = inputs(60)
  tangents = tuple(normal(70 + i, a.shape) for i, a in enumerate((q, k, v, lam, w)))
  for metric in ("weighted_l1", "weighted_l2"):
    f = lambda q, k, v, lam, w: da.distance_attention(q, k, v, metric=metric, lam=lam, metric_weights=w,
                                                      implementation=impl, is_causal=True)
    out, jvp = jax.jit(lambda *a: jax.jvp(f, a, tangents))(q, k, v, lam, w)
    want = oracle(metric, q, k, v, lam, w, cot, is_causal=True)
    np.testing.assert_allclose(out, want[0], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(float(jnp.sum(jvp * cot)), sum(float(np.sum(g * t)) for g, t in zip(want[1:], tangents)),
                               rtol=1e-9, err_msg=metric)


def test_default_lambda_is_the_base_metrics():
  for base in ("l1", "l2"):
    for d in (16,):
      assert da.initializers.default_lambda(f"weighted_{base}", d) == da.initializers.default_lambda(base, d)


# ------------------------------------------------------------------------------------------------------------
# A user's weighted metric: lp at order p with weights, d = (sum_d w_d |q_d - k_d|^p)^(1/p), from lp's form and
# the scale w^(1/p) (p may be traced).

USER = "test_weighted_lp"


@pytest.fixture
def user_weighted_lp():
  metric = da.metrics.register(da.metrics.Metric(
      USER, da.metrics.lp.form, translation_invariant=True,
      feature_scale=lambda w, p: elementwise.safe_root(w, p)), overwrite=True)
  yield metric
  da.metrics.unregister(USER)


@pytest.mark.usefixtures("x64")
def test_a_registered_weighted_metric_works_like_the_shipped_ones(user_weighted_lp):
  q, k, v, lam, w, cot = inputs(80)
  w = w + 0.05
  p = 3.0

  def user_oracle(w):
    # Explicit formula; weighted lp is weighted l1 of |diff|^p under a root, so write the forward out directly.
    out = np.zeros((B, T, H, DV))
    for b in range(B):
      for h in range(H):
        g = h // (H // KV)
        diff = q[b, :, h][:, None] - k[b, :, g][None]
        dist = ((w[g] * np.abs(diff) ** p).sum(-1)) ** (1 / p)
        logits = -lam[h] * dist / math.sqrt(D)
        a = np.exp(logits - logits.max(-1, keepdims=True))
        out[b, :, h] = (a / a.sum(-1, keepdims=True)) @ v[b, :, g]
    return out

  # The output, and the weight gradient (p traced) against central differences of the oracle.
  def f(w, p):
    out = da.distance_attention(q, k, v, metric=USER, lam=lam, p=p, metric_weights=w,
                                implementation=da.kernels.Blockwise(block_q=2, block_k=4))
    return jnp.sum(out * cot), out

  (_, out), grad = jax.jit(jax.value_and_grad(f, has_aux=True))(w, jnp.float64(p))
  np.testing.assert_allclose(out, user_oracle(w), rtol=1e-10, atol=1e-12)
  eps = 1e-6
  for i in [(0, 0), (1, 3), (1, 7)]:
    step = np.zeros_like(w)
    step[i] = eps
    fd = np.sum((user_oracle(w + step) - user_oracle(w - step)) * cot) / (2 * eps)
    np.testing.assert_allclose(grad[i], fd, rtol=1e-6, atol=1e-10)
  assert da.metrics.get(USER).weighted and da.initializers.default_lambda(USER, D, 3.0) == (
      da.initializers.default_lambda("lp", D, 3.0))


@pytest.mark.slow
def test_a_registered_weighted_gram_metric_is_routed_to_dot_product_attention():
  # Weighted sqeuclidean, sum_d w_d (q_d - k_d)^2: sqeuclidean's gram form on sqrt(w)-scaled features, which the
  # routed kernel (here on jax.nn's XLA attention) carries by exact algebra.
  name = "test_weighted_sqeuclidean"
  da.metrics.register(da.metrics.Metric(name, da.metrics.sqeuclidean.form, translation_invariant=True,
                                        feature_scale=lambda w, p: elementwise.safe_root(w, 2.0)), overwrite=True)
  try:
    q, k, v, lam, w, cot = inputs(85, np.float32)
    w = w + 0.05
    routed, reference = (library(impl, name, q, k, v, lam, w, cot, is_causal=True)
                         for impl in (da.kernels.Routed(implementation="xla"), "reference"))
    for got, want in zip(routed, reference):
      np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * max(1.0, float(np.abs(want).max())))
    out = np.zeros((B, T, H, DV))
    for b in range(B):
      for h in range(H):
        g = h // (H // KV)
        dist = (w[g] * (q[b, :, h][:, None].astype(np.float64) - k[b, :, g][None]) ** 2).sum(-1)
        logits = np.where(np.tril(np.ones((T, S), bool)), -lam[h] * dist / math.sqrt(D), -np.inf)
        a = np.exp(logits - logits.max(-1, keepdims=True))
        out[b, :, h] = (a / a.sum(-1, keepdims=True)) @ v[b, :, g]
    np.testing.assert_allclose(routed[0], out, rtol=1e-4, atol=1e-4)
  finally:
    da.metrics.unregister(name)


@pytest.mark.parametrize("scale,message", [
    (lambda w, p: 2.0 * w, r"feature_scale\(w, p\) must be 1 at w = 1 .*got 2.0"),
    (lambda w, p: jnp.sum(w), r"feature_scale\(w, p\) must be elementwise"),
    (lambda w, p: jnp.sqrt(w), r"feature_scale\(w, p\) gives a non-finite value or gradient"),
    (lambda w: w, r"feature_scale\(w, p\) failed on weights"),
])
def test_registration_checks_the_feature_scale(scale, message):
  bad = da.metrics.Metric("test_bad_scale", da.metrics.Elementwise(phi=jnp.abs), feature_scale=scale)
  with pytest.raises(ValueError, match=message):
    da.metrics.register(bad)
  assert "test_bad_scale" not in da.metrics.available()
  with pytest.raises(TypeError, match=r"feature_scale must be None or a callable feature_scale\(w, p\)"):
    da.metrics.Metric("test_bad_scale", da.metrics.Elementwise(phi=jnp.abs), feature_scale=2.0)


# ------------------------------------------------------------------------------------------------------------
# Hidden positions: garbage in keys no query sees reaches no output and no gradient, the weights' included.


@pytest.mark.parametrize("impl", ["reference", pytest.param("blockwise", marks=pytest.mark.slow)])
def test_hidden_keys_never_reach_the_weight_gradient(impl):
  q, k, v, lam, w, cot = inputs(90, np.float32)
  lengths = np.array([S, S - 2], np.int32)
  hidden = np.arange(S)[None, :] >= lengths[:, None]

  def loss(q, k, v, lam, w):
    out = da.distance_attention(q, k, v, metric="weighted_l2", lam=lam, metric_weights=w,
                                key_value_seq_lengths=lengths, implementation=impl)
    return jnp.sum(out * cot), out

  step = jax.jit(jax.value_and_grad(loss, (0, 1, 2, 3, 4), has_aux=True))

  def run(k, v):
    (_, out), grads = step(q, k, v, lam, w)
    return (out,) + grads

  clean = run(k, v)
  assert np.all(np.isfinite(clean[-1])) and np.any(clean[-1] != 0)
  for fill in (np.nan, np.inf, 1e5):
    kg, vg = k.copy(), v.copy()
    kg[hidden], vg[hidden] = fill, fill
    for a, b in zip(run(kg, vg), clean):
      np.testing.assert_array_equal(a, b, err_msg=f"fill={fill}")


# ------------------------------------------------------------------------------------------------------------
# The modules learn the weights.


def test_linen_module_learns_the_weights_in_the_lambda_group():
  x = jnp.asarray(normal(100, (2, 6, 16), np.float32))
  module = da.DistanceBasedAttention(num_heads=4, num_kv_heads=2, metric="weighted_l1")
  params = jax.jit(module.init)(jax.random.key(0), x)["params"]
  assert params["log_metric_weights"].shape == (2, 4) and np.all(np.asarray(params["log_metric_weights"]) == 0)

  labels = optim.param_labels(params)
  assert labels["log_metric_weights"] == optim.LAMBDA and labels["log_lambda"] == optim.LAMBDA
  config = ml_collections.ConfigDict(dict(
      learning_rate=1e-2, lambda_learning_rate=5e-2, warmup_steps=0, end_learning_rate_fraction=0.1, b1=0.9,
      b2=0.99, eps=1e-8, weight_decay=0.1, clip_norm=1.0))
  tx = optim.make_optimizer(config, 10)
  loss = lambda p: jnp.mean((module.apply({"params": p}, x, is_causal=True) - x) ** 2)
  step = jax.jit(lambda params: tx.update(jax.grad(loss)(params), tx.init(params), params)[0])
  moved = np.asarray(step(params)["log_metric_weights"])
  assert np.all(np.isfinite(moved)) and np.count_nonzero(moved) > moved.size // 2


@pytest.mark.slow
def test_the_modules_agree_and_start_as_the_base_metric():
  x = jnp.asarray(normal(100, (2, 6, 16), np.float32))
  module = da.DistanceBasedAttention(num_heads=4, num_kv_heads=2, metric="weighted_l1")
  params = module.init(jax.random.key(0), x)["params"]
  base = da.DistanceBasedAttention(num_heads=4, num_kv_heads=2, metric="l1")
  unweighted = {name: value for name, value in params.items() if name != "log_metric_weights"}
  np.testing.assert_array_equal(module.apply({"params": params}, x), base.apply({"params": unweighted}, x))
  assert "log_metric_weights" not in base.init(jax.random.key(0), x)["params"]

  model = da.nnx.DistanceBasedAttention(4, 16, num_kv_heads=2, metric="weighted_l2", rngs=nnx.Rngs(0))
  model.log_metric_weights[...] = jnp.asarray(normal(111, (2, 4), np.float32, 0.5))
  linen = da.DistanceBasedAttention(num_heads=4, num_kv_heads=2, metric="weighted_l2")
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  chex.assert_trees_all_close(linen.apply({"params": params}, x), model(x), rtol=1e-6, atol=1e-6)
  assert da.nnx.DistanceBasedAttention(4, 16, metric="l2", rngs=nnx.Rngs(0)).log_metric_weights is None


def test_nnx_module_learns_the_weights():
  x = jnp.asarray(normal(110, (2, 6, 16), np.float32))
  model = da.nnx.DistanceBasedAttention(4, 16, num_kv_heads=2, metric="weighted_l2", rngs=nnx.Rngs(0))
  assert model.log_metric_weights.shape == (2, 4) and np.all(np.asarray(model.log_metric_weights[...]) == 0)

  config = ml_collections.ConfigDict(dict(
      learning_rate=1e-2, lambda_learning_rate=5e-2, warmup_steps=0, end_learning_rate_fraction=0.1, b1=0.9,
      b2=0.99, eps=1e-8, weight_decay=0.1, clip_norm=1.0))
  optimizer = nnx.Optimizer(model, optim.make_optimizer(config, 10), wrt=nnx.Param)
  before = np.asarray(model.log_metric_weights[...])

  @nnx.jit
  def train_step(model, optimizer):
    optimizer.update(model, nnx.grad(lambda m: jnp.mean((m(x) - x) ** 2))(model))

  train_step(model, optimizer)
  after = np.asarray(model.log_metric_weights[...])
  assert np.all(np.isfinite(after)) and np.count_nonzero(after != before) > after.size // 2


# ------------------------------------------------------------------------------------------------------------
# Errors.


def test_errors_name_the_argument_the_value_and_what_is_allowed():
  q, k, v, lam, w, _ = inputs(120, np.float32)
  attend = lambda **kw: da.distance_attention(q, k, v, **kw)
  with pytest.raises(ValueError, match=r"distance_attention: metric_weights is only for a weighted metric .*"
                                       r"weighted_l1, weighted_l2\); metric='l1' takes no feature weights"):
    attend(metric="l1", metric_weights=w)
  bad = w.copy()
  bad[1, 2] = -0.5
  with pytest.raises(ValueError, match=r"distance_attention: metric_weights must be >= 0 and finite .*got -0.5 "
                                       r"at index \(1, 2\)"):
    attend(metric="weighted_l1", metric_weights=bad)
  with pytest.raises(ValueError, match=r"metric_weights must be >= 0 and finite .*got nan"):
    attend(metric="weighted_l2", metric_weights=np.full(D, np.nan, np.float32))
  with pytest.raises(ValueError, match=r"metric_weights must be a scalar or have shape \(head_dim,\) = \(8,\), "
                                       r"\(kv_heads, head_dim\) = \(2, 8\) or \(heads, head_dim\) = \(4, 8\) .*got "
                                       r"shape \(3, 8\)"):
    attend(metric="weighted_l1", metric_weights=np.ones((3, D), np.float32))
  with pytest.raises(TypeError, match=r"metric_weights must be a real array .*got dtype bool"):
    attend(metric="weighted_l1", metric_weights=np.ones(D, bool))
  with pytest.raises(ValueError, match=r"weighted_l1: metric_weights must be >= 0"):
    da.metrics.weighted_l1(q[0, :, 0], k[0, :, 0], metric_weights=-np.ones(D, np.float32))
  with pytest.raises(ValueError, match=r"make_attention_fn: metric_weights is only for a weighted metric"):
    da.make_attention_fn("l2", metric_weights=w)
  # A traced weight is checked at run time under da.checked.
  run = da.checked(jax.jit(lambda w: attend(metric="weighted_l1", metric_weights=w)))
  with pytest.raises(checkify.JaxRuntimeError, match=r"metric_weights must be >= 0 and finite"):
    run(bad)
  np.testing.assert_allclose(run(w), attend(metric="weighted_l1", metric_weights=w), rtol=1e-6, atol=1e-6)
