"""Decoder-only Transformer language model whose feed-forward slot is chosen per layer.

Einsum letters: ``B`` batch, ``L`` length, ``D`` embed, ``V`` vocab, ``I`` a weight's input axis,
``K`` experts per token, ``W`` recurrent router width, ``Z`` MoE layers of the model.

Each block is pre-norm: ``x + Attn(Norm(x))`` then ``x + FFN(Norm(x))``. The FFN of layer
``i`` is built by :data:`FFN_BUILDERS` from ``ffn_kinds[i]`` (``"mlp"`` or ``"moe"``), so new
feed-forward kinds plug in by registering a builder, without editing the model.

The model returns ``(logits, aux)`` with ``aux = {'losses': {name: scalar}, 'stats':
{name: array}}``: loss terms that the training loop adds to the cross-entropy (summed
over layers, already scaled) and statistics it logs (per layer, ``layer{i}/{name}``).
With multi-token prediction (``model.mtp_depth > 0``, :class:`MTPModule`) ``aux`` also
holds ``'mtp_logits'``: one ``[B, L, V]`` array per depth; a call given the batch's
``targets`` and ``loss_weights`` (the training step passes them to every model) adds the
loss term ``losses['mtp']`` and ``aux['metrics'] = {'mtp_ce': ...}``, scalars the loop
logs under their own name.
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar

import jax
import jax.numpy as jnp
from flax import linen as nn

from routezoo.layers.attention import Attention, require_cache, rope_scaling_of
from routezoo.layers.embed import Embed
from routezoo.layers.mlp import MLP
from routezoo.layers.norms import make_norm
from routezoo.layers.sharding import param
from routezoo.zoo.stack import remat_block, scan_enabled, scanned_group, stack_layout

Aux = dict[str, dict[str, jax.Array]]
FFN = Callable[..., tuple[jax.Array, Aux]]


def _mlp_builder(cfg: Any, dtype, param_dtype, name: str) -> FFN:
    mlp = MLP(hidden_dim=cfg.mlp_dim, mlp_type=cfg.mlp_type, dtype=dtype,
                    param_dtype=param_dtype, name=name)
    # Dense layers ignore router_inputs and return no 'router_state': the caller keeps it.
    return lambda h, deterministic, token_ids=None, router_inputs=None: (mlp(h), {})


def _moe_builder(cfg: Any, dtype, param_dtype, name: str) -> FFN:
    from routezoo.layers.moe import moe_from_config  # the MoE layer is optional for dense models
    return moe_from_config(cfg.moe, d_model=cfg.d_model, dtype=dtype, param_dtype=param_dtype, name=name)


# name -> builder(model_cfg, dtype, param_dtype, name) -> ffn;
# ffn(h, deterministic=, token_ids=, router_inputs=) -> (y, aux); token_ids [B, L] feed
# token-id routers (hash); router_inputs (a dict, passed only when not None) carries what
# the router needs from outside the layer, as the router class's model_routing provides it
# (layers/routers/base.py ModelRouting; e.g. the recurrent router's state and shared cell),
# and aux goes back to that object after every layer.
FFN_BUILDERS: dict[str, Callable[..., FFN]] = {"mlp": _mlp_builder, "moe": _moe_builder}


def ffn_kinds(cfg: Any) -> tuple[str, ...]:
    """Feed-forward kind of each layer from ``model.ffn`` (and ``model.moe.every``)."""
    n = cfg.num_layers
    spec = str(cfg.ffn)
    if "," in spec:
        kinds = tuple(s.strip() for s in spec.split(","))
        if len(kinds) != n:
            raise ValueError(f"model.ffn lists {len(kinds)} kinds but model.num_layers is {n}")
    elif spec == "moe":
        every = int(cfg.moe.every)
        if every < 1:
            raise ValueError(f"model.moe.every must be >= 1, got {every}")
        # MoE in layers every-1, 2*every-1, ... (the last of each group), as Switch/GShard do.
        kinds = tuple("moe" if (i + 1) % every == 0 else "mlp" for i in range(n))
    else:
        kinds = (spec,) * n
    bad = sorted({k for k in kinds if k not in FFN_BUILDERS})
    if bad:
        raise ValueError(f"unknown feed-forward kind {bad[0]!r} in model.ffn; allowed: "
                         f"{', '.join(FFN_BUILDERS)} (or a comma-separated list, one per layer)")
    return kinds


def skip_layers_of(cfg: Any) -> frozenset[int]:
    """The layers ``model.skip_layers`` names (comma-separated indices; "" = none): the
    decoder passes their input on unchanged (:class:`DecoderLM`). One-line ``ValueError``
    for an index that is no layer of the model."""
    spec = str(cfg.get("skip_layers", "") or "").strip()
    if not spec:
        return frozenset()
    try:
        skip = frozenset(int(s) for s in spec.split(",") if s.strip())
    except ValueError:
        raise ValueError(f"model.skip_layers={spec!r}: allowed: comma-separated layer indices, e.g. '2,5'") from None
    bad = sorted(i for i in skip if not 0 <= i < int(cfg.num_layers))
    if bad:
        raise ValueError(f"model.skip_layers names layer {bad[0]}, but the model has layers 0..{int(cfg.num_layers) - 1}")
    return skip


def layer_model_config(cfg: Any, layer: int) -> Any:
    """The config layer ``layer`` is built from: ``cfg``, or with per-layer expert maps
    (``model.moe.expert_map`` with ``;``, which keeps the stack unscanned) a copy whose
    ``moe.expert_map`` is that MoE layer's own map."""
    if cfg.get("moe", None) is None or not str(cfg.moe.get("expert_map", "") or "").count(";"):
        return cfg
    from routezoo.layers.moe.block import has_per_layer_maps, moe_config_for_layer
    moe_layers = [i for i, kind in enumerate(ffn_kinds(cfg)) if kind == "moe"]
    if layer not in moe_layers or not has_per_layer_maps(cfg.moe):
        return cfg
    import ml_collections
    out = ml_collections.ConfigDict(cfg.to_dict())
    out.moe = ml_collections.ConfigDict(moe_config_for_layer(cfg.moe, moe_layers.index(layer)).to_dict())
    return ml_collections.FrozenConfigDict(out)


