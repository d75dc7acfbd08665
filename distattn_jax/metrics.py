"""Pairwise distance functions and their registry.

Every function maps ``x [..., N, D]`` and ``y [..., M, D]`` to ``[..., N, M]``; the leading (batch) dimensions
broadcast against each other. Distances are ``>= 0``; ``dot`` is the similarity ``x . y`` that standard
attention uses and rides in the same registry as the baseline.

Precision: inputs stay in their dtype, every reduction accumulates in at least float32 (float64 inputs stay
float64), and the public functions return the inputs' dtype. :func:`score` returns the signed attention score
(``-distance`` or ``+dot``) in the accumulation dtype, for the kernels.

Memory: ``sqeuclidean``, ``l2``, ``cosine``, ``dot`` and ``lp`` with even integer ``p <= 8`` use matmul forms
(``|x|^2 + |y|^2 - 2 x.y`` and its binomial generalisation into ``p - 1`` matmuls), clamped so no distance is
negative, after subtracting the mean key from both sides (exact for a translation-invariant distance, and it
keeps a large common offset from cancelling). ``l1``, ``chebyshev`` and the other ``lp`` reduce elementwise; under ``jit`` XLA fuses the reduction, and
their custom VJPs recompute the differences in the backward pass instead of saving a ``[..., N, M, D]`` tensor.
The matmul forms still lose relative accuracy for nearly equal vectors: ``d^p`` carries an absolute error of
about ``eps * sum_k C(p, k) |x - c|^(p-k) |y - c|^k``, so in float32 ``l2`` resolves distances down to ~1e-3
of the vectors' norms and the ``p = 4`` expansion down to ~2e-2 (``eps^(1/p)``). Nearly equal keys get nearly
equal, maximal logits either way; that is the price of never forming the differences.

Gradient conventions (finite everywhere):

* ``l1``: ``d|t|/dt = sign(t)`` with ``sign(0) = 0``, the minimum-norm subgradient.
* ``l2`` and ``lp``: the gradient with respect to either argument is 0 at zero distance. For ``lp`` with
  ``p < 1`` a coordinate whose difference is exactly 0 contributes 0 (its true partial derivative is infinite).
* ``chebyshev``: the coordinates that tie for the maximum share the gradient equally (JAX's rule for ``max``);
  ``sign(0) = 0`` as for ``l1``, so equal vectors get gradient 0.
* ``cosine``: ``cosine(x, y) = 1 - x.y / (|x| |y|)``; a zero vector has similarity 0 with everything (distance 1)
  and receives gradient 0.
* ``lp`` with a traced (learnable) ``p``: ``d lp / dp`` is exact, ``lp/p * sum_k u_k^p log u_k`` with
  ``u = |x - y| / lp``, and 0 at zero distance.
"""

from __future__ import annotations

import enum
import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


class DistanceType(str, enum.Enum):
  """The names of the registered metrics; a member can be passed anywhere a metric name is accepted."""

  L1 = "l1"
  L2 = "l2"
  SQEUCLIDEAN = "sqeuclidean"
  LP = "lp"
  COSINE = "cosine"
  CHEBYSHEV = "chebyshev"
  DOT = "dot"

  def __str__(self) -> str:
    return self.value


# lp with an even integer p up to this order uses the binomial matmul expansion; beyond it the expansion's
# cancellation (terms of size C(p, p/2) |x|^p) swamps float32, so the elementwise path is used instead.
MAX_EVEN_P_FOR_MATMUL = 8
# lp with an integer p up to this order is computed with repeated multiplication and no rescaling: |x - y|^p
# stays far inside float32's range for any |x - y| < 1e8.
MAX_UNSCALED_INTEGER_P = 4


def available() -> tuple[str, ...]:
  """Names of every registered metric, distances first and the ``dot`` baseline last."""
  return tuple(m.value for m in DistanceType)


def canonical_name(metric: str | DistanceType, argname: str = "metric") -> str:
  """Returns the registry name of ``metric``, or raises ValueError listing the valid names."""
  if isinstance(metric, DistanceType):
    return metric.value
  if isinstance(metric, str) and metric in _REGISTRY:
    return metric
  raise ValueError(f"{argname}={metric!r} is not a registered metric; valid names: {', '.join(available())}")


