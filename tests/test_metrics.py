"""Every metric against scipy.spatial.distance.cdist; gradients against finite differences and the documented
conventions at zero distance, zero vectors and ties."""

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

SCIPY_NAMES = {"l1": "cityblock", "l2": "euclidean", "sqeuclidean": "sqeuclidean", "cosine": "cosine",
               "chebyshev": "chebyshev"}
SHAPES = [(1, 1, 1), (5, 7, 3), (16, 9, 64)]
# float32: elementwise sums of D terms carry ~D*eps relative error (<= 1e-5 for D = 64); the matmul forms
# subtract terms of size |x|^2 + |y|^2 ~ 2D from d^2 ~ 2D, so a few eps * D of that magnitude: 1e-4 covers
# both with margin. float64: the same arguments with eps = 2e-16.
RTOL = {np.float32: 1e-4, np.float64: 1e-10}


def oracle(name, x, y, p=None):
  if name == "dot":
    return x.astype(np.float64) @ y.astype(np.float64).T
  if name == "lp":
    return cdist(x, y, "minkowski", p=p) if not math.isinf(p) else cdist(x, y, "chebyshev")
  return cdist(x.astype(np.float64), y.astype(np.float64), SCIPY_NAMES[name])


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", ["l1", "l2", "sqeuclidean", "cosine", "chebyshev", "dot"])
def test_metric_matches_scipy(name, shape, dtype):
  n, m, d = shape
  x, y = normal(0, (n, d), dtype), normal(1, (m, d), dtype)
  got = da.metrics.get(name)(x, y)
  assert got.dtype == dtype and got.shape == (n, m)
  # Absolute floor for values near 0 (cosine of nearly parallel vectors, dot near 0): eps * scale of the terms.
  atol = RTOL[dtype] * (d + 1)
  np.testing.assert_allclose(np.asarray(got, np.float64), oracle(name, x, y), rtol=RTOL[dtype], atol=atol)


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("p", [0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 7.0, math.inf])
def test_lp_matches_scipy_minkowski(p, dtype):
  x, y = normal(2, (6, 16), dtype), normal(3, (5, 16), dtype)
  got = da.metrics.lp(x, y, p=p)
  assert got.dtype == dtype
  np.testing.assert_allclose(np.asarray(got, np.float64), oracle("lp", x, y, p), rtol=RTOL[dtype])


@pytest.mark.usefixtures("x64")
def test_lp_special_orders_equal_named_metrics():
  x, y = normal(4, (7, 10)), normal(5, (6, 10))
  chex.assert_trees_all_close(da.metrics.lp(x, y, p=1.0), da.metrics.l1(x, y), rtol=1e-12)
  chex.assert_trees_all_close(da.metrics.lp(x, y, p=2.0), da.metrics.l2(x, y), rtol=1e-12)
  chex.assert_trees_all_close(da.metrics.lp(x, y, p=math.inf), da.metrics.chebyshev(x, y), rtol=1e-12)
  # A large finite p approaches chebyshev from above: ||t||_inf <= ||t||_p <= D^(1/p) ||t||_inf.
  big = np.asarray(da.metrics.lp(x, y, p=200.0))
  cheb = np.asarray(da.metrics.chebyshev(x, y))
  assert np.all(big >= cheb * (1 - 1e-12)) and np.all(big <= cheb * 10 ** (1 / 200) * (1 + 1e-12))


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("name", ["l1", "l2", "sqeuclidean", "cosine", "chebyshev", "lp", "dot"])
def test_batch_dimensions_broadcast(name):
  x, y = normal(6, (2, 1, 4, 5)), normal(7, (1, 3, 6, 5))
  got = np.asarray(da.metrics.get(name)(x, y))
  assert got.shape == (2, 3, 4, 6)
  for i in range(2):
    for j in range(3):
      np.testing.assert_allclose(got[i, j], oracle(name, x[i, 0], y[0, j], 2.0), rtol=1e-10, atol=1e-12)


