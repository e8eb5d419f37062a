"""Routers with state across layers (recurrent, RMoE) and across the model (pregate, Read-ME):
their defining properties, through the layer and through the zoo LM."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from conftest import tiny_config
from routezoo import zoo
from routezoo.layers.routers import TopKRouter, router_from_config
from routezoo.layers.routers.stateful import RecurrentRouter, RecurrentRouterCell
from routezoo.layers.moe import validate_moe_config


def _model(router, ffn="moe,mlp,moe", dispatch="dropless", **extra):
    overrides = {"model.ffn": ffn, "model.num_layers": len(ffn.split(",")), "model.moe.router": router,
                 "model.moe.num_experts": 4, "model.moe.k": 2, "model.moe.recurrent_dim": 8,
                 "model.moe.pregate_dim": 16, "model.moe.dispatch": dispatch, **extra}
    c = tiny_config("/tmp/unused", **overrides)
    validate_moe_config(c.model.moe, causal=True, mesh_shape={})
    model = zoo.build(c.model)
    tokens = jax.random.randint(jax.random.key(0), (2, 16), 2, 258)
    variables = model.init({"params": jax.random.key(1), "dropout": jax.random.key(2)}, tokens)
    return model, nn.meta.unbox(variables), tokens


# ------------------------------------------------------------------ recurrent (RMoE)


class _TwoLayers(nn.Module):
    """Two recurrent-router layers sharing one cell: logits of layer 1 from layer 0's state."""

    @nn.compact
    def __call__(self, x0, x1, h0):
        cell = RecurrentRouterCell(8, name="cell")
        r0 = RecurrentRouter(num_experts=4, k=2, recurrent_dim=8, name="router0")
        r1 = RecurrentRouter(num_experts=4, k=2, recurrent_dim=8, name="router1")
        routing0 = r0(x0, deterministic=True, router_state=h0, router_cell=cell)
        routing1, logits1 = r1(x1, deterministic=True, router_state=routing0.state, router_cell=cell,
                               return_logits=True)
        return routing0.state, logits1


def test_recurrent_layer_logits_depend_on_previous_state():
    x0, x1 = jax.random.normal(jax.random.key(0), (2, 6, 16))
    m = _TwoLayers()
    h0 = jnp.zeros((6, 8))
    params = m.init(jax.random.key(1), x0, x1, h0)
    assert set(params["params"]) == {"cell", "router0", "router1"}   # one cell, two routers

    # d logits_1 / d h_0 where h_0 is layer 0's router state (the state layer 1 receives)
    state0, _ = m.apply(params, x0, x1, h0)

    def logits1_from_state(h):
        cell = RecurrentRouterCell(8)
        r1 = RecurrentRouter(num_experts=4, k=2, recurrent_dim=8)
        variables = {"params": {**params["params"]["router1"]}}
        bound_cell = cell.bind({"params": params["params"]["cell"]})
        _, logits = r1.apply(variables, x1, deterministic=True, router_state=h, router_cell=bound_cell,
                             return_logits=True)
        return logits

    _, logits_ref = m.apply(params, x0, x1, h0)
    np.testing.assert_allclose(logits1_from_state(state0), logits_ref, rtol=1e-6)
    jac = jax.jacobian(logits1_from_state)(state0)   # [T, E, T, R]
    assert float(jnp.max(jnp.abs(jac))) > 1e-4
    # and through layer 0: gradient of layer-1 logits w.r.t. the state entering layer 0
    g = jax.grad(lambda h: jnp.sum(m.apply(params, x0, x1, h)[1] ** 2))(jnp.ones((6, 8)) * 0.1)
    assert float(jnp.max(jnp.abs(g))) > 0


