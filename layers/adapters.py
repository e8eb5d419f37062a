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
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import traverse_util

from routezoo.layers.sharding import param as logical_param

Params = Any


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


# --------------------------------------------------------------------------- LoRA

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

    name = "lora"
    mergeable = True

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    def select(self, params: Params) -> dict[str, Target]:
        return select_targets(params, self.targets)

    def init(self, rng: jax.Array, params: Params) -> Params:
        """Adapter parameters for the base ``params`` (boxed in, boxed out)."""
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
        return _nest(out)

    def merge(self, base: Params, adapter: Params) -> Params:
        """Base parameters with ``s·A·B`` added to every target (unboxed arrays)."""
        flat = flat_params(nn.unbox(base))
        ad = flat_params(nn.unbox(adapter))
        for path in sorted({p.rsplit("/", 1)[0] for p in ad}):
            if path not in flat:
                raise ValueError(f"adapter parameter {path!r} has no matching base weight")
            w, a, b = flat[path], ad[f"{path}/lora_a"], ad[f"{path}/lora_b"]
            # A [E?, I.., R], B [E?, R, O..], W [E?, I.., O..]: the split follows from the ranks.
            experts = a.ndim + b.ndim - w.ndim - 2
            t = Target(path, tuple(w.shape), None, experts, a.ndim - 1 - experts)
            flat[path] = (w.astype(jnp.float32) + self.scale * lora_delta(t, a, b)).astype(w.dtype)
        return _nest(flat)

    def count(self, params: Params) -> int:
        """Adapter parameters: ``Σ E·rank·(I + O)`` over targets (PEFT.md)."""
        return sum(t.num_experts * self.rank * (t.d_in + t.d_out) for t in self.select(params).values())


METHODS: dict[str, Callable[..., Any]] = {"lora": LoRA}


def from_config(cfg: Any):
    """The adapter for ``config.adapter`` (``None`` when ``method`` is empty)."""
    method = str(cfg.method)
    if not method:
        return None
    if method not in METHODS:
        raise ValueError(f"unknown adapter.method {method!r}; allowed: {', '.join(sorted(METHODS))}")
    if not str(cfg.targets):
        raise ValueError("adapter.targets is empty; give a pattern over parameter paths, e.g. 'attn/(q|v)'")
    if method == "lora":
        return LoRA(targets=str(cfg.targets), rank=int(cfg.rank), alpha=float(cfg.alpha),
                    rslora=bool(cfg.rslora))
    raise AssertionError(method)


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


__all__ = ["LoRA", "METHODS", "Target", "adaptable", "fingerprint", "flat_params", "from_config",
           "lora_delta", "lora_dense", "num_params", "select_targets"]
