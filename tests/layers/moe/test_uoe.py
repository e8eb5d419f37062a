"""UoE (layers/moe/uoe.py): selective attention against multi-head attention and a loop
reference (heads over their selected tokens, and over all tokens), causality with
dropping, gate gradients through the LM loss or only through the auxiliary losses
(``moe.uoe_gate_in_output=False``), the union of MLP slices against the dense MLP (both
dispatchers, expert=4 mesh), config errors.

Shapes are small: B=2, L=8, D=16, H=4 heads of K=8; MLP slices E=4 of F=8 (width 32).
"""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import functools  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from flax import linen as nn  # noqa: E402

from conftest import tiny_config  # noqa: E402
from routezoo import zoo  # noqa: E402
from routezoo.configs import base  # noqa: E402
from routezoo.layers import sharding  # noqa: E402
from routezoo.layers.attention import Attention  # noqa: E402
from routezoo.layers.mlp import MLP  # noqa: E402
from routezoo.layers import moe as moe_lib  # noqa: E402
from routezoo.layers.moe import uoe  # noqa: E402
from routezoo.training import cli, config_check  # noqa: E402

B, L, D, H, K = 2, 8, 16, 4, 8
E, F = 4, 8
TOL = dict(rtol=1e-5, atol=1e-5)


def make_x(seed=0, shape=(B, L, D)):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


POS = jnp.broadcast_to(jnp.arange(L) + 5, (B, L))  # positions that are not 0..L-1


def random_params(module, *args, seed=1, scale=D ** -0.5, **kw):
    """Normal(0, scale²) values in the shapes of ``module``'s parameters (no init compile)."""
    shapes = nn.unbox(jax.eval_shape(functools.partial(module.init, **kw), jax.random.PRNGKey(0), *args))["params"]
    rng = np.random.default_rng(seed)  # numpy: no compile per shape
    return jax.tree.map(lambda s: jnp.asarray(scale * rng.standard_normal(s.shape), s.dtype), shapes)


@functools.lru_cache(maxsize=None)
def attn_params():
    """Selective-attention parameters; the gate far from uniform (kernel std D^-1/2)."""
    return random_params(uoe.SelectiveAttention(num_heads=H, head_dim=K), make_x(), POS)


def attn(**kw):
    return uoe.SelectiveAttention(num_heads=H, head_dim=K, **kw)


def run_attn(params, x, **kw):
    """Jitted forward of ``attn(**kw)`` at positions :data:`POS` (one compile per setting)."""
    return _jitted_attn(tuple(sorted(kw.items())))(params, x)


@functools.lru_cache(maxsize=None)
def _jitted_attn(kw):
    m = attn(**dict(kw))
    return jax.jit(lambda p, x: m.apply({"params": p}, x, POS))


# ------------------------------------------------------------------ numpy reference


def np_rope(x, pos, theta=10000.0):
    # x [N, K], pos [N]: half-split pairs (i, i + K/2)
    half = x.shape[-1] // 2
    ang = pos[:, None] * theta ** (-np.arange(half) * 2.0 / x.shape[-1])
    x1, x2 = x[:, :half], x[:, half:]
    return np.concatenate([x1 * np.cos(ang) - x2 * np.sin(ang), x2 * np.cos(ang) + x1 * np.sin(ang)], -1)


def np_selection(params, x, k, capacity):
    """Gate, chosen heads and kept (token, head) pairs, by loops in float64."""
    p = {n: np.asarray(v, np.float64) for n, v in params.items()}
    x = np.asarray(x, np.float64)
    logits = x @ p["gate_kernel"] + p["gate_bias"]
    g = np.exp(logits - logits.max(-1, keepdims=True))
    g /= g.sum(-1, keepdims=True)
    chosen = np.zeros(g.shape, bool)
    for b in range(B):
        for t in range(L):
            chosen[b, t, np.argsort(-g[b, t], kind="stable")[:k]] = True
    kept = np.zeros_like(chosen)
    for b in range(B):
        for h in range(H):
            for t in np.flatnonzero(chosen[b, :, h])[:capacity]:  # time order, first C
                kept[b, t, h] = True
    return g, chosen, kept


