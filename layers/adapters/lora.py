"""LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") and the
low-rank helpers other methods share.

Einsum letters: ``I`` a weight's flattened input axes, ``O`` its output axes, ``E`` experts, ``R`` rank.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from routezoo.layers.sharding import param as logical_param
from routezoo.layers.adapters.base import Adapter, _nest, Target, adapted_paths, flat_params, from_previous, select_targets
from routezoo.layers.adapters.base import register

Params = Any


# --------------------------------------------------------------------------- LoRA

def _check_dropout(method: str, p: float) -> None:
    if not 0.0 <= p < 1.0:
        raise ValueError(f"adapter.lora_dropout={p} of adapter.method={method!r} must be in [0, 1)")


def _no_experts_for_dropout(method: str, targets: dict[str, Target]) -> None:
    bad = sorted(p for p, t in targets.items() if t.experts)
    if bad:
        raise ValueError(f"adapter.lora_dropout > 0 runs adapter.method={method!r} on activations, which stacked "
                         f"experts ({bad[0]}) do not pass through; use lora_dropout=0 or non-expert targets")


def low_rank_dropout_delta(x: jax.Array, a: jax.Array, b: jax.Array, scale: float, p: float, ctx, path: str):
    """``scale · (dropout(x) A) B`` for ``x [B, L, I]``, ``A [I, R]``, ``B [R, O]``
    (inverted dropout with rate ``p``; none when the context is deterministic)."""
    x = x.astype(jnp.float32)
    key = ctx.rng_for(path)
    if key is not None and p > 0:
        keep = jax.random.bernoulli(key, 1.0 - p, x.shape)
        x = jnp.where(keep, x / (1.0 - p), 0.0)
    low = jnp.einsum("BLI,IR->BLR", x, a.astype(jnp.float32))
    return scale * jnp.einsum("BLR,RO->BLO", low, b.astype(jnp.float32))


def _target_from_factors(path: str, w_shape: tuple, a_shape: tuple, b_shape: tuple) -> Target:
    # A [E?, I.., R], B [E?, R, O..], W [E?, I.., O..]: the split follows from the ranks.
    experts = len(a_shape) + len(b_shape) - len(w_shape) - 2
    return Target(path, tuple(w_shape), None, experts, len(a_shape) - 1 - experts)


def _factor_targets(base: Params, adapter: Params, a_key: str, b_key: str) -> dict[str, Target]:
    """Targets of an adapter with low-rank factors ``<path>/<a_key>``, ``<path>/<b_key>``."""
    flat, ad = flat_params(nn.unbox(base)), flat_params(nn.unbox(adapter))
    return {p: _target_from_factors(p, flat[p].shape, ad[f"{p}/{a_key}"].shape, ad[f"{p}/{b_key}"].shape)
            for p in adapted_paths(flat, ad)}


def lora_delta(t: Target, a: jax.Array, b: jax.Array) -> jax.Array:
    """``A @ B`` reshaped to the base weight's shape, in float32 (``[E?, I.., O..]``)."""
    e = (t.num_experts,) if t.experts else ()
    a = a.astype(jnp.float32).reshape(*e, t.d_in, a.shape[-1])
    b = b.astype(jnp.float32).reshape(*e, b.shape[len(e)], t.d_out)
    return jnp.matmul(a, b).reshape(t.shape)


def lora_dense(x: jax.Array, w: jax.Array, a: jax.Array, b: jax.Array, scale: float,
               num_in: int = 1) -> jax.Array:
    """The unmerged LoRA product ``x·W + scale·(x·A)·B`` without forming ``A·B``.

    ``x [..., I..]`` contracts its last ``num_in`` axes with the first ``num_in`` axes of
    ``w [I.., O..]`` and ``a [I.., R]``; ``b [R, O..]``. Equal (up to rounding) to
    ``x · (W + scale·A·B)``, the merged product.
    """
    base = jnp.tensordot(x, w, axes=num_in)
    low = jnp.tensordot(jnp.tensordot(x, a, axes=num_in), b, axes=1)
    return base + scale * low


