"""The training loop: ``train_and_evaluate(config, workdir)``, and ``throughput(config, steps)``.

Files in ``workdir``: ``config.json`` (the resolved config), ``data.json`` (the corpus: source, files, bytes,
split), ``checkpoints/`` (orbax), ``metrics.jsonl`` and ``tensorboard/`` (train, eval and perf records) and
``summary.json`` at the end. Starting again in the same ``workdir`` resumes from the newest readable
checkpoint; batches and dropout are functions of the step, so the resumed run computes what an uninterrupted
run computes. An unreadable checkpoint (:mod:`checkpoint`: damaged files or metadata, an array that differs from
its recorded SHA-256) is set aside and the previous one resumed; the records ``metrics.jsonl`` holds past the
resumed step are then replaced by the recomputed ones, with a warning saying how many. When checkpoints were
saved and none is readable, the run is refused (:class:`checkpoint.NoReadableCheckpoint`, naming the folder and
how to start over) with ``metrics.jsonl`` and every other record left as they are: it never silently starts
again at step 0.

Resuming is refused (:class:`config.ConfigChangedError`, before the corpus is read or ``config.json``
rewritten) when the checkpoint's config fingerprint (:func:`config.fingerprint`: model, optimizer, data, seed
and ``train.steps``) differs from this config's, listing each changed field with its old and new value;
``train.allow_config_change=True`` accepts changed fields other than ``train.steps``, and
``train.allow_steps_change=True`` a new ``train.steps`` (the schedule is rebuilt for the new length and
followed from the checkpoint's step on). Logging, evaluation and checkpoint cadence, sampling and analysis fields may
change freely.

Every step reports its loss, gradient norm and whether its updated parameters are all finite (computed inside
the jitted step). Before any state is evaluated, recorded or saved, the flags of every step up to it are read
and checked, whatever ``train.log_every`` is; the first non-finite one stops the run with
:class:`NonFiniteError` naming the quantity and the step, and the last good checkpoint stays the newest.
"""

from __future__ import annotations

import functools
import json
import logging as pylogging
import math
import os
import pathlib
import sys
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from distattn_jax import monitoring
from distattn_jax.data import text
from distattn_jax.models import TruthGPT, count_params
from distattn_jax.training import checkpoint, distributed, optim, steps
from distattn_jax.training.config import check_resume, fingerprint, validate
from distattn_jax.training.writers import MetricWriter, read_jsonl, write_text_atomically


class NonFiniteError(RuntimeError):
  """Training produced a non-finite loss, gradient norm or parameter; ``step`` and ``quantity`` say where."""

  def __init__(self, message: str, step: int, quantity: str):
    super().__init__(message)
    self.step, self.quantity = step, quantity


NonFiniteLossError = NonFiniteError  # the name before gradients and parameters were checked too


def hide_orbax_info_logs() -> None:
  """Orbax logs a dozen INFO lines per save; keep its warnings and errors, drop the rest (for the mains)."""

  def keep(record) -> bool:
    return record.levelno >= pylogging.WARNING or f"{os.sep}orbax{os.sep}" not in record.pathname

  logging.get_absl_logger().addFilter(keep)


def write_json(path: pathlib.Path, value: Any) -> None:
  """Writes ``value`` as JSON, atomically (:func:`writers.write_text_atomically`)."""
  write_text_atomically(path, json.dumps(value, indent=2, sort_keys=True) + "\n")


def build(config: ml_collections.ConfigDict, placement: distributed.Placement | None = None
          ) -> tuple[TruthGPT, steps.TrainState]:
  """The validated model and its freshly initialised train state (the target a checkpoint restores into), on
  ``placement``'s mesh when it has one (sharded; with ``mesh.seq > 1`` the model attends with the ring kernel:
  :func:`distributed.model_config`)."""
  model_config = validate(config)
  model = TruthGPT(model_config)
  tx = optim.make_optimizer(config.optim, config.train.steps)
  if placement is None or placement.mesh is None:
    return model, steps.create_train_state(model, tx, config.seed, config.data.seq_len)
  run_model = TruthGPT(distributed.model_config(config, model_config, placement.axes))
  with placement.context():
    return run_model, placement.init_state(model, run_model, tx, config.seed, config.data.seq_len)


