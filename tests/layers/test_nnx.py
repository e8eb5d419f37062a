"""routezoo layers from Flax NNX (routezoo.nnx): the NNX modules compute what the Linen
modules compute, train with nnx.Optimizer, export back to Linen, and draw their router
randomness from nnx.Rngs.

Shapes are small: B=4, L=8, D=16, F=32, E=4.
"""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import pytest  # noqa: E402
from flax import linen as nn  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import routezoo.nnx as rnnx  # noqa: E402
from routezoo.layers import adapters, routers, sharding  # noqa: E402
from routezoo.layers.adapters import hooks  # noqa: E402
from routezoo.layers.mlp import MLP  # noqa: E402

B, L, D, F, E = 4, 8, 16, 32, 4
TOL = dict(rtol=1e-5, atol=1e-6)
MOE = dict(num_experts=E, k=2, expert_dim=F, load_balance_coef=0.01, z_loss_coef=1e-3)


def make_x(seed=0, shape=(B, L, D)):
    return jax.random.normal(jax.random.PRNGKey(seed), shape, jnp.float32)


def assert_trees_close(a, b, **tol):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(lambda u, v: np.testing.assert_allclose(np.asarray(u), np.asarray(v), **(tol or TOL)), a, b)


def aux_loss(y, aux):
    w = jnp.cos(jnp.arange(y.size, dtype=jnp.float32)).reshape(y.shape)
    return jnp.sum(y * w) + sum(aux["losses"].values())


# ------------------------------------------------------------------ (a) NNX block == Linen block


@pytest.mark.parametrize("overrides", [
    dict(num_shared_experts=1, shared_expert_gate=True),
    dict(router="soft"),
], ids=["top_k_shared_experts", "soft"])
def test_moe_matches_linen_outputs_and_gradients(overrides):
    x = make_x()
    moe = rnnx.MoE(d_model=D, rngs=nnx.Rngs(0), **MOE, **overrides)
    linen, params = moe.linen_module, moe.linen_variables()["params"]
    # the NNX parameter tree is the Linen one, path for path
    assert_trees_close(nnx.to_pure_dict(nnx.state(moe, nnx.Param)), params, rtol=0, atol=0)

    def linen_loss(p, x):
        out = linen.apply({"params": p}, x, deterministic=True)
        return aux_loss(*out), out

    def nnx_loss(m, x):
        out = m(x, deterministic=True)
        return aux_loss(*out), out

    linen_fn = jax.jit(jax.value_and_grad(linen_loss, argnums=(0, 1), has_aux=True))
    nnx_fn = nnx.jit(nnx.value_and_grad(nnx_loss, argnums=(0, 1), has_aux=True))
    (_, out_ref), (g_params_ref, g_x_ref) = linen_fn(params, x)
    (_, out), (g_state, g_x) = nnx_fn(moe, x)
    assert_trees_close(out, out_ref)          # (y, aux): output, losses and statistics
    assert_trees_close(nnx.to_pure_dict(g_state), g_params_ref)
    np.testing.assert_allclose(g_x, g_x_ref, **TOL)

    # the other direction: Linen-initialised variables loaded into the NNX block
    other = _random_like(params, 7)
    moe.load_linen_variables({"params": other})
    (_, out2), _ = nnx_fn(moe, x)
    assert_trees_close(out2, linen_fn(other, x)[0][1])
    assert not np.allclose(out2[0], out[0])


# ------------------------------------------------------------------ (b) an NNX model trains


