"""Mixture of Shards (MoS): LoRA shards shared across layers, gathered by frozen indices.

Einsum letters: ``I`` input axes, ``O`` output axes, ``R`` rank.
"""

from __future__ import annotations

import dataclasses
import math
import re
import zlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from routezoo.layers.sharding import param as logical_param
from routezoo.layers.adapters.base import Adapter, _nest, Target, flat_params, from_previous, select_targets
from routezoo.layers.adapters.lora import _check_dropout, _no_experts_for_dropout, lora_delta, low_rank_dropout_delta
from routezoo.layers.adapters.base import register

Params = Any


# --------------------------------------------------------------------------- MoS

_LAYER = re.compile(r"(?<![^/])layer(\d+)/")


def projection_type(path: str) -> str:
    """A target's path with its layer prefix removed: ``layer3/attn/q`` -> ``attn/q``."""
    return _LAYER.sub("", path, count=1)


def _layer_order(path: str) -> tuple:
    m = _LAYER.search(path)
    return (int(m.group(1)) if m else -1, path)


def _init_a(bound):
    return lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound)


@register
@dataclasses.dataclass(frozen=True)
class MoS(Adapter):
    """MoS, Mixture of Shards (Sheng Wang et al., ICLR 2025, "MoS: Unleashing Parameter
    Efficiency of Low-Rank Adaptation with Mixture of Shards", arXiv 2410.00938).

    Per projection type (the target path without its ``layer<i>/`` prefix, e.g. ``attn/q``)
    one global pool of A-shards ``a_pool [P, I/n]`` and one of B-shards ``b_pool [P, O/n]``
    is shared by the ``M`` matrices of that type (``M`` = layers with the projection, times
    ``E`` for stacked experts: each expert matrix is one owner). ``P = r_eq·M·n`` shards.
    Owner ``m``'s factors are gathered through frozen index buffers of length ``r·n``::

        I_A[m] = concat(perm_A[m][:(r - r_pri)·n], P_pub + [m·r_pri·n, (m+1)·r_pri·n))
        A[m]   = a_pool[I_A[m]].reshape(R, I)      # rank vector j = shards j·n .. j·n+n-1
        B[m]   = b_pool[I_B[m]].reshape(R, O)
        W'     = W + (alpha / r) · A[m]ᵀ B[m]      # A [I, R], B [R, O] as in LoRA

    with ``P_pub = (r_eq - r_pri)·M·n`` public shards. The four strategies, each switchable:
    subset selection (``subset_selection``: each owner draws its own random permutation of
    the public shards; off: one permutation shared by all owners, so they all use the same
    public shards), pair dissociation (``pair_dissociation``: B's permutation is drawn
    independently of A's; off: B uses A's), vector sharding (``shards_per_vector`` n > 1:
    one rank vector is stitched from n sub-vector shards; n = 1 off), shard privatisation
    (``private_rank`` r_pri > 0: each owner's last r_pri rank vectors are its own shards;
    0 off). The "off" behaviours of the first two are this project's reading; the card
    (the authors' ``modules/Tied_LoRA.py``) documents only the "on" recipe.

    The routing is not learned and does not depend on the input: the index buffers are
    drawn at random once. They are NOT stored as arrays: :meth:`indices` regenerates them
    deterministically (numpy PCG64) from ``seed`` (``adapter.mos_seed``, saved in the
    adapter checkpoint's ``adapter.json`` with the rest of ``config.adapter``), the
    projection type's name, the hyper-parameters and the owner count, so an adapter
    restored with :func:`training.train.load_adapter` gets identical buffers and
    the optimizer never sees them. (The authors save torch buffers ``lora_pair_mask``.)

    Init as the card: ``a_pool`` U(±1/√I), ``b_pool`` = 0. Scale ``alpha / r`` with the
    ACTIVE rank r (the card's pitfall: raising r shrinks the update). Mergeable.
    Parameters per type: ``P·(I + O)/n = r_eq·M·(I + O)``, LoRA at rank r_eq; compute is
    LoRA at rank r. With ``r_pri = r_eq = r`` and n = 1 every owner has private shards
    only and MoS is exactly LoRA at rank r.
    """

    targets: str
    rank: int = 8                 # r, the active rank
    alpha: float = 16.0
    equiv_rank: int = 2           # r_eq, the parameter budget in LoRA-rank units
    private_rank: int = 1         # r_pri
    shards_per_vector: int = 1    # n
    subset_selection: bool = True
    pair_dissociation: bool = True
    seed: int = 0
    dropout: float = 0.0
    # {kind: (I_A, I_B)} read back from an adapter directory (:meth:`with_buffers`); None:
    # regenerate from ``seed``. Not part of equality or the hash (the config decides those).
    saved_indices: Any = dataclasses.field(default=None, compare=False, hash=False, repr=False)

    name = "mos"
    mergeable = True

    @property
    def hook_delta(self):   # with dropout: on activations, as LoRA
        return self._dropout_delta if self.dropout > 0 else None

    def hook_targets(self, base: Params, adapter: Params) -> dict[str, Target]:
        return {t.path: t for ts in self._resolve(base, flat_params(nn.unbox(adapter))).values() for t in ts}

    def _dropout_delta(self, path: str, x: jax.Array, y: jax.Array, ctx) -> jax.Array:
        if "mos_factors" not in ctx.cache:   # every target's gathered factors, once per bind
            ctx.cache["mos_factors"] = self.factors(_nest(ctx.base), _nest(ctx.params))
        a, b = ctx.cache["mos_factors"][path]
        return low_rank_dropout_delta(x, a, b, self.scale, self.dropout, ctx, path)

    @classmethod
    def from_config(cls, cfg: Any) -> "MoS":
        return cls(targets=str(cfg.targets), rank=int(cfg.rank), alpha=float(cfg.alpha),
                   equiv_rank=int(cfg.mos_equiv_rank), private_rank=int(cfg.mos_private_rank),
                   shards_per_vector=int(cfg.mos_shards_per_vector),
                   subset_selection=bool(cfg.mos_subset_selection),
                   pair_dissociation=bool(cfg.mos_pair_dissociation), seed=int(cfg.mos_seed),
                   dropout=float(cfg.get("lora_dropout", 0.0)))

    def __post_init__(self):
        r, r_eq, r_pri, n = self.rank, self.equiv_rank, self.private_rank, self.shards_per_vector
        if r_eq < 1:
            raise ValueError(f"adapter.mos_equiv_rank={r_eq} must be >= 1")
        if n < 1:
            raise ValueError(f"adapter.mos_shards_per_vector={n} must be >= 1")
        if not 0 <= r_pri <= min(r, r_eq):
            raise ValueError(f"adapter.mos_private_rank={r_pri} must be in [0, min(adapter.rank={r}, "
                             f"adapter.mos_equiv_rank={r_eq})]")
        _check_dropout(self.name, self.dropout)
        if r_pri == r_eq and r != r_eq:
            raise ValueError(f"adapter.mos_private_rank == adapter.mos_equiv_rank == {r_eq} leaves no public "
                             f"shards, so adapter.rank={r} must equal {r_eq} (plain LoRA)")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def select(self, params: Params) -> dict[str, Target]:
        chosen = select_targets(params, self.targets)
        if self.dropout > 0:
            _no_experts_for_dropout(self.name, chosen)
        return chosen

    def groups(self, params: Params) -> dict[str, list[Target]]:
        """Targets by projection type, in layer order (owner ``m`` = position, times experts)."""
        out: dict[str, list[Target]] = {}
        for path, t in sorted(self.select(params).items(), key=lambda kv: _layer_order(kv[0])):
            out.setdefault(projection_type(path), []).append(t)
        n = self.shards_per_vector
        for kind, ts in out.items():
            t0 = ts[0]
            if any((t.d_in, t.d_out, t.experts) != (t0.d_in, t0.d_out, t0.experts) for t in ts):
                raise ValueError(f"adapter mos: the {kind!r} weights differ in shape across layers; "
                                 "one shard pool needs one shape per projection type")
            if t0.d_in % n or t0.d_out % n:
                raise ValueError(f"adapter.mos_shards_per_vector={n} must divide d_in={t0.d_in} and "
                                 f"d_out={t0.d_out} of {kind!r}")
            owners = sum(t.num_experts for t in ts)
            if self.rank - self.private_rank > (self.equiv_rank - self.private_rank) * owners:
                raise ValueError(f"adapter.rank={self.rank} too large for {kind!r}: needs (rank - mos_private_rank)"
                                 f" <= (mos_equiv_rank - mos_private_rank) * {owners} matrices")
        return out

    def pool_size(self, owners: int) -> tuple[int, int]:
        """(P, P_pub) shards of a pool shared by ``owners`` matrices."""
        n = self.shards_per_vector
        return self.equiv_rank * owners * n, (self.equiv_rank - self.private_rank) * owners * n

    def buffers(self, params: Params) -> dict[str, np.ndarray]:
        """Every type's index buffers by name (``'attn/q/I_A'``, ...), as saved with the
        adapter (``WORKDIR/adapter/buffers.npz``)."""
        out = {}
        for kind, ts in self.groups(params).items():
            out[f"{kind}/I_A"], out[f"{kind}/I_B"] = self.indices(kind, sum(t.num_experts for t in ts))
        return out

    def with_buffers(self, buffers: dict[str, np.ndarray]) -> "MoS":
        """This method using saved index buffers (:meth:`buffers`) instead of regenerating
        them: an adapter keeps its shards' assignment even where another numpy draws
        other permutations from the same seed."""
        kinds = sorted({k.rsplit("/", 1)[0] for k in buffers})
        saved = {k: (np.asarray(buffers[f"{k}/I_A"], np.int32), np.asarray(buffers[f"{k}/I_B"], np.int32))
                 for k in kinds}
        return dataclasses.replace(self, saved_indices=saved)

    def indices(self, kind: str, owners: int) -> tuple[np.ndarray, np.ndarray]:
        """The frozen index buffers ``(I_A, I_B)``, int32 ``[owners, r·n]``, of one type:
        the saved ones (:meth:`with_buffers`) or regenerated from ``seed``."""
        if self.saved_indices is not None and kind in self.saved_indices:
            ia, ib = self.saved_indices[kind]
            if ia.shape != (owners, self.rank * self.shards_per_vector) or ib.shape != ia.shape:
                raise ValueError(f"saved MoS index buffers of {kind!r} are shaped {ia.shape}, this config "
                                 f"needs {(owners, self.rank * self.shards_per_vector)}")
            return ia, ib
        r, r_pri, n = self.rank, self.private_rank, self.shards_per_vector
        p, p_pub = self.pool_size(owners)
        rng = np.random.default_rng([self.seed, zlib.crc32(kind.encode())])
        n_pub = (r - r_pri) * n
        perms_a = [rng.permutation(p_pub) for _ in range(owners if self.subset_selection else 1)]
        perms_b = ([rng.permutation(p_pub) for _ in range(len(perms_a))] if self.pair_dissociation
                   else perms_a)
        out = []
        for perms in (perms_a, perms_b):
            rows = []
            for m in range(owners):
                pub = perms[m if self.subset_selection else 0][:n_pub]
                private = p_pub + np.arange(m * r_pri * n, (m + 1) * r_pri * n)
                rows.append(np.concatenate([pub, private]))
            out.append(np.stack(rows).astype(np.int32))
        return out[0], out[1]

    def init(self, rng: jax.Array, params: Params, previous: Params | None = None) -> Params:
        """``{'mos': {type: {'a_pool': [P, I/n], 'b_pool': [P, O/n]}}}`` (boxed)."""
        out = {}
        n = self.shards_per_vector
        for i, (kind, ts) in enumerate(sorted(self.groups(params).items())):
            t = ts[0]
            p, _ = self.pool_size(sum(x.num_experts for x in ts))
            a = logical_param(_init_a(1.0 / math.sqrt(t.d_in)), ("rank", None))(
                jax.random.fold_in(rng, i), (p, t.d_in // n), jnp.float32)
            b = logical_param(nn.initializers.zeros, ("rank", None))(rng, (p, t.d_out // n), jnp.float32)
            out[f"mos/{kind}/a_pool"], out[f"mos/{kind}/b_pool"] = a, b
        return from_previous(_nest(out), previous, self.name)

    def _resolve(self, params: Params, pools: dict[str, Any]) -> dict[str, list[Target]]:
        """Targets by type, their ``[E?, I, O]`` split read off the pool shapes.

        The frozen base arrives unboxed inside training (no logical names, so
        :func:`split_axes` cannot tell ``o [H, K, D]`` or ``[E, D, F]`` apart); the pool
        widths ``I/n``, ``O/n`` and owner count ``P/(r_eq·n)`` fix the split, as they were
        made from the named base at :meth:`init`.
        """
        groups: dict[str, list[Target]] = {}
        for path, t in sorted(self.select(params).items(), key=lambda kv: _layer_order(kv[0])):
            groups.setdefault(projection_type(path), []).append(t)
        n, out = self.shards_per_vector, {}
        for kind, ts in groups.items():
            if f"mos/{kind}/a_pool" not in pools:
                raise ValueError(f"adapter mos has no shard pool for {kind!r}; pools: "
                                 f"{', '.join(sorted({k.rsplit('/', 1)[0][4:] for k in pools}))}")
            (p, i_n), (_, o_n) = pools[f"mos/{kind}/a_pool"].shape, pools[f"mos/{kind}/b_pool"].shape
            shape = ts[0].shape
            split = next(((e, k) for e in (0, 1) for k in range(1, len(shape) - e)
                          if p == self.equiv_rank * n * len(ts) * (shape[0] if e else 1)
                          and math.prod(shape[e:e + k]) == i_n * n and math.prod(shape[e + k:]) == o_n * n),
                         None)
            if split is None:
                raise ValueError(f"adapter mos pools of {kind!r} ({p}, {i_n}), ({p}, {o_n}) do not fit its "
                                 f"{len(ts)} weights of shape {shape}")
            out[kind] = [Target(t.path, t.shape, t.names, *split) for t in ts]
        return out

    def factors(self, params: Params, adapter: Params) -> dict[str, tuple[jax.Array, jax.Array]]:
        """``{path: (A [E?, I, R], B [E?, R, O])}``: every target's gathered LoRA factors."""
        pools = flat_params(nn.unbox(adapter))
        out = {}
        r = self.rank
        for kind, ts in self._resolve(params, pools).items():
            a_pool, b_pool = pools[f"mos/{kind}/a_pool"], pools[f"mos/{kind}/b_pool"]
            idx_a, idx_b = self.indices(kind, sum(t.num_experts for t in ts))
            m = 0
            for t in ts:
                e = t.num_experts
                # [e, r·n, I/n] -> [e, R, I] (rank vector j = its n shards concatenated) -> [e, I, R]
                a = jnp.take(a_pool, idx_a[m:m + e], axis=0).reshape(e, r, t.d_in).transpose(0, 2, 1)
                b = jnp.take(b_pool, idx_b[m:m + e], axis=0).reshape(e, r, t.d_out)
                out[t.path] = (a, b) if t.experts else (a[0], b[0])
                m += e
        return out

    def merge(self, base: Params, adapter: Params) -> Params:
        """Base parameters with ``(alpha/r)·A·B`` added to every target (unboxed arrays)."""
        targets = {t.path: t for ts in self._resolve(base, flat_params(nn.unbox(adapter))).values() for t in ts}
        flat = flat_params(nn.unbox(base))
        for path, (a, b) in self.factors(base, adapter).items():
            w = flat[path]
            flat[path] = (w.astype(jnp.float32) + self.scale * lora_delta(targets[path], a, b)).astype(w.dtype)
        return _nest(flat)

    def count(self, params: Params) -> int:
        """Adapter parameters: ``Σ_types r_eq·M·(I + O)`` (the paper's ``P·(I+O)/n``)."""
        return sum(self.equiv_rank * sum(t.num_experts for t in ts) * (ts[0].d_in + ts[0].d_out)
                   for ts in self.groups(params).values())