def np_selective_attention(params, x, pos, k, capacity):
    """Per sequence and head: attention among the kept tokens only, at their original
    positions, times the gate, summed over heads through the output projection."""
    p = {n: np.asarray(v, np.float64) for n, v in params.items()}
    g, chosen, kept = np_selection(params, x, k, capacity)
    x, pos = np.asarray(x, np.float64), np.asarray(pos, np.float64)
    y = np.zeros((B, L, D))
    for b in range(B):
        for h in range(H):
            ts = np.flatnonzero(kept[b, :, h])
            if len(ts) == 0:
                continue
            xs = x[b, ts]
            q = np_rope(xs @ p["q"][:, h], pos[b, ts])
            kk = np_rope(xs @ p["k"][:, h], pos[b, ts])
            v = xs @ p["v"][:, h]
            s = q @ kk.T / np.sqrt(K) + np.triu(np.full((len(ts),) * 2, -np.inf), 1)
            a = np.exp(s - s.max(-1, keepdims=True))
            a /= a.sum(-1, keepdims=True)
            y[b, ts] += (g[b, ts, h][:, None] * (a @ v)) @ p["o"][h]
    return y, chosen, kept


def np_all_tokens_attention(params, x, pos, k, gate_in_output=True):
    """``attention='all'``: every head attends causally over all tokens (dense multi-head
    attention); its output is kept only at the tokens that chose it, times the gate."""
    p = {n: np.asarray(v, np.float64) for n, v in params.items()}
    g, chosen, _ = np_selection(params, x, k, L)
    x, pos = np.asarray(x, np.float64), np.asarray(pos, np.float64)
    y = np.zeros((B, L, D))
    causal = np.triu(np.full((L, L), -np.inf), 1)
    for b in range(B):
        for h in range(H):
            q = np_rope(x[b] @ p["q"][:, h], pos[b])
            kk = np_rope(x[b] @ p["k"][:, h], pos[b])
            s = q @ kk.T / np.sqrt(K) + causal
            a = np.exp(s - s.max(-1, keepdims=True))
            a /= a.sum(-1, keepdims=True)
            mult = chosen[b, :, h] * (g[b, :, h] if gate_in_output else 1.0)  # [L]
            y[b] += (mult[:, None] * (a @ (x[b] @ p["v"][:, h]))) @ p["o"][h]
    return y, chosen


# ------------------------------------------------------------------ selective attention


def test_all_heads_full_capacity_no_gate_is_multi_head_attention():
    params = attn_params()
    x = make_x()
    y, aux = run_attn(params, x, k=H, capacity_factor=1.0, gate_in_output=False)
    mha = Attention(num_heads=H, num_kv_heads=H, head_dim=K, implementation="xla")
    y_ref = jax.jit(mha.apply)({"params": {n: params[n] for n in "qkvo"}}, x, POS)
    np.testing.assert_allclose(y, y_ref, **TOL)
    assert float(aux["stats"]["dropped_fraction"]) == 0.0
    np.testing.assert_allclose(aux["stats"]["load"], 1.0 / H)
    # the gate multiplier changes the output (and is what gives the gate its gradient)
    y_gated, _ = run_attn(params, x, k=H, capacity_factor=1.0)
    assert not np.allclose(y_gated, y_ref, atol=1e-3)


