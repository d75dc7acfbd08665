"""Metric records and the registry: a user's distance against a float64 numpy oracle in every kernel, the layer
and the trainer; registration errors; gram matmuls at HIGHEST precision; the float32 gradient bound for nearly
equal vectors; bfloat16 against float32 on the same rounded inputs."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads
from scipy.spatial.distance import cdist

import distattn_jax as da
from conftest import normal
from distattn_jax.metrics import record

M = da.metrics


def one_fast(values, fast):
  """``values`` for parametrize, every one but ``fast`` marked slow: `make test-fast` runs one case of a sweep,
  `make test` all of them."""
  return [v if v == fast else pytest.param(v, marks=pytest.mark.slow) for v in values]


def huber(t):
  a = jnp.abs(t)
  return jnp.where(a <= 1.0, 0.5 * t * t, a - 0.5)


def huber_np(t):
  a = np.abs(t)
  return np.where(a <= 1.0, 0.5 * t * t, a - 0.5)


def pseudo_huber(xy, xx, yy):
  return jnp.sqrt(1.0 + jnp.maximum(xx + yy - 2.0 * xy, 0.0)) - 1.0


USER = {
    # elementwise, sum: per-feature Huber loss
    "test_huber": (M.Metric("test_huber", M.Elementwise(phi=huber), translation_invariant=True),
                   lambda x, y: huber_np(x[:, None, :] - y[None, :, :]).sum(-1)),
    # elementwise, max: the largest squared coordinate difference (ties share the gradient)
    "test_max_square": (M.Metric("test_max_square", M.Elementwise(phi=jnp.square, reduce="max"),
                                 translation_invariant=True),
                        lambda x, y: ((x[:, None, :] - y[None, :, :]) ** 2).max(-1)),
    # gram: sqrt(1 + |x - y|^2) - 1
    "test_pseudo_huber": (M.Metric("test_pseudo_huber", M.Gram(pseudo_huber), translation_invariant=True),
                          lambda x, y: np.sqrt(1.0 + cdist(x, y, "sqeuclidean")) - 1.0),
}


@pytest.fixture(scope="module", autouse=True)
def registered():
  for metric, _ in USER.values():
    M.register(metric)
  yield
  for name in USER:  # leave the process's registry as the other test files expect it
    record._REGISTRY.pop(name)


def np_attention(score, q, k, v, lam):
  """Float64 attention over [T, D] x [S, D] x [S, Dv] with logits -lam * distance / sqrt(D)."""
  logits = -lam * score(q, k) / math.sqrt(q.shape[-1])
  w = np.exp(logits - logits.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  return w @ v


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("name", list(USER))
def test_user_metric_function_matches_the_oracle_with_gradients(name):
  metric, oracle = USER[name]
  x, y = normal(0, (5, 7)), normal(1, (6, 7))
  y[2] = x[1]  # a zero distance: the documented gradient conventions must hold (finite)
  got = M.get(name)(x, y)
  np.testing.assert_allclose(np.asarray(got), oracle(x, y), rtol=1e-12, atol=1e-12)
  assert M.get(name) is metric and name in M.available()
  # Finite differences away from kinks (the zero-distance pair excluded): float64, so 1e-6 is ~1e4 x the
  # rounding of a central difference at eps = 1e-6.
  x2, y2 = normal(2, (4, 6)), normal(3, (5, 6))
  w = normal(4, (4, 5))
  check_grads(lambda a, b: jnp.sum(M.get(name)(a, b) * w), (x2, y2), order=1, modes=("rev",), eps=1e-6,
              atol=1e-6, rtol=1e-6)
  grads = jax.grad(lambda a, b: jnp.sum(M.get(name)(a, b)), (0, 1))(x, y)
  assert all(np.all(np.isfinite(np.asarray(g))) for g in grads)


def _plain_autodiff_attention(name, q, k, v, lam):
  """The formula in plain jnp (materialising [T, S, D]), float64: an autodiff oracle for the kernels' VJPs."""
  t = q[..., :, None, :] - k[..., None, :, :]
  if name == "test_huber":
    d = jnp.sum(jnp.where(jnp.abs(t) <= 1.0, 0.5 * t * t, jnp.abs(t) - 0.5), -1)
  else:
    d = jnp.sqrt(1.0 + jnp.sum(t * t, -1)) - 1.0
  w = jax.nn.softmax(-lam * d / math.sqrt(q.shape[-1]), axis=-1)
  return w @ v


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("implementation", ["reference", da.kernels.Blockwise(block_q=8, block_k=8)])
# One elementwise form, one gram form; make test-fast runs the gram one.
@pytest.mark.parametrize("name", one_fast(["test_huber", "test_pseudo_huber"], "test_pseudo_huber"))
def test_user_metric_in_every_kernel_matches_the_oracle(name, implementation):
  _, oracle = USER[name]
  t, s, d = 12, 20, 5  # not multiples of the tiles: padding is exercised
  q, k, v = normal(5, (1, t, 1, d)), normal(6, (1, s, 1, d)), normal(7, (1, s, 1, 3))
  lam = 0.8
  out = da.distance_attention(q, k, v, metric=name, lam=lam, implementation=implementation)
  want = np_attention(oracle, q[0, :, 0], k[0, :, 0], v[0, :, 0], lam)
  np.testing.assert_allclose(np.asarray(out)[0, :, 0], want, rtol=1e-10, atol=1e-12)

  cot = normal(8, out.shape)
  loss = lambda q, k, v: jnp.sum(da.distance_attention(q, k, v, metric=name, lam=lam,
                                                       implementation=implementation) * cot)
  oracle_loss = lambda q, k, v: jnp.sum(_plain_autodiff_attention(name, q[0, :, 0], k[0, :, 0], v[0, :, 0], lam)
                                        * cot[0, :, 0])
  got = jax.grad(loss, (0, 1, 2))(q, k, v)
  want = jax.grad(oracle_loss, (0, 1, 2))(q, k, v)
  chex.assert_trees_all_close(got, want, rtol=1e-9, atol=1e-11)