def get(metric: str | DistanceType) -> Callable[..., Array]:
  """The pairwise function registered under ``metric`` (``get('lp')`` takes ``p=`` as a keyword)."""
  return _REGISTRY[canonical_name(metric)]


def check_p(p: Any, argname: str = "p") -> float | Array:
  """Validates the lp order: a concrete ``p`` must be a positive number (``inf`` allowed); NaN or ``p <= 0`` is
  a ValueError. A traced ``p`` (learned) is returned as a float32-or-wider scalar array and is not checked."""
  value = concrete_value(p)
  if value is None:
    p = jnp.asarray(p)
    if p.ndim != 0:
      raise ValueError(f"{argname} must be a scalar; got an array of shape {p.shape}")
    if not jnp.issubdtype(p.dtype, jnp.floating):
      raise TypeError(f"{argname} must be a float; got dtype {p.dtype}")
    return p
  if value.ndim != 0:
    raise ValueError(f"{argname} must be a scalar; got an array of shape {value.shape}")
  if value.dtype == bool or not np.issubdtype(value.dtype, np.number):
    raise TypeError(f"{argname} must be a positive number; got {p!r}")
  p = float(value)
  if math.isnan(p) or p <= 0:
    raise ValueError(f"{argname} must be > 0 (inf allowed); got {p}")
  return p


# ------------------------------------------------------------------------------------------------------------
# Argument checks and dtype rules.


def concrete_value(x: Any) -> np.ndarray | None:
  """``x`` as a numpy array when its value is known at trace time, else None."""
  if isinstance(x, jax.core.Tracer):
    return None
  try:
    return np.asarray(x)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return None


def accumulation_dtype(dtype: Any) -> jnp.dtype:
  """The dtype reductions use for inputs of ``dtype``: float32 for 16-bit floats, else the dtype itself."""
  return jnp.promote_types(dtype, jnp.float32)


def _check_pair(x: Any, y: Any, fn: str) -> tuple[Array, Array]:
  x = jnp.asarray(x)
  y = jnp.asarray(y)
  for name, a in (("x", x), ("y", y)):
    if not jnp.issubdtype(a.dtype, jnp.floating):
      raise TypeError(f"{fn}: {name} must be a floating-point array; got dtype {a.dtype}")
    if a.ndim < 2:
      raise ValueError(f"{fn}: {name} must have shape [..., length, dim]; got shape {a.shape}")
  if x.shape[-1] != y.shape[-1]:
    raise ValueError(f"{fn}: x and y must have the same last (feature) dimension; got x.shape={x.shape}, "
                     f"y.shape={y.shape}")
  try:
    np.broadcast_shapes(x.shape[:-2], y.shape[:-2])
  except ValueError:
    raise ValueError(f"{fn}: the batch dimensions of x and y do not broadcast; got x.shape={x.shape}, "
                     f"y.shape={y.shape}") from None
  return x, y


def sum_to_shape(t: Array, shape: tuple[int, ...]) -> Array:
  """Sums a broadcast cotangent back to the shape of the primal it came from (leading or size-1 axes)."""
  if t.shape == shape:
    return t
  lead = t.ndim - len(shape)
  axes = tuple(range(lead)) + tuple(i + lead for i, s in enumerate(shape) if s == 1 and t.shape[i + lead] != 1)
  return jnp.sum(t, axis=axes, keepdims=True).reshape(shape)


def _positive_pow(u: Array, e: float | Array) -> Array:
  """``u ** e`` for ``u > 0`` (inf and NaN propagate as in ``pow``). ``exp2(e * log2(u))`` is within a few ulps
  of ``pow`` and about 4x faster on XLA's CPU backend (measured on 1M float32 values: 0.65 ms against 2.7 ms),
  which matters where lp raises every pair or every element to a power."""
  return jnp.exp2(e * jnp.log2(u))


