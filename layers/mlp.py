"""Dense feed-forward blocks: SwiGLU, GeGLU, GELU, ReLU.

Einsum letters: ``B`` batch, ``L`` length, ``D`` embed, ``F`` mlp.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import linen as nn

from routezoo.layers.adapters.hooks import project
from routezoo.layers.sharding import constrain, param
from routezoo.layers.sharding import default_kernel_init

Dtype = Any


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": nn.gelu,
    "relu": nn.relu,
    "silu": nn.silu,
}
MLP_TYPES = ("swiglu", "geglu", "gelu", "relu")


class MLP(nn.Module):
    """Feed-forward block: gated (SwiGLU, GeGLU; Shazeer, 2020) or plain (GELU, ReLU)."""

    hidden_dim: int
    mlp_type: str = "swiglu"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        # x: [B, L, D]
        if self.mlp_type not in MLP_TYPES:
            raise ValueError(f"unknown mlp_type {self.mlp_type!r}; allowed: {', '.join(MLP_TYPES)}")
        d, f = x.shape[-1], self.hidden_dim
        w_in = self.param("wi", param(default_kernel_init, ("embed", "mlp")), (d, f), self.param_dtype)
        hid = project(self, "wi", "...D,DF->...F", x, jnp.asarray(w_in, self.dtype))
        if self.mlp_type in ("swiglu", "geglu"):
            w_gate = self.param("wg", param(default_kernel_init, ("embed", "mlp")), (d, f), self.param_dtype)
            gate = project(self, "wg", "...D,DF->...F", x, jnp.asarray(w_gate, self.dtype))
            act = nn.silu if self.mlp_type == "swiglu" else nn.gelu
            hid = act(gate) * hid
        else:
            hid = ACTIVATIONS[self.mlp_type](hid)
        hid = constrain(hid, ("batch", "length", "act_mlp"))
        w_out = self.param("wo", param(default_kernel_init, ("mlp", "embed")), (f, d), self.param_dtype)
        y = project(self, "wo", "...F,FD->...D", hid, jnp.asarray(w_out, self.dtype))
        return constrain(y, ("batch", "length", "act_embed"))
