"""Routers of ``layers/routers/stochastic.py``: the defining property of each, through the MoE
block where it matters, with both dispatchers and on an ``expert=4`` mesh.

Shapes are small: B=8, L=4, D=16, F=16, E=8 (T=32 tokens). Single-use calls run eagerly
(no compile); only the train step and the sharded runs are jitted.
"""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import functools  # noqa: E402
import itertools  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import pytest  # noqa: E402
from flax import linen as nn  # noqa: E402

from routezoo.configs import base  # noqa: E402
from routezoo.layers.moe.gmm import GMM_BACKENDS  # noqa: E402
from routezoo.layers import moe as moe_lib  # noqa: E402
from routezoo.layers.routers.stochastic import HashRouter, SMoEDropoutRouter, ThorRouter, hash_experts, smoe_k  # noqa: E402
from routezoo.layers.routers.dynamic import NullExpertsRouter, TopPRouter  # noqa: E402
from routezoo.layers.routers.base import ROUTERS  # noqa: E402
from routezoo.layers import routers as routers_lib  # noqa: E402
from routezoo.layers import sharding  # noqa: E402

B, L, D, F, E = 8, 4, 16, 16, 8
VOCAB = 50
TOL = dict(rtol=2e-5, atol=2e-5)
ZOO = ["hash", "thor", "smoe_dropout", "top_p", "null_experts"]


def make_cfg(router, **overrides):
    cfg = base.get_config().model.moe
    cfg.update(dict(router=router, num_experts=E, k=2, expert_dim=F, num_null_experts=E, top_p_max_k=4,
                    top_p_threshold=0.5, smoe_k_steps=4, load_balance_coef=0.01, z_loss_coef=1e-3))
    cfg.update(overrides)
    return cfg


def make_x(seed=0, shape=(B, L, D)):
    return jax.random.normal(jax.random.PRNGKey(seed), shape, jnp.float32)


def make_tokens(seed=0, shape=(B, L), vocab=VOCAB):
    return jax.random.randint(jax.random.PRNGKey(100 + seed), shape, 0, vocab, jnp.int32)


@functools.lru_cache(maxsize=None)
def _init(router):
    """Initial variables (boxed) of an MoE block with ``router``, built once per router:
    they depend only on the router type and the sizes fixed by :func:`make_cfg`, not on
    dispatch, capacity factors or schedules."""
    model = moe_lib.moe_from_config(make_cfg(router), d_model=D, dtype=jnp.float32, param_dtype=jnp.float32)
    init = jax.jit(functools.partial(model.init, deterministic=True))
    return init(jax.random.PRNGKey(1), make_x(), token_ids=make_tokens() if router == "hash" else None)


def build(cfg):
    model = moe_lib.moe_from_config(cfg, d_model=D, dtype=jnp.float32, param_dtype=jnp.float32)
    boxed = _init(cfg.router)
    return model, boxed, nn.unbox(boxed)


def on_logits(router, logits, **kw):
    """Runs a learned-kernel router with an identity kernel, so its logits are ``logits``."""
    params = {"params": {"kernel": jnp.eye(logits.shape[-1], dtype=jnp.float32)}}
    return router.apply(params, logits, deterministic=True, **kw)


# ------------------------------------------------------------------ hash


def test_hash_same_token_same_expert_and_independent_of_x():
    router = HashRouter(num_experts=E, seed=3)
    tokens = make_tokens()
    apply = functools.partial(router.apply, deterministic=True)
    r1 = apply({}, make_x(0).reshape(-1, D), token_ids=tokens.reshape(-1))
    r2 = apply({}, make_x(1).reshape(-1, D) * 5, token_ids=tokens.reshape(-1))
    np.testing.assert_array_equal(r1.indices, r2.indices)
    np.testing.assert_array_equal(r1.weights, 1.0)
    ids, experts = np.asarray(tokens).reshape(-1), np.asarray(r1.indices[:, 0])
    for tok in np.unique(ids):
        assert len(set(experts[ids == tok])) == 1
    assert r1.indices.shape == (B * L, 1) and r1.losses == {}
    with pytest.raises(ValueError, match="token_ids"):
        router.apply({}, make_x().reshape(-1, D), deterministic=True)

    # through the MoE block: the token ids come in [B, L]; no router parameters
    cfg = make_cfg("hash", hash_seed=3)
    model, _, variables = build(cfg)
    assert "router" not in variables["params"]
    y, aux = model.apply(variables, make_x(), deterministic=True, token_ids=tokens)
    assert y.shape == (B, L, D) and float(aux["stats"]["experts_per_token"]) == 1.0
    with pytest.raises(ValueError, match="token_ids"):
        model.apply(variables, make_x(), deterministic=True)