def _safe_root(s: Array, p: float | Array) -> Array:
  """``s ** (1/p)`` for ``s >= 0`` with gradient 0 (not inf or NaN) at ``s == 0``; NaN stays NaN."""
  zero = s == 0
  safe = jnp.where(zero, 1.0, s)
  root = jnp.sqrt(safe) if isinstance(p, float) and p == 2.0 else _positive_pow(safe, 1.0 / p)
  return jnp.where(zero, 0.0, root)


def _inverse_norm(x: Array) -> Array:
  """``1 / |x|`` over the last axis, and 0 (with gradient 0) for a zero vector; NaN stays NaN."""
  sq = jnp.sum(x * x, axis=-1, keepdims=True)
  zero = sq == 0
  return jnp.where(zero, 0.0, jax.lax.rsqrt(jnp.where(zero, 1.0, sq)))


# ------------------------------------------------------------------------------------------------------------
# Matmul forms. Each takes inputs of any float dtype and returns the accumulation dtype.


def _matmul(x: Array, y: Array, precision: Any) -> Array:
  acc = accumulation_dtype(jnp.result_type(x, y))
  return jnp.einsum("...nd,...md->...nm", x, y, precision=precision, preferred_element_type=acc)


def _dot_acc(x: Array, y: Array, precision: Any = None) -> Array:
  return _matmul(x, y, precision)


def _centered(x: Array, y: Array) -> tuple[Array, Array]:
  """``x - c`` and ``y - c`` for ``c`` the mean of ``y`` over its rows, in the inputs' dtype.

  Translation-invariant distances are unchanged by any ``c``, so ``stop_gradient`` is exact; the matmul forms
  then cancel terms of size ``|x - c|^2`` instead of ``|x|^2``, which keeps inputs with a large common offset
  accurate (without it, equal vectors at offset 100 are 0.35 apart in float32).
  """
  acc = accumulation_dtype(jnp.result_type(x, y))
  c = jax.lax.stop_gradient(jnp.mean(y.astype(acc), axis=-2, keepdims=True))
  dtype = jnp.result_type(x, y)
  return (x.astype(acc) - c).astype(dtype), (y.astype(acc) - c).astype(dtype)


def _sqeuclidean_acc(x: Array, y: Array, precision: Any = None) -> Array:
  acc = accumulation_dtype(jnp.result_type(x, y))
  x, y = _centered(x, y)
  xx = jnp.sum(jnp.square(x.astype(acc)), axis=-1)[..., :, None]
  yy = jnp.sum(jnp.square(y.astype(acc)), axis=-1)[..., None, :]
  return jnp.maximum(xx + yy - 2.0 * _matmul(x, y, precision), 0.0)


def _l2_acc(x: Array, y: Array, precision: Any = None) -> Array:
  return _safe_root(_sqeuclidean_acc(x, y, precision), 2.0)


def _cosine_acc(x: Array, y: Array, precision: Any = None) -> Array:
  acc = accumulation_dtype(jnp.result_type(x, y))
  x = x.astype(acc)
  y = y.astype(acc)
  similarity = _matmul(x * _inverse_norm(x), y * _inverse_norm(y), precision)
  return jnp.clip(1.0 - similarity, 0.0, 2.0)


def _even_power_sum_acc(x: Array, y: Array, p: int, precision: Any) -> Array:
  """``sum_d (x_d - y_d)^p`` for even ``p`` as ``sum_k C(p, k) (-1)^k x^(p-k) . y^k``: ``p - 1`` matmuls."""
  acc = accumulation_dtype(jnp.result_type(x, y))
  x, y = _centered(x, y)
  x = x.astype(acc)
  y = y.astype(acc)
  total = jnp.sum(x**p, axis=-1)[..., :, None] + jnp.sum(y**p, axis=-1)[..., None, :]
  for k in range(1, p):
    total = total + ((-1) ** k * math.comb(p, k)) * _matmul(x ** (p - k), y**k, precision)
  return jnp.maximum(total, 0.0)


