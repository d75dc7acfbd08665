"""The ``Metric`` record, its two forms, and the registry every kernel reads.

A metric is one record: its name, its pairwise score in one of two forms, whether it is translation invariant,
its gradient convention, and its default tiles for the blockwise kernel. Kernels never look at a metric's
name; they call :func:`score`, which evaluates whichever form the record holds.

* :class:`Elementwise`: ``root(reduce_d phi(x_d - y_d))`` with ``reduce`` in {"sum", "max"} (l1, l2,
  chebyshev, lp, and a user's Huber or log-cosh distance).
* :class:`Gram`: ``fn(*grams)`` of inner products ``sum_d x_d^a y_d^b`` computed as matmuls (sqeuclidean,
  cosine, dot; ``fn(x.y, |x|^2, |y|^2)`` by default).

A record with a ``feature_scale`` is a weighted metric: with non-negative per-feature weights ``w`` it is its
form on rescaled features, ``d_w(x, y) = d(s * x, s * y)`` with ``s = feature_scale(w, p)`` (``w`` for a
weighted l1, ``sqrt(w)`` for a weighted l2, ``w^(1/p)`` for a weighted lp). Kernels never see the weights: the
caller rescales the features (``metric(x, y, metric_weights=w)``, ``distance_attention(..., metric_weights=w)``).

The module is long because every check a user's record goes through (its fields, and the trial evaluation at
registration of its form and its feature scale) lives beside the record and the registry it guards.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
from typing import Any, Callable, Union

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

# Default tile sizes (query positions x key positions) of the blockwise kernel, the fastest forward+backward at
# N = 2048 on the 2-core development CPU among 64..2048 x 128..512 (experiments/benchmark.py
# --implementations=blockwise:BQxBK,...; docs/benchmark_tiles_cpu.md): 512 x 512 for the gram forms (tied
# with 512 x 256, which saves memory but not time), 512 x 256 for the elementwise ones.
GRAM_BLOCKS = (512, 512)
ELEMENTWISE_BLOCKS = (512, 256)

_REDUCTIONS = ("sum", "max")


def _fail(owner: str, field: str, value: Any, allowed: str, exc: type[Exception] = ValueError):
  raise exc(f"{owner}: {field} must be {allowed}; got {value!r}")


@dataclasses.dataclass(frozen=True)
class Elementwise:
  """The score ``root(reduce_d phi(x_d - y_d))``, with ``phi`` and ``root`` elementwise ``jnp`` functions.

  Attributes:
    phi: ``phi(t)`` of a difference tile ``t`` (any shape, same shape out), ``>= 0`` for a distance; for a
      parametric metric's generic form ``phi(t, p)``. Its derivative comes from JAX's autodiff (``jax.jvp``),
      so ``phi`` must be differentiable where it matters (``jnp.abs`` has derivative 1 at 0; the shipped forms
      use ``metrics.elementwise.symmetric_abs``, whose derivative there is 0).
    reduce: ``"sum"`` or ``"max"`` over the features. Under ``"max"`` the features tying for the maximum
      share the gradient equally.
    root: ``root(s)`` (or ``root(s, p)``) applied to the reduced value, elementwise; None for the identity. Where
      its derivative is not finite (a root at ``s = 0``) the pair's gradient is 0.
    rescale: divide the differences by their largest magnitude before ``phi`` and multiply the result back.
      Exact when ``phi(c t) = c^k phi(t)`` and ``root(c^k s) = c root(s)`` (any Minkowski-type norm); it keeps
      ``phi`` from overflowing or underflowing at large ``k``.
  """

  phi: Callable[..., Array]
  reduce: str = "sum"
  root: Callable[..., Array] | None = None
  rescale: bool = False

  def __post_init__(self):
    if not callable(self.phi):
      _fail("Elementwise", "phi", self.phi, "a callable phi(t) -> array", TypeError)
    if self.reduce not in _REDUCTIONS:
      _fail("Elementwise", "reduce", self.reduce, f"one of {', '.join(map(repr, _REDUCTIONS))}")
    if self.root is not None and not callable(self.root):
      _fail("Elementwise", "root", self.root, "None or a callable root(s) -> array", TypeError)
    if not isinstance(self.rescale, bool):
      _fail("Elementwise", "rescale", self.rescale, "a bool", TypeError)


def _check_terms(terms: Any) -> None:
  ok = isinstance(terms, tuple) and len(terms) > 0 and all(
      isinstance(t, tuple) and len(t) == 2 and all(isinstance(e, int) and not isinstance(e, bool) and e >= 0
                                                   for e in t) and t != (0, 0) for t in terms)
  if not ok:
    _fail("Gram", "terms", terms, "a non-empty tuple of (a, b) pairs of non-negative ints, not (0, 0)")


@dataclasses.dataclass(frozen=True)
class Gram:
  """The score ``fn(*grams)`` with ``grams[i][..., n, m] = sum_d x[n, d]^a_i y[m, d]^b_i`` for
  ``(a_i, b_i) = terms[i]``: a matmul where both exponents are positive, a row sum (``[..., N, 1]`` or
  ``[..., 1, M]``) where one is 0. The default terms give ``fn(x.y, |x|^2, |y|^2)``. With ``normalize`` the
  rows of ``x`` and ``y`` are divided by their norms first (a zero row stays 0, with gradient 0): cosine is
  ``Gram(lambda xy: 1 - xy, terms=((1, 1),), normalize=True)``, which keeps no ``[N, M]`` intermediate of
  ``xy / (|x| |y|)`` for the backward pass.

  The matmuls run at ``jax.lax.Precision.HIGHEST`` whatever precision the caller asks for. ``fn`` is
  differentiated by JAX's autodiff; it should clamp what rounding can push out of range (e.g. ``max(d2, 0)``).
  A gram form loses accuracy for nearly equal vectors (it subtracts terms of size ``|x|^2``): use it where the
  score is smooth there (sqeuclidean, cosine, dot), not under a root.
  """

  fn: Callable[..., Array]
  terms: tuple[tuple[int, int], ...] = ((1, 1), (2, 0), (0, 2))
  normalize: bool = False

  def __post_init__(self):
    if not callable(self.fn):
      _fail("Gram", "fn", self.fn, "a callable fn(*grams) -> array", TypeError)
    _check_terms(self.terms)
    if not isinstance(self.normalize, bool):
      _fail("Gram", "normalize", self.normalize, "a bool", TypeError)


Form = Union[Elementwise, Gram]


@dataclasses.dataclass(frozen=True)
class Metric:
  """One distance (or similarity): everything a kernel, a layer or the trainer needs to use it.

  Attributes:
    name: the registry name (``metric="..."`` everywhere).
    form: an :class:`Elementwise` or :class:`Gram` form; for a metric with an order ``p`` (like ``lp``) a
      function ``form(p)``: given a Python float it returns a form specialised to that order (it may pick a
      gram form or a faster elementwise one); given None it returns the generic :class:`Elementwise` form whose
      ``phi(t, p)`` and ``root(s, p)`` take ``p`` as an argument, used when ``p`` is traced (learned) and
      differentiated by JAX's autodiff.
    similarity: True when the form computes a similarity (the score is ``+form``, as for ``dot``); False for a
      distance (the score is ``-form``).
    translation_invariant: ``d(x + c, y + c) = d(x, y)``; a gram form then centres both sides on the mean key
      first (exact, and it keeps a large common offset from cancelling).
    gradient: the gradient convention in words (at zero distance, ties, zero vectors).
    block_q, block_k: the blockwise kernel's default tiles; None picks ``GRAM_BLOCKS`` or ``ELEMENTWISE_BLOCKS``
      by the form.
    feature_scale: None for an unweighted metric; for a weighted one, ``feature_scale(w, p)``: the per-feature
      factors ``s`` (same shape as the non-negative weights ``w``) such that the weighted distance is the form
      evaluated on ``s * x`` and ``s * y``. ``p`` is the metric's order (a float, or a traced scalar when it is
      learned; 2.0 for a metric without one). It must give ``s = 1`` at ``w = 1``, so that the default weights
      (all ones) are the unweighted metric, and a finite value and gradient for ``w >= 0`` (use
      ``metrics.elementwise.safe_root`` for a root, whose derivative at ``w = 0`` is 0, not infinite).

  A record is callable: ``metric(x, y)`` (``metric(x, y, p=3.0)`` for a parametric one) maps ``x [..., N, D]``
  and ``y [..., M, D]`` to ``[..., N, M]`` in the inputs' dtype (the form's value, not negated); a weighted one
  also takes ``metric_weights=w``, non-negative, broadcastable to ``[..., D]`` (one weight vector, or one per
  leading index of ``x`` and ``y``).
  """

  name: str
  form: Form | Callable[[float | None], Form]
  similarity: bool = False
  translation_invariant: bool = False
  gradient: str = ""
  block_q: int | None = None
  block_k: int | None = None
  feature_scale: Callable[[Any, Any], Array] | None = None

  def __post_init__(self):
    owner = f"Metric({self.name!r})"
    if not isinstance(self.name, str) or not self.name or self.name == "auto":
      _fail("Metric", "name", self.name, "a non-empty string other than 'auto'")
    if not isinstance(self.form, (Elementwise, Gram)) and not callable(self.form):
      _fail(owner, "form", self.form, "an Elementwise or Gram form, or a callable form(p) for a parametric "
            "metric", TypeError)
    for field in ("similarity", "translation_invariant"):
      if not isinstance(getattr(self, field), bool):
        _fail(owner, field, getattr(self, field), "a bool", TypeError)
    if not isinstance(self.gradient, str):
      _fail(owner, "gradient", self.gradient, "a string describing the gradient convention", TypeError)
    for field in ("block_q", "block_k"):
      value = getattr(self, field)
      if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        _fail(owner, field, value, "None or a positive int")
    if self.feature_scale is not None and not callable(self.feature_scale):
      _fail(owner, "feature_scale", self.feature_scale, "None or a callable feature_scale(w, p) -> array",
            TypeError)

  @property
  def weighted(self) -> bool:
    """Whether the metric takes per-feature weights (``metric_weights``): it has a ``feature_scale``."""
    return self.feature_scale is not None

  @property
  def parametric(self) -> bool:
    """Whether the metric takes an order ``p``."""
    return not isinstance(self.form, (Elementwise, Gram))

  def resolve(self, p: float | Array | None = None) -> Form:
    """The form at order ``p`` (a float, or a traced array for the generic form); ``p`` is ignored by a metric
    without one."""
    if not self.parametric:
      return self.form
    return _resolve_static(self, p) if isinstance(p, float) else _resolve_generic(self)

  def blocks(self, p: Any = 2.0) -> tuple[int, int]:
    """``(block_q, block_k)``: the record's tiles, else the default of the form at ``p``."""
    default = GRAM_BLOCKS if isinstance(self.resolve(p if isinstance(p, float) else None), Gram) \
        else ELEMENTWISE_BLOCKS
    return (self.block_q or default[0], self.block_k or default[1])

  def __call__(self, x: Any, y: Any, p: Any = None, *, metric_weights: Any = None, precision: Any = None) -> Array:
    return _installed_evaluation().call(self, x, y, p, precision, metric_weights)


