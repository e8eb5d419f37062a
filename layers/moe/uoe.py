"""UoE: Union of Experts (Yang, Lian & Li 2025, "Union of Experts: Adapting Hierarchical
Routing to Equivalently Decomposed Transformer", arXiv:2503.02495).

Einsum letters: ``B`` batch, ``L`` length, ``D`` embed, ``H`` heads (the attention
experts), ``A`` head dim, ``C`` capacity (query slots of one head's token buffer), ``M``
key slots of the same buffer (``M = C``), ``T`` tokens (``B·L``), ``E`` MLP slices (the
MLP experts), ``F`` width of one slice.

UoE decomposes a dense Transformer block into experts whose *sum* is the block again, and
routes at two levels: which experts serve a token, and which tokens an expert processes.

* :class:`SelectiveAttention` (the paper's SMHA; heads as experts). A float32 gate
  ``g = softmax(x W_g + b)`` ``[B, L, H]`` over the ``H`` heads; each token keeps its top
  ``k_h`` heads. Per sequence and head, the tokens that chose the head are compacted in
  time order into a buffer of ``C = min(L, ceil(cf · L · k_h / H))`` slots
  (:func:`attention_capacity`, :func:`compact_in_time_order`); tokens past the ``C``-th are
  dropped for that head (0 from it; counted in ``dropped_fraction``). Each head computes
  ``q, k, v`` only on its ``C`` tokens (its own ``(D, A)`` projections; no grouped
  key/value heads), applies rotary embeddings at the tokens' original positions, runs
  causal attention inside the buffer, multiplies its output at token ``t`` by ``g[t, h]``,
  and the outputs are scattered back to their positions and summed over heads through
  the output projection ``(H, A, D)``. With ``k = H``, ``C = L`` and the gate multiplier
  replaced by 1 (``gate_in_output=False``) this is exactly multi-head attention
  (:class:`routezoo.layers.attention.Attention` with ``num_kv_heads = num_heads``) with the
  same weights.

  ``attention`` (``moe.uoe_attention``) says which tokens a head attends over.
  ``'selected'`` (the default, and what the authors' ``SMHA_v3.py`` computes: queries,
  keys and values of the compacted tokens only) is the above. ``'all'`` is the ablation
  where the token selection applies to the outputs only: every head computes queries,
  keys and values for all ``L`` tokens and attends causally over all of them, exactly as
  dense multi-head attention, and only the outputs at the tokens that chose the head are
  kept (times ``g[t, h]`` when ``gate_in_output``). No buffer, so no capacity and no
  dropping (``uoe_capacity_factor`` is not read; ``dropped_fraction`` is 0); each head
  costs a dense head's FLOPs. With ``k = H`` and ``gate_in_output=False`` it is exactly
  multi-head attention too.

  ``gate_in_output`` (``moe.uoe_gate_in_output``, shared with the UoME gate below):
  ``True`` (default) multiplies each head's output by its raw ``g[t, h]``, which puts the
  gate in the loss's gradient path. ``False`` is the authors' operator: the gate only
  selects (their ``RowParallelMatmulWithMoE`` / ``ColumnParallelMatmulWithMoE`` ignore the
  scores on this path), so the language-model loss gives the gate no gradient. What then
  trains the gate is the load-balance and z losses on its logits (``moe.load_balance_coef``,
  ``moe.z_loss_coef``); with both at 0 the gate stays at its initialisation, a fixed random
  projection, which is what the authors' code trains (its gates return no auxiliary loss).
* The union of MLP experts (UoME): the dense MLP of width ``E·F`` cut into ``E``
  column/row slices (slice ``e`` = columns ``e·F:(e+1)·F`` of ``W_in`` and ``W_gate``,
  rows of ``W_out``), so the sum of all slices is the dense MLP
  (:func:`slices_from_dense`, :func:`dense_from_slices`). A slice is an ordinary stacked
  expert of :class:`routezoo.layers.moe.block.MoE`, so the UoME *is* that MoE block with
  :class:`UoERouter` (top-``k`` of a float32 softmax gate): both dispatchers and expert
  parallelism on the ``expert`` mesh axis come with it. ``UoERouter(gate_in_output=False)``
  (``moe.uoe_gate_in_output=False``, the authors' ``UoME_DS.py``, which sums the selected
  slices' outputs unweighted) gives every selected slice weight 1, so ``k = E`` reproduces
  the dense MLP exactly; the UoME gate then also trains through its balance and z losses
  only.

Packed documents (``segment_ids`` int ``[B, L]``, documents ``1, 2, ...`` of a row, ``0``
padding): each head's buffer slot carries the segment id of its token (gathered with the
same indices as the tokens), and a query slot sees only the key slots of its own segment
(padding sees padding). Positions must restart per document (the caller's). The buffers
stay per row, so with ``C < L`` (dropping) the documents of a row compete for a head's
slots, coupling them exactly as capacity dispatch couples the sequences of a routing
group; with ``C = L`` (``capacity_factor >= H / k_h``) every document's output equals
its output alone.

``moe.router='uoe'`` in :class:`routezoo.zoo.lm.DecoderLM` makes every MoE layer's
attention a :class:`SelectiveAttention` (:func:`selective_attention_from_config`) and its
feed-forward the UoME; dense layers are unchanged.

Where this differs from the authors' code (``YujiaoYang-work/UoE``,
``language_modeling/model/attention/SMHA_v3.py`` and ``model/mlp/UoME_DS.py``, the path of
their language-modelling runs), on purpose:

* Token selection. The code lets each (head, sequence) take its top tokens by gate score
  across the whole sequence (then sorts them back into time order). In a decoder that
  leaks the future: whether token ``t`` is taken depends on later tokens' scores. Here a
  head takes the tokens that chose it in time order until its buffer is full, so whether
  token ``t`` enters head ``h`` depends only on tokens ``<= t`` and the layer is causal.
  The price is a position bias when a head overflows: late tokens are the ones dropped.
* Gate normalisation. The code rescales the masked gate over the *batch* axis
  (``B·g·m / Σ_b g·m``), which couples the sequences of a batch and depends on the batch
  size; here the gate is a per-token softmax and buffers are per sequence.
* Gate gradient. In the code the gate only selects indices and never multiplies an
  output, so it gets no gradient. By default each head's output is multiplied by
  ``g[t, h]`` and each slice's output by its softmax probability, which puts both gates in
  the gradient path; ``moe.uoe_gate_in_output=False`` is the code's operator for both
  gates (they then learn from their balance and z losses alone, or not at all with both
  coefficients 0, as in the code).
* Rotary positions. The code applies RoPE at the compacted positions ``0..C-1``, so two
  tokens' relative position inside a head depends on which other tokens the head took.
  Here the rotary embedding uses each token's original position.
* Buffer size. The code sizes every buffer by the busiest (head, sequence) pair, so other
  heads process zero-score filler tokens; here ``C`` is fixed by the capacity factor and
  the overflow is dropped and counted, as capacity-based MoE does.
* UoME token selection. The code's slices each take the top half of the tokens by score
  (non-causal, like the attention); here tokens choose their top-``k`` slices, and with
  ``moe.dispatch='dropless'`` no token is dropped, which keeps the decoder causal.
  ``moe.dispatch='capacity'`` with ``capacity_factor = 1`` and ``k/E = 1/2`` would give
  every slice the code's ``S/2`` slots, but the capacity dispatcher queues all first
  choices of a group before any second choice (GShard), so for ``k >= 2`` a later token's
  first choice can push out an earlier token's second choice: not causal in a decoder.
* Weights. The combine weight of a slice is its softmax probability; with
  ``moe.renormalize`` (the default) the ``k`` selected probabilities are renormalised to
  sum to 1, as :class:`~routezoo.layers.routers.top_k.TopKRouter` does (raw probability for
  ``k = 1``). The head multiplier is the raw ``g[t, h]`` (not renormalised over the kept
  heads). Neither detail is verified against the paper's text.
* Biases. The code's per-head and per-slice linear maps have biases; here, as in the rest
  of routezoo's layers, they have none (the head gate has one, ``gate_bias``).
* Losses. The code computes none; here the head gate gets the Switch load-balancing loss
  over heads (``moe.load_balance_coef``, per sequence) and the ST-MoE z-loss
  (``moe.z_loss_coef``), the UoME gate the same through :class:`UoERouter`.
"""

