"""Adapters: parameter-efficient fine-tuning of any routezoo model without editing it.

Einsum letters: ``B`` batch, ``L`` length, ``I`` a weight's flattened input axes,
``O`` its flattened output axes, ``E`` experts, ``R`` rank.

Mechanism (parameter space). An adapter never touches model code. It reads the base
model's parameter tree (boxed with logical axis names, or plain arrays), selects target
weights with a regular expression over their paths, and keeps its own parameters in a
separate tree that mirrors those paths::

    base    {'layer0': {'attn': {'q': W [D, H, K], ...}, 'mlp': {'wi': [D, F], ...}}, ...}
    adapter {'layer0': {'attn': {'q': {'lora_a': A [D, R], 'lora_b': B [R, H, K]}}}, ...}

The model is applied with ``params = adapter.merge(base, adapter_params)``. Inside the
training loss that merge is recomputed every step from the frozen base and the trainable
adapter, and only the adapter is differentiated, so gradients (and the optimizer state)
exist for adapter parameters only. Called once outside training, the same merge gives the
merged weights for inference: one model, no adapter code left on the hot path.

Target paths are ``/``-joined parameter paths, e.g. ``layer0/attn/q``, ``layer1/mlp/wo``,
``layer1/moe/wi``. ``targets`` is one regular expression matched against the *end* of
the path on whole path components: ``attn/(q|v)`` selects ``layer*/attn/q`` and
``layer*/attn/v`` (not ``q_bias`` or ``q_norm``); ``mlp/.*`` every MLP matrix;
``attn/(q|v)|mlp/wo`` both. Only weights with at least two axes beyond a leading expert
axis can be targets; biases and norm scales never are.

Input/output split of a weight ``W`` (from its logical axis names; without names the
first axis is the input): a weight whose last axis is ``embed`` writes into the residual
stream, so all its other axes are inputs (attention ``o`` ``[H, K, D]``: in ``H·K``, out
``D``; ``mlp/wo`` ``[F, D]``: in ``F``); any other weight reads its first axis (``q``
``[D, H, K]``: in ``D``, out ``H·K``; ``wi`` ``[D, F]``; ``embedding`` ``[V, D]``: in ``V``,
the one-hot token). Stacked experts (first logical axis ``expert``, ``[E, D, F]``) get one
independent low-rank pair per expert: ``A [E, D, R]``, ``B [E, R, F]``.

Methods are registered by name in :data:`METHODS`; :func:`from_config` builds one from
``config.adapter``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import re
import zlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import traverse_util

from routezoo.layers.sharding import param as logical_param

Params = Any

METHODS: dict[str, Any] = {}


def register(cls):
    """Class decorator: makes ``cls`` selectable as ``adapter.method=cls.name``.

    A method class has ``name``, ``mergeable``, ``from_config(cfg)`` (a classmethod taking
    ``config.adapter``), ``select``, ``init``, ``merge`` and ``count``; methods that act on
    activations (per example or per token) also define ``hook`` (see
    :mod:`routezoo.layers.adapter_hooks`).
    """
    METHODS[cls.name] = cls
    return cls


# --------------------------------------------------------------------------- paths

def _unbox(x):
    return x.value if isinstance(x, nn.meta.AxisMetadata) else x


def _names(x) -> tuple | None:
    return tuple(x.names) if isinstance(x, nn.LogicallyPartitioned) else None


def flat_params(params: Params) -> dict[str, Any]:
    """``{'layer0/attn/q': leaf, ...}``; leaves stay boxed if they were."""
    params = params.unfreeze() if hasattr(params, "unfreeze") else params
    leaves = traverse_util.flatten_dict(
        jax.tree.map(lambda x: x, params, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata)),
        sep="/", is_leaf=lambda _, x: isinstance(x, nn.meta.AxisMetadata))
    return leaves


def adapted_paths(flat_base: dict[str, Any], flat_adapter: dict[str, Any]) -> list[str]:
    """Paths of the base weights an adapter tree adapts (its leaves are ``PATH/name``),
    sorted; ``ValueError`` if one has no matching base weight."""
    paths = sorted({p.rsplit("/", 1)[0] for p in flat_adapter})
    for path in paths:
        if path not in flat_base:
            raise ValueError(f"adapter parameter {path!r} has no matching base weight")
    return paths


@dataclasses.dataclass(frozen=True)
class Target:
    """One adapted weight: its path, shape, and how it splits into ``[E?, I, O]``."""

    path: str
    shape: tuple[int, ...]
    names: tuple | None     # logical axis names of the base weight, if known
    experts: int            # 1: one leading expert axis (per-expert adapters); 0: none
    num_in: int             # number of input axes after the expert axis

    @property
    def in_shape(self) -> tuple[int, ...]:
        return self.shape[self.experts:self.experts + self.num_in]

    @property
    def out_shape(self) -> tuple[int, ...]:
        return self.shape[self.experts + self.num_in:]

    @property
    def d_in(self) -> int:
        return math.prod(self.in_shape)

    @property
    def d_out(self) -> int:
        return math.prod(self.out_shape)

    @property
    def num_experts(self) -> int:
        return self.shape[0] if self.experts else 1


def split_axes(shape: tuple[int, ...], names: tuple | None) -> tuple[int, int] | None:
    """(expert axes, input axes) of a weight, or None if it cannot be adapted."""
    lead = 1 if names and names[0] == "expert" else 0
    rest = len(shape) - lead
    if rest < 2:
        return None
    if names and names[-1] == "embed":
        return lead, rest - 1
    return lead, 1


def adaptable(params: Params) -> dict[str, Target]:
    """Every weight an adapter can target, by path."""
    out = {}
    for path, leaf in flat_params(params).items():
        if path.rsplit("/", 1)[-1].endswith("bias"):   # q_bias [H, K] has two axes but is no weight
            continue
        value, names = _unbox(leaf), _names(leaf)
        split = split_axes(tuple(value.shape), names)
        if split is not None:
            out[path] = Target(path, tuple(value.shape), names, *split)
    return out


def _path_summary(paths) -> str:
    collapsed = sorted({re.sub(r"(?<![^/])layer\d+(?=/)", "layer*", p) for p in paths})
    return ", ".join(collapsed)


def select_targets(params: Params, pattern: str) -> dict[str, Target]:
    """Targets whose path ends with a match of ``pattern`` (on whole components).

    Raises ``ValueError`` listing the paths that exist when nothing matches.
    """
    try:
        rx = re.compile(rf"(?:.*/)?(?:{pattern})")
    except re.error as e:
        raise ValueError(f"adapter.targets {pattern!r} is not a regular expression ({e})") from None
    candidates = adaptable(params)
    chosen = {p: t for p, t in candidates.items() if rx.fullmatch(p)}
    if not chosen:
        raise ValueError(f"adapter.targets {pattern!r} matches no adaptable parameter; paths that "
                         f"exist (layer index as *): {_path_summary(candidates)}")
    return chosen


def _nest(flat: dict[str, Any]) -> dict:
    return traverse_util.unflatten_dict(flat, sep="/")


def from_previous(fresh: Params, previous: Params | None, method: str) -> Params:
    """``fresh`` (boxed) with every leaf replaced by ``previous``'s at the same path
    (``init.adapter_from``: continue a trained adapter of the same method and shapes);
    ``ValueError`` naming the first path that is missing or shaped differently."""
    if previous is None:
        return fresh
    prev = flat_params(nn.unbox(previous))
    out = {}
    for path, leaf in flat_params(fresh).items():
        value = _unbox(leaf)
        if path not in prev or tuple(prev[path].shape) != tuple(value.shape):
            got = "missing" if path not in prev else f"shaped {tuple(prev[path].shape)}"
            raise ValueError(f"init.adapter_from: {path} is {got}, adapter.method={method!r} here needs "
                             f"{tuple(value.shape)} (same method, targets and ranks)")
        new = jnp.asarray(prev[path], value.dtype)
        out[path] = leaf.replace_boxed(new) if isinstance(leaf, nn.meta.AxisMetadata) else new
    return _nest(out)


# --------------------------------------------------------------------------- LoRA

def _check_dropout(method: str, p: float) -> None:
    if not 0.0 <= p < 1.0:
        raise ValueError(f"adapter.lora_dropout={p} of adapter.method={method!r} must be in [0, 1)")


def _no_experts_for_dropout(method: str, targets: dict[str, Target]) -> None:
    bad = sorted(p for p, t in targets.items() if t.experts)
    if bad:
        raise ValueError(f"adapter.lora_dropout > 0 runs adapter.method={method!r} on activations, which stacked "
                         f"experts ({bad[0]}) do not pass through; use lora_dropout=0 or non-expert targets")


def low_rank_dropout_delta(x: jax.Array, a: jax.Array, b: jax.Array, scale: float, p: float, ctx, path: str):
    """``scale · (dropout(x) A) B`` for ``x [B, S, I]``, ``A [I, R]``, ``B [R, O]``
    (inverted dropout with rate ``p``; none when the context is deterministic)."""
    x = x.astype(jnp.float32)
    key = ctx.rng_for(path)
    if key is not None and p > 0:
        keep = jax.random.bernoulli(key, 1.0 - p, x.shape)
        x = jnp.where(keep, x / (1.0 - p), 0.0)
    low = jnp.einsum("BSI,IR->BSR", x, a.astype(jnp.float32))
    return scale * jnp.einsum("BSR,RO->BSO", low, b.astype(jnp.float32))


def _target_from_factors(path: str, w_shape: tuple, a_shape: tuple, b_shape: tuple) -> Target:
    # A [E?, I.., R], B [E?, R, O..], W [E?, I.., O..]: the split follows from the ranks.
    experts = len(a_shape) + len(b_shape) - len(w_shape) - 2
    return Target(path, tuple(w_shape), None, experts, len(a_shape) - 1 - experts)


def _factor_targets(base: Params, adapter: Params, a_key: str, b_key: str) -> dict[str, Target]:
    """Targets of an adapter with low-rank factors ``<path>/<a_key>``, ``<path>/<b_key>``."""
    flat, ad = flat_params(nn.unbox(base)), flat_params(nn.unbox(adapter))
    return {p: _target_from_factors(p, flat[p].shape, ad[f"{p}/{a_key}"].shape, ad[f"{p}/{b_key}"].shape)
            for p in adapted_paths(flat, ad)}


def lora_delta(t: Target, a: jax.Array, b: jax.Array) -> jax.Array:
    """``A @ B`` reshaped to the base weight's shape, in float32 (``[E?, I.., O..]``)."""
    e = (t.num_experts,) if t.experts else ()
    a = a.astype(jnp.float32).reshape(*e, t.d_in, a.shape[-1])
    b = b.astype(jnp.float32).reshape(*e, b.shape[len(e)], t.d_out)
    return jnp.matmul(a, b).reshape(t.shape)


