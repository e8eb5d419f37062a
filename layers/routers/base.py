"""Routers: token states to a :class:`Routing` (which experts, with what weight).

Einsum letters: ``T`` tokens, ``D`` embed, ``E`` experts, ``K`` experts per token (slots),
``G`` routing groups, ``S`` group size (tokens per group, ``T = G·S``), ``C`` capacity.

A router is a Linen module ``__call__(x [T, D], *, deterministic, group_size=None) ->
Routing``. It knows nothing about dispatch: it says which experts each token goes to and
with what combine weight, which auxiliary losses it wants added to the training loss (by
name, already multiplied by their coefficient) and statistics for logging. ``group_size``
(``S``) splits the ``T`` tokens into ``G = T/S`` routing groups of consecutive tokens; the
load-balancing loss is averaged over groups and expert choice picks tokens within a group.

Conventions fixed here, for every router (later routers must keep them):

* Router math runs in float32 whatever the model's compute dtype; the router kernel is a
  float32 ``(D, E)`` parameter with logical names ``('embed', None)``, initialised as
  Switch does: truncated normal, fan-in variance scaled by ``init_scale`` (0.1).
* Jitter (Switch Transformers, Fedus et al. 2021): in training the router input is
  multiplied by ``U(1-eps, 1+eps)``. Its random numbers come from the ``'dropout'`` RNG
  stream, which every training loop already provides.
* Load-balancing loss (Switch Transformers; flaxformer's constant):
  ``L_b = E · Σ_e f_e · P_e`` per group, averaged over groups, where ``f_e`` is the fraction
  of the group's tokens whose selected experts include ``e`` (a token counts at most once
  per expert) and ``P_e`` the mean router probability of ``e``. Uniform routing gives
  ``L_b = K``. See :func:`load_balance_loss`.
* Router z-loss (ST-MoE, Zoph et al. 2022): ``L_z = mean_t (logsumexp_e h_te)^2`` over all
  tokens. See :func:`router_z_loss`.
* ``Routing.losses`` holds ``'load_balance'`` and ``'z_loss'`` multiplied by their
  coefficients, and only when the coefficient is > 0; ``Routing.stats`` always holds the
  unscaled values (``load_balance_loss``, ``z_loss``) with ``load`` ``[E]`` (fraction of
  token copies per expert), ``experts_per_token`` and ``router_entropy``.

The routers themselves live one family per module of this package; :data:`ROUTERS` maps
config names (``model.moe.router``) to classes, filled by :func:`register`.
"""

from __future__ import annotations

import math
from typing import Any, Callable, ClassVar

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import struct

from routezoo.layers import sharding

Array = jax.Array


@struct.dataclass
class Routing:
    """Routing decision for ``T`` tokens (a pytree).

    Attributes:
      indices: int32 ``[T, K]``: expert of each token slot; ``-1`` marks an empty slot.
      weights: float32 ``[T, K]``: combine weight of each slot (0 on empty slots).
      losses: auxiliary losses by name, scalars, already multiplied by their coefficient.
      stats: statistics by name for logging (``load`` ``[E]``, scalars otherwise).
      priority: optional float32 ``[T]``: order in which capacity buffers are filled
        (higher first; batch-prioritised routing). ``None``: token order.
      expert_indices: optional int32 ``[G, E, C]``: expert-major form (expert choice):
        the group-local token index (in ``[0, S)``) taken by each expert's ``C`` slots.
        When present, dispatchers use it instead of ``indices``; ``indices``/``weights``
        then hold the same decision token-major with ``K = E``.
      expert_weights: optional float32 ``[G, E, C]``: combine weights of ``expert_indices``.
      state: optional float32 ``[T, R]``: the router state this router hands on to the next
        MoE layer (the recurrent router, :mod:`routezoo.layers.routers.stateful`); the MoE
        block returns it as ``aux['router_state']``.
    """

    indices: Array
    weights: Array
    losses: dict[str, Array] = struct.field(default_factory=dict)
    stats: dict[str, Array] = struct.field(default_factory=dict)
    priority: Array | None = None
    expert_indices: Array | None = None
    expert_weights: Array | None = None
    state: Array | None = None

    def dense_weights(self, num_experts: int) -> Array:
        """Combine weights as a dense ``[T, E]`` matrix (for references and analysis)."""
        one_hot = jax.nn.one_hot(self.indices, num_experts, dtype=jnp.float32)  # [T, K, E]
        return jnp.einsum("TKE,TK->TE", one_hot, self.weights.astype(jnp.float32))


