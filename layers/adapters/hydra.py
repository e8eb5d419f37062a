"""Hydra: a parallel LoRA branch plus a sequential low-rank branch on the base output.

Einsum letters: ``B`` batch, ``L`` length (tokens of one example), ``I`` input axes,
``O`` output axes, ``R`` rank (parallel branch), ``l`` rank of the sequential branch.
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
from routezoo.layers.adapters.lora import _check_dropout, _factor_targets, _no_experts_for_dropout, lora_delta
from routezoo.layers.adapters.mos import _init_a
from routezoo.layers.adapters.base import register

Params = Any


# --------------------------------------------------------------------------- Hydra

@register
@dataclasses.dataclass(frozen=True)
class Hydra(Adapter):
    """Hydra (Kim et al., 2023, "Hydra: Multi-head Low-rank Adaptation for Parameter
    Efficient Fine-tuning", arXiv 2309.06922): a parallel LoRA branch on
    the layer input plus a sequential low-rank branch on the pretrained output::

        h0 = x·W + b                                   # W [I, O], b [O] if the base has one
        y  = h0 + s·(x·A_p)·B_p + s·(h0·A_s)·B_s       # A_p [I, R], B_p [R, O], A_s [O, l], B_s [l, O]
        W' = W + s·(A_p·B_p + W·A_s·B_s),   b' = b + s·b·A_s·B_s      (merge, exact)

    ``R`` = ``rank`` (r_p), ``l`` = ``seq_rank`` (r_s), ``s`` = ``scale`` (a plain factor, as
    the authors' code: 0.1 ViT CIFAR, 1 RoBERTa GLUE). The sequential branch sees the
    output including the bias (card's pitfall): a sibling ``<name>_bias`` of the target's
    output shape (e.g. ``attn/q_bias``) is merged as above. ``dropout`` (config
    ``adapter.lora_dropout``; the authors' ViT setting is 0.2) drops each branch's
    low-rank activations, ``s·dropout(x·A_p)·B_p + s·dropout(h0·A_s)·B_s``; it is
    not mergeable, so in training the branches then run on activations through
    :mod:`routezoo.layers.adapters.hooks` (merged for inference, the same function). The
    branches' own biases of the ViT code are not implemented.
    Implemented from the card's equations, not the released NLU code (typos there; its
    attention merge reuses ``mlp.fc2``). Init as the NLU code: ``A`` U(±1/√fan_in)
    (kaiming a=√5), ``B`` = 0, so the adapted model starts equal to the base.
    Parameters per adapted matrix: ``r_p·(I + O) + 2·r_s·O`` (times ``E`` for experts).
    """

    targets: str
    rank: int = 4          # r_p
    seq_rank: int = 8      # r_s
    scale: float = 1.0     # s
    dropout: float = 0.0   # on both branches' low-rank activations (training only)

    name = "hydra"
    mergeable = True

    @classmethod
    def from_config(cls, cfg: Any) -> "Hydra":
        return cls(targets=str(cfg.targets), rank=int(cfg.rank), seq_rank=int(cfg.hydra_seq_rank),
                   scale=float(cfg.hydra_scale), dropout=float(cfg.get("lora_dropout", 0.0)))

    def __post_init__(self):
        if self.seq_rank < 1:
            raise ValueError(f"adapter.hydra_seq_rank={self.seq_rank} must be >= 1")
        _check_dropout(self.name, self.dropout)

    def select(self, params: Params) -> dict[str, Target]:
        chosen = select_targets(params, self.targets)
        if self.dropout > 0:
            _no_experts_for_dropout(self.name, chosen)
        return chosen

    @property
    def hook_delta(self):   # with dropout: on activations, as LoRA
        return self._dropout_delta if self.dropout > 0 else None

    def hook_targets(self, base: Params, adapter: Params) -> dict[str, Target]:
        return _factor_targets(base, adapter, "par_a", "par_b")

    def _dropout_delta(self, path: str, x: jax.Array, y: jax.Array, ctx) -> jax.Array:
        """``s·dropout(x·A_p)·B_p + s·dropout(h0·A_s)·B_s`` for ``x [B, L, I]``, ``y = x·W``
        ``[B, L, O]``; ``h0 = y + b`` with the base's ``<path>_bias`` where it has one."""
        p = ctx.params
        pa, pb = p[f"{path}/par_a"].reshape(-1, self.rank), p[f"{path}/par_b"].reshape(self.rank, -1)
        sa, sb = p[f"{path}/seq_a"].reshape(-1, self.seq_rank), p[f"{path}/seq_b"].reshape(self.seq_rank, -1)
        h0 = y.astype(jnp.float32)
        bias = ctx.base.get(f"{path}_bias")
        if bias is not None and bias.size == h0.shape[-1]:
            h0 = h0 + bias.astype(jnp.float32).reshape(-1)
        key = ctx.rng_for(path)
        lows = []
        for i, (v, a) in enumerate(((x.astype(jnp.float32), pa), (h0, sa))):
            low = jnp.einsum("BLI,IR->BLR", v, a.astype(jnp.float32))
            if key is not None:
                keep = jax.random.bernoulli(jax.random.fold_in(key, i), 1.0 - self.dropout, low.shape)
                low = jnp.where(keep, low / (1.0 - self.dropout), 0.0)
            lows.append(low)
        return self.scale * (jnp.einsum("BLR,RO->BLO", lows[0], pb.astype(jnp.float32))
                             + jnp.einsum("BLR,RO->BLO", lows[1], sb.astype(jnp.float32)))

    def init(self, rng: jax.Array, params: Params, previous: Params | None = None) -> Params:
        """``{path: {'par_a' [E?, I.., R], 'par_b' [E?, R, O..], 'seq_a' [E?, O.., l],
        'seq_b' [E?, l, O..]}}`` (boxed)."""
        out = {}
        for i, (path, t) in enumerate(sorted(self.select(params).items())):
            e = (t.num_experts,) if t.experts else ()
            lead = ("expert",) if t.experts else ()
            names = t.names[t.experts:] if t.names else (None,) * (len(t.shape) - t.experts)
            in_names, out_names = tuple(names[:t.num_in]), tuple(names[t.num_in:])
            key = jax.random.fold_in(rng, i)
            for kind, fan_in, inn, r in (("par", t.d_in, (in_names, t.in_shape), self.rank),
                                         ("seq", t.d_out, (out_names, t.out_shape), self.seq_rank)):
                out[f"{path}/{kind}_a"] = logical_param(_init_a(1.0 / math.sqrt(fan_in)), lead + inn[0] + ("rank",))(
                    jax.random.fold_in(key, kind == "seq"), (*e, *inn[1], r), jnp.float32)
                out[f"{path}/{kind}_b"] = logical_param(nn.initializers.zeros, lead + ("rank",) + out_names)(
                    rng, (*e, r, *t.out_shape), jnp.float32)
        return from_previous(_nest(out), previous, self.name)

    def merge(self, base: Params, adapter: Params) -> Params:
        """Base with ``W' = W + s(A_p B_p + W A_s B_s)`` (and ``b'``) for every target."""
        flat = flat_params(nn.unbox(base))
        ad = flat_params(nn.unbox(adapter))
        for path in adapted_paths(flat, ad):
            w, pa, pb, sa, sb = (flat[path], *(ad[f"{path}/{k}"] for k in ("par_a", "par_b", "seq_a", "seq_b")))
            experts = pa.ndim + pb.ndim - w.ndim - 2
            t = Target(path, tuple(w.shape), None, experts, pa.ndim - 1 - experts)
            e = (t.num_experts,) if experts else ()
            w32 = w.astype(jnp.float32)
            seq = jnp.matmul(sa.reshape(*e, t.d_out, self.seq_rank), sb.reshape(*e, self.seq_rank, t.d_out))  # [E?, O, O]
            w_seq = jnp.matmul(w32.reshape(*e, t.d_in, t.d_out), seq).reshape(t.shape)
            flat[path] = (w32 + self.scale * (lora_delta(t, pa, pb) + w_seq)).astype(w.dtype)
            bias = flat.get(f"{path}_bias")
            if bias is not None and not experts and tuple(bias.shape) == t.out_shape:
                b32 = bias.astype(jnp.float32)
                flat[f"{path}_bias"] = (b32 + self.scale * (b32.reshape(t.d_out) @ seq).reshape(bias.shape)
                                        ).astype(bias.dtype)
        return _nest(flat)

    def count(self, params: Params) -> int:
        """Adapter parameters: ``Σ E·(r_p·(I + O) + 2·r_s·O)`` over targets (the paper's count)."""
        return sum(t.num_experts * (self.rank * (t.d_in + t.d_out) + 2 * self.seq_rank * t.d_out)
                   for t in self.select(params).values())
