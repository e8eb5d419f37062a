"""Exporting: zoo params as an HF checkpoint, and HF checkpoints as converted routezoo directories."""

from __future__ import annotations

import json
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from routezoo.zoo.hf import safetensors_io
from routezoo.zoo.hf.config_map import hf_config_from_model, infer_architecture
from routezoo.zoo.hf.loading import check_shapes, layer_sources, open_source
from routezoo.zoo.hf.registry import HFError, family_named
from routezoo.zoo.hf.safetensors_io import (DEFAULT_MAX_SHARD_BYTES, HF_INDEX, HF_SINGLE, RZ_INDEX, RZ_SINGLE,
                                            copy_tokenizer)
from routezoo.zoo.hf.tensor_map import flatten


def _host_value(x: Any) -> np.ndarray:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


class _LayerView:
    """``view[unscanned path]``: the parameter of one layer (``layer3/attn/q``) of a params
    tree in either layout, sliced out of a scanned stack's ``[R, ...]`` leaf on demand."""

    def __init__(self, flat: Mapping[tuple[str, ...], Any], model_cfg: Any):
        self._flat = flat
        self._where = layer_sources(flat, model_cfg)

    def first(self) -> Any:
        return next(iter(self._flat.values()))

    def __getitem__(self, path: tuple[str, ...]) -> Any:
        leaf, r = self._where[path]
        return self._flat[leaf] if r is None else self._flat[leaf][r]

    def dtype(self, path: tuple[str, ...]) -> np.dtype:
        return np.dtype(self._flat[self._where[path][0]].dtype)


def _np_dtype(name: str | None):
    if name is None:
        return None
    return np.dtype(jnp.dtype(name))


def expand_expert_maps(model_cfg: Any, params: Mapping[str, Any]) -> tuple[Any, Mapping[str, Any]]:
    """A model with ``moe.expert_map`` as the same model without one: every MoE block's
    stacked experts expanded to one set per router output (``w[map]``, that layer's map),
    ``moe.num_experts`` the router's width. The HF formats hold one expert per router
    output, so this is how a mapped model is exported, exactly. Without a map: the inputs
    unchanged. The tree comes back on the host, unscanned (``scan_layers=False``)."""
    moe = model_cfg.get("moe", None)
    if moe is None or not str(moe.get("expert_map", "") or "").strip():
        return model_cfg, params
    import ml_collections

    from routezoo.layers.moe.block import expand_expert_params, layer_expert_maps
    from routezoo.zoo import stack
    from routezoo.zoo.lm import ffn_kinds
    layers = [i for i, kind in enumerate(ffn_kinds(model_cfg)) if kind == "moe"]
    maps = dict(zip((f"layer{i}" for i in layers), layer_expert_maps(moe, len(layers))))
    first = next(iter(maps.values()))

    def walk(node, top):
        if not isinstance(node, Mapping):
            return node
        out = {}
        for key, value in node.items():
            if key == "experts" and isinstance(value, Mapping) and "router" in node:
                out[key] = expand_expert_params(value, maps.get(top, first))
            else:
                out[key] = walk(value, top if top is not None else key)
        return out

    host = jax.tree.map(_host_value, stack.to_unscanned(params, model_cfg))
    tree = {key: walk(value, key) for key, value in host.items()}
    cfg = ml_collections.ConfigDict(model_cfg.to_dict())
    cfg.moe.num_experts, cfg.moe.expert_map, cfg.scan_layers = len(first), "", False
    return cfg, tree


