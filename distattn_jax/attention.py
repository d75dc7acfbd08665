"""``distance_attention``: the one entry point every layer, model and user calls.

It checks every argument at trace time, brings the Flax layout ``[batch..., length, heads, head_dim]`` to the
kernels' canonical shapes (see :mod:`distattn_jax.kernels.common`), describes the call as a
:class:`distattn_jax.kernels.Request`, picks a kernel that accepts it (:mod:`distattn_jax.kernels.base`) and
returns the result in the caller's layout.

The module is long because every argument check of the public signature lives here, beside the entry point it
guards (each names the argument, its value and what is allowed): spread over files, the one contract callers rely
on would have no single place.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

from distattn_jax import initializers, kernels, metrics
from distattn_jax.kernels import base, common

Array = jax.Array

_LOG = logging.getLogger("distattn_jax")

# Keyword arguments that Flax's attention modules pass to an ``attention_fn`` and that distance attention
# accepts. The einsum overrides exist for quantised dot products; a distance has no single einsum to swap.
_FLAX_KWARGS = ("module", "force_fp32_for_softmax", "promote_dtype", "einsum_dot_general",
                "qk_attn_weights_einsum", "attn_weights_value_einsum")
_UNSUPPORTED_FLAX_KWARGS = ("einsum_dot_general", "qk_attn_weights_einsum", "attn_weights_value_einsum")


def _fail(argname: str, message: str, exc: type[Exception] = ValueError):
  raise exc(f"distance_attention: {argname} {message}")


# Set while a function runs under :func:`checked`: distance_attention then also checks the values it can only
# see at run time (a traced lam, p or sequence length), through jax.experimental.checkify.
_CHECKED = contextvars.ContextVar("distattn_jax_checked", default=False)


@contextlib.contextmanager
def _run_time_checks():
  token = _CHECKED.set(True)
  try:
    yield
  finally:
    _CHECKED.reset(token)


def checked(fn: Callable) -> Callable:
  """``fn`` with run-time checks of the arguments ``distance_attention`` cannot check while tracing.

  Without it, every check happens at trace time, so values known then (Python numbers, concrete arrays) raise a
  ValueError at once, but a traced ``lam`` (a learned parameter), a traced ``p``, or traced sequence lengths
  pass unchecked: a ``lam <= 0`` turns the distance into a similarity, ``p <= 0`` gives NaN, and a negative or
  over-long length silently masks everything or nothing. Under ``checked(fn)`` each ``distance_attention``
  call inside ``fn`` adds ``checkify`` checks for them; calling the result runs ``fn`` and raises
  ``JaxRuntimeError`` naming the argument and its value if one fails. ``fn`` may be jitted (``checked(jax.jit(f))``
  re-jits ``f`` with the checks); a jitted function called inside ``fn`` that was already traced without the
  checks keeps its cached trace, so wrap the outermost function.
  """
  inner, jitted = fn, False
  while hasattr(inner, "lower") and hasattr(inner, "__wrapped__"):  # a jax.jit-wrapped function
    inner, jitted = inner.__wrapped__, True

  def flagged(*args, **kwargs):
    with _run_time_checks():
      return inner(*args, **kwargs)

  with_checks = checkify.checkify(flagged, errors=checkify.user_checks)
  if jitted:
    with_checks = jax.jit(with_checks)

  @functools.wraps(fn)
  def run(*args, **kwargs):
    error, out = with_checks(*args, **kwargs)
    error.throw()
    return out

  return run


def _check_at_run_time(argname: str, ok: Array, allowed: str, value: Array) -> None:
  if _CHECKED.get():
    checkify.check(jnp.all(ok), f"distance_attention: {argname} must be {allowed}; got {{}}", value)


def _check_flax_kwargs(flax_kwargs: dict[str, Any]) -> Any:
  """Returns the ``module`` to sow weights into (or None) after rejecting what distance attention can't honour."""
  for name, value in flax_kwargs.items():
    if name not in _FLAX_KWARGS:
      _fail(name, f"is not an argument of distance_attention (got {name}={value!r}); the Flax keyword "
            f"arguments it accepts are {', '.join(_FLAX_KWARGS)}", TypeError)
    if name in _UNSUPPORTED_FLAX_KWARGS and value is not None:
      _fail(name, f"must be None: distance metrics do not reduce to a swappable einsum (got {value!r})")
  force = flax_kwargs.get("force_fp32_for_softmax")
  if force is not None and not isinstance(force, (bool, np.bool_)):
    _fail("force_fp32_for_softmax", f"must be a Python bool or None; got {force!r}", TypeError)
  return flax_kwargs.get("module")


