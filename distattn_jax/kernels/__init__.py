"""Attention kernels. Importing this package registers every kernel with :mod:`.registry`."""

from distattn_jax.kernels import blockwise, reference
from distattn_jax.kernels.blockwise import Blockwise
from distattn_jax.kernels.common import AttentionResult, Dropout
from distattn_jax.kernels.registry import available, get, register

__all__ = ["AttentionResult", "Blockwise", "Dropout", "available", "blockwise", "get", "reference", "register"]