@register
@dataclasses.dataclass(frozen=True)
class LoRA(Adapter):
    """LoRA (Hu et al., 2021): ``W = W0 + s·A·B``, ``A [I, R]``, ``B [R, O]``, B = 0 at init.

    ``s = alpha / rank``, or ``alpha / sqrt(rank)`` with ``rslora`` (Kalajdzievski, 2023).
    ``A`` is drawn U(±1/√I), kaiming-uniform with a=√5 as microsoft/LoRA and peft do.
    Parameters per adapted matrix: ``rank·(I + O)`` (times ``E`` for stacked experts).
    """

    targets: str
    rank: int = 8
    alpha: float = 16.0
    rslora: bool = False
    dropout: float = 0.0

    name = "lora"
    mergeable = True

    def __post_init__(self):
        _check_dropout(self.name, self.dropout)

    @classmethod
    def from_config(cls, cfg: Any) -> "LoRA":
        return cls(targets=str(cfg.targets), rank=int(cfg.rank), alpha=float(cfg.alpha), rslora=bool(cfg.rslora),
                   dropout=float(cfg.get("lora_dropout", 0.0)))

    # With dropout (``y = xW + s·dropout(x)·A·B``, as peft applies it) LoRA cannot run merged in
    # training: it runs on activations through adapter_hooks (merged for inference, where
    # dropout is off, it is the same function).
    @property
    def hook_delta(self):
        return self._dropout_delta if self.dropout > 0 else None

    def hook_targets(self, base: Params, adapter: Params) -> dict[str, Target]:
        return _factor_targets(base, adapter, "lora_a", "lora_b")

    def _dropout_delta(self, path: str, x: jax.Array, y: jax.Array, ctx) -> jax.Array:
        a, b = ctx.params[f"{path}/lora_a"], ctx.params[f"{path}/lora_b"]
        return low_rank_dropout_delta(x, a.reshape(-1, self.rank), b.reshape(self.rank, -1), self.scale,
                                      self.dropout, ctx, path)

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    def select(self, params: Params) -> dict[str, Target]:
        chosen = select_targets(params, self.targets)
        if self.dropout > 0:
            _no_experts_for_dropout(self.name, chosen)
        return chosen

    def init(self, rng: jax.Array, params: Params, previous: Params | None = None) -> Params:
        """Adapter parameters for the base ``params`` (boxed in, boxed out); ``previous``
        (``init.adapter_from``) continues a trained LoRA of the same shapes."""
        out = {}
        for i, (path, t) in enumerate(sorted(self.select(params).items())):
            e = (t.num_experts,) if t.experts else ()
            lead = ("expert",) if t.experts else ()
            names = t.names[t.experts:] if t.names else (None,) * (len(t.shape) - t.experts)
            in_names, out_names = names[:t.num_in], names[t.num_in:]
            bound = 1.0 / math.sqrt(t.d_in)
            init_a = lambda key, shape, dtype, bound=bound: jax.random.uniform(
                key, shape, dtype, -bound, bound)
            a = logical_param(init_a, lead + tuple(in_names) + ("rank",))(
                jax.random.fold_in(rng, i), (*e, *t.in_shape, self.rank), jnp.float32)
            b = logical_param(nn.initializers.zeros, lead + ("rank",) + tuple(out_names))(
                rng, (*e, self.rank, *t.out_shape), jnp.float32)
            out[f"{path}/lora_a"], out[f"{path}/lora_b"] = a, b
        return from_previous(_nest(out), previous, self.name)

    def merge(self, base: Params, adapter: Params) -> Params:
        """Base parameters with ``s·A·B`` added to every target (unboxed arrays)."""
        flat = flat_params(nn.unbox(base))
        ad = flat_params(nn.unbox(adapter))
        for path in adapted_paths(flat, ad):
            w, a, b = flat[path], ad[f"{path}/lora_a"], ad[f"{path}/lora_b"]
            t = _target_from_factors(path, w.shape, a.shape, b.shape)
            flat[path] = (w.astype(jnp.float32) + self.scale * lora_delta(t, a, b)).astype(w.dtype)
        return _nest(flat)

    def count(self, params: Params) -> int:
        """Adapter parameters: ``Σ E·rank·(I + O)`` over targets (Hu et al. 2021)."""
        return sum(t.num_experts * self.rank * (t.d_in + t.d_out) for t in self.select(params).values())
