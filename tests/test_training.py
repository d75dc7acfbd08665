"""Training pieces: config checks, the optax pipeline against a hand-written AdamW, gradient accumulation, the
steps, checkpoints (atomic writes, corrupt files), metric writers and throughput accounting."""

import math
import pathlib
import struct
import types

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from tensorboardX.proto import event_pb2

from distattn_jax import monitoring, training
from distattn_jax.models import TruthGPT
from distattn_jax.kernels import blockwise
from distattn_jax.training import checkpoint, loop, optim, steps


def small_config(**overrides):
  config = training.default_config()
  config.model.update(width=32, depth=1, num_heads=2, mlp_dim=64, max_len=32)
  config.data.update(seq_len=16, batch_size=4)
  config.train.update(steps=10, log_every=5, checkpoint_every=5, eval_every=5, eval_batches=2)
  config.sample.update(prompt="a", length=8)
  for key, value in overrides.items():
    group, field = key.split(".")
    config[group][field] = value
  return config


def windows(seed, batch=4, length=17):
  return jnp.asarray(np.random.default_rng(seed).integers(0, 256, (batch, length)), jnp.int32)


# --- config -------------------------------------------------------------------------------------------------


def test_parse_arg_types_values_by_their_defaults_and_rejects_unknown_keys():
  got = training.parse_arg("metric=l2, steps=30,bf16=true,lr=1e-3,lam=1.5", metric="l1", steps=0, bf16=False,
                           lr=0.1, lam=None)
  assert got == {"metric": "l2", "steps": 30, "bf16": True, "lr": 1e-3, "lam": 1.5}
  assert training.parse_arg(None, metric="l1") == {"metric": "l1"}
  with pytest.raises(ValueError, match=r"'size=tiny' is not key=value with a known key; valid keys: metric, steps"):
    training.parse_arg("size=tiny", metric="l1", steps=0)
  with pytest.raises(ValueError, match=r"steps='ten' must be a int"):
    training.parse_arg("steps=ten", steps=0)


@pytest.mark.parametrize("mutate,message", [
    (lambda c: c.train.unlock().update(stepz=3), r"unknown config key 'train.stepz'; valid keys in train: "
                                                 r"allow_config_change, allow_steps_change, checkpoint_every"),
    (lambda c: c.unlock().update(extra=1),
     r"unknown config key 'extra'; valid keys: analysis, data, distributed, mesh, model"),
    (lambda c: setattr(c.train, "steps", -5), r"config.train.steps=-5 is invalid: must be >= 0"),
    (lambda c: setattr(c.model, "num_heads", 3), r"model.num_heads=3 is invalid: must divide model.width=32"),
    (lambda c: setattr(c.model, "metric", "manhattan"), r"model.metric='manhattan' is not a registered metric"),
    (lambda c: setattr(c.optim, "grad_accum_steps", 3),
     r"config.optim.grad_accum_steps=3 is invalid: must divide data.batch_size=4"),
    (lambda c: setattr(c.train, "checkpoint_every", 7),
     r"config.train.checkpoint_every=7 is invalid: must be a multiple of train.log_every=5"),
    (lambda c: setattr(c.data, "seq_len", 64), r"config.data.seq_len=64 is invalid: must be <= model.max_len=32"),
    (lambda c: setattr(c.optim, "b2", 1.0), r"config.optim.b2=1.0 is invalid: must be in \[0, 1\)"),
    (lambda c: setattr(c.sample, "top_k", 300), r"config.sample.top_k=300 is invalid: must be in \[0, 256\]"),
    (lambda c: setattr(c.sample, "length", 20),
     r"config.sample.length=20 is invalid: prompt bytes \+ length must be <= data.seq_len=16"),
])
def test_bad_configs_fail_before_anything_is_built(tmp_path, mutate, message):
  config = small_config()
  mutate(config)
  workdir = tmp_path / "run"
  with pytest.raises(ValueError, match=message):
    training.train_and_evaluate(config, workdir)
  assert not workdir.exists()  # the check came before any file, corpus or compilation


@pytest.mark.parametrize("field,value,message", [
    ("steps", "100", r"config.train.steps='100' must be a int"),
    ("steps", True, r"config.train.steps=True must be a int"),
    ("eval_batches", 2.5, r"config.train.eval_batches=2.5 must be a int"),
])
def test_a_value_of_the_wrong_type_is_rejected(field, value, message):
  # A config file may build its ConfigDict from plain dicts, which ml_collections does not type-check.
  raw = small_config().to_dict()
  raw["train"][field] = value
  with pytest.raises(ValueError, match=message):
    training.validate(ml_collections.ConfigDict(raw))