@pytest.mark.parametrize("k,cf", [(2, 0.75), (1, 0.5)])
def test_matches_loop_reference_with_dropping(k, cf):
    """Time-order capacity, original RoPE positions, gate multiplier: against loops."""
    params, x = attn_params(), make_x(3)
    c = uoe.attention_capacity(L, H, k, cf)
    assert c < L
    y, aux = run_attn(params, x, k=k, capacity_factor=cf, load_balance_coef=0.5, z_loss_coef=0.1)
    y_ref, chosen, kept = np_selective_attention(params, x, POS, k, c)
    np.testing.assert_allclose(y, y_ref, **TOL)
    dropped = chosen & ~kept
    assert dropped.any()
    np.testing.assert_allclose(aux["stats"]["dropped_fraction"], dropped.sum() / chosen.sum(), rtol=1e-6)
    np.testing.assert_allclose(aux["stats"]["load"], chosen.sum((0, 1)) / chosen.sum(), rtol=1e-6)
    assert set(aux["losses"]) == {"load_balance", "z_loss"}
    np.testing.assert_allclose(aux["losses"]["load_balance"], 0.5 * aux["stats"]["load_balance_loss"])
    # a token dropped by every head it chose gets exactly zero output
    gone = ~kept.any(-1)
    if k == 1:
        assert gone.any()
    assert np.all(np.asarray(y)[gone] == 0.0) and np.all(np.abs(np.asarray(y)[~gone]).max(-1) > 0)


@pytest.mark.parametrize("attention", ["selected", "all"])
def test_every_head_without_gate_is_multi_head_attention(attention):
    """k = H, gate_in_output=False: both attention modes are multi-head attention ('selected'
    needs C = L, i.e. capacity_factor >= 1 here; 'all' has no buffer to size)."""
    params, x = attn_params(), make_x(2)
    mha = Attention(num_heads=H, num_kv_heads=H, head_dim=K, implementation="xla")
    y_ref = jax.jit(mha.apply)({"params": {n: params[n] for n in "qkvo"}}, x, POS)
    y, aux = run_attn(params, x, k=H, capacity_factor=1.0, gate_in_output=False, attention=attention)
    np.testing.assert_allclose(y, y_ref, **TOL)
    assert float(aux["stats"]["dropped_fraction"]) == 0.0


@pytest.mark.parametrize("k,gate_in_output", [(2, True), (1, False)])
def test_all_tokens_attention_matches_loop_reference(k, gate_in_output):
    """attention='all' with k < H: per token, against attention over all tokens computed by
    hand; it differs from 'selected' (a head there sees only the tokens that chose it), even
    where 'selected' drops nothing (capacity_factor = H / k gives C = L)."""
    params, x = attn_params(), make_x(4)
    y, aux = run_attn(params, x, k=k, capacity_factor=0.5, gate_in_output=gate_in_output, attention="all")
    y_ref, chosen = np_all_tokens_attention(params, x, POS, k, gate_in_output)
    np.testing.assert_allclose(y, y_ref, **TOL)
    assert float(aux["stats"]["dropped_fraction"]) == 0.0   # no buffer: capacity_factor is not read
    np.testing.assert_allclose(aux["stats"]["load"], chosen.sum((0, 1)) / chosen.sum(), rtol=1e-6)
    y_sel, aux_sel = run_attn(params, x, k=k, capacity_factor=H / k, gate_in_output=gate_in_output)
    assert float(aux_sel["stats"]["dropped_fraction"]) == 0.0
    diff = np.abs(np.asarray(y) - np.asarray(y_sel)).max(-1)   # [B, L]
    assert diff[:, 0].max() < 1e-5   # the first token attends only to itself in both modes
    assert (diff > 1e-3).mean() > 0.5


def test_compaction_keeps_time_order():
    mask = jnp.asarray([[[1, 0], [1, 1], [0, 1], [1, 1], [1, 0]]], bool)  # [B=1, L=5, H=2]
    idx, valid, kept = jax.jit(uoe.compact_in_time_order, static_argnums=1)(mask, 2)
    np.testing.assert_array_equal(idx[0], [[0, 1], [1, 2]])
    np.testing.assert_array_equal(valid[0], [[True, True], [True, True]])
    np.testing.assert_array_equal(kept[0], [[1, 0], [1, 1], [0, 1], [0, 0], [0, 0]])


