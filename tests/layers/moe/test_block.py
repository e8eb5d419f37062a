"""Behaviour of the MoE block, its routers and dispatchers (CPU, 8 simulated devices).

Shapes are small: B=8, L=8, D=16, F=32, E=8, K=2 (T=64 tokens).
"""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import functools  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from flax import linen as nn  # noqa: E402

from routezoo.configs import base  # noqa: E402
from routezoo.layers.moe.capacity import capacity_slots  # noqa: E402
from routezoo.layers import moe as moe_lib  # noqa: E402
from routezoo.layers import routers as routers_lib  # noqa: E402
from routezoo.layers import sharding  # noqa: E402

B, L, D, F, E = 8, 8, 16, 32, 8
MESHES = [{"data": 8}, {"expert": 8}, {"expert": 4, "data": 2}, {"expert": 2, "fsdp": 2, "tensor": 2}]
TOL = dict(rtol=2e-5, atol=2e-5)


def make_cfg(**overrides):
    cfg = base.get_config().model.moe
    cfg.update(dict(num_experts=E, k=2, expert_dim=F, load_balance_coef=0.01, z_loss_coef=1e-3))
    cfg.update(overrides)
    return cfg


def make_x(seed=0, shape=(B, L, D)):
    return jax.random.normal(jax.random.PRNGKey(seed), shape, jnp.float32)


def build(cfg, x, seed=1):
    model = moe_lib.moe_from_config(cfg, d_model=D, dtype=jnp.float32, param_dtype=jnp.float32)
    boxed = jax.jit(functools.partial(model.init, deterministic=True))(jax.random.PRNGKey(seed), x)
    return model, boxed, nn.unbox(boxed)


def with_bias(variables, bias):
    """Sets the aux-loss-free selection bias (``router_state``)."""
    out = dict(variables)
    out["router_state"] = {"router": {"bias": jnp.asarray(bias, jnp.float32)}}
    return out


# ------------------------------------------------------------------ numpy reference


def np_ffn(params, e, x, expert_type):
    ex = {k: np.asarray(v, np.float64) for k, v in params["experts"].items()}
    h = x @ ex["wi"][e]
    if expert_type == "swiglu":
        g = x @ ex["wi_gate"][e]
        h = g / (1 + np.exp(-g)) * h
    else:
        h = 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h ** 3)))
    return h @ ex["wo"][e]


def reference_moe(params, x, dense_weights, expert_type="swiglu"):
    """Per-token loop: ``y_t = sum_e w[t, e] · FFN_e(x_t)`` in float64."""
    xt = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
    w = np.asarray(dense_weights, np.float64)
    y = np.zeros_like(xt)
    for t in range(xt.shape[0]):
        for e in np.nonzero(w[t])[0]:
            y[t] += w[t, e] * np_ffn(params, e, xt[t], expert_type)
    return y.reshape(x.shape)


def route(cfg, variables, x, *, deterministic=True):
    router = routers_lib.router_from_config(cfg)
    v = {"params": variables["params"]["router"]}
    if "router_state" in variables:
        v["router_state"] = variables["router_state"]["router"]
    s = cfg.group_size or x.shape[1]
    fn = functools.partial(router.apply, deterministic=deterministic, group_size=s)
    return jax.jit(fn)(v, x.reshape(-1, x.shape[-1]))


# ------------------------------------------------------------------ sharding


def _loss_and_grads(model, variables, x, cot):
    def loss(v, x):
        y, aux = model.apply(v, x, deterministic=False)
        return jnp.sum(y * cot) + sum(aux["losses"].values()), y
    (_, y), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(variables, x)
    return y, grads


@functools.lru_cache(maxsize=None)
def _mesh_case(dispatch, **overrides):
    # cf = E/K gives C = S: capacity dispatch drops nothing. Expert 0 is favoured by the
    # selection bias, so one expert shard receives every token (the padded worst case).
    cfg = make_cfg(dispatch=dispatch, capacity_factor=4.0, eval_capacity_factor=4.0,
                   bias_update_rate=0.01, num_shared_experts=1, shared_expert_dim=16, **overrides)
    x = make_x()
    model, boxed, variables = build(cfg, x)
    variables = with_bias(variables, [10.0] + [0.0] * (E - 1))
    cot = make_x(7)
    ref = jax.jit(functools.partial(_loss_and_grads, model))(variables, x, cot)
    return model, boxed, variables, x, cot, ref


