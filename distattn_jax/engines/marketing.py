"""The marketing engine: a budget over channels x audience segments with Hill response curves and geometric
adstock, solved by :func:`allocation.allocate`; expected conversions, revenue and ROI computed from the curves;
per segment the content variant that earns most under the same model.

Stages (registry ``"marketing"``): ``load`` (CSV inputs; ``#`` lines become report notes), ``adstock``,
``allocate``, ``content``. Geometric adstock carries a share ``decay`` of each period's spend into the next, so
a steady spend ``x`` per period acts as ``x / (1 - decay)``; with Hill curves this is the same curve with
``half_saturation * (1 - decay)``, which is what the ``adstock`` stage applies (:func:`geometric_adstock` is the
time-series form, used to check it).
"""

from __future__ import annotations

import pathlib

import ml_collections
import numpy as np

from distattn_jax.engines import allocation, inputs, pipeline

# The made-up example inputs ship inside the package (package data), so an installed wheel finds them too.
EXAMPLES = pathlib.Path(__file__).resolve().parent / "examples"
CELL_COLUMNS = {"channel": str, "segment": str, "half_saturation": float, "max_response": float, "shape": float,
                "value": float, "adstock": float}
VARIANT_COLUMNS = {"segment": str, "variant": str, "lift": float, "cost": float}


def geometric_adstock(spend: np.ndarray, decay: float) -> np.ndarray:
  """``a_t = x_t + decay * a_{t-1}`` over the last axis."""
  out = np.zeros_like(np.asarray(spend, np.float64))
  carry = 0.0
  for t in range(out.shape[-1]):
    carry = spend[..., t] + decay * carry
    out[..., t] = carry
  return out


@pipeline.register("marketing", "load")
def load(cells: str = "", variants: str = "") -> pipeline.Stage:
  def stage(state):
    rows, notes = inputs.read_table(cells or str(EXAMPLES / "marketing_example.csv"), columns=CELL_COLUMNS,
                                    name="marketing.load.cells")
    for i, row in enumerate(rows, start=1):
      if not 0 <= row["adstock"] < 1:
        raise ValueError(f"marketing.load.cells: row {i} adstock={row['adstock']} must be in [0, 1)")
      if not row["value"] >= 0:
        raise ValueError(f"marketing.load.cells: row {i} value={row['value']} must be >= 0")
    variant_rows, variant_notes = ([], [])
    if variants != "none":
      variant_rows, variant_notes = inputs.read_table(variants or str(EXAMPLES / "marketing_variants_example.csv"),
                                                      columns=VARIANT_COLUMNS, name="marketing.load.variants")
    return {**state, "cells": rows, "variants": variant_rows,
            "notes": tuple(state.get("notes", ())) + tuple(notes) + tuple(variant_notes)}

  return stage


@pipeline.register("marketing", "adstock")
def adstock() -> pipeline.Stage:
  def stage(state):
    cells = [{**c, "half_saturation": c["half_saturation"] * (1 - c["adstock"])} for c in state["cells"]]
    return {**state, "cells": cells, "adstock_applied": True}

  return stage


def _solve(cells, budget: float, lift: dict[str, float] | None = None):
  lift = lift or {}
  k = np.array([c["half_saturation"] for c in cells])
  value = np.array([c["value"] * c["max_response"] * lift.get(c["segment"], 1.0) for c in cells])
  shape = np.array([c["shape"] for c in cells])
  problem = allocation.make_problem(budget, k, value, shape)
  return problem, allocation.solve(problem)


@pipeline.register("marketing", "allocate")
def allocate(budget: float = 100000.0, verify: bool = True) -> pipeline.Stage:
  if not budget >= 0:
    raise ValueError(f"marketing.allocate: budget={budget!r} must be >= 0")

  def stage(state):
    cells = state["cells"]
    problem, result = _solve(cells, budget)
    conversions = np.array([c["max_response"] for c in cells]) * _share(problem, result.spend)
    revenue = result.response
    spend = float(result.spend.sum())
    per_cell = [{"channel": c["channel"], "segment": c["segment"], "spend": float(x), "conversions": float(n),
                 "revenue": float(n * c["value"]), "marginal_revenue_per_unit_spend": float(m)}
                for c, x, n, m in zip(cells, result.spend, conversions, result.marginal)]
    segments = sorted({c["segment"] for c in cells})
    by_segment = {s: {key: float(sum(r[key] for r in per_cell if r["segment"] == s))
                      for key in ("spend", "conversions", "revenue")} for s in segments}
    state = pipeline.with_result(state, "allocation", {
        "budget": budget, "spend": spend, "expected_conversions": float(conversions.sum()),
        "expected_revenue": revenue, "roi": (revenue - spend) / spend if spend else float("nan"),
        "adstock_steady_state": bool(state.get("adstock_applied", False)), "by_segment": by_segment,
        "cells": per_cell})
    if verify:
      for entry in allocation.verify(problem, result, prefix="marketing.allocation"):
        state = pipeline.with_check(state, entry)
    return {**state, "budget": budget}

  return stage


def _share(problem: allocation.Problem, spend: np.ndarray) -> np.ndarray:
  """Each cell's response as a fraction of its maximum (the Hill curve divided by max_response)."""
  x = np.where(spend > 0, spend, 1.0)
  return np.where(spend > 0, 1.0 / (1.0 + (problem.half_saturation / x) ** problem.shape), 0.0)


@pipeline.register("marketing", "content")
def content() -> pipeline.Stage:
  """Per segment, each variant's lift applied to that segment alone, the budget re-allocated, and the variant
  with the highest revenue minus spend minus its cost chosen."""

  def stage(state):
    budget = state.get("budget", 0.0)
    choices = {}
    for segment in sorted({v["segment"] for v in state["variants"]}):
      scores = {}
      for variant in (v for v in state["variants"] if v["segment"] == segment):
        _, result = _solve(state["cells"], budget, {segment: variant["lift"]})
        scores[variant["variant"]] = float(result.response - result.spend.sum() - variant["cost"])
      best = max(scores, key=scores.get)
      choices[segment] = {"best_variant": best, "net_by_variant": scores}
    return pipeline.with_result(state, "content", choices)

  return stage


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.engine = "marketing"
  c.stages = "load,adstock,allocate,content"
  c.load = ml_collections.ConfigDict({"cells": "", "variants": ""})  # "": the shipped made-up examples
  c.allocate = ml_collections.ConfigDict({"budget": 100000.0, "verify": True})
  return c


run = pipeline.run  # the report of default_config() (or a user's config of this engine's stages)
