"""Duo-LLM feed-forward slot: per token and layer, a big FFN, a small FFN, or skip.

Einsum letters: ``B`` batch, ``L`` length, ``T`` tokens (``B·L``), ``D`` embed, ``F``
hidden width of an FFN (``expert_dim`` for the big one, ``small_dim`` for the small one),
``w`` options (3: big, small, skip), ``Z`` MoE layers of the model.

Duo-LLM (Alizadeh, Mirzadeh, Shahrokhi, Belenko, Sun, Cho, Sekhavat, Nabi, Farajtabar
2024, "Duo-LLM: A Framework for Studying Adaptive Computation in Large Language Models",
arXiv:2410.10846)
gives every feed-forward slot three options per token: the big module (the original FFN),
a small auxiliary module, or skipping the slot (the residual carries the token). The
paper's three stages map onto this library as follows:

1. **random routing** (``moe.duo_mode='random'``): in training each token draws its
   option in every layer independently from ``moe.duo_probs`` (big, small, skip), so the
   network learns to work under any route;
2. **oracle** (:func:`routezoo.zoo.duo.oracle_routes`): the best route of each token
   under a compute budget, by exhaustive search over routes given from outside;
3. **trained router** (``moe.duo_mode='router'``): a learned linear router ``D -> w`` per
   layer picks the option (argmax; ``moe.duo_router_sample``: sampled in training).

:class:`DuoFFN` is what :func:`routezoo.layers.moe.block.moe_from_config` builds when
``moe.router='duo'``, so the MoE slots of :class:`~routezoo.zoo.lm.DecoderLM` hold it;
its call is the MoE block's: ``ffn(x [B, L, D], deterministic=, token_ids=,
router_inputs=) -> (y [B, L, D], aux)``. :class:`DuoRouter` (registered as ``'duo'`` in
:data:`~routezoo.layers.routers.base.ROUTERS`) makes the decision and checks the config.

What is unverified or chosen here (no public code exists; the paper's text was not
available, only its abstract and summaries):

* the small module's width: ``moe.duo_small_dim``, default ``expert_dim // 4``;
* the random-routing probabilities: ``moe.duo_probs``, default ``0.5, 0.25, 0.25``;
* the router and its loss. Here: a float32 linear router per layer, its output multiplied
  by the straight-through factor ``1 + p_c - stop_gradient(p_c)`` of the chosen option
  ``c`` (value 1, so the forward pass equals the random-routing model's; the router gets
  the gradient of ``p_c``), plus a compute loss ``duo_cost_coef · mean_T Σ_o p_o cost_o``
  with ``cost = (1, small_dim/expert_dim, 0)`` for (big, small, skip). A token routed to
  skip has output 0, so it gives its router no gradient from the task loss (only through
  the softmax of the tokens that took a module, and the compute loss); sampling in
  training (``duo_router_sample``) keeps exploring. The paper may instead fit routers to
  the oracle's routes; that is not implemented.
* Costs count a module's hidden width only (big = 1), as the budget of the oracle does.

Compute: both modules run on every token and the output is selected per token, so this
saves no FLOPs (a measurement framework, as the paper's is, not a fast implementation).
The parameter counts logged at the start of a run count both modules as active.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import linen as nn

from routezoo.layers import sharding
from routezoo.layers.mlp import MLP
from routezoo.layers.moe.block import _dtype
from routezoo.layers.routers import ModelRouting, Router, Routing
from routezoo.layers.routers.base import _num_groups
from routezoo.layers.routers.base import register

Array = jax.Array

OPTIONS = ("big", "small", "skip")       # option index = position here
BIG, SMALL, SKIP = 0, 1, 2
DUO_MODES = ("random", "router")
EVAL_ROUTES = ("auto", "big", "small", "skip", "router")


def small_width(expert_dim: int, small_dim: int) -> int:
    """Hidden width of the small module: ``small_dim``, or ``max(1, expert_dim // 4)`` for 0."""
    return int(small_dim) if int(small_dim) > 0 else max(1, int(expert_dim) // 4)


def option_costs(expert_dim: int, small_dim: int) -> tuple[float, float, float]:
    """Compute cost of (big, small, skip) in units of the big module: ``(1, F_small/F, 0)``."""
    return (1.0, small_width(expert_dim, small_dim) / int(expert_dim), 0.0)


def parse_probs(spec: Any) -> tuple[float, float, float]:
    """``'0.5,0.25,0.25'`` -> probabilities of (big, small, skip); one-line ``ValueError``
    unless they are three finite numbers >= 0 that sum to 1 (within 1e-6)."""
    try:
        probs = tuple(float(v) for v in str(spec).split(","))
    except ValueError:
        probs = ()
    if (len(probs) != 3 or not all(math.isfinite(p) and p >= 0 for p in probs)
            or abs(sum(probs) - 1.0) > 1e-6):
        raise ValueError(f"moe.duo_probs={spec!r} must be three numbers >= 0 summing to 1: "
                         "probabilities of big,small,skip, e.g. '0.5,0.25,0.25'")
    return probs


def parse_eval_sweep(spec: Any) -> tuple[str, ...]:
    """``moe.duo_eval_sweep``: ``''`` or comma-separated routes of ``big, small, skip, router``."""
    routes = tuple(s.strip() for s in str(spec).split(",") if s.strip())
    bad = [r for r in routes if r not in EVAL_ROUTES[1:]]
    if bad:
        raise ValueError(f"moe.duo_eval_sweep={spec!r} has unknown route {bad[0]!r}; allowed: '' or "
                         f"comma-separated of {', '.join(EVAL_ROUTES[1:])}")
    return routes


@register("duo")
class DuoRouter(Router):
    """Picks one of the options (0 big, 1 small, 2 skip) for each token: ``x [T, D] ->
    Routing`` with ``indices`` int32 ``[T, 1]`` (the option) and ``weights`` ``[T, 1]``.

    Where the decision comes from, first match wins:

    * ``routes`` int32 ``[T]`` given (``router_inputs={'routes': ...}``, how the oracle
      and :class:`~routezoo.zoo.lm.DecoderLM`'s ``routes=`` set them): exactly those,
      weight 1;
    * training (``deterministic=False``), ``mode='random'``: a draw from ``probs`` per
      token (RNG stream ``'router'``), weight 1;
    * training, ``mode='router'``: ``argmax_o p_o`` (``sample``: a draw from ``p``, stream
      ``'router'``), weight ``1 + p_c - stop_gradient(p_c)``;
    * evaluation: ``eval_route`` (``'auto'``: ``'big'`` in random mode, ``'router'`` in
      router mode); ``'router'`` is the argmax with the straight-through weight.

    ``p = softmax(x W)`` with the float32 kernel ``W`` ``[D, w]`` (``kernel``, logical names
    ``('embed', None)``, Switch's init), created in every mode so that a router run can
    start from a random-routing run's parameters. In router mode ``losses`` holds
    ``duo_cost = cost_coef · mean_T Σ_o p_o cost_o`` (when ``cost_coef > 0``) and ``stats``
    ``expected_cost`` (unscaled) and ``router_entropy``; in every mode ``stats`` holds the
    fractions of tokens on each option (``frac_big``, ``frac_small``, ``frac_skip``) and
    the mean cost per token of the options taken (``cost``). ``num_experts`` is fixed to 3
    (the options); ``moe.num_experts``, ``k``, ``load_balance_coef`` and ``z_loss_coef``
    are not used by Duo (``jitter`` is).
    """

    num_experts: int = 3
    mode: str = "random"
    probs: tuple[float, float, float] = (0.5, 0.25, 0.25)
    eval_route: str = "auto"
    sample: bool = False
    cost_coef: float = 0.0
    costs: tuple[float, float, float] = (1.0, 0.25, 0.0)

    causal: ClassVar[bool] = True
    accepts_routes: ClassVar[bool] = True
    supports_mtp: ClassVar[bool] = False
    scannable: ClassVar[bool] = False         # per-layer routes come from outside the layers
    makes_expert_choices: ClassVar[bool] = False
    analysis_note: ClassVar[str] = (
        "moe.router='duo' (Duo-LLM) chooses big/small/skip, not experts; its option fractions are in "
        "metrics.jsonl and routezoo.zoo.duo.summarize_oracle analyses oracle routes")
    config_keys: ClassVar[dict[str, Any]] = {
        # random (stage 1: options drawn from duo_probs in training) | router (stage 3: learned router)
        "duo_mode": "random",
        # hidden width of the small FFN; 0 = expert_dim // 4 (paper's width unverified)
        "duo_small_dim": 0,
        # random mode's training probabilities of big,small,skip (paper's values unverified)
        "duo_probs": "0.5,0.25,0.25",
        # route at evaluation: auto (random: big; router: router) | big | small | skip | router
        "duo_eval_route": "auto",
        # also evaluate with these routes during training (eval_loss@big, ...), e.g. "big,small,skip"
        "duo_eval_sweep": "",
        # router mode, training: sample the option from the router's softmax instead of argmax
        "duo_router_sample": False,
        # router mode: coef * mean_tokens sum_o p_o cost_o (cost big 1, small small/expert_dim, skip 0;
        # value unverified)
        "duo_cost_coef": 0.01,
    }

    @nn.compact
    def __call__(self, x: Array, *, deterministic: bool, group_size: int | None = None,
                 routes: Array | None = None) -> Routing:
        # x: [T, D]; routes: int32 [T] (or any shape with T elements) or None
        if self.mode not in DUO_MODES:
            raise ValueError(f"duo router: unknown mode {self.mode!r}; known: {list(DUO_MODES)}")
        if self.eval_route not in EVAL_ROUTES:
            raise ValueError(f"duo router: unknown eval_route {self.eval_route!r}; known: {list(EVAL_ROUTES)}")
        if self.num_experts != len(OPTIONS):
            raise ValueError(f"duo router: num_experts must be {len(OPTIONS)} (big, small, skip)")
        num_tokens = x.shape[0]
        _num_groups(num_tokens, group_size)
        logits = self.router_logits(x, deterministic)  # [T, w] float32
        p = jax.nn.softmax(logits, axis=-1)  # [T, w]
        ones = jnp.ones((num_tokens,), jnp.float32)
        source = "given" if routes is not None else None
        if source is None and not deterministic:
            source = self.mode
        if source is None:
            route = self.eval_route if self.eval_route != "auto" else ("big" if self.mode == "random" else "router")
            source = "router" if route == "router" else route

        if source == "given":
            choice = jnp.asarray(routes).reshape(-1).astype(jnp.int32)
            if choice.shape[0] != num_tokens:
                raise ValueError(f"duo router: {choice.shape[0]} routes for {num_tokens} tokens")
            weight = ones
        elif source == "random":
            log_probs = jnp.log(jnp.asarray(self.probs, jnp.float32))  # [w]; log 0 = -inf: never drawn
            choice = jax.random.categorical(self.make_rng("router"), log_probs, shape=(num_tokens,))
            weight = ones
        elif source == "router":
            if self.sample and not deterministic:
                choice = jax.random.categorical(self.make_rng("router"), logits, axis=-1)
            else:
                choice = jnp.argmax(p, axis=-1)
            p_c = jnp.take_along_axis(p, choice[:, None].astype(jnp.int32), axis=-1)[:, 0]  # [T]
            weight = 1.0 + p_c - jax.lax.stop_gradient(p_c)  # value 1, gradient of p_c
        else:  # a fixed option for every token
            choice = jnp.full((num_tokens,), OPTIONS.index(source), jnp.int32)
            weight = ones
        choice = choice.astype(jnp.int32)

        costs = jnp.asarray(self.costs, jnp.float32)  # [w]
        onehot = jax.nn.one_hot(choice, len(OPTIONS), dtype=jnp.float32)  # [T, w]
        frac = jnp.mean(onehot, axis=0)  # [w]
        stats = {f"frac_{name}": frac[i] for i, name in enumerate(OPTIONS)}
        stats["cost"] = jnp.sum(frac * costs)
        losses = {}
        if self.mode == "router":
            expected = jnp.mean(jnp.einsum("Tw,w->T", p, costs))
            if self.cost_coef > 0:
                losses["duo_cost"] = self.cost_coef * expected
            stats["expected_cost"] = expected
            logp = jnp.log(jnp.maximum(p, jnp.finfo(jnp.float32).tiny))
            stats["router_entropy"] = jnp.mean(-jnp.sum(p * logp, axis=-1))
        return Routing(indices=choice[:, None], weights=weight[:, None].astype(jnp.float32),
                       losses=losses, stats=stats)

    @classmethod
    def from_config(cls, moe_cfg: Any, **kwargs) -> "DuoRouter":
        common = cls.common_kwargs(moe_cfg)
        common["num_experts"] = len(OPTIONS)
        return cls(**common, mode=str(moe_cfg.duo_mode), probs=parse_probs(moe_cfg.duo_probs),
                   eval_route=str(moe_cfg.duo_eval_route), sample=bool(moe_cfg.duo_router_sample),
                   cost_coef=float(moe_cfg.duo_cost_coef),
                   costs=option_costs(int(moe_cfg.expert_dim), int(moe_cfg.duo_small_dim)), **kwargs)

    @classmethod
    def build_block(cls, moe_cfg: Any, *, d_model: int, dtype: Any, param_dtype: Any,
                    name: str | None = None) -> "DuoFFN":
        """:class:`DuoFFN` (:func:`duo_from_config`): big / small / skip in the MoE slot."""
        return duo_from_config(moe_cfg, d_model=d_model, dtype=_dtype(dtype), param_dtype=_dtype(param_dtype),
                               name=name)

    @classmethod
    def model_routing(cls, model_cfg: Any, *, tokens: Array, positions: Array, routes: Array | None,
                      num_moe_layers: int, dtype: Any, param_dtype: Any) -> ModelRouting:
        """The model's ``routes`` int32 ``[Z, B, L]`` (0 big, 1 small, 2 skip), one ``[B·L]``
        slice per Duo layer; ``None``: each layer decides. One-line ``ValueError`` for
        another shape."""
        b, l = tokens.shape
        if routes is not None and routes.shape != (num_moe_layers, b, l):
            raise ValueError(f"DecoderLM: duo routes must be int32 [M, B, L] = {(num_moe_layers, b, l)}, "
                             f"got {routes.shape}")
        return _FixedRoutes(routes)

    @classmethod
    def eval_variants(cls, moe_cfg: Any) -> dict[str, dict[str, Any]]:
        """``moe.duo_eval_sweep``: the same model also evaluated with each listed route for
        every token and layer (metrics ``eval_loss@big``, ``eval_loss@skip``, ...)."""
        return {route: {"duo_eval_route": route} for route in parse_eval_sweep(moe_cfg.duo_eval_sweep)}

    @classmethod
    def check_config(cls, moe_cfg: Any, *, causal: bool) -> None:
        super().check_config(moe_cfg, causal=causal)
        for key, allowed in (("duo_mode", DUO_MODES), ("duo_eval_route", EVAL_ROUTES)):
            if moe_cfg[key] not in allowed:
                raise ValueError(f"moe.{key}={moe_cfg[key]!r} is unknown; known: {list(allowed)}")
        parse_probs(moe_cfg.duo_probs)
        parse_eval_sweep(moe_cfg.duo_eval_sweep)
        if int(moe_cfg.duo_small_dim) < 0:
            raise ValueError(f"moe.duo_small_dim={moe_cfg.duo_small_dim} must be >= 0 "
                             "(0: moe.expert_dim // 4)")
        if not float(moe_cfg.duo_cost_coef) >= 0:
            raise ValueError(f"moe.duo_cost_coef={moe_cfg.duo_cost_coef} must be >= 0")
        for key, off in (("num_shared_experts", 0), ("residual_mlp", False)):
            if moe_cfg[key] != off:
                raise ValueError(f"moe.{key}={moe_cfg[key]!r} is not used by moe.router='duo'; "
                                 f"allowed: {off!r}")


class _FixedRoutes(ModelRouting):
    """Options fixed from outside the model, int32 ``[Z, B, L]``, or ``None``."""

    def __init__(self, routes: Array | None) -> None:
        self.routes = routes

    def layer_inputs(self, moe_index: int, batch: int, length: int) -> dict[str, Any] | None:
        if self.routes is None:
            return None
        return {"routes": self.routes[moe_index].reshape(batch * length)}


class DuoFFN(nn.Module):
    """Duo-LLM feed-forward slot (see the module docstring): ``x [B, L, D] -> (y [B, L, D],
    aux)`` with ``y_t = w_t · module_{c_t}(x_t)``, ``c_t`` the option of token ``t`` (0 big,
    1 small, 2 skip: ``y_t = 0``) and ``w_t`` its weight from :class:`DuoRouter`.

    Attributes:
      expert_dim: hidden width ``F`` of the big module.
      small_dim: hidden width of the small module (0: ``max(1, expert_dim // 4)``).
      expert_type: ``'swiglu'`` or ``'gelu'``: both modules are :class:`~routezoo.layers.mlp.MLP`
        of that type (parameters ``big/{wi, wg, wo}``, ``small/{wi, wg, wo}``).
      router: a :class:`DuoRouter` (adopted as submodule ``router``); ``None``: defaults.
      d_model: if set, the input width must equal it.
      dtype / param_dtype: module compute dtype / parameter dtype (the router is float32).

    ``router_inputs={'routes': int32 [T] or [B, L]}`` fixes every token's option (see
    :class:`DuoRouter`); ``token_ids`` is not used. ``aux = {'losses': ..., 'stats': ...}``
    as the router returns them.
    """

    expert_dim: int = 256
    small_dim: int = 0
    expert_type: str = "swiglu"
    router: DuoRouter | None = None
    d_model: int | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, *, deterministic: bool, token_ids: Array | None = None,
                 router_inputs: dict[str, Any] | None = None) -> tuple[Array, dict[str, Any]]:
        # x: [B, L, D]
        b, l, d = x.shape
        if self.d_model is not None and d != self.d_model:
            raise ValueError(f"DuoFFN: input width {d} != d_model {self.d_model}")
        unknown = sorted(set(router_inputs or {}) - {"routes"})
        if unknown:
            raise ValueError(f"DuoFFN: unknown router_inputs {unknown}; allowed: 'routes' (int32 [T])")
        routes = (router_inputs or {}).get("routes")
        x = sharding.constrain(x, ("batch", "length", "act_embed"))
        router = self.router if self.router is not None else DuoRouter(name="router")
        routing = router(x.reshape(b * l, d), deterministic=deterministic, routes=routes)
        choice = routing.indices[:, 0].reshape(b, l)  # [B, L]
        weight = routing.weights[:, 0].reshape(b, l)  # [B, L]

        xc = x.astype(self.dtype)
        y_big = MLP(self.expert_dim, self.expert_type, dtype=self.dtype, param_dtype=self.param_dtype,
                    name="big")(xc)  # [B, L, D]
        y_small = MLP(small_width(self.expert_dim, self.small_dim), self.expert_type, dtype=self.dtype,
                      param_dtype=self.param_dtype, name="small")(xc)  # [B, L, D]
        y = jnp.where((choice == BIG)[..., None], y_big,
                      jnp.where((choice == SMALL)[..., None], y_small, jnp.zeros_like(y_big)))
        y = y * weight[..., None].astype(self.dtype)  # [B, L, D]
        y = sharding.constrain(y, ("batch", "length", "act_embed"))
        return y.astype(self.dtype), {"losses": dict(routing.losses), "stats": dict(routing.stats)}


def duo_from_config(moe_cfg: Any, *, d_model: int, dtype: Any, param_dtype: Any,
                    name: str | None = None) -> DuoFFN:
    """Builds :class:`DuoFFN` from ``config.model.moe`` (``moe.router='duo'``; keys
    ``expert_dim``, ``expert_type``, ``duo_*``, see ``configs/base.py``)."""
    return DuoFFN(expert_dim=int(moe_cfg.expert_dim), small_dim=int(moe_cfg.duo_small_dim),
                  expert_type=str(moe_cfg.expert_type),
                  router=DuoRouter.from_config(moe_cfg, parent=None),  # adopted as 'router'
                  d_model=int(d_model), dtype=dtype, param_dtype=param_dtype, name=name)