def _check_arrays(query, key, value, dtype) -> tuple[Array, Array, Array]:
  arrays = {"query": jnp.asarray(query), "key": jnp.asarray(key), "value": jnp.asarray(value)}
  for name, a in arrays.items():
    if jnp.issubdtype(a.dtype, jnp.complexfloating):
      _fail(name, f"must be a real floating-point array; got dtype {a.dtype} (complex inputs are not "
            "supported: a distance between complex vectors is not defined here)", TypeError)
    if not jnp.issubdtype(a.dtype, jnp.floating):
      _fail(name, f"must be a floating-point array; got dtype {a.dtype} (cast integer inputs explicitly)",
            TypeError)
    if a.ndim < 3:
      _fail(name, f"must have shape [batch..., length, heads, head_dim]; got shape {a.shape}")
  query, key, value = arrays.values()
  if dtype is not None and not jnp.issubdtype(dtype, jnp.floating):
    _fail("dtype", f"must be a floating-point dtype or None; got {dtype!r}", TypeError)
  dtype = jnp.result_type(query, key, value) if dtype is None else jnp.dtype(dtype)

  shapes = f"query.shape={query.shape}, key.shape={key.shape}, value.shape={value.shape}"
  if not query.ndim == key.ndim == value.ndim:
    _fail("query/key/value", f"must have the same rank; got {shapes}")
  if query.shape[:-3] != key.shape[:-3]:
    _fail("key", f"batch dimensions {key.shape[:-3]} must equal query's {query.shape[:-3]}; got {shapes}")
  if key.shape[:-3] != value.shape[:-3] or key.shape[-3] != value.shape[-3]:
    _fail("value", f"batch and length dimensions {value.shape[:-2]} must equal key's {key.shape[:-2]}; "
          f"got {shapes}")
  if key.shape[-2] != value.shape[-2]:
    _fail("value", f"heads ({value.shape[-2]}) must equal key heads ({key.shape[-2]}); got {shapes}")
  if query.shape[-1] != key.shape[-1]:
    _fail("key", f"head_dim ({key.shape[-1]}) must equal query head_dim ({query.shape[-1]}); got {shapes}")
  num_heads, num_kv_heads = query.shape[-2], key.shape[-2]
  if num_kv_heads == 0 or num_heads % num_kv_heads:
    _fail("query", f"heads ({num_heads}) must be a multiple of key/value heads ({num_kv_heads}) for "
          f"grouped-query attention; got {shapes}")
  if query.shape[-1] == 0:
    _fail("query", f"must have at least one feature (head_dim >= 1); got {shapes}")
  return query.astype(dtype), key.astype(dtype), value.astype(dtype)


def _check_lam(lam: Any, num_heads: int, dtype) -> Array:
  """``lam`` as a ``[heads]`` array; a concrete value must be positive and finite."""
  arr = jnp.asarray(lam)
  if arr.dtype == bool or not jnp.issubdtype(arr.dtype, jnp.number):
    _fail("lam", f"must be a positive float or a [heads] array of them; got {lam!r}", TypeError)
  if arr.shape not in ((), (num_heads,)):
    _fail("lam", f"must be a scalar or have shape ({num_heads},) (one per query head); got shape {arr.shape}")
  value = metrics.concrete_value(lam)
  if value is not None and not (np.all(np.isfinite(value)) and np.all(value > 0)):
    _fail("lam", f"must be > 0 and finite; got {value.tolist()}")
  if value is None:
    _check_at_run_time("lam", jnp.logical_and(jnp.isfinite(arr), arr > 0), "> 0 and finite", arr)
  return jnp.broadcast_to(arr.astype(metrics.accumulation_dtype(dtype)), (num_heads,))


def _check_metric_weights(metric_weights: Any, metric: str, num_heads: int, num_kv_heads: int, head_dim: int,
                          dtype) -> Array | None:
  """A weighted metric's feature weights as ``[1 | kv_heads | heads, head_dim]`` in the accumulation dtype, or
  None when none are given; concrete weights must be >= 0 and finite."""
  if metric_weights is None:
    return None
  if not metrics.get(metric).weighted:
    weighted = [name for name in metrics.available() if metrics.get(name).weighted]
    _fail("metric_weights", f"is only for a weighted metric (a record with a feature_scale: "
          f"{', '.join(weighted)}); metric={metric!r} takes no feature weights (got metric_weights of shape "
          f"{jnp.shape(metric_weights)}); pass metric_weights=None or a weighted metric")
  w, concrete = metrics.check_metric_weights(metric_weights, "distance_attention")
  rows_ok = w.ndim < 2 or w.shape[0] in (1, num_kv_heads, num_heads)
  if w.ndim > 2 or not rows_ok or (w.ndim >= 1 and w.shape[-1] not in (1, head_dim)):
    _fail("metric_weights", f"must be a scalar or have shape (head_dim,) = ({head_dim},), (kv_heads, head_dim) = "
          f"({num_kv_heads}, {head_dim}) or (heads, head_dim) = ({num_heads}, {head_dim}) (size-1 axes "
          f"broadcast); got shape {w.shape}")
  if not concrete:
    _check_at_run_time("metric_weights", jnp.logical_and(jnp.isfinite(w), w >= 0), ">= 0 and finite", w)
  w = w.reshape((1,) * (2 - w.ndim) + w.shape)
  return jnp.broadcast_to(w, (w.shape[0], head_dim)).astype(metrics.accumulation_dtype(dtype))


