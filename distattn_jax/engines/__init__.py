"""Optimization engines: pipelines of small pure stages from a registry, built from configs."""

from distattn_jax.engines import allocation, pipeline
from distattn_jax.engines.pipeline import (Check, EngineReport, Pipeline, available, build, chain, register)
