"""Several processes: two processes of 4 CPU devices on localhost train on a data=8 mesh exactly as one process of
8 devices does, and a coordinator that never answers is an error within the stated timeout, not a hang."""

import importlib.util
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time

import chex
import numpy as np
import pytest
import scripts

from distattn_jax import training

TRAIN = str(scripts.ROOT / "experiments" / "train.py")
# A tiny run in configs/base.py's dotted arguments, so the subprocesses and this process read the same config.
ARG = ("model.width=32,model.depth=1,model.num_heads=2,model.mlp_dim=64,model.max_len=32,data.seq_len=16,"
       "data.batch_size=8,optim.warmup_steps=0,train.steps=3,train.log_every=1,train.eval_every=3,"
       "train.checkpoint_every=3,train.eval_batches=1,sample.prompt=a,sample.length=8,mesh.data=8")
DEADLINE = 240  # seconds for both processes together (measured: about 35 s on 2 shared cores)


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def start(process_id: int, port: int, workdir: pathlib.Path, timeout: int = 60) -> subprocess.Popen:
  env = {**os.environ, "JAX_NUM_CPU_DEVICES": "4",
         "PYTHONPATH": os.pathsep.join(filter(None, [str(scripts.ROOT), os.environ.get("PYTHONPATH")]))}
  args = [sys.executable, TRAIN, f"--config=configs/base.py:{ARG}",
          f"--config.distributed.coordinator_address=localhost:{port}", "--config.distributed.num_processes=2",
          f"--config.distributed.process_id={process_id}", f"--config.distributed.initialization_timeout={timeout}",
          f"--workdir={workdir}"]
  # A session of its own, so that a stuck child and anything it started can be stopped together.
  return subprocess.Popen(args, cwd=scripts.ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, start_new_session=True)


def finish(processes: list[subprocess.Popen], deadline: float) -> list[tuple[int, str, str]]:
  """Waits for every process until ``deadline`` (time.monotonic); on a timeout or any failure the others are
  killed, so nothing outlives the test."""
  results = []
  try:
    for p in processes:
      out, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
      results.append((p.returncode, out, err))
  finally:
    for p in processes:
      if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate()
  return results


@pytest.mark.slow
def test_two_processes_of_4_devices_train_as_one_process_of_8(tmp_path):
  port = free_port()
  processes = [start(i, port, tmp_path / "two") for i in (0, 1)]
  results = finish(processes, time.monotonic() + DEADLINE)
  for i, (code, _, err) in enumerate(results):
    assert code == 0, f"process {i}:\n{err[-3000:]}"
  assert all("after 3 steps" in out for _, out, _ in results)

  spec = importlib.util.spec_from_file_location("config_base", scripts.ROOT / "configs" / "base.py")
  base = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(base)
  config = base.get_config(ARG)
  summary = training.train_and_evaluate(config, tmp_path / "one")  # this process: 8 CPU devices (conftest)
  assert summary["mesh"] == {"data": 8, "fsdp": 1, "seq": 1}

  read = lambda run: [r for r in training.read_jsonl(tmp_path / run / "metrics.jsonl") if r["split"] != "perf"]
  got, want = read("two"), read("one")
  # One writer: the records appear once each, in order (a second writer would duplicate or interleave them).
  assert [(r["step"], r["split"]) for r in got] == [(r["step"], r["split"]) for r in want] == [
      (0, "eval"), (1, "train"), (2, "train"), (3, "train"), (3, "eval")]
  for g, w in zip(got, want):  # the same sums, reduced across processes by gloo instead of inside one
    for key in set(w) - {"step", "split"}:
      np.testing.assert_allclose(g[key], w[key], rtol=1e-5, err_msg=f"{key} at step {w['step']}")
  _, two = training.restore(config, tmp_path / "two")  # the checkpoint both processes wrote
  _, one = training.restore(config, tmp_path / "one")
  assert int(two.step) == 3
  chex.assert_trees_all_close(two.params, one.params, rtol=0, atol=1e-5)


@pytest.mark.slow  # waits out a 3 s timeout in a fresh interpreter
def test_an_unreachable_coordinator_is_an_error_within_the_timeout(tmp_path):
  started = time.monotonic()
  # Process 1 of 2 with nobody listening at the coordinator's port.
  [(code, _, err)] = finish([start(1, free_port(), tmp_path / "run", timeout=3)], time.monotonic() + 60)
  assert code == 1
  assert re.search(r"RuntimeError: the coordinator at 'localhost:\d+' \(config.distributed.coordinator_address\) "
                   r"did not answer within config.distributed.initialization_timeout=3 s", err), err[-2000:]
  assert time.monotonic() - started < 45  # 3 s of waiting plus the interpreter's start, never a hang
  assert not (tmp_path / "run").exists()
