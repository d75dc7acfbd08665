"""distattn_jax: distance-based attention for JAX and Flax.

    logits_ij = -lam * distance(q_i, k_j) / sqrt(d_head);  weights = softmax(logits);  out = weights @ v
"""

from distattn_jax import analysis, initializers, kernels, metrics, nnx
from distattn_jax.attention import checked, distance_attention, make_attention_fn
from distattn_jax.layers import DistanceBasedAttention
from distattn_jax.metrics import DistanceType

__version__ = "0.1.0"

__all__ = ["DistanceBasedAttention", "DistanceType", "analysis", "distance_attention", "initializers", "kernels",
           "make_attention_fn", "metrics", "nnx", "checked"]