def _weighted_features(q: Array, k: Array, metric_weights: Array, metric: str, p: Any) -> tuple[Array, Array]:
  """``q`` and ``k`` rescaled by the weighted metric's ``feature_scale(w, p)``, per head: the weighted distance
  of the features is the base form's distance of the rescaled ones, exactly. ``metric_weights`` has one row,
  one row per kv head (a query head takes its kv head's row) or one per query head (``k`` then has as many)."""
  scale = metrics.scale_features(metrics.get(metric), metric_weights, p)  # [1 | K | H, D]
  num_heads, num_kv_heads = q.shape[2], k.shape[2]
  q_scale = scale
  if scale.shape[0] == num_kv_heads != num_heads:
    q_scale = jnp.repeat(scale, num_heads // num_kv_heads, axis=0)
  return ((q.astype(scale.dtype) * q_scale[None, None]).astype(q.dtype),
          (k.astype(scale.dtype) * scale[None, None]).astype(k.dtype))


def _as_kernel_operand(argname: str, a: Any, batch_shape: tuple[int, ...], tail: tuple[int, int, int]):
  """Checks that ``a`` broadcasts to ``[batch..., heads, q_len, kv_len]`` and folds its batch dims into one."""
  if a is None:
    return None
  a = jnp.asarray(a)
  target = batch_shape + tail
  try:
    broadcasts = a.ndim <= len(target) and np.broadcast_shapes(a.shape, target) == target
  except ValueError:
    broadcasts = False
  if not broadcasts:
    _fail(argname, f"with shape {a.shape} does not broadcast to [batch..., heads, q_len, kv_len] = {target}")
  a = a.reshape((1,) * (len(target) - a.ndim) + a.shape)
  lead, rest = a.shape[:len(batch_shape)], a.shape[len(batch_shape):]
  if all(d == 1 for d in lead):
    return a.reshape((1,) + rest)
  return jnp.broadcast_to(a, batch_shape + rest).reshape((math.prod(batch_shape),) + rest)


def _check_bias(bias: Any) -> Any:
  if bias is not None:
    dtype = jnp.asarray(bias).dtype
    if dtype == bool or not jnp.issubdtype(dtype, jnp.number):
      _fail("bias", f"must be a numeric array added to the logits; got dtype {dtype} (pass booleans as mask)",
            TypeError)
  return bias


def _check_mask(mask: Any) -> Any:
  """Bool masks pass through; numeric masks (Flax builds float32 ones) mean nonzero = attend."""
  if mask is None:
    return None
  mask = jnp.asarray(mask)
  if mask.dtype != bool:
    if not jnp.issubdtype(mask.dtype, jnp.number):
      _fail("mask", f"must be a bool array (True = attend); got dtype {mask.dtype}", TypeError)
    mask = mask != 0
  return mask


def _check_int_array(argname: str, a: Any, shape: tuple[int, ...], what: str) -> Array:
  """``a`` as int32 of exactly ``shape``; TypeError for a non-integer dtype, ValueError for another shape."""
  arr = jnp.asarray(a)
  if arr.dtype == bool or not jnp.issubdtype(arr.dtype, jnp.integer):
    _fail(argname, f"must be an integer array {what}; got dtype {arr.dtype}", TypeError)
  if arr.shape != shape:
    _fail(argname, f"must have shape {what} = {shape}; got shape {arr.shape}")
  return arr.astype(jnp.int32)


def _check_segments(q_segment_ids, kv_segment_ids, query_seq_lengths, key_value_seq_lengths,
                    batch_shape: tuple[int, ...], q_len: int, kv_len: int) -> common.Segments | None:
  """The kernels' :class:`common.Segments` (batch dims folded into one), or None when none is given."""
  if q_segment_ids is None and kv_segment_ids is None and query_seq_lengths is None and (
      key_value_seq_lengths is None):
    return None
  batch = math.prod(batch_shape)
  if (q_segment_ids is None) != (kv_segment_ids is None):
    given, missing = (("q_segment_ids", "kv_segment_ids") if kv_segment_ids is None
                      else ("kv_segment_ids", "q_segment_ids"))
    if q_len != kv_len:
      _fail(missing, f"is required when {given} is given and q_len ({q_len}) != kv_len ({kv_len}); "
            f"got None")
    # Self-attention over one packed sequence: the same ids on both sides.
    q_segment_ids = kv_segment_ids = q_segment_ids if kv_segment_ids is None else kv_segment_ids
  q_ids = kv_ids = q_lengths = kv_lengths = None
  if q_segment_ids is not None:
    q_ids = _check_int_array("q_segment_ids", q_segment_ids, batch_shape + (q_len,), "[batch..., q_len]")
    kv_ids = _check_int_array("kv_segment_ids", kv_segment_ids, batch_shape + (kv_len,), "[batch..., kv_len]")
    q_ids, kv_ids = q_ids.reshape(batch, q_len), kv_ids.reshape(batch, kv_len)
  lengths = []
  for name, value, full in (("query_seq_lengths", query_seq_lengths, q_len),
                            ("key_value_seq_lengths", key_value_seq_lengths, kv_len)):
    if value is not None:
      concrete = metrics.concrete_value(value)  # before conversion, which jit would trace
      value = _check_int_array(name, value, batch_shape, "[batch...]")
      if concrete is not None and np.any((concrete < 0) | (concrete > full)):
        _fail(name, f"must be in [0, {full}] (the sequence's length); got {concrete.tolist()}")
      if concrete is None:
        _check_at_run_time(name, (value >= 0) & (value <= full), f"in [0, {full}]", value)
      value = value.reshape(batch)
    lengths.append(value)
  q_lengths, kv_lengths = lengths
  return common.Segments(q_ids, kv_ids, q_lengths, kv_lengths)


def _check_window(local_window_size: Any) -> tuple[int, int] | None:
  """``(left, right)`` from an int or a pair of non-negative ints (as ``jax.nn.dot_product_attention``)."""
  if local_window_size is None:
    return None
  pair = local_window_size
  if isinstance(pair, (int, np.integer)) and not isinstance(pair, (bool, np.bool_)):
    pair = (pair, pair)
  if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and all(
      isinstance(w, (int, np.integer)) and not isinstance(w, (bool, np.bool_)) for w in pair)):
    _fail("local_window_size", f"must be None, an int or a (left, right) pair of ints; got "
          f"{local_window_size!r}", TypeError)
  if pair[0] < 0 or pair[1] < 0:
    _fail("local_window_size", f"must be non-negative (query i sees keys i - left <= j <= i + right); got "
          f"{local_window_size!r}")
  return int(pair[0]), int(pair[1])


FULLY_MASKED_ROWS = ("zero", "mean")


def _check_fully_masked_rows(value: Any) -> None:
  if value not in FULLY_MASKED_ROWS:
    _fail("fully_masked_rows", f"must be one of {', '.join(map(repr, FULLY_MASKED_ROWS))}; got {value!r}")


