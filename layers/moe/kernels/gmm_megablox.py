"""Dropless grouped matmul on TPU with megablox (``jax.experimental.pallas.ops.tpu.megablox``).

Megablox is the grouped-matmul Pallas (Mosaic TPU) kernel that ships with jax itself and
that MaxText's dropless MoE uses on TPUs; routezoo uses its two kernels, ``gmm`` and
``tgmm``, under its own VJP and contract:

* ``gmm(lhs [X, I], rhs [E, I, O], group_sizes [E]) -> [X, O]``: rows past
  ``sum(group_sizes)`` come back as exactly 0 (megablox leaves them uninitialised: NaN in
  interpret mode), in the forward pass and in ``d_lhs``;
* ``d_lhs = gmm(d_out, rhs^T)`` (``transpose_rhs``: no copy of the weights), ``d_rhs =
  tgmm(lhs^T, d_out)``, which is 0 for empty groups;
* any ``X``, ``I``, ``O``: each dimension is zero-padded up to a multiple of its tile
  (megablox needs divisible shapes); padded rows lie past ``sum(group_sizes)`` and padded
  columns contribute 0, so the result is unchanged.

Tiles: ``(tm, tk, tn) = (512, 1024, 1024)`` clipped to the problem (MaxText's default
for bf16 on TPU v4/v5), smaller in ``I``/``O`` where that would pad more than 1/8, with
``tgmm``'s ``tk`` and ``tn`` at most 512 (its f32 blocks would overflow the default scoped
VMEM); not tuned here (no TPU was available: this backend is checked for correctness on
CPU in Pallas interpret mode, and compiled for TPU topologies ahead of time by
``routezoo compile``, never run on a TPU, never timed).
"""

from __future__ import annotations

import functools
import importlib

import jax
import jax.numpy as jnp

from routezoo.layers.moe.kernels.common import gmm_dims, pad_to, round_up, rows_in_groups

Array = jax.Array

__all__ = ["gmm", "tiling_for"]

DEFAULT_TILING = (512, 1024, 1024)
_LANE = 128       # TPU vreg lane width: I and O tiles are multiples of it
_SUBLANE = 16     # rows: a multiple of 16 suits both f32 (8) and bf16 (16) layouts