from __future__ import annotations

import math
from typing import Any, Callable, ClassVar

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.ad_checkpoint import checkpoint_name

from routezoo.layers import sharding
from routezoo.layers.attention import ATTN_OUT

from routezoo.layers.routers import TopKRouter
from routezoo.layers.routers.base import _check_choice, load_balance_loss, router_z_loss, top_k
from routezoo.layers.sharding import default_kernel_init
from routezoo.layers.routers.base import register

Array = jax.Array
Dtype = Any

# dense MLP type -> stacked expert type with the same maths (layers/moe/dropless.py)
SLICE_TYPES = {"swiglu": "swiglu", "gelu": "gelu"}
# what a head attends over: the tokens that chose it (the authors' code) | all tokens (ablation)
UOE_ATTENTION = ("selected", "all")


# ------------------------------------------------------------------ selective attention


def heads_per_token(k: int, num_heads: int) -> int:
    """``k_h``: ``k`` if ``k > 0``, else ``max(1, H // 2)`` (the authors' ``H/2``)."""
    return int(k) if int(k) > 0 else max(1, int(num_heads) // 2)


def attention_capacity(length: int, num_heads: int, k: int, capacity_factor: float) -> int:
    """Token slots per head and sequence: ``C = min(L, max(1, ceil(cf · L · k_h / H)))``.

    ``L · k_h / H`` is a head's share of the ``L · k_h`` token copies; ``C = L`` never
    drops anything (a token enters a head at most once)."""
    c = math.ceil(capacity_factor * length * k / num_heads - 1e-9)
    return max(1, min(int(length), c))


def compact_in_time_order(mask: Array, capacity: int) -> tuple[Array, Array, Array]:
    """Per sequence and head, the positions of the tokens that chose the head, in time
    order, first ``C`` kept.

    Args:
      mask: bool ``[B, L, H]``, token ``t`` chose head ``h``.
      capacity: ``C``.

    Returns:
      idx: int32 ``[B, H, C]``: position of the token in each slot (0 in empty slots).
      valid: bool ``[B, H, C]``: the slot holds a token.
      kept: bool ``[B, L, H]``: ``mask`` minus the tokens dropped for lack of room.

    Token ``t``'s slot in head ``h`` is the number of earlier tokens that chose ``h``, so
    it depends only on tokens ``<= t``.
    """
    b, l, h = mask.shape
    rank = jnp.cumsum(mask.astype(jnp.int32), axis=1) - 1  # [B, L, H]
    kept = mask & (rank < capacity)
    slot = jnp.where(kept, rank, capacity)  # [B, L, H]; C: not in any slot

    def per_sequence(slot_b):  # [L, H] -> [H, C]
        pos = jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32)[:, None], (l, h))
        head = jnp.broadcast_to(jnp.arange(h, dtype=jnp.int32)[None, :], (l, h))
        return jnp.zeros((h, capacity), jnp.int32).at[head, slot_b].set(pos, mode="drop")

    idx = jax.vmap(per_sequence)(slot)  # [B, H, C]
    count = jnp.sum(kept, axis=1)  # [B, H]
    valid = jnp.arange(capacity, dtype=jnp.int32)[None, None, :] < count[:, :, None]
    return idx, valid, kept