def to_hf(model_cfg: Any, params: Mapping[str, Any], out_dir: str, *, architecture: str | None = None,
          base_config: Mapping[str, Any] | None = None, dtype: str | None = None,
          max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, tokenizer: str | None = None) -> str:
    """Writes ``params`` of the zoo model of ``model_cfg`` as an HF checkpoint in ``out_dir``.

    Each tensor is gathered to the host on its own (all processes take part; process 0
    writes): safetensors shards, an index and ``config.json`` (with ``architectures``) in
    the HF layout and naming.

    Args:
      model_cfg: the model config.
      params: the params tree.
      out_dir: the directory to write.
      architecture: an HF class name (default: ``model.hf_architecture``, ``base_config``'s,
        else inferred from the layout).
      base_config: HF config keys to keep (e.g. the imported checkpoint's token ids).
      dtype: tensor dtype on disk (default: the parameters').
      max_shard_bytes: the size at which a new shard starts.
      tokenizer: a Hugging Face tokenizer to ship with the checkpoint (a directory or a
        ``tokenizer.json``; :func:`copy_tokenizer`), so ``AutoTokenizer`` loads it too.

    Returns:
      ``out_dir``.
    """
    model_cfg, params = expand_expert_maps(model_cfg, params)
    from routezoo.zoo.layer_skip import without_skipped   # model.skip_layers: exported without those layers
    model_cfg, params = without_skipped(model_cfg, params)
    arch = (architecture or str(model_cfg.get("hf_architecture", "") or "")
            or (base_config or {}).get("architectures", [None])[0] or infer_architecture(model_cfg))
    fam = family_named(arch)
    # The tensor maps address layers one by one; a scanned stack's [R, ...] leaf is sliced
    # one layer at a time as its tensors are written (never the whole model twice on device).
    flat = _LayerView(flatten(params), model_cfg)
    disk = _np_dtype(dtype)
    first = flat.first()
    hf_cfg = hf_config_from_model(model_cfg, arch, base_config,
                                  dtype=str(jnp.dtype(dtype or first.dtype).name))
    maps = fam.tensor_maps(model_cfg)
    copies = fam.copies(model_cfg)
    safetensors_io.make_dir(out_dir)

    items = []
    for tm in maps:
        def get_all(tm=tm):
            value = _host_value(flat[tm.path])
            return dict(tm.to_hf(value if disk is None else value.astype(disk)))
        # Experts of one parameter share one gather; each HF tensor is taken from it.
        cache: dict = {}

        def getter(name, tm=tm, get_all=get_all, cache=cache):
            if "v" not in cache:
                cache["v"] = get_all()
            out = cache["v"].pop(name)
            if not cache["v"]:
                cache.clear()
            return out
        for name in tm.hf:
            items.append((name, tm.hf_shape, (lambda name=name, getter=getter: getter(name))))

    by_path = {tm.path: tm for tm in maps}

    def single(tm):   # the HF array of a one-tensor map
        value = _host_value(flat[tm.path])
        (_, out), = tm.to_hf(value if disk is None else value.astype(disk))
        return out
    for name, path in copies.items():   # tensors the family repeats (DeepSeek-V3 MTP layers)
        items.append((name, by_path[path].hf_shape, (lambda tm=by_path[path]: single(tm))))

    name_to_path = {**{n: tm.path for tm in maps for n in tm.hf}, **copies}

    def itemsize(name):
        return (disk or flat.dtype(name_to_path[name])).itemsize
    safetensors_io.write_shards(out_dir, items, HF_INDEX, HF_SINGLE, max_shard_bytes, itemsize)
    safetensors_io.write_hf_config(out_dir, hf_cfg)
    if tokenizer:
        copy_tokenizer(tokenizer, out_dir)
    return out_dir


def convert_to_routezoo(hf_dir: str, out_dir: str, full_config: Any | None = None,
                        max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> ml_collections.ConfigDict:
    """Converts an HF checkpoint to a routezoo directory on the host, one tensor at a time.

    Writes ``params*.safetensors`` (routezoo names, ``layer0/attn/q``), ``hf_config.json``
    and ``config.json``, and copies the checkpoint's tokenizer files (:data:`TOKENIZER_FILES`).

    Args:
      hf_dir: the HF checkpoint directory.
      out_dir: the directory to write.
      full_config: a full run config (its ``model`` section is replaced); ``None``: just
        ``{"model": ...}``.
      max_shard_bytes: the size at which a new shard starts.

    Returns:
      The model config.
    """
    source = open_source(hf_dir)
    if source.kind != "hf":
        raise HFError(f"{hf_dir} is already a converted routezoo directory")
    m = source.model_config
    safetensors_io.make_dir(out_dir)
    with source.reader() as reader:
        maps = source.maps()
        check_shapes(maps, reader)
        items = [("/".join(tm.path), tm.shape, (lambda tm=tm: np.ascontiguousarray(tm.read(reader))))
                 for tm in maps]
        sizes = {"/".join(tm.path): np.dtype(reader.get(tm.hf[0], tuple(slice(0, 1) for _ in tm.hf_shape)).dtype
                                             ).itemsize for tm in maps}
        safetensors_io.write_shards(out_dir, items, RZ_INDEX, RZ_SINGLE, max_shard_bytes, lambda n: sizes[n])
    if full_config is not None:
        full = ml_collections.ConfigDict(full_config)
        full.model = m
        text = full.to_json_best_effort(indent=2, sort_keys=True)
    else:
        text = json.dumps({"model": m.to_dict()}, indent=2, sort_keys=True)
    safetensors_io.write_converted_configs(out_dir, text, source.hf_config)
    copy_tokenizer(hf_dir, out_dir)   # the checkpoint's tokenizer travels with it (data.tokenizer=auto finds it)
    return m