def router_class_of(cfg: Any):
    """The router class of ``cfg.moe.router`` (:data:`~routezoo.layers.routers.base.ROUTERS`);
    one-line ``ValueError`` for an unknown name."""
    from routezoo.layers.routers import router_class
    return router_class(str(cfg.moe.router))


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
    """Rotary positions of a padded batch: ``cumsum(mask) - 1`` (0 at padding), so a
    left-padded row's first real token is at position 0, as Hugging Face's ``generate``
    numbers them. int32 ``[B, L]``."""
    m = jnp.asarray(attention_mask).astype(jnp.int32)
    return jnp.maximum(jnp.cumsum(m, axis=-1) - 1, 0)


def positions_from_segments(segment_ids: jax.Array) -> jax.Array:
    """Rotary positions of packed rows: ``0, 1, 2, ...`` restarting at every new segment id
    (a document starts where the id differs from the previous token's), ``0`` at padding
    (id 0). int32 ``[B, L]``. For callers who have only ``segment_ids``; a data pipeline
    that emits positions passes its own."""
    seg = jnp.asarray(segment_ids)
    b, l = seg.shape
    idx = jnp.arange(l, dtype=jnp.int32)
    starts = jnp.concatenate([jnp.ones((b, 1), bool), seg[:, 1:] != seg[:, :-1]], axis=1)   # [B, L]
    first = jax.lax.cummax(jnp.where(starts, idx[None, :], 0), axis=1)   # the current document's first index
    return jnp.where(seg > 0, idx[None, :] - first, 0).astype(jnp.int32)


def resolve_dtype(name: str) -> Any:
    if name == "auto":
        return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    try:
        return jnp.dtype(name)
    except TypeError as e:
        raise ValueError(f"unknown dtype {name!r}; allowed: auto, bfloat16, float32") from e


