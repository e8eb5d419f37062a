"""``routezoo transform upcycle``: a trained dense decoder becomes an MoE.

    routezoo transform upcycle --from DENSE --workdir OUT --config.transform.num_experts=8
    routezoo transform upcycle --from DENSE --workdir OUT --config.transform.method=readme \\
        --config.transform.num_experts=8 --config.transform.router_steps=100
    routezoo train --workdir OUT --config.train.steps=1000      # continue training the MoE

The parameter maths is :mod:`routezoo.zoo.upcycle`; this module reads calibration data,
runs the models and builds the config. Two methods (``method``):

``sparse`` (Komatsuzaki et al. 2023, "Sparse Upcycling: Training Mixture-of-Experts from
Dense Checkpoints"): every ``every``-th layer (default 2: every other layer, as the paper
upcycles) becomes an MoE of ``num_experts`` copies of its dense MLP (``noise``: each copy
plus ``noise · std(W)`` Gaussian noise), routed top-``k`` (default 2) by a fresh ``top_k``
router (``router_init_scale``, default the config's 0.1: near-uniform at the start);
attention, norms and embeddings are copied. With ``renormalize=True`` (default) the
upcycled model computes the dense model's function at initialisation (the report's
``max_logit_diff`` on the calibration batches); with ``False`` each MoE layer's output is
the dense one times the routed probability mass, as with the paper's unnormalised gates.

``readme`` (Cai et al. 2024, "Read-ME: Refactorizing LLMs as Router-Decoupled Mixture of
Experts with System Co-Design"): every ``every``-th layer (default 1: all) is refactored.
The dense MLP's ``F`` neurons are split into ``num_experts`` experts of ``(F - S)/E`` neurons
by balanced k-means of their activation patterns over ``calibration_batches`` batches, the
``S = round(shared_fraction · F)`` most active neurons (rounded to keep ``F - S`` divisible
by ``E``) forming a shared expert every token uses (:func:`routezoo.zoo.upcycle.cluster_neurons`);
all experts at weight 1 give the dense MLP back exactly. The router is Read-ME's pre-gate
(``moe.router='pregate'``: a small causal Transformer over token ids, one choice per token
for every layer, top-``k``, default 1), its embedding started from the dense model's. It is
trained by distillation from the dense model, the source serving as the frozen teacher of
the one train step (:mod:`routezoo.training.distill`, weight ``distill_weight``,
temperature ``distill_temperature``): ``rounds`` of ``router_steps`` steps that move only
the pre-gate, then ``backbone_steps`` that move everything but the pre-gate, as Read-ME
alternates router and backbone phases (its router loss is a per-layer activation target;
here the target is the dense model's output distribution). With a workdir source and
``keep_teacher`` the new workdir's config keeps distilling from it
(``distill.teacher_workdir``) when trained further.

The report gives the parameter counts (copied, made, fresh), the evaluation of the dense
source and of the MoE before and after any training inside the transform, and for
``readme`` the calibration-token count, the group sizes and, per phase, the mean loss and
distillation KL of its first and last tenth of steps.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from routezoo.training.transform import TransformError, TransformResult, register

OPTIONS = {
    "method": "sparse",           # sparse (experts = copies of the MLP) | readme (experts carved from its neurons)
    "num_experts": 8,             # E experts per MoE layer
    "k": 0,                       # experts per token; 0 = the method's (sparse 2, readme 1)
    "every": 0,                   # MoE in every N-th layer; 0 = the method's (sparse 2, readme 1)
    "renormalize": True,          # top-k weights renormalised over the chosen experts (k >= 2)
    "router_init_scale": -1.0,    # the new router's init scale; < 0 = the config's moe.router_init_scale
    "noise": 0.0,                 # sparse: each expert copy + noise * std(W) * N(0, 1)
    "shared_fraction": 0.0,       # readme: share of the neurons in one shared expert
    "calibration_batches": 4,     # readme: batches of the training split whose activations are clustered
    "kmeans_iters": 50,           # readme: balanced k-means rounds at most
    "router_steps": 0,            # readme: steps per round moving only the pre-gate (distilled from the source)
    "backbone_steps": 0,          # readme: steps per round moving all but the pre-gate (distilled)
    "rounds": 1,                  # readme: router / backbone rounds
    "distill_weight": 1.0,        # readme: weight of the KL to the dense source in those steps
    "distill_temperature": 1.0,   # readme: its temperature
    "keep_teacher": True,         # readme, workdir source: OUT's config distils from it (distill.*)
    "evaluate": True,             # evaluate the source and the new model on the eval split
    "seed": 0,                    # noise, k-means start
}

METHODS = ("sparse", "readme")


def _method_defaults(opts: dict[str, Any]) -> tuple[str, int, int]:
    method = str(opts["method"])
    if method not in METHODS:
        raise TransformError(f"--config.transform.method={method!r} is unknown; allowed: {', '.join(METHODS)}")
    k = int(opts["k"]) or (2 if method == "sparse" else 1)
    every = int(opts["every"]) or (2 if method == "sparse" else 1)
    return method, k, every


def _init_params(model_cfg, seq_len: int, seed: int):
    """Freshly initialised unscanned params and model state of ``model_cfg`` (host trees)."""
    import jax
    import jax.numpy as jnp
    from flax import linen as nn

    from routezoo import zoo
    from routezoo.training.state import RNG_STREAMS
    from routezoo.zoo import stack
    model = zoo.build(stack.with_scan(model_cfg, False))
    tokens = jnp.zeros((1, seq_len), jnp.int32)
    rng = jax.random.PRNGKey(seed)
    variables = jax.jit(lambda r: nn.unbox(model.init({"params": r, **{s: r for s in RNG_STREAMS}}, tokens)))(rng)
    variables = jax.device_get(variables)
    params = variables.pop("params")
    variables.pop("intermediates", None)
    return params, dict(variables)


def _evaluate(ctx, config, params, model_state) -> dict[str, float]:
    return {k: float(v) for k, v in ctx.evaluate(config, params, model_state).items()}


def mlp_inputs(config, params, model_state, batches, pad_id: int) -> dict[int, np.ndarray]:
    """The dense MLP's input (the ``ffn_norm`` output) of every layer on the non-padding
    tokens of ``batches``: ``{layer: float32 [N, D]}``."""
    import jax

    from routezoo import zoo
    from routezoo.training.step import packed_kwargs
    from routezoo.zoo import stack
    model = zoo.build(stack.with_scan(config.model, False))

    def wanted(module, method_name):
        return method_name == "__call__" and module.name == "ffn_norm"

    def forward(variables, batch):
        _, state = model.apply(variables, batch["inputs"], deterministic=True, capture_intermediates=wanted,
                               mutable=["intermediates"], **packed_kwargs(model, batch))
        inter = state["intermediates"]
        return {int(k[5:]): inter[k]["ffn_norm"]["__call__"][0] for k in inter
                if k.startswith("layer") and k[5:].isdigit() and "ffn_norm" in inter[k]}

    fwd = jax.jit(forward)
    variables = {"params": params, **dict(model_state)}
    out: dict[int, list[np.ndarray]] = {}
    for batch in batches:
        keys = ["inputs"] + [k for k in ("segment_ids", "positions") if k in batch]
        found = jax.device_get(fwd(variables, {k: batch[k] for k in keys}))
        mask = np.asarray(batch["inputs"]).reshape(-1) != pad_id
        for layer, x in found.items():
            out.setdefault(layer, []).append(np.asarray(x, np.float32).reshape(mask.shape[0], -1)[mask])
    return {layer: np.concatenate(v) for layer, v in sorted(out.items())}


def mlp_hidden(x: np.ndarray, mlp: dict[str, np.ndarray], mlp_type: str) -> np.ndarray:
    """The dense MLP's hidden activations ``[N, F]`` (the input of ``wo``) for inputs
    ``x [N, D]``, as :class:`routezoo.layers.mlp.MLP` computes them (float64)."""
    import jax
    x = np.asarray(x, np.float64)
    h = x @ np.asarray(mlp["wi"], np.float64)
    if mlp_type == "swiglu":
        g = x @ np.asarray(mlp["wg"], np.float64)
        return g / (1.0 + np.exp(-g)) * h
    if mlp_type == "gelu":   # flax's nn.gelu: the tanh approximation
        return np.asarray(jax.nn.gelu(h, approximate=True))
    if mlp_type == "relu":
        return np.maximum(h, 0.0)
    raise TransformError(f"model.mlp_type={mlp_type!r} has no expert form")


def distill_steps(ctx, config, params, model_state, teacher_cfg, teacher_params, teacher_state, steps: int, *,
                  weight: float, temperature: float, update_mask=None, batches=None):
    """``steps`` updates of the one train step with a frozen teacher
    (:class:`~routezoo.training.distill.Distill`) on the training split of ``config`` (or
    ``batches``), updates multiplied by ``update_mask`` (0 freezes a parameter exactly).
    The optimizer is ``config``'s, its schedule spanning these ``steps`` (warm-up at most a
    tenth of them).

    Returns:
      ``(params, model_state, losses, kls)``: unscanned host trees, the loss and the
      ``distill_kl`` of every step.
    """
    import itertools

    import jax
    import jax.numpy as jnp
    import ml_collections
    import optax
    from flax import linen as nn
    from jax.sharding import NamedSharding, PartitionSpec

    from routezoo import zoo
    from routezoo.layers import sharding as shd
    from routezoo.training.adapter_run import optimizer_for
    from routezoo.training.distill import Distill
    from routezoo.training.loop import to_global
    from routezoo.training.step import make_train_step, special_ids_of
    from routezoo.zoo import stack
    config = ml_collections.ConfigDict(config.to_dict())
    config.train.steps = int(steps)
    config.optimizer.warmup_steps = min(int(config.optimizer.warmup_steps), int(steps) // 10)
    mconfig, mesh, rules, model = ctx._setup(config)
    data_lib = ctx._data(config)
    tokenizer = data_lib.get_tokenizer(config.data)
    tx, schedule = optimizer_for(mconfig, None)
    if update_mask is not None:
        full = jax.tree.map(lambda p, m: np.broadcast_to(np.asarray(m, np.float32), np.shape(p)), params, update_mask)
        mask = stack.to_layout(full, config.model)
        tx = optax.chain(tx, optax.stateless(
            lambda updates, params=None: jax.tree.map(lambda u, m: u * jnp.asarray(m, u.dtype), updates, mask)))
    teacher = Distill(zoo.build(stack.with_scan(teacher_cfg.model, False)), float(weight), float(temperature))
    source = itertools.cycle(batches) if batches is not None else data_lib.make_train_iterator(mconfig)
    losses, kls = [], []
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        state, shardings = ctx._state(mconfig, params, model_state, tx, mesh, rules, model)
        replicated = NamedSharding(mesh, PartitionSpec())
        tvars = jax.device_put({"params": teacher_params, **dict(teacher_state)}, replicated)
        batch_sharding = NamedSharding(mesh, shd.batch_spec(1))
        step_fn = jax.jit(make_train_step(model, tx, mconfig, schedule, None, special_ids_of(tokenizer),
                                          teacher=teacher),
                          in_shardings=(shardings, batch_sharding, jax.tree.map(lambda _: replicated, tvars)),
                          out_shardings=(shardings, None), donate_argnums=(0,))
        for _ in range(int(steps)):
            state, metrics = step_fn(state, to_global(next(source), batch_sharding), tvars)
            m = jax.device_get(metrics)
            losses.append(float(m["loss"]))
            kls.append(float(m["distill_kl"]))
        params, model_state = jax.device_get((state.params, state.model_state))
    return (stack.to_unscanned(params, config.model), stack.to_unscanned(dict(model_state), config.model),
            losses, kls)


def _readme_groups(ctx, source, layers, num_experts: int, shared_fraction: float, opts) -> tuple[dict, dict, dict]:
    from routezoo.zoo import upcycle as up
    from routezoo.training import data as data_lib
    f = int(source.config.model.mlp_dim)
    shared = int(round(shared_fraction * f))
    shared -= (f - shared) % num_experts   # F - S divisible by E
    if shared < 0 or (f - shared) // num_experts < 1:
        raise TransformError(f"model.mlp_dim={f} does not split into {num_experts} experts "
                             f"(with shared_fraction={shared_fraction}); allowed: num_experts <= mlp_dim")
    pad = int(data_lib.get_tokenizer(source.config.data).pad_id)
    batches = ctx.batches(int(opts["calibration_batches"]))
    xs = mlp_inputs(source.config, source.params, source.model_state, batches, pad)
    groups, shared_idx, sizes = {}, {}, {}
    for i in layers:
        mlp = {k: np.asarray(v) for k, v in source.params[f"layer{i}"]["mlp"].items()}
        acts = mlp_hidden(xs[i], mlp, str(source.config.model.mlp_type))
        shared_idx[i], groups[i] = up.cluster_neurons(acts, num_experts, shared, iters=int(opts["kmeans_iters"]),
                                                      seed=int(opts["seed"]) + i)
        sizes[i] = int(xs[i].shape[0])
    return groups, shared_idx, {"calibration_tokens": sizes[layers[0]] if layers else 0, "shared_neurons": shared,
                                "expert_neurons": (f - shared) // num_experts}


def _pregate_mask(params, pregate: bool) -> dict[str, Any]:
    """1 on the pre-gate's parameters and 0 elsewhere (``pregate``), or the reverse."""
    import jax
    return {key: jax.tree.map(lambda _, on=(key == "pregate") == pregate: 1.0 if on else 0.0, value)
            for key, value in params.items()}


