"""Soft MoE (Puigcerver, Riquelme, Mustafa, Houlsby 2023/ICLR 2024, "From Sparse to Soft
Mixtures of Experts"): experts process *slots*, weighted mixtures of all tokens of a group.

Einsum letters: ``B`` batch, ``L`` length, ``T`` tokens (``B·L``), ``D`` embed, ``F``
expert_mlp, ``E`` experts, ``C`` capacity (slots per expert and group), ``G`` routing
groups, ``S`` tokens per group (``T = G·S``; one group per sequence by default, so ``G = B``
and ``S = L``).

Per group, with token states ``X [S, D]`` and the learned slot parameters ``Phi [D, E, C]``
(the paper's ``Phi [D, E·C]`` with its slot axis split into experts and slots):

* logits ``= X Phi`` ``[S, E, C]``; with ``normalize`` (the default) ``X`` is L2-normalised
  over ``D`` per token, each slot's ``Phi[:, e, s]`` over ``D``, and the product is
  multiplied by a learned scalar ``scale`` (initialised to 1);
* dispatch weights ``= softmax over S`` (tokens): each slot is a convex mix of its group's
  tokens, ``X~[e, s] = sum_m dispatch[m, e, s] · X[m]`` ``[E, C, D]``;
* every expert ``e`` (stacked :class:`~routezoo.layers.moe.block.Experts`, the same MLP maths
  as the sparse MoE) processes its ``C`` slots: ``Y~[e] = f_e(X~[e])``;
* combine weights ``= softmax over (E, C)`` (slots): each token's output is a convex mix
  of all slot outputs, ``Y[m] = sum_{e,s} combine[m, e, s] · Y~[e, s]``.

Nothing is dropped and there is no auxiliary loss (the paper uses none). Every slot mixes
every token of its group, so the layer is **not causal**: the ``soft`` router is refused
in decoders (``causal = False``) and runs in the encoder (:mod:`routezoo.zoo.encoder`).

Choices and deviations (documented, check them before comparing with the paper):

* ``normalize`` defaults to True. The paper adds the normalisation for stability at
  large ``D`` (the softmax becomes too peaked) and reports little effect at small ``D``
  (from the paper as recalled; its text was not re-read for this implementation, the
  equations were checked against the authors' code); the authors' code (vmoe's Soft MoE
  router) always applies it. ``normalize=False`` gives the plain ``X Phi`` logits.
  The scale multiplies the logits; the authors' code multiplies whichever of ``X`` /
  ``Phi`` is smaller, which is the same product.
* ``slots_per_expert = 0`` (the default) derives ``C = max(1, round(S / E))`` from the
  group size, so the total number of slots ``E·C`` is about the number of tokens, as
  the authors' code does by default (its ``capacity_factor`` 1.0, rounded). ``Phi``'s
  shape then depends on ``S``: a model initialised at one length runs only at lengths
  with the same ``C``; set ``slots_per_expert`` to fix it.
* ``Phi`` is initialised as the other router kernels here (truncated normal, fan-in
  variance times ``init_scale``); vmoe uses LeCun normal. With ``normalize`` only its
  direction matters.
* Routing math (logits, softmaxes) is float32. The two mixing einsums run on the
  compute dtype with float32 accumulation (vmoe runs them in bfloat16 as well).
* ``jitter > 0`` multiplies the router input by ``U(1-eps, 1+eps)`` in training (as the
  other routers here; not in the paper). There is no noise on the logits, the paper's
  default.
* Groups: ``group_size = 0`` is one group per sequence. A positive ``group_size`` splits
  the ``B·L`` tokens into groups of consecutive tokens like the sparse MoE does: a group
  larger than ``L`` mixes several sequences, one smaller splits each sequence. Padding
  tokens are ordinary tokens here (the models have no padding mask).

Sharding: slots ``[G, E, C, D]`` are built with ``G`` on the batch mesh axes, moved so
``E`` is on ``expert`` (``act_expert``, XLA inserts the all-to-all), processed there by
the expert-sharded weights, and moved back, as the capacity buffers of the sparse MoE.

Statistics (``aux['stats']``): ``load`` ``[E]`` (share of the tokens' combine weight that
goes to each expert's slots, sums to 1), ``dispatch_entropy`` (mean over slots of the
entropy, in nats, of its weights over the ``S`` tokens; ``log S`` = uniform mix),
``combine_entropy`` (mean over tokens, over the ``E·C`` slots; ``log E·C`` = uniform),
``slot_load_max`` (the busiest slot's share of the combine weight times ``E·C``; 1 =
every slot used equally), ``dispatch_max`` / ``combine_max`` (mean largest weight of a
slot / of a token), ``slots_per_expert``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import struct
from jax.ad_checkpoint import checkpoint_name

from routezoo.layers.moe.exchange import constrain_expert_parallel
from routezoo.layers.moe.gmm import MOE_GMM_IN, ffn_batched
from routezoo.layers import sharding
from routezoo.layers.moe.block import Experts, _dtype
from routezoo.layers.routers import Router
from routezoo.layers.routers.base import _num_groups
from routezoo.layers.routers.base import register

Array = jax.Array
Dtype = Any


def slots_per_expert(tokens_per_group: int, num_experts: int, slots: int = 0) -> int:
    """``C``: ``slots`` if > 0, else ``max(1, round(S / E))`` (rounded half up)."""
    if slots > 0:
        return int(slots)
    return max(1, int(tokens_per_group / num_experts + 0.5))


def _l2_normalize(x: Array, axis: int, eps: float = 1e-6) -> Array:
    return x * jax.lax.rsqrt(jnp.sum(jnp.square(x), axis=axis, keepdims=True) + eps)


def _entropy(p: Array, axis) -> Array:
    return -jnp.sum(p * jnp.log(jnp.maximum(p, jnp.finfo(jnp.float32).tiny)), axis=axis)


@struct.dataclass
class SoftRouting:
    """Soft MoE weights of ``G`` groups of ``S`` tokens (a pytree).

    Attributes:
      dispatch: float32 ``[G, S, E, C]``, sums to 1 over ``S`` for every slot.
      combine: float32 ``[G, S, E, C]``, sums to 1 over ``(E, C)`` for every token.
      stats: statistics by name (see the module docstring).
    """

    dispatch: Array
    combine: Array
    stats: dict[str, Array] = struct.field(default_factory=dict)


@register("soft")
class SoftRouter(Router):
    """The Soft MoE router: ``x [T, D] -> SoftRouting`` (see the module docstring).

    It is a :class:`~routezoo.layers.routers.base.Router` for the registry and the config
    checks (``moe.router='soft'``, ``causal = False``), but it returns a
    :class:`SoftRouting`, not a ``Routing``: only :class:`SoftMoE` consumes it.
    Parameters: ``phi`` ``[D, E, C]`` (logical ``('embed', None, None)``), with
    ``normalize`` also ``scale`` (a scalar). ``z_loss_coef`` is not used (no losses).
    """

    slots_per_expert: int = 0
    normalize: bool = True

    causal: ClassVar[bool] = False
    makes_expert_choices: ClassVar[bool] = False
    analysis_note: ClassVar[str] = (
        "moe.router='soft' (Soft MoE) makes no token-to-expert decisions to analyse "
        "(every token reaches every slot); its routing statistics are in metrics.jsonl")
    config_keys: ClassVar[dict[str, Any]] = {
        # slots S per expert; 0 = max(1, round(tokens per group / num_experts)), about one slot per token
        "soft_slots_per_expert": 0,
        # L2-normalise tokens and slot parameters, times a learned scale (paper, for large d_model);
        # False: plain X @ Phi
        "soft_normalize": True,
    }

    @nn.compact
    def __call__(self, x: Array, *, deterministic: bool, group_size: int | None = None) -> SoftRouting:
        # x: [T, D]
        num_tokens, d = x.shape
        g, m = _num_groups(num_tokens, group_size)
        e = self.num_experts
        s = slots_per_expert(m, e, self.slots_per_expert)
        x = x.astype(jnp.float32)
        if self.jitter > 0 and not deterministic:
            x = x * jax.random.uniform(self.make_rng("dropout"), x.shape, jnp.float32,
                                       1.0 - self.jitter, 1.0 + self.jitter)
        init = nn.initializers.variance_scaling(self.init_scale, "fan_in", "truncated_normal",
                                                in_axis=0, out_axis=(1, 2))
        phi = self.param("phi", sharding.param(init, ("embed", None, None)), (d, e, s), jnp.float32)
        if self.normalize:
            scale = self.param("scale", sharding.param(nn.initializers.ones, ()), (), jnp.float32)
            x = _l2_normalize(x, axis=-1)  # [T, D]
            phi = _l2_normalize(phi, axis=0) * scale  # [D, E, C]
        logits = jnp.einsum("GSD,DEC->GSEC", x.reshape(g, m, d), phi,
                            precision=jax.lax.Precision.HIGHEST)  # [G, S, E, C]
        logits = sharding.constrain(logits, ("batch", "length", None, None))
        dispatch = jax.nn.softmax(logits, axis=1)  # over the S tokens of each group
        combine = jax.nn.softmax(logits.reshape(g, m, e * s), axis=-1).reshape(g, m, e, s)  # over slots

        stats = {
            "load": jnp.mean(jnp.sum(combine, axis=3), axis=(0, 1)),  # [E]
            "slot_load_max": jnp.max(jnp.mean(combine, axis=(0, 1))) * (e * s),
            "dispatch_entropy": jnp.mean(_entropy(dispatch, axis=1)),
            "combine_entropy": jnp.mean(_entropy(combine, axis=(2, 3))),
            "dispatch_max": jnp.mean(jnp.max(dispatch, axis=1)),
            "combine_max": jnp.mean(jnp.max(combine, axis=(2, 3))),
            "slots_per_expert": jnp.asarray(s, jnp.float32),
        }
        return SoftRouting(dispatch=dispatch, combine=combine, stats=stats)

    @classmethod
    def active_expert_fraction(cls, moe_cfg: Any, seq_len: int | None = None) -> float:
        """``C / S``: the ``E·C`` slots of a group of ``S`` tokens cost ``E·C/S`` experts per
        token (``S`` = ``moe.group_size`` or ``seq_len``; without either, ``1 / E``)."""
        m = int(moe_cfg.group_size) or seq_len
        e = int(moe_cfg.num_experts)
        return slots_per_expert(m, e, int(moe_cfg.soft_slots_per_expert)) / m if m else 1.0 / e

    @classmethod
    def build_block(cls, moe_cfg: Any, *, d_model: int, dtype: Any, param_dtype: Any,
                    name: str | None = None) -> "SoftMoE":
        """:class:`SoftMoE` (:func:`soft_moe_from_config`): the slots replace the sparse block."""
        return soft_moe_from_config(moe_cfg, d_model=d_model, dtype=dtype, param_dtype=param_dtype, name=name)

    @classmethod
    def from_config(cls, moe_cfg: Any, **kwargs) -> "SoftRouter":
        return cls(**cls.common_kwargs(moe_cfg), slots_per_expert=int(moe_cfg.soft_slots_per_expert),
                   normalize=bool(moe_cfg.soft_normalize), **kwargs)

    @classmethod
    def check_config(cls, moe_cfg: Any, *, causal: bool) -> None:
        super().check_config(moe_cfg, causal=causal)
        if int(moe_cfg.soft_slots_per_expert) < 0:
            raise ValueError(f"moe.soft_slots_per_expert={moe_cfg.soft_slots_per_expert} must be >= 0 "
                             "(0: about one slot per token, round(tokens per group / num_experts))")
        for key, off in (("num_shared_experts", 0), ("residual_mlp", False), ("shared_expert_gate", False)):
            if moe_cfg.get(key, off) != off:
                raise ValueError(f"moe.{key}={moe_cfg[key]!r} is not supported with moe.router='soft'; "
                                 f"allowed: {off!r}")



class SoftMoE(nn.Module):
    """Soft MoE feed-forward block, with the interface of :class:`~routezoo.layers.moe.block.MoE`.

    ``__call__(x [B, L, D], *, deterministic, token_ids=None, router_inputs=None) ->
    (y [B, L, D], aux)``; ``aux = {'losses': {}, 'stats': {...}}``. ``token_ids`` is
    ignored; ``router_inputs`` must be empty (the soft router needs no outside state).

    Attributes:
      num_experts: ``E``.
      expert_dim: hidden width ``F`` of each expert.
      router: a :class:`SoftRouter` (adopted as submodule ``router``); ``None``: a default
        one (``C`` derived, normalised logits).
      group_size: tokens per routing group ``S``; 0 = one group per sequence.
      expert_type: ``'swiglu'`` or ``'gelu'``.
      d_model: if set, the input width must equal it.
      dtype / param_dtype: expert compute dtype / parameter dtype.
    """

    num_experts: int = 8
    expert_dim: int = 256
    router: SoftRouter | None = None
    group_size: int = 0
    expert_type: str = "swiglu"
    d_model: int | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, *, deterministic: bool, token_ids: Array | None = None,
                 router_inputs: dict[str, Any] | None = None) -> tuple[Array, dict[str, Any]]:
        # x: [B, L, D]
        b, l, d = x.shape
        if self.d_model is not None and d != self.d_model:
            raise ValueError(f"SoftMoE: input width {d} != d_model {self.d_model}")
        if router_inputs:
            raise ValueError(f"SoftMoE: the soft router takes no router_inputs, got {sorted(router_inputs)}")
        t = b * l
        m = self.group_size or l
        if t % m:
            raise ValueError(f"SoftMoE: {t} tokens (B·L) are not divisible by group_size {m}")
        g = t // m
        x = sharding.constrain(x, ("batch", "length", "act_embed"))
        router = self.router if self.router is not None else SoftRouter(self.num_experts, name="router")
        if router.num_experts != self.num_experts:
            raise ValueError(f"SoftMoE: router has {router.num_experts} experts, SoftMoE has {self.num_experts}")
        routing: SoftRouting = router(x.reshape(t, d), deterministic=deterministic, group_size=m)

        params = Experts(self.num_experts, self.expert_dim, self.expert_type, self.param_dtype,
                         name="experts")(d)
        params = {name: jnp.asarray(w, self.dtype) for name, w in params.items()}
        xg = sharding.constrain(x.astype(self.dtype).reshape(g, m, d), ("batch", "length", "act_embed"))

        # slots: convex mixes of each group's tokens, built where the group lives
        slots = jnp.einsum("GSEC,GSD->GECD", routing.dispatch.astype(self.dtype), xg,
                           preferred_element_type=jnp.float32).astype(self.dtype)  # [G, E, C, D]
        by_group = ("batch", None, "capacity", "act_embed")
        by_expert = ("batch", "act_expert", "capacity", "act_embed")
        slots = constrain_expert_parallel(sharding.constrain(slots, by_group), by_expert)
        slots = checkpoint_name(slots, MOE_GMM_IN)   # the experts' input, as capacity buffers
        out = ffn_batched(slots, params, expert_type=self.expert_type)  # [G, E, C, D]
        out = sharding.constrain(constrain_expert_parallel(out, by_expert), by_group)

        y = jnp.einsum("GSEC,GECD->GSD", routing.combine.astype(self.dtype), out,
                       preferred_element_type=jnp.float32)  # [G, S, D]
        y = sharding.constrain(y.astype(self.dtype).reshape(b, l, d), ("batch", "length", "act_embed"))
        return y, {"losses": {}, "stats": dict(routing.stats)}


def soft_moe_from_config(moe_cfg: Any, *, d_model: int, dtype: Dtype, param_dtype: Dtype,
                         name: str | None = None) -> SoftMoE:
    """Builds :class:`SoftMoE` from ``config.model.moe`` (``moe.router='soft'``).

    Reads ``num_experts``, ``expert_dim``, ``expert_type``, ``group_size``,
    ``soft_slots_per_expert``, ``soft_normalize``, ``jitter`` and ``router_init_scale``;
    the sparse-MoE keys (``k``, ``dispatch``, capacity factors, balancing losses) are unused.
    """
    return SoftMoE(
        num_experts=int(moe_cfg.num_experts),
        expert_dim=int(moe_cfg.expert_dim),
        router=SoftRouter.from_config(moe_cfg, parent=None),  # adopted by SoftMoE as 'router'
        group_size=int(moe_cfg.group_size),
        expert_type=str(moe_cfg.expert_type),
        d_model=int(d_model),
        dtype=_dtype(dtype),
        param_dtype=_dtype(param_dtype),
        name=name,
    )