# ------------------------------------------------------------------------------------------------------------
# Elementwise reductions with custom VJPs. The forward pass loops over the D features, each step adding one
# [..., N, M] slice of differences; the backward pass loops over keys and over queries, recomputing the
# differences from x and y. Neither ever holds a [..., N, M, D] tensor. (Loops of elementwise updates are also
# what XLA's CPU backend runs fastest: fusing a broadcast difference into a reduction over its last axis is up
# to 100x slower there.)


def _feature_slices(x: Array, y: Array) -> tuple[Array, Array]:
  return jnp.moveaxis(x, -1, 0), jnp.moveaxis(y, -1, 0)


def _pair_diff(xd: Array, yd: Array) -> Array:
  return xd[..., :, None] - yd[..., None, :]


def _reduce_over_features(step: Callable, init: Any, x: Array, y: Array) -> Any:
  """``carry = step(carry, t_d)`` for ``t_d = x[..., :, d, None] - y[..., None, :, d]`` and d = 0 .. D-1."""
  def body(carry, xy):
    return step(carry, _pair_diff(*xy)), None
  return jax.lax.scan(body, init, _feature_slices(x, y))[0]


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
  return sum_to_shape(dx, x.shape), sum_to_shape(dy, y.shape), extra if key_extra is not None else None


def _power(u: Array, e: float | Array) -> Array:
  """``u ** e`` for ``u >= 0`` with 0 at ``u == 0`` (also for ``e <= 0``); repeated multiplication for a
  static positive integer ``e``."""
  if isinstance(e, float) and e.is_integer() and e > 0:
    return jax.lax.integer_pow(u, int(e))
  zero = u == 0
  return jnp.where(zero, 0.0, _positive_pow(jnp.where(zero, 1.0, u), e))


def _max_abs(x: Array, y: Array) -> Array:
  return _reduce_over_features(lambda m, t: jnp.maximum(m, jnp.abs(t)), _pair_zeros(x, y), x, y)


@jax.custom_vjp
def _l1_core(x: Array, y: Array) -> Array:
  return _reduce_over_features(lambda acc, t: acc + jnp.abs(t), _pair_zeros(x, y), x, y)


def _l1_fwd(x, y):
  return _l1_core(x, y), (x, y)


def _l1_bwd(res, g):
  x, y = res
  dx, dy, _ = _pair_cotangents(lambda t, g: g * jnp.sign(t), x, y, (g,))
  return dx, dy


_l1_core.defvjp(_l1_fwd, _l1_bwd)


@jax.custom_vjp
def _chebyshev_core(x: Array, y: Array) -> Array:
  return _max_abs(x, y)


def _chebyshev_fwd(x, y):
  d = _max_abs(x, y)
  return d, (x, y, d)


def _chebyshev_bwd(res, g):
  """Ties share equally: each of the ``c`` coordinates with ``|t_k| == d`` gets ``g / c``. One loop over the
  features counts the ties of every pair (``d`` rides in the loop's carry, which XLA's CPU backend runs faster
  than reading it from outside the loop); the key and query loops then spread the shares."""
  x, y, d = res
  features = x.shape[-1]
  # The narrowest integer that holds a count up to D: less memory traffic per step (measured ~1.5x faster).
  count_dtype = jnp.uint8 if features < 2**8 else jnp.uint16 if features < 2**16 else jnp.int32

  def count(carry, t):
    ties, d = carry
    return ties + (jnp.abs(t) == d).astype(count_dtype), d

  ties, _ = _reduce_over_features(count, (_pair_zeros(x, y).astype(count_dtype), d), x, y)
  share = g / jnp.maximum(ties.astype(g.dtype), 1.0)
  dx, dy, _ = _pair_cotangents(lambda t, d, share: jnp.where(jnp.abs(t) == d, share, 0.0) * jnp.sign(t), x, y,
                               (d, share))
  return dx, dy


_chebyshev_core.defvjp(_chebyshev_fwd, _chebyshev_bwd)