def test_causal_with_dropping():
    """Changing a later token changes nothing before it, although it changes which tokens
    the heads take after it (a top-C-by-score selection would fail this)."""
    params, k, cf = attn_params(), 2, 0.75
    c = uoe.attention_capacity(L, H, k, cf)
    x = make_x(5)
    t0 = 3
    x2 = x.at[:, t0].set(-3.0 * x[:, t0])
    y1, _ = run_attn(params, x, k=k, capacity_factor=cf)
    y2, _ = run_attn(params, x2, k=k, capacity_factor=cf)
    np.testing.assert_allclose(y1[:, :t0], y2[:, :t0], rtol=0, atol=1e-6)
    assert not np.allclose(y1[:, t0:], y2[:, t0:], atol=1e-3)
    _, chosen1, kept1 = np_selection(params, x, k, c)
    _, chosen2, kept2 = np_selection(params, x2, k, c)
    assert (chosen1 & ~kept1).any() and (chosen2 & ~kept2).any()  # dropping happens
    assert (chosen1[:, t0] != chosen2[:, t0]).any()  # the changed token chose other heads
    assert (kept1[:, t0 + 1:] != kept2[:, t0 + 1:]).any()  # and later tokens were kept otherwise


def test_attention_gate_gradient_only_through_the_output():
    params, x, cot = attn_params(), make_x(), make_x(9)

    def grads(gate_in_output):
        m = attn(k=2, capacity_factor=1.0, gate_in_output=gate_in_output)
        loss = lambda p: jnp.sum(m.apply({"params": p}, x, POS)[0] * cot)  # no aux loss
        return jax.jit(jax.grad(loss))(params)

    g = grads(True)
    assert float(jnp.abs(g["gate_kernel"]).max()) > 0 and float(jnp.abs(g["gate_bias"]).max()) > 0
    g0 = grads(False)  # the authors' code: the gate only selects and gets no gradient
    assert float(jnp.abs(g0["gate_kernel"]).max()) == 0.0
    assert float(jnp.abs(g0["q"]).max()) > 0


@pytest.mark.parametrize("attention", ["selected", "all"])
def test_without_gate_in_output_the_gate_learns_from_the_aux_losses_only(attention):
    """gate_in_output=False with balance and z losses: the gate's gradient of output + losses
    equals the losses' gradient alone (none comes through the output), and is not zero."""
    params, x, cot = attn_params(), make_x(), make_x(9)
    m = attn(k=2, capacity_factor=1.0, gate_in_output=False, attention=attention,
             load_balance_coef=0.5, z_loss_coef=0.1)

    def loss(p, through_output):
        y, aux = m.apply({"params": p}, x, POS)
        return jnp.sum(y * cot) * through_output + sum(aux["losses"].values())

    # [0]: output and losses, [1]: losses only
    g = jax.jit(jax.vmap(jax.grad(loss), in_axes=(None, 0)))(params, jnp.asarray([1.0, 0.0]))
    for name in ("gate_kernel", "gate_bias"):
        np.testing.assert_allclose(g[name][0], g[name][1], rtol=1e-6, atol=1e-9)
        assert float(jnp.abs(g[name][0]).max()) > 0
    assert float(jnp.abs(g["q"][0]).max()) > 0 and float(jnp.abs(g["q"][1]).max()) == 0.0


# ------------------------------------------------------------------ union of MLP experts


@functools.lru_cache(maxsize=None)
def dense_mlp(mlp_type):
    mlp = MLP(hidden_dim=E * F, mlp_type=mlp_type)
    return mlp, random_params(mlp, make_x(), seed=2)


