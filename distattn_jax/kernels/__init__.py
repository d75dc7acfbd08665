"""Attention kernels. Importing this package registers every kernel with :mod:`.registry`."""

from distattn_jax.kernels import base, blockwise, dropout, reference, ring
from distattn_jax.kernels.base import Capabilities, Kernel, Request
from distattn_jax.kernels.blockwise import Blockwise
from distattn_jax.kernels.common import AttentionResult, Dropout, Segments
from distattn_jax.kernels.reference import Reference
from distattn_jax.kernels.ring import Ring
from distattn_jax.kernels.registry import available, get, register

__all__ = ["AttentionResult", "Blockwise", "Capabilities", "Dropout", "Kernel", "Reference", "Request", "Ring",
           "Segments", "available", "base", "blockwise", "dropout", "get", "reference", "register", "ring"]