@pytest.mark.usefixtures("x64")
def test_distances_are_nonnegative_and_zero_on_the_diagonal():
  # Large common offset: the matmul forms cancel ~1e4 against ~0 and must still clamp at 0.
  x = normal(8, (12, 32), np.float32) + 100.0
  for name in ("l1", "l2", "sqeuclidean", "cosine", "chebyshev", "lp"):
    d = np.asarray(da.metrics.get(name)(x, x))
    assert np.all(d >= 0), name
    # Centring makes the cancellation bound 4 eps |x - mean(x)|^2 (not 4 eps |x|^2 ~ 0.15) for sqeuclidean,
    # and its square root for l2; the elementwise metrics are exact on the diagonal.
    bound = 4 * 1.2e-7 * np.max(np.sum((x - x.mean(0)) ** 2, -1))
    allowed = {"sqeuclidean": bound, "l2": math.sqrt(bound), "lp": math.sqrt(bound)}  # lp's default p is 2
    assert np.all(np.diag(d) <= allowed.get(name, 1e-6)), (name, np.diag(d))


# ------------------------------------------------------------------------------------------------------------
# Gradients.


def _loss(name, p=2.0):
  fn = da.metrics.get(name)
  weights = normal(9, (64,))
  def loss(x, y):
    d = fn(x, y, p=p) if name == "lp" else fn(x, y)
    return jnp.sum(d * weights[: d.size].reshape(d.shape))
  return loss


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("name,p", [("l1", None), ("l2", None), ("sqeuclidean", None), ("cosine", None),
                                    ("chebyshev", None), ("dot", None), ("lp", 0.7), ("lp", 3.0),
                                    ("lp", 4.0), ("lp", 5.5)])
def test_gradients_match_finite_differences(name, p):
  x, y = normal(10, (4, 6)), normal(11, (5, 6))
  check_grads(_loss(name, p if p else 2.0), (x, y), order=1, modes=("rev",), eps=1e-6, atol=1e-6, rtol=1e-6)


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("name,p", [("l1", None), ("l2", None), ("sqeuclidean", None), ("chebyshev", None),
                                    ("lp", 1.5), ("lp", 3.0), ("lp", 4.0)])
def test_gradient_at_zero_distance_is_the_symmetric_difference(name, p):
  # At x == y every metric here has a kink whose central difference quotient is 0 in every direction, which is
  # exactly the documented convention (sign(0) = 0, gradient 0 at zero distance). Rows 0 and 2 are equal.
  x = normal(12, (3, 4))
  y = np.stack([x[0], normal(13, (4,)), x[2]])
  # Every metric here is elementwise or (sqeuclidean) smooth at the kink, so eps = 1e-4 resolves it in float64.
  check_grads(_loss(name, p if p else 2.0), (x, y), order=1, modes=("rev",), eps=1e-4, atol=1e-6, rtol=1e-6)
  gx, gy = jax.grad(lambda a, b: da.metrics.get(name)(a, b, **({"p": p} if p else {}))[0, 0], (0, 1))(x, y)
  assert np.all(np.asarray(gx) == 0) and np.all(np.asarray(gy) == 0), (gx, gy)


@pytest.mark.usefixtures("x64")
def test_chebyshev_ties_share_the_gradient_equally():
  x = np.array([[1.0, 0.0, 0.2]])
  y = np.array([[0.0, 1.0, 0.0]])  # |x - y| = (1, 1, 0.2): coordinates 0 and 1 tie for the maximum
  gx, gy = jax.grad(lambda a, b: da.metrics.chebyshev(a, b).sum(), (0, 1))(x, y)
  np.testing.assert_allclose(gx, [[0.5, -0.5, 0.0]])
  np.testing.assert_allclose(gy, [[-0.5, 0.5, 0.0]])
  # For a two-way tie the central difference is the mean of the one-sided slopes, which equal sharing matches.
  check_grads(lambda a: da.metrics.chebyshev(a, y).sum(), (x,), order=1, modes=("rev",), eps=1e-6)