def _rotary(x: Array, positions: Array, theta: float) -> Array:
    """Rotary embedding of ``x [B, H, C, A]`` at ``positions [B, H, C]``: the half-split
    convention of :func:`routezoo.layers.attention.rotary_embedding`, with a position per
    head and slot."""
    k = x.shape[-1]
    if k % 2:
        raise ValueError(f"rotary embeddings need an even head dim, got {k}")
    freq = theta ** (-jnp.arange(0, k // 2, dtype=jnp.float32) * 2.0 / k)  # [A/2]
    angle = positions.astype(jnp.float32)[..., None] * freq  # [B, H, C, A/2]
    sin, cos = jnp.sin(angle), jnp.cos(angle)
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


class SelectiveAttention(nn.Module):
    """UoE's selective multi-head attention: heads as experts over the tokens they chose.

    ``x [B, L, D], positions [B, L], segment_ids [B, L] | None -> (y [B, L, D], aux)``
    (``segment_ids``: packed documents, see the module docstring) with ``aux = {'losses':
    {'load_balance', 'z_loss'} (scaled, present when the coefficient is > 0), 'stats':
    {'load' [H], 'dropped_fraction', 'load_balance_loss', 'z_loss', 'gate_entropy'}}``
    (see the module docstring for the maths). ``load`` is the fraction of token copies per
    head before the capacity cut; ``dropped_fraction`` the fraction of copies cut.

    Parameters: ``gate_kernel`` ``(D, H)`` and ``gate_bias`` ``(H,)`` (float32; Switch's
    router init scaled by ``init_scale``), ``q``, ``k``, ``v`` ``(D, H, A)`` and ``o``
    ``(H, A, D)`` named and shaped as :class:`~routezoo.layers.attention.Attention`'s with
    ``num_kv_heads = num_heads``. Causal attention is always on.

    Attributes:
      num_heads: ``H``. head_dim: ``A``.
      k: heads per token ``k_h``; 0 = ``max(1, H // 2)``.
      capacity_factor: ``cf`` of :func:`attention_capacity` (training and evaluation;
        ``'selected'`` only).
      gate_in_output: multiply each head's output by ``g[t, h]`` (True, the gate learns
        through the loss); False: by 1 (the authors' operator: the gate only selects and
        learns from the balance and z losses alone; with ``k = H`` and ``C = L``, exactly
        multi-head attention).
      attention: ``'selected'`` (a head attends among the tokens it took, the authors'
        code) or ``'all'`` (a head attends over all tokens as dense attention does, and
        only its outputs at the tokens that chose it are kept); see the module docstring.
    """

    num_heads: int
    head_dim: int
    k: int = 0
    capacity_factor: float = 1.25
    rope_theta: float = 10000.0
    gate_in_output: bool = True
    attention: str = "selected"
    load_balance_coef: float = 0.0
    z_loss_coef: float = 0.0
    init_scale: float = 0.1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, positions: Array | None = None,
                 segment_ids: Array | None = None) -> tuple[Array, dict[str, Any]]:
        b, l, d = x.shape
        h, kd = self.num_heads, self.head_dim
        kh = heads_per_token(self.k, h)
        if not 1 <= kh <= h:
            raise ValueError(f"SelectiveAttention: k={self.k} heads per token, must be between 0 and {h}")
        if self.attention not in UOE_ATTENTION:
            raise ValueError(f"SelectiveAttention: attention={self.attention!r} is unknown; known: "
                             f"{list(UOE_ATTENTION)}")
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(l), (b, l))
        x = sharding.constrain(x, ("batch", "length", "act_embed"))

        # gate, float32: g [B, L, H], top-k_h heads per token
        init = nn.initializers.variance_scaling(self.init_scale, "fan_in", "truncated_normal")
        w_g = self.param("gate_kernel", sharding.param(init, ("embed", None)), (d, h), jnp.float32)
        b_g = self.param("gate_bias", sharding.param(nn.initializers.zeros, (None,)), (h,), jnp.float32)
        logits = jnp.einsum("BLD,DH->BLH", x.astype(jnp.float32), w_g,
                            precision=jax.lax.Precision.HIGHEST) + b_g  # [B, L, H]
        g = jax.nn.softmax(logits, axis=-1)  # [B, L, H]
        _, top = top_k(g, kh)  # [B, L, k_h]
        mask = jnp.max(jax.nn.one_hot(top, h, dtype=jnp.float32), axis=2) > 0  # [B, L, H]

        if self.attention == "selected":   # compact each head's tokens in time order into C slots
            c = attention_capacity(l, h, kh, self.capacity_factor)
            idx, valid, kept = compact_in_time_order(mask, c)  # [B, H, C], [B, H, C], [B, L, H]
        else:   # 'all': every head's buffer is the whole sequence (C = L), nothing dropped
            c = l
            idx = jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, h, l))  # [B, H, C]
            valid, kept = jnp.ones((b, h, l), bool), mask  # [B, H, C], [B, L, H]
        xs = jax.vmap(lambda xb, ib: jnp.take(xb, ib, axis=0))(x.astype(self.dtype), idx)  # [B, H, C, D]
        xs = sharding.constrain(xs, ("batch", "act_heads", "capacity", "act_embed"))
        pos = jnp.take_along_axis(jnp.broadcast_to(positions[:, None, :], (b, h, l)), idx, axis=2)  # [B, H, C]

        def proj(name):
            w = self.param(name, sharding.param(default_kernel_init, ("embed", "heads", "head_dim")),
                           (d, h, kd), self.param_dtype)
            y = jnp.einsum("BHCD,DHA->BHCA", xs, jnp.asarray(w, self.dtype))
            return sharding.constrain(y, ("batch", "act_heads", "capacity", None))

        q = _rotary(proj("q"), pos, self.rope_theta)  # [B, H, C, A]
        kk = _rotary(proj("k"), pos, self.rope_theta)  # [B, H, M, A]
        v = proj("v")  # [B, H, M, A]

        # causal attention inside each buffer: key slot n is visible to query slot c when it
        # holds a token that is not later in the sequence
        scores = jnp.einsum("BHCA,BHMA->BHCM", q, kk, preferred_element_type=jnp.float32) * kd ** -0.5
        visible = valid[:, :, None, :] & (idx[:, :, None, :] <= idx[:, :, :, None])  # [B, H, C, M]
        if segment_ids is not None:   # packed documents: the slots' segment ids, gathered like the tokens
            seg = jnp.take_along_axis(jnp.broadcast_to(jnp.asarray(segment_ids)[:, None, :], (b, h, l)),
                                      idx, axis=2)  # [B, H, C]
            visible = visible & (seg[:, :, None, :] == seg[:, :, :, None])  # [B, H, C, M]
        scores = jnp.where(visible, scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1)  # [B, H, C, M]; rows of empty slots: unused
        out = jnp.einsum("BHCM,BHMA->BHCA", probs.astype(self.dtype), v)  # [B, H, C, A]

        # gate multiplier (0 in empty slots and, with 'all', at tokens that did not choose the
        # head), then back to positions [B, L, H, A]
        g_slot = jnp.take_along_axis(jnp.swapaxes(g, 1, 2), idx, axis=2)  # [B, H, C]
        kept_slot = jnp.take_along_axis(jnp.swapaxes(kept, 1, 2), idx, axis=2)  # [B, H, C]
        mult = jnp.where(valid & kept_slot, g_slot if self.gate_in_output else 1.0, 0.0)  # [B, H, C]
        out = (out.astype(jnp.float32) * mult[..., None]).astype(self.dtype)
        out = sharding.constrain(out, ("batch", "act_heads", "capacity", None))

        def scatter(out_b, idx_b):  # [H, C, A], [H, C] -> [L, H, A]
            head = jnp.arange(h, dtype=jnp.int32)[:, None]
            return jnp.zeros((l, h, kd), out_b.dtype).at[idx_b, head].add(out_b)

        o = sharding.constrain(jax.vmap(scatter)(out, idx), ("batch", "length", "act_heads", None))
        o = checkpoint_name(o, ATTN_OUT)   # [B, L, H, A]
        w_o = self.param("o", sharding.param(default_kernel_init, ("heads", "head_dim", "embed")),
                         (h, kd, d), self.param_dtype)
        y = jnp.einsum("BLHA,HAD->BLD", o, jnp.asarray(w_o, self.dtype))
        y = sharding.constrain(y, ("batch", "length", "act_embed"))

        copies = jnp.maximum(jnp.sum(mask), 1).astype(jnp.float32)
        lb = load_balance_loss(g, mask)  # groups = sequences; k_h when balanced
        z = router_z_loss(logits)
        entropy = -jnp.sum(g * jnp.log(jnp.maximum(g, jnp.finfo(jnp.float32).tiny)), axis=-1)
        stats = {"load": jnp.sum(mask, axis=(0, 1)).astype(jnp.float32) / copies,
                 "dropped_fraction": jnp.sum(mask & ~kept).astype(jnp.float32) / copies,
                 "load_balance_loss": lb, "z_loss": z, "gate_entropy": jnp.mean(entropy)}
        losses = {}
        if self.load_balance_coef > 0:
            losses["load_balance"] = self.load_balance_coef * lb
        if self.z_loss_coef > 0:
            losses["z_loss"] = self.z_loss_coef * z
        return y, {"losses": losses, "stats": stats}


