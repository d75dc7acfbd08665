"""Gram metrics on the platform's own fused attention (``jax.nn.dot_product_attention``), by exact algebra.

A gram record whose ``fn`` is affine in its grams, ``fn = c0 + a x.y + sum_b c_b sum_d y_d^b + sum_a c_a
sum_d x_d^a`` (dot, cosine and sqeuclidean are), gives the logits

    logits_ij = sign * lam / sqrt(D) * (c0 + a q_i.k_j + sum_b c_b |k_j|_b + sum_a c_a |q_i|_a)

(``sign`` -1 for a distance, +1 for a similarity). The terms of the query alone (``c0`` and ``|q_i|_a``) are the
same for every key of a row, so the softmax drops them: the output and every gradient of it are those of dot
attention between ``q' = [sign a lam q, sign lam c_b, ...]`` and ``k' = [k, |k|_b, ...]`` at ``scale =
1/sqrt(D)``, and only the log-sum-exp gets them back. Hence:

* dot: ``q' = lam q``; cosine: the rows normalised first (as the record's ``normalize`` says) and ``q' = lam
  q^``; sqeuclidean: ``-|q - k|^2 = 2 q.k - |k|^2 - |q|^2``, so ``q' = [2 lam q, -lam]``, ``k' = [k, |k|^2]``.
* ``lam`` is folded into ``q'`` with ``jnp`` operations, so it stays traced and learnable; ``scale`` is the
  static ``1/sqrt(D)`` of the caller's head_dim, not of the padded one.
* Translation-invariant records are centred on the mean key first, as every other kernel centres them (the
  reference through :func:`metrics.gram.centered`, the fused kernel in its layout): the mean is taken over the
  keys the kernel receives, in which ``distance_attention`` has already zeroed every key no query sees
  (:func:`common.hide_unseen`), so no hidden value reaches it, and the centring (exact by translation
  invariance) keeps the ``|k|^2`` column small.
* In bfloat16 and float16 each key-only term is carried by three columns, ``[hi, lo, hi]`` against ``q'``'s
  ``[h, h, l]`` (``hi + lo`` and ``h + l`` the float32 values split into two narrow numbers): the backend
  accumulates the products in float32, so ``|k|^2`` and its coefficient reach the logits to about 2^-16 instead
  of the 2^-9 one narrow column keeps, which at head_dim 64 would move every logit by ``lam |k|^2 2^-9 / 8``,
  about 0.016 ``lam``, differently for each key.
* The head axis is zero-padded to one width for ``q'``, ``k'`` and ``v`` (``jax.nn`` takes a value as wide as
  the key), a multiple of 8 for cuDNN; the padding adds zeros to every product and the output is sliced back.

Masks go through ``jax.nn``'s own arguments (``mask``, ``is_causal``, ``query_seq_lengths``,
``key_value_seq_lengths``, ``local_window_size``); segment ids, which ``jax.nn`` has no argument for, become a
dense ``[B, 1, T, S]`` mask. A query row that sees no key gets uniform weights from ``jax.nn`` (its masking
constant is finite); the kernel sets such rows to 0 with ``lse = -inf`` (the library's rule, from
:func:`common.visibility`), which also cuts their cotangent, so they send no gradient anywhere;
``fully_masked_rows="mean"`` is then ``distance_attention``'s own post-processing, as for every kernel.

What it does not do, with the reason ``unsupported`` gives: weights and dropout (``jax.nn`` has neither), an
elementwise metric or a gram record whose ``fn`` is not affine in its grams or whose terms pair two powers other
than ``x.y``, a traced ``p``, float64 (``jax.nn`` computes the softmax in float32), and on cuDNN what cuDNN
refuses (float32 inputs; a padded width over 128, or 256 from Hopper on; a window open to the right without
``is_causal``; a bias, mask or segment ids with an odd length). Limits that leave the numbers as defined: the
log-sum-exp comes from ``jax.nn``'s residual, which is rounded to the input dtype and carries no gradient
(``jax.nn`` stops it), and ``precision`` is not passed on (``jax.nn`` has no such argument). cuDNN's attention
is a ``custom_vjp``, so forward-mode autodiff (``jax.jvp``) does not go through ``implementation="cudnn"``;
through ``"xla"`` every transformation does.

Accuracy of the augmented form in bfloat16, against the self-check's bound (``experiments/selfcheck.py``: 5e-2
of the oracle's largest entry, float64 oracle on the same rounded inputs), measured on a CPU with jax's XLA
attention (what ``"routed"`` runs there) over selfcheck's five cases (GQA with a full bias, causal with a
broadcast bias, segment ids, lengths with a mask and a fully masked row, a causal window) at 300 queries x 200
keys, head_dim 64::

  .venv/bin/python experiments/selfcheck.py --implementations=routed,blockwise \
      --metrics=dot,cosine,sqeuclidean --dtypes=bfloat16 --q_len=300 --kv_len=200 --head_dim=64 --block=64

  worst error      routed: output  gradients    blockwise: output  gradients
  dot                      6.1e-3  7.5e-3                  2.6e-3  5.4e-3
  cosine                   3.0e-3  4.3e-3                  3.1e-3  7.0e-3
  sqeuclidean              6.7e-3  1.6e-2                  2.4e-3  4.2e-2

All 15 cases pass, the worst at a third of the bound. With one narrow column for ``|k|^2`` instead of the
three-column split, sqeuclidean's errors were 1.7e-2 and 4.6e-2, at 92% of the bound; the split is what leaves
a margin. The rest of the routed error is the rounding of ``lam q`` and of the centred, normalised vectors to
bfloat16 (the other kernels keep them in float32), about 2^-9 of each product. On cuDNN, ``experiments/
gpu_report.py`` measures the same against the reference at T = 1000, S = 1100.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from distattn_jax import metrics
from distattn_jax.kernels import base, common, registry
from distattn_jax.metrics import gram as gram_lib

Array = jax.Array

IMPLEMENTATIONS = (None, "xla", "cudnn")
# jax.nn computes the softmax in float32 whatever the input; cuDNN's flash attention takes 16-bit inputs only.
DTYPES = {None: ("float32", "bfloat16", "float16"), "xla": ("float32", "bfloat16", "float16"),
          "cudnn": ("bfloat16", "float16")}
_NARROW = ("bfloat16", "float16")
CUDNN_ALIGN = 8  # cuDNN's head dimension is a multiple of 8


class Route(NamedTuple):
  """An affine gram record as the routed kernel uses it: ``fn = c0 + xy * x.y + sum(c * sum_d y_d^b for b, c
  in key_terms) + sum(c * sum_d x_d^a for a, c in query_terms)``, with the record's sign, centring and
  normalisation."""

  sign: float
  xy: float
  key_terms: tuple[tuple[int, float], ...]
  query_terms: tuple[tuple[int, float], ...]
  c0: float
  center: bool
  normalize: bool


def _snap(c: float) -> float:
  # The coefficients are fitted in float32; 2, -1 or 0.5 come back within a few ulps, and the exact value
  # keeps the routed logits bit-comparable with the gram form's.
  snapped = round(c * 2**12) / 2**12
  return snapped if abs(snapped - c) <= 1e-5 * max(1.0, abs(c)) else c


@functools.lru_cache(maxsize=None)
def route(record: metrics.Metric) -> Route | str:
  """The :class:`Route` of ``record``, or the reason (a phrase) it has none. Keyed by the record, so a metric
  re-registered under the same name is examined anew."""
  if record.parametric or not isinstance(record.form, metrics.Gram):
    return f"route metric {record.name!r}: only gram forms reduce to dot-product attention, and it is elementwise"
  form = record.form
  if sum(1 for a, b in form.terms if a and b) > 1 or any(a and b and (a, b) != (1, 1) for a, b in form.terms):
    return (f"route metric {record.name!r}: its terms {form.terms} pair powers other than one x.y, which a dot "
            "product of augmented vectors cannot carry")
  # Probe fn on the grams of real vectors (so a clamp such as max(d2, 0) or clip(1 - xy, 0, 2) does not bind)
  # and fit an affine map; a non-affine fn leaves a residual.
  rng = np.random.default_rng(0)
  x = rng.standard_normal((24, 6)).astype(np.float32)
  y = rng.standard_normal((20, 6)).astype(np.float32) + 0.5
  if form.normalize:
    x /= np.linalg.norm(x, axis=-1, keepdims=True)
    y /= np.linalg.norm(y, axis=-1, keepdims=True)
  # unsupported() runs while a caller's function is traced: evaluate the probe now, not as part of that trace.
  with jax.ensure_compile_time_eval():
    grams = [np.broadcast_to(np.asarray(g, np.float64), (24, 20))
             for g in gram_lib.grams(form.terms, jnp.asarray(x), jnp.asarray(y))]
    try:
      values = np.asarray(form.fn(*(jnp.asarray(g, jnp.float32) for g in grams)), np.float64)
      values = np.broadcast_to(values, (24, 20)).ravel()
    except Exception as e:  # a fn that cannot take these grams is not routed; the reason says why
      return f"route metric {record.name!r}: its fn failed on probe grams ({type(e).__name__}: {e})"
  design = np.stack([np.ones_like(values)] + [g.ravel() for g in grams], axis=1)
  coef, *_ = np.linalg.lstsq(design, values, rcond=None)
  residual = np.max(np.abs(design @ coef - values)) / max(1.0, float(np.max(np.abs(values))))
  if not np.isfinite(residual) or residual > 1e-4:
    return (f"route metric {record.name!r}: its fn is not affine in its grams (an affine fit leaves {residual:.1e}),"
            " so no dot product of augmented vectors gives its logits")
  coef = [_snap(float(c)) for c in coef]
  xy, key_terms, query_terms = 0.0, [], []
  for (a, b), c in zip(form.terms, coef[1:]):
    if a and b:
      xy += c
    elif b:
      key_terms.append((b, c))
    else:
      query_terms.append((a, c))
  return Route(sign=1.0 if record.similarity else -1.0, xy=xy, key_terms=tuple(key_terms),
               query_terms=tuple(query_terms), c0=coef[0], center=record.translation_invariant,
               normalize=form.normalize)


def _split(x: Array, dtype) -> tuple[Array, Array]:
  """``x`` (float32) as ``hi + lo`` in ``dtype``; ``lo``'s gradient cancels ``hi``'s rounding, so the pair
  passes the gradient of ``x`` on unchanged."""
  hi = x.astype(dtype)
  return hi, (x - hi.astype(x.dtype)).astype(dtype)


def _cudnn_max_width() -> int:
  # jax's check_is_flash_attention: 256 from compute capability 9.0 (Hopper) on, 128 before.
  try:
    device = jax.devices()[0]
    major = int(str(getattr(device, "compute_capability", "0")).split(".")[0])
  except (RuntimeError, ValueError):
    return 128
  return 256 if major >= 9 else 128


@dataclasses.dataclass(frozen=True)
class Routed:
  """Gram metrics through ``jax.nn.dot_product_attention`` (registered as ``"routed"``, with
  ``implementation=None``: jax's own default backend, XLA today). ``implementation="cudnn"`` runs cuDNN's
  flash attention (16-bit inputs on an NVIDIA GPU); ``"xla"`` the portable one, on any backend.
  """

  implementation: str | None = None

  def __post_init__(self):
    if self.implementation not in IMPLEMENTATIONS:
      raise ValueError(f"Routed: implementation must be one of {IMPLEMENTATIONS}; got {self.implementation!r}")

  # jax.nn's residual is rounded to the input dtype and carries no gradient, so a differentiable lse is declined.
  capabilities = base.Capabilities(weights=False, dropout=False, traced_p=False, residual=False, memory="linear")

  def unsupported(self, request: base.Request) -> str | None:
    reason = base.unsupported(self.capabilities, request)
    if reason is not None:
      return reason
    found = route(metrics.get(request.metric))
    if isinstance(found, str):
      return f"cannot {found}"
    allowed = DTYPES[self.implementation]
    if request.dtype is not None and request.dtype not in allowed:
      why = ("cuDNN's flash attention takes 16-bit inputs" if self.implementation == "cudnn"
             else "jax.nn computes the softmax in float32")
      return f"cannot take {request.dtype} inputs (only {', '.join(allowed)}: {why})"
    if self.implementation != "cudnn":
      return None
    if request.head_dim is not None:
      width = _width(request.head_dim, request.v_dim or request.head_dim, found, request.dtype, CUDNN_ALIGN)
      limit = _cudnn_max_width()
      if width > limit:
        return (f"cannot run a head width of {width} on cuDNN (head_dim {request.head_dim} with the metric's "
                f"{width - request.head_dim} added or padding columns; at most {limit} on this GPU)")
    if request.local_window is not None and request.local_window[1] != 0 and not request.is_causal:
      return "cannot evaluate a local_window_size open to the right without is_causal on cuDNN"
    dense = request.has_bias or request.has_mask or request.has_segments
    if dense and (request.q_len % 2 or request.kv_len % 2):
      return (f"cannot apply a bias, mask or segment ids on cuDNN with an odd length (q_len {request.q_len}, "
              f"kv_len {request.kv_len}); cuDNN's backward with a bias needs even lengths")
    return None

  def __call__(self, q, k, v, *, lam, bias=None, mask=None, segments: common.Segments | None = None,
               local_window: tuple[int, int] | None = None, metric: str, p: Any = 2.0, is_causal: bool = False,
               dropout: common.Dropout | None = None, precision: Any = None,
               return_weights: bool = False) -> common.AttentionResult:
    # Called only for requests unsupported() accepted (base.Kernel): an affine gram metric, no weights, no
    # dropout, a dtype jax.nn (and the chosen backend) computes in.
    del p, dropout, precision, return_weights
    found = route(metrics.get(metric))
    batch, q_len, num_heads, head_dim = q.shape
    kv_len, num_kv, v_dim = k.shape[1], k.shape[2], v.shape[-1]
    dtype = jnp.result_type(q.dtype, k.dtype, v.dtype)
    acc = metrics.accumulation_dtype(dtype)
    align = CUDNN_ALIGN if self.implementation == "cudnn" else 1
    width = _width(head_dim, v_dim, found, jnp.dtype(dtype).name, align)

    qf, kf = q.astype(acc), k.astype(acc)
    if found.center:
      c = jax.lax.stop_gradient(jnp.mean(kf, axis=1, keepdims=True))  # [B, 1, K, D]
      qf = qf - jnp.repeat(c, num_heads // num_kv, axis=2)
      kf = kf - c
    if found.normalize:
      qf = qf * gram_lib.inverse_norm(jnp.sum(qf * qf, axis=-1, keepdims=True))
      kf = kf * gram_lib.inverse_norm(jnp.sum(kf * kf, axis=-1, keepdims=True))
    lam_h = lam.astype(acc).reshape(1, 1, num_heads, 1)  # broadcasts over [B, T, H, 1]
    q_cols = [(found.sign * found.xy * lam_h * qf).astype(dtype)]
    k_cols = [kf.astype(dtype)]
    narrow = jnp.dtype(dtype).name in _NARROW
    for b, c in found.key_terms:
      key_term = jnp.sum(kf if b == 1 else kf**b, axis=-1, keepdims=True)  # [B, S, K, 1]
      coef = jnp.broadcast_to(found.sign * c * lam_h, (batch, q_len, num_heads, 1))
      if narrow:
        k_hi, k_lo = _split(key_term, dtype)
        q_hi, q_lo = _split(coef, dtype)
        q_cols += [q_hi, q_hi, q_lo]
        k_cols += [k_hi, k_lo, k_hi]
      else:
        q_cols.append(coef.astype(dtype))
        k_cols.append(key_term.astype(dtype))
    q_aug = _pad_last(jnp.concatenate(q_cols, axis=-1), width)
    k_aug = _pad_last(jnp.concatenate(k_cols, axis=-1), width)
    v_aug = _pad_last(v.astype(dtype), width)

    segments = segments or common.Segments()
    if segments.q_ids is not None:
      same = segments.q_ids[:, None, :, None] == segments.kv_ids[:, None, None, :]  # [B, 1, T, S]
      mask = same if mask is None else jnp.logical_and(mask, same)
    if self.implementation == "cudnn":
      # cuDNN takes a bias (and a mask, which jax turns into one) only at full lengths.
      if bias is not None:
        bias = jnp.broadcast_to(bias, bias.shape[:2] + (q_len, kv_len)).astype(dtype)
      if mask is not None:
        mask = jnp.broadcast_to(mask, mask.shape[:2] + (q_len, kv_len))
    out, lse = jax.nn.dot_product_attention(
        q_aug, k_aug, v_aug, bias=bias, mask=mask, scale=1.0 / math.sqrt(head_dim), is_causal=bool(is_causal),
        query_seq_lengths=segments.q_lengths, key_value_seq_lengths=segments.kv_lengths,
        local_window_size=None if local_window is None else tuple(local_window),
        implementation=self.implementation, return_residual=True)
    out = out[..., :v_dim]

    # The query-only terms the softmax dropped come back in the log-sum-exp.
    row = jnp.full((batch, q_len, num_heads), found.c0, acc)
    for a, c in found.query_terms:
      row = row + c * jnp.sum(qf if a == 1 else qf**a, axis=-1)
    lse = (jax.lax.stop_gradient(lse).astype(acc)
           + jax.lax.stop_gradient(found.sign * lam_h[..., 0] * row / math.sqrt(head_dim)))
    lse = lse.transpose(0, 2, 1)  # [B, H, T]

    sees = common.visibility(q_len, kv_len, num_heads, num_kv, mask=mask, segments=segments, is_causal=is_causal,
                             local_window=local_window).query_sees  # [B|1, T, H|1] or None
    if sees is not None:
      out = jnp.where(sees[..., None], out, jnp.zeros((), out.dtype))
      lse = jnp.where(sees.transpose(0, 2, 1), lse, -jnp.inf)
    return common.AttentionResult(out.astype(v.dtype), lse, None)


def _width(head_dim: int, v_dim: int, found: Route, dtype: str | None, align: int) -> int:
  """The padded head width of ``q'``, ``k'`` and ``v``: the features, the key-term columns (three each in a
  16-bit dtype, one otherwise), at least ``v_dim``, rounded up to ``align``."""
  per_term = 3 if dtype in _NARROW else 1
  width = max(head_dim + per_term * len(found.key_terms), v_dim)
  return -(-width // align) * align


def _pad_last(x: Array, width: int) -> Array:
  extra = width - x.shape[-1]
  return x if extra == 0 else jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, extra)])


registry.register("routed", Routed())
