"""End to end on a shrunk config and the standard-library corpus: the loss falls, a killed and resumed run equals
an uninterrupted one, a NaN stops the run and keeps the last good checkpoint, every metric trains, lam moves,
and the experiment mains run."""

import json
import pathlib
import re
import shutil

import chex
import jax
import numpy as np
import pytest
import scripts

import distattn_jax as da
from distattn_jax import training
from distattn_jax.data import text
from distattn_jax.training import steps

REPO = pathlib.Path(__file__).resolve().parents[1]
COMPARED = ("loss", "bits_per_byte", "grad_norm", "learning_rate", "block_0/attention/lambda",
            "block_1/attention/lambda")


def shrunk_config(**overrides):
  config = training.default_config()
  config.model.update(width=32, depth=2, num_heads=2, mlp_dim=64, max_len=32, dropout_rate=0.1,
                      attention_dropout_rate=0.1)  # dropout on, so resuming must reproduce its random draws
  config.data.update(seq_len=16, batch_size=8)
  config.optim.update(learning_rate=1e-2, warmup_steps=2, lambda_learning_rate=5e-2)
  config.train.update(steps=12, log_every=2, eval_every=4, checkpoint_every=6, eval_batches=2)
  config.sample.update(prompt="def ", length=8, temperature=0.0)
  config.analysis.batch_size = 2
  for key, value in overrides.items():
    group, field = key.split(".")
    config[group][field] = value
  return config


def records(workdir, splits=("train", "eval")):
  return [r for r in training.read_jsonl(pathlib.Path(workdir) / "metrics.jsonl") if r["split"] in splits]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("uninterrupted")
  return workdir, training.train_and_evaluate(shrunk_config(), workdir)


@pytest.mark.slow
def test_training_lowers_the_loss_and_the_validation_bits_per_byte(uninterrupted):
  workdir, summary = uninterrupted
  train = records(workdir, ("train",))
  assert [r["step"] for r in train] == [2, 4, 6, 8, 10, 12]
  assert train[-1]["loss"] < train[0]["loss"] - 0.5
  # Untrained byte predictions cost about log2(256) = 8 bits; twelve steps must save at least one.
  assert 7 < summary["untrained_validation_bits_per_byte"] < 9
  assert summary["validation_bits_per_byte"] < summary["untrained_validation_bits_per_byte"] - 1
  assert summary["steps"] == 12 and summary["resumed_from_step"] == 0
  saved = json.loads((workdir / "summary.json").read_text())
  assert saved["validation_bits_per_byte"] == summary["validation_bits_per_byte"]
  assert saved["corpus"] == json.loads((workdir / "data.json").read_text())
  assert saved["corpus"]["source"] == "python-stdlib" and saved["corpus"]["files"] > 100
  assert json.loads((workdir / "config.json").read_text())["train"]["steps"] == 12
  perf = records(workdir, ("perf",))
  assert perf[0]["compile_seconds"] > 0 and all(r["tokens_per_second"] > 0 for r in perf[1:])


@pytest.mark.slow
def test_a_run_killed_after_a_checkpoint_resumes_to_exactly_the_uninterrupted_run(uninterrupted, tmp_path):
  workdir, summary = uninterrupted
  original = text.TextData.train_batch

  def killed_at_step_7(self, step):
    if step == 6:  # the batch of step 7, after the step-6 checkpoint and its records were written
      raise KeyboardInterrupt
    return original(self, step)

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(text.TextData, "train_batch", killed_at_step_7)
    with pytest.raises(KeyboardInterrupt):
      training.train_and_evaluate(shrunk_config(), tmp_path)
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["6"]
  resumed = training.train_and_evaluate(shrunk_config(), tmp_path)
  assert resumed["resumed_from_step"] == 6

  got, want = records(tmp_path), records(workdir)
  assert [(r["step"], r["split"]) for r in got] == [(r["step"], r["split"]) for r in want]
  for g, w in zip(got, want):
    for key in COMPARED:
      if key in w:
        np.testing.assert_allclose(g[key], w[key], rtol=1e-6, atol=1e-7, err_msg=f"{key} at step {w['step']}")
  assert resumed["validation_bits_per_byte"] == pytest.approx(summary["validation_bits_per_byte"], rel=1e-6)
  _, a = training.restore(shrunk_config(), workdir)
  _, b = training.restore(shrunk_config(), tmp_path)
  chex.assert_trees_all_close(a.params, b.params, rtol=1e-6, atol=1e-7)


