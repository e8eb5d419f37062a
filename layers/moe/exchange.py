"""Expert-parallel exchange of token copies between expert shards (dropless dispatch).

Einsum letters: ``T`` tokens, ``K`` experts per token, ``D`` embed, ``E`` experts, ``N``
expert shards (size of the ``expert`` mesh axes).

Mesh helpers (the abstract mesh in context, the mesh axes of a logical name, the
expert-parallel sharding constraint) and the two ways copies travel, chosen by
``moe.ep_exchange`` (:data:`EP_EXCHANGES`):

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
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.sharding import PartitionSpec as P


Array = jax.Array
Params = Mapping[str, Array]


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


def ragged_exchange_rows(counts, num_shards: int):
    """Rows the ragged exchange moves, from each shard's routed copies per expert.

    ``counts`` ``[N, E]``: token copies shard ``i`` routes to (physical) expert ``e`` (the
    ``counts`` each shard all-gathers in :func:`~routezoo.layers.moe.dropless._dropless_ragged`);
    experts ``[j·E/N, (j+1)·E/N)`` live on shard ``j``. Returns ``[N, N]`` rows sender ->
    receiver of the forward exchange (the one back is its transpose): the same arithmetic as
    the exchange's ``send_sizes``. Off-diagonal rows cross devices; the padded exchange moves
    ``N·T·K`` rows per shard whatever the routing. Works on numpy or jax arrays.
    """
    n, e = counts.shape
    if n != num_shards or e % num_shards:
        raise ValueError(f"counts {tuple(counts.shape)}: need [N={num_shards}, E] with E divisible by N")
    return counts.reshape(n, n, e // n).sum(-1)
