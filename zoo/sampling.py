"""Autoregressive sampling for the zoo's decoder LMs (no KV cache: for small models).

The whole sequence buffer ``[B, P + N]`` goes through the model at every step; causal
attention makes the not-yet-written positions irrelevant, so shapes stay static and the
loop compiles once.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import linen as nn


@functools.partial(jax.jit, static_argnames=("model", "num_tokens", "top_k"))
def sample(model: nn.Module, variables, prompt: jax.Array, rng: jax.Array, *, num_tokens: int,
           temperature: float = 1.0, top_k: int = 0) -> jax.Array:
    """Continues ``prompt: int32[B, P]`` by ``num_tokens`` tokens; returns ``[B, P + N]``.

    ``temperature == 0`` is greedy decoding; ``top_k > 0`` samples from the k most likely.
    """
    b, p = prompt.shape
    buf = jnp.concatenate([prompt, jnp.zeros((b, num_tokens), prompt.dtype)], axis=1)

    def body(t, carry):
        buf, rng = carry
        logits, _ = model.apply(variables, buf, deterministic=True)
        logits = jax.lax.dynamic_index_in_dim(logits, t - 1, axis=1, keepdims=False)   # [B, V]
        if top_k:
            kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
            logits = jnp.where(logits < kth, -jnp.inf, logits)
        rng, key = jax.random.split(rng)
        greedy = jnp.argmax(logits, axis=-1)
        drawn = jax.random.categorical(key, logits / jnp.maximum(temperature, 1e-6), axis=-1)
        tok = jnp.where(temperature > 0, drawn, greedy).astype(buf.dtype)
        return jax.lax.dynamic_update_index_in_dim(buf, tok, t, axis=1), rng

    buf, _ = jax.lax.fori_loop(p, p + num_tokens, body, (buf, rng))
    return buf
