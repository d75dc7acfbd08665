"""Where training runs: one device, a device mesh (data, fsdp, seq) under ``jit``, ``pmap``, several processes.

``config.mesh`` sizes the mesh's axes ``data``, ``fsdp`` and ``seq`` (-1: the devices the others leave). All 1,
the default, is one device without a mesh (the plain ``jax.jit`` path). Otherwise the mesh spans every device of
every process, built from mesh positions by ``jax.make_mesh`` (never from ``device.id``), and:

* each global batch ``[batch, length + 1]`` is split over ``data`` x ``fsdp`` along the batch axis; every
  process builds only its rows (:meth:`Placement.rows`) and ``jax.make_array_from_process_local_data`` puts
  them together;
* parameters and optimizer state are replicated, or with ``fsdp > 1`` split over ``fsdp`` along their largest
  axis that ``fsdp`` divides (:func:`param_spec`; a leaf with no such axis stays replicated);
* with ``seq > 1`` the model's tokens are laid out over ``seq`` along the length and attention is the ring
  kernel (``model.implementation="ring"``, traced under ``jax.set_mesh(mesh)``; :func:`model_config`);
* ``train_step`` / ``eval_step`` are jitted with these shardings and the train state is donated.

``config.distributed`` (or the environment) starts ``jax.distributed`` (:func:`initialize`), which must happen
before anything touches a device. :func:`pmap_train_step` is the same pure ``train_step`` under ``jax.pmap``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import socket
import time
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec as P

from distattn_jax import compat
from distattn_jax.models import TruthGPTConfig
from distattn_jax.training import steps

AXES = ("data", "fsdp", "seq")
BATCH_AXES = ("data", "fsdp")


def initialize(config: ml_collections.ConfigDict) -> bool:
  """Starts ``jax.distributed`` from ``config.distributed`` (None fields from the environment, as JAX reads it:
  ``JAX_COORDINATOR_ADDRESS`` or a detected cluster); returns whether this is a multi-process run. Call it before
  anything touches a device. A coordinator that cannot be reached, or processes that do not all join, fail
  after ``config.distributed.initialization_timeout`` seconds with a RuntimeError saying so."""
  d = config.distributed
  if d.coordinator_address is None and d.num_processes is None and d.process_id is None and not os.environ.get(
      "JAX_COORDINATOR_ADDRESS"):
    return False
  if jax.distributed.is_initialized():
    return True
  from distattn_jax.training.config import check_placement
  check_placement(config)  # a process_id out of range must not reach the coordinator
  address = d.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
  if address and d.process_id not in (None, 0):
    # JAX's client aborts the whole process (a C++ fatal error, no Python exception) when the coordinator does
    # not answer; waiting for its port here first turns that case into an error that says what happened.
    wait_for_coordinator(address, d.initialization_timeout)
  # Process 0 serves the coordinator; when the others do not all join in time, JAX itself stops this process
  # (exit status 134, DEADLINE_EXCEEDED in its log; 8 s after the start with a 3 s timeout), so that wait is
  # bounded too.
  logging.info("joining %s processes at %s as process %s (waiting at most %d s)", d.num_processes, address,
               d.process_id, d.initialization_timeout)
  try:
    jax.distributed.initialize(coordinator_address=d.coordinator_address, num_processes=d.num_processes,
                               process_id=d.process_id, initialization_timeout=d.initialization_timeout)
  except Exception as e:  # jaxlib raises its own runtime errors; say what was tried and for how long
    raise RuntimeError(
        f"jax.distributed.initialize failed: process {d.process_id} of {d.num_processes} could not join the "
        f"coordinator at {d.coordinator_address or os.environ.get('JAX_COORDINATOR_ADDRESS')!r} within "
        f"config.distributed.initialization_timeout={d.initialization_timeout} s (is process 0 running there, "
        f"and have all {d.num_processes} processes started?): {type(e).__name__}: {e}") from e
  return True


def wait_for_coordinator(address: str, timeout: float) -> None:
  """Returns once something accepts connections at ``address`` (host:port); RuntimeError after ``timeout``
  seconds of refused or unanswered attempts."""
  host, _, port = address.rpartition(":")
  deadline = time.monotonic() + timeout
  while True:
    try:
      with socket.create_connection((host.strip("[]"), int(port)), timeout=min(2.0, timeout)):
        return
    except OSError as e:
      if time.monotonic() >= deadline:
        raise RuntimeError(
            f"the coordinator at {address!r} (config.distributed.coordinator_address) did not answer within "
            f"config.distributed.initialization_timeout={timeout} s ({type(e).__name__}: {e}); start process 0 "
            "there first, or check the address and port") from e
      time.sleep(0.25)


def mesh_axes(mesh: ml_collections.ConfigDict, device_count: int) -> dict[str, int] | None:
  """``{"data": ., "fsdp": ., "seq": .}`` with -1 resolved, or None for one device without a mesh (all 1).
  ValueError naming the sizes and the device count when they do not multiply to it."""
  sizes = {axis: int(mesh[axis]) for axis in AXES}
  free = [axis for axis, size in sizes.items() if size == -1]
  known = math.prod(size for size in sizes.values() if size != -1)
  if free:
    if device_count % known:
      raise ValueError(f"config.mesh={sizes}: the sized axes take {known} devices, which does not divide the "
                       f"{device_count} devices there are (jax.device_count()), so mesh.{free[0]}=-1 has no size"
                       f"{_simulate_hint(known) if known > device_count else ''}")
    sizes[free[0]] = device_count // known
  if math.prod(sizes.values()) == 1:
    return None
  total = math.prod(sizes.values())
  if total != device_count:
    raise ValueError(f"config.mesh data={sizes['data']} x fsdp={sizes['fsdp']} x seq={sizes['seq']} = {total} "
                     f"devices, but there are {device_count} devices (jax.device_count()); the product must equal "
                     "the device count (set one axis to -1 to take the remaining devices)"
                     f"{_simulate_hint(total) if total > device_count else ''}")
  return sizes


def _simulate_hint(devices: int) -> str:
  return (f". To simulate {devices} devices on CPU, set JAX_NUM_CPU_DEVICES={devices} in the environment before "
          "starting (with several processes, each one's share), or call "
          f"jax.config.update(\"jax_num_cpu_devices\", {devices}) right after importing jax, before JAX initialises "
          "its backend")


def param_spec(shape: tuple[int, ...], fsdp: int) -> P:
  """The partition of one parameter (or optimizer-state) leaf: over ``fsdp`` along its largest axis that
  ``fsdp`` divides (the first of equals), replicated when none does or ``fsdp == 1``."""
  if fsdp > 1:
    divisible = [i for i, n in enumerate(shape) if n % fsdp == 0]
    if divisible:
      axis = max(divisible, key=lambda i: (shape[i], -i))
      return P(*(("fsdp" if i == axis else None) for i in range(len(shape))))
  return P()


def model_config(config: ml_collections.ConfigDict, model: TruthGPTConfig, axes: dict[str, int] | None
                 ) -> TruthGPTConfig:
  """The model's config on this mesh: with ``mesh.seq > 1`` its attention is the ring kernel, which passes the
  key/value blocks around the ``seq`` axis of the mesh set by ``jax.set_mesh`` (:meth:`Placement.context`)."""
  if axes is None or axes["seq"] == 1:
    return model
  if model.implementation not in ("auto", "ring"):
    raise ValueError(f"config.model.implementation={model.implementation!r} is invalid with mesh.seq="
                     f"{axes['seq']}: a sequence split over devices needs the ring kernel ('auto' or 'ring')")
  return dataclasses.replace(model, implementation="ring")


class SeqShardedApply:
  """A model's ``apply`` whose tokens are laid out over ``seq`` along the length (batch over data x fsdp), so the
  embedding, norms and MLP run on each device's share of the sequence."""

  def __init__(self, apply: Callable, sharding: NamedSharding):
    self.apply, self.sharding = apply, sharding

  def __call__(self, variables, tokens, *args, **kwargs):
    return self.apply(variables, jax.lax.with_sharding_constraint(tokens, self.sharding), *args, **kwargs)