def lora_dense(x: jax.Array, w: jax.Array, a: jax.Array, b: jax.Array, scale: float,
               num_in: int = 1) -> jax.Array:
    """The unmerged LoRA product ``x·W + scale·(x·A)·B`` without forming ``A·B``.

    ``x [..., I..]`` contracts its last ``num_in`` axes with the first ``num_in`` axes of
    ``w [I.., O..]`` and ``a [I.., R]``; ``b [R, O..]``. Equal (up to rounding) to
    ``x · (W + scale·A·B)``, the merged product.
    """
    base = jnp.tensordot(x, w, axes=num_in)
    low = jnp.tensordot(jnp.tensordot(x, a, axes=num_in), b, axes=1)
    return base + scale * low


@register
@dataclasses.dataclass(frozen=True)
class LoRA:
    """LoRA (Hu et al., 2021): ``W = W0 + s·A·B``, ``A [I, R]``, ``B [R, O]``, B = 0 at init.

    ``s = alpha / rank``, or ``alpha / sqrt(rank)`` with ``rslora`` (Kalajdzievski, 2023).
    ``A`` is drawn U(±1/√I), kaiming-uniform with a=√5 as microsoft/LoRA and peft do.
    Parameters per adapted matrix: ``rank·(I + O)`` (times ``E`` for stacked experts).
    """

    targets: str
    rank: int = 8
    alpha: float = 16.0
    rslora: bool = False
    dropout: float = 0.0

    name = "lora"
    mergeable = True

    def __post_init__(self):
        _check_dropout(self.name, self.dropout)

    @classmethod
    def from_config(cls, cfg: Any) -> "LoRA":
        return cls(targets=str(cfg.targets), rank=int(cfg.rank), alpha=float(cfg.alpha), rslora=bool(cfg.rslora),
                   dropout=float(cfg.get("lora_dropout", 0.0)))

    # With dropout (``y = xW + s·dropout(x)·A·B``, PEFT.md 0) LoRA cannot run merged in
    # training: it runs on activations through adapter_hooks (merged for inference, where
    # dropout is off, it is the same function).
    @property
    def hook_delta(self):
        return self._dropout_delta if self.dropout > 0 else None

    def hook_targets(self, base: Params, adapter: Params) -> dict[str, Target]:
        return _factor_targets(base, adapter, "lora_a", "lora_b")

    def _dropout_delta(self, path: str, x: jax.Array, y: jax.Array, ctx) -> jax.Array:
        a, b = ctx.params[f"{path}/lora_a"], ctx.params[f"{path}/lora_b"]
        return low_rank_dropout_delta(x, a.reshape(-1, self.rank), b.reshape(self.rank, -1), self.scale,
                                      self.dropout, ctx, path)

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    def select(self, params: Params) -> dict[str, Target]:
        chosen = select_targets(params, self.targets)
        if self.dropout > 0:
            _no_experts_for_dropout(self.name, chosen)
        return chosen

    def init(self, rng: jax.Array, params: Params, previous: Params | None = None) -> Params:
        """Adapter parameters for the base ``params`` (boxed in, boxed out); ``previous``
        (``init.adapter_from``) continues a trained LoRA of the same shapes."""
        out = {}
        for i, (path, t) in enumerate(sorted(self.select(params).items())):
            e = (t.num_experts,) if t.experts else ()
            lead = ("expert",) if t.experts else ()
            names = t.names[t.experts:] if t.names else (None,) * (len(t.shape) - t.experts)
            in_names, out_names = names[:t.num_in], names[t.num_in:]
            bound = 1.0 / math.sqrt(t.d_in)
            init_a = lambda key, shape, dtype, bound=bound: jax.random.uniform(
                key, shape, dtype, -bound, bound)
            a = logical_param(init_a, lead + tuple(in_names) + ("rank",))(
                jax.random.fold_in(rng, i), (*e, *t.in_shape, self.rank), jnp.float32)
            b = logical_param(nn.initializers.zeros, lead + ("rank",) + tuple(out_names))(
                rng, (*e, self.rank, *t.out_shape), jnp.float32)
            out[f"{path}/lora_a"], out[f"{path}/lora_b"] = a, b
        return from_previous(_nest(out), previous, self.name)

    def merge(self, base: Params, adapter: Params) -> Params:
        """Base parameters with ``s·A·B`` added to every target (unboxed arrays)."""
        flat = flat_params(nn.unbox(base))
        ad = flat_params(nn.unbox(adapter))
        for path in adapted_paths(flat, ad):
            w, a, b = flat[path], ad[f"{path}/lora_a"], ad[f"{path}/lora_b"]
            t = _target_from_factors(path, w.shape, a.shape, b.shape)
            flat[path] = (w.astype(jnp.float32) + self.scale * lora_delta(t, a, b)).astype(w.dtype)
        return _nest(flat)

    def count(self, params: Params) -> int:
        """Adapter parameters: ``Σ E·rank·(I + O)`` over targets (PEFT.md)."""
        return sum(t.num_experts * self.rank * (t.d_in + t.d_out) for t in self.select(params).values())


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
class MoS:
    """MoS, Mixture of Shards (Sheng Wang et al., ICLR 2025, "MoS: Unleashing Parameter
    Efficiency of Low-Rank Adaptation with Mixture of Shards", arXiv 2410.00938; PEFT.md
    section 1).

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
        """Adapter parameters: ``Σ_types r_eq·M·(I + O)`` (PEFT.md: ``P·(I+O)/n``)."""
        return sum(self.equiv_rank * sum(t.num_experts for t in ts) * (ts[0].d_in + ts[0].d_out)
                   for ts in self.groups(params).values())


# --------------------------------------------------------------------------- Hydra

@register
@dataclasses.dataclass(frozen=True)
class Hydra:
    """Hydra (Kim et al., 2023, "Hydra: Multi-head Low-rank Adaptation for Parameter
    Efficient Fine-tuning", arXiv 2309.06922; PEFT.md section 3): a parallel LoRA branch on
    the layer input plus a sequential low-rank branch on the pretrained output::

        h0 = x·W + b                                   # W [I, O], b [O] if the base has one
        y  = h0 + s·(x·A_p)·B_p + s·(h0·A_s)·B_s       # A_p [I, R], B_p [R, O], A_s [O, S], B_s [S, O]
        W' = W + s·(A_p·B_p + W·A_s·B_s),   b' = b + s·b·A_s·B_s      (merge, exact)

    ``R`` = ``rank`` (r_p), ``S`` = ``seq_rank`` (r_s), ``s`` = ``scale`` (a plain factor, as
    the authors' code: 0.1 ViT CIFAR, 1 RoBERTa GLUE). The sequential branch sees the
    output including the bias (card's pitfall): a sibling ``<name>_bias`` of the target's
    output shape (e.g. ``attn/q_bias``) is merged as above. ``dropout`` (config
    ``adapter.lora_dropout``; the authors' ViT setting is 0.2) drops each branch's
    low-rank activations, ``s·dropout(x·A_p)·B_p + s·dropout(h0·A_s)·B_s`` (PEFT.md); it is
    not mergeable, so in training the branches then run on activations through
    :mod:`routezoo.layers.adapter_hooks` (merged for inference, the same function). The
    branches' own biases of the ViT code are not implemented.
    Implemented from the card's equations, not the released NLU code (typos there; its
    attention merge reuses ``mlp.fc2``). Init as the NLU code: ``A`` U(±1/√fan_in)
    (kaiming a=√5), ``B`` = 0, so the adapted model starts equal to the base.
    Parameters per adapted matrix: ``r_p·(I + O) + 2·r_s·O`` (times ``E`` for experts).
    """

    targets: str
    rank: int = 4          # r_p
    seq_rank: int = 8      # r_s
    scale: float = 1.0     # s
    dropout: float = 0.0   # on both branches' low-rank activations (training only)

    name = "hydra"
    mergeable = True

    @classmethod
    def from_config(cls, cfg: Any) -> "Hydra":
        return cls(targets=str(cfg.targets), rank=int(cfg.rank), seq_rank=int(cfg.hydra_seq_rank),
                   scale=float(cfg.hydra_scale), dropout=float(cfg.get("lora_dropout", 0.0)))

    def __post_init__(self):
        if self.seq_rank < 1:
            raise ValueError(f"adapter.hydra_seq_rank={self.seq_rank} must be >= 1")
        _check_dropout(self.name, self.dropout)

    def select(self, params: Params) -> dict[str, Target]:
        chosen = select_targets(params, self.targets)
        if self.dropout > 0:
            _no_experts_for_dropout(self.name, chosen)
        return chosen

    @property
    def hook_delta(self):   # with dropout: on activations, as LoRA
        return self._dropout_delta if self.dropout > 0 else None

    def hook_targets(self, base: Params, adapter: Params) -> dict[str, Target]:
        return _factor_targets(base, adapter, "par_a", "par_b")

    def _dropout_delta(self, path: str, x: jax.Array, y: jax.Array, ctx) -> jax.Array:
        """``s·dropout(x·A_p)·B_p + s·dropout(h0·A_s)·B_s`` for ``x [B, S, I]``, ``y = x·W``
        ``[B, S, O]``; ``h0 = y + b`` with the base's ``<path>_bias`` where it has one."""
        p = ctx.params
        pa, pb = p[f"{path}/par_a"].reshape(-1, self.rank), p[f"{path}/par_b"].reshape(self.rank, -1)
        sa, sb = p[f"{path}/seq_a"].reshape(-1, self.seq_rank), p[f"{path}/seq_b"].reshape(self.seq_rank, -1)
        h0 = y.astype(jnp.float32)
        bias = ctx.base.get(f"{path}_bias")
        if bias is not None and bias.size == h0.shape[-1]:
            h0 = h0 + bias.astype(jnp.float32).reshape(-1)
        key = ctx.rng_for(path)
        lows = []
        for i, (v, a) in enumerate(((x.astype(jnp.float32), pa), (h0, sa))):
            low = jnp.einsum("BSI,IR->BSR", v, a.astype(jnp.float32))
            if key is not None:
                keep = jax.random.bernoulli(jax.random.fold_in(key, i), 1.0 - self.dropout, low.shape)
                low = jnp.where(keep, low / (1.0 - self.dropout), 0.0)
            lows.append(low)
        return self.scale * (jnp.einsum("BSR,RO->BSO", lows[0], pb.astype(jnp.float32))
                             + jnp.einsum("BSR,RO->BSO", lows[1], sb.astype(jnp.float32)))

    def init(self, rng: jax.Array, params: Params, previous: Params | None = None) -> Params:
        """``{path: {'par_a' [E?, I.., R], 'par_b' [E?, R, O..], 'seq_a' [E?, O.., S],
        'seq_b' [E?, S, O..]}}`` (boxed)."""
        out = {}
        for i, (path, t) in enumerate(sorted(self.select(params).items())):
            e = (t.num_experts,) if t.experts else ()
            lead = ("expert",) if t.experts else ()
            names = t.names[t.experts:] if t.names else (None,) * (len(t.shape) - t.experts)
            in_names, out_names = tuple(names[:t.num_in]), tuple(names[t.num_in:])
            key = jax.random.fold_in(rng, i)
            for kind, fan_in, inn, r in (("par", t.d_in, (in_names, t.in_shape), self.rank),
                                         ("seq", t.d_out, (out_names, t.out_shape), self.seq_rank)):
                out[f"{path}/{kind}_a"] = logical_param(_init_a(1.0 / math.sqrt(fan_in)), lead + inn[0] + ("rank",))(
                    jax.random.fold_in(key, kind == "seq"), (*e, *inn[1], r), jnp.float32)
                out[f"{path}/{kind}_b"] = logical_param(nn.initializers.zeros, lead + ("rank",) + out_names)(
                    rng, (*e, r, *t.out_shape), jnp.float32)
        return from_previous(_nest(out), previous, self.name)

    def merge(self, base: Params, adapter: Params) -> Params:
        """Base with ``W' = W + s(A_p B_p + W A_s B_s)`` (and ``b'``) for every target."""
        flat = flat_params(nn.unbox(base))
        ad = flat_params(nn.unbox(adapter))
        for path in adapted_paths(flat, ad):
            w, pa, pb, sa, sb = (flat[path], *(ad[f"{path}/{k}"] for k in ("par_a", "par_b", "seq_a", "seq_b")))
            experts = pa.ndim + pb.ndim - w.ndim - 2
            t = Target(path, tuple(w.shape), None, experts, pa.ndim - 1 - experts)
            e = (t.num_experts,) if experts else ()
            w32 = w.astype(jnp.float32)
            seq = jnp.matmul(sa.reshape(*e, t.d_out, self.seq_rank), sb.reshape(*e, self.seq_rank, t.d_out))  # [E?, O, O]
            w_seq = jnp.matmul(w32.reshape(*e, t.d_in, t.d_out), seq).reshape(t.shape)
            flat[path] = (w32 + self.scale * (lora_delta(t, pa, pb) + w_seq)).astype(w.dtype)
            bias = flat.get(f"{path}_bias")
            if bias is not None and not experts and tuple(bias.shape) == t.out_shape:
                b32 = bias.astype(jnp.float32)
                flat[f"{path}_bias"] = (b32 + self.scale * (b32.reshape(t.d_out) @ seq).reshape(bias.shape)
                                        ).astype(bias.dtype)
        return _nest(flat)

    def count(self, params: Params) -> int:
        """Adapter parameters: ``Σ E·(r_p·(I + O) + 2·r_s·O)`` over targets (PEFT.md)."""
        return sum(t.num_experts * (self.rank * (t.d_in + t.d_out) + 2 * self.seq_rank * t.d_out)
                   for t in self.select(params).values())


def from_config(cfg: Any):
    """The adapter for ``config.adapter`` (``None`` when ``method`` is empty)."""
    method = str(cfg.method)
    if not method:
        return None
    if method not in METHODS:
        raise ValueError(f"unknown adapter.method {method!r}; allowed: {', '.join(sorted(METHODS))}")
    if not str(cfg.targets):
        raise ValueError("adapter.targets is empty; give a pattern over parameter paths, e.g. 'attn/(q|v)'")
    return METHODS[method].from_config(cfg)


# --------------------------------------------------------------------------- counts, fingerprint

def num_params(params: Params) -> int:
    return int(sum(np.prod(_unbox(x).shape) for x in jax.tree_util.tree_leaves(
        params, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))))


@jax.jit
def _checksums(leaves: list[jax.Array]) -> jax.Array:
    # Integer sums wrap mod 2^32 and are associative: the same value on any mesh.
    out = []
    for x in leaves:
        bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32).reshape(-1)
        idx = jnp.arange(bits.shape[0], dtype=jnp.uint32)
        out.append(jnp.sum(bits * (idx * jnp.uint32(2654435761) + jnp.uint32(1)), dtype=jnp.uint32))
    return jnp.stack(out)


def fingerprint(params: Params) -> str:
    """Hex digest of a base's parameter paths, shapes, dtypes and values.

    Values enter through a position-weighted sum of their float32 bits modulo 2^32,
    computed on device (any sharding gives the same digest).
    """
    flat = flat_params(nn.unbox(params))
    paths = sorted(flat)
    sums = np.asarray(jax.device_get(_checksums([flat[p] for p in paths])))
    h = hashlib.sha256()
    for p, s in zip(paths, sums):
        h.update(f"{p}:{tuple(flat[p].shape)}:{jnp.dtype(flat[p].dtype).name}:{int(s)};".encode())
    return h.hexdigest()[:16]


__all__ = ["Hydra", "LoRA", "METHODS", "MoS", "Target", "adaptable", "fingerprint", "flat_params", "from_config",
           "lora_delta", "lora_dense", "num_params", "projection_type", "register", "select_targets"]

# Methods in their own modules register themselves on import.
from routezoo.layers import poly  # noqa: E402,F401  poly, mhr, mhr_z, mhr_mu
from routezoo.layers import multi_lora  # noqa: E402,F401  registers multi_lora
from routezoo.layers import lora_library  # noqa: E402,F401  registers scalearn, phatgoose_gate, phatgoose, glider
from routezoo.layers import rps  # noqa: E402,F401  registers adapter.method=rps