class ToyModel(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.embed = nnx.Linear(3, D, rngs=rngs)
        self.moe = rnnx.MoE(d_model=D, rngs=rngs, jitter=0.05, bias_update_rate=1e-3, **MOE)
        self.head = nnx.Linear(D, 1, rngs=rngs)

    def __call__(self, x, deterministic=True):
        h = self.embed(x)
        y, aux = self.moe(h, deterministic=deterministic)
        return self.head(h + y)[..., 0], aux


def test_nnx_model_trains_and_exports_to_linen():
    kx, ky = jax.random.split(jax.random.PRNGKey(3))
    x = jax.random.normal(kx, (B, L, 3))
    target = jnp.sin(2.0 * x[..., 0]) * x[..., 1] + 0.5 * jnp.cos(x[..., 2])

    model = ToyModel(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

    def loss_fn(m, deterministic):
        pred, aux = m(x, deterministic=deterministic)
        return jnp.mean((pred - target) ** 2) + sum(aux["losses"].values())

    @nnx.jit
    def train_step(m, opt):
        loss, grads = nnx.value_and_grad(loss_fn)(m, False)
        opt.update(m, grads)
        return loss

    bias0 = model.moe.router["bias"].get_value()
    losses = [float(train_step(model, optimizer)) for _ in range(40)]
    assert np.mean(losses[-5:]) < 0.5 * losses[0], losses[::8]
    # the balancing bias (router_state) moved outside the optimizer, which only holds Params
    assert not np.allclose(model.moe.router["bias"].get_value(), bias0)
    assert not jax.tree.leaves(nnx.state(optimizer, rnnx.RouterState))

    # the trained block's variables, exported to Linen, give the NNX block's outputs
    h, (y, aux) = nnx.jit(lambda m, x: (m.embed(x), m.moe(m.embed(x))))(model, x)
    variables = model.moe.linen_variables()
    assert set(variables) == {"params", "router_state"}
    ref = jax.jit(lambda v, h: model.moe.linen_module.apply(v, h, deterministic=True))(variables, h)
    assert_trees_close((y, aux), ref)


# ------------------------------------------------------------------ (c) adapters


def _random_like(tree, seed):
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    return jax.tree.unflatten(treedef, [0.1 * jax.random.normal(k, v.shape, v.dtype) for k, v in zip(keys, leaves)])


def test_lora_over_mlp_matches_linen():
    x = make_x(1)
    lora = adapters.LoRA(targets="wi|wo", rank=4, alpha=8.0)
    model = rnnx.Adapted(MLP(F, "swiglu"), lora, x, rngs=nnx.Rngs(0))
    assert set(model.adapter) == {"wi", "wo"}
    assert model.adapter["wi"]["lora_a"].out_sharding == ("embed", "rank")
    model.load_adapter_variables(_random_like(model.adapter_variables(), 5))   # B = 0 at init: make it count

    base, ad = model.base.linen_variables()["params"], model.adapter_variables()
    mlp = model.base.linen_module
    linen_fwd = jax.jit(lambda p, x: mlp.apply({"params": p}, x))
    nnx_fwd = nnx.jit(lambda m, x: m(x))

    ref = linen_fwd(lora.merge(base, ad), x)
    np.testing.assert_allclose(nnx_fwd(model, x), ref, **TOL)
    np.testing.assert_allclose(linen_fwd(model.merged_params(), x), ref, **TOL)
    assert not np.allclose(ref, linen_fwd(base, x), atol=1e-4)

    # gradients w.r.t. the adapter only (the base frozen, as in routezoo's adapter runs)
    g_ref = jax.jit(jax.grad(lambda a: jnp.sum(mlp.apply({"params": lora.merge(base, a)}, x) ** 2)))(ad)
    g = nnx.jit(nnx.grad(lambda m: jnp.sum(m(x) ** 2), argnums=nnx.DiffState(0, rnnx.AdapterParam)))(model)
    assert_trees_close(nnx.to_pure_dict(g)["adapter"], g_ref)

    optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=rnnx.AdapterParam)
    optimizer.update(model, g)
    assert_trees_close(model.base.linen_variables()["params"], base, rtol=0, atol=0)
    assert not np.allclose(model.adapter["wi"]["lora_b"].get_value(), ad["wi"]["lora_b"])


def test_poly_and_expert_lora_match_linen():
    """An activation-space method (Poly: per-example task routing through the projection
    hooks) over an MLP, and LoRA on the stacked experts of an NNX MoE block."""
    x, task_ids = make_x(2), jnp.array([0, 1, 1, 0], jnp.int32)
    poly = adapters.Poly(targets="wi", rank=2, num_skills=3, num_tasks=2)
    model = rnnx.Adapted(MLP(F, "gelu"), poly, x, rngs=nnx.Rngs(1))
    model.load_adapter_variables(_random_like(model.adapter_variables(), 6))
    base, ad = model.base.linen_variables()["params"], model.adapter_variables()

    @jax.jit
    def linen_fwd(base, ad, x, task_ids):
        with hooks.bind(poly, base, ad, task_ids=task_ids):
            return model.base.linen_module.apply({"params": base}, x)

    np.testing.assert_allclose(nnx.jit(lambda m, x, t: m(x, task_ids=t))(model, x, task_ids),
                               linen_fwd(base, ad, x, task_ids), **TOL)
    with pytest.raises(ValueError, match="task id"):
        jax.eval_shape(lambda: model(x))

    moe = rnnx.MoE(d_model=D, rngs=nnx.Rngs(0), **MOE)
    lora = adapters.LoRA(targets="experts/(wi|wo)", rank=2)
    adapted = rnnx.Adapted(moe, lora, rngs=nnx.Rngs(1))
    assert adapted.adapter["experts"]["wi"]["lora_a"].get_value().shape == (E, D, 2)
    adapted.load_adapter_variables(_random_like(adapted.adapter_variables(), 7))
    merged = lora.merge(moe.linen_variables()["params"], adapted.adapter_variables())
    ref = jax.jit(lambda p, x: moe.linen_module.apply({"params": p}, x, deterministic=True))(merged, x)
    assert_trees_close(nnx.jit(lambda m, x: m(x))(adapted, x), ref)


# ------------------------------------------------------------------ (d) stochastic routers and nnx.Rngs


def test_stochastic_router_follows_nnx_rngs():
    x = make_x(3)

    def thor(router_seed):   # the same parameters (params stream), THOR's draws from 'router'
        return rnnx.MoE(d_model=D, rngs=nnx.Rngs(params=0, router=router_seed), router="thor",
                        **{**MOE, "k": 1})

    train = nnx.jit(lambda m, x: m(x, deterministic=False))
    evaluate = nnx.jit(lambda m, x, rngs=None: m(x, rngs=rngs))
    a, b, c = thor(1), thor(1), thor(2)
    ya, aux_a = train(a, x)
    yb, aux_b = train(b, x)
    yc, aux_c = train(c, x)
    assert_trees_close((ya, aux_a), (yb, aux_b), rtol=0, atol=0)     # same seed: same draws
    assert not np.allclose(ya, yc)                                    # another seed: other experts
    assert not np.allclose(aux_a["stats"]["load"], aux_c["stats"]["load"])
    assert not np.allclose(train(a, x)[0], ya)                        # the stream advances per call

    # evaluation passes no keys: THOR's fixed seed, as the Linen eval step
    ref = jax.jit(lambda v, x: a.linen_module.apply(v, x, deterministic=True))(a.linen_variables(), x)
    assert_trees_close(evaluate(a, x), ref)
    assert_trees_close(evaluate(c, x), ref)
    # a call's own rngs are used even in evaluation
    r1 = evaluate(a, x, nnx.Rngs(router=5))[0]
    np.testing.assert_allclose(r1, evaluate(c, x, nnx.Rngs(router=5))[0], **TOL)
    assert not np.allclose(r1, evaluate(a, x, nnx.Rngs(router=6))[0])

    # a router on its own: jitter draws from the 'dropout' stream
    def topk(seed):
        return rnnx.Router(d_model=D, rngs=nnx.Rngs(params=0, dropout=seed), jitter=0.5, **MOE)

    t = x.reshape(B * L, D)
    route = nnx.jit(lambda r, t, deterministic: r(t, deterministic=deterministic), static_argnums=2)
    r0 = topk(0)
    assert isinstance(route(r0, t, True), routers.Routing)
    w0, w0_again, w1 = route(topk(0), t, False), route(r0, t, False), route(topk(1), t, False)
    assert_trees_close(w0, w0_again, rtol=0, atol=0)
    assert not np.allclose(w0.weights, w1.weights)
    assert_trees_close(route(r0, t, True), route(topk(1), t, True))   # no jitter in evaluation


def test_router_collections_in_nnx():
    """SMoE-Dropout: frozen random router in 'router_fixed' (never a Param), step counter in
    'router_state' advanced by training calls only; pre-gate's sown routes captured as
    intermediates, replaced on each capture."""
    x = make_x(4)
    m = rnnx.MoE(d_model=D, rngs=nnx.Rngs(0), router="smoe_dropout", smoe_k_steps=4, **MOE)
    assert isinstance(m.router["kernel"], rnnx.RouterFixed) and isinstance(m.router["step"], rnnx.RouterState)
    assert "router" not in nnx.to_pure_dict(nnx.state(m, nnx.Param))
    kernel = m.router["kernel"].get_value()
    train = nnx.jit(lambda m, x: m(x, deterministic=False))
    evaluate = nnx.jit(lambda m, x: m(x))
    ks = [float(train(m, x)[1]["stats"]["k"]) for _ in range(3)]
    assert int(m.router["step"].get_value()) == 3 and ks == sorted(ks) and ks[-1] > ks[0]
    out = evaluate(m, x)
    assert int(m.router["step"].get_value()) == 3
    np.testing.assert_array_equal(m.router["kernel"].get_value(), kernel)
    assert set(m.linen_variables()) == {"params", "router_state", "router_fixed"}
    assert out[1]["stats"]["k"] == E       # evaluation: every expert (smoe_eval_k = 0)

    logits = jax.random.normal(jax.random.PRNGKey(9), (B * L, E))
    pg = rnnx.MoE(d_model=D, rngs=nnx.Rngs(0), router="pregate", sample_input=x,
                  sample_router_inputs={"pregate_logits": logits}, **MOE)
    capture = nnx.jit(lambda m, x, lg: m(x, router_inputs={"pregate_logits": lg}, mutable=["intermediates"]))
    capture(pg, x, logits)
    capture(pg, x, logits)
    routes = nnx.to_pure_dict(nnx.state(pg, nnx.Intermediate))["router"]["routes"]
    assert len(routes) == 1 and routes[0].shape == (B * L, 2)


def test_wrap_generic_linen_module():
    """wrap(): batch statistics, dropout and sown values of any Linen module."""

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x, *, deterministic):
            h = nn.Dense(8)(x)
            h = nn.BatchNorm(use_running_average=deterministic)(h)
            self.sow("intermediates", "h", h)
            return nn.Dropout(0.5, deterministic=deterministic)(h)

    x = make_x(5, (B, 3))
    net = rnnx.wrap(Net(), x, nnx.Rngs(0), deterministic=True)
    assert isinstance(net.BatchNorm_0["mean"], nnx.BatchStat)
    mean0 = net.BatchNorm_0["mean"].get_value()
    y1, y2 = net(x, deterministic=False), net(x, deterministic=False)
    assert not np.allclose(y1, y2)                      # fresh dropout keys per call
    assert not np.allclose(net.BatchNorm_0["mean"].get_value(), mean0)
    np.testing.assert_allclose(net(x, deterministic=True),
                               Net().apply(net.linen_variables(), x, deterministic=True), **TOL)
    net(x, deterministic=True, mutable=["intermediates"])
    assert isinstance(net.h, nnx.Intermediate)


