"""Attention statistics per layer and head, and their plots.

For weights ``w [batch, heads, q_len, kv_len]`` (rows sum to 1 over the keys a query may see), each head gets,
averaged over the batch and the queries:

* ``entropy``: ``-sum_j w_ij ln w_ij`` in nats (``0 ln 0 = 0``); ``ln(i + 1)`` for a uniform causal row, 0 for a
  row that attends to one key;
* ``max_weight``: ``max_j w_ij``, how much of the row one key takes;
* ``mean_distance``: ``sum_j w_ij |i - j|``, how far back (or ahead) a query looks, in positions.

:func:`analyze_attention_patterns` (the seed's name) runs a model with ``sow_weights=True`` and adds each layer's
lam (and p); :func:`lambda_history` reads lam over training from ``metrics.jsonl``. The plots need matplotlib,
imported only by the plotting functions.

Jacobian norms and Lipschitz estimates (Kim, Papamakarios and Mnih, "The Lipschitz Constant of Self-Attention",
ICML 2021): :func:`jacobian_norm` is the operator norm ``||J_f(x)||`` (``ord=2``, the largest singular value, or
``ord=inf``, the largest absolute row sum) of any function at a point, with inputs and outputs flattened;
:func:`lipschitz_lower_bound` climbs it by gradient ascent on the input. Any value of ``||J_f(x)||`` is a lower
bound on the Lipschitz constant of ``f`` in that norm (the constant is the supremum over ``x``), so the largest
value found is one too.

The module is long because it holds both of DESIGN.md's analysis tools, the statistics and the Jacobian norms;
they share no code, and each half reads on its own.
"""

from __future__ import annotations

import functools
import math
import pathlib
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

Array = jax.Array
STATISTICS = ("entropy", "max_weight", "mean_distance")


def attention_statistics(weights: Array) -> dict[str, Array]:
  """``{"entropy", "max_weight", "mean_distance"}``, each ``[heads]``, from ``weights [batch, heads, T, S]``.

  Queries are the last ``T`` of the ``S`` key positions (``T == S`` for a full sequence)."""
  w = jnp.asarray(weights, jnp.float32)
  q_len, kv_len = w.shape[-2:]
  entropy = -jnp.sum(jnp.where(w > 0, w * jnp.log(jnp.where(w > 0, w, 1.0)), 0.0), axis=-1)
  query_pos = jnp.arange(q_len) + (kv_len - q_len)
  distance = jnp.abs(query_pos[:, None] - jnp.arange(kv_len)[None, :]).astype(jnp.float32)
  mean_distance = jnp.sum(w * distance.reshape((1,) * (w.ndim - 2) + distance.shape), axis=-1)
  per_row = {"entropy": entropy, "max_weight": jnp.max(w, axis=-1), "mean_distance": mean_distance}
  return {name: jnp.mean(v, axis=(0, 2)) for name, v in per_row.items()}


def attention_weights(model: Any, params: Any, tokens: Array) -> list[Array]:
  """The sown attention weights of every layer, in order: a list of ``[batch, heads, T, T]``."""
  _, state = model.apply({"params": params}, tokens, sow_weights=True, mutable=["intermediates"])
  blocks = state["intermediates"]["trunk"]
  return [blocks[f"block_{i}"]["attention"]["attention_weights"][0] for i in range(len(blocks))]


def analyze_attention_patterns(model: Any, params: Any, tokens: Array) -> list[dict[str, Any]]:
  """Per layer: the statistics of :func:`attention_statistics` on ``tokens``, plus ``lambda`` ([heads]) and,
  when it is learned, ``p``; every value a plain list or float (JSON-ready)."""
  layers = []
  for i, w in enumerate(attention_weights(model, params, tokens)):
    stats = {name: np.asarray(v).tolist() for name, v in attention_statistics(w).items()}
    attention = params["trunk"][f"block_{i}"]["attention"]
    if "log_lambda" in attention:
      stats["lambda"] = np.exp(np.asarray(attention["log_lambda"])).tolist()
    if "log_p" in attention:
      stats["p"] = float(np.exp(np.asarray(attention["log_p"])))
    layers.append({"layer": i, **stats})
  return layers


