"""Randomized parameter sharing (RPS): ROAST and STABLE-RPS.

ROAST: Desai, Zhou and Shrivastava, "Efficient model compression with Random Operation
Access Specific Tile (ROAST) hashing" (2022). STABLE-RPS: Desai and
Shrivastava, "In defense of parameter sharing for model-compression" (ICLR 2024).

Einsum letters: ``r`` rows of a weight's matrix view (every axis but its last, a leading
expert axis included), ``c`` its columns (the last axis), ``n`` weights over all targets,
``m`` slots of the shared array.

RPS trains a *compressed model from scratch*: every target weight (selected by
``adapter.targets``) is recovered, at every forward, from one global trainable array
``M [m]``, ``m = ceil(c·n)`` (``c`` = ``adapter.rps_compression``)::

    w_i = λ_l(i) · g(i) · M[h(i)]          i = global index (module offset + local index)
    λ_l = std(weight l's original init) / std(M's init),     M ~ U(±init_std)

with a sign hash ``g(i) ∈ {±1}`` and an index hash ``h(i) ∈ [0, m)``. Norms, biases and
every non-target weight stay dense. Two index mappings (``adapter.rps_mapping``):

- ``roast`` (Desai & Shrivastava, "Hardware-aware compression with random operation
  access specific tile (ROAST) hashing", ICML 2023): each weight is viewed as a matrix
  ``[r, c]`` cut into ``BK×BN`` tiles (``adapter.rps_tile`` = BK = BN); tile ``(p, q)``
  reads the contiguous slice ``M[start : start + BK·BN]`` row-major, with
  ``start = ((p·R3 + q·R2 + R1) mod R0) mod (m − BK·BN)``, ``R0`` = P (below). Sharing is
  global: ``p`` counts tile rows over all targets stacked one below the other, so every
  layer hashes into the same ``M``. Edge tiles (``r`` or ``c`` not a multiple of the tile)
  use the leading part of their slice: element ``(r, s)`` of a tile reads
  ``start + r·BN + s``. The view is read off the shape alone (``merge`` sees the base
  without logical names): it is ``(d_in, d_out)`` for 2-axis weights, attention ``o``
  ``[H, A, D]`` and stacked experts ``[E, D, F]`` (each expert's rows in turn), but
  ``(D·H, A)`` rather than ``(D, H·A)`` for ``q``/``k``/``v`` ``[D, H, A]``.
- ``stable`` (STABLE-RPS, Desai, Zhou & Shrivastava, "In defense of parameter sharing for
  model-compression", ICLR 2024; "RandomFold", ``ParetoCyclicMapper``): the global index
  is folded onto ``M``: ``h(i) = (hash(⌊i/m⌋) + (i mod m)) mod m``. Each fold is a cyclic
  shift of ``range(m)``, so every slot is used ``⌊n/m⌋`` or ``⌈n/m⌉`` times, and with
  ``m ≥ n`` (``c = 1``) ``h`` is injective: RPS can represent the dense model exactly.

Index hash (``UHasher``): ``hash(x) = ((a·x + b·x² + c) mod P) mod m``, ``P = 2038074743``,
``a, b, c`` (and ROAST's ``R1..R3``) drawn from ``adapter.rps_seed``. It is computed exactly
in uint32 arithmetic (modular multiplication by doubling, every intermediate below 2^32),
inside ``jit``, from the global index: no index array is stored, and none of size ``n``
exists outside the traced forward. The sign hash is the murmur3 finaliser of the global
index (uint32, wrapping), its top bit the sign.

Parameters (``count``): the adapter tree is ``{'rps': {'M': [m]}}`` plus, for every
non-target leaf of the base, a dense leftover of that leaf's shape. All of them train: the
optimizer state holds ``M`` and the leftovers, and the frozen base that the training loop
passes is only a template (shapes, the init std of the targets, the init values of the
leftovers). ``count`` = ``m`` + the leftovers' sizes = the trainable parameters.

Two choices this project made where the train loop's adapter protocol leaves no other:

- The training loop calls ``init`` on the *abstract* base (shapes and logical names, no
  values), so the leftovers are stored as *deltas* from the base's init, zero at start,
  merged as ``base + delta``: the same model, gradients and Adam steps as training the
  leftover itself, except that weight decay pulls a non-target matrix towards its init
  instead of zero (with ``optimizer.weight_decay_mask=matrices`` the default targets
  leave only the embedding, which is not decayed, and 1-D norms: no difference there).
- ``λ_l``'s numerator is the std of the base weight, read at ``merge`` (the base is
  frozen, so it is fixed; in training it is the model's own random init from
  ``config.seed``). Its denominator is the std of M's init, ``init_std/√3`` for
  U(±init_std): the paper's "init_std(M)" read as M's init std, so the recovered weights
  start with their dense init's std in expectation (with the bound itself they would start √3
  smaller).

STABLE-RPS gradient scaler (``adapter.rps_grad_scaler``, the authors' "v1",
``RoastGradScaler.scale_step``): slot ``j``'s gradient is divided by
``s_j = (Σ_{i: h(i)=j} λ_l(i))² / count_j`` (1 for an unused slot). It needs ``λ``, hence
the base's values, which an optax transformation does not see; so it is applied in
``merge``'s backward pass (an identity with a custom VJP on ``M``), with ``s`` computed by
a segment sum over the hashed indices once per step. The effect is the optax
pre-transformation's (the division happens before clipping and the optimizer); only the
logged ``grad_norm`` is measured after it. Caveat: the scaling is constant per
coordinate, so Adam's per-coordinate normalisation mostly cancels it; it matters for
SGD-type optimizers (``optimizer.name=sgd``).

``M`` is one-dimensional, so ``optimizer.weight_decay_mask=matrices`` does not decay it.
The global index is uint32: targets must hold fewer than 2^31 weights. ``M`` is
replicated (logical name ``None``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from routezoo.layers.adapters.base import Adapter, Target, flat_params, register, select_targets
from routezoo.layers.adapters.base import _names, _nest, _unbox
from routezoo.layers.sharding import param as logical_param

Params = Any

P = 2038074743            # the prime of the authors' universal hash (UHasher)
MAPPINGS = ("roast", "stable")
_GROUP = "rps"             # adapter tree: {'rps': {'M': [m]}, <leftover paths>: delta}


# --------------------------------------------------------------------------- hashing (uint32, exact)

def mulmod_const(a: int, x: jax.Array) -> jax.Array:
    """``(a·x) mod P`` for a Python int ``a`` and uint32 ``x < P``, exactly: doubling over
    the bits of ``a`` keeps every intermediate below ``2P < 2^32``."""
    a %= P
    r = jnp.zeros_like(x)
    for bit in bin(a)[2:]:
        r = (r + r) % P
        if bit == "1":
            r = (r + x) % P
    return r


def mulmod(x: jax.Array, y: jax.Array) -> jax.Array:
    """``(x·y) mod P`` for uint32 ``x, y < P``, exactly (doubling over the 31 bits of ``y``)."""
    r = jnp.zeros_like(x)
    for bit in range(30, -1, -1):
        r = (r + r) % P
        r = jnp.where((y >> bit) & 1, (r + x) % P, r)
    return r


def uhash(x: jax.Array, coeffs: tuple[int, int, int], m: int) -> jax.Array:
    """``((a·x + b·x² + c) mod P) mod m`` for uint32 ``x`` (computed as ``x·(a + b·x)``)."""
    a, b, c = coeffs
    x = x.astype(jnp.uint32) % P
    t = (mulmod_const(b, x) + a % P) % P
    t = (mulmod(x, t) + c % P) % P
    return t % m


def sign_hash(i: jax.Array, seed: int) -> jax.Array:
    """``g(i) ∈ {±1}`` (float32): the top bit of the murmur3 finaliser of ``i ^ seed``."""
    h = i.astype(jnp.uint32) ^ jnp.uint32(seed & 0xFFFFFFFF)
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    h = h ^ (h >> 16)
    return jnp.where(h >> 31, -1.0, 1.0).astype(jnp.float32)


def _seeds(seed: int) -> dict[str, Any]:
    """Hash coefficients from ``adapter.rps_seed``: fold hash (a, b, c), ROAST (R1, R2, R3),
    and the sign seed."""
    rng = np.random.default_rng([seed, 0x5EED])
    fold = tuple(int(v) for v in rng.integers(1, P, 3))
    roast = tuple(int(v) for v in rng.integers(1, P, 3))
    return {"fold": fold, "roast": roast, "sign": int(rng.integers(0, 2**32))}


# --------------------------------------------------------------------------- layout

@dataclasses.dataclass(frozen=True)
class Slab:
    """One target in the global layout: its flat weights are global indices
    ``[offset, offset + size)``; its ROAST tile rows are global rows
    ``[row_tile_offset, row_tile_offset + ceil(r/BK))``."""

    path: str
    shape: tuple[int, ...]
    offset: int
    row_tile_offset: int

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def rows(self) -> int:          # r: every axis but the last
        return math.prod(self.shape[:-1])

    @property
    def cols(self) -> int:          # c: the last axis
        return self.shape[-1]


def _plain(params: Params) -> Params:
    """Boxes removed, values (or abstract shapes) kept."""
    return jax.tree.map(_unbox, params, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))


@register
@dataclasses.dataclass(frozen=True)
class RPS(Adapter):
    """Randomized parameter sharing: ROAST (``mapping='roast'``) or STABLE-RPS
    (``mapping='stable'``); see the module docstring. Trains from scratch: the adapter
    parameters are ``M [m]`` and every non-target weight of the model. Mergeable: ``merge``
    gives plain weights for inference.

    Attributes mirror ``config.adapter``: ``targets``, ``rps_compression`` (``c`` in
    ``(0, 1]``: 1 is the dense model's size; more would spend more parameters than it),
    ``rps_mapping``, ``rps_tile`` (ROAST tile ``BK = BN``), ``rps_init_std``, ``rps_seed``,
    ``rps_grad_scaler``.
    """

    targets: str
    compression: float = 0.1
    mapping: str = "stable"
    tile: int = 8
    init_std: float = 0.01
    seed: int = 0
    grad_scaler: bool = True

    name = "rps"
    mergeable = True

    @classmethod
    def from_config(cls, cfg: Any) -> "RPS":
        return cls(targets=str(cfg.targets), compression=float(cfg.rps_compression), mapping=str(cfg.rps_mapping),
                   tile=int(cfg.rps_tile), init_std=float(cfg.rps_init_std), seed=int(cfg.rps_seed),
                   grad_scaler=bool(cfg.rps_grad_scaler))

    def __post_init__(self):
        if not 0 < self.compression <= 1:
            raise ValueError(f"adapter.rps_compression={self.compression} must be in (0, 1] "
                             "(m = ceil(c * n) shared weights for n target weights; 1 = the dense size)")
        if self.mapping not in MAPPINGS:
            raise ValueError(f"unknown adapter.rps_mapping {self.mapping!r}; allowed: {', '.join(MAPPINGS)}")
        if self.tile < 1:
            raise ValueError(f"adapter.rps_tile={self.tile} must be >= 1 (ROAST tiles are tile x tile)")
        if not self.init_std > 0:
            raise ValueError(f"adapter.rps_init_std={self.init_std} must be > 0")

    # ------------------------------------------------------------------ layout

    def select(self, params: Params) -> dict[str, Target]:
        """Target weights (matched on the unboxed tree, so the choice is the same for the
        named base at ``init`` and the plain base at ``merge``)."""
        return select_targets(_plain(params), self.targets)

    def layout(self, params: Params) -> tuple[tuple[Slab, ...], int, int]:
        """(slabs in sorted path order, n, m)."""
        slabs, offset, rows = [], 0, 0
        for path, t in sorted(self.select(params).items()):
            s = Slab(path, t.shape, offset, rows)
            slabs.append(s)
            offset += s.size
            rows += -(-s.rows // self.tile)
        n = offset
        if n >= 2**31:
            raise ValueError(f"adapter rps: {n} target weights; the uint32 global index allows < 2^31")
        m = max(1, math.ceil(self.compression * n))
        if self.mapping == "roast" and m <= self.tile ** 2:
            raise ValueError(f"adapter.rps_compression={self.compression} gives m={m} shared weights for n={n}, "
                             f"not more than one adapter.rps_tile={self.tile} tile ({self.tile ** 2}); "
                             "raise the compression or lower the tile")
        return tuple(slabs), n, m

    def indices(self, slab: Slab, n: int, m: int) -> tuple[jax.Array, jax.Array]:
        """``(h [size] int32, g [size] float32)`` of one target, in its row-major order."""
        seeds = _seeds(self.seed)
        i = slab.offset + jnp.arange(slab.size, dtype=jnp.uint32)          # global index
        sign = sign_hash(i, seeds["sign"])
        if self.mapping == "stable":
            folds = -(-n // m)
            table = uhash(jnp.arange(folds, dtype=jnp.uint32), seeds["fold"], m)   # hash(fold) [F]
            h = (table[(i // m).astype(jnp.int32)] + i % m) % m
            return h.astype(jnp.int32), sign
        bk = bn = self.tile
        r1, r2, r3 = seeds["roast"]
        kt, nt = -(-slab.rows // bk), -(-slab.cols // bn)
        p = slab.row_tile_offset + jnp.arange(kt, dtype=jnp.uint32)          # global tile rows
        q = jnp.arange(nt, dtype=jnp.uint32)
        start = ((mulmod_const(r3, p)[:, None] + mulmod_const(r2, q)[None, :]) % P + r1 % P) % P
        start = start % (m - bk * bn)                                          # [Kt, Nt]
        start = jnp.repeat(jnp.repeat(start, bk, axis=0), bn, axis=1)[:slab.rows, :slab.cols]   # [r, c]
        r = jnp.arange(slab.rows, dtype=jnp.uint32) % bk
        s = jnp.arange(slab.cols, dtype=jnp.uint32) % bn
        h = start + r[:, None] * bn + s[None, :]
        return h.reshape(-1).astype(jnp.int32), sign

    # ------------------------------------------------------------------ parameters

    def init(self, rng: jax.Array, params: Params, **_sources) -> Params:
        """``{'rps': {'M': [m] ~ U(±init_std)}, <every non-target path>: zeros}`` (boxed;
        the zeros are deltas from the base's init, with the base leaf's logical names)."""
        slabs, _, m = self.layout(params)
        targets = {s.path for s in slabs}
        flat = flat_params(params)
        if _GROUP in {p.split("/", 1)[0] for p in flat}:
            raise ValueError(f"adapter rps: the base has a top-level {_GROUP!r} entry, which the shared array uses")
        bound = self.init_std
        out = {f"{_GROUP}/M": logical_param(
            lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound), (None,))(
                rng, (m,), jnp.float32)}
        for path, leaf in flat.items():
            if path in targets:
                continue
            value = _unbox(leaf)
            names = _names(leaf) or (None,) * len(value.shape)
            out[path] = logical_param(nn.initializers.zeros, names)(rng, tuple(value.shape), value.dtype)
        return _nest(out)

    def _split(self, flat_base: dict[str, Any], adapter: Params):
        ad = flat_params(nn.unbox(adapter))
        if f"{_GROUP}/M" not in ad:
            raise ValueError(f"adapter rps parameters have no {_GROUP}/M (not an rps adapter tree)")
        shared = ad.pop(f"{_GROUP}/M")
        slabs, n, m = self.layout(_nest(flat_base))
        if tuple(shared.shape) != (m,):
            raise ValueError(f"adapter rps: M has shape {tuple(shared.shape)}, but adapter.rps_compression="
                             f"{self.compression} over these targets ({n} weights) needs ({m},)")
        targets = {s.path for s in slabs}
        unknown = sorted(set(ad) - set(flat_base))
        missing = sorted(set(flat_base) - targets - set(ad))
        if unknown or missing:
            raise ValueError(f"adapter rps leftovers do not fit this base (other targets?): "
                             f"not in the base {unknown[:3]}, missing {missing[:3]}")
        return shared, ad, slabs, n, m

    @property
    def shared_std(self) -> float:
        """The std of M's init U(±init_std): ``init_std / √3``."""
        return self.init_std / math.sqrt(3.0)

    def lambdas(self, flat_base: dict[str, Any], slabs) -> dict[str, jax.Array]:
        """``λ_l = std(base weight l) / std(M's init)`` (float32 scalars, no gradient)."""
        return {s.path: jax.lax.stop_gradient(jnp.std(flat_base[s.path].astype(jnp.float32))) / self.shared_std
                for s in slabs}

    def slot_scale(self, base: Params) -> jax.Array:
        """The gradient scaler ``s [m]``: ``(Σ_{i: h(i)=j} λ_l(i))² / count_j``, 1 where unused."""
        flat = flat_params(nn.unbox(base))
        slabs, n, m = self.layout(_nest(flat))
        return self._slot_scale(slabs, n, m, self.lambdas(flat, slabs))

    def _slot_scale(self, slabs, n, m, lams) -> jax.Array:
        sums, counts = jnp.zeros((m,), jnp.float32), jnp.zeros((m,), jnp.float32)
        for s in slabs:
            h, _ = self.indices(s, n, m)
            sums = sums + jax.ops.segment_sum(jnp.full((s.size,), lams[s.path], jnp.float32), h, m)
            counts = counts + jax.ops.segment_sum(jnp.ones((s.size,), jnp.float32), h, m)
        return jnp.where(counts > 0, sums ** 2 / jnp.maximum(counts, 1.0), 1.0)

    def recover(self, base: Params, adapter: Params) -> dict[str, jax.Array]:
        """``{path: w}``: every target weight recovered from ``M`` (the base's dtype)."""
        flat = flat_params(nn.unbox(base))
        shared, _, slabs, n, m = self._split(flat, adapter)
        return self._recover(flat, shared, slabs, n, m)

    def _recover(self, flat, shared, slabs, n, m) -> dict[str, jax.Array]:
        lams = self.lambdas(flat, slabs)
        shared = shared.astype(jnp.float32)
        if self.grad_scaler:
            shared = _divide_grad(shared, jax.lax.stop_gradient(self._slot_scale(slabs, n, m, lams)))
        out = {}
        for s in slabs:
            h, g = self.indices(s, n, m)
            out[s.path] = (lams[s.path] * g * jnp.take(shared, h)).reshape(s.shape).astype(flat[s.path].dtype)
        return out

    def merge(self, base: Params, adapter: Params) -> Params:
        """The base's structure with targets recovered from ``M`` and every other leaf
        ``base + delta`` (unboxed arrays): plain weights, ready for inference."""
        flat = flat_params(nn.unbox(base))
        shared, deltas, slabs, n, m = self._split(flat, adapter)
        out = dict(flat)
        out.update(self._recover(flat, shared, slabs, n, m))
        for path, d in deltas.items():
            w = flat[path]
            out[path] = (w.astype(jnp.float32) + d.astype(jnp.float32)).astype(w.dtype)
        return _nest(out)

    def count(self, params: Params) -> int:
        """Trainable parameters: ``m`` + every non-target leaf of the base."""
        flat = flat_params(_plain(params))
        slabs, n, m = self.layout(params)
        total = sum(math.prod(v.shape) for v in flat.values())
        return m + total - n


@jax.custom_vjp
def _divide_grad(shared: jax.Array, scale: jax.Array) -> jax.Array:
    """Identity on ``M``; its gradient is divided by ``scale`` (the STABLE-RPS scaler)."""
    return shared


def _divide_fwd(shared, scale):
    return shared, scale


def _divide_bwd(scale, g):
    return g / scale, jnp.zeros_like(scale)


_divide_grad.defvjp(_divide_fwd, _divide_bwd)


__all__ = ["MAPPINGS", "P", "RPS", "Slab", "mulmod", "mulmod_const", "sign_hash", "uhash"]
