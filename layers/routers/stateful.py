"""Routers with state across layers or the whole model: RMoE (recurrent) and Read-ME (pre-gate).

Einsum letters: ``T`` tokens (``B·L``), ``B`` batch, ``L`` length, ``D`` embed, ``E``
experts, ``K`` experts per token, ``W`` recurrent router width, ``Z`` MoE layers of the
model, ``y`` pre-gate width, ``G`` routing groups, ``S`` group size.

Both routers need something that one MoE layer cannot hold, and both get it as an explicit
input (and output), never through module side channels. The model creates the shared
piece once (the router class's ``model_routing``, which returns a
:class:`~routezoo.layers.routers.base.ModelRouting`: :class:`RecurrentState`,
:class:`PreGateRouting`) and hands it to each MoE layer call as ``router_inputs``, a dict
of keyword arguments that :class:`~routezoo.layers.moe.block.MoE` passes on to its router:

==============  ============================================================================
``recurrent``   :class:`RecurrentRouter` (RMoE, Qiu et al. 2024). ``router_inputs =
                {'router_state': h [T, W], 'router_cell': cell}``: the incoming router state
                and the GRU cell (:class:`RecurrentRouterCell`) that all MoE layers share.
                The new state comes back as ``Routing.state`` and, from the MoE block, as
                ``aux['router_state']`` ``[T, W]``; the caller threads it to the next MoE
                layer (dense layers pass it unchanged). The first MoE layer gets zeros.
``pregate``     :class:`PreGateRouter` (Read-ME, Cai et al. 2024). ``router_inputs =
                {'pregate_logits': [T, E], 'routes': int32 [T, K] or None}``: this layer's
                logits from the model-level :class:`PreGate` network, which reads only the
                token ids, and optionally routes fixed beforehand (``None``: top-k of the
                logits, :func:`pregate_select`, the same function the model's ``routes``
                uses). The router has no parameters of its own.
==============  ============================================================================

:class:`routezoo.zoo.lm.DecoderLM` does all of this through ``model_routing`` for any
router; a model of your own does the same (see the classes' docstrings).
"""

from __future__ import annotations

from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import linen as nn

from routezoo.layers import sharding
from routezoo.layers.attention import Attention
from routezoo.layers.embed import Embed
from routezoo.layers.mlp import MLP
from routezoo.layers.norms import RMSNorm
from routezoo.layers.routers.base import ModelRouting, Router, Routing, check_k, load_balance_loss, routing_stats, top_k
from routezoo.layers.routers.base import _num_groups
from routezoo.layers.routers.base import register

Array = jax.Array

RECURRENT_CELLS = ("gru", "rnn")


def _topk_routing(logits: Array, k: int, num_experts: int, group_size: int | None, *,
                  renormalize: bool, load_balance_coef: float, z_loss_coef: float,
                  indices: Array | None = None) -> tuple[Array, Array, dict, dict]:
    """Top-k routing from float32 logits ``[T, E]`` with the usual losses and stats.

    ``indices`` ``[T, K]`` given: those experts are used (weights are their probabilities)
    instead of the top-k. Weights: raw probability for ``K = 1`` (Switch), renormalised
    over the ``K`` kept experts otherwise (``renormalize``)."""
    g, s = _num_groups(logits.shape[0], group_size)
    probs = jax.nn.softmax(logits, axis=-1)  # [T, E]
    if indices is None:
        _, indices = top_k(probs, k)  # [T, K]
    indices = indices.astype(jnp.int32)
    weights = jnp.take_along_axis(probs, indices, axis=-1)  # [T, K]
    if indices.shape[-1] > 1 and renormalize:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    expert_mask = jnp.max(jax.nn.one_hot(indices, num_experts, dtype=jnp.float32), axis=1)  # [T, E]
    lb = load_balance_loss(probs.reshape(g, s, num_experts), expert_mask.reshape(g, s, num_experts))
    z = jnp.mean(jnp.square(jax.nn.logsumexp(logits, axis=-1)))
    losses = {}
    if load_balance_coef > 0:
        losses["load_balance"] = load_balance_coef * lb
    if z_loss_coef > 0:
        losses["z_loss"] = z_loss_coef * z
    stats = {"load_balance_loss": lb, "z_loss": z, **routing_stats(indices, probs, num_experts)}
    return indices, weights.astype(jnp.float32), losses, stats