def lambda_history(records: list[dict[str, Any]]) -> dict[str, tuple[list[int], np.ndarray]]:
  """``{"block_0/attention/lambda": (steps, values [steps, heads]), ...}`` from the train records of
  ``metrics.jsonl`` (``p`` entries likewise, ``[steps, 1]``)."""
  history: dict[str, tuple[list[int], list]] = {}
  for record in records:
    if record.get("split") != "train":
      continue
    for key, value in record.items():
      if key.endswith(("/lambda", "/p")):
        steps, values = history.setdefault(key, ([], []))
        steps.append(record["step"])
        values.append(np.atleast_1d(np.asarray(value, np.float64)))
  return {k: (steps, np.stack(values)) for k, (steps, values) in history.items()}


def _pyplot():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def plot_statistics(layers: list[dict[str, Any]], path: str | pathlib.Path) -> None:
  """One heatmap (layers x heads) per statistic and for lam, annotated with the values."""
  plt = _pyplot()
  names = [n for n in STATISTICS + ("lambda",) if n in layers[0]]
  fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 0.6 * len(layers) + 1.6), squeeze=False)
  for ax, name in zip(axes[0], names):
    grid = np.asarray([layer[name] for layer in layers])
    image = ax.imshow(grid, cmap="viridis", aspect="auto")
    ax.set_title(name)
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(grid.shape[1]))
    ax.set_yticks(range(grid.shape[0]))
    for (r, c), v in np.ndenumerate(grid):
      ax.text(c, r, f"{v:.2f}", ha="center", va="center", color="w", fontsize=7)
    fig.colorbar(image, ax=ax, fraction=0.046)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def plot_attention_maps(weights: list[Array], path: str | pathlib.Path) -> None:
  """The first sequence's weights, one panel per (layer, head)."""
  plt = _pyplot()
  heads = weights[0].shape[1]
  fig, axes = plt.subplots(len(weights), heads, figsize=(2.2 * heads, 2.2 * len(weights)), squeeze=False)
  for layer, w in enumerate(weights):
    for head in range(heads):
      ax = axes[layer][head]
      ax.imshow(np.asarray(w[0, head]), cmap="magma", vmin=0.0)
      ax.set_title(f"layer {layer} head {head}", fontsize=8)
      ax.set_xticks([])
      ax.set_yticks([])
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def plot_lambda_history(history: dict[str, tuple[list[int], np.ndarray]], path: str | pathlib.Path) -> None:
  """lam (and p) of every head against the training step, one panel per layer's parameter."""
  plt = _pyplot()
  fig, axes = plt.subplots(1, len(history), figsize=(4 * len(history), 3), squeeze=False)
  for ax, (name, (steps, values)) in zip(axes[0], sorted(history.items())):
    for head in range(values.shape[1]):
      ax.plot(steps, values[:, head], label=f"head {head}")
    ax.set_title(name, fontsize=9)
    ax.set_xlabel("step")
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


# Jacobian norms and Lipschitz lower bounds.

METHODS = ("auto", "exact", "power_iteration")
# The Jacobian's entries (outputs times inputs) up to which method="auto" materialises it: 2^20 float32 entries
# are 4 MiB, and building them costs min(inputs, outputs) forward or reverse passes.
MAX_EXACT_ENTRIES = 1 << 20


class JacobianNorm(NamedTuple):
  """The result of :func:`jacobian_norm`.

  Attributes:
    value: the norm, a float32 (or the input's float dtype) scalar array.
    method: ``"exact"`` (from the materialised Jacobian, or its row blocks for ``ord=inf``) or
      ``"power_iteration"``.
    iterations: power iterations run (0 for ``"exact"``).
  """
  value: Array
  method: str
  iterations: int


class LipschitzBound(NamedTuple):
  """The result of :func:`lipschitz_lower_bound`.

  Attributes:
    value: the largest Jacobian norm found, a lower bound on the Lipschitz constant of ``fn`` in that norm.
    x: the input at which it was found (the structure of ``x0``).
    initial_value: the Jacobian norm at ``x0`` (``value >= initial_value`` always).
    history: the norm at every step, ``[steps + 1]`` (numpy), the last entry at the final input.
    method: the method of :func:`jacobian_norm` the ascent used.
  """
  value: Array
  x: Any
  initial_value: Array
  history: np.ndarray
  method: str


