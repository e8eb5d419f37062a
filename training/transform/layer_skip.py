"""``routezoo transform layer_skip``: skip layers for a target speed-up, the same for every token.

    routezoo transform layer_skip --from RUN --workdir OUT --config.transform.speedup=2
    routezoo transform layer_skip --from RUN --workdir OUT --config.transform.speedup=2 \\
        --config.transform.mode=drop      # a smaller model without the skipped layers

Liu, Meng, Zhou 2024, "Accelerating Inference in Large Language Models with a Unified Layer
Skipping Strategy". The schedule (:func:`routezoo.zoo.layer_skip.skip_schedule`) depends
only on the number of layers and the target speed-up: ``round(N / speedup)`` layers run,
the first and the last always, the others spread evenly over the depth. ``mode``:

- ``config`` (default): the new workdir is the source's parameters with
  ``model.skip_layers`` set; the decoder passes a skipped layer's input on unchanged
  (unscanned: the block is never called; scanned: computed and discarded, see
  :class:`~routezoo.zoo.lm.DecoderLM`), so the new workdir is written unscanned.
- ``drop``: the skipped layers are removed (:func:`routezoo.zoo.layer_skip.drop_layers`):
  fewer layers, the kept ones renumbered, the same function as ``config``.

``speedup = 1`` is the identity (nothing skipped; the source's parameters and model config
unchanged). The report evaluates the model at every speed-up of ``speedups`` (the eval
split: loss and bits per byte, the layers skipped, the speed-up in layers ``N / n``) and,
with ``timing``, the measured forward time of one calibration batch at each; the paper
fine-tunes with the schedule in place, which ``finetune_steps`` does here (the training
loop's step, all parameters), or ``routezoo train --workdir OUT`` afterwards.
"""

from __future__ import annotations

import time
from typing import Any

from routezoo.training.transform import TransformError, TransformResult, register

OPTIONS = {
    "speedup": 1.5,                 # target speed-up r >= 1 (in layers: N / layers run)
    "mode": "config",               # config (model.skip_layers) | drop (remove the layers)
    "speedups": "1,1.25,1.5,2,3",   # speed-ups evaluated in the report ("" = none)
    "evaluate": True,               # evaluate at each of speedups on the eval split
    "timing": True,                 # time the forward pass at each of speedups (one calibration batch)
    "finetune_steps": 0,            # fine-tune with the schedule in place (0: none)
}

MODES = ("config", "drop")


def _speedups(text: str) -> list[float]:
    try:
        values = [float(s) for s in str(text).split(",") if s.strip()]
    except ValueError:
        raise TransformError(f"--config.transform.speedups={text!r}: give comma-separated numbers >= 1") from None
    if any(not v >= 1 for v in values):
        raise TransformError(f"--config.transform.speedups={text!r}: every speed-up must be >= 1")
    return values


def _forward_seconds(ctx, config, params, model_state, inputs, repeats: int = 3) -> float:
    """The best of ``repeats`` timed forward passes (compiled first) of ``inputs``."""
    import jax
    import jax.numpy as jnp

    from routezoo import zoo
    from routezoo.zoo import stack
    model = zoo.build(stack.with_scan(config.model, False))
    fwd = jax.jit(lambda v, x: model.apply(v, x, deterministic=True)[0])
    variables = {"params": params, **dict(model_state)}
    x = jnp.asarray(inputs)
    fwd(variables, x).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fwd(variables, x).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return best


@register("layer_skip", options=OPTIONS,
          summary="unified layer skipping: the layers a target speed-up skips, the same for every token")
def layer_skip(source, opts, ctx) -> TransformResult:
    from routezoo.zoo import layer_skip as ls
    from routezoo.zoo.lm import skip_layers_of

    config = source.copy_config()
    m = config.model
    if str(m.name) not in ("decoder_lm", "encoder_mlm"):
        raise TransformError(f"layer_skip needs a decoder_lm or encoder_mlm; the source is model.name={m.name!r}")
    if skip_layers_of(m):
        raise TransformError(f"layer_skip: the source already skips layers (model.skip_layers={m.skip_layers!r}); "
                             "give the full model")
    mode = str(opts["mode"])
    if mode not in MODES:
        raise TransformError(f"--config.transform.mode={mode!r} is unknown; allowed: {', '.join(MODES)}")
    speedup = float(opts["speedup"])
    if not speedup >= 1:
        raise TransformError(f"--config.transform.speedup={speedup} must be >= 1")
    n = int(m.num_layers)
    skip = ls.skip_schedule(n, speedup)
    report: dict[str, Any] = {"num_layers": n, "speedup": speedup, "skip_layers": list(skip),
                              "layers_run": n - len(skip), "speedup_in_layers": ls.layer_fraction(n, skip)}
    results = []
    batch = ctx.batches(1)[0] if bool(opts["timing"]) else None
    for r in _speedups(opts["speedups"]):
        s = ls.skip_schedule(n, r)
        cfg = source.copy_config()
        cfg.model = ls.with_skip(cfg.model, s)
        row = {"speedup": r, "skip_layers": list(s), "speedup_in_layers": ls.layer_fraction(n, s)}
        if bool(opts["evaluate"]):
            ev = ctx.evaluate(cfg, source.params, source.model_state)
            row.update(eval_loss=float(ev["eval_loss"]), eval_bits_per_byte=float(ev["eval_bits_per_byte"]))
        if batch is not None:
            row["forward_seconds"] = _forward_seconds(ctx, cfg, source.params, source.model_state, batch["inputs"])
        results.append(row)
    if results:
        report["by_speedup"] = results
    params, model_state = source.params, source.model_state
    if skip:
        if mode == "drop":
            try:
                new_model, params = ls.drop_layers(source.params, m, skip)
                _, model_state = ls.drop_layers(dict(source.model_state), m, skip) if model_state else (None, {})
            except ValueError as e:
                raise TransformError(f"layer_skip: {e}") from None
            config.model = new_model
        else:
            config.model = ls.with_skip(m, skip)
            config.model.scan_layers = False   # a scanned stack would compute the skipped layers and discard them
    if int(opts["finetune_steps"]) > 0:
        params, model_state, losses = ctx.finetune(config, params, model_state, int(opts["finetune_steps"]))
        report["finetune"] = {"steps": int(opts["finetune_steps"]), "loss_first": losses[0], "loss_last": losses[-1]}
        if bool(opts["evaluate"]):
            ev = ctx.evaluate(config, params, model_state)
            report["eval_finetuned"] = {k: float(v) for k, v in ev.items()}
    return TransformResult(config, params, model_state, report)

