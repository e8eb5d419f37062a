"""Expert-choice routing (Zhou et al. 2022): each expert takes its top tokens.

Einsum letters: ``T`` tokens, ``E`` experts, ``C`` capacity, ``G`` routing groups, ``S`` group size.
"""

from __future__ import annotations

from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import linen as nn
from routezoo.layers.routers.base import Router, Routing, _num_groups, expert_capacity, routing_stats, top_k
from routezoo.layers.routers.base import register


Array = jax.Array


@register("expert_choice")
class ExpertChoiceRouter(Router):
    """Expert choice (Zhou et al. 2022): each expert takes its top ``C`` tokens of a group.

    ``C = min(S, max(round(cf·S/E), min_capacity))`` (see :func:`expert_capacity` with
    ``K = 1``), ``cf`` = ``capacity_factor`` in training and ``eval_capacity_factor`` when
    deterministic. A token may be taken by no expert or by many; its combine weight for
    expert ``e`` is its probability ``p_e``. There is no load-balancing loss (balance holds
    by construction); the z-loss applies if ``z_loss_coef > 0``. Non-causal: a token's
    routing depends on later tokens of its group, so it must not be used in decoders.

    The decision is returned expert-major (``expert_indices``/``expert_weights``
    ``[G, E, C]``) and token-major with ``K = E`` (slot ``e`` holds ``e`` or ``-1``).
    """

    capacity_factor: float = 1.0
    eval_capacity_factor: float = 1.0
    min_capacity: int = 0

    causal: ClassVar[bool] = False
    expert_major: ClassVar[bool] = True

    @nn.compact
    def __call__(self, x: Array, *, deterministic: bool, group_size: int | None = None) -> Routing:
        # x: [T, D]
        num_tokens, num_experts = x.shape[0], self.num_experts
        g, s = _num_groups(num_tokens, group_size)
        logits = self.router_logits(x, deterministic)  # [T, E]
        probs = jax.nn.softmax(logits, axis=-1)  # [T, E]
        cf = self.eval_capacity_factor if deterministic else self.capacity_factor
        c = expert_capacity(s, num_experts, 1, cf, self.min_capacity)

        probs_ges = probs.reshape(g, s, num_experts).transpose(0, 2, 1)  # [G, E, S]
        expert_weights, expert_indices = top_k(probs_ges, c)  # [G, E, C]
        gi = jnp.arange(g)[:, None, None]
        ei = jnp.arange(num_experts)[None, :, None]
        chosen = jnp.zeros((g, s, num_experts), bool).at[gi, expert_indices, ei].set(True)  # [G, S, E]
        chosen = chosen.reshape(num_tokens, num_experts)  # [T, E]
        indices = jnp.where(chosen, jnp.arange(num_experts, dtype=jnp.int32)[None, :], -1)  # [T, K=E]
        weights = jnp.where(chosen, probs, 0.0)  # [T, K=E]

        losses, stats = self.z_losses(logits)
        stats.update(routing_stats(indices, probs, num_experts))
        return Routing(indices=indices, weights=weights, losses=losses, stats=stats,
                       expert_indices=expert_indices.astype(jnp.int32),
                       expert_weights=expert_weights.astype(jnp.float32))

    @classmethod
    def from_config(cls, moe_cfg: Any, **kwargs) -> "ExpertChoiceRouter":
        return cls(**cls.common_kwargs(moe_cfg), capacity_factor=float(moe_cfg.capacity_factor),
                   eval_capacity_factor=float(moe_cfg.eval_capacity_factor),
                   min_capacity=int(moe_cfg.min_capacity), **kwargs)

    @classmethod
    def check_config(cls, moe_cfg: Any, *, causal: bool) -> None:
        super().check_config(moe_cfg, causal=causal)
        for key in ("capacity_factor", "eval_capacity_factor"):
            if float(moe_cfg[key]) <= 0:
                raise ValueError(f"moe.{key}={moe_cfg[key]} must be > 0 with "
                                 f"moe.router='expert_choice'")