# ------------------------------------------------------------------ RMoE


def _scaled(init, factor: float):
    """The initialiser ``init`` times ``factor``."""
    def scaled(key, shape, dtype=jnp.float32):
        return factor * init(key, shape, dtype)
    return scaled


class RecurrentRouterCell(nn.Module):
    """The GRU cell that RMoE shares across all MoE layers: ``(x' [T, W], h [T, W]) -> h'``.

    ``cell='gru'`` (PyTorch's GRU equations, as the authors' ``CustomGRUCell``)::

        r = σ(x' W_ir + b_ir + h W_hr + b_hr)      z = σ(x' W_iz + b_iz + h W_hz + b_hz)
        n = tanh(x' W_in + b_in + r ⊙ (h W_hn + b_hn))      h' = (1 − z) ⊙ n + z ⊙ h

    ``cell='rnn'`` (the paper's ablation): ``h' = tanh(x' W_in + b_in + h W_hn + b_hn)``.
    Parameters ``wi`` ``[W, 3W]``, ``wh`` ``[W, 3W]`` (gates r, z, n side by side), ``bi``,
    ``bh`` ``[3W]``; float32, replicated, initialised as PyTorch does,
    ``U(−1/√W, 1/√W)`` (the authors' code leaves the init to an undefined Megatron hook).
    """

    features: int
    cell: str = "gru"

    @nn.compact
    def __call__(self, x: Array, h: Array) -> Array:
        if self.cell not in RECURRENT_CELLS:
            raise ValueError(f"unknown recurrent router cell {self.cell!r}; known: {list(RECURRENT_CELLS)}")
        r = self.features
        bound = r ** -0.5
        init = lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)
        gates = 3 if self.cell == "gru" else 1
        wi = self.param("wi", sharding.param(init, (None, None)), (x.shape[-1], gates * r), jnp.float32)
        wh = self.param("wh", sharding.param(init, (None, None)), (r, gates * r), jnp.float32)
        bi = self.param("bi", sharding.param(init, (None,)), (gates * r,), jnp.float32)
        bh = self.param("bh", sharding.param(init, (None,)), (gates * r,), jnp.float32)
        hp = jax.lax.Precision.HIGHEST
        gi = jnp.einsum("TW,WO->TO", x.astype(jnp.float32), wi, precision=hp) + bi  # [T, gates·W]
        gh = jnp.einsum("TW,WO->TO", h.astype(jnp.float32), wh, precision=hp) + bh
        if self.cell == "rnn":
            return jnp.tanh(gi + gh)
        i_r, i_z, i_n = jnp.split(gi, 3, axis=-1)
        h_r, h_z, h_n = jnp.split(gh, 3, axis=-1)
        reset = jax.nn.sigmoid(i_r + h_r)
        update = jax.nn.sigmoid(i_z + h_z)
        new = jnp.tanh(i_n + reset * h_n)
        return (1.0 - update) * new + update * h


