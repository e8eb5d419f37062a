"""``routezoo transform unlearn``: remove one stdlib package's knowledge from a trained MoE.

    routezoo transform unlearn --from MOE_RUN --workdir OUT --config.transform.forget=email \\
        --config.transform.steps=50 --config.transform.learning_rate=1e-4

Zhuang et al. 2025, "UOE: Unlearning One Expert Is Enough for Mixture-of-Experts LLMs"
(published as "SEUF: Is Unlearning One Expert Enough for Mixture-of-Experts LLMs?"):
unlearning every parameter of an MoE lets the router stop sending the forget data to the
experts that know it, which looks like forgetting but damages the other experts and the
rest of the model. UOE (1) attributes the forget set to one expert of one layer, (2)
unlearns in that expert only, and (3) anchors the router of that layer so it keeps
selecting the expert on the forget data.

Data: the forget set is one top-level stdlib package (``forget``, a ``data.tasks`` name,
:mod:`routezoo.training.data.tasks`), the retain set other packages (``retain``, comma-
separated; "" = the 8 packages other than ``forget`` with the most training files). Both
come from the training split (``calibration_batches`` batches each, cycled through the
unlearning steps); the losses reported are on the validation split (``train.eval_steps``
batches, the training loop's evaluation).

1. **Attribution** (on the calibration batches, padding excluded): for MoE layer ``ℓ`` and
   physical expert ``e`` the gate mass ``G(ℓ, e) = (1/N) Σ_t Σ_k w_tk [expert of slot k =
   e]``, the mean combine weight a token gives the expert (through ``model.moe.expert_map``
   when one is set). ``attribution='contrast'`` (default) scores ``G_forget - G_retain``,
   the expert the forget set uses more than the retain set; ``'forget'`` scores
   ``G_forget`` alone, the most engaged expert. The target ``(ℓ*, e*)`` is the best score
   (``layer >= 0`` restricts the choice to that layer).
2. **Objective** (``objective``), minimised on the forget batches: ``ga`` gradient ascent,
   ``-CE_forget``; ``gdiff`` gradient difference, ``-CE_forget + retain_weight · CE_retain``;
   ``npo`` (Zhang et al. 2024, "Negative Preference Optimization"),
   ``(2/β) mean_rows log(1 + (π_θ(row) / π_ref(row))^β)`` with ``log π`` a row's summed
   token log-likelihood and ``π_ref`` the source model (``npo_beta``).
3. **Router anchor**: ``anchor_weight · mean_t -log P_t(e*)`` over the forget tokens the
   loss counts, ``P_t(e*)`` the router's softmax probability of the router outputs mapped
   to ``e*`` in layer ``ℓ*`` (from :meth:`~routezoo.layers.routers.base.Router.router_logits`).
4. **Updates**: ``steps`` Adam steps (``learning_rate``) on the gradient of objective +
   anchor, applied only to expert ``e*``'s slice of ``wi``, ``wi_gate``, ``wo`` and to the
   router of layer ``ℓ*``; every other parameter is kept bit for bit.

``baseline=True`` (default) also unlearns the whole model with the same objective, steps
and learning rate and no anchor; the report gives, for the source, UOE and the whole-model
baseline, the forget and retain evaluation losses, the share of forget tokens routed to
``e*`` in layer ``ℓ*``, and the parameters each run changed. The new workdir holds the UOE
model. Routers without a learned logit matrix (``hash``, ``pregate``, ...) are refused.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np

from routezoo.training.transform import TransformError, TransformResult, register

OPTIONS = {
    "forget": "email",            # the stdlib package to forget (a data.tasks name)
    "retain": "",                 # comma-separated packages to keep; "" = the 8 others with the most files
    "objective": "ga",            # ga | gdiff | npo
    "steps": 20,                  # unlearning steps
    "learning_rate": 1e-4,        # Adam's
    "anchor_weight": 1.0,         # the router anchor's weight
    "retain_weight": 1.0,         # gdiff: weight of the retain cross-entropy
    "npo_beta": 0.1,              # npo: beta
    "attribution": "contrast",    # contrast (forget - retain gate mass) | forget (forget gate mass)
    "layer": -1,                  # the MoE layer to unlearn in; -1 = the attribution's choice
    "calibration_batches": 4,     # batches of each set for attribution and the unlearning steps
    "baseline": True,             # also unlearn the whole model (no anchor) for the report
    "evaluate": True,             # forget / retain evaluation losses in the report
}

OBJECTIVES = ("ga", "gdiff", "npo")
ATTRIBUTIONS = ("contrast", "forget")
DEFAULT_RETAIN = 8


def task_configs(source, forget: str, retain: str):
    """``(forget config, retain config, retain names)``: the source's config with
    ``data.tasks`` set to the forget package and to the retain packages (one-line errors)."""
    from routezoo.training import data as data_lib
    config = source.copy_config()
    if str(config.data.name) != data_lib.STDLIB:
        raise TransformError(f"unlearn takes its forget and retain sets from the stdlib's packages (data.tasks); "
                             f"the source's data.name is {config.data.name!r}: give --config.data.name=stdlib")
    data_lib.ensure_dataset(config.data)
    available = data_lib.available_tasks(config.data)
    with_eval = set(data_lib.available_tasks(config.data, config.data.eval_split))
    if forget not in available:
        raise TransformError(f"--config.transform.forget={forget!r} is no stdlib package of the dataset; allowed: "
                             f"{', '.join(sorted(available))}")
    names = [n.strip() for n in str(retain).split(",") if n.strip()]
    if not names:
        ranked = sorted((n for n in available if n != forget and n in with_eval), key=lambda n: (-available[n], n))
        names = ranked[:DEFAULT_RETAIN]
    bad = [n for n in names if n not in available or n == forget]
    if bad:
        raise TransformError(f"--config.transform.retain names {bad[0]!r}, which is "
                             f"{'the forget package' if bad[0] == forget else 'no stdlib package of the dataset'}")
    out = []
    for tasks in (forget, ",".join(names)):
        c = source.copy_config()
        c.data.tasks = tasks
        c.data.task_sampling = "uniform"
        out.append(c)
    return out[0], out[1], names


def gate_mass(stats: dict[str, Any], maps: dict[int, np.ndarray], num_experts: int) -> dict[int, np.ndarray]:
    """``{layer: [E]}``: the mean combine weight per token of each physical expert, from
    :meth:`~routezoo.training.transform.Context.routing_stats` (router outputs mapped by
    ``maps``; empty slots and outputs outside the map ignored)."""
    out = {}
    for layer, idx, w in zip(stats["layers"], stats["indices"], stats["weights"]):
        idx, w = np.asarray(idx), np.asarray(w, np.float64)
        emap = maps[layer]
        valid = (idx >= 0) & (idx < len(emap))
        phys = np.where(valid, emap[np.clip(idx, 0, len(emap) - 1)], 0)
        mass = np.zeros(num_experts)
        np.add.at(mass, phys[valid], w[valid])
        out[layer] = mass / max(idx.shape[0], 1)
    return out


def attribute(forget: dict[int, np.ndarray], retain: dict[int, np.ndarray], how: str,
              layer: int = -1) -> tuple[int, int, dict[int, list[float]]]:
    """``(layer, expert, scores)``: the target of the best attribution score (module
    docstring) and every layer's scores."""
    scores = {i: (forget[i] - retain[i]) if how == "contrast" else forget[i] for i in forget}
    cands = [i for i in scores if layer < 0 or i == layer]
    if not cands:
        raise TransformError(f"--config.transform.layer={layer} is no MoE layer; MoE layers: {sorted(scores)}")
    best = max(cands, key=lambda i: (float(np.max(scores[i])), -i))
    return best, int(np.argmax(scores[best])), {i: [float(v) for v in s] for i, s in scores.items()}


