"""Meshes in the trainer: data, data x fsdp and data x seq training equal one device on the same global batch,
parameters are split as the fsdp rule says, pmap equals jit, a checkpoint resumes on another mesh with the same
records, and every bad placement fails before any step."""

import shutil

import chex
import flax.jax_utils
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from distattn_jax import training
from distattn_jax.data import text
from distattn_jax.training import distributed, loop, steps

def small_config(**overrides):
  config = training.default_config()
  config.model.update(width=32, depth=1, num_heads=2, mlp_dim=64, max_len=32)
  config.data.update(seq_len=16, batch_size=8)
  config.optim.update(warmup_steps=0)  # the first steps move the parameters, so they are compared
  config.train.update(steps=10, log_every=2, eval_every=4, checkpoint_every=4, eval_batches=1)
  config.sample.update(prompt="a", length=8)
  for key, value in overrides.items():
    group, field = key.split(".")
    config[group][field] = value
  return config


def windows(seed, batch=8, length=17):
  return np.random.default_rng(seed).integers(0, 256, (batch, length)).astype(np.int32)


def train(config, num_steps=5):
  """``num_steps`` of the trainer's own jitted step on ``config``'s placement; the state and the losses."""
  placement = distributed.Placement.create(config)
  _, state = loop.build(config, placement)
  step = placement.jit_train_step(state, config.optim.grad_accum_steps)
  key = placement.dropout_key(config.seed)
  rows = placement.rows(config.data.batch_size)
  losses = []
  with placement.context():
    for s in range(num_steps):
      state, metrics = step(state, placement.batch(windows(s)[rows], config.data.batch_size), key)
      losses.append(float(metrics["loss"]))
  return placement, state, losses


@pytest.fixture(scope="module")
def one_device():
  return train(small_config())


@pytest.mark.slow
@pytest.mark.parametrize("mesh", [dict(data=8), dict(data=4, fsdp=2),
                                  dict(data=2, seq=4)], ids=str)