@dataclasses.dataclass(frozen=True)
class Placement:
  """Where a run's arrays live: ``mesh`` None is one device (numpy batches, plain ``jax.jit``)."""

  mesh: jax.sharding.Mesh | None = None

  @classmethod
  def create(cls, config: ml_collections.ConfigDict) -> Placement:
    """The placement ``config.mesh`` asks for on the devices there are; every check before any step."""
    axes = mesh_axes(config.mesh, jax.device_count())
    if axes is None:
      if jax.process_count() > 1:
        raise ValueError(f"config.mesh={dict(config.mesh)} trains on one device, but this run has "
                         f"{jax.process_count()} processes; set a mesh over all {jax.device_count()} devices, e.g. "
                         "mesh.data=-1")
      return cls(None)
    split = axes["data"] * axes["fsdp"]
    micro = config.data.batch_size // config.optim.grad_accum_steps
    if micro % split:
      raise ValueError(f"config.data.batch_size={config.data.batch_size} is invalid: its microbatch of {micro} rows "
                       f"(batch_size / optim.grad_accum_steps) must divide over mesh.data x mesh.fsdp = "
                       f"{axes['data']} x {axes['fsdp']} = {split} devices")
    if config.data.seq_len % axes["seq"]:
      raise ValueError(f"config.data.seq_len={config.data.seq_len} is invalid: the sequence is laid out over "
                       f"mesh.seq={axes['seq']} devices, so it must be a multiple of {axes['seq']}")
    auto = (jax.sharding.AxisType.Auto,) * len(AXES)
    return cls(jax.make_mesh(tuple(axes[a] for a in AXES), AXES, axis_types=auto))

  @property
  def axes(self) -> dict[str, int] | None:
    return None if self.mesh is None else dict(self.mesh.shape)

  @property
  def batch_sharding(self) -> NamedSharding:
    return NamedSharding(self.mesh, P(BATCH_AXES))

  @property
  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, P())

  def context(self):
    """``jax.set_mesh(mesh)`` (what the ring kernel reads its mesh from) while tracing, else nothing."""
    return compat.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()

  def state_shardings(self, abstract: Any) -> Any:
    fsdp = self.mesh.shape["fsdp"]
    return jax.tree.map(lambda leaf: NamedSharding(self.mesh, param_spec(tuple(leaf.shape), fsdp)), abstract)

  def init_state(self, model, apply_model, tx, seed: int, seq_len: int) -> steps.TrainState:
    """The fresh train state of ``model`` (as :func:`steps.create_train_state`), created in place on the mesh
    (every process computes the same values from ``seed``); ``apply_model`` is the model the steps run (the
    ring kernel's, when ``seq > 1``: the kernel holds no parameters, so the parameters are the same)."""
    if self.mesh is None:
      return steps.create_train_state(model, tx, seed, seq_len)
    create = functools.partial(steps.create_train_state, model, tx, seed, seq_len)
    shardings = self.state_shardings(jax.eval_shape(create))
    state = jax.jit(create, out_shardings=shardings)()
    apply = apply_model.apply
    if self.mesh.shape["seq"] > 1:
      apply = SeqShardedApply(apply, NamedSharding(self.mesh, P(BATCH_AXES, "seq")))
    return state.replace(apply_fn=apply)

  def rows(self, batch_size: int) -> slice:
    """The rows of every global batch whose shards live on this process's devices (all of them for one
    process): what this process builds."""
    if self.mesh is None:
      return slice(None)
    indices = self.batch_sharding.addressable_devices_indices_map((batch_size, 1))
    spans = sorted({(i[0].start or 0, batch_size if i[0].stop is None else i[0].stop) for i in indices.values()})
    start, stop = spans[0][0], spans[-1][1]
    if sum(b - a for a, b in spans) != stop - start:
      raise ValueError(f"this process's devices hold rows {spans} of the batch, not one contiguous block; "
                       "the mesh's data axes must keep each process's devices together")
    return slice(start, stop)

  def batch(self, local: np.ndarray, batch_size: int) -> np.ndarray | jax.Array:
    """This process's rows (:meth:`rows`) as the global ``[batch_size, ...]`` array, split over data x fsdp."""
    if self.mesh is None:
      return local
    return jax.make_array_from_process_local_data(self.batch_sharding, local, (batch_size,) + local.shape[1:])

  def dropout_key(self, seed: int) -> jax.Array:
    if self.mesh is None:
      return steps.dropout_key(seed)
    return jax.jit(functools.partial(steps.dropout_key, seed), out_shardings=self.replicated)()

  def jit_train_step(self, state: steps.TrainState, grad_accum: int):
    """``train_step`` jitted with the state donated (and with this mesh's shardings)."""
    fn = functools.partial(steps.train_step, grad_accum=grad_accum)
    if self.mesh is None:
      return jax.jit(fn, donate_argnums=0)
    shardings = jax.tree.map(lambda a: a.sharding, state)
    return jax.jit(fn, in_shardings=(shardings, self.batch_sharding, self.replicated),
                   out_shardings=(shardings, self.replicated), donate_argnums=0)

  def jit_eval_step(self, state: steps.TrainState):
    if self.mesh is None:
      return jax.jit(steps.eval_step)
    shardings = jax.tree.map(lambda a: a.sharding, state)
    return jax.jit(steps.eval_step, in_shardings=(shardings, self.batch_sharding), out_shardings=self.replicated)

  def fetch(self, fn: Callable, *args) -> Any:
    """``fn(*args)`` as numpy on every process: jitted with a replicated output on a mesh, since parameters
    split over processes cannot be read directly."""
    if self.mesh is None:
      return jax.device_get(fn(*args))
    with self.context():
      return jax.device_get(jax.jit(fn, out_shardings=self.replicated)(*args))


def pmap_train_step(grad_accum: int = 1, axis_name: str = "batch", devices=None) -> Callable:
  """The pure :func:`steps.train_step` under ``jax.pmap``: ``(state, windows, dropout_key) -> (state, metrics)``
  with the state replicated over the leading axis (``flax.jax_utils.replicate``), ``windows``
  ``[devices, batch / devices, length + 1]`` and the key shared; the gradients are averaged over ``axis_name``
  (``lax.pmean``) so every device applies the whole batch's update. The state is donated. With dropout, each
  device draws its own share's mask from the shared key, so the draws differ from a jitted step's."""
  fn = functools.partial(steps.train_step, grad_accum=grad_accum, axis_name=axis_name)
  return jax.pmap(fn, axis_name=axis_name, in_axes=(0, 0, None), donate_argnums=0, devices=devices)
