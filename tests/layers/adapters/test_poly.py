"""Poly / MHR / MHR-z / MHR-mu (layers/adapters/poly.py) through the activation hook
(layers/adapters/hooks.py): counts against the papers' formulas, Poly with one skill ==
LoRA with Poly's 1/r scaling, a mixed-task batch == each example alone with its task's
merged weights, MHR-mu's merge == the routed path at uniform weights, relaxed-Bernoulli
weights, the few-shot modes' frozen skills, and the errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from conftest import random_adapter, per_layer_config, tiny_config
from routezoo import zoo
from routezoo.layers import adapters
from routezoo.layers.adapters import hooks as adapter_hooks
from routezoo.layers.adapters import poly
from routezoo.training import train as train_lib

TARGETS = "attn/(q|o)|mlp/(wi|wo)"


@pytest.fixture(scope="module")
def lm(data_dir):
    """(config, model, base params unboxed numpy, boxed abstract params, jitted apply)."""
    c = per_layer_config(data_dir)
    model = zoo.build(c.model)
    tokens = jnp.zeros((1, 8), jnp.int32)
    boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), tokens))["params"]
    rng = np.random.default_rng(0)
    base = jax.tree.map(lambda x: (0.2 * rng.standard_normal(x.shape)).astype(np.float32), nn.unbox(boxed))

    @jax.jit
    def apply(params, tokens):
        return model.apply({"params": params}, tokens)[0]

    return c, model, base, boxed, apply


def _routed(model, method, base, ad, tokens, task_ids):
    @jax.jit
    def run(base, ad, tokens, task_ids):
        with adapter_hooks.bind(method, base, ad, task_ids=task_ids):
            return model.apply({"params": base}, tokens)[0]
    return run(base, ad, tokens, task_ids)


def test_counts_equal_peft_formula(lm):
    c, _, _, boxed, _ = lm
    m = c.model
    d, hk, f = m.d_model, m.num_heads * m.head_dim, m.mlp_dim
    io = [(d, hk), (hk, d), (d, f), (f, d)]                       # q, o, wi, wo
    for cls, h in ((poly.Poly, 1), (poly.MHR, 4)):
        meth = cls(TARGETS, rank=2, num_skills=3, num_heads=h, num_tasks=5)
        want = m.num_layers * sum(3 * 2 * (i + o) + 5 * h * 3 for i, o in io)   # M R (I + O) + T H M
        assert meth.count(boxed) == want == adapters.num_params(jax.eval_shape(
            lambda: meth.init(jax.random.PRNGKey(0), boxed)))
    mu = poly.MHRMu(TARGETS, rank=2, num_skills=3, num_heads=4)
    assert mu.count(boxed) == m.num_layers * sum(3 * 2 * (i + o) for i, o in io)   # no router


def test_poly_one_skill_equals_lora_with_poly_scaling(lm):
    _, model, base, boxed, apply = lm
    p = poly.Poly(TARGETS, rank=3, num_skills=1, num_tasks=2)
    ad = random_adapter(p, boxed)
    lora = adapters.LoRA(TARGETS, rank=3, alpha=1.0)             # scale alpha / r = 1 / r
    lora_ad = {}
    for path, leaf in adapters.flat_params(ad).items():
        prefix, name = path.rsplit("/", 1)
        if name == "poly_a":      # [H=1, M=1, I, R] -> the weight's input axes, R
            t = p.hook_targets(base, ad)[prefix]
            lora_ad[f"{prefix}/lora_a"] = leaf[0, 0].reshape(*t.in_shape, 3)
        elif name == "poly_b":
            t = p.hook_targets(base, ad)[prefix]
            lora_ad[f"{prefix}/lora_b"] = leaf[0, 0].reshape(3, *t.out_shape)
    lora_ad = adapters.base._nest(lora_ad)
    tokens = jnp.asarray(np.random.default_rng(2).integers(2, 258, (2, 8)))
    want = apply(lora.merge(base, lora_ad), tokens)
    got = _routed(model, p, base, ad, tokens, jnp.array([0, 1]))
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
    assert not np.allclose(got, apply(base, tokens), atol=1e-3)   # the adapter acts


def test_mixed_task_batch_equals_each_task_merged(lm):
    """Examples of different tasks in one batch == each example run alone on its task's
    merged weights (merge_task), for Poly and 4-head MHR."""
    _, model, base, boxed, apply = lm
    tokens = jnp.asarray(np.random.default_rng(3).integers(2, 258, (3, 8)))
    task_ids = jnp.array([2, 0, 2])
    for cls, h in ((poly.Poly, 1), (poly.MHR, 4)):
        meth = cls(TARGETS, rank=2, num_skills=3, num_heads=h, num_tasks=3)
        ad = random_adapter(meth, boxed)
        got = _routed(model, meth, base, ad, tokens, task_ids)
        for i, t in enumerate(np.asarray(task_ids)):
            want = apply(meth.merge_task(base, ad, int(t)), tokens[i:i + 1])
            np.testing.assert_allclose(got[i:i + 1], want, rtol=3e-5, atol=3e-5)
        assert not np.allclose(got[0], _routed(model, meth, base, ad, tokens, jnp.array([1, 0, 2]))[0], atol=1e-4)


def test_mhr_mu_merge_equals_routed_at_uniform_weights(lm):
    _, model, base, boxed, apply = lm
    mhr = poly.MHR(TARGETS, rank=2, num_skills=3, num_heads=4, num_tasks=1)
    ad = random_adapter(mhr, boxed)
    ad = jax.tree_util.tree_map_with_path(
        lambda path, x: np.zeros_like(x) if path[-1].key == "router" else x, ad)   # sigmoid(0) for all: w = 1/M
    mu = poly.MHRMu(TARGETS, rank=2, num_skills=3, num_heads=4)
    mu_ad = adapters.base._nest({k: v for k, v in adapters.flat_params(ad).items() if not k.endswith("/router")})
    tokens = jnp.asarray(np.random.default_rng(4).integers(2, 258, (2, 8)))
    np.testing.assert_allclose(apply(mu.merge(base, mu_ad), tokens),
                               _routed(model, mhr, base, ad, tokens, jnp.array([0, 0])), rtol=3e-5, atol=3e-5)
    assert not adapter_hooks.is_activation_adapter(mu) and adapter_hooks.is_activation_adapter(mhr)


def test_relaxed_bernoulli_weights():
    meth = poly.MHR("x", rank=1, num_skills=4, num_heads=2, num_tasks=1)
    z = jnp.asarray(np.random.default_rng(5).standard_normal((2, 4)), jnp.float32)
    w_eval = meth.weights(z, None)
    sig = 1 / (1 + np.exp(-np.asarray(z)))
    np.testing.assert_allclose(w_eval, sig / sig.sum(-1, keepdims=True), rtol=1e-6)
    draws = jnp.stack([meth.weights(z, jax.random.PRNGKey(i)) for i in range(3)])
    np.testing.assert_allclose(draws.sum(-1), 1.0, rtol=1e-5)
    assert float(jnp.abs(draws[0] - draws[1]).max()) > 1e-3        # training weights are random
    # Gumbel-sigmoid: sigmoid((z + logistic noise) / tau); E[hard sample] = sigmoid(z).
    u = np.asarray(jax.random.uniform(jax.random.PRNGKey(7), (20000,), jnp.float32, 1e-6, 1 - 1e-6))
    samples = (0.7 + np.log(u) - np.log1p(-u)) > 0
    assert abs(samples.mean() - 1 / (1 + np.exp(-0.7))) < 0.015


def test_train_step_poly_then_mhr_z_freezes_skills(lm):
    """Poly trains skills and router (router at 100x); MHR-z from it trains only its new
    router: skills and base bit-identical, skills absent from the optimizer state."""
    c, model, base, boxed, _ = lm
    c = per_layer_config(c.data.data_dir, **{"adapter.method": "poly", "adapter.targets": TARGETS, "adapter.rank": 2,
                                        "adapter.poly_skills": 3, "adapter.num_tasks": 3})
    rng = np.random.default_rng(0)

    def batches(n, tasks):
        for _ in range(n):
            ids = rng.integers(2, 258, (8, c.data.seq_len + 1))
            yield {"inputs": jnp.asarray(ids[:, :-1]), "targets": jnp.asarray(ids[:, 1:]),
                   "weights": jnp.ones((8, c.data.seq_len)), "task_id": jnp.asarray(rng.integers(0, tasks, 8))}

    def run(cfg, sources, steps):
        meth = adapters.from_config(train_lib.adapter_config(cfg))
        tx, schedule = train_lib.optimizer_for(cfg, meth)
        mesh, rules = train_lib.mesh_and_rules(cfg)
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            _, shardings, setup = train_lib.adapter_state_shardings(model, tx, cfg, mesh, rules, meth, sources)
            state = train_lib.create_adapter_state(model, tx, cfg, shardings, setup, sources)
            init = jax.tree.map(np.array, state.params)
            step = jax.jit(train_lib.make_train_step(model, tx, cfg, schedule, meth))
            for batch in batches(steps, meth.num_tasks):
                state, metrics = step(state, batch, base)
        assert np.isfinite(float(metrics["loss"]))
        return meth, init, state

    _, init, state = run(c, None, 2)
    moved = {k: float(np.abs(np.asarray(v) - adapters.flat_params(init)[k]).max())
             for k, v in adapters.flat_params(state.params).items()}
    assert all(v > 0 for v in moved.values())

    c.adapter.method, c.adapter.num_tasks = "mhr_z", 2
    c.adapter.mhr_heads = 1
    trained = jax.tree.map(np.asarray, state.params)
    _, init_z, state_z = run(c, {"previous": (trained, {})}, 2)
    flat0, flat1 = adapters.flat_params(init_z), adapters.flat_params(state_z.params)
    for k in flat0:
        if k.endswith("/router"):
            assert flat0[k].shape == (2, 3) and np.abs(np.asarray(flat1[k]) - flat0[k]).max() > 0
        else:
            np.testing.assert_array_equal(np.asarray(flat1[k]), adapters.flat_params(trained)[k])
    opt_paths = {"/".join(str(getattr(p, "key", p)) for p in path)
                 for path, _ in jax.tree_util.tree_leaves_with_path(state_z.opt_state)}
    assert any("router" in p for p in opt_paths) and not any("poly_a" in p or "poly_b" in p for p in opt_paths)


def test_errors(lm):
    c, model, base, boxed, _ = lm
    with pytest.raises(ValueError, match="cannot adapt stacked experts"):
        cm = per_layer_config(c.data.data_dir, **{"model.ffn": "moe"})
        mm = zoo.build(cm.model)
        b = jax.eval_shape(lambda: mm.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32)))["params"]
        poly.Poly("experts/wi", num_tasks=2).select(b)
    with pytest.raises(ValueError, match="mhr_heads=3 must divide"):
        poly.MHR(TARGETS, num_heads=3, num_tasks=2).select(boxed)
    with pytest.raises(ValueError, match="init.adapter_from"):
        poly.MHRZ(TARGETS, num_tasks=2).init(jax.random.PRNGKey(0), boxed)
    meth = poly.Poly(TARGETS, num_tasks=2)
    ad = random_adapter(meth, boxed)
    with pytest.raises(ValueError, match="needs a task id per example"):
        with adapter_hooks.bind(meth, base, ad):
            pass
    # A target that no projection computes (the embedding) is reported, not ignored.
    emb = poly.Poly("embed/embedding|attn/q", num_tasks=1)
    ad = random_adapter(emb, boxed)
    with pytest.raises(ValueError, match="embed/embedding are not computed through .*project"):
        with adapter_hooks.bind(emb, base, ad, task_ids=jnp.zeros((1,), jnp.int32)):
            model.apply({"params": base}, jnp.zeros((1, 8), jnp.int32))


def test_multitask_then_fewshot_workflow(data_dir, tmp_path):
    """The shipped workflow at tiny size: a base, MHR on two stdlib tasks (per-task eval
    losses logged), then MHR-z on two held-out tasks from it through init.adapter_from;
    the saved skills load back, a run for another base is refused, and load_trained
    names the way to use an activation-space adapter."""
    import json
    import os

    from routezoo.configs import mhr_fewshot, poly_multitask
    from routezoo.training import config_check
    base_wd, mt_wd, fs_wd = (str(tmp_path / n) for n in ("base", "mhr", "mhr_z"))
    train_lib.train_and_evaluate(per_layer_config(data_dir, **{"train.steps": 2}), base_wd)

    def adapter_run(cfg_module, tasks, **keys):
        c = per_layer_config(data_dir, **{"train.steps": 3, "train.eval_every": 3, "checkpoint.every": 3})
        ref = cfg_module.get_config()
        c.adapter.update(ref.adapter.to_dict())
        c.adapter.update({"rank": 2, "poly_skills": 2, "mhr_heads": 2, **keys})
        c.data.tasks, c.train.eval_per_task, c.init.from_workdir = tasks, True, base_wd
        return c

    c = adapter_run(poly_multitask, "email,importlib")
    config_check.validate(c)
    out = train_lib.train_and_evaluate(c, mt_wd)
    assert np.isfinite(out["eval_loss"]) and {"eval_loss@task=email", "eval_loss@task=importlib"} <= set(out)
    meta = json.load(open(os.path.join(mt_wd, "adapter", "adapter.json")))
    assert meta["method"] == "mhr" and meta["adapter"]["num_tasks"] == 2

    c = adapter_run(mhr_fewshot, "tomllib,zoneinfo")
    c.init.adapter_from = mt_wd
    config_check.validate(c)
    out = train_lib.train_and_evaluate(c, fs_wd)
    assert np.isfinite(out["eval_loss"])
    fs = json.load(open(os.path.join(fs_wd, "adapter", "adapter.json")))
    # Only the routers train: layers x targets x tasks x heads x skills.
    assert fs["params_trainable"] == c.model.num_layers * 4 * 2 * 2 * 2 < fs["params_adapter"]
    mt_params, _ = train_lib.read_adapter_dir(os.path.join(mt_wd, "adapter"))
    fs_params, _ = train_lib.read_adapter_dir(os.path.join(fs_wd, "adapter"))
    for k, v in adapters.flat_params(mt_params).items():
        if not k.endswith("/router"):
            np.testing.assert_array_equal(adapters.flat_params(fs_params)[k], v)   # frozen skills, bit for bit
    with pytest.raises(ValueError, match="acts on activations.*adapter_hooks.bind"):
        train_lib.load_trained(fs_wd)
    with pytest.raises(config_check.ConfigError, match="holds no trained adapter"):
        c.init.adapter_from = base_wd
        config_check.validate(c)


def test_user_flax_model_built_from_routezoo_layers():
    """A model of the user's own, with a routezoo MLP inside, gets the hook without edits:
    MHR on its MLP equals the task's merged weights, per example."""
    from routezoo.layers.mlp import MLP

    class Mine(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.Dense(16, name="inp")(x)          # a plain Flax layer: not adaptable by the hook
            return MLP(hidden_dim=32, mlp_type="gelu", name="ffn")(h[:, None, :])[:, 0]

    model = Mine()
    x = jnp.asarray(np.random.default_rng(6).standard_normal((3, 8)), jnp.float32)
    boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x))["params"]
    base = jax.tree.map(np.asarray, nn.unbox(model.init(jax.random.PRNGKey(0), x)["params"]))
    meth = poly.MHR("ffn/(wi|wo)", rank=2, num_skills=2, num_heads=2, num_tasks=2)
    ad = random_adapter(meth, boxed)
    ids = jnp.array([1, 0, 1])
    with adapter_hooks.bind(meth, base, ad, task_ids=ids):
        got = model.apply({"params": base}, x)
    for i in range(3):
        want = model.apply({"params": meth.merge_task(base, ad, int(ids[i]))}, x[i:i + 1])
        np.testing.assert_allclose(got[i:i + 1], want, rtol=2e-5, atol=2e-5)