def update_mask(params: Any, layer: int | None, expert: int | None) -> Any:
    """A tree like ``params`` (numpy, broadcastable): 1 where unlearning may change a value.
    ``layer=None``: everything (the whole-model baseline); else expert ``expert``'s rows of
    ``layer{layer}/moe/experts/*`` and all of ``layer{layer}/moe/router``."""
    import jax

    def mask(path, leaf):
        keys = [str(getattr(k, "key", k)) for k in path]
        if layer is None:
            return np.ones((), np.float32)
        if keys[:3] == [f"layer{layer}", "moe", "router"]:
            return np.ones((), np.float32)
        if keys[:3] == [f"layer{layer}", "moe", "experts"]:
            m = np.zeros((np.shape(leaf)[0],) + (1,) * (np.ndim(leaf) - 1), np.float32)
            m[expert] = 1.0
            return m
        return np.zeros((), np.float32)
    return jax.tree_util.tree_map_with_path(mask, params)


def make_unlearn_step(model, *, objective: str, layer: int, phys_of_output: np.ndarray, expert: int,
                      anchor_weight: float, retain_weight: float, npo_beta: float, learning_rate: float):
    """``(init(params) -> opt_state, step(params, opt_state, mask, forget, retain, ref) ->
    (params, opt_state, metrics))``: one Adam step on the unlearning objective plus the
    router anchor (``anchor_weight = 0``: none), the update applied where ``mask > 0``
    (``jnp.where``: elsewhere the old value, bit for bit)."""
    import jax
    import jax.numpy as jnp
    import optax

    from routezoo.layers.routers import Router
    from routezoo.training.step import packed_kwargs
    from routezoo.zoo.lm import cross_entropy

    tx = optax.adam(learning_rate)
    onehot = jnp.asarray(np.asarray(phys_of_output) == expert, jnp.float32)   # [R]: outputs of e*

    def wanted(module, method_name):
        return isinstance(module, Router) and method_name == "router_logits"

    def forward(params, batch, capture: bool):
        kw = packed_kwargs(model, batch)
        if not capture:
            logits, _ = model.apply({"params": params}, batch["inputs"], deterministic=True, **kw)
            return logits, None
        (logits, _), state = model.apply({"params": params}, batch["inputs"], deterministic=True,
                                         capture_intermediates=wanted, mutable=["intermediates"], **kw)
        return logits, state["intermediates"][f"layer{layer}"]["moe"]["router"]["router_logits"][0]

    def nll(logits, batch):
        per_token, _ = cross_entropy(logits, batch["targets"], batch["weights"])
        return per_token   # [B, L], weighted

    def loss_fn(params, forget, retain, ref):
        logits, router_logits = forward(params, forget, anchor_weight > 0)
        w = forget["weights"]
        per_token = nll(logits, forget)
        ce_f = per_token.sum() / jnp.maximum(w.sum(), 1.0)
        metrics = {"forget_ce": ce_f}
        if objective == "npo":
            ref_logits, _ = forward(ref, forget, False)
            logp, logp_ref = -per_token.sum(-1), -jax.lax.stop_gradient(nll(ref_logits, forget)).sum(-1)
            loss = (2.0 / npo_beta) * jnp.mean(jax.nn.softplus(npo_beta * (logp - logp_ref)))
        else:
            loss = -ce_f
        if objective == "gdiff":
            r_logits, _ = forward(params, retain, False)
            ce_r = nll(r_logits, retain).sum() / jnp.maximum(retain["weights"].sum(), 1.0)
            loss = loss + retain_weight * ce_r
            metrics["retain_ce"] = ce_r
        if anchor_weight > 0:
            p = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1) @ onehot    # [T]
            real = (forget["weights"].reshape(-1) > 0).astype(jnp.float32)   # the tokens the loss counts
            anchor = -(jnp.log(jnp.maximum(p, 1e-9)) * real).sum() / jnp.maximum(real.sum(), 1.0)
            loss = loss + anchor_weight * anchor
            metrics["anchor"] = anchor
        return loss, metrics

    @jax.jit
    def step(params, opt_state, mask, forget, retain, ref):
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, forget, retain, ref)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = jax.tree.map(lambda p, u, m: jnp.where(m > 0, p + u.astype(p.dtype), p), params, updates, mask)
        return params, opt_state, {"loss": loss, **metrics}

    return tx.init, step


