"""PiSSA (Meng et al. 2024, "PiSSA: Principal Singular Values and Singular Vectors Adaptation
of Large Language Models", arXiv 2404.02948).

Einsum letters: ``I`` a weight's flattened input axes, ``O`` its flattened output axes,
``E`` experts, ``R`` rank, ``k`` singular values (``min(I, O)``).

LoRA's structure with another starting point: the low-rank factors start as the weight's
principal part and the rest of the weight stays frozen. With the SVD ``W = U S Vᵀ`` of a
target ``W [I, O]`` (routezoo's ``x·W`` layout, which is the paper's ``X W``)::

    A = U[:, :R] · S[:R]^½          [I, R]
    B = S[:R]^½ · Vᵀ[:R, :]         [R, O]
    W_res = W - A·B                 [I, O]    frozen
    W' = W_res + A·B                          scale 1

so ``A·B`` is the best rank-``R`` approximation of ``W`` (Eckart-Young) and the adapted
model equals the base at init. ``A`` and ``B`` then train as LoRA's factors do, with scale
1 as in the paper (``adapter.alpha`` and rsLoRA are not used; in peft's terms the scale
``alpha / r`` is 1).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from routezoo.layers.adapters.base import (Adapter, Target, _nest, adapted_paths, flat_params, from_previous,
                                           register, select_targets)
from routezoo.layers.adapters.dora import concrete_weight
from routezoo.layers.adapters.lora import _target_from_factors, lora_delta

Params = Any

RESIDUAL = "pissa_residual"   # the frozen residual's leaf name, beside lora_a and lora_b


def principal_factors(t: Target, w: jax.Array, rank: int) -> tuple[jax.Array, jax.Array]:
    """``(A [E?, I, R], B [E?, R, O])`` from the top-``rank`` singular triplets of ``w``
    ``[E?, I.., O..]`` (float32, flattened axes): ``A = U_R S_R^½``, ``B = S_R^½ V_Rᵀ``."""
    e = (t.num_experts,) if t.experts else ()
    u, s, vt = jnp.linalg.svd(w.astype(jnp.float32).reshape(*e, t.d_in, t.d_out), full_matrices=False)
    root = jnp.sqrt(s[..., :rank])
    return u[..., :rank] * root[..., None, :], root[..., :, None] * vt[..., :rank, :]


@register
@dataclasses.dataclass(frozen=True)
class PiSSA(Adapter):
    """PiSSA: ``W' = W_res + A·B``, ``A·B`` initialised to ``W``'s top-``rank`` SVD part (module docstring).

    Parameters per target (the adapter tree, beside the base):

    * ``lora_a [E?, I.., R]`` and ``lora_b [E?, R, O..]``: trained, LoRA's layouts;
    * ``pissa_residual``: ``W_res``, shaped and named as the base weight, float32, frozen
      (learning-rate group ``frozen`` at multiplier 0: no optimizer state, never updated,
      and no gradient, :meth:`merge` stops it).

    The residual is adapter-owned: it lives in the run's state, its train checkpoint and
    ``WORKDIR/adapter/``, so an adapter directory restores the adapted model from the
    unchanged base. The source base is never modified: :meth:`merge` reads the residual
    instead of the base weight, whose values it ignores. Stacked experts get one SVD per
    expert. Trainable parameters per target: ``rank·(I + O)`` (times ``E``), as LoRA; the
    residual adds ``I·O`` stored values.

    ``rank`` must not exceed ``min(I, O)`` of any target. No dropout: the model runs on the
    merged weights, and a dropout on the low-rank input would need the residual on the
    activation path.
    """

    targets: str
    rank: int = 8

    name = "pissa"
    mergeable = True
    init_reads_base = True
    LR_GROUPS = {"adapter": 1.0, "frozen": 0.0}

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"adapter.rank={self.rank} must be >= 1 for adapter.method={self.name!r}")

    @classmethod
    def from_config(cls, cfg: Any) -> "PiSSA":
        if bool(cfg.get("rslora", False)):
            raise ValueError("adapter.rslora=True is not used by adapter.method='pissa' (its scale is 1, as in the "
                             "paper); allowed: adapter.rslora=False")
        dropout = float(cfg.get("lora_dropout", 0.0))
        if dropout:
            raise ValueError(f"adapter.lora_dropout={dropout} is not supported by adapter.method='pissa' (it runs "
                             "on merged weights); allowed: 0")
        return cls(targets=str(cfg.targets), rank=int(cfg.rank))

    def select(self, params: Params) -> dict[str, Target]:
        chosen = select_targets(params, self.targets)
        for path, t in sorted(chosen.items()):
            if self.rank > min(t.d_in, t.d_out):
                allowed = min(min(u.d_in, u.d_out) for u in chosen.values())
                raise ValueError(f"adapter.rank={self.rank} exceeds min(d_in, d_out)={min(t.d_in, t.d_out)} of {path} "
                                 f"({t.d_in} x {t.d_out}); adapter.method='pissa' takes each target's top-rank "
                                 f"singular vectors: allowed 1..{allowed} for these targets")
        return chosen

    def param_groups(self, params: Params) -> Params:
        return jax.tree_util.tree_map_with_path(
            lambda path, _: "frozen" if getattr(path[-1], "key", None) == RESIDUAL else "adapter", params)

    def init(self, rng: jax.Array, params: Params, previous: Params | None = None) -> Params:
        """``{path: {'lora_a', 'lora_b', 'pissa_residual'}}`` (boxed) from the SVD of each
        target of the base ``params`` (boxed, with values); ``previous``
        (``init.adapter_from``) continues a trained PiSSA, residual included. ``rng`` is
        not used: the initialisation is a function of the base."""
        del rng
        flat = flat_params(params)
        out = {}
        for path, t in sorted(self.select(params).items()):
            e = (t.num_experts,) if t.experts else ()
            lead = ("expert",) if t.experts else ()
            names = t.names[t.experts:] if t.names else (None,) * (len(t.shape) - t.experts)
            w = concrete_weight(self.name, path, flat[path]).astype(jnp.float32)
            a, b = principal_factors(t, w, self.rank)
            residual = w - jnp.matmul(a, b).reshape(t.shape)
            out[f"{path}/lora_a"] = nn.LogicallyPartitioned(a.reshape(*e, *t.in_shape, self.rank),
                                                            lead + tuple(names[:t.num_in]) + ("rank",))
            out[f"{path}/lora_b"] = nn.LogicallyPartitioned(b.reshape(*e, self.rank, *t.out_shape),
                                                            lead + ("rank",) + tuple(names[t.num_in:]))
            out[f"{path}/{RESIDUAL}"] = nn.LogicallyPartitioned(residual, lead + tuple(names))
        return from_previous(_nest(out), previous, self.name)

    def merge(self, base: Params, adapter: Params) -> Params:
        """Base parameters with every target replaced by ``W_res + A·B`` (unboxed arrays,
        the base's dtypes); the residual is a constant for differentiation."""
        flat = flat_params(nn.unbox(base))
        ad = flat_params(nn.unbox(adapter))
        for path in adapted_paths(flat, ad):
            w, a, b = flat[path], ad[f"{path}/lora_a"], ad[f"{path}/lora_b"]
            t = _target_from_factors(path, w.shape, a.shape, b.shape)
            residual = jax.lax.stop_gradient(ad[f"{path}/{RESIDUAL}"]).astype(jnp.float32)
            flat[path] = (residual + lora_delta(t, a, b)).astype(w.dtype)
        return _nest(flat)

    def count(self, params: Params) -> int:
        """Trainable parameters: ``Σ E·rank·(I + O)`` over targets (LoRA's; the frozen residual is not counted)."""
        return sum(t.num_experts * self.rank * (t.d_in + t.d_out) for t in self.select(params).values())


__all__ = ["PiSSA", "RESIDUAL", "principal_factors"]