class Block(nn.Module):
    cfg: Any
    ffn_kind: str
    dtype: Any
    param_dtype: Any
    causal: bool = True          # False: bidirectional attention (the encoder, zoo/encoder.py)

    @nn.compact
    def __call__(self, x, positions, deterministic: bool, token_ids=None, router_inputs=None,
                 segment_mask=None, decode: bool = False, segment_ids=None):
        # segment_mask: bool [B, 1, L, L] (True: query may attend to key) or None;
        # decode: attention reads and extends its key/value cache (DecoderLM, decode=True);
        # segment_ids: int [B, L] packed documents (0 padding) or None: attention stays inside each
        c = self.cfg
        norm = lambda name: make_norm(c.norm, c.norm_eps, self.dtype, self.param_dtype, name)
        h = norm("attn_norm")(x)
        attn_aux = None
        # routers whose experts replace the MoE layers' attention (UoE: heads as experts)
        routed_attn = None if self.ffn_kind != "moe" else router_class_of(c).build_attention(
            c, dtype=self.dtype, param_dtype=self.param_dtype, name="attn")
        if routed_attn is not None:
            seg_kw = {} if segment_ids is None else {"segment_ids": segment_ids}
            y, attn_aux = routed_attn(h, positions, segment_mask, **seg_kw)
            x = x + y
        elif str(c.get("attention", "mha")) == "mla":   # DeepSeek-V2/V3 latent attention (layers/mla.py)
            from routezoo.layers.mla import mla_from_config
            x = x + mla_from_config(c, causal=self.causal, dtype=self.dtype, param_dtype=self.param_dtype,
                                    name="attn")(h, positions, segment_mask, decode, segment_ids)
        else:
            x = x + Attention(
                num_heads=c.num_heads, num_kv_heads=c.num_kv_heads, head_dim=c.head_dim,
                rope_theta=c.rope_theta, causal=self.causal, implementation=c.attention_impl,
                dtype=self.dtype, param_dtype=self.param_dtype,
                qkv_bias=bool(c.get("qkv_bias", False)), qk_norm=str(c.get("qk_norm", "none")),
                qk_norm_eps=float(c.norm_eps), rope_scaling=rope_scaling_of(c),
                name="attn")(h, positions, segment_mask, decode, segment_ids)
        h = norm("ffn_norm")(x)
        ffn = FFN_BUILDERS[self.ffn_kind](c, self.dtype, self.param_dtype, self.ffn_kind)
        extra = {} if router_inputs is None else {"router_inputs": router_inputs}
        y, aux = ffn(h, deterministic=deterministic, token_ids=token_ids, **extra)
        if attn_aux is not None:   # the attention gate's losses (attn_*) and stats (attn/*)
            aux = {**aux, "losses": {**aux.get("losses", {}),
                                     **{f"attn_{k}": v for k, v in attn_aux["losses"].items()}},
                   "stats": {**aux.get("stats", {}), **{f"attn/{k}": v for k, v in attn_aux["stats"].items()}}}
        return x + y, aux


def cross_entropy(logits: jax.Array, targets: jax.Array, weights: jax.Array):
    """Per-token negative log-likelihood (float32) and correctness, both times ``weights``.

    Args:
      logits: ``[..., V]`` scores.
      targets: int ``[...]`` token ids.
      weights: ``[...]`` per-token weights (0 drops a token).

    Returns:
      ``(nll [...], correct [...])``.
    """
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    return nll * weights, correct * weights


def mtp_loss(mtp_logits, targets: jax.Array, weights: jax.Array,
             segment_ids: jax.Array | None = None) -> jax.Array:
    """Mean over depths of the multi-token-prediction cross-entropy (DeepSeek-V3, section 2.2).

    Depth ``k``'s logits at position ``i`` predict ``targets[i + k]`` (the token ``k + 1``
    ahead of the input); the last ``k`` positions have no target and drop out.

    Args:
      mtp_logits: one ``[B, L, V]`` array per depth (``aux['mtp_logits']``).
      targets: int ``[B, L]``, the next token of every input position.
      weights: ``[B, L]`` loss weights of ``targets``.
      segment_ids: int ``[B, L]`` packed documents, or None: position ``i`` then also drops
        out of depth ``k`` where position ``i + k`` lies in another document (as the last
        ``k`` positions of an unpacked row do).

    Returns:
      The scalar mean over depths of each depth's weighted mean cross-entropy.
    """
    per_depth = []
    for k, logits in enumerate(mtp_logits, 1):
        w = weights[:, k:]
        if segment_ids is not None:
            w = w * (segment_ids[:, k:] == segment_ids[:, :-k]).astype(w.dtype)
        nll, _ = cross_entropy(logits[:, :-k], targets[:, k:], w)
        per_depth.append(nll.sum() / jnp.maximum(w.sum(), 1.0))
    return sum(per_depth) / len(per_depth)