def _check_sharded(mesh_shape, model, boxed, variables, x, cot, y_ref, g_ref):
    """Runs the loss and gradients on ``mesh_shape`` and compares them with the reference;
    returns the sharded variables."""
    mesh = sharding.make_mesh(mesh_shape)
    rules = sharding.DEFAULT_RULES
    specs = nn.get_partition_spec(boxed)
    specs["router_state"] = jax.tree.map(lambda _: jax.sharding.PartitionSpec(), variables["router_state"])
    v_s = jax.device_put(variables, nn.logical_to_mesh_sharding(specs, mesh, rules))
    x_s = jax.device_put(x, sharding.logical_sharding(mesh, ("batch", "length", "act_embed"), rules))
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        y, g = jax.jit(functools.partial(_loss_and_grads, model))(v_s, x_s, cot)
    np.testing.assert_allclose(y, y_ref, **TOL)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(a, b, **TOL, err_msg=jax.tree_util.keystr(path))
    return v_s


@pytest.mark.parametrize("mesh_shape", MESHES, ids=lambda m: "x".join(f"{k}{v}" for k, v in m.items()))
@pytest.mark.parametrize("dispatch", ["capacity", "dropless"])
def test_sharded_matches_single_device(dispatch, mesh_shape):
    model, boxed, variables, x, cot, (y_ref, g_ref) = _mesh_case(dispatch)
    v_s = _check_sharded(mesh_shape, model, boxed, variables, x, cot, y_ref, g_ref)
    # sharded expert weights really are sharded
    if mesh_shape.get("expert", 1) > 1:
        wi = v_s["params"]["experts"]["wi"]
        assert wi.addressable_shards[0].data.shape[0] == E // mesh_shape["expert"]


def test_sharded_megablox_matches_single_device():
    """The megablox backend (TPU kernels, interpreted here) under expert parallelism:
    shard_map runs it without the varying-type check (its pallas_calls carry none), and
    values and gradients still equal the single-device result."""
    model, boxed, variables, x, cot, (y_ref, g_ref) = _mesh_case("dropless", gmm_backend="megablox")
    _check_sharded({"data": 2, "expert": 4}, model, boxed, variables, x, cot, y_ref, g_ref)


# ------------------------------------------------------------------ dispatch equivalences


def _apply(model, variables, x, deterministic=True):
    return jax.jit(lambda v, x: model.apply(v, x, deterministic=deterministic))(variables, x)


@pytest.mark.parametrize("expert_type", ["swiglu", "gelu"])
def test_dispatchers_match_dense_reference(expert_type):
    x = make_x()
    cfg = make_cfg(expert_type=expert_type, eval_capacity_factor=4.0)
    _, _, variables = build(cfg, x)
    routing = route(cfg, variables, x)
    ref = reference_moe(variables["params"], x, routing.dense_weights(E), expert_type)
    variants = [dict(dispatch="dropless", gmm_backend="ragged_dot"),
                dict(dispatch="dropless", gmm_backend="blocked"),
                dict(dispatch="dropless", gmm_backend="dense"),
                dict(dispatch="dropless", gmm_backend="megablox"),
                dict(dispatch="capacity")]
    for kw in variants:
        model = moe_lib.moe_from_config(make_cfg(expert_type=expert_type, eval_capacity_factor=4.0, **kw),
                                        d_model=D, dtype=jnp.float32, param_dtype=jnp.float32)
        y, aux = _apply(model, variables, x)
        np.testing.assert_allclose(y, ref, **TOL, err_msg=str(kw))
        assert float(aux["stats"]["dropped_fraction"]) == 0.0


def test_capacity_index_matches_einsum_reference_with_drops():
    x = make_x()
    cfg = make_cfg(dispatch="capacity", capacity_factor=1.0, min_capacity=0, batch_prioritized=True)
    model, _, variables = build(cfg, x)
    model_ref = model.clone(capacity_impl="einsum")
    cot = make_x(3)

    def run(m):
        def loss(v, x):
            y, aux = m.apply(v, x, deterministic=False)
            return jnp.sum(y * cot), (y, aux)
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(variables, x)

    (_, (y, aux)), g = run(model)
    (_, (y_ref, aux_ref)), g_ref = run(model_ref)
    assert float(aux["stats"]["dropped_fraction"]) > 0.05
    np.testing.assert_allclose(aux["stats"]["dropped_fraction"], aux_ref["stats"]["dropped_fraction"])
    np.testing.assert_allclose(y, y_ref, **TOL)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(a, b, **TOL)


