"""Decoder-only Transformer language model whose feed-forward slot is chosen per layer.

Einsum letters: ``B`` batch, ``L`` length, ``D`` embed, ``V`` vocab.

Each block is pre-norm: ``x + Attn(Norm(x))`` then ``x + FFN(Norm(x))``. The FFN of layer
``i`` is built by :data:`FFN_BUILDERS` from ``ffn_kinds[i]`` (``"mlp"`` or ``"moe"``), so new
feed-forward kinds plug in by registering a builder, without editing the model.

The model returns ``(logits, aux)`` with ``aux = {'losses': {name: scalar}, 'stats':
{name: array}}``: loss terms that the training loop adds to the cross-entropy (summed
over layers, already scaled) and statistics it logs (per layer, ``layer{i}/{name}``).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import linen as nn

from routezoo.layers import dense

Aux = dict[str, dict[str, jax.Array]]
FFN = Callable[..., tuple[jax.Array, Aux]]


def _mlp_builder(cfg: Any, dtype, param_dtype, name: str) -> FFN:
    mlp = dense.MLP(hidden_dim=cfg.mlp_dim, mlp_type=cfg.mlp_type, dtype=dtype,
                    param_dtype=param_dtype, name=name)
    return lambda h, deterministic: (mlp(h), {})


def _moe_builder(cfg: Any, dtype, param_dtype, name: str) -> FFN:
    from routezoo.layers.moe import moe_from_config  # the MoE layer is optional for dense models
    return moe_from_config(cfg.moe, d_model=cfg.d_model, dtype=dtype, param_dtype=param_dtype, name=name)


# name -> builder(model_cfg, dtype, param_dtype, name) -> ffn; ffn(h, deterministic=) -> (y, aux).
FFN_BUILDERS: dict[str, Callable[..., FFN]] = {"mlp": _mlp_builder, "moe": _moe_builder}


def ffn_kinds(cfg: Any) -> tuple[str, ...]:
    """Feed-forward kind of each layer from ``model.ffn`` (and ``model.moe.every``)."""
    n = cfg.num_layers
    spec = str(cfg.ffn)
    if "," in spec:
        kinds = tuple(s.strip() for s in spec.split(","))
        if len(kinds) != n:
            raise ValueError(f"model.ffn lists {len(kinds)} kinds but model.num_layers is {n}")
    elif spec == "moe":
        every = int(cfg.moe.every)
        if every < 1:
            raise ValueError(f"model.moe.every must be >= 1, got {every}")
        # MoE in layers every-1, 2*every-1, ... (the last of each group), as Switch/GShard do.
        kinds = tuple("moe" if (i + 1) % every == 0 else "mlp" for i in range(n))
    else:
        kinds = (spec,) * n
    bad = sorted({k for k in kinds if k not in FFN_BUILDERS})
    if bad:
        raise ValueError(f"unknown feed-forward kind {bad[0]!r} in model.ffn; allowed: "
                         f"{', '.join(FFN_BUILDERS)} (or a comma-separated list, one per layer)")
    return kinds


def resolve_dtype(name: str) -> Any:
    if name == "auto":
        return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    try:
        return jnp.dtype(name)
    except TypeError as e:
        raise ValueError(f"unknown dtype {name!r}; allowed: auto, bfloat16, float32") from e


class Block(nn.Module):
    cfg: Any
    ffn_kind: str
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x, positions, deterministic: bool):
        c = self.cfg
        norm = lambda name: dense.make_norm(c.norm, c.norm_eps, self.dtype, self.param_dtype, name)
        h = norm("attn_norm")(x)
        x = x + dense.Attention(
            num_heads=c.num_heads, num_kv_heads=c.num_kv_heads, head_dim=c.head_dim,
            rope_theta=c.rope_theta, causal=True, implementation=c.attention_impl,
            dtype=self.dtype, param_dtype=self.param_dtype,
            qkv_bias=bool(c.get("qkv_bias", False)), qk_norm=str(c.get("qk_norm", "none")),
            qk_norm_eps=float(c.norm_eps), name="attn")(h, positions)
        h = norm("ffn_norm")(x)
        ffn = FFN_BUILDERS[self.ffn_kind](c, self.dtype, self.param_dtype, self.ffn_kind)
        y, aux = ffn(h, deterministic=deterministic)
        return x + y, aux


class DecoderLM(nn.Module):
    """Decoder-only LM: ``tokens [B, L] -> (logits [B, L, V] float32, aux)``."""

    cfg: Any

    @nn.compact
    def __call__(self, tokens: jax.Array, *, deterministic: bool = True,
                 positions: jax.Array | None = None) -> tuple[jax.Array, Aux]:
        c = self.cfg
        dtype, param_dtype = resolve_dtype(c.dtype), jnp.dtype(c.param_dtype)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        embed = dense.Embed(c.vocab_size, c.d_model, dtype=dtype, param_dtype=param_dtype,
                            scale_attend=bool(c.get("scale_tied_logits", True)), name="embed")
        x = embed(tokens)
        losses: dict[str, jax.Array] = {}
        stats: dict[str, jax.Array] = {}
        for i, kind in enumerate(ffn_kinds(c)):
            x, aux = Block(c, kind, dtype, param_dtype, name=f"layer{i}")(x, positions, deterministic)
            for k, v in aux.get("losses", {}).items():
                losses[k] = losses.get(k, 0.0) + v
            for k, v in aux.get("stats", {}).items():
                stats[f"layer{i}/{k}"] = v
        x = dense.make_norm(c.norm, c.norm_eps, dtype, param_dtype, "final_norm")(x)
        if c.tie_embeddings:
            logits = embed.attend(x)
        else:
            w = self.param("unembed", dense.param(nn.initializers.normal(c.d_model ** -0.5), ("embed", "vocab")),
                           (c.d_model, c.vocab_size), param_dtype)
            logits = jnp.einsum("BLD,DV->BLV", x, jnp.asarray(w, dtype))
        return logits.astype(jnp.float32), {"losses": losses, "stats": stats}
