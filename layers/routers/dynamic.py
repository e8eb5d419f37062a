"""Dynamic routers: top-p (a variable number of experts per token) and AdaMoE's null experts.

Einsum letters: ``T`` tokens, ``D`` embed, ``E`` (real) experts, ``z`` null experts,
``K`` slots per token, ``G`` routing groups, ``S`` group size (``T = G·S``).

A token that uses fewer experts than its ``K`` slots has ``-1`` in the unused slots
(weight 0); dispatchers skip them.
"""

from __future__ import annotations

from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import linen as nn

from routezoo.layers.routers.base import Router, Routing, load_balance_loss, routing_stats, top_k
from routezoo.layers.routers.base import _num_groups
from routezoo.layers.routers.base import _learned_logits
from routezoo.layers.routers.base import register

Array = jax.Array


# ------------------------------------------------------------------ top-p


def top_p_mask(sorted_probs: Array, threshold: float) -> Array:
    """Which of the descending-sorted probabilities ``[..., K]`` are kept: the smallest
    prefix whose sum reaches ``threshold`` (``keep_j = Σ_{i<j} p_i < threshold``; the
    first is always kept). If the ``K`` slots do not reach it, all ``K`` are kept."""
    before = jnp.concatenate([jnp.zeros_like(sorted_probs[..., :1]),
                              jnp.cumsum(sorted_probs[..., :-1], axis=-1)], axis=-1)  # Σ_{i<j} p_i
    return before < threshold