@register("recurrent")
class RecurrentRouter(Router):
    """RMoE (Qiu et al. 2024, "Layerwise Recurrent Router for Mixture-of-Experts").

    Per MoE layer ``i`` (own parameters ``proj`` ``W1`` ``[D, W]`` and ``out`` ``W2``
    ``[W, E]``, both without bias) and one GRU cell shared by all layers::

        x'_i = x_i W1_i          h_i = GRU(x'_i, h_{i-1})          logits_i = h_i W2_i

    then top-``k`` of ``softmax(logits_i)`` with the kept weights renormalised (raw
    probability for ``k = 1``), Switch load balancing and ST-MoE z-loss as every router
    here. The recurrence runs over depth per token, not over time. ``h_0 = 0``; gradients
    flow through ``h`` across layers (nothing is detached).

    Call: ``router(x [T, D], deterministic=, group_size=, router_state=h [T, W] | None,
    router_cell=RecurrentRouterCell)``; returns a :class:`Routing` whose ``state`` is
    ``h_i`` ``[T, W]``. ``router_state=None`` means zeros (first MoE layer). The cell is an
    explicit input so that one copy is shared: the model creates it once.

    Where the paper and the authors' code (a Megatron port, ``qiuzh20/RMoE``) differ, this
    follows the paper: the state passes unchanged through dense layers (the code crashes
    there), every weight is initialised explicitly (``W1``: fan-in normal; ``W2``: Switch's
    router init, ``router_init_scale``; GRU: PyTorch's uniform) where the code leaves
    ``W1``/``W2`` as ``torch.empty``, and the load-balancing loss is the repository's
    per-layer Switch loss (minimum 1 for balanced top-1) rather than the HF-Mixtral copy
    over all layers concatenated (minimum ``k``). The paper has no z-loss; it is added
    only when ``moe.z_loss_coef > 0``. Jitter, if set, multiplies ``x`` as elsewhere.

    The authors' settings (``configuration_llama_moe_rnn.py``): state width ``W = 256``
    (``moe.recurrent_dim``), ``E = 8``, ``k = 2``, balance coefficient 0.001
    (``router_aux_loss_coef``). Their 0.001 multiplies ONE balance loss over all layers'
    tokens concatenated (HF Mixtral's, ``k`` at balance); here each MoE layer adds its own
    (``k`` at balance) and the model sums them, so ``moe.load_balance_coef = 0.001 / Z``
    (``Z`` MoE layers) gives the balance term the authors' total weight.

    Initial logit scale (``logit_scale``, ``moe.recurrent_logit_scale``, default 1).
    ``W2``'s initialiser (Switch's, as every router here) is multiplied by ``logit_scale``,
    so the logits at initialisation, linear in ``W2``, are ``logit_scale`` times larger;
    training then runs in the same parametrisation as with 1 (a multiplier on the logits
    themselves would also raise the logits' step size under Adam for the whole run). With
    the shared ``router_init_scale = 0.1`` the recurrent logits start smaller than
    ``top_k``'s: both are ``√0.1`` times the RMS of what ``W2`` or the top-k kernel reads,
    which is the RMS-normalised ``x`` (1) for ``top_k`` but the GRU output ``h`` (about
    0.25-0.28, from ``h_0 = 0`` and a unit-scale ``x'``) here. Measured in the decoder LM at
    initialisation (random tokens, ``E = 8``, ``k = 2``, ``W = 128``, ``router_init_scale =
    0.1``, mean of 3 seeds), initial logit std ``top_k`` / ``recurrent``:

    * ``d_model = 512``, 8 MoE layers: 0.316 / 0.088, ratio 3.6 (4.1 at the first MoE layer,
      3.5-3.7 at the others, whose incoming state is not 0);
    * ``d_model = 64``, 2 MoE layers: 0.317 / 0.083, ratio 3.8 (4.1, 3.6).

    ``moe.recurrent_logit_scale = 3.6`` gives the recurrent router ``top_k``'s initial logit
    scale at ``d_model = 512`` (and within 6% at 64).
    """

    k: int = 2
    recurrent_dim: int = 256
    renormalize: bool = True
    load_balance_coef: float = 0.0
    logit_scale: float = 1.0

    supports_mtp: ClassVar[bool] = False      # the state is threaded by the model's trunk
    config_keys: ClassVar[dict[str, Any]] = {
        # GRU router state width R, shared across MoE layers (RMoE, Qiu et al. 2024; paper 256)
        "recurrent_dim": 256,
        # gru | rnn (the paper's ablation: h' = tanh(W x' + U h + b))
        "recurrent_cell": "gru",
        # multiplies the output router W2's init, so the initial logits (3.6: top_k's initial
        # logit scale at d_model 512 with recurrent_dim 128, router_init_scale 0.1)
        "recurrent_logit_scale": 1.0,
    }

    @nn.compact
    def __call__(self, x: Array, *, deterministic: bool, group_size: int | None = None,
                 router_state: Array | None = None, router_cell: nn.Module | None = None,
                 return_logits: bool = False) -> Routing | tuple[Routing, Array]:
        # x: [T, D]; router_state: [T, W] or None (zeros); return_logits: also return [T, E]
        if router_cell is None:
            raise ValueError("moe.router='recurrent' needs the shared GRU cell: call the MoE block with "
                             "router_inputs={'router_state': h, 'router_cell': RecurrentRouterCell(R)}")
        num_tokens, r = x.shape[0], self.recurrent_dim
        if router_state is None:
            router_state = jnp.zeros((num_tokens, r), jnp.float32)
        if router_state.shape != (num_tokens, r):
            raise ValueError(f"recurrent router: state {router_state.shape}, expected {(num_tokens, r)}")
        x = x.astype(jnp.float32)
        if self.jitter > 0 and not deterministic:
            x = x * jax.random.uniform(self.make_rng("dropout"), x.shape, jnp.float32,
                                       1.0 - self.jitter, 1.0 + self.jitter)
        hp = jax.lax.Precision.HIGHEST
        w1 = self.param("proj", sharding.param(nn.initializers.lecun_normal(), ("embed", None)),
                        (x.shape[-1], r), jnp.float32)
        w2_init = nn.initializers.variance_scaling(self.init_scale, "fan_in", "truncated_normal")
        if self.logit_scale != 1.0:   # the initial logits, linear in W2, times logit_scale
            w2_init = _scaled(w2_init, self.logit_scale)
        w2 = self.param("out", sharding.param(w2_init, (None, None)), (r, self.num_experts), jnp.float32)
        xp = jnp.einsum("TD,DW->TW", x, w1, precision=hp)  # [T, W]
        if isinstance(router_cell, nn.Module):
            h = router_cell(xp, router_state.astype(jnp.float32))  # [T, W]
        else:   # the shared cell's parameters (a scanned model passes arrays only)
            cell = "gru" if router_cell["wi"].shape[-1] == 3 * r else "rnn"
            h = RecurrentRouterCell(r, cell).apply({"params": router_cell}, xp, router_state.astype(jnp.float32))
        logits = jnp.einsum("TW,WE->TE", h, w2, precision=hp)  # [T, E]
        indices, weights, losses, stats = _topk_routing(
            logits, self.k, self.num_experts, group_size, renormalize=self.renormalize,
            load_balance_coef=self.load_balance_coef, z_loss_coef=self.z_loss_coef)
        stats["router_state_norm"] = jnp.mean(jnp.linalg.norm(h, axis=-1))
        routing = Routing(indices=indices, weights=weights, losses=losses, stats=stats, state=h)
        return (routing, logits) if return_logits else routing

    @classmethod
    def model_routing(cls, model_cfg: Any, *, tokens: Array, positions: Array, routes: Array | None,
                      num_moe_layers: int, dtype: Any, param_dtype: Any) -> ModelRouting:
        """The model's one :class:`RecurrentRouterCell` (submodule ``router_cell``) and the
        router state threaded through the layers (see :class:`RecurrentState`)."""
        moe = model_cfg.moe
        cell = RecurrentRouterCell(int(moe.recurrent_dim), str(moe.recurrent_cell), name="router_cell")
        return RecurrentState(cell, int(moe.recurrent_dim))

    @classmethod
    def from_config(cls, moe_cfg: Any, **kwargs) -> "RecurrentRouter":
        return cls(**cls.common_kwargs(moe_cfg), k=int(moe_cfg.k),
                   recurrent_dim=int(moe_cfg.recurrent_dim), renormalize=bool(moe_cfg.renormalize),
                   load_balance_coef=float(moe_cfg.load_balance_coef),
                   logit_scale=float(moe_cfg.get("recurrent_logit_scale", 1.0)), **kwargs)

    @classmethod
    def check_config(cls, moe_cfg: Any, *, causal: bool) -> None:
        super().check_config(moe_cfg, causal=causal)
        check_k(moe_cfg)
        if int(moe_cfg.recurrent_dim) < 1:
            raise ValueError(f"moe.recurrent_dim={moe_cfg.recurrent_dim} must be >= 1 with moe.router='recurrent'")
        if not float(moe_cfg.recurrent_logit_scale) > 0:
            raise ValueError(f"moe.recurrent_logit_scale={moe_cfg.recurrent_logit_scale} must be > 0 "
                             "with moe.router='recurrent'")
        if moe_cfg.recurrent_cell not in RECURRENT_CELLS:
            raise ValueError(f"moe.recurrent_cell={moe_cfg.recurrent_cell!r} is unknown; known: "
                             f"{list(RECURRENT_CELLS)}")


