"""The ablation grid's markdown report, written from its results document alone.

Per task and lambda mode, the mean +- std over seeds of every metric; per task the winning cell group against
the best group of every other metric, judged against the seed spread (the sum of the two standard deviations),
which is only measured with at least two seeds per group; learned against fixed lam; the weakest cell against
input-blind baselines; and whether the budget was enough.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from distattn_jax import initializers
from distattn_jax.training.ablation import grid

NO_SPREAD = "fewer than two seeds per cell, so no seed spread can be measured and no verdict is drawn"


def summary(doc: dict[str, Any]) -> dict[tuple[str, str, str], tuple[float, float, int]]:
  """``{(task, metric, mode): (mean, std, seeds)}`` of the final metric (std with ddof=1; 0 for one seed)."""
  groups: dict[tuple[str, str, str], list[float]] = {}
  for r in doc["records"]:
    groups.setdefault((r["task"], r["metric"], r["lambda_mode"]), []).append(r["final"])
  return {k: (float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0, len(v)) for k, v in groups.items()}


def higher_is_better(doc, task) -> bool:
  return next(r["score_name"] for r in doc["records"] if r["task"] == task) == "accuracy"


def table(doc: dict[str, Any]) -> str:
  """Markdown: per task and lambda mode, mean +- std over seeds per metric (best in bold), then per task the
  winning cell, its margin over the best cell of another metric and whether the margin exceeds the seed spread
  (the sum of the two standard deviations; with fewer than two seeds there is none, and no verdict)."""
  g = doc["grid"]
  s = summary(doc)
  lines = [f"Suite `{g['suite']}`: {g['seeds']} seeds per cell, {g['budget']['steps']} steps of batch "
           f"{g['budget']['batch_size']}, model width {g['budget']['width']}, depth {g['budget']['depth']}, "
           f"{g['budget']['num_heads']} heads. Accuracy (%) on the test split, higher is better; text: bits per "
           "byte on validation, lower is better. mean +- std over seeds.", "",
           "| task | lam | " + " | ".join(g["metrics"]) + " |", "|---|---|" + "---|" * len(g["metrics"])]
  verdicts = []
  for task in g["tasks"]:
    if not any(r["task"] == task for r in doc["records"]):
      continue
    higher = higher_is_better(doc, task)
    scale = 100.0 if higher else 1.0
    present = {k: v for k, v in s.items() if k[0] == task and not np.isnan(v[0])}
    for mode in g["lambda_modes"]:
      row = {m: s.get((task, m, mode)) for m in g["metrics"]}
      vals = {m: v[0] for m, v in row.items() if v and not np.isnan(v[0])}
      best = (max if higher else min)(vals, key=vals.get) if vals else None
      cells_ = []
      for m in g["metrics"]:
        v = row[m]
        text = "-" if v is None else f"{v[0] * scale:.2f} +- {v[1] * scale:.2f}"
        cells_.append(f"**{text}**" if m == best else text)
      lines.append(f"| {task} | {mode} | " + " | ".join(cells_) + " |")
    ranked = sorted(present.items(), key=lambda kv: kv[1][0], reverse=higher)
    others = [kv for kv in ranked if kv[0][1] != ranked[0][0][1]] if ranked else []
    if others:  # the winner against the best cell of any other metric
      (k1, (m1, s1, n1)), (k2, (m2, s2, n2)) = ranked[0], others[0]
      head = (f"- **{task}**: {k1[1]} ({k1[2]} lam) {'wins' if n1 > 1 and n2 > 1 else 'leads'} with "
              f"{m1 * scale:.2f}; best other metric {k2[1]} ({k2[2]} lam) {m2 * scale:.2f}; margin "
              f"{abs(m1 - m2) * scale:.2f}")
      if n1 < 2 or n2 < 2:
        verdicts.append(head + f"; {NO_SPREAD}.")
        continue
      exceeds = abs(m1 - m2) > s1 + s2
      # Every other metric at its best lam mode, and whether the winner clears it by more than the spread.
      best_of = {}
      for (_, metric, mode), v in ranked:
        best_of.setdefault(metric, (mode, v))
      beaten = [f"{metric} ({mode} lam, {m * scale:.2f})" for metric, (mode, (m, sd, n)) in best_of.items()
                if metric != k1[1] and n > 1 and abs(m1 - m) > s1 + sd]
      verdicts.append(head + " " + ("exceeds" if exceeds else "does not exceed")
                      + f" the seed spread ({(s1 + s2) * scale:.2f} = sum of the two stds). Metrics it beats by more "
                      "than the seed spread, each at its better lam mode: " + (", ".join(beaten) or "none") + ".")
  if len(g["lambda_modes"]) == 2:
    verdicts += ["", _modes_line(doc, s)]
  floor = _floor_lines(doc)
  if floor:
    verdicts += ["", "Against a model that ignores its input (uniform guess; always the most frequent class of the "
                 "scored test examples), the weakest cell of each task:", "", *floor]
  verdicts += ["", "Was the budget enough? The held-out metric of the learning curve over the last "
               f"{g['budget']['eval_every']} steps, the training loss, and how far learned lam moved from its "
               "calibrated start:", "",
               *_budget_lines(doc)]
  nonfinite = [grid.cell_key(r["task"], r["metric"], r["lambda_mode"], r["seed"]) for r in doc["records"]
               if not r["finite"]]
  lines += ["", *verdicts, "", "Non-finite cells: " + (", ".join(nonfinite) if nonfinite else "none") + "."]
  m = doc.get("machine", {})
  walls = sum(r["wall_s"] for r in doc["records"])
  # Files written before host.machine() name the CPU "cpu" and its count "cores".
  lines.append(f"Machine: {m.get('processor', m.get('cpu'))} ({m.get('cpu_count', m.get('cores'))} cores, "
               f"{m.get('backend')}); summed cell wall time "
               f"{walls / 60:.1f} min over {len(doc['records'])} cells.")
  return "\n".join(lines) + "\n"


def _modes_line(doc: dict[str, Any], s: dict) -> str:
  """The (task, metric) pairs whose two lam modes differ by more than the seed spread."""
  g = doc["grid"]
  a, b = g["lambda_modes"]
  out, pairs, unmeasured = [], 0, 0
  for task in g["tasks"]:
    if not any(r["task"] == task for r in doc["records"]):
      continue
    scale = 100.0 if higher_is_better(doc, task) else 1.0
    for metric in g["metrics"]:
      va, vb = s.get((task, metric, a)), s.get((task, metric, b))
      if not (va and vb):
        continue
      if va[2] < 2 or vb[2] < 2:
        unmeasured += 1
        continue
      pairs += 1
      if abs(va[0] - vb[0]) > va[1] + vb[1]:
        out.append(f"{task}/{metric} ({a} {va[0] * scale:.2f}, {b} {vb[0] * scale:.2f})")
  text = f"{a.capitalize()} against {b} lam, same metric: "
  if unmeasured and not pairs:
    return text + NO_SPREAD + "."
  return (text + f"differences beyond the seed spread in {len(out)} of {pairs} pairs"
          + (": " + ", ".join(out) if out else "")
          + (f" ({unmeasured} pairs with fewer than two seeds left out: no spread measured)" if unmeasured else "")
          + ".")


def _floor_lines(doc: dict[str, Any]) -> list[str]:
  """Per task: the weakest cell against the uniform and majority-class baselines (results files written before
  baselines were recorded have none, and get no lines)."""
  out = []
  for task, b in doc.get("baselines", {}).items():
    rs = [r for r in doc["records"] if r["task"] == task and r["finite"]]
    if not rs:
      continue
    if b["kind"] == "lm":
      worst = max(rs, key=lambda r: r["final"])
      out.append(f"- **{task}**: uniform over bytes {b['uniform']:.2f} bits per byte; weakest cell "
                 f"{grid.cell_key(worst['task'], worst['metric'], worst['lambda_mode'], worst['seed'])} "
                 f"{worst['final']:.4f} ({'beats' if worst['final'] < b['uniform'] else 'does not beat'} it).")
    else:
      worst = min(rs, key=lambda r: r["final"])
      floor = b["majority"]  # never below uniform: the most frequent class holds at least 1 / classes
      out.append(f"- **{task}**: {b['classes']} classes; uniform {100 * b['uniform']:.2f}%, majority class "
                 f"{100 * b['majority']:.2f}%; weakest cell "
                 f"{grid.cell_key(worst['task'], worst['metric'], worst['lambda_mode'], worst['seed'])} "
                 f"{100 * worst['final']:.2f}% ({'beats' if worst['final'] > floor else 'does not beat'} both).")
  return out


def _budget_lines(doc: dict[str, Any]) -> list[str]:
  """Per task: in how many cells the learning curve still improved over its last interval (and the median
  improvement), the median training loss over that interval (near 0: the training set is memorised), and the
  largest factor by which any learned lam ended away from ``initializers.default_lambda``."""
  g = doc["grid"]
  head_dim = g["budget"]["width"] // g["budget"]["num_heads"]
  out = []
  for task in g["tasks"]:
    rs = [r for r in doc["records"] if r["task"] == task and r["finite"] and len(r["curve"]["eval"]) >= 2]
    if not rs:
      continue
    higher = higher_is_better(doc, task)
    scale, unit = (100.0, " points") if higher else (1.0, " bits per byte")
    change = np.array([r["curve"]["eval"][-1] - r["curve"]["eval"][-2] for r in rs]) * (1 if higher else -1)
    loss = np.median([r["curve"]["train_loss"][-1] for r in rs])
    text = (f"- **{task}**: improved in {int(np.sum(change > 0))} of {len(rs)} cells (median improvement "
            f"{np.median(change) * scale:+.2f}{unit}); median training loss over those steps {loss:.3f} nats")
    moves = []
    for r in rs:
      if r["lambda_mode"] == "learned":
        start = initializers.default_lambda(r["metric"], head_dim, float(g["p"]))
        moves.append(float(np.max(np.abs(np.log(np.asarray(r["final_lambda"]) / start)))))
    if moves:
      text += (f"; learned lam ended within a factor {np.exp(max(moves)):.2f} of its start in every head "
               f"(median over cells of the largest factor {np.exp(np.median(moves)):.2f})")
    out.append(text + ".")
  return out