# ------------------------------------------------------------------ shared pieces


def check_k(moe_cfg: Any) -> None:
    """One-line ``ValueError`` unless ``1 <= moe.k <= moe.num_experts``."""
    k, e = int(moe_cfg.k), int(moe_cfg.num_experts)
    if not 1 <= k <= e:
        raise ValueError(f"moe.k={k} must be between 1 and moe.num_experts={e}")


def expert_capacity(group_size: int, num_experts: int, k: int, capacity_factor: float,
                    min_capacity: int = 0) -> int:
    """Slots per expert and group: ``C = min(S, max(round(cf·K·S/E), min_capacity))``.

    This is Switch's ``max(round(cf·S/E), min_capacity)`` with the ``S·K`` token copies of
    top-k routing in place of ``S`` tokens (rounded half up), capped at ``S`` because a
    token sends at most one copy to an expert, so ``C = S`` never drops anything.
    """
    c = int(math.floor(capacity_factor * k * group_size / num_experts + 0.5))
    return max(1, min(group_size, max(c, int(min_capacity))))


def load_balance_loss(probs: Array, expert_mask: Array) -> Array:
    """Switch load-balancing loss, flaxformer's constant.

    Args:
      probs: ``[G, S, E]`` router probabilities.
      expert_mask: ``[G, S, E]``, 1 where the token's selected experts include ``e``
        (a token counts at most once per expert).

    Returns: ``mean_G (E · Σ_e f_e · P_e)`` = ``E² · mean_{G,E}(f · P)``; 1 for balanced
    top-1 routing, ``K`` for balanced top-k.
    """
    num_experts = probs.shape[-1]
    f = jnp.mean(expert_mask.astype(jnp.float32), axis=1)  # [G, E]
    p = jnp.mean(probs.astype(jnp.float32), axis=1)  # [G, E]
    return jnp.mean(f * p) * num_experts ** 2


def router_z_loss(logits: Array) -> Array:
    """ST-MoE router z-loss: ``mean_t (logsumexp_e h_te)^2`` for logits ``[..., E]``."""
    lse = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)
    return jnp.mean(jnp.square(lse))


def routing_stats(indices: Array, probs: Array, num_experts: int) -> dict[str, Array]:
    """``load`` ``[E]`` (fraction of token copies per expert), ``experts_per_token`` and
    ``router_entropy`` (mean over tokens) from ``indices [T, K]`` and ``probs [T, E]``."""
    valid = indices >= 0
    counts = jnp.zeros((num_experts,), jnp.float32).at[jnp.where(valid, indices, num_experts)].add(
        1.0, mode="drop")  # [E]
    total = jnp.maximum(jnp.sum(valid), 1).astype(jnp.float32)
    logp = jnp.log(jnp.maximum(probs, jnp.finfo(jnp.float32).tiny))
    entropy = -jnp.sum(probs * logp, axis=-1)  # [T]
    return {
        "load": counts / total,
        "experts_per_token": jnp.mean(jnp.sum(valid, axis=-1).astype(jnp.float32)),
        "router_entropy": jnp.mean(entropy),
    }


def top_k(x: Array, k: int) -> tuple[Array, Array]:
    """``jax.lax.top_k`` along the last axis, by a stable descending sort.

    Same result (ties go to the lower index), but it partitions over the leading axes:
    XLA's TopK op is replicated by the SPMD partitioner on some backends (CPU), which
    would gather every token's logits onto every device.
    """
    idx = jnp.argsort(-x, axis=-1, stable=True)[..., :k]
    return jnp.take_along_axis(x, idx, axis=-1), idx.astype(jnp.int32)


def _num_groups(num_tokens: int, group_size: int | None) -> tuple[int, int]:
    s = num_tokens if not group_size else int(group_size)
    if num_tokens % s:
        raise ValueError(f"router: {num_tokens} tokens are not divisible into groups of {s}")
    return num_tokens // s, s


# ------------------------------------------------------------------ routers