def _poison_the_loss(patch):  # from the 8th update on, the parameters and the loss become NaN
  original = steps.train_step

  def poisoned(state, windows, key, **kw):
    new, metrics = original(state, windows, key, **kw)
    bad = state.step >= 7
    new = new.replace(params=jax.tree.map(lambda p: jax.numpy.where(bad, jax.numpy.nan, p), new.params))
    return new, {**metrics, "loss": jax.numpy.where(bad, jax.numpy.nan, metrics["loss"])}

  patch.setattr(steps, "train_step", poisoned)


def _poison_the_gradients(patch):  # from the 8th update on, one gradient is NaN while the loss stays finite
  original = steps.loss_and_grads

  def poisoned(state, windows, rng, grad_accum=1):
    loss, grads = original(state, windows, rng, grad_accum)
    bad = state.step >= 7
    grads["embed"]["embedding"] = grads["embed"]["embedding"].at[0, 0].set(
        jax.numpy.where(bad, jax.numpy.nan, grads["embed"]["embedding"][0, 0]))
    return loss, grads

  patch.setattr(steps, "loss_and_grads", poisoned)


@pytest.mark.slow
@pytest.mark.parametrize("poison,message", [
    (_poison_the_loss, r"the loss is nan at step 8"),
    (_poison_the_gradients, r"the gradient norm is nan \(the loss, \d\.\d+, is finite\) at step 8"),
])
def test_a_non_finite_value_stops_the_run_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path, poison,
                                                                                             message):
  with pytest.MonkeyPatch.context() as patch:
    poison(patch)
    with pytest.raises(training.NonFiniteError, match=message + r"; the last good checkpoint \(step 6\) in "
                       r".*checkpoints is kept") as raised:
      training.train_and_evaluate(shrunk_config(), tmp_path)
  assert raised.value.step == 8
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["6"]
  assert max(r["step"] for r in records(tmp_path)) == 6  # nothing from the bad interval was recorded
  _, state = training.restore(shrunk_config(), tmp_path)
  assert int(state.step) == 6 and all(np.isfinite(a).all() for a in jax.tree.leaves(state.params))
  assert all(np.isfinite(a).all() for a in jax.tree.leaves(state.opt_state))


@pytest.mark.slow
def test_a_longer_step_budget_is_refused_without_its_option_and_then_extends_the_schedule(uninterrupted, tmp_path):
  run = tmp_path / "run"
  shutil.copytree(uninterrupted[0], run)
  recorded = (run / "config.json").read_text()
  longer = shrunk_config(**{"train.steps": 16})
  with pytest.raises(training.ConfigChangedError, match=r"checkpoints/12 was trained with train.steps=12, .* this "
                     r"run asks for train.steps=16. Resume with train.allow_steps_change=True"):
    training.train_and_evaluate(longer, run)
  assert (run / "config.json").read_text() == recorded  # a refused resume leaves the run's record alone
  _, at_12 = training.restore(shrunk_config(), run)
  summary = training.train_and_evaluate(shrunk_config(**{"train.steps": 16, "train.allow_steps_change": True}), run)
  assert summary["resumed_from_step"] == 12 and summary["steps"] == 16
  # Oracle: four steps from the step-12 state with the optimizer of a 16-step schedule, by hand. The 12-step
  # schedule would have stayed at its end value, so the two differ.
  config = shrunk_config(**{"train.steps": 16})
  data = training.load_data(config)
  finals = {}
  for total in (16, 12):
    tx = training.make_optimizer(config.optim, total)
    state = steps.TrainState(step=at_12.step, apply_fn=at_12.apply_fn, params=at_12.params, tx=tx,
                             opt_state=at_12.opt_state)
    step_fn = jax.jit(steps.train_step)
    for s in range(12, 16):
      state, _ = step_fn(state, data.train_batch(s), steps.dropout_key(config.seed))
    finals[total] = state.params
  _, resumed = training.restore(config, run)
  chex.assert_trees_all_close(resumed.params, finals[16], rtol=1e-6, atol=1e-7)
  assert not np.allclose(finals[16]["embed"]["embedding"], finals[12]["embed"]["embedding"], rtol=1e-6, atol=1e-7)


# The metric is the subject: each one compiles its own step. `make test-fast` keeps one of them.
@pytest.mark.parametrize("metric", [m if m == "l1" else pytest.param(m, marks=pytest.mark.slow)
                                    for m in da.metrics.available()])