def _check_dropout(dropout_rate: Any, deterministic: Any, dropout_rng: Any) -> bool:
  """Validates the dropout arguments; returns whether dropout is active."""
  rate = metrics.concrete_value(dropout_rate)
  if rate is None or rate.ndim != 0 or not np.issubdtype(rate.dtype, np.number) or rate.dtype == bool:
    _fail("dropout_rate", f"must be a Python number in [0, 1); got {dropout_rate!r}", TypeError)
  if not 0.0 <= float(rate) < 1.0:
    _fail("dropout_rate", f"must be in [0, 1); got {float(rate)}")
  if not isinstance(deterministic, (bool, np.bool_)):
    _fail("deterministic", f"must be a Python bool; got {deterministic!r}", TypeError)
  active = (not deterministic) and float(rate) > 0.0
  if active and dropout_rng is None:
    _fail("dropout_rng", f"is required when dropout is active (dropout_rate={float(rate)}, "
          "deterministic=False); pass a PRNG key or deterministic=True")
  return active


# "auto" picks the blockwise kernel once the reference would materialise a float32 logits array of more than
# this many bytes (batch * heads * q_len * kv_len * 4). Beyond it the reference's memory grows quadratically,
# and on a 2-core CPU (docs/kernels.md, "Reference") the blockwise forward+backward was already as fast or faster
# for six of seven metrics at 8 heads x 512 x 512 (8 MiB; cosine 10% slower).
AUTO_REFERENCE_MAX_BYTES = 4 * 2**20


def _resolve_kernel(implementation: Any) -> Any:
  """A registered name or a hashable kernel object, as the kernel itself (not "auto")."""
  if isinstance(implementation, str):
    return kernels.get(implementation)  # raises ValueError listing the registered names
  if callable(implementation):
    try:
      hash(implementation)
    except TypeError:
      _fail("implementation", f"must be a registered name or a hashable kernel object; got {implementation!r}",
            TypeError)
    return implementation
  return kernels.get(implementation)  # a non-string, non-callable value: the registry's error lists the names


def _unsupported(kernel: Any, request: base.Request) -> str | None:
  # A plain callable without the protocol's ``unsupported`` is trusted to handle what it is given.
  ask = getattr(kernel, "unsupported", None)
  return None if ask is None else ask(request)


def _select_kernel(implementation: Any, request: base.Request, platform: str | None = None,
                   device_kind: str | None = None) -> Any:
  """The kernel to run. Explicit names and kernel objects are honoured (or raise the kernel's reason when it
  declines the request); "auto" chooses by evidence. On a GPU (``platform``, default ``jax.default_backend()``;
  ``device_kind``, default the first device's, names its class): a gram metric goes to the routed kernel on
  cuDNN (:mod:`kernels.routed`, exact algebra onto the platform's flash attention) whenever it accepts the
  request, and any metric to the fused "pallas" kernel where :mod:`kernels.evidence` holds a measurement on that
  class of GPU, for that metric, head_dim and dtype, in which it beat the blockwise kernel; a declined routed or
  evidenced pallas kernel logs its reason. Elsewhere, and on a GPU otherwise, the reference whenever weights are
  requested or its logits are small, else the blockwise kernel unless it declines (e.g. a dropout key it cannot
  draw tile by tile)."""
  if implementation is None or implementation == "auto":
    if (platform or jax.default_backend()) == "gpu":
      chosen = _gpu_choice(request, device_kind if device_kind is not None else jax.devices()[0].device_kind)
      if chosen is not None:
        return chosen
    reference = kernels.get("reference")
    logits_bytes = request.batch * request.num_heads * request.q_len * request.kv_len * 4
    if request.return_weights or logits_bytes <= AUTO_REFERENCE_MAX_BYTES:
      return reference
    blockwise = kernels.get("blockwise")
    return blockwise if _unsupported(blockwise, request) is None else reference
  kernel = _resolve_kernel(implementation)
  reason = _unsupported(kernel, request)
  if reason is not None:
    _fail("implementation", f"{implementation!r} {reason}")
  return kernel


# What "auto" routes gram metrics to on a GPU: cuDNN's flash attention, which XLA does not pick by itself.
_ROUTED_CUDNN = kernels.Routed(implementation="cudnn")


def _gpu_choice(request: base.Request, device_kind: str) -> Any:
  """The routed or fused kernel "auto" takes on a GPU, or None for the reference/blockwise rule."""
  record = metrics.get(request.metric)
  if not record.parametric and isinstance(record.form, metrics.Gram):
    reason = _unsupported(_ROUTED_CUDNN, request)
    if reason is None:
      return _ROUTED_CUDNN
    _log_fallback("routed (cuDNN)", reason)
  if kernels.evidence.pallas_beats_blockwise(kernels.evidence.gpu_class(device_kind), request.metric,
                                             request.head_dim, request.dtype):
    pallas = kernels.get("pallas")
    reason = _unsupported(pallas, request)
    if reason is None:
      return pallas
    _log_fallback("fused 'pallas'", reason)
  return None


@functools.lru_cache(maxsize=64)
def _log_fallback(kernel: str, reason: str) -> None:
  # Once per distinct reason: "auto" runs at every trace, and a training loop would repeat it at each one.
  _LOG.warning("implementation='auto': the %s kernel %s; using the reference or blockwise kernel", kernel, reason)


def _sow_weights(module: Any, weights: Array) -> None:
  """Stores weights where Flax's own attention stores them, for Linen and NNX modules alike."""
  from flax import linen, nnx  # Flax is only needed when a Flax module asks for its weights.

  if isinstance(module, linen.Module):
    module.sow("intermediates", "attention_weights", weights)
  elif isinstance(module, nnx.Module):
    module.sow(nnx.Intermediate, "attention_weights", weights)
  else:
    _fail("module", f"must be a flax.linen or flax.nnx Module; got {type(module).__name__}", TypeError)