@pytest.mark.usefixtures("x64")
def test_cosine_of_a_zero_vector_is_one_with_zero_gradient():
  x = np.array([[0.0, 0.0, 0.0], [1.0, 2.0, 3.0]])
  y = np.array([[3.0, -1.0, 2.0], [0.0, 0.0, 0.0]])
  d = np.asarray(da.metrics.cosine(x, y))
  np.testing.assert_allclose(d[0], [1.0, 1.0])
  np.testing.assert_allclose(d[:, 1], [1.0, 1.0])
  gx, gy = jax.grad(lambda a, b: da.metrics.cosine(a, b).sum(), (0, 1))(x, y)
  assert np.all(np.isfinite(gx)) and np.all(np.isfinite(gy))
  np.testing.assert_array_equal(gx[0], 0.0)
  np.testing.assert_array_equal(gy[1], 0.0)


@pytest.mark.slow
@pytest.mark.usefixtures("x64")
def test_lp_gradient_with_respect_to_a_learned_p():
  x, y = normal(14, (4, 5)), normal(15, (3, 5))
  check_grads(lambda p: jnp.sum(da.metrics.lp(x, y, p=p) * normal(16, (4, 3))), (np.float64(2.7),), order=1,
              modes=("rev",), eps=1e-6, atol=1e-7, rtol=1e-6)
  check_grads(lambda a, b: jnp.sum(da.metrics.lp(a, b, p=jnp.float64(1.7))), (x, y), order=1, modes=("rev",),
              eps=1e-6)
  # With p traced, equal vectors still give a finite, zero gradient for x, y and p.
  grads = jax.grad(lambda a, p: da.metrics.lp(a[:1], a[:1], p=p).sum(), (0, 1))(x, jnp.float64(3.0))
  assert all(np.all(np.asarray(g) == 0) for g in grads)


def test_bfloat16_large_magnitudes_stay_finite():
  x = jnp.asarray(normal(17, (8, 16), np.float32, scale=1e4), jnp.bfloat16)
  y = jnp.asarray(normal(18, (9, 16), np.float32, scale=1e4), jnp.bfloat16)
  for name in da.metrics.available():
    for p in ((2.0, 3.0, 9.0) if name == "lp" else (None,)):
      f = lambda a, b: da.metrics.get(name)(a, b, **({"p": p} if p else {})).astype(jnp.float32).sum()
      value, grads = jax.value_and_grad(f, (0, 1))(x, y)
      assert np.isfinite(float(value)), (name, p)
      assert all(np.all(np.isfinite(np.asarray(g, np.float32))) for g in grads), (name, p)


# ------------------------------------------------------------------------------------------------------------
# Registry and errors.


def test_registry_names_and_enum():
  assert da.metrics.available() == ("l1", "l2", "sqeuclidean", "lp", "cosine", "chebyshev", "weighted_l1",
                                   "weighted_l2", "dot")
  assert all(da.metrics.get(name) is getattr(da.metrics, name) for name in da.metrics.available())
  assert [m.value for m in da.DistanceType] == list(da.metrics.available())
  x, y = normal(19, (3, 4), np.float32), normal(20, (2, 4), np.float32)
  np.testing.assert_array_equal(da.metrics.get(da.DistanceType.L1)(x, y), da.metrics.l1(x, y))


def test_unknown_metric_lists_the_valid_names():
  with pytest.raises(ValueError, match=r"metric='manhattan'.*l1, l2, sqeuclidean, lp, cosine, chebyshev, "
                                       r"weighted_l1, weighted_l2, dot"):
    da.metrics.get("manhattan")


@pytest.mark.parametrize("p", [0.0, -1.0, float("nan")])
def test_invalid_p_is_a_value_error(p):
  with pytest.raises(ValueError, match=r"p must be > 0.*got " + ("nan" if math.isnan(p) else str(p))):
    da.metrics.lp(np.ones((2, 3), np.float32), np.ones((2, 3), np.float32), p=p)