def _power_sum_root(x: Array, y: Array, p: float | Array) -> Array:
  """``(sum_d |x_d - y_d|^p)^(1/p)``. Integer ``p <= 4`` multiplies directly; otherwise the differences are
  divided by their maximum first so that ``|.|^p`` neither overflows nor underflows."""
  zeros = _pair_zeros(x, y)
  if isinstance(p, float) and p.is_integer() and p <= MAX_UNSCALED_INTEGER_P:
    return _safe_root(_reduce_over_features(lambda acc, t: acc + _power(jnp.abs(t), p), zeros, x, y), p)
  scale = jax.lax.stop_gradient(_max_abs(x, y))
  scale_zero = scale == 0
  safe_scale = jnp.where(scale_zero, 1.0, scale)
  total = _reduce_over_features(lambda acc, t: acc + _power(jnp.abs(t) / safe_scale, p), zeros, x, y)
  return jnp.where(scale_zero, 0.0, safe_scale * _positive_pow(total, 1.0 / p))


def _lp_cotangent_values(g: Array, d: Array) -> tuple[Array, Array]:
  """``(g, 1/d)`` with both 0 where ``d == 0`` (the documented zero gradient at zero distance)."""
  d_zero = d == 0
  return jnp.where(d_zero, 0.0, g), jnp.where(d_zero, 0.0, 1.0 / jnp.where(d_zero, 1.0, d))


def _lp_weight(p: float | Array) -> Callable:
  """``g * (|t| / d)^(p-1) sign(t)``; ``|t| / d`` is in [0, 1], so the power cannot overflow. For an integer
  ``p >= 2`` it is ``g * s |s|^(p-2)`` with ``s = t / d`` (fewer operations, the same value)."""
  if isinstance(p, float) and p.is_integer() and p >= 2:
    def integer_weight(t, g, inv_d):
      s = t * inv_d
      return g * s if p == 2 else g * s * _power(jnp.abs(s), p - 2.0)
    return integer_weight
  return lambda t, g, inv_d: g * _power(jnp.abs(t) * inv_d, p - 1.0) * jnp.sign(t)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _lp_static_core(x: Array, y: Array, p: float) -> Array:
  return _power_sum_root(x, y, p)


def _lp_static_fwd(x, y, p):
  d = _power_sum_root(x, y, p)
  return d, (x, y, d)


def _lp_static_bwd(p, res, g):
  x, y, d = res
  dx, dy, _ = _pair_cotangents(_lp_weight(p), x, y, _lp_cotangent_values(g, d))
  return dx, dy


_lp_static_core.defvjp(_lp_static_fwd, _lp_static_bwd)


@jax.custom_vjp
def _lp_traced_core(x: Array, y: Array, p: Array) -> Array:
  return _power_sum_root(x, y, p)


def _lp_traced_fwd(x, y, p):
  d = _power_sum_root(x, y, p)
  return d, (x, y, d, p)


def _lp_traced_bwd(res, g):
  x, y, d, p = res
  g_safe, inv_d = _lp_cotangent_values(g, d)

  def u_log_u(t, g, inv_d):
    # d lp / d p = lp / p * sum_k u_k^p log u_k with u = |t| / lp (module docstring); g * lp / p = g / (p inv_d).
    u = jnp.abs(t) * inv_d
    zero = u == 0
    safe = jnp.where(zero, 1.0, u)
    log_u = jnp.log(safe)
    return jnp.where(zero, 0.0, g * jnp.exp(p * log_u) * log_u / (p * jnp.where(inv_d == 0, 1.0, inv_d)))

  dx, dy, dp = _pair_cotangents(_lp_weight(p), x, y, (g_safe, inv_d), key_extra=u_log_u)
  return dx, dy, dp.astype(p.dtype)


_lp_traced_core.defvjp(_lp_traced_fwd, _lp_traced_bwd)


def _elementwise(core: Callable[..., Array], x: Array, y: Array, *args: Any) -> Array:
  acc = accumulation_dtype(jnp.result_type(x, y))
  return core(x.astype(acc), y.astype(acc), *args)


def _l1_acc(x: Array, y: Array, precision: Any = None) -> Array:
  del precision  # no matmul
  return _elementwise(_l1_core, x, y)


