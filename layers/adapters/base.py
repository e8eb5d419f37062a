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

import abc
import dataclasses
import hashlib
import math
import re
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import traverse_util


Params = Any


class Adapter(abc.ABC):
    """The protocol every adapter method implements (a frozen dataclass subclass).

    A method maps a frozen base parameter tree to its own small tree of adapter
    parameters. Parameter-space methods fold that tree into the weights with
    :meth:`merge`; activation-space methods also define :attr:`hook_delta`, which every
    projection of routezoo's layers calls through :mod:`routezoo.layers.adapters.hooks`.

    Class attributes (defaults here; a method overrides the ones it needs):
      name: the ``adapter.method`` value it registers under.
      mergeable: :meth:`merge` gives inference weights equal to the adapted model.
      needs_task_ids: the forward pass needs one task id per example (``task_ids``).
      needs_previous: :meth:`init` starts from a trained adapter (``init.adapter_from``).
      uses_library: ``adapter.library`` (trained LoRA runs) is the method's input.
      init_reads_base: :meth:`init` reads the base weights' values, not only their shapes
        and names (DoRA's column norms, PiSSA's SVD): it needs the loaded base.
      LR_GROUPS: learning-rate multiplier per parameter group label of
        :meth:`param_groups` (0 freezes a group); ``None``: one group.
      hook_delta: ``None`` for parameter-space methods; else a callable
        ``(path, x, y, ctx) -> delta`` added to a targeted projection's output.
    """

    name: ClassVar[str] = ""
    mergeable: ClassVar[bool] = True
    needs_task_ids: ClassVar[bool] = False
    needs_previous: ClassVar[bool] = False
    uses_library: ClassVar[bool] = False
    init_reads_base: ClassVar[bool] = False
    LR_GROUPS: ClassVar[dict[str, float] | None] = None
    hook_delta: ClassVar[Any] = None

    @classmethod
    @abc.abstractmethod
    def from_config(cls, cfg: Any) -> "Adapter":
        """Builds the method from ``config.adapter``."""

    @abc.abstractmethod
    def select(self, params: Params) -> dict[str, "Target"]:
        """The base weights this method adapts, by path."""

    @abc.abstractmethod
    def init(self, rng: jax.Array, params: Params, *args, **kwargs) -> Params:
        """Fresh adapter parameters for base ``params`` (boxed with logical names)."""

    @abc.abstractmethod
    def merge(self, base: Params, adapter: Params) -> Params:
        """Base weights with the adapter folded in (for ``mergeable`` methods, exactly)."""

    @abc.abstractmethod
    def count(self, params: Params) -> int:
        """Trainable adapter parameters for base ``params``, by the method's formula."""

    def hook_targets(self, base: Params, adapter: Params) -> dict[str, "Target"]:
        """The targets :attr:`hook_delta` acts on (activation-space methods)."""
        return self.select(base)

    def param_groups(self, params: Params) -> Params | None:
        """A tree of group labels matching ``params`` for :attr:`LR_GROUPS` (or ``None``)."""
        return None

    def buffers(self, base: Params) -> dict[str, np.ndarray] | None:
        """Non-trained arrays saved beside the adapter checkpoint (or ``None``)."""
        return None

    def with_buffers(self, buffers: dict[str, np.ndarray]) -> "Adapter":
        """This method with saved :meth:`buffers` restored (itself when it has none)."""
        return self

    @property
    def acts_on_activations(self) -> bool:
        """Whether the method runs on activations (it defines :attr:`hook_delta`)."""
        return self.hook_delta is not None


METHODS: dict[str, type[Adapter]] = {}


def register(cls: type[Adapter]) -> type[Adapter]:
    """Class decorator: makes an :class:`Adapter` subclass selectable as ``adapter.method=cls.name``.

    Args:
      cls: the method class; its ``name`` must be new.

    Returns:
      ``cls`` unchanged.
    """
    if not (isinstance(cls, type) and issubclass(cls, Adapter)):
        raise TypeError(f"{cls!r} is not a subclass of routezoo.layers.adapters.base.Adapter")
    if cls.name in METHODS and METHODS[cls.name] is not cls:
        raise ValueError(f"adapter name {cls.name!r} is taken by {METHODS[cls.name].__name__}")
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


SCANNED_AXIS = "layers"   # the logical name of a scanned stack's leading axis (routezoo.zoo.stack)
_SCANNED_PATH = re.compile(r"(?:^|/)layers/block\d+/")   # where a scanned stack keeps its blocks


def adaptable(params: Params) -> dict[str, Target]:
    """Every weight an adapter can target, by path.

    Adapters address a model's layers one by one (``layer0/attn/q``): parameters of a
    scanned stack (``model.scan_layers``, a leading ``layers`` axis) are refused with a
    ``ValueError`` that says how to get the per-layer layout.
    """
    out = {}
    for path, leaf in flat_params(params).items():
        if (_names(leaf) or (None,))[0] == SCANNED_AXIS or _SCANNED_PATH.search(path):
            raise ValueError(f"adapter: base parameter {path!r} belongs to a scanned layer stack (its leading axis is "
                             f"{SCANNED_AXIS!r}); adapters address layers one by one: pass "
                             "routezoo.zoo.stack.to_unscanned(params, model_cfg) and apply the model built with "
                             "model.scan_layers=False (adapter runs do this themselves)")
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
