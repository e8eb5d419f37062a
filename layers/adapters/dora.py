"""DoRA (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation", arXiv 2402.09353).

Einsum letters: ``B`` batch, ``L`` length (tokens of one example), ``I`` a weight's
flattened input axes, ``O`` its flattened output axes, ``E`` experts, ``R`` rank.

A weight splits into a magnitude and a direction; LoRA adapts the direction, the magnitude
trains on its own::

    V  = W0 + s·A·B                    # W0 [I, O] frozen, A [I, R], B [R, O]: LoRA's update
    W' = m · V / ||V||_c               # m [O], ||V||_c [O]

``||V||_c`` is the Euclidean norm of each output unit's column of ``V``: the norm over the
input axes ``I``, one value per output unit ``O``. In routezoo's ``x·W`` layout a weight is
``[I.., O..]`` and the norm reduces its input axes (for ``q [D, H, K]`` over ``D``, one
norm per ``(h, k)``; for ``o [H, K, D]`` over ``H, K``, one per ``d``). This is the paper's
column norm and peft's ``weight.norm(dim=1)`` of a torch ``[out, in]`` weight.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from routezoo.layers.adapters.base import (Adapter, Target, _nest, _unbox, adapted_paths, flat_params,
                                           from_previous, register, select_targets)
from routezoo.layers.adapters.lora import (LoRA, _check_dropout, _factor_targets, _no_experts_for_dropout,
                                           _target_from_factors, lora_delta, low_rank_dropout_delta)

Params = Any

MAGNITUDE = "lora_magnitude"   # the magnitude's leaf name; peft's lora_magnitude_vector is its reshape(-1)
NORM_FLOOR = 1e-12             # a column of zeros has norm 0: the quotient m / norm uses at least this


def concrete_weight(method: str, path: str, leaf: Any) -> jax.Array:
    """The base weight's values (unboxed), refusing shape-only leaves: methods whose
    initialisation reads the base (DoRA's norms, PiSSA's SVD) need real or traced arrays."""
    value = _unbox(leaf)
    if isinstance(value, jax.ShapeDtypeStruct):
        raise ValueError(f"adapter.method={method!r} initialises from the base weights' values, but {path} is "
                         "only a shape (jax.ShapeDtypeStruct); pass the base arrays (inside jax.eval_shape, "
                         "as an argument of the traced function)")
    return jnp.asarray(value)


def column_norm(t: Target, v: jax.Array, floor: float = 0.0) -> jax.Array:
    """``||v||_c``: for ``v [E?, I.., O..]`` the float32 norm over the input axes,
    ``[E?, O..]`` (one value per output unit, per expert), at least ``floor`` (a floor
    above 0 also keeps the gradient of an all-zero column finite)."""
    e = (t.num_experts,) if t.experts else ()
    v = v.astype(jnp.float32).reshape(*e, t.d_in, t.d_out)
    return jnp.sqrt(jnp.maximum(jnp.sum(v * v, axis=-2), floor * floor)).reshape(*e, *t.out_shape)


def _per_column(t: Target, g: jax.Array) -> jax.Array:
    """``g [E?, O..]`` shaped to broadcast against a weight ``[E?, I.., O..]``."""
    e = (t.num_experts,) if t.experts else ()
    return g.reshape(*e, *(1,) * t.num_in, *t.out_shape)


@register
@dataclasses.dataclass(frozen=True)
class DoRA(Adapter):
    """DoRA: ``W' = m · (W0 + s·A·B) / ||W0 + s·A·B||_c`` (module docstring for the norm's axis).

    Parameters per target: ``lora_a [E?, I.., R]`` and ``lora_b [E?, R, O..]`` exactly as
    :class:`~routezoo.layers.adapters.lora.LoRA` (``A`` U(±1/√I), ``B = 0``), and the
    magnitude ``lora_magnitude [E?, O..]``, one value per output unit with the weight's
    output axes and logical names; ``lora_magnitude.reshape(-1)`` (per expert) is peft's
    ``lora_magnitude_vector``. At init ``m = ||W0||_c``, so with ``B = 0`` the adapted
    weight is ``W0`` (exactly: ``m / ||W0||_c = 1``).

    ``s = alpha / rank``, or ``alpha / sqrt(rank)`` with ``rslora``: the same keys and scale
    as LoRA. ``detach_norm`` (``adapter.dora_detach_norm``, default on) treats ``||V||_c`` as
    a constant in backpropagation (the paper's section 4.3, also peft's behaviour): the
    forward pass is the same, the gradient skips the norm's derivative and training needs
    less memory. Off, the gradient is the exact derivative of ``W'``.

    ``dropout`` (``adapter.lora_dropout``) drops the low-rank branch's input in training,
    ``y = g ⊙ (x·W0 + s·dropout(x)·A·B)`` with ``g = m / ||V||_c``; that runs on activations
    through :mod:`routezoo.layers.adapters.hooks` (not on stacked experts, which no hook
    reaches) and equals ``x·W'`` when dropout is off. Merged for inference (:meth:`merge`)
    there is no adapter code left. Parameters per target: ``rank·(I + O) + O`` (times ``E``).
    """

    targets: str
    rank: int = 8
    alpha: float = 16.0
    rslora: bool = False
    dropout: float = 0.0
    detach_norm: bool = True

    name = "dora"
    mergeable = True
    init_reads_base = True

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"adapter.rank={self.rank} must be >= 1 for adapter.method={self.name!r}")
        _check_dropout(self.name, self.dropout)

    @classmethod
    def from_config(cls, cfg: Any) -> "DoRA":
        return cls(targets=str(cfg.targets), rank=int(cfg.rank), alpha=float(cfg.alpha), rslora=bool(cfg.rslora),
                   dropout=float(cfg.get("lora_dropout", 0.0)), detach_norm=bool(cfg.get("dora_detach_norm", True)))

    @property
    def _lora(self) -> LoRA:
        return LoRA(self.targets, rank=self.rank, alpha=self.alpha, rslora=self.rslora, dropout=self.dropout)

    @property
    def scale(self) -> float:
        return self._lora.scale

    def select(self, params: Params) -> dict[str, Target]:
        chosen = select_targets(params, self.targets)
        if self.dropout > 0:   # the activation path: no hook reaches stacked experts
            _no_experts_for_dropout(self.name, chosen)
        return chosen

    # ------------------------------------------------------------------ parameters

    def init(self, rng: jax.Array, params: Params, previous: Params | None = None) -> Params:
        """``{path: {'lora_a', 'lora_b', 'lora_magnitude'}}`` (boxed) for the base ``params``
        (boxed, with values: the magnitude is the base's column norm); ``previous``
        (``init.adapter_from``) continues a trained DoRA of the same shapes."""
        targets = self.select(params)
        out = flat_params(self._lora.init(rng, params))
        flat = flat_params(params)
        for path, t in sorted(targets.items()):
            lead = ("expert",) if t.experts else ()
            names = t.names[t.experts:] if t.names else (None,) * (len(t.shape) - t.experts)
            norm = column_norm(t, concrete_weight(self.name, path, flat[path]))
            out[f"{path}/{MAGNITUDE}"] = nn.LogicallyPartitioned(norm, lead + tuple(names[t.num_in:]))
        return from_previous(_nest(out), previous, self.name)

    def weight(self, t: Target, w: jax.Array, a: jax.Array, b: jax.Array, m: jax.Array) -> jax.Array:
        """``W' = m · V / ||V||_c`` with ``V = W0 + s·A·B``, float32, shaped as ``w``."""
        v = w.astype(jnp.float32) + self.scale * lora_delta(t, a, b)
        return v * _per_column(t, self._gain(t, v, m))

    def _gain(self, t: Target, v: jax.Array, m: jax.Array) -> jax.Array:
        """``g = m / ||V||_c`` ``[E?, O..]`` (the norm a constant in backprop with ``detach_norm``)."""
        norm = column_norm(t, v, NORM_FLOOR)
        if self.detach_norm:
            norm = jax.lax.stop_gradient(norm)
        return m.astype(jnp.float32) / norm

    def merge(self, base: Params, adapter: Params) -> Params:
        """Base parameters with every target replaced by ``W'`` (unboxed arrays, the base's dtypes)."""
        flat = flat_params(nn.unbox(base))
        ad = flat_params(nn.unbox(adapter))
        for path in adapted_paths(flat, ad):
            w, a, b = flat[path], ad[f"{path}/lora_a"], ad[f"{path}/lora_b"]
            t = _target_from_factors(path, w.shape, a.shape, b.shape)
            flat[path] = self.weight(t, w, a, b, ad[f"{path}/{MAGNITUDE}"]).astype(w.dtype)
        return _nest(flat)

    def count(self, params: Params) -> int:
        """Adapter parameters: ``Σ E·(rank·(I + O) + O)`` over targets (LoRA's plus one magnitude per output)."""
        return sum(t.num_experts * (self.rank * (t.d_in + t.d_out) + t.d_out) for t in self.select(params).values())

    # ------------------------------------------------------------------ dropout (activation path)

    @property
    def hook_delta(self):
        return self._dropout_delta if self.dropout > 0 else None

    def hook_targets(self, base: Params, adapter: Params) -> dict[str, Target]:
        return _factor_targets(base, adapter, "lora_a", "lora_b")

    def _dropout_delta(self, path: str, x: jax.Array, y: jax.Array, ctx) -> jax.Array:
        """``(g - 1)·y + g·s·(dropout(x)·A)·B`` for ``x [B, L, I]``, ``y = x·W0`` ``[B, L, O]``:
        added to ``y`` it gives ``g ⊙ (x·W0 + s·dropout(x)·A·B)``."""
        w, a, b = ctx.base[path], ctx.params[f"{path}/lora_a"], ctx.params[f"{path}/lora_b"]
        t = _target_from_factors(path, w.shape, a.shape, b.shape)
        v = w.astype(jnp.float32) + self.scale * lora_delta(t, a, b)
        g = self._gain(t, v, ctx.params[f"{path}/{MAGNITUDE}"]).reshape(t.d_out)
        low = low_rank_dropout_delta(x, a.reshape(t.d_in, self.rank), b.reshape(self.rank, t.d_out), self.scale,
                                     self.dropout, ctx, path)
        return (g - 1.0) * y.astype(jnp.float32) + g * low


__all__ = ["DoRA", "MAGNITUDE", "NORM_FLOOR", "column_norm", "concrete_weight"]
