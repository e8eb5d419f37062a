"""Duo-LLM (``layers/moe/duo.py``, ``zoo/duo.py``): the oracle against brute force, random
routing frequencies, routes given from outside, the trained router's straight-through
gradient and cost loss, config errors. (Training, resuming, expert parallelism and stage 3
starting from a stage-1 run: ``tests/zoo/test_routers_lm.py``.)

Shapes are tiny: a 3-layer LM (every FFN slot Duo), D=16, big width 16, small width 4,
vocab 32, L=6.
"""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from routezoo import zoo
from routezoo.zoo import stack
from routezoo.configs import base
from routezoo.layers.mlp import MLP
from routezoo.layers.moe import duo as duo_lib
from routezoo.layers.moe import moe_from_config, validate_moe_config
from routezoo.zoo import duo as oracle_lib

D, F, FS, VOCAB, LAYERS, L = 16, 16, 4, 32, 3, 6
COSTS = (1.0, FS / F, 0.0)


def model_cfg(**moe):
    c = base.get_config().model
    c.num_layers, c.d_model, c.num_heads, c.num_kv_heads, c.head_dim, c.mlp_dim = LAYERS, D, 2, 1, 8, F
    c.vocab_size, c.ffn, c.dtype = VOCAB, "moe", "float32"
    c.moe.update(dict(router="duo", expert_dim=F, duo_small_dim=FS, **moe))
    return c


def fast_init(module, *args, seed=0, **kwargs):
    """Parameters of ``module`` with the shapes of ``module.init``, drawn in numpy: norm
    scales 1, every other weight N(0, 1/fan_in). (Compiling Flax's random init costs
    seconds on CPU; these tests only need some fixed parameters.)"""
    from flax import linen as nn
    shapes = nn.unbox(jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *args, **kwargs)))["params"]
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        if jax.tree_util.keystr(path).endswith("['scale']"):
            return jnp.ones(leaf.shape, leaf.dtype)
        return jnp.asarray(rng.normal(size=leaf.shape) * leaf.shape[0] ** -0.5, leaf.dtype)
    return {"params": jax.tree_util.tree_map_with_path(draw, shapes)}


@functools.lru_cache(maxsize=None)
def lm():
    """The tiny Duo LM, its variables and a jitted apply with routes."""
    model = zoo.build(model_cfg())
    variables = fast_init(model, jnp.zeros((1, L), jnp.int32))
    apply = jax.jit(lambda v, tokens, routes: model.apply(v, tokens, routes=routes)[0])
    return model, variables, apply


def tokens(b=2, seed=1):
    return np.random.default_rng(seed).integers(0, VOCAB, (b, L)).astype(np.int32)


def normal(seed, shape):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def nll_at(logits, t, target):
    logp = jax.nn.log_softmax(np.asarray(logits, np.float64)[t])
    return -float(logp[target])


# ------------------------------------------------------------------ oracle


@pytest.mark.parametrize("budget", [0.5, 1.25])
def test_candidates_against_filtering_all_routes(budget):
    every = [r for r in itertools.product(range(3), repeat=LAYERS) if sum(COSTS[o] for o in r) <= budget]
    cands = oracle_lib.candidate_routes(LAYERS, COSTS, budget)
    assert [tuple(r) for r in cands] == sorted(every)
    with pytest.raises(ValueError, match=r"^Duo oracle: \d+ routes of 12 layers fit budget 6.0 \(of 531441\), "
                                         r"more than max_candidates=4096"):
        oracle_lib.candidate_routes(12, (1.0, 0.25, 0.0), 6.0)


def test_count_candidates_matches_enumeration():
    for m, costs, budget in [(4, (1.0, 0.25, 0.0), 1.0), (5, (1.0, 0.5, 0.0), 2.5), (6, (1.0, 0.3, 0.1), 1.7)]:
        brute = sum(1 for r in itertools.product(range(3), repeat=m) if sum(costs[o] for o in r) <= budget + 1e-9)
        assert oracle_lib.count_candidates(m, costs, budget) == brute
        assert len(oracle_lib.candidate_routes(m, costs, budget, max_candidates=3 ** m)) == brute


