"""Layer stacks: which layers are scanned, rematerialisation, and the two parameter layouts.

Einsum letters: ``R`` repeats of the scanned unit, ``U`` layers per unit.

A model with ``model.scan_layers=True`` runs its repeated block under ``nn.scan``: XLA
compiles one unit however deep the model is, so compile time stops growing with the
number of layers, and the unit's parameters are stacked with a leading ``layers`` axis
(logical name ``layers``, never sharded by the default rules). The layers' feed-forward
kinds decide the unit (:func:`stack_layout`): all-MoE or all-dense stacks scan one
block, MoE every ``N`` layers scans ``N`` blocks at a time, and leading layers that
break the period (DeepSeek's first dense layers) stay outside the scan, as do trailing
ones. Parameter trees therefore come in two layouts:

* **unscanned**: ``layer0``, ``layer1``, ... (one subtree per layer);
* **scanned**: the layers outside the scan keep their ``layer{i}`` names, the scanned ones
  become ``layers/block{p}`` (``p < U``), each leaf stacked ``[R, ...]``: repeat ``r``
  of block ``p`` is layer ``prefix + r·U + p``.

:func:`to_scanned` and :func:`to_unscanned` move any tree (parameters, optimizer state,
the decode cache, a whole train state) between the two, exactly (stacking and slicing
copy values, never change them). Tools that address layers by index (Hugging Face
export, routing analysis) read the unscanned layout.

Rematerialisation (``model.remat``, :data:`REMAT_POLICIES`) wraps each block (one layer:
attention and feed-forward) in ``nn.remat`` with a ``jax.checkpoint`` policy: what the
backward pass keeps from the block's forward pass; everything else it needs is recomputed
from what was kept and the block's inputs. Values, and so outputs and gradients, are the
same under every policy; only memory and backward-pass work change. Letters: ``B`` batch,
``L`` length, ``D`` embed, ``H`` heads, ``A`` head dim, ``F`` expert width, ``T = B·L``
tokens, ``K`` experts per token, ``E`` experts, ``C`` capacity, ``G`` routing groups.

* ``none``: no remat; every intermediate the gradient needs is kept (attention scores
  ``[B, H, L, L]``, the experts' hidden ``[T·K, F]``, ...).
* ``full``: nothing but the block's inputs; the whole block runs again in the backward
  pass.
* ``dots_saveable``: the output of every ``dot_general`` (projections, attention scores
  and values, the router's logits, the capacity experts' einsums, the ``blocked`` grouped
  matmul); elementwise work (norms, activations, softmax, rotary) is recomputed. The
  ``ragged_dot`` and kernel grouped matmuls (pallas, mosaic, megablox) are no
  ``dot_general``: their outputs are recomputed.
* ``dots_no_batch``: only ``dot_general`` outputs without batch dimensions: the
  projections (q/k/v/o, MLPs, router); not the attention scores and values, nor the
  capacity experts' einsums (``E`` is a batch dimension there).
* ``save_moe_dispatch``: what the MoE layers name (``jax.ad_checkpoint.checkpoint_name``,
  :mod:`routezoo.layers.moe`): ``moe_perm``, the dispatch's index arrays (dropless: the
  sort permutation ``[T·K]``, its inverse, the group sizes ``[E]`` and the routed-row mask;
  with expert parallelism the slot maps and the all-gathered counts; capacity: the
  buffer slots ``[G, S, K]`` and ``[G, E·C]``), and ``moe_gmm_in``, the experts' input
  (dropless: the rows sorted by expert ``[T·K, D]``, with expert parallelism the received
  rows ``[N·T·K, D]``; capacity, expert choice and Soft MoE: the ``[G, E, C, D]``
  buffers). Never the hidden ``[T·K, F]``: the backward pass re-runs the attention, the
  router and the experts' matmuls (for their gradients and the combine's; with expert
  parallelism also the exchange back), but not the dispatch's sort nor its exchange to
  the experts. Blocks without an MoE layer keep nothing (as ``full``).
* ``save_moe_dispatch_attn``: as ``save_moe_dispatch``, plus ``attn_out``, every
  attention layer's output before its output projection (``[B, L, H, A]``; latent
  attention ``[B, L, H, v]``; T5 self- and cross-attention; UoE's selective attention):
  the output projection's gradient reads it, while attention's own gradient still
  recomputes q, k, v and the scores from the block's input.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import linen as nn

SCAN_NAME = "layers"          # the scanned group's module (and logical axis) name


def _moe_dispatch_names() -> tuple[str, ...]:
    # the names the layers tag (imported here, not at module level: dense models need not
    # import the MoE package)
    from routezoo.layers.moe.gmm import MOE_GMM_IN, MOE_PERM
    return (MOE_PERM, MOE_GMM_IN)


def _moe_dispatch_policy():
    return jax.checkpoint_policies.save_only_these_names(*_moe_dispatch_names())


def _moe_dispatch_attn_policy():
    from routezoo.layers.attention import ATTN_OUT
    return jax.checkpoint_policies.save_only_these_names(*_moe_dispatch_names(), ATTN_OUT)


# model.remat -> a jax.checkpoint policy factory (None: no remat); what each keeps: the
# module docstring
REMAT_POLICIES: dict[str, Callable[[], Any] | None] = {
    "none": None,
    # only the block's inputs: the whole block runs again in the backward pass
    "full": lambda: jax.checkpoint_policies.nothing_saveable,
    # every dot_general output; elementwise work (norms, activations, softmax) recomputed
    "dots_saveable": lambda: jax.checkpoint_policies.dots_saveable,
    # dot_general outputs without batch dimensions (projections; not attention scores)
    "dots_no_batch": lambda: jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # the MoE dispatch's indices ('moe_perm') and the experts' input ('moe_gmm_in': dropless
    # [T·K, D] sorted rows, capacity [G, E, C, D] buffers); never the [T·K, F] hidden
    "save_moe_dispatch": _moe_dispatch_policy,
    # as save_moe_dispatch, plus the attention output before its projection ('attn_out')
    "save_moe_dispatch_attn": _moe_dispatch_attn_policy,
}


def remat_policy_names() -> str:
    return ", ".join(REMAT_POLICIES)


def remat_block(block_cls: type, policy: str, static_argnums: tuple[int, ...], *, in_scan: bool) -> type:
    """``block_cls`` under ``nn.remat`` with ``policy`` (a key of :data:`REMAT_POLICIES`);
    ``block_cls`` itself for ``'none'``. ``static_argnums`` counts ``self`` as 0, as
    ``nn.remat`` does; ``in_scan`` turns off CSE prevention, which ``nn.scan`` makes
    unnecessary."""
    if policy not in REMAT_POLICIES:
        raise ValueError(f"unknown model.remat {policy!r}; allowed: {remat_policy_names()}")
    factory = REMAT_POLICIES[policy]
    if factory is None:
        return block_cls
    return nn.remat(block_cls, policy=factory(), static_argnums=static_argnums, prevent_cse=not in_scan)


@dataclasses.dataclass(frozen=True)
class StackLayout:
    """Which layers of a stack are scanned.

    Attributes:
      kinds: feed-forward kind of every layer.
      prefix: layers before the scanned group (unscanned, ``layer{i}``).
      unit: kinds of one repeat (``U = len(unit)``); empty when nothing is scanned.
      repeats: ``R``; 0 when nothing is scanned.
    """

    kinds: tuple[str, ...]
    prefix: int = 0
    unit: tuple[str, ...] = ()
    repeats: int = 0

    @property
    def scanned(self) -> bool:
        return self.repeats >= 1 and bool(self.unit)

    def layer_index(self, r: int, p: int) -> int:
        return self.prefix + r * len(self.unit) + p

    def per_layer(self, outs):
        """``(layer index, outputs)`` of every scanned layer, in order, from the scanned
        group's ``outs`` (``outs[p]`` block ``p``'s outputs stacked ``[R, ...]``)."""
        return [(self.layer_index(r, p), jax.tree.map(lambda v, r=r: v[r], out))
                for r in range(self.repeats) for p, out in enumerate(outs)]

    @property
    def scanned_layers(self) -> range:
        return range(self.prefix, self.prefix + self.repeats * len(self.unit))

    @property
    def suffix(self) -> range:
        return range(self.prefix + self.repeats * len(self.unit), len(self.kinds))

    def describe(self) -> str:
        if not self.scanned:
            return f"{len(self.kinds)} layers, unscanned"
        parts = [f"{self.repeats} x [{', '.join(self.unit)}] scanned"]
        if self.prefix:
            parts.insert(0, f"{self.prefix} leading")
        if self.suffix:
            parts.append(f"{len(self.suffix)} trailing")
        return ", ".join(parts)


def scan_enabled(model_cfg: Any, kinds) -> bool:
    """Whether the model of ``model_cfg``, whose layers have the feed-forward ``kinds``
    (all of its stacks'), runs its repeated blocks under ``nn.scan``: ``model.scan_layers``
    and, with MoE layers, a router whose model-level routing can be scanned
    (``Router.scannable``; Read-ME's pre-gate and Duo-LLM take per-layer routes from outside
    the layers and keep the stack unscanned) and one expert map for every MoE layer
    (per-layer ``moe.expert_map`` keeps it unscanned)."""
    if not bool(model_cfg.get("scan_layers", False)):
        return False
    if "moe" in kinds:
        from routezoo.layers.moe.block import has_per_layer_maps
        from routezoo.layers.routers import router_class
        # per-layer expert maps (moe.expert_map with ';') are static per layer: unscanned
        return bool(router_class(str(model_cfg.moe.router)).scannable) and not has_per_layer_maps(model_cfg.moe)
    return True


def stack_layout(kinds: tuple[str, ...], scan: bool) -> StackLayout:
    """The scanned group of ``kinds``: the periodic run covering the most layers (at least
    two repeats), ties to the shortest unit and then the earliest start; unscanned when
    ``scan`` is false or no period repeats."""
    kinds = tuple(kinds)
    n = len(kinds)
    if not scan or n < 2:
        return StackLayout(kinds)
    best = None   # (covered, -unit, -prefix)
    for u in range(1, n // 2 + 1):
        for start in range(0, n - 2 * u + 1):
            unit = kinds[start:start + u]
            r = 1
            while start + (r + 1) * u <= n and kinds[start + r * u:start + (r + 1) * u] == unit:
                r += 1
            if r >= 2:
                key = (r * u, -u, -start)
                if best is None or key > best[0]:
                    best = (key, StackLayout(kinds, start, unit, r))
    return best[1] if best else StackLayout(kinds)


# ------------------------------------------------------------------ layouts of trees


def _is_mapping(x) -> bool:
    return isinstance(x, dict) or type(x).__name__ == "FrozenDict"


def _rebuild(node, children):
    if isinstance(node, dict):
        return dict(children)
    if type(node).__name__ == "FrozenDict":
        return type(node)(dict(children))
    raise TypeError(type(node))


def _walk(tree, fn):
    """Applies ``fn`` to every mapping node of ``tree`` (top down; ``fn`` returns the node,
    converted or not), through dicts, lists, tuples and named tuples."""
    if _is_mapping(tree):
        tree = fn(tree)
        return _rebuild(tree, {k: _walk(v, fn) for k, v in tree.items()})
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):
        return type(tree)(*(_walk(v, fn) for v in tree))
    if isinstance(tree, (list, tuple)):
        return type(tree)(_walk(v, fn) for v in tree)
    return tree


def _unbox(x):
    return x.unbox() if isinstance(x, nn.meta.AxisMetadata) else x


def _stack(leaves):
    first = leaves[0]
    if isinstance(first, nn.Partitioned):
        value = _stack([_unbox(v) for v in leaves])   # arrays or abstract shapes
        return first.replace_boxed(value).replace(names=(SCAN_NAME, *first.names))
    if isinstance(first, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct((len(leaves), *first.shape), first.dtype)
    return jnp.stack(leaves) if isinstance(first, jax.Array) else np.stack(leaves)


def _slice(leaf, r: int):
    if isinstance(leaf, jax.sharding.NamedSharding):   # one layer's sharding: the layers axis dropped
        return jax.sharding.NamedSharding(leaf.mesh, jax.sharding.PartitionSpec(*tuple(leaf.spec)[1:]))
    if isinstance(leaf, jax.sharding.SingleDeviceSharding):
        return leaf
    if isinstance(leaf, nn.Partitioned):
        names = leaf.names[1:] if leaf.names and leaf.names[0] == SCAN_NAME else leaf.names
        return leaf.replace_boxed(_slice(leaf.unbox(), r)).replace(names=names)
    if isinstance(leaf, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(leaf.shape[1:], leaf.dtype)
    return leaf[r]


def _is_leaf(x) -> bool:
    return isinstance(x, (nn.Partitioned, jax.ShapeDtypeStruct, jax.sharding.Sharding))


def _convert_node(node, layout: StackLayout, to_scanned: bool):
    """One stack's mapping node (holding ``layer{i}`` / ``layers``) in the other layout,
    or ``node`` unchanged when it is not such a node or is already in that layout."""
    if not layout.scanned:
        return node
    names = [f"layer{i}" for i in layout.scanned_layers]
    if to_scanned:
        if not all(n in node for n in names) or SCAN_NAME in node:
            return node
        group = {}
        for p in range(len(layout.unit)):
            per_repeat = [node[f"layer{layout.layer_index(r, p)}"] for r in range(layout.repeats)]
            group[f"block{p}"] = jax.tree.map(lambda *xs: _stack(xs), *per_repeat, is_leaf=_is_leaf)
        out = {k: v for k, v in node.items() if k not in names}
        out[SCAN_NAME] = group
        return out
    if SCAN_NAME not in node or not _is_mapping(node[SCAN_NAME]) or "block0" not in node[SCAN_NAME]:
        return node
    out = {k: v for k, v in node.items() if k != SCAN_NAME}
    for p in range(len(layout.unit)):
        block = node[SCAN_NAME][f"block{p}"]
        for r in range(layout.repeats):
            out[f"layer{layout.layer_index(r, p)}"] = jax.tree.map(lambda x: _slice(x, r), block, is_leaf=_is_leaf)
    return dict(sorted(out.items(), key=lambda kv: _layer_sort_key(kv[0])))


def _layer_sort_key(name: str):
    if name.startswith("layer") and name[5:].isdigit():
        return (1, int(name[5:]), "")
    return (0, 0, name) if name < "layer" else (2, 0, name)


def _convert(tree, layouts: dict[tuple[str, ...], StackLayout], to_scanned: bool):
    def fn(node):
        for path, layout in layouts.items():
            target = node
            for key in path:
                target = target.get(key) if _is_mapping(target) else None
                if target is None:
                    break
            if target is None or not _is_mapping(target):
                continue
            new = _convert_node(target, layout, to_scanned)
            if new is target:
                continue
            if not path:
                node = new
            else:   # rebuild the path down to the converted stack
                node = _set_path(node, path, new)
        return node
    return _walk(tree, fn)


def _set_path(node, path, value):
    head, rest = path[0], path[1:]
    children = dict(node.items())
    children[head] = value if not rest else _set_path(node[head], rest, value)
    return _rebuild(node, children)


def stack_layouts(model_cfg: Any) -> dict[tuple[str, ...], StackLayout]:
    """Where each layer stack of the model of ``model_cfg`` sits in its parameter tree
    (a path of keys) and how it is laid out under the config's ``scan_layers``."""
    from routezoo import zoo
    return zoo.model_class(model_cfg).stack_layouts(model_cfg)


def to_scanned(tree, model_cfg: Any):
    """``tree`` (parameters, optimizer state, cache, a train state's fields) with every
    stack in the scanned layout of ``model_cfg`` (as if ``scan_layers=True``); subtrees
    already scanned are left as they are."""
    cfg = with_scan(model_cfg, True)
    return _convert(tree, stack_layouts(cfg), True)


def to_unscanned(tree, model_cfg: Any):
    """``tree`` with every stack in the unscanned layout (``layer0``, ``layer1``, ...);
    the inverse of :func:`to_scanned`. ``model_cfg`` describes the model (its
    ``scan_layers`` value is not read)."""
    cfg = with_scan(model_cfg, True)
    return _convert(tree, stack_layouts(cfg), False)


def to_layout(tree, model_cfg: Any):
    """``tree`` in the layout ``model_cfg`` runs with (its ``scan_layers``), from either."""
    return to_scanned(tree, model_cfg) if is_scanned(model_cfg) else to_unscanned(tree, model_cfg)


def is_scanned(model_cfg: Any) -> bool:
    """Whether the model of ``model_cfg`` runs any stack scanned."""
    return any(layout.scanned for layout in stack_layouts(model_cfg).values())


def as_unscanned(model: nn.Module, variables: Any) -> tuple[nn.Module, Any]:
    """``(model, variables)`` of a built zoo model in the unscanned form: the same model
    with ``scan_layers=False`` and ``variables`` (any collections) moved to the unscanned
    layout, so that every layer runs, and is captured, under its own ``layer{i}`` name.
    A model that is not scanned comes back as it is."""
    if not is_scanned(model.cfg):
        return model, variables
    from routezoo import zoo
    return zoo.build(with_scan(model.cfg, False)), to_unscanned(variables, model.cfg)


def with_scan(model_cfg: Any, value: bool):
    """A copy of ``model_cfg`` with ``scan_layers`` set to ``value``."""
    cfg = ml_collections.ConfigDict(model_cfg.to_dict() if hasattr(model_cfg, "to_dict") else dict(model_cfg))
    cfg.scan_layers = value
    return cfg


# ------------------------------------------------------------------ running a stack


class ScanUnit(nn.Module):
    """One repeat of a scanned group: ``U`` blocks, each made and called by ``step``.

    ``step(p, kind, x, carry, shared) -> (x, carry, out)`` runs block ``p`` (creating it
    inside this module, named ``block{p}``); ``out`` is a pytree of arrays that the scan
    stacks over repeats. Called as ``((x, carry), shared) -> ((x, carry), outs)``.
    """

    unit: tuple[str, ...]
    step: Callable[..., Any]

    @nn.compact
    def __call__(self, state, shared):
        x, carry = state
        outs = []
        for p, kind in enumerate(self.unit):
            x, carry, out = self.step(p, kind, x, carry, shared)
            outs.append(out)
        return (x, carry), tuple(outs)


def scanned_group(layout: StackLayout, step: Callable[..., Any], *, name: str = SCAN_NAME) -> nn.Module:
    """The scanned group of ``layout`` as a submodule (create it once per call of the
    parent's compact method; it may be called more than once): ``R`` repeats of
    :class:`ScanUnit`, called as ``((x, carry), shared) -> ((x, carry), outs)`` with
    ``outs[p]`` block ``p``'s outputs stacked ``[R, ...]``. Every variable collection gets
    the leading ``layers`` axis; every rng stream is split per repeat."""
    scanned = nn.scan(ScanUnit, variable_axes={True: 0}, split_rngs={True: True}, in_axes=(nn.broadcast,),
                      length=layout.repeats, metadata_params={nn.PARTITION_NAME: SCAN_NAME})
    return scanned(layout.unit, step, name=name)


__all__ = ["REMAT_POLICIES", "SCAN_NAME", "ScanUnit", "StackLayout", "as_unscanned", "is_scanned", "remat_block", "scan_enabled", "scanned_group",
           "stack_layout", "stack_layouts", "to_layout", "to_scanned", "to_unscanned", "with_scan"]