def test_capacity_with_room_for_every_token_equals_dropless():
    x = make_x()
    cfg = make_cfg(dispatch="capacity", eval_capacity_factor=E / 2)  # C = S
    model, _, variables = build(cfg, x)
    y_cap, aux = _apply(model, variables, x)
    y_dl, _ = _apply(model.clone(dispatch="dropless"), variables, x)
    assert float(aux["stats"]["dropped_fraction"]) == 0.0
    np.testing.assert_allclose(y_cap, y_dl, **TOL)


def test_dropless_drops_nothing_and_capacity_drops_overflow():
    # Every token picks expert 0 first (selection bias); capacity C=2 keeps 2 per group.
    x = make_x()
    cfg = make_cfg(k=1, bias_update_rate=0.01, dispatch="dropless")
    model, _, variables = build(cfg, x)
    variables = with_bias(variables, [10.0] + [0.0] * (E - 1))
    routing = route(cfg, variables, x)
    assert np.all(np.asarray(routing.indices) == 0)
    ref = reference_moe(variables["params"], x, routing.dense_weights(E))
    y, aux = _apply(model, variables, x)
    np.testing.assert_allclose(y, ref, **TOL)
    assert float(aux["stats"]["dropped_fraction"]) == 0.0

    cap = model.clone(dispatch="capacity", eval_capacity_factor=2.0, min_capacity=0)  # C = round(2·8/8) = 2
    y_cap, aux_cap = _apply(cap, variables, x)
    np.testing.assert_allclose(aux_cap["stats"]["dropped_fraction"], 6 / 8)
    np.testing.assert_allclose(y_cap[:, :2], ref[:, :2], **TOL)  # first two tokens of each group kept
    assert np.all(np.asarray(y_cap[:, 2:]) == 0.0)  # overflow: zero MoE output


def test_batch_prioritized_slots():
    indices = jnp.zeros((6, 1), jnp.int32)  # all to expert 0
    priority = jnp.array([0.1, 0.9, 0.3, 0.8, 0.2, 0.5])
    slots = jax.jit(capacity_slots, static_argnames=("num_experts", "capacity"))
    slot, src = slots(indices, priority, num_experts=2, capacity=2)
    kept = np.nonzero(np.asarray(slot[:, 0]) < 4)[0]
    assert set(kept) == {1, 3}
    assert list(np.asarray(src)) == [1, 3, 6, 6]  # expert 0 holds tokens 1, 3; expert 1 empty
    slot, _ = slots(indices, None, num_experts=2, capacity=2)
    assert list(np.asarray(slot[:, 0])) == [0, 1, 4, 4, 4, 4]  # token order; 4 = dropped


@pytest.mark.parametrize("kw", [dict(dispatch="dropless", gmm_backend="ragged_dot"),
                                dict(dispatch="dropless", gmm_backend="blocked"),
                                dict(dispatch="dropless", gmm_backend="dense"),
                                dict(dispatch="dropless", gmm_backend="megablox"),
                                dict(dispatch="capacity")],
                         ids=["ragged_dot", "blocked", "dense", "megablox", "capacity"])
def test_expert_without_tokens_gets_zero_gradient(kw):
    x = make_x()
    cfg = make_cfg(bias_update_rate=0.01, **kw)
    model, _, variables = build(cfg, x)
    variables = with_bias(variables, [0.0] * (E - 1) + [-10.0])  # expert 7 never selected
    grads = jax.jit(jax.grad(lambda v: jnp.sum(model.apply(v, x, deterministic=True)[0] ** 2)))(variables)
    for name, gw in grads["params"]["experts"].items():
        assert np.all(np.asarray(gw[E - 1]) == 0.0), name
        assert np.any(np.asarray(gw[0]) != 0.0), name