def compile_train_step(config: ml_collections.ConfigDict, state: steps.TrainState, windows: np.ndarray,
                       dropout_key: jax.Array, placement: distributed.Placement = distributed.Placement()):
  """``train_step`` jitted (the state donated, with ``placement``'s shardings) and compiled for these shapes;
  returns it and its compile stats."""
  fn = placement.jit_train_step(state, config.optim.grad_accum_steps)
  with placement.context():
    return monitoring.compile_with_stats(fn, state, windows, dropout_key)


class NoWriter:
  """The metric writer of every process but process 0: one process writes a run's records."""

  def write(self, step: int, split: str, values: dict[str, Any]) -> None:
    pass

  def close(self) -> None:
    pass


def load_data(config: ml_collections.ConfigDict) -> text.TextData:
  corpus = text.load_corpus(config.data.path, config.data.val_fraction, min_split_bytes=config.data.seq_len + 1)
  info = corpus.info
  logging.info("corpus %s (%s): %d files, %d bytes; train %d bytes, validation %d bytes (split by %s)",
               info["source"], info["path"], info["files"], info["bytes"], info["train_bytes"],
               info["validation_bytes"], info["split"])
  return text.TextData(corpus, config.data.seq_len, config.data.batch_size, config.seed)


def evaluate(eval_fn, state: steps.TrainState, batches: list[np.ndarray]) -> float:
  """Validation bits per byte over ``batches``."""
  totals = [eval_fn(state, b) for b in batches]
  return steps.bits_per_byte(sum(float(t["nll_sum"]) for t in totals), sum(float(t["tokens"]) for t in totals))


class Progress:
  """tqdm when stderr is a terminal; otherwise one log line per report, with the same numbers."""

  def __init__(self, total: int, start: int):
    self.total = total
    self.bar = None
    if sys.stderr.isatty():
      from tqdm import tqdm
      self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)

  def report(self, step: int, loss: float, perf: dict[str, float]) -> None:
    tokens_per_second = perf.get("tokens_per_second", float("nan"))
    if self.bar is not None:
      self.bar.update(step - self.bar.n)
      self.bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_per_second:,.0f}")
      return
    eta = (self.total - step) * perf.get("step_seconds", float("nan"))
    eta_text = time.strftime("%H:%M:%S", time.gmtime(eta)) if math.isfinite(eta) else "?"
    logging.info("step %d/%d  loss %.4f  %.0f tokens/s  ETA %s", step, self.total, loss, tokens_per_second,
                 eta_text)

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()


def _check_finite(records: list[tuple[int, dict[str, float]]], checkpoints: checkpoint.Checkpoints) -> None:
  """Raises :class:`NonFiniteError` at the first step whose loss, gradient norm or updated parameters are not
  finite, in that order (a NaN gradient makes NaN parameters too; the earliest cause is the one named)."""
  for step, values in records:
    loss, grad_norm = values["loss"], values["grad_norm"]
    if not math.isfinite(loss):
      quantity, what = "loss", f"the loss is {loss}"
    elif not math.isfinite(grad_norm):
      quantity, what = "grad_norm", f"the gradient norm is {grad_norm} (the loss, {loss:.4g}, is finite)"
    elif not values["params_finite"]:
      quantity, what = "params", (f"the updated parameters are not all finite (the loss, {loss:.4g}, and the "
                                  f"gradient norm, {grad_norm:.4g}, are)")
    else:
      continue
    kept = checkpoints.steps()
    raise NonFiniteError(
        f"training stopped: {what} at step {step}; the last good checkpoint "
        f"({'step ' + str(kept[-1]) if kept else 'none yet'}) in {checkpoints.directory} is kept", step, quantity)


