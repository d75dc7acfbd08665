"""Sampling from a :class:`TruthGPT` with its KV cache: one prefill call for the prompt, then one token per step.

Everything is one jitted function: the prompt fills the cache in a single chunk and a ``lax.scan`` appends one
token per step, so generation costs one forward pass over the prompt plus one single-token pass per new token.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from distattn_jax.models.truthgpt import TruthGPT

Array = jax.Array


def sample_logits(logits: Array, rng: Array, temperature: float, top_k: int) -> Array:
  """Draws token ids from ``logits [batch, vocab]``: argmax when ``temperature == 0``, else a softmax sample of
  ``logits / temperature`` restricted to the ``top_k`` largest logits (``top_k = 0``: all of them)."""
  if temperature == 0:
    return jnp.argmax(logits, axis=-1)
  if top_k:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  return jax.random.categorical(rng, logits / temperature, axis=-1)


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "temperature", "top_k"))
def generate(model: TruthGPT, params, prompt: Array, rng: Array, *, max_new_tokens: int, temperature: float = 1.0,
             top_k: int = 0) -> Array:
  """Continues ``prompt [batch, prompt_len]`` by ``max_new_tokens`` tokens; returns ``[batch, max_new_tokens]``.

  ``model`` is the training-time module (``decode=False``); its decoding twin shares the parameters. The cache
  holds ``prompt_len + max_new_tokens`` positions, which must fit ``model.config.max_len`` for learned positions.
  """
  if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
    raise ValueError(f"generate: max_new_tokens must be an int >= 1; got {max_new_tokens!r}")
  if prompt.ndim != 2 or prompt.shape[1] < 1:
    raise ValueError(f"generate: prompt must be token ids of shape [batch, prompt_len >= 1]; got shape "
                     f"{prompt.shape}")
  batch, prompt_len = prompt.shape
  # The cache is sized below for exactly prompt + new tokens, so the decoding loop never reaches the attention
  # layers' runtime check of its end; positions are what must fit, and for learned ones that is max_len.
  total = prompt_len + max_new_tokens
  if model.config.positions == "learned" and total > model.config.max_len:
    raise ValueError(f"generate: prompt ({prompt_len}) + max_new_tokens ({max_new_tokens}) = {total} exceeds "
                     f"model.max_len={model.config.max_len}")
  decoder = model.clone(decode=True)
  # An all-zero cache with index 0 is exactly what init would build, without running the model to get it.
  shapes = jax.eval_shape(decoder.init, jax.random.key(0), jnp.zeros((batch, total), jnp.int32))["cache"]
  cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

  def step(cache, tokens):
    logits, state = decoder.apply({"params": params, "cache": cache}, tokens, mutable=["cache"])
    return state["cache"], logits[:, -1]

  cache, logits = step(cache, prompt)
  rngs = jax.random.split(rng, max_new_tokens)
  first = sample_logits(logits, rngs[0], temperature, top_k)

  def body(carry, rng):
    cache, token = carry
    cache, logits = step(cache, token[:, None])
    token = sample_logits(logits, rng, temperature, top_k)
    return (cache, token), token

  _, rest = jax.lax.scan(body, (cache, first), rngs[1:])
  return jnp.concatenate([first[:, None], rest.T], axis=1)