def check_model_config(model_cfg: Any) -> None:
    """One-line ``ValueError`` for model settings that ``moe.router='uoe'`` cannot run."""
    moe, h = model_cfg.moe, int(model_cfg.num_heads)
    kh = int(moe.uoe_attn_k)
    if not 0 <= kh <= h:
        raise ValueError(f"moe.uoe_attn_k={kh} must be between 0 (= model.num_heads // 2) and "
                         f"model.num_heads={h}")
    if bool(model_cfg.get("qkv_bias", False)):
        raise ValueError("model.qkv_bias=True is not supported with moe.router='uoe' (selective "
                         "attention has no q/k/v biases); allowed: False")
    if str(model_cfg.get("qk_norm", "none")) != "none":
        raise ValueError(f"model.qk_norm={model_cfg.qk_norm!r} is not supported with moe.router='uoe'; "
                         "allowed: 'none'")


def selective_attention_from_config(model_cfg: Any, *, dtype: Dtype, param_dtype: Dtype,
                                    name: str | None = None) -> SelectiveAttention:
    """:class:`SelectiveAttention` of an MoE layer from ``config.model`` (``num_heads``,
    ``head_dim``, ``rope_theta``, ``moe.uoe_attn_k``, ``moe.uoe_capacity_factor``,
    ``moe.uoe_gate_in_output``, ``moe.uoe_attention``, ``moe.load_balance_coef``,
    ``moe.z_loss_coef``, ``moe.router_init_scale``).
    ``model.num_kv_heads`` and ``model.attention_impl`` apply to dense layers only: every
    head expert has its own keys and values, and attention runs as einsums."""
    check_model_config(model_cfg)
    moe = model_cfg.moe
    return SelectiveAttention(
        num_heads=int(model_cfg.num_heads), head_dim=int(model_cfg.head_dim), k=int(moe.uoe_attn_k),
        capacity_factor=float(moe.uoe_capacity_factor), rope_theta=float(model_cfg.rope_theta),
        gate_in_output=bool(moe.get("uoe_gate_in_output", True)),
        attention=str(moe.get("uoe_attention", "selected")), load_balance_coef=float(moe.load_balance_coef), z_loss_coef=float(moe.z_loss_coef),
        init_scale=float(moe.router_init_scale), dtype=dtype, param_dtype=param_dtype, name=name)


