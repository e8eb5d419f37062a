"""Scanned layer stacks and rematerialisation (routezoo/zoo/stack.py).

* which layers a stack scans (:func:`stack.stack_layout`) for the feed-forward patterns
  the zoo builds;
* :func:`stack.to_scanned` / :func:`stack.to_unscanned` move parameters and an optax
  AdamW state between the layouts bit for bit;
* a model built with ``scan_layers=True`` equals the same model unscanned, its parameters
  converted: logits, gradients and three AdamW steps (parameters, optimizer state and
  mutable collections), for every kind of layer stack (dense, MoE, MoE every 2 layers,
  a dense first layer then MoE with the DeepSeek-V3 router, latent attention, the
  recurrent router whose state is the scan's carry, the bidirectional encoder and the
  T5 encoder-decoder);
* no remat policy changes a value (outputs and gradients equal ``remat='none'``), and
  ``save_moe_dispatch`` keeps the MoE layers' ``[T·K, D]`` sorted rows, never ``[T·K, F]``;
* decoding with the key/value cache of a scanned model equals the unscanned model's.

Shapes are tiny: B=2, L=8, D=16, H=2, A=8, E=4 experts of width F=12, K=2, V=50; the
variables are random numbers of the model's shapes (no initialiser runs: nothing to compile).
"""

from __future__ import annotations

import contextlib
import functools
import io
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import linen as nn
from jax.ad_checkpoint import print_saved_residuals

from routezoo import zoo
from routezoo.configs import base
from routezoo.zoo import stack
from routezoo.zoo.lm import init_cache

B, L, D, F, E, K, V = 2, 8, 16, 12, 4, 2, 50
TOL = dict(rtol=1e-5, atol=1e-5)

MLA = {"attention": "mla", "mla_q_lora_rank": 0, "mla_kv_lora_rank": 8, "mla_qk_nope_head_dim": 8,
       "mla_qk_rope_head_dim": 4, "mla_v_head_dim": 6}
CASES = {
    "dense": {"num_layers": 2},
    # top_k, dropless; the aux-loss-free bias is a mutable 'router_state' collection
    "moe": {"num_layers": 2, "ffn": "moe", "moe.bias_update_rate": 0.01},
    "moe_every_2": {"num_layers": 4, "ffn": "moe", "moe.every": 2},
    "dense_then_moe_deepseek": {"num_layers": 3, "ffn": "mlp,moe,moe", "moe.router": "deepseek_v3",
                                "moe.num_shared_experts": 1},
    "mla": {"num_layers": 2, **MLA},
    "recurrent_router": {"num_layers": 2, "ffn": "moe", "moe.router": "recurrent", "moe.recurrent_dim": 8},
    "encoder_mlm": {"name": "encoder_mlm", "num_layers": 2},
    # Switch-style: encoder all MoE (capacity dispatch), decoder dense; both stacks scanned
    "encoder_decoder": {"name": "encoder_decoder", "num_layers": 2, "num_decoder_layers": 2,
                        "encoder_sparse_step": 1, "decoder_sparse_step": 0, "mlp_type": "relu",
                        "moe.k": 1, "moe.dispatch": "capacity", "moe.expert_type": "relu"},
}


def model_cfg(scan: bool = True, **overrides) -> ml_collections.ConfigDict:
    m = base.get_config().model
    m.num_layers, m.d_model, m.num_heads, m.num_kv_heads, m.head_dim, m.mlp_dim = 2, D, 2, 1, 8, 24
    m.vocab_size, m.dtype = V, "float32"
    m.moe.num_experts, m.moe.k, m.moe.expert_dim, m.moe.jitter = E, K, F, 0.0
    m.moe.gmm_backend = "ragged_dot"   # less to compile than CPU's 'blocked'; tests/layers/moe tests each backend
    m.scan_layers = scan
    for key, value in overrides.items():
        node = m
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    return m


def inputs_of(cfg):
    """``(args, targets)``: the model's positional input and random next-token targets."""
    toks = jax.random.randint(jax.random.key(0), (3, B, L), 1, V)
    if cfg.name == "encoder_decoder":
        return ({"encoder_tokens": toks[0], "decoder_tokens": toks[1]},), toks[2]
    return (toks[0],), toks[2]


def init(model, args, seed: int = 0, boxed: bool = False):
    """Variables of ``model`` (every collection) with random normal values: the shapes of
    ``model.init`` (traced, not compiled), each leaf ``0.3·N(0, 1)``."""
    rngs = {s: jax.random.key(1) for s in ("params", "dropout", "jitter", "router")}
    shapes = jax.eval_shape(model.init, rngs, *args)
    rng = np.random.default_rng(seed)
    out = jax.tree.map(lambda x: jnp.asarray(0.3 * rng.standard_normal(x.shape), x.dtype), shapes)
    return out if boxed else nn.unbox(out)


