"""Optimization engines: pipelines of small pure stages from a registry, built from configs.

* ``neural``: the TruthGPT model's own optimization (kernel, bf16, remat, jit, lam calibration; presets
  basic / advanced / full);
* ``quantum``: QAOA MaxCut, VQE and a variational classifier on ``statevector``, a JAX statevector
  simulator;
* ``allocation``: budget allocation over Hill response curves, the core of ``marketing`` and ``business``.

Every engine returns an :class:`EngineReport` whose ``verification`` entries say what was checked against which
independent answer, and whether it held. :class:`TruthGPTCompleteSystem` runs them together.

Needs the ``engines`` extra (``pip install 'distattn_jax[engines]'``, which includes ``train``); without it this
import is an ImportError that says so.
"""

from distattn_jax import extras

extras.require("distattn_jax.engines", "engines")

# pylint: disable=wrong-import-position
from distattn_jax.engines import allocation, business, marketing, neural, pipeline, quantum, statevector
from distattn_jax.engines.pipeline import (Check, EngineReport, Pipeline, available, build, chain, register)
from distattn_jax.engines.system import TruthGPTCompleteSystem, default_config

__all__ = ["Check", "EngineReport", "Pipeline", "TruthGPTCompleteSystem", "allocation", "available", "build",
           "business", "chain", "default_config", "marketing", "neural", "pipeline", "quantum", "register",
           "statevector"]