def test_every_default_validates():
  model = training.validate(training.default_config())
  assert model.metric == "l1" and model.width % model.num_heads == 0


# --- optimizer ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_lambda_and_p_are_labelled_into_their_own_group():
  config = small_config(**{"model.metric": "lp", "model.learnable_p": True})
  model = TruthGPT(training.validate(config))
  params = model.init(jax.random.key(0), windows(0)[:, :-1])["params"]
  labels = jax.tree_util.tree_flatten_with_path(optim.param_labels(params))[0]
  grouped = {"/".join(p.key for p in path): label for path, label in labels}
  assert {k for k, v in grouped.items() if v == "lambda"} == {"trunk/block_0/attention/log_lambda",
                                                              "trunk/block_0/attention/log_p"}
  assert sum(v == "main" for v in grouped.values()) == len(grouped) - 2


def test_schedule_warms_up_linearly_then_follows_a_cosine_to_the_end_fraction():
  o = small_config(**{"optim.warmup_steps": 10, "optim.end_learning_rate_fraction": 0.1}).optim
  schedule = optim.learning_rate_schedule(2.0, o, total_steps=110)
  np.testing.assert_allclose([schedule(0), schedule(5), schedule(10)], [0.0, 1.0, 2.0], rtol=1e-6)
  for t in (35, 60, 110):
    want = 0.2 + (2.0 - 0.2) * 0.5 * (1 + math.cos(math.pi * (t - 10) / 100))
    np.testing.assert_allclose(schedule(t), want, rtol=1e-5)


def _adam_oracle(params, grads_per_step, lr, wd, b1, b2, eps, clip, decays):
  """Plain numpy AdamW for one parameter group: optional global-norm clipping, decoupled weight decay."""
  m = {k: np.zeros_like(v) for k, v in params.items()}
  v = {k: np.zeros_like(x) for k, x in params.items()}
  params = dict(params)
  for t, grads in enumerate(grads_per_step, start=1):
    norm = math.sqrt(sum(float(np.sum(g * g)) for g in grads.values()))
    scale = min(1.0, clip / norm) if clip else 1.0
    for k, g in grads.items():
      g = g * scale
      m[k] = b1 * m[k] + (1 - b1) * g
      v[k] = b2 * v[k] + (1 - b2) * g * g
      update = (m[k] / (1 - b1**t)) / (np.sqrt(v[k] / (1 - b2**t)) + eps)
      if decays[k]:
        update = update + wd * params[k]
      params[k] = params[k] - lr(t - 1) * update
  return params


def test_pipeline_is_clipped_adamw_for_weights_and_undecayed_adam_for_lambda():
  o = small_config(**{"optim.warmup_steps": 0, "optim.weight_decay": 0.3, "optim.clip_norm": 0.5,
                      "optim.learning_rate": 0.01, "optim.lambda_learning_rate": 0.2}).optim
  rng = np.random.default_rng(0)
  normal = lambda rng, shape: rng.standard_normal(shape).astype(np.float32)
  params = {"dense": {"kernel": normal(rng, (3, 2)), "bias": normal(rng, 2)},
            "attention": {"log_lambda": normal(rng, 4)}}
  grads = [jax.tree.map(lambda a, s=s: normal(np.random.default_rng(s), a.shape) * (s + 1), params)
           for s in range(3)]
  tx = optim.make_optimizer(o, total_steps=10)
  state, p = tx.init(params), params
  for g in grads:
    updates, state = tx.update(g, state, p)
    p = optax.apply_updates(p, updates)

  main = lambda t: float(optim.learning_rate_schedule(0.01, o, 10)(t))
  lam = lambda t: float(optim.learning_rate_schedule(0.2, o, 10)(t))
  flat = lambda tree: {"kernel": tree["dense"]["kernel"], "bias": tree["dense"]["bias"]}
  want_main = _adam_oracle(flat(params), [flat(g) for g in grads], main, 0.3, o.b1, o.b2, o.eps, 0.5,
                           {"kernel": True, "bias": False})
  want_lam = _adam_oracle({"l": params["attention"]["log_lambda"]},
                          [{"l": g["attention"]["log_lambda"]} for g in grads], lam, 0.3, o.b1, o.b2, o.eps, 0.0,
                          {"l": False})
  np.testing.assert_allclose(p["dense"]["kernel"], want_main["kernel"], rtol=1e-5)
  np.testing.assert_allclose(p["dense"]["bias"], want_main["bias"], rtol=1e-5)
  np.testing.assert_allclose(p["attention"]["log_lambda"], want_lam["l"], rtol=1e-5)