@register("upcycle", options=OPTIONS,
          summary="dense to MoE: sparse upcycling (experts = copies) or Read-ME (experts carved by clustering)")
def upcycle(source, opts, ctx) -> TransformResult:
    from routezoo.zoo import upcycle as up
    method, k, every = _method_defaults(opts)
    config = source.copy_config()
    try:
        up.check_dense(config.model)
    except ValueError as e:
        raise TransformError(f"upcycle: {e}") from None
    e = int(opts["num_experts"])
    scale = float(opts["router_init_scale"])
    f = int(config.model.mlp_dim)
    try:
        if method == "sparse":
            model_cfg = up.moe_config(config.model, num_experts=e, k=k, every=every, expert_dim=f,
                                      renormalize=bool(opts["renormalize"]),
                                      router_init_scale=None if scale < 0 else scale)
        else:
            if not 0 <= float(opts["shared_fraction"]) < 1:
                raise ValueError(f"shared_fraction={opts['shared_fraction']} must be in [0, 1)")
            shared = int(round(float(opts["shared_fraction"]) * f))
            shared -= (f - shared) % e
            model_cfg = up.moe_config(config.model, num_experts=e, k=k, every=every,
                                      expert_dim=max((f - shared) // e, 1), router="pregate",
                                      renormalize=bool(opts["renormalize"]),
                                      router_init_scale=None if scale < 0 else scale, shared_dim=max(shared, 0))
    except ValueError as err:
        raise TransformError(f"upcycle: {err}") from None
    model_cfg.scan_layers = bool(config.model.scan_layers)
    config.model = model_cfg
    layers = up.moe_layer_indices(model_cfg)
    init, model_state = _init_params(model_cfg, int(config.data.seq_len), int(opts["seed"]) + 1)
    report: dict[str, Any] = {"method": method, "num_experts": e, "k": k, "every": every, "moe_layers": layers}
    try:
        if method == "sparse":
            params, counts = up.upcycle_params(source.params, init, layers, noise=float(opts["noise"]),
                                               seed=int(opts["seed"]))
        else:
            groups, shared_idx, info = _readme_groups(ctx, source, layers, e, float(opts["shared_fraction"]), opts)
            report.update(info)
            params, counts = up.carve_params(source.params, init, layers, groups, shared_idx)
    except ValueError as err:
        raise TransformError(f"upcycle: {err}") from None
    report["params"] = counts
    if method == "sparse":
        batches = ctx.batches(1)
        a, _ = ctx.apply(source.config, source.params, source.model_state, batches[0]["inputs"])
        b, _ = ctx.apply(config, params, model_state, batches[0]["inputs"])
        report["max_logit_diff"] = float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
    if bool(opts["evaluate"]):
        report["eval_source"] = _evaluate(ctx, source.config, source.params, source.model_state)
        report["eval_init"] = _evaluate(ctx, config, params, model_state)
    if method == "readme":
        rounds, rs, bs = int(opts["rounds"]), int(opts["router_steps"]), int(opts["backbone_steps"])
        if rounds * (rs + bs) > 0:
            router_mask, backbone_mask = _pregate_mask(params, True), _pregate_mask(params, False)
            steps_log = []
            for _ in range(rounds):
                for phase, n, mask in (("router", rs, router_mask), ("backbone", bs, backbone_mask)):
                    if n <= 0:
                        continue
                    params, model_state, losses, kls = distill_steps(
                        ctx, config, params, model_state, source.config, source.params, source.model_state, n,
                        weight=float(opts["distill_weight"]), temperature=float(opts["distill_temperature"]),
                        update_mask=mask)
                    w = max(1, n // 10)   # means over the first and the last tenth of the steps
                    steps_log.append({"phase": phase, "steps": n, "loss_first": float(np.mean(losses[:w])),
                                      "loss_last": float(np.mean(losses[-w:])), "kl_first": float(np.mean(kls[:w])),
                                      "kl_last": float(np.mean(kls[-w:]))})
                    ctx.log(f"upcycle readme: {phase} phase, {n} steps: distill KL {steps_log[-1]['kl_first']:.4f} "
                            f"-> {steps_log[-1]['kl_last']:.4f} (means of the first and last {w} steps)")
            report["distill_phases"] = steps_log
            if bool(opts["evaluate"]):
                report["eval_trained"] = _evaluate(ctx, config, params, model_state)
        if bool(opts["keep_teacher"]) and source.kind == "workdir":
            config.distill.teacher_workdir = source.path
            config.distill.weight = float(opts["distill_weight"])
            config.distill.temperature = float(opts["distill_temperature"])
            report["teacher_workdir"] = source.path
    return TransformResult(config, params, model_state, report)
