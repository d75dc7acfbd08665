"""The ablation grid's plots, drawn from its results document alone (matplotlib, headless)."""

from __future__ import annotations

import pathlib
from typing import Any

import numpy as np

from distattn_jax.training.ablation import report


def plot(doc: dict[str, Any], results_dir: pathlib.Path, suite: str) -> list[pathlib.Path]:
  """Four PNGs, one panel per task: learning curves (held-out metric per metric, learned lam, mean over seeds),
  bars with error bars (every metric and mode), mean lam over training (learned lam) and attention entropy per
  layer at the end."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  g = doc["grid"]
  task_list = [t for t in g["tasks"] if any(r["task"] == t for r in doc["records"])]
  colors = {m: plt.cm.tab10(i % 10) for i, m in enumerate(g["metrics"])}
  mode = "learned" if "learned" in g["lambda_modes"] else g["lambda_modes"][0]

  def records(task, metric, m=mode):
    return [r for r in doc["records"] if r["task"] == task and r["metric"] == metric and r["lambda_mode"] == m
            and r["finite"]]

  def panels(title):
    fig, axes = plt.subplots(1, len(task_list), figsize=(4.5 * len(task_list), 3.6), squeeze=False)
    fig.suptitle(f"{suite}: {title}")
    return fig, axes[0]

  out = []

  def save(fig, name):
    fig.tight_layout()
    path = results_dir / f"{suite}_{name}.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    out.append(path)

  fig, axes = panels(f"held-out metric over training ({mode} lam, mean over seeds)")
  for ax, task in zip(axes, task_list):
    for metric in g["metrics"]:
      rs = records(task, metric)
      if rs:
        n = min(len(r["curve"]["step"]) for r in rs)
        ax.plot(rs[0]["curve"]["step"][:n], np.mean([r["curve"]["eval"][:n] for r in rs], 0), label=metric,
                color=colors[metric])
    ax.set_title(task)
    ax.set_xlabel("step")
    ax.set_ylabel("accuracy" if report.higher_is_better(doc, task) else "bits per byte")
  axes[-1].legend(fontsize=7)
  save(fig, "curves")

  s = report.summary(doc)
  fig, axes = panels("final metric, mean +- std over seeds")
  width = 0.8 / len(g["lambda_modes"])
  for ax, task in zip(axes, task_list):
    x = np.arange(len(g["metrics"]))
    for j, m in enumerate(g["lambda_modes"]):
      vals = [s.get((task, metric, m), (np.nan, 0, 0)) for metric in g["metrics"]]
      ax.bar(x + j * width, [v[0] for v in vals], width, yerr=[v[1] for v in vals], label=f"{m} lam", capsize=2)
    ax.set_xticks(x + width * (len(g["lambda_modes"]) - 1) / 2, g["metrics"], rotation=45, fontsize=7)
    ax.set_title(task)
  axes[-1].legend(fontsize=7)
  save(fig, "bars")

  fig, axes = panels("lam over training (learned; mean over layers, heads and seeds)")
  for ax, task in zip(axes, task_list):
    for metric in g["metrics"]:
      rs = records(task, metric, "learned")
      if rs:
        n = min(len(r["curve"]["step"]) for r in rs)
        lam = np.mean([[np.mean(l) for l in r["curve"]["lambda"][:n]] for r in rs], 0)
        ax.plot(rs[0]["curve"]["step"][:n], lam, label=metric, color=colors[metric])
    ax.set_yscale("log")
    ax.set_title(task)
    ax.set_xlabel("step")
  axes[-1].legend(fontsize=7)
  save(fig, "lambda")

  fig, axes = panels(f"attention entropy per layer at the end ({mode} lam, nats, mean over seeds)")
  for ax, task in zip(axes, task_list):
    for metric in g["metrics"]:
      rs = records(task, metric)
      if rs and rs[0]["attention_entropy"]:
        ent = np.mean([r["attention_entropy"] for r in rs], 0)
        ax.plot(np.arange(len(ent)), ent, marker="o", label=metric, color=colors[metric])
    ax.set_title(task)
    ax.set_xlabel("layer")
  axes[-1].legend(fontsize=7)
  save(fig, "entropy")
  return out
