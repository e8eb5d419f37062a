"""Layer skipping by a target speed-up, the same layers for every token.

Liu, Meng, Zhou 2024, "Accelerating Inference in Large Language Models with a Unified
Layer Skipping Strategy": the number of layers to run follows from the target speed-up
alone, and the skipped layers are intermediate ones spread evenly over the depth (skipping
a contiguous block at the bottom or the top changes the layer-wise representations too
much). Because the choice does not depend on the input, every token of a batch skips the
same layers, and a key/value cache works as in the full model.

:func:`skip_schedule`: of ``N`` layers and a speed-up ``r >= 1``, ``n = max(min(N, 2),
round(N / r))`` layers run, evenly spaced over the depth: layer ``round(j (N - 1) / (n - 1))``
for ``j = 0 .. n-1`` (so the first and the last layer always run); the rest are skipped,
and the runs of skipped layers between two kept ones differ in length by at most one.
``r = 1`` skips nothing. The speed-up counted is in layers, ``N / n``: attention and
feed-forward of a skipped layer are both saved; the embedding and the output head are not.

The schedule is applied as ``model.skip_layers`` (:func:`routezoo.zoo.lm.skip_layers_of`,
honoured by :class:`~routezoo.zoo.lm.DecoderLM`), which keeps every parameter, or by
:func:`drop_layers`, which builds the smaller model without them (the reference the
decoder's skipping is tested against).
"""

from __future__ import annotations

from typing import Any, Sequence

import ml_collections


def kept_count(num_layers: int, speedup: float) -> int:
    """Layers that run at ``speedup`` (module docstring)."""
    if not speedup >= 1.0:
        raise ValueError(f"speed-up {speedup} must be >= 1")
    return max(min(num_layers, 2), min(num_layers, int(round(num_layers / speedup))))


def skip_schedule(num_layers: int, speedup: float) -> tuple[int, ...]:
    """The layers skipped at ``speedup``, ascending (module docstring)."""
    n = kept_count(num_layers, speedup)
    if n >= num_layers:
        return ()
    kept = {int(round(j * (num_layers - 1) / (n - 1))) for j in range(n)}
    return tuple(i for i in range(num_layers) if i not in kept)


def with_skip(model_cfg: Any, skip: Sequence[int]) -> ml_collections.ConfigDict:
    """A copy of ``model_cfg`` with ``model.skip_layers`` set to ``skip``."""
    cfg = ml_collections.ConfigDict(model_cfg.to_dict() if hasattr(model_cfg, "to_dict") else dict(model_cfg))
    cfg.skip_layers = ",".join(str(i) for i in sorted(skip))
    return cfg


def drop_layers(params: dict[str, Any], model_cfg: Any, skip: Sequence[int]) -> tuple[ml_collections.ConfigDict, dict]:
    """The model without the layers ``skip``: ``num_layers`` reduced, the kept layers
    renumbered in order (their feed-forward kinds as a list in ``model.ffn``), and the
    unscanned parameter tree ``params`` (or any tree with ``layer{i}`` keys) to match.

    Refused (``ValueError``) for routers with model-level networks sized by the number of
    MoE layers (a pre-gate with per-layer routes)."""
    from routezoo.zoo.lm import ffn_kinds
    skip = set(int(i) for i in skip)
    n = int(model_cfg.num_layers)
    kinds = ffn_kinds(model_cfg)
    kept = [i for i in range(n) if i not in skip]
    if not kept:
        raise ValueError("drop_layers: every layer skipped")
    cfg = ml_collections.ConfigDict(model_cfg.to_dict() if hasattr(model_cfg, "to_dict") else dict(model_cfg))
    cfg.num_layers = len(kept)
    cfg.ffn = ",".join(kinds[i] for i in kept)
    cfg.skip_layers = ""
    if "moe" in kinds and str(cfg.moe.router) == "pregate" and not bool(cfg.moe.get("pregate_shared_routes", True)):
        raise ValueError("drop_layers: a pre-gate with one route per MoE layer (pregate_shared_routes=False) is "
                         "sized by the number of MoE layers")
    out = {}
    for key, value in params.items():
        if key.startswith("layer") and key[5:].isdigit():
            i = int(key[5:])
            if i not in skip:
                out[f"layer{kept.index(i)}"] = value
        else:
            out[key] = value
    return cfg, out


def without_skipped(model_cfg: Any, params: dict[str, Any]) -> tuple[Any, dict]:
    """A model with ``model.skip_layers`` as the same function without those layers
    (:func:`drop_layers` of its unscanned ``params``, ``scan_layers=False``); any other
    model as it is. How formats without a skip list (Hugging Face export) take it."""
    from routezoo.zoo import stack
    from routezoo.zoo.lm import skip_layers_of
    skip = skip_layers_of(model_cfg)
    if not skip:
        return model_cfg, params
    unscanned = stack.with_scan(model_cfg, False)
    return drop_layers(dict(stack.to_unscanned(params, model_cfg)), unscanned, skip)


def layer_fraction(num_layers: int, skip: Sequence[int]) -> float:
    """``N / n``: the speed-up in layers of skipping ``skip``."""
    return num_layers / max(num_layers - len(set(skip)), 1)


__all__ = ["drop_layers", "kept_count", "layer_fraction", "skip_schedule", "with_skip", "without_skipped"]