ROUTER_PRECISIONS = {
    # float32 inputs and kernel; how the [T, D] x [D, E] product is computed:
    "float32": jax.lax.Precision.HIGHEST,                     # exact f32 (SIMT FMA on GPUs)
    "bf16_3x": jax.lax.DotAlgorithmPreset.BF16_BF16_F32_X3,   # 3 bf16 tensor-core passes
}


def router_precision(name: str):
    """The ``precision`` argument for router matmuls; ``name`` of :data:`ROUTER_PRECISIONS`.

    ``float32`` (default) is the Switch Transformer's selective precision: the router in
    full float32. ``bf16_3x`` splits each float32 operand into two bfloat16 parts and sums
    three tensor-core products (about float32's accuracy, ~1e-5 relative here); on GPUs
    XLA runs ``float32`` as a SIMT GEMM, which took 9% of the 128-expert block's time
    (BENCHMARKS.md, run 4 profile).
    """
    if name not in ROUTER_PRECISIONS:
        raise ValueError(f"unknown router precision {name!r}; known: {list(ROUTER_PRECISIONS)}")
    return ROUTER_PRECISIONS[name]


class ModelRouting:
    """What the MoE layers' routers of one model call get from outside their layers.

    :meth:`Router.model_routing` builds one inside the model's ``__call__``; the model
    then, for each forward pass (a model may run several, as THOR's consistency loss
    does), calls :meth:`begin`, passes :meth:`layer_inputs` of each MoE layer to that
    layer as ``router_inputs`` and hands every layer's ``aux`` to :meth:`after_layer`.
    This default carries nothing: each router reads only its own layer's input.
    """

    def begin(self, batch: int, length: int) -> None:
        """Start of a forward pass over ``batch`` rows of ``length`` tokens."""

    def layer_inputs(self, moe_index: int, batch: int, length: int) -> dict[str, Any] | None:
        """Keyword arguments for the router of the ``moe_index``-th MoE layer (in layer
        order), or ``None`` for none."""
        return None

    def after_layer(self, aux: dict[str, Any]) -> dict[str, Array]:
        """Takes the ``aux`` of every layer (dense ones too) in order; returns values the
        model records in ``'intermediates'`` as ``layer{i}_{name}`` (none by default)."""
        return {}

    def precomputed_routes(self) -> Array | None:
        """The routes of every MoE layer, computed before the backbone runs, or ``None``
        when this router has no such step (only :attr:`Router.precomputes_routes`)."""
        return None

    # Scanned layers (``model.scan_layers``, routezoo/zoo/stack.py): inside ``nn.scan`` the
    # layers cannot call back into this object, so what it threads through them is split
    # into arrays: a carry that goes from layer to layer, arrays shared by all layers, and
    # two pure functions of them. The defaults carry nothing. Routers whose inputs differ
    # per layer in ways a carry cannot express set ``Router.scannable = False``.

    def scan_carry(self) -> Any:
        """Arrays carried into the scanned group (the state after the layers before it)."""
        return None

    def scan_shared(self) -> Any:
        """Arrays every scanned layer reads (broadcast, not scanned)."""
        return None

    def set_scan_carry(self, carry: Any) -> None:
        """Takes the carry back after the scanned group (for the layers after it)."""

    @staticmethod
    def scan_inputs(carry: Any, shared: Any) -> dict[str, Any] | None:
        """``router_inputs`` of a scanned MoE layer from the carry and the shared arrays."""
        return None

    @staticmethod
    def scan_update(carry: Any, aux: dict[str, Any]) -> tuple[Any, dict[str, Array]]:
        """``(new carry, values to record as layer{i}_{name})`` after a scanned layer."""
        return carry, {}


