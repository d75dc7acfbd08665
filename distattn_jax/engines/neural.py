"""The neural engine: the TruthGPT model's own optimization, as pipelines of transforms of its apply setup.

A *setup* is a dict: ``model_config`` (a :class:`TruthGPTConfig`), ``params``, ``wrappers`` (function
transforms applied in order to the apply function) and ``tokens`` (a measurement batch). Registered stages:

* ``kernel(implementation="blockwise")``: the attention kernel (any of ``da.kernels.available()``);
* ``bf16()``: bfloat16 compute (parameters stay float32);
* ``remat(policy="dots_with_no_batch_dims_saveable")``: rematerialise the backward pass, keeping only matmul
  outputs (``jax.checkpoint``); the forward is unchanged, the gradient's memory shrinks;
* ``jit()``: compile the apply function;
* ``calibrate_lambda(target_spread=1.0)``: set every layer's lam so that its attention logits, measured on the
  setup's batch, spread across the visible keys with standard deviation ``target_spread`` (averaged over batch
  and queries, per head). The spread is read from the model's own attention weights (the std of log weights
  over keys equals the logits' std: softmax only shifts them), and because a layer's lam changes the next
  layer's inputs the rescaling is repeated until every head is within 1%.

``optimization_level`` names preset pipelines (:data:`PRESETS`). All levels compute the same function;
float32 levels agree with ``basic`` to round-off and bfloat16 levels within :data:`BF16_TOLERANCE`, both relative
to the logits' standard deviation. ``calibrate_lambda`` changes the function, so no preset includes it.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

import distattn_jax as da
from distattn_jax import monitoring, training
from distattn_jax.engines import pipeline
from distattn_jax.models import TruthGPT, TruthGPTConfig, count_params

PRESETS = {"basic": "jit", "advanced": "kernel,jit", "full": "kernel,bf16,remat,jit"}
FLOAT32_TOLERANCE = 1e-4  # max |logits - basic's| / std(basic's logits): float32 kernels differ by round-off
BF16_TOLERANCE = 0.1  # the same in bfloat16 compute (8 mantissa bits through every layer)


def base_setup(model_config: TruthGPTConfig, params: Any, tokens: Any) -> pipeline.State:
  return {"model_config": model_config, "params": params, "wrappers": (), "tokens": jnp.asarray(tokens)}


def apply_fn(setup: pipeline.State) -> Callable[[Any, Any], jax.Array]:
  """``(params, tokens) -> logits`` of the setup: the model with its config, then each wrapper in order."""
  model = TruthGPT(setup["model_config"])

  def apply(params, tokens):
    return model.apply({"params": params}, tokens)

  for wrapper in setup["wrappers"]:
    apply = wrapper(apply)
  return apply


@pipeline.register("neural", "kernel")
def kernel(implementation: str = "blockwise") -> pipeline.Stage:
  if implementation != "auto" and implementation not in da.kernels.available():
    raise ValueError(f"neural.kernel: implementation={implementation!r} must be 'auto' or one of "
                     f"{', '.join(da.kernels.available())}")

  def stage(setup):
    return {**setup, "model_config": dataclasses.replace(setup["model_config"], implementation=implementation)}

  return stage


@pipeline.register("neural", "bf16")
def bf16() -> pipeline.Stage:
  def stage(setup):
    return {**setup, "model_config": dataclasses.replace(setup["model_config"], dtype="bfloat16")}

  return stage


@pipeline.register("neural", "remat")
def remat(policy: str = "dots_with_no_batch_dims_saveable") -> pipeline.Stage:
  if not hasattr(jax.checkpoint_policies, policy):
    names = sorted(n for n in dir(jax.checkpoint_policies) if not n.startswith("_"))
    raise ValueError(f"neural.remat: policy={policy!r} is not in jax.checkpoint_policies: {', '.join(names)}")

  def stage(setup):
    wrap = lambda f: jax.checkpoint(f, policy=getattr(jax.checkpoint_policies, policy))
    return {**setup, "wrappers": setup["wrappers"] + (wrap,)}

  return stage


@pipeline.register("neural", "jit")
def jit() -> pipeline.Stage:
  def stage(setup):
    return {**setup, "wrappers": setup["wrappers"] + (jax.jit,)}

  return stage


def attention_spread(model_config: TruthGPTConfig, params: Any, tokens: jax.Array) -> dict[str, np.ndarray]:
  """Per layer ``[heads]``: std over visible keys of the attention logits (log weights), mean over the batch
  and the queries that see at least two keys."""
  _, variables = TruthGPT(model_config).apply({"params": params}, tokens, sow_weights=True,
                                              mutable=["intermediates"])
  length = tokens.shape[-1]
  visible = np.tril(np.ones((length, length), bool))
  out = {}
  for name, block in variables["intermediates"]["trunk"].items():
    weights = np.asarray(block["attention"]["attention_weights"][0], np.float64)  # [batch, heads, q, kv]
    logs = np.where(visible[None, None], np.log(np.maximum(weights, 1e-300)), np.nan)
    spread = np.nanstd(logs[:, :, 1:], axis=-1)  # query 0 sees one key
    out[name] = spread.mean(axis=(0, 2))
  return out


def _with_lambdas(params: Any, scale: dict[str, np.ndarray]) -> Any:
  trunk = dict(params["trunk"])
  for name, factor in scale.items():
    block = dict(trunk[name])
    attention = dict(block["attention"])
    attention["log_lambda"] = attention["log_lambda"] + jnp.log(jnp.asarray(factor, jnp.float32))
    block["attention"] = attention
    trunk[name] = block
  return {**params, "trunk": trunk}


@pipeline.register("neural", "calibrate_lambda")
def calibrate_lambda(target_spread: float = 1.0, max_rounds: int = 8, tolerance: float = 0.01) -> pipeline.Stage:
  if not target_spread > 0:
    raise ValueError(f"neural.calibrate_lambda: target_spread={target_spread!r} must be > 0")

  def stage(setup):
    config = setup["model_config"]
    if not config.learnable_lambda:
      raise ValueError("neural.calibrate_lambda needs model.learnable_lambda=True (lam lives in params "
                       "'log_lambda' only then)")
    params = setup["params"]
    before = attention_spread(config, params, setup["tokens"])
    spread = before
    for _ in range(max_rounds):
      params = _with_lambdas(params, {k: target_spread / np.maximum(v, 1e-12) for k, v in spread.items()})
      spread = attention_spread(config, params, setup["tokens"])
      if max(np.max(np.abs(v / target_spread - 1)) for v in spread.values()) <= tolerance:
        break
    return {**setup, "params": params, "calibration": {"target_spread": target_spread, "before": before,
                                                        "after": spread}}

  return stage


def build_level(level: str, options: dict[str, Any] | None = None, presets: dict[str, str] | None = None
                ) -> pipeline.Pipeline:
  presets = PRESETS if presets is None else presets
  if level not in presets:
    raise ValueError(f"optimization_level={level!r} must be one of {', '.join(presets)}")
  return pipeline.build({"engine": "neural", "stages": presets[level], **(options or {})})


def _median_seconds(fn: Callable, *args, repeats: int) -> float:
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def measure(setup: pipeline.State, *, repeats: int = 5) -> dict[str, Any]:
  """Forward time (median of ``repeats``, compiled outside the timing), XLA's temp memory of the forward and of
  the gradient of the mean log-likelihood (where remat shows), and the logits."""
  apply = apply_fn(setup)
  params, tokens = setup["params"], setup["tokens"]
  logits = apply(params, tokens)
  seconds = _median_seconds(apply, params, tokens, repeats=repeats)

  def loss(p):
    return -jax.nn.log_softmax(apply(p, tokens).astype(jnp.float32)).mean()

  _, forward_stats = monitoring.compile_with_stats(jax.jit(apply), params, tokens)
  _, grad_stats = monitoring.compile_with_stats(jax.jit(jax.grad(loss)), params)
  return {"forward_seconds": seconds, "forward_temp_bytes": forward_stats.get("temp_bytes"),
          "grad_temp_bytes": grad_stats.get("temp_bytes"), "logits": np.asarray(logits, np.float32),
          "dtype": setup["model_config"].dtype, "implementation": setup["model_config"].implementation}


def compare_levels(setup: pipeline.State, levels: tuple[str, ...], *, options: dict[str, Any] | None = None,
                   presets: dict[str, str] | None = None, repeats: int = 5,
                   progress: Callable[[str, int, int], None] | None = None) -> tuple[dict[str, Any], list]:
  """Every level's measurements side by side (same process, same batch) and the check that each level's logits
  match the first level's within the tolerance of its dtype."""
  rows, checks, reference = {}, [], None
  for i, level in enumerate(levels):
    if progress is not None:
      progress(f"neural.level.{level}", i, len(levels))
    pipe = build_level(level, options, presets)
    row = measure(pipe(setup), repeats=repeats)
    logits = row.pop("logits")
    if reference is None:
      reference = logits
    deviation = float(np.max(np.abs(logits - reference)) / max(float(reference.std()), 1e-30))
    tolerance = BF16_TOLERANCE if row["dtype"] == "bfloat16" else FLOAT32_TOLERANCE
    rows[level] = {"stages": list(pipe.names), **row, "max_deviation_from_" + levels[0]: deviation,
                   "tolerance": tolerance}
    if i:
      checks.append(pipeline.check(f"neural.{level}_matches_{levels[0]}",
                                   f"max |logits({level}) - logits({levels[0]})| / std(logits({levels[0]}))",
                                   deviation, tolerance))
  return rows, checks


