"""Autoregressive decoding with a key/value cache (``DecoderLM(decode=True)``,
``zoo.lm.init_cache``, ``zoo.sampling.sample``): the logits of a prompt then one token at
a time equal the full forward pass's at every position, for standard attention (grouped
heads, q/k/v biases, QK norm, YaRN), latent attention and several routers; left-padded
prompts; the sampler draws the same tokens with and without the cache; unsupported
models are refused in one line."""

from __future__ import annotations

import jax
import jax.extend
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from routezoo.configs import base
from routezoo.zoo import lm
from routezoo.zoo.lm import init_cache, positions_from_mask
from routezoo.zoo.sampling import sample, supports_cache

CASES = {
    "gqa_bias_qknorm_yarn": {"qkv_bias": True, "qk_norm": "full",
                             "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8}},
    "moe_dropless": {"ffn": "mlp,moe"},
    "mla_deepseek_v3": {"attention": "mla", "mla_q_lora_rank": 8, "mla_kv_lora_rank": 8,
                        "mla_qk_nope_head_dim": 8, "mla_qk_rope_head_dim": 4, "mla_v_head_dim": 6,
                        "ffn": "mlp,moe", "moe.router": "deepseek_v3", "moe.num_shared_experts": 1},
    "recurrent_router": {"ffn": "moe,moe", "moe.router": "recurrent"},
    "mtp": {"ffn": "mlp,moe", "mtp_depth": 1},   # decoding uses the main head only
}


def _model(**overrides):
    m = base.get_config().model
    m.num_layers, m.d_model, m.num_heads, m.num_kv_heads, m.head_dim, m.mlp_dim = 2, 32, 4, 2, 8, 48
    m.vocab_size = 64
    m.moe.num_experts, m.moe.k, m.moe.expert_dim, m.moe.jitter = 4, 2, 16, 0.0
    for key, value in overrides.items():
        node = m
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    model = lm.DecoderLM(ml_collections.FrozenConfigDict(m))
    tokens = jax.random.randint(jax.random.key(0), (2, 9), 1, m.vocab_size)
    # jitted, as is every forward pass here (eagerly, every op compiles on its own)
    return model, jax.jit(model.init)(jax.random.key(1), tokens), tokens


def _step(model):
    """``(variables, cache, tokens, **kw) -> (logits, cache)``: one jitted decoding call
    (compiled once per input shape: the prompt, then single tokens)."""
    @jax.jit
    def step(variables, cache, tokens, **kw):
        (logits, _), state = model.apply({**variables, "cache": cache}, tokens, decode=True,
                                         mutable=["cache"], **kw)
        return logits, state["cache"]
    return step


def _decode(model, variables, chunks, max_len):
    """Logits of each chunk of tokens fed in turn through the cache, concatenated."""
    step, cache, outs = _step(model), init_cache(model, chunks[0].shape[0], max_len), []
    for chunk in chunks:
        logits, cache = step(variables, cache, chunk)
        outs.append(logits)
    return jnp.concatenate(outs, axis=1)


@pytest.mark.parametrize("case", sorted(CASES))
def test_decoding_equals_the_full_forward_pass(case):
    model, variables, tokens = _model(**CASES[case])
    full, _ = jax.jit(model.apply)(variables, tokens)
    chunks = [tokens[:, :5]] + [tokens[:, t:t + 1] for t in range(5, 9)]   # prompt, then one at a time
    got = _decode(model, variables, chunks, max_len=12)                    # 3 slots never written
    np.testing.assert_allclose(got, full, rtol=1e-5, atol=1e-5)


def test_left_padded_prompts():
    """Rows of different lengths, left-padded: with the mask over the cache slots and the
    positions from it, each row's logits at its real tokens equal its own unpadded run."""
    model, variables, tokens = _model(ffn="mlp,moe")
    lengths, total = (7, 4), 9
    rows = np.zeros((2, total), np.int32)
    mask = np.zeros((2, total), np.int32)
    for r, n in enumerate(lengths):
        rows[r, total - n:], mask[r, total - n:] = np.asarray(tokens[r, :n]), 1
    positions = positions_from_mask(mask)
    prompt, rest = 6, total - 6
    step, cache, outs = _step(model), init_cache(model, 2, total), []
    for lo, hi in [(0, prompt)] + [(t, t + 1) for t in range(prompt, prompt + rest)]:
        logits, cache = step(variables, cache, jnp.asarray(rows[:, lo:hi]), attention_mask=mask,
                             positions=positions[:, lo:hi])
        outs.append(logits)
    got = np.asarray(jnp.concatenate(outs, axis=1))
    forward = jax.jit(model.apply)
    for r, n in enumerate(lengths):
        alone, _ = forward(variables, tokens[r:r + 1, :n])
        np.testing.assert_allclose(got[r, total - n:], np.asarray(alone)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_sampler_draws_the_same_tokens_with_and_without_the_cache(temperature):
    model, variables, tokens = _model(ffn="mlp,moe")
    assert supports_cache(model)
    kw = dict(num_tokens=6, temperature=temperature, top_k=8 if temperature else 0)
    with_cache = sample(model, variables, tokens[:, :4], jax.random.key(5), use_cache=True, **kw)
    without = sample(model, variables, tokens[:, :4], jax.random.key(5), use_cache=False, **kw)
    np.testing.assert_array_equal(with_cache, without)
    np.testing.assert_array_equal(with_cache[:, :4], tokens[:, :4])


def test_unsupported_decoding_is_refused():
    model, variables, tokens = _model(ffn="moe,moe", **{"moe.router": "pregate"})
    assert not supports_cache(model)
    with pytest.raises(ValueError, match="pregate and uoe are not supported"):
        model.apply(variables, tokens, decode=True, mutable=["cache"])
    model, variables, tokens = _model()
    with pytest.raises(ValueError, match="decode=True needs a cache; make one with routezoo.zoo.lm.init_cache"):
        model.apply(variables, tokens, decode=True)


def _scans(jaxpr) -> int:
    """``scan`` equations in ``jaxpr`` and every sub-jaxpr."""
    n = 0
    for eqn in jaxpr.eqns:
        n += eqn.primitive.name == "scan"
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            n += _scans(sub)
    return n


def test_scanned_model_decodes_through_its_unscanned_layout():
    from routezoo.zoo import stack
    model, variables, tokens = _model(ffn="mlp,moe,mlp,moe", scan_layers=True, num_layers=4)
    assert stack.is_scanned(model.cfg)
    flat, flat_vars = stack.as_unscanned(model, variables)
    assert not stack.is_scanned(flat.cfg)
    kw = dict(num_tokens=5, temperature=0.0, use_cache=True)
    run = lambda m, v: sample.__wrapped__(m, v, tokens[:, :4], jax.random.key(5), **kw)  # noqa: E731
    # the token loop holds no scan over the layers: as many scans as the unscanned model's
    assert _scans(jax.make_jaxpr(run, static_argnums=0)(model, variables).jaxpr) == \
        _scans(jax.make_jaxpr(run, static_argnums=0)(flat, flat_vars).jaxpr)
    # and draws what the unscanned model draws, and what the scanned model draws without the cache
    got = sample(model, variables, tokens[:, :4], jax.random.key(5), **kw)
    np.testing.assert_array_equal(got, sample(flat, flat_vars, tokens[:, :4], jax.random.key(5), **kw))
    np.testing.assert_array_equal(got, sample(model, variables, tokens[:, :4], jax.random.key(5),
                                              num_tokens=5, temperature=0.0, use_cache=False))
