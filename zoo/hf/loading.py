"""Importing checkpoints: HF directories and ``routezoo convert`` outputs, placed on a mesh.

Loading never holds the whole model on one device, nor (except for one tensor at a time
when a device's shard needs all of it) on the host: every parameter is placed with
:func:`jax.make_array_from_callback`, whose callback reads only the slice each device
holds (for stacked experts, only the experts of that slice, each from its own HF tensor).
A scanned stack's parameter (``layers/block{p}/...``, stacked ``[R, ...]``) is placed the
same way, once, directly in that layout: each device's block is read layer by layer from
the tensors of the ``R`` layers it stacks (:func:`layer_sources`), so a scanned model
never exists on the devices in the per-layer layout as well.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import linen as nn

from routezoo.zoo.hf import safetensors_io
from routezoo.zoo.hf.config_map import arch_items, check_same_architecture, model_config_from_hf
from routezoo.zoo.hf.registry import Family, HFError, family_of
from routezoo.zoo.hf.tensor_map import TensorMap, block_bounds, flatten, identity, unflatten

# HF checkpoint tensors that carry no parameter (buffers some old checkpoints saved).
_IGNORED = re.compile(r"(rotary_emb\.inv_freq|\.attn\.masked_bias|\.attn\.bias)$")


@dataclasses.dataclass
class Source:
    """A directory to import: an HF checkpoint or a ``routezoo convert`` output.

    Attributes:
      directory: the directory.
      kind: ``'hf'`` or ``'converted'``.
      hf_config: HF config.json (converted: the original's).
      model_config: the model config it holds.
      family: the HF family; ``None`` for converted directories.
    """

    directory: str
    kind: str
    hf_config: dict
    model_config: ml_collections.ConfigDict
    family: Family | None

    def maps(self, m: Any | None = None, param_shapes: Mapping[tuple[str, ...], tuple] | None = None
             ) -> list[TensorMap]:
        """The maps of every parameter of the model of ``m`` (default: the source's config).

        Args:
          m: the model config.
          param_shapes: ``{path: shape}`` of the parameters (converted directories only).

        Returns:
          The maps.
        """
        if self.kind == "hf":
            return self.family.tensor_maps(m if m is not None else self.model_config)
        return [identity(path, "/".join(path), tuple(shape)) for path, shape in param_shapes.items()]

    def reader(self) -> safetensors_io.Reader:
        """A reader of the directory's tensors."""
        if self.kind == "hf":
            return safetensors_io.hf_reader(self.directory)
        return safetensors_io.converted_reader(self.directory)

    def unused_tensors(self, m: Any) -> set[str]:
        """Names the checkpoint may hold that the model of ``m`` does not read."""
        return self.family.stored_but_unused(m) if self.kind == "hf" else set()


def open_source(path: str, *, dtype: str = "float32", param_dtype: str = "float32") -> Source:
    """Reads the config of an HF checkpoint directory or a converted directory.

    Args:
      path: the directory.
      dtype: ``model.dtype`` of the model config.
      param_dtype: ``model.param_dtype`` of the model config.

    Returns:
      The :class:`Source`.
    """
    path = os.fspath(path)
    cfg, hf_cfg = safetensors_io.read_configs(path)
    if hf_cfg is not None:
        m = ml_collections.ConfigDict(cfg["model"])
        m.dtype, m.param_dtype = dtype, param_dtype
        return Source(path, "converted", hf_cfg, m, None)
    fam = family_of(cfg)
    m = model_config_from_hf(cfg, dtype=dtype, param_dtype=param_dtype)
    fam.config_from_checkpoint(cfg, m, lambda: safetensors_io.hf_tensor_names(path))
    return Source(path, "hf", cfg, m, fam)


def abstract_params(model: nn.Module) -> dict:
    """Boxed abstract parameters of ``model`` (shapes, dtypes, logical axis names).

    Args:
      model: the Flax module.

    Returns:
      The params tree of ShapeDtypeStructs.
    """
    tokens = jnp.zeros((1, 1), jnp.int32)
    return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), tokens))["params"]


def _strip(tree: Any) -> Any:
    """Removes ``nn.LogicallyPartitioned`` boxes without adding sharding constraints."""
    return jax.tree.map(lambda x: x.unbox(apply_constraint=False) if isinstance(x, nn.meta.AxisMetadata) else x,
                        tree, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))


def param_shardings(model: nn.Module, mesh: jax.sharding.Mesh | None, rules=None) -> dict:
    """Sharding of every parameter: from its logical names on ``mesh`` (``None``: device 0).

    Args:
      model: the Flax module.
      mesh: the mesh, or ``None``.
      rules: logical axis rules (default ``layers.sharding.DEFAULT_RULES``).

    Returns:
      The tree of shardings.
    """
    boxed = abstract_params(model)
    if mesh is None:
        dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        return jax.tree.map(lambda _: dev, _strip(boxed))
    from routezoo.layers import sharding as shd
    rules = shd.DEFAULT_RULES if rules is None else rules
    return nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, rules)


