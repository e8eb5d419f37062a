"""Encoder-decoder Transformer (T5; Switch Transformers with MoE feed-forward layers).

Einsum letters: ``B`` batch, ``L`` decoder length, ``e`` encoder length, ``D`` embed,
``V`` vocab.

:class:`EncoderDecoderLM` (``model.name='encoder_decoder'``) follows T5 (Raffel et al. 2020)
v1.0 as Switch Transformers (Fedus et al. 2021) uses it, built from routezoo layers
(:mod:`routezoo.layers.t5` for what T5 has that the decoder-only models lack):

* one token embedding shared by encoder, decoder and (``model.tie_embeddings``) the output
  projection, whose logits are scaled by ``d_model**-0.5`` (T5/Mesh TensorFlow; untied:
  a separate ``unembed`` ``[D, V]``, unscaled);
* pre-norm blocks with RMSNorm (``model.norm``): encoder ``x + SelfAttn(N(x))``, ``x +
  FFN(N(x))``; decoder ``x + CausalSelfAttn(N(x))``, ``x + CrossAttn(N(x), enc)``,
  ``x + FFN(N(x))``; a final norm per stack; relative position buckets instead of
  rotary positions (bidirectional in the encoder, causal in the decoder, one table per
  stack), attention logits unscaled (:class:`~routezoo.layers.t5.T5Attention`);
* FFN of layer ``i`` of a stack with sparse step ``s`` (``model.encoder_sparse_step``,
  ``model.decoder_sparse_step``): routezoo's MoE block (``config.model.moe``; Switch:
  ``moe.router='top_k'``, ``k=1``, ``expert_type='relu'``, ``dispatch='capacity'``) when
  ``s == 1`` or ``i % s == 1`` (Hugging Face's rule), else a dense ``relu`` MLP
  (``model.mlp_dim``; ``model.mlp_type``). ``model.expert_capacity > 0`` fixes the
  capacity to that many slots per expert and routing group (Switch's ``expert_capacity``;
  with ``moe.group_size=0`` a group is one sequence, tokens beyond capacity dropped in
  sequence order) in training and evaluation; 0 derives it from ``moe.capacity_factor``.

Call::

    logits, aux = model.apply(variables, encoder_tokens, decoder_tokens,
                              encoder_mask=enc_mask, decoder_mask=dec_mask)

``encoder_tokens`` int32 ``[B, e]``, ``decoder_tokens`` int32 ``[B, L]`` (the targets
shifted right, starting with the decoder start id, 0 for T5), masks int/bool (1 = real
token; ``None``: all real). ``logits`` float32 ``[B, L, V]``; ``aux = {'losses': {name:
scalar}, 'stats': {name: array}}``: the routers' scaled losses summed over the MoE layers
of both stacks and statistics per layer (``encoder/layer1/load``, ...). The first
argument may also be a dict with those four keys (what :func:`seq2seq_batch` returns and
the training loop passes). :meth:`EncoderDecoderLM.encode` and
:meth:`EncoderDecoderLM.decode` run the halves (e.g. to decode greedily with one
encoder pass; there is no key/value cache).

Packed rows: ``encoder_segment_ids`` int ``[B, e]`` and ``decoder_segment_ids`` int ``[B,
L]`` (keyword arguments, or keys of the dict input; both or neither) number the
documents of each row ``1, 2, 3, ...`` (``0`` padding), the same id for an encoder
document and the decoder document it pairs with. Encoder self-attention stays inside each
encoder document (bidirectional there), decoder self-attention inside each decoder
document (causal), and a decoder token of document ``s`` attends only to encoder tokens
of document ``s`` (:func:`routezoo.layers.t5.segment_mask`); padding attends padding.
The relative position buckets come from array indices, which within one contiguous
document differ exactly as the document's own positions do, so no positions are taken:
masking suffices, and each pair's logits equal those of the pair run alone (except
through capacity dispatch, which couples the documents of a row as it couples the
sequences of a routing group). ``encoder_mask``/``decoder_mask`` given too are and-ed in.

Training objective (``objective = 'seq2seq'``; ``model.seq2seq_objective``): ``prefix_lm``
(:func:`seq2seq_batch`), a prefix-LM split of every packed row: the first
``model.seq2seq_split`` of it is the encoder input, the decoder predicts the rest; or
``span_corruption`` (:func:`span_corruption_batch`), T5's objective: random spans
(``model.span_noise_density``, ``model.span_mean_length``) replaced by sentinels in the
encoder input, which the decoder predicts with their tokens.

Not modelled: dropout (T5/Switch use 0.1 in training), key/value caching, T5 v1.1's gated
GELU FFN (any ``model.mlp_type`` runs, but only ``relu`` exports to Hugging Face).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import linen as nn

from routezoo.layers import t5
from routezoo.layers.embed import Embed
from routezoo.layers.mlp import MLP
from routezoo.layers.norms import make_norm
from routezoo.layers.sharding import param
from routezoo.zoo.lm import resolve_dtype
from routezoo.zoo.stack import remat_block, scan_enabled, scanned_group, stack_layout

Aux = dict[str, dict[str, jax.Array]]
INPUT_KEYS = ("encoder_tokens", "decoder_tokens", "encoder_mask", "decoder_mask", "encoder_segment_ids",
              "decoder_segment_ids")


def sparse_kinds(num_layers: int, step: int) -> tuple[str, ...]:
    """FFN kind of each layer of a stack: ``'moe'`` where ``step == 1`` or ``i % step == 1``
    (Hugging Face Switch Transformers), else ``'mlp'``; ``step == 0``: all ``'mlp'``."""
    if step < 0:
        raise ValueError(f"sparse step must be >= 0, got {step}")
    return tuple("moe" if step and (step == 1 or i % step == 1) else "mlp" for i in range(num_layers))


def num_decoder_layers(cfg: Any) -> int:
    return int(cfg.get("num_decoder_layers", 0) or 0) or int(cfg.num_layers)


def stack_kinds(cfg: Any) -> dict[str, tuple[str, ...]]:
    """``{'encoder': kinds, 'decoder': kinds}`` of a ``config.model``."""
    return {"encoder": sparse_kinds(int(cfg.num_layers), int(cfg.get("encoder_sparse_step", 0))),
            "decoder": sparse_kinds(num_decoder_layers(cfg), int(cfg.get("decoder_sparse_step", 0)))}


def _moe_layer(cfg: Any, group: int, dtype, param_dtype, name: str) -> nn.Module:
    """routezoo's MoE block from ``cfg.moe``; with ``cfg.expert_capacity = C > 0`` the
    capacity factor is set so that the block's capacity is exactly ``C`` for groups of
    ``group`` tokens (``round(cf·K·S/E) = C``)."""
    from routezoo.layers.moe import moe_from_config
    moe_cfg = cfg.moe
    cap = int(cfg.get("expert_capacity", 0) or 0)
    if cap > 0:
        moe_cfg = ml_collections.ConfigDict(moe_cfg.to_dict())
        s = int(moe_cfg.group_size) or group
        cf = cap * int(moe_cfg.num_experts) / (int(moe_cfg.k) * s)
        moe_cfg.capacity_factor = moe_cfg.eval_capacity_factor = cf
        moe_cfg.min_capacity = 0
    return moe_from_config(moe_cfg, d_model=int(cfg.d_model), dtype=dtype, param_dtype=param_dtype, name=name)


class T5Block(nn.Module):
    """One encoder (``decoder=False``) or decoder block; returns ``(x, aux)``."""

    cfg: Any
    ffn_kind: str
    decoder: bool
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x, bias, mask, deterministic: bool, encoded=None, cross_mask=None, packed: bool = False):
        # packed: rows of several documents; a decoder document absent from the encoder reads nothing
        c = self.cfg
        norm = lambda name: make_norm(c.norm, c.norm_eps, self.dtype, self.param_dtype, name)
        attn = lambda name, zero=False: t5.T5Attention(int(c.num_heads), int(c.head_dim), self.dtype,
                                                       self.param_dtype, zero_empty_rows=zero, name=name)
        x = x + attn("attn")(norm("attn_norm")(x), None, bias, mask)
        if self.decoder:
            x = x + attn("cross", packed)(norm("cross_norm")(x), encoded, None, cross_mask)
        h = norm("ffn_norm")(x)
        if self.ffn_kind == "moe":
            y, aux = _moe_layer(c, h.shape[1], self.dtype, self.param_dtype, "moe")(h, deterministic=deterministic)
        else:
            y, aux = MLP(int(c.mlp_dim), str(c.mlp_type), dtype=self.dtype, param_dtype=self.param_dtype,
                               name="mlp")(h), {}
        return x + y.astype(x.dtype), aux


class T5Stack(nn.Module):
    """Encoder or decoder stack on embedded tokens: ``(hidden [B, L, D], losses, stats)``."""

    cfg: Any
    decoder: bool
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x, mask, deterministic: bool, encoded=None, encoder_mask=None, segment_ids=None,
                 encoder_segment_ids=None):
        # segment_ids: int [B, L] packed documents of this stack's rows (0 padding) or None;
        # encoder_segment_ids [B, e]: the encoder's, for the decoder's cross-attention
        c = self.cfg
        l = x.shape[1]
        layout = EncoderDecoderLM.stack_layouts(c)[("decoder" if self.decoder else "encoder",)]
        kinds = layout.kinds
        bias = t5.RelativePositionBias(int(c.num_heads), int(c.relative_attention_num_buckets),
                                       int(c.relative_attention_max_distance), bidirectional=not self.decoder,
                                       param_dtype=self.param_dtype, name="relpos")(l, l)
        self_mask = t5.causal_mask(l, mask) if self.decoder else t5.padding_mask(mask)
        cross_mask = t5.padding_mask(encoder_mask)
        if segment_ids is not None:   # packed documents (relative positions: index differences suffice)
            self_mask = t5.segment_mask(self_mask, segment_ids)
            if self.decoder:
                cross_mask = t5.segment_mask(cross_mask, segment_ids, encoder_segment_ids)
        losses: dict[str, jax.Array] = {}
        stats: dict[str, jax.Array] = {}
        packed = segment_ids is not None
        remat = str(c.get("remat", "none"))

        def record(i, aux):
            for k, v in aux.get("losses", {}).items():
                losses[k] = losses.get(k, 0.0) + v
            for k, v in aux.get("stats", {}).items():
                stats[f"layer{i}/{k}"] = v

        # T5Block.__call__ arguments 4 (deterministic) and 7 (packed) are Python bools
        block_cls = remat_block(T5Block, remat, (4, 7), in_scan=False)

        def run_layer(i, x):
            x, aux = block_cls(c, kinds[i], self.decoder, self.dtype, self.param_dtype, name=f"layer{i}")(
                x, bias, self_mask, deterministic, encoded, cross_mask, packed)
            record(i, aux)
            return x

        for i in range(layout.prefix):
            x = run_layer(i, x)
        if layout.scanned:
            scan_cls = remat_block(T5Block, remat, (4, 7), in_scan=True)
            decoder, dtype, param_dtype = self.decoder, self.dtype, self.param_dtype

            def step(p, kind, x, carry, shared):
                x, aux = scan_cls(c, kind, decoder, dtype, param_dtype, name=f"block{p}")(
                    x, shared["bias"], shared["self_mask"], deterministic, shared["encoded"], shared["cross_mask"],
                    packed)
                return x, carry, {"losses": aux.get("losses", {}), "stats": aux.get("stats", {})}

            (x, _), outs = scanned_group(layout, step)((x, None), {
                "bias": bias, "self_mask": self_mask, "encoded": encoded, "cross_mask": cross_mask})
            for i, out in layout.per_layer(outs):
                record(i, out)
        for i in layout.suffix:   # every layer when the stack is not scanned
            x = run_layer(i, x)
        x = make_norm(c.norm, c.norm_eps, self.dtype, self.param_dtype, "final_norm")(x)
        return x, losses, stats


def _check_segments(encoder_segment_ids, decoder_segment_ids) -> None:
    if (encoder_segment_ids is None) != (decoder_segment_ids is None):
        raise ValueError("EncoderDecoderLM: packed rows need both encoder_segment_ids and decoder_segment_ids "
                         "(the cross-attention pairs documents by id), or neither")


def _merge(*auxes: Aux) -> Aux:
    losses: dict[str, jax.Array] = {}
    stats: dict[str, jax.Array] = {}
    for aux in auxes:
        for k, v in aux["losses"].items():
            losses[k] = losses.get(k, 0.0) + v
        stats.update(aux["stats"])
    return {"losses": losses, "stats": stats}


class EncoderDecoderLM(nn.Module):
    """T5 / Switch Transformers encoder-decoder; see the module docstring for the call."""

    cfg: Any

    causal: ClassVar[bool] = True           # the decoder is causal: routers must be causal
    objective: ClassVar[str] = "seq2seq"    # training/step.py objective_batch -> seq2seq_batch

    @classmethod
    def stack_layouts(cls, cfg: Any) -> dict[tuple[str, ...], Any]:
        """The encoder's and the decoder's layer stacks (``encoder/``, ``decoder/``)."""
        kinds = stack_kinds(cfg)
        scan = scan_enabled(cfg, kinds["encoder"] + kinds["decoder"])
        return {(name,): stack_layout(kinds[name], scan) for name in ("encoder", "decoder")}

    def setup(self):
        c = self.cfg
        dtype, param_dtype = resolve_dtype(c.dtype), jnp.dtype(c.param_dtype)
        self.embed = Embed(int(c.vocab_size), int(c.d_model), dtype=dtype, param_dtype=param_dtype,
                                 scale_attend=True)
        self.encoder = T5Stack(c, False, dtype, param_dtype)
        self.decoder = T5Stack(c, True, dtype, param_dtype)
        if not c.tie_embeddings:
            self.unembed = self.param("unembed", param(nn.initializers.normal(1.0), ("embed", "vocab")),
                                      (int(c.d_model), int(c.vocab_size)), param_dtype)

    def encode(self, encoder_tokens: jax.Array, encoder_mask: jax.Array | None = None, *,
               deterministic: bool = True, encoder_segment_ids: jax.Array | None = None) -> tuple[jax.Array, Aux]:
        """Encoder output ``[B, e, D]`` and its aux (stats under ``encoder/``);
        ``encoder_segment_ids`` ``[B, e]``: packed documents (module docstring)."""
        h, losses, stats = self.encoder(self.embed(encoder_tokens), encoder_mask, deterministic,
                                        segment_ids=encoder_segment_ids)
        return h, {"losses": losses, "stats": {f"encoder/{k}": v for k, v in stats.items()}}

    def decode(self, decoder_tokens: jax.Array, encoded: jax.Array, encoder_mask: jax.Array | None = None,
               decoder_mask: jax.Array | None = None, *, deterministic: bool = True,
               encoder_segment_ids: jax.Array | None = None,
               decoder_segment_ids: jax.Array | None = None) -> tuple[jax.Array, Aux]:
        """float32 logits ``[B, L, V]`` of the decoder over ``encoded`` (from :meth:`encode`);
        packed documents: both segment ids or neither (module docstring)."""
        _check_segments(encoder_segment_ids, decoder_segment_ids)
        y, losses, stats = self.decoder(self.embed(decoder_tokens), decoder_mask, deterministic, encoded,
                                        encoder_mask, segment_ids=decoder_segment_ids,
                                        encoder_segment_ids=encoder_segment_ids)
        if self.cfg.tie_embeddings:
            logits = self.embed.attend(y)     # scaled by d_model**-0.5 (T5)
        else:
            logits = jnp.einsum("BLD,DV->BLV", y, jnp.asarray(self.unembed, y.dtype))
        return logits.astype(jnp.float32), {"losses": losses,
                                            "stats": {f"decoder/{k}": v for k, v in stats.items()}}

    def __call__(self, encoder_tokens, decoder_tokens: jax.Array | None = None, *,
                 encoder_mask: jax.Array | None = None, decoder_mask: jax.Array | None = None,
                 deterministic: bool = True, targets: jax.Array | None = None,
                 loss_weights: jax.Array | None = None, encoder_segment_ids: jax.Array | None = None,
                 decoder_segment_ids: jax.Array | None = None) -> tuple[jax.Array, Aux]:
        del targets, loss_weights   # given to every model by the train step; no loss term here reads them
        if isinstance(encoder_tokens, Mapping):
            unknown = sorted(set(encoder_tokens) - set(INPUT_KEYS))
            if unknown or decoder_tokens is not None:
                raise ValueError(f"EncoderDecoderLM: a dict input takes the keys {', '.join(INPUT_KEYS)} and no "
                                 f"decoder_tokens argument; got keys {sorted(encoder_tokens)}")
            inputs = encoder_tokens
            encoder_tokens, decoder_tokens = inputs["encoder_tokens"], inputs.get("decoder_tokens")
            encoder_mask = inputs.get("encoder_mask", encoder_mask)
            decoder_mask = inputs.get("decoder_mask", decoder_mask)
            encoder_segment_ids = inputs.get("encoder_segment_ids", encoder_segment_ids)
            decoder_segment_ids = inputs.get("decoder_segment_ids", decoder_segment_ids)
        if decoder_tokens is None:
            if not self.is_initializing():
                raise ValueError("EncoderDecoderLM needs decoder_tokens (the targets shifted right)")
            decoder_tokens = encoder_tokens   # init from one token array (zoo's generic init)
            decoder_segment_ids = encoder_segment_ids
        _check_segments(encoder_segment_ids, decoder_segment_ids)
        encoded, enc_aux = self.encode(encoder_tokens, encoder_mask, deterministic=deterministic,
                                       encoder_segment_ids=encoder_segment_ids)
        logits, dec_aux = self.decode(decoder_tokens, encoded, encoder_mask, decoder_mask,
                                      deterministic=deterministic, encoder_segment_ids=encoder_segment_ids,
                                      decoder_segment_ids=decoder_segment_ids)
        return logits, _merge(enc_aux, dec_aux)


def split_point(length: int, split: float) -> int:
    """Encoder length ``e`` of a packed row of ``length`` tokens (:func:`seq2seq_batch`)."""
    return int(np.clip(round(split * length), 1, length - 1))


def stack_lengths(model_cfg: Any, seq_len: int) -> tuple[int, int]:
    """``(encoder length, decoder length)`` a packed row of ``seq_len`` tokens becomes under
    ``model.seq2seq_objective``."""
    if str(model_cfg.get("seq2seq_objective", "prefix_lm")) == "span_corruption":
        _, _, enc, dec = span_lengths(seq_len, float(model_cfg.span_noise_density),
                                      float(model_cfg.span_mean_length))
        eos = int(bool(model_cfg.get("span_append_eos", True)))
        return enc + eos, dec + eos
    p = split_point(seq_len, float(model_cfg.seq2seq_split))
    return p, seq_len - p + 1


def flops_per_token(params: Any, model_cfg: Any, seq_len: int) -> dict[str, float]:
    """Forward and training FLOPs per packed token of the seq2seq objective.

    A row of ``L`` tokens feeds ``e`` tokens to the encoder and ``Ld`` to the decoder
    (:func:`stack_lengths`: ``e`` = :func:`split_point` and ``Ld = L - e + 1`` with the
    start id for the prefix-LM split; :func:`span_lengths`, plus the EOS of each, for span
    corruption). With active parameters (as
    :func:`routezoo.zoo.count_params` counts them) ``N_enc`` under ``encoder``, ``N_kv``
    in the decoder's cross-attention keys and values (applied to the ``e`` encoder
    outputs) and ``N_dec`` in the rest of ``decoder``, the forward FLOPs of a row are
    ``2·N_enc·e + 2·N_kv·e + 2·N_dec·Ld + 2·D·V·Ld`` (unembedding) plus attention
    ``4·H·A·(layers_enc·e² + layers_dec·(Ld² + Ld·e))``; per token they are divided by
    ``L``, and training is three times the forward (PaLM's convention, as
    :func:`routezoo.zoo.flops_per_token`). Embedding lookups cost nothing.
    """
    from routezoo.zoo import param_sizes

    c = model_cfg
    p, ld = stack_lengths(c, seq_len)
    n_enc = n_kv = n_dec = 0.0
    for keys, _, active in param_sizes(params, c, seq_len):
        if keys[0] == "encoder":
            n_enc += active
        elif keys[0] == "decoder" and "cross" in keys[1:-1] and keys[keys.index("cross") + 1] in ("k", "v"):
            # decoder/layer{i}/cross/k, or decoder/layers/block{p}/cross/k when scanned
            n_kv += active
        elif keys[0] == "decoder":
            n_dec += active
    layers_dec = int(c.num_decoder_layers) or int(c.num_layers)
    hk = int(c.num_heads) * int(c.head_dim)
    fwd = (2 * n_enc * p + 2 * n_kv * p + 2 * n_dec * ld + 2 * c.d_model * c.vocab_size * ld
           + 4 * hk * (int(c.num_layers) * p * p + layers_dec * (ld * ld + ld * p)))
    return {"forward": fwd / seq_len, "train": 3 * fwd / seq_len}


SEQ2SEQ_OBJECTIVES = ("prefix_lm", "span_corruption")


def span_lengths(length: int, noise_density: float, mean_span: float) -> tuple[int, int, int, int]:
    """``(noise tokens, spans, encoder length, decoder target length)`` of T5's span
    corruption of a row of ``length`` tokens: ``round(length·density)`` noise tokens (at
    least 1, at most ``length - 1``) in ``round(noise / mean_span)`` spans (at least 1);
    the encoder reads the ``length - noise`` kept tokens plus one sentinel per span, the
    decoder predicts a sentinel per span plus the noise tokens."""
    noise = int(np.clip(round(length * noise_density), 1, length - 1))
    spans = int(max(1, min(round(noise / mean_span), noise, length - noise)))
    return noise, spans, length - noise + spans, noise + spans


def _random_segments(key: jax.Array, num_items: int, num_segments: int) -> jax.Array:
    """Segment id ``[num_items]`` of a uniformly random split of ``num_items`` items into
    ``num_segments`` non-empty consecutive segments (T5's ``_random_segmentation``)."""
    first = jnp.arange(num_items - 1) < num_segments - 1            # segment starts among items 1..n-1
    first = jax.random.permutation(key, first)
    return jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(first.astype(jnp.int32))])


