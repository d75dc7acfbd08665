"""Budget allocation over Hill response curves: the solver core of the marketing and business engines.

    maximise  sum_i R_i * x_i^s_i / (x_i^s_i + K_i^s_i)   subject to  sum_i x_i <= budget,  lower <= x <= upper

(``R`` max_response, ``K`` half_saturation: the spend at half the maximum, ``s`` shape: concave for ``s <= 1``,
S-shaped above). Solved in JAX on the constraint set: spend is scaled by the budget, and from several starts
(the equal split, a split proportional to ``K`` and random points of the set, needed because S-shaped curves
make the problem non-concave) projected Adam explores, then projected gradient steps with an isotropic step
from the local curvature polish. Adam alone would stop anywhere its per-coordinate step directions are pushed
back by the budget; plain projected gradient stops only where the marginal returns of the channels inside
their bounds are equal, the KKT condition. The best start wins.

:func:`verify` checks a result against ``scipy.optimize.minimize(method="SLSQP")`` from several starts and
checks the KKT conditions on the marginals.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from distattn_jax.engines import pipeline

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Problem:
  budget: float
  half_saturation: np.ndarray
  max_response: np.ndarray
  shape: np.ndarray
  lower: np.ndarray
  upper: np.ndarray

  @property
  def num_channels(self) -> int:
    return int(self.half_saturation.shape[0])


@dataclasses.dataclass(frozen=True)
class Allocation:
  """``spend`` per channel, total ``response`` and ``marginal`` d response / d spend per channel."""

  spend: np.ndarray
  response: float
  marginal: np.ndarray


def _vector(name: str, value: Any, n: int | None) -> np.ndarray:
  array = np.asarray(value, dtype=np.float64)
  if array.ndim == 0 and n is not None:
    array = np.full((n,), float(array))
  if array.ndim != 1 or array.shape[0] == 0:
    raise ValueError(f"allocate: {name} must be a non-empty 1-D sequence (one value per channel); got shape "
                     f"{array.shape}")
  if n is not None and array.shape[0] != n:
    raise ValueError(f"allocate: {name} has {array.shape[0]} entries but half_saturation has {n} channels")
  if not np.all(np.isfinite(array)):
    raise ValueError(f"allocate: {name}={array.tolist()} must be finite")
  return array


def make_problem(budget, half_saturation, max_response, shape, lower=None, upper=None) -> Problem:
  """Checks every argument (ValueError naming it) and returns the problem in float64 numpy."""
  try:
    budget = float(budget)
  except (TypeError, ValueError):
    raise TypeError(f"allocate: budget={budget!r} must be a number") from None
  if not np.isfinite(budget) or budget < 0:
    raise ValueError(f"allocate: budget={budget!r} must be a finite number >= 0")
  k = _vector("half_saturation", half_saturation, None)
  n = k.shape[0]
  r = _vector("max_response", max_response, n)
  s = _vector("shape", shape, n)
  for name, value in (("half_saturation", k), ("max_response", r), ("shape", s)):
    if np.any(value <= 0):
      raise ValueError(f"allocate: {name}={value.tolist()} must be > 0 for every channel (Hill curve "
                       "parameters are positive)")
  lo = np.zeros(n) if lower is None else _vector("lower", lower, n)
  hi = np.full(n, budget) if upper is None else np.minimum(_vector("upper", upper, n), budget)
  if np.any(lo < 0):
    raise ValueError(f"allocate: lower={lo.tolist()} must be >= 0")
  if np.any(lo > hi):
    bad = np.nonzero(lo > hi)[0].tolist()
    raise ValueError(f"allocate: lower={lo.tolist()} exceeds min(upper, budget)={hi.tolist()} for channels {bad}")
  if lo.sum() > budget * (1 + 1e-12):
    raise ValueError(f"allocate: infeasible: the lower bounds sum to {lo.sum():.6g}, more than "
                     f"budget={budget:.6g}")
  return Problem(budget, k, r, s, lo, hi)


def hill(x: Array, half_saturation: Array, max_response: Array, shape: Array) -> Array:
  """``R x^s / (x^s + K^s) = R sigmoid(s (log x - log K))`` elementwise (the sigmoid form cannot overflow for
  any shape); 0 at ``x <= 0``, where the gradient is 0 (the other branch sees a harmless ``x = K``)."""
  positive = x > 0
  safe = jnp.where(positive, x, half_saturation)
  value = max_response * jax.nn.sigmoid(shape * (jnp.log(safe) - jnp.log(half_saturation)))
  return jnp.where(positive, value, 0.0)


def project(u: Array, lower: Array, upper: Array, total: float | Array = 1.0, iterations: int = 64) -> Array:
  """Euclidean projection onto ``{lower <= u <= upper, sum(u) <= total}`` (assumed non-empty): clip, and if
  the clipped point spends more than ``total``, shift by the ``tau`` with ``sum(clip(u - tau)) == total``
  (found by bisection; the sum falls monotonically in ``tau``)."""
  clipped = jnp.clip(u, lower, upper)

  def spent(tau):
    return jnp.sum(jnp.clip(u - tau, lower, upper))

  def body(_, bracket):
    lo, hi = bracket
    mid = 0.5 * (lo + hi)
    over = spent(mid) > total
    return jnp.where(over, mid, lo), jnp.where(over, hi, mid)

  lo, hi = jax.lax.fori_loop(0, iterations, body, (jnp.min(u - upper), jnp.max(u - lower)))
  shifted = jnp.clip(u - hi, lower, upper)
  return jnp.where(jnp.sum(clipped) > total, shifted, clipped)


@functools.partial(jax.jit, static_argnames=("adam_steps", "polish_steps"))
def _solve(starts, k, r, s, lower, upper, *, adam_steps: int, polish_steps: int):
  """Projected Adam then curvature-stepped projected gradient from each start (budget scaled to 1)."""

  def objective(u):
    return jnp.sum(hill(u, k, r, s))

  grad = jax.grad(objective)
  # The objective is separable, so its Hessian is diagonal: the second derivative of each channel's curve.
  curvature = jax.vmap(jax.grad(jax.grad(lambda x, k, r, s: hill(x, k, r, s))))

  def run(u0):
    schedule = optax.exponential_decay(0.05, adam_steps, 1e-3)
    adam = optax.adam(schedule)

    def adam_step(carry, _):
      u, opt = carry
      updates, opt = adam.update(-grad(u), opt, u)
      return (project(u + updates, lower, upper), opt), None

    (u, _), _ = jax.lax.scan(adam_step, (u0, adam.init(u0)), None, length=adam_steps)
    sgd = optax.inject_hyperparams(optax.sgd)(learning_rate=1.0)

    def polish_step(carry, _):
      u, opt = carry
      step = 1.0 / jnp.clip(jnp.max(jnp.abs(curvature(u, k, r, s))), 1e-2, 1e6)
      opt.hyperparams["learning_rate"] = step
      updates, opt = sgd.update(-grad(u), opt, u)
      return (project(u + updates, lower, upper), opt), None

    (u, _), _ = jax.lax.scan(polish_step, (u, sgd.init(u)), None, length=polish_steps)
    return u, objective(u)

  return jax.vmap(run)(starts)


@functools.partial(jax.jit, static_argnames=("adam_steps", "polish_steps"))
def _solve_bounded(starts, k, r, s, lowers, uppers, *, adam_steps: int, polish_steps: int):
  """:func:`_solve` with bounds per start (``[starts, channels]``)."""
  run = lambda u0, lo, hi: _solve(u0[None], k, r, s, lo, hi, adam_steps=adam_steps, polish_steps=polish_steps)
  us, values = jax.vmap(run)(starts, lowers, uppers)
  return us[:, 0], values[:, 0]


def _starts(problem: Problem, lower: np.ndarray, upper: np.ndarray, k: np.ndarray, num_random: int,
            seed: int) -> np.ndarray:
  """The equal split, the split proportional to K, all free budget on one channel (each channel), and random
  points, half of them sparse (S-shaped optima often fund a few channels and leave the rest at their bounds)."""
  n = problem.num_channels
  free = 1.0 - lower.sum()
  rng = np.random.default_rng(seed)
  directions = [np.full(n, 1.0 / n), k / k.sum()] + list(np.eye(n))
  directions += list(rng.dirichlet(np.full(n, 1.0), size=num_random - num_random // 2))
  directions += list(rng.dirichlet(np.full(n, 0.2), size=num_random // 2))
  # A start that one channel cannot absorb spills the rest over the others in proportion to K.
  starts = np.clip(np.stack([lower + free * d for d in directions]), lower, upper)
  for i in range(len(starts)):
    room = upper - starts[i]
    left = 1.0 - starts[i].sum()
    if left > 0 and room.sum() > 0:
      starts[i] += room * min(left / room.sum(), 1.0)
  return starts


def allocate(budget, half_saturation, max_response, shape, *, lower=None, upper=None, num_starts: int = 48,
             steps: int = 2000, seed: int = 0) -> Allocation:
  """Maximises the total Hill response (module docstring) within the budget and the per-channel bounds.

  ``half_saturation``, ``max_response``, ``shape`` (and the optional ``lower`` / ``upper`` bounds, scalars or one
  per channel) are in the budget's units. Returns spend, total response and the marginal return per channel.
  """
  problem = make_problem(budget, half_saturation, max_response, shape, lower, upper)
  return solve(problem, num_starts=num_starts, steps=steps, seed=seed)


def solve(problem: Problem, *, num_starts: int = 48, steps: int = 2000, seed: int = 0) -> Allocation:
  if problem.budget == 0:
    spend = np.zeros(problem.num_channels)
    return Allocation(spend, 0.0, marginals(problem, spend))
  scale = problem.budget
  lower, upper, k = problem.lower / scale, problem.upper / scale, problem.half_saturation / scale
  r = problem.max_response / problem.max_response.sum()
  starts = _starts(problem, lower, upper, k, max(num_starts - 2 - problem.num_channels, 2), seed)
  f32 = functools.partial(jnp.asarray, dtype=jnp.float32)
  adam_steps, polish_steps = steps // 2, steps - steps // 2
  us, values = _solve(f32(starts), f32(k), f32(r), f32(problem.shape), f32(lower), f32(upper),
                      adam_steps=adam_steps, polish_steps=polish_steps)
  best, best_value = np.asarray(us[int(jnp.argmax(values))], np.float64), float(jnp.max(values))
  if np.any(problem.shape > 1):
    # S-shaped curves have a local optimum per set of funded channels. Local search over those sets: close
    # each funded channel in turn (upper = lower), give its budget to the others, re-solve all in one batch,
    # keep the best while that improves.
    n = problem.num_channels
    for _ in range(n):
      funded = np.nonzero(best > lower + 1e-6)[0]
      if funded.size < 2:
        break
      uppers = np.repeat(upper[None], funded.size, axis=0)
      uppers[np.arange(funded.size), funded] = lower[funded]
      candidates = np.clip(np.repeat(best[None], funded.size, axis=0), lower, uppers)
      candidates += (uppers - candidates) * ((1.0 - candidates.sum(1, keepdims=True)) /
                                              np.maximum((uppers - candidates).sum(1, keepdims=True), 1e-12))
      cu, cv = _solve_bounded(f32(candidates), f32(k), f32(r), f32(problem.shape),
                              f32(np.repeat(lower[None], funded.size, axis=0)), f32(uppers),
                              adam_steps=adam_steps // 4, polish_steps=polish_steps)
      i = int(jnp.argmax(cv))
      if float(cv[i]) <= best_value * (1 + 1e-7):
        break
      best, best_value = np.asarray(cu[i], np.float64), float(cv[i])
  spend = np.clip(best * scale, problem.lower, problem.upper)
  if spend.sum() > problem.budget:  # float32 round-off of the projection
    spend = problem.lower + (spend - problem.lower) * (problem.budget - problem.lower.sum()) / max(
        (spend - problem.lower).sum(), 1e-300)
  return Allocation(spend, response(problem, spend), marginals(problem, spend))


def response(problem: Problem, spend: np.ndarray) -> float:
  """Total response in float64 numpy (the independent evaluation used in reports and checks)."""
  x = np.maximum(np.asarray(spend, np.float64), 0.0)
  k, r, s = problem.half_saturation, problem.max_response, problem.shape
  with np.errstate(divide="ignore"):
    values = np.where(x > 0, r / (1.0 + (k / np.where(x > 0, x, 1.0)) ** s), 0.0)
  return float(values.sum())


def marginals(problem: Problem, spend: np.ndarray) -> np.ndarray:
  """d response / d spend per channel, ``R s x^(s-1) K^s / (x^s + K^s)^2`` (inf at 0 when ``s < 1``)."""
  x = np.asarray(spend, np.float64)
  k, r, s = problem.half_saturation, problem.max_response, problem.shape
  with np.errstate(divide="ignore", invalid="ignore"):
    value = r * s * x ** (s - 1) * k ** s / (x ** s + k ** s) ** 2
  return np.where((x == 0) & (s > 1), 0.0, np.where((x == 0) & (s == 1), r / k, value))


def scipy_reference(problem: Problem, *, num_starts: int = 8, seed: int = 0) -> tuple[np.ndarray, float]:
  """The best of SLSQP runs from the equal split and random feasible points (float64)."""
  from scipy import optimize  # only verification needs scipy

  n = problem.num_channels
  scale = max(problem.budget, 1e-300)
  total = problem.max_response.sum()
  lower, upper = problem.lower / scale, problem.upper / scale
  p = dataclasses.replace(problem, half_saturation=problem.half_saturation / scale,
                          max_response=problem.max_response / total)
  rng = np.random.default_rng(seed + 1)
  free = 1.0 - lower.sum()
  starts = [np.full(n, 1.0 / n)] + list(rng.dirichlet(np.ones(n), size=num_starts - 1))
  best_u, best_value = None, -np.inf
  for direction in starts:
    u0 = np.clip(lower + free * direction, lower, upper)
    result = optimize.minimize(
        lambda u: -response(p, u), u0, jac=lambda u: -np.nan_to_num(marginals(p, np.maximum(u, 1e-12)),
                                                                     posinf=1e12),
        method="SLSQP", bounds=list(zip(lower, upper)),
        constraints=[{"type": "ineq", "fun": lambda u: 1.0 - u.sum(), "jac": lambda u: -np.ones_like(u)}],
        options={"maxiter": 500, "ftol": 1e-12})
    u = np.clip(result.x, lower, upper)
    if u.sum() <= 1.0 + 1e-9 and -result.fun > best_value:
      best_u, best_value = u, response(p, u)
  return best_u * scale, best_value * total


def verify(problem: Problem, result: Allocation, *, prefix: str = "allocation", seed: int = 0,
           gap_tolerance: float = 1e-3, kkt_tolerance: float = 1e-2) -> list[pipeline.Check]:
  """SLSQP comparison (our objective >= SLSQP's best * (1 - gap_tolerance)) and the KKT conditions: equal
  marginal return (relative spread <= kkt_tolerance) over channels strictly inside their bounds."""
  _, best = scipy_reference(problem, seed=seed)
  gap = (best - result.response) / max(abs(best), 1e-300)
  checks = [pipeline.check(f"{prefix}.slsqp_gap", "relative shortfall of the response against "
                           "scipy SLSQP's best of 8 starts (negative: ours is higher)", gap, gap_tolerance)]
  x, m = result.spend, result.marginal
  margin = 1e-4 * max(problem.budget, 1e-300)
  inside = (x > problem.lower + margin) & (x < problem.upper - margin)
  if inside.sum() >= 2:
    spread = (m[inside].max() - m[inside].min()) / max(np.abs(m[inside]).mean(), 1e-300)
  else:
    spread = 0.0
  checks.append(pipeline.check(f"{prefix}.kkt", f"relative spread of the marginal returns of the "
                               f"{int(inside.sum())} channels strictly inside their bounds", spread, kkt_tolerance))
  return checks