@pytest.mark.parametrize("backend", ["ragged_dot", "blocked", "megablox"])
@pytest.mark.parametrize("sizes", [[5, 0, 7, 3], [15, 0, 0, 0], [0, 0, 0, 10], [2, 3, 1, 1]])
def test_gmm_backends_match_per_row_reference(backend, sizes):
    """Every backend against a per-row loop, forward and backward, empty experts included;
    rows past sum(group_sizes) are ignored."""
    from routezoo.layers.moe.gmm import GMM_BACKENDS
    rng = np.random.default_rng(sum(sizes))
    x = jnp.asarray(rng.normal(size=(16, 6)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(4, 6, 5)), jnp.float32)
    gs, n = jnp.asarray(sizes, jnp.int32), sum(sizes)
    owner = np.repeat(np.arange(4), sizes)

    def ref(x, w):
        return jnp.stack([x[i] @ w[owner[i]] for i in range(n)])

    def loss(f):
        return lambda x, w: jnp.sum(jnp.sin(f(x, w)[:n]))

    got = GMM_BACKENDS[backend](x, w, gs)
    np.testing.assert_allclose(got[:n], ref(x, w), rtol=1e-5, atol=1e-5)
    g_got = jax.grad(loss(lambda x, w: GMM_BACKENDS[backend](x, w, gs)), argnums=(0, 1))(x, w)
    g_ref = jax.grad(loss(ref), argnums=(0, 1))(x, w)
    for a, b in zip(g_got, g_ref):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    # an expert with no rows gets exactly zero weight gradient
    for e in np.flatnonzero(np.asarray(sizes) == 0):
        assert np.all(np.asarray(g_got[1][e]) == 0.0)


# ------------------------------------------------------------------ routers


def _router_on_logits(router, logits, **kw):
    """Runs ``router`` with an identity kernel, so its logits are ``logits``."""
    params = {"params": {"kernel": jnp.eye(logits.shape[-1], dtype=jnp.float32)}}
    return jax.jit(functools.partial(router.apply, deterministic=True, **kw))(params, logits)


def test_load_balance_and_z_loss_formulas():
    logits = np.array(jax.random.normal(jax.random.PRNGKey(3), (12, 4))) * 2
    router = routers_lib.TopKRouter(num_experts=4, k=2, load_balance_coef=0.5, z_loss_coef=0.25)
    routing = _router_on_logits(router, jnp.asarray(logits), group_size=6)

    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    top2 = np.argsort(-probs, axis=-1)[:, :2]
    expected_lb = 0.0
    for g in range(2):
        rows = slice(6 * g, 6 * g + 6)
        f = np.array([np.mean([e in top2[t] for t in range(6 * g, 6 * g + 6)]) for e in range(4)])
        p = probs[rows].mean(0)
        expected_lb += 4 * np.sum(f * p) / 2
    expected_z = np.mean(np.log(np.exp(logits).sum(-1)) ** 2)
    np.testing.assert_allclose(routing.losses["load_balance"], 0.5 * expected_lb, rtol=1e-5)
    np.testing.assert_allclose(routing.losses["z_loss"], 0.25 * expected_z, rtol=1e-5)
    np.testing.assert_allclose(routing.stats["load_balance_loss"], expected_lb, rtol=1e-5)
    np.testing.assert_array_equal(routing.indices, top2)
    # renormalised top-2 weights; load sums to one
    w = np.take_along_axis(probs, top2, -1)
    np.testing.assert_allclose(routing.weights, w / w.sum(-1, keepdims=True), rtol=1e-5)
    np.testing.assert_allclose(np.sum(routing.stats["load"]), 1.0, rtol=1e-6)
    # balanced top-1 routing has L_b = 1
    balanced = jnp.asarray(np.eye(4)[np.arange(8) % 4] * 5.0, jnp.float32)
    r1 = _router_on_logits(routers_lib.TopKRouter(num_experts=4, k=1), balanced)
    np.testing.assert_allclose(r1.stats["load_balance_loss"], 1.0, rtol=1e-5)


def test_top1_uses_raw_probability_and_router_gets_gradient():
    x = make_x()
    cfg = make_cfg(k=1, renormalize=True, dispatch="dropless")
    model, _, variables = build(cfg, x)
    routing = route(cfg, variables, x)
    probs = jax.nn.softmax(x.reshape(-1, D) @ variables["params"]["router"]["kernel"])
    np.testing.assert_allclose(routing.weights[:, 0], probs.max(-1), rtol=1e-5)
    assert float(routing.weights.max()) < 1.0
    cot = make_x(5)
    g = jax.jit(jax.grad(lambda v: jnp.sum(model.apply(v, x, deterministic=True)[0] * cot)))(variables)
    assert float(jnp.abs(g["params"]["router"]["kernel"]).max()) > 1e-4


