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
    return lambda h, deterministic, token_ids=None: (mlp(h), {})


def _moe_builder(cfg: Any, dtype, param_dtype, name: str) -> FFN:
    from routezoo.layers.moe import moe_from_config  # the MoE layer is optional for dense models
    return moe_from_config(cfg.moe, d_model=cfg.d_model, dtype=dtype, param_dtype=param_dtype, name=name)


# name -> builder(model_cfg, dtype, param_dtype, name) -> ffn;
# ffn(h, deterministic=, token_ids=) -> (y, aux); token_ids [B, L] feed token-id routers (hash).
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
    def __call__(self, x, positions, deterministic: bool, token_ids=None):
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
        y, aux = ffn(h, deterministic=deterministic, token_ids=token_ids)
        return x + y, aux


class DecoderLM(nn.Module):
    """Decoder-only LM: ``tokens [B, L] -> (logits [B, L, V] float32, aux)``.

    With the THOR router (``model.moe.router='thor'``, Zuo et al. 2022) and
    ``moe.thor_consistency_coef > 0``, a training call runs the network twice with
    independent expert draws and returns the first pass's logits plus the loss term
    ``thor_consistency = α · mean_tokens ½ Σ_v (p1 − p2)(log p1 − log p2)``. The paper sums
    the term over tokens and adds the second pass's cross-entropy too; here the loop's
    cross-entropy is on the first pass and the term is a per-token mean, so its scale
    does not grow with the batch.
    """

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
        blocks = [Block(c, kind, dtype, param_dtype, name=f"layer{i}") for i, kind in enumerate(ffn_kinds(c))]
        final_norm = dense.make_norm(c.norm, c.norm_eps, dtype, param_dtype, "final_norm")
        unembed = None if c.tie_embeddings else self.param(
            "unembed", dense.param(nn.initializers.normal(c.d_model ** -0.5), ("embed", "vocab")),
            (c.d_model, c.vocab_size), param_dtype)

        def forward():
            x = embed(tokens)
            losses: dict[str, jax.Array] = {}
            stats: dict[str, jax.Array] = {}
            for i, block in enumerate(blocks):
                x, aux = block(x, positions, deterministic, tokens)
                for k, v in aux.get("losses", {}).items():
                    losses[k] = losses.get(k, 0.0) + v
                for k, v in aux.get("stats", {}).items():
                    stats[f"layer{i}/{k}"] = v
            x = final_norm(x)
            logits = embed.attend(x) if unembed is None else jnp.einsum("BLD,DV->BLV", x, jnp.asarray(unembed, dtype))
            return logits.astype(jnp.float32), losses, stats

        logits, losses, stats = forward()
        coef = float(c.moe.get("thor_consistency_coef", 0.0))
        if "moe" in ffn_kinds(c) and c.moe.router == "thor" and coef > 0 and not deterministic \
                and not self.is_initializing():
            logits2, _, _ = forward()          # a second, independent draw of experts
            logp1, logp2 = jax.nn.log_softmax(logits, -1), jax.nn.log_softmax(logits2, -1)
            sym_kl = 0.5 * jnp.sum((jnp.exp(logp1) - jnp.exp(logp2)) * (logp1 - logp2), axis=-1)
            losses["thor_consistency"] = coef * jnp.mean(sym_kl)
        return logits, {"losses": losses, "stats": stats}