class Router(nn.Module):
    """Base class: the router kernel, jitter and the z-loss.

    Subclasses implement ``__call__(x [T, D], *, deterministic, group_size=None) ->
    Routing``, :meth:`from_config` (build from ``config.model.moe``) and may extend
    :meth:`check_config`. The class attributes and class methods below say what a model,
    the config checks and the analysis tools need to know about a router; shared code
    asks them instead of comparing router names.

    Attributes:
      num_experts: ``E``.
      jitter: multiplicative input jitter ``eps`` in training (0: off).
      z_loss_coef: coefficient of the router z-loss (0: not added to the losses).
      init_scale: variance scale of the router kernel's initialiser.
      precision: how the logits matmul runs, a key of :data:`ROUTER_PRECISIONS`.
      causal: ``False`` marks routers that look at other tokens of the sequence; they are
        refused in causal models.
      router_name: the config name, set by :func:`register`.
      needs_token_ids: the MoE block passes the token ids ``token_ids`` ``[T]`` (hash).
      supports_decode: the model can run it one token at a time with a key/value cache
        (``False``: routers with a sequence-level network or attention, pregate and uoe).
      accepts_routes: the model's ``routes=`` argument fixes its decisions from outside
        (pregate, duo); other routers refuse it.
      precomputes_routes: it decides every layer's routes before the backbone runs, so
        ``DecoderLM.routes`` can return them (pregate).
      supports_mtp: it can run in the blocks of multi-token prediction, which get no
        model-level router inputs (``False``: recurrent, pregate, duo).
      scannable: a model with ``scan_layers`` can run its MoE layers under ``nn.scan``
        (``False``: pregate and duo, whose per-layer routes come from outside the layers;
        their models stay unscanned).
      makes_expert_choices: its layers route tokens to experts, which the routing
        analysis (``routezoo analyze``) counts (``False``: soft, duo).
      analysis_note: why the routing analysis refuses a router without expert choices,
        with where to look instead (one line).
      expert_major: its ``Routing`` is expert-major (``expert_indices``, expert choice),
        which the block dispatches without dropping anything whatever the dispatch.
      config_keys: ``model.moe`` keys this router reads beyond the keys common to all MoE
        blocks, with their defaults: ``configs/base.py`` adds the union over
        :data:`ROUTERS` to its schema (:func:`router_config_keys`).
    """

    num_experts: int
    jitter: float = 0.0
    z_loss_coef: float = 0.0
    init_scale: float = 0.1
    precision: str = "float32"   # the logits matmul, of ROUTER_PRECISIONS

    causal: ClassVar[bool] = True
    router_name: ClassVar[str] = ""   # set by register()
    needs_token_ids: ClassVar[bool] = False
    supports_decode: ClassVar[bool] = True
    accepts_routes: ClassVar[bool] = False
    precomputes_routes: ClassVar[bool] = False
    supports_mtp: ClassVar[bool] = True
    makes_expert_choices: ClassVar[bool] = True
    scannable: ClassVar[bool] = True   # its model routing runs under nn.scan (ModelRouting.scan_*)
    analysis_note: ClassVar[str] = ""
    expert_major: ClassVar[bool] = False
    config_keys: ClassVar[dict[str, Any]] = {}

    def router_logits(self, x: Array, deterministic: bool) -> Array:
        """float32 logits ``[T, E]`` of ``x [T, D]`` (jitter applied in training)."""
        x = x.astype(jnp.float32)
        if self.jitter > 0 and not deterministic:
            noise = jax.random.uniform(self.make_rng("dropout"), x.shape, jnp.float32,
                                       1.0 - self.jitter, 1.0 + self.jitter)
            x = x * noise
        init = nn.initializers.variance_scaling(self.init_scale, "fan_in", "truncated_normal")
        kernel = self.param("kernel", sharding.param(init, ("embed", None)),
                            (x.shape[-1], self.num_experts), jnp.float32)
        return jnp.einsum("TD,DE->TE", x, kernel, precision=router_precision(self.precision))

    def z_losses(self, logits: Array) -> tuple[dict[str, Array], dict[str, Array]]:
        z = router_z_loss(logits)
        losses = {"z_loss": self.z_loss_coef * z} if self.z_loss_coef > 0 else {}
        return losses, {"z_loss": z}

    @classmethod
    def common_kwargs(cls, moe_cfg: Any) -> dict[str, Any]:
        return dict(num_experts=int(moe_cfg.num_experts), jitter=float(moe_cfg.jitter),
                    z_loss_coef=float(moe_cfg.z_loss_coef),
                    init_scale=float(moe_cfg.router_init_scale),
                    precision=str(moe_cfg.get("router_precision", "float32")))

    @classmethod
    def from_config(cls, moe_cfg: Any, **kwargs) -> "Router":
        return cls(**cls.common_kwargs(moe_cfg), **kwargs)

    @classmethod
    def build_block(cls, moe_cfg: Any, *, d_model: int, dtype: Any, param_dtype: Any,
                    name: str | None = None) -> nn.Module:
        """The feed-forward block of an MoE layer with this router.

        Args:
          moe_cfg: ``config.model.moe``.
          d_model: the model width ``D``.
          dtype: compute dtype (a dtype or its name).
          param_dtype: parameter dtype (a dtype or its name).
          name: the module name.

        Returns:
          A module called as ``block(x [B, L, D], *, deterministic, token_ids=None,
          router_inputs=None) -> (y [B, L, D], aux)``: by default the sparse
          :class:`~routezoo.layers.moe.block.MoE` with this router; routers with their
          own expert computation (Soft MoE, Duo-LLM) build their own block.
        """
        from routezoo.layers.moe.block import sparse_moe_from_config
        return sparse_moe_from_config(moe_cfg, d_model=d_model, dtype=dtype, param_dtype=param_dtype,
                                      name=name)

    @classmethod
    def build_attention(cls, model_cfg: Any, *, dtype: Any, param_dtype: Any,
                        name: str) -> Callable[..., tuple[Array, dict[str, Any]]] | None:
        """The attention of the MoE layers, for routers whose experts replace it.

        Args:
          model_cfg: ``config.model``.
          dtype: compute dtype.
          param_dtype: parameter dtype.
          name: the module name (the model's attention slot, ``attn``).

        Returns:
          ``None`` (the default: the model's own attention), or a callable
          ``attn(h [B, L, D], positions [B, L], segment_mask) -> (y [B, L, D], aux)``
          whose ``aux`` losses and statistics the model reports as ``attn_*`` /
          ``attn/*`` (UoE's selective attention).
        """
        return None

    @classmethod
    def model_routing(cls, model_cfg: Any, *, tokens: Array, positions: Array, routes: Array | None,
                      num_moe_layers: int, dtype: Any, param_dtype: Any) -> ModelRouting:
        """What this router's layers need from the model, made once per model call.

        Called inside the model's compact ``__call__``, so modules created here are the
        model's submodules (the recurrent router's shared ``router_cell``, Read-ME's
        ``pregate`` network).

        Args:
          model_cfg: ``config.model``.
          tokens: int32 ``[B, L]`` token ids.
          positions: int32 ``[B, L]`` positions.
          routes: the model's ``routes=`` argument (only when :attr:`accepts_routes`).
          num_moe_layers: ``M``, the number of MoE layers.
          dtype: compute dtype.
          param_dtype: parameter dtype.

        Returns:
          A :class:`ModelRouting`; the default passes nothing.
        """
        return ModelRouting()

    @classmethod
    def model_losses(cls, model_cfg: Any, logits: Array, rerun: Callable[[], Array], *,
                     deterministic: bool, targets: Array | None = None,
                     loss_weights: Array | None = None) -> dict[str, Array]:
        """Loss terms over the whole model (none by default).

        Args:
          model_cfg: ``config.model``.
          logits: float32 ``[B, L, V]`` of the forward pass.
          rerun: runs the forward pass again and returns its logits (fresh random draws).
          deterministic: evaluation mode.
          targets: int ``[B, L]`` the loss's target ids, when the caller gave them (the
            training step does).
          loss_weights: ``[B, L]`` their weights (0 drops a token), or ``None``.

        Returns:
          ``{name: scalar}``, already scaled, added to the model's losses (THOR's
          two-pass consistency).
        """
        return {}

    @classmethod
    def active_expert_fraction(cls, moe_cfg: Any, seq_len: int | None = None) -> float:
        """Share of the stacked experts' parameters that one token uses, for the
        active-parameter count (``zoo.count_params``): ``k / num_experts`` by default."""
        return int(moe_cfg.k) / int(moe_cfg.num_experts)

    @classmethod
    def eval_variants(cls, moe_cfg: Any) -> dict[str, dict[str, Any]]:
        """Extra evaluations the training loop runs beside the plain one:
        ``{suffix: {moe_key: value}}``; each is the same variables evaluated with
        ``config.model.moe`` changed by the overrides, reported as ``eval_*@suffix``.
        The overrides must not change parameter shapes. None by default."""
        return {}

    @classmethod
    def check_config(cls, moe_cfg: Any, *, causal: bool) -> None:
        """Raises ``ValueError`` (one line) for settings this router cannot run."""
        if not cls.causal and causal:
            name = next((k for k, v in ROUTERS.items() if v is cls), cls.__name__)
            causal_ok = sorted(k for k, v in ROUTERS.items() if v.causal)
            raise ValueError(f"moe.router={name!r} looks at other tokens of the sequence and "
                             f"cannot be used in a causal model; use one of {causal_ok}")

    @classmethod
    def check_model_config(cls, model_cfg: Any) -> None:
        """Raises ``ValueError`` (one line) for model settings outside ``model.moe`` that
        this router cannot run with (UoE: the attention options); nothing by default."""