def test_jitter_uses_dropout_rng_only_in_training():
    x = make_x()
    cfg = make_cfg(jitter=0.1)
    model, _, variables = build(cfg, x)
    y_eval1, _ = _apply(model, variables, x)
    y_eval2, _ = _apply(model, variables, x)
    np.testing.assert_array_equal(y_eval1, y_eval2)
    y_a, _ = model.apply(variables, x, deterministic=False, rngs={"dropout": jax.random.PRNGKey(0)})
    y_b, _ = model.apply(variables, x, deterministic=False, rngs={"dropout": jax.random.PRNGKey(1)})
    assert not np.allclose(y_a, y_b)


def test_aux_loss_free_bias_balances_without_gradient():
    # Inputs that favour expert 0 strongly.
    x = make_x(shape=(4, 16, E)) + jnp.eye(E)[0] * 3.0
    router = routers_lib.TopKRouter(num_experts=E, k=1, bias_update_rate=0.02)
    variables = router.init(jax.random.PRNGKey(0), x.reshape(-1, E), deterministic=True)
    variables = {"params": {"kernel": jnp.eye(E)}, "router_state": variables["router_state"]}

    @jax.jit
    def step(state):
        routing, new = router.apply({"params": variables["params"], "router_state": state},
                                    x.reshape(-1, E), deterministic=False, mutable=["router_state"])
        return routing.stats["load"], new["router_state"]

    state = variables["router_state"]
    load0, _ = step(state)
    for _ in range(60):
        load, state = step(state)
    assert float(load0[0]) > 0.5
    assert float(load.max()) < float(load0.max()) - 0.2
    assert float(state["bias"][0]) < 0
    # eval (deterministic) and a non-mutable training call leave the bias alone
    routing = jax.jit(functools.partial(router.apply, deterministic=False))(
        {"params": variables["params"], "router_state": state}, x.reshape(-1, E))
    probs = jax.nn.softmax(x.reshape(-1, E))
    np.testing.assert_allclose(routing.weights[:, 0],
                               jnp.take_along_axis(probs, routing.indices, -1)[:, 0], rtol=1e-6)
    # no gradient reaches the bias, through the whole MoE block
    cfg = make_cfg(bias_update_rate=0.02)
    xm = make_x()
    model, _, mv = build(cfg, xm)
    assert "router_state" in mv
    g = jax.jit(jax.grad(lambda v: jnp.sum(model.apply(v, xm, deterministic=True)[0] ** 2)))(mv)
    assert np.all(np.asarray(g["router_state"]["router"]["bias"]) == 0.0)
    _, new = jax.jit(functools.partial(model.apply, deterministic=False, mutable=["router_state"]))(mv, xm)
    assert not np.allclose(new["router_state"]["router"]["bias"], 0.0)


def test_expert_choice_each_expert_takes_exactly_c_tokens():
    x = make_x()
    cfg = make_cfg(router="expert_choice", capacity_factor=2.0, eval_capacity_factor=1.0, min_capacity=0)
    model, _, variables = build(cfg, x)
    for deterministic, cf in ((False, 2.0), (True, 1.0)):
        routing = route(cfg, variables, x, deterministic=deterministic)
        c = round(cf * L / E)
        assert routing.expert_indices.shape == (B, E, c)
        for g in range(B):
            for e in range(E):
                assert len(set(np.asarray(routing.expert_indices[g, e]).tolist())) == c
        chosen = np.asarray(routing.indices >= 0).reshape(B, L, E)
        np.testing.assert_array_equal(chosen.sum(1), c)  # per group and expert
        assert "load_balance" not in routing.losses
    routing = route(cfg, variables, x)
    ref = reference_moe(variables["params"], x, routing.dense_weights(E))
    y, _ = _apply(model, variables, x)
    np.testing.assert_allclose(y, ref, **TOL)


def test_shared_experts_and_residual_mlp_add_dense_ffns():
    x = make_x()
    cfg = make_cfg(num_shared_experts=2, shared_expert_dim=8, residual_mlp=True)
    model, _, variables = build(cfg, x)
    p = variables["params"]
    assert p["shared_experts"]["wi"].shape == (D, 16)
    assert p["residual_mlp"]["wi"].shape == (D, F)
    y, _ = _apply(model, variables, x)
    plain = model.clone(num_shared_experts=0, residual_mlp=False)
    y_routed, _ = _apply(plain, {"params": {"router": p["router"], "experts": p["experts"]}}, x)
    from routezoo.layers.mlp import MLP
    shared = MLP(16, "swiglu").apply({"params": p["shared_experts"]}, x)
    residual = MLP(F, "swiglu").apply({"params": p["residual_mlp"]}, x)
    np.testing.assert_allclose(y, y_routed + shared + residual, **TOL)


