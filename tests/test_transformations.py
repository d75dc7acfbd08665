"""Every JAX transformation through the memory-lean derivatives: the elementwise metric forms first, against JAX's
autodiff of a plain float64 formula.

Tolerances: in float64 the forms and the plain formula round differently (a loop over features against a
vectorised sum, a root through exp2/log2 against ``**``), a few ulps per operation on values of order 1, so
derivatives agree to about 1e-14 relative; 1e-8 leaves six orders of magnitude for the accumulation over
pairs and features while still catching any wrong term (a dropped tie share or d/dp term is O(1)).
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import distattn_jax as da
from conftest import normal

M = da.metrics
RTOL = 1e-8


def huber(t):
  a = M.elementwise.symmetric_abs(t)
  return jnp.where(a <= 1.0, 0.5 * t * t, a - 0.5)


USER = "test_transformations_huber"


@pytest.fixture(scope="module", autouse=True)
def user_metric():
  M.register(M.Metric(USER, M.Elementwise(phi=huber)), overwrite=True)
  yield
  M.unregister(USER)


def plain_metric(name, x, y, p):
  """The distance from the broadcast differences ``[..., N, M, D]``, differentiated by plain autodiff."""
  t = x[..., :, None, :] - y[..., None, :, :]
  a = jnp.abs(t)
  if name == "l1":
    return a.sum(-1)
  if name == "chebyshev":
    return a.max(-1)
  if name == "lp":
    return (a ** p).sum(-1) ** (1.0 / p)
  return jnp.where(a <= 1.0, 0.5 * t * t, a - 0.5).sum(-1)


def lean_metric(name, x, y, p):
  return M.get(name)(x, y, p=p) if name == "lp" else M.get(name)(x, y)


def assert_close(actual, expected, rtol=RTOL):
  """Each leaf within ``rtol`` of the largest magnitude of its expected value."""
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
    scale = float(np.max(np.abs(e))) or 1.0
    chex.assert_trees_all_close(a, e, atol=rtol * scale, rtol=0.0)


@pytest.fixture
def pair(x64):
  # Odd sizes and a batch axis that broadcasts (2 against 1); random values, so no distance is 0 and no
  # feature difference ties (where plain autodiff's conventions differ from the forms' documented ones).
  del x64
  return (jnp.asarray(normal(0, (2, 5, 3))), jnp.asarray(normal(1, (1, 4, 3))), jnp.float64(3.0),
          jnp.asarray(normal(2, (2, 5, 4))))


@pytest.mark.parametrize("name", ["l1", "lp", USER])
def test_metric_forward_mode_equals_plain_autodiff(name, pair):
  x, y, p, w = pair
  tangents = (jnp.asarray(normal(3, x.shape)), jnp.asarray(normal(4, y.shape)), jnp.float64(0.7))
  f_lean = jax.jit(lambda x, y, p: lean_metric(name, x, y, p))
  f_plain = lambda x, y, p: plain_metric(name, x, y, p)  # noqa: E731
  (value, tangent), (value_0, tangent_0) = (jax.jvp(f, (x, y, p), tangents) for f in (f_lean, f_plain))
  assert_close(value, value_0)
  assert_close(tangent, tangent_0)
  # linearize evaluates the same tangent map, and vmapped (jacfwd) it is the Jacobian.
  _, f_lin = jax.linearize(f_lean, x, y, p)
  assert_close(f_lin(*tangents), tangent_0)
  assert_close(jax.jacfwd(f_lean, argnums=(0, 2))(x, y, p), jax.jacfwd(f_plain, argnums=(0, 2))(x, y, p))


@pytest.mark.parametrize("name", ["chebyshev"])
def test_metric_second_order_equals_plain_autodiff(name, pair):
  x, y, p, w = pair
  argnums = (0, 1, 2) if name == "lp" else (0, 1)
  loss = lambda f: lambda x, y, p: jnp.sum(jnp.sin(f(name, x, y, p)) * w)  # noqa: E731
  hessian = lambda f: jax.jit(jax.hessian(loss(f), argnums))(x, y, p)  # noqa: E731
  assert_close(hessian(lean_metric), hessian(plain_metric))

  # Forward over reverse: the Hessian-vector product of a gradient taken through the transposed tangent map.
  def hvp(f):
    grad = jax.grad(loss(f), argnums)
    return jax.jit(lambda x, y, p: jax.jvp(grad, (x, y, p), (jnp.ones_like(x), -y, jnp.float64(0.3))))(x, y, p)

  assert_close(hvp(lean_metric), hvp(plain_metric))


def test_metric_derivatives_never_hold_pairs_times_features():
  # Compiled temporaries of jit(grad) and jit(jvp) of l1 at N = M = 256, D = 64 in float32: the [N, M, D]
  # difference tensor plain autodiff would hold is 16 MiB; the loops hold a few [N, M] arrays (256 KiB each).
  n, d = 256, 64
  x = jax.ShapeDtypeStruct((n, d), jnp.float32)
  loss = lambda x, y: jnp.sum(M.l1(x, y))  # noqa: E731
  forward = lambda x, y: jax.jvp(loss, (x, y), (x, y))  # noqa: E731
  pairs_by_features = n * n * d * 4
  for fn in (jax.grad(loss, (0, 1)), forward):
    temp = jax.jit(fn).lower(x, x).compile().memory_analysis().temp_size_in_bytes
    assert temp < pairs_by_features / 4, (fn, temp)