def test_every_metric_trains_a_step_without_nan_and_moves_lambda(metric):
  config = shrunk_config(**{"model.metric": metric, "model.depth": 1, "model.width": 16, "data.seq_len": 8,
                            "data.batch_size": 2, "optim.warmup_steps": 0,
                            "model.learnable_p": metric == "lp", "model.p": 3.0, "sample.length": 4})
  _, state = training.build(config)
  windows = np.random.default_rng(0).integers(0, 256, (2, 9)).astype(np.int32)
  new, metrics = jax.jit(steps.train_step)(state, windows, steps.dropout_key(0))
  assert np.isfinite(float(metrics["loss"])) and np.isfinite(float(metrics["grad_norm"]))
  assert all(np.isfinite(a).all() for a in jax.tree.leaves(new.params))
  before, after = (p["trunk"]["block_0"]["attention"] for p in (state.params, new.params))
  # Adam's first step moves each parameter by about its learning rate whatever the gradient's size: lam moved
  # by exp(+-0.05) per head, so it had a nonzero gradient, and from its own group's rate.
  np.testing.assert_allclose(np.abs(after["log_lambda"] - before["log_lambda"]), 5e-2, rtol=1e-3)
  if metric == "lp":
    np.testing.assert_allclose(abs(float(after["log_p"] - before["log_p"])), 5e-2, rtol=1e-3)


@pytest.mark.slow
def test_lambda_moves_over_the_run_and_is_recorded(uninterrupted):
  workdir, summary = uninterrupted
  initial = da.initializers.default_lambda("l1", 16)
  history = [r["block_0/attention/lambda"] for r in records(workdir, ("train",))]
  assert len({tuple(h) for h in history}) == len(history)  # it changes between every pair of records
  assert not np.allclose(summary["lambda"]["block_0/attention/lambda"], initial, rtol=1e-3)
  np.testing.assert_allclose(summary["lambda"]["block_0/attention/lambda"], history[-1], rtol=1e-6)


@pytest.mark.slow
def test_sampling_and_analysis_read_the_runs_newest_checkpoint(uninterrupted):
  workdir, summary = uninterrupted
  config = shrunk_config()
  sample, step = training.sample_text(config, workdir)
  assert step == 12 and 0 < len(sample) <= 8
  assert training.sample_text(config, workdir)[0] == sample  # greedy and seeded: reproducible
  out = training.analyze_run(config, workdir)
  report = json.loads((out / "attention.json").read_text())
  assert report["step"] == 12 and len(report["layers"]) == 2
  np.testing.assert_allclose(report["layers"][0]["lambda"], summary["lambda"]["block_0/attention/lambda"],
                             rtol=1e-6)
  assert {p.name for p in out.iterdir()} == {"attention.json", "statistics.png", "attention_maps.png",
                                             "lambda.png"}


def run_main(script, *args):
  return scripts.run_script(script, *args, timeout=300)


@pytest.mark.slow
def test_the_train_and_generate_mains_print_bits_per_byte_and_a_sample(tmp_path):
  config = ["--config=configs/lm.py:metric=l1,size=tiny,steps=2", "--config.model.depth=1",
            "--config.train.log_every=1", "--config.train.eval_batches=1", "--config.sample.length=10",
            f"--workdir={tmp_path}"]
  trained = run_main("train.py", *config)
  assert trained.returncode == 0, trained.stderr[-2000:]
  before, after = map(float, re.search(r"validation bits per byte: ([\d.]+) untrained -> ([\d.]+) after 2 steps",
                                      trained.stdout).groups())
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert (before, after) == (round(summary["untrained_validation_bits_per_byte"], 4),
                             round(summary["validation_bits_per_byte"], 4))
  assert "step 1/2" in trained.stderr and "tokens/s" in trained.stderr  # periodic log lines without a terminal
  sampled = run_main("generate.py", *config)
  assert sampled.returncode == 0, sampled.stderr[-2000:]
  assert sampled.stdout.startswith("sample (step 2, temperature 0.8, top_k 0, seed 0):\ndef ")


def test_a_bad_config_flag_stops_the_main_before_training(tmp_path):
  result = run_main("train.py", "--config=configs/lm.py:metric=l1,size=tiny", "--config.train.steps=-1",
                    f"--workdir={tmp_path / 'run'}")
  assert result.returncode != 0
  assert "config.train.steps=-1 is invalid: must be >= 0" in result.stderr
  assert not (tmp_path / "run").exists()