def resume_check(config: ml_collections.ConfigDict, directory: pathlib.Path, prefixes: tuple[str, ...] = ("",)):
  """The ``check`` for :meth:`Checkpoints.restore_latest` of ``directory``: the checkpoint's saved fingerprint
  must match ``config``'s over the fields under ``prefixes`` (:func:`config.check_resume`); accepted changes
  are logged."""

  def check(step: int, metadata: dict[str, Any]) -> None:
    where = f"{directory}/{step}"
    for name, old, new in check_resume(metadata.get("config"), config, where, prefixes):
      logging.warning("resuming %s with %s changed: %r -> %r", where, name, old, new)

  return check


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict[str, Any]:
  """Trains ``config`` in ``workdir`` (resuming from its newest checkpoint); returns the summary it saves.

  On a mesh (``config.mesh``, :mod:`distributed`) the steps run sharded; with several processes each builds its
  rows of every batch, all take part in checkpoints, and process 0 alone writes config, data, metrics,
  TensorBoard and summary files (the workdir must be one shared folder)."""
  wall_start = time.perf_counter()
  validate(config)  # before anything is read, placed or compiled
  placement = distributed.Placement.create(config)
  _, fresh = build(config, placement)
  main_process = jax.process_index() == 0
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  train_cfg = config.train
  total = train_cfg.steps
  checkpoints = checkpoint.Checkpoints(workdir / "checkpoints", train_cfg.keep_checkpoints)
  try:
    state = checkpoints.restore_latest(fresh, resume_check(config, checkpoints.directory)) or fresh
  except checkpoint.NoReadableCheckpoint as e:
    checkpoints.close()
    raise checkpoint.NoReadableCheckpoint(
        f"{e}\nTo start this run over from step 0, delete {workdir} (or train in another workdir); its "
        "metrics.jsonl and other records are left as they were") from None
  except BaseException:
    checkpoints.close()
    raise
  start = int(state.step)
  # Written once the checkpoint accepted this config: a refused resume leaves the run's record as it was.
  if main_process:
    write_json(workdir / "config.json", json.loads(config.to_json_best_effort()))
  data = load_data(config)
  if main_process:
    write_json(workdir / "data.json", data.corpus.info)

  batch_size, rows = config.data.batch_size, placement.rows(config.data.batch_size)
  eval_batches = [placement.batch(b, batch_size) for b in data.eval_batches(train_cfg.eval_batches, rows)]
  with placement.context():
    eval_fn, eval_stats = monitoring.compile_with_stats(placement.jit_eval_step(fresh), fresh, eval_batches[0])
  untrained_bpb = evaluate(eval_fn, fresh, eval_batches)  # also when the run resumes
  del fresh
  logging.info("%s at step %d of %d in %s; %d parameters%s", "resuming" if start else "starting", start, total,
               workdir, count_params(state.params), f" on mesh {placement.axes}" if placement.axes else "")
  if main_process:
    past = [r for r in read_jsonl(workdir / "metrics.jsonl") if r["step"] > start]
    if past:  # written after the checkpoint this run resumes from: the writer replaces them as they recur
      logging.warning("%s holds %d records past step %d, where this run resumes; they are replaced by the "
                      "recomputed ones (steps %d to %d)", workdir / "metrics.jsonl", len(past), start,
                      min(r["step"] for r in past), max(r["step"] for r in past))
  writer = MetricWriter(workdir, start) if main_process else NoWriter()
  if placement.mesh is None:
    train_batch = data.train_batch
  else:
    train_batch = lambda step: placement.batch(data.train_batch(step, rows), batch_size)
  if start == 0:
    writer.write(0, "eval", {"bits_per_byte": untrained_bpb})

  tokens_per_step = config.data.batch_size * config.data.seq_len
  schedule = optim.learning_rate_schedule(config.optim.learning_rate, config.optim, total)
  dropout_key = placement.dropout_key(config.seed)
  compile_stats = {"eval_compile_seconds": eval_stats["compile_seconds"]}
  timer = monitoring.Throughput(tokens_per_step, start)
  progress = Progress(total, start)
  final_bpb = None  # the evaluation at step == total; a run resumed at its last step evaluates after the loop
  try:
    if start < total:
      train_fn, stats = compile_train_step(config, state, train_batch(start), dropout_key, placement)
      compile_stats.update(stats)
      writer.write(start, "perf", monitoring.get_performance_stats({}, compile_stats))
      timer.restart(start)
    unchecked, checked = [], []
    for step in range(start + 1, total + 1):
      state, metrics = train_fn(state, train_batch(step - 1), dropout_key)
      unchecked.append((step, metrics))
      log = step % train_cfg.log_every == 0 or step == total
      run_eval = step % train_cfg.eval_every == 0 or step == total
      save = step % train_cfg.checkpoint_every == 0 or step == total
      if log or run_eval or save:
        # Whatever the logging interval, no state is evaluated, recorded or saved before every step up to it
        # has been checked (the flags are computed inside the step; reading them is a few scalars).
        new = [(s, {k: float(v) for k, v in m.items()}) for s, m in jax.device_get(unchecked)]
        unchecked = []
        _check_finite(new, checkpoints)
        checked += new
      if log:
        records, checked = checked, []
        perf = timer.mark(step)
        loss = float(np.mean([r["loss"] for _, r in records]))
        values = {"loss": loss, "bits_per_byte": loss / math.log(2),
                  "grad_norm": float(np.mean([r["grad_norm"] for _, r in records])),
                  "learning_rate": float(schedule(step - 1)),
                  **placement.fetch(steps.lambda_values, state.params)}
        writer.write(step, "train", values)
        writer.write(step, "perf", monitoring.get_performance_stats(perf, {}))
        progress.report(step, loss, perf)
      if run_eval:
        bpb = evaluate(eval_fn, state, eval_batches)
        writer.write(step, "eval", {"bits_per_byte": bpb})
        if step == total:
          final_bpb = bpb
        timer.restart(step)  # evaluation and checkpointing are not training time
      if save:
        checkpoints.save(state, {"config": fingerprint(config)})
        timer.restart(step)
  finally:
    progress.close()
    writer.close()
    checkpoints.close()

  if final_bpb is None:
    final_bpb = evaluate(eval_fn, state, eval_batches)
  summary = {
      "steps": int(state.step), "untrained_validation_bits_per_byte": untrained_bpb,
      "validation_bits_per_byte": final_bpb, "parameters": count_params(state.params),
      "tokens_per_step": tokens_per_step, "wall_seconds": time.perf_counter() - wall_start,
      "resumed_from_step": start, "corpus": data.corpus.info,
      "lambda": {k: np.asarray(v).tolist() for k, v in placement.fetch(steps.lambda_values, state.params).items()},
      **monitoring.get_performance_stats(timer.overall(), compile_stats),
  }
  if placement.axes:
    summary["mesh"] = placement.axes
  if main_process:
    write_json(workdir / "summary.json", summary)
  return summary