def check_shapes(maps: list[TensorMap], reader: safetensors_io.Reader) -> None:
    """Checks every checkpoint tensor a map reads has the shape the config implies.

    Args:
      maps: the maps.
      reader: the checkpoint.

    Raises:
      HFError: naming the tensor, its file and both shapes.
    """
    for tm in maps:
        for name in tm.hf:
            got = reader.shape(name)
            if got != tm.hf_shape:
                raise HFError(f"tensor {name!r} ({reader.location[name]}) has shape {list(got)}, but the "
                              f"config implies {list(tm.hf_shape)}")


@dataclasses.dataclass(frozen=True)
class _Ref:
    """Repeat ``r`` of the stacked leaf at ``path`` (a tag that :func:`layer_sources`
    sends through :func:`routezoo.zoo.stack.to_unscanned`)."""

    path: tuple[str, ...]
    r: int


def layer_sources(flat: Mapping[tuple[str, ...], Any], model_cfg: Any
                  ) -> dict[tuple[str, ...], tuple[tuple[str, ...], int | None]]:
    """Where each parameter of the per-layer (unscanned) layout lives in ``flat``.

    The tensor maps (and HF names) address layers one by one (``layer3/attn/q``); a model
    with scanned stacks holds those layers stacked (``layers/block0/attn/q``, ``[R, ...]``).

    Args:
      flat: ``{path: leaf with .shape}`` of a params tree of the model of ``model_cfg``,
        in either layout (``model_cfg.scan_layers`` is not read).
      model_cfg: the model config.

    Returns:
      ``{unscanned path: (path in flat, r)}``: ``r`` the repeat along the leading
      ``layers`` axis, ``None`` for a leaf that is not stacked.
    """
    from routezoo.zoo import stack

    def tags(path, leaf):   # an object array [R] of refs: to_unscanned slices the stacked ones
        n = leaf.shape[0] if len(leaf.shape) else 1
        out = np.empty((n,), dtype=object)
        out[:] = [_Ref(path, r) for r in range(n)]
        return out
    tagged = flatten(stack.to_unscanned(unflatten({p: tags(p, a) for p, a in flat.items()}), model_cfg))
    return {p: (t.path, t.r) if isinstance(t, _Ref) else (p, None) for p, t in tagged.items()}


@dataclasses.dataclass(frozen=True)
class _Repeats:
    """The maps of the ``R`` layers a scanned leaf stacks, read as one ``[R, ...]`` map."""

    maps: tuple[TensorMap, ...]

    @property
    def path(self) -> tuple[str, ...]:
        return self.maps[0].path

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.maps),) + self.maps[0].shape

    def read(self, reader: safetensors_io.Reader, index: tuple[slice, ...] | None = None) -> np.ndarray:
        (r0, r1), *rest = block_bounds(index, self.shape)
        inner = tuple(slice(a, b) for a, b in rest)
        return np.stack([self.maps[r].read(reader, inner) for r in range(r0, r1)])


def load_params(source: Source, model_cfg: Any, shardings: Any, abstract: Any) -> dict:
    """Params tree of the zoo model of ``model_cfg``, each leaf placed with its sharding.

    Args:
      source: where to read.
      model_cfg: the model config.
      shardings: the tree of shardings (in the layout ``model_cfg`` runs, scanned or not).
      abstract: shapes and dtypes (unboxed ShapeDtypeStructs, in that layout).

    Returns:
      The params tree, in that layout.
    """
    flat_abs = flatten(abstract)
    flat_shd = flatten(shardings)
    where = layer_sources(flat_abs, model_cfg)   # per-layer path -> (leaf, repeat)
    layer_shapes = {p: tuple(flat_abs[q].shape)[(0 if r is None else 1):] for p, (q, r) in where.items()}
    maps = source.maps(model_cfg, layer_shapes)
    by_path = {tm.path: tm for tm in maps}
    missing = sorted(set(where) - set(by_path))
    extra = sorted(set(by_path) - set(where))
    if missing or extra:  # a bug in the tables, not in the checkpoint
        raise AssertionError(f"tensor maps do not cover the model: missing {missing[:3]}, extra {extra[:3]}")
    for tm in maps:
        if tm.shape != layer_shapes[tm.path]:
            raise AssertionError(f"{'/'.join(tm.path)}: map shape {tm.shape} != model {layer_shapes[tm.path]}")
    # one map per leaf of the model's layout: a scanned leaf reads its R layers' maps
    repeats: dict[tuple[str, ...], dict[int, TensorMap]] = {}
    leaf_maps: dict[tuple[str, ...], Any] = {}
    for p, (q, r) in where.items():
        if r is None:
            leaf_maps[q] = by_path[p]
        else:
            repeats.setdefault(q, {})[r] = by_path[p]
    for q, per_r in repeats.items():
        leaf_maps[q] = _Repeats(tuple(per_r[r] for r in range(len(per_r))))
    out = {}
    with source.reader() as reader:
        expected = {name for tm in maps for name in tm.hf} | source.unused_tensors(model_cfg)
        unexpected = sorted(n for n in reader.names() if n not in expected and not _IGNORED.search(n))
        if unexpected:
            raise HFError(f"{len(unexpected)} tensors in {source.directory} are not used by the model built "
                          f"from its config, e.g. {', '.join(repr(n) for n in unexpected[:3])}")
        check_shapes(maps, reader)
        for path in flat_abs:
            out[path] = _place(leaf_maps[path], reader, flat_abs[path], flat_shd[path])
    return unflatten(out)


