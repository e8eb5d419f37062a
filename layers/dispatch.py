"""Dispatchers: move token copies to experts, run the experts, combine the results.

Einsum letters: ``T`` tokens, ``D`` embed, ``F`` expert_mlp, ``E`` experts, ``C`` capacity,
``K`` experts per token (slots), ``G`` routing groups, ``S`` group size, ``M`` rows of a
grouped matmul (token copies), ``N`` expert shards (size of the ``expert`` mesh axes).

Experts are given as a dict of stacked weights (already in the compute dtype):
``wi`` ``[E, D, F]``, ``wo`` ``[E, F, D]`` and, for SwiGLU, ``wi_gate`` ``[E, D, F]``;
their logical axis names are :data:`EXPERT_PARAM_NAMES`.

Three dispatchers, all pure functions:

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
  scatter-add back. Sharded like the capacity buffers.
* :func:`dropless_moe` (MegaBlocks-style dropless MoE): token copies sorted by expert,
  one grouped matmul per weight (backend chosen by name, :data:`GMM_BACKENDS`), unsorted
  and combined; nothing is dropped. Row moves use :func:`take_rows`, a gather with a
  custom VJP that is again a gather (the inverse permutation comes from a scatter of
  ``arange``, never an argsort). Under a mesh it runs in ``jax.shard_map`` over the mesh
  axes of ``batch`` and of the ``expert`` parameter axis; with more than one expert shard
  the token copies travel by one of two exchanges (``exchange``, config
  ``moe.ep_exchange``, :data:`EP_EXCHANGES`):

  - ``'padded'`` (:func:`_dropless_all_to_all`): ``jax.lax.all_to_all`` of padded
    buffers ``[N, T·K, D]``, one fixed-size block per destination, large enough for all
    local copies. It runs on every backend, but sends ``N`` times the copies' bytes and
    the receiver sorts and multiplies all ``N·T·K`` rows.
  - ``'ragged'`` (:func:`_dropless_ragged`): ``jax.lax.ragged_all_to_all`` of the real
    rows only (``T·K`` per shard, sorted by expert, one slice per destination). Only the
    per-expert counts ``[E]`` travel besides (an ``all_gather`` gives every shard the
    ``[N, E]`` matrix, from which all offsets and the receiver's reorder into
    expert-major order follow by counting-sort arithmetic; no expert ids are sent). The
    receive buffer has a static ``N·T·K`` rows, the worst case (every shard sends all its
    copies to one shard), so nothing is dropped; its memory is the padded path's, the
    bytes on the wire and the row moves are ``1/N`` of them for balanced routing.
    ``'ragged_emulated'`` runs the same offsets and reorders over
    :func:`ragged_exchange_emulated` (``all_to_all`` and gathers, padded bytes): the CPU
    tests' way to check every index of the ragged path.
  - ``'auto'`` (default): ``'padded'`` on CPU (XLA has no ``ragged-all-to-all`` there:
    ``UNIMPLEMENTED``) and on GPU (measured on 2 H200s, jax 0.11.2: XLA's
    ``ragged-all-to-all`` reached 2.7 GB/s, 35x slower than the padded ``all_to_all``;
    with its decomposer flag the block was still 3-27% slower, BENCHMARKS.md),
    ``'ragged'`` on TPU (native there; not measured here).

  Either way nothing is dropped, even when every token picks the same expert.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.sharding import PartitionSpec as P

from routezoo.layers import sharding

Array = jax.Array
Params = Mapping[str, Array]

EXPERT_PARAM_NAMES: dict[str, tuple[str, str, str]] = {
    "wi": ("expert", "embed", "expert_mlp"),
    "wi_gate": ("expert", "embed", "expert_mlp"),
    "wo": ("expert", "expert_mlp", "embed"),
}
EXPERT_TYPES = ("swiglu", "gelu", "relu")   # relu: T5 v1.0 / Switch Transformers experts
CAPACITY_IMPLS = ("index", "einsum")
CAPACITY_FILLS = ("token", "slot")


# ------------------------------------------------------------------ expert maths


def _activation(h_in: Array, h_gate: Array | None, expert_type: str) -> Array:
    if expert_type == "swiglu":
        return jax.nn.silu(h_gate) * h_in
    if expert_type == "gelu":
        return jax.nn.gelu(h_in)
    if expert_type == "relu":
        return jax.nn.relu(h_in)
    raise ValueError(f"unknown expert_type {expert_type!r}; known: {list(EXPERT_TYPES)}")


def ffn_batched(buf: Array, params: Params, *, expert_type: str) -> Array:
    """Experts on capacity buffers: ``[G, E, C, D] -> [G, E, C, D]``."""
    names = ("batch", "act_expert", "capacity", "act_mlp")
    h = jnp.einsum("GECD,EDF->GECF", buf, params["wi"])
    g = jnp.einsum("GECD,EDF->GECF", buf, params["wi_gate"]) if expert_type == "swiglu" else None
    h = constrain_expert_parallel(_activation(h, g, expert_type), names)
    return jnp.einsum("GECF,EFD->GECD", h, params["wo"])


def gmm_ragged_dot(lhs: Array, rhs: Array, group_sizes: Array) -> Array:
    """Grouped matmul ``[M, D] x [E, D, F] -> [M, F]`` with ``jax.lax.ragged_dot``.

    Rows ``sum(group_sizes)..M`` are unspecified; callers mask them.
    """
    out = jax.lax.ragged_dot(lhs, rhs, group_sizes, preferred_element_type=jnp.float32)
    return out.astype(lhs.dtype)


def gmm_dense(lhs: Array, rhs: Array, group_sizes: Array) -> Array:
    """Reference grouped matmul: every expert on every row, then a mask (tests only)."""
    num_groups = rhs.shape[0]
    ends = jnp.cumsum(group_sizes)
    row_group = jnp.searchsorted(ends, jnp.arange(lhs.shape[0]), side="right")  # [M], E = none
    mask = jax.nn.one_hot(row_group, num_groups, dtype=jnp.float32)  # [M, E]
    out = jnp.einsum("MD,EDF->MEF", lhs, rhs, preferred_element_type=jnp.float32)
    return jnp.einsum("MEF,ME->MF", out, mask).astype(lhs.dtype)


def gmm_blocked(lhs: Array, rhs: Array, group_sizes: Array, block: int | None = None) -> Array:
    """Grouped matmul as one batched matmul over fixed-size row blocks (plain XLA).

    Each expert's rows are padded to a multiple of ``block`` (``P`` rows in all, at most
    ``M + E·(block - 1)``), so every block of ``block`` rows belongs to one expert; the
    blocks are multiplied by their expert's weight: ``[B, block, D] x [B, D, F]``. The
    per-block weights come from a one-hot einsum over experts (its transpose is again an
    einsum, not a scatter-add), and rows move with :func:`take_rows` (gathers both ways).
    The default ``block`` keeps the padding under about a quarter of the rows; the price
    is the ``[B, D, F]`` per-block weights, which is why a kernel beats this on GPUs.
    Rows past ``sum(group_sizes)`` come back as 0.
    """
    m, d = lhs.shape
    e = rhs.shape[0]
    if block is None:
        block = max(64, (m // (4 * e)) // 8 * 8)
    nb = -(-(m + e * (block - 1)) // block)
    p = nb * block
    padded = -(-group_sizes // block) * block                      # [E]
    pad_start = jnp.cumsum(padded) - padded                        # [E]
    ends = jnp.cumsum(group_sizes)
    row = jnp.arange(m)
    g = jnp.searchsorted(ends, row, side="right")                  # [M]; E = past the end
    gc = jnp.minimum(g, e - 1)
    dest = jnp.where(g < e, pad_start[gc] + row - (ends[gc] - group_sizes[gc]), p)  # [M] -> [P]
    src = jnp.full((p,), m, dest.dtype).at[dest].set(row.astype(dest.dtype), mode="drop")  # [P] -> [M]
    x = take_rows(lhs, src, dest)                                  # [P, D]
    block_expert = jnp.minimum(
        jnp.searchsorted(jnp.cumsum(padded), jnp.arange(nb) * block, side="right"), e - 1)
    w = jnp.einsum("BE,EDF->BDF", jax.nn.one_hot(block_expert, e, dtype=rhs.dtype), rhs)
    y = jnp.einsum("BRD,BDF->BRF", x.reshape(nb, block, d), w,
                   preferred_element_type=jnp.float32).astype(lhs.dtype).reshape(p, -1)
    return take_rows(y, dest, src)                                 # [M, F]


def gmm_pallas(lhs: Array, rhs: Array, group_sizes: Array) -> Array:
    """Pallas (Triton) grouped-matmul kernel, :mod:`routezoo.layers.kernels.gmm_pallas`
    (interpreted off GPU: for tests, slow)."""
    from routezoo.layers.kernels.gmm_pallas import gmm_backend
    return gmm_backend(lhs, rhs, group_sizes)


def gmm_megablox(lhs: Array, rhs: Array, group_sizes: Array) -> Array:
    """Megablox, jax's own TPU grouped-matmul kernels (MaxText's dropless path), under
    routezoo's VJP and contract: :mod:`routezoo.layers.kernels.gmm_megablox` (interpreted
    off TPU: for tests, slow)."""
    from routezoo.layers.kernels.gmm_megablox import gmm
    return gmm(lhs, rhs, group_sizes)


def gmm_mosaic(lhs: Array, rhs: Array, group_sizes: Array) -> Array:
    """jax's Mosaic GPU (Hopper: wgmma + TMA) grouped-matmul kernels under routezoo's VJP
    and contract: :mod:`routezoo.layers.kernels.gmm_mosaic` (interpreted off GPU: for
    tests, slow)."""
    from routezoo.layers.kernels.gmm_mosaic import gmm_backend
    return gmm_backend(lhs, rhs, group_sizes)


GMM_BACKENDS: dict[str, Callable[[Array, Array, Array], Array]] = {
    "ragged_dot": gmm_ragged_dot,
    "blocked": gmm_blocked,
    "pallas": gmm_pallas,
    "megablox": gmm_megablox,
    "mosaic": gmm_mosaic,
    "dense": gmm_dense,
}
GMM_BACKEND_NAMES = ("auto", *GMM_BACKENDS)


def resolve_gmm_backend(name: str) -> Callable[[Array, Array, Array], Array]:
    """``'auto'`` or a :data:`GMM_BACKENDS` key.

    ``auto``: ``blocked`` on CPU (XLA:CPU lowers ``ragged_dot`` to a masked matmul over
    every expert, E times the work), ``pallas`` on NVIDIA GPUs (XLA:GPU lowers
    ``ragged_dot`` to dense ``[E, M, D]`` buffers: out of memory at real sizes; see
    BENCHMARKS.md), ``megablox`` on TPU (the kernels MaxText's dropless MoE uses; not
    measured here), ``ragged_dot`` elsewhere.
    """
    if name == "auto":
        name = {"cpu": "blocked", "gpu": "pallas", "tpu": "megablox"}.get(jax.default_backend(),
                                                                         "ragged_dot")
    if name not in GMM_BACKENDS:
        raise ValueError(f"unknown gmm_backend {name!r}; known: {list(GMM_BACKEND_NAMES)}")
    return GMM_BACKENDS[name]


def ffn_grouped(rows: Array, group_sizes: Array, params: Params, *, expert_type: str,
                gmm: Callable[[Array, Array, Array], Array]) -> Array:
    """Experts on rows sorted by expert: ``[M, D] -> [M, D]`` (``group_sizes`` ``[E]``)."""
    h = gmm(rows, params["wi"], group_sizes)  # [M, F]
    g = gmm(rows, params["wi_gate"], group_sizes) if expert_type == "swiglu" else None
    return gmm(_activation(h, g, expert_type), params["wo"], group_sizes)  # [M, D]


# ------------------------------------------------------------------ row moves


@jax.custom_vjp
def take_rows(x: Array, idx: Array, inv: Array) -> Array:
    """``out[i] = x[idx[i]]``, or 0 where ``idx[i]`` is out of range (``>= len(x)``).

    ``idx`` must be injective on its in-range entries and ``inv`` its inverse:
    ``inv[j]`` is the output row that holds ``x[j]`` (out of range if none). The VJP is
    then the gather ``dx[j] = dout[inv[j]]`` instead of a scatter-add.
    """
    return jnp.take(x, idx, axis=0, mode="fill", fill_value=0)


def _take_rows_fwd(x, idx, inv):
    return take_rows(x, idx, inv), inv


def _take_rows_bwd(inv, g):
    return jnp.take(g, inv, axis=0, mode="fill", fill_value=0), None, None


take_rows.defvjp(_take_rows_fwd, _take_rows_bwd)


def invert_permutation(perm: Array) -> Array:
    """Inverse of a permutation by a scatter of ``arange`` (no second argsort)."""
    return jnp.zeros_like(perm).at[perm].set(jnp.arange(perm.shape[0], dtype=perm.dtype))


def _sorted_expert_ffn(rows: Array, ids: Array, num_experts: int, params: Params, *,
                       expert_type: str, gmm) -> Array:
    """Experts on unsorted rows ``[M, D]`` with expert ids ``[M]`` (``>= E``: none).

    Sorts the rows by expert, runs the grouped matmul, unsorts; rows without an expert
    get 0.
    """
    ids = jnp.where((ids < 0) | (ids >= num_experts), num_experts, ids).astype(jnp.int32)
    perm = jnp.argsort(ids, stable=True)  # [M]
    inv = invert_permutation(perm)
    group_sizes = jnp.zeros((num_experts,), jnp.int32).at[ids].add(1, mode="drop")  # [E]
    sorted_rows = take_rows(rows, perm, inv)  # [M, D]
    out = ffn_grouped(sorted_rows, group_sizes, params, expert_type=expert_type, gmm=gmm)
    out = jnp.where((ids[perm] < num_experts)[:, None], out, jnp.zeros((), out.dtype))
    return take_rows(out, inv, perm)  # [M, D]


def _combine(copies: Array, weights: Array, out_dtype) -> Array:
    # copies [T, K, D], weights [T, K] -> [T, D]; combined in float32
    y = jnp.einsum("TKD,TK->TD", copies.astype(jnp.float32), weights.astype(jnp.float32))
    return y.astype(out_dtype)


# ------------------------------------------------------------------ mesh helpers


def _mesh():
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty else mesh


def mesh_axes_of(logical: str, mesh) -> tuple[str, ...]:
    """Mesh axes (of size > 1) that the rules in context map logical name ``logical`` to."""
    if mesh is None:
        return ()
    spec = nn.logical_to_mesh_axes((logical,))
    if spec is None or spec[0] is None:
        return ()
    axes = spec[0] if isinstance(spec[0], tuple) else (spec[0],)
    return tuple(a for a in axes if a in mesh.shape and mesh.shape[a] > 1)


def constrain_expert_parallel(x: Array, names: Sequence[str | None]) -> Array:
    """:func:`sharding.constrain` for expert-parallel buffers.

    Flax resolves rules in table order, so ``batch`` (listed first and mapped to
    ``data, fsdp, expert``) would take the ``expert`` axis and leave ``act_expert``
    unsharded. Here every other name is resolved first and ``batch`` gets the mesh axes
    that are left: groups on ``data, fsdp``, experts on ``expert`` with the default rules.
    """
    mesh = _mesh()
    if mesh is None or not nn.get_logical_axis_rules():
        return x
    spec: list[Any] = [None] * len(names)
    used: set[str] = set()
    for i, name in enumerate(names):
        if name is not None and name != "batch":
            axes = tuple(a for a in mesh_axes_of(name, mesh) if a not in used)
            used.update(axes)
            spec[i] = axes or None
    if "batch" in names:
        axes = tuple(a for a in mesh_axes_of("batch", mesh) if a not in used)
        spec[list(names).index("batch")] = axes or None
    return jax.lax.with_sharding_constraint(x, P(*spec))


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


# ------------------------------------------------------------------ dropless


def _dropless_local(x: Array, indices: Array, weights: Array, params: Params, *,
                    expert_type: str, gmm) -> Array:
    """Single-shard dropless MoE: ``x [T, D]``, ``indices/weights [T, K]`` -> ``[T, D]``."""
    t, k = indices.shape
    d = x.shape[-1]
    num_experts = params["wi"].shape[0]
    copies = jnp.broadcast_to(x[:, None, :], (t, k, d)).reshape(t * k, d)  # [T·K, D]
    out = _sorted_expert_ffn(copies, indices.reshape(-1), num_experts, params,
                             expert_type=expert_type, gmm=gmm)  # [T·K, D]
    return _combine(out.reshape(t, k, d), weights, x.dtype)


def _dropless_all_to_all(x: Array, indices: Array, weights: Array, params: Params, *,
                         num_experts: int, expert_axes: tuple[str, ...], num_shards: int,
                         expert_type: str, gmm) -> Array:
    """Expert-parallel dropless MoE inside ``shard_map`` (local views).

    ``x [T, D]``, ``indices/weights [T, K]`` are this shard's tokens; ``params`` hold this
    shard's ``E/N`` experts. Copies are sorted by expert (hence by destination shard),
    packed into padded blocks ``[N, T·K, D]`` (block ``j`` goes to shard ``j``), exchanged
    with ``all_to_all``, run on the local experts, and sent back the same way.
    """
    t, k = indices.shape
    d = x.shape[-1]
    m = t * k
    n = num_shards
    e_local = num_experts // n
    ids = indices.reshape(-1)
    ids = jnp.where(ids < 0, num_experts, ids).astype(jnp.int32)  # [M]; E = none
    perm = jnp.argsort(ids, stable=True)
    inv = invert_permutation(perm)
    sorted_ids = ids[perm]  # [M]
    copies = jnp.broadcast_to(x[:, None, :], (t, k, d)).reshape(m, d)
    rows = take_rows(copies, perm, inv)  # [M, D] sorted by expert

    dest = sorted_ids // e_local  # [M]; N = none
    counts = jnp.zeros((n,), jnp.int32).at[dest].add(1, mode="drop")  # [N]
    starts = jnp.cumsum(counts) - counts
    r = jnp.arange(m, dtype=jnp.int32)
    slot = jnp.where(dest < n, dest * m + r - starts[jnp.minimum(dest, n - 1)], n * m)  # [M]
    src = jnp.full((n * m,), m, jnp.int32).at[slot].set(r, mode="drop")  # [N·M]
    send = take_rows(rows, src, slot).reshape(n, m, d)  # [N, M, D]
    send_ids = jnp.full((n * m,), e_local, jnp.int32).at[slot].set(
        sorted_ids - dest * e_local, mode="drop").reshape(n, m)  # [N, M] local expert id

    axis = expert_axes if len(expert_axes) > 1 else expert_axes[0]
    recv = jax.lax.all_to_all(send, axis, 0, 0)  # [N, M, D]: block i came from shard i
    recv_ids = jax.lax.all_to_all(send_ids, axis, 0, 0)
    out = _sorted_expert_ffn(recv.reshape(n * m, d), recv_ids.reshape(-1), e_local, params,
                             expert_type=expert_type, gmm=gmm)  # [N·M, D]
    back = jax.lax.all_to_all(out.reshape(n, m, d), axis, 0, 0).reshape(n * m, d)
    out_sorted = take_rows(back, slot, src)  # [M, D]
    out_copies = take_rows(out_sorted, inv, perm)  # [M, D] in (t, k) order
    return _combine(out_copies.reshape(t, k, d), weights, x.dtype)


# ------------------------------------------------------------------ ragged exchange


EP_EXCHANGES = ("auto", "padded", "ragged", "ragged_emulated")


def resolve_ep_exchange(name: str) -> str:
    """``'auto'`` or one of :data:`EP_EXCHANGES`; returns the exchange that runs.

    ``auto``: ``ragged`` on TPU, ``padded`` on CPU (XLA:CPU has no
    ``ragged-all-to-all``: it fails with ``UNIMPLEMENTED``) and GPU (XLA's GPU
    ``ragged-all-to-all`` measured far slower than the padded exchange; module
    docstring). ``ragged_emulated`` is the ragged path with
    :func:`ragged_exchange_emulated` in place of the collective: the same offsets and
    reorders, padded bytes on the wire; it runs anywhere (the CPU tests).
    """
    if name not in EP_EXCHANGES:
        raise ValueError(f"unknown ep_exchange {name!r}; known: {list(EP_EXCHANGES)}")
    if name == "auto":
        return "ragged" if jax.default_backend() == "tpu" else "padded"
    return name


def ragged_exchange(operand: Array, output: Array, input_offsets: Array, send_sizes: Array,
                    output_offsets: Array, recv_sizes: Array, axis) -> Array:
    """``jax.lax.ragged_all_to_all`` over mesh axis (or axes) ``axis``, inside ``shard_map``.

    Semantics (jax docs and ``jax/_src/lax/parallel.py``), with ``N`` shards on ``axis``
    and the four int arrays of length ``K = N·s`` (here ``s = 1``: one slice per peer):

    * send: slice ``i`` is ``operand[input_offsets[i] : input_offsets[i] + send_sizes[i]]``
      and goes to shard ``i // s``;
    * ``output_offsets[i]`` is where slice ``i`` lands **in the receiver's** buffer, not
      in mine; ``recv_sizes[i]`` is the size of the ``i``-th slice I receive (from shard
      ``i // s``), so ``send_sizes == all_to_all(recv_sizes)`` must hold everywhere;
    * receive: the result is ``output`` with rows
      ``o[i] : o[i] + recv_sizes[i]`` replaced by the received slice ``i``, where
      ``o = all_to_all(output_offsets, axis, 0, 0, tiled=True)`` (each sender's offset
      for me); rows no slice writes keep ``output``'s values.

    AD: the JVP is the same collective on the tangents (offsets and sizes are not
    differentiated); the transpose sends the cotangent back with the roles swapped:
    ``ragged_all_to_all(ct, zeros_like(operand), o, recv_sizes,
    all_to_all(input_offsets), send_sizes)``, so rows of ``operand`` that were sent get
    their cotangent, others 0; ``output``'s cotangent is ``ct`` with the written rows
    zeroed (jax 0.10 builds that mask from +1/-1 marks at slice starts and ends, which
    miscounts when a zero-size slice starts where another one does; unused here, since
    our ``output`` buffers are constants). Offsets and sizes must be integer (int32 here)
    and rank 1. The result has ``output``'s ``shard_map`` type, so ``output`` must vary
    over the mesh axes that ``operand`` varies over: build it with
    ``jnp.zeros_like(operand, shape=...)``, not ``jnp.zeros``.
    """
    return jax.lax.ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets,
                                     recv_sizes, axis_name=axis)


def ragged_exchange_emulated(operand: Array, output: Array, input_offsets: Array, send_sizes: Array,
                             output_offsets: Array, recv_sizes: Array, axis) -> Array:
    """:func:`ragged_exchange`'s semantics from ``all_to_all`` and gathers (any backend).

    Each slice is gathered into a block of ``cap = min(len(operand), len(output))`` rows
    (no slice can be longer: it must fit on both sides), the ``[K, cap, ...]`` blocks and
    ``output_offsets`` go through a tiled ``all_to_all`` (block ``i`` of the result is the
    ``i``-th slice received, as in the collective), and each output row gathers the
    received row that lands on it, or keeps ``output``'s value. Differentiable by plain
    autodiff (gathers, ``all_to_all``, ``where``); it moves ``K·cap`` rows, so it is for
    tests and debugging, not speed.
    """
    m_in, m_out = operand.shape[0], output.shape[0]
    k = input_offsets.shape[0]
    cap = min(m_in, m_out)
    r = jnp.arange(cap, dtype=jnp.int32)
    src = jnp.where(r[None, :] < send_sizes[:, None], input_offsets[:, None] + r[None, :], m_in)  # [K, cap]
    blocks = jnp.take(operand, src.reshape(-1), axis=0, mode="fill", fill_value=0)
    blocks = blocks.reshape(k, cap, *operand.shape[1:])
    recv = jax.lax.all_to_all(blocks, axis, 0, 0, tiled=True)        # [K, cap, ...]: slice i received
    recv_offsets = jax.lax.all_to_all(output_offsets, axis, 0, 0, tiled=True)  # [K] where each lands here
    dst = jnp.where(r[None, :] < recv_sizes[:, None], recv_offsets[:, None] + r[None, :], m_out)  # [K, cap]
    row_of = jnp.full((m_out,), k * cap, jnp.int32).at[dst.reshape(-1)].set(
        jnp.arange(k * cap, dtype=jnp.int32), mode="drop")             # [M_out] received row, or K·cap
    got = jnp.take(recv.reshape(k * cap, *operand.shape[1:]), row_of, axis=0, mode="fill", fill_value=0)
    written = (row_of < k * cap).reshape((m_out,) + (1,) * (output.ndim - 1))
    return jnp.where(written, got, output)


def _exclusive_cumsum(x: Array, axis: int = 0) -> Array:
    return jnp.cumsum(x, axis=axis) - x


def _dropless_ragged(x: Array, indices: Array, weights: Array, params: Params, *,
                     num_experts: int, expert_axes: tuple[str, ...], num_shards: int,
                     expert_type: str, gmm, exchange: Callable[..., Array]) -> Array:
    """Expert-parallel dropless MoE inside ``shard_map`` that sends only real copies.

    ``x [T, D]``, ``indices/weights [T, K]`` are this shard's tokens, ``params`` its
    ``E/N`` experts, ``exchange`` :func:`ragged_exchange` or
    :func:`ragged_exchange_emulated`. With ``M = T·K`` copies per shard:

    1. Copies sorted by expert (hence by destination shard): ``rows [M, D]``; counts per
       global expert ``[E]``, all-gathered over the expert axes into ``c [N, E]``
       (``c[i, e]``: rows shard ``i`` sends expert ``e``), viewed as ``[N, N, E/N]``
       (sender, receiver, local expert). Only these counts travel besides the rows.
    2. Forward exchange, one slice per receiver ``j``: ``send_sizes[j]`` my rows for
       ``j``'s experts, ``input_offsets`` their start in ``rows``, ``output_offsets[j]``
       the rows earlier senders send ``j`` (where my slice lands there),
       ``recv_sizes[i]`` what shard ``i`` sends me.
    3. The receive buffer has ``N·M`` rows, the worst case (every shard sends me all its
       copies), so nothing is ever dropped; it holds sender 0's slice, sender 1's, ...,
       each sorted by local expert, then an empty tail. From ``c`` alone each row's
       expert-major position follows (counting sort: block ``(i, l)`` of sender ``i``
       and local expert ``l`` starts at ``sum_{i'} c[i', l' < l] + sum_{i' < i} c[i', l]``);
       :func:`take_rows` reorders into expert-major order and back (skipped with one
       local expert: the buffer is then already expert-major). ``ffn_grouped`` runs with
       ``group_sizes`` the per-local-expert totals; rows past their sum are the tail,
       never sent back.
    4. Reverse exchange with the roles swapped (slice ``i`` goes back to sender ``i``
       and lands at that sender's ``input_offsets[me]``), then unsort and combine.

    Differentiable: the exchanges' transposes are again ragged exchanges (see
    :func:`ragged_exchange`) and the row moves are :func:`take_rows`.
    """
    t, k = indices.shape
    d = x.shape[-1]
    m = t * k
    n = num_shards
    el = num_experts // n
    r_buf = n * m                                                      # receive buffer rows
    axis = expert_axes if len(expert_axes) > 1 else expert_axes[0]
    ids = indices.reshape(-1)
    ids = jnp.where(ids < 0, num_experts, ids).astype(jnp.int32)      # [M]; E = none
    perm = jnp.argsort(ids, stable=True)
    inv = invert_permutation(perm)
    copies = jnp.broadcast_to(x[:, None, :], (t, k, d)).reshape(m, d)
    rows = take_rows(copies, perm, inv)                                 # [M, D] sorted by expert

    counts = jnp.zeros((num_experts,), jnp.int32).at[ids].add(1, mode="drop")  # [E]
    c = jax.lax.all_gather(counts, axis).reshape(n, n, el)             # [sender, receiver, local expert]
    s = jnp.sum(c, axis=-1)                                            # [N, N] rows sender -> receiver
    me = jax.lax.axis_index(axis)
    send_sizes = jnp.sum(counts.reshape(n, el), axis=-1)               # [N] = s[me]
    input_offsets = _exclusive_cumsum(send_sizes)                      # [N] in rows
    output_offsets = jnp.take(_exclusive_cumsum(s, axis=0), me, axis=0)  # [N] in each receiver's buffer
    recv_sizes = jnp.take(s, me, axis=1)                               # [N] from each sender
    recv_offsets = _exclusive_cumsum(recv_sizes)                       # [N] in my buffer
    back_offsets = jnp.take(_exclusive_cumsum(s, axis=1), me, axis=1)  # [N] my slice's start in each sender's rows

    # Receive buffers come from zeros_like: ragged_all_to_all returns the type of its
    # output argument, and shard_map must see them varying over the mesh axes as the rows
    # do (a plain jnp.zeros varies over none, and the backward pass fails its type check).
    recv = exchange(rows, jnp.zeros_like(rows, shape=(r_buf, d)), input_offsets, send_sizes,
                    output_offsets, recv_sizes, axis)                   # [N·M, D] sender-major
    cm = jnp.take(c, me, axis=1)                                       # [N, E/N] what sender i sends my expert l
    group_sizes = jnp.sum(cm, axis=0)                                  # [E/N]
    if el > 1:
        sizes_sm = cm.reshape(-1)                                      # blocks (i, l), sender-major
        ends_sm = jnp.cumsum(sizes_sm)
        starts_sm = ends_sm - sizes_sm
        starts_em = _exclusive_cumsum(cm.T.reshape(-1)).reshape(el, n).T.reshape(-1)  # same blocks, expert-major
        p = jnp.arange(r_buf, dtype=jnp.int32)
        b = jnp.searchsorted(ends_sm, p, side="right").astype(jnp.int32)  # [N·M] block; N·el = tail
        bc = jnp.minimum(b, n * el - 1)
        dst = jnp.where(b < n * el, starts_em[bc] + p - starts_sm[bc], r_buf)  # [N·M] expert-major row
        src = jnp.full((r_buf,), r_buf, jnp.int32).at[dst].set(p, mode="drop")
        buf = take_rows(recv, src, dst)                                # [N·M, D] expert-major
        out = ffn_grouped(buf, group_sizes, params, expert_type=expert_type, gmm=gmm)
        out = take_rows(out, dst, src)                                 # [N·M, D] sender-major
    else:
        out = ffn_grouped(recv, group_sizes, params, expert_type=expert_type, gmm=gmm)

    back = exchange(out, jnp.zeros_like(out, shape=(m, d)), recv_offsets, recv_sizes,
                    back_offsets, send_sizes, axis)                     # [M, D] sorted by expert
    out_copies = take_rows(back, inv, perm)                             # [M, D] in (t, k) order
    return _combine(out_copies.reshape(t, k, d), weights, x.dtype)


def _prod(mesh, axes: Sequence[str]) -> int:
    return math.prod(mesh.shape[a] for a in axes)


def dropless_moe(x: Array, indices: Array, weights: Array, params: Params, *,
                 expert_type: str, gmm_backend: str = "auto", exchange: str = "auto") -> Array:
    """Dropless MoE: ``x [T, D]``, ``indices/weights [T, K]`` -> ``y [T, D]``.

    With no mesh in context (``jax.set_mesh``) or no logical axis rules
    (``nn.logical_axis_rules``), or when ``T`` does not split over the batch shards, the
    single-shard path runs (XLA partitions it as it can). Otherwise the computation runs
    in ``jax.shard_map`` over the mesh axes of the ``batch`` activations and of the
    ``expert``/``embed``/``expert_mlp`` parameter axes:

    * tokens are split over the ``batch`` mesh axes (each shard sorts its own copies);
    * experts are split over the ``expert`` axes; with more than one expert shard the
      copies travel by ``exchange`` (:data:`EP_EXCHANGES`, :func:`resolve_ep_exchange`):
      ``'padded'`` ``all_to_all`` blocks or ``'ragged'`` ``ragged_all_to_all`` of the
      real rows (see the module docstring);
    * weights sharded over ``embed`` (FSDP) are all-gathered on entry; weights sharded
      over ``expert_mlp`` (tensor parallel) stay sharded and the partial outputs are
      summed with ``psum`` (if those axes also split the tokens they are all-gathered
      instead).
    """
    gmm = resolve_gmm_backend(gmm_backend)
    exchange = resolve_ep_exchange(exchange)
    mesh = _mesh()
    num_experts = params["wi"].shape[0]
    t = x.shape[0]
    run_local = functools.partial(_dropless_local, expert_type=expert_type, gmm=gmm)
    if mesh is None or not nn.get_logical_axis_rules():
        return run_local(x, indices, weights, params)

    if not any(mesh.shape[a] > 1 for a in mesh.axis_names):
        return run_local(x, indices, weights, params)
    # Parameter specs as the rules in context give them (what the parameters carry); only
    # mesh axes of size > 1 are named, so nothing varies over axes of size 1.
    param_specs = {name: nn.logical_to_mesh_axes(EXPERT_PARAM_NAMES[name]) for name in params}

    def spec_axes(name: str, logical: str) -> tuple[str, ...]:
        entry = param_specs[name][EXPERT_PARAM_NAMES[name].index(logical)]
        entry = () if entry is None else (entry if isinstance(entry, tuple) else (entry,))
        return tuple(a for a in entry if mesh.shape.get(a, 1) > 1)

    batch_axes = mesh_axes_of("batch", mesh)
    expert_axes = spec_axes("wi", "expert")
    n_tok = _prod(mesh, batch_axes)
    n_exp = _prod(mesh, expert_axes)
    if t % n_tok or num_experts % n_exp:
        return run_local(x, indices, weights, params)

    mlp_axes = spec_axes("wo", "expert_mlp")
    gather_mlp = bool(set(mlp_axes) & set(batch_axes))  # tokens split there: psum would mix them
    psum_axes = () if gather_mlp else mlp_axes

    def local_fn(x, indices, weights, params):
        local = {}
        for name, w in params.items():
            for dim, logical in enumerate(EXPERT_PARAM_NAMES[name]):
                if logical == "embed" or (logical == "expert_mlp" and gather_mlp):
                    axes = spec_axes(name, logical)
                    if axes:
                        w = jax.lax.all_gather(w, axes if len(axes) > 1 else axes[0], axis=dim, tiled=True)
            local[name] = w
        if n_exp > 1 and exchange == "padded":
            y = _dropless_all_to_all(x, indices, weights, local, num_experts=num_experts,
                                     expert_axes=expert_axes, num_shards=n_exp,
                                     expert_type=expert_type, gmm=gmm)
        elif n_exp > 1:
            fn = ragged_exchange if exchange == "ragged" else ragged_exchange_emulated
            y = _dropless_ragged(x, indices, weights, local, num_experts=num_experts,
                                 expert_axes=expert_axes, num_shards=n_exp,
                                 expert_type=expert_type, gmm=gmm, exchange=fn)
        else:
            y = run_local(x, indices, weights, local)
        if psum_axes:
            y = jax.lax.psum(y, psum_axes if len(psum_axes) > 1 else psum_axes[0])
        return y

    tok = P(batch_axes or None, None)
    param_in_specs = {name: P(*(spec_axes(name, logical) or None for logical in EXPERT_PARAM_NAMES[name]))
                      for name in params}
    # Megablox's and Mosaic GPU's pallas_calls (jax <= 0.11) give their outputs no
    # shard_map varying type, which shard_map's type check refuses; those backends run
    # unchecked (the tests compare their sharded values and gradients with one device).
    fn = jax.shard_map(local_fn, mesh=mesh, in_specs=(tok, tok, tok, param_in_specs), out_specs=tok,
                       check_vma=gmm not in (gmm_megablox, gmm_mosaic))
    x = sharding.constrain(x, ("batch", "act_embed"))
    return fn(x, indices, weights, dict(params))
