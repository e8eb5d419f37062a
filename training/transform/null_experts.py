"""``routezoo transform add_null_experts``: AdaMoE's null experts added to a trained top-k MoE.

    routezoo transform add_null_experts --from RUN --workdir OUT [--config.transform.num_null_experts=8]
    routezoo train --workdir OUT --config.train.steps=200      # the fine-tune

Zeng et al. 2024, "AdaMoE: Token-Adaptive Routing with Null Experts for Mixture-of-Experts
Language Models". The source's ``top_k`` router (``R`` outputs, ``k`` per token, weights
renormalised over the chosen experts) becomes ``null_experts``
(:class:`~routezoo.layers.routers.dynamic.NullExpertsRouter`) with ``Z`` null experts and a
larger ``k'``: a token that puts some of its ``k'`` slots on null experts runs fewer real
ones. Nothing else changes (experts, expert map, every other weight).

Initialisation (the authors' Mixtral fine-tune tiles the real router rows): null column
``j`` of the router kernel ``[D, R + Z]`` is a copy of real column ``j mod R``
(:func:`~routezoo.zoo.expert_ops.null_router_kernel`). With ``Z`` a multiple of ``R`` each
router output has ``c = 1 + Z/R`` equal logits. With ``k' = k c`` (the default) the top
``k'`` slots hold exactly the original top-``k`` real outputs with all their null copies;
with ``(k - 1) c < k' < k c`` (AdaMoE's Mixtral recipe: ``Z = 2R``, ``k' = 2k``) they hold
the same real outputs as long as equal logits rank the real column first, which the
routers' stable top-k does. Either way the weights renormalised over the selected real
outputs are the original ones: the new model computes what the source did (up to float
rounding), with ``k`` real experts per token. Fine-tuning then separates the null columns
from their real ones (the pooled load-balance loss pushes on them differently; the
language-model loss never reaches them, as null slots carry no weight). The load-balance
loss's optimum spreads the ``k'`` slots evenly over the ``R + Z`` experts, ``R k' / (R + Z)``
real experts per token (reported as ``balanced_real_experts_per_token``): ``k`` at the
default ``k' = k c``, fewer for a smaller ``k'``. A ``k'`` outside that range, or ``Z`` not a
multiple of ``R``, starts from a different routing (reported).

``finetune_steps > 0`` fine-tunes inside the transform (the training loop's step, the
config's optimizer, all parameters); the report gives, for the source, the new model and
the fine-tuned one, the evaluation loss and the real experts per token on the calibration
batches. Otherwise fine-tune with ``routezoo train --workdir OUT``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from routezoo.training.transform import TransformError, TransformResult, register
from routezoo.training.transform.merge_experts import get_path, set_path, source_moe_paths
from routezoo.zoo import expert_ops as ops

OPTIONS = {
    "num_null_experts": 0,       # Z null experts; 0 = as many as router outputs (k doubles)
    "k": 0,                      # k' over real + null; 0 = k (R + Z) / R, which keeps the routing
    "load_balance_coef": -1.0,   # the pooled balance loss's coefficient; < 0 = the source's
    "finetune_steps": 0,         # fine-tune steps inside the transform (0: none)
    "calibration_batches": 4,    # batches for real experts per token in the report
    "evaluate": True,            # evaluate source and result on the eval split
}


def real_experts_per_token(ctx, config, params, model_state, batches) -> dict[str, float]:
    """Mean real (non-empty) slots per non-padding token, per MoE layer and overall."""
    stats = ctx.routing_stats(config, params, model_state, len(batches), batches=batches)
    per = {f"layer{layer}": float(np.mean(np.sum(np.asarray(idx) >= 0, axis=-1)))
           for layer, idx in zip(stats["layers"], stats["indices"])}
    per["mean"] = float(np.mean(list(per.values())))
    return per


@register("add_null_experts", options=OPTIONS, needs_moe=True,
          summary="AdaMoE: null experts and a larger k on a trained top_k MoE (routing kept at init)")
def add_null_experts(source, opts, ctx) -> TransformResult:
    from routezoo.layers.routers import router_class
    from routezoo.layers.routers.dynamic import NullExpertsRouter
    from routezoo.layers.routers.top_k import TopKRouter
    from routezoo.training.transform import router_width

    config = source.copy_config()
    moe_cfg = config.model.moe
    if router_class(str(moe_cfg.router)) is not TopKRouter:
        raise TransformError(f"add_null_experts retrofits a top_k router; the source's is moe.router="
                             f"{moe_cfg.router!r}")
    k = int(moe_cfg.k)
    if k < 2 or not bool(moe_cfg.renormalize):
        raise TransformError(f"add_null_experts needs top-k weights renormalised over the chosen experts (moe.k >= 2 "
                             f"and moe.renormalize=True; the source has k={k}, renormalize={bool(moe_cfg.renormalize)}): "
                             "raw probabilities would shrink as null experts take probability mass")
    if float(moe_cfg.bias_update_rate) > 0:
        raise TransformError("add_null_experts: the source balances with a selection bias (moe.bias_update_rate > 0), "
                             "which the null-experts router does not have")
    if bool(moe_cfg.batch_prioritized):
        raise TransformError("add_null_experts: the null-experts router has no batch-prioritised routing "
                             "(the source sets moe.batch_prioritized)")
    r = router_width(moe_cfg)
    z = int(opts["num_null_experts"]) or r
    if z < 1:
        raise TransformError(f"num_null_experts={z} must be >= 1")
    k_new = int(opts["k"])
    if k_new == 0:
        try:
            k_new = ops.tiled_null_k(k, r, z)
        except ValueError:
            raise TransformError(f"num_null_experts={z} is not a multiple of the {r} router outputs, so no k keeps "
                                 "the routing; give --config.transform.k or a multiple") from None
    if not k <= k_new <= r + z:
        raise TransformError(f"k={k_new} must be between the source's k={k} and {r + z} (router outputs plus null "
                             "experts)")
    lo, hi = ops.null_k_range(k, r, z) if z % r == 0 else (0, -1)
    preserved = lo <= k_new <= hi
    for key in ("finetune_steps", "calibration_batches"):
        if int(opts[key]) < 0:
            raise TransformError(f"{key}={opts[key]} must be >= 0")

    paths = source_moe_paths(source, "add_null_experts")
    params = source.params
    for layer, path in paths.items():
        router = get_path(params, path + ("router",))
        if set(router) != {"kernel"} or np.shape(router["kernel"])[-1] != r:
            raise TransformError(f"layer {layer}'s router holds {sorted(router)} (kernel "
                                 f"{np.shape(router.get('kernel'))}); add_null_experts extends a [D, {r}] kernel")
        params = set_path(params, path + ("router", "kernel"), ops.null_router_kernel(router["kernel"], z))

    moe_cfg.router = NullExpertsRouter.router_name
    moe_cfg.num_null_experts = z
    moe_cfg.k = k_new
    if float(opts["load_balance_coef"]) >= 0:
        moe_cfg.load_balance_coef = float(opts["load_balance_coef"])
    model_state = dict(source.model_state)
    report: dict[str, Any] = {"router_outputs": r, "num_null_experts": z, "k_before": k, "k_after": k_new,
                              "routing_preserved_at_init": preserved,
                              "balanced_real_experts_per_token": r * k_new / (r + z),
                              "null_init": "tiled: null column j copies router column j mod R",
                              "load_balance_coef": float(moe_cfg.load_balance_coef)}
    n_cal = int(opts["calibration_batches"])
    batches = ctx.batches(n_cal) if n_cal else []
    if batches:
        report["real_experts_per_token_source"] = real_experts_per_token(
            ctx, source.config, source.params, source.model_state, batches)
        report["real_experts_per_token"] = real_experts_per_token(ctx, config, params, model_state, batches)
    if bool(opts["evaluate"]) or int(opts["finetune_steps"]):
        report["eval_source"] = {k_: float(v) for k_, v in ctx.evaluate(source.config, source.params,
                                                                         source.model_state).items()}
        report["eval_null"] = {k_: float(v) for k_, v in ctx.evaluate(config, params, model_state).items()}
    if int(opts["finetune_steps"]):
        params, model_state, losses = ctx.finetune(config, params, model_state, int(opts["finetune_steps"]))
        report["finetune_losses"] = [round(x, 5) for x in losses]
        report["eval_finetuned"] = {k_: float(v) for k_, v in ctx.evaluate(config, params, model_state).items()}
        if batches:
            report["real_experts_per_token_finetuned"] = real_experts_per_token(ctx, config, params, model_state,
                                                                                batches)
    return TransformResult(config, params, model_state, report)
