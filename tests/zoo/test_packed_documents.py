"""Packed rows (``segment_ids``, positions restarting per document): the logits of every
document of a packed row equal those of the document run alone, for the decoder with a
top-k MoE and grouped key/value heads, latent attention (with DeepSeek-V3 routing), UoE
(selective attention and the union of MLP slices), multi-token prediction (trunk and MTP
logits), the bidirectional masked-token encoder and the T5 encoder-decoder (encoder and
decoder both packed, documents paired by id); ``positions_from_segments``; the MTP loss
drops positions whose target lies in the next document; decoding a prompt of packed
documents through the cache.

Every MoE layer runs dropless (UoE's head buffers with ``C = L``), so nothing couples the
tokens of a row: capacity dispatch, which drops by buffer position, would couple the
documents of a row exactly as it couples the sequences of a routing group, and is left
out on purpose.

Two rows of L=14: documents of 5, 3, 4 tokens then 2 padding, and 4, 5, 3 then padding;
the documents alone run as one right-padded batch of 6 rows (causal models need no mask
for that, the encoders get ``attention_mask``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import packed_documents as conftest_packed_documents
from conftest import packed_ids as conftest_packed_ids
from conftest import tiny_config
from routezoo import zoo
from routezoo.zoo.lm import init_cache, mtp_loss, positions_from_segments

LENGTHS = ((5, 3, 4), (4, 5, 3))
L = 14
TOL = dict(rtol=1e-5, atol=1e-5)
VOCAB = 64

BASE = {"model.num_heads": 4, "model.num_kv_heads": 2, "model.head_dim": 8, "model.vocab_size": VOCAB,
        "model.ffn": "mlp,moe", "model.moe.num_experts": 4, "model.moe.k": 2, "model.moe.expert_dim": 16,
        "model.moe.dispatch": "dropless", "model.moe.jitter": 0.0}
CASES = {
    "topk_gqa": {},
    "mla_deepseek_v3": {"model.attention": "mla", "model.mla_q_lora_rank": 8, "model.mla_kv_lora_rank": 8,
                        "model.mla_qk_nope_head_dim": 8, "model.mla_qk_rope_head_dim": 4, "model.mla_v_head_dim": 6,
                        "model.moe.router": "deepseek_v3", "model.moe.num_shared_experts": 1},
    # k_h = 2 of H = 4 heads per token and capacity factor H / k_h: C = L, nothing dropped
    "uoe": {"model.moe.router": "uoe", "model.moe.uoe_attn_k": 2, "model.moe.uoe_capacity_factor": 2.0},
    "mtp": {"model.mtp_depth": 1},
    "encoder_mlm": {"model.name": "encoder_mlm"},
}


def packed(lengths=LENGTHS, length=L):
    """``(segment_ids, positions)`` int32 ``[B, length]`` (:func:`conftest.packed_ids`)."""
    seg, pos = conftest_packed_ids(lengths, length)
    return jnp.asarray(seg), jnp.asarray(pos)


def documents(lengths=LENGTHS):
    """``(row, start, n)`` of every document (:func:`conftest.packed_documents`)."""
    return conftest_packed_documents(lengths)


def unpack(tokens, lengths=LENGTHS):
    """The documents of packed ``tokens`` as one right-padded batch ``[docs, max n]`` and its mask."""
    docs = list(documents(lengths))
    width = max(n for _, _, n in docs)
    rows = np.zeros((len(docs), width), np.int32)
    mask = np.zeros((len(docs), width), np.int32)
    for i, (b, start, n) in enumerate(docs):
        rows[i, :n], mask[i, :n] = np.asarray(tokens[b, start:start + n]), 1
    return jnp.asarray(rows), jnp.asarray(mask)


def assert_each_document_matches(packed_out, alone_out, lengths=LENGTHS):
    assert np.all(np.isfinite(np.asarray(packed_out))), "padding produced non-finite outputs"
    for i, (b, start, n) in enumerate(documents(lengths)):
        np.testing.assert_allclose(packed_out[b, start:start + n], alone_out[i, :n], **TOL)


def tokens_of(shape, seed=0):
    return jax.random.randint(jax.random.key(seed), shape, 2, VOCAB - 1)


@functools.lru_cache(maxsize=None)
def built(case):
    """``(model, variables)`` of a case, initialised once per test session."""
    cfg = tiny_config("", **{**BASE, **CASES[case]}).model
    model = zoo.build(cfg)
    return model, jax.jit(model.init)(jax.random.key(1), jnp.zeros((2, L), jnp.int32))


def test_positions_from_segments():
    seg, pos = packed()
    np.testing.assert_array_equal(positions_from_segments(seg), pos)
    np.testing.assert_array_equal(positions_from_segments(jnp.array([[1, 1, 2, 2, 2, 3, 0, 0]])),
                                  [[0, 1, 0, 1, 2, 0, 0, 0]])


@pytest.mark.parametrize("case", sorted(CASES))
def test_packed_row_logits_equal_each_document_alone(case):
    model, variables = built(case)
    seg, pos = packed()
    tokens = jnp.where(seg > 0, tokens_of((2, L)), 0)
    bidirectional = not model.causal
    out, aux = jax.jit(lambda v, t: model.apply(v, t, segment_ids=seg, positions=pos))(variables, tokens)
    rows, mask = unpack(tokens)
    kw = {"attention_mask": mask} if bidirectional else {}
    ref, ref_aux = jax.jit(lambda v, t: model.apply(v, t, **kw))(variables, rows)
    assert_each_document_matches(out, ref)
    if case == "mtp":   # the MTP module reads t[i+1] of the same document (padding past its end)
        assert_each_document_matches(aux["mtp_logits"][0], ref_aux["mtp_logits"][0])
    # without segment ids the later documents see the earlier ones (the comparison can fail)
    mixed, _ = jax.jit(lambda v, t: model.apply(v, t, positions=pos))(variables, tokens)
    assert not np.allclose(mixed[0, 5:8], ref[1, :3], atol=1e-3)


def test_encoder_decoder_packed_pairs_equal_each_pair_alone():
    cfg = tiny_config("", **{**BASE, "model.name": "encoder_decoder", "model.encoder_sparse_step": 2,
                             "model.decoder_sparse_step": 2, "model.ffn": "mlp"}).model
    model = zoo.build(cfg)
    enc_lengths, enc_len = ((3, 6, 2), (5, 2, 4)), 12
    enc_seg, _ = packed(enc_lengths, enc_len)
    dec_seg, _ = packed()
    enc = jnp.where(enc_seg > 0, tokens_of((2, enc_len), seed=1), 0)
    dec = jnp.where(dec_seg > 0, tokens_of((2, L), seed=2), 0)
    variables = jax.jit(model.init)(jax.random.key(1), enc, dec)
    inputs = {"encoder_tokens": enc, "decoder_tokens": dec, "encoder_mask": (enc_seg > 0).astype(jnp.int32),
              "decoder_mask": (dec_seg > 0).astype(jnp.int32), "encoder_segment_ids": enc_seg,
              "decoder_segment_ids": dec_seg}
    out, _ = jax.jit(lambda v, x: model.apply(v, x))(variables, inputs)
    enc_rows, enc_mask = unpack(enc, enc_lengths)
    dec_rows, dec_mask = unpack(dec)
    ref, _ = jax.jit(lambda v, e, d, em, dm: model.apply(v, e, d, encoder_mask=em, decoder_mask=dm))(
        variables, enc_rows, dec_rows, enc_mask, dec_mask)
    assert_each_document_matches(out, ref)
    # the keyword form, without the padding masks (the segment ids cover the padding)
    kw, _ = jax.jit(lambda v, e, d: model.apply(v, e, d, encoder_segment_ids=enc_seg,
                                                 decoder_segment_ids=dec_seg))(variables, enc, dec)
    assert_each_document_matches(kw, ref)
    with pytest.raises(ValueError, match="both encoder_segment_ids and decoder_segment_ids"):
        model.apply(variables, enc, dec, encoder_segment_ids=enc_seg)


def test_mtp_loss_drops_targets_in_the_next_document():
    seg = jnp.array([[1, 1, 1, 2, 2, 0]])
    targets = jnp.array([[3, 4, 5, 6, 7, 0]])
    weights = jnp.array([[1.0, 1.0, 1.0, 1.0, 0.0, 0.0]])
    logits = jax.random.normal(jax.random.key(0), (1, 6, 8))
    got = mtp_loss([logits], targets, weights, seg)
    # depth 1: position i predicts targets[i + 1]; kept where i + 1 is in i's document and weighted
    logp = jax.nn.log_softmax(logits[0], -1)
    # (i = 2 predicts targets[3], the next document's; i = 3's target has weight 0)
    want = -(logp[0, 4] + logp[1, 5]) / 2
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_decoding_a_prompt_of_packed_documents():
    """The first row's two documents and the first token of its third as a prompt, then one
    token at a time: with segment ids and positions on every call the cached logits equal
    the packed full pass's."""
    model, variables = built("topk_gqa")
    seg, pos = packed()
    tokens = jnp.where(seg > 0, tokens_of((2, L), seed=3), 0)
    full, _ = jax.jit(lambda v, t: model.apply(v, t, segment_ids=seg, positions=pos))(variables, tokens)

    @jax.jit
    def step(cache, t, p, s):
        (logits, _), state = model.apply({**variables, "cache": cache}, t, positions=p, segment_ids=s,
                                         decode=True, mutable=["cache"])
        return logits, state["cache"]

    cache, outs = init_cache(model, 2, 16), []
    for sl in [slice(0, 9)] + [slice(t, t + 1) for t in range(9, 12)]:
        logits, cache = step(cache, tokens[:, sl], pos[:, sl], seg[:, sl])
        outs.append(logits)
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full[:, :12], **TOL)


