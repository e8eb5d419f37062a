"""Dropless grouped matmul on the Pallas Triton (GPU) backend.

``gmm(lhs [X, I], rhs [E, I, O], group_sizes [E]) -> [X, O]``: rows are sorted by group;
rows ``offsets[g]:offsets[g+1]`` (``offsets = [0, cumsum(group_sizes)]``) are multiplied
by ``rhs[g]``; rows from ``sum(group_sizes)`` to ``X`` come back as 0. Its transpose
``tgmm(lhs [X, I], dout [X, O], group_sizes) -> [E, I, O]`` gives per group
``lhs_g^T @ dout_g`` (exactly 0 for an empty group). ``gmm`` has a custom VJP:
``d_lhs = gmm(d_out, rhs^T)`` (``rhs`` is read transposed in place, never copied) and
``d_rhs = tgmm(lhs, d_out)``.

Design (Triton has no scalar prefetch, so all per-tile metadata is a jit-traced int32
array read by the kernel with scalar loads):

* ``gmm``: **group-aligned row tiles, no row copies.** Every group is cut into tiles of
  ``bm`` rows that start at the group's first row (the last tile of a group is
  partial); rows past ``sum(group_sizes)`` form one more "tail" group whose tiles store
  zeros. A work item is one such tile: ``(group, first row, end row)`` in an int32
  table built with jnp ops under jit. There are ``sum_g cdiv(s_g, bm)`` items, at most
  ``(X + (E + 1)(bm - 1)) // bm`` (the static grid; unused items exit at once). An item
  loads its ``bm`` rows with a row mask (rows past its end read as 0), loops over I in
  ``bk`` steps with an f32 accumulator (``rhs[group]`` tiles picked by a dynamic first
  index) and stores its ``[bm, bn]`` tile under the same mask, so every output row is
  written by exactly one item. These are the tiles of "pad every group to a multiple
  of ``bm``" (the ``gmm_blocked`` layout: the same work, on average ``bm / 2`` wasted
  rows per group) without materialising the padded layout: no gather into a padded
  buffer and no gather back, which would add two HBM passes over ``lhs`` and ``out``
  per call (estimated 20-30% of the matmul time when ``I`` or ``O`` is 1-2k). Row
  tiles need no alignment: rows are contiguous along I, so unaligned starts do not
  hurt coalescing. (Fixed ``bm``-aligned tiles with one item per (tile, group) pair,
  megablox style, would waste ``bm`` rows per group boundary instead of ``bm / 2``.)
* ``tgmm``: one program per (group, k-tile, n-tile); it walks its group's rows in
  ``bm`` steps from the (unaligned) group start, masked at the group end, and
  accumulates ``lhs_tile^T @ dout_tile`` in f32; an empty group runs 0 steps and stores
  zeros.
* Both kernels use a 1-D grid with grouped ("super-tile") program order, as in the
  Triton matmul tutorial: ``group_m`` consecutive m-tiles (k-tiles for ``tgmm``) are
  swept across all n-tiles before moving on, so programs that run together share
  ``lhs`` rows and ``rhs`` columns in L2. (Pallas-Triton maps grid axis 0 to CUDA's
  fastest launch axis, so a multi-dimensional grid would not give this order.)
* Every array is passed whole (no BlockSpecs); the kernels index it with ``pl.ds``
  slices whose sizes are the tile sizes, which Triton needs to be powers of two (and
  >= 16 for ``dot``). ``I`` and ``O`` must be multiples of ``bk`` and ``bn``: the
  wrapper shrinks a tile to the largest power of two that divides the dimension
  (e.g. ``bn=256`` on ``O=1408`` runs with 128) and zero-pads the dimension to a
  multiple of 16 only if that is impossible. ``X`` needs no padding (row masks).

``interpret=True`` runs the same kernels through the Pallas interpreter (CPU tests).

JAX 0.11 deprecates the Pallas Triton backend (to be removed in a later release, in
favour of Mosaic GPU); these kernels use only its stable core (``pl.pallas_call``,
``pl.ds``, ``pl.when``, ``plgpu.load/store``, ``lax.dot_general``).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from routezoo.layers.moe.kernels.common import round_up

try:  # the Triton-specific module (present in jax 0.4.3x .. 0.11)
    from jax.experimental.pallas import triton as plgpu
except ImportError:  # pragma: no cover
    plgpu = None

Array = jax.Array

__all__ = ["GmmConfig", "gmm", "tgmm", "gmm_backend", "config_for", "make_group_metadata", "num_work_items"]

DEFAULT_TILING = (128, 64, 128)        # (bm, bk, bn) of the forward gmm
DEFAULT_TGMM_TILING = (64, 128, 128)   # (bm rows per step, bk, bn) of tgmm
DEFAULT_NUM_STAGES = 3
DEFAULT_GROUP_M = 8
_MIN_TILE = 16


# ------------------------------------------------------------------ API-version shims


def _pick(*candidates):
    for mod, name in candidates:
        f = getattr(mod, name, None) if mod is not None else None
        if f is not None:
            return f
    return None


# Masked loads/stores: ``plgpu.load/store`` (jax >= 0.6), older ``pl.load/store``.
_load = _pick((plgpu, "load"), (pl, "load"))
_store = _pick((plgpu, "store"), (pl, "store"))
_CompilerParams = _pick((plgpu, "CompilerParams"), (plgpu, "TritonCompilerParams"))


def _compiler_params(num_warps: int, num_stages: int) -> dict[str, Any]:
    """``compiler_params=`` for pallas_call, whichever spelling this jax has."""
    if _CompilerParams is not None:
        return {"compiler_params": _CompilerParams(num_warps=num_warps, num_stages=num_stages)}
    return {"compiler_params": {"triton": {"num_warps": num_warps, "num_stages": num_stages}}}


def _varying_axes(x) -> frozenset:
    """Manual mesh axes (inside ``jax.shard_map``) that ``x`` varies over."""
    aval = jax.typeof(x)
    mat = getattr(aval, "mat", None)          # jax >= 0.10: ManualAxisType
    if mat is not None:
        return frozenset(mat.varying)
    return frozenset(getattr(aval, "vma", None) or ())   # jax 0.6 - 0.9


def _match_varying(*xs):
    """Casts every input to vary over the union of the axes any of them varies over (as
    jnp ops do implicitly): the kernels' outputs then vary over that union, and the
    transpose of the cast sums the cotangent of an input that did not vary (e.g.
    weights replicated over the batch axes of a ``shard_map``)."""
    axes = frozenset().union(*map(_varying_axes, xs))
    out = []
    for x in xs:
        missing = tuple(sorted(axes - _varying_axes(x)))
        if missing:
            pcast = getattr(lax, "pcast", None)
            x = pcast(x, missing, to="varying") if pcast else lax.pvary(x, missing)
        out.append(x)
    return out


def _out_struct(shape, dtype, like) -> jax.ShapeDtypeStruct:
    """``ShapeDtypeStruct`` varying over the manual mesh axes ``like`` varies over, as
    ``pallas_call`` requires under ``shard_map(check_vma=True)``."""
    aval = jax.typeof(like)
    for key, value in (("manual_axis_type", getattr(aval, "mat", None)),
                       ("vma", getattr(aval, "vma", None))):
        if value is not None:
            try:
                return jax.ShapeDtypeStruct(shape, dtype, **{key: value})
            except TypeError:   # this jax spells it differently
                pass
    return jax.ShapeDtypeStruct(shape, dtype)


def _call(cfg: GmmConfig, call, *args):
    """``call(*args)`` (a ``pallas_call``); refuses the one case jax cannot run."""
    if cfg.interpret and _varying_axes(args[1]):
        # The Pallas interpreter runs at lowering time, under shard_map's vma check, and
        # fails it (jax 0.10: a dynamic_slice of a varying block at invariant grid
        # indices). Compiled (GPU) kernels are fine under shard_map.
        raise NotImplementedError(
            "gmm_pallas with interpret=True cannot run inside jax.shard_map(check_vma=True) "
            "(the Pallas interpreter fails the varying-axes check); on CPU use the "
            "'blocked' grouped-matmul backend for sharded runs, or check_vma=False")
    return call(*args)


def _dot(a: Array, b: Array, contract: tuple[int, int], acc_dtype) -> Array:
    """2-D dot contracting ``a``'s dim ``contract[0]`` with ``b``'s ``contract[1]``.

    ``lax.dot_general`` is what ``pl.dot``/``plgpu.dot`` call; the Triton lowering turns
    a contraction over a non-default dim into a ``tt.trans`` of the operand (no copy).
    """
    return lax.dot_general(a, b, (((contract[0],), (contract[1],)), ((), ())),
                           preferred_element_type=acc_dtype)


# ------------------------------------------------------------------ configuration


def _is_pow2(x: int) -> bool:
    return x > 0 and (x & (x - 1)) == 0


def _fit_tile(dim: int, tile: int) -> tuple[int, int]:
    """``(tile', padded_dim)``: the largest power of two ``<= tile`` (``>= 16``) that
    divides ``dim``; if none does, ``dim`` is padded to a multiple of 16 and the tile
    is the largest power of two ``<= tile`` dividing that."""
    padded = dim if dim % _MIN_TILE == 0 else round_up(dim, _MIN_TILE)
    t = max(tile, _MIN_TILE)
    while t > _MIN_TILE and padded % t:
        t //= 2
    return t, padded


def _check_tiling(tiling, what: str) -> tuple[int, int, int]:
    tiling = tuple(int(t) for t in tiling)
    if len(tiling) != 3 or not all(_is_pow2(t) and t >= _MIN_TILE for t in tiling):
        raise ValueError(f"{what} must be 3 powers of two >= {_MIN_TILE} (Triton block "
                         f"sizes), got {tiling}")
    return tiling  # type: ignore[return-value]


def _default_warps(rows: int, cols: int) -> int:
    return 8 if rows * cols >= 128 * 256 else 4


@dataclasses.dataclass(frozen=True)
class GmmConfig:
    """Static kernel parameters (hashable: a ``nondiff`` argument of the custom VJP).

    ``tiling`` ``(bm, bk, bn)`` is the forward gmm: ``bm`` rows, ``bk`` contraction
    step, ``bn`` output columns. ``dlhs_tiling`` is the backward gmm ``d_out @ rhs^T``
    in the same roles (its contraction is over ``O``, its output columns over ``I``);
    default: ``tiling``. ``tgmm_tiling`` ``(bm, bk, bn)``: ``bm`` rows per step (the
    contraction), output tile ``[bk, bn]`` of ``d_rhs``. ``num_warps=None``: 8 for
    output tiles of >= 128x256 elements, else 4. ``half_tiles``: a group's last row tile
    with at most ``bm / 2`` rows is computed at half height (``gmm`` and its backward data
    matmul), halving the padding rows a group can cost.
    """

    tiling: tuple[int, int, int] = DEFAULT_TILING
    dlhs_tiling: tuple[int, int, int] | None = None
    tgmm_tiling: tuple[int, int, int] = DEFAULT_TGMM_TILING
    num_warps: int | None = None
    num_stages: int = DEFAULT_NUM_STAGES
    tgmm_num_warps: int | None = None
    tgmm_num_stages: int | None = None
    group_m: int = DEFAULT_GROUP_M
    half_tiles: bool = False
    interpret: bool = False
    acc_dtype: Any = jnp.float32
    reverse_program_order: bool = False  # tests: interpret runs programs in order, so
    # reversing it exposes any row written by two programs (the later write would win)

    def __post_init__(self):
        object.__setattr__(self, "tiling", _check_tiling(self.tiling, "tiling"))
        if self.dlhs_tiling is not None:
            object.__setattr__(self, "dlhs_tiling", _check_tiling(self.dlhs_tiling, "dlhs_tiling"))
        object.__setattr__(self, "tgmm_tiling", _check_tiling(self.tgmm_tiling, "tgmm_tiling"))
        object.__setattr__(self, "acc_dtype", jnp.dtype(self.acc_dtype))
        if self.group_m < 1:
            raise ValueError(f"group_m must be >= 1, got {self.group_m}")


# ------------------------------------------------------------------ metadata (jit-traced)


def num_work_items(m: int, num_groups: int, bm: int) -> int:
    """Static bound on the forward kernel's work items: ``sum_g cdiv(s_g, bm)`` over the
    ``E`` groups and the tail, ``<= (m + (E + 1)(bm - 1)) // bm``."""
    return (m + (num_groups + 1) * (bm - 1)) // bm


def make_group_metadata(group_sizes: Array, m: int, bm: int) -> tuple[Array, int]:
    """Work items of the forward kernel: ``(meta int32 [3, j], j)``, ``j`` from
    :func:`num_work_items`.

    Every group (and the tail, rows ``sum(group_sizes)..m``, as group ``E``) is cut into
    tiles of ``bm`` rows starting at the group's first row: item ``j`` covers rows
    ``meta[1, j]:meta[2, j]`` (at most ``bm``) of group ``meta[0, j]``; ``E + 1`` marks
    an unused item. Groups' rows are clipped to ``[0, m)``.
    """
    num_groups = group_sizes.shape[0]
    bounds = _group_bounds(group_sizes, m)
    v_starts = jnp.concatenate([bounds[0], bounds[1, -1:]])        # [E + 1], last: tail
    v_ends = jnp.concatenate([bounds[1], jnp.full((1,), m, jnp.int32)])
    ntiles = (v_ends - v_starts + (bm - 1)) // bm
    item_end = jnp.cumsum(ntiles)
    item_start = item_end - ntiles
    num_items = num_work_items(m, num_groups, bm)
    j = jnp.arange(num_items, dtype=jnp.int32)
    group = jnp.searchsorted(item_end, j, side="right").astype(jnp.int32)  # E + 1: unused
    gc = jnp.minimum(group, num_groups)
    row_start = v_starts[gc] + (j - item_start[gc]) * bm
    row_end = jnp.minimum(v_ends[gc], row_start + bm)
    unused = group > num_groups
    row_start = jnp.where(unused, 0, row_start)
    row_end = jnp.where(unused, 0, row_end)
    return jnp.stack([group, row_start, row_end]).astype(jnp.int32), num_items


def _group_bounds(group_sizes: Array, m: int) -> Array:
    """``int32 [2, E]``: first and one-past-last row of every group (clipped to m)."""
    sizes = jnp.maximum(group_sizes.astype(jnp.int32), 0)
    ends = jnp.minimum(jnp.cumsum(sizes), m).astype(jnp.int32)
    starts = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends[:-1]])
    return jnp.stack([starts, ends])