@register("top_p")
class TopPRouter(Router):
    """Top-p dynamic routing (Huang et al. 2024, "Harder Tasks Need More Experts: Dynamic
    Routing in MoE Models").

    * ``P = softmax(x W_r)`` (no bias). Sort descending; keep the smallest prefix whose
      cumulative probability reaches ``p`` (``threshold``, ``moe.top_p_threshold``):
      ``t = min{k : Σ_{j<=k} P_(j) >= p}``, experts ``(1)..(t)``.
      The authors' code (``modeling_moe.py`` ``top_p_sampling_batched_all_sequence``)
      keeps up to the first index where the cumulative sum is strictly ``> p``, which
      differs from the paper's ``>= p`` only when a prefix sums to exactly ``p``; the
      paper's rule is implemented.
    * ``y = Σ_kept P_e FFN_e(x)``: weights are the raw probabilities, **not** renormalised
      (so the output scale changes with the number of experts).
    * Static shapes: the top ``K = max_k`` (``moe.top_p_max_k``; 0: ``E``) experts are
      sorted and the slots past ``t`` become ``-1``. A cap ``max_k < E`` truncates tokens
      that would need more.
    * Losses: ``L = L_LM + α L_b + β L_d``. ``L_b`` is the Switch load balance over the
      selected sets (``α`` = ``moe.load_balance_coef``), ``L_d = mean_t (−Σ_e P_e log P_e)``
      the dynamic (entropy-minimising) loss (``β`` = ``entropy_coef``,
      ``moe.top_p_entropy_coef``; the paper's value is unverified here), plus the z-loss
      if ``moe.z_loss_coef > 0``. The released code has no training losses.
    * Stats: ``experts_per_token`` (mean), ``experts_per_token_max``, ``dynamic_loss``.
    """

    threshold: float = 0.4
    max_k: int = 0
    load_balance_coef: float = 0.0
    entropy_coef: float = 0.0

    config_keys: ClassVar[dict[str, Any]] = {
        # smallest expert set with probability >= p, p in (0, 1] (Huang et al. 2024)
        "top_p_threshold": 0.4,
        "top_p_max_k": 0,             # cap on experts per token (static slots); 0 = num_experts
        "top_p_entropy_coef": 1e-4,   # dynamic (router-entropy) loss coefficient beta (value unverified)
    }

    @nn.compact
    def __call__(self, x: Array, *, deterministic: bool, group_size: int | None = None) -> Routing:
        # x: [T, D]
        num_tokens, num_experts = x.shape[0], self.num_experts
        g, s = _num_groups(num_tokens, group_size)
        logits = self.router_logits(x, deterministic)  # [T, E]
        probs = jax.nn.softmax(logits, axis=-1)
        k = int(self.max_k) or num_experts
        sorted_probs, idx = top_k(probs, k)  # [T, K]
        keep = top_p_mask(sorted_probs, self.threshold)  # [T, K]
        indices = jnp.where(keep, idx, -1)
        weights = jnp.where(keep, sorted_probs, 0.0)

        expert_mask = jnp.max(jax.nn.one_hot(indices, num_experts, dtype=jnp.float32), axis=1)  # [T, E]
        lb = load_balance_loss(probs.reshape(g, s, num_experts), expert_mask.reshape(g, s, num_experts))
        logp = jnp.log(jnp.maximum(probs, jnp.finfo(jnp.float32).tiny))
        dynamic = jnp.mean(-jnp.sum(probs * logp, axis=-1))
        losses, stats = self.z_losses(logits)
        if self.load_balance_coef > 0:
            losses["load_balance"] = self.load_balance_coef * lb
        if self.entropy_coef > 0:
            losses["dynamic_loss"] = self.entropy_coef * dynamic
        stats["load_balance_loss"] = lb
        stats["dynamic_loss"] = dynamic
        stats.update(routing_stats(indices, probs, num_experts))
        stats["experts_per_token_max"] = jnp.max(jnp.sum(keep, axis=-1)).astype(jnp.float32)
        return Routing(indices=indices.astype(jnp.int32), weights=weights.astype(jnp.float32),
                       losses=losses, stats=stats)

    @classmethod
    def from_config(cls, moe_cfg: Any, **kwargs) -> "TopPRouter":
        return cls(**cls.common_kwargs(moe_cfg), threshold=float(moe_cfg.top_p_threshold),
                   max_k=int(moe_cfg.top_p_max_k), load_balance_coef=float(moe_cfg.load_balance_coef),
                   entropy_coef=float(moe_cfg.top_p_entropy_coef), **kwargs)

    @classmethod
    def check_config(cls, moe_cfg: Any, *, causal: bool) -> None:
        super().check_config(moe_cfg, causal=causal)
        p = float(moe_cfg.top_p_threshold)
        if not 0.0 < p <= 1.0:
            raise ValueError(f"moe.top_p_threshold={p} must be in (0, 1]")
        e, max_k = int(moe_cfg.num_experts), int(moe_cfg.top_p_max_k)
        if not 0 <= max_k <= e:
            raise ValueError(f"moe.top_p_max_k={max_k} must be between 0 (= num_experts) and "
                             f"moe.num_experts={e}")
        if float(moe_cfg.top_p_entropy_coef) < 0:
            raise ValueError(f"moe.top_p_entropy_coef={moe_cfg.top_p_entropy_coef} must be >= 0")


# ------------------------------------------------------------------ AdaMoE null experts


