"""What the grouped-matmul kernels' wrappers share: the operand check, padding to tile
multiples and the zeroing of rows past the groups."""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def gmm_dims(lhs: Array, rhs: Array) -> tuple[int, int, int, int]:
    """``(X, I, E, O)`` of ``lhs [X, I]`` and ``rhs [E, I, O]``; a clear error otherwise."""
    if lhs.ndim != 2 or rhs.ndim != 3 or rhs.shape[1] != lhs.shape[1]:
        raise ValueError(f"gmm expects lhs [M, K] and rhs [G, K, N], got {lhs.shape}, {rhs.shape}")
    (m, k), (g, _, n) = lhs.shape, rhs.shape
    return m, k, g, n


def round_up(x: int, m: int) -> int:
    """The smallest multiple of ``m`` that is ``>= x``."""
    return -(-x // m) * m


def pad_to(x: Array, shape: tuple[int, ...]) -> Array:
    """``x`` zero-padded at the end of each axis to ``shape`` (no copy if it already has it)."""
    if x.shape == tuple(shape):
        return x
    return jnp.pad(x, [(0, s - d) for d, s in zip(x.shape, shape)])


def rows_in_groups(out: Array, group_sizes: Array) -> Array:
    """``out`` with its rows past ``sum(group_sizes)`` set to exactly 0 (the kernels leave
    them unwritten)."""
    rows = jnp.arange(out.shape[0], dtype=jnp.int32)[:, None]
    return jnp.where(rows < jnp.sum(group_sizes), out, jnp.zeros((), out.dtype))
