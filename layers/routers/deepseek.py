"""DeepSeek-V3 routing (sigmoid affinities, group-limited top-k, a selection-only bias) and
DeepSeek-V2 routing (softmax scores, group-limited greedy top-k, no bias).

Einsum letters: ``T`` tokens, ``D`` embed, ``E`` experts, ``K`` experts per token,
``g`` expert groups (``n_group``), ``J`` experts per group (``E / g``), ``G`` routing
groups and ``S`` group size (``T = G·S``, for the load-balancing statistic only).

DeepSeek-AI (2024), "DeepSeek-V3 Technical Report" (and "DeepSeek-V2", 2024, for
device/group-limited routing). :class:`DeepSeekV3Router` (``moe.router='deepseek_v3'``):

    s      = sigmoid(x @ W)                           [T, E] affinities, float32
    c      = s + b                                    selection scores (b: correction bias)
    group  = sum of the top-2 c of each of g groups   [T, g]
    keep the topk_group best groups; top-k of c over their experts -> indices [T, K]
    w      = s[indices] (/ (sum + 1e-20) if renormalize) · routed_scaling_factor

The bias ``b`` only chooses experts; the weights are the raw affinities. This matches
the Hugging Face ``transformers`` DeepseekV3TopkRouter (including the ``1e-20`` in the
denominator and renormalising even for ``k = 1``, unlike :class:`TopKRouter`).

Deviation (documented choice): the correction bias is the parameter ``score_bias`` ``[E]``
(float32, replicated: logical names ``(None,)``) of the ``'params'`` collection, read through
``stop_gradient`` (it gets no gradient), so that imported checkpoints carry it in and
out with the other parameters (``zoo/hf/families/deepseek.py``'s ``e_score_correction_bias``). The paper
updates it online (``b_e += γ·sign(mean load − load_e)``); that update is not done
here, and ``moe.bias_update_rate > 0`` is refused with this router (use
``moe.router='top_k'`` with ``bias_update_rate`` for online aux-loss-free balancing).
Being 1-D, the bias is outside the default ``'matrices'`` weight-decay mask; with
``optimizer.weight_decay_mask='all'`` decoupled weight decay would shrink it.

:class:`DeepSeekV2Router` (``moe.router='deepseek_v2'``; DeepSeek-AI 2024, "DeepSeek-V2: A
Strong, Economical, and Efficient Mixture-of-Experts Language Model", arXiv 2405.04434,
section 2.2 (DeepSeekMoE): token-to-expert affinities ``s = Softmax(u^T e)`` and device-limited
routing, which the released checkpoints express as ``topk_method``)::

    s      = softmax(x @ W)                           [T, E] scores, float32
    group  = max of s over each of g groups           [T, g]   (n_group > 1: 'group_limited_greedy')
    keep the topk_group best groups; top-k of s over their experts -> indices [T, K]
                                                      (n_group = 1: 'greedy', plain top-k)
    w      = s[indices] (/ (sum + 1e-20) if renormalize) · routed_scaling_factor

It matches the Hugging Face ``transformers`` DeepseekV2TopkRouter, which never
renormalises (``norm_topk_prob`` is not read there; ``zoo/hf/families/deepseek.py`` refuses it). It reads the
same keys as ``deepseek_v3`` (``moe.deepseek_v3_n_group``, ``deepseek_v3_topk_group``,
``deepseek_v3_scaling_factor``). Masked groups' experts get ``-inf`` for selection
(transformers sets their scores to 0, the same choice while ``k`` experts remain, which
:meth:`DeepSeekV3Router.check_config` requires).

Losses/stats: the Switch load-balancing loss (``load_balance_coef``) and the statistics
use the affinities normalised over experts, ``s / Σ_e s`` (DeepSeek-V3's
complementary sequence-wise loss normalises them the same way; its loss form differs
and is not implemented), with ``deepseek_v2`` the softmax scores (DeepSeek-V2's
expert-level balance loss is the Switch loss up to its constant; its device- and
communication-balance losses are not implemented); the z-loss is on the logits ``x @ W``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import linen as nn

from routezoo.layers import sharding
from routezoo.layers.routers.base import Routing, check_k, top_k
from routezoo.layers.routers.top_k import TopKRouter
from routezoo.layers.routers.base import _num_groups
from routezoo.layers.routers.base import register

Array = jax.Array


@register("deepseek_v3")
class DeepSeekV3Router(TopKRouter):
    """DeepSeek-V3 router (see the module docstring). ``renormalize`` is
    ``norm_topk_prob``; ``n_group = 1`` is plain top-k over all experts."""

    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0

    min_group_size: ClassVar[int] = 2          # the group score sums each group's top-2
    # also read by deepseek_v2 (n_group 1: 'greedy', > 1: 'group_limited_greedy')
    config_keys: ClassVar[dict[str, Any]] = {
        "deepseek_v3_n_group": 1,          # expert groups g (E divisible by g); 1 = plain top-k
        "deepseek_v3_topk_group": 1,       # groups kept per token (by the sum of each group's top-2 scores)
        "deepseek_v3_scaling_factor": 1.0,  # routed_scaling_factor multiplying the combine weights
    }

    @nn.compact
    def __call__(self, x: Array, *, deterministic: bool, group_size: int | None = None) -> Routing:
        # x: [T, D]
        t, e = x.shape[0], self.num_experts
        g, s = _num_groups(t, group_size)
        logits = self.router_logits(x, deterministic)                          # [T, E]
        scores = jax.nn.sigmoid(logits)                                        # [T, E]
        bias = self.param("score_bias", sharding.param(nn.initializers.zeros, (None,)), (e,), jnp.float32)
        choice = scores + jax.lax.stop_gradient(bias)[None, :]                 # [T, E]
        # a group's score: the sum of its two best biased scores
        indices, weights = self.select(choice, scores, lambda c: jnp.sum(top_k(c, 2)[0], axis=-1))

        probs = scores / jnp.sum(scores, axis=-1, keepdims=True)              # [T, E]
        losses, stats = self.balance_losses(logits, probs, indices, g, s)
        return Routing(indices=indices.astype(jnp.int32), weights=weights.astype(jnp.float32),
                       losses=losses, stats=stats)

    def select(self, choice: Array, scores: Array, group_score) -> tuple[Array, Array]:
        """Group-limited top-k: keep the ``topk_group`` groups (of ``n_group``) with the best
        ``group_score(choice [T, g, E/g]) -> [T, g]``, take the top ``k`` of ``choice`` in
        them, weight each by its ``scores`` (renormalised if ``renormalize``) times
        ``routed_scaling_factor``. Returns (indices, weights), each ``[T, K]``."""
        t, e = choice.shape
        if self.n_group > 1:
            n, j = self.n_group, e // self.n_group
            _, groups = top_k(group_score(choice.reshape(t, n, j)), self.topk_group)   # [T, topk_group]
            keep = jnp.max(jax.nn.one_hot(groups, n, dtype=bool), axis=1)              # [T, g]
            choice = jnp.where(jnp.repeat(keep, j, axis=1), choice, -jnp.inf)          # [T, E]
        _, indices = top_k(choice, self.k)                                             # [T, K]
        weights = jnp.take_along_axis(scores, indices, axis=-1)                        # [T, K]
        if self.renormalize:
            weights = weights / (jnp.sum(weights, axis=-1, keepdims=True) + 1e-20)
        return indices, weights * self.routed_scaling_factor

    @classmethod
    def from_config(cls, moe_cfg: Any, **kwargs) -> "DeepSeekV3Router":
        return cls(**cls.common_kwargs(moe_cfg), k=int(moe_cfg.k), renormalize=bool(moe_cfg.renormalize),
                   load_balance_coef=float(moe_cfg.load_balance_coef),
                   n_group=int(moe_cfg.deepseek_v3_n_group), topk_group=int(moe_cfg.deepseek_v3_topk_group),
                   routed_scaling_factor=float(moe_cfg.deepseek_v3_scaling_factor), **kwargs)

    @classmethod
    def check_config(cls, moe_cfg: Any, *, causal: bool) -> None:
        super(TopKRouter, cls).check_config(moe_cfg, causal=causal)
        check_k(moe_cfg)
        e, n, tg, k = (int(moe_cfg.num_experts), int(moe_cfg.deepseek_v3_n_group),
                       int(moe_cfg.deepseek_v3_topk_group), int(moe_cfg.k))
        if float(moe_cfg.bias_update_rate) != 0:
            raise ValueError(f"moe.bias_update_rate={moe_cfg.bias_update_rate} must be 0 with "
                             f"moe.router={cls.router_name!r} (no online bias update); use moe.router='top_k' "
                             "for online updates")
        g = cls.min_group_size
        if n < 1 or e % n or (n > 1 and e // n < g):
            raise ValueError(f"moe.deepseek_v3_n_group={n} must be >= 1 and divide moe.num_experts={e} "
                             f"into groups of at least {g} experts (or be 1)")
        if n > 1 and not (1 <= tg <= n and k <= tg * (e // n)):
            raise ValueError(f"moe.deepseek_v3_topk_group={tg} must be in [1, deepseek_v3_n_group={n}] and keep "
                             f"at least moe.k={k} experts ({e // n} per group)")
        if float(moe_cfg.deepseek_v3_scaling_factor) <= 0:
            raise ValueError(f"moe.deepseek_v3_scaling_factor={moe_cfg.deepseek_v3_scaling_factor} must be > 0")


@register("deepseek_v2")
class DeepSeekV2Router(DeepSeekV3Router):
    """DeepSeek-V2 router (see the module docstring): softmax scores, 'greedy' top-k
    (``n_group = 1``) or 'group_limited_greedy' (groups ranked by their best score), no
    correction bias. ``renormalize`` divides the top-k weights by their sum before
    ``routed_scaling_factor``."""

    min_group_size: ClassVar[int] = 1

    @nn.compact
    def __call__(self, x: Array, *, deterministic: bool, group_size: int | None = None) -> Routing:
        # x: [T, D]
        t = x.shape[0]
        g, s = _num_groups(t, group_size)
        logits = self.router_logits(x, deterministic)                          # [T, E]
        scores = jax.nn.softmax(logits, axis=-1)                               # [T, E]
        # a group's score: its best expert's
        indices, weights = self.select(scores, scores, lambda c: jnp.max(c, axis=-1))
        losses, stats = self.balance_losses(logits, scores, indices, g, s)
        return Routing(indices=indices.astype(jnp.int32), weights=weights.astype(jnp.float32),
                       losses=losses, stats=stats)