def test_hash_is_uniform_over_a_vocabulary():
    vocab = 32000
    ids = jnp.arange(vocab)
    table = np.asarray(hash_experts(ids, E, seed=0, vocab_size=vocab))
    np.testing.assert_array_equal(np.bincount(table, minlength=E), vocab // E)  # exactly balanced
    hashed = np.asarray(hash_experts(ids, E, seed=0))  # integer hash, no table
    counts = np.bincount(hashed, minlength=E)
    assert np.all(np.abs(counts / (vocab / E) - 1) < 0.05), counts
    other = np.asarray(hash_experts(ids, E, seed=1))
    assert 0.8 < np.mean(other != hashed) < 0.95  # another seed: another map (7/8 differ)
    # ids outside [0, V) of a table fall back to the integer hash
    outside = jnp.arange(vocab, vocab + 10)
    np.testing.assert_array_equal(hash_experts(outside, E, 0, vocab), hash_experts(outside, E, 0))


# ------------------------------------------------------------------ THOR


def test_thor_routing_depends_only_on_the_rng():
    router = ThorRouter(num_experts=E)

    def route(x, key, **kw):
        rngs = {} if key is None else {"router": jax.random.PRNGKey(key)}
        return router.apply({}, x.reshape(-1, D), rngs=rngs, group_size=L, **kw).indices[:, 0]

    train = functools.partial(route, deterministic=False)
    a, b, c = train(make_x(0), 0), train(make_x(1) * 3, 0), train(make_x(0), 1)
    np.testing.assert_array_equal(a, b)  # same rng, other input: same experts
    assert np.any(np.asarray(a) != np.asarray(c))  # other rng: other experts
    assert len(np.unique(np.asarray(a))) > 1  # one expert per token in training (default)
    with pytest.raises(ValueError, match="'router' RNG"):
        train(make_x(0), None)

    # inference: one expert per sequence (default), fixed without an rng, any input
    seq = np.asarray(route(make_x(0), None, deterministic=True)).reshape(B, L)
    np.testing.assert_array_equal(seq, np.broadcast_to(seq[:, :1], seq.shape))
    np.testing.assert_array_equal(seq, np.asarray(route(make_x(2), None, deterministic=True)).reshape(B, L))
    assert len(np.unique(seq[:, 0])) > 1
    tok = np.asarray(ThorRouter(num_experts=E, inference="token").apply(
        {}, make_x().reshape(-1, D), deterministic=True, group_size=L).indices).reshape(B, L)
    assert all(len(np.unique(row)) > 1 for row in tok)
    # the authors' training granularity: one expert for the whole batch per pass
    batch = ThorRouter(num_experts=E, train_level="batch").apply(
        {}, make_x().reshape(-1, D), deterministic=False, rngs={"router": jax.random.PRNGKey(0)})
    assert len(np.unique(np.asarray(batch.indices))) == 1

    # through the MoE block: no parameters, output independent of nothing but x and rng
    model, _, variables = build(make_cfg("thor"))
    assert "router" not in variables["params"]
    fn = lambda v, x, k: model.apply(v, x, deterministic=False, rngs={"router": k})  # noqa: E731
    y1, _ = fn(variables, make_x(), jax.random.PRNGKey(0))
    y2, _ = fn(variables, make_x(), jax.random.PRNGKey(0))
    y3, _ = fn(variables, make_x(), jax.random.PRNGKey(1))
    np.testing.assert_array_equal(y1, y2)
    assert not np.allclose(y1, y3)


# ------------------------------------------------------------------ SMoE-Dropout


def test_smoe_k_schedules():
    steps = [0, 100, 200, 300, 400, 500, 600, 700, 800, 900, 1000, 5000]
    k = lambda sched, k0, k1: [int(smoe_k(s, schedule=sched, k_start=k0, k_end=k1, steps=1000)) for s in steps]
    # authors' calculate_gate_number: round((k1-k0)·s/S) + k0, Python (half-even) rounding
    assert k("linear", 8, 16) == [min(16, round(8 * s / 1000) + 8) for s in steps]
    assert k("cosine", 1, 8) == [min(8, round(-7 * np.cos(np.pi * min(s, 1000) / 2000)) + 8) for s in steps]
    assert k("steps", 1, 16) == [1, 1, 2, 2, 4, 4, 8, 8, 16, 16, 16, 16]  # [1, 2, 4, 8, 16] in 5 stages
    assert k("steps", 4, 16) == [4, 4, 4, 4, 4, 4, 8, 8, 16, 16, 16, 16]  # clipped at k_start


def test_smoe_eval_sweep_ks():
    ks = lambda e, spec: SMoEDropoutRouter.eval_ks(make_cfg("smoe_dropout", num_experts=e, smoe_eval_sweep=spec))
    assert ks(16, "auto") == [1, 2, 4, 8, 16]          # the authors' sweep
    assert ks(6, "auto") == [1, 2, 4, 6]
    assert ks(8, "") == [] and ks(8, "4, 1,4") == [1, 4]
    variants = SMoEDropoutRouter.eval_variants(make_cfg("smoe_dropout", smoe_eval_sweep="2,8"))
    assert variants == {"k2": {"smoe_eval_k": 2}, "k8": {"smoe_eval_k": 8}}


def _smoe_state(step):
    return {"router": {"step": jnp.asarray(step, jnp.int32)}}


def test_smoe_router_is_frozen_and_k_follows_the_schedule_in_training():
    cfg = make_cfg("smoe_dropout", smoe_k_start=1, smoe_k_schedule="linear", smoe_k_steps=4)
    x, cot = make_x(), make_x(7)
    model, _, variables = build(cfg)
    assert "router" not in variables["params"]  # not a parameter at all
    fixed = jax.tree.map(np.array, variables["router_fixed"])
    assert fixed["router"]["kernel"].shape == (D, E) and fixed["router"]["bias"].shape == (E,)
    assert int(variables["router_state"]["router"]["step"]) == 0

    tx = optax.adam(1e-2)
    params, state = variables["params"], variables["router_state"]
    opt_state = tx.init(params)

    @jax.jit
    def train_step(params, opt_state, state):
        def loss(p):
            (y, aux), new = model.apply({"params": p, "router_fixed": variables["router_fixed"], "router_state": state},
                                        x, deterministic=False, mutable=["router_state"])
            return jnp.sum(y * cot), (aux, new["router_state"])
        (_, (aux, state)), grads = jax.value_and_grad(loss, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, state, aux

    ks, per_token = [], []
    for _ in range(6):
        params, opt_state, state, aux = train_step(params, opt_state, state)
        ks.append(int(aux["stats"]["k"]))
        per_token.append(float(aux["stats"]["experts_per_token"]))
    assert ks == [int(smoe_k(s, schedule="linear", k_start=1, k_end=E, steps=4)) for s in range(6)]
    assert ks == [1, 3, 5, 6, 8, 8]
    np.testing.assert_allclose(per_token, ks)  # slots >= k(s) are empty
    assert int(state["router"]["step"]) == 6
    assert not np.allclose(params["experts"]["wi"], variables["params"]["experts"]["wi"])  # experts trained

    # a loop that makes every non-param collection mutable (training/step.py) changes
    # only the step; the frozen router comes back bit-identical
    _, new = model.apply({"params": params, **{k: v for k, v in variables.items() if k != "params"}}, x,
                         deterministic=False, mutable=["router_state", "router_fixed"])
    for a, b in zip(jax.tree.leaves(new["router_fixed"]), jax.tree.leaves(fixed)):
        np.testing.assert_array_equal(a, b)
    assert int(new["router_state"]["router"]["step"]) == 1
    # the frozen router does route: another random router gives other experts
    router = routers_lib.router_from_config(cfg)
    def topk_of(f):
        v = {"router_fixed": f, "router_state": _smoe_state(0)}
        return router.apply(v, x.reshape(-1, D), deterministic=True, eval_k=2).indices
    other = jax.tree.map(lambda a: -a, fixed["router"])
    assert np.any(np.asarray(topk_of(fixed["router"])) != np.asarray(topk_of(other)))


def test_smoe_eval_at_several_k():
    cfg = make_cfg("smoe_dropout", smoe_eval_k=0)
    x = make_x()
    model, _, variables = build(cfg)
    outs = {}
    for k in (1, 8):  # the MoE block at two k
        m = model.clone(router=model.router.clone(eval_k=k))
        y, aux = m.apply(variables, x, deterministic=True)
        outs[k] = np.asarray(y)
        assert float(aux["stats"]["experts_per_token"]) == k
    assert not np.allclose(outs[1], outs[8])
    router = routers_lib.router_from_config(cfg)
    v = {c: variables[c]["router"] for c in ("router_fixed", "router_state")}
    per_token = [float(router.apply(v, x.reshape(-1, D), deterministic=True, eval_k=k).stats["experts_per_token"])
                 for k in (1, 2, 3, 4, 6, 8)]
    assert per_token == [1.0, 2.0, 3.0, 4.0, 6.0, 8.0]  # more k, more experts per token
    # eval_k = 0 means the final k (= E); config key and keyword agree
    _, aux = model.apply(variables, x, deterministic=True)
    assert float(aux["stats"]["experts_per_token"]) == E
    router = routers_lib.router_from_config(make_cfg("smoe_dropout", smoe_eval_k=3))
    r = router.apply(v, x.reshape(-1, D), deterministic=True)
    assert r.indices.shape == (B * L, 3)
    np.testing.assert_allclose(np.sum(r.weights, -1), 1.0, rtol=1e-6)
    r5 = router.apply(v, x.reshape(-1, D), deterministic=True, eval_k=5)
    assert r5.indices.shape == (B * L, 5)


# ------------------------------------------------------------------ top-p


def np_top_p(probs, p):
    """Brute force over all subsets: among the smallest sets with mass >= p, the heaviest."""
    n = probs.shape[-1]
    subsets = [c for size in range(1, n + 1) for c in itertools.combinations(range(n), size)]
    sets = []
    for row in probs.astype(np.float64):
        size = min(len(c) for c in subsets if row[list(c)].sum() >= p - 1e-9)  # tolerance: p = 1
        sets.append(set(max((c for c in subsets if len(c) == size), key=lambda c: row[list(c)].sum())))
    return sets


def test_top_p_hand_made_logits():
    probs = np.array([[0.5, 0.3, 0.15, 0.05]] * 4)
    logits = jnp.asarray(np.log(probs), jnp.float32)
    for p, want in ((0.45, 1), (0.7, 2), (0.9, 3), (0.97, 4)):
        r = on_logits(TopPRouter(num_experts=4, threshold=p), logits)
        np.testing.assert_array_equal(np.sum(np.asarray(r.indices) >= 0, -1), want)
        np.testing.assert_array_equal(r.indices[0, :want], np.arange(want))
        np.testing.assert_allclose(r.weights[0, :want], probs[0, :want], rtol=1e-5)  # raw, not renormalised


@pytest.mark.parametrize("p", [0.3, 0.6, 0.9, 1.0])
def test_top_p_matches_brute_force(p):
    logits = np.asarray(jax.random.normal(jax.random.PRNGKey(3), (64, E))) * 1.5
    probs = np.exp(logits.astype(np.float64))
    probs /= probs.sum(-1, keepdims=True)
    router = TopPRouter(num_experts=E, threshold=p, entropy_coef=0.1, load_balance_coef=0.01)
    r = on_logits(router, jnp.asarray(logits, jnp.float32))
    want = np_top_p(probs, p)
    got = [set(int(i) for i in row if i >= 0) for row in np.asarray(r.indices)]
    assert got == want
    dense = np.asarray(r.dense_weights(E))
    for t, s in enumerate(want):
        np.testing.assert_allclose(dense[t, sorted(s)], probs[t, sorted(s)], rtol=1e-5)
    counts = np.array([len(s) for s in want])
    if p < 1.0:
        assert counts.min() < counts.max()  # the number of experts varies by token
    np.testing.assert_allclose(r.stats["experts_per_token"], counts.mean(), rtol=1e-6)
    np.testing.assert_allclose(r.stats["experts_per_token_max"], counts.max())
    entropy = np.mean(-np.sum(probs * np.log(probs), -1))
    np.testing.assert_allclose(r.losses["dynamic_loss"], 0.1 * entropy, rtol=1e-5)
    assert "load_balance" in r.losses and "z_loss" not in r.losses
    # a cap on the slots
    capped = on_logits(TopPRouter(num_experts=E, threshold=p, max_k=2), jnp.asarray(logits, jnp.float32))
    assert capped.indices.shape == (64, 2)


# ------------------------------------------------------------------ AdaMoE null experts


def test_null_experts_load_balance_weights_and_stats():
    e, m, k = 4, 4, 3
    logits = np.asarray(jax.random.normal(jax.random.PRNGKey(5), (12, e + m))) * 2
    router = NullExpertsRouter(num_experts=e, num_null_experts=m, k=k, load_balance_coef=0.5)
    r = on_logits(router, jnp.asarray(logits, jnp.float32), group_size=6)

    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    top = np.argsort(-probs, -1, kind="stable")[:, :k]
    want_idx = np.where(top < e, top, -1)
    np.testing.assert_array_equal(r.indices, want_idx)
    w = np.where(top < e, np.take_along_axis(probs, top, -1), 0.0)
    s = w.sum(-1, keepdims=True)
    np.testing.assert_allclose(r.weights, w / np.where(s > 0, s, 1.0), rtol=1e-5, atol=1e-7)
    lb = 0.0
    for g in range(2):
        rows = slice(6 * g, 6 * g + 6)
        chosen = np.zeros((6, e + m))
        np.put_along_axis(chosen, top[rows], 1.0, -1)
        f = chosen.mean(0)
        f[e:] = f[e:].mean()  # the nulls are one pool
        lb += (e + m) * np.sum(f * probs[rows].mean(0)) / 2
    np.testing.assert_allclose(r.stats["load_balance_loss"], lb, rtol=1e-5)
    np.testing.assert_allclose(r.losses["load_balance"], 0.5 * lb, rtol=1e-5)
    real = (top < e).sum(-1)
    np.testing.assert_allclose(r.stats["real_experts_per_token"], real.mean(), rtol=1e-6)
    np.testing.assert_allclose(r.stats["null_fraction"], 1 - real.mean() / k, rtol=1e-6)
    assert 0 < real.mean() < k
    # balanced routing over E + m (cyclic token -> expert sets) gives L_b = k
    n = e + m
    cyclic = np.stack([np.roll(np.r_[np.full(k, 4.0), np.zeros(n - k)], i) for i in range(n)])
    rb = on_logits(NullExpertsRouter(num_experts=e, num_null_experts=m, k=k), jnp.asarray(cyclic, jnp.float32))
    np.testing.assert_allclose(rb.stats["load_balance_loss"], k, rtol=1e-5)


def test_null_experts_never_reach_the_grouped_matmul(monkeypatch):
    cfg = make_cfg("null_experts", k=4, num_null_experts=E, dispatch="dropless", gmm_backend="dense")
    x = make_x()
    model, _, variables = build(cfg)
    seen = []
    real_gmm = GMM_BACKENDS["dense"]

    def spy(lhs, rhs, group_sizes):
        seen.append(np.asarray(group_sizes))
        return real_gmm(lhs, rhs, group_sizes)

    monkeypatch.setitem(GMM_BACKENDS, "dense", spy)
    y, aux = model.apply(variables, x, deterministic=True)  # eager: concrete group sizes
    router = routers_lib.router_from_config(cfg)
    routing = router.apply({"params": variables["params"]["router"]}, x.reshape(-1, D), deterministic=True,
                           group_size=L)
    real = int(np.sum(np.asarray(routing.indices) >= 0))
    assert 0 < real < B * L * 4  # some slots went to nulls
    assert seen and all(int(gs.sum()) == real for gs in seen)  # rows of the grouped matmul = real copies
    np.testing.assert_allclose(aux["stats"]["real_experts_per_token"], real / (B * L), rtol=1e-6)
    # a token whose k slots are all nulls gets exactly zero MoE output
    none = np.all(np.asarray(routing.indices) < 0, -1)
    assert np.all(np.asarray(y).reshape(-1, D)[none] == 0.0)


# ------------------------------------------------------------------ config checks


@pytest.mark.parametrize("router,overrides,match", [
    ("top_p", dict(top_p_threshold=0.0), r"moe.top_p_threshold=0.0 must be in \(0, 1\]"),
    ("top_p", dict(top_p_threshold=1.5), r"moe.top_p_threshold=1.5 must be in \(0, 1\]"),
    ("top_p", dict(top_p_max_k=9), r"moe.top_p_max_k=9 must be between 0"),
    ("null_experts", dict(num_null_experts=0), r"moe.num_null_experts=0 must be >= 1"),
    ("null_experts", dict(k=17), r"moe.k=17 must be between 1 and moe.num_experts \+ moe.num_null_experts=16"),
    ("smoe_dropout", dict(smoe_k_schedule="exp"), r"moe.smoe_k_schedule='exp' is unknown"),
    ("smoe_dropout", dict(smoe_k_start=0), r"moe.smoe_k_start=0 must be between 1"),
    ("smoe_dropout", dict(smoe_k_end=9), r"moe.smoe_k_end=9 must be between 0"),
    ("smoe_dropout", dict(smoe_k_steps=0), r"moe.smoe_k_steps=0 must be >= 1"),
    ("smoe_dropout", dict(smoe_eval_k=9), r"moe.smoe_eval_k=9 must be between 0"),
    ("smoe_dropout", dict(smoe_eval_sweep="1,9"), r"moe.smoe_eval_sweep=.1,9. must be .auto."),
    ("thor", dict(thor_inference="ensemble"), r"moe.thor_inference='ensemble' is unknown"),
    ("thor", dict(thor_train_level="layer"), r"moe.thor_train_level='layer' is unknown"),
    ("thor", dict(dispatch="capacity", eval_capacity_factor=2.0), r"eval_capacity_factor >= moe.num_experts=8"),
    ("thor", dict(dispatch="capacity", eval_capacity_factor=8.0, thor_train_level="batch"),
     r"moe.capacity_factor >= moe.num_experts=8"),
    ("hash", dict(hash_vocab_size=-1), r"moe.hash_vocab_size=-1 must be >= 0"),
])
def test_check_config_errors(router, overrides, match):
    with pytest.raises(ValueError, match=match) as err:
        moe_lib.validate_moe_config(make_cfg(router, **overrides), causal=True, mesh_shape={"expert": 4})
    assert "\n" not in str(err.value)


def test_defaults_are_valid_and_unchanged():
    cfg = base.get_config().model.moe
    assert cfg.router == "top_k"
    for name in ZOO:
        cfg.router = name
        moe_lib.validate_moe_config(cfg, causal=True, mesh_shape={"expert": 4, "data": 2})
        assert isinstance(routers_lib.router_from_config(cfg), ROUTERS[name])


# ------------------------------------------------------------------ MoE block, both dispatchers, mesh


def _case(router, dispatch):
    over = dict(dispatch=dispatch, capacity_factor=2.0, eval_capacity_factor=2.0, gmm_backend="ragged_dot")
    if router == "thor":
        over.update(eval_capacity_factor=float(E))
    return make_cfg(router, **over)


RNGS = {"router": jax.random.PRNGKey(4), "dropout": jax.random.PRNGKey(5)}


def _forward(model, params, others, x, tokens):
    (y, aux), _ = model.apply({"params": params, **others}, x, deterministic=False, token_ids=tokens,
                              rngs=RNGS, mutable=list(others))
    return y, aux


def _loss_and_grads(model, params, others, x, tokens, cot):
    def loss(p, x):
        y, aux = _forward(model, p, others, x, tokens)
        return jnp.sum(y * cot) + sum(aux["losses"].values()), y
    (_, y), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, x)
    return y, grads


@pytest.mark.parametrize("dispatch", ["capacity", "dropless"])
@pytest.mark.parametrize("router", ZOO)
def test_moe_block_both_dispatchers_on_an_expert_mesh(router, dispatch):
    """Forward and gradients on a data=2 x expert=4 mesh (experts sharded 4 ways, jitted);
    the output equals the unsharded eager forward; gradients are finite and reach the
    experts (and the router, for learned routers)."""
    cfg = _case(router, dispatch)
    x, tokens, cot = make_x(), make_tokens(), make_x(7)
    model, boxed, variables = build(cfg)
    params = variables["params"]
    others = {k: v for k, v in variables.items() if k != "params"}
    if router == "smoe_dropout":
        others["router_state"] = _smoe_state(2)  # mid-schedule: some slots empty
    y_ref, _ = _forward(model, params, others, x, tokens)  # unsharded, eager

    mesh = sharding.make_mesh({"data": 2, "expert": 4})
    rules = sharding.DEFAULT_RULES
    shard = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, rules)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    p_s = jax.device_put(params, shard["params"])
    o_s = jax.device_put(others, jax.tree.map(lambda _: replicated, others))
    x_s = jax.device_put(x, sharding.logical_sharding(mesh, ("batch", "length", "act_embed"), rules))
    t_s = jax.device_put(tokens, sharding.logical_sharding(mesh, ("batch", "length"), rules))
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        y, (g_params, g_x) = jax.jit(functools.partial(_loss_and_grads, model))(p_s, o_s, x_s, t_s, cot)
    assert p_s["experts"]["wi"].addressable_shards[0].data.shape[0] == E // 4
    assert float(jnp.abs(y_ref).max()) > 0
    np.testing.assert_allclose(y, y_ref, **TOL)
    for leaf in jax.tree.leaves((g_params, g_x)):
        assert np.all(np.isfinite(leaf))
    assert float(jnp.abs(g_params["experts"]["wi"]).max()) > 0
    assert float(jnp.abs(g_x).max()) > 0
    if router in ("top_p", "null_experts"):
        assert float(jnp.abs(g_params["router"]["kernel"]).max()) > 0  # learned routers learn


def test_active_parameter_count_follows_the_router():
    """zoo.count_params counts expert parameters by the router's share per token: k/E for
    top-k, k/(E+m) real experts with m null experts (AdaMoE's balanced target)."""
    from routezoo import zoo
    e, f, d = 8, 16, 4
    params = {"experts": {"wi": nn.LogicallyPartitioned(jax.ShapeDtypeStruct((e, d, f), jnp.float32),
                                                        ("expert", "embed", "expert_mlp"))},
              "dense": nn.LogicallyPartitioned(jax.ShapeDtypeStruct((d, d), jnp.float32), ("embed", "mlp"))}
    model_cfg = base.get_config().model
    model_cfg.moe.update(num_experts=e, k=4, router="top_k")
    assert zoo.count_params(params, model_cfg) == (e * d * f + d * d, e * d * f // 2 + d * d)
    model_cfg.moe.update(router="null_experts", num_null_experts=8)
    assert zoo.count_params(params, model_cfg) == (e * d * f + d * d, e * d * f // 4 + d * d)