class MTPModule(nn.Module):
    """One multi-token-prediction module of DeepSeek-V3 (DeepSeek-AI 2024, "DeepSeek-V3
    Technical Report", section 2.2): module ``k`` turns the previous depth's hidden state
    ``h[i]`` (for ``k = 1`` the trunk's output after its final norm, for ``k > 1`` the
    previous module's block output, as the inference engines that serve the released
    weights feed them) and the embedding of token
    ``t[i+k]`` into ``h'[i] = W [RMSNorm(Emb(t[i+k])); RMSNorm(h[i])]`` (``W`` ``[2D, D]``,
    ``eh_proj``), runs one Transformer block of the trunk's kind on it, and predicts
    ``t[i+k+1]`` through its own final norm and the trunk's (shared) output head.

    The concatenation order is the released checkpoints' (``enorm`` half first, as the
    inference engines that load them read ``eh_proj``); the report's equation 21 writes
    the hidden state first. Parameters: ``enorm``, ``hnorm``, ``eh_proj``, ``block``,
    ``norm`` (HF ``model.layers.{N+k-1}.{enorm, hnorm, eh_proj, <block>, shared_head.norm}``).
    """

    cfg: Any
    ffn_kind: str
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, h, emb, positions, deterministic: bool, token_ids, segment_mask, segment_ids=None):
        """``(h_k [B, L, D], its final-normed copy for the head, aux of the block)``."""
        c = self.cfg
        norm = lambda name: make_norm(c.norm, c.norm_eps, self.dtype, self.param_dtype, name)
        d = h.shape[-1]
        w = self.param("eh_proj", param(nn.initializers.lecun_normal(), ("embed", None)),
                       (2 * d, d), self.param_dtype)
        x = jnp.concatenate([norm("enorm")(emb), norm("hnorm")(h)], axis=-1)
        x = jnp.einsum("BLI,ID->BLD", x, jnp.asarray(w, self.dtype))
        x, aux = Block(c, self.ffn_kind, self.dtype, self.param_dtype, name="block")(
            x, positions, deterministic, token_ids, None, segment_mask, False, segment_ids)
        return x, norm("norm")(x), aux