class RecurrentState(ModelRouting):
    """RMoE's state across layers for one model call: the shared cell and ``h`` ``[T, W]``.

    Each forward pass starts from ``h = 0``; every MoE layer gets ``router_inputs =
    {'router_state': h, 'router_cell': cell}`` and its ``aux['router_state']`` becomes
    the new ``h`` (dense layers leave it unchanged); the state after every layer is
    recorded as ``layer{i}_router_state``.

    Args:
      cell: the :class:`RecurrentRouterCell` that all MoE layers share.
      width: ``W``.
    """

    def __init__(self, cell: nn.Module, width: int) -> None:
        self.cell, self.width, self.state = cell, int(width), None

    def begin(self, batch: int, length: int) -> None:
        self.state = jnp.zeros((batch * length, self.width), jnp.float32)
        # the layers get the cell's parameters (arrays pass through nn.scan and nn.remat);
        # one call on a single zero row creates them at init and binds the cell
        self.cell(jnp.zeros((1, self.width), jnp.float32), jnp.zeros((1, self.width), jnp.float32))

    def layer_inputs(self, moe_index: int, batch: int, length: int) -> dict[str, Any]:
        return {"router_state": self.state, "router_cell": self.scan_shared()}

    def after_layer(self, aux: dict[str, Any]) -> dict[str, Array]:
        self.state = aux.get("router_state", self.state)
        return {"router_state": self.state}

    def scan_carry(self) -> Any:
        return self.state

    def scan_shared(self) -> Any:
        return nn.meta.unbox(self.cell.variables["params"])

    def set_scan_carry(self, carry: Any) -> None:
        self.state = carry

    @staticmethod
    def scan_inputs(carry: Any, shared: Any) -> dict[str, Any]:
        return {"router_state": carry, "router_cell": shared}

    @staticmethod
    def scan_update(carry: Any, aux: dict[str, Any]) -> tuple[Any, dict[str, Array]]:
        carry = aux.get("router_state", carry)
        return carry, {"router_state": carry}


