"""Expert feed-forward maths and the grouped-matmul backends of dropless dispatch.

Einsum letters: ``X`` rows of a grouped matmul (token copies, sorted by expert), ``D`` embed,
``F`` expert_mlp, ``E`` experts, ``G`` routing groups, ``C`` capacity, ``k`` blocks of rows of
:func:`gmm_blocked`, ``x`` its padded rows.

Experts are given as a dict of stacked weights (already in the compute dtype):
``wi`` ``[E, D, F]``, ``wo`` ``[E, F, D]`` and, for SwiGLU, ``wi_gate`` ``[E, D, F]``;
their logical axis names are :data:`EXPERT_PARAM_NAMES`.

A grouped matmul ``gmm(lhs [X, D], rhs [E, D, F], group_sizes [E]) -> [X, F]`` multiplies
each expert's consecutive block of rows by that expert's weight. :data:`GMM_BACKENDS`
names the implementations; :func:`resolve_gmm_backend` picks one per platform for
``'auto'`` (``moe.gmm_backend``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
from routezoo.layers.moe.exchange import constrain_expert_parallel


Array = jax.Array
Params = Mapping[str, Array]


EXPERT_PARAM_NAMES: dict[str, tuple[str, str, str]] = {
    "wi": ("expert", "embed", "expert_mlp"),
    "wi_gate": ("expert", "embed", "expert_mlp"),
    "wo": ("expert", "expert_mlp", "embed"),
}
EXPERT_TYPES = ("swiglu", "gelu", "relu")   # relu: T5 v1.0 / Switch Transformers experts

# Names given with ``jax.ad_checkpoint.checkpoint_name`` to what a remat policy may keep
# (``model.remat``, routezoo/zoo/stack.py): the dispatch's index arrays (sort permutations,
# their inverses, group sizes, buffer slots, exchanged counts) and the experts' input rows
# (dropless ``[X, D]`` sorted by expert, capacity ``[G, E, C, D]`` buffers).
MOE_PERM = "moe_perm"
MOE_GMM_IN = "moe_gmm_in"


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
    """Grouped matmul ``[X, D] x [E, D, F] -> [X, F]`` with ``jax.lax.ragged_dot``.

    Rows ``sum(group_sizes)..X`` are unspecified; callers mask them.
    """
    out = jax.lax.ragged_dot(lhs, rhs, group_sizes, preferred_element_type=jnp.float32)
    return out.astype(lhs.dtype)


def gmm_dense(lhs: Array, rhs: Array, group_sizes: Array) -> Array:
    """Reference grouped matmul: every expert on every row, then a mask (tests only)."""
    num_groups = rhs.shape[0]
    ends = jnp.cumsum(group_sizes)
    row_group = jnp.searchsorted(ends, jnp.arange(lhs.shape[0]), side="right")  # [X], E = none
    mask = jax.nn.one_hot(row_group, num_groups, dtype=jnp.float32)  # [X, E]
    out = jnp.einsum("XD,EDF->XEF", lhs, rhs, preferred_element_type=jnp.float32)
    return jnp.einsum("XEF,XE->XF", out, mask).astype(lhs.dtype)


def gmm_blocked(lhs: Array, rhs: Array, group_sizes: Array, block: int | None = None) -> Array:
    """Grouped matmul as one batched matmul over fixed-size row blocks (plain XLA).

    Each expert's rows are padded to a multiple of ``block`` (``x`` rows in all, at most
    ``X + E·(block - 1)``), so every block of ``block`` rows belongs to one expert; the
    blocks are multiplied by their expert's weight: ``[k, block, D] x [k, D, F]``. The
    per-block weights come from a one-hot einsum over experts (its transpose is again an
    einsum, not a scatter-add), and rows move with :func:`take_rows` (gathers both ways).
    The default ``block`` keeps the padding under about a quarter of the rows; the price
    is the ``[k, D, F]`` per-block weights, which is why a kernel beats this on GPUs.
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
    g = jnp.searchsorted(ends, row, side="right")                  # [X]; E = past the end
    gc = jnp.minimum(g, e - 1)
    dest = jnp.where(g < e, pad_start[gc] + row - (ends[gc] - group_sizes[gc]), p)  # [X] -> [x]
    src = jnp.full((p,), m, dest.dtype).at[dest].set(row.astype(dest.dtype), mode="drop")  # [x] -> [X]
    x = take_rows(lhs, src, dest)                                  # [x, D]
    block_expert = jnp.minimum(
        jnp.searchsorted(jnp.cumsum(padded), jnp.arange(nb) * block, side="right"), e - 1)
    w = jnp.einsum("kE,EDF->kDF", jax.nn.one_hot(block_expert, e, dtype=rhs.dtype), rhs)
    y = jnp.einsum("kXD,kDF->kXF", x.reshape(nb, block, d), w,
                   preferred_element_type=jnp.float32).astype(lhs.dtype).reshape(p, -1)
    return take_rows(y, dest, src)                                 # [X, F]


def gmm_pallas(lhs: Array, rhs: Array, group_sizes: Array) -> Array:
    """Pallas (Triton) grouped-matmul kernel, :mod:`routezoo.layers.moe.kernels.gmm_pallas`
    (interpreted off GPU: for tests, slow)."""
    from routezoo.layers.moe.kernels.gmm_pallas import gmm_backend
    return gmm_backend(lhs, rhs, group_sizes)


def gmm_megablox(lhs: Array, rhs: Array, group_sizes: Array) -> Array:
    """Megablox, jax's own TPU grouped-matmul kernels (MaxText's dropless path), under
    routezoo's VJP and contract: :mod:`routezoo.layers.moe.kernels.gmm_megablox` (interpreted
    off TPU: for tests, slow)."""
    from routezoo.layers.moe.kernels.gmm_megablox import gmm
    return gmm(lhs, rhs, group_sizes)


def gmm_mosaic(lhs: Array, rhs: Array, group_sizes: Array) -> Array:
    """jax's Mosaic GPU (Hopper: wgmma + TMA) grouped-matmul kernels under routezoo's VJP
    and contract: :mod:`routezoo.layers.moe.kernels.gmm_mosaic` (interpreted off GPU: for
    tests, slow)."""
    from routezoo.layers.moe.kernels.gmm_mosaic import gmm_backend
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
    ``ragged_dot`` to dense ``[E, X, D]`` buffers: out of memory at real sizes; see
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
    """Experts on rows sorted by expert: ``[X, D] -> [X, D]`` (``group_sizes`` ``[E]``)."""
    h = gmm(rows, params["wi"], group_sizes)  # [X, F]
    g = gmm(rows, params["wi_gate"], group_sizes) if expert_type == "swiglu" else None
    return gmm(_activation(h, g, expert_type), params["wo"], group_sizes)  # [X, D]


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