# ------------------------------------------------------------------ union of MLP experts


@register("uoe")
class UoERouter(TopKRouter):
    """The UoME gate: top-``k`` of the ``E`` MLP slices by a float32 softmax gate, inside
    :class:`~routezoo.layers.moe.block.MoE` (whose stacked experts are the slices).

    Routing maths, losses and options are :class:`~routezoo.layers.routers.top_k.TopKRouter`'s
    (weights: the selected probabilities, renormalised over the ``k`` when
    ``renormalize``, raw for ``k = 1``; Switch load balancing; z-loss). As a
    ``moe.router`` name, ``uoe`` also makes the LM's MoE layers use
    :class:`SelectiveAttention`. ``gate_in_output=False`` (``moe.uoe_gate_in_output``,
    which sets the head gate's too): every selected slice gets weight 1 (the authors' code,
    where the gate only selects and the selected slices' outputs are summed; with ``k = E``
    the block is then exactly the dense MLP of :func:`dense_from_slices`); the gate then
    learns from its balance and z losses alone.
    """

    gate_in_output: bool = True

    supports_decode: ClassVar[bool] = False    # selective attention has no key/value cache
    config_keys: ClassVar[dict[str, Any]] = {
        # heads per token k_h, 0..model.num_heads; 0 = num_heads // 2 (the authors' H/2)
        "uoe_attn_k": 0,
        # tokens per head and sequence C = min(L, ceil(cf * L * k_h / H)), filled in time order;
        # the rest dropped for that head
        "uoe_capacity_factor": 1.25,
        # True: each head's output times its gate g[t, h] and each slice's by its probability (the
        # gates learn from the loss); False: weight 1, the gates only select (the authors' code;
        # they then learn from load_balance_coef / z_loss_coef alone)
        "uoe_gate_in_output": True,
        # selected: a head attends among the tokens that chose it (the authors' code) | all: a head
        # attends over all tokens as dense attention, only the choosing tokens' outputs are kept
        "uoe_attention": "selected",
    }

    @classmethod
    def from_config(cls, moe_cfg: Any, **kwargs) -> "UoERouter":
        return super().from_config(moe_cfg, gate_in_output=bool(moe_cfg.get("uoe_gate_in_output", True)),
                                   **kwargs)

    def __call__(self, x: Array, *, deterministic: bool, group_size: int | None = None):
        # x: [T, D]
        routing = super().__call__(x, deterministic=deterministic, group_size=group_size)
        if self.gate_in_output:
            return routing
        return routing.replace(weights=jnp.where(routing.indices >= 0, 1.0, 0.0).astype(jnp.float32))

    @classmethod
    def check_config(cls, moe_cfg: Any, *, causal: bool) -> None:
        super().check_config(moe_cfg, causal=causal)
        if int(moe_cfg.uoe_attn_k) < 0:
            raise ValueError(f"moe.uoe_attn_k={moe_cfg.uoe_attn_k} must be >= 0 "
                             "(0: model.num_heads // 2) with moe.router='uoe'")
        if not float(moe_cfg.uoe_capacity_factor) > 0:
            raise ValueError(f"moe.uoe_capacity_factor={moe_cfg.uoe_capacity_factor} must be > 0 "
                             "with moe.router='uoe'")
        _check_choice(moe_cfg, "uoe_attention", UOE_ATTENTION)

    @classmethod
    def check_model_config(cls, model_cfg: Any) -> None:
        """:func:`check_model_config`: the attention options selective attention lacks."""
        check_model_config(model_cfg)

    @classmethod
    def build_attention(cls, model_cfg: Any, *, dtype: Any, param_dtype: Any,
                        name: str) -> Callable[..., tuple[Array, dict[str, Any]]]:
        """:class:`SelectiveAttention` (:func:`selective_attention_from_config`) in the MoE
        layers' attention slot; ``attn(h, positions, segment_mask, segment_ids=None)``
        refuses a padding mask and masks packed documents by ``segment_ids``."""
        attn = selective_attention_from_config(model_cfg, dtype=dtype, param_dtype=param_dtype, name=name)

        def call(h: Array, positions: Array, segment_mask: Array | None = None,
                 segment_ids: Array | None = None):
            if segment_mask is not None:
                raise ValueError("DecoderLM: attention_mask is not supported with moe.router='uoe' "
                                 "(selective attention has no padding mask; packed rows: segment_ids)")
            return attn(h, positions) if segment_ids is None else attn(h, positions, segment_ids)
        return call