def run(config: Any, progress: Callable[[str, int, int], None] | None = None) -> pipeline.EngineReport:
  """The neural engine's report: parameters, each level's forward time and compiled memory, their agreement,
  and lam calibration (before/after spreads, checked against the target from the model's own weights)."""
  start = time.perf_counter()
  model_config = TruthGPTConfig(**config.model.to_dict())
  rng = np.random.default_rng(config.seed)
  tokens = rng.integers(0, model_config.vocab_size, (config.batch_size, config.seq_len)).astype(np.int32)
  params = jax.jit(TruthGPT(model_config).init)(jax.random.key(config.seed), tokens)["params"]
  setup = base_setup(model_config, params, tokens)
  options = {name: config[name].to_dict() for name in ("kernel", "remat", "calibrate_lambda") if name in config}
  presets = config.levels.to_dict()
  levels = pipeline.stage_names(config.compare)
  rows, checks = compare_levels(setup, levels, options=options, presets=presets, repeats=config.repeats,
                                progress=progress)
  state = {"results": {"parameters": count_params(params), "batch": [config.batch_size, config.seq_len],
                       "levels": rows}, "checks": tuple(checks)}
  if config.calibrate:
    if progress is not None:
      progress("neural.calibrate_lambda", 0, 1)
    calibrated = pipeline.build({"engine": "neural", "stages": "calibrate_lambda", **options})(setup)
    info = calibrated["calibration"]
    after = np.concatenate([np.asarray(v) for v in info["after"].values()])
    state = pipeline.with_result(state, "calibration", {
        "target_spread": info["target_spread"],
        "spread_before": {k: np.asarray(v) for k, v in info["before"].items()},
        "spread_after": {k: np.asarray(v) for k, v in info["after"].items()},
        "lambda": {k: np.asarray(v) for k, v in training.lambda_values(calibrated["params"]).items()}})
    state = pipeline.with_check(state, pipeline.check(
        "neural.calibrated_spread", "max over heads of |measured logit spread / target - 1| after calibration "
        "(measured from the model's attention weights)", float(np.max(np.abs(after / info["target_spread"] - 1))),
        0.02))
  names = tuple(f"level:{level}" for level in levels) + (("calibrate_lambda",) if config.calibrate else ())
  return pipeline.report("neural", names, state, time.perf_counter() - start)


def default_config() -> ml_collections.ConfigDict:
  """The neural engine's fields: the model (``TruthGPTConfig``'s fields), the measurement batch, the presets
  and the stages' options."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model = training.default_config().model
  c.batch_size = 4
  c.seq_len = 128
  c.repeats = 5  # timed forward passes per level (median)
  c.compare = "basic,advanced,full"  # levels measured side by side; the first is the reference
  c.levels = ml_collections.ConfigDict(PRESETS)  # level -> stages
  c.kernel = ml_collections.ConfigDict({"implementation": "blockwise"})
  c.remat = ml_collections.ConfigDict({"policy": "dots_with_no_batch_dims_saveable"})
  c.calibrate = True
  c.calibrate_lambda = ml_collections.ConfigDict({"target_spread": 1.0})
  return c