def uome(dispatch="dropless", k=E, gate_in_output=True, mlp_type="swiglu"):
    router = uoe.UoERouter(num_experts=E, k=k, gate_in_output=gate_in_output, init_scale=1.0)
    return moe_lib.MoE(num_experts=E, expert_dim=F, router=router, dispatch=dispatch, expert_type=mlp_type,
                       capacity_factor=2.0, eval_capacity_factor=2.0, gmm_backend="ragged_dot")


def router_kernel():
    return make_x(4, (D, E))


def np_uome(x, kernel, slices, k):
    """Σ over the top-k slices of (renormalised softmax weight) · SwiGLU slice, in float64."""
    xt = np.asarray(x, np.float64).reshape(-1, D)
    logits = xt @ np.asarray(kernel, np.float64)
    prob = np.exp(logits - logits.max(-1, keepdims=True))
    prob /= prob.sum(-1, keepdims=True)
    top = np.argsort(-prob, -1, kind="stable")[:, :k]
    w = np.zeros_like(prob)
    np.put_along_axis(w, top, np.take_along_axis(prob, top, -1), -1)
    w /= w.sum(-1, keepdims=True)
    s = {n: np.asarray(v, np.float64) for n, v in slices.items()}
    gate = [xt @ s["wi_gate"][e] for e in range(E)]
    per_slice = np.stack([(gate[e] / (1 + np.exp(-gate[e])) * (xt @ s["wi"][e])) @ s["wo"][e]
                          for e in range(E)], 1)  # [T, E, D]
    return np.einsum("TE,TED->TD", w, per_slice).reshape(x.shape)


@pytest.mark.parametrize("dispatch,mlp_type", [("capacity", "swiglu"), ("dropless", "swiglu"), ("dropless", "gelu")])
def test_all_slices_with_weight_one_are_the_dense_mlp(dispatch, mlp_type):
    mlp, p = dense_mlp(mlp_type)
    slices = uoe.slices_from_dense(p, E, mlp_type)
    back = uoe.dense_from_slices(slices)
    assert set(back) == set(p)
    for name in p:
        np.testing.assert_array_equal(back[name], p[name])  # exact round trip
    x = make_x(1)
    variables = {"params": {"router": {"kernel": router_kernel()}, "experts": slices}}
    fwd = lambda m, v: jax.jit(functools.partial(m.apply, deterministic=True))(v, x)  # noqa: E731
    y, aux = fwd(uome(dispatch, gate_in_output=False, mlp_type=mlp_type), variables)
    np.testing.assert_allclose(y, jax.jit(mlp.apply)({"params": p}, x), **TOL)
    assert float(aux["stats"]["dropped_fraction"]) == 0.0
    # with the gate: slice e weighted by its (top-k renormalised) softmax probability
    if dispatch == "dropless" and mlp_type == "swiglu":
        y2, _ = fwd(uome(dispatch, k=2), variables)
        np.testing.assert_allclose(y2, np_uome(x, router_kernel(), slices, 2), **TOL)


def test_uome_expert_mesh_equals_single_device_and_gate_learns():
    """Jitted forward and gradient on data=2 x expert=4 (experts sharded 4 ways) against the
    loop reference. Capacity dispatch (test_routers_lm.py runs dropless on expert=4); its
    capacity 8 = L drops nothing."""
    model = uome("capacity", k=2)
    x, cot = make_x(2, (8, L, D)), make_x(7, (8, L, D))
    boxed = jax.eval_shape(functools.partial(model.init, deterministic=True), jax.random.PRNGKey(3), x)
    params = random_params(model, x, seed=3, deterministic=True)

    def loss_and_grads(p, x):
        def loss(p):
            y, _ = model.apply({"params": p}, x, deterministic=True)
            return jnp.sum(y * cot), y
        (_, y), g = jax.value_and_grad(loss, has_aux=True)(p)
        return y, g

    mesh = sharding.make_mesh({"data": 2, "expert": 4})
    rules = sharding.DEFAULT_RULES
    shard = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, rules)["params"]
    p_s = jax.device_put(params, shard)
    x_s = jax.device_put(x, sharding.logical_sharding(mesh, ("batch", "length", "act_embed"), rules))
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        y, g = jax.jit(loss_and_grads)(p_s, x_s)
    assert p_s["experts"]["wi"].addressable_shards[0].data.shape[0] == E // 4
    np.testing.assert_allclose(y, np_uome(x, params["router"]["kernel"], params["experts"], 2), **TOL)
    assert float(jnp.abs(g["router"]["kernel"]).max()) > 0  # the MLP gate is in the gradient path