def _lane_tile(dim: int, tile: int) -> int:
    """The largest multiple of 128 up to ``tile`` whose padding of ``dim`` stays within
    1/8 of ``dim`` rounded to 128 (e.g. 1408 -> 768, padded to 1536, not 1024 -> 2048)."""
    d = round_up(dim, _LANE)
    for t in range(min(tile, d) // _LANE * _LANE, 0, -_LANE):
        if round_up(d, t) - d <= d // 8:
            return t
    return _LANE


def tiling_for(m: int, k: int, n: int, tiling: tuple[int, int, int] = DEFAULT_TILING
               ) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """``((tm, tk, tn), (X', I', O'))``: tiles clipped to the problem and the padded
    dimensions they divide (``X'``: multiple of ``tm``; ``I'``, ``O'``: of ``tk``, ``tn``,
    chosen by :func:`_lane_tile` to pad at most 1/8)."""
    tm, tk, tn = tiling
    tm = min(tm, round_up(m, _SUBLANE))
    tk, tn = _lane_tile(k, tk), _lane_tile(n, tn)
    return (tm, tk, tn), (round_up(m, tm), round_up(k, tk), round_up(n, tn))


# tgmm (the weight gradient) holds an f32 output block and an f32 accumulator, both
# (tk, tn), besides double-buffered (tm, tk) and (tm, tn) inputs: at (512, 1024, 1024)
# that is 16 MiB, over the scoped VMEM a Mosaic kernel gets by default (the TPU compiler
# refuses it: CompileTimeScopedVmemOom, seen compiling Mixtral-sized experts for v5p).
# Its k and n tiles are capped at 512 (5 MiB); gmm's own blocks stay within the limit.
_TGMM_MAX_TILE = 512


def _divisor_tile(dim: int, tile: int, cap: int) -> int:
    """The largest multiple of 128 up to ``min(tile, cap)`` that divides ``dim`` (a
    multiple of ``tile``, itself a multiple of 128)."""
    for t in range(min(tile, cap) // _LANE * _LANE, _LANE - 1, -_LANE):
        if dim % t == 0:
            return t
    return min(tile, dim)


def _tgmm_tiling(tiling: tuple[int, int, int], k: int, n: int) -> tuple[int, int, int]:
    tm, tk, tn = tiling
    return tm, _divisor_tile(k, tk, _TGMM_MAX_TILE), _divisor_tile(n, tn, _TGMM_MAX_TILE)


def _backend():
    """The kernels module (the package's own ``gmm`` name is megablox's custom-VJP op)."""
    return importlib.import_module("jax.experimental.pallas.ops.tpu.megablox.gmm")


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _gmm(lhs: Array, rhs: Array, group_sizes: Array, tiling: tuple[int, int, int],
         interpret: bool) -> Array:
    out = _backend().gmm(lhs, rhs, group_sizes, jnp.float32, tiling, interpret=interpret)
    return rows_in_groups(out.astype(lhs.dtype), group_sizes)


def _gmm_fwd(lhs, rhs, group_sizes, tiling, interpret):
    return _gmm(lhs, rhs, group_sizes, tiling, interpret), (lhs, rhs, group_sizes)


def _gmm_bwd(tiling, interpret, res, dout):
    lhs, rhs, group_sizes = res
    mb = _backend()
    dout = dout.astype(lhs.dtype)
    d_lhs = mb.gmm(dout, rhs, group_sizes, jnp.float32, tiling, transpose_rhs=True,
                   interpret=interpret)
    d_rhs = mb.tgmm(lhs.swapaxes(0, 1), dout, group_sizes, jnp.float32,
                    _tgmm_tiling(tiling, lhs.shape[1], dout.shape[1]),
                    num_actual_groups=rhs.shape[0], interpret=interpret)
    return (rows_in_groups(d_lhs.astype(lhs.dtype), group_sizes), d_rhs.astype(rhs.dtype),
            None)


_gmm.defvjp(_gmm_fwd, _gmm_bwd)


def gmm(lhs: Array, rhs: Array, group_sizes: Array, *,
        tiling: tuple[int, int, int] = DEFAULT_TILING, interpret: bool | None = None) -> Array:
    """Grouped matmul ``[X, I] x [E, I, O] -> [X, O]`` (in ``lhs.dtype``, f32 accumulation),
    differentiable in ``lhs`` and ``rhs``; the module docstring has the contract.
    ``interpret=None``: the Mosaic kernels where the program is lowered for a TPU, Pallas
    interpret mode for any other platform (tests). The choice is made when the program is
    lowered (``jax.lax.platform_dependent``), not from the machine's default backend, so a
    program compiled ahead of time for a TPU topology on a CPU machine
    (:mod:`routezoo.training.compile`) gets the real kernels."""
    m, k, g, n = gmm_dims(lhs, rhs)
    if m == 0 or n == 0 or g == 0:
        return jnp.zeros((m, n), lhs.dtype)
    tiles, (mp, kp, np_) = tiling_for(m, k, n, tiling)
    rhs = rhs.astype(lhs.dtype)
    args = (pad_to(lhs, (mp, kp)), pad_to(rhs, (g, kp, np_)), jnp.maximum(group_sizes.astype(jnp.int32), 0))
    if interpret is None:
        out = jax.lax.platform_dependent(*args, tpu=lambda *a: _gmm(*a, tiles, False),
                                         default=lambda *a: _gmm(*a, tiles, True))
    else:
        out = _gmm(*args, tiles, interpret)
    return out[:m, :n]