def test_bad_metric_inputs_name_the_argument():
  with pytest.raises(TypeError, match="x must be a floating-point array; got dtype int32"):
    da.metrics.l1(np.ones((2, 3), np.int32), np.ones((2, 3), np.float32))
  with pytest.raises(ValueError, match=r"same last \(feature\) dimension"):
    da.metrics.l2(np.ones((2, 3), np.float32), np.ones((2, 4), np.float32))
  with pytest.raises(ValueError, match="batch dimensions of x and y do not broadcast"):
    da.metrics.cosine(np.ones((2, 2, 3), np.float32), np.ones((3, 2, 3), np.float32))


@pytest.mark.parametrize("dim", [16, 64, 128])
def test_default_lambda_matches_closed_forms(dim):
  # Independent derivations (see DistanceBasedAttention): sqeuclidean 1/sqrt(6), cosine D, dot 1,
  # l1 1/sqrt(2 - E m(q)^2) with the expectation by quadrature, l2 2 sqrt(D/3) (delta method, O(1/D) bias).
  from scipy import integrate, stats
  m = lambda q: q * (2 * stats.norm.cdf(q) - 1) + 2 * stats.norm.pdf(q)
  em2 = integrate.quad(lambda q: m(q) ** 2 * stats.norm.pdf(q), -12, 12)[0]
  expected = {"sqeuclidean": 1 / math.sqrt(6), "cosine": dim, "dot": 1.0, "l1": 1 / math.sqrt(2 - em2),
              "l2": 2 * math.sqrt(dim / 3)}
  for name, value in expected.items():
    # Monte-Carlo error of the spread ratio is about 1% (512 queries, 1024 keys each); delta-method bias ~1/D.
    tol = 0.02 + (2.0 / dim if name == "l2" else 0.0)
    assert abs(da.initializers.default_lambda(name, dim) / value - 1) < tol, (name, dim)


def test_default_lambda_equalises_the_logit_spread_on_fresh_samples():
  dot_spread = da.initializers.logit_spread("dot", 64, seed=123)
  for name in da.metrics.available():
    lam = da.initializers.default_lambda(name, 64, 3.0)
    spread = da.initializers.logit_spread(name, 64, p=3.0, lam=lam, seed=123)  # a seed the default never saw
    assert abs(spread / dot_spread - 1) < 0.03, (name, spread, dot_spread)


@pytest.mark.parametrize("name,p", [("l1", None), ("chebyshev", None), ("lp", 3.0), ("lp", 2.5), ("lp", "traced")])
def test_gradient_memory_is_linear_not_n_m_d(name, p):
  # jax.grad of a loss on the distance matrix: the temporaries must stay a few [N, M] arrays, far below the
  # [N, M, D] difference tensor plain autodiff would keep (here 1024 x 1024 x 64 x 4 bytes = 256 MiB).
  n, d = 1024, 64
  spec = jax.ShapeDtypeStruct((n, d), jnp.float32)
  if p == "traced":
    loss = lambda x, y, q: jnp.sum(da.metrics.lp(x, y, p=q))
    args = (spec, spec, jax.ShapeDtypeStruct((), jnp.float32))
  else:
    loss = lambda x, y: jnp.sum(da.metrics.get(name)(x, y, **({"p": p} if p else {})))
    args = (spec, spec)
  compiled = jax.jit(jax.grad(loss, argnums=tuple(range(len(args))))).lower(*args).compile()
  temp = compiled.memory_analysis().temp_size_in_bytes
  # Measured: 1 (l1) to 8 (traced p: the pair cotangent, 1/scale, their key-major copies, s) [N, M] arrays;
  # 10 leaves margin and is still 6x below one [N, M, D] tensor.
  assert temp <= 10 * n * n * 4, (name, p, temp / 2**20)