def test_training_on_a_mesh_equals_one_device(one_device, mesh):
  _, want, want_losses = one_device
  placement, got, losses = train(small_config(**{f"mesh.{k}": v for k, v in mesh.items()}))
  assert {k: v for k, v in placement.axes.items() if v > 1} == mesh
  # The same sums split over devices and added in another order: float32 rounding (measured: at most 3.1e-7 in
  # any parameter after five steps, on data=8 and data=4 x fsdp=2).
  np.testing.assert_allclose(losses, want_losses, rtol=1e-5)
  chex.assert_trees_all_close(jax.device_get(got.params), jax.device_get(want.params), rtol=0, atol=1e-5)
  untrained = training.build(small_config())[1].params["embed"]["embedding"]
  assert not np.allclose(got.params["embed"]["embedding"], untrained)
  fsdp = placement.axes["fsdp"]
  for leaf in jax.tree.leaves(got.params) + jax.tree.leaves(got.opt_state):
    assert leaf.sharding.spec == distributed.param_spec(leaf.shape, fsdp)
  if fsdp > 1:  # the embedding [256, 32] is split along its vocabulary axis: each device holds 128 rows
    embedding = got.params["embed"]["embedding"]
    assert embedding.sharding.spec == P("fsdp", None)
    assert {s.data.shape for s in embedding.addressable_shards} == {(256 // fsdp, 32)}


def test_the_fsdp_rule_splits_the_largest_divisible_axis_and_replicates_the_rest():
  assert distributed.param_spec((256, 32), 2) == P("fsdp", None)
  assert distributed.param_spec((6, 32, 64), 4) == P(None, None, "fsdp")
  assert distributed.param_spec((32, 32), 4) == P("fsdp", None)  # equal sizes: the first
  assert distributed.param_spec((2,), 4) == P()  # nothing divisible: replicated
  assert distributed.param_spec((), 2) == P()
  assert distributed.param_spec((256, 32), 1) == P()


def test_each_process_builds_its_rows_and_the_global_batch_is_split_over_the_batch_axes():
  placement = distributed.Placement.create(small_config(**{"mesh.data": 4, "mesh.fsdp": 2}))
  assert placement.rows(8) == slice(0, 8)  # one process holds every row
  batch = placement.batch(windows(0), 8)
  np.testing.assert_array_equal(np.asarray(batch), windows(0))
  assert {s.data.shape for s in batch.addressable_shards} == {(1, 17)}
  config = small_config()
  data = text.TextData(text.load_corpus("", 0.05, 17), 16, 8, config.seed)
  np.testing.assert_array_equal(data.train_batch(3, slice(2, 6)), data.train_batch(3)[2:6])
  np.testing.assert_array_equal(data.eval_batches(2, slice(4, 8))[1], data.eval_batches(2)[1][4:8])


@pytest.mark.slow
def test_pmap_train_step_equals_the_jitted_step(one_device):
  _, want, want_losses = one_device
  n = jax.local_device_count()
  _, state = training.build(small_config())
  state = flax.jax_utils.replicate(state)
  step = training.pmap_train_step()
  losses = []
  for s in range(5):
    state, metrics = step(state, windows(s).reshape(n, 8 // n, 17), steps.dropout_key(0))
    np.testing.assert_array_equal(metrics["loss"], np.full(n, metrics["loss"][0]))  # pmean: one value everywhere
    losses.append(float(metrics["loss"][0]))
  np.testing.assert_allclose(losses, want_losses, rtol=1e-5)
  for i in (0, n - 1):  # every replica applied the same update
    chex.assert_trees_all_close(jax.tree.map(lambda a, i=i: np.asarray(a[i]), state.params),
                                jax.device_get(want.params), rtol=0, atol=1e-5)


@pytest.mark.slow
def test_a_run_checkpointed_on_data_8_resumes_on_data_2_fsdp_4_with_the_same_records(tmp_path):
  config = lambda **mesh: small_config(**{"train.steps": 8, **{f"mesh.{k}": v for k, v in mesh.items()}})
  training.train_and_evaluate(config(data=8), tmp_path / "whole")
  # The same run stopped after its step-4 checkpoint: the step-8 one removed (the writer drops the records past
  # the step a run resumes from, so the copy's later records are rewritten by the resumed run).
  shutil.copytree(tmp_path / "whole", tmp_path / "moved")
  shutil.rmtree(tmp_path / "moved" / "checkpoints" / "8")
  resumed = training.train_and_evaluate(config(data=2, fsdp=4), tmp_path / "moved")
  assert resumed["resumed_from_step"] == 4 and resumed["mesh"] == {"data": 2, "fsdp": 4, "seq": 1}
  read = lambda run: [r for r in training.read_jsonl(tmp_path / run / "metrics.jsonl") if r["split"] != "perf"]
  got, want = read("moved"), read("whole")
  assert [(r["step"], r["split"]) for r in got] == [(r["step"], r["split"]) for r in want]
  assert [r["step"] for r in got if r["split"] == "train"] == [2, 4, 6, 8]
  for g, w in zip(got, want):
    for key in set(w) - {"step", "split"}:  # float32 sums in another order on the other mesh
      np.testing.assert_allclose(g[key], w[key], rtol=1e-5, err_msg=f"{key} at step {w['step']}")
  _, whole = training.restore(config(), tmp_path / "whole")
  _, moved = training.restore(config(), tmp_path / "moved")
  chex.assert_trees_all_close(moved.params, whole.params, rtol=0, atol=1e-5)


@pytest.mark.parametrize("overrides,message", [
    ({"mesh.data": 3}, r"config.mesh data=3 x fsdp=1 x seq=1 = 3 devices, but there are 8 devices"),
    ({"mesh.data": 2, "mesh.fsdp": 2}, r"= 4 devices, but there are 8 devices \(jax.device_count\(\)\)"),
    ({"mesh.data": 3, "mesh.fsdp": -1}, r"the sized axes take 3 devices, which does not divide the 8 devices"),
    ({"mesh.data": 4, "mesh.seq": 4}, r"= 16 devices, but there are 8 devices .* To simulate 16 devices on CPU, set "
     r"JAX_NUM_CPU_DEVICES=16 in the environment before starting"),
    ({"mesh.data": -1, "mesh.fsdp": -1}, r"config.mesh has 2 axes set to -1 \(data, fsdp\)"),
    ({"mesh.seq": 0}, r"config.mesh.seq=0 is invalid: must be a positive int, or -1"),
    ({"mesh.data": 8, "data.batch_size": 12},
     r"config.data.batch_size=12 is invalid: its microbatch of 12 rows .* must divide over mesh.data x mesh.fsdp "
     r"= 8 x 1 = 8 devices"),
    ({"mesh.data": -1, "data.batch_size": 4},
     r"config.data.batch_size=4 is invalid: its microbatch of 4 rows .* = 8 x 1 = 8 devices"),
    ({"mesh.data": 2, "mesh.seq": 4, "data.seq_len": 18},
     r"config.data.seq_len=18 is invalid: the sequence is laid out over mesh.seq=4 devices"),
    ({"mesh.data": 2, "mesh.seq": 4, "model.implementation": "blockwise"},
     r"config.model.implementation='blockwise' is invalid with mesh.seq=4: .* needs the ring kernel"),
    ({"distributed.num_processes": 2, "distributed.process_id": 2},
     r"config.distributed.process_id=2 is invalid: must be in \[0, 2\)"),
    ({"distributed.process_id": -1}, r"config.distributed.process_id=-1 is invalid"),
    ({"distributed.coordinator_address": "localhost"},
     r"config.distributed.coordinator_address='localhost' is invalid: must be host:port"),
])
def test_a_bad_placement_fails_before_anything_is_built(tmp_path, overrides, message):
  with pytest.raises(ValueError, match=message):
    training.train_and_evaluate(small_config(**overrides), tmp_path / "run")
  assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("mesh,devices", [(dict(data=16, fsdp=1, seq=1), 16), (dict(data=32, fsdp=-1, seq=1), 32)],
                         ids=str)
def test_a_mesh_larger_than_the_devices_says_how_to_simulate_them_on_cpu(mesh, devices):
  with pytest.raises(ValueError) as error:
    distributed.mesh_axes(ml_collections.ConfigDict(mesh), 8)
  assert (f"To simulate {devices} devices on CPU, set JAX_NUM_CPU_DEVICES={devices} in the environment before "
          "starting") in str(error.value)
  assert f'jax.config.update("jax_num_cpu_devices", {devices}) right after importing jax' in str(error.value)
  with pytest.raises(ValueError) as error:  # fewer than there are: simulating more would not help
    distributed.mesh_axes(ml_collections.ConfigDict(dict(data=2, fsdp=2, seq=1)), 8)
  assert "simulate" not in str(error.value)


def test_a_process_id_outside_the_processes_fails_before_joining():
  config = small_config(**{"distributed.coordinator_address": "localhost:1", "distributed.num_processes": 2,
                           "distributed.process_id": 5})
  with pytest.raises(ValueError, match=r"config.distributed.process_id=5 is invalid: must be in \[0, 2\)"):
    training.initialize_distributed(config)
  assert not jax.distributed.is_initialized()


def test_the_default_placement_is_one_device_and_the_mesh_fields_are_not_fingerprinted():
  assert distributed.Placement.create(small_config()).mesh is None
  fields = training.fingerprint(small_config())["fields"]
  assert not any(k.startswith(("mesh.", "distributed.")) for k in fields)
  assert training.fingerprint(small_config(**{"mesh.data": 8})) == training.fingerprint(small_config())