def _chebyshev_acc(x: Array, y: Array, precision: Any = None) -> Array:
  del precision
  return _elementwise(_chebyshev_core, x, y)


def _lp_acc(x: Array, y: Array, p: float | Array = 2.0, precision: Any = None) -> Array:
  if not isinstance(p, float):
    acc = accumulation_dtype(jnp.result_type(x, y))
    return _elementwise(_lp_traced_core, x, y, jnp.asarray(p, acc))
  if p == 1.0:
    return _l1_acc(x, y)
  if p == 2.0:
    return _l2_acc(x, y, precision)
  if math.isinf(p):
    return _chebyshev_acc(x, y)
  if p.is_integer() and int(p) % 2 == 0 and p <= MAX_EVEN_P_FOR_MATMUL:
    return _safe_root(_even_power_sum_acc(x, y, int(p), precision), p)
  return _elementwise(_lp_static_core, x, y, p)


_ACC_FUNCTIONS: dict[str, Callable[..., Array]] = {
    "l1": _l1_acc,
    "l2": _l2_acc,
    "sqeuclidean": _sqeuclidean_acc,
    "lp": _lp_acc,
    "cosine": _cosine_acc,
    "chebyshev": _chebyshev_acc,
    "dot": _dot_acc,
}


def score(x: Array, y: Array, metric: str | DistanceType, *, p: float | Array = 2.0,
          precision: Any = None) -> Array:
  """The attention score before scaling: ``-distance(x, y)``, or ``x . y`` for ``dot``, in the accumulation
  dtype (float32 for 16-bit inputs). ``p`` is used by ``lp`` only and must already be checked."""
  name = canonical_name(metric)
  fn = _ACC_FUNCTIONS[name]
  s = fn(x, y, p=p, precision=precision) if name == "lp" else fn(x, y, precision=precision)
  return s if name == "dot" else -s


# ------------------------------------------------------------------------------------------------------------
# Public functions: validated, returning the inputs' dtype.


# Jitted so that XLA fuses the elementwise reductions even when called eagerly.
_jitted = {name: jax.jit(fn, static_argnames=("precision",)) for name, fn in _ACC_FUNCTIONS.items()}
_lp_static_p_jit = jax.jit(_lp_acc, static_argnames=("p", "precision"))


def _public(name: str, doc: str) -> Callable[..., Array]:
  acc_fn = _jitted[name]

  def fn(x: Array, y: Array, *, precision: Any = None) -> Array:
    x, y = _check_pair(x, y, name)
    return acc_fn(x, y, precision=precision).astype(jnp.result_type(x, y))

  fn.__name__ = fn.__qualname__ = name
  fn.__doc__ = doc
  return fn


l1 = _public("l1", "Manhattan distance ``sum_d |x_d - y_d|`` (scipy's ``cityblock``).")
l2 = _public("l2", "Euclidean distance ``sqrt(sum_d (x_d - y_d)^2)``, from the matmul form.")
sqeuclidean = _public("sqeuclidean", "Squared Euclidean distance ``|x|^2 + |y|^2 - 2 x.y``, clamped at 0.")
cosine = _public("cosine", "Cosine distance ``1 - x.y / (|x| |y|)``; a zero vector is at distance 1 from everything.")
chebyshev = _public("chebyshev", "Chebyshev (L-infinity) distance ``max_d |x_d - y_d|``.")
dot = _public("dot", "The dot-product similarity ``x . y`` (the standard-attention baseline; not a distance).")


def lp(x: Array, y: Array, p: float | Array = 2.0, *, precision: Any = None) -> Array:
  """Minkowski distance ``(sum_d |x_d - y_d|^p)^(1/p)`` for any ``p > 0``.

  ``p = 1``, ``2`` and ``inf`` dispatch to :func:`l1`, :func:`l2` and :func:`chebyshev`; even integer
  ``p <= 8`` uses ``p - 1`` matmuls; any other ``p`` reduces elementwise. A traced ``p`` (a learned order) is
  differentiable.
  """
  x, y = _check_pair(x, y, "lp")
  p = check_p(p)
  fn = _lp_static_p_jit if isinstance(p, float) else _jitted["lp"]
  return fn(x, y, p=p, precision=precision).astype(jnp.result_type(x, y))


