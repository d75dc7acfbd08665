"""The mains' flag parsing (experiments/cli.py): every mistake is exit status 2 and one paragraph naming the flag,
and generate/analyze read the run's own config from its folder."""

import json

import cli  # experiments/ is on pytest's pythonpath (pyproject.toml)
import pytest
import scripts
from absl import app, flags
from ml_collections import config_flags

from distattn_jax import training

LM = "configs/lm.py:metric=l1,size=tiny"


def parse(argv, *, run_config=False, validate=training.validate):
  """Parses ``argv`` as a main with ``--config`` and ``--workdir`` would: the config, or the exit status."""
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, flag_values=values)
  flags.DEFINE_string("workdir", None, "", flag_values=values)
  try:
    rest = cli.parse_flags(["prog.py", *argv], validate=validate, run_config=run_config, flag_values=values)
  except SystemExit as e:
    return e.code
  assert rest == ["prog.py"]
  return values.config


def error(capsys, argv, **kwargs):
  assert parse(argv, **kwargs) == 2
  err = capsys.readouterr().err
  assert err.startswith("prog.py: error: ") and "Traceback" not in err, err
  return err


def test_an_unknown_key_names_it_and_lists_the_valid_keys_at_its_level(capsys):
  err = error(capsys, [f"--config={LM}", "--config.train.bogus=1"])
  assert ("--config.train.bogus=1: config.train has no key 'bogus'; valid keys in config.train: allow_config_change, "
          "allow_steps_change, checkpoint_every, eval_batches, eval_every, keep_checkpoints, log_every, steps") in err
  err = error(capsys, [f"--config={LM}", "--config.train.stpes=5"])
  assert "config.train has no key 'stpes' (did you mean 'steps'?)" in err
  err = error(capsys, [f"--config={LM}", "--config.modle.metric=l2"])
  assert "config has no key 'modle' (did you mean 'model'?); valid keys in config: analysis, data," in err
  err = error(capsys, [f"--config={LM}", "--config.train.steps.x=1"])
  assert "config.train.steps is a field, not a group of fields, so it has no key 'x'" in err


def test_a_value_of_the_wrong_type_or_out_of_range_names_the_field(capsys):
  err = error(capsys, [f"--config={LM}", "--config.train.steps=abc"])
  assert "--config.train.steps=abc: config.train.steps takes an int (here it is 1000); 'abc' is not one" in err
  err = error(capsys, [f"--config={LM}", "--config.model.learnable_lambda=maybe"])
  assert "config.model.learnable_lambda takes a bool (true or false)" in err
  err = error(capsys, [f"--config={LM}", "--config.train=1"])
  assert "--config.train=1: config.train is a group of fields, not a value; set one of them" in err
  err = error(capsys, [f"--config={LM}", "--config.train.steps=-1"])  # training.validate's check
  assert "config.train.steps=-1 is invalid: must be >= 0" in err
  err = error(capsys, [f"--config={LM}", "stray"])
  assert "unexpected arguments: stray" in err


def test_a_missing_or_refused_config_file_is_a_usage_error(capsys):
  err = error(capsys, ["--config=configs/lms.py:size=tiny"])
  assert "no config file 'configs/lms.py' (did you mean 'configs/lm.py'?); config files in 'configs':" in err
  err = error(capsys, ["--config=configs/lm.py:size=huge"])
  assert "config argument size='huge' is not a preset; valid sizes: tiny, small, base" in err
  err = error(capsys, ["--config.train.steps=5"])
  assert "there is no --config to override" in err


def test_good_flags_reach_the_config():
  config = parse([f"--config={LM}", "--config.train.steps=5", "--config.model.learnable_lambda=false",
                  "--config.train.allow_steps_change"])
  assert (config.train.steps, config.model.learnable_lambda, config.train.allow_steps_change) == (5, False, True)


def test_a_default_config_file_is_loaded_and_checked_when_the_flags_are_parsed(capsys):
  values = flags.FlagValues()
  cli.define_config_file("config", LM, "the config", flag_values=values)  # nothing is loaded yet
  assert values["config"].value is None

  def run(*argv):
    try:
      return cli.parse_flags(["prog.py", *argv], flag_values=values)
    except SystemExit as e:
      return e.code

  assert run("--config.train.stpes=5") == 2
  assert "config.train has no key 'stpes' (did you mean 'steps'?)" in capsys.readouterr().err
  assert run("--config.train.steps=5") == ["prog.py"]
  assert (values.config.train.steps, values.config.model.width) == (5, 128)