def span_corruption_batch(batch: Mapping[str, jax.Array], rng: jax.Array, *, vocab_size: int,
                          noise_density: float = 0.15, mean_span: float = 3.0, start_id: int = 0,
                          pad_id: int = 0, eos_id: int | None = 1
                          ) -> tuple[dict[str, jax.Array], jax.Array, jax.Array]:
    """T5's span corruption (Raffel et al. 2020, section 3.1.4; their defaults: 15% noise,
    mean span 3) of packed rows into ``(inputs, targets, weights)``.

    Each row ``t_0..t_{L-1}`` (``batch['inputs']``) is cut into ``2·spans`` alternating
    segments, kept then noise, of random lengths (:func:`span_lengths` fixes the counts,
    so every shape is static). The encoder reads the kept tokens with noise span ``i``
    replaced by the sentinel ``vocab_size - 1 - i`` (T5's ``<extra_id_i>``); the decoder
    predicts, for each span ``i``, the sentinel then its tokens, from the start id and the
    targets shifted right. Sentinels must lie above the tokenizer's ids (the config check
    asks ``model.vocab_size`` to leave room for them). Pad tokens (``pad_id``) keep mask 0
    in the encoder and weight 0 in the targets. Each row draws its own segmentation from
    ``rng``. With ``eos_id`` (routezoo's tokenizers: 1; ``None``: none) both the encoder
    input and the targets end with it, as T5's pipeline appends EOS to both (its length
    helper counts it in); it sits at the row's last position, after any padding, with mask
    and weight 1: the decoder learns where the targets stop.

    Packed rows (``batch['segment_ids']``, ``data.packing='masked'``): every encoder token
    and target keeps the document it came from (a sentinel: its span's first token's; the
    appended eos: the row's last document), the decoder input is the targets shifted right
    within each document with the start id at each document's first target (as T5 packs
    examples), and ``inputs`` gains ``encoder_segment_ids`` / ``decoder_segment_ids``, so
    no attention crosses a document. A noise span that straddles two documents keeps the
    first one's sentinel.
    """
    x = batch["inputs"]
    b, length = x.shape
    noise, spans, enc_len, dec_len = span_lengths(length, noise_density, mean_span)
    packed = "segment_ids" in batch
    segs = jnp.asarray(batch["segment_ids"]) if packed else jnp.zeros_like(x)

    def one(row, seg_row, key):
        k_noise, k_keep = jax.random.split(key)
        noise_seg = _random_segments(k_noise, noise, spans)                                # [noise]
        keep_seg = _random_segments(k_keep, length - noise, spans)                         # [length - noise]
        keep_len = jnp.zeros((spans,), jnp.int32).at[keep_seg].add(1)
        noise_len = jnp.zeros((spans,), jnp.int32).at[noise_seg].add(1)
        # segments in row order: keep_0, noise_0, keep_1, noise_1, ...
        seg_len = jnp.stack([keep_len, noise_len], axis=1).reshape(-1)                     # [2·spans]
        seg_of = jnp.repeat(jnp.arange(2 * spans), seg_len, total_repeat_length=length)     # [L]
        seg_start = jnp.cumsum(seg_len) - seg_len
        is_noise = seg_of % 2 == 1
        span = seg_of // 2
        first = jnp.arange(length) == seg_start[seg_of]
        sentinel = vocab_size - 1 - span
        # encoder: kept tokens, and each noise span's first token as its sentinel
        enc_keep = ~is_noise | first
        enc_pos = jnp.cumsum(enc_keep) - 1
        enc_tok = jnp.where(is_noise, sentinel, row)
        enc = jnp.full((enc_len,), pad_id, row.dtype).at[jnp.where(enc_keep, enc_pos, enc_len)].set(
            enc_tok.astype(row.dtype), mode="drop")
        enc_real = jnp.zeros((enc_len,), bool).at[jnp.where(enc_keep, enc_pos, enc_len)].set(
            is_noise | (row != pad_id), mode="drop")
        # decoder targets: for each noise span, its sentinel then its tokens
        tgt_pos = jnp.where(is_noise, jnp.cumsum(is_noise) - 1 + span + 1, dec_len)        # after i+1 sentinels
        sent_pos = jnp.where(is_noise & first, tgt_pos - 1, dec_len)
        tgt = jnp.full((dec_len,), pad_id, row.dtype).at[tgt_pos].set(row, mode="drop")
        tgt = tgt.at[sent_pos].set(sentinel.astype(row.dtype), mode="drop")
        tgt_w = jnp.zeros((dec_len,), jnp.float32).at[tgt_pos].set(
            (row != pad_id).astype(jnp.float32), mode="drop").at[sent_pos].set(1.0, mode="drop")
        # packed rows: every encoder token and target keeps its document (a sentinel: its span's)
        enc_seg = jnp.zeros((enc_len,), jnp.int32).at[jnp.where(enc_keep, enc_pos, enc_len)].set(
            seg_row, mode="drop")
        tgt_seg = jnp.zeros((dec_len,), jnp.int32).at[tgt_pos].set(seg_row, mode="drop")
        return enc, enc_real, tgt, tgt_w, enc_seg, tgt_seg

    enc, enc_real, tgt, tgt_w, enc_seg, tgt_seg = jax.vmap(one)(x, segs, jax.random.split(rng, b))
    if eos_id is not None:
        eos = jnp.full((b, 1), eos_id, x.dtype)
        enc = jnp.concatenate([enc, eos], axis=1)
        enc_real = jnp.concatenate([enc_real, jnp.ones((b, 1), bool)], axis=1)
        tgt = jnp.concatenate([tgt, eos], axis=1)
        tgt_w = jnp.concatenate([tgt_w, jnp.ones((b, 1), tgt_w.dtype)], axis=1)
        last = jnp.max(segs, axis=1, keepdims=True)   # the eos closes the row's last document
        enc_seg = jnp.concatenate([enc_seg, last], axis=1)
        tgt_seg = jnp.concatenate([tgt_seg, last], axis=1)
    dec_in = jnp.concatenate([jnp.full((b, 1), start_id, x.dtype), tgt[:, :-1]], axis=1)
    dec_mask = jnp.concatenate([jnp.ones((b, 1), bool), tgt_w[:, :-1] > 0], axis=1)
    inputs = {"encoder_tokens": enc, "decoder_tokens": dec_in, "encoder_mask": enc_real.astype(jnp.int32),
              "decoder_mask": dec_mask.astype(jnp.int32)}
    if packed:   # T5's packing: the targets shifted right within each document, the start id first
        starts = jnp.concatenate([jnp.ones((b, 1), bool), tgt_seg[:, 1:] != tgt_seg[:, :-1]], axis=1)
        inputs["decoder_tokens"] = jnp.where(starts, jnp.asarray(start_id, x.dtype), dec_in)
        inputs["decoder_mask"] = jnp.where(starts, 1, inputs["decoder_mask"])
        inputs["encoder_segment_ids"], inputs["decoder_segment_ids"] = enc_seg, tgt_seg
    return inputs, tgt, tgt_w