@functools.lru_cache(maxsize=None)
def unscanned_variables(case: str):
    cfg = model_cfg(scan=False, **CASES[case])
    return init(zoo.build(cfg), inputs_of(cfg)[0], boxed=True)


def assert_trees_equal(a, b, exact=False, **tol):
    """Same structure (keys in the same order) and values: bit for bit with ``exact``,
    else within ``tol`` (default :data:`TOL`)."""
    pa, pb = jax.tree_util.tree_flatten_with_path(a)[0], jax.tree_util.tree_flatten_with_path(b)[0]
    assert [jax.tree_util.keystr(p) for p, _ in pa] == [jax.tree_util.keystr(p) for p, _ in pb]
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for (path, x), (_, y) in zip(pa, pb):
        x, y = np.asarray(x), np.asarray(y)
        assert x.shape == y.shape and x.dtype == y.dtype, jax.tree_util.keystr(path)
        if exact:
            np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))
        else:
            np.testing.assert_allclose(x, y, **(tol or TOL), err_msg=jax.tree_util.keystr(path))


# ------------------------------------------------------------------ (a) layouts


@pytest.mark.parametrize("kinds, prefix, unit, repeats, suffix", [
    (("moe",) * 4, 0, ("moe",), 4, ()),                                     # all MoE
    (("mlp", "moe") * 3, 0, ("mlp", "moe"), 3, ()),                        # MoE every 2 layers
    (("mlp",) + ("moe",) * 5, 1, ("moe",), 5, ()),                         # DeepSeek: 1 dense, then MoE
    (("mlp", "moe", "mlp", "moe", "mlp"), 0, ("mlp", "moe"), 2, (4,)),     # a trailing layer breaks the period
    (("moe", "moe", "moe", "mlp"), 0, ("moe",), 3, (3,)),
    (("mlp", "mlp", "moe", "moe", "moe", "mlp"), 2, ("moe",), 3, (5,)),   # the longest run wins
    (("moe",), 0, (), 0, (0,)),                                             # one layer: nothing to scan,
    (("mlp", "moe", "mlp"), 0, (), 0, (0, 1, 2)),                           # nor without a repeated period:
])                                                                           # every layer runs after the prefix
def test_stack_layout(kinds, prefix, unit, repeats, suffix):
    layout = stack.stack_layout(kinds, True)
    assert (layout.prefix, layout.unit, layout.repeats, tuple(layout.suffix)) == (prefix, unit, repeats, suffix)
    assert layout.scanned == bool(repeats)
    covered = [layout.layer_index(r, p) for r in range(repeats) for p in range(len(unit))]
    assert covered == list(layout.scanned_layers)
    assert all(kinds[i] == unit[(i - prefix) % len(unit)] for i in covered)
    assert [*range(prefix), *covered, *suffix] == list(range(len(kinds)))
    off = stack.stack_layout(kinds, False)
    assert not off.scanned and off.kinds == tuple(kinds)


@pytest.mark.parametrize("overrides, prefix, unit, repeats", [
    ({"num_layers": 4, "ffn": "moe"}, 0, ("moe",), 4),
    ({"num_layers": 4, "ffn": "moe", "moe.every": 2}, 0, ("mlp", "moe"), 2),
    ({"num_layers": 4, "ffn": "mlp,moe,moe,moe", "moe.router": "deepseek_v3"}, 1, ("moe",), 3),
    ({"num_layers": 5, "ffn": "moe", "moe.every": 2}, 0, ("mlp", "moe"), 2),   # the 5th layer trails
    ({"num_layers": 1, "ffn": "moe"}, 0, (), 0),
    ({"num_layers": 4, "ffn": "moe", "moe.router": "pregate"}, 0, (), 0),      # per-layer routes: unscanned
])
def test_model_stack_layouts(overrides, prefix, unit, repeats):
    cfg = model_cfg(**overrides)
    (path, layout), = stack.stack_layouts(cfg).items()
    assert path == () and (layout.prefix, layout.unit, layout.repeats) == (prefix, unit, repeats)
    assert stack.is_scanned(cfg) == bool(repeats)
    assert not stack.is_scanned(model_cfg(scan=False, **overrides))


# ------------------------------------------------------------------ (b) layout conversion