def test_a_usage_error_the_main_raises_is_printed_the_same_way(capsys):
  def main(argv):
    raise app.UsageError(f"--devices=3 but JAX has 8 devices ({argv[0]})")

  with pytest.raises(SystemExit) as exit_:
    cli.usage_errors(main)(["/somewhere/prog.py"])
  assert exit_.value.code == 2
  assert capsys.readouterr().err.startswith("prog.py: error: --devices=3 but JAX has 8 devices (/somewhere/prog.py)\n")
  assert cli.usage_errors(lambda argv: len(argv))(["prog.py", "x"]) == 2  # a main that returns keeps its value


def fake_run(tmp_path, **model):
  """A run folder as the trainer leaves it, as far as flag parsing looks: checkpoints/ and config.json."""
  config = training.default_config()
  config.model.update(model)
  config.sample.length = 7
  (tmp_path / "checkpoints").mkdir()
  (tmp_path / "config.json").write_text(config.to_json_best_effort())
  return config


def test_without_config_the_runs_saved_config_is_used_and_flags_override_it(tmp_path):
  saved = fake_run(tmp_path, metric="l2", width=64)
  config = parse([f"--workdir={tmp_path}", "--config.sample.temperature=0"], run_config=True)
  assert (config.model.metric, config.model.width, config.sample.length) == ("l2", 64, 7)
  assert config.sample.temperature == 0.0 and saved.sample.temperature != 0.0
  assert parse([f"--workdir={tmp_path}"], run_config=True).to_dict() == saved.to_dict()


def test_a_config_that_disagrees_with_the_checkpoint_says_so_in_terms_of_sampling(tmp_path, capsys):
  fake_run(tmp_path, metric="l1", width=128, depth=2, num_heads=4, mlp_dim=512, max_len=64)
  assert parse([f"--config={LM}", f"--workdir={tmp_path}"], run_config=True).model.metric == "l1"  # make run
  err = error(capsys, ["--config=configs/lm.py:metric=l2,size=tiny", f"--workdir={tmp_path}"], run_config=True)
  assert (f"the checkpoint in {tmp_path} was trained with metric=l1 but --config asks for metric=l2; drop --config "
          "to use the run's own config") in err
  err = error(capsys, [f"--workdir={tmp_path}", "--config.model.metric=cosine"], run_config=True)
  assert "was trained with metric=l1 but --config.model.metric asks for metric=cosine" in err
  (tmp_path / "config.json").unlink()
  err = error(capsys, [f"--workdir={tmp_path}"], run_config=True)
  assert f"--config is not given and {tmp_path}/config.json, the run's saved config, does not exist" in err
  err = error(capsys, [f"--workdir={tmp_path / 'elsewhere'}"], run_config=True)
  assert f"no checkpoints in {tmp_path}/elsewhere/checkpoints" in err


def test_the_config_a_run_saves_reads_back_as_the_config_it_trained_with(tmp_path):
  # The trainer writes config.to_json_best_effort() (training/loop.py); every field type comes back as it was,
  # placeholders set and unset alike, and the resume controls come back off.
  config = training.default_config()
  config.model.update(metric="lp", p=3.0, lambda_init=0.5, learnable_lambda=False, rotary_base=500.0)
  config.data.update(path="/some/text", val_fraction=0.25)
  config.train.update(steps=7, allow_config_change=True, allow_steps_change=True)
  config.distributed.coordinator_address = "localhost:1234"
  (tmp_path / "config.json").write_text(config.to_json_best_effort())
  saved = cli.read_run_config(tmp_path)
  assert (saved.train.allow_config_change, saved.train.allow_steps_change) == (False, False)
  config.train.update(allow_config_change=False, allow_steps_change=False)
  assert saved.to_dict() == config.to_dict() and training.fingerprint(saved) == training.fingerprint(config)
  # An unset placeholder stays typed, so a flag can still set it.
  assert saved.model.num_kv_heads is None and saved.model.get_type("num_kv_heads") is int
  (tmp_path / "config.json").write_text(json.dumps({"model": {"metric": "l1", "colour": "red"}}))
  with pytest.raises(cli.UsageError, match=r"key 'model.colour' is not in this version's config \(valid keys in "
                     r"config.model: attention_dropout_rate,"):
    cli.read_run_config(tmp_path)


def test_the_train_main_stops_a_flag_mistake_with_status_2_before_anything_starts(tmp_path):
  result = scripts.run_script("train.py", f"--config={LM}", "--config.train.bogus=1", f"--workdir={tmp_path / 'r'}",
                              timeout=120)
  assert result.returncode == 2, result.stderr
  assert "train.py: error: --config.train.bogus=1: config.train has no key 'bogus'; valid keys" in result.stderr
  assert "Traceback" not in result.stderr and not (tmp_path / "r").exists()