ROUTERS: dict[str, type[Router]] = {}


def register(name: str):
    """Class decorator: makes a :class:`Router` subclass selectable as ``moe.router=name``.

    Args:
      name: the config name; registering a second class under a taken name is an error.

    Returns:
      The decorator, which returns the class unchanged apart from ``router_name``.
    """
    def add(cls: type[Router]) -> type[Router]:
        if name in ROUTERS and ROUTERS[name] is not cls:
            raise ValueError(f"router name {name!r} is taken by {ROUTERS[name].__name__}")
        ROUTERS[name] = cls
        cls.router_name = name
        return cls
    return add


def router_class(name: str) -> type[Router]:
    """The router class registered as ``name``.

    Args:
      name: a ``model.moe.router`` value.

    Returns:
      Its class in :data:`ROUTERS`; one-line ``ValueError`` listing the known names for
      an unknown one.
    """
    if name not in ROUTERS:
        raise ValueError(f"moe.router={name!r} is unknown; known: {sorted(ROUTERS)}")
    return ROUTERS[name]


def router_from_config(moe_cfg: Any, **module_kwargs) -> Router:
    """Builds the router named by ``moe_cfg.router`` (a :data:`ROUTERS` key).

    ``module_kwargs`` go to the Linen constructor (``name``, ``parent``); pass
    ``parent=None`` for a router that another module will adopt as its attribute.
    """
    return router_class(moe_cfg.router).from_config(moe_cfg, **module_kwargs)


