"""Dropless dispatch (MegaBlocks-style): sort token copies by expert, grouped matmul, unsort.

Einsum letters: ``T`` tokens, ``D`` embed, ``F`` expert_mlp, ``E`` experts, ``K`` experts per
token, ``X`` rows of a grouped matmul (token copies), ``N`` expert shards.

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

  Either way nothing is dropped, even when every token picks the same expert.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec as P

from routezoo.layers import sharding
from routezoo.layers.moe.exchange import _mesh, mesh_axes_of, ragged_exchange, ragged_exchange_emulated, resolve_ep_exchange
from routezoo.layers.moe.gmm import EXPERT_PARAM_NAMES, ffn_grouped, gmm_megablox, gmm_mosaic, resolve_gmm_backend
from routezoo.layers.moe.gmm import MOE_GMM_IN, MOE_PERM, invert_permutation, take_rows

Array = jax.Array
Params = Mapping[str, Array]


def _sorted_expert_ffn(rows: Array, ids: Array, num_experts: int, params: Params, *,
                       expert_type: str, gmm) -> Array:
    """Experts on unsorted rows ``[X, D]`` with expert ids ``[X]`` (``>= E``: none).

    Sorts the rows by expert, runs the grouped matmul, unsorts; rows without an expert
    get 0.
    """
    ids = jnp.where((ids < 0) | (ids >= num_experts), num_experts, ids).astype(jnp.int32)
    perm = checkpoint_name(jnp.argsort(ids, stable=True), MOE_PERM)  # [X]
    inv = checkpoint_name(invert_permutation(perm), MOE_PERM)
    group_sizes = checkpoint_name(jnp.zeros((num_experts,), jnp.int32).at[ids].add(1, mode="drop"), MOE_PERM)  # [E]
    sorted_rows = checkpoint_name(take_rows(rows, perm, inv), MOE_GMM_IN)  # [X, D]
    out = ffn_grouped(sorted_rows, group_sizes, params, expert_type=expert_type, gmm=gmm)
    routed = checkpoint_name(ids[perm] < num_experts, MOE_PERM)  # [X]
    out = jnp.where(routed[:, None], out, jnp.zeros((), out.dtype))
    return take_rows(out, inv, perm)  # [X, D]


def _combine(copies: Array, weights: Array, out_dtype) -> Array:
    # copies [T, K, D], weights [T, K] -> [T, D]; combined in float32
    y = jnp.einsum("TKD,TK->TD", copies.astype(jnp.float32), weights.astype(jnp.float32))
    return y.astype(out_dtype)



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
    ids = jnp.where(ids < 0, num_experts, ids).astype(jnp.int32)  # [X]; E = none
    perm = checkpoint_name(jnp.argsort(ids, stable=True), MOE_PERM)
    inv = checkpoint_name(invert_permutation(perm), MOE_PERM)
    sorted_ids = ids[perm]  # [X]
    copies = jnp.broadcast_to(x[:, None, :], (t, k, d)).reshape(m, d)
    rows = take_rows(copies, perm, inv)  # [X, D] sorted by expert

    dest = sorted_ids // e_local  # [X]; N = none
    counts = jnp.zeros((n,), jnp.int32).at[dest].add(1, mode="drop")  # [N]
    starts = jnp.cumsum(counts) - counts
    r = jnp.arange(m, dtype=jnp.int32)
    slot = jnp.where(dest < n, dest * m + r - starts[jnp.minimum(dest, n - 1)], n * m)  # [X]
    src = jnp.full((n * m,), m, jnp.int32).at[slot].set(r, mode="drop")  # [N·X]
    slot, src = checkpoint_name(slot, MOE_PERM), checkpoint_name(src, MOE_PERM)
    send = take_rows(rows, src, slot).reshape(n, m, d)  # [N, X, D]
    send_ids = jnp.full((n * m,), e_local, jnp.int32).at[slot].set(
        sorted_ids - dest * e_local, mode="drop").reshape(n, m)  # [N, X] local expert id

    axis = expert_axes if len(expert_axes) > 1 else expert_axes[0]
    recv = jax.lax.all_to_all(send, axis, 0, 0)  # [N, X, D]: block i came from shard i
    recv_ids = jax.lax.all_to_all(send_ids, axis, 0, 0)
    out = _sorted_expert_ffn(recv.reshape(n * m, d), recv_ids.reshape(-1), e_local, params,
                             expert_type=expert_type, gmm=gmm)  # [N·X, D]
    back = jax.lax.all_to_all(out.reshape(n, m, d), axis, 0, 0).reshape(n * m, d)
    out_sorted = take_rows(back, slot, src)  # [X, D]
    out_copies = take_rows(out_sorted, inv, perm)  # [X, D] in (t, k) order
    return _combine(out_copies.reshape(t, k, d), weights, x.dtype)



def _exclusive_cumsum(x: Array, axis: int = 0) -> Array:
    return jnp.cumsum(x, axis=axis) - x


def _dropless_ragged(x: Array, indices: Array, weights: Array, params: Params, *,
                     num_experts: int, expert_axes: tuple[str, ...], num_shards: int,
                     expert_type: str, gmm, exchange: Callable[..., Array]) -> Array:
    """Expert-parallel dropless MoE inside ``shard_map`` that sends only real copies.

    ``x [T, D]``, ``indices/weights [T, K]`` are this shard's tokens, ``params`` its
    ``E/N`` experts, ``exchange`` :func:`ragged_exchange` or
    :func:`ragged_exchange_emulated`. With ``X = T·K`` copies per shard:

    1. Copies sorted by expert (hence by destination shard): ``rows [X, D]``; counts per
       global expert ``[E]``, all-gathered over the expert axes into ``c [N, E]``
       (``c[i, e]``: rows shard ``i`` sends expert ``e``), viewed as ``[N, N, E/N]``
       (sender, receiver, local expert). Only these counts travel besides the rows.
    2. Forward exchange, one slice per receiver ``j``: ``send_sizes[j]`` my rows for
       ``j``'s experts, ``input_offsets`` their start in ``rows``, ``output_offsets[j]``
       the rows earlier senders send ``j`` (where my slice lands there),
       ``recv_sizes[i]`` what shard ``i`` sends me.
    3. The receive buffer has ``N·X`` rows, the worst case (every shard sends me all its
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
    ids = jnp.where(ids < 0, num_experts, ids).astype(jnp.int32)      # [X]; E = none
    perm = checkpoint_name(jnp.argsort(ids, stable=True), MOE_PERM)
    inv = checkpoint_name(invert_permutation(perm), MOE_PERM)
    copies = jnp.broadcast_to(x[:, None, :], (t, k, d)).reshape(m, d)
    rows = take_rows(copies, perm, inv)                                 # [X, D] sorted by expert

    counts = jnp.zeros((num_experts,), jnp.int32).at[ids].add(1, mode="drop")  # [E]
    c = checkpoint_name(jax.lax.all_gather(counts, axis).reshape(n, n, el), MOE_PERM)  # [sender, receiver, local expert]
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
                    output_offsets, recv_sizes, axis)                   # [N·X, D] sender-major
    cm = jnp.take(c, me, axis=1)                                       # [N, E/N] what sender i sends my expert l
    group_sizes = jnp.sum(cm, axis=0)                                  # [E/N]
    if el > 1:
        sizes_sm = cm.reshape(-1)                                      # blocks (i, l), sender-major
        ends_sm = jnp.cumsum(sizes_sm)
        starts_sm = ends_sm - sizes_sm
        starts_em = _exclusive_cumsum(cm.T.reshape(-1)).reshape(el, n).T.reshape(-1)  # same blocks, expert-major
        p = jnp.arange(r_buf, dtype=jnp.int32)
        b = jnp.searchsorted(ends_sm, p, side="right").astype(jnp.int32)  # [N·X] block; N·el = tail
        bc = jnp.minimum(b, n * el - 1)
        dst = jnp.where(b < n * el, starts_em[bc] + p - starts_sm[bc], r_buf)  # [N·X] expert-major row
        src = jnp.full((r_buf,), r_buf, jnp.int32).at[dst].set(p, mode="drop")
        buf = checkpoint_name(take_rows(recv, src, dst), MOE_GMM_IN)  # [N·X, D] expert-major
        out = ffn_grouped(buf, group_sizes, params, expert_type=expert_type, gmm=gmm)
        out = take_rows(out, dst, src)                                 # [N·X, D] sender-major
    else:
        out = ffn_grouped(checkpoint_name(recv, MOE_GMM_IN), group_sizes, params, expert_type=expert_type, gmm=gmm)

    back = exchange(out, jnp.zeros_like(out, shape=(m, d)), recv_offsets, recv_sizes,
                    back_offsets, send_sizes, axis)                     # [X, D] sorted by expert
    out_copies = take_rows(back, inv, perm)                             # [X, D] in (t, k) order
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