# ------------------------------------------------------------------ through the LM


def lm_config(**overrides):
    c = tiny_config("", **{"model.ffn": "mlp,moe", "model.moe.router": "uoe", "model.moe.num_experts": E,
                           "model.moe.k": 2, "model.moe.expert_dim": F, "model.num_heads": H,
                           "model.num_kv_heads": 2, "model.head_dim": 8, "model.moe.uoe_capacity_factor": 1.0,
                           "model.moe.load_balance_coef": 0.0, "model.moe.z_loss_coef": 0.0, **overrides})
    return c


def test_lm_gates_receive_gradient_from_the_loss():
    """Cross-entropy only (no auxiliary loss): both gates of an MoE layer get gradient.
    With ``model.ffn='mlp,moe'`` the dense layer keeps grouped-query attention and only
    the MoE layer has selective attention."""
    tokens = jnp.asarray(np.random.default_rng(0).integers(2, 258, (2, 16)), jnp.int32)
    cfg = lm_config()
    config_check.validate(cfg)
    shapes = jax.eval_shape(zoo.build(cfg.model).init, jax.random.PRNGKey(1), tokens)["params"]
    shapes = nn.unbox(shapes)
    assert "gate_kernel" not in shapes["layer0"]["attn"] and shapes["layer0"]["attn"]["k"].shape[1] == 2
    assert shapes["layer1"]["attn"]["k"].shape[1] == H and "gate_kernel" in shapes["layer1"]["attn"]

    model = zoo.build(lm_config(**{"model.ffn": "moe", "model.num_layers": 1}).model)
    params = random_params(model, tokens, scale=0.2)

    def loss(p):
        logits, aux = model.apply({"params": p}, tokens[:, :-1], deterministic=False)
        logp = jax.nn.log_softmax(logits)
        return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], -1)), aux

    (_, aux), g = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    assert aux["losses"] == {}
    assert aux["stats"]["layer0/attn/load"].shape == (H,)
    assert 0 <= float(aux["stats"]["layer0/attn/dropped_fraction"]) < 1
    assert float(jnp.abs(g["layer0"]["attn"]["gate_kernel"]).max()) > 0
    assert float(jnp.abs(g["layer0"]["attn"]["gate_bias"]).max()) > 0
    assert float(jnp.abs(g["layer0"]["moe"]["router"]["kernel"]).max()) > 0
    # with coefficients, the head gate's losses come back by name
    model2 = zoo.build(lm_config(**{"model.ffn": "moe", "model.num_layers": 1,
                                    "model.moe.load_balance_coef": 0.01}).model)
    _, aux = jax.eval_shape(functools.partial(model2.apply, deterministic=True), {"params": params}, tokens)
    assert {"attn_load_balance", "load_balance"} <= set(aux["losses"])