class DecoderLM(nn.Module):
    """Decoder-only LM: ``tokens [B, L] -> (logits [B, L, V] float32, aux)``.

    Model-level loss terms come from the router class (``Router.model_losses``, which gets
    the call's ``targets`` and ``loss_weights``): with the THOR router
    (``model.moe.router='thor'``, Zuo et al. 2022) and ``moe.thor_consistency_coef > 0`` or
    ``moe.thor_ce_both``, a training call runs the network twice with independent expert
    draws and returns the first pass's logits plus the loss terms
    ``thor_consistency = α · mean_tokens ½ Σ_v (p1 − p2)(log p1 − log p2)`` and, with
    ``thor_ce_both``, ``thor_ce_both = ½ (CE2 − CE1)``, so that the loop's cross-entropy
    (the first pass's) plus it is the mean of both passes' (see
    :class:`~routezoo.layers.routers.stochastic.ThorRouter`). The means are over tokens
    weighted by ``loss_weights``, so the scale does not grow with the batch.

    Padded batches: ``attention_mask`` int/bool ``[B, L]`` (1 = real token) keeps every
    query from attending to padded keys; outputs at padded positions are meaningless.
    Positions default to ``0..L-1`` in every row (Hugging Face's forward does the same);
    for left padding pass ``positions=positions_from_mask(mask)``. Routing is per token,
    so padded tokens never change a real token's experts, except through capacity
    dispatch (they take buffer slots) and the Read-ME pre-gate (its attention sees them).

    Packed rows (several documents per row): ``segment_ids`` int ``[B, L]`` numbers the
    documents of each row ``1, 2, 3, ...`` in order, ``0`` marks padding. Every attention
    (grouped-query :class:`~routezoo.layers.attention.Attention`, latent attention, UoE's
    selective attention, the MTP modules' blocks) then keeps each query inside its
    document; a padding query attends padding keys only (its output is finite and
    meaningless). Positions are the caller's and must restart at 0 in every document
    (``positions=positions_from_segments(segment_ids)`` where the pipeline gives none);
    with both, each document's logits equal those of the document run alone in its own
    row, up to what couples the tokens of a row anyway: capacity dispatch (a document's
    tokens can take expert slots another document would have had, exactly as sequences
    of one routing group do), UoE's per-row head buffers when they drop tokens, routers
    that read the whole row (``expert_choice``, ``soft``, in the encoder) and Read-ME's
    pre-gate network (its own attention is not masked by ``segment_ids``). An
    ``attention_mask`` given too is and-ed with the document mask. On GPUs the masked
    attention stays on cuDNN's flash kernel
    (:func:`~routezoo.layers.attention.segment_attention_implementation`). With
    multi-token prediction the token ``t[i+k]`` a module reads at position ``i`` is
    replaced by padding (0) where it belongs to another document (as past the end of an
    unpacked row), and the ``mtp`` loss drops those positions (:func:`mtp_loss`).

    Routers with state outside one layer get it explicitly: the router class's
    ``model_routing`` (``layers/routers/base.py``) makes it once per call, and the model
    hands each MoE layer its ``router_inputs`` and every layer's ``aux`` back to it:

    * ``model.moe.router='recurrent'`` (RMoE): the model owns the one GRU cell
      ``router_cell`` shared by all MoE layers and threads the router state ``h``
      ``[B·L, W]`` (zeros at the start) through the layers: each MoE layer gets
      ``router_inputs={'router_state': h, 'router_cell': cell}`` and returns the new
      ``h`` as ``aux['router_state']``; dense layers pass it unchanged. When the
      ``'intermediates'`` collection is mutable, the state after layer ``i`` is sown as
      ``layer{i}_router_state``.
    * ``model.moe.router='pregate'`` (Read-ME): the model owns the pre-gate network
      ``pregate`` (:class:`~routezoo.layers.routers.stateful.PreGate`), which reads only the
      token ids. :meth:`routes` returns the experts of every MoE layer before the backbone
      runs, int32 ``[Z, B, L, K]`` (``Z`` MoE layers in layer order, see
      :meth:`moe_layers`): ``model.apply(variables, tokens, method=model.routes)``.
      ``model.apply(variables, tokens, routes=r)`` makes the forward pass use exactly
      ``r``; without ``routes`` it computes the same selection in the pass.
    * ``model.moe.router='duo'`` (Duo-LLM, :mod:`routezoo.layers.moe.duo`): ``routes=r``, int32
      ``[Z, B, L]`` with values 0 big, 1 small, 2 skip, fixes every token's option in every
      MoE layer (the oracle, :mod:`routezoo.zoo.duo`, evaluates routes this way).

    With ``model.moe.router='uoe'`` (Union of Experts, ``layers/moe/uoe.py``) the MoE layers'
    attention is :class:`~routezoo.layers.moe.uoe.SelectiveAttention` (heads as experts) and
    their MoE the union of MLP slices; the attention gate's losses come back as
    ``attn_load_balance`` / ``attn_z_loss`` and its statistics as ``layer{i}/attn/...``.

    Autoregressive decoding (``decode=True``): every attention layer keeps its keys and
    values (latent attention: the normed latent and the rotated shared key) in the
    ``'cache'`` collection, made by :func:`init_cache` for ``max_len`` positions; each call
    appends its ``L`` tokens (a prompt, then one token at a time) and returns their
    logits, equal to the full forward pass's at those positions. Positions default to the
    number of tokens seen so far; ``attention_mask`` then covers the ``max_len`` cache slots
    (left padding: pass it with ``positions``). With ``segment_ids`` (the new tokens' ids,
    ``[B, L]``, on every call of the run, and positions per document) the cache keeps each
    slot's segment id and a token attends only to the cached tokens of its own document,
    so a prompt of several packed documents decodes without crossing them. Refused for routers without a decode mode
    (``Router.supports_decode``: ``moe.router='pregate'``, ``'uoe'``).
    :func:`routezoo.zoo.sampling.sample` uses it.

    Skipped layers (``model.skip_layers``, :func:`skip_layers_of`; the ``layer_skip``
    transform): a skipped layer's block is not applied, its input passes on unchanged, its
    losses and statistics are left out and a router state passes it as it passes a dense
    layer; its parameters stay in the tree (initialisation makes them), so a model's
    checkpoint loads whatever it skips. Unscanned, a skipped block is never called (its
    compute is saved); in a scanned stack, whose repeats share one compiled body, the block
    runs and its output is discarded (``jnp.where`` on a per-layer flag): the same outputs,
    not the saving.

    Multi-token prediction (``model.mtp_depth = D > 0``, DeepSeek-V3): ``D`` sequential
    :class:`MTPModule` s (``mtp1`` ... ``mtpD``, each with a block of the last layer's
    kind) after the trunk; ``aux['mtp_logits'][k-1]`` ``[B, L, V]`` predicts token
    ``t[i+k+1]`` at position ``i`` (its last ``k`` positions read padding and are to be
    ignored). A call given ``targets`` ``[B, L]`` (the next token of each input) and
    ``loss_weights`` ``[B, L]`` returns the loss term ``losses['mtp'] = model.mtp_weight ·
    mtp_ce`` and ``aux['metrics']['mtp_ce']``, their mean cross-entropy (:func:`mtp_loss`);
    other calls ignore both arguments, and evaluation and sampling use the trunk's
    logits only. Their MoE layers' losses are summed with the trunk's and their
    statistics logged as ``mtp{k}/...``.
    """

    cfg: Any

    causal: ClassVar[bool] = True             # attention mask; EncoderMLM: False
    objective: ClassVar[str] = "causal_lm"    # training objective (training/step.py objective_batch)

    @classmethod
    def stack_layouts(cls, cfg: Any) -> dict[tuple[str, ...], Any]:
        """``{(): layout}``: the one layer stack at the top of the parameter tree
        (:func:`routezoo.zoo.stack.stack_layout` of the layers' kinds)."""
        kinds = ffn_kinds(cfg)
        return {(): stack_layout(kinds, scan_enabled(cfg, kinds))}

    def moe_layers(self) -> tuple[int, ...]:
        """Indices of the MoE layers (the ``Z`` axis of :meth:`routes`)."""
        return tuple(i for i, kind in enumerate(ffn_kinds(self.cfg)) if kind == "moe")

    def routes(self, tokens: jax.Array, *, positions: jax.Array | None = None) -> jax.Array:
        """Read-ME pre-gating: experts of every MoE layer, int32 ``[Z, B, L, K]``, computed
        from the token ids alone, before (and without) the backbone."""
        return self(tokens, positions=positions, _routes_only=True)

    def _scan_group(self, layout, routing, *, deterministic: bool, decode: bool, dtype, param_dtype,
                    skip: frozenset[int] = frozenset()):
        """The scanned group of ``layout`` (``layers/block{p}``, stacked ``[R, ...]``), made
        once per call; :meth:`_run_scan_group` runs it. With layers to ``skip`` among the
        scanned ones the carry also holds the layer index, and a skipped layer's output
        and router state are its input's (``shared['skip']``, bool ``[num_layers]``)."""
        c = self.cfg
        block_cls = remat_block(Block, str(c.get("remat", "none")), (3, 7), in_scan=True)
        causal = self.causal
        scan_inputs, scan_update = routing.scan_inputs, routing.scan_update
        skipping = bool(skip & set(layout.scanned_layers))

        def step(p, kind, x, carry, shared):
            if skipping:
                carry, index = carry
            router_inputs = scan_inputs(carry, shared["router"]) if kind == "moe" else None
            x_in, carry_in = x, carry
            x, aux = block_cls(c, kind, dtype, param_dtype, causal=causal, name=f"block{p}")(
                x, shared["positions"], deterministic, shared["tokens"], router_inputs, shared["segment_mask"],
                decode, shared["segment_ids"])
            carry, recorded = scan_update(carry, aux) if kind == "moe" else (carry, {})
            if skipping:   # a skipped layer hands on its input (its losses and stats are dropped outside)
                keep = ~shared["skip"][index]
                x = jnp.where(keep, x, x_in)
                carry = (jax.tree.map(lambda n, o: jnp.where(keep, n, o), carry, carry_in), index + 1)
            return x, carry, {"losses": aux.get("losses", {}), "stats": aux.get("stats", {}), "recorded": recorded}

        return scanned_group(layout, step)

    @staticmethod
    def _run_scan_group(group, layout, routing, x, record, shared, skip: frozenset[int] = frozenset()):
        """Runs ``group`` on ``x`` and records each of its layers' losses, statistics and
        router values as the unscanned loop does, under the same ``layer{i}`` names
        (skipped layers: nothing)."""
        carry = routing.scan_carry()
        if skip & set(layout.scanned_layers):
            mask = jnp.asarray([i in skip for i in range(len(layout.kinds))])
            carry, shared = (carry, jnp.asarray(layout.prefix, jnp.int32)), {**shared, "skip": mask}
        (x, carry), outs = group((x, carry), {"router": routing.scan_shared(), **shared})
        if skip & set(layout.scanned_layers):
            carry = carry[0]
        routing.set_scan_carry(carry)
        for i, out in layout.per_layer(outs):
            if i not in skip:
                record(i, {"losses": out["losses"], "stats": out["stats"]}, out["recorded"])
        return x

    @nn.compact
    def __call__(self, tokens: jax.Array, *, deterministic: bool = True,
                 positions: jax.Array | None = None, routes: jax.Array | None = None,
                 attention_mask: jax.Array | None = None, decode: bool = False,
                 targets: jax.Array | None = None, loss_weights: jax.Array | None = None,
                 segment_ids: jax.Array | None = None,
                 _routes_only: bool = False) -> tuple[jax.Array, Aux]:
        c = self.cfg
        dtype, param_dtype = resolve_dtype(c.dtype), jnp.dtype(c.param_dtype)
        moe_layers = self.moe_layers()
        router_name = str(c.moe.router) if moe_layers else None
        from routezoo.layers.routers import ROUTERS, Router
        router_cls = router_class_of(c) if moe_layers else Router   # Router: no MoE layers
        b, l = tokens.shape
        if decode:
            if not self.causal or not router_cls.supports_decode:
                no_decode = " and ".join(sorted(n for n, r in ROUTERS.items() if not r.supports_decode))
                raise ValueError(f"{type(self).__name__}: decode=True (key/value cache) needs causal "
                                 f"attention in every layer and a router without a sequence-level "
                                 f"network; got causal={self.causal}, moe.router={router_name!r} "
                                 f"({no_decode} are not supported)")
            # The next free position of each row: the default positions of the new tokens.
            require_cache(self, "position")
            seen = self.variable("cache", "position", lambda: jnp.zeros((), jnp.int32))
            if positions is None:
                positions = jnp.broadcast_to(seen.value + jnp.arange(l), (b, l))
            if not self.is_initializing():
                seen.value = seen.value + l
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        # Padding: no query attends to a key whose attention_mask is 0 (queries at padded
        # positions still run; their outputs mean nothing and are to be ignored). With
        # decode=True the mask covers the cache's slots: [B, max_len].
        segment_mask = None
        if attention_mask is not None:
            segment_mask = (jnp.asarray(attention_mask) > 0)[:, None, None, :]   # [B, 1, 1, L]: keys
        if _routes_only and not router_cls.precomputes_routes:
            names = " or ".join(repr(n) for n, r in ROUTERS.items() if r.precomputes_routes)
            raise ValueError(f"DecoderLM.routes needs model.moe.router={names} (and MoE layers); "
                             f"got router {router_name!r}")
        if routes is not None and not router_cls.accepts_routes:
            names = " or ".join(repr(n) for n, r in ROUTERS.items() if r.accepts_routes)
            raise ValueError(f"DecoderLM: routes= is only for model.moe.router={names}")
        # what the routers need from outside their layers (the recurrent router's shared cell,
        # Read-ME's pre-gate run before the backbone, routes fixed from outside)
        routing = router_cls.model_routing(c, tokens=tokens, positions=positions, routes=routes,
                                           num_moe_layers=len(moe_layers), dtype=dtype, param_dtype=param_dtype)
        if _routes_only:
            return routing.precomputed_routes()  # [Z, B, L, K]
        embed = Embed(c.vocab_size, c.d_model, dtype=dtype, param_dtype=param_dtype,
                            scale_attend=bool(c.get("scale_tied_logits", True)), name="embed")
        layout = self.stack_layouts(c)[()]
        remat = str(c.get("remat", "none"))
        # Block.__call__ arguments 3 (deterministic) and 7 (decode) are Python bools
        block_cls = remat_block(Block, remat, (3, 7), in_scan=False)
        blocks = {i: block_cls(layer_model_config(c, i), kind, dtype, param_dtype, causal=self.causal, name=f"layer{i}")
                  for i, kind in enumerate(layout.kinds) if i not in layout.scanned_layers}
        # model.skip_layers: passed over in apply; initialisation makes every layer's parameters
        skip = frozenset() if self.is_initializing() else skip_layers_of(c)
        scan_group = self._scan_group(layout, routing, deterministic=deterministic, decode=decode, dtype=dtype,
                                      param_dtype=param_dtype, skip=skip) if layout.scanned else None
        final_norm = make_norm(c.norm, c.norm_eps, dtype, param_dtype, "final_norm")
        unembed = None if c.tie_embeddings else self.param(
            "unembed", param(nn.initializers.normal(c.d_model ** -0.5), ("embed", "vocab")),
            (c.d_model, c.vocab_size), param_dtype)
        mtps = [MTPModule(c, ffn_kinds(c)[-1], dtype, param_dtype, name=f"mtp{k + 1}")
                for k in range(int(c.get("mtp_depth", 0) or 0))]

        def head(x):
            logits = embed.attend(x) if unembed is None else jnp.einsum("BLD,DV->BLV", x, jnp.asarray(unembed, dtype))
            return logits.astype(jnp.float32)

        def forward():
            x = embed(tokens)
            losses: dict[str, jax.Array] = {}
            stats: dict[str, jax.Array] = {}
            routing.begin(b, l)

            def record(i, aux, recorded):
                for name, value in recorded.items():   # e.g. the recurrent router state
                    if not self.is_initializing():
                        self.sow("intermediates", f"layer{i}_{name}", value)
                for k, v in aux.get("losses", {}).items():
                    losses[k] = losses.get(k, 0.0) + v
                for k, v in aux.get("stats", {}).items():
                    stats[f"layer{i}/{k}"] = v

            def run_layer(i, x):
                if i in skip:   # not called: its input goes on, its losses and stats are absent
                    return x
                router_inputs = routing.layer_inputs(moe_layers.index(i), b, l) if i in moe_layers else None
                x, aux = blocks[i](x, positions, deterministic, tokens, router_inputs, segment_mask, decode,
                                   segment_ids)
                record(i, aux, routing.after_layer(aux))
                return x

            for i in range(layout.prefix):
                x = run_layer(i, x)
            if layout.scanned:
                x = self._run_scan_group(scan_group, layout, routing, x, record, {
                    "positions": positions, "tokens": tokens, "segment_mask": segment_mask,
                    "segment_ids": segment_ids}, skip)
            for i in layout.suffix:
                x = run_layer(i, x)
            x = final_norm(x)
            logits = head(x)
            mtp_logits = []
            for k, mtp in enumerate([] if decode else mtps, 1):   # t[i+k] enters at position i (padding past the end)
                ahead = jnp.concatenate([tokens[:, k:], jnp.zeros((b, k), tokens.dtype)], axis=1)
                if segment_ids is not None:   # t[i+k] of another document: padding, as past a row's end
                    seg_ahead = jnp.concatenate([segment_ids[:, k:], jnp.zeros((b, k), segment_ids.dtype)], axis=1)
                    ahead = jnp.where(seg_ahead == segment_ids, ahead, jnp.zeros((), tokens.dtype))
                x, normed, aux = mtp(x, embed(ahead), positions, deterministic, ahead, segment_mask, segment_ids)
                mtp_logits.append(head(normed))
                for name, v in aux.get("losses", {}).items():
                    losses[name] = losses.get(name, 0.0) + v
                for name, v in aux.get("stats", {}).items():
                    stats[f"mtp{k}/{name}"] = v
            return logits, losses, stats, tuple(mtp_logits)

        logits, losses, stats, mtp_logits = forward()
        if moe_layers and not self.is_initializing():   # model-level terms (THOR's consistency)
            losses.update(router_cls.model_losses(c, logits, lambda: forward()[0], deterministic=deterministic,
                                                  targets=targets, loss_weights=loss_weights))
        aux_out = {"losses": losses, "stats": stats}
        if mtp_logits:
            aux_out["mtp_logits"] = mtp_logits
            if targets is not None:   # the MTP loss term, beside the layers' (DeepSeek-V3 multi-token prediction)
                weights = jnp.ones(targets.shape, jnp.float32) if loss_weights is None else loss_weights
                aux_out["metrics"] = {"mtp_ce": mtp_loss(mtp_logits, targets, weights, segment_ids)}
                losses["mtp"] = float(c.mtp_weight) * aux_out["metrics"]["mtp_ce"]
        return logits, aux_out


def init_cache(model: nn.Module, batch: int, max_len: int) -> dict:
    """The zeroed key/value cache of ``model`` (a :class:`DecoderLM`) for ``batch`` rows of
    at most ``max_len`` positions: pass it as ``variables['cache']`` to ``model.apply(...,
    decode=True, mutable=['cache'])`` and carry the returned ``'cache'`` forward."""
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((batch, max_len), jnp.int32),
                                               decode=True))
    return jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes["cache"])