def test_oracle_equals_brute_force():
    """One ``model.apply`` per (sequence, token, route) against the batched oracle, with
    a random context route for the other tokens; same losses, same chosen routes."""
    model, variables, apply = lm()
    toks = tokens()
    b = toks.shape[0]
    context = np.random.default_rng(7).integers(0, 3, (LAYERS, b, L)).astype(np.int32)
    budget = 1.25
    res = oracle_lib.oracle_routes(model, variables, toks, budget=budget, context_route=context, batch_size=7)
    cands = [r for r in itertools.product(range(3), repeat=LAYERS) if sum(COSTS[o] for o in r) <= budget]
    naive = np.zeros((b, L - 1, len(cands)))
    for bi, t, (ci, cand) in itertools.product(range(b), range(L - 1), enumerate(cands)):
        routes = context[:, bi:bi + 1].copy()
        routes[:, 0, t] = cand
        naive[bi, t, ci] = nll_at(apply(variables, toks[bi:bi + 1], routes)[0], t, toks[bi, t + 1])
    np.testing.assert_allclose(res.candidate_loss, naive, rtol=1e-5, atol=1e-5)
    best = np.argmin(naive, axis=-1)
    np.testing.assert_array_equal(res.routes, np.asarray(cands)[best])
    np.testing.assert_allclose(res.loss, naive.min(-1), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(res.cost, np.asarray(COSTS)[res.routes].sum(-1), rtol=1e-6)
    assert np.all(res.cost <= budget + 1e-6)
    # the 'context' reference is the plain pass with the context routes
    for bi in range(b):
        logits = apply(variables, toks[bi:bi + 1], context[:, bi:bi + 1])[0]
        ref = [nll_at(logits, t, toks[bi, t + 1]) for t in range(L - 1)]
        np.testing.assert_allclose(res.reference_loss["context"][bi], ref, rtol=1e-5, atol=1e-5)


def test_oracle_beats_every_reference_within_budget_and_summary():
    model, variables, apply = lm()
    toks = tokens(b=1, seed=3)
    res = oracle_lib.oracle_routes(model, variables, toks, budget=1.0, context_route="big")
    assert res.reference_cost == {"big": 3.0, "small": 0.75, "skip": 0.0, "context": 3.0}
    for name in ("small", "skip"):            # within the budget: the oracle is at least as good
        assert np.all(res.loss <= res.reference_loss[name] + 1e-6), name
    # with context 'big', the 'big' reference is the plain all-big model (eval route auto = big)
    plain = jax.jit(model.apply)(variables, toks)[0][0]
    np.testing.assert_allclose(res.reference_loss["big"][0],
                               [nll_at(plain, t, toks[0, t + 1]) for t in range(L - 1)], rtol=1e-5, atol=1e-5)
    summary = oracle_lib.summarize_oracle(res, num_buckets=2)
    big = res.routes == duo_lib.BIG
    np.testing.assert_allclose(summary["big_by_layer"], big.mean(axis=(0, 1)))
    np.testing.assert_allclose(summary["big_by_position"], [big[:, :3].mean(), big[:, 3:].mean()])
    assert summary["position_buckets"] == [(0, 2), (3, 4)]
    assert summary["mean_loss"] <= summary["mean_reference_loss"]["skip"]


# ------------------------------------------------------------------ the layer


def ffn(x, **moe):
    """A Duo slot, its variables for input ``x`` and its jitted apply."""
    layer = moe_from_config(model_cfg(**moe).moe, d_model=D, dtype=jnp.float32, param_dtype=jnp.float32)
    return layer, fast_init(layer, x, deterministic=True), jax.jit(layer.apply, static_argnames="deterministic")


@jax.jit
def _dense_mlps(params, x):
    return (MLP(F, "swiglu").apply({"params": params["big"]}, x),
            MLP(FS, "swiglu").apply({"params": params["small"]}, x))


def module_outputs(params, x):
    """(big, small) outputs of the Duo slot's two modules as plain dense MLPs."""
    return tuple(np.asarray(y) for y in _dense_mlps(params, x))


def classify(y, big, small):
    """Option each token took, read off the output: 0 big, 1 small, 2 skip (-1: none)."""
    is_big = np.all(np.isclose(y, big, atol=1e-6), -1) & ~np.all(np.isclose(big, 0, atol=1e-6), -1)
    is_small = np.all(np.isclose(y, small, atol=1e-6), -1)
    is_skip = np.all(y == 0, -1)
    return np.where(is_big, 0, np.where(is_small, 1, np.where(is_skip, 2, -1)))


@pytest.mark.parametrize("probs", ["0.5,0.25,0.25", "0.2,0.8,0", "0,0,1"])
def test_random_mode_draws_the_configured_frequencies(probs):
    x = normal(0, (16, 256, D))                                        # 4096 tokens
    layer, variables, apply = ffn(x, duo_probs=probs)
    y, aux = apply(variables, x, deterministic=False, rngs={"router": jax.random.PRNGKey(2)})
    option = classify(np.asarray(y), *module_outputs(variables["params"], x))
    assert np.all(option >= 0)
    freq = np.bincount(option.reshape(-1), minlength=3) / option.size
    want = np.asarray([float(p) for p in probs.split(",")])
    np.testing.assert_allclose(freq, want, atol=0.04)                     # 5 sigma at 4096 tokens
    assert np.all(freq[want == 0] == 0)
    np.testing.assert_allclose([aux["stats"][f"frac_{n}"] for n in duo_lib.OPTIONS], freq, atol=1e-6)
    assert float(aux["stats"]["cost"]) == pytest.approx(float(freq @ np.asarray(COSTS)), abs=1e-6)
    assert aux["losses"] == {}
    # evaluation: the 'auto' route of random mode is big for every token
    y_eval, _ = apply(variables, x, deterministic=True)
    np.testing.assert_allclose(y_eval, module_outputs(variables["params"], x)[0], atol=1e-6)


def test_given_routes_are_used_exactly():
    x = normal(0, (2, 8, D))
    layer, variables, apply = ffn(x)
    routes = np.random.default_rng(3).integers(0, 3, (16,)).astype(np.int32)
    big, small = module_outputs(variables["params"], x)
    for det in (True, False):                     # given routes override training draws too
        y, aux = apply(variables, x, deterministic=det, router_inputs={"routes": routes},
                             rngs={"router": jax.random.PRNGKey(4)})
        want = np.where((routes == 0).reshape(2, 8, 1), big, np.where((routes == 1).reshape(2, 8, 1), small, 0.0))
        np.testing.assert_allclose(y, want, atol=1e-6)
        assert float(aux["stats"]["frac_skip"]) == pytest.approx(float(np.mean(routes == 2)))


@pytest.mark.parametrize("option", ["big", "skip"])
def test_model_with_uniform_routes_equals_a_dense_model(option):
    """All-big equals the dense LM whose MLPs are the big modules; all-skip equals the
    dense LM whose MLPs output zero (the residual only)."""
    model, variables, apply = lm()
    toks = tokens()
    routes = np.full((LAYERS, 2, L), duo_lib.OPTIONS.index(option), np.int32)
    got = apply(variables, toks, routes)
    dense_cfg = model_cfg()
    dense_cfg.ffn = "mlp"
    # Duo stacks take per-layer routes from outside and stay unscanned; the dense LM scans
    # its blocks (model.scan_layers), so its parameters are moved to its own layout below.
    assert not stack.is_scanned(model.cfg)
    params = dict(variables["params"])
    for i in range(LAYERS):
        layer = dict(params[f"layer{i}"])
        mlp = dict(layer.pop("moe")["big"])
        if option == "skip":
            mlp["wo"] = jnp.zeros_like(mlp["wo"])
        layer["mlp"] = mlp
        params[f"layer{i}"] = layer
    params = stack.to_layout(params, dense_cfg)
    want = jax.jit(zoo.build(dense_cfg).apply)({"params": params}, toks)[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"duo routes must be int32 \[M, B, L\]"):
        model.apply(variables, toks, routes=routes[:2])


# ------------------------------------------------------------------ router mode


def test_router_mode_forward_gradient_and_cost_loss():
    coef = 0.3
    x = normal(0, (2, 16, D))
    layer, variables, apply = ffn(x, duo_mode="router", duo_cost_coef=coef)
    params = variables["params"]
    kernel = np.asarray(params["router"]["kernel"], np.float64)             # [D, 3], N(0, 1/D)
    xt = x.reshape(-1, D).astype(np.float64)
    z = xt @ kernel
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)                                            # [T, 3]
    choice = np.argmax(p, -1)
    assert len(set(choice.tolist())) == 3                                    # every option taken
    big, small = (o.reshape(-1, D) for o in module_outputs(params, x))
    routed = np.where((choice == 0)[:, None], big, np.where((choice == 1)[:, None], small, 0.0))

    y, aux = apply({"params": params}, x, deterministic=False)
    np.testing.assert_allclose(np.asarray(y).reshape(-1, D), routed, atol=1e-6)   # weight 1 in value
    costs = np.asarray(COSTS)
    expected_cost = float(np.mean(p @ costs))
    assert float(aux["losses"]["duo_cost"]) == pytest.approx(coef * expected_cost, rel=1e-5)
    assert float(aux["stats"]["expected_cost"]) == pytest.approx(expected_cost, rel=1e-5)

    # Gradient of a probe loss sum(y * g) + duo_cost w.r.t. the router kernel against the
    # straight-through estimator written out: d/dW [sum_t p_{c_t} a_t + coef mean_t p_t.cost]
    # with a_t = <g_t, y_t>, dp_c/dz_k = p_c (1[c = k] - p_k).
    g = normal(5, y.shape)

    @jax.jit
    def grad_probe(kernel):
        def probe(kernel):
            ps = {**params, "router": {"kernel": kernel}}
            y, aux = layer.apply({"params": ps}, x, deterministic=False)
            return jnp.sum(y * g) + aux["losses"]["duo_cost"]
        return jax.grad(probe)(kernel)

    a = np.sum(routed * g.reshape(-1, D), -1)                                # [T]
    p_c = p[np.arange(len(p)), choice]
    dz = a[:, None] * p_c[:, None] * (np.eye(3)[choice] - p)                 # task term
    dz += coef / len(p) * p * (costs[None, :] - (p @ costs)[:, None])        # cost term
    grad = np.asarray(grad_probe(params["router"]["kernel"]))
    assert np.abs(grad).max() > 1e-3
    np.testing.assert_allclose(grad, xt.T @ dz, rtol=1e-4, atol=1e-6)

    # evaluation (auto = router): the argmax route, no randomness needed
    y_eval, _ = apply({"params": params}, x, deterministic=True)
    np.testing.assert_allclose(np.asarray(y_eval).reshape(-1, D), routed, atol=1e-6)


