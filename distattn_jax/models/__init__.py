"""Models built from the attention layers; they know nothing of data or training."""

from distattn_jax.models.encoders import Encoder
from distattn_jax.models.sampling import generate, sample_logits
from distattn_jax.models.truthgpt import TruthGPT, TruthGPTConfig, count_params

__all__ = ["Encoder", "TruthGPT", "TruthGPTConfig", "count_params", "generate", "sample_logits"]