def slices_from_dense(mlp_params: dict[str, Array], num_slices: int, mlp_type: str = "swiglu") -> dict[str, Array]:
    """Stacked UoME slices from a dense MLP's parameters (:class:`routezoo.layers.mlp.MLP`).

    ``wi`` ``[D, E·F]`` (and ``wg`` for SwiGLU), ``wo`` ``[E·F, D]`` ->
    ``{'wi': [E, D, F], 'wi_gate': [E, D, F] (SwiGLU), 'wo': [E, F, D]}`` (the
    :class:`~routezoo.layers.moe.block.Experts` layout): slice ``e`` holds columns
    ``e·F:(e+1)·F`` of ``wi``/``wg`` and the same rows of ``wo``. The activation acts per
    hidden unit, so ``Σ_e slice_e(x)`` is the dense MLP of ``x``."""
    if mlp_type not in SLICE_TYPES:
        raise ValueError(f"slices_from_dense: mlp_type {mlp_type!r} has no stacked-expert form; "
                         f"allowed: {', '.join(SLICE_TYPES)}")
    d, width = mlp_params["wi"].shape
    if width % num_slices:
        raise ValueError(f"slices_from_dense: MLP width {width} is not divisible into {num_slices} slices")
    f = width // num_slices
    cols = lambda w: jnp.transpose(jnp.reshape(w, (d, num_slices, f)), (1, 0, 2))  # [E, D, F]
    out = {"wi": cols(mlp_params["wi"]), "wo": jnp.reshape(mlp_params["wo"], (num_slices, f, d))}
    if SLICE_TYPES[mlp_type] == "swiglu":
        out["wi_gate"] = cols(mlp_params["wg"])
    return out


def dense_from_slices(slices: dict[str, Array]) -> dict[str, Array]:
    """Inverse of :func:`slices_from_dense`: the dense MLP parameters (``wi``, ``wo`` and,
    when the slices have ``wi_gate``, ``wg``) of width ``E·F``."""
    e, d, f = slices["wi"].shape
    cols = lambda w: jnp.reshape(jnp.transpose(w, (1, 0, 2)), (d, e * f))
    out = {"wi": cols(slices["wi"]), "wo": jnp.reshape(slices["wo"], (e * f, d))}
    if "wi_gate" in slices:
        out["wg"] = cols(slices["wi_gate"])
    return out