# ------------------------------------------------------- encoder-decoder objectives on packed rows

def _packed_row_batch():
    seg = np.array([[1] * 9 + [2] * 14 + [3] * 6 + [0] * 3], np.int32)
    tokens = np.where(seg > 0, 10 + np.arange(seg.shape[1]), 0).astype(np.int32)
    return {"inputs": jnp.asarray(tokens), "targets": jnp.asarray(np.roll(tokens, -1, 1)),
            "weights": jnp.asarray((seg > 0).astype(np.float32)), "segment_ids": jnp.asarray(seg)}, tokens[0], seg[0]


def test_span_corruption_keeps_every_token_in_its_document():
    from routezoo.zoo.encoder_decoder import span_corruption_batch
    batch, tokens, seg = _packed_row_batch()
    vocab = 200
    for key in range(5):
        inputs, tgt, w = span_corruption_batch(batch, jax.random.key(key), vocab_size=vocab, noise_density=0.3,
                                               mean_span=2.0, eos_id=1)
        enc, enc_seg = np.asarray(inputs["encoder_tokens"][0]), np.asarray(inputs["encoder_segment_ids"][0])
        tg, dec_seg = np.asarray(tgt[0]), np.asarray(inputs["decoder_segment_ids"][0])
        dec_in = np.asarray(inputs["decoder_tokens"][0])
        for k in (1, 2, 3):   # the document's tokens: kept in the encoder or predicted, all labelled k
            real = lambda a, s: {int(t) for t in a[(s == k) & (a >= 10) & (a < vocab - 40)]}
            assert real(enc, enc_seg) | real(tg, dec_seg) == {int(t) for t in tokens[seg == k]}
            assert not real(enc, enc_seg) & real(tg, dec_seg)
        starts = np.flatnonzero(np.diff(dec_seg, prepend=-1))
        assert (dec_in[starts] == 0).all()                  # the start id opens each document's targets
        inner = np.setdiff1d(np.arange(1, len(dec_in)), starts)
        np.testing.assert_array_equal(dec_in[inner], tg[inner - 1])   # shifted right within a document


def test_prefix_lm_split_keeps_documents_paired():
    from routezoo.zoo.encoder_decoder import seq2seq_batch, split_point
    batch, _, seg = _packed_row_batch()
    inputs, _, _ = seq2seq_batch(batch, split=0.5)
    p = split_point(len(seg), 0.5)
    np.testing.assert_array_equal(inputs["encoder_segment_ids"][0], seg[:p])
    np.testing.assert_array_equal(inputs["decoder_segment_ids"][0], seg[p - 1:])
    assert "encoder_segment_ids" not in seq2seq_batch({k: v for k, v in batch.items() if k != "segment_ids"},
                                                      split=0.5)[0]
