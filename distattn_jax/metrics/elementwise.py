"""Elementwise forms ``root(reduce_d phi(x_d - y_d))`` with one memory-lean derivative for all of them, in
both modes.

The forward pass loops over the D features, each step adding (or maxing) one ``[..., N, M]`` slice of
``phi(t)``; the backward pass loops over keys and over queries, recomputing the differences from ``x`` and
``y``. Neither ever holds a ``[..., N, M, D]`` tensor. (Loops of elementwise updates are also what XLA's CPU
backend runs fastest: fusing a broadcast difference into a reduction over its last axis is up to 100x slower
there.)

The gradient of a pair's score is ``root'(s) * phi'(t_d)``, summed over pairs: ``phi'`` and ``root'`` come from
``jax.jvp`` of the form's own functions, so a registered form needs no hand-written derivative. Under
``reduce="max"`` the ``c`` features tying for the maximum each get ``1/c`` of the pair's cotangent. For the
generic form of a parametric metric (a traced, learned ``p``), ``d/dp`` is ``root_p(s) + root'(s) sum_d
phi_p(t_d)``, again from ``jax.jvp``, accumulated in the same key loop.

Forward mode (``jax.jvp``, ``jacfwd``, ``linearize``, ``hessian``): the form is a ``jax.custom_jvp`` whose
tangent, the same derivative applied to ``(dx, dy, dp)``, is accumulated in a loop over the features like the
forward pass. That tangent map is a :func:`distattn_jax.autodiff.linear_call` whose transpose is the key and
query loops above, so reverse mode, which JAX derives by transposing the tangent map, runs exactly the loops
(and holds exactly the residuals ``x``, ``y``, ``p``, ``s``) it ran as a ``custom_vjp``: the compiled gradient
has the same operations and temporaries. Second derivatives differentiate these loops with JAX's autodiff.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from distattn_jax import autodiff
from distattn_jax.metrics import numerics, record

Array = jax.Array


def _pair_diff(xd: Array, yd: Array) -> Array:
  return xd[..., :, None] - yd[..., None, :]


def _reduce_over_features(step: Callable, init: Any, x: Array, y: Array) -> Any:
  """``carry = step(carry, t_d)`` for ``t_d = x[..., :, d, None] - y[..., None, :, d]`` and d = 0 .. D-1."""
  def body(carry, xy):
    return step(carry, _pair_diff(*xy)), None
  return jax.lax.scan(body, init, (jnp.moveaxis(x, -1, 0), jnp.moveaxis(y, -1, 0)))[0]


def _pair_zeros(x: Array, y: Array) -> Array:
  shape = np.broadcast_shapes(x.shape[:-2], y.shape[:-2]) + (x.shape[-2], y.shape[-2])
  return jnp.zeros(shape, jnp.result_type(x, y))


def _pair_cotangents(weight: Callable, x: Array, y: Array, pair_values: tuple[Array, ...],
                     key_extra: Callable | None = None) -> tuple[Array, Array, Array | None]:
  """Cotangents ``dx[..., n, :] = sum_m w(x_n - y_m)`` and ``dy[..., m, :] = -sum_n w(x_n - y_m)``, where
  ``w = weight(t, *values)`` is elementwise in the difference ``t [D]`` and the pair's ``values[..., n, m]``.

  Two loops accumulate elementwise, one over keys (for dx) and one over queries (for dy), so nothing of size
  ``N x M x D`` exists and no reduction over an inner axis is needed (XLA's CPU backend runs those several
  times slower than elementwise updates). ``key_extra(t, *values)``, when given, is summed in the key loop and
  returned whole (used for the gradient of a learned ``p``).
  """
  batch = np.broadcast_shapes(x.shape[:-2], y.shape[:-2])
  dtype = jnp.result_type(x, y)

  def over_keys(carry, sliced):
    dx, extra = carry
    y_m, values = sliced
    t = x - y_m[..., None, :]
    values = tuple(v[..., :, None] for v in values)
    if key_extra is not None:
      extra = extra + jnp.sum(key_extra(t, *values))
    return (dx + weight(t, *values), extra), None

  key_slices = (jnp.moveaxis(y, -2, 0), tuple(jnp.moveaxis(v, -1, 0) for v in pair_values))
  init = (jnp.zeros(batch + x.shape[-2:], dtype), jnp.zeros((), dtype))
  (dx, extra), _ = jax.lax.scan(over_keys, init, key_slices)

  def over_queries(dy, sliced):
    x_n, values = sliced
    t = x_n[..., None, :] - y
    return dy - weight(t, *(v[..., :, None] for v in values)), None

  query_slices = (jnp.moveaxis(x, -2, 0), tuple(jnp.moveaxis(v, -2, 0) for v in pair_values))
  dy, _ = jax.lax.scan(over_queries, jnp.zeros(batch + y.shape[-2:], dtype), query_slices)
  extra = extra if key_extra is not None else None
  return numerics.sum_to_shape(dx, x.shape), numerics.sum_to_shape(dy, y.shape), extra


def _slope(fn: Callable, u: Array, *params: Array) -> tuple[Array, Array]:
  """``fn(u, *params)`` and its elementwise derivative in ``u``."""
  return jax.jvp(lambda v: fn(v, *params), (u,), (jnp.ones_like(u),))


def _param_slope(fn: Callable, u: Array, params: tuple[Array, ...]) -> Array:
  """The derivative of ``fn(u, p)`` in ``p`` (one scalar parameter), elementwise."""
  return jax.jvp(lambda p: fn(u, p), params, (jnp.ones_like(params[0]),))[1]


def _tie_dtype(features: int):
  # The narrowest integer that holds a count up to D: less memory traffic per step (measured ~1.5x faster).
  return jnp.uint8 if features < 2**8 else jnp.uint16 if features < 2**16 else jnp.int32


def _scale(x: Array, y: Array) -> tuple[Array, Array]:
  """``(scale, 1 / scale)`` with ``scale = max_d |x_d - y_d|`` per pair (1 where it is 0), without gradient."""
  largest = _reduce_over_features(lambda m, t: jnp.maximum(m, jnp.abs(t)), _pair_zeros(x, y), x, y)
  safe = jax.lax.stop_gradient(jnp.where(largest == 0, 1.0, largest))
  return safe, 1.0 / safe


def _reduced(form: record.Elementwise, x: Array, y: Array, params: tuple[Array, ...], inv_scale) -> Array:
  """``reduce_d phi(t_d * inv_scale)`` over the features."""
  if inv_scale is None:
    phi = lambda t: form.phi(t, *params)
  else:
    phi = lambda t: form.phi(t * inv_scale, *params)
  if form.reduce == "sum":
    return _reduce_over_features(lambda acc, t: acc + phi(t), _pair_zeros(x, y), x, y)
  return _reduce_over_features(lambda m, t: jnp.maximum(m, phi(t)), _pair_zeros(x, y) - jnp.inf, x, y)


def _forward(form: record.Elementwise, x, y, params):
  scale, inv_scale = _scale(x, y) if form.rescale else (None, None)
  s = _reduced(form, x, y, params, inv_scale)
  value = s if form.root is None else form.root(s, *params)
  if scale is not None:
    value = scale * value
  return value, (s, scale, inv_scale)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _core(form: record.Elementwise, x: Array, y: Array, params: tuple[Array, ...]) -> Array:
  return _forward(form, x, y, params)[0]


@_core.defjvp
def _core_jvp(form: record.Elementwise, primals, tangents):
  x, y, params = primals
  value, (s, _, inv_scale) = _forward(form, x, y, params)
  # The tangent is a linear map of (dx, dy, dparams) computed by a feature loop (_tangent); JAX transposes it for
  # reverse mode, and its transpose is the key and query loops of _cotangents, so grad holds what it held as a
  # custom_vjp: x, y, p and the reduced value s (and the rescaling), never an [..., N, M, D] array.
  residuals = (x, y, params, s, inv_scale)
  tangent = autodiff.linear_call(functools.partial(_tangent, form), functools.partial(_cotangents, form),
                                 residuals, tangents)
  return value, tangent


def _tangent(form: record.Elementwise, res: tuple, lin: tuple) -> Array:
  """The tangent ``[..., N, M]`` of the value for tangents ``lin = (dx, dy, dparams)``, in one loop over the
  features (as the forward pass): ``root'(s) sum_d phi'(u_d) (dx_d - dy_d)``, under ``reduce="max"`` the sum
  over the features tying for the maximum divided by their count, plus for a traced ``p`` its share ``dp *
  scale (root_p(s) + root'(s) sum_d phi_p(u_d))``. Where ``root'`` is not finite the tangent is 0, as the
  cotangent is in :func:`_cotangents`."""
  x, y, params, s, inv_scale = res
  dx, dy, dparams = lin
  with_p = bool(params)

  def step(carry, sliced):
    x_d, y_d, dx_d, dy_d = sliced
    t = _pair_diff(x_d, y_d)
    u = t if inv_scale is None else t * inv_scale
    value, slope = _slope(form.phi, u, *params)
    d_pair = slope * _pair_diff(dx_d, dy_d)
    d_p = _param_slope(form.phi, u, params) if with_p else None
    if form.reduce == "max":
      tie = value == s
      d_pair = jnp.where(tie, d_pair, 0.0)
      d_p = None if d_p is None else jnp.where(tie, d_p, 0.0)
      carry["ties"] = carry["ties"] + tie.astype(carry["ties"].dtype)
    carry["d"] = carry["d"] + d_pair
    if with_p:
      carry["p"] = carry["p"] + d_p
    return carry, None

  zeros = _pair_zeros(x, y)
  init = {"d": zeros}
  if with_p:
    init["p"] = zeros
  if form.reduce == "max":
    init["ties"] = zeros.astype(_tie_dtype(x.shape[-1]))
  sliced = tuple(jnp.moveaxis(a, -1, 0) for a in (x, y, dx, dy))
  sums = jax.lax.scan(step, init, sliced)[0]
  d_s = sums["d"]
  d_phi_p = sums.get("p")
  if form.reduce == "max":
    shares = jnp.maximum(sums["ties"].astype(d_s.dtype), 1.0)
    d_s = d_s / shares
    d_phi_p = None if d_phi_p is None else d_phi_p / shares
  scale = None if inv_scale is None else 1.0 / inv_scale
  if with_p:
    # d/dp of scale * root(s(p), p), with scale the (constant) largest difference.
    d_p_sum = dparams[0] * d_phi_p
    d_s = d_s + (d_p_sum if scale is None else d_p_sum * scale)
  if form.root is None:
    return d_s
  _, root_slope = _slope(form.root, s, *params)
  finite = jnp.isfinite(root_slope)
  tangent = jnp.where(finite, jnp.where(finite, root_slope, 0.0) * d_s, 0.0)
  if with_p:
    root_p = dparams[0] * _param_slope(form.root, s, params)
    tangent = tangent + jnp.where(finite, root_p if scale is None else root_p * scale, 0.0)
  return tangent


def _cotangents(form: record.Elementwise, res: tuple, g: Array) -> tuple[Array, Array, tuple[Array, ...]]:
  """The transpose of :func:`_tangent`: ``(dx, dy, dparams)`` from the cotangent ``g [..., N, M]`` of the
  value, in a key loop (dx, and d/dp) and a query loop (dy)."""
  x, y, params, s, inv_scale = res
  dparams_pair = None
  if form.root is None:
    coefficient = g
  else:
    root_value, root_slope = _slope(form.root, s, *params)
    finite = jnp.isfinite(root_slope)
    coefficient = jnp.where(finite, g * jnp.where(finite, root_slope, 0.0), 0.0)
    if params:
      root_p = _param_slope(form.root, s, params)
      dparams_pair = jnp.sum(jnp.where(finite, g * root_p / (1.0 if inv_scale is None else inv_scale), 0.0))
  values = [coefficient]
  if inv_scale is not None:
    values.append(inv_scale)
  if form.reduce == "max":
    # Ties are counted in one loop over the features (s rides in the carry, which XLA's CPU backend runs
    # faster than reading it from outside the loop); the key and query loops then spread the shares.
    count_dtype = _tie_dtype(x.shape[-1])

    def count(carry, t):
      ties, s = carry
      u = t if inv_scale is None else t * inv_scale
      return ties + (form.phi(u, *params) == s).astype(count_dtype), s

    ties, _ = _reduce_over_features(count, (_pair_zeros(x, y).astype(count_dtype), s), x, y)
    values[0] = coefficient / jnp.maximum(ties.astype(coefficient.dtype), 1.0)
    values.append(s)

  def pair_coefficient(t, c, *rest):
    u = t if inv_scale is None else t * rest[0]
    value, slope = _slope(form.phi, u, *params)
    if form.reduce == "max":
      c = jnp.where(value == rest[-1], c, 0.0)
    return u, c, slope

  def weight(t, *vals):
    _, c, slope = pair_coefficient(t, *vals)
    return c * slope

  key_extra = None
  if params:
    def key_extra(t, *vals):
      u, c, _ = pair_coefficient(t, *vals)
      extra = c * _param_slope(form.phi, u, params)
      return extra if inv_scale is None else extra / vals[1]

  dx, dy, dparams = _pair_cotangents(weight, x, y, tuple(values), key_extra)
  if params:
    total = dparams + (0.0 if dparams_pair is None else dparams_pair)
    return dx, dy, (total.astype(params[0].dtype),)
  return dx, dy, ()




def evaluate(form: record.Elementwise, x: Array, y: Array, params: tuple[Array, ...] = ()) -> Array:
  """The form's value ``[..., N, M]`` in the accumulation dtype; ``params`` is ``()`` or ``(p,)``."""
  acc = numerics.accumulation_dtype(jnp.result_type(x, y))
  params = tuple(jnp.asarray(p, acc) for p in params)
  return _core(form, x.astype(acc), y.astype(acc), params)


# ------------------------------------------------------------------------------------------------------------
# Absolute values, powers and roots for the shipped forms.


@jax.custom_jvp
def symmetric_abs(t: Array) -> Array:
  """``|t|`` with derivative ``sign(t)`` and ``sign(0) = 0`` (the minimum-norm subgradient); ``jnp.abs``'s
  derivative at 0 is 1, which would make the gradient of a distance at zero distance depend on the sign
  convention rather than be 0."""
  return jnp.abs(t)


@symmetric_abs.defjvp
def _symmetric_abs_jvp(primals, tangents):
  (t,), (dt,) = primals, tangents
  return jnp.abs(t), jnp.sign(t) * dt


def positive_pow(u: Array, e: float | Array) -> Array:
  """``u ** e`` for ``u > 0`` (inf and NaN propagate as in ``pow``). ``exp2(e * log2(u))`` is within a few ulps
  of ``pow`` and about 4x faster on XLA's CPU backend (measured on 1M float32 values: 0.65 ms against 2.7 ms),
  which matters where lp raises every pair or every element to a power."""
  return jnp.exp2(e * jnp.log2(u))


def power(u: Array, e: float | Array) -> Array:
  """``u ** e`` for ``u >= 0`` with 0 (and derivative 0) at ``u == 0``; repeated multiplication for a static
  positive integer ``e``."""
  if isinstance(e, float) and e.is_integer() and e > 0:
    return jax.lax.integer_pow(u, int(e))
  zero = u == 0
  return jnp.where(zero, 0.0, positive_pow(jnp.where(zero, 1.0, u), e))


def safe_root(s: Array, p: float | Array) -> Array:
  """``s ** (1/p)`` for ``s >= 0`` with derivative 0 (not inf or NaN) at ``s == 0``; NaN stays NaN."""
  zero = s == 0
  safe = jnp.where(zero, 1.0, s)
  root = jnp.sqrt(safe) if isinstance(p, float) and p == 2.0 else positive_pow(safe, 1.0 / p)
  return jnp.where(zero, 0.0, root)
