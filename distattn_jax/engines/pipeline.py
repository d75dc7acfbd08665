"""Pipelines of small pure stages, composed like an optax chain and built from a config by stage name.

A *stage factory* takes keyword options and returns a *stage*: a pure function ``state -> state`` over a plain
dict. :func:`chain` composes stages in order; :func:`build` reads ``config.engine`` and ``config.stages`` (a
comma-separated string or a sequence of names), looks each name up in the engine's registry and calls its
factory with the options in ``config.<stage name>`` (a group of fields, absent = defaults). Adding a stage is
registering one function::

  @engines.register("neural", "my_stage")
  def my_stage(scale: float = 2.0):
    def apply(state):
      return {**state, "scale": scale}
    return apply

Stages never mutate the dict they are given; :func:`with_result` and :func:`with_check` return new dicts with a
result or a verification entry added, the two things every engine's report is made of.
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

State = dict[str, Any]
Stage = Callable[[State], State]
StageFactory = Callable[..., Stage]

_REGISTRY: dict[str, dict[str, StageFactory]] = {}


def register(engine: str, name: str, factory: StageFactory | None = None):
  """Registers ``factory`` as stage ``name`` of ``engine``; usable as a decorator. Re-registering replaces."""
  for argname, value in (("engine", engine), ("name", name)):
    if not isinstance(value, str) or not value.isidentifier():
      raise ValueError(f"register: {argname}={value!r} must be an identifier (it is a config field name)")

  def add(f: StageFactory) -> StageFactory:
    if not callable(f):
      raise TypeError(f"register: the factory of {engine}.{name} must be callable, got {type(f).__name__}")
    _REGISTRY.setdefault(engine, {})[name] = f
    return f

  return add if factory is None else add(factory)


def engines() -> tuple[str, ...]:
  return tuple(sorted(_REGISTRY))


def available(engine: str) -> tuple[str, ...]:
  """The registered stage names of ``engine``, sorted."""
  if engine not in _REGISTRY:
    raise ValueError(f"engine={engine!r} is not registered; registered engines: {', '.join(engines())}")
  return tuple(sorted(_REGISTRY[engine]))


def get(engine: str, name: str) -> StageFactory:
  names = available(engine)
  if name not in _REGISTRY[engine]:
    raise ValueError(f"stage {name!r} is not registered for engine {engine!r}; registered stages: "
                     f"{', '.join(names)}")
  return _REGISTRY[engine][name]


def stage_names(stages: str | Sequence[str]) -> tuple[str, ...]:
  """``"a, b"`` or ``("a", "b")`` -> ``("a", "b")``."""
  if isinstance(stages, str):
    return tuple(s.strip() for s in stages.split(",") if s.strip())
  return tuple(stages)


@dataclasses.dataclass(frozen=True)
class Pipeline:
  """Named stages applied in order; ``pipeline(state)`` is their composition."""

  engine: str
  names: tuple[str, ...]
  stages: tuple[Stage, ...]

  def __call__(self, state: State, progress: Callable[[str, int, int], None] | None = None) -> State:
    """Runs every stage; ``progress(name, index, total)`` is called before each (for a progress display).
    Records each stage's wall time in ``state['stage_seconds']``."""
    seconds = dict(state.get("stage_seconds", {}))
    for i, (name, stage) in enumerate(zip(self.names, self.stages)):
      if progress is not None:
        progress(f"{self.engine}.{name}", i, len(self.stages))
      start = time.perf_counter()
      state = stage(state)
      seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - start
      state = {**state, "stage_seconds": seconds}
    return state


def chain(*stages: Stage, engine: str = "custom", names: Iterable[str] | None = None) -> Pipeline:
  """Composes stages left to right (``chain(f, g)(s) == g(f(s))``), like ``optax.chain``."""
  names = tuple(names) if names is not None else tuple(getattr(s, "__name__", f"stage_{i}")
                                                       for i, s in enumerate(stages))
  if len(names) != len(stages):
    raise ValueError(f"chain: {len(names)} names for {len(stages)} stages")
  return Pipeline(engine, names, tuple(stages))