@functools.lru_cache(maxsize=None)
def _resolve_static(metric: Metric, p: float) -> Form:
  return _checked_form(metric, metric.form(p), p)


@functools.lru_cache(maxsize=None)
def _resolve_generic(metric: Metric) -> Form:
  form = _checked_form(metric, metric.form(None), None)
  if not isinstance(form, Elementwise):
    raise ValueError(f"metric {metric.name!r}: form(None) must return an Elementwise form whose phi and root "
                     f"take p (used for a traced p); got {form!r}")
  return form


def _checked_form(metric: Metric, form: Any, p: Any) -> Form:
  if not isinstance(form, (Elementwise, Gram)):
    raise TypeError(f"metric {metric.name!r}: form({p!r}) must return an Elementwise or Gram form; got {form!r}")
  return form


# ------------------------------------------------------------------------------------------------------------
# Evaluation. The forms are evaluated in metrics/evaluate.py, which imports this module (for the records and the
# registry) and installs its entry points here when it is imported; a record's call and the registration trial
# reach it through them. Importing any module of ``distattn_jax.metrics`` runs the package's __init__, which
# imports evaluate.py, so the evaluation is installed before any record can be called or registered.


@dataclasses.dataclass(frozen=True)
class Evaluation:
  """The entry points of the evaluation of a record.

  Attributes:
    call: ``call(metric, x, y, p, precision, metric_weights)``, the validated ``metric(x, y[, p],
      metric_weights=w)`` in the inputs' dtype.
    form_value: ``form_value(metric, x, y, p)``, the value of the form at order ``p`` (not negated) in the
      accumulation dtype, unvalidated.
  """

  call: Callable[..., Array]
  form_value: Callable[..., Array]


