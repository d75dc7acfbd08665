"""Using a trained run: restore its newest checkpoint, sample text from it, analyse its attention.

These are the bodies of ``experiments/generate.py`` and ``experiments/analyze.py``; the mains only parse flags.
"""

from __future__ import annotations

import os
import pathlib

import jax
import jax.numpy as jnp
import ml_collections

from distattn_jax import analysis, models
from distattn_jax.models import TruthGPT
from distattn_jax.training import checkpoint, steps
from distattn_jax.training.loop import build, load_data, resume_check, write_json
from distattn_jax.training.writers import read_jsonl


def restore(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> tuple[TruthGPT, steps.TrainState]:
  """The model and the newest readable checkpoint's train state in ``workdir`` (for sampling and analysis)."""
  model, state = build(config)
  directory = pathlib.Path(workdir) / "checkpoints"
  if not directory.is_dir():
    raise FileNotFoundError(f"no checkpoints in {str(directory)!r}: train first (experiments/train.py "
                            f"--workdir={workdir})")
  checkpoints = checkpoint.Checkpoints(directory, config.train.keep_checkpoints)
  try:
    # Sampling and analysis depend on the model alone: only its fields must match the checkpoint's.
    restored = checkpoints.restore_latest(state, resume_check(config, checkpoints.directory, ("model.",)))
  finally:
    checkpoints.close()
  if restored is None:
    raise FileNotFoundError(f"no checkpoints in {str(directory)!r}: train first")
  return model, restored


def sample_text(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> tuple[str, int]:
  """``config.sample.length`` bytes continuing ``config.sample.prompt``, decoded as UTF-8 (invalid bytes
  replaced), and the checkpoint step they came from."""
  model, state = restore(config, workdir)
  s = config.sample
  prompt = jnp.asarray([list(s.prompt.encode())], jnp.int32)
  tokens = models.generate(model, state.params, prompt, jax.random.key(s.seed), max_new_tokens=s.length,
                           temperature=s.temperature, top_k=s.top_k)
  return bytes(jax.device_get(tokens)[0].tolist()).decode("utf-8", errors="replace"), int(state.step)


def analyze_run(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> pathlib.Path:
  """Writes ``<workdir>/analysis``: ``attention.json`` (per layer and head: entropy, max weight, mean attended
  distance, lam, p on ``config.analysis.batch_size`` validation windows), ``statistics.png``,
  ``attention_maps.png`` and, from ``metrics.jsonl``, ``lambda.png``. Returns the folder."""
  model, state = restore(config, workdir)
  windows = load_data(config).eval_batches(1)[0][:config.analysis.batch_size]
  tokens = jnp.asarray(windows[:, :-1])
  layers = analysis.analyze_attention_patterns(model, state.params, tokens)
  out = pathlib.Path(workdir) / "analysis"
  out.mkdir(exist_ok=True)
  write_json(out / "attention.json", {"step": int(state.step), "layers": layers})
  analysis.plot_statistics(layers, out / "statistics.png")
  analysis.plot_attention_maps(analysis.attention_weights(model, state.params, tokens[:1]), out / "attention_maps.png")
  history = analysis.lambda_history(read_jsonl(pathlib.Path(workdir) / "metrics.jsonl"))
  if history:
    analysis.plot_lambda_history(history, out / "lambda.png")
  return out
