"""Capturing the routing decisions of a model's forward pass and recomputing capacity drops.

Shapes: ``B`` batch, ``L`` length, ``T`` tokens (``B·L``), ``K`` slots per token.
"""

from __future__ import annotations

import functools
import re
from typing import Any

import jax
import jax.numpy as jnp

from routezoo.layers.routers import Router, Routing, expert_capacity


def moe_layer_indices(model_cfg: Any) -> list[int]:
    """Indices of the layers whose feed-forward slot is an MoE."""
    from routezoo.zoo.lm import ffn_kinds
    return [i for i, kind in enumerate(ffn_kinds(model_cfg)) if kind == "moe"]


def _is_router_call(module: Any, method_name: str) -> bool:
    return method_name == "__call__" and isinstance(module, Router)


def _layer_of(path) -> int | None:
    for key in path:
        m = re.fullmatch(r"layer(\d+)", str(getattr(key, "key", "")))
        if m:
            return int(m.group(1))
    return None


def find_routings(intermediates: Any) -> dict[int, Routing]:
    """``{layer index: Routing}`` from a ``capture_intermediates`` tree.

    Per layer the outermost router call is kept (its first call, if the model ran the
    layer more than once); routers outside ``layer{i}`` modules are numbered in order.
    """
    leaves = jax.tree_util.tree_flatten_with_path(
        intermediates, is_leaf=lambda x: isinstance(x, Routing))[0]
    found: dict[int, tuple[int, Routing]] = {}
    extra = 0
    for path, leaf in leaves:
        if not isinstance(leaf, Routing):
            continue
        layer = _layer_of(path)
        if layer is None:
            layer, extra = 10_000 + extra, extra + 1
        depth = len(path)
        if layer not in found or depth < found[layer][0]:
            found[layer] = (depth, leaf)
    return {layer: r for layer, (_, r) in sorted(found.items())}


def capture_routing(model: Any, variables: dict[str, Any], tokens: jax.Array, *,
                    deterministic: bool = True, rngs: dict[str, jax.Array] | None = None):
    """Runs ``model`` on ``tokens [B, L]`` and returns ``(logits, aux, {layer: Routing})``.

    The model is unchanged: the routers' outputs are captured with Flax's
    ``capture_intermediates``. ``Routing.indices`` / ``weights`` are ``[B·L, K]``. A
    scanned model (``model.scan_layers``) runs here in its unscanned form on the same
    values (:func:`routezoo.zoo.stack.to_unscanned`), so every layer's routing is
    captured under its own index.
    """
    from routezoo.zoo import stack
    model, variables = stack.as_unscanned(model, dict(variables))
    (logits, aux), state = model.apply(variables, tokens, deterministic=deterministic, rngs=rngs,
                                       capture_intermediates=_is_router_call,
                                       mutable=["intermediates"])
    return logits, aux, find_routings(state["intermediates"])


def dropped_mask(indices: jax.Array, priority: jax.Array | None, *, num_experts: int,
                 group_size: int, capacity: int, fill: str = "token") -> jax.Array:
    """bool ``[T, K]``: routed copies (``indices >= 0``) that capacity dispatch drops.

    Same rule as the dispatcher: :func:`routezoo.layers.moe.capacity.capacity_slots` per
    routing group of ``group_size`` consecutive tokens, ``capacity`` slots per expert.
    """
    from routezoo.layers.moe.capacity import capacity_slots
    t, k = indices.shape
    g = t // group_size
    idx = jnp.asarray(indices).reshape(g, group_size, k)
    prio = None if priority is None else jnp.asarray(priority).reshape(g, group_size)
    slot, _ = jax.vmap(functools.partial(capacity_slots, num_experts=num_experts,
                                         capacity=capacity, fill=fill))(idx, prio)
    return ((idx >= 0) & (slot >= num_experts * capacity)).reshape(t, k)


def drop_settings(moe_cfg: Any, group_size: int, k: int) -> list[tuple[str, float | None, int | None]]:
    """``(name, capacity_factor, capacity)`` of each drop setting analysed.

    Capacity dispatch: ``eval`` (``eval_capacity_factor``) and ``train``
    (``capacity_factor``); dropless (or expert choice, which never drops): ``dropless``.
    """
    from routezoo.layers.routers import router_class
    if str(moe_cfg.dispatch) != "capacity" or router_class(str(moe_cfg.router)).expert_major:
        return [("dropless", None, None)]
    e, mc = int(moe_cfg.num_experts), int(moe_cfg.min_capacity)
    from routezoo.layers.moe.block import parse_expert_maps
    # moe.expert_map: a physical expert serving m router outputs holds up to m·S copies (the block's rule)
    mult = max([max(m.count(x) for x in set(m)) for m in parse_expert_maps(str(moe_cfg.get("expert_map", "") or ""))]
               or [1])
    return [(name, float(cf), expert_capacity(group_size * mult, e * mult, k, float(cf), mc))
            for name, cf in (("eval", moe_cfg.eval_capacity_factor), ("train", moe_cfg.capacity_factor))]


def make_forward(model: Any, moe_cfg: Any, seq_len: int) -> Any:
    """Jitted ``(params, model_state, inputs [B, L]) -> {layer: decisions}``.

    ``decisions``: ``indices`` / ``weights`` ``[B, L, K]``, ``dropped`` ``{setting: bool
    [B, L, K]}`` and ``dropped_fraction_diff``: |the model's ``dropped_fraction`` statistic
    - the recomputed one| for the setting this pass ran (a check of the recomputation).
    """
    e = int(moe_cfg.num_experts)
    s = int(moe_cfg.group_size) or seq_len
    # with model.moe.expert_map the routers name logical experts; capacity drops happen on
    # the physical expert each one maps to
    maps = {}
    if str(moe_cfg.get("expert_map", "") or "").strip():
        from routezoo.layers.moe.block import layer_expert_maps
        layers = moe_layer_indices(model.cfg)
        maps = dict(zip(layers, layer_expert_maps(moe_cfg, len(layers))))

    def forward(params, model_state, inputs):
        b, l = inputs.shape
        _, aux, routings = capture_routing(model, {"params": params, **model_state}, inputs)
        out = {}
        for layer, r in routings.items():
            k = r.indices.shape[-1]
            dropped = {}
            for name, _, c in drop_settings(moe_cfg, s, k):
                if c is None or r.expert_indices is not None:
                    d = jnp.zeros(r.indices.shape, bool)
                else:
                    ids = r.indices
                    if layer in maps:
                        table = jnp.asarray(maps[layer], jnp.int32)
                        ids = jnp.where(ids >= 0, table[jnp.clip(ids, 0, len(maps[layer]) - 1)], -1)
                    d = dropped_mask(ids, r.priority, num_experts=e, group_size=s, capacity=c,
                                     fill=str(moe_cfg.capacity_fill))
                dropped[name] = d.reshape(b, l, k)
            # the setting this forward pass ran (eval or dropless), over all tokens, padding
            # included, as the model's own statistic counts: a check of the recomputation
            valid = r.indices >= 0
            ran = dropped[next(iter(dropped))].reshape(-1, k)
            recomputed = jnp.sum(ran & valid) / jnp.maximum(jnp.sum(valid), 1)
            stat = aux["stats"].get(f"layer{layer}/dropped_fraction", jnp.zeros((), jnp.float32))
            out[layer] = {"indices": r.indices.reshape(b, l, k),
                          "weights": r.weights.astype(jnp.float32).reshape(b, l, k),
                          "dropped": dropped,
                          "dropped_fraction_diff": jnp.abs(recomputed - stat)}
        return out

    return jax.jit(forward)
