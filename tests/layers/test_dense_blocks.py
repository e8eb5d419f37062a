"""Dense layers against plain reference computations, and sharded against unsharded."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from routezoo.layers.attention import Attention, rotary_embedding
from routezoo.layers.embed import Embed
from routezoo.layers.norms import LayerNorm, RMSNorm
from routezoo.layers.mlp import MLP, MLP_TYPES
from routezoo.layers import sharding as shd


def _rand(*shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def test_rmsnorm_and_layernorm_formulas():
    x = _rand(2, 3, 8)
    y = RMSNorm().apply({"params": {"scale": jnp.full(8, 2.0)}}, x)
    want = 2.0 * x / np.sqrt(np.mean(np.square(x), -1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(y, want, rtol=1e-5)
    y = LayerNorm().apply({"params": {"scale": jnp.full(8, 2.0), "bias": jnp.ones(8)}}, x)
    want = 2.0 * (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-6) + 1.0
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-5)


def test_rope_preserves_norm_and_is_relative():
    q, k = _rand(1, 1, 1, 8, seed=1), _rand(1, 1, 1, 8, seed=2)
    rot = lambda x, p: rotary_embedding(x, jnp.array([[p]]))
    np.testing.assert_allclose(jnp.linalg.norm(rot(q, 5)), jnp.linalg.norm(q), rtol=1e-5)
    # <R(m) q, R(n) k> depends only on m - n
    dots = [float(jnp.sum(rot(q, m) * rot(k, m - 3))) for m in (3, 7, 20)]
    np.testing.assert_allclose(dots, dots[0], rtol=1e-4)
    np.testing.assert_allclose(rot(q, 0), q, rtol=1e-6)


def _reference_attention(params, x, h, g, k):
    b, l, _ = x.shape
    pos = jnp.broadcast_to(jnp.arange(l), (b, l))
    q = rotary_embedding(jnp.einsum("BLD,DHK->BLHK", x, params["q"]), pos)
    kk = rotary_embedding(jnp.einsum("BLD,DHK->BLHK", x, params["k"]), pos)
    v = jnp.einsum("BLD,DHK->BLHK", x, params["v"])
    kk, v = jnp.repeat(kk, h // g, axis=2), jnp.repeat(v, h // g, axis=2)
    s = jnp.einsum("BLHK,BMHK->BHLM", q, kk) / np.sqrt(k)
    s = jnp.where(np.tril(np.ones((l, l), bool)), s, -1e30)
    o = jnp.einsum("BHLM,BMHK->BLHK", jax.nn.softmax(s, -1), v)
    return jnp.einsum("BLHK,HKD->BLD", o, params["o"])


@pytest.mark.parametrize("heads,kv", [(4, 4), (4, 2), (4, 1)])
def test_attention_matches_reference_and_is_causal(heads, kv):
    att = Attention(num_heads=heads, num_kv_heads=kv, head_dim=8)
    x = _rand(2, 6, 16)
    params = nn.unbox(att.init(jax.random.key(0), x))["params"]
    y = att.apply({"params": params}, x)
    np.testing.assert_allclose(y, _reference_attention(params, x, heads, kv, 8), rtol=1e-4, atol=1e-5)
    # changing a later token does not change earlier outputs
    x2 = x.at[:, 4].set(7.0)
    y2 = att.apply({"params": params}, x2)
    np.testing.assert_allclose(y2[:, :4], y[:, :4], rtol=1e-5, atol=1e-6)
    assert not np.allclose(y2[:, 4], y[:, 4])


@pytest.mark.parametrize("kind", MLP_TYPES)
def test_mlp_formulas(kind):
    mlp = MLP(hidden_dim=12, mlp_type=kind)
    x = _rand(2, 3, 8)
    p = nn.unbox(mlp.init(jax.random.key(0), x))["params"]
    h = x @ p["wi"]
    if kind == "swiglu":
        h = jax.nn.silu(x @ p["wg"]) * h
    elif kind == "geglu":
        h = jax.nn.gelu(x @ p["wg"]) * h
    else:
        h = {"gelu": jax.nn.gelu, "relu": jax.nn.relu}[kind](h)
    np.testing.assert_allclose(mlp.apply({"params": p}, x), h @ p["wo"], rtol=1e-5, atol=1e-6)


def test_tied_embedding_logits():
    emb = Embed(vocab_size=11, features=4)
    p = nn.unbox(emb.init(jax.random.key(0), jnp.zeros((1, 2), jnp.int32)))["params"]
    ids = jnp.array([[3, 5]])
    x = emb.apply({"params": p}, ids)
    np.testing.assert_array_equal(x[0, 1], p["embedding"][5])
    logits = emb.apply({"params": p}, x, method=emb.attend)
    np.testing.assert_allclose(logits, x @ p["embedding"].T / 2.0, rtol=1e-5)


def _lm_config(**kw):
    from routezoo.configs import base
    c = base.get_config()
    m = c.model
    m.num_layers, m.d_model, m.num_heads, m.num_kv_heads, m.head_dim, m.mlp_dim = 2, 16, 4, 2, 8, 32
    for k, v in kw.items():
        m[k] = v
    return c


def test_every_parameter_has_logical_names():
    from routezoo import zoo
    c = _lm_config(tie_embeddings=False, norm="layernorm")
    v = jax.eval_shape(lambda: zoo.build(c.model).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))
    leaves = jax.tree.leaves(v["params"], is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert leaves and all(isinstance(x, nn.LogicallyPartitioned) and len(x.names) == x.value.ndim for x in leaves)
    names = {n for x in leaves for n in x.names}
    assert names <= {a for a, _ in shd.DEFAULT_RULES}


@pytest.fixture(scope="module")
def lm_single_device():
    """``(config, model, loss, variables, tokens, ((loss, logits), grads))`` of the small LM
    on one device (jitted), shared by the meshes it is compared on."""
    from routezoo import zoo
    c = _lm_config()
    model = zoo.build(c.model)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 258, (8, 16)), jnp.int32)
    variables = jax.jit(model.init)(jax.random.key(0), tokens)

    def loss(p, t):
        logits, _ = model.apply({"params": p}, t)
        return jnp.mean(jax.nn.logsumexp(logits, -1)), logits

    ref = jax.jit(jax.value_and_grad(loss, has_aux=True))(nn.unbox(variables)["params"], tokens)
    return c, model, loss, variables, tokens, ref


@pytest.mark.parametrize("mesh_shape", [{"data": 8}, {"data": 2, "fsdp": 2, "tensor": 2}, {"fsdp": 4, "tensor": 2}])
def test_lm_sharded_equals_single_device(mesh_shape, lm_single_device):
    from routezoo.zoo import stack
    c, model, loss, variables, tokens, ((l0, lg0), g0) = lm_single_device
    params = nn.unbox(variables)["params"]
    mesh = shd.make_mesh(mesh_shape)
    specs = nn.get_partition_spec(variables)["params"]
    with jax.set_mesh(mesh), nn.logical_axis_rules(shd.DEFAULT_RULES):
        shardings = nn.logical_to_mesh_sharding(specs, mesh, shd.DEFAULT_RULES)
        p_sh = jax.device_put(params, shardings)
        t_sh = jax.device_put(tokens, jax.sharding.NamedSharding(mesh, shd.batch_spec(2)))
        (l1, lg1), g1 = jax.jit(jax.value_and_grad(loss, has_aux=True))(p_sh, t_sh)
    # parameters really are sharded on this mesh (the scanned stack's [R, ...] leaves over
    # their own axes, never over the layers axis), read per layer in the unscanned layout
    assert stack.is_scanned(c.model)
    wi = p_sh["layers"]["block0"]["mlp"]["wi"]
    assert wi.sharding.spec[0] is None and wi.addressable_shards[0].data.shape[0] == c.model.num_layers
    if mesh_shape.get("tensor", 1) > 1:
        assert not stack.to_unscanned(p_sh, c.model)["layer0"]["mlp"]["wi"].sharding.is_fully_replicated
    np.testing.assert_allclose(l1, l0, rtol=1e-5)
    np.testing.assert_allclose(lg1, lg0, rtol=1e-4, atol=1e-5)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_mesh_shape_errors():
    with pytest.raises(ValueError, match="multiply to 6, but there are 8 devices"):
        shd.resolve_mesh_shape({"data": 3, "fsdp": 2}, 8)
    with pytest.raises(ValueError, match="not divisible"):
        shd.resolve_mesh_shape({"data": -1, "fsdp": 3}, 8)
    assert shd.resolve_mesh_shape({"data": -1, "expert": 4}, 8) == (2, 1, 4, 1)


def test_param_and_flop_counts_match_formulas():
    from routezoo import zoo
    c = _lm_config()
    m = c.model
    v = jax.eval_shape(lambda: zoo.build(m).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))
    total, active = zoo.count_params(v["params"], m)
    d, f, h, g, k, V = m.d_model, m.mlp_dim, m.num_heads, m.num_kv_heads, m.head_dim, m.vocab_size
    per_layer = d * h * k * 2 + d * g * k * 2 + 3 * d * f + 2 * d
    assert total == active == V * d + m.num_layers * per_layer + d
    fl = zoo.flops_per_token(m, 64, active)
    assert fl["forward"] == 2 * (total - V * d) + 2 * d * V + 4 * m.num_layers * h * k * 64
    assert fl["train"] == 3 * fl["forward"]


@pytest.mark.parametrize("causal", [True, False])
def test_padding_mask_makes_padded_rows_equal_unpadded(causal):
    """With ``attention_mask`` (and ``positions_from_mask`` for left padding) a padded
    row's logits at its real tokens equal those of the unpadded row, for the decoder
    (left padding) and the bidirectional encoder (right padding: without the mask its
    real tokens would attend to the padding)."""
    from routezoo import zoo
    from routezoo.configs import base
    from routezoo.zoo.lm import positions_from_mask
    c = base.get_config().model
    c.num_layers, c.d_model, c.num_heads, c.num_kv_heads, c.head_dim, c.mlp_dim = 2, 32, 2, 1, 16, 64
    c.ffn, c.moe.expert_dim = "mlp,moe", 32
    if not causal:
        c.name, c.vocab_size = "encoder_mlm", 259
    model = zoo.build(c)
    tokens = jax.random.randint(jax.random.key(0), (1, 7), 2, 258)
    pad = jnp.zeros((1, 3), tokens.dtype)
    padded = jnp.concatenate([pad, tokens] if causal else [tokens, pad], axis=1)
    mask = (jnp.arange(10) >= 3) if causal else (jnp.arange(10) < 7)
    mask = mask[None].astype(jnp.int32)

    @jax.jit   # one program (run eagerly, every op compiles on its own)
    def run(tokens, padded, mask):
        variables = model.init(jax.random.key(1), tokens)
        ref, _ = model.apply(variables, tokens)
        out, _ = model.apply(variables, padded, attention_mask=mask, positions=positions_from_mask(mask))
        unmasked, _ = model.apply(variables, padded, positions=positions_from_mask(mask))
        return ref, out, unmasked
    ref, out, unmasked = run(tokens, padded, mask)
    real = out[:, 3:] if causal else out[:, :7]
    np.testing.assert_allclose(real, ref, rtol=1e-5, atol=1e-5)
    assert not np.allclose(unmasked[:, 3:] if causal else unmasked[:, :7], ref, atol=1e-3)


def test_mla_16bit_scores_are_16bit_products_with_float32_accumulation():
    """Latent attention in bfloat16 multiplies bfloat16 queries and keys with float32
    accumulation (tensor cores on GPUs), never upcast copies; its output stays within
    bfloat16 error of the float32 layer with the same weights."""
    from routezoo.layers.mla import MLAttention

    kw = dict(num_heads=2, kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8)
    x = jax.random.normal(jax.random.key(0), (2, 6, 16), jnp.float32)
    f32 = MLAttention(**kw)
    params = f32.init(jax.random.key(1), x)
    bf16 = MLAttention(**kw, dtype=jnp.bfloat16)
    want = f32.apply(params, x)
    got = bf16.apply(params, x.astype(jnp.bfloat16))
    np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=5e-2, rtol=5e-2)
    jaxpr = jax.make_jaxpr(lambda p, x: bf16.apply(p, x))(params, x.astype(jnp.bfloat16))
    scores = [e for e in jaxpr.eqns if e.primitive.name == "dot_general"
              and e.outvars[0].aval.shape == (2, 2, 6, 6)]
    assert scores, "no [B, H, L, M] score product found"
    e = scores[0]   # q·k: the only product with a [B, H, L, M] output
    assert [v.aval.dtype for v in e.invars] == [jnp.bfloat16, jnp.bfloat16]
    assert e.outvars[0].aval.dtype == jnp.float32


def test_encoder_decoder_flops_match_xla_cost_analysis():
    """The seq2seq FLOPs per token (each stack on its part of the row, cross-attention keys
    and values on the encoder's) equal XLA's count of the compiled forward pass within 5%;
    the decoder-only formula, which the encoder-decoder used to log, is ~1.9x too high.
    XLA counts a scan body once, so its count is taken on the unscanned model; the
    analytical count is the same for the scanned and the unscanned parameter layouts."""
    from routezoo import zoo
    from routezoo.configs import base
    from routezoo.zoo import stack
    from routezoo.zoo.encoder_decoder import seq2seq_batch

    m = base.get_config().model
    m.name, m.num_layers, m.num_decoder_layers = "encoder_decoder", 2, 3
    m.d_model, m.num_heads, m.num_kv_heads, m.head_dim, m.mlp_dim, m.mlp_type = 64, 4, 4, 16, 256, "relu"
    length = 32
    model = zoo.build(m)
    assert stack.is_scanned(m)
    row = jnp.ones((1, length), jnp.int32)
    inputs, _, _ = seq2seq_batch({"inputs": row, "targets": row, "weights": row}, split=m.seq2seq_split)
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), inputs))
    _, active = zoo.count_params(boxed["params"], m, length)
    ours = zoo.flops_per_token(m, length, active, boxed["params"])["forward"] * length
    unscanned, _ = stack.as_unscanned(model, {})
    boxed_u = jax.eval_shape(lambda: unscanned.init(jax.random.key(0), inputs))
    assert not stack.is_scanned(unscanned.cfg)
    assert zoo.count_params(boxed_u["params"], unscanned.cfg, length)[1] == active
    assert zoo.flops_per_token(unscanned.cfg, length, active, boxed_u["params"])["forward"] * length == ours
    variables = jax.jit(lambda: unscanned.init(jax.random.key(0), inputs))()
    cost = jax.jit(lambda v: unscanned.apply(v, inputs)).lower(variables).compile().cost_analysis()
    xla = (cost[0] if isinstance(cost, list) else cost)["flops"]
    assert abs(ours / xla - 1) < 0.05, (ours, xla)
    decoder_only = 2 * (active - m.vocab_size * m.d_model) + 2 * m.d_model * m.vocab_size \
        + 4 * m.num_layers * m.num_heads * m.head_dim * length
    assert decoder_only * length > 1.5 * xla
    with pytest.raises(ValueError, match="encoder-decoder needs params"):
        zoo.flops_per_token(m, length, active)