# ------------------------------------------------------------------ Read-ME pre-gate


def pregate_select(logits: Array, k: int) -> Array:
    """Experts chosen from pre-gate logits ``[..., E]``: top-``k`` of ``softmax``, int32
    ``[..., K]`` (ties to the lower index). The model's ``routes`` and
    :class:`PreGateRouter` both use this, so precomputed and in-pass routes agree."""
    _, idx = top_k(jax.nn.softmax(logits.astype(jnp.float32), axis=-1), k)
    return idx.astype(jnp.int32)


class PreGate(nn.Module):
    """Read-ME's router network: token ids ``[B, L]`` -> logits ``[Z, B, L, E]`` for all
    ``Z`` MoE layers, before the backbone runs.

    A small causal Transformer with its own token embedding ``(V, y)`` (Read-ME
    initialises it from the first ``y`` columns of the dense model's embedding; trained
    from scratch here it is random; it never reads the backbone's weights, so routes do
    not depend on the backbone): ``num_layers`` pre-norm blocks of causal attention (RoPE,
    biased q/k/v projections as Read-ME's) and a SwiGLU MLP of width ``4y``, a final
    RMSNorm, then a linear map to logits. ``shared_routes=True`` (Read-ME: one expert
    choice per token used in every layer): one ``(y, E)`` head whose logits every layer
    uses; ``False``: a ``(y, Z·E)`` head, a separate choice per layer.
    """

    vocab_size: int
    num_experts: int
    num_moe_layers: int
    features: int = 64
    num_layers: int = 1
    num_heads: int = 2
    shared_routes: bool = True
    init_scale: float = 0.1
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, tokens: Array, positions: Array) -> Array:
        # tokens, positions: [B, L] -> float32 logits [Z, B, L, E]
        p, e, m = self.features, self.num_experts, self.num_moe_layers
        x = Embed(self.vocab_size, p, dtype=self.dtype, param_dtype=self.param_dtype,
                        name="embed")(tokens)  # [B, L, y]
        norm = lambda name: RMSNorm(dtype=self.dtype, param_dtype=self.param_dtype, name=name)
        for i in range(self.num_layers):
            x = x + Attention(num_heads=self.num_heads, num_kv_heads=self.num_heads,
                                    head_dim=p // self.num_heads, causal=True, implementation="xla",
                                    dtype=self.dtype, param_dtype=self.param_dtype, qkv_bias=True,
                                    name=f"attn{i}")(norm(f"attn_norm{i}")(x), positions)
            x = x + MLP(4 * p, "swiglu", dtype=self.dtype, param_dtype=self.param_dtype,
                              name=f"mlp{i}")(norm(f"mlp_norm{i}")(x))
        x = norm("final_norm")(x).astype(jnp.float32)
        width = e if self.shared_routes else m * e
        init = nn.initializers.variance_scaling(self.init_scale, "fan_in", "truncated_normal")
        head = self.param("head", sharding.param(init, (None, None)), (p, width), jnp.float32)
        logits = jnp.einsum("BLy,yO->BLO", x, head, precision=jax.lax.Precision.HIGHEST)
        b, l = tokens.shape
        if self.shared_routes:
            return jnp.broadcast_to(logits[None], (m, b, l, e))
        return jnp.moveaxis(logits.reshape(b, l, m, e), 2, 0)  # [Z, B, L, E]