@pytest.mark.slow
def test_user_metric_inside_the_layer_uses_its_default_lambda():
  x = jnp.asarray(normal(9, (2, 6, 16), np.float32))
  module = da.DistanceBasedAttention(num_heads=2, metric="test_huber")
  # Under jit, as the trainer initialises: the default lambda is measured on constants even while tracing.
  params = jax.jit(module.init)(jax.random.key(0), x)["params"]
  lam = da.initializers.default_lambda("test_huber", 8)
  np.testing.assert_allclose(np.exp(params["log_lambda"]), lam, rtol=1e-6)
  # The layer is distance_attention on its projections (the same kernel path as the shipped metrics).
  got = module.apply({"params": params}, x)
  proj = lambda p: jnp.einsum("blf,fhd->blhd", x, p["kernel"]) + p["bias"][None, None]
  heads = da.distance_attention(proj(params["query"]), proj(params["key"]), proj(params["value"]),
                                metric="test_huber", lam=jnp.exp(params["log_lambda"]))
  want = jnp.einsum("blhd,hdf->blf", heads, params["out"]["kernel"]) + params["out"]["bias"][None, None]
  chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-6)
  # A spread-matching lambda: its logits spread across keys like dot-product attention's (within 3%, the
  # Monte-Carlo error on fresh samples, as for the shipped metrics).
  spread = da.initializers.logit_spread("test_huber", 64, lam=da.initializers.default_lambda("test_huber", 64),
                                        seed=7)
  assert abs(spread / da.initializers.logit_spread("dot", 64, seed=7) - 1) < 0.03


@pytest.mark.slow
def test_make_attention_fn_and_the_trainer_accept_a_registered_name():
  from flax import linen as nn
  from distattn_jax import training
  from distattn_jax.training import steps
  x = jnp.asarray(normal(10, (2, 5, 8), np.float32))
  mha = nn.MultiHeadDotProductAttention(num_heads=2, attention_fn=da.make_attention_fn("test_max_square", lam=0.5))
  params = mha.init(jax.random.key(1), x)
  p = params["params"]
  proj = lambda q: jnp.einsum("blf,fhd->blhd", x, q["kernel"]) + q["bias"][None, None]
  heads = da.distance_attention(proj(p["query"]), proj(p["key"]), proj(p["value"]), metric="test_max_square",
                                lam=0.5)
  want = jnp.einsum("blhd,hdf->blf", heads, p["out"]["kernel"]) + p["out"]["bias"][None, None]
  chex.assert_trees_all_close(mha.apply(params, x), want, rtol=1e-5, atol=1e-6)

  config = training.default_config()
  config.model.update(width=16, depth=1, num_heads=2, mlp_dim=32, max_len=16, metric="test_huber")
  config.data.update(seq_len=8, batch_size=2)
  config.optim.update(warmup_steps=0, lambda_learning_rate=5e-2)
  config.sample.update(prompt="def ", length=4)
  _, state = training.build(config)
  windows = np.random.default_rng(0).integers(0, 256, (2, 9)).astype(np.int32)
  step = jax.jit(steps.train_step)
  first, out = step(state, windows, steps.dropout_key(0))
  before, after = (q["trunk"]["block_0"]["attention"]["log_lambda"] for q in (state.params, first.params))
  # Adam's first step moves each parameter by about its learning rate whatever the gradient's size: lam moved
  # by exp(+-0.05) per head, so it had a nonzero gradient through the registered metric.
  np.testing.assert_allclose(np.abs(after - before), 5e-2, rtol=1e-3)
  losses, new = [float(out["loss"])], first
  for i in range(1, 3):
    new, out = step(new, windows, steps.dropout_key(i))
    losses.append(float(out["loss"]))
  assert all(np.isfinite(losses)) and losses[-1] < losses[0]


