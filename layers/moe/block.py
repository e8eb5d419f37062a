"""Mixture-of-experts block: router -> dispatcher -> stacked experts -> combine.

Einsum letters: ``B`` batch, ``L`` length, ``T`` tokens (``B·L``), ``D`` embed, ``F``
expert_mlp, ``E`` experts, ``C`` capacity, ``K`` experts per token, ``G`` groups, ``S``
group size (``T = G·S``).

:class:`MoE` maps ``x [B, L, D]`` to ``y [B, L, D]`` and an ``aux`` dict::

    aux = {'losses': {name: scalar}, 'stats': {name: array}}

``losses`` are the router's auxiliary losses, already scaled (add their sum to the
training loss); ``stats`` are for logging: ``load`` ``[E]`` (fraction of token copies per
expert), ``dropped_fraction``, ``experts_per_token``, ``router_entropy`` and the unscaled
losses (``load_balance_loss``, ``z_loss``).

What is where:

* routing (:mod:`routezoo.layers.routers`): Switch Transformers (Fedus et al. 2021) top-1,
  GShard (Lepikhin et al. 2020) top-k, ST-MoE (Zoph et al. 2022) z-loss, DeepSeek-V3
  (2024) auxiliary-loss-free bias, Expert Choice (Zhou et al. 2022);
* dispatch (:mod:`routezoo.layers.moe.dropless`): capacity buffers (``dispatch='capacity'``)
  or sort + grouped matmul (``dispatch='dropless'``), with expert parallelism;
* experts (:class:`Experts`): one stacked parameter per weight with a leading expert axis;
* extras: ``num_shared_experts`` (DeepSeekMoE, Dai et al. 2024; Qwen-MoE): a dense FFN of
  width ``num_shared_experts · shared_expert_dim`` that every token uses, added to the
  routed output; fine-grained experts (DeepSeekMoE) are just many small experts (large
  ``num_experts``, small ``expert_dim``); ``residual_mlp`` (residual MoE, as in ST-MoE's
  dense MLP in sparse layers): a dense FFN of width ``expert_dim`` added as well.
  Both use the experts' ``expert_type``. ``shared_expert_gate`` (Qwen2-MoE) scales the
  shared experts' output per token by ``sigmoid(x · w)``, ``w`` ``[D, 1]``.

Expert map (``expert_map``, config ``model.moe.expert_map``): the router has ``R`` outputs
(logical experts) and the block ``E`` stacked experts (physical experts, the parameters);
router output ``r`` is computed by physical expert ``map[r]``. Every token copy the router
sends to ``r`` is dispatched to ``map[r]`` with its combine weight unchanged, so two
logical experts that share one physical expert add their weights on it. The identity map
(``None``) is the plain block. A permutation places experts (``map[r]`` is where logical
expert ``r`` lives; with experts sharded over the ``expert`` mesh axis, which shard); a
many-to-one map serves merged experts behind an unchanged router. Dropless and capacity
dispatch see physical ids only (capacity per physical expert: ``C = min(m·S,
round(cf·K·S/E))`` with ``m`` the most router outputs one physical expert serves); expert-choice routing,
whose routing is expert-major, runs on the logical experts' weights gathered from the
physical ones. In the config one map serves every MoE layer, or one map per MoE layer
(``;``-separated; :func:`parse_expert_maps`), which the model hands each layer
(:func:`moe_config_for_layer`).

Routing groups: the router and the capacity buffers work on groups of ``S`` consecutive
tokens, ``S = group_size`` or, with ``group_size = 0``, one group per sequence (``S = L``).
Routers run in float32; experts in ``dtype`` with parameters in ``param_dtype``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from routezoo.layers.moe.capacity import CAPACITY_FILLS, capacity_moe, expert_choice_moe
from routezoo.layers.moe.exchange import EP_EXCHANGES
from routezoo.layers.moe.gmm import EXPERT_PARAM_NAMES, EXPERT_TYPES, GMM_BACKEND_NAMES
from routezoo.layers.moe.dropless import dropless_moe
from routezoo.layers import sharding
from routezoo.layers.mlp import MLP
from routezoo.layers.routers import (ROUTER_PRECISIONS, ROUTERS, Router, Routing, TopKRouter, expert_capacity,
                                     router_class, router_from_config)

Array = jax.Array
Dtype = Any

DISPATCH_MODES = ("capacity", "dropless")
EXPERT_TYPES = EXPERT_TYPES
GMM_BACKENDS = GMM_BACKEND_NAMES
EP_EXCHANGES = EP_EXCHANGES


class Experts(nn.Module):
    """Stacked expert weights, returned as a dict (no computation here).

    ``wi`` ``[E, D, F]`` and ``wo`` ``[E, F, D]`` (plus ``wi_gate`` ``[E, D, F]`` for
    SwiGLU), logical names ``('expert', 'embed', 'expert_mlp')`` /
    ``('expert', 'expert_mlp', 'embed')``; fan-in scaled truncated-normal init per expert.
    """

    num_experts: int
    expert_dim: int
    expert_type: str = "swiglu"
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, d_model: int) -> dict[str, Array]:
        if self.expert_type not in EXPERT_TYPES:
            raise ValueError(f"unknown expert_type {self.expert_type!r}; known: {list(EXPERT_TYPES)}")
        e, d, f = self.num_experts, d_model, self.expert_dim
        init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal",
                                                in_axis=-2, out_axis=-1, batch_axis=(0,))
        shapes = {"wi": (e, d, f), "wo": (e, f, d)}
        if self.expert_type == "swiglu":
            shapes["wi_gate"] = (e, d, f)
        return {name: self.param(name, sharding.param(init, EXPERT_PARAM_NAMES[name]),
                                 shape, self.param_dtype)
                for name, shape in shapes.items()}


class MoE(nn.Module):
    """Mixture-of-experts feed-forward block.

    Attributes:
      num_experts: ``E``.
      expert_dim: hidden width ``F`` of each expert.
      router: a :class:`~routezoo.layers.routers.base.Router` (adopted as submodule
        ``router``); ``None``: ``TopKRouter(num_experts, k=2)`` without losses.
      dispatch: ``'capacity'`` or ``'dropless'``. Expert-choice routing (which carries
        ``Routing.expert_indices``) always takes its own expert-major path, which never
        drops: each expert holds exactly its ``C`` tokens.
      capacity_factor / eval_capacity_factor: capacity dispatch, in training / when
        ``deterministic``: ``C = min(S, max(round(cf·K·S/E), min_capacity))``.
      min_capacity: lower bound of ``C``.
      group_size: routing group size ``S``; 0 = one group per sequence.
      gmm_backend: dropless grouped matmul: ``'auto'`` (per platform), ``'pallas'`` (GPU
        kernel), ``'mosaic'`` (Hopper: jax's Mosaic GPU kernels where faster),
        ``'megablox'`` (TPU kernel), ``'blocked'``, ``'ragged_dot'`` or ``'dense'``;
        see :func:`routezoo.layers.moe.gmm.resolve_gmm_backend`.
      ep_exchange: how dropless dispatch moves token copies between expert shards:
        ``'padded'`` (``all_to_all`` of ``[N, T·K, D]`` blocks), ``'ragged'``
        (``ragged_all_to_all`` of the real rows only), ``'auto'`` (padded on CPU and GPU,
        ragged on TPU) or ``'ragged_emulated'`` (ragged offsets, emulated exchange: CPU
        tests); see :mod:`routezoo.layers.moe.dropless`.
      capacity_impl: ``'index'`` (scatter/gather) or ``'einsum'`` (one-hot reference).
      capacity_fill: order in which copies fill the buffers: ``'token'`` (each token's
        copies together, in token order: causal) or ``'slot'`` (all first choices, then
        all second choices, as GShard: not causal for ``k >= 2``).
      expert_type: ``'swiglu'`` or ``'gelu'``.
      num_shared_experts / shared_expert_dim: shared experts (0 width: ``expert_dim``).
      shared_expert_gate: multiply the shared experts' output by a per-token sigmoid gate
        (parameter ``shared_expert_gate`` ``[D, 1]``), as Qwen2-MoE does.
      residual_mlp: add a dense FFN of width ``expert_dim``.
      d_model: if set, the input width must equal it.
      dtype / param_dtype: expert compute dtype / parameter dtype.
      expert_map: ``None`` (identity) or the physical expert ``[0, E)`` of each of the
        router's ``R`` outputs (module docstring); the router then has ``R`` experts.
    """

    num_experts: int = 8
    expert_dim: int = 256
    router: Router | None = None
    dispatch: str = "dropless"
    capacity_factor: float = 1.25
    eval_capacity_factor: float = 2.0
    min_capacity: int = 4
    group_size: int = 0
    gmm_backend: str = "auto"
    ep_exchange: str = "auto"
    capacity_impl: str = "index"
    capacity_fill: str = "token"
    expert_type: str = "swiglu"
    num_shared_experts: int = 0
    shared_expert_dim: int = 0
    shared_expert_gate: bool = False
    residual_mlp: bool = False
    d_model: int | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    expert_map: tuple[int, ...] | None = None

    @nn.compact
    def __call__(self, x: Array, *, deterministic: bool, token_ids: Array | None = None,
                 router_inputs: dict[str, Any] | None = None) -> tuple[Array, dict[str, Any]]:
        # x: [B, L, D]; token_ids: int32 [B, L], passed (as [T]) only to routers that
        # declare ``needs_token_ids`` (the hash router); others never see it.
        # router_inputs: extra keyword arguments for the router, state that lives outside
        # this layer (recurrent: router_state [T, R] and the shared cell; pregate:
        # pregate_logits [T, E] and routes [T, K]); see layers/routers/stateful.py. A router
        # that returns ``Routing.state`` gets it back to the caller as aux['router_state'].
        b, l, d = x.shape
        if self.d_model is not None and d != self.d_model:
            raise ValueError(f"MoE: input width {d} != d_model {self.d_model}")
        if self.dispatch not in DISPATCH_MODES:
            raise ValueError(f"unknown moe dispatch {self.dispatch!r}; known: {list(DISPATCH_MODES)}")
        t = b * l
        s = self.group_size or l
        if t % s:
            raise ValueError(f"MoE: {t} tokens (B·L) are not divisible by group_size {s}")
        g = t // s
        x = sharding.constrain(x, ("batch", "length", "act_embed"))

        emap = None if self.expert_map is None else tuple(int(e) for e in self.expert_map)
        if emap is not None and not all(0 <= e < self.num_experts for e in emap):
            raise ValueError(f"MoE: expert_map {list(emap)} names experts outside [0, {self.num_experts})")
        width = self.num_experts if emap is None else len(emap)
        router = self.router if self.router is not None else TopKRouter(num_experts=width, name="router")
        if router.num_experts != width:
            raise ValueError(f"MoE: router has {router.num_experts} experts, MoE has {width} "
                             f"({'router outputs in its expert_map' if emap is not None else 'experts'})")
        router_kwargs = {}
        if router.needs_token_ids:
            router_kwargs["token_ids"] = None if token_ids is None else jnp.reshape(token_ids, (t,))
        router_kwargs.update(router_inputs or {})
        routing: Routing = router(x.reshape(t, d), deterministic=deterministic, group_size=s, **router_kwargs)

        params = Experts(self.num_experts, self.expert_dim, self.expert_type, self.param_dtype,
                         name="experts")(d)
        params = {name: jnp.asarray(w, self.dtype) for name, w in params.items()}
        xc = x.astype(self.dtype)
        dropped = jnp.zeros((), jnp.float32)

        indices = routing.indices
        if emap is not None and routing.expert_indices is not None:
            # expert-major routing: the logical experts' weights, gathered from the physical ones
            params = {name: jnp.take(w, jnp.asarray(emap, jnp.int32), axis=0) for name, w in params.items()}
        elif emap is not None:
            # token copies go to the physical expert of their router output (-1 stays empty)
            table = jnp.asarray(emap, jnp.int32)
            indices = jnp.where(indices >= 0, table[jnp.clip(indices, 0, width - 1)], -1).astype(indices.dtype)

        if routing.expert_indices is not None:
            y = expert_choice_moe(xc.reshape(g, s, d), routing.expert_indices,
                                               routing.expert_weights, params,
                                               expert_type=self.expert_type)  # [G, S, D]
        elif self.dispatch == "capacity":
            k = indices.shape[-1]
            cf = self.eval_capacity_factor if deterministic else self.capacity_factor
            # a physical expert serving m router outputs can get m copies of one token: C <= m·S
            mult = 1 if emap is None else max(emap.count(e) for e in set(emap))
            c = expert_capacity(s * mult, self.num_experts * mult, k, cf, self.min_capacity)
            priority = None if routing.priority is None else routing.priority.reshape(g, s)
            y, dropped = capacity_moe(
                xc.reshape(g, s, d), indices.reshape(g, s, k), routing.weights.reshape(g, s, k),
                priority, params, capacity=c, expert_type=self.expert_type, impl=self.capacity_impl,
                fill=self.capacity_fill)
        else:
            y = dropless_moe(xc.reshape(t, d), indices, routing.weights, params,
                                          expert_type=self.expert_type, gmm_backend=self.gmm_backend,
                                          exchange=self.ep_exchange)
        y = sharding.constrain(y.reshape(b, l, d), ("batch", "length", "act_embed"))

        if self.num_shared_experts > 0:
            width = self.num_shared_experts * (self.shared_expert_dim or self.expert_dim)
            shared = MLP(width, self.expert_type, dtype=self.dtype, param_dtype=self.param_dtype,
                         name="shared_experts")(xc)
            if self.shared_expert_gate:
                w = self.param("shared_expert_gate", sharding.param(nn.initializers.lecun_normal(),
                                                                    ("embed", None)), (d, 1), self.param_dtype)
                shared = shared * jax.nn.sigmoid(jnp.einsum("BLD,DO->BLO", xc, jnp.asarray(w, self.dtype)))
            y = y + shared
        if self.residual_mlp:
            y = y + MLP(self.expert_dim, self.expert_type, dtype=self.dtype,
                        param_dtype=self.param_dtype, name="residual_mlp")(xc)

        stats = dict(routing.stats)
        stats["dropped_fraction"] = dropped
        aux = {"losses": dict(routing.losses), "stats": stats}
        if routing.state is not None:
            aux["router_state"] = routing.state
        return y.astype(self.dtype), aux


def _dtype(dtype: Any) -> Any:
    return jnp.dtype(dtype) if isinstance(dtype, str) else dtype


def moe_from_config(moe_cfg: Any, *, d_model: int, dtype: Dtype, param_dtype: Dtype,
                    name: str | None = None) -> nn.Module:
    """The feed-forward block of an MoE layer from ``config.model.moe``.

    Args:
      moe_cfg: ``config.model.moe`` (see ``configs/base.py`` for its keys).
      d_model: the model width ``D``.
      dtype: compute dtype (a dtype or its name).
      param_dtype: parameter dtype (a dtype or its name).
      name: the module name.

    Returns:
      What the router class builds (:meth:`~routezoo.layers.routers.base.Router.build_block`):
      :class:`MoE` (:func:`sparse_moe_from_config`) for the sparse routers, the router's
      own block for routers that bring their own expert computation (Soft MoE's
      :class:`~routezoo.layers.moe.soft.SoftMoE`, Duo-LLM's :class:`~routezoo.layers.moe.duo.DuoFFN`).
    """
    return router_class(str(moe_cfg.router)).build_block(moe_cfg, d_model=d_model, dtype=dtype,
                                                        param_dtype=param_dtype, name=name)


def sparse_moe_from_config(moe_cfg: Any, *, d_model: int, dtype: Dtype, param_dtype: Dtype,
                           name: str | None = None) -> MoE:
    """Builds :class:`MoE` with the router of ``moe_cfg.router`` from ``config.model.moe``.

    Args:
      moe_cfg: ``config.model.moe``.
      d_model: the model width ``D``.
      dtype: compute dtype (a dtype or its name).
      param_dtype: parameter dtype (a dtype or its name).
      name: the module name.

    Returns:
      The :class:`MoE` block (the router adopted as its submodule ``router``).
    """
    maps = parse_expert_maps(str(moe_cfg.get("expert_map", "") or ""))
    if len(set(maps)) > 1:
        raise ValueError(f"moe.expert_map holds {len(maps)} different per-layer maps; build each layer from "
                         "moe_config_for_layer(moe_cfg, i) (the decoder does)")
    return MoE(
        num_experts=int(moe_cfg.num_experts),
        expert_dim=int(moe_cfg.expert_dim),
        router=router_from_config(logical_moe_config(moe_cfg), parent=None),  # adopted by the MoE as 'router'
        dispatch=str(moe_cfg.dispatch),
        capacity_factor=float(moe_cfg.capacity_factor),
        eval_capacity_factor=float(moe_cfg.eval_capacity_factor),
        min_capacity=int(moe_cfg.min_capacity),
        group_size=int(moe_cfg.group_size),
        gmm_backend=str(moe_cfg.gmm_backend),
        ep_exchange=str(moe_cfg.get("ep_exchange", "auto")),
        capacity_fill=str(moe_cfg.get("capacity_fill", "token")),
        expert_type=str(moe_cfg.expert_type),
        num_shared_experts=int(moe_cfg.num_shared_experts),
        shared_expert_dim=int(moe_cfg.shared_expert_dim),
        shared_expert_gate=bool(moe_cfg.get("shared_expert_gate", False)),
        residual_mlp=bool(moe_cfg.residual_mlp),
        d_model=int(d_model),
        dtype=_dtype(dtype),
        param_dtype=_dtype(param_dtype),
        expert_map=maps[0] if maps else None,
        name=name,
    )


# ------------------------------------------------------------------ expert map


def parse_expert_maps(spec: str) -> list[tuple[int, ...]]:
    """``model.moe.expert_map`` as maps: ``''`` -> ``[]`` (identity everywhere); ``'0,1,1'`` ->
    one map for every MoE layer; ``'0,1;1,0'`` -> one map per MoE layer, in layer order.

    Raises a one-line ``ValueError`` for an entry that is not an integer, an empty map or
    maps of different lengths (every layer's router has the same width).
    """
    spec = str(spec or "").strip()
    if not spec:
        return []
    maps = []
    for part in spec.split(";"):
        entries = [e.strip() for e in part.split(",")]
        try:
            maps.append(tuple(int(e) for e in entries))
        except ValueError:
            bad = next(e for e in entries if not e.lstrip("-").isdigit())
            raise ValueError(f"moe.expert_map={spec!r}: entry {bad!r} is not an integer; allowed: comma-separated "
                             "physical expert indices, one per router output (';' between per-layer maps)") from None
    if len({len(m) for m in maps}) > 1:
        raise ValueError(f"moe.expert_map={spec!r}: the per-layer maps have different lengths "
                         f"{sorted({len(m) for m in maps})}; every MoE layer's router has the same number of outputs")
    return maps


def format_expert_maps(maps) -> str:
    """The config value of per-MoE-layer ``maps`` (sequences of ints): one map when they are
    all equal, else ``;``-separated maps in layer order."""
    maps = [tuple(int(e) for e in m) for m in maps]
    if not maps:
        return ""
    if len(set(maps)) == 1:
        maps = maps[:1]
    return ";".join(",".join(str(e) for e in m) for m in maps)


def logical_num_experts(moe_cfg: Any) -> int:
    """The router's width ``R``: the length of ``moe.expert_map``, or ``moe.num_experts``."""
    maps = parse_expert_maps(str(moe_cfg.get("expert_map", "") or ""))
    return len(maps[0]) if maps else int(moe_cfg.num_experts)


def layer_expert_maps(moe_cfg: Any, num_moe_layers: int) -> list[tuple[int, ...]]:
    """The map of each of ``num_moe_layers`` MoE layers (the identity when the key is empty)."""
    maps = parse_expert_maps(str(moe_cfg.get("expert_map", "") or ""))
    if not maps:
        return [tuple(range(int(moe_cfg.num_experts)))] * num_moe_layers
    if len(maps) == 1:
        return maps * num_moe_layers
    if len(maps) != num_moe_layers:
        raise ValueError(f"moe.expert_map has {len(maps)} per-layer maps for {num_moe_layers} MoE layers; "
                         "give one map (every layer) or one per MoE layer")
    return maps


def has_per_layer_maps(moe_cfg: Any) -> bool:
    """Whether ``moe.expert_map`` gives the MoE layers different maps (such a stack runs unscanned)."""
    return len(set(parse_expert_maps(str(moe_cfg.get("expert_map", "") or "")))) > 1


def moe_config_for_layer(moe_cfg: Any, moe_index: int) -> Any:
    """``moe_cfg`` with ``expert_map`` reduced to the map of the ``moe_index``-th MoE layer
    (``moe_cfg`` itself when every layer has the same map)."""
    import ml_collections
    maps = parse_expert_maps(str(moe_cfg.get("expert_map", "") or ""))
    if len(set(maps)) <= 1:
        return moe_cfg
    if not 0 <= moe_index < len(maps):
        raise ValueError(f"moe.expert_map has {len(maps)} per-layer maps; there is no MoE layer {moe_index}")
    cfg = ml_collections.ConfigDict(moe_cfg.to_dict())
    cfg.expert_map = format_expert_maps([maps[moe_index]])
    return ml_collections.FrozenConfigDict(cfg) if isinstance(moe_cfg, ml_collections.FrozenConfigDict) else cfg


def logical_moe_config(moe_cfg: Any) -> Any:
    """The config the router sees: ``moe_cfg`` with ``num_experts`` = the router's width
    (:func:`logical_num_experts`); ``moe_cfg`` itself without a map."""
    import ml_collections
    if not str(moe_cfg.get("expert_map", "") or "").strip():
        return moe_cfg
    cfg = ml_collections.ConfigDict(moe_cfg.to_dict())
    cfg.num_experts = logical_num_experts(moe_cfg)
    cfg.expert_map = ""
    return cfg


def validate_expert_map(moe_cfg: Any, num_moe_layers: int | None = None) -> None:
    """One-line ``ValueError`` for a bad ``moe.expert_map``: entries that are not integers,
    outside ``[0, num_experts)``, maps of different lengths, a count of per-layer maps other
    than ``num_moe_layers`` (when given), or a router whose block is not the sparse MoE."""
    spec = str(moe_cfg.get("expert_map", "") or "")
    maps = parse_expert_maps(spec)
    if not maps:
        return
    e = int(moe_cfg.num_experts)
    for m in maps:
        bad = [x for x in m if not 0 <= x < e]
        if bad:
            raise ValueError(f"moe.expert_map={spec!r} names expert {bad[0]}, outside [0, moe.num_experts={e}); "
                             "each entry is a physical expert index")
    if num_moe_layers is not None and len(maps) > 1 and len(maps) != num_moe_layers:
        raise ValueError(f"moe.expert_map={spec!r} has {len(maps)} per-layer maps for {num_moe_layers} MoE layers; "
                         "give one map (every layer) or one per MoE layer")
    cls = router_class(str(moe_cfg.router))
    if getattr(cls.build_block, "__func__", None) is not Router.build_block.__func__:
        raise ValueError(f"moe.expert_map needs a router whose layers are the sparse MoE block; "
                         f"moe.router={moe_cfg.router!r} builds its own block")


def expand_expert_params(experts: dict[str, Any], expert_map) -> dict[str, Any]:
    """One MoE layer's stacked expert weights (``{'wi': [E, D, F], ...}``) expanded to one
    set per router output, ``w[map]`` (``[R, D, F]``, ...): the block with these weights and
    no map computes what the block with ``expert_map`` computes."""
    import numpy as np
    idx = np.asarray(expert_map, np.int32)
    return {name: np.take(np.asarray(w), idx, axis=0) for name, w in experts.items()}


def validate_moe_config(moe_cfg: Any, *, causal: bool, mesh_shape: dict[str, int]) -> None:
    """Raises ``ValueError`` with one line naming the problem and what is allowed.

    Checks names (router, dispatch, gmm_backend, ep_exchange, expert_type), sizes (experts, ``k``,
    widths, group size), capacity factors with capacity dispatch, divisibility of
    ``num_experts`` by the ``expert`` mesh axis (skipped when that axis is ``-1``) and
    routers that cannot run in a causal model (expert choice).
    """
    def choose(key: str, known) -> None:
        if moe_cfg[key] not in known:
            raise ValueError(f"moe.{key}={moe_cfg[key]!r} is unknown; known: {sorted(known)}")

    choose("router", ROUTERS)
    choose("dispatch", DISPATCH_MODES)
    choose("gmm_backend", GMM_BACKENDS)
    choose("ep_exchange", EP_EXCHANGES)
    if "router_precision" in moe_cfg:
        choose("router_precision", ROUTER_PRECISIONS)
    choose("expert_type", EXPERT_TYPES)
    choose("capacity_fill", CAPACITY_FILLS)
    e = int(moe_cfg.num_experts)
    if e < 1:
        raise ValueError(f"moe.num_experts={e} must be >= 1")
    validate_expert_map(moe_cfg)
    for key in ("expert_dim",):
        if int(moe_cfg[key]) < 1:
            raise ValueError(f"moe.{key}={moe_cfg[key]} must be >= 1")
    for key in ("num_shared_experts", "shared_expert_dim", "group_size", "min_capacity"):
        if int(moe_cfg[key]) < 0:
            raise ValueError(f"moe.{key}={moe_cfg[key]} must be >= 0")
    if moe_cfg.dispatch == "capacity":
        for key in ("capacity_factor", "eval_capacity_factor"):
            if float(moe_cfg[key]) <= 0:
                raise ValueError(f"moe.{key}={moe_cfg[key]} must be > 0 with moe.dispatch='capacity'")
        if causal and moe_cfg.capacity_fill == "slot" and int(moe_cfg.k) > 1:
            raise ValueError(f"moe.capacity_fill='slot' with moe.k={moe_cfg.k} lets a later token's first choice "
                             "displace an earlier token's second choice, which a causal model cannot allow; "
                             "use moe.capacity_fill='token' (or k=1)")
        if causal and bool(moe_cfg.batch_prioritized):
            raise ValueError("moe.batch_prioritized=True fills capacity by router probability across the "
                             "group, so later tokens decide which earlier ones are dropped; a causal model "
                             "cannot allow it: use batch_prioritized=False (or moe.dispatch='dropless')")
    n_exp = int(mesh_shape.get("expert", 1))
    if n_exp > 1 and e % n_exp:
        divisors = [n for n in range(1, e + 1) if e % n == 0]
        raise ValueError(f"moe.num_experts={e} is not divisible by mesh.expert={n_exp}; "
                         f"mesh.expert must divide it: one of {divisors}")
    ROUTERS[moe_cfg.router].check_config(logical_moe_config(moe_cfg), causal=causal)