def test_aux_and_stats():
    x = make_x()
    model, _, variables = build(make_cfg(dispatch="capacity", capacity_factor=1.0), x)
    y, aux = _apply(model, variables, x, deterministic=False)
    assert y.shape == x.shape and y.dtype == jnp.float32
    assert set(aux["losses"]) == {"load_balance", "z_loss"}
    assert {"load", "dropped_fraction", "experts_per_token", "router_entropy",
            "load_balance_loss", "z_loss"} <= set(aux["stats"])
    assert aux["stats"]["load"].shape == (E,)
    np.testing.assert_allclose(aux["stats"]["experts_per_token"], 2.0)
    assert 0 < float(aux["stats"]["router_entropy"]) <= np.log(E)


def test_router_precision_bf16_3x_matches_float32():
    """``router_precision=bf16_3x`` (three bfloat16 passes) gives the float32 logits to
    ~1e-5 and the same expert choices; a one-pass bfloat16 product would not (~1e-3)."""
    x = make_x()
    _, _, variables = build(make_cfg(), x)
    ref = route(make_cfg(), variables, x)
    got = route(make_cfg(router_precision="bf16_3x"), variables, x)
    np.testing.assert_array_equal(got.indices, ref.indices)
    np.testing.assert_allclose(got.weights, ref.weights, rtol=1e-4, atol=1e-5)
    xf = x.reshape(-1, D)
    kernel = variables["params"]["router"]["kernel"]
    exact = np.asarray(xf, np.float64) @ np.asarray(kernel, np.float64)
    x3 = jnp.einsum("TD,DE->TE", xf, kernel, precision=routers_lib.router_precision("bf16_3x"))
    one_pass = jnp.einsum("TD,DE->TE", xf.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16),
                          preferred_element_type=jnp.float32)
    scale = np.abs(exact).max()
    assert np.abs(np.asarray(x3) - exact).max() < 1e-4 * scale
    assert np.abs(np.asarray(one_pass) - exact).max() > 10 * np.abs(np.asarray(x3) - exact).max()


# ------------------------------------------------------------------ config validation


@pytest.mark.parametrize("overrides,causal,mesh,match", [
    (dict(router="hash9"), False, {}, r"moe.router='hash9' is unknown; known: \[.*'top_k'.*\]"),
    (dict(dispatch="magic"), False, {}, r"moe.dispatch='magic' is unknown; known: \['capacity', 'dropless'\]"),
    (dict(gmm_backend="cutlass"), False, {}, r"moe.gmm_backend='cutlass' is unknown; known: \['auto', 'blocked', 'dense', 'megablox', 'mosaic', 'pallas', 'ragged_dot'\]"),
    (dict(router_precision="tf32"), False, {}, r"moe.router_precision='tf32' is unknown; known: \['bf16_3x', 'float32'\]"),
    (dict(k=9), False, {}, r"moe.k=9 must be between 1 and moe.num_experts=8"),
    (dict(), False, {"expert": 3}, r"moe.num_experts=8 is not divisible by mesh.expert=3"),
    (dict(dispatch="capacity", capacity_factor=0.0), False, {}, r"moe.capacity_factor=0.0 must be > 0"),
    (dict(router="expert_choice"), True, {}, r"moe.router='expert_choice' .* cannot be used in a causal model"),
])
def test_validate_moe_config_errors(overrides, causal, mesh, match):
    with pytest.raises(ValueError, match=match) as err:
        moe_lib.validate_moe_config(make_cfg(**overrides), causal=causal, mesh_shape=mesh)
    assert "\n" not in str(err.value)


def test_validate_moe_config_accepts_defaults():
    moe_lib.validate_moe_config(base.get_config().model.moe, causal=True, mesh_shape={"expert": 4, "data": 2})
    moe_lib.validate_moe_config(make_cfg(router="expert_choice"), causal=False, mesh_shape={"expert": -1})