def test_user_metric_backward_holds_no_n_m_d_tensor():
  n, d = 512, 64
  spec = jax.ShapeDtypeStruct((n, d), jnp.float32)
  for name in ("test_huber", "test_max_square"):
    grad = jax.grad(lambda x, y: jnp.sum(M.get(name)(x, y)), (0, 1))
    temp = jax.jit(grad).lower(spec, spec).compile().memory_analysis().temp_size_in_bytes
    # One [N, M, D] float32 tensor is 64 MiB here; the loops keep a few [N, M] arrays (1 MiB each).
    assert temp < n * n * d * 4 / 8, (name, temp / 2**20)


# ------------------------------------------------------------------------------------------------------------
# Registration errors.


def test_registration_errors_name_the_field():
  with pytest.raises(TypeError, match="Elementwise: phi must be a callable"):
    M.Elementwise(phi=3.0)
  with pytest.raises(ValueError, match="Elementwise: reduce must be one of 'sum', 'max'; got 'mean'"):
    M.Elementwise(phi=jnp.abs, reduce="mean")
  with pytest.raises(TypeError, match="Elementwise: root must be None or a callable"):
    M.Elementwise(phi=jnp.abs, root="sqrt")
  with pytest.raises(ValueError, match=r"Gram: terms must be"):
    M.Gram(pseudo_huber, terms=((0, 0),))
  with pytest.raises(ValueError, match=r"Metric\('tiles'\): block_q must be None or a positive int; got 0"):
    M.Metric("tiles", M.Elementwise(phi=jnp.abs), block_q=0)
  with pytest.raises(TypeError, match=r"Metric\('sim'\): similarity must be a bool"):
    M.Metric("sim", M.Elementwise(phi=jnp.abs), similarity="yes")
  with pytest.raises(ValueError, match="name='l1' is a shipped metric"):
    M.register(M.Metric("l1", M.Elementwise(phi=jnp.abs)))
  with pytest.raises(ValueError, match="name='test_huber' is already registered"):
    M.register(M.Metric("test_huber", M.Elementwise(phi=jnp.abs)))
  with pytest.raises(TypeError, match="must be a da.metrics.Metric record"):
    M.register("huber")
  with pytest.raises(ValueError, match=r"'not_elementwise': phi must be elementwise .* got shape \(2, 1\)"):
    M.register(M.Metric("not_elementwise", M.Elementwise(phi=lambda t: jnp.sum(t, axis=-1, keepdims=True))))
  with pytest.raises(ValueError, match=r"'gram_rows': the form must map x \[2, 3\] and y \[3, 3\] to \[2, 3\]"):
    M.register(M.Metric("gram_rows", M.Gram(lambda xx: xx, terms=((2, 0),))))
  with pytest.raises(ValueError, match="'log_abs' gives a non-finite value or gradient"):
    M.register(M.Metric("log_abs", M.Elementwise(phi=lambda t: jnp.log(jnp.abs(t)))))
  assert not {"not_elementwise", "gram_rows", "log_abs", "tiles"} & set(M.available())


def test_complex_inputs_are_refused_as_complex():
  z = np.ones((2, 3), np.complex64)
  with pytest.raises(TypeError, match="complex inputs are not supported"):
    M.l1(z, np.ones((2, 3), np.float32))
  with pytest.raises(TypeError, match="complex inputs are not supported"):
    M.cosine(np.ones((2, 3), np.float32), z)


# ------------------------------------------------------------------------------------------------------------
# Exactness.