def throughput(config: ml_collections.ConfigDict, steps_to_time: int = 20, warmup_steps: int = 3) -> float:
  """Training tokens per second of ``config``'s model and optimizer: one compiled ``train_step`` on random
  bytes of the configured batch shape, ``warmup_steps`` untimed, then ``steps_to_time`` timed up to
  ``block_until_ready``. Compilation and warm-up are excluded; the corpus is not read (the cost of a step does
  not depend on which bytes it sees)."""
  if steps_to_time < 1 or warmup_steps < 0:
    raise ValueError(f"throughput: need steps_to_time >= 1 and warmup_steps >= 0; got {steps_to_time}, "
                     f"{warmup_steps}")
  _, state = build(config)
  d = config.data
  windows = np.random.default_rng(config.seed).integers(0, config.model.vocab_size, (d.batch_size, d.seq_len + 1),
                                                      dtype=np.int32)
  key = steps.dropout_key(config.seed)
  train_fn, _ = compile_train_step(config, state, windows, key)
  for _ in range(warmup_steps):
    state, _ = train_fn(state, windows, key)
  jax.block_until_ready(state)
  start = time.perf_counter()
  for _ in range(steps_to_time):
    state, _ = train_fn(state, windows, key)
  jax.block_until_ready(state)
  return steps_to_time * d.batch_size * d.seq_len / (time.perf_counter() - start)
