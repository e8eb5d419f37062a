"""Capacity dispatch: fixed per-expert buffers, tokens over capacity dropped and counted.

Einsum letters: ``T`` tokens, ``D`` embed, ``F`` expert_mlp, ``E`` experts, ``C`` capacity,
``K`` experts per token (slots), ``G`` routing groups, ``S`` group size.

* :func:`capacity_moe` (Switch Transformers, GShard): fixed ``[G, E, C, D]`` buffers per
  routing group. Copies fill an expert's ``C`` slots in token order (``fill='token'``:
  token 0's copies, then token 1's, ...; the only order that keeps a decoder causal,
  since whether a copy is kept then depends on earlier tokens only) or in slot order
  (``fill='slot'``: all first choices, then all second choices, as GShard; with ``K >= 2``
  a later token's first choice can displace an earlier token's second choice), and
  with ``Routing.priority`` by decreasing priority (batch-prioritised routing). Copies over
  capacity are dropped: their MoE output is 0 and the residual carries the token. Two
  implementations of the same maths: ``'index'`` (gathers only, into and out of the
  buffers, with gather VJPs; the main path, memory ``O(S·K·D)``) and ``'einsum'``
  (one-hot ``[G, S, E, C]`` dispatch and combine tensors, the vmoe/flaxformer
  formulation, memory ``O(S·E·C)``; a reference for tests). Expert
  parallelism comes from sharding constraints: the buffers are constrained with experts
  on ``act_expert`` and groups on ``batch`` (minus the mesh axes ``act_expert`` took), so
  XLA inserts the all-to-all.
* :func:`expert_choice_moe`: the expert-major routing of expert choice (each expert
  already holds exactly ``C`` tokens): a gather into ``[G, E, C, D]``, the experts, a
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from routezoo.layers import sharding
from routezoo.layers.moe.gmm import MOE_GMM_IN, MOE_PERM, take_rows
from routezoo.layers.moe.exchange import constrain_expert_parallel
from routezoo.layers.moe.gmm import ffn_batched

Array = jax.Array
Params = Mapping[str, Array]


CAPACITY_IMPLS = ("index", "einsum")
CAPACITY_FILLS = ("token", "slot")


# ------------------------------------------------------------------ capacity


def _experts_on_buffers(buf: Array, params: Params, *, expert_type: str) -> tuple[Array, Array]:
    """Experts on ``[G, E, C, D]`` buffers, with the layout changes that make the
    all-to-all: built group-sharded, computed expert-sharded, returned group-sharded.

    The group-sharded constraint on ``buf`` matters for the backward pass: without it the
    cotangent would reach the dispatch gather expert-sharded and XLA would all-reduce
    whole buffers instead of exchanging them.
    """
    by_group = ("batch", None, "capacity", "act_embed")
    by_expert = ("batch", "act_expert", "capacity", "act_embed")
    buf = constrain_expert_parallel(sharding.constrain(buf, by_group), by_expert)
    buf = checkpoint_name(buf, MOE_GMM_IN)  # the experts' input, what save_moe_dispatch keeps
    out = constrain_expert_parallel(ffn_batched(buf, params, expert_type=expert_type), by_expert)
    return buf, sharding.constrain(out, by_group)


def capacity_slots(indices: Array, priority: Array | None, num_experts: int,
                   capacity: int, fill: str = "token") -> tuple[Array, Array]:
    """Buffer slots of one group's token copies, and the copy in each slot.

    Copies queue for their expert in fill order: tokens in order (or, with
    ``priority``, by decreasing priority: batch-prioritised routing), and then
    ``fill='token'``: each token's copies together (token-major, causal) or
    ``fill='slot'``: slot level ``k`` major (all first choices before any second
    choice, as GShard). The first ``C`` of each queue are kept. Computed with one stable
    sort and gathers, memory ``O(S·K)``.

    Args:
      indices: int32 ``[S, K]`` expert per slot (``-1``: none).
      priority: ``[S]`` or ``None``.
      num_experts: ``E``. capacity: ``C``. fill: ``'token'`` or ``'slot'``.

    Returns:
      slot: int32 ``[S, K]``: flat buffer slot ``e·C + c`` of each copy, ``E·C`` if the
        copy is dropped or empty.
      src: int32 ``[E·C]``: copy id ``t·K + k`` held by each buffer slot, ``S·K`` if empty.
    """
    s, k = indices.shape
    e, c = num_experts, capacity
    if priority is None:
        token_order = jnp.arange(s, dtype=jnp.int32)
    else:
        token_order = jnp.argsort(-priority, stable=True).astype(jnp.int32)  # [S]
    if fill not in CAPACITY_FILLS:
        raise ValueError(f"unknown capacity fill order {fill!r}; known: {list(CAPACITY_FILLS)}")
    copy_ids = token_order[None, :] * k + jnp.arange(k, dtype=jnp.int32)[:, None]  # [K, S]
    # copy ids (t·K + k) in fill order: slot: all slot-0 copies, then slot 1, ...;
    # token: token 0's copies, then token 1's, ...
    order = (copy_ids if fill == "slot" else copy_ids.T).reshape(-1)  # [K·S]
    flat = indices.reshape(-1)
    ids = jnp.where(flat < 0, e, flat)[order]  # [K·S] expert of each copy in fill order
    perm = jnp.argsort(ids, stable=True)  # queue of each expert, contiguous
    sorted_ids = ids[perm]
    counts = jnp.zeros((e + 1,), jnp.int32).at[ids].add(1)  # [E+1]
    starts = jnp.cumsum(counts) - counts
    rank = jnp.arange(s * k, dtype=jnp.int32) - starts[sorted_ids]  # place in its queue
    kept = (sorted_ids < e) & (rank < c)
    sorted_slot = jnp.where(kept, sorted_ids * c + rank, e * c)
    slot = jnp.zeros((s * k,), jnp.int32).at[order[perm]].set(sorted_slot)  # [S·K]

    # slot (e, c) holds queue entry starts[e] + c when c < counts[e]
    q = starts[:e, None] + jnp.arange(c, dtype=jnp.int32)[None, :]  # [E, C]
    full = jnp.arange(c, dtype=jnp.int32)[None, :] < counts[:e, None]
    src = jnp.where(full, order[perm[jnp.minimum(q, s * k - 1)]], s * k).reshape(-1)  # [E·C]
    return slot.reshape(s, k), src


def capacity_moe(x: Array, indices: Array, weights: Array, priority: Array | None,
                 params: Params, *, capacity: int, expert_type: str,
                 impl: str = "index", fill: str = "token") -> tuple[Array, Array]:
    """Capacity-buffer MoE on routing groups.

    Args:
      x: ``[G, S, D]`` token states (compute dtype).
      indices, weights: ``[G, S, K]`` routing (``-1``: empty slot).
      priority: ``[G, S]`` or ``None`` (see :func:`capacity_slots`).
      params: expert weights (see module docstring).
      capacity: ``C`` slots per expert and group.
      impl: ``'index'`` (gathers with :func:`take_rows`) or ``'einsum'`` (one-hot
        ``[G, S, E, C]`` reference).
      fill: queue order of the copies, ``'token'`` or ``'slot'`` (:func:`capacity_slots`).

    Returns: ``y [G, S, D]`` and the dropped fraction of routed copies (scalar).
    """
    if impl not in CAPACITY_IMPLS:
        raise ValueError(f"unknown capacity impl {impl!r}; known: {list(CAPACITY_IMPLS)}")
    g, s, d = x.shape
    k = indices.shape[-1]
    e, c = params["wi"].shape[0], capacity
    slot, src = jax.vmap(functools.partial(capacity_slots, num_experts=e, capacity=c, fill=fill))(
        indices, priority)  # [G, S, K], [G, E·C]
    slot, src = checkpoint_name(slot, MOE_PERM), checkpoint_name(src, MOE_PERM)
    valid = indices >= 0
    kept = slot < e * c  # [G, S, K]
    dropped = jnp.sum(valid & ~kept) / jnp.maximum(jnp.sum(valid), 1)
    combine_w = jnp.where(kept, weights, 0.0).astype(jnp.float32)  # [G, S, K]

    x = sharding.constrain(x, ("batch", "length", "act_embed"))
    if impl == "index":
        copies = jnp.broadcast_to(x[:, :, None, :], (g, s, k, d)).reshape(g, s * k, d)  # [G, S·K, D]
        slot_flat = slot.reshape(g, s * k)
        buf = jax.vmap(take_rows)(copies, src, slot_flat).reshape(g, e, c, d)  # [G, E, C, D]
    else:
        dispatch = jnp.sum(jax.nn.one_hot(slot, e * c, dtype=x.dtype), axis=2).reshape(g, s, e, c)
        buf = jnp.einsum("GSEC,GSD->GECD", dispatch, x)

    buf, out = _experts_on_buffers(buf, params, expert_type=expert_type)  # [G, E, C, D]

    if impl == "index":
        out_copies = jax.vmap(take_rows)(out.reshape(g, e * c, d), slot_flat, src)  # [G, S·K, D]
        y = jnp.einsum("GSKD,GSK->GSD", out_copies.reshape(g, s, k, d).astype(jnp.float32), combine_w)
    else:
        one_hot = jax.nn.one_hot(slot, e * c, dtype=jnp.float32).reshape(g, s, k, e, c)
        combine = jnp.einsum("GSKEC,GSK->GSEC", one_hot, combine_w)
        y = jnp.einsum("GSEC,GECD->GSD", combine, out.astype(jnp.float32))
    y = sharding.constrain(y.astype(x.dtype), ("batch", "length", "act_embed"))
    return y, dropped.astype(jnp.float32)


def expert_choice_moe(x: Array, expert_indices: Array, expert_weights: Array, params: Params, *,
                      expert_type: str) -> Array:
    """Expert-major MoE (expert choice): ``x [G, S, D]``, ``expert_indices/weights
    [G, E, C]`` (group-local token index per slot) ``-> y [G, S, D]``."""
    g, s, d = x.shape
    x = sharding.constrain(x, ("batch", "length", "act_embed"))
    buf = jax.vmap(lambda xg, ig: jnp.take(xg, ig, axis=0))(x, expert_indices)  # [G, E, C, D]
    buf, out = _experts_on_buffers(buf, params, expert_type=expert_type)
    out = jnp.einsum("GECD,GEC->GECD", out.astype(jnp.float32), expert_weights.astype(jnp.float32))

    def scatter(og, ig):  # [E, C, D], [E, C] -> [S, D]
        return jnp.zeros((s, d), jnp.float32).at[ig.reshape(-1)].add(og.reshape(-1, d))
    y = jax.vmap(scatter)(out, expert_indices)
    return sharding.constrain(y.astype(x.dtype), ("batch", "length", "act_embed"))