def _place(tm: TensorMap | _Repeats, reader: safetensors_io.Reader, abstract: Any, sharding: Any) -> jax.Array:
    dtype = np.dtype(abstract.dtype)
    cache: dict[tuple, np.ndarray] = {}   # replicated shards ask for the same block many times

    def callback(index):
        key = tuple(block_bounds(index, tm.shape))
        if key not in cache:
            cache[key] = np.ascontiguousarray(tm.read(reader, index).astype(dtype))
        return cache[key]

    return jax.make_array_from_callback(tuple(abstract.shape), sharding, callback)


def _build(model_cfg: Any) -> nn.Module:
    from routezoo import zoo
    return zoo.build(model_cfg)


def from_hf(path: str, mesh: jax.sharding.Mesh | None = None, *, rules=None, dtype: str = "float32",
            param_dtype: str = "float32", scan_layers: bool | None = None) -> tuple[nn.Module, dict]:
    """``(model, params)`` from an HF checkpoint directory (or a converted directory).

    ``model.apply({'params': params}, tokens)`` returns ``(logits, aux)``; run it under
    ``jax.set_mesh(mesh)`` and ``nn.logical_axis_rules(rules)`` when sharded.

    Args:
      path: the directory.
      mesh: place each parameter sharded by its logical names under ``rules``; ``None``:
        everything on the first device.
      rules: logical axis rules (default ``layers.sharding.DEFAULT_RULES``).
      dtype: ``model.dtype``.
      param_dtype: ``model.param_dtype`` (the dtype of the loaded parameters).
      scan_layers: ``model.scan_layers`` of the built model (``None``: the directory's
        config, else the default config's); ``False`` gives the per-layer parameter tree.

    Returns:
      The Flax module and its params tree.
    """
    source = open_source(path, dtype=dtype, param_dtype=param_dtype)
    if scan_layers is not None:
        source.model_config.scan_layers = bool(scan_layers)
    model = _build(source.model_config)
    shardings = param_shardings(model, mesh, rules)
    abstract = _strip(abstract_params(model))
    return model, load_params(source, source.model_config, shardings, abstract)


def load_params_for_config(config: Any, mesh: jax.sharding.Mesh | None, shardings: Any) -> dict:
    """Params for a training run from ``config.init.from_hf``, placed with ``shardings``.

    ``config.model`` must describe the checkpoint's architecture (see
    :func:`update_config_from_hf`). Dtypes follow ``config.model.param_dtype``.

    Args:
      config: the run config.
      mesh: the run's mesh, or ``None``.
      shardings: the params' sharding tree, or a TrainState of shardings (its ``.params`` is used).

    Returns:
      The params tree.
    """
    path = config.init.from_hf
    if not path:
        raise ValueError("config.init.from_hf is empty")
    shardings = getattr(shardings, "params", shardings)
    source = open_source(path, param_dtype=str(config.model.param_dtype))
    check_same_architecture(config.model, source.model_config, path)
    model = _build(config.model)
    abstract = _strip(abstract_params(model))
    if mesh is not None:
        with jax.set_mesh(mesh):
            return load_params(source, config.model, shardings, abstract)
    return load_params(source, config.model, shardings, abstract)


def update_config_from_hf(config: Any) -> list[str]:
    """Sets the architecture keys of ``config.model`` from ``config.init.from_hf``'s checkpoint.

    Keeps dtypes, dispatch, capacity and loss settings of the run. Call it before building
    the model.

    Args:
      config: the run config (changed in place).

    Returns:
      The ``model.KEY=value`` changes.
    """
    path = config.init.from_hf
    if not path:
        return []
    ckpt = open_source(path).model_config
    changes = []
    if config.model.get("hf_architecture", None) is not None:
        config.model.hf_architecture = ckpt.hf_architecture
    for key, value in arch_items(ckpt).items():
        node, leaf = (config.model.moe, key[4:]) if key.startswith("moe.") else (config.model, key)
        if node[leaf] != value:
            changes.append(f"model.{key}={value.to_dict() if hasattr(value, 'to_dict') else value!r}")
            node[leaf] = value
    return changes