@register("pregate")
class PreGateRouter(Router):
    """Read-ME (Cai et al. 2024, "Read-ME: Refactorizing LLMs as Router-Decoupled MoE with
    System Co-Design") routing inside one MoE layer, from precomputed pre-gate logits.

    The decision is made by the model-level :class:`PreGate` network from token ids
    alone; this router only turns its logits for this layer into a :class:`Routing`:
    ``router(x [T, D], deterministic=, group_size=, pregate_logits=[T, E], routes=None |
    int32 [T, K])``. ``routes`` given: exactly those experts are used (the model passes
    the output of its ``routes`` method); ``None``: :func:`pregate_select` of the logits.
    ``x`` is never read. Weights are the selected softmax probabilities (raw for ``k = 1``,
    renormalised for ``k > 1``), so the pre-gate trains end to end through the combine
    weights, with Switch load balancing and z-loss on its logits like every router here.

    Differences from Read-ME: Read-ME routes top-1 (use ``moe.k = 1`` for that) and trains
    the pre-gate by distilling from a dense model's activation statistics, alternating
    router and backbone phases; with no dense teacher here, the pre-gate is trained
    jointly through the combine weights and the losses above. The routes that the forward
    pass uses are sown to ``'intermediates'`` as ``routes`` ``[T, K]`` (read only when that
    collection is mutable; for tests and analysis).
    """

    k: int = 1
    renormalize: bool = True
    load_balance_coef: float = 0.0

    supports_decode: ClassVar[bool] = False    # the pre-gate runs over the whole sequence
    accepts_routes: ClassVar[bool] = True
    precomputes_routes: ClassVar[bool] = True
    supports_mtp: ClassVar[bool] = False
    scannable: ClassVar[bool] = False         # per-layer routes come from outside the layers
    config_keys: ClassVar[dict[str, Any]] = {
        "pregate_dim": 64,              # width P of the pre-gate Transformer (Read-ME, Cai et al. 2024)
        "pregate_layers": 1,            # causal attention + MLP blocks in the pre-gate
        "pregate_heads": 2,             # attention heads (pregate_dim / heads must be even)
        # True: one choice per token used by every MoE layer (Read-ME); False: one per layer
        "pregate_shared_routes": True,
    }

    @nn.compact
    def __call__(self, x: Array, *, deterministic: bool, group_size: int | None = None,
                 pregate_logits: Array | None = None, routes: Array | None = None) -> Routing:
        # x: [T, D] (unused); pregate_logits: [T, E]; routes: int32 [T, K] or None
        if pregate_logits is None:
            raise ValueError("moe.router='pregate' needs the pre-gate's logits: call the MoE block with "
                             "router_inputs={'pregate_logits': [T, E]} (DecoderLM does this)")
        logits = pregate_logits.astype(jnp.float32)
        if logits.shape != (x.shape[0], self.num_experts):
            raise ValueError(f"pregate router: logits {logits.shape}, expected {(x.shape[0], self.num_experts)}")
        if routes is None:
            routes = pregate_select(logits, self.k)
        indices, weights, losses, stats = _topk_routing(
            logits, self.k, self.num_experts, group_size, renormalize=self.renormalize,
            load_balance_coef=self.load_balance_coef, z_loss_coef=self.z_loss_coef, indices=routes)
        if not self.is_initializing():  # never part of the variables that init returns
            self.sow("intermediates", "routes", indices)
        return Routing(indices=indices, weights=weights, losses=losses, stats=stats)

    @classmethod
    def model_routing(cls, model_cfg: Any, *, tokens: Array, positions: Array, routes: Array | None,
                      num_moe_layers: int, dtype: Any, param_dtype: Any) -> ModelRouting:
        """Runs the model's :class:`PreGate` (submodule ``pregate``) on the token ids, before
        the backbone; see :class:`PreGateRouting`."""
        moe = model_cfg.moe
        logits = PreGate(
            vocab_size=int(model_cfg.vocab_size), num_experts=_router_width(moe), num_moe_layers=num_moe_layers,
            features=int(moe.pregate_dim), num_layers=int(moe.pregate_layers), num_heads=int(moe.pregate_heads),
            shared_routes=bool(moe.pregate_shared_routes), init_scale=float(moe.router_init_scale),
            dtype=dtype, param_dtype=param_dtype, name="pregate")(tokens, positions)  # [Z, B, L, E]
        return PreGateRouting(logits, routes, int(moe.k))

    @classmethod
    def from_config(cls, moe_cfg: Any, **kwargs) -> "PreGateRouter":
        return cls(**cls.common_kwargs(moe_cfg), k=int(moe_cfg.k), renormalize=bool(moe_cfg.renormalize),
                   load_balance_coef=float(moe_cfg.load_balance_coef), **kwargs)

    @classmethod
    def check_config(cls, moe_cfg: Any, *, causal: bool) -> None:
        super().check_config(moe_cfg, causal=causal)
        check_k(moe_cfg)
        for key in ("pregate_dim", "pregate_layers", "pregate_heads"):
            if int(moe_cfg[key]) < 1:
                raise ValueError(f"moe.{key}={moe_cfg[key]} must be >= 1 with moe.router='pregate'")
        if int(moe_cfg.pregate_dim) % (2 * int(moe_cfg.pregate_heads)):
            raise ValueError(f"moe.pregate_dim={moe_cfg.pregate_dim} must be divisible by "
                             f"2 * moe.pregate_heads={2 * int(moe_cfg.pregate_heads)} (even head width for rotary)")