@pytest.mark.parametrize("case", ["dense_then_moe_deepseek", "moe_every_2", "encoder_decoder"])
def test_conversion_round_trip_is_exact(case):
    """Parameters (boxed, with their logical names) and an AdamW state with non-zero
    moments go to the scanned layout and back bit for bit; the scanned parameters have
    exactly the scanned model's own tree (names, shapes, logical axes)."""
    cfg = model_cfg(scan=False, **CASES[case])
    args, _ = inputs_of(cfg)
    boxed = unscanned_variables(case)["params"]
    scanned = stack.to_scanned(boxed, cfg)
    own = jax.eval_shape(functools.partial(zoo.build(model_cfg(**CASES[case])).init, jax.random.key(1)), *args)
    assert jax.tree.structure(scanned) == jax.tree.structure(own["params"])
    for a, b in zip(jax.tree.leaves(scanned, is_leaf=lambda x: isinstance(x, nn.Partitioned)),
                    jax.tree.leaves(own["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned))):
        assert a.names == b.names and a.value.shape == b.value.shape
    for path in stack.stack_layouts(cfg):   # every stack of the model is scanned here
        node = scanned
        for key in path:
            node = node[key]
        assert stack.SCAN_NAME in node and "layer1" not in node
    assert_trees_equal(stack.to_unscanned(scanned, cfg), boxed, exact=True)
    # already in the target layout: unchanged
    assert_trees_equal(stack.to_scanned(scanned, cfg), scanned, exact=True)
    assert_trees_equal(stack.to_unscanned(boxed, cfg), boxed, exact=True)

    params = nn.unbox(boxed)
    tx = optax.adamw(1e-3)
    state = tx.init(params)
    rng = np.random.default_rng(0)
    state = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), x.dtype)
                         if jnp.issubdtype(x.dtype, jnp.floating) else x + 3, state)
    moved = stack.to_scanned(state, cfg)
    assert jax.tree.structure(moved) == jax.tree.structure(tx.init(stack.to_scanned(params, cfg)))
    assert_trees_equal(stack.to_unscanned(moved, cfg), state, exact=True)


# ------------------------------------------------------------------ (c) scanned == unscanned


def loss_and_logits(model, params, state, args, targets):
    rngs = {s: jax.random.key(2) for s in ("dropout", "jitter", "router")}
    out = model.apply({"params": params, **state}, *args, deterministic=False, rngs=rngs,
                      mutable=list(state) if state else False)
    (logits, aux), new_state = out if state else (out, {})
    logp = jax.nn.log_softmax(logits, axis=-1)
    ce = -jnp.mean(jnp.take_along_axis(logp, targets[..., None], axis=-1))
    return ce + sum(aux["losses"].values()), (logits, new_state)


def make_train_step(model, tx):
    @jax.jit
    def step(params, state, opt_state, args, targets):
        (_, (logits, state)), grads = jax.value_and_grad(loss_and_logits, argnums=1, has_aux=True)(
            model, params, state, args, targets)
        updates, opt_state = tx.update(grads, opt_state, params)
        return logits, grads, optax.apply_updates(params, updates), state, opt_state
    return step


def train(cfg, variables, steps=3):
    """Logits and gradients of the first step, then parameters, other collections and
    optimizer state after ``steps`` AdamW steps, of ``cfg``'s model from ``variables``."""
    model, tx = zoo.build(cfg), optax.adamw(1e-2, weight_decay=0.1)
    args, targets = inputs_of(cfg)
    params = variables["params"]
    state = {k: v for k, v in variables.items() if k != "params"}
    opt_state = tx.init(params)
    step = make_train_step(model, tx)
    for i in range(steps):
        logits, grads, params, state, opt_state = step(params, state, opt_state, args, targets)
        if i == 0:
            first = logits, grads
    return (*first, params, state, opt_state)


@pytest.mark.parametrize("case", sorted(CASES))
def test_scanned_equals_unscanned(case):
    unscanned_cfg, scanned_cfg = model_cfg(scan=False, **CASES[case]), model_cfg(scan=True, **CASES[case])
    assert stack.is_scanned(scanned_cfg) and not stack.is_scanned(unscanned_cfg)
    variables = nn.unbox(unscanned_variables(case))
    ref = train(unscanned_cfg, variables)
    got = train(scanned_cfg, stack.to_scanned(variables, scanned_cfg))
    np.testing.assert_allclose(got[0], ref[0], **TOL)                            # logits
    for g, r in zip(got[1:], ref[1:]):   # gradients, parameters, collections, optimizer state after 3 steps
        assert_trees_equal(stack.to_unscanned(g, scanned_cfg), r)


# ------------------------------------------------------------------ (d) remat


def remat_cfg(scan: bool, **overrides):
    """A MoE decoder: two layers scanned, or one unscanned layer."""
    return model_cfg(scan=scan, num_layers=2 if scan else 1, ffn="moe", **overrides)


@functools.lru_cache(maxsize=None)
def _remat_ref(scan: bool):
    cfg = remat_cfg(scan)
    args, targets = inputs_of(cfg)
    variables = init(zoo.build(model_cfg(scan=False, num_layers=cfg.num_layers, ffn="moe")), args)
    return stack.to_layout(variables, cfg), args, targets


