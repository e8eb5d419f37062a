"""Decoder-only Transformer language model whose feed-forward slot is chosen per layer.

Einsum letters: ``B`` batch, ``L`` length, ``D`` embed, ``V`` vocab.

Each block is pre-norm: ``x + Attn(Norm(x))`` then ``x + FFN(Norm(x))``. The FFN of layer
``i`` is built by :data:`FFN_BUILDERS` from ``ffn_kinds[i]`` (``"mlp"`` or ``"moe"``), so new
feed-forward kinds plug in by registering a builder, without editing the model.

The model returns ``(logits, aux)`` with ``aux = {'losses': {name: scalar}, 'stats':
{name: array}}``: loss terms that the training loop adds to the cross-entropy (summed
over layers, already scaled) and statistics it logs (per layer, ``layer{i}/{name}``).
With multi-token prediction (``model.mtp_depth > 0``, :class:`MTPModule`) ``aux`` also
holds ``'mtp_logits'``: one ``[B, L, V]`` array per depth.
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

Aux = dict[str, dict[str, jax.Array]]
NO_DECODE_ROUTERS = ("pregate", "uoe")   # sequence-level router networks: no decode=True
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
# token-id routers (hash); router_inputs (a dict, passed only when not None) carries state
# that lives outside the layer to the router (recurrent: router_state, router_cell;
# pregate: pregate_logits, routes), and aux['router_state'], when present, is the new
# recurrent router state (see layers/routers/stateful.py).
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


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
    """Rotary positions of a padded batch: ``cumsum(mask) - 1`` (0 at padding), so a
    left-padded row's first real token is at position 0, as Hugging Face's ``generate``
    numbers them. int32 ``[B, L]``."""
    m = jnp.asarray(attention_mask).astype(jnp.int32)
    return jnp.maximum(jnp.cumsum(m, axis=-1) - 1, 0)


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
                 segment_mask=None, decode: bool = False):
        # segment_mask: bool [B, 1, L, L] (True: query may attend to key) or None;
        # decode: attention reads and extends its key/value cache (DecoderLM, decode=True)
        c = self.cfg
        norm = lambda name: make_norm(c.norm, c.norm_eps, self.dtype, self.param_dtype, name)
        h = norm("attn_norm")(x)
        attn_aux = None
        if self.ffn_kind == "moe" and c.moe.router == "uoe":   # UoE: heads as experts (layers/moe/uoe.py)
            if segment_mask is not None:
                raise ValueError("DecoderLM: attention_mask is not supported with moe.router='uoe' "
                                 "(selective attention has no padding mask)")
            from routezoo.layers.moe.uoe import selective_attention_from_config
            y, attn_aux = selective_attention_from_config(
                c, dtype=self.dtype, param_dtype=self.param_dtype, name="attn")(h, positions)
            x = x + y
        elif str(c.get("attention", "mha")) == "mla":   # DeepSeek-V2/V3 latent attention (layers/mla.py)
            from routezoo.layers.mla import mla_from_config
            x = x + mla_from_config(c, causal=self.causal, dtype=self.dtype, param_dtype=self.param_dtype,
                                    name="attn")(h, positions, segment_mask, decode)
        else:
            x = x + Attention(
                num_heads=c.num_heads, num_kv_heads=c.num_kv_heads, head_dim=c.head_dim,
                rope_theta=c.rope_theta, causal=self.causal, implementation=c.attention_impl,
                dtype=self.dtype, param_dtype=self.param_dtype,
                qkv_bias=bool(c.get("qkv_bias", False)), qk_norm=str(c.get("qk_norm", "none")),
                qk_norm_eps=float(c.norm_eps), rope_scaling=rope_scaling_of(c),
                name="attn")(h, positions, segment_mask, decode)
        h = norm("ffn_norm")(x)
        ffn = FFN_BUILDERS[self.ffn_kind](c, self.dtype, self.param_dtype, self.ffn_kind)
        extra = {} if router_inputs is None else {"router_inputs": router_inputs}
        y, aux = ffn(h, deterministic=deterministic, token_ids=token_ids, **extra)
        if attn_aux is not None:   # the attention gate's losses (attn_*) and stats (attn/*)
            aux = {**aux, "losses": {**aux.get("losses", {}),
                                     **{f"attn_{k}": v for k, v in attn_aux["losses"].items()}},
                   "stats": {**aux.get("stats", {}), **{f"attn/{k}": v for k, v in attn_aux["stats"].items()}}}
        return x + y, aux


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
    def __call__(self, h, emb, positions, deterministic: bool, token_ids, segment_mask):
        """``(h_k [B, L, D], its final-normed copy for the head, aux of the block)``."""
        c = self.cfg
        norm = lambda name: make_norm(c.norm, c.norm_eps, self.dtype, self.param_dtype, name)
        d = h.shape[-1]
        w = self.param("eh_proj", param(nn.initializers.lecun_normal(), ("embed", None)),
                       (2 * d, d), self.param_dtype)
        x = jnp.concatenate([norm("enorm")(emb), norm("hnorm")(h)], axis=-1)
        x = jnp.einsum("BLE,ED->BLD", x, jnp.asarray(w, self.dtype))
        x, aux = Block(c, self.ffn_kind, self.dtype, self.param_dtype, name="block")(
            x, positions, deterministic, token_ids, None, segment_mask)
        return x, norm("norm")(x), aux


class DecoderLM(nn.Module):
    """Decoder-only LM: ``tokens [B, L] -> (logits [B, L, V] float32, aux)``.

    With the THOR router (``model.moe.router='thor'``, Zuo et al. 2022) and
    ``moe.thor_consistency_coef > 0``, a training call runs the network twice with
    independent expert draws and returns the first pass's logits plus the loss term
    ``thor_consistency = α · mean_tokens ½ Σ_v (p1 − p2)(log p1 − log p2)``. The paper sums
    the term over tokens and adds the second pass's cross-entropy too; here the loop's
    cross-entropy is on the first pass and the term is a per-token mean, so its scale
    does not grow with the batch.

    Padded batches: ``attention_mask`` int/bool ``[B, L]`` (1 = real token) keeps every
    query from attending to padded keys; outputs at padded positions are meaningless.
    Positions default to ``0..L-1`` in every row (Hugging Face's forward does the same);
    for left padding pass ``positions=positions_from_mask(mask)``. Routing is per token,
    so padded tokens never change a real token's experts, except through capacity
    dispatch (they take buffer slots) and the Read-ME pre-gate (its attention sees them).

    Routers with state outside one layer (``layers/routers/stateful.py``) get it explicitly:

    * ``model.moe.router='recurrent'`` (RMoE): the model owns the one GRU cell
      ``router_cell`` shared by all MoE layers and threads the router state ``h``
      ``[B·L, R]`` (zeros at the start) through the layers: each MoE layer gets
      ``router_inputs={'router_state': h, 'router_cell': cell}`` and returns the new
      ``h`` as ``aux['router_state']``; dense layers pass it unchanged. When the
      ``'intermediates'`` collection is mutable, the state after layer ``i`` is sown as
      ``layer{i}_router_state``.
    * ``model.moe.router='pregate'`` (Read-ME): the model owns the pre-gate network
      ``pregate`` (:class:`~routezoo.layers.routers.stateful.PreGate`), which reads only the
      token ids. :meth:`routes` returns the experts of every MoE layer before the backbone
      runs, int32 ``[M, B, L, K]`` (``M`` MoE layers in layer order, see
      :meth:`moe_layers`): ``model.apply(variables, tokens, method=model.routes)``.
      ``model.apply(variables, tokens, routes=r)`` makes the forward pass use exactly
      ``r``; without ``routes`` it computes the same selection in the pass.
    * ``model.moe.router='duo'`` (Duo-LLM, :mod:`routezoo.layers.moe.duo`): ``routes=r``, int32
      ``[M, B, L]`` with values 0 big, 1 small, 2 skip, fixes every token's option in every
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
    (left padding: pass it with ``positions``). Not for ``moe.router='pregate'`` or
    ``'uoe'`` (refused). :func:`routezoo.zoo.sampling.sample` uses it.

    Multi-token prediction (``model.mtp_depth = D > 0``, DeepSeek-V3): ``D`` sequential
    :class:`MTPModule` s (``mtp1`` ... ``mtpD``, each with a block of the last layer's
    kind) after the trunk; ``aux['mtp_logits'][k-1]`` ``[B, L, V]`` predicts token
    ``t[i+k+1]`` at position ``i`` (its last ``k`` positions read padding and are to be
    ignored). The training loop adds ``model.mtp_weight`` times their mean cross-entropy
    (:func:`routezoo.training.train.mtp_loss`); evaluation and sampling use the trunk's
    logits only. Their MoE layers' losses are summed with the trunk's and their
    statistics logged as ``mtp{k}/...``.
    """

    cfg: Any

    causal: ClassVar[bool] = True             # attention mask; EncoderMLM: False
    objective: ClassVar[str] = "causal_lm"    # training objective (training/train.py objective_batch)

    def moe_layers(self) -> tuple[int, ...]:
        """Indices of the MoE layers (the ``M`` axis of :meth:`routes`)."""
        return tuple(i for i, kind in enumerate(ffn_kinds(self.cfg)) if kind == "moe")

    def routes(self, tokens: jax.Array, *, positions: jax.Array | None = None) -> jax.Array:
        """Read-ME pre-gating: experts of every MoE layer, int32 ``[M, B, L, K]``, computed
        from the token ids alone, before (and without) the backbone."""
        return self(tokens, positions=positions, _routes_only=True)

    @nn.compact
    def __call__(self, tokens: jax.Array, *, deterministic: bool = True,
                 positions: jax.Array | None = None, routes: jax.Array | None = None,
                 attention_mask: jax.Array | None = None, decode: bool = False,
                 _routes_only: bool = False) -> tuple[jax.Array, Aux]:
        c = self.cfg
        dtype, param_dtype = resolve_dtype(c.dtype), jnp.dtype(c.param_dtype)
        moe_layers = self.moe_layers()
        router_kind = str(c.moe.router) if moe_layers else None
        b, l = tokens.shape
        if decode:
            if not self.causal or router_kind in NO_DECODE_ROUTERS:
                raise ValueError(f"{type(self).__name__}: decode=True (key/value cache) needs causal "
                                 f"attention in every layer and a router without a sequence-level "
                                 f"network; got causal={self.causal}, moe.router={router_kind!r} "
                                 "(pregate and uoe are not supported)")
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
        pregate_logits = None
        if router_kind == "pregate":
            from routezoo.layers.routers.stateful import PreGate, pregate_select
            pregate_logits = PreGate(
                vocab_size=c.vocab_size, num_experts=int(c.moe.num_experts), num_moe_layers=len(moe_layers),
                features=int(c.moe.pregate_dim), num_layers=int(c.moe.pregate_layers),
                num_heads=int(c.moe.pregate_heads), shared_routes=bool(c.moe.pregate_shared_routes),
                init_scale=float(c.moe.router_init_scale), dtype=dtype, param_dtype=param_dtype,
                name="pregate")(tokens, positions)  # [M, B, L, E]
            if _routes_only:
                return pregate_select(pregate_logits, int(c.moe.k))  # [M, B, L, K]
        elif _routes_only:
            raise ValueError(f"DecoderLM.routes needs model.moe.router='pregate' (and MoE layers); "
                             f"got router {router_kind!r}")
        if routes is not None and router_kind not in ("pregate", "duo"):
            raise ValueError("DecoderLM: routes= is only for model.moe.router='pregate' or 'duo'")
        if routes is not None and router_kind == "duo" and routes.shape != (len(moe_layers), b, l):
            raise ValueError(f"DecoderLM: duo routes must be int32 [M, B, L] = {(len(moe_layers), b, l)}, "
                             f"got {routes.shape}")
        router_cell = None
        if router_kind == "recurrent":
            from routezoo.layers.routers.stateful import RecurrentRouterCell
            router_cell = RecurrentRouterCell(int(c.moe.recurrent_dim), str(c.moe.recurrent_cell),
                                              name="router_cell")
        embed = Embed(c.vocab_size, c.d_model, dtype=dtype, param_dtype=param_dtype,
                            scale_attend=bool(c.get("scale_tied_logits", True)), name="embed")
        blocks = [Block(c, kind, dtype, param_dtype, causal=self.causal, name=f"layer{i}")
                  for i, kind in enumerate(ffn_kinds(c))]
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
            state = None if router_cell is None else jnp.zeros((b * l, int(c.moe.recurrent_dim)), jnp.float32)
            for i, block in enumerate(blocks):
                router_inputs = None
                if i in moe_layers and router_cell is not None:
                    router_inputs = {"router_state": state, "router_cell": router_cell}
                elif i in moe_layers and pregate_logits is not None:
                    j = moe_layers.index(i)
                    router_inputs = {"pregate_logits": pregate_logits[j].reshape(b * l, -1),
                                     "routes": None if routes is None else routes[j].reshape(b * l, -1)}
                elif i in moe_layers and routes is not None:   # duo: options fixed from outside
                    router_inputs = {"routes": routes[moe_layers.index(i)].reshape(b * l)}
                x, aux = block(x, positions, deterministic, tokens, router_inputs, segment_mask, decode)
                if router_cell is not None:
                    state = aux.get("router_state", state)   # dense layers: unchanged
                    if not self.is_initializing():
                        self.sow("intermediates", f"layer{i}_router_state", state)
                for k, v in aux.get("losses", {}).items():
                    losses[k] = losses.get(k, 0.0) + v
                for k, v in aux.get("stats", {}).items():
                    stats[f"layer{i}/{k}"] = v
            x = final_norm(x)
            logits = head(x)
            mtp_logits = []
            for k, mtp in enumerate([] if decode else mtps, 1):   # t[i+k] enters at position i (padding past the end)
                ahead = jnp.concatenate([tokens[:, k:], jnp.zeros((b, k), tokens.dtype)], axis=1)
                x, normed, aux = mtp(x, embed(ahead), positions, deterministic, ahead, segment_mask)
                mtp_logits.append(head(normed))
                for name, v in aux.get("losses", {}).items():
                    losses[name] = losses.get(name, 0.0) + v
                for name, v in aux.get("stats", {}).items():
                    stats[f"mtp{k}/{name}"] = v
            return logits, losses, stats, tuple(mtp_logits)

        logits, losses, stats, mtp_logits = forward()
        coef = float(c.moe.get("thor_consistency_coef", 0.0))
        if "moe" in ffn_kinds(c) and c.moe.router == "thor" and coef > 0 and not deterministic \
                and not self.is_initializing():
            logits2 = forward()[0]             # a second, independent draw of experts
            logp1, logp2 = jax.nn.log_softmax(logits, -1), jax.nn.log_softmax(logits2, -1)
            sym_kl = 0.5 * jnp.sum((jnp.exp(logp1) - jnp.exp(logp2)) * (logp1 - logp2), axis=-1)
            losses["thor_consistency"] = coef * jnp.mean(sym_kl)
        aux_out = {"losses": losses, "stats": stats}
        if mtp_logits:
            aux_out["mtp_logits"] = mtp_logits
        return logits, aux_out


def init_cache(model: nn.Module, batch: int, max_len: int) -> dict:
    """The zeroed key/value cache of ``model`` (a :class:`DecoderLM`) for ``batch`` rows of
    at most ``max_len`` positions: pass it as ``variables['cache']`` to ``model.apply(...,
    decode=True, mutable=['cache'])`` and carry the returned ``'cache'`` forward."""
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((batch, max_len), jnp.int32),
                                               decode=True))
    return jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes["cache"])