def test_a_zero_lambda_gradient_leaves_lambda_where_weight_decay_moves_the_weights():
  o = small_config(**{"optim.warmup_steps": 0, "optim.weight_decay": 0.5}).optim
  params = {"kernel": jnp.ones((2, 2)), "log_lambda": jnp.ones(3)}
  zeros = jax.tree.map(jnp.zeros_like, params)
  tx = optim.make_optimizer(o, total_steps=10)
  updates, _ = tx.update(zeros, tx.init(params), params)
  np.testing.assert_array_equal(updates["log_lambda"], 0.0)
  np.testing.assert_allclose(updates["kernel"], -o.learning_rate * 0.5 * params["kernel"], rtol=1e-6)


# --- steps --------------------------------------------------------------------------------------------------


def _state(config):
  return loop.build(config)[1]


# One jitted step for the module: calls with the shared fresh state reuse its compiled program.
TRAIN_STEP = jax.jit(steps.train_step)


@pytest.fixture(scope="module")
def fresh():
  """The freshly initialised state of small_config(), built once for the module (its arrays are immutable)."""
  return _state(small_config())


@pytest.mark.slow
def test_gradient_accumulation_equals_the_whole_batch_step(fresh):
  # With SGD at learning rate 1 the parameter change is minus the gradient, so the gradients themselves compare.
  state = steps.TrainState.create(apply_fn=fresh.apply_fn, params=fresh.params, tx=optax.sgd(1.0))
  batch, key = windows(1), steps.dropout_key(0)
  whole, m1 = jax.jit(steps.train_step)(state, batch, key)
  accumulated, m2 = jax.jit(lambda s, b, k: steps.train_step(s, b, k, grad_accum=2))(state, batch, key)
  chex.assert_trees_all_close(m1, m2, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(whole.params, accumulated.params, rtol=1e-5, atol=1e-6)
  assert not np.allclose(whole.params["embed"]["embedding"], state.params["embed"]["embedding"])
  assert int(accumulated.step) == 1


@pytest.mark.slow
def test_train_step_loss_is_the_mean_next_token_cross_entropy_and_eval_sums_it(fresh):
  state = fresh
  batch = windows(2)
  logits = jax.jit(state.apply_fn)({"params": state.params}, batch[:, :-1])
  log_probs = jax.nn.log_softmax(np.asarray(logits, np.float64))
  want = -np.mean(np.take_along_axis(np.asarray(log_probs), np.asarray(batch[:, 1:, None]), -1))
  _, metrics = TRAIN_STEP(state, batch, steps.dropout_key(0))
  np.testing.assert_allclose(metrics["loss"], want, rtol=1e-5)
  totals = jax.jit(steps.eval_step)(state, batch)
  np.testing.assert_allclose(totals["nll_sum"] / totals["tokens"], want, rtol=1e-5)
  assert float(totals["tokens"]) == 4 * 16
  np.testing.assert_allclose(steps.bits_per_byte(totals["nll_sum"], totals["tokens"]), want / math.log(2), rtol=1e-5)


@pytest.mark.slow
def test_train_step_reports_the_gradient_norm_and_flags_parameters_its_loss_cannot_show(tmp_path, fresh):
  state = fresh
  batch, key = windows(4), steps.dropout_key(0)
  loss, grads = jax.jit(steps.loss_and_grads)(state, batch, jax.random.fold_in(key, 0))
  want_norm = math.sqrt(sum(float(np.sum(np.asarray(g, np.float64) ** 2)) for g in jax.tree.leaves(grads)))
  _, healthy = TRAIN_STEP(state, batch, key)
  np.testing.assert_allclose(healthy["grad_norm"], want_norm, rtol=1e-5)
  assert bool(healthy["params_finite"])
  # SGD at an infinite learning rate sends every parameter with a nonzero gradient to +-inf: the loss and the
  # gradient (of the old parameters) stay finite, only the flag can tell.
  exploding = steps.TrainState.create(apply_fn=state.apply_fn, params=state.params, tx=optax.sgd(math.inf))
  _, metrics = jax.jit(steps.train_step)(exploding, batch, key)
  assert math.isfinite(float(metrics["loss"])) and math.isfinite(float(metrics["grad_norm"]))
  assert not bool(metrics["params_finite"])
  ckpts = checkpoint.Checkpoints(tmp_path / "ckpt", keep=3)
  ckpts.save(state.replace(step=jnp.asarray(5)))
  records = [(s, {k: float(v) for k, v in m.items()}) for s, m in ((5, healthy), (6, metrics))]
  with pytest.raises(training.NonFiniteError, match=r"the updated parameters are not all finite \(the loss, "
                     r"[\d.]+, and the gradient norm, [\d.]+, are\) at step 6; the last good checkpoint \(step 5\)"):
    loop._check_finite(records, ckpts)
  ckpts.close()


@pytest.mark.slow
def test_training_with_the_blockwise_kernel_follows_the_reference_kernel(monkeypatch, fresh):
  # 8 x 8 tiles split the 16 positions into 2 x 2 tiles, so the online softmax, the causal block skipping and the
  # custom backward all take part (the default tiles would hold the whole sequence in one).
  monkeypatch.setattr(blockwise, "default_blocks", lambda metric, p=2.0: (8, 8))
  trajectories = {}
  for implementation in ("reference", "blockwise"):
    state = _state(small_config(**{"model.implementation": implementation, "optim.warmup_steps": 0}))
    step = jax.jit(steps.train_step)
    history = []
    for s in range(3):
      state, metrics = step(state, windows(10 + s), steps.dropout_key(0))
      history.append(metrics)
    trajectories[implementation] = state, history
  (ref_state, ref_history), (blk_state, blk_history) = trajectories["reference"], trajectories["blockwise"]
  # Same sums in another order: float32 rounding, about 1e-6 relative, in the losses and gradient norms.
  for ref, blk in zip(ref_history, blk_history):
    np.testing.assert_allclose(blk["loss"], ref["loss"], rtol=1e-5)
    np.testing.assert_allclose(blk["grad_norm"], ref["grad_norm"], rtol=1e-4)
  # Adam divides each update by the root of its own squared-gradient average, so a rounding-level difference in a
  # gradient moves its parameter by a rounding-level fraction of the 3e-3 learning rate: the params agree to
  # well under one step's 3e-3 (measured: at most 5.4e-6 after three steps; 5e-5 leaves a factor of ten).
  chex.assert_trees_all_close(blk_state.params, ref_state.params, rtol=0, atol=5e-5)
  assert not np.allclose(blk_state.params["embed"]["embedding"], fresh.params["embed"]["embedding"])


@pytest.mark.slow
def test_bfloat16_compute_keeps_float32_master_weights_and_optimizer_state():
  state = _state(small_config(**{"model.dtype": "bfloat16"}))
  new, metrics = jax.jit(steps.train_step)(state, windows(3), steps.dropout_key(0))
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(new.params))
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(new.opt_state) if a.dtype != jnp.int32)
  assert np.isfinite(float(metrics["loss"]))