def test_lm_keys_reach_both_gates_and_the_attention():
    """``moe.uoe_gate_in_output=False`` and ``moe.uoe_attention='all'`` through the LM: the
    built modules carry them; the cross-entropy gives neither gate a gradient (the authors'
    operator), the balance loss does."""
    tokens = jnp.asarray(np.random.default_rng(1).integers(2, 258, (2, 16)), jnp.int32)
    keys = {"model.ffn": "moe", "model.num_layers": 1, "model.moe.uoe_gate_in_output": False,
            "model.moe.uoe_attention": "all"}
    cfg = lm_config(**keys)
    config_check.validate(cfg)
    sa = uoe.selective_attention_from_config(cfg.model, dtype=jnp.float32, param_dtype=jnp.float32)
    assert sa.gate_in_output is False and sa.attention == "all"
    assert moe_lib.router_from_config(cfg.model.moe).gate_in_output is False
    default = lm_config(**{"model.ffn": "moe", "model.num_layers": 1})
    sa = uoe.selective_attention_from_config(default.model, dtype=jnp.float32, param_dtype=jnp.float32)
    assert sa.gate_in_output is True and sa.attention == "selected"
    assert moe_lib.router_from_config(default.model.moe).gate_in_output is True

    params = random_params(zoo.build(cfg.model), tokens, scale=0.2)

    def grads(model):
        def loss(p):
            logits, aux = model.apply({"params": p}, tokens[:, :-1], deterministic=False)
            logp = jax.nn.log_softmax(logits)
            return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], -1)) + sum(aux["losses"].values())
        return jax.jit(jax.grad(loss))(params)["layer0"]

    g = grads(zoo.build(cfg.model))   # cross-entropy only (the coefficients are 0 in lm_config)
    assert float(jnp.abs(g["attn"]["gate_kernel"]).max()) == 0.0
    assert float(jnp.abs(g["moe"]["router"]["kernel"]).max()) == 0.0
    assert float(jnp.abs(g["attn"]["q"]).max()) > 0
    g = grads(zoo.build(lm_config(**keys, **{"model.moe.load_balance_coef": 0.01}).model))
    assert float(jnp.abs(g["attn"]["gate_kernel"]).max()) > 0
    assert float(jnp.abs(g["moe"]["router"]["kernel"]).max()) > 0


# ------------------------------------------------------------------ config


@pytest.mark.parametrize("overrides,match", [
    ({"model.moe.uoe_attn_k": 5}, r"moe.uoe_attn_k=5 must be between 0 \(= model.num_heads // 2\) and model.num_heads=4"),
    ({"model.moe.uoe_attn_k": -1}, r"moe.uoe_attn_k=-1 must be >= 0"),
    ({"model.moe.uoe_capacity_factor": 0.0}, r"moe.uoe_capacity_factor=0.0 must be > 0"),
    ({"model.moe.uoe_attention": "dense"}, r"moe.uoe_attention='dense' is unknown; known: \['all', 'selected'\]"),
    ({"model.moe.k": 5}, r"moe.k=5 must be between 1 and moe.num_experts=4"),
    ({"model.qkv_bias": True}, r"model.qkv_bias=True is not supported with moe.router='uoe'"),
    ({"model.qk_norm": "head"}, r"model.qk_norm='head' is not supported with moe.router='uoe'"),
])
def test_config_errors_are_one_line(overrides, match):
    with pytest.raises(config_check.ConfigError, match=match) as err:
        config_check.validate(lm_config(**overrides))
    assert "\n" not in str(err.value)


def test_cli_refuses_bad_uoe_setting_with_exit_2(tmp_path, capsys):
    wd = tmp_path / "wd"
    with pytest.raises(SystemExit) as e:
        sys.exit(cli.main(["train", "--workdir", str(wd), "--config.model.moe.router=uoe",
                           "--config.model.moe.uoe_attn_k=9"]))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "moe.uoe_attn_k=9" in err, err
    assert not wd.exists()


def test_shipped_config_and_defaults_are_valid():
    from routezoo.configs import uoe as uoe_config
    c = uoe_config.get_config()
    config_check.validate(c)
    assert isinstance(moe_lib.router_from_config(c.model.moe), uoe.UoERouter)
    assert uoe.attention_capacity(c.data.seq_len, c.model.num_heads, c.model.moe.uoe_attn_k, 1.0) == 64
    c = base.get_config()
    c.model.ffn, c.model.moe.router = "moe", "uoe"
    config_check.validate(c)