def _grads(cfg, variables, args, targets):
    f = jax.jit(jax.value_and_grad(functools.partial(loss_and_logits, zoo.build(cfg)), has_aux=True))
    (_, (logits, _)), grads = f(variables["params"], {}, args, targets)
    return logits, grads


@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unscanned"])
def test_remat_changes_no_value(scan):
    """Every policy gives the outputs and gradients of ``remat='none'``."""
    variables, args, targets = _remat_ref(scan)
    ref = _grads(remat_cfg(scan), variables, args, targets)
    for policy in stack.REMAT_POLICIES:
        if policy != "none":
            got = _grads(remat_cfg(scan, remat=policy), variables, args, targets)
            np.testing.assert_allclose(got[0], ref[0], **TOL, err_msg=policy)
            assert_trees_equal(got[1], ref[1])


def _residual_shapes(scan, policy):
    variables, args, targets = _remat_ref(scan)
    model = zoo.build(remat_cfg(scan, remat=policy))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        print_saved_residuals(lambda p: loss_and_logits(model, p, {}, args, targets)[0], variables["params"])
    found = set()
    for line in out.getvalue().splitlines():
        m = re.match(r"(\w+)\[([\d,]*)\]( named '(\w+)')?", line)
        found.add((tuple(int(n) for n in m.group(2).split(",") if n), m.group(4)))
    return found


@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unscanned"])
def test_save_moe_dispatch_keeps_sorted_rows_not_hidden(scan):
    """In the model (scanned: both layers' residuals stacked ``[R, ...]``), ``save_moe_dispatch``
    keeps the sorted rows ``[T·K, D]`` and no ``[T·K, F]``, unlike ``none``; ``full``
    keeps neither."""
    lead = (2,) if scan else ()   # scanned: the two layers' residuals stacked
    rows, hidden = (*lead, B * L * K, D), (*lead, B * L * K, F)
    saved = {p: _residual_shapes(scan, p) for p in ("none", "full", "save_moe_dispatch")}
    shapes = {p: {s for s, _ in found} for p, found in saved.items()}
    assert hidden in shapes["none"]
    assert rows in shapes["save_moe_dispatch"] and hidden not in shapes["save_moe_dispatch"]
    if not scan:   # (under nn.scan the residuals are the scan's outputs, which carry no name)
        assert (rows, "moe_gmm_in") in saved["save_moe_dispatch"]
    assert rows not in shapes["full"] and hidden not in shapes["full"]
    assert shapes["save_moe_dispatch"] != shapes["full"]


# ------------------------------------------------------------------ (e) decoding


def _decode(cfg, variables, tokens, prompt: int, max_len: int):
    """Logits ``[B, len(tokens), V]`` of ``tokens[:, :prompt]`` in one decoding call, then of
    each later token alone, through the key/value cache; and the final cache. One jit."""
    model = zoo.build(cfg)

    def step(cache, chunk):
        (logits, _), state = model.apply({**variables, "cache": cache}, chunk, decode=True, mutable=["cache"])
        return state["cache"], logits

    @jax.jit
    def run(tokens):
        cache, first = step(init_cache(model, tokens.shape[0], max_len), tokens[:, :prompt])
        cache, rest = jax.lax.scan(lambda c, t: step(c, t[:, None]), cache, tokens[:, prompt:].T)
        return jnp.concatenate([first, jnp.moveaxis(rest[:, :, 0], 0, 1)], axis=1), cache

    return run(tokens)


def test_decoding_scanned_equals_unscanned():
    """A prompt then one token at a time through the key/value cache (latent attention, a
    dense first layer outside the scan, then two scanned MoE layers): the scanned model's
    logits and final cache (converted) equal the unscanned model's, and the full forward
    pass's logits."""
    overrides = {**CASES["dense_then_moe_deepseek"], **MLA}
    unscanned_cfg, scanned_cfg = model_cfg(scan=False, **overrides), model_cfg(scan=True, **overrides)
    assert stack.is_scanned(scanned_cfg)
    tokens = jax.random.randint(jax.random.key(3), (B, 7), 1, V)
    variables = {"params": init(zoo.build(unscanned_cfg), (tokens,))["params"]}
    ref, ref_cache = _decode(unscanned_cfg, variables, tokens, prompt=4, max_len=9)
    got, cache = _decode(scanned_cfg, stack.to_scanned(variables, scanned_cfg), tokens, prompt=4, max_len=9)
    np.testing.assert_allclose(got, ref, **TOL)
    assert_trees_equal(stack.to_unscanned(cache, scanned_cfg), ref_cache)
    full, _ = jax.jit(zoo.build(scanned_cfg).apply)(stack.to_scanned(variables, scanned_cfg), tokens)
    np.testing.assert_allclose(got, full, **TOL)