@pytest.mark.parametrize("implementation", ["reference", "blockwise"])
@pytest.mark.parametrize("metric", ["sqeuclidean", "cosine", "dot", "test_pseudo_huber"])
def test_gram_score_matmuls_run_at_highest_precision(metric, implementation):
  q = jax.ShapeDtypeStruct((1, 16, 2, 8), jnp.float32)
  fn = lambda q, k, v: da.distance_attention(q, k, v, metric=metric, precision=jax.lax.Precision.DEFAULT,
                                             implementation=implementation)
  text = jax.jit(jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v)), (0, 1, 2))).lower(q, q, q).as_text()
  dots = [line for line in text.splitlines() if "dot_general" in line]
  highest = [line for line in dots if "HIGHEST" in line]
  # Forward and backward score matmuls (q.k and its VJP) carry HIGHEST; weights @ v and its VJP keep the
  # caller's DEFAULT, so both kinds appear.
  assert highest and len(highest) < len(dots), "\n".join(dots)
  assert all("DEFAULT" in line or "HIGHEST" in line or "precision" not in line for line in dots)


def _near_pairs(r, d=64, seed=20):
  """Queries x and keys y = x + delta with |delta| = r |x|, and far keys besides."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((4, d))
  delta = rng.standard_normal((4, d))
  delta *= r * np.linalg.norm(x, axis=-1, keepdims=True) / np.linalg.norm(delta, axis=-1, keepdims=True)
  y = np.concatenate([x + delta, rng.standard_normal((3, d))])
  return x.astype(np.float32), y.astype(np.float32)


def _lp_grad_np(x, y, p):
  """Float64 d/dx of sum_{n,m} lp(x_n, y_m): sign(t) |t|^(p-1) / d^(p-1), summed over keys."""
  t = x[:, None, :].astype(np.float64) - y[None, :, :].astype(np.float64)
  d = (np.abs(t) ** p).sum(-1, keepdims=True) ** (1 / p)
  return (np.sign(t) * np.abs(t) ** (p - 1) / d ** (p - 1)).sum(1)


@pytest.mark.parametrize("r", [1e-1, 1e-2, 1e-3])
@pytest.mark.parametrize("metric,p", [("l2", 2.0), ("lp", 4.0), ("lp", 6.0)])
def test_nearly_equal_vectors_get_float32_accurate_gradients(metric, p, r):
  # Bound: max |grad - oracle| <= 1e-5 * max |oracle|. The elementwise forms difference x - y exactly (Sterbenz:
  # x and y within a factor 2 of each other), so only the D-term reduction and the powers round, a few eps
  # times log D. A gram form would subtract terms of size |x|^2 and leave eps |x|^2 / (2 |x - y|^2) ~ 5% at
  # r = 1e-3; the shipped l2 and lp are elementwise for this reason.
  x, y = _near_pairs(r)
  got = jax.grad(lambda a: jnp.sum(M.get(metric)(a, y, **({"p": p} if metric == "lp" else {}))))(x)
  want = _lp_grad_np(x, y, p)
  assert np.max(np.abs(np.asarray(got, np.float64) - want)) <= 1e-5 * np.max(np.abs(want))


@pytest.mark.parametrize("name", one_fast(["l1", "l2", "sqeuclidean", "lp", "cosine", "chebyshev", "dot",
                                           "test_huber", "test_pseudo_huber"], "test_huber"))
def test_bfloat16_equals_float32_on_the_same_rounded_inputs(name):
  x = jnp.asarray(normal(30, (8, 16), np.float32), jnp.bfloat16)
  y = jnp.asarray(normal(31, (9, 16), np.float32), jnp.bfloat16)
  kwargs = {"p": 3.0} if name == "lp" else {}
  f = lambda a, b: M.get(name)(a, b, **kwargs)
  got, want = f(x, y), f(x.astype(jnp.float32), y.astype(jnp.float32))
  assert got.dtype == jnp.bfloat16
  # Reductions accumulate in float32, so the only difference is the final rounding to bfloat16: half an ulp,
  # 2^-9 relative; the absolute floor covers values near 0 (dot, cosine) at the scale of the largest value.
  want = np.asarray(want)
  np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=2**-8, atol=2**-8 * np.abs(want).max())
  w = normal(32, (8, 9), np.float32)
  grads16 = jax.grad(lambda a, b: jnp.sum(f(a, b).astype(jnp.float32) * w), (0, 1))(x, y)
  grads32 = jax.grad(lambda a, b: jnp.sum(f(a, b) * w), (0, 1))(x.astype(jnp.float32), y.astype(jnp.float32))
  for g16, g32 in zip(grads16, grads32):
    assert g16.dtype == jnp.bfloat16
    g32 = np.asarray(g32)
    # The bfloat16 cotangent entering the backward (the value's dtype) is rounded to 2^-9 relative, and the
    # gradient to bfloat16 once more: 2^-7 relative, floored at the largest entry's scale.
    np.testing.assert_allclose(np.asarray(g16, np.float32), g32, rtol=2**-7, atol=2**-7 * np.abs(g32).max())
