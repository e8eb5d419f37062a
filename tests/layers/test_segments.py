"""Packed documents (segment ids) in the attention layers: ``segment_mask_of`` against a
loop; grouped-query ``Attention`` (causal and bidirectional, rotary positions restarting
per document), latent attention (``MLAttention``), T5 self- and cross-attention with the
relative position bias, and UoE's ``SelectiveAttention`` each give, on a packed row, the
outputs of every document run alone; decoding through the key/value cache with segment
ids equals the full forward pass; on GPUs, the cuDNN path with a segment mask (and
cuDNN's packed offsets layout) against the XLA path.

Shapes are small (B=2 rows of L=14: documents of 5, 3, 4 tokens then 2 padding in row 0,
4, 5, 3 then padding in row 1; D=16, H=4 heads, U=2 key/value heads, A=8), float32.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from conftest import packed_documents as conftest_packed_documents
from conftest import packed_ids as conftest_packed_ids
from routezoo.layers import t5
from routezoo.layers.attention import (Attention, cudnn_packed_attention, segment_lengths_and_offsets,
                                       segment_mask_of)
from routezoo.layers.mla import MLAttention
from routezoo.layers.moe.uoe import SelectiveAttention

D, H, U, A = 16, 4, 2, 8
LENGTHS = ((5, 3, 4), (4, 5, 3))   # documents of each row
L = 14                              # 12 real tokens, 2 padding
TOL = dict(rtol=1e-5, atol=1e-5)


def packed_ids(lengths=LENGTHS, length=L):
    """``(segment_ids, positions)`` int32 ``[B, length]`` (:func:`conftest.packed_ids`)."""
    seg, pos = conftest_packed_ids(lengths, length)
    return jnp.asarray(seg), jnp.asarray(pos)


SEG, POS = packed_ids()


def rand(*shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def documents(lengths=LENGTHS):
    """``(row, start, n)`` of every document (:func:`conftest.packed_documents`)."""
    return conftest_packed_documents(lengths)


def assert_documents_match(packed_out, run_alone, lengths=LENGTHS):
    """``packed_out [B, L, ...]`` at each document equals ``run_alone(b, start, n)``."""
    assert np.all(np.isfinite(np.asarray(packed_out))), "padding produced non-finite outputs"
    for b, start, n in documents(lengths):
        np.testing.assert_allclose(packed_out[b, start:start + n], run_alone(b, start, n), **TOL)


def test_segment_mask_of_matches_a_loop():
    rng = np.random.default_rng(0)
    q = rng.integers(0, 4, (3, 7))
    kv = rng.integers(0, 4, (3, 5))
    want = np.zeros((3, 1, 7, 5), bool)
    for b in range(3):
        for i in range(7):
            for j in range(5):
                want[b, 0, i, j] = q[b, i] == kv[b, j]   # padding (0) sees padding only
    np.testing.assert_array_equal(segment_mask_of(jnp.asarray(q), jnp.asarray(kv)), want)
    # with causality every query keeps at least its own key: no empty softmax row
    m = np.asarray(segment_mask_of(SEG, SEG))[:, 0] & np.tril(np.ones((L, L), bool))
    assert m.any(-1).all()


def test_segment_lengths_and_offsets():
    seqlen, offsets = segment_lengths_and_offsets(SEG, 4)
    np.testing.assert_array_equal(seqlen, [[5, 3, 4, -1], [4, 5, 3, -1]])
    np.testing.assert_array_equal(offsets, [[0, 5, 8, -1, -1], [0, 4, 9, -1, -1]])


@pytest.mark.parametrize("causal", [True, False])
def test_grouped_query_attention_packed_equals_each_document_alone(causal):
    att = Attention(num_heads=H, num_kv_heads=U, head_dim=A, causal=causal)
    x = rand(2, L, D)
    variables = att.init(jax.random.key(1), x)
    packed = att.apply(variables, x, POS, None, False, SEG)
    alone = jax.jit(lambda x, pos: att.apply(variables, x, pos))
    assert_documents_match(packed, lambda b, s, n: alone(x[b:b + 1, s:s + n], jnp.arange(n)[None])[0])
    # without segment ids the documents do see each other (the test can fail)
    mixed = att.apply(variables, x, POS)
    assert not np.allclose(mixed[0, 5:8], alone(x[:1, 5:8], jnp.arange(3)[None])[0], atol=1e-3)


def test_segment_ids_and_a_padding_mask_combine():
    """A padding mask given with segment ids is and-ed in: masking the padding keys
    changes nothing for the real tokens (they never saw them) and keeps outputs finite."""
    att = Attention(num_heads=H, num_kv_heads=U, head_dim=A, causal=False)
    x = rand(2, L, D)
    variables = att.init(jax.random.key(1), x)
    keys = (SEG > 0)[:, None, None, :]
    both = att.apply(variables, x, POS, keys, False, SEG)
    only = att.apply(variables, x, POS, None, False, SEG)
    assert np.all(np.isfinite(np.asarray(both)))
    np.testing.assert_allclose(both[:, :12], only[:, :12], **TOL)


@pytest.mark.parametrize("causal", [True, False])
def test_latent_attention_packed_equals_each_document_alone(causal):
    mla = MLAttention(num_heads=H, kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6,
                      q_lora_rank=8, causal=causal)
    x = rand(2, L, D, seed=1)
    variables = mla.init(jax.random.key(1), x)
    packed = mla.apply(variables, x, POS, None, False, SEG)
    alone = jax.jit(lambda x, pos: mla.apply(variables, x, pos))
    assert_documents_match(packed, lambda b, s, n: alone(x[b:b + 1, s:s + n], jnp.arange(n)[None])[0])


class _T5SelfAttention(nn.Module):
    """T5 self-attention with its relative position bias (as a T5 stack builds them)."""
    causal: bool

    @nn.compact
    def __call__(self, x, segment_ids=None):
        l = x.shape[1]
        bias = t5.RelativePositionBias(H, 32, 128, bidirectional=not self.causal)(l, l)
        mask = t5.causal_mask(l) if self.causal else None
        return t5.T5Attention(H, A)(x, None, bias, t5.segment_mask(mask, segment_ids))


@pytest.mark.parametrize("causal", [True, False])
def test_t5_self_attention_with_relative_bias_packed_equals_each_document_alone(causal):
    """The bias comes from index differences, which within a document are the document's
    own position differences: masking alone gives each document its unpacked output."""
    att = _T5SelfAttention(causal)
    x = rand(2, L, D, seed=2)
    variables = att.init(jax.random.key(1), x)
    packed = att.apply(variables, x, SEG)
    alone = jax.jit(lambda x: att.apply(variables, x))
    assert_documents_match(packed, lambda b, s, n: alone(x[b:b + 1, s:s + n])[0])


def test_t5_cross_attention_pairs_documents_by_id():
    enc_lengths = ((3, 6, 2), (5, 2, 4))          # encoder documents, paired with LENGTHS by id
    enc_seg, _ = packed_ids(enc_lengths, 12)       # one padding token per row
    att = t5.T5Attention(H, A)
    x, enc = rand(2, L, D, seed=3), rand(2, 12, D, seed=4)
    variables = att.init(jax.random.key(1), x, enc)
    packed = att.apply(variables, x, enc, None, t5.segment_mask(t5.padding_mask(enc_seg > 0), SEG, enc_seg))
    enc_docs = {(b, i): (s, n) for i, (b, s, n) in enumerate(documents(enc_lengths))}
    dec_docs = list(documents())
    alone = jax.jit(lambda x, e: att.apply(variables, x, e))
    for i, (b, start, n) in enumerate(dec_docs):
        es, en = enc_docs[(b, i)]
        np.testing.assert_allclose(packed[b, start:start + n],
                                   alone(x[b:b + 1, start:start + n], enc[b:b + 1, es:es + en])[0], **TOL)
    assert np.all(np.isfinite(np.asarray(packed)))


def test_selective_attention_packed_equals_each_document_alone():
    """With ``C = L`` (capacity factor ``H / k_h``: nothing dropped) each document's output
    is its output alone; the segment ids are gathered into the head buffers with the
    tokens."""
    sa = SelectiveAttention(num_heads=H, head_dim=A, k=2, capacity_factor=2.0)
    x = rand(2, L, D, seed=5)
    variables = sa.init(jax.random.key(1), x)
    packed, _ = sa.apply(variables, x, POS, SEG)
    alone = jax.jit(lambda x, pos: sa.apply(variables, x, pos)[0])
    assert_documents_match(packed, lambda b, s, n: alone(x[b:b + 1, s:s + n], jnp.arange(n)[None])[0])


def _decode_in_chunks(module, variables, x, chunks):
    """Outputs of ``x`` fed through the cache in ``chunks`` (lengths), with segment ids and
    positions; the cache holds 16 slots (2 never written)."""
    cache = module.init(jax.random.key(0), jnp.zeros((x.shape[0], 16, D)), decode=True)["cache"]
    assert cache["segment_ids"].shape == (x.shape[0], 16) and cache["segment_ids"].dtype == jnp.int32
    step = jax.jit(lambda v, c, x, pos, seg: module.apply({**v, "cache": c}, x, pos, None, True, seg,
                                                          mutable=["cache"]))
    outs, start = [], 0
    for n in chunks:
        sl = slice(start, start + n)
        out, state = step(variables, cache, x[:, sl], POS[:, sl], SEG[:, sl])
        cache, start = state["cache"], start + n
        outs.append(out)
    return jnp.concatenate(outs, axis=1)


@pytest.mark.parametrize("kind", ["gqa", "mla"])
def test_decoding_with_segment_ids_equals_the_full_forward_pass(kind):
    """A prompt of two packed documents and the start of a third, then one token at a
    time: the cache keeps each slot's segment id, so every output equals the packed full
    pass's (and hence each document's own)."""
    if kind == "gqa":
        module = Attention(num_heads=H, num_kv_heads=U, head_dim=A)
    else:
        module = MLAttention(num_heads=H, kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6)
    x = rand(2, L, D, seed=6)
    variables = {"params": module.init(jax.random.key(1), x)["params"]}
    full = module.apply(variables, x, POS, None, False, SEG)
    got = _decode_in_chunks(module, variables, x, [9] + [1] * 5)
    np.testing.assert_allclose(got, full, **TOL)


# ------------------------------------------------------------------ GPU: cuDNN with segments

gpu_only = pytest.mark.skipif(jax.default_backend() != "gpu",
                              reason="cuDNN flash attention needs a GPU (jax.default_backend() != 'gpu')")


def _cudnn_in_hlo(fn, *args) -> bool:
    return "__cudnn$fmha" in jax.jit(fn).lower(*args).compile().as_text()


@gpu_only
@pytest.mark.parametrize("causal", [True, False])
def test_cudnn_segment_mask_matches_xla(causal):
    """bfloat16, L=256 (three documents and padding per row): the default path ('auto')
    runs cuDNN's fused kernel with the segment mask and agrees with the XLA path, forward
    and gradient."""
    length, lengths = 256, ((100, 60, 80), (30, 200, 10))
    seg, pos = packed_ids(lengths, length)
    kwargs = dict(num_heads=8, num_kv_heads=2, head_dim=64, causal=causal, dtype=jnp.bfloat16)
    fast, ref = Attention(**kwargs), Attention(**kwargs, implementation="xla")
    x = rand(2, length, 128, seed=7).astype(jnp.bfloat16)
    variables = fast.init(jax.random.key(1), x)

    def loss(module):
        return lambda v, x: jnp.sum(jnp.square(module.apply(v, x, pos, None, False, seg).astype(jnp.float32)))

    assert _cudnn_in_hlo(lambda v, x: fast.apply(v, x, pos, None, False, seg), variables, x)
    assert not _cudnn_in_hlo(lambda v, x: ref.apply(v, x, pos, None, False, seg), variables, x)
    got = fast.apply(variables, x, pos, None, False, seg).astype(jnp.float32)
    want = ref.apply(variables, x, pos, None, False, seg).astype(jnp.float32)
    real = np.asarray(seg > 0)
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], rtol=2e-2, atol=2e-2)
    g_fast = jax.grad(loss(fast), argnums=1)(variables, x).astype(jnp.float32)
    g_ref = jax.grad(loss(ref), argnums=1)(variables, x).astype(jnp.float32)
    scale = float(jnp.max(jnp.abs(g_ref)))
    np.testing.assert_allclose(np.asarray(g_fast)[real] / scale, np.asarray(g_ref)[real] / scale, atol=3e-2)


@gpu_only
def test_cudnn_segment_mask_in_latent_attention_matches_xla():
    length, lengths = 256, ((100, 60, 80), (30, 200, 10))
    seg, pos = packed_ids(lengths, length)
    kwargs = dict(num_heads=8, kv_lora_rank=32, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
                  dtype=jnp.bfloat16)
    fast, ref = MLAttention(**kwargs), MLAttention(**kwargs, implementation="xla")
    x = rand(2, length, 128, seed=8).astype(jnp.bfloat16)
    variables = fast.init(jax.random.key(1), x)
    assert _cudnn_in_hlo(lambda v, x: fast.apply(v, x, pos, None, False, seg), variables, x)
    got = fast.apply(variables, x, pos, None, False, seg).astype(jnp.float32)
    want = ref.apply(variables, x, pos, None, False, seg).astype(jnp.float32)
    real = np.asarray(seg > 0)
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], rtol=2e-2, atol=2e-2)


@gpu_only
@pytest.mark.parametrize("kv_heads", [8, 2])
def test_cudnn_packed_offsets_layout_matches_the_masked_xla_path(kv_heads):
    """cuDNN's packed layout (segment lengths and offsets, no mask array; private jax API,
    Hopper or later) against the XLA path with the segment mask."""
    cc = getattr(jax.devices()[0], "compute_capability", "0")
    if float(cc) < 9.0:
        pytest.skip(f"cuDNN's packed layout needs Hopper or later (compute capability {cc})")
    length, lengths = 256, ((100, 60, 80), (30, 200, 10))
    seg, _ = packed_ids(lengths, length)
    q = rand(2, length, 8, 64, seed=9).astype(jnp.bfloat16)
    k = rand(2, length, kv_heads, 64, seed=10).astype(jnp.bfloat16)
    v = rand(2, length, kv_heads, 64, seed=11).astype(jnp.bfloat16)
    got = jax.jit(lambda q, k, v: cudnn_packed_attention(q, k, v, seg, max_segments=4))(q, k, v)
    want = jax.nn.dot_product_attention(q, k, v, mask=segment_mask_of(seg, seg), is_causal=True)
    real = np.asarray(seg > 0)
    np.testing.assert_allclose(np.asarray(got.astype(jnp.float32))[real],
                               np.asarray(want.astype(jnp.float32))[real], rtol=2e-2, atol=2e-2)
    assert np.all(np.asarray(got.astype(jnp.float32))[~real] == 0)
    # gradients: the real rows agree, padding rows get exactly 0 (the kernel leaves them unwritten)
    w = jnp.asarray(real, jnp.float32)[:, :, None, None]

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * w)
    g_got = jax.jit(jax.grad(loss(lambda q, k, v: cudnn_packed_attention(q, k, v, seg, max_segments=4)),
                             argnums=(0, 1, 2)))(q, k, v)
    g_want = jax.grad(loss(lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, mask=segment_mask_of(seg, seg), is_causal=True)), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(g_got, g_want):
        a, b = np.asarray(a.astype(jnp.float32)), np.asarray(b.astype(jnp.float32))
        scale = np.abs(b).max()
        np.testing.assert_allclose(a[real] / scale, b[real] / scale, atol=3e-2)
        assert np.all(a[~real] == 0)
