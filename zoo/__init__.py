"""routezoo.zoo: models built from routezoo layers, by name.

``build(config.model)`` returns the Flax module for ``config.model.name``;
``count_params`` and ``flops_per_token`` give the figures logged at the start of a run.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from flax import linen as nn

from routezoo.zoo.encoder import EncoderMLM
from routezoo.zoo.encoder_decoder import EncoderDecoderLM
from routezoo.zoo.lm import DecoderLM, ffn_kinds
from routezoo.zoo.hf import from_hf, to_hf

MODELS: dict[str, Callable[[Any], nn.Module]] = {
    "decoder_lm": lambda cfg: DecoderLM(cfg),
    "encoder_mlm": lambda cfg: EncoderMLM(cfg),   # bidirectional, masked-token objective
    "encoder_decoder": lambda cfg: EncoderDecoderLM(cfg),   # T5 / Switch Transformers, seq2seq objective
}


MODEL_CLASSES: dict[str, type] = {"decoder_lm": DecoderLM, "encoder_mlm": EncoderMLM,
                                  "encoder_decoder": EncoderDecoderLM}


def model_class(model_cfg: Any) -> type:
    """The model class of ``model_cfg.name``; ``ValueError`` lists the known names."""
    name = model_cfg.name
    if name not in MODEL_CLASSES:
        raise ValueError(f"unknown model {name!r}; allowed: {', '.join(sorted(MODEL_CLASSES))}")
    return MODEL_CLASSES[name]


def build(model_cfg: Any) -> nn.Module:
    """The Flax module for ``model_cfg.name``; ``ValueError`` lists the known names."""
    name = model_cfg.name
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; allowed: {', '.join(sorted(MODELS))}")
    # A frozen config is hashable, so the module can be a static argument of jax.jit.
    return MODELS[name](ml_collections.FrozenConfigDict(model_cfg))


def count_params(params: Any, model_cfg: Any, seq_len: int | None = None) -> tuple[int, int]:
    """(total, active per token) parameter counts.

    ``params`` may be boxed (``nn.LogicallyPartitioned``) or abstract shapes. A parameter
    whose first logical axis is ``expert`` counts toward the active total in the proportion
    the router gives (:meth:`~routezoo.layers.routers.base.Router.active_expert_fraction`:
    ``k / num_experts`` for top-k; ``k / (E + m)`` with ``m`` null experts; ``S / M`` for
    Soft MoE's slots over a group of ``M`` tokens).
    """
    total, active = 0, 0.0
    for _, size, act in param_sizes(params, model_cfg, seq_len):
        total += size
        active += act
    return total, int(round(active))


def param_sizes(params: Any, model_cfg: Any, seq_len: int | None = None):
    """``(path, size, active size)`` of every parameter (see :func:`count_params`)."""
    leaves = jax.tree_util.tree_leaves_with_path(
        params, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    moe = getattr(model_cfg, "moe", None)
    frac = 1.0
    if moe is not None and moe.num_experts:
        from routezoo.layers.routers import ROUTERS
        router = ROUTERS.get(str(moe.router))
        frac = (router.active_expert_fraction(moe, seq_len) if router is not None
                else moe.k / moe.num_experts)
    for path, leaf in leaves:
        names = leaf.names if isinstance(leaf, nn.LogicallyPartitioned) else ()
        if names and names[0] == "layers":   # a scanned stack: [R, ...] of R layers
            names = names[1:]
        value = leaf.value if isinstance(leaf, nn.LogicallyPartitioned) else leaf
        size = int(np.prod(value.shape))
        keys = tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
        yield keys, size, size * (frac if names and names[0] == "expert" else 1.0)


def flops_per_token(model_cfg: Any, seq_len: int, active_params: int,
                    params: Any = None) -> dict[str, float]:
    """Forward and training FLOPs per token (PaLM appendix B convention).

    Forward: ``2·N`` for the matmuls of the N active non-embedding parameters, plus the
    unembedding ``2·D·V``, plus attention ``4·layers·H·K·L`` (scores and values, full
    length, no causal discount); multi-token prediction (``model.mtp_depth``) adds one
    unembedding and one attention layer per depth (its blocks' parameters are in ``N``).
    Training is three times the forward. The encoder-decoder
    (``model.name='encoder_decoder'``) needs ``params`` and counts each stack on its own
    part of the row (:func:`routezoo.zoo.encoder_decoder.flops_per_token`).
    """
    c = model_cfg
    if c.name == "encoder_decoder":
        if params is None:
            raise ValueError("flops_per_token: the encoder-decoder needs params (its stacks see "
                             "different parts of a row)")
        from routezoo.zoo.encoder_decoder import flops_per_token as seq2seq_flops
        return seq2seq_flops(params, c, seq_len)
    embed = c.vocab_size * c.d_model
    n_matmul = active_params - embed * (1 if c.tie_embeddings else 2)
    heads = 1 + int(c.get("mtp_depth", 0) or 0)   # the output head runs once per MTP depth too
    fwd = 2.0 * n_matmul + heads * 2.0 * c.d_model * c.vocab_size \
        + 4.0 * (c.num_layers + heads - 1) * c.num_heads * c.head_dim * seq_len
    return {"forward": fwd, "train": 3.0 * fwd}


__all__ = ["MODELS", "MODEL_CLASSES", "build", "model_class", "count_params", "param_sizes", "flops_per_token", "ffn_kinds", "DecoderLM", "EncoderMLM", "EncoderDecoderLM",
           "from_hf", "to_hf"]