def test_recurrent_cell_shared_and_state_passes_dense_layer():
    model, variables, tokens = _model("recurrent", ffn="moe,mlp,moe")
    params = variables["params"]
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    cell_paths = {jax.tree_util.keystr(p) for p, _ in flat if "router_cell" in jax.tree_util.keystr(p)}
    assert cell_paths and all(p.startswith("['router_cell']") for p in cell_paths)   # one copy, top level
    assert set(params["router_cell"]) == {"wi", "wh", "bi", "bh"}
    for i in (0, 2):                                  # per-layer projector and output router
        assert set(params[f"layer{i}"]["moe"]["router"]) == {"proj", "out"}
    assert "moe" not in params["layer1"]

    (_, aux), inter = model.apply(variables, tokens, mutable=["intermediates"])
    states = {k: v[0] for k, v in inter["intermediates"].items()}
    np.testing.assert_array_equal(states["layer1_router_state"], states["layer0_router_state"])  # dense: unchanged
    assert not np.allclose(states["layer2_router_state"], states["layer1_router_state"])
    assert states["layer0_router_state"].shape == (tokens.size, 8)

    # layer 2's routing depends on layer 0's router (through the state across the dense layer)
    def layer2_z(p0):
        p = jax.tree.map(lambda x: x, params)
        p["layer0"]["moe"]["router"] = p0
        _, a = model.apply({"params": p}, tokens)
        return a["stats"]["layer2/z_loss"]
    g = jax.grad(layer2_z)(params["layer0"]["moe"]["router"])
    assert float(jnp.max(jnp.abs(g["proj"]))) > 0


@pytest.mark.parametrize("dispatch", ["dropless", "capacity"])
def test_recurrent_trains_gradients_reach_cell(dispatch):
    model, variables, tokens = _model("recurrent", dispatch=dispatch)

    def loss(p):
        logits, aux = model.apply({"params": p}, tokens, deterministic=False,
                                  rngs={"dropout": jax.random.key(3)})
        ce = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[..., None], -1))
        return ce + sum(aux["losses"].values())
    g = jax.grad(loss)(variables["params"])
    assert float(jnp.max(jnp.abs(g["router_cell"]["wh"]))) > 0


def test_recurrent_config_checks():
    c = tiny_config("/tmp/unused", **{"model.moe.router": "recurrent", "model.moe.recurrent_dim": 0})
    with pytest.raises(ValueError, match="recurrent_dim"):
        validate_moe_config(c.model.moe, causal=True, mesh_shape={})
    c = tiny_config("/tmp/unused", **{"model.moe.router": "recurrent", "model.moe.recurrent_cell": "lstm"})
    with pytest.raises(ValueError, match="recurrent_cell"):
        validate_moe_config(c.model.moe, causal=True, mesh_shape={})
    c = tiny_config("/tmp/unused", **{"model.moe.router": "recurrent", "model.moe.recurrent_logit_scale": 0.0})
    with pytest.raises(ValueError, match=r"moe.recurrent_logit_scale=0.0 must be > 0"):
        validate_moe_config(c.model.moe, causal=True, mesh_shape={})
    c.model.moe.recurrent_logit_scale = 3.6
    assert router_from_config(c.model.moe).logit_scale == 3.6
    assert router_from_config(tiny_config("/tmp/unused", **{"model.moe.router": "recurrent"}).model.moe).logit_scale == 1.0


class _RecurrentChain(nn.Module):
    """Two MoE layers' recurrent routers (one shared cell) at the leaderboard's router sizes:
    ``E = 8``, ``W = 128``, ``router_init_scale = 0.1``; returns both layers' logits."""

    logit_scale: float = 1.0

    @nn.compact
    def __call__(self, x0, x1):
        cell = RecurrentRouterCell(128, name="cell")
        state, out = None, []
        for i, x in enumerate((x0, x1)):
            router = RecurrentRouter(num_experts=8, k=2, recurrent_dim=128, init_scale=0.1,
                                     logit_scale=self.logit_scale, name=f"router{i}")
            routing, logits = router(x, deterministic=True, router_state=state, router_cell=cell, return_logits=True)
            state = routing.state
            out.append(logits)
        return out


@pytest.mark.parametrize("d", [64, 512])
def test_recurrent_logit_scale_matches_top_k_initial_logits(d):
    """Initial logit std of ``top_k`` and of the recurrent router on the same input (RMS 1, as
    the RMS-normalised router input): the recurrent logits start 3.5-4.2 times smaller (first
    layer from ``h_0 = 0``, second from the first's state); ``logit_scale`` multiplies them
    exactly, and the docstring's 3.6 brings them to ``top_k``'s scale."""
    x0, x1 = jax.random.normal(jax.random.key(10), (2, 2048, d))
    top_k = TopKRouter(num_experts=8, k=2, init_scale=0.1)
    kernel = nn.meta.unbox(top_k.init(jax.random.key(11), x0, deterministic=True))["params"]["kernel"]
    std_top_k = float(jnp.std(jnp.concatenate([x0, x1]) @ kernel))
    assert 0.29 < std_top_k < 0.34                      # √0.1 · RMS(x) for any d

    def logits(scale):
        chain = _RecurrentChain(logit_scale=scale)
        variables = chain.init(jax.random.key(12), x0, x1)
        return jax.jit(chain.apply)(variables, x0, x1)

    plain, scaled = logits(1.0), logits(3.6)
    for a, b in zip(plain, scaled):                     # the same draws, times 3.6
        np.testing.assert_allclose(b, 3.6 * a, rtol=1e-5, atol=1e-6)
    ratios = [std_top_k / float(jnp.std(a)) for a in plain]
    assert 3.8 < ratios[0] < 4.5 and 3.2 < ratios[1] < 4.1, ratios
    std_scaled = float(np.mean([jnp.std(b) for b in scaled]))
    assert abs(std_scaled / std_top_k - 1) < 0.12, (std_scaled, std_top_k)