def _check_ord(name: str, ord: Any) -> float:
  """``ord`` as 2.0 or inf (``"inf"`` and ``np.inf`` both spell the latter)."""
  if isinstance(ord, str) and ord.lower() == "inf":
    return math.inf
  if isinstance(ord, (int, float)) and not isinstance(ord, bool) and ord in (2, math.inf):
    return float(ord)
  raise ValueError(f"{name}: ord must be 2 or inf (np.inf or 'inf'); got {ord!r}")


def _flatten(name: str, fn: Callable[[Any], Any], x: Any) -> tuple[Callable[[Array], Array], Array, Callable]:
  """``fn`` as a map of flat vectors, the flat input and the function that rebuilds ``x``'s structure."""
  flat_x, unravel = ravel_pytree(x)
  if not jnp.issubdtype(flat_x.dtype, jnp.inexact) or flat_x.size == 0:
    raise TypeError(f"{name}: x must be a non-empty floating-point array (or pytree of them); got dtype "
                    f"{flat_x.dtype} with {flat_x.size} entries")

  def flat_fn(v: Array) -> Array:
    return ravel_pytree(fn(unravel(v)))[0]

  return flat_fn, flat_x, unravel


def _exact_norm(flat_fn: Callable[[Array], Array], x: Array, out_size: int, ord: float) -> Array:
  """The norm of the materialised ``[outputs, inputs]`` Jacobian: forward mode when there are fewer inputs
  (one jvp per input), reverse mode otherwise (one vjp per output)."""
  jac = (jax.jacfwd if x.size <= out_size else jax.jacrev)(flat_fn)(x).reshape(out_size, x.size)
  if ord == 2:
    return jnp.linalg.norm(jac, 2)
  return jnp.max(jnp.sum(jnp.abs(jac), axis=1))


@functools.partial(jax.jit, static_argnums=0)
def _row_abs_sums(flat_fn: Callable[[Array], Array], x: Array, basis: Array) -> Array:
  """``sum_j |J_ij|`` for the rows ``basis [rows, outputs]`` picks (one-hot), by vjp; jitted per ``flat_fn`` so
  the row blocks of one function (and every step of an ascent) share one compilation per block size."""
  _, vjp = jax.vjp(flat_fn, x)
  return jnp.sum(jnp.abs(jax.vmap(vjp)(basis)[0]), axis=1)