def _options(config: Any, name: str) -> dict[str, Any]:
  group = config.get(name) if hasattr(config, "get") else None
  if group is None:
    return {}
  return group.to_dict() if hasattr(group, "to_dict") else dict(group)


def build(config: Any) -> Pipeline:
  """The pipeline ``config.engine`` / ``config.stages`` name, each stage built with ``config.<name>``'s fields.

  Every name is checked before any stage is built: an unknown one is a ValueError listing the registered ones.
  """
  engine = config["engine"]
  names = stage_names(config["stages"])
  registered = available(engine)
  unknown = [n for n in names if n not in registered]
  if unknown:
    raise ValueError(f"config.stages={','.join(names)!r}: {', '.join(map(repr, unknown))} not registered for "
                     f"engine {engine!r}; registered stages: {', '.join(registered)}")
  stages = []
  for name in names:
    options = _options(config, name)
    try:
      stages.append(get(engine, name)(**options))
    except TypeError as e:
      raise TypeError(f"config.{name}: options {sorted(options)} do not fit stage {engine}.{name}: {e}") from None
  return Pipeline(engine, names, tuple(stages))


# --- results and verification entries -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Check:
  """One verification: what was compared with what, the measured value, the bound, and whether it held."""

  name: str
  what: str
  value: float
  bound: float
  passed: bool

  def line(self) -> str:
    return f"[{'PASS' if self.passed else 'FAIL'}] {self.name}: {self.what} (measured {self.value:.6g}, " \
           f"bound {self.bound:.6g})"


def check(name: str, what: str, value: float, bound: float, *, at_least: bool = False) -> Check:
  """``value <= bound`` (or ``>=`` with ``at_least``); NaN never passes."""
  value, bound = float(value), float(bound)
  passed = value >= bound if at_least else value <= bound
  return Check(name, what, value, bound, bool(passed and np.isfinite(value)))


def with_result(state: State, key: str, value: Any) -> State:
  return {**state, "results": {**state.get("results", {}), key: value}}


def with_check(state: State, entry: Check) -> State:
  return {**state, "checks": tuple(state.get("checks", ())) + (entry,)}


def to_builtin(value: Any) -> Any:
  """JSON-ready copy: arrays to lists, numpy scalars to Python numbers, dataclasses to dicts."""
  if dataclasses.is_dataclass(value) and not isinstance(value, type):
    return {f.name: to_builtin(getattr(value, f.name)) for f in dataclasses.fields(value)}
  if isinstance(value, Mapping):
    return {str(k): to_builtin(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [to_builtin(v) for v in value]
  if hasattr(value, "__array__") and not isinstance(value, (str, bytes)):
    array = np.asarray(value)
    return array.item() if array.ndim == 0 else array.tolist()
  if isinstance(value, (np.generic,)):
    return value.item()
  return value


@dataclasses.dataclass(frozen=True)
class EngineReport:
  """What an engine computed (``results``), what was checked (``verification``), and notes on its inputs."""

  engine: str
  stages: tuple[str, ...]
  results: dict[str, Any]
  verification: tuple[Check, ...]
  notes: tuple[str, ...] = ()
  seconds: float = 0.0

  @property
  def passed(self) -> bool:
    return all(c.passed for c in self.verification)

  def to_dict(self) -> dict[str, Any]:
    out = to_builtin(self)
    out["passed"] = self.passed
    return out

  def to_json(self, **kwargs: Any) -> str:
    return json.dumps(self.to_dict(), **kwargs)


def run(config: Any, progress: Callable[[str, int, int], None] | None = None) -> EngineReport:
  """Builds ``config``'s pipeline, runs it from an empty state and reports it under ``config.engine``."""
  start = time.perf_counter()
  pipe = build(config)
  state = pipe({}, progress=progress)
  return report(config.engine, pipe.names, state, time.perf_counter() - start)


def report(engine: str, stages: Sequence[str], state: State, seconds: float) -> EngineReport:
  return EngineReport(engine=engine, stages=tuple(stages), results=dict(state.get("results", {})),
                      verification=tuple(state.get("checks", ())), notes=tuple(state.get("notes", ())),
                      seconds=seconds)
