"""Dropless grouped matmul on Hopper GPUs with jax's own Mosaic GPU kernels (wgmma + TMA).

jax ships two Pallas Mosaic-GPU grouped-matmul kernels for Hopper (sm_90a):
``jax.experimental.pallas.ops.gpu.ragged_dot_mgpu.ragged_dot`` (``[X, I] x [E, I, O] ->
[X, O]``, optionally with the weights transposed) and
``transposed_ragged_dot_mgpu.transposed_ragged_dot`` (per group ``lhs_g^T @ dout_g ->
[E, I, O]``, the weight gradient). Unlike the Triton backend
(:mod:`routezoo.layers.moe.kernels.gmm_pallas`) they issue Hopper's asynchronous ``wgmma``
instructions and bulk (TMA) copies directly. This module runs them under routezoo's VJP
and contract, the same as the other backends:

* ``gmm(lhs [X, I], rhs [E, I, O], group_sizes [E]) -> [X, O]`` in ``lhs.dtype`` with
  float32 accumulation; rows past ``sum(group_sizes)`` come back as exactly 0 (the kernel
  leaves them unwritten), in the forward pass and in ``d_lhs``;
* ``d_lhs = gmm(d_out, rhs^T)``, ``d_rhs = tgmm(lhs, d_out)``, 0 for empty groups;
* any ``I``, ``O``: dimensions are zero-padded to the kernels' tile multiples;
* 16-bit operands: float32 inputs run every pass on the Triton kernels.

Each pass (forward, backward data, weight gradient) can run on either kernel family:
:class:`MosaicConfig` gives each its tiles, or ``None`` to run that pass with the Triton
kernel of :func:`routezoo.layers.moe.kernels.gmm_pallas.config_for`. Off GPU the Mosaic
kernels run in jax's Mosaic GPU interpreter (tests only; slow).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import inspect

import jax
import jax.numpy as jnp

from routezoo.layers.moe.kernels.common import gmm_dims, pad_to, round_up, rows_in_groups

Array = jax.Array

__all__ = ["MosaicConfig", "MosaicTiles", "config_for", "gmm", "tgmm", "gmm_backend"]


@dataclasses.dataclass(frozen=True)
class MosaicTiles:
    """One Mosaic kernel launch: output tile ``block_m x block_n``, ``block_k`` deep
    steps, ``steps`` in flight (TMA pipeline depth), ``grid_block_n`` output column tiles
    walked together (L2 reuse of the ``lhs`` tile)."""

    block_m: int = 128
    block_n: int = 128
    block_k: int = 64
    steps: int = 4
    grid_block_n: int = 1


@dataclasses.dataclass(frozen=True)
class MosaicConfig:
    """Which kernel runs each pass: a :class:`MosaicTiles` (Mosaic GPU) or ``None`` (the
    Triton kernel of ``gmm_pallas.config_for``)."""

    fwd: MosaicTiles | None = MosaicTiles()
    dlhs: MosaicTiles | None = MosaicTiles()
    tgmm: MosaicTiles | None = MosaicTiles()
    interpret: bool = False


def config_for(m: int, num_groups: int, k: int, n: int, *, interpret: bool = False
               ) -> MosaicConfig:
    """Each pass on the kernel that measured faster for the shape (one H200, jax 0.11.2,
    ``benchmarks/gmm_kernel.py``; BENCHMARKS.md, "Mosaic GPU kernels"):

    * forward and backward data: Triton at every shape measured (jax's Mosaic
      ``ragged_dot`` reached 26-48% of the dense rate, Triton 41-73%);
    * weight gradient: Mosaic where groups are large (80% of dense at 1,536 rows per group,
      the DeepSeek-like shape), Triton for small groups (``gmm_pallas.small_groups``: at
      most ``SMALL_GROUP_ROWS`` rows per group on average; Mosaic 25-37% there).
    """
    from routezoo.layers.moe.kernels.gmm_pallas import small_groups
    del k, n
    return MosaicConfig(fwd=None, dlhs=None,
                        tgmm=None if small_groups(m, num_groups) else MosaicTiles(steps=5),
                        interpret=interpret)


def _ops(name: str):
    return importlib.import_module(f"jax.experimental.pallas.ops.gpu.{name}")


@contextlib.contextmanager
def _interpreted(interpret: bool):
    if not interpret:
        yield
        return
    from jax._src.pallas.mosaic_gpu.interpret import params   # jax's Mosaic GPU interpreter
    with params.force_gpu_interpret_mode(params.InterpretGPUParams()):
        yield


def _mosaic_ragged_dot(lhs: Array, rhs: Array, group_sizes: Array, t: MosaicTiles, *,
                       transpose_rhs: bool, interpret: bool) -> Array:
    """``[X, I] x [E, I, O]`` (or ``[E, O, I]`` with ``transpose_rhs``) ``-> [X, O]``."""
    rd = _ops("ragged_dot_mgpu")
    (m, k), g = lhs.shape, rhs.shape[0]
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    kp, np_ = round_up(k, t.block_k), round_up(n, t.block_n * t.grid_block_n)
    # Rows padded to whole tiles: the hardware's bulk copies read zeros past the end, jax's
    # interpreter refuses such reads.
    lhs = pad_to(lhs, (round_up(m, t.block_m), kp))
    if transpose_rhs:
        rhs = pad_to(rhs, (g, np_, kp))
        if interpret or "transpose_rhs" not in inspect.signature(rd.ragged_dot).parameters:
            # A transposed copy: older jax's kernel has no transposed-weights mode, and the
            # interpreter (jax 0.10) has no transposed wgmma operand.
            rhs, transpose_rhs = rhs.swapaxes(1, 2), False
    else:
        rhs = pad_to(rhs, (g, kp, np_))
    kw = dict(group_sizes=group_sizes, block_m=t.block_m, block_n=t.block_n, block_k=t.block_k,
              max_concurrent_steps=t.steps, grid_block_n=t.grid_block_n)
    if transpose_rhs:
        kw["transpose_rhs"] = True
    with _interpreted(interpret):
        out = rd.ragged_dot(lhs, rhs, **kw)
    return out[:m, :n].astype(lhs.dtype)


def _mosaic_tgmm(lhs: Array, dout: Array, group_sizes: Array, t: MosaicTiles, *,
                 interpret: bool) -> Array:
    """``[X, I], [X, O] -> [E, I, O]``: per group ``lhs_g^T @ dout_g``."""
    trd = _ops("transposed_ragged_dot_mgpu")
    (m, k), n = lhs.shape, dout.shape[1]
    kp, np_ = round_up(k, t.block_m), round_up(n, t.block_n * t.grid_block_n)
    with _interpreted(interpret):
        out = trd.transposed_ragged_dot(
            pad_to(lhs, (m, kp)), pad_to(dout, (m, np_)), group_sizes=group_sizes,
            block_m=t.block_m, block_n=t.block_n, block_k=t.block_k,
            max_concurrent_steps=t.steps, grid_block_n=t.grid_block_n)
    return out[:, :k, :n]


def _triton_config(m: int, g: int, k: int, n: int, interpret: bool, itemsize: int):
    from routezoo.layers.moe.kernels import gmm_pallas
    return gmm_pallas, gmm_pallas.config_for(m, g, k, n, interpret=interpret, itemsize=itemsize)


def _data_pass(lhs, rhs, group_sizes, cfg: MosaicConfig, *, transpose_rhs: bool):
    """The forward matmul (``lhs @ rhs[g]``) or, with ``transpose_rhs``, the backward data
    matmul (``d_out @ rhs[g]^T``), on the kernel ``cfg`` picks for that pass."""
    tiles = cfg.dlhs if transpose_rhs else cfg.fwd
    if tiles is not None:
        out = _mosaic_ragged_dot(lhs, rhs, group_sizes, tiles, transpose_rhs=transpose_rhs,
                                 interpret=cfg.interpret)
        return rows_in_groups(out, group_sizes)
    gp, tcfg = _triton_config(lhs.shape[0], *rhs.shape, cfg.interpret, lhs.dtype.itemsize)
    tiling = (tcfg.dlhs_tiling or tcfg.tiling) if transpose_rhs else tcfg.tiling
    return gp._gmm_call(lhs, rhs, group_sizes, tiling=tiling, cfg=tcfg,
                        transpose_rhs=transpose_rhs).astype(lhs.dtype)


def _tgmm_pass(lhs, dout, group_sizes, num_groups, cfg: MosaicConfig, out_dtype):
    if cfg.tgmm is not None:
        return _mosaic_tgmm(lhs, dout, group_sizes, cfg.tgmm,
                            interpret=cfg.interpret).astype(out_dtype)
    gp, tcfg = _triton_config(lhs.shape[0], num_groups, lhs.shape[1], dout.shape[1],
                              cfg.interpret, lhs.dtype.itemsize)
    return gp._tgmm_call(lhs, dout, group_sizes, num_groups, cfg=tcfg, out_dtype=out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _gmm(lhs: Array, rhs: Array, group_sizes: Array, cfg: MosaicConfig) -> Array:
    return _data_pass(lhs, rhs, group_sizes, cfg, transpose_rhs=False)


def _gmm_fwd(lhs, rhs, group_sizes, cfg):
    return _gmm(lhs, rhs, group_sizes, cfg), (lhs, rhs, group_sizes)


def _gmm_bwd(cfg, res, dout):
    lhs, rhs, group_sizes = res
    dout = dout.astype(lhs.dtype)
    d_lhs = _data_pass(dout, rhs, group_sizes, cfg, transpose_rhs=True)
    d_rhs = _tgmm_pass(lhs, dout, group_sizes, rhs.shape[0], cfg, rhs.dtype)
    return d_lhs, d_rhs, None


_gmm.defvjp(_gmm_fwd, _gmm_bwd)


def gmm(lhs: Array, rhs: Array, group_sizes: Array, *, config: MosaicConfig | None = None,
        interpret: bool | None = None) -> Array:
    """Grouped matmul ``[X, I] x [E, I, O] -> [X, O]`` (in ``lhs.dtype``, float32
    accumulation), differentiable in ``lhs`` and ``rhs``; the module docstring has the
    contract. ``interpret=None``: compiled on GPU, interpreted elsewhere (tests)."""
    m, k, g, n = gmm_dims(lhs, rhs)
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    if m == 0 or n == 0 or g == 0:
        return jnp.zeros((m, n), lhs.dtype)
    cfg = config or config_for(m, g, k, n)
    if jnp.dtype(lhs.dtype).itemsize != 2:   # the Mosaic kernels take 16-bit operands only
        cfg = MosaicConfig(fwd=None, dlhs=None, tgmm=None)
    cfg = dataclasses.replace(cfg, interpret=interpret)
    return _gmm(lhs, rhs.astype(lhs.dtype), jnp.maximum(group_sizes.astype(jnp.int32), 0), cfg)


def tgmm(lhs: Array, dout: Array, group_sizes: Array, *, tiles: MosaicTiles = MosaicTiles(),
         interpret: bool | None = None, out_dtype=None) -> Array:
    """``[X, I], [X, O] -> [E, I, O]``: per group ``lhs_g^T @ dout_g`` (0 if empty), the
    weight gradient of :func:`gmm` on the Mosaic kernel. Not differentiable."""
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    out = _mosaic_tgmm(lhs, dout.astype(lhs.dtype), group_sizes.astype(jnp.int32), tiles,
                       interpret=interpret)
    return out.astype(out_dtype or lhs.dtype)


def gmm_backend(lhs: Array, rhs: Array, group_sizes: Array) -> Array:
    """``GMM_BACKENDS`` entry: :func:`gmm` configured by :func:`config_for`."""
    return gmm(lhs, rhs, group_sizes)