def _changed(before: Any, after: Any) -> list[str]:
    import jax
    out = []
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(before), jax.tree.leaves(after)):
        if not np.array_equal(np.asarray(a), np.asarray(b)):
            out.append("/".join(str(getattr(k, "key", k)) for k in path))
    return out


def _target_share(ctx, config, params, model_state, batches, layer, expert, maps) -> float:
    """The share of forget tokens with ``expert`` among their routed experts in ``layer``."""
    stats = ctx.routing_stats(config, params, model_state, len(batches), batches=batches)
    pos = stats["layers"].index(layer)
    idx = np.asarray(stats["indices"][pos])
    emap = maps[layer]
    valid = (idx >= 0) & (idx < len(emap))
    phys = np.where(valid, emap[np.clip(idx, 0, len(emap) - 1)], -1)
    return float(np.mean(np.any(phys == expert, axis=-1)))


@register("unlearn", options=OPTIONS, needs_moe=True,
          summary="UOE: unlearn a stdlib package in its most attributed expert, the router anchored")
def unlearn(source, opts, ctx) -> TransformResult:
    import jax

    from routezoo import zoo
    from routezoo.training.transform.merge_experts import expert_maps
    from routezoo.zoo import stack

    objective, how = str(opts["objective"]), str(opts["attribution"])
    if objective not in OBJECTIVES:
        raise TransformError(f"--config.transform.objective={objective!r} is unknown; allowed: {', '.join(OBJECTIVES)}")
    if how not in ATTRIBUTIONS:
        raise TransformError(f"--config.transform.attribution={how!r} is unknown; allowed: {', '.join(ATTRIBUTIONS)}")
    if int(opts["steps"]) < 1 or int(opts["calibration_batches"]) < 1:
        raise TransformError("--config.transform.steps and calibration_batches must be >= 1")
    config = source.copy_config()
    layers = source.moe_layers
    for i in layers:
        router = source.params[f"layer{i}"].get("moe", {}).get("router", {})
        if "kernel" not in router:
            raise TransformError(f"unlearn anchors a router with a learned logit matrix (router/kernel); "
                                 f"moe.router={config.model.moe.router!r} has none in layer{i}")
    f_cfg, r_cfg, retain_names = task_configs(source, str(opts["forget"]), str(opts["retain"]))
    n = int(opts["calibration_batches"])
    f_batches, r_batches = ctx.batches(n, f_cfg), ctx.batches(n, r_cfg)
    maps = expert_maps(config.model.moe, layers)
    e_phys = int(config.model.moe.num_experts)
    g_f = gate_mass(ctx.routing_stats(config, source.params, source.model_state, n, batches=f_batches), maps, e_phys)
    g_r = gate_mass(ctx.routing_stats(config, source.params, source.model_state, n, batches=r_batches), maps, e_phys)
    layer, expert, scores = attribute(g_f, g_r, how, int(opts["layer"]))
    ctx.log(f"unlearn: {opts['forget']!r} attributed to expert {expert} of layer {layer} "
            f"(gate mass {g_f[layer][expert]:.4f} forget, {g_r[layer][expert]:.4f} retain)")
    report: dict[str, Any] = {
        "forget": str(opts["forget"]), "retain": retain_names, "objective": objective,
        "target": {"layer": layer, "expert": expert, "attribution": how,
                   "gate_mass_forget": float(g_f[layer][expert]), "gate_mass_retain": float(g_r[layer][expert])},
        "scores": {f"layer{i}": s for i, s in scores.items()}}

    model = zoo.build(stack.with_scan(config.model, False))
    keys = ("inputs", "targets", "weights", "segment_ids", "positions")
    fb = [{k: np.asarray(b[k]) for k in keys if k in b} for b in f_batches]
    rb = [{k: np.asarray(b[k]) for k in keys if k in b} for b in r_batches]
    if jax.tree.leaves(dict(source.model_state)):
        raise TransformError("unlearn: the source carries model state (a router's balancing bias, "
                             "moe.bias_update_rate > 0), which these unlearning steps do not apply")
    ref = jax.device_put(source.params)   # on the device once: every step reads it

    def run(mask_layer, anchor):
        init, step = make_unlearn_step(
            model, objective=objective, layer=layer, phys_of_output=maps[layer], expert=expert,
            anchor_weight=anchor, retain_weight=float(opts["retain_weight"]), npo_beta=float(opts["npo_beta"]),
            learning_rate=float(opts["learning_rate"]))
        mask = jax.device_put(update_mask(source.params, mask_layer, expert))
        params, opt_state, history = ref, init(ref), []
        for _, fbatch, rbatch in zip(range(int(opts["steps"])), itertools.cycle(fb), itertools.cycle(rb)):
            params, opt_state, m = step(params, opt_state, mask, fbatch, rbatch, ref)
            history.append({k: float(v) for k, v in jax.device_get(m).items()})
        params = jax.device_get(params)
        out = {"changed": _changed(source.params, params), "loss_first": history[0]["loss"],
               "loss_last": history[-1]["loss"], "forget_ce_first": history[0]["forget_ce"],
               "forget_ce_last": history[-1]["forget_ce"],
               "target_share": _target_share(ctx, config, params, source.model_state, f_batches, layer, expert, maps)}
        if bool(opts["evaluate"]):
            out["eval_forget"] = float(ctx.evaluate(f_cfg, params, source.model_state)["eval_loss"])
            out["eval_retain"] = float(ctx.evaluate(r_cfg, params, source.model_state)["eval_loss"])
        return params, out

    src = {"target_share": _target_share(ctx, config, source.params, source.model_state, f_batches, layer, expert,
                                         maps)}
    if bool(opts["evaluate"]):
        src["eval_forget"] = float(ctx.evaluate(f_cfg, source.params, source.model_state)["eval_loss"])
        src["eval_retain"] = float(ctx.evaluate(r_cfg, source.params, source.model_state)["eval_loss"])
    report["source"] = src
    params, report["uoe"] = run(layer, float(opts["anchor_weight"]))
    if bool(opts["baseline"]):
        _, report["whole_model"] = run(None, 0.0)
    return TransformResult(config, params, source.model_state, report)
