"""The kernel protocol: what ``distance_attention`` calls, and how a kernel says what it can do.

A kernel is any hashable object with a ``capabilities`` attribute (:class:`Capabilities`), an ``unsupported``
method and a ``__call__`` with the signature of :class:`Kernel`. ``distance_attention`` checks every argument,
brings it to the canonical shapes of :mod:`distattn_jax.kernels.common`, describes the call as a
:class:`Request` and asks the kernel (``unsupported(request)``) before tracing it: "auto" skips a kernel that
declines, and an explicitly chosen kernel that declines raises its reason. A new kernel (sequence-parallel,
fused GPU, ...) implements the protocol and registers itself (:func:`distattn_jax.kernels.register`); nothing
else changes.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Protocol, runtime_checkable

import jax

from distattn_jax.kernels import dropout as dropout_lib
from distattn_jax.kernels.common import AttentionResult, Dropout, Segments

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Capabilities:
  """What a kernel can evaluate. Every kernel computes the metric logits with ``lam`` (traced or not), GQA and
  ``is_causal``; the flags cover the rest.

  Attributes:
    weights: can return the ``[B, H, T, S]`` softmax weights (``return_weights=True``).
    dropout: applies attention dropout with Flax's draw (see :mod:`distattn_jax.kernels.dropout`).
    tile_dropout: draws the dropout bits tile by tile (:func:`dropout.tile_multiplier`), so it needs a key
      that draw can reproduce (:func:`dropout.tile_draw_problem`).
    bias: accepts an additive ``bias`` of the form ``[B|1, H|1, T|1, S|1]``.
    mask: accepts a dense bool ``mask`` of the same form.
    segments: evaluates :class:`Segments` (segment ids and sequence lengths) per position.
    local_window: evaluates a ``(left, right)`` sliding window per position.
    traced_p: accepts a traced (learned) order ``p`` of the lp metric.
    residual: returns each query row's log-sum-exp with its exact gradient (``return_residual=True``).
    memory: ``"quadratic"`` (holds ``[B, H, T, S]`` arrays) or ``"linear"`` (holds tiles); informational.
  """

  weights: bool = False
  dropout: bool = True
  tile_dropout: bool = False
  bias: bool = True
  mask: bool = True
  segments: bool = True
  local_window: bool = True
  traced_p: bool = True
  residual: bool = True
  memory: str = "linear"


class Request(NamedTuple):
  """The static facts of one call, in the canonical layout: what a kernel is asked to do."""

  batch: int
  q_len: int
  kv_len: int
  num_heads: int
  num_kv_heads: int
  metric: str
  is_causal: bool = False
  return_weights: bool = False
  dropout: Dropout | None = None
  # The kernel-layout shapes [batch|1, heads|1, q_len|1, kv_len|1] of the bias and mask; None when absent.
  bias_shape: tuple[int, ...] | None = None
  mask_shape: tuple[int, ...] | None = None
  has_segments: bool = False
  local_window: tuple[int, int] | None = None
  traced_p: bool = False
  return_residual: bool = False
  dtype: str | None = None  # the computation dtype's name ("float32", "bfloat16", ...); None when unknown
  # Features per query/key head and per value head: a kernel whose layout has a width limit (cuDNN's) or pads
  # the head axis checks them here. None when unknown.
  head_dim: int | None = None
  v_dim: int | None = None

  @property
  def has_bias(self) -> bool:
    return self.bias_shape is not None

  @property
  def has_mask(self) -> bool:
    return self.mask_shape is not None


def unsupported(capabilities: Capabilities, request: Request) -> str | None:
  """The first thing in ``request`` that ``capabilities`` rule out, as a phrase ("cannot ..."); None if none."""
  checks = (
      (request.return_weights and not capabilities.weights,
       "return attention weights (return_weights=True, or a Flax module sowing them); use "
       "implementation='reference' (or 'auto')"),
      (request.dropout is not None and not capabilities.dropout, "apply attention dropout"),
      (request.has_bias and not capabilities.bias, "add a bias"),
      (request.has_mask and not capabilities.mask, "apply a dense mask"),
      (request.has_segments and not capabilities.segments, "evaluate segment ids or sequence lengths"),
      (request.local_window is not None and not capabilities.local_window, "evaluate local_window_size"),
      (request.traced_p and not capabilities.traced_p, "take a traced p"),
      (request.return_residual and not capabilities.residual,
       "return a differentiable log-sum-exp (return_residual=True)"),
  )
  for failed, what in checks:
    if failed:
      return f"cannot {what}"
  if request.dropout is not None and capabilities.tile_dropout:
    problem = dropout_lib.tile_draw_problem(request.dropout.rng)
    if problem is not None:
      return f"cannot draw this dropout: {problem}"
  return None


@runtime_checkable
class Kernel(Protocol):
  """An attention kernel over the canonical shapes of :mod:`distattn_jax.kernels.common`.

  ``__call__`` receives ``q [B, T, H, D]``, ``k [B, S, K, D]``, ``v [B, S, K, Dv]``; ``lam [H]``; ``bias`` and
  ``mask`` (None or ``[B|1, H|1, T|1, S|1]``); ``segments`` (None or :class:`Segments`); ``local_window`` (None
  or static ``(left, right)``); ``metric`` (a registered name, static); ``p`` (a float, or a traced scalar);
  ``is_causal``; ``dropout`` (None or :class:`Dropout`); ``precision``; ``return_weights``. A query ``t`` sees
  key ``s`` where the mask, :func:`common.position_mask` and (for ``s``) ``s < S`` all allow it. It returns an
  :class:`AttentionResult`: ``out`` in ``v``'s dtype, ``lse`` (``-inf`` on rows that see no key, whose output
  is 0 with zero gradients), and the weights when asked. It is called only for requests ``unsupported``
  accepted, inside ``jax.jit`` with the kernel object static (so it must be hashable).
  """

  capabilities: Capabilities

  def unsupported(self, request: Request) -> str | None:
    ...

  def __call__(self, q: Array, k: Array, v: Array, *, lam: Array, bias: Array | None, mask: Array | None,
               segments: Segments | None, local_window: tuple[int, int] | None, metric: str, p: Any,
               is_causal: bool, dropout: Dropout | None, precision: Any,
               return_weights: bool) -> AttentionResult:
    ...
