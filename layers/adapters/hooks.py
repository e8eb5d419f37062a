"""Activation-space adapters: one hook on every weight projection of routezoo layers.

Einsum letters: ``B`` batch (examples), ``L`` tokens of one example (or any
leading axes after the batch), ``I`` a weight's flattened input axes, ``O`` its
flattened output axes.

Parameter-space adapters (LoRA, MoS, Hydra, RPS) change the weights and leave the model
alone (:mod:`routezoo.layers.adapters`). Methods whose update depends on the example or
the token cannot: Poly/MHR mix an adapter per example from its task id, many-adapter
batches give each example its own LoRA, PHATGOOSE/GLIDER route each token among a library
of LoRA experts. They act on activations instead: every projection in routezoo's layers
(attention ``q``/``k``/``v``/``o``, MLP ``wi``/``wg``/``wo``, shared-expert MLPs, the
latent-attention projections) is computed by :func:`project`, which adds what an active
adapter contributes for that weight::

    y = einsum(equation, x, W)                 # the base projection, as before
    y = y + delta(path, x [B, L, I], y [B, L, O])   # only inside `bind(...)`

where ``path`` is the weight's parameter path (``layer0/attn/q``), the same path the
adapter's ``targets`` pattern selected it by. No model code names an adapter; a model
built from routezoo layers gets the hook without being edited.

Usage (inference; the training loop does the same inside its jitted step)::

    with adapter_hooks.bind(adapter, base_params, adapter_params, task_ids=ids):
        logits, aux = model.apply({"params": base_params}, tokens)

:func:`bind` makes the hook active for the Python code inside it (a context variable,
as ``nn.logical_axis_rules`` is a context); call it inside the function you ``jax.jit``
so the hook is traced with the model. On leaving the block it checks that every target
was reached: a weight the pattern selects but no :func:`project` call computes (a stacked
expert matrix run by the grouped matmul, an embedding) is an error, never a silent no-op.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
import zlib
from typing import Any, Iterator

import jax
import jax.numpy as jnp
from flax import linen as nn

_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("routezoo_adapter_hook", default=None)


def project(module: nn.Module, name: str, equation: str, x: jax.Array, w: jax.Array,
            num_in: int = 1) -> jax.Array:
    """``jnp.einsum(equation, x, w)`` for the weight ``name`` of ``module``, plus the
    active activation-space adapter's term for it (none outside :func:`bind`).

    ``x`` ends with the ``num_in`` axes the equation contracts with ``w``'s first
    ``num_in`` axes; the output ends with ``w``'s remaining axes; the leading axes are
    the same in both and start with the batch.
    """
    y = jnp.einsum(equation, x, w)
    hook = _ACTIVE.get()
    if hook is None:
        return y
    return hook("/".join((*module.path, name)), x, y, num_in)


@dataclasses.dataclass
class HookContext:
    """What a method's ``hook_delta`` sees besides one weight's activations.

    ``task_ids`` int32 ``[B]`` (per example) or None; ``rng`` a key or None
    (deterministic); ``params`` the adapter's parameters, flat by ``/``-joined path;
    ``base`` the base parameters, flat (unboxed) by path; ``cache`` what a method
    computes once per :func:`bind` for all its targets (e.g. MoS's gathered factors).
    """

    task_ids: jax.Array | None
    rng: jax.Array | None
    deterministic: bool
    params: dict[str, Any]
    base: dict[str, Any]
    cache: dict[str, Any] = dataclasses.field(default_factory=dict)   # a method's per-bind values

    def rng_for(self, path: str) -> jax.Array | None:
        return None if self.rng is None else jax.random.fold_in(self.rng, zlib.crc32(path.encode()) & 0x7FFFFFFF)


class _Binding:
    def __init__(self, adapter, targets: dict[str, Any], ctx: HookContext):
        self.adapter, self.targets, self.ctx = adapter, targets, ctx
        self.visited: set[str] = set()

    def __call__(self, path: str, x: jax.Array, y: jax.Array, num_in: int) -> jax.Array:
        if path not in self.targets:
            return y
        self.visited.add(path)
        lead = x.shape[:x.ndim - num_in]
        b = self.ctx.task_ids.shape[0] if self.ctx.task_ids is not None else lead[0]
        tokens = math.prod(lead)
        if tokens % b:
            raise ValueError(f"adapter hook at {path}: {tokens} tokens do not split into {b} examples")
        x3 = x.reshape(b, tokens // b, -1)
        y3 = y.reshape(b, tokens // b, -1)
        delta = self.adapter.hook_delta(path, x3, y3, self.ctx)
        return y + delta.reshape(y.shape).astype(y.dtype)


def is_activation_adapter(adapter: Any) -> bool:
    """Whether ``adapter`` (an :class:`~routezoo.layers.adapters.base.Adapter` or ``None``)
    runs on activations, so that :func:`bind` must wrap the forward pass."""
    return adapter is not None and adapter.acts_on_activations


@contextlib.contextmanager
def bind(adapter: Any, base: Any, adapter_params: Any, *, task_ids: jax.Array | None = None,
         rng: jax.Array | None = None, deterministic: bool = True) -> Iterator[None]:
    """Activates ``adapter`` (with ``adapter_params``, over ``base``) on every
    :func:`project` call inside the block; a no-op for parameter-space adapters and None.

    ``task_ids`` int32 ``[B]``: the task (or adapter) of each example, for methods that
    need one (``adapter.needs_task_ids``); ``rng``: randomness of training-time routing
    (used only when ``deterministic`` is False).
    """
    if not is_activation_adapter(adapter):
        yield
        return
    from routezoo.layers.adapters.base import flat_params  # adapters imports this module
    if adapter.needs_task_ids and task_ids is None:
        raise ValueError(f"adapter.method={adapter.name!r} needs a task id per example (batch 'task_id', "
                         "data.tasks); none was given")
    flat_base = flat_params(nn.unbox(base))
    ctx = HookContext(task_ids=None if task_ids is None else jnp.asarray(task_ids, jnp.int32),
                      rng=None if deterministic else rng, deterministic=deterministic,
                      params=flat_params(nn.unbox(adapter_params)), base=flat_base)
    binding = _Binding(adapter, adapter.hook_targets(base, adapter_params), ctx)
    token = _ACTIVE.set(binding)
    try:
        yield
    finally:
        _ACTIVE.reset(token)
    missed = sorted(set(binding.targets) - binding.visited)
    if binding.visited and missed:   # nothing visited: the block ran no model (or a cached jit)
        raise ValueError(f"adapter.method={adapter.name!r}: targets {', '.join(missed)} are not computed "
                         "through routezoo.layers.adapters.hooks.project (stacked experts and embeddings "
                         "are not); choose targets among attention and MLP projections")


__all__ = ["HookContext", "bind", "is_activation_adapter", "project"]
