"""Attention kernels. Importing this package registers every kernel with :mod:`.registry`."""

from distattn_jax.kernels import reference
from distattn_jax.kernels.common import AttentionResult, Dropout
from distattn_jax.kernels.registry import available, get, register

__all__ = ["AttentionResult", "Dropout", "available", "get", "register", "reference"]
