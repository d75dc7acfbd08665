"""Engine pipelines (composition, registry, config) and the allocation solver against scipy's SLSQP."""

import ml_collections
import numpy as np
import pytest

from distattn_jax import engines
from distattn_jax.engines import allocation


# --- pipelines -------------------------------------------------------------------------------------------------

def _append(tag):
  def factory(times: int = 1):
    def stage(state):
      return {**state, "trace": state.get("trace", ()) + (tag,) * times}
    return stage
  return factory


def test_chain_composes_left_to_right_without_mutating_the_input():
  state = {"trace": ()}
  pipe = engines.chain(_append("a")(), _append("b")(times=2), names=["a", "b"])
  out = pipe(state)
  assert out["trace"] == ("a", "b", "b") and state == {"trace": ()}
  assert pipe.names == ("a", "b") and set(out["stage_seconds"]) == {"a", "b"}


def test_build_respects_order_and_options_and_runs_a_user_registered_stage():
  engines.register("toy_engine", "first", _append("first"))

  @engines.register("toy_engine", "second")
  def second(times: int = 1):
    return _append("second")(times)

  config = ml_collections.ConfigDict({"engine": "toy_engine", "stages": "second, first, second",
                                      "second": {"times": 2}})
  pipe = engines.build(config)
  assert pipe.names == ("second", "first", "second")
  seen = []
  out = pipe({}, progress=lambda name, i, n: seen.append((name, i, n)))
  assert out["trace"] == ("second",) * 2 + ("first",) + ("second",) * 2
  assert seen == [("toy_engine.second", 0, 3), ("toy_engine.first", 1, 3), ("toy_engine.second", 2, 3)]
  assert engines.available("toy_engine") == ("first", "second")


def test_unknown_stage_lists_the_registered_ones_before_building_any():
  built = []
  engines.register("toy_engine2", "ok", lambda: built.append(1) or (lambda s: s))
  with pytest.raises(ValueError, match=r"'nope' not registered .* registered stages: ok"):
    engines.build({"engine": "toy_engine2", "stages": "ok,nope"})
  assert built == []
  with pytest.raises(ValueError, match="registered engines"):
    engines.build({"engine": "no_such_engine", "stages": "ok"})


def test_report_serialises_results_and_verification():
  state = engines.pipeline.with_result({}, "x", np.arange(3.0))
  state = engines.pipeline.with_check(state, engines.pipeline.check("c", "x below 1", 0.5, 1.0))
  pipe = engines.chain(lambda s: s, names=["noop"])
  rep = engines.pipeline.report("toy", pipe.names, pipe(state), 0.0)
  data = rep.to_dict()
  assert data["results"]["x"] == [0.0, 1.0, 2.0] and data["passed"] is True
  assert data["verification"][0]["passed"] is True and '"engine": "toy"' in rep.to_json()
  assert not engines.pipeline.check("nan", "", float("nan"), 1.0).passed


# --- allocation ------------------------------------------------------------------------------------------------

def _random_problem(seed, n, shape, bounded):
  rng = np.random.default_rng(seed)
  lower = np.full(n, 2.0) if bounded else None
  upper = np.full(n, 45.0) if bounded else None
  return allocation.make_problem(100.0, rng.uniform(5, 40, n), rng.uniform(1, 10, n), np.full(n, shape),
                                 lower, upper)


@pytest.mark.parametrize("shape,bounded", [(0.7, True), (1.0, False), (2.5, True), (3.0, False)])
def test_allocate_matches_slsqp_and_satisfies_kkt(shape, bounded):
  # Concave (s <= 1) and S-shaped (s > 1) curves, with and without bounds. Oracle: scipy SLSQP in float64 from
  # 8 starts; we must reach its best objective within 1e-3 relative (float32 solve, budget-scaled), and the
  # marginal returns of interior channels must agree within 1% (the KKT condition of the budget constraint).
  problem = _random_problem(seed=int(shape * 10), n=6, shape=shape, bounded=bounded)
  result = allocation.allocate(problem.budget, problem.half_saturation, problem.max_response, problem.shape,
                               lower=None if not bounded else problem.lower,
                               upper=None if not bounded else problem.upper)
  assert result.spend.sum() <= problem.budget * (1 + 1e-9)
  assert np.all(result.spend >= problem.lower - 1e-9) and np.all(result.spend <= problem.upper + 1e-9)
  assert abs(result.response - allocation.response(problem, result.spend)) < 1e-9
  for entry in allocation.verify(problem, result):
    assert entry.passed, entry.line()
  # The reported marginals are the derivative: compare with central finite differences in float64.
  h = 1e-5
  for i in range(problem.num_channels):
    e = np.zeros(problem.num_channels)
    e[i] = h
    fd = (allocation.response(problem, result.spend + e) - allocation.response(problem, result.spend - e)) / (2 * h)
    assert abs(fd - result.marginal[i]) <= 1e-5 * max(1.0, abs(fd))


def test_allocate_funds_only_what_pays_with_s_shaped_curves():
  # Two identical S-shaped channels (s=4, K=50) and budget 60: a 30/30 split leaves both below the knee
  # (2 * 0.115 = 0.23) while 60 on one channel earns 0.675; the optimum concentrates (closed forms below).
  r = allocation.allocate(60.0, [50.0, 50.0], [1.0, 1.0], [4.0, 4.0])
  split = 2 * 30.0 ** 4 / (30.0 ** 4 + 50.0 ** 4)
  single = 60.0 ** 4 / (60.0 ** 4 + 50.0 ** 4)
  assert single > split and abs(r.response - single) < 1e-4 and min(r.spend) < 1e-3


@pytest.mark.parametrize("kwargs,match", [
    (dict(budget=-1.0), "budget=-1.0 must be a finite number >= 0"),
    (dict(half_saturation=[1.0, 0.0]), r"half_saturation=\[1.0, 0.0\] must be > 0"),
    (dict(shape=[1.0, -2.0]), "shape=.* must be > 0"),
    (dict(max_response=[1.0]), "max_response has 1 entries but half_saturation has 2"),
    (dict(lower=[6.0, 5.0]), "infeasible: the lower bounds sum to 11, more than budget=10"),
    (dict(lower=[3.0, 0.0], upper=[2.0, 5.0]), "lower=.* exceeds"),
])
def test_allocate_rejects_bad_input(kwargs, match):
  args = dict(budget=10.0, half_saturation=[1.0, 2.0], max_response=[1.0, 1.0], shape=[1.0, 1.0])
  args.update(kwargs)
  budget, k, r, s = args.pop("budget"), args.pop("half_saturation"), args.pop("max_response"), args.pop("shape")
  with pytest.raises(ValueError, match=match):
    allocation.allocate(budget, k, r, s, **args)