def seq2seq_batch(batch: Mapping[str, jax.Array], *, split: float, start_id: int = 0, pad_id: int = 0
                  ) -> tuple[dict[str, jax.Array], jax.Array, jax.Array]:
    """Prefix-LM split of packed next-token rows into ``(inputs, targets, weights)``.

    A row ``t_0 .. t_L`` (``batch['inputs']`` = ``t_0..t_{L-1}``, ``batch['targets']`` =
    ``t_1..t_L``, ``batch['weights']`` 0 at padding) is cut at ``e = round(split·L)``
    (clipped to ``[1, L-1]``): the encoder reads ``t_0..t_{e-1}`` (mask: not ``pad_id``), the
    decoder predicts ``t_e..t_L`` from ``start_id, t_e..t_{L-1}`` (targets shifted right,
    as T5). ``inputs`` is the dict :class:`EncoderDecoderLM` takes; ``targets``/``weights``
    ``[B, L-e+1]``. Packed rows (``batch['segment_ids']``): ``inputs`` gains
    ``encoder_segment_ids`` (the first ``e`` tokens') and ``decoder_segment_ids`` (decoder
    position ``j`` reads row token ``e-1+j``'s document; the start id belongs to the
    encoder's last document), so a decoder document attends to its own part in the encoder
    only (none: a document that starts after the cut is plain language modelling).
    """
    x, y, w = batch["inputs"], batch["targets"], batch["weights"]
    length = x.shape[1]
    p = split_point(length, split)
    enc = x[:, :p]
    dec_targets, dec_w = y[:, p - 1:], w[:, p - 1:]
    dec_in = jnp.concatenate([jnp.full((x.shape[0], 1), start_id, x.dtype), x[:, p:]], axis=1)
    dec_mask = (dec_in != pad_id).at[:, 0].set(True)    # the start id is real even when it is the pad id
    inputs = {"encoder_tokens": enc, "decoder_tokens": dec_in, "encoder_mask": (enc != pad_id).astype(jnp.int32),
              "decoder_mask": dec_mask.astype(jnp.int32)}
    if "segment_ids" in batch:   # packed rows: decoder position j reads row token p-1+j (the start id: p-1)
        seg = jnp.asarray(batch["segment_ids"])
        inputs["encoder_segment_ids"], inputs["decoder_segment_ids"] = seg[:, :p], seg[:, p - 1:]
    return inputs, dec_targets, dec_w


__all__ = ["EncoderDecoderLM", "SEQ2SEQ_OBJECTIVES", "T5Block", "T5Stack", "flops_per_token", "seq2seq_batch",
           "span_corruption_batch", "span_lengths", "sparse_kinds", "split_point", "stack_kinds", "stack_lengths"]
