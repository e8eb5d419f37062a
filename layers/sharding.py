"""Logical axis names, mesh construction and the logical-to-mesh rules.

Every parameter is created with ``nn.with_logical_partitioning(init, names)`` and every
large activation is annotated with :func:`constrain` (``nn.with_logical_constraint``).
Logical names are a small vocabulary; one table (:data:`DEFAULT_RULES`) maps them onto the
four mesh axes, and a config can replace that table (``config.mesh.rules``).

Mesh axes (in this order): ``data`` (pure data parallel), ``fsdp`` (data parallel with
parameters sharded along ``embed``), ``expert`` (expert parallel: experts split over it,
tokens too), ``tensor`` (tensor parallel: heads, MLP and vocabulary split over it).

Logical names for parameters:

=============  ==================================================================
``embed``      model width D of weight matrices (sharded over ``fsdp``)
``vocab``      vocabulary V
``heads``      attention query heads H
``kv_heads``   attention key/value heads (grouped-query attention)
``head_dim``   per-head width
``mlp``        hidden width F of dense MLPs
``expert``     leading axis E of stacked expert weights
``expert_mlp`` hidden width F of expert MLPs
``rank``       adapter rank R
``norm``       scale/bias vectors of norms (replicated)
``layers``     leading axis R of a scanned stack's parameters (replicated: every
               device holds all R repeats of its own slice of each weight)
=============  ==================================================================

Logical names for activations:

=================  ===============================================================
``batch``          batch / token-group axis B or G (split over data, fsdp, expert)
``length``         sequence axis L (replicated)
``act_embed``      model width of activations (replicated)
``act_heads``      heads of activations
``act_kv_heads``   key/value heads of activations
``act_mlp``        MLP hidden activations
``act_vocab``      logits' vocabulary axis
``act_expert``     expert axis of dispatched activations (E, C, D buffers)
``capacity``       expert capacity C (replicated)
=================  ===============================================================
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES: tuple[str, ...] = ("data", "fsdp", "expert", "tensor")
BATCH_AXES: tuple[str, ...] = ("data", "fsdp", "expert")

Rules = tuple[tuple[str, Any], ...]

DEFAULT_RULES: Rules = (
    # activations
    ("batch", BATCH_AXES),
    ("length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("act_expert", "expert"),
    ("capacity", None),
    # parameters
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("expert", "expert"),
    ("expert_mlp", "tensor"),
    ("rank", None),
    ("norm", None),
    ("layers", None),
)


def resolve_mesh_shape(shape: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
    """Resolves ``{'data': -1, 'fsdp': 2, ...}`` to a tuple in :data:`MESH_AXES` order.

    At most one axis may be -1 (it takes the devices left over). Raises ``ValueError``
    with a one-line message when the sizes do not multiply to ``num_devices``.
    """
    sizes = [int(shape.get(a, 1)) for a in MESH_AXES]
    free = [i for i, s in enumerate(sizes) if s == -1]
    if len(free) > 1:
        raise ValueError(f"mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh: axis sizes must be positive or -1, got {dict(zip(MESH_AXES, sizes))}")
    fixed = math.prod(s for s in sizes if s != -1)
    if free:
        if num_devices % fixed:
            raise ValueError(
                f"mesh: {num_devices} devices are not divisible by the fixed axes "
                f"{dict(zip(MESH_AXES, sizes))} (product {fixed})")
        sizes[free[0]] = num_devices // fixed
    if math.prod(sizes) != num_devices:
        raise ValueError(
            f"mesh: axis sizes {dict(zip(MESH_AXES, sizes))} multiply to {math.prod(sizes)}, "
            f"but there are {num_devices} devices")
    return tuple(sizes)


def make_mesh(shape: Mapping[str, int] | None = None, devices: Sequence[Any] | None = None) -> Mesh:
    """Builds a mesh with axes :data:`MESH_AXES` from ``{'data': -1, ...}`` (default all data)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = resolve_mesh_shape(shape or {"data": -1}, len(devices))
    # Auto axes: layers annotate with sharding constraints and XLA propagates the rest.
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    if devices == list(jax.devices()):
        return jax.make_mesh(sizes, MESH_AXES, devices=devices, axis_types=auto)
    return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES, axis_types=auto)


def rules_from_config(rules: Any | None) -> Rules:
    """Returns the rule table: ``DEFAULT_RULES`` or a config's replacement.

    A replacement is a sequence of ``(logical, mesh_axes)`` pairs, where ``mesh_axes`` is
    ``None``, one mesh axis name or a sequence of them.
    """
    if not rules:
        return DEFAULT_RULES
    out = []
    for item in rules:
        logical, mesh_axes = item
        if isinstance(mesh_axes, (list, tuple)):
            mesh_axes = tuple(mesh_axes)
        out.append((str(logical), mesh_axes))
    return tuple(out)


def logical_to_spec(names: Sequence[str | None], rules: Rules = DEFAULT_RULES) -> P:
    """PartitionSpec for a tuple of logical axis names under ``rules``."""
    return nn.logical_to_mesh_axes(tuple(names), rules)


def logical_sharding(mesh: Mesh, names: Sequence[str | None], rules: Rules = DEFAULT_RULES) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(names, rules))


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Annotates an activation with logical axis names (no-op outside a mesh/rules context)."""
    return nn.with_logical_constraint(x, tuple(names))


default_kernel_init = nn.initializers.lecun_normal()


def param(init, names: Sequence[str | None]):
    """``nn.with_logical_partitioning`` shorthand for parameter initialisers."""
    return nn.with_logical_partitioning(init, tuple(names))


def batch_spec(ndim: int = 2) -> P:
    """Spec of an input batch: leading axis over :data:`BATCH_AXES`, the rest replicated."""
    return P(BATCH_AXES, *([None] * (ndim - 1)))
