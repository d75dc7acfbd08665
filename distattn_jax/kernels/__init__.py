"""Attention kernels. Importing this package registers every kernel with :mod:`.registry`."""

from distattn_jax.kernels import base, blockwise, dropout, evidence, pallas_gpu, reference, ring, routed, tiles
from distattn_jax.kernels.base import Capabilities, Kernel, Request
from distattn_jax.kernels.blockwise import Blockwise
from distattn_jax.kernels.common import AttentionResult, Dropout, Segments
from distattn_jax.kernels.pallas_gpu import Pallas
from distattn_jax.kernels.reference import Reference
from distattn_jax.kernels.ring import Ring
from distattn_jax.kernels.routed import Routed
from distattn_jax.kernels.registry import available, get, register

__all__ = ["AttentionResult", "Blockwise", "Capabilities", "Dropout", "Kernel", "Pallas", "Reference", "Request",
           "Ring", "Routed", "Segments", "available", "base", "blockwise", "dropout", "evidence", "get", "pallas_gpu",
           "reference", "register", "ring", "routed", "tiles"]