def test_moe_from_config_inside_a_parent_keeps_router_under_moe():
    cfg = make_cfg()

    class Parent(nn.Module):
        @nn.compact
        def __call__(self, x):
            layer = moe_lib.moe_from_config(cfg, d_model=D, dtype=jnp.float32, param_dtype=jnp.float32, name="moe")
            return layer(x, deterministic=True)[0]

    shapes = jax.eval_shape(Parent().init, jax.random.PRNGKey(0), make_x())
    params = nn.unbox(shapes)["params"]
    assert set(params) == {"moe"}
    assert set(params["moe"]) == {"router", "experts"}
    assert params["moe"]["experts"]["wi"].shape == (E, D, F)


@pytest.mark.parametrize("backend,dense_expected", [("blocked", False), ("ragged_dot", True)])
def test_compiled_dropless_has_no_dense_expert_by_token_buffer(backend, dense_expected):
    """The dropless path must not materialise an ``[E, T·K, D]``-sized buffer (a masked
    grouped matmul over every expert); XLA:CPU's ``ragged_dot`` lowering does, as a control."""
    import re
    e, d, f, b, l = 8, 64, 128, 4, 64
    cfg = make_cfg(dispatch="dropless", gmm_backend=backend, num_experts=e, expert_dim=f, k=2)
    model = moe_lib.moe_from_config(cfg, d_model=d, dtype=jnp.float32, param_dtype=jnp.float32)
    x = jnp.zeros((b, l, d), jnp.float32)
    variables = jax.jit(lambda: model.init(jax.random.key(0), x, deterministic=True))()

    def loss(v, x):
        return jnp.sum(model.apply(v, x, deterministic=True)[0])

    hlo = jax.jit(jax.grad(loss)).lower(variables, x).compile().as_text()
    limit = e * (b * l * 2) * min(d, f)            # E x (T*K rows) x width
    sizes = [np.prod([int(n) for n in dims.split(",") if n]) for dims in re.findall(r"[fbs]\d+\[([\d,]+)\]", hlo)]
    assert (max(sizes) >= limit) == dense_expected, (backend, max(sizes), limit)


def test_capacity_token_fill_is_causal_and_slot_fill_is_gshard():
    """Two tokens, k=2, one slot per expert. Token 0 picks (e0, e1), token 1 picks (e1, e0).
    GShard's slot order queues both first choices first: token 1's first choice takes e1
    from token 0's second choice (a later token changes an earlier one's output). Token
    order keeps token 0's two copies and drops token 1's."""
    indices = jnp.array([[0, 1], [1, 0]], jnp.int32)
    slots = jax.jit(capacity_slots, static_argnames=("num_experts", "capacity", "fill"))
    slot, _ = slots(indices, None, num_experts=2, capacity=1, fill="slot")
    assert np.asarray(slot).tolist() == [[0, 2], [1, 2]]        # 2 = dropped: token 0 lost e1
    slot, _ = slots(indices, None, num_experts=2, capacity=1, fill="token")
    assert np.asarray(slot).tolist() == [[0, 1], [2, 2]]        # token 0 complete, token 1 dropped
    # causality through the block: with token fill, changing the last token of a group
    # leaves every earlier token's output unchanged, with drops happening
    x = make_x()
    model, _, variables = build(make_cfg(dispatch="capacity", capacity_factor=0.5, eval_capacity_factor=0.5,
                                         min_capacity=0), x)
    y1 = np.asarray(_apply(model, variables, x)[0])
    y2, aux = _apply(model, variables, x.at[:, -1].set(make_x(9)[:, -1]))
    assert float(aux["stats"]["dropped_fraction"]) > 0
    np.testing.assert_array_equal(y1[:, :-1], np.asarray(y2)[:, :-1])


@pytest.mark.parametrize("overrides,match", [
    (dict(dispatch="capacity", capacity_fill="slot", k=2), r"moe.capacity_fill='slot' with moe.k=2 .* causal"),
    (dict(dispatch="capacity", batch_prioritized=True), r"moe.batch_prioritized=True .* causal"),
    (dict(dispatch="capacity", capacity_fill="bogus"), r"moe.capacity_fill='bogus' is unknown"),
])
def test_non_causal_capacity_options_are_refused_in_decoders(overrides, match):
    with pytest.raises(ValueError, match=match) as err:
        moe_lib.validate_moe_config(make_cfg(**overrides), causal=True, mesh_shape={})
    assert "\n" not in str(err.value)
    if "bogus" not in overrides.get("capacity_fill", ""):
        moe_lib.validate_moe_config(make_cfg(**overrides), causal=False, mesh_shape={})   # encoders may