class PreGateRouting(ModelRouting):
    """Read-ME's routes for one model call: the pre-gate's logits ``[Z, B, L, E]`` and,
    optionally, routes fixed from outside, int32 ``[Z, B, L, K]``.

    MoE layer ``j`` gets ``router_inputs = {'pregate_logits': [B·L, E], 'routes': [B·L, K]
    or None}``; :meth:`precomputed_routes` is :func:`pregate_select` of the logits.

    Args:
      logits: float32 ``[Z, B, L, E]`` from :class:`PreGate`.
      routes: the model's ``routes=`` or ``None``.
      k: experts per token.
    """

    def __init__(self, logits: Array, routes: Array | None, k: int) -> None:
        self.logits, self.routes, self.k = logits, routes, int(k)

    def layer_inputs(self, moe_index: int, batch: int, length: int) -> dict[str, Any]:
        t = batch * length
        return {"pregate_logits": self.logits[moe_index].reshape(t, -1),
                "routes": None if self.routes is None else self.routes[moe_index].reshape(t, -1)}

    def precomputed_routes(self) -> Array:
        return pregate_select(self.logits, self.k)  # [Z, B, L, K]


def _router_width(moe_cfg: Any) -> int:
    """The routers' number of outputs: ``len(moe.expert_map)`` when set, else ``moe.num_experts``."""
    from routezoo.layers.moe.block import logical_num_experts
    return logical_num_experts(moe_cfg)