def _inf_norm_by_rows(flat_fn: Callable[[Array], Array], x: Array, out_size: int,
                      max_entries: int) -> tuple[Array, int]:
  """``max_i sum_j |J_ij|`` and its row, rows computed a block at a time by vjp (``J^T e_i``), so no more than
  ``max_entries`` entries are held at once."""
  rows_per_block = max(1, max_entries // x.size)
  sums = []
  for start in range(0, out_size, rows_per_block):
    rows = jnp.arange(start, min(start + rows_per_block, out_size))
    sums.append(_row_abs_sums(flat_fn, x, jax.nn.one_hot(rows, out_size, dtype=x.dtype)))
  sums = jnp.concatenate(sums)
  row = int(jnp.argmax(sums))
  return sums[row], row


def _power_iteration(flat_fn: Callable[[Array], Array], x: Array, v0: Array, iterations: int,
                     tol: float) -> tuple[Array, Array, Array]:
  """Power iteration on ``J^T J`` from the unit vector ``v0``: returns ``(||J v||, v, iterations run)``.

  ``J v`` is a jvp of the linearised ``flat_fn`` and ``J^T u`` its transpose, so the Jacobian is never formed.
  ``||J v||`` for a unit ``v`` never exceeds the largest singular value, so every iterate is a lower estimate;
  the loop stops when it changes by less than ``tol`` relatively, or after ``iterations``."""
  _, jvp = jax.linearize(flat_fn, x)
  vjp = jax.linear_transpose(jvp, x)

  def step(state):
    i, v, sigma, _ = state
    u = jvp(v)
    w = vjp(u)[0]
    new_sigma = jnp.linalg.norm(u)
    # A zero Jacobian (or v in its null space) leaves w = 0: keep v rather than divide by zero.
    norm_w = jnp.linalg.norm(w)
    v = jnp.where(norm_w > 0, w / jnp.where(norm_w > 0, norm_w, 1), v)
    return i + 1, v, new_sigma, sigma

  def not_converged(state):
    i, _, sigma, previous = state
    return (i < iterations) & ((i < 2) | (jnp.abs(sigma - previous) > tol * jnp.abs(sigma)))

  zero = jnp.zeros((), x.dtype)
  i, v, sigma, _ = jax.lax.while_loop(not_converged, step, (jnp.int32(0), v0, zero, zero))
  # The loop's last sigma is ||J v_prev||; the returned v has been refined once more, so report ||J v||.
  return jnp.linalg.norm(jvp(v)), v, i


def _unit_vector(seed: int, x: Array) -> Array:
  v = jax.random.normal(jax.random.key(seed), x.shape, x.dtype)
  return v / jnp.linalg.norm(v)


def _plan(name: str, x: Array, out_size: int, ord: float, method: str, iterations: int,
          max_exact_entries: int) -> str:
  """The method a call runs: checks the arguments and resolves ``"auto"``."""
  if method not in METHODS:
    raise ValueError(f"{name}: method must be one of {METHODS}; got {method!r}")
  if not isinstance(iterations, int) or iterations < 1:
    raise ValueError(f"{name}: iterations must be a positive int; got {iterations!r}")
  if ord == math.inf and method == "power_iteration":
    raise ValueError(f"{name}: method='power_iteration' computes the spectral norm (ord=2) only; ord=inf is the "
                     "largest absolute row sum, computed exactly (by row blocks when the Jacobian is large)")
  if method == "auto":
    method = "exact" if ord == math.inf or out_size * x.size <= max_exact_entries else "power_iteration"
  return method


def jacobian_norm(fn: Callable[[Any], Any], x: Any, *, ord: Any = 2, method: str = "auto", iterations: int = 200,
                  tol: float = 1e-6, seed: int = 0, max_exact_entries: int = MAX_EXACT_ENTRIES) -> JacobianNorm:
  """The operator norm of the Jacobian of ``fn`` at ``x``, inputs and outputs flattened.

  ``ord=2`` is the spectral norm (largest singular value), ``ord=inf`` the norm induced by the max norm on both
  sides, the largest absolute row sum. Inputs and outputs may be arrays or pytrees of floating-point arrays;
  ``fn`` must be differentiable by JAX (every kernel of :func:`distattn_jax.distance_attention` is, forward and
  reverse).

  Args:
    fn: the function, ``x -> y``.
    x: the point.
    ord: 2 or inf.
    method: ``"exact"`` materialises the ``[outputs, inputs]`` Jacobian (``jax.jacfwd`` or ``jax.jacrev``,
      whichever needs fewer passes) and takes its norm; for ``ord=inf`` above ``max_exact_entries`` entries it
      computes the rows a block at a time by vjp instead. ``"power_iteration"`` (``ord=2`` only) runs power
      iteration on ``J^T J`` with a jvp and its transpose, never forming ``J``; its value is a lower estimate
      that reaches the norm at the rate ``(sigma_2 / sigma_1)^2`` per iteration. ``"auto"``: exact up to
      ``max_exact_entries`` entries (and always for ``ord=inf``), else power iteration.
    iterations: the most power iterations.
    tol: power iteration stops when its estimate changes by less than this, relatively.
    seed: the power iteration's random start.
    max_exact_entries: the size of Jacobian ``"auto"`` still materialises.

  Returns:
    A :class:`JacobianNorm` ``(value, method, iterations)``.

  Not jit-able as a whole (it picks its method from shapes and returns a string); its inner computations are
  jitted.
  """
  name = "jacobian_norm"
  ord = _check_ord(name, ord)
  flat_fn, flat_x, _ = _flatten(name, fn, x)
  out_size = jax.eval_shape(flat_fn, flat_x).size
  method = _plan(name, flat_x, out_size, ord, method, iterations, max_exact_entries)
  if method == "power_iteration":
    sigma, _, steps = jax.jit(_power_iteration, static_argnums=(0, 3, 4))(
        flat_fn, flat_x, _unit_vector(seed, flat_x), iterations, tol)
    return JacobianNorm(sigma, method, int(steps))
  if ord == math.inf and out_size * flat_x.size > max_exact_entries:
    return JacobianNorm(_inf_norm_by_rows(flat_fn, flat_x, out_size, max_exact_entries)[0], method, 0)
  return JacobianNorm(jax.jit(_exact_norm, static_argnums=(0, 2, 3))(flat_fn, flat_x, out_size, ord), method, 0)


def lipschitz_lower_bound(fn: Callable[[Any], Any], x0: Any, *, ord: Any = 2, steps: int = 100,
                          learning_rate: float = 0.05, method: str = "auto", iterations: int = 200,
                          tol: float = 1e-6, seed: int = 0,
                          max_exact_entries: int = MAX_EXACT_ENTRIES) -> LipschitzBound:
  """A lower bound on the Lipschitz constant of ``fn``: gradient ascent (Adam) on the input of
  :func:`jacobian_norm`, as in Kim et al. (2021), section 5.1.

  Each step evaluates the norm at the current input and its gradient with respect to the input, then moves
  the input uphill. The gradient is that of the exact norm when the Jacobian is materialised (the singular
  value's or the maximal row's derivative); with power iteration it is the gradient of ``||J(x) v||`` at the
  converged right singular vector ``v`` held fixed, which equals the largest singular value's gradient when it
  is simple (``d sigma = u^T dJ v``); for ``ord=inf`` by row blocks, that of the maximal row's l1 norm. Power
  iteration restarts from the previous step's vector, so later steps converge in a few iterations.

  Args:
    fn: the function, ``x -> y``.
    x0: the starting input (array or pytree of floating-point arrays).
    ord, method, iterations, tol, max_exact_entries: as in :func:`jacobian_norm`.
    steps: the ascent steps.
    learning_rate: Adam's step size, in the units of ``x``.
    seed: the power iteration's first random start.

  Returns:
    A :class:`LipschitzBound`: the largest norm seen (at ``x0`` and every step's input, the final one included)
    and the input achieving it.
  """
  name = "lipschitz_lower_bound"
  ord = _check_ord(name, ord)
  if not isinstance(steps, int) or steps < 0:
    raise ValueError(f"{name}: steps must be a non-negative int; got {steps!r}")
  flat_fn, flat_x, unravel = _flatten(name, fn, x0)
  out_size = jax.eval_shape(flat_fn, flat_x).size
  method = _plan(name, flat_x, out_size, ord, method, iterations, max_exact_entries)
  by_rows = ord == math.inf and out_size * flat_x.size > max_exact_entries

  if method == "power_iteration":
    power = jax.jit(_power_iteration, static_argnums=(0, 3, 4))

    @jax.jit
    def rayleigh(x, v):
      return jnp.linalg.norm(jax.jvp(flat_fn, (x,), (v,))[1])

    rayleigh_grad = jax.jit(jax.value_and_grad(rayleigh))
    v = _unit_vector(seed, flat_x)

    def value_and_grad(x):
      nonlocal v
      _, v, _ = power(flat_fn, x, v, iterations, tol)
      return rayleigh_grad(x, v)
  elif by_rows:
    def row_l1(x, row):
      return jnp.sum(jnp.abs(jax.vjp(flat_fn, x)[1](jax.nn.one_hot(row, out_size, dtype=x.dtype))[0]))

    row_grad = jax.jit(jax.value_and_grad(row_l1))

    def value_and_grad(x):
      return row_grad(x, _inf_norm_by_rows(flat_fn, x, out_size, max_exact_entries)[1])
  else:
    value_and_grad = jax.jit(jax.value_and_grad(lambda x: _exact_norm(flat_fn, x, out_size, ord)))

  optimizer = optax.adam(learning_rate)
  update = jax.jit(lambda g, state, x: optimizer.update(-g, state, x))  # ascent: minimise -norm
  state = optimizer.init(flat_x)
  x, history = flat_x, []
  best_value, best_x = None, flat_x
  for step in range(steps + 1):
    value, grad = value_and_grad(x)
    history.append(float(value))
    if best_value is None or value > best_value:
      best_value, best_x = value, x
    if step < steps:
      updates, state = update(grad, state, x)
      x = optax.apply_updates(x, updates)
  return LipschitzBound(best_value, unravel(best_x), jnp.asarray(history[0], flat_x.dtype), np.asarray(history),
                        method)