@register("null_experts")
class NullExpertsRouter(Router):
    """AdaMoE (Zeng et al. 2024, "AdaMoE: Token-Adaptive Routing with Null Experts for
    Mixture-of-Experts Language Models"): ``z`` null experts (output 0, no FLOPs) next to
    the ``E`` real ones, and a larger ``k``; a token that picks nulls runs fewer real
    experts.

    * ``h = x [W_r ; W_null]`` ``[T, E+z]`` (one learned kernel ``(D, E+z)``, columns
      ``E..E+z-1`` are the nulls), ``p = softmax(h)``, top-``k`` over all ``E+z``.
    * Slots that pick a null become ``-1`` with weight 0: they never reach a dispatcher's
      expert computation (dropless ``group_sizes`` count only real copies).
    * Weights (authors' code ``adaptive_moe_utils.py``, as in the paper): the selected
      real experts ``S`` get ``w_e = p_e / Σ_{e'∈S} p_e'`` (renormalised over the selected
      *real* experts only, nulls excluded); if ``S`` is empty the output is 0. With
      ``renormalize = False`` the raw ``p_e`` are used.
    * Load balance over ``E+z`` with the nulls as one pool: Switch's
      ``(E+z) Σ_e f'_e P_e`` per group, where ``f'_e = f_e`` for real experts and, for each
      null, the mean ``f`` of the nulls (authors' ``exp_1``: ``expert_mask[4:] = mean``),
      so only the total null usage is balanced, not how it spreads over the nulls.
      Balanced routing gives ``k``. Coefficient ``moe.load_balance_coef``; z-loss over the
      ``E+z`` logits.
    * Stats: ``real_experts_per_token`` (= ``experts_per_token``), ``null_fraction``
      (fraction of slots on nulls), ``load`` ``[E]`` over real copies.

    The authors' Mixtral fine-tune initialises the null rows by tiling the real rows; here
    all ``E+z`` columns are drawn at init (training from scratch).
    """

    k: int = 2
    num_null_experts: int = 1
    renormalize: bool = True
    load_balance_coef: float = 0.0

    config_keys: ClassVar[dict[str, Any]] = {
        "num_null_experts": 8,        # m null experts (AdaMoE); top-k (moe.k) over E + m
    }

    @nn.compact
    def __call__(self, x: Array, *, deterministic: bool, group_size: int | None = None) -> Routing:
        # x: [T, D]
        num_tokens, e, m = x.shape[0], self.num_experts, self.num_null_experts
        g, s = _num_groups(num_tokens, group_size)
        logits = _learned_logits(self, x, e + m, deterministic)  # [T, E+z]
        probs = jax.nn.softmax(logits, axis=-1)
        sel_probs, idx = top_k(probs, self.k)  # [T, K]
        real = idx < e
        indices = jnp.where(real, idx, -1)
        weights = jnp.where(real, sel_probs, 0.0)
        if self.renormalize:
            denom = jnp.sum(weights, axis=-1, keepdims=True)
            weights = weights / jnp.where(denom > 0, denom, 1.0)

        chosen = jnp.max(jax.nn.one_hot(idx, e + m, dtype=jnp.float32), axis=1)  # [T, E+z]
        null_pool = jnp.broadcast_to(jnp.mean(chosen[:, e:], axis=-1, keepdims=True), (num_tokens, m))
        mask = jnp.concatenate([chosen[:, :e], null_pool], axis=-1)  # [T, E+z]
        lb = load_balance_loss(probs.reshape(g, s, e + m), mask.reshape(g, s, e + m))
        losses, stats = self.z_losses(logits)
        if self.load_balance_coef > 0:
            losses["load_balance"] = self.load_balance_coef * lb
        stats["load_balance_loss"] = lb
        stats.update(routing_stats(indices, probs, e))
        stats["real_experts_per_token"] = stats["experts_per_token"]
        stats["null_fraction"] = jnp.mean((~real).astype(jnp.float32))
        return Routing(indices=indices.astype(jnp.int32), weights=weights.astype(jnp.float32),
                       losses=losses, stats=stats)

    @classmethod
    def active_expert_fraction(cls, moe_cfg: Any, seq_len: int | None = None) -> float:
        """``k / (E + z)``: the real experts a token uses when the load is spread evenly
        over the ``E + z`` experts (the load-balance target), divided by ``E``."""
        return int(moe_cfg.k) / (int(moe_cfg.num_experts) + int(moe_cfg.num_null_experts))

    @classmethod
    def from_config(cls, moe_cfg: Any, **kwargs) -> "NullExpertsRouter":
        return cls(**cls.common_kwargs(moe_cfg), k=int(moe_cfg.k),
                   num_null_experts=int(moe_cfg.num_null_experts),
                   renormalize=bool(moe_cfg.renormalize),
                   load_balance_coef=float(moe_cfg.load_balance_coef), **kwargs)

    @classmethod
    def check_config(cls, moe_cfg: Any, *, causal: bool) -> None:
        super().check_config(moe_cfg, causal=causal)
        m = int(moe_cfg.num_null_experts)
        if m < 1:
            raise ValueError(f"moe.num_null_experts={m} must be >= 1 with moe.router='null_experts'")
        k, e = int(moe_cfg.k), int(moe_cfg.num_experts)
        if not 1 <= k <= e + m:
            raise ValueError(f"moe.k={k} must be between 1 and moe.num_experts + moe.num_null_experts={e + m}")