# ------------------------------------------------------------------ kernels


def _swizzle(pid, num_m: int, num_n: int, group_m: int):
    """Grouped program order: ``group_m`` m-tiles swept across all n-tiles at a time."""
    width = group_m * num_n
    grp = lax.div(pid, width)
    first_m = grp * group_m
    size_m = lax.min(num_m - first_m, group_m)
    local = lax.rem(pid, width)
    return first_m + lax.rem(local, size_m), lax.div(local, size_m)


def _program_id(num_programs: int, reverse: bool):
    pid = pl.program_id(0)
    return num_programs - 1 - pid if reverse else pid


def _gmm_kernel(meta_ref, lhs_ref, rhs_ref, out_ref, *, bm, bk, bn, num_items, num_n,
                num_groups, k_steps, group_m, transpose_rhs, acc_dtype, reverse, half_tiles):
    item, nt = _swizzle(_program_id(num_items * num_n, reverse), num_items, num_n, group_m)
    group = meta_ref[0, item]
    row0 = meta_ref[1, item]
    row_end = meta_ref[2, item]

    def tile(rows):   # the item's matmul on a [rows, bn] tile (rows >= its row count)
        row_ok = ((row0 + jnp.arange(rows, dtype=jnp.int32)) < row_end)[:, None]
        lhs_mask = jnp.broadcast_to(row_ok, (rows, bk))

        def body(kk, acc):
            k0 = kk * bk
            a = _load(lhs_ref.at[pl.ds(row0, rows), pl.ds(k0, bk)], mask=lhs_mask, other=0)
            if transpose_rhs:    # rhs [E, N_out, K_contract]
                b = rhs_ref[group, pl.ds(nt * bn, bn), pl.ds(k0, bk)]
                return acc + _dot(a, b, (1, 1), acc_dtype)
            b = rhs_ref[group, pl.ds(k0, bk), pl.ds(nt * bn, bn)]
            return acc + _dot(a, b, (1, 0), acc_dtype)

        acc = lax.fori_loop(0, k_steps, body, jnp.zeros((rows, bn), acc_dtype))
        _store(out_ref.at[pl.ds(row0, rows), pl.ds(nt * bn, bn)], acc.astype(out_ref.dtype),
               mask=jnp.broadcast_to(row_ok, (rows, bn)))

    if half_tiles:   # a group's last tile with at most bm/2 rows runs at half height
        small = row_end - row0 <= bm // 2
        pl.when((group < num_groups) & small)(lambda: tile(bm // 2))
        pl.when((group < num_groups) & jnp.logical_not(small))(lambda: tile(bm))
    else:
        pl.when(group < num_groups)(lambda: tile(bm))

    @pl.when(group == num_groups)
    def _tail():  # rows past sum(group_sizes)
        row_ok = ((row0 + jnp.arange(bm, dtype=jnp.int32)) < row_end)[:, None]
        _store(out_ref.at[pl.ds(row0, bm), pl.ds(nt * bn, bn)],
               jnp.zeros((bm, bn), out_ref.dtype), mask=jnp.broadcast_to(row_ok, (bm, bn)))


def _tgmm_kernel(bounds_ref, lhs_ref, dout_ref, out_ref, *, bm, bk, bn, num_groups, num_k,
                 num_n, group_m, acc_dtype, reverse):
    per_group = num_k * num_n
    pid = _program_id(num_groups * per_group, reverse)
    group = lax.div(pid, per_group)
    kt, nt = _swizzle(lax.rem(pid, per_group), num_k, num_n, group_m)
    start = bounds_ref[0, group]
    end = bounds_ref[1, group]
    steps = lax.div(lax.max(end - start, 0) + (bm - 1), bm)
    offs = jnp.arange(bm, dtype=jnp.int32)

    def body(i, acc):
        r0 = start + i * bm
        ok = ((r0 + offs) < end)[:, None]
        a = _load(lhs_ref.at[pl.ds(r0, bm), pl.ds(kt * bk, bk)],
                  mask=jnp.broadcast_to(ok, (bm, bk)), other=0)
        b = _load(dout_ref.at[pl.ds(r0, bm), pl.ds(nt * bn, bn)],
                  mask=jnp.broadcast_to(ok, (bm, bn)), other=0)
        return acc + _dot(a, b, (0, 0), acc_dtype)   # a^T @ b: [bk, bn]

    acc = lax.fori_loop(0, steps, body, jnp.zeros((bk, bn), acc_dtype))
    out_ref[group, pl.ds(kt * bk, bk), pl.ds(nt * bn, bn)] = acc.astype(out_ref.dtype)


# ------------------------------------------------------------------ pallas_call wrappers


def _pad_axis(x: Array, axis: int, size: int) -> Array:
    if x.shape[axis] == size:
        return x
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, pad)


def _gmm_call(lhs: Array, rhs: Array, group_sizes: Array, *, tiling, cfg: GmmConfig,
              transpose_rhs: bool = False) -> Array:
    """``lhs [X, Kc] x rhs [E, Kc, No]`` (or ``rhs [E, No, Kc]`` with ``transpose_rhs``)."""
    m, kc = lhs.shape
    num_groups = rhs.shape[0]
    no = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    if rhs.shape[2 if transpose_rhs else 1] != kc:
        raise ValueError(f"contraction mismatch: lhs {lhs.shape}, rhs {rhs.shape}, "
                         f"transpose_rhs={transpose_rhs}")
    if group_sizes.shape != (num_groups,):
        raise ValueError(f"group_sizes must have shape ({num_groups},), got {group_sizes.shape}")
    out_dtype = lhs.dtype
    if m == 0 or no == 0 or num_groups == 0:
        return jnp.zeros((m, no), out_dtype)
    bm, bk, bn = tiling
    bk, kc_p = _fit_tile(kc, bk)
    bn, no_p = _fit_tile(no, bn)
    lhs = _pad_axis(lhs, 1, kc_p)
    rhs = _pad_axis(_pad_axis(rhs, 2 if transpose_rhs else 1, kc_p), 1 if transpose_rhs else 2, no_p)
    meta, num_items = make_group_metadata(group_sizes, m, bm)
    num_n = no_p // bn
    num_warps = cfg.num_warps or _default_warps(bm, bn)
    kernel = functools.partial(
        _gmm_kernel, bm=bm, bk=bk, bn=bn, num_items=num_items, num_n=num_n,
        num_groups=num_groups, k_steps=kc_p // bk, group_m=cfg.group_m,
        transpose_rhs=transpose_rhs, acc_dtype=cfg.acc_dtype,
        reverse=cfg.reverse_program_order, half_tiles=cfg.half_tiles and bm >= 2 * _MIN_TILE)
    out = _call(cfg, pl.pallas_call(
        kernel,
        out_shape=_out_struct((m, no_p), out_dtype, lhs),
        grid=(num_items * num_n,),
        interpret=cfg.interpret,
        name="gmm_t" if transpose_rhs else "gmm",
        **_compiler_params(num_warps, cfg.num_stages),
    ), meta, lhs, rhs)
    return out[:, :no] if no_p != no else out


def _tgmm_call(lhs: Array, dout: Array, group_sizes: Array, num_groups: int, *,
               cfg: GmmConfig, out_dtype) -> Array:
    """``[E, I, O]``: per group ``lhs_g^T @ dout_g``."""
    m, k = lhs.shape
    n = dout.shape[1]
    if dout.shape[0] != m:
        raise ValueError(f"tgmm: lhs {lhs.shape} and dout {dout.shape} differ in rows")
    if m == 0 or k == 0 or n == 0 or num_groups == 0:
        return jnp.zeros((num_groups, k, n), out_dtype)
    if dout.dtype != lhs.dtype:
        dout = dout.astype(lhs.dtype)
    bm, bk, bn = cfg.tgmm_tiling
    bk, k_p = _fit_tile(k, bk)
    bn, n_p = _fit_tile(n, bn)
    lhs = _pad_axis(lhs, 1, k_p)
    dout = _pad_axis(dout, 1, n_p)
    num_k, num_n = k_p // bk, n_p // bn
    num_warps = cfg.tgmm_num_warps or _default_warps(bk, bn)
    kernel = functools.partial(_tgmm_kernel, bm=bm, bk=bk, bn=bn, num_groups=num_groups,
                               num_k=num_k, num_n=num_n, group_m=cfg.group_m,
                               acc_dtype=cfg.acc_dtype, reverse=cfg.reverse_program_order)
    out = _call(cfg, pl.pallas_call(
        kernel,
        out_shape=_out_struct((num_groups, k_p, n_p), out_dtype, lhs),
        grid=(num_groups * num_k * num_n,),
        interpret=cfg.interpret,
        name="tgmm",
        **_compiler_params(num_warps, cfg.tgmm_num_stages or cfg.num_stages),
    ), _group_bounds(group_sizes, m), lhs, dout)
    if (k_p, n_p) != (k, n):
        out = out[:, :k, :n]
    return out


# ------------------------------------------------------------------ custom VJP


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _gmm(lhs: Array, rhs: Array, group_sizes: Array, cfg: GmmConfig) -> Array:
    return _gmm_call(lhs, rhs, group_sizes, tiling=cfg.tiling, cfg=cfg)


def _gmm_fwd(lhs, rhs, group_sizes, cfg):
    return _gmm(lhs, rhs, group_sizes, cfg), (lhs, rhs, group_sizes)


def _gmm_bwd(cfg, res, dout):
    lhs, rhs, group_sizes = res
    dout = dout.astype(lhs.dtype)
    d_lhs = _gmm_call(dout, rhs, group_sizes, tiling=cfg.dlhs_tiling or cfg.tiling, cfg=cfg,
                      transpose_rhs=True)
    d_rhs = _tgmm_call(lhs, dout, group_sizes, rhs.shape[0], cfg=cfg, out_dtype=rhs.dtype)
    return d_lhs.astype(lhs.dtype), d_rhs, None


_gmm.defvjp(_gmm_fwd, _gmm_bwd)


# ------------------------------------------------------------------ public API


def gmm(lhs: Array, rhs: Array, group_sizes: Array, *,
        tiling: tuple[int, int, int] = DEFAULT_TILING,
        interpret: bool = False,
        preferred_element_type=jnp.float32,
        dlhs_tiling: tuple[int, int, int] | None = None,
        tgmm_tiling: tuple[int, int, int] = DEFAULT_TGMM_TILING,
        num_warps: int | None = None,
        num_stages: int = DEFAULT_NUM_STAGES,
        tgmm_num_warps: int | None = None,
        tgmm_num_stages: int | None = None,
        group_m: int = DEFAULT_GROUP_M,
        config: GmmConfig | None = None) -> Array:
    """Grouped matmul ``[X, I] x [E, I, O] -> [X, O]`` (in ``lhs.dtype``), differentiable
    in ``lhs`` and ``rhs``.

    Rows ``offsets[g]:offsets[g+1]`` use ``rhs[g]``; rows past ``sum(group_sizes)`` are
    0. ``preferred_element_type`` is the accumulator dtype (float32). ``rhs`` is cast to
    ``lhs.dtype`` if they differ. See :class:`GmmConfig` for the other parameters;
    ``config``, if given, replaces all of them (``interpret`` included).
    """
    if lhs.ndim != 2 or rhs.ndim != 3:
        raise ValueError(f"gmm expects lhs [M, K] and rhs [G, K, N], got {lhs.shape}, {rhs.shape}")
    cfg = config or GmmConfig(
        tiling=tiling, dlhs_tiling=dlhs_tiling, tgmm_tiling=tgmm_tiling, num_warps=num_warps,
        num_stages=num_stages, tgmm_num_warps=tgmm_num_warps, tgmm_num_stages=tgmm_num_stages,
        group_m=group_m, interpret=interpret, acc_dtype=preferred_element_type)
    if rhs.dtype != lhs.dtype:
        rhs = rhs.astype(lhs.dtype)
    lhs, rhs, group_sizes = _match_varying(lhs, rhs, group_sizes.astype(jnp.int32))
    return _gmm(lhs, rhs, group_sizes, cfg)


def tgmm(lhs: Array, dout: Array, group_sizes: Array, *,
         tiling: tuple[int, int, int] = DEFAULT_TGMM_TILING,
         interpret: bool = False,
         preferred_element_type=jnp.float32,
         num_warps: int | None = None,
         num_stages: int = DEFAULT_NUM_STAGES,
         group_m: int = DEFAULT_GROUP_M,
         out_dtype=None) -> Array:
    """``[X, I], [X, O] -> [E, I, O]``: per group ``lhs_g^T @ dout_g`` (0 if empty).

    ``tiling = (bm, bk, bn)``: ``bm`` rows per step, output tile ``[bk, bn]``. Not
    differentiable (it is the weight gradient of :func:`gmm`).
    """
    cfg = GmmConfig(tgmm_tiling=tiling, tgmm_num_warps=num_warps, num_stages=num_stages,
                    group_m=group_m, interpret=interpret, acc_dtype=preferred_element_type)
    lhs, dout, group_sizes = _match_varying(lhs, dout, group_sizes.astype(jnp.int32))
    return _tgmm_call(lhs, dout, group_sizes, group_sizes.shape[0], cfg=cfg,
                      out_dtype=out_dtype or lhs.dtype)


SMALL_GROUP_ROWS = 512   # mean rows per group at or below which the small-group tilings apply


def small_groups(m: int, num_groups: int) -> bool:
    """Whether ``m`` rows over ``num_groups`` groups average at most :data:`SMALL_GROUP_ROWS`."""
    return m <= SMALL_GROUP_ROWS * max(num_groups, 1)


def pipeline_smem_bytes(cfg: GmmConfig, itemsize: int) -> int:
    """Shared memory the kernels' software pipelines hold (the largest of the three): each
    stage keeps one ``lhs`` and one ``rhs`` block of ``itemsize``-byte elements. H100/H200
    have 227 KiB per block; Triton adds its epilogue buffers on top."""
    (bm, bk, bn), (dm, dk, dn), (tm, tk, tn) = cfg.tiling, cfg.dlhs_tiling or cfg.tiling, cfg.tgmm_tiling
    stages, tstages = cfg.num_stages, cfg.tgmm_num_stages or cfg.num_stages
    return itemsize * max(stages * (bm * bk + bk * bn), stages * (dm * dk + dk * dn),
                          tstages * (tm * tk + tm * tn))


def config_for(m: int, num_groups: int, k: int, n: int, *, interpret: bool = False,
               itemsize: int = 2) -> GmmConfig:
    """Kernel configuration for ``gmm([m, k], [num_groups, k, n])`` and its VJP, from the
    H100/H200 sweeps in BENCHMARKS.md (``benchmarks/gmm_kernel.py``).

    * Output tiles ``128 x 256`` (8 warps) for wide outputs (``>= 2048``), ``128 x 128``
      otherwise; the same rule by ``k`` for the backward data matmul (its output is
      ``k`` wide).
    * Small groups (``m / num_groups <= SMALL_GROUP_ROWS``, e.g. 128 experts at 16-32k
      token copies): the weight gradient walks its group's rows 32 at a time with 4
      pipeline stages (a 128-row group is then 4 steps deep instead of 2), the
      forward/backward-data kernels use 4 stages, and a group's last tile of at most 64
      rows runs at half height (``half_tiles``: 3-9% faster kernels there; at 1,500-4,000
      rows per group it measured 0-1% slower, so large groups keep the defaults).
    * 4-byte inputs (``itemsize``; float32 models): ``128 x 128`` output tiles, 32-deep
      steps, 3 stages (the 16-bit tiles would ask an H200 for 352 KiB of shared memory;
      :func:`pipeline_smem_bytes`).
    * Decoding steps (a few rows per group) keep these rules: ``16 x 64`` output tiles at
      <= 16 rows per group measured no faster for ``moe_1b`` with its layers scanned on an
      H100 (batch 1: 280.9 against 280.1 tokens/s; batch 8: 1,840 against 1,848; batch
      64: 9,021 against 8,987; BENCHMARKS.md, decoding against transformers). In the unscanned
      layout, which decoding always uses, the grouped matmul is 28% of batch-1 device time, each
      call reading its two experts' weights at 1-2 TB/s; the tiling is not re-measured there.
    """
    small = small_groups(m, num_groups)
    if itemsize >= 4:   # float32: half-depth steps and narrow tiles fit shared memory
        return GmmConfig(tiling=(128, 32, 128), tgmm_tiling=(32, 128, 128), num_stages=3,
                         half_tiles=small, interpret=interpret)
    wide = lambda width: (128, 64, 256) if width >= 2048 else (128, 64, 128)  # noqa: E731
    return GmmConfig(
        tiling=wide(n), dlhs_tiling=wide(k),
        tgmm_tiling=(32, 128, 128) if small else DEFAULT_TGMM_TILING,
        num_stages=4 if small else DEFAULT_NUM_STAGES,
        tgmm_num_stages=4 if small else None,
        half_tiles=small,
        interpret=interpret)


def gmm_backend(lhs: Array, rhs: Array, group_sizes: Array) -> Array:
    """``GMM_BACKENDS`` entry: :func:`gmm` configured by :func:`config_for`; interpreted
    off GPU."""
    cfg = config_for(lhs.shape[0], rhs.shape[0], rhs.shape[1], rhs.shape[2],
                     interpret=jax.default_backend() != "gpu", itemsize=jnp.dtype(lhs.dtype).itemsize)
    return gmm(lhs, rhs, group_sizes, config=cfg)
