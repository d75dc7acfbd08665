"""Checkpoint faults a resume must notice: a damaged or missing orbax step metadata file, one flipped bit in a
saved array, and no readable checkpoint at all (refused, with the run's records left byte for byte)."""

import json
import pathlib
import re

import chex
import jax
import jax.numpy as jnp
import pytest

from distattn_jax import training
from distattn_jax.training import checkpoint, loop

STEP_METADATA = "_CHECKPOINT_METADATA"  # orbax's per-step JSON (custom metadata: fingerprint and digests)


def small_config(**overrides):
  config = training.default_config()
  config.model.update(width=32, depth=1, num_heads=2, mlp_dim=64, max_len=32)
  config.data.update(seq_len=16, batch_size=4)
  config.train.update(steps=4, log_every=2, checkpoint_every=2, eval_every=2, eval_batches=1)
  config.sample.update(prompt="a", length=8)
  for key, value in overrides.items():
    group, field = key.split(".")
    config[group][field] = value
  return config


@pytest.fixture(scope="module")
def initial():
  """The freshly initialised state of small_config(), built once for the module (its arrays are immutable)."""
  return loop.build(small_config())[1]


def _saved(tmp_path, config, fresh, saves=(3, 6)):
  """Checkpoints of ``saves`` with the config's fingerprint, as the trainer writes them; distinct params each."""
  ckpts = checkpoint.Checkpoints(tmp_path / "ckpt", keep=3)
  states = {}
  for step in saves:
    states[step] = fresh.replace(step=jnp.asarray(step), params=jax.tree.map(lambda a, s=step: a + s, fresh.params))
    ckpts.save(states[step], {"config": training.fingerprint(config)})
  ckpts.close()
  return fresh, states


def _resume(directory, fresh, config):
  ckpts = checkpoint.Checkpoints(directory, keep=3)
  try:
    return ckpts.restore_latest(fresh, loop.resume_check(config, ckpts.directory))
  finally:
    ckpts.close()


def _truncate_step_metadata(step: pathlib.Path) -> None:
  path = step / STEP_METADATA
  path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])