def router_config_keys() -> dict[str, Any]:
    """The union of every registered router's :attr:`Router.config_keys` (key -> default).

    Returns:
      The keys in registration order; a one-line ``ValueError`` when two routers declare
      one key with different defaults.
    """
    keys: dict[str, Any] = {}
    owner: dict[str, str] = {}
    for name, cls in ROUTERS.items():
        for key, default in cls.config_keys.items():
            if key in keys and keys[key] != default:
                raise ValueError(f"moe.{key}: routers {owner[key]!r} and {name!r} declare different "
                                 f"defaults ({keys[key]!r}, {default!r})")
            keys.setdefault(key, default)
            owner.setdefault(key, name)
    return keys





def _load_stats(indices: Array, num_experts: int) -> dict[str, Array]:
    """``load`` ``[E]`` (fraction of token copies per expert) and ``experts_per_token``."""
    valid = indices >= 0
    counts = jnp.zeros((num_experts,), jnp.float32).at[jnp.where(valid, indices, num_experts)].add(
        1.0, mode="drop")
    total = jnp.maximum(jnp.sum(valid), 1).astype(jnp.float32)
    return {"load": counts / total,
            "experts_per_token": jnp.mean(jnp.sum(valid, axis=-1).astype(jnp.float32))}


def _check_choice(moe_cfg: Any, key: str, allowed) -> None:
    if moe_cfg[key] not in allowed:
        raise ValueError(f"moe.{key}={moe_cfg[key]!r} is unknown; known: {sorted(allowed)}")


def _learned_logits(module: Router, x: Array, width: int, deterministic: bool) -> Array:
    """float32 logits ``[T, width]`` from a learned ``(D, width)`` kernel named ``kernel``:
    :meth:`Router.router_logits` with a width other than ``num_experts`` (jitter and init
    as there)."""
    x = x.astype(jnp.float32)
    if module.jitter > 0 and not deterministic:
        x = x * jax.random.uniform(module.make_rng("dropout"), x.shape, jnp.float32,
                                   1.0 - module.jitter, 1.0 + module.jitter)
    init = nn.initializers.variance_scaling(module.init_scale, "fan_in", "truncated_normal")
    kernel = module.param("kernel", sharding.param(init, ("embed", None)), (x.shape[-1], width),
                          jnp.float32)
    return jnp.einsum("TD,DE->TE", x, kernel, precision=router_precision(module.precision))