_evaluation: Evaluation | None = None


def install_evaluation(evaluation: Evaluation) -> None:
  """Sets how records are evaluated (called once, by metrics/evaluate.py)."""
  global _evaluation
  if not isinstance(evaluation, Evaluation):
    raise TypeError(f"install_evaluation: evaluation must be a record.Evaluation; got {evaluation!r}")
  _evaluation = evaluation


def _installed_evaluation() -> Evaluation:
  if _evaluation is None:
    raise RuntimeError("the metric evaluation is not installed; import distattn_jax.metrics")
  return _evaluation


# ------------------------------------------------------------------------------------------------------------
# The registry.


class DistanceType(str, enum.Enum):
  """The names of the shipped metrics; a member can be passed anywhere a metric name is accepted."""

  L1 = "l1"
  L2 = "l2"
  SQEUCLIDEAN = "sqeuclidean"
  LP = "lp"
  COSINE = "cosine"
  CHEBYSHEV = "chebyshev"
  WEIGHTED_L1 = "weighted_l1"
  WEIGHTED_L2 = "weighted_l2"
  DOT = "dot"

  def __str__(self) -> str:
    return self.value


_REGISTRY: dict[str, Metric] = {}
_SHIPPED = frozenset(m.value for m in DistanceType)


def available() -> tuple[str, ...]:
  """Names of every registered metric: the shipped ones (distances first, the ``dot`` baseline last), then the
  user's in registration order."""
  return tuple(_REGISTRY)