# ------------------------------------------------------------------ pregate (Read-ME)


@pytest.mark.parametrize("dispatch,shared", [("dropless", True), ("capacity", False)])
def test_pregate_routes_are_the_ones_used(dispatch, shared):
    model, variables, tokens = _model("pregate", dispatch=dispatch,
                                      **{"model.moe.pregate_shared_routes": shared})
    routes = model.apply(variables, tokens, method=model.routes)
    assert routes.shape == (2, 2, 16, 2) and routes.dtype == jnp.int32   # [M, B, L, K]
    assert model.moe_layers() == (0, 2)
    if shared:
        np.testing.assert_array_equal(routes[0], routes[1])

    # captured from the MoE layers of the forward pass (training and eval)
    for det in (True, False):
        (logits, _), inter = model.apply(variables, tokens, deterministic=det, mutable=["intermediates"],
                                         rngs={"dropout": jax.random.key(4)})
        used = [inter["intermediates"][f"layer{i}"]["moe"]["router"]["routes"][0] for i in (0, 2)]
        np.testing.assert_array_equal(np.stack(used).reshape(routes.shape), routes)
    # feeding the routes explicitly gives the same outputs; other routes change them
    logits_eval, _ = model.apply(variables, tokens)
    fed, _ = model.apply(variables, tokens, routes=routes)
    np.testing.assert_array_equal(fed, logits_eval)
    other, _ = model.apply(variables, tokens, routes=(routes + 1) % 4)
    assert not np.allclose(other, logits_eval)


def test_pregate_routes_do_not_depend_on_backbone():
    model, variables, tokens = _model("pregate")
    params = variables["params"]
    routes = model.apply(variables, tokens, method=model.routes)
    perturbed = jax.tree.map(lambda x: x, params)
    for name in ("embed", "layer0", "layer1", "layer2", "final_norm"):   # every backbone weight
        perturbed[name] = jax.tree.map(lambda w: w + 0.5 * jax.random.normal(jax.random.key(9), w.shape),
                                       params[name])
    routes_p = model.apply({"params": perturbed}, tokens, method=model.routes)
    np.testing.assert_array_equal(routes_p, routes)
    (logits_p, _), inter = model.apply({"params": perturbed}, tokens, mutable=["intermediates"])
    used = np.stack([inter["intermediates"][f"layer{i}"]["moe"]["router"]["routes"][0] for i in (0, 2)])
    np.testing.assert_array_equal(used.reshape(routes.shape), routes)      # the pass uses them too
    logits, _ = model.apply(variables, tokens)
    assert not np.allclose(logits_p, logits)                               # the backbone did change
    # a pre-gate weight does change them
    pg = jax.tree.map(lambda x: x, params)
    pg["pregate"] = jax.tree.map(lambda w: w + jax.random.normal(jax.random.key(9), w.shape), params["pregate"])
    assert not np.array_equal(model.apply({"params": pg}, tokens, method=model.routes), routes)
    # the pre-gate is trained through the combine weights
    g = jax.grad(lambda p: jnp.sum(model.apply({"params": p}, tokens)[0] ** 2) * 1e-3)(params)
    assert float(jnp.max(jnp.abs(g["pregate"]["head"]))) > 0


def test_pregate_config_checks():
    c = tiny_config("/tmp/unused", **{"model.moe.router": "pregate", "model.moe.pregate_dim": 10,
                                      "model.moe.pregate_heads": 2})
    with pytest.raises(ValueError, match="pregate_dim"):
        validate_moe_config(c.model.moe, causal=True, mesh_shape={})
