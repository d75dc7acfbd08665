"""The business engine: an automation investment budget across processes with diminishing returns and capacity
limits, solved by :func:`allocation.allocate`.

Process ``i`` handles ``volume`` units per period at ``manual_cost`` per unit; investing ``x`` automates the share
``max_share * x^s / (x^s + half_saturation^s)`` of its volume, at ``automated_cost`` per unit, and it can absorb
at most ``capacity``. The saving per period, ``volume * share * (manual_cost - automated_cost)``, is a Hill curve
in ``x``; the engine maximises the total saving within the budget and reports investment, operating cost before
and after, automated throughput, the automation share and the payback time, all computed from the inputs.

Stages (registry ``"business"``): ``load`` (CSV; ``#`` lines become report notes), ``allocate``.
"""

from __future__ import annotations

import ml_collections
import numpy as np

from distattn_jax.engines import allocation, inputs, pipeline
from distattn_jax.engines.marketing import EXAMPLES

COLUMNS = {"process": str, "volume": float, "manual_cost": float, "automated_cost": float, "max_share": float,
           "half_saturation": float, "shape": float, "capacity": float}


@pipeline.register("business", "load")
def load(processes: str = "") -> pipeline.Stage:
  def stage(state):
    rows, notes = inputs.read_table(processes or str(EXAMPLES / "business_example.csv"), columns=COLUMNS,
                                    name="business.load.processes")
    for i, row in enumerate(rows, start=1):
      if not 0 < row["max_share"] <= 1:
        raise ValueError(f"business.load.processes: row {i} max_share={row['max_share']} must be in (0, 1]")
      if not row["manual_cost"] > row["automated_cost"] >= 0:
        raise ValueError(f"business.load.processes: row {i} needs manual_cost > automated_cost >= 0; got "
                         f"{row['manual_cost']} and {row['automated_cost']}")
      if not row["volume"] > 0 or not row["capacity"] >= 0:
        raise ValueError(f"business.load.processes: row {i} needs volume > 0 and capacity >= 0")
    return {**state, "processes": rows, "notes": tuple(state.get("notes", ())) + tuple(notes)}

  return stage


@pipeline.register("business", "allocate")
def allocate(budget: float = 300000.0, verify: bool = True) -> pipeline.Stage:
  if not budget >= 0:
    raise ValueError(f"business.allocate: budget={budget!r} must be >= 0")

  def stage(state):
    rows = state["processes"]
    get = lambda key: np.array([r[key] for r in rows], np.float64)
    volume, manual, automated, max_share = get("volume"), get("manual_cost"), get("automated_cost"), get("max_share")
    problem = allocation.make_problem(budget, get("half_saturation"), volume * max_share * (manual - automated),
                                      get("shape"), upper=get("capacity"))
    result = allocation.solve(problem)
    x = result.spend
    with np.errstate(divide="ignore"):
      share = np.where(x > 0, max_share / (1 + (problem.half_saturation / np.maximum(x, 1e-300)) ** problem.shape),
                       0.0)
    automated_units = volume * share
    cost_before = float(np.sum(volume * manual))
    cost_after = float(np.sum(volume * (1 - share) * manual + automated_units * automated))
    saving = cost_before - cost_after
    per_process = [{"process": r["process"], "investment": float(xi), "automated_share": float(si),
                    "automated_units_per_period": float(ui), "saving_per_period": float(vi * si * (mi - ai)),
                    "marginal_saving_per_unit_investment": float(gi), "at_capacity": bool(xi >= r["capacity"] - 1e-6)}
                   for r, xi, si, ui, vi, mi, ai, gi in zip(rows, x, share, automated_units, volume, manual,
                                                            automated, result.marginal)]
    state = pipeline.with_result(state, "allocation", {
        "budget": budget, "investment": float(x.sum()), "operating_cost_per_period_before": cost_before,
        "operating_cost_per_period_after": cost_after, "saving_per_period": saving,
        "automated_throughput_per_period": float(automated_units.sum()),
        "automation_share": float(automated_units.sum() / volume.sum()),
        "payback_periods": float(x.sum() / saving) if saving > 0 else float("inf"), "processes": per_process})
    if verify:
      for entry in allocation.verify(problem, result, prefix="business.allocation"):
        state = pipeline.with_check(state, entry)
      state = pipeline.with_check(state, pipeline.check(
          "business.saving_identity", "|saving from the operating costs - allocated Hill response| / saving",
          abs(saving - result.response) / max(saving, 1e-300), 1e-9))
    return state

  return stage


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.engine = "business"
  c.stages = "load,allocate"
  c.load = ml_collections.ConfigDict({"processes": ""})  # "": the shipped made-up example
  c.allocate = ml_collections.ConfigDict({"budget": 300000.0, "verify": True})
  return c


run = pipeline.run  # the report of default_config() (or a user's config of this engine's stages)