def canonical_name(metric: str | DistanceType | Metric, argname: str = "metric") -> str:
  """Returns the registry name of ``metric``, or raises ValueError listing the valid names."""
  if isinstance(metric, DistanceType):
    return metric.value
  if isinstance(metric, Metric) and _REGISTRY.get(metric.name) is metric:
    return metric.name
  if isinstance(metric, str) and metric in _REGISTRY:
    return metric
  raise ValueError(f"{argname}={metric!r} is not a registered metric; valid names: {', '.join(available())}")


def get(metric: str | DistanceType | Metric) -> Metric:
  """The record registered under ``metric``; it is callable: ``get('l1')(x, y)``, ``get('lp')(x, y, p=3.0)``."""
  return _REGISTRY[canonical_name(metric)]


def register(metric: Metric, overwrite: bool = False) -> Metric:
  """Adds a user's metric; afterwards its name works everywhere a metric name does (every kernel,
  ``DistanceBasedAttention``, ``make_attention_fn``, the trainer's ``model.metric``). Returns the record.

  The record is evaluated once on a small input, so a form that cannot run fails here. A name that is already
  registered is a ValueError unless ``overwrite=True`` (a notebook re-running its registration cell); a shipped
  name can never be replaced. Replacing or removing (:func:`unregister`) a metric clears JAX's caches of traced
  and compiled functions (``jax.clear_caches``), since they identify the metric by name and would otherwise keep
  running the old form.
  """
  if not isinstance(metric, Metric):
    raise TypeError(f"register: metric must be a da.metrics.Metric record; got {metric!r}")
  if not isinstance(overwrite, bool):
    raise TypeError(f"register: overwrite must be a bool; got {overwrite!r}")
  if metric.name in _SHIPPED:
    raise ValueError(f"register: name={metric.name!r} is a shipped metric and cannot be replaced; choose another "
                     "name")
  if metric.name in _REGISTRY and not overwrite:
    raise ValueError(f"register: name={metric.name!r} is already registered; pass overwrite=True to replace it "
                     "(or call da.metrics.unregister first)")
  _trial(metric)
  replaced = _REGISTRY.get(metric.name) not in (None, metric)
  _REGISTRY[metric.name] = metric
  if replaced:
    jax.clear_caches()
  return metric


def unregister(name: str) -> Metric:
  """Removes the user's metric registered as ``name`` and returns its record; shipped metrics stay. Clears JAX's
  caches of traced and compiled functions, as replacing a metric does (see :func:`register`)."""
  if name in _SHIPPED:
    raise ValueError(f"unregister: name={name!r} is a shipped metric and cannot be removed")
  if name not in _REGISTRY:
    user = [n for n in _REGISTRY if n not in _SHIPPED]
    raise ValueError(f"unregister: name={name!r} is not registered; registered user metrics: "
                     f"{', '.join(user) if user else 'none'}")
  metric = _REGISTRY.pop(name)
  jax.clear_caches()
  return metric