_REGISTRY: dict[str, Callable[..., Array]] = {
    "l1": l1,
    "l2": l2,
    "sqeuclidean": sqeuclidean,
    "lp": lp,
    "cosine": cosine,
    "chebyshev": chebyshev,
    "dot": dot,
}
assert tuple(_REGISTRY) == available()


# ------------------------------------------------------------------------------------------------------------
# Scale matching for the default lambda.


def _unit_normal_scores(metric: str, q: np.ndarray, k: np.ndarray, p: float) -> np.ndarray:
  """Float64 numpy scores (``-distance`` or ``dot``) used only to measure spreads; independent of the JAX code."""
  if metric == "dot":
    return q @ k.T
  if metric == "cosine":
    qn = q / np.linalg.norm(q, axis=-1, keepdims=True)
    kn = k / np.linalg.norm(k, axis=-1, keepdims=True)
    return -(1.0 - qn @ kn.T)
  t = np.abs(q[:, None, :] - k[None, :, :])
  if metric == "l1":
    d = t.sum(-1)
  elif metric == "l2":
    d = np.sqrt((t**2).sum(-1))
  elif metric == "sqeuclidean":
    d = (t**2).sum(-1)
  elif metric == "chebyshev":
    d = t.max(-1)
  elif math.isinf(p):
    d = t.max(-1)
  else:
    m = t.max(-1, keepdims=True)
    d = m[..., 0] * ((t / m) ** p).sum(-1) ** (1.0 / p)
  return -d


def logit_spread(metric: str | DistanceType, head_dim: int, p: float = 2.0, lam: float = 1.0,
                 num_queries: int = 512, num_keys: int = 1024, seed: int = 0) -> float:
  """Root-mean-square over queries of the standard deviation across keys of the logits
  ``lam * score(q, k) / sqrt(head_dim)`` for ``q, k ~ N(0, I)`` (a deterministic Monte-Carlo measurement)."""
  name = canonical_name(metric)
  rng = np.random.default_rng(seed)
  variances = []
  for _ in range(max(1, num_queries // 16)):  # fresh keys for every 16 queries, so key noise averages out
    q = rng.standard_normal((16, head_dim))
    k = rng.standard_normal((num_keys, head_dim))
    variances.append(np.var(_unit_normal_scores(name, q, k, float(p)), axis=-1))
  return float(lam * np.sqrt(np.mean(np.concatenate(variances))) / math.sqrt(head_dim))


@functools.lru_cache(maxsize=None)
def default_lambda(metric: str | DistanceType, head_dim: int, p: float = 2.0) -> float:
  """The lambda at which ``metric``'s logits spread across keys as much as dot-product attention's do, for
  unit-variance queries and keys in ``head_dim`` dimensions (see ``DistanceBasedAttention`` for the table).

  Measured, not assumed: ``logit_spread(dot) / logit_spread(metric)`` on the same fixed samples, so the ratio
  is exact for those samples and within about 1% of its expectation. For ``dot`` it is 1.
  """
  name = canonical_name(metric)
  if name == "dot":
    return 1.0
  if not isinstance(head_dim, (int, np.integer)) or head_dim < 1:
    raise ValueError(f"head_dim must be a positive integer; got {head_dim!r}")
  p = check_p(p)
  if not isinstance(p, float):
    raise ValueError("default_lambda needs a concrete p")
  return logit_spread("dot", head_dim) / logit_spread(name, head_dim, p)


def default_lambda_table(head_dims: tuple[int, ...] = (16, 32, 64, 128), p: float = 3.0) -> str:
  """``default_lambda`` for every metric (lp at order ``p``) and head dimension, as a text table."""
  header = ["D"] + [f"lp, p={p:g}" if name == "lp" else name for name in available()]
  rows = [[str(d)] + [f"{default_lambda(name, d, p):.4g}" for name in available()] for d in head_dims]
  widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
  return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in [header] + rows)