def test_lambda_values_are_the_exponentials_of_the_stored_logs(fresh):
  state = fresh
  values = steps.lambda_values(state.params)
  np.testing.assert_allclose(values["block_0/attention/lambda"],
                             np.exp(state.params["trunk"]["block_0"]["attention"]["log_lambda"]), rtol=1e-7)


# --- checkpoints --------------------------------------------------------------------------------------------


def _checkpointed(tmp_path, state, saves=(3, 6)):
  ckpts = checkpoint.Checkpoints(tmp_path / "ckpt", keep=3)
  states = {}
  for step in saves:
    states[step] = state.replace(step=jnp.asarray(step), params=jax.tree.map(lambda a, s=step: a + s, state.params))
    ckpts.save(states[step])
  ckpts.close()
  return state, states


def test_restore_returns_the_newest_checkpoint_exactly(tmp_path, fresh):
  fresh, states = _checkpointed(tmp_path, fresh)
  restored = checkpoint.Checkpoints(tmp_path / "ckpt", keep=3).restore_latest(fresh)
  assert int(restored.step) == 6
  chex.assert_trees_all_equal(restored.params, states[6].params)
  chex.assert_trees_all_equal(restored.opt_state, states[6].opt_state)


def test_a_save_killed_before_its_rename_leaves_the_previous_checkpoint_as_the_latest(tmp_path, fresh, monkeypatch):
  fresh, states = _checkpointed(tmp_path, fresh, saves=(3,))

  async def killed(self):
    raise OSError("killed mid-save")

  monkeypatch.setattr(ocp._src.path.atomicity.AtomicRenameTemporaryPath, "finalize", killed)
  ckpts = checkpoint.Checkpoints(tmp_path / "ckpt", keep=3)
  with pytest.raises(Exception, match="killed mid-save"):
    ckpts.save(states[3].replace(step=jnp.asarray(9)))
  monkeypatch.undo()
  names = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
  assert "9" not in names and any(n.startswith("9.orbax-checkpoint-tmp") for n in names)  # written, not renamed
  reopened = checkpoint.Checkpoints(tmp_path / "ckpt", keep=3)
  assert reopened.steps() == [3]
  chex.assert_trees_all_equal(reopened.restore_latest(fresh).params, states[3].params)
  assert not any("tmp" in p.name for p in (tmp_path / "ckpt").iterdir())  # the leftover was cleaned up


