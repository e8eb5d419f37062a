"""Token embedding with a tied output projection.

Einsum letters: ``B`` batch, ``L`` length, ``D`` embed, ``V`` vocab.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from routezoo.layers.sharding import constrain, param

Dtype = Any


class Embed(nn.Module):
    """Token embedding ``(V, D)``, initialised with unit variance.

    :meth:`attend` is the tied output projection ``D -> V``, scaled by ``D**-0.5`` (as T5
    does) so that initial logits have unit scale; ``scale_attend=False`` gives the plain
    ``x @ E^T`` of Llama-style models with tied embeddings (imported checkpoints).
    """

    vocab_size: int
    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    scale_attend: bool = True

    def setup(self):
        self.embedding = self.param(
            "embedding", param(nn.initializers.normal(stddev=1.0), ("vocab", "embed")),
            (self.vocab_size, self.features), self.param_dtype)

    def __call__(self, ids: jax.Array) -> jax.Array:
        # ids: [B, L] -> [B, L, D]
        x = jnp.take(jnp.asarray(self.embedding, self.dtype), ids, axis=0)
        return constrain(x, ("batch", "length", "act_embed"))

    def attend(self, x: jax.Array) -> jax.Array:
        # x: [B, L, D] -> logits [B, L, V]
        logits = jnp.einsum("BLD,VD->BLV", x, jnp.asarray(self.embedding, self.dtype))
        if self.scale_attend:
            logits = logits * self.features ** -0.5
        return constrain(logits, ("batch", "length", "act_vocab"))
