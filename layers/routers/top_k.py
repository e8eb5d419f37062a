"""Token-choice top-k routing: Switch top-1, GShard/Mixtral top-k, aux-loss-free balancing.

Einsum letters: ``T`` tokens, ``D`` embed, ``E`` experts, ``K`` experts per token, ``G`` routing
groups, ``S`` group size.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from routezoo.layers.routers.base import Router, Routing, _num_groups, check_k, load_balance_loss, routing_stats, top_k
from routezoo.layers.routers.base import register


Array = jax.Array


@register("top_k")
class TopKRouter(Router):
    """Token choice: each token picks its ``k`` highest-scoring experts.

    * ``k = 1`` is Switch Transformers (Fedus et al. 2021): the combine weight is the raw
      probability ``p_e*`` (never renormalised; renormalising a single weight makes it
      the constant 1 and gives the router zero gradient).
    * ``k >= 2`` is GShard (Lepikhin et al. 2020) / Mixtral top-k; with ``renormalize``
      the selected weights are divided by their sum.
    * Losses: Switch load balancing (``load_balance_coef``) and ST-MoE z-loss
      (``z_loss_coef``), see the module docstring.
    * ``bias_update_rate > 0``: auxiliary-loss-free balancing (DeepSeek-V3, 2024). A
      per-expert bias ``b`` in the non-parameter collection ``'router_state'`` is added
      to the probabilities for *selection only* (weights stay the raw probabilities);
      in training, when ``'router_state'`` is mutable, it is updated outside the gradient
      by ``b_e += rate · sign(mean_load - load_e)`` from this batch's token counts.
      DeepSeek-V3 adds the bias to sigmoid affinities; here it is added to softmax
      probabilities, which live on the same ``[0, 1]`` scale.
    * ``batch_prioritized``: batch-prioritised routing (Riquelme et al. 2021, V-MoE; Switch
      ``tokens_choose`` configs): capacity buffers are filled in order of each token's
      top-1 probability instead of sequence order (sets ``Routing.priority``).
    """

    k: int = 2
    renormalize: bool = True
    load_balance_coef: float = 0.0
    bias_update_rate: float = 0.0
    batch_prioritized: bool = False

    @nn.compact
    def __call__(self, x: Array, *, deterministic: bool, group_size: int | None = None) -> Routing:
        # x: [T, D]
        num_tokens, num_experts = x.shape[0], self.num_experts
        g, s = _num_groups(num_tokens, group_size)
        logits = self.router_logits(x, deterministic)  # [T, E]
        probs = jax.nn.softmax(logits, axis=-1)  # [T, E]

        scores = probs
        if self.bias_update_rate > 0:
            bias = self.variable("router_state", "bias", jnp.zeros, (num_experts,), jnp.float32)
            scores = probs + jax.lax.stop_gradient(bias.value)[None, :]
        _, indices = top_k(scores, self.k)  # [T, K]
        weights = jnp.take_along_axis(probs, indices, axis=-1)  # [T, K]
        if self.k > 1 and self.renormalize:
            weights = weights / jnp.sum(weights, axis=-1, keepdims=True)

        losses, stats = self.balance_losses(logits, probs, indices, g, s)

        if (self.bias_update_rate > 0 and not deterministic and not self.is_initializing()
                and self.is_mutable_collection("router_state")):
            load = jnp.sum(jax.nn.one_hot(indices, num_experts, dtype=jnp.float32), axis=(0, 1))  # [E] copies per expert
            step = self.bias_update_rate * jnp.sign(jnp.mean(load) - load)
            bias.value = bias.value + jax.lax.stop_gradient(step)

        priority = probs.max(axis=-1) if self.batch_prioritized else None  # [T]
        return Routing(indices=indices.astype(jnp.int32), weights=weights.astype(jnp.float32),
                       losses=losses, stats=stats, priority=priority)

    def balance_losses(self, logits: Array, probs: Array, indices: Array, g: int, s: int):
        """z-loss, the Switch load-balance loss of ``probs [T, E]`` against the chosen
        ``indices [T, K]`` per group (``T = g·s``), and the routing statistics."""
        e = probs.shape[-1]
        expert_mask = jnp.max(jax.nn.one_hot(indices, e, dtype=jnp.float32), axis=1)  # [T, E]
        lb = load_balance_loss(probs.reshape(g, s, e), expert_mask.reshape(g, s, e))
        losses, stats = self.z_losses(logits)
        if self.load_balance_coef > 0:
            losses["load_balance"] = self.load_balance_coef * lb
        stats["load_balance_loss"] = lb
        stats.update(routing_stats(indices, probs, e))
        return losses, stats

    @classmethod
    def from_config(cls, moe_cfg: Any, **kwargs) -> "TopKRouter":
        return cls(**cls.common_kwargs(moe_cfg), k=int(moe_cfg.k),
                   renormalize=bool(moe_cfg.renormalize),
                   load_balance_coef=float(moe_cfg.load_balance_coef),
                   bias_update_rate=float(moe_cfg.bias_update_rate),
                   batch_prioritized=bool(moe_cfg.batch_prioritized), **kwargs)

    @classmethod
    def check_config(cls, moe_cfg: Any, *, causal: bool) -> None:
        super().check_config(moe_cfg, causal=causal)
        check_k(moe_cfg)