def _truncate_largest_file(directory: pathlib.Path) -> None:
  largest = max((p for p in directory.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
  with open(largest, "r+b") as f:
    f.truncate(largest.stat().st_size // 2)


@pytest.mark.parametrize("damage", [_truncate_largest_file, lambda step: (step / "default" / "_METADATA").unlink()],
                         ids=["truncated", "metadata_missing"])
def test_a_damaged_latest_checkpoint_is_set_aside_for_the_previous_one(tmp_path, fresh, caplog, damage):
  fresh, states = _checkpointed(tmp_path, fresh)
  damage(tmp_path / "ckpt" / "6")
  ckpts = checkpoint.Checkpoints(tmp_path / "ckpt", keep=3)
  restored = ckpts.restore_latest(fresh)
  assert int(restored.step) == 3
  chex.assert_trees_all_equal(restored.params, states[3].params)
  assert ckpts.steps() == [3] and (tmp_path / "ckpt.corrupt" / "6").is_dir()  # set aside, not deleted
  assert "checkpoint" in caplog.text and "could not be restored" in caplog.text


def _wrapped_storage_error(status):
  try:
    raise ValueError(f"{status}: Error reading \"a/0\" in OCDBT database at local file \"/x/6/default/\"")
  except ValueError as e:  # orbax re-raises tensorstore's errors as a bare Exception
    try:
      raise Exception("Encountered error while reading array index") from e
    except Exception as wrapped:
      return wrapped


@pytest.mark.parametrize("method,error", [
    ("restore", PermissionError(13, "Permission denied", "/x/6/default/d/0")),
    ("restore", MemoryError()),
    ("restore", KeyboardInterrupt()),
    ("restore", _wrapped_storage_error("PERMISSION_DENIED")),
    ("item_metadata", OSError(5, "Input/output error")),
])
def test_a_read_failure_that_is_not_corruption_propagates_and_moves_nothing(tmp_path, fresh, monkeypatch, method,
                                                                           error):
  fresh, _ = _checkpointed(tmp_path, fresh)

  def fail(self, *args, **kwargs):
    raise error

  monkeypatch.setattr(ocp.CheckpointManager, method, fail)
  with pytest.raises(type(error)) as raised:
    checkpoint.Checkpoints(tmp_path / "ckpt", keep=3).restore_latest(fresh)
  assert raised.value is error  # unchanged, not wrapped
  assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["3", "6"]
  assert not (tmp_path / "ckpt.corrupt").exists()


def test_only_errors_about_the_files_count_as_an_unreadable_checkpoint():
  assert checkpoint.is_unreadable(_wrapped_storage_error("OUT_OF_RANGE"))
  assert checkpoint.is_unreadable(_wrapped_storage_error("DATA_LOSS"))
  assert checkpoint.is_unreadable(FileNotFoundError(2, "Metadata file (named _METADATA) does not exist"))
  assert checkpoint.is_unreadable(ValueError("Expecting value: line 1 column 1 (char 0)"))  # json's
  assert not checkpoint.is_unreadable(_wrapped_storage_error("RESOURCE_EXHAUSTED"))
  assert not checkpoint.is_unreadable(RuntimeError("something else"))
  assert not checkpoint.is_unreadable(Exception("no cause"))


def test_no_readable_checkpoint_is_a_clear_error(tmp_path, fresh):
  fresh, _ = _checkpointed(tmp_path, fresh)
  for step in ("3", "6"):
    _truncate_largest_file(tmp_path / "ckpt" / step)
  with pytest.raises(checkpoint.CheckpointError, match=r"no readable checkpoint in .*ckpt; every step failed"):
    checkpoint.Checkpoints(tmp_path / "ckpt", keep=3).restore_latest(fresh)


def _saved_with_fingerprint(tmp_path, config, state):
  ckpts = checkpoint.Checkpoints(tmp_path / "ckpt", keep=3)
  ckpts.save(state.replace(step=jnp.asarray(5)), {"config": training.fingerprint(config)})
  ckpts.close()
  return state


def _resume(tmp_path, state, config):
  ckpts = checkpoint.Checkpoints(tmp_path / "ckpt", keep=3)
  try:
    return ckpts.restore_latest(state, loop.resume_check(config, ckpts.directory))
  finally:
    ckpts.close()


def test_the_fingerprint_holds_the_computation_fields_and_not_the_cadence_or_sampling_ones():
  fields = training.fingerprint(small_config())["fields"]
  assert {"seed", "model.metric", "optim.learning_rate", "data.batch_size", "train.steps"} <= set(fields)
  assert not {"train.log_every", "train.checkpoint_every", "train.allow_config_change", "sample.length"} & set(fields)
  assert fields["data.seq_len"] == 16 and fields["model.num_kv_heads"] is None
  a = training.fingerprint(small_config())
  b = training.fingerprint(small_config(**{"train.log_every": 1, "sample.length": 3, "train.eval_batches": 7}))
  assert a == b
  assert training.fingerprint(small_config(**{"model.p": 3.0}))["sha256"] != a["sha256"]


def test_resuming_with_other_computation_fields_is_an_error_listing_them_unless_allowed(tmp_path, fresh):
  state = _saved_with_fingerprint(tmp_path, small_config(), fresh)
  # Cadence and sampling fields are not part of the fingerprint: resuming with new ones is fine.
  same = small_config(**{"train.log_every": 1, "train.checkpoint_every": 1, "sample.length": 3})
  assert int(_resume(tmp_path, state, same).step) == 5
  changed = {"model.metric": "l2", "optim.learning_rate": 1e-3}
  with pytest.raises(training.ConfigChangedError,
                     match=r"ckpt/5 was trained with a different config \(model.metric: 'l1' -> 'l2'; "
                           r"optim.learning_rate: 0.003 -> 0.001\); resume with train.allow_config_change=True"):
    _resume(tmp_path, state, small_config(**changed))
  assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["5"]
  allowed = small_config(**changed, **{"train.allow_config_change": True})
  assert int(_resume(tmp_path, state, allowed).step) == 5


def test_resuming_with_another_step_budget_needs_its_own_option(tmp_path, fresh):
  state = _saved_with_fingerprint(tmp_path, small_config(), fresh)
  message = (r"ckpt/5 was trained with train.steps=10, which sets the length of the learning-rate schedule; "
             r"this run asks for train.steps=20. Resume with train.allow_steps_change=True")
  with pytest.raises(training.ConfigChangedError, match=message):
    _resume(tmp_path, state, small_config(**{"train.steps": 20}))
  with pytest.raises(training.ConfigChangedError, match=message):  # the general override does not cover it
    _resume(tmp_path, state, small_config(**{"train.steps": 20, "train.allow_config_change": True}))
  extended = small_config(**{"train.steps": 20, "train.allow_steps_change": True})
  assert int(_resume(tmp_path, state, extended).step) == 5


def test_a_checkpoint_without_a_fingerprint_is_resumed_only_when_allowed(tmp_path, fresh):
  fresh, states = _checkpointed(tmp_path, fresh)  # saved without metadata
  with pytest.raises(training.ConfigChangedError, match=r"ckpt/6 has no config fingerprint"):
    _resume(tmp_path, fresh, small_config())
  restored = _resume(tmp_path, fresh, small_config(**{"train.allow_config_change": True}))
  chex.assert_trees_all_equal(restored.params, states[6].params)


# --- writers and monitoring ---------------------------------------------------------------------------------


def _tensorboard_events(folder: pathlib.Path) -> tuple[list[tuple[int, str, float]], list[int]]:
  """Reads TFRecord event files by hand ([len u64][crc u32][Event proto][crc u32] per record); returns the
  scalars as (step, tag, value) and the steps of the session starts that tell TensorBoard to purge."""
  out, purges = [], []
  for path in sorted(folder.glob("events.out.tfevents.*")):
    data = path.read_bytes()
    offset = 0
    while offset < len(data):
      (length,) = struct.unpack("<Q", data[offset:offset + 8])
      event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
      offset += 16 + length
      out += [(event.step, v.tag, v.simple_value) for v in event.summary.value]
      if event.session_log.status == event_pb2.SessionLog.START:
        purges.append(event.step)
  return out, purges


def test_writer_records_jsonl_and_tensorboard_and_drops_records_past_a_resumed_step(tmp_path):
  writer = training.MetricWriter(tmp_path)
  for step in (5, 10, 15):
    writer.write(step, "train", {"loss": 1.0 / step, "lambda": np.array([1.5, 2.5])})
  writer.close()
  writer = training.MetricWriter(tmp_path, start_step=10)  # the run resumed from its step-10 checkpoint
  writer.write(15, "train", {"loss": 0.5, "lambda": np.array([1.0, 2.0])})
  writer.close()
  records = training.read_jsonl(tmp_path / "metrics.jsonl")
  assert [(r["step"], r["loss"]) for r in records] == [(5, 0.2), (10, 0.1), (15, 0.5)]
  assert records[0]["lambda"] == [1.5, 2.5]
  scalars, purges = _tensorboard_events(tmp_path / "tensorboard")
  assert (5, "train/loss", pytest.approx(0.2)) in scalars and (15, "train/lambda/1", 2.0) in scalars
  assert purges == [11]  # TensorBoard drops the first run's events from step 11 on


def test_non_finite_values_are_written_as_strings_json_can_hold(tmp_path):
  writer = training.MetricWriter(tmp_path)
  writer.write(1, "train", {"loss": float("nan")})
  writer.close()
  assert training.read_jsonl(tmp_path / "metrics.jsonl")[0]["loss"] == "nan"


def test_throughput_counts_tokens_over_measured_seconds(monkeypatch):
  clock = iter(range(1000))
  monkeypatch.setattr(monitoring, "time", types.SimpleNamespace(perf_counter=lambda: float(next(clock))))
  timer = monitoring.Throughput(tokens_per_step=64, step=0)  # t = 0
  assert timer.mark(4) == {"step_seconds": 0.25, "tokens_per_second": 256.0}  # t = 1
  timer.restart(4)  # t = 2
  assert timer.mark(10) == {"step_seconds": 1 / 6, "tokens_per_second": 384.0}  # t = 3
  assert timer.overall() == {"step_seconds": 0.2, "tokens_per_second": 320.0}  # 10 steps in 2 measured seconds


def test_compile_with_stats_returns_the_compiled_function_and_its_costs():
  fn = jax.jit(lambda x: jnp.tanh(x) @ x.T)
  x = jnp.ones((8, 8))
  compiled, stats = monitoring.compile_with_stats(fn, x)
  chex.assert_trees_all_close(compiled(x), fn(x))
  assert stats["compile_seconds"] > 0 and stats["output_bytes"] == 8 * 8 * 4


@pytest.mark.slow
def test_training_throughput_is_timed_steps_times_tokens_over_their_seconds(monkeypatch):
  ticks = iter([0.0, 2.0])  # the loop module's only two clock reads: around the timed steps
  monkeypatch.setattr(loop, "time", types.SimpleNamespace(perf_counter=lambda: next(ticks)))
  tokens_per_second = training.throughput(small_config(), steps_to_time=5, warmup_steps=1)
  assert tokens_per_second == 5 * 4 * 16 / 2.0


@pytest.mark.slow
def test_a_checkpoint_of_another_model_is_an_error_and_is_left_in_place(tmp_path, fresh):
  _checkpointed(tmp_path, fresh)
  wider = _state(small_config(**{"model.mlp_dim": 48}))
  with pytest.raises(checkpoint.CheckpointError, match=r"ckpt/6 was written by a different model or optimizer "
                     r"configuration \(shapes differ: .*fc_in/bias: saved \(64,\), expected \(48,\)"):
    checkpoint.Checkpoints(tmp_path / "ckpt", keep=3).restore_latest(wider)
  assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["3", "6"]
