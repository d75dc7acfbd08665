"""The shipped metrics: each one :class:`~distattn_jax.metrics.record.Metric` record, registered in
:class:`~distattn_jax.metrics.record.DistanceType` order."""

from __future__ import annotations

import math

import jax.numpy as jnp

from distattn_jax.metrics import elementwise, gram, record
from distattn_jax.metrics.record import Elementwise, Gram, Metric

# lp with an integer p up to this order is computed with repeated multiplication and no rescaling: |x - y|^p
# stays far inside float32's range for any |x - y| < 1e8.
MAX_UNSCALED_INTEGER_P = 4


def _sqrt(s):
  return elementwise.safe_root(s, 2.0)


_L1 = Elementwise(phi=elementwise.symmetric_abs)
# Euclidean distance from the differences, not from |x|^2 + |y|^2 - 2 x.y: under a square root the gram form's
# rounding (eps |x|^2 on d^2) becomes a relative error of eps |x|^2 / (2 d^2) in d and in the gradient, 10% in
# float32 for |x - y| = 1e-3 |x|; the differences keep it at a few eps (tests/test_metrics_record.py).
_L2 = Elementwise(phi=jnp.square, root=_sqrt)
_CHEBYSHEV = Elementwise(phi=elementwise.symmetric_abs, reduce="max")


def _lp_phi(t, p):
  return elementwise.power(elementwise.symmetric_abs(t), p)


def _lp_root(s, p):
  return elementwise.safe_root(s, p)


def _lp_form(p: float | None) -> Elementwise:
  """lp at order ``p``: the l1, l2 and chebyshev forms at 1, 2 and inf; an integer ``p <= 4`` multiplies
  directly; any other ``p`` divides the differences by their largest magnitude first so ``|.|^p`` neither
  overflows nor underflows. ``p = None``: the generic form, ``p`` an argument (traced, learned)."""
  if p is None:
    return Elementwise(phi=_lp_phi, root=_lp_root, rescale=True)
  if p == 1.0:
    return _L1
  if p == 2.0:
    return _L2
  if math.isinf(p):
    return _CHEBYSHEV
  phi = lambda t: _lp_phi(t, p)  # noqa: E731 (closes over the static order)
  root = lambda s: _lp_root(s, p)  # noqa: E731
  unscaled = p.is_integer() and p <= MAX_UNSCALED_INTEGER_P
  return Elementwise(phi=phi, root=root, rescale=not unscaled)


_ZERO_DISTANCE = "the gradient with respect to either argument is 0 at zero distance"

l1 = record.add_shipped(Metric(
    "l1", _L1, translation_invariant=True,
    gradient="d|t|/dt = sign(t) with sign(0) = 0, the minimum-norm subgradient"))
l2 = record.add_shipped(Metric("l2", _L2, translation_invariant=True, gradient=_ZERO_DISTANCE))
sqeuclidean = record.add_shipped(Metric(
    "sqeuclidean", Gram(gram.sqeuclidean), translation_invariant=True,
    gradient="2 (x - y), smooth everywhere"))
lp = record.add_shipped(Metric(
    "lp", _lp_form, translation_invariant=True,
    gradient=_ZERO_DISTANCE + "; for p < 1 a coordinate whose difference is exactly 0 contributes 0 (its true "
    "partial derivative is infinite); for a traced p, d lp / dp = lp/p * sum_k u_k^p log u_k with "
    "u = |x - y| / lp, and 0 at zero distance"))
cosine = record.add_shipped(Metric(
    "cosine", Gram(gram.cosine, terms=((1, 1),), normalize=True),
    gradient="1 - x.y / (|x| |y|); a zero vector has similarity 0 with everything (distance 1) and receives "
    "gradient 0"))
chebyshev = record.add_shipped(Metric(
    "chebyshev", _CHEBYSHEV, translation_invariant=True,
    gradient="the coordinates that tie for the maximum share the gradient equally; sign(0) = 0 as for l1, so "
    "equal vectors get gradient 0"))


def _weight_l1(w, p):
  """A weighted l1 is l1 on ``w * x`` and ``w * y``: ``sum_d |w_d x_d - w_d y_d| = sum_d w_d |x_d - y_d|``."""
  del p
  return w


def _weight_l2(w, p):
  """A weighted l2 is l2 on ``sqrt(w) * x`` and ``sqrt(w) * y``: ``sqrt(sum_d w_d (x_d - y_d)^2)``."""
  del p
  return elementwise.safe_root(w, 2.0)


_AT_ZERO = ("; with metric_weights=w the gradient with respect to w is exact through the rescaled features where "
            "w > 0, and 0 with respect to a weight of exactly 0 (")
weighted_l1 = record.add_shipped(Metric(
    "weighted_l1", _L1, translation_invariant=True, feature_scale=_weight_l1,
    gradient="as l1, on the features w * x and w * y" + _AT_ZERO + "the rescaled difference is 0 there, where "
    "|.| takes derivative 0; the one-sided derivative is |x_d - y_d|)"))
weighted_l2 = record.add_shipped(Metric(
    "weighted_l2", _L2, translation_invariant=True, feature_scale=_weight_l2,
    gradient="as l2, on the features sqrt(w) * x and sqrt(w) * y" + _AT_ZERO + "sqrt has no derivative there)"))
dot = record.add_shipped(Metric(
    "dot", Gram(gram.dot, terms=((1, 1),)), similarity=True,
    gradient="y for x and x for y: the standard-attention similarity, not a distance"))

assert record.available() == tuple(m.value for m in record.DistanceType)