# ------------------------------------------------------------------ logical sharding metadata


def test_logical_sharding_metadata_survives():
    moe = rnnx.MoE(d_model=D, rngs=nnx.Rngs(0), **MOE)
    assert moe.experts["wi"].out_sharding == ("expert", "embed", "expert_mlp")
    assert moe.router["kernel"].out_sharding == ("embed", None)
    specs = nnx.get_partition_spec(nnx.state(moe, nnx.Param))
    assert specs["experts"]["wo"].get_value() == P("expert", "expert_mlp", "embed")
    # back to Linen: the same LogicallyPartitioned boxes
    boxed = moe.linen_variables(boxed=True)["params"]
    assert isinstance(boxed["experts"]["wi"], nn.LogicallyPartitioned)
    assert boxed["experts"]["wi"].names == ("expert", "embed", "expert_mlp")

    # under a mesh and routezoo's rules the variables are created sharded
    mesh = sharding.make_mesh({"expert": 4, "data": 2})
    x = make_x(shape=(8, L, D))   # the batch splits over the 8 devices of the batch axes
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
        sharded = rnnx.MoE(d_model=D, rngs=nnx.Rngs(0), **MOE)
        wi = sharded.experts["wi"].get_value()
        assert wi.sharding.is_equivalent_to(sharding.logical_sharding(mesh, ("expert", "embed", "expert_mlp")), 3)
        assert wi.sharding.shard_shape(wi.shape) == (1, D, F)
        y, _ = nnx.jit(lambda m, x: m(x))(sharded, x)
    np.testing.assert_allclose(y, nnx.jit(lambda m, x: m(x))(moe, x)[0], **TOL)