# ------------------------------------------------------------------ config


@pytest.mark.parametrize("key, value, match", [
    ("duo_mode", "oracle", r"moe.duo_mode='oracle' is unknown; known: \['random', 'router'\]"),
    ("duo_probs", "0.5,0.5", r"moe.duo_probs='0.5,0.5' must be three numbers >= 0 summing to 1"),
    ("duo_probs", "0.5,0.5,0.5", r"moe.duo_probs='0.5,0.5,0.5' must be three numbers"),
    ("duo_probs", "a,b,c", r"moe.duo_probs='a,b,c' must be three numbers"),
    ("duo_probs", "1.5,-0.5,0", r"moe.duo_probs='1.5,-0.5,0' must be three numbers >= 0"),
    ("duo_eval_route", "medium", r"moe.duo_eval_route='medium' is unknown"),
    ("duo_eval_sweep", "big,huge", r"moe.duo_eval_sweep='big,huge' has unknown route 'huge'"),
    ("duo_small_dim", -1, r"moe.duo_small_dim=-1 must be >= 0"),
    ("duo_cost_coef", -0.1, r"moe.duo_cost_coef=-0.1 must be >= 0"),
    ("num_shared_experts", 1, r"moe.num_shared_experts=1 is not used by moe.router='duo'"),
])
def test_config_errors_are_one_line(key, value, match):
    cfg = model_cfg().moe
    cfg[key] = value
    with pytest.raises(ValueError, match=match) as err:
        validate_moe_config(cfg, causal=True, mesh_shape={"expert": 1})
    assert "\n" not in str(err.value)


def test_defaults_are_valid_and_eval_sweep():
    cfg = model_cfg(duo_eval_sweep="big, skip").moe
    validate_moe_config(cfg, causal=True, mesh_shape={"expert": 4})
    assert duo_lib.DuoRouter.eval_variants(cfg) == {"big": {"duo_eval_route": "big"},
                                                   "skip": {"duo_eval_route": "skip"}}
    assert duo_lib.small_width(256, 0) == 64 and duo_lib.option_costs(256, 0) == (1.0, 0.25, 0.0)


def test_experiment_config_is_valid():
    from routezoo.configs import duo as duo_config
    from routezoo.training import config_check
    c = duo_config.get_config()
    config_check.validate(c, num_devices=8, process_count=1)
    assert c.model.moe.router == "duo" and zoo.ffn_kinds(c.model) == ("moe",) * 4
    c.model.moe.duo_mode = "router"                      # stage 3 overrides
    config_check.validate(c, num_devices=8, process_count=1)