def _trial(metric: Metric) -> None:
  """Evaluates the record's forms on a 2 x 3 input and checks shape and finiteness, naming what failed."""
  form_value = _installed_evaluation().form_value
  x = jnp.asarray([[0.5, -1.0, 2.0], [0.0, 0.0, 0.0]], jnp.float32)
  y = jnp.asarray([[1.0, 0.25, -0.5], [0.0, 0.0, 0.0], [0.5, -1.0, 2.0]], jnp.float32)
  cases = [(None, None)] if not metric.parametric else [(2.0, 2.0), ("generic p", jnp.float32(3.0))]
  for label, p in cases:
    form = metric.resolve(p)
    if isinstance(form, Elementwise):
      t = x - y[:2]
      try:
        shape = jax.eval_shape(lambda t, p: form.phi(t, *(() if p is None or isinstance(p, float) else (p,))),
                               t, None if isinstance(p, float) else p).shape
      except Exception as e:  # the user's callable can raise anything; re-raise naming the field
        raise ValueError(f"register: metric {metric.name!r}: phi failed on a [2, 3] tile: "
                         f"{type(e).__name__}: {e}") from e
      if shape != t.shape:
        raise ValueError(f"register: metric {metric.name!r}: phi must be elementwise (a [2, 3] tile in, [2, 3] "
                         f"out); got shape {shape}")

    def trial(a, b, p):
      scores = form_value(metric, a, b, p)
      return jnp.sum(scores), scores

    try:
      # One compiled call (eager evaluation of the loops would dispatch every operation separately).
      static = isinstance(p, float)
      fn = jax.jit(jax.value_and_grad(trial, (0, 1), has_aux=True), static_argnums=(2,) if static else ())
      (value, scores), grads = fn(x, y, p)
    except Exception as e:  # the user's callables can raise anything; re-raise naming the record
      at = "" if label is None else f" at p={label}"
      raise ValueError(f"register: metric {metric.name!r}{at} failed on a 2x3 test input: "
                       f"{type(e).__name__}: {e}") from e
    if scores.shape != (2, 3):
      raise ValueError(f"register: metric {metric.name!r}: the form must map x [2, 3] and y [3, 3] to [2, 3]; "
                       f"got shape {scores.shape} (are phi/fn elementwise?)")
    if not (np.all(np.isfinite(np.asarray(value))) and all(np.all(np.isfinite(np.asarray(g))) for g in grads)):
      raise ValueError(f"register: metric {metric.name!r} gives a non-finite value or gradient on a 2x3 test "
                       "input (zero vectors and a zero distance included)")
    if metric.weighted:
      _trial_feature_scale(metric, 2.0 if p is None else p, label)


def _trial_feature_scale(metric: Metric, p: Any, label: Any) -> None:
  """Evaluates ``feature_scale`` on weights 0, 0.5, 1 and 2: same shape, finite value and gradient, 1 at 1."""
  at = "" if label is None else f" at p={label}"
  w = jnp.asarray([0.0, 0.5, 1.0, 2.0], jnp.float32)

  def trial(w, p):
    return metric.feature_scale(w, p), jax.grad(lambda w: jnp.sum(metric.feature_scale(w, p)))(w)

  try:
    s, grad = jax.jit(trial, static_argnums=(1,) if isinstance(p, float) else ())(w, p)
  except Exception as e:  # the user's callable can raise anything; re-raise naming the field
    raise ValueError(f"register: metric {metric.name!r}{at}: feature_scale(w, p) failed on weights "
                     f"{w.tolist()}: {type(e).__name__}: {e}") from e
  if jnp.shape(s) != w.shape:
    raise ValueError(f"register: metric {metric.name!r}{at}: feature_scale(w, p) must be elementwise (weights "
                     f"of shape (4,) in, (4,) out); got shape {jnp.shape(s)}")
  s, grad = np.asarray(s, np.float64), np.asarray(grad, np.float64)
  if not (np.all(np.isfinite(s)) and np.all(np.isfinite(grad))):
    raise ValueError(f"register: metric {metric.name!r}{at}: feature_scale(w, p) gives a non-finite value or "
                     f"gradient at weights {w.tolist()} (values {s.tolist()}, gradients {grad.tolist()})")
  if not np.isclose(s[2], 1.0, rtol=1e-6, atol=0.0):
    raise ValueError(f"register: metric {metric.name!r}{at}: feature_scale(w, p) must be 1 at w = 1 (the "
                     f"default weights are the unweighted metric); got {s[2]}")


def add_shipped(metric: Metric) -> Metric:
  """Registers one of the shipped metrics (in :class:`DistanceType` order)."""
  assert metric.name in _SHIPPED and metric.name not in _REGISTRY
  _REGISTRY[metric.name] = metric
  return metric