def _truncate_largest_file(step: pathlib.Path) -> None:
  largest = max((p for p in step.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
  largest.write_bytes(largest.read_bytes()[:largest.stat().st_size // 2])


def _flip_a_bit_of_the_fingerprint(step: pathlib.Path) -> None:
  """``"model.metric": "l1"`` -> ``"l3"``: one bit, and the file is still valid JSON."""
  path = step / STEP_METADATA
  data = bytearray(path.read_bytes())
  at = data.index(b'"model.metric": "l1"') + len(b'"model.metric": "l')
  data[at] ^= 0x02
  path.write_bytes(bytes(data))
  json.loads(bytes(data))


def _flip_a_bit_in_the_largest_array_file(step: pathlib.Path) -> None:
  """One bit in the middle of the largest chunk file orbax wrote (the arrays' bytes: tensorstore reads it back
  without complaint, as a changed value)."""
  chunks = [p for p in step.rglob("*") if p.is_file() and p.parent.name == "d" and "ocdbt" in p.parent.parent.name]
  largest = max(chunks, key=lambda p: p.stat().st_size)
  data = bytearray(largest.read_bytes())
  data[len(data) // 2] ^= 0x10
  largest.write_bytes(bytes(data))


@pytest.mark.parametrize("damage,reason", [
    (_truncate_step_metadata, r"_CHECKPOINT_METADATA is not valid JSON"),
    (lambda step: (step / STEP_METADATA).unlink(), r"_CHECKPOINT_METADATA is missing"),
    (_flip_a_bit_of_the_fingerprint, r"does not match the SHA-256 recorded"),
    (_flip_a_bit_in_the_largest_array_file, r"1 array\(s\) differ from the SHA-256 recorded when saved"),
], ids=["metadata_corrupt", "metadata_missing", "metadata_bit_flip", "array_bit_flip"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog, damage, reason, initial):
  config = small_config()
  fresh, states = _saved(tmp_path, config, initial)
  damage(tmp_path / "ckpt" / "6")
  restored = _resume(tmp_path / "ckpt", fresh, config)  # not a ConfigChangedError, not step 6's changed arrays
  assert int(restored.step) == 3
  chex.assert_trees_all_equal(restored.params, states[3].params)
  chex.assert_trees_all_equal(restored.opt_state, states[3].opt_state)
  assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["3"]
  assert (tmp_path / "ckpt.corrupt" / "6").is_dir()  # set aside, not deleted
  assert "ckpt/6 could not be restored" in caplog.text
  assert re.search(reason, caplog.text), caplog.text


def test_a_checkpoint_saved_before_digests_were_recorded_restores_unverified_with_a_warning(tmp_path, caplog,
                                                                                           initial):
  config = small_config()
  fresh, states = _saved(tmp_path, config, initial)
  path = tmp_path / "ckpt" / "6" / STEP_METADATA
  saved = json.loads(path.read_text())
  del saved["custom_metadata"]["digests"]
  path.write_text(json.dumps(saved))
  restored = _resume(tmp_path / "ckpt", fresh, config)
  assert int(restored.step) == 6
  chex.assert_trees_all_equal(restored.params, states[6].params)
  assert "ckpt/6 was saved without content digests" in caplog.text


def test_the_digests_cover_every_array_and_stay_out_of_the_metadata_a_caller_sees(tmp_path, initial):
  config = small_config()
  fresh, _ = _saved(tmp_path, config, initial)
  saved = json.loads((tmp_path / "ckpt" / "6" / STEP_METADATA).read_text())["custom_metadata"]
  leaves = jax.tree_util.tree_flatten_with_path({"step": 0, "params": fresh.params, "opt_state": fresh.opt_state})[0]
  assert len(saved["digests"]["arrays"]) == len(leaves)
  assert all(len(d["sha256"]) == 64 for d in saved["digests"]["arrays"].values())
  ckpts = checkpoint.Checkpoints(tmp_path / "ckpt", keep=3)
  assert ckpts.metadata(6) == {"config": training.fingerprint(config)}
  ckpts.close()
  with pytest.raises(ValueError, match=r"'digests' is reserved"):
    checkpoint.Checkpoints(tmp_path / "other", keep=3).save(fresh, {"digests": 1})


def test_no_readable_checkpoint_stays_an_error_on_every_later_try(tmp_path, initial):
  config = small_config()
  fresh, _ = _saved(tmp_path, config, initial)
  for step in ("3", "6"):
    _truncate_largest_file(tmp_path / "ckpt" / step)
  with pytest.raises(checkpoint.CheckpointError, match=r"no readable checkpoint in \S*ckpt; every step failed "
                     r"to restore and was moved to \S*ckpt.corrupt"):
    _resume(tmp_path / "ckpt", fresh, config)
  # Every step is now set aside: the folder holds none, which is not a fresh start.
  with pytest.raises(checkpoint.CheckpointError, match=r"no readable checkpoint in \S*ckpt; it holds no step, and "
                     r"\S*ckpt.corrupt holds steps 3, 6 set aside as unreadable"):
    _resume(tmp_path / "ckpt", fresh, config)


# --- through the trainer --------------------------------------------------------------------------------------


def _run_with_checkpoints(run: pathlib.Path, config, fresh) -> bytes:
  """A workdir as a 4-step run leaves it, without the training: checkpoints at steps 2 and 4 (the initial state
  under those steps, with the fingerprint), records in metrics.jsonl up to step 4, config.json. Returns the
  metrics.jsonl bytes up to step 2."""
  ckpts = checkpoint.Checkpoints(run / "checkpoints", keep=3)
  for step in (2, 4):
    ckpts.save(fresh.replace(step=jnp.asarray(step)), {"config": training.fingerprint(config)})
  ckpts.close()
  lines = [{"step": 0, "split": "eval", "bits_per_byte": 8.0}]
  lines += [{"step": s, "split": split, "loss": 5.0 - s / 10} for s in (2, 4) for split in ("train", "eval")]
  text = [json.dumps(r) + "\n" for r in lines]
  (run / "metrics.jsonl").write_text("".join(text))
  loop.write_json(run / "config.json", json.loads(config.to_json_best_effort()))
  return "".join(text[:3]).encode()


@pytest.mark.slow
def test_a_run_whose_newest_checkpoint_lost_its_metadata_resumes_from_the_previous_one(tmp_path, caplog, initial):
  config, run = small_config(), tmp_path / "run"
  kept = _run_with_checkpoints(run, config, initial)
  (run / "checkpoints" / "4" / STEP_METADATA).unlink()
  summary = training.train_and_evaluate(config, run)  # not a ConfigChangedError
  assert summary["resumed_from_step"] == 2 and summary["steps"] == 4
  assert "checkpoints/4 could not be restored (UnreadableCheckpoint: its _CHECKPOINT_METADATA is missing)" in (
      caplog.text)
  assert "holds 2 records past step 2, where this run resumes; they are replaced" in caplog.text  # said, not silent
  assert (run / "metrics.jsonl").read_bytes().startswith(kept)  # the records up to the resumed step, as they were
  after = [(r["step"], r["split"]) for r in training.read_jsonl(run / "metrics.jsonl") if r["split"] != "perf"]
  assert after == [(0, "eval"), (2, "train"), (2, "eval"), (4, "train"), (4, "eval")]


def test_a_run_with_no_readable_checkpoint_is_refused_and_its_records_are_left_byte_for_byte(tmp_path, initial):
  config, run = small_config(), tmp_path / "run"
  _run_with_checkpoints(run, config, initial)
  for step in ("2", "4"):
    _truncate_largest_file(run / "checkpoints" / step)
  records = {name: (run / name).read_bytes() for name in ("metrics.jsonl", "config.json")}
  for attempt in range(2):  # the first try sets every step aside; an identical rerun must not start at step 0
    with pytest.raises(checkpoint.CheckpointError) as refused:
      training.train_and_evaluate(config, run)
    message = str(refused.value)
    assert f"no readable checkpoint in {run / 'checkpoints'}" in message
    assert f"To start this run over from step 0, delete {run}" in message
    assert {name: (run / name).read_bytes() for name in records} == records
  assert sorted(p.name for p in (run / "checkpoints.corrupt").iterdir()) == ["2", "4"]
