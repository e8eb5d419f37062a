"""``routezoo transform merge`` and ``routezoo transform compress``: MC-SMoE on a trained MoE.

    routezoo transform merge --from RUN --workdir OUT --config.transform.num_experts=4
    routezoo transform compress --from OUT --workdir OUT2 --config.transform.rank=32 --config.transform.density=0.05

Li et al. 2024, "Merge, Then Compress: Demystify Efficient SMoE with Hints from Its Routing
Policy" (ICLR 2024). The maths is :mod:`routezoo.zoo.expert_ops`; this module reads the
calibration data, runs the model for its routing statistics and builds the new config.

``merge``, per MoE layer, from ``calibration_batches`` batches of the training split:

1. usage ``u_e``: routed token copies per physical expert (every slot of top-k, padding
   excluded); router logits ``h [T, R]`` of the same tokens (per physical expert through
   the expert map: :func:`~routezoo.zoo.expert_ops.physical_logits`);
2. the ``num_experts`` most used experts are the dominant ones; every other expert joins
   the dominant expert with the most similar router-logit column, ``(cos + 1) / 2`` over
   the calibration tokens;
3. ``merge_method``:
   ``mc_smoe``: each member's hidden units permuted to match the dominant expert's (weight
   matching, an exact linear assignment), then ``W_g = Σ u_e W_e / Σ u_e``; the router is
   kept and ``model.moe.expert_map`` sends every router output to its group's expert;
   ``average``: the same groups and map, the plain mean of the unaligned weights;
   ``prune``: the ``num_experts`` most used experts kept, the others dropped with their
   router columns (the router's softmax renormalises over what is left), ``k`` capped at
   ``num_experts``.
4. ``finetune_steps > 0``: that many steps of the training loop's step on the training
   split (all parameters, the config's optimizer), before and after which the model is
   evaluated; otherwise the evaluation runs on the source and the merged model only.

``compress``: every stacked expert matrix (``wi``, ``wi_gate`` ``[D, F]``, ``wo``
``[F, D]`` of each expert of each MoE layer) replaced by ``U V + S``
(:func:`~routezoo.zoo.expert_ops.low_rank_plus_sparse`): the truncated SVD at ``rank`` plus
the largest ``density`` share of the residual's entries. The result is stored as the dense
matrix ``U V + S``: the model keeps its shapes and runs as before, with no runtime memory
saving; the report gives the values a factored store would hold (``r (m + n)`` plus the
sparse entries) against the dense ones, and the reconstruction error.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from routezoo.training.transform import TransformError, TransformResult, register
from routezoo.zoo import expert_ops as ops

MERGE_OPTIONS = {
    "num_experts": 0,            # experts kept per MoE layer; 0 = half of them (rounded up)
    "merge_method": "mc_smoe",   # mc_smoe | average | prune
    "calibration_batches": 8,    # training-split batches for usage and router-logit similarity
    "finetune_steps": 0,         # recovery fine-tune steps after merging (0: none)
    "evaluate": True,            # evaluate the source and the result on the eval split
}
COMPRESS_OPTIONS = {
    "rank": 0,                   # rank of U V per expert matrix (0: from rate)
    "density": 0.0,              # share of each matrix's entries kept in S
    "rate": 0.0,                 # with rank=0: values stored per dense value (rank from it and density)
    "evaluate": True,
}


# ------------------------------------------------------------------ parameter trees


def get_path(tree: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def set_path(tree: Any, path: tuple[str, ...], value: Any) -> Any:
    """A copy of the nested dict ``tree`` with ``path`` set to ``value`` (others shared)."""
    if not path:
        return value
    out = dict(tree)
    out[path[0]] = set_path(tree[path[0]], path[1:], value)
    return out


def moe_paths(params: Any, outside: list | None = None) -> dict[int, tuple[str, ...]]:
    """``{layer index: path}`` of every MoE block in an unscanned parameter tree: a subtree
    holding ``experts`` (stacked ``wi``/``wo``) and ``router`` under a ``layer{i}`` key.
    Blocks outside any ``layer{i}`` (multi-token prediction modules) are appended to
    ``outside`` when given."""
    found: dict[int, tuple[str, ...]] = {}

    def walk(node, path, layer):
        if not hasattr(node, "keys"):
            return
        if "experts" in node and "router" in node and hasattr(node["experts"], "keys") and "wi" in node["experts"]:
            if layer is None:
                if outside is not None:
                    outside.append(path)
            else:
                found[layer] = path
            return
        for key in node:
            k = str(key)
            lay = int(k[5:]) if k.startswith("layer") and k[5:].isdigit() else layer
            walk(node[key], path + (key,), lay)

    walk(params, (), None)
    return dict(sorted(found.items()))


def source_moe_paths(source: Any, op: str) -> dict[int, tuple[str, ...]]:
    """The MoE blocks of ``source`` by layer, or a one-line :class:`TransformError` when they
    are not exactly the model's MoE layers (another block type) or some lie outside the layer
    stack (multi-token prediction modules, which ``op`` does not handle)."""
    outside: list = []
    paths = moe_paths(source.params, outside)
    if outside:
        raise TransformError(f"{op}: the model has MoE blocks outside its layers ({'/'.join(map(str, outside[0]))}, "
                             "multi-token prediction), which it does not handle")
    if sorted(paths) != sorted(source.moe_layers):
        raise TransformError(f"{op} found stacked experts with a router in layers {sorted(paths)}, but the model's "
                             f"MoE layers are {source.moe_layers}; this block type is not handled")
    return paths


def expert_maps(moe_cfg: Any, layers: list[int]) -> dict[int, np.ndarray]:
    """The expert map of each MoE layer (the identity when ``model.moe.expert_map`` is unset)."""
    if not str(moe_cfg.get("expert_map", "") or ""):
        return {layer: ops.identity_map(int(moe_cfg.num_experts)) for layer in layers}
    from routezoo.layers.moe.block import layer_expert_maps
    maps = layer_expert_maps(moe_cfg, len(layers))
    return {layer: np.asarray(m, np.int32) for layer, m in zip(layers, maps)}


def set_expert_maps(moe_cfg: Any, maps: dict[int, np.ndarray]) -> None:
    """Writes per-layer maps into ``model.moe.expert_map`` (left unset when every map is the
    identity over ``model.moe.num_experts`` experts)."""
    values = [np.asarray(maps[k]) for k in sorted(maps)]
    e = int(moe_cfg.num_experts)
    if all(m.shape == (e,) and np.array_equal(m, np.arange(e)) for m in values) and \
            not str(moe_cfg.get("expert_map", "") or ""):
        return
    from routezoo.layers.moe.block import format_expert_maps
    moe_cfg.expert_map = format_expert_maps([m.tolist() for m in values])


# ------------------------------------------------------------------ calibration


def calibrate(config: Any, params: Any, model_state: Any, batches: list[dict[str, Any]], pad_id: int):
    """Router logits and routed outputs of every MoE layer over ``batches`` (padding removed).

    Returns:
      ``{layer: {'logits': float [N, R], 'indices': int [N, K]}}``: per non-padding token
      the router's logits (:meth:`~routezoo.layers.routers.base.Router.router_logits`) and
      the router outputs it chose (``-1``: an empty slot). Layers whose router computes no
      ``router_logits`` have no ``'logits'``.
    """
    import jax

    from routezoo import zoo
    from routezoo.layers.routers import Router, Routing
    from routezoo.training.step import packed_kwargs
    from routezoo.zoo import stack

    model = zoo.build(stack.with_scan(config.model, False))

    def wanted(module, method_name):
        return isinstance(module, Router) and method_name in ("__call__", "router_logits")

    def forward(variables, batch):
        _, state = model.apply(variables, batch["inputs"], deterministic=True, capture_intermediates=wanted,
                               mutable=["intermediates"], **packed_kwargs(model, batch))
        found: dict[int, dict[str, Any]] = {}
        leaves = jax.tree_util.tree_flatten_with_path(state["intermediates"],
                                                      is_leaf=lambda x: isinstance(x, Routing))[0]
        for path, leaf in leaves:
            keys = [str(getattr(k, "key", getattr(k, "idx", k))) for k in path]
            layers = [int(k[5:]) for k in keys if k.startswith("layer") and k[5:].isdigit()]
            if not layers or any(k.startswith("mtp") for k in keys):
                continue
            entry = found.setdefault(layers[0], {})
            if isinstance(leaf, Routing):
                entry.setdefault("indices", leaf.indices)
            elif "router_logits" in keys:
                entry.setdefault("logits", leaf)
        return found

    fwd = jax.jit(forward)
    variables = {"params": params, **dict(model_state)}
    out: dict[int, dict[str, list]] = {}
    for batch in batches:
        keys = ["inputs"] + [k for k in ("segment_ids", "positions") if k in batch]
        found = jax.device_get(fwd(variables, {k: batch[k] for k in keys}))
        mask = np.asarray(batch["inputs"]).reshape(-1) != pad_id
        for layer, entry in found.items():
            slot = out.setdefault(layer, {})
            for name, value in entry.items():
                value = np.asarray(value)
                slot.setdefault(name, []).append(value.reshape(mask.shape[0], -1)[mask])
    return {layer: {name: np.concatenate(v) for name, v in entry.items()} for layer, entry in sorted(out.items())}


def _pad_id(config) -> int:
    from routezoo.training import data as data_lib
    return int(data_lib.get_tokenizer(config.data).pad_id)


def _experts_of(block: Any) -> dict[str, np.ndarray]:
    experts = {name: np.asarray(w) for name, w in block["experts"].items()}
    unknown = sorted(set(experts) - set(ops.HIDDEN_AXIS))
    if unknown:
        raise TransformError(f"the experts hold weights {unknown} beside {sorted(ops.HIDDEN_AXIS)}; "
                             "merging knows only those")
    return experts


def _router_leaves(tree: Any, path: tuple[str, ...]) -> list[tuple[tuple[str, ...], Any]]:
    """``(path, leaf)`` of every array under the router of the block at ``path`` in ``tree``
    (a parameter tree or one collection of the model state)."""
    try:
        node = get_path(tree, path + ("router",))
    except (KeyError, TypeError):
        return []
    out = []

    def walk(n, p):
        if hasattr(n, "keys"):
            for k in n:
                walk(n[k], p + (k,))
        else:
            out.append((p, n))
    walk(node, path + ("router",))
    return out


# ------------------------------------------------------------------ merge


def _evaluate(ctx, config, params, model_state) -> dict[str, float]:
    return {k: float(v) for k, v in ctx.evaluate(config, params, model_state).items()}


@register("merge", options=MERGE_OPTIONS, needs_moe=True,
          summary="MC-SMoE: merge experts into num_experts per layer (mc_smoe | average | prune)")
def merge(source, opts, ctx) -> TransformResult:
    method = str(opts["merge_method"])
    if method not in ops.MERGE_METHODS:
        raise TransformError(f"merge_method={method!r} is unknown; known: {', '.join(ops.MERGE_METHODS)}")
    config = source.copy_config()
    moe_cfg = config.model.moe
    e = int(moe_cfg.num_experts)
    n = int(opts["num_experts"]) or (e + 1) // 2
    if not 1 <= n < e:
        raise TransformError(f"num_experts={n} must be between 1 and {e - 1} (the source has {e} experts per "
                             "layer; fewer are kept)")
    if int(opts["calibration_batches"]) < 1:
        raise TransformError(f"calibration_batches={opts['calibration_batches']} must be >= 1")
    if int(opts["finetune_steps"]) < 0:
        raise TransformError(f"finetune_steps={opts['finetune_steps']} must be >= 0")
    from routezoo.layers.routers import router_class
    router_cls = router_class(str(moe_cfg.router))
    if not router_cls.makes_expert_choices or router_cls.expert_major:
        raise TransformError(f"merge needs a token-choice router that picks experts per token; moe.router="
                             f"{moe_cfg.router!r} does not")
    paths = source_moe_paths(source, "merge")
    maps = expert_maps(moe_cfg, list(paths))
    batches = ctx.batches(int(opts["calibration_batches"]))
    stats = calibrate(source.config, source.params, source.model_state, batches, _pad_id(source.config))
    missing = [layer for layer in paths if "logits" not in stats.get(layer, {})]
    if method != "prune" and missing:
        raise TransformError(f"merge_method={method!r} groups experts by router-logit similarity, but moe.router="
                             f"{moe_cfg.router!r} computes no router_logits in layers {missing}; "
                             "use merge_method=prune")

    params, model_state = source.params, dict(source.model_state)
    new_maps: dict[int, np.ndarray] = {}
    layers_report = {}
    for layer, path in paths.items():
        block = get_path(params, path)
        experts = _experts_of(block)
        m = maps[layer]
        usage = ops.expert_usage(stats[layer]["indices"], m, e)
        entry: dict[str, Any] = {"usage": (usage / max(usage.sum(), 1.0)).round(6).tolist()}
        if method == "prune":
            width = m.shape[0]
            for p, leaf in _router_leaves(params, path) + [
                    (p, leaf) for col in model_state.values() for p, leaf in _router_leaves(col, path)]:
                if np.ndim(leaf) < 1 or np.shape(leaf)[-1] != width:
                    raise TransformError(f"merge_method=prune drops router columns, but router weight "
                                         f"{'/'.join(map(str, p))} {np.shape(leaf)} has no last axis of the "
                                         f"{width} router outputs")
            merged, _, new_map, outputs = ops.prune_experts(experts, np.zeros((1, width)), m, usage, n)
            for p, leaf in _router_leaves(params, path):
                params = set_path(params, p, np.asarray(leaf)[..., outputs])
            for name, col in model_state.items():
                for p, leaf in _router_leaves(col, path):
                    model_state[name] = set_path(model_state[name], p, np.asarray(leaf)[..., outputs])
            entry["kept"] = ops.top_by_usage(usage, n).tolist()
            entry["router_outputs_kept"] = outputs.tolist()
        else:
            logits = ops.physical_logits(stats[layer]["logits"], m, e)
            dominant, group = ops.group_experts(usage, ops.logit_similarity(logits), n)
            merged, info = ops.merge_experts(experts, group, dominant, usage, method)
            new_map = ops.merged_expert_map(m, group)
            entry.update(dominant=dominant.tolist(), group=group.tolist(),
                         merge_weights=np.round(info["weights"], 6).tolist())
        new_maps[layer] = new_map
        params = set_path(params, path + ("experts",), {
            name: merged[name].astype(np.asarray(block["experts"][name]).dtype) for name in block["experts"]})
        layers_report[f"layer{layer}"] = entry

    moe_cfg.num_experts = n
    if method == "prune":
        widths = {layer: int(m.shape[0]) for layer, m in new_maps.items()}
        if len(set(widths.values())) > 1:
            raise TransformError(f"merge_method=prune keeps the router outputs of the kept experts, "
                                 f"{', '.join(f'{w} in layer {l}' for l, w in widths.items())}: every layer's router "
                                 "needs one width; prune a source whose router outputs each have their own expert")
        width = next(iter(widths.values()))
        moe_cfg.k = min(int(moe_cfg.k), width)
        if int(moe_cfg.get("top_p_max_k", 0)) > width:
            moe_cfg.top_p_max_k = width
    set_expert_maps(moe_cfg, new_maps)
    report: dict[str, Any] = {"method": method, "experts_before": e, "experts_after": n,
                              "calibration_tokens": int(next(iter(stats.values()))["indices"].shape[0]),
                              "layers": layers_report}
    if bool(opts["evaluate"]) or int(opts["finetune_steps"]):
        report["eval_source"] = _evaluate(ctx, source.config, source.params, source.model_state)
        report["eval_merged"] = _evaluate(ctx, config, params, model_state)
    if int(opts["finetune_steps"]):
        params, model_state, losses = ctx.finetune(config, params, model_state, int(opts["finetune_steps"]))
        report["finetune_losses"] = [round(x, 5) for x in losses]
        report["eval_finetuned"] = _evaluate(ctx, config, params, model_state)
    return TransformResult(config, params, model_state, report)


# ------------------------------------------------------------------ compress


@register("compress", options=COMPRESS_OPTIONS, needs_moe=True,
          summary="MC-SMoE: experts' matrices as low rank plus sparse, W = U V + S (stored dense)")
def compress(source, opts, ctx) -> TransformResult:
    rank, density, rate = int(opts["rank"]), float(opts["density"]), float(opts["rate"])
    if rank < 0:
        raise TransformError(f"rank={rank} must be >= 0")
    if not 0.0 <= density <= 1.0:
        raise TransformError(f"density={density} must be in [0, 1]")
    if rank == 0 and not 0.0 < rate <= 1.0 and density == 0.0:
        raise TransformError("compress needs rank >= 1, a rate in (0, 1] or a density > 0 "
                             "(--config.transform.rank / rate / density)")
    if rate and (rate <= 0.0 or rate > 1.0):
        raise TransformError(f"rate={rate} must be in (0, 1]")
    if rank and rate:
        raise TransformError("give rank or rate, not both (rate sets the rank)")
    if rate and density >= rate:
        raise TransformError(f"density={density} leaves nothing of rate={rate} for the low-rank part")
    paths = source_moe_paths(source, "compress")
    params = source.params
    dense = stored = 0
    sq_err = sq_norm = 0.0
    ranks = set()
    layers_report = {}
    for layer, path in paths.items():
        experts = _experts_of(get_path(params, path))
        new = {}
        lerr = lnorm = 0.0
        for name, w in experts.items():
            shape = w.shape[1:]
            full = min(shape)
            r = ops.rank_for_rate(shape, rate, density) if rate else min(rank, full)
            ranks.add(r)
            out = np.empty_like(w)
            for i in range(w.shape[0]):
                u, v, s = ops.low_rank_plus_sparse(w[i], r, density)
                approx = u @ v + s
                out[i] = approx.astype(w.dtype)
                lerr += float(np.sum((np.asarray(w[i], np.float64) - approx) ** 2))
                lnorm += float(np.sum(np.asarray(w[i], np.float64) ** 2))
                dense += int(np.prod(shape))
                stored += ops.compressed_size(shape, r, density)
            new[name] = out
        params = set_path(params, path + ("experts",), new)
        sq_err += lerr
        sq_norm += lnorm
        layers_report[f"layer{layer}"] = {"relative_error": float(np.sqrt(lerr / max(lnorm, 1e-30)))}
    report: dict[str, Any] = {
        "rank": sorted(ranks), "density": density, "rate": rate,
        "relative_error": float(np.sqrt(sq_err / max(sq_norm, 1e-30))),
        "expert_values_dense": dense, "expert_values_factored": stored,
        "factored_over_dense": stored / max(dense, 1),
        "stored_as": "dense U V + S (same shapes as the source; no runtime memory saving)",
        "layers": layers_report}
    config = source.copy_config()
    if bool(opts["evaluate"]):
        report["eval_source"] = _evaluate(ctx, source.config, source.params, source.model_state)
        report["eval_compressed"] = _evaluate(ctx, config, params, source.model_state)
    return TransformResult(config, params, source.model_state, report)
