"""Autoregressive sampling for the zoo's decoder LMs.

With ``use_cache`` (the default where the model supports it) the prompt runs once through
the model in decode mode, filling each attention layer's key/value cache
(:func:`routezoo.zoo.lm.init_cache`), and every new token costs one position. Without it
(routers without a decode mode, ``moe.router='pregate'`` / ``'uoe'``, or ``use_cache=False``)
the whole sequence buffer ``[B, L + f]`` goes through the model at every step; causal
attention makes the not-yet-written positions irrelevant. Either way shapes stay static and the loop compiles
once, and both draw the same tokens from the same ``rng``. With the cache, a model whose
layers are scanned (``model.scan_layers``) decodes in the unscanned layout, which is about
twice as fast per token (:func:`routezoo.zoo.stack.as_unscanned`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import linen as nn


def supports_cache(model: nn.Module) -> bool:
    """Whether ``model`` has a decode mode: a :class:`~routezoo.zoo.lm.DecoderLM` with causal
    attention whose router, if it has MoE layers, has one
    (:attr:`~routezoo.layers.routers.base.Router.supports_decode`)."""
    from routezoo.layers.routers import ROUTERS, Router
    from routezoo.zoo import ffn_kinds
    c = model.cfg
    if not getattr(model, "causal", False):
        return False
    return "moe" not in ffn_kinds(c) or ROUTERS.get(str(c.moe.router), Router).supports_decode


def _pick(logits: jax.Array, rng: jax.Array, temperature, top_k: int):
    """``(token [B], rng)``: greedy at ``temperature == 0``, else a draw (from the ``top_k``
    most likely if ``top_k > 0``)."""
    if top_k:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    rng, key = jax.random.split(rng)
    greedy = jnp.argmax(logits, axis=-1)
    drawn = jax.random.categorical(key, logits / jnp.maximum(temperature, 1e-6), axis=-1)
    return jnp.where(temperature > 0, drawn, greedy), rng


@functools.partial(jax.jit, static_argnames=("model", "num_tokens", "top_k", "use_cache"))
def sample(model: nn.Module, variables, prompt: jax.Array, rng: jax.Array, *, num_tokens: int,
           temperature: float = 1.0, top_k: int = 0, use_cache: bool | None = None) -> jax.Array:
    """Continues ``prompt: int32[B, L]`` by ``num_tokens`` (``f``) tokens; returns ``[B, L + f]``.

    ``temperature == 0`` is greedy decoding; ``top_k > 0`` samples from the k most likely.
    ``use_cache``: ``None`` = where :func:`supports_cache`.
    """
    b, p = prompt.shape
    buf = jnp.concatenate([prompt, jnp.zeros((b, num_tokens), prompt.dtype)], axis=1)
    if num_tokens <= 0:
        return buf
    if use_cache is None:
        use_cache = supports_cache(model)
    if not use_cache:
        def body(t, carry):
            buf, rng = carry
            logits, _ = model.apply(variables, buf, deterministic=True)
            logits = jax.lax.dynamic_index_in_dim(logits, t - 1, axis=1, keepdims=False)   # [B, V]
            tok, rng = _pick(logits, rng, temperature, top_k)
            return jax.lax.dynamic_update_index_in_dim(buf, tok.astype(buf.dtype), t, axis=1), rng

        buf, _ = jax.lax.fori_loop(p, p + num_tokens, body, (buf, rng))
        return buf

    from routezoo.zoo import stack
    from routezoo.zoo.lm import init_cache
    # A scanned stack decodes through its unscanned twin, the parameters sliced into
    # per-layer form once per call: inside the token loop the scanned form slices every
    # layer's weights and cache again for each token (moe_1b at batch 1 on an H100: 283
    # tokens/s scanned, 582 unscanned; BENCHMARKS.md, decoding). Same function, same tokens.
    model, variables = stack.as_unscanned(model, {k: v for k, v in variables.items() if k != "cache"})

    def step(tokens, cache):   # the logits of the last of ``tokens`` and the extended cache
        (logits, _), state = model.apply({**variables, "cache": cache}, tokens, deterministic=True, decode=True,
                                    mutable=["cache"])
        return logits[:, -1], state["cache"]

    logits, cache = step(prompt, init_cache(model, b, p + num_tokens))
    tok, rng = _pick(logits, rng, temperature, top_k)
    buf = buf.at[:, p].set(tok.astype(buf.dtype))

    def body(t, carry):
        buf, cache, rng = carry
        logits, cache = step(jax.lax.dynamic_slice_in_dim(buf, t - 1, 1, axis=1), cache)
        tok, rng = _pick(logits, rng, temperature, top_k)
        return jax.lax.dynamic_update_index_in_dim(buf, tok.astype(buf.dtype), t, axis=1), cache, rng

    buf, _, _ = jax.lax.fori_loop(p + 1, p + num_tokens, body, (buf, cache, rng))
    return buf