def _fully_masked_fallback(kernel, q, k, v, lam, segments, dropout, precision, acc) -> Array:
  """What Flax and ``jax.nn`` give a query row that sees no key: their large finite negative logits make its
  softmax uniform over all ``S`` keys, so the row is the mean of the values (dropout applied to the uniform
  weights). ``jax.nn`` then zeroes rows past ``query_seq_lengths``; so does this."""
  batch, q_len, num_heads, _ = q.shape
  kv_len, num_kv = v.shape[1], v.shape[2]
  if dropout is None:
    mean = jnp.mean(v.astype(acc), axis=1).astype(v.dtype)  # [B, K, Dv]
    fallback = jnp.repeat(mean, num_heads // num_kv, axis=1)[:, None]  # [B, 1, H, Dv]
  else:
    # Zero queries under metric "dot" give logits 0 everywhere: the same kernel's uniform weights, with its
    # dropout draw for every (row, key).
    fallback = kernel(jnp.zeros_like(q), k, v, lam=jnp.ones_like(lam), bias=None, mask=None, segments=None,
                      local_window=None, metric="dot", p=2.0, is_causal=False, dropout=dropout,
                      precision=precision, return_weights=False).out
  if segments is not None and segments.q_lengths is not None:
    real = jnp.arange(q_len).reshape(1, q_len, 1, 1) < segments.q_lengths.reshape(batch, 1, 1, 1)
    fallback = jnp.where(real, fallback, jnp.zeros((), fallback.dtype))
  return fallback


@functools.partial(jax.jit, static_argnames=("kernel", "metric", "p_static", "is_causal", "local_window",
                                             "dropout_rate", "broadcast_dropout", "precision", "return_weights",
                                             "fully_masked_rows"))
def _attend(q, k, v, lam, bias, mask, segments, p_traced, dropout_rng, metric_weights=None, *, kernel, metric,
            p_static, is_causal, local_window, dropout_rate, broadcast_dropout, precision, return_weights,
            fully_masked_rows) -> common.AttentionResult:
  dropout = None if dropout_rng is None else common.Dropout(dropout_rate, dropout_rng, broadcast_dropout)
  seen = common.visibility(q.shape[1], k.shape[1], q.shape[2], k.shape[2], mask=mask, segments=segments,
                           is_causal=is_causal, local_window=local_window)
  q_seen, k_seen, v_seen = common.hide_unseen(q, k, v, seen)
  p = p_static if p_traced is None else p_traced
  if metric_weights is not None:
    # After the hiding: a hidden key's garbage never meets the weights (0 * NaN would reach their gradient).
    q_seen, k_seen = _weighted_features(q_seen, k_seen, metric_weights, metric, p)
  result = kernel(
      q_seen, k_seen, v_seen, lam=lam, bias=bias, mask=mask, segments=segments, local_window=local_window,
      metric=metric, p=p, is_causal=is_causal, dropout=dropout, precision=precision,
      return_weights=return_weights)
  if fully_masked_rows == "zero":
    return result
  acc = metrics.accumulation_dtype(q.dtype)
  empty = jnp.isneginf(result.lse)  # [B, H, T]
  fallback = _fully_masked_fallback(kernel, q, k, v, lam, segments, dropout, precision, acc)
  out = jnp.where(empty.transpose(0, 2, 1)[..., None], fallback, result.out)
  weights = result.weights
  if weights is not None:
    uniform = jnp.asarray(1.0 / k.shape[1], weights.dtype)
    weights = jnp.where(empty[..., None], uniform, weights)
  return common.AttentionResult(out, result.lse, weights)


def distance_attention(query, key, value, bias=None, mask=None, *, metric="l1", lam=1.0, p=2.0,
                       metric_weights=None, is_causal=False, q_segment_ids=None, kv_segment_ids=None,
                       query_seq_lengths=None, key_value_seq_lengths=None, local_window_size=None,
                       fully_masked_rows="zero", broadcast_dropout=True, dropout_rng=None, dropout_rate=0.0,
                       deterministic=False, dtype=None, precision=None, implementation=None, return_weights=False,
                       return_residual=False, **flax_kwargs):
  """Attention whose logits are negative distances between queries and keys.

  ``logits[..., h, i, j] = -lam[h] * distance(query[..., i, h, :], key[..., j, h', :]) / sqrt(head_dim)``
  (``+lam * q.k / sqrt(head_dim)`` for ``metric="dot"``), plus ``bias``, masked where ``mask`` is False or
  ``j > i`` under ``is_causal``; ``weights = softmax_j(logits)``; ``out = weights @ value``.

  Hidden positions never leak: a key that no query may attend to (by ``mask``, lengths, segment ids, the window
  or causality) influences no output and no gradient of any other input, whatever its key and value hold
  (finite, huge, inf or NaN), for every metric and kernel; likewise a query row that may attend to no key.
  (Under ``fully_masked_rows="mean"`` a row that sees no key averages every value, as Flax does.) Empty
  sequences (``q_len`` or ``kv_len`` 0) and an empty batch are allowed: with no keys every row is 0.

  Args:
    query: ``[batch..., q_len, heads, head_dim]``, floating point.
    key: ``[batch..., kv_len, kv_heads, head_dim]``; ``heads`` must be a multiple of ``kv_heads`` (query head
      ``h`` reads kv head ``h // (heads // kv_heads)``, grouped-query attention).
    value: ``[batch..., kv_len, kv_heads, v_dim]``.
    bias: added to the logits; broadcastable to ``[batch..., heads, q_len, kv_len]``.
    mask: True = attend; broadcastable like ``bias``. Numeric masks (Flax's ``make_attention_mask`` returns
      float32) mean nonzero = attend. A query row with nothing to attend to yields output 0 and zero gradients
      (see ``fully_masked_rows``). The per-position arguments below mask without a ``[T, S]`` array.
    metric: a name in ``metrics.available()`` (shipped or added with ``metrics.register``) or a ``DistanceType``.
    lam: positive scale, a scalar or one per query head (``[heads]``); may be traced (learned). A concrete
      ``lam <= 0`` (or NaN, inf) raises here; a traced one is checked only inside :func:`checked`.
    p: the order of a parametric metric such as ``"lp"`` (any ``p > 0``, ``inf`` allowed); may be traced
      (learned), and is then checked only inside :func:`checked`. Other metrics ignore it, unchecked.
    metric_weights: the non-negative per-feature weights ``w`` of a weighted metric (``"weighted_l1"``: ``sum_d
      w_d |q_d - k_d|``; ``"weighted_l2"``: ``sqrt(sum_d w_d (q_d - k_d)^2)``; a registered record with a
      ``feature_scale``), a scalar, ``[head_dim]`` (every head), ``[kv_heads, head_dim]`` (one row per key/value
      head, shared by the query heads of its group) or ``[heads, head_dim]`` (one row per query head; with fewer
      kv heads the keys and values are then repeated to the query heads, so grouped-query attention loses its
      smaller keys and values). None (default) is all ones, the unweighted metric. May be traced (learned) and
      differentiated; a concrete negative or non-finite weight raises here, a traced one is checked only inside
      :func:`checked`. The kernels see the features rescaled by the record's ``feature_scale(w, p)`` (``w``,
      ``sqrt(w)``), after hidden positions are zeroed: the base metric of the rescaled features is the weighted
      metric exactly, so every kernel, transformation and masking rule applies unchanged. Passing weights with
      an unweighted metric is a ValueError.
    is_causal: mask keys after the query position (``j > i``, aligned at position 0 as in
      ``jax.nn.dot_product_attention``); kernels may skip the masked blocks.
    q_segment_ids, kv_segment_ids: integer ``[batch..., q_len]`` / ``[batch..., kv_len]``; query ``i`` sees key
      ``j`` only if their ids are equal (packed sequences; id 0 may mark padding, as in Flax and MaxText). One
      of them alone means the same ids on both sides (needs ``q_len == kv_len``).
    query_seq_lengths, key_value_seq_lengths: integer ``[batch...]``; positions at or past the length are
      padding (queries see nothing, keys are seen by nothing), as in ``jax.nn.dot_product_attention``. Concrete
      lengths outside ``[0, length]`` raise here; traced ones are checked only inside :func:`checked`.
    local_window_size: ``None``, an int ``w`` (= ``(w, w)``) or ``(left, right)``: query ``i`` sees keys
      ``i - left <= j <= i + right``; kernels may skip the blocks outside. All of ``mask``, ``is_causal``, the
      ids, the lengths and the window combine by AND.
    fully_masked_rows: ``"zero"`` (default): a query row that sees no key outputs 0 with zero gradients.
      ``"mean"``: such a row outputs the mean of the values (uniform weights over all keys, dropout applied),
      which is what Flax and ``jax.nn`` compute (they mask with a large finite negative), except rows past
      ``query_seq_lengths``, which are 0 as in ``jax.nn``. ``make_attention_fn`` uses ``"mean"``.
    broadcast_dropout, dropout_rng, dropout_rate, deterministic: attention dropout with Flax's semantics and
      Flax's random draw, applied to the weights after the softmax.
    dtype: the computation dtype (default: the promoted dtype of query, key and value). Reductions and softmax
      statistics accumulate in float32 (float64 for float64 inputs); the output is in ``dtype``.
    precision: the precision of ``weights @ value``. Distance matmuls always run at ``Precision.HIGHEST``.
    implementation: ``None``/``"auto"``, a registered kernel name (``kernels.available()``), or a kernel object
      such as ``kernels.Blockwise(block_q=128, block_k=256)``. ``"auto"`` uses ``"reference"`` while its logits
      would take at most ``AUTO_REFERENCE_MAX_BYTES`` (and whenever weights are requested), else
      ``"blockwise"``, whose memory is linear in sequence length. On a GPU ``"auto"`` first sends gram metrics
      (dot, cosine, sqeuclidean) to ``kernels.Routed("cudnn")``, cuDNN's flash attention by exact algebra, and
      any metric to the fused ``"pallas"`` kernel where ``kernels.evidence`` records it beating blockwise on
      that GPU class; where either declines (weights, dropout, float32 on cuDNN, ...) it logs why.
    return_weights: also return the softmax weights ``[batch..., heads, q_len, kv_len]`` (before dropout,
      accumulation dtype unless ``force_fp32_for_softmax`` is given). Asking for weights materialises them.
    return_residual: also return the log-sum-exp of each query row's logits, ``lse [batch..., q_len, heads]``
      (``jax.nn.dot_product_attention``'s name and layout; with ``metric="dot"`` and ``lam=1`` it is
      ``jax.nn``'s residual), in the accumulation dtype (float32, or float64 for float64 inputs): what every
      kernel holds for its backward pass, so it costs nothing extra. It is differentiable (``jax.nn`` stops
      its gradient). A row that sees no key has ``lse = -inf`` with zero gradients, under either
      ``fully_masked_rows`` (``jax.nn`` gives a large finite negative there, from its masking constant).
    **flax_kwargs: what Flax's attention modules pass: ``module`` (sow the weights into its intermediates, as
      Flax does), ``force_fp32_for_softmax`` (given, Flax's dtype rules apply: False returns and sows the
      weights in ``dtype``; True with a ``dtype`` narrower than float32 gives float32 weights and a float32
      output, the values mixed in float32; the softmax statistics are float32 or wider either way),
      ``promote_dtype`` (ignored: promotion follows ``dtype``); einsum overrides must be None.

  Returns:
    ``[batch..., q_len, heads, v_dim]`` in ``dtype``; with ``return_weights``, ``(out, weights)``; with
    ``return_residual``, ``(out, lse)``; with both, ``(out, weights, lse)``.
  """
  module = _check_flax_kwargs(flax_kwargs)
  metric = metrics.canonical_name(metric)
  if metrics.get(metric).parametric:
    p = metrics.check_p(p)
    if not isinstance(p, float):
      _check_at_run_time("p", jnp.logical_and(p > 0, jnp.logical_not(jnp.isnan(p))), "> 0 (inf allowed)", p)
  else:
    p = 2.0  # the metric has no order: whatever was passed is ignored, unchecked and untraced
  if not isinstance(is_causal, (bool, np.bool_)):
    _fail("is_causal", f"must be a Python bool; got {is_causal!r}", TypeError)
  for name, flag in (("return_weights", return_weights), ("return_residual", return_residual)):
    if not isinstance(flag, (bool, np.bool_)):
      _fail(name, f"must be a Python bool; got {flag!r}", TypeError)
  _check_fully_masked_rows(fully_masked_rows)
  query, key, value = _check_arrays(query, key, value, dtype)
  batch_shape = query.shape[:-3]
  q_len, num_heads, _ = query.shape[-3:]
  kv_len, num_kv_heads, v_dim = value.shape[-3:]
  lam = _check_lam(lam, num_heads, query.dtype)
  metric_weights = _check_metric_weights(metric_weights, metric, num_heads, num_kv_heads, query.shape[-1],
                                         query.dtype)
  if metric_weights is not None and metric_weights.shape[0] == num_heads != num_kv_heads:
    # One weight row per query head: the query heads of a group compare with differently scaled keys.
    key, value = (jnp.repeat(a, num_heads // num_kv_heads, axis=-2) for a in (key, value))
    num_kv_heads = num_heads
  tail = (num_heads, q_len, kv_len)
  bias = _as_kernel_operand("bias", _check_bias(bias), batch_shape, tail)
  mask = _as_kernel_operand("mask", _check_mask(mask), batch_shape, tail)
  segments = _check_segments(q_segment_ids, kv_segment_ids, query_seq_lengths, key_value_seq_lengths,
                             batch_shape, q_len, kv_len)
  local_window = _check_window(local_window_size)
  dropout_active = _check_dropout(dropout_rate, deterministic, dropout_rng)
  need_weights = bool(return_weights) or module is not None
  # Flax's rule: force_fp32_for_softmax with a narrower dtype keeps the weights, so the output, in float32.
  force_fp32 = flax_kwargs.get("force_fp32_for_softmax")
  weights_dtype = None if force_fp32 is None else query.dtype
  if force_fp32 and jnp.finfo(query.dtype).bits < 32:
    value, weights_dtype = value.astype(jnp.float32), jnp.float32
  batch = math.prod(batch_shape)
  request = base.Request(
      batch=batch, q_len=q_len, kv_len=kv_len, num_heads=num_heads, num_kv_heads=num_kv_heads, metric=metric,
      is_causal=bool(is_causal), return_weights=need_weights, return_residual=bool(return_residual),
      dropout=common.Dropout(float(dropout_rate), dropout_rng, bool(broadcast_dropout)) if dropout_active else None,
      bias_shape=None if bias is None else tuple(bias.shape),
      mask_shape=None if mask is None else tuple(mask.shape), has_segments=segments is not None,
      local_window=local_window, traced_p=not isinstance(p, float), dtype=jnp.dtype(query.dtype).name,
      head_dim=int(query.shape[-1]), v_dim=int(value.shape[-1]))
  kernel = _select_kernel(implementation, request)
  if batch * q_len * kv_len * num_heads == 0:
    out_and_weights = _empty_result(query, value, batch_shape + tail, need_weights, return_weights, weights_dtype,
                                    module)
    if not return_residual:
      return out_and_weights
    # No key to attend to (or nothing to compute): every row's normaliser is 0.
    lse = jnp.full(batch_shape + (q_len, num_heads), -jnp.inf, metrics.accumulation_dtype(query.dtype))
    return (*out_and_weights, lse) if return_weights else (out_and_weights, lse)

  result = _attend(
      query.reshape((batch,) + query.shape[-3:]), key.reshape((batch,) + key.shape[-3:]),
      value.reshape((batch,) + value.shape[-3:]), lam, bias, mask, segments,
      None if isinstance(p, float) else p, dropout_rng if dropout_active else None, metric_weights,
      kernel=kernel, metric=metric, p_static=p if isinstance(p, float) else None,
      is_causal=bool(is_causal), local_window=local_window, dropout_rate=float(dropout_rate),
      broadcast_dropout=bool(broadcast_dropout), precision=precision, return_weights=need_weights,
      fully_masked_rows=fully_masked_rows)
  out = result.out.reshape(batch_shape + (q_len, num_heads, v_dim))
  lse = None
  if return_residual:
    lse = result.lse.transpose(0, 2, 1).reshape(batch_shape + (q_len, num_heads))
  if not need_weights:
    return out if lse is None else (out, lse)
  weights = result.weights.reshape(batch_shape + tail)
  if weights_dtype is not None:
    weights = weights.astype(weights_dtype)
  if module is not None:
    _sow_weights(module, weights)
  result = (out, weights) if return_weights else (out,)
  result = result if lse is None else result + (lse,)
  return result if len(result) > 1 else out


def _empty_result(query, value, weights_shape, need_weights, return_weights, weights_dtype, module):
  """No query, no key or no batch row: the output has no entries or, with no key to attend to, is 0 (as a
  fully masked row is); it depends on no input, so every gradient is 0."""
  out = jnp.zeros(query.shape[:-1] + value.shape[-1:], value.dtype)
  if not need_weights:
    return out
  weights = jnp.zeros(weights_shape, weights_dtype or metrics.accumulation_dtype(query.dtype))
  if module is not None:
    _sow_weights(module, weights)
  return (out, weights) if return_weights else out


_FIXABLE = ("lam", "p", "metric_weights", "implementation", "is_causal", "fully_masked_rows", "local_window_size")


def make_attention_fn(metric: str | metrics.DistanceType = "l1", **fixed: Any) -> Callable[..., Array]:
  """An ``attention_fn`` for ``flax.linen.MultiHeadDotProductAttention`` and ``flax.nnx.MultiHeadAttention``.

  ``lam`` starts calibrated: unless fixed, each call uses ``initializers.default_lambda(metric, head_dim, p)``
  for the ``head_dim`` of its query (1 for ``dot``, so ``make_attention_fn("dot")`` is Flax's attention), the
  lam at which the metric's logits are as sharp as dot-product attention's. At ``lam = 1`` cosine and l2 at
  ``head_dim`` 64 would attend almost uniformly. ``lam`` may be fixed to a number or to a traced value such as
  a parameter of the enclosing module, which is how a stock Flax module learns it (see the docs' "Flax modules"
  page); ``da.DistanceBasedAttention`` and ``da.nnx.DistanceBasedAttention`` learn it per head by themselves.

  ``fixed`` may set ``lam``, ``p``, ``metric_weights`` (a weighted metric's, e.g. a module's parameter),
  ``implementation``, ``is_causal`` (ORed with the caller's),
  ``local_window_size`` and ``fully_masked_rows``. The returned function takes every keyword argument those
  modules pass (``module`` included, so ``sow_weights`` works) and follows Flax's rules where the formula leaves
  a choice, so that swapping it into a Flax model changes nothing for ``metric="dot"``: a query row that sees no
  key gives the mean of the values (``fully_masked_rows="mean"`` unless fixed otherwise), and
  ``force_fp32_for_softmax`` sets the weights' and output's dtypes as Flax's ``dot_product_attention`` does.
  Flax's quantisation hooks ``qk_attn_weights_einsum`` and ``attn_weights_value_einsum`` are accepted and, when
  set, refused with a TypeError: a distance has no single einsum to swap.
  """
  metric = metrics.canonical_name(metric)
  unknown = sorted(set(fixed) - set(_FIXABLE))
  if unknown:
    raise TypeError(f"make_attention_fn: cannot fix {', '.join(unknown)}; the arguments that can be fixed are "
                    f"{', '.join(_FIXABLE)}")
  parametric = metrics.get(metric).parametric
  if "p" in fixed and parametric:
    metrics.check_p(fixed["p"])
  if fixed.get("metric_weights") is not None:
    if not metrics.get(metric).weighted:
      raise ValueError(f"make_attention_fn: metric_weights is only for a weighted metric (a record with a "
                       f"feature_scale); metric={metric!r} takes no feature weights")
    metrics.check_metric_weights(fixed["metric_weights"], "make_attention_fn")
  if "implementation" in fixed and fixed["implementation"] not in (None, "auto"):
    _resolve_kernel(fixed["implementation"])
  if "local_window_size" in fixed:
    _check_window(fixed["local_window_size"])
  fixed.setdefault("fully_masked_rows", "mean")
  _check_fully_masked_rows(fixed["fully_masked_rows"])
  fixed_causal = fixed.pop("is_causal", False)
  calibrated = "lam" not in fixed
  # The order the calibration is measured at: the fixed one when it is a number, else lp's usual 2.
  p_for_lam = fixed["p"] if parametric and isinstance(fixed.get("p"), (int, float)) else 2.0

  def attention_fn(query, key, value, bias=None, mask=None, broadcast_dropout=True, dropout_rng=None,
                   dropout_rate=0.0, deterministic=False, dtype=None, precision=None, module=None,
                   is_causal=False, force_fp32_for_softmax=False, qk_attn_weights_einsum=None,
                   attn_weights_value_einsum=None):
    for name, hook in (("qk_attn_weights_einsum", qk_attn_weights_einsum),
                       ("attn_weights_value_einsum", attn_weights_value_einsum)):
      if hook is not None:
        raise TypeError(f"{metric}_attention: {name} must be None (got {hook!r}): Flax's einsum hooks quantise "
                        "the two einsums of dot-product attention, and distance attention computes its logits "
                        "without such an einsum; use Flax's own dot_product_attention for quantised attention")
    lam = fixed.get("lam")
    if calibrated:
      lam = initializers.default_lambda(metric, int(jnp.shape(query)[-1]), float(p_for_lam))
    return distance_attention(query, key, value, bias, mask, metric=metric, is_causal=bool(is_causal or fixed_causal),
                              broadcast_dropout=broadcast_dropout, dropout_rng=dropout_rng,
                              dropout_rate=dropout_rate, deterministic=deterministic, dtype=dtype,
                              precision=precision, module=module,
                              force_fp32_for_softmax=bool(force_fp32_for_softmax),
                              **dict(fixed, lam=lam))

  attention_fn.__name__ = f"{metric}_attention"
  return attention_fn
