"""Optimizers and learning-rate schedules from ``config.optimizer`` (optax).

AdamW (Loshchilov & Hutter, 2019), Adafactor (Shazeer & Stern, 2018) or SGD with momentum;
linear warmup then cosine, linear or constant decay to ``end_lr_fraction`` of the peak;
global-norm clipping; weight decay restricted by a mask.
"""

from __future__ import annotations

from typing import Any

import jax
import optax

OPTIMIZERS = ("adamw", "adafactor", "sgd")
SCHEDULES = ("cosine", "linear", "constant")
DECAY_MASKS = ("matrices", "all", "none")


def make_schedule(o: Any, total_steps: int) -> optax.Schedule:
    peak, warm = o.learning_rate, min(o.warmup_steps, max(total_steps - 1, 0))
    end = peak * o.end_lr_fraction
    decay_steps = max(total_steps - warm, 1)
    if o.schedule == "cosine":
        after = optax.cosine_decay_schedule(peak, decay_steps, alpha=o.end_lr_fraction)
    elif o.schedule == "linear":
        after = optax.linear_schedule(peak, end, decay_steps)
    elif o.schedule == "constant":
        after = optax.constant_schedule(peak)
    else:
        raise ValueError(f"unknown optimizer.schedule {o.schedule!r}; allowed: {', '.join(SCHEDULES)}")
    if warm == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warm), after], [warm])


def decay_mask(params: Any, kind: str) -> Any:
    """Which parameters get weight decay: ``matrices`` = ndim >= 2 except the embedding."""
    if kind == "all":
        return jax.tree.map(lambda _: True, params)
    if kind == "none":
        return jax.tree.map(lambda _: False, params)
    if kind != "matrices":
        raise ValueError(f"unknown optimizer.weight_decay_mask {kind!r}; allowed: {', '.join(DECAY_MASKS)}")

    def keep(path, leaf):
        names = [getattr(p, "key", str(p)) for p in path]
        return leaf.ndim >= 2 and "embedding" not in names
    return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(o: Any, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(transformation, schedule) for ``config.optimizer``."""
    schedule = make_schedule(o, total_steps)
    mask = lambda params: decay_mask(params, o.weight_decay_mask)
    if o.name == "adamw":
        tx = optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay, mask=mask)
    elif o.name == "adafactor":
        tx = optax.adafactor(schedule, clipping_threshold=None,
                             weight_decay_rate=o.weight_decay or None, weight_decay_mask=mask)
    elif o.name == "sgd":
        tx = optax.chain(optax.add_decayed_weights(o.weight_decay, mask=mask),
                         optax.sgd(schedule, momentum=o.b1))
    else:
        raise ValueError(f"unknown optimizer.name {o.name!r}; allowed: {', '.join(OPTIMIZERS)}")
    if o.clip_norm:
        tx = optax.chain(optax.clip_by_global_norm(o.clip_norm), tx)
    return tx, schedule
