"""DoRA and PiSSA (layers/adapters/dora.py, pissa.py) against dense references computed here
with numpy: DoRA's column norms, weights, outputs and gradients, merged == unmerged; PiSSA's
SVD factors (the best rank-r approximation), residual and merge; both equal the base at
init, train only the adapter through train_step, and refuse bad configs in one line."""

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from conftest import per_layer_config
from routezoo import zoo
from routezoo.layers import adapters
from routezoo.layers.adapters import hooks
from routezoo.layers.mlp import MLP
from routezoo.training import config_check
from routezoo.training import train as train_lib


def _base(seed=0, d=6, h=2, k=4, e=3, f=5):
    """Boxed weights with real values: q [D, H, K], o [H, K, D] (two input axes) and
    stacked experts wo [E, F, D]."""
    rng = np.random.default_rng(seed)
    w = lambda shape: rng.standard_normal(shape).astype(np.float32)
    return {"attn": {"q": nn.LogicallyPartitioned(w((d, h, k)), ("embed", "heads", "head_dim")),
                     "o": nn.LogicallyPartitioned(w((h, k, d)), ("heads", "head_dim", "embed"))},
            "experts": {"wo": nn.LogicallyPartitioned(w((e, f, d)), ("expert", "expert_mlp", "embed"))}}


# (path, number of input axes, has an expert axis) of the weights of _base
_LAYOUT = {"attn/q": (1, False), "attn/o": (2, False), "experts/wo": (1, True)}


def _leaf(tree, path):
    for part in path.split("/"):
        tree = tree[part]
    return np.asarray(nn.unbox(tree), np.float64)


def _as_matrices(w, num_in, experts):
    """``[E, I, O]`` float64 view of a weight (E = 1 without an expert axis)."""
    w = np.asarray(w, np.float64)
    if not experts:
        w = w[None]
    lead = w.shape[0]
    return w.reshape(lead, int(np.prod(w.shape[1:1 + num_in])), -1)


def _random(method, params, seed=1, scale=0.3):
    """The method's adapter (from a real init) with every trainable leaf replaced by
    random non-zero values; DoRA's magnitude stays positive."""
    rng = np.random.default_rng(seed)
    ad = jax.tree.map(np.asarray, nn.unbox(method.init(jax.random.PRNGKey(0), params)))
    flat = adapters.flat_params(ad)
    for key, v in flat.items():
        name = key.rsplit("/", 1)[1]
        if name in ("lora_a", "lora_b"):
            flat[key] = (scale * rng.standard_normal(v.shape)).astype(np.float32)
        elif name == "lora_magnitude":
            flat[key] = (v * rng.uniform(0.5, 1.5, v.shape)).astype(np.float32)
    return jax.tree.map(np.asarray, _nested(flat))


def _nested(flat):
    out = {}
    for key, v in flat.items():
        node = out
        *parents, leaf = key.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return out


def _dora_reference(w, a, b, m, scale):
    """``m · V / ||V||_c`` with ``V = W + s·A·B``, float64, every operand ``[E, ...]`` matrices."""
    v = w + scale * a @ b
    norm = np.sqrt((v ** 2).sum(axis=1, keepdims=True))      # over the input axis I, per output unit
    return m[:, None, :] * v / norm, v, norm


# --------------------------------------------------------------------------- DoRA


def test_dora_magnitude_is_the_papers_column_norm_and_init_is_the_base():
    params = _base()
    dora = adapters.DoRA(".*", rank=2, alpha=4.0)
    ad = dora.init(jax.random.PRNGKey(0), params)
    for path, (num_in, experts) in _LAYOUT.items():
        w = _as_matrices(_leaf(params, path), num_in, experts)
        m = _leaf(ad, f"{path}/lora_magnitude")
        # one value per output unit, shaped as the weight's output axes (with logical names)
        out_shape = _leaf(params, path).shape[(1 if experts else 0) + num_in:]
        assert m.shape == ((w.shape[0],) if experts else ()) + out_shape
        names = adapters.flat_params(ad)[f"{path}/lora_magnitude"].names
        w_names = adapters.flat_params(params)[path].names
        assert names == w_names[:experts] + w_names[experts + num_in:]
        # norm over the input axes, for each output column: sqrt(sum_i W[i, o]^2)
        want = np.array([[math.sqrt(sum(w[e, i, o] ** 2 for i in range(w.shape[1])))
                          for o in range(w.shape[2])] for e in range(w.shape[0])])
        np.testing.assert_allclose(m.reshape(w.shape[0], -1), want, rtol=1e-6)
        assert _leaf(ad, f"{path}/lora_b").any() == False   # noqa: E712 (B = 0)
    merged = dora.merge(params, ad)
    jax.tree.map(lambda got, want: np.testing.assert_allclose(got, want, rtol=1e-6, atol=0),
                 merged, nn.unbox(params))
    assert dora.count(params) == adapters.num_params(ad) == sum(
        e * (2 * (i + o) + o) for e, i, o in (_as_matrices(_leaf(params, p), *_LAYOUT[p]).shape for p in _LAYOUT))


@pytest.mark.parametrize("rslora", [False, True])
def test_dora_weight_and_output_against_dense_reference(rslora):
    """Random non-zero A, B and m: the merged weight is m·V/||V||_c by hand (float64),
    its column norms are m, and x·W' through an einsum matches the reference output."""
    params = _base()
    dora = adapters.DoRA(".*", rank=3, alpha=6.0, rslora=rslora)
    scale = 6.0 / (math.sqrt(3) if rslora else 3)
    assert dora.scale == pytest.approx(scale)
    ad = _random(dora, params)
    merged = dora.merge(params, ad)
    for path, (num_in, experts) in _LAYOUT.items():
        to_m = lambda x: _as_matrices(x, num_in, experts)
        w = to_m(_leaf(params, path))
        a = to_m(_leaf(ad, f"{path}/lora_a"))                      # [E, I, R]
        b = _leaf(ad, f"{path}/lora_b").reshape(w.shape[0], 3, -1)  # [E, R, O]
        m = _leaf(ad, f"{path}/lora_magnitude").reshape(w.shape[0], -1)
        want, _, _ = _dora_reference(w, a, b, m, scale)
        got = to_m(_leaf(merged, path))
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)
        np.testing.assert_allclose(np.sqrt((got ** 2).sum(axis=1)), m, rtol=2e-5)   # ||W'||_c = m
        assert not np.allclose(got, w, atol=1e-2)                                    # the adapter acts
    # outputs of the attention output projection o [H, K, D] on activations [B, L, H, K]
    x = np.random.default_rng(5).standard_normal((2, 3, 2, 4)).astype(np.float32)
    w = _as_matrices(_leaf(params, "attn/o"), 2, False)
    a = _as_matrices(_leaf(ad, "attn/o/lora_a"), 2, False)
    ref, _, _ = _dora_reference(w, a, _leaf(ad, "attn/o/lora_b")[None], _leaf(ad, "attn/o/lora_magnitude")[None],
                                scale)
    y = jnp.einsum("BLHK,HKD->BLD", x, merged["attn"]["o"])
    np.testing.assert_allclose(y, x.reshape(2, 3, 8).astype(np.float64) @ ref[0], rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("mlp_type", ["swiglu", "gelu"])
def test_dora_merged_equals_unmerged(mlp_type):
    """The merged MLP equals the unmerged DoRA computation g ⊙ (x·W0 + s·(x·A)·B) by hand,
    and the activation path DoRA takes with dropout (here deterministic: no drop)."""
    mlp = MLP(hidden_dim=24, mlp_type=mlp_type)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 16))
    params = mlp.init(jax.random.PRNGKey(1), x)["params"]
    dora = adapters.DoRA(".*", rank=3, alpha=6.0)
    ad = _random(dora, params)
    merged = mlp.apply({"params": dora.merge(params, ad)}, x)

    p = nn.unbox(params)

    def lin(v, name):   # unmerged: the base product, the low-rank product, one gain per output
        w, a, b, m = (np.asarray(t, np.float64) for t in (p[name], ad[name]["lora_a"], ad[name]["lora_b"],
                                                           ad[name]["lora_magnitude"]))
        g = m / np.linalg.norm(w + dora.scale * a @ b, axis=0)
        v = np.asarray(v, np.float64)
        return g * (v @ w + dora.scale * (v @ a) @ b)
    hid = lin(x, "wi")
    hid = np.asarray(nn.silu(lin(x, "wg"))) * hid if mlp_type == "swiglu" else np.asarray(nn.gelu(hid))
    np.testing.assert_allclose(merged, lin(hid, "wo"), rtol=5e-5, atol=5e-5)

    dropping = adapters.DoRA(".*", rank=3, alpha=6.0, dropout=0.2)
    assert dropping.hook_delta is not None and dora.hook_delta is None
    with hooks.bind(dropping, params, ad):   # deterministic: the activation path without a drop
        hooked = mlp.apply({"params": params}, x)
    np.testing.assert_allclose(hooked, merged, rtol=2e-5, atol=2e-5)
    with hooks.bind(dropping, params, ad, rng=jax.random.PRNGKey(3), deterministic=False):
        dropped = mlp.apply({"params": params}, x)
    assert np.isfinite(dropped).all() and not np.allclose(dropped, merged, atol=1e-4)


@pytest.mark.parametrize("detach", [True, False])
def test_dora_gradients_against_hand_derivatives(detach):
    """L = sum(C ⊙ W') for a fixed C, so dL/dW' = C. Reference gradients by hand (float64):
    dL/dm = sum_i C V / n; with the norm detached dL/dV = C·m/n, else the derivative of
    m·v/||v||, m·(C/n - V (C·V)/n^3); dL/dB = s Aᵀ dL/dV, dL/dA = s dL/dV Bᵀ."""
    params = {"wi": nn.LogicallyPartitioned(np.random.default_rng(0).standard_normal((7, 5)).astype(np.float32),
                                            ("embed", "mlp"))}
    dora = adapters.DoRA("wi", rank=2, alpha=2.0, detach_norm=detach)
    ad = _random(dora, params)
    c = np.random.default_rng(9).standard_normal((7, 5))
    base = nn.unbox(params)
    loss = lambda adp: jnp.sum(jnp.asarray(c, jnp.float32) * dora.merge(base, adp)["wi"])
    grads = jax.tree.map(np.asarray, jax.grad(loss)(ad))["wi"]

    w, a, b, m = (np.asarray(t, np.float64) for t in (base["wi"], ad["wi"]["lora_a"], ad["wi"]["lora_b"],
                                                       ad["wi"]["lora_magnitude"]))
    s = dora.scale
    v = w + s * a @ b
    n = np.linalg.norm(v, axis=0)
    dv = c * m / n if detach else m * (c / n - v * (c * v).sum(0) / n ** 3)
    np.testing.assert_allclose(grads["lora_magnitude"], (c * v).sum(0) / n, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(grads["lora_b"], s * a.T @ dv, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(grads["lora_a"], s * dv @ b.T, rtol=1e-4, atol=1e-5)
    for g in grads.values():
        assert np.abs(g).max() > 1e-3   # all three receive gradient


@pytest.mark.parametrize("detach", [True, False])
def test_dora_zero_column_stays_finite(detach):
    """A base column of zeros: its magnitude starts at 0, the merged column stays 0 and the
    other columns and all gradients stay finite."""
    w = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)
    w[:, 1] = 0.0
    params = {"wi": nn.LogicallyPartitioned(w, ("embed", "mlp"))}
    dora = adapters.DoRA("wi", rank=2, alpha=2.0, detach_norm=detach)
    ad = jax.tree.map(np.asarray, nn.unbox(dora.init(jax.random.PRNGKey(0), params)))
    np.testing.assert_allclose(ad["wi"]["lora_magnitude"], np.linalg.norm(w, axis=0), rtol=1e-6)
    merged = np.asarray(dora.merge(params, ad)["wi"])
    np.testing.assert_allclose(merged, w, rtol=1e-6)
    grads = jax.grad(lambda adp: jnp.sum(dora.merge(nn.unbox(params), adp)["wi"] ** 3))(ad)
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))


# --------------------------------------------------------------------------- PiSSA


def test_pissa_init_is_the_best_rank_r_approximation_and_the_base():
    params = _base()
    r = 2
    pissa = adapters.PiSSA(".*", rank=r)
    before = jax.tree.map(np.array, nn.unbox(params))
    ad = jax.tree.map(np.asarray, nn.unbox(pissa.init(jax.random.PRNGKey(0), params)))
    merged = pissa.merge(params, ad)
    for path, (num_in, experts) in _LAYOUT.items():
        to_m = lambda x: _as_matrices(x, num_in, experts)
        w = to_m(_leaf(params, path))
        a = to_m(_leaf(ad, f"{path}/lora_a"))
        b = _leaf(ad, f"{path}/lora_b").reshape(w.shape[0], r, -1)
        res = to_m(_leaf(ad, f"{path}/pissa_residual"))
        assert _leaf(ad, f"{path}/pissa_residual").shape == _leaf(params, path).shape
        u, sv, vt = np.linalg.svd(w, full_matrices=False)          # numpy, float64, per expert
        best = u[..., :r] * sv[:, None, :r] @ vt[:, :r]
        np.testing.assert_allclose(a @ b, best, rtol=1e-5, atol=1e-5)               # top-r part of W
        np.testing.assert_allclose((np.linalg.norm(w - a @ b, axis=(1, 2)) ** 2), (sv[:, r:] ** 2).sum(1),
                                   rtol=1e-4)                                        # Eckart-Young error
        # A = U_r S_r^1/2, B = S_r^1/2 V_rᵀ (up to each singular vector's sign)
        eye = np.eye(r)[None]
        np.testing.assert_allclose(a.transpose(0, 2, 1) @ a, eye * sv[:, None, :r], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(b @ b.transpose(0, 2, 1), eye * sv[:, None, :r], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(res + a @ b, w, rtol=0, atol=1e-5)                # W_res + A B = W
        np.testing.assert_allclose(to_m(_leaf(merged, path)), w, rtol=0, atol=1e-5)  # the base at init
    jax.tree.map(np.testing.assert_array_equal, nn.unbox(params), before)             # the source base untouched
    assert pissa.count(params) == sum(x.size for k, x in adapters.flat_params(ad).items()
                                      if not k.endswith("pissa_residual"))


def test_pissa_merge_is_residual_plus_ab():
    """With trained (random) factors the merged weight is W_res + A·B (scale 1), whatever the
    base weight's values: the residual replaces it."""
    params = _base()
    pissa = adapters.PiSSA(".*", rank=2)
    ad = _random(pissa, params)
    moved = jax.tree.map(lambda x: x + 1.0, nn.unbox(params))
    for base in (params, moved):
        merged = pissa.merge(base, ad)
        for path, (num_in, experts) in _LAYOUT.items():
            to_m = lambda x: _as_matrices(x, num_in, experts)
            a, res = to_m(_leaf(ad, f"{path}/lora_a")), to_m(_leaf(ad, f"{path}/pissa_residual"))
            b = _leaf(ad, f"{path}/lora_b").reshape(a.shape[0], 2, -1)
            np.testing.assert_allclose(to_m(_leaf(merged, path)), res + a @ b, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- training


def _model_and_base(c):
    model = zoo.build(c.model)
    tokens = jnp.zeros((1, 8), jnp.int32)
    return model, jax.jit(model.init)(jax.random.PRNGKey(0), tokens)["params"], tokens


def test_adapted_model_equals_base_at_init(data_dir):
    c = per_layer_config(data_dir, **{"adapter.targets": "attn/(q|v|o)|mlp/(wi|wo)", "adapter.rank": 4})
    model, params, _ = _model_and_base(c)
    tokens = jnp.asarray(np.random.default_rng(0).integers(2, 258, (2, 16)), jnp.int32)
    apply = jax.jit(lambda p: model.apply({"params": p}, tokens)[0])
    want = apply(nn.unbox(params))
    for method, atol in (("dora", 1e-6), ("pissa", 1e-5)):
        c.adapter.method = method
        method_ = adapters.from_config(c.adapter)
        got = apply(method_.merge(params, method_.init(jax.random.PRNGKey(1), params)))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=atol)


def test_dora_train_steps_change_only_the_adapter(data_dir):
    """Three train steps: the base is bit-identical, every DoRA leaf (A, B, m) moved, and
    the optimizer state holds the adapter's leaves only."""
    method = "dora"
    c = per_layer_config(data_dir, **{"adapter.method": method, "adapter.targets": "attn/(q|v)", "adapter.rank": 2})
    mesh, rules = train_lib.mesh_and_rules(c)
    model = zoo.build(c.model)
    adapter = adapters.from_config(c.adapter)
    tx, schedule = train_lib.optimizer_for(c, adapter)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        _, shardings, setup = train_lib.adapter_state_shardings(model, tx, c, mesh, rules, adapter)
        base = train_lib.load_base(model, c, setup, mesh, rules)
        before = jax.tree.map(np.array, base)
        with pytest.raises(ValueError, match=f"adapter.method='{method}' initialises from the base weights"):
            train_lib.create_adapter_state(model, tx, c, shardings, setup)
        state = train_lib.create_adapter_state(model, tx, c, shardings, setup, base=base)
        init = adapters.flat_params(jax.tree.map(np.array, state.params))
        # the run initialised from the loaded base's values
        for path, w in adapters.flat_params(jax.tree.map(np.asarray, base)).items():
            if f"{path}/lora_a" not in init:
                continue
            w = w.reshape(w.shape[0], -1)   # q, v [D, H, K]: input D
            np.testing.assert_allclose(init[f"{path}/lora_magnitude"].reshape(-1), np.linalg.norm(w, axis=0),
                                       rtol=1e-6)
        step = jax.jit(train_lib.make_train_step(model, tx, c, schedule, adapter))
        rng = np.random.default_rng(0)
        for _ in range(3):
            ids = rng.integers(2, 258, (8, c.data.seq_len + 1))
            batch = {"inputs": jnp.asarray(ids[:, :-1]), "targets": jnp.asarray(ids[:, 1:]),
                     "weights": jnp.ones((8, c.data.seq_len))}
            state, metrics = step(state, batch, base)
    assert np.isfinite(float(metrics["loss"]))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, np.asarray(b)), before, base)
    after = adapters.flat_params(jax.tree.map(np.asarray, state.params))
    assert {k.rsplit("/", 1)[1] for k in after} == {"lora_a", "lora_b", "lora_magnitude"}
    for key, v in after.items():
        assert np.abs(v - init[key]).max() > 0, key
    assert set(adapters.flat_params(_adam_mu(state.opt_state))) == set(after)


def _adam_mu(opt_state):
    return next(s for s in jax.tree_util.tree_leaves(opt_state, is_leaf=lambda x: hasattr(x, "mu"))
                if hasattr(s, "mu")).mu


def test_pissa_run_trains_only_the_factors_and_saves_the_residual(data_dir, tmp_path):
    """train_and_evaluate with pissa: the adapter directory holds the residual with A and B;
    against a fresh init on the same (unchanged) base, A and B moved and the residual did
    not, and it has no optimizer state; adapter.json counts only A and B as trainable; the
    loaded adapter merged onto the base equals the run's own merged parameters."""
    c = per_layer_config(data_dir, **{"train.steps": 2, "train.eval_every": 2, "train.eval_steps": 1,
                                      "checkpoint.every": 2, "adapter.method": "pissa",
                                      "adapter.targets": "attn/q|mlp/wo", "adapter.rank": 3})
    out = train_lib.train_and_evaluate(c, str(tmp_path))
    assert math.isfinite(out["eval_loss"])
    meta = json.load(open(os.path.join(tmp_path, "adapter", "adapter.json")))
    m = c.model
    q, wo = (m.d_model, m.num_heads * m.head_dim), (m.mlp_dim, m.d_model)
    assert meta["params_trainable"] == m.num_layers * 3 * (sum(q) + sum(wo))
    assert meta["params_adapter"] == meta["params_trainable"] + m.num_layers * (math.prod(q) + math.prod(wo))
    mesh, rules = train_lib.mesh_and_rules(c)
    model = zoo.build(c.model)
    pissa = adapters.from_config(c.adapter)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        tx, _ = train_lib.optimizer_for(c, pissa)
        _, _, setup = train_lib.adapter_state_shardings(model, tx, c, mesh, rules, pissa)
        base = train_lib.load_base(model, c, setup, mesh, rules)
        loaded, ad, _ = train_lib.load_adapter(os.path.join(tmp_path, "adapter"), base)
        _, _, state = train_lib.load_trained(str(tmp_path))
    assert loaded == pissa
    assert ad["layer0"]["attn"]["q"]["pissa_residual"].shape == nn.unbox(base)["layer0"]["attn"]["q"].shape
    fresh = adapters.flat_params(nn.unbox(pissa.init(None, base)))   # unboxed: input = first axis, as named
    trained = adapters.flat_params(ad)
    assert set(trained) == set(fresh)
    for key, v in trained.items():
        if key.endswith("pissa_residual"):   # frozen (the run's SVD ran under jit: equal to rounding)
            np.testing.assert_allclose(v, fresh[key], rtol=0, atol=1e-6)
        else:
            assert np.abs(np.asarray(v) - np.asarray(fresh[key])).max() > 1e-4, key
    mu = adapters.flat_params(_adam_mu(tx.init(ad)))
    assert {k for k, v in mu.items() if hasattr(v, "shape")} == {k for k in trained if "pissa_residual" not in k}
    merged = loaded.merge(base, ad)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6),
                 merged, state.params)
    w = np.asarray(nn.unbox(base)["layer0"]["mlp"]["wo"])
    a, b = ad["layer0"]["mlp"]["wo"]["lora_a"], ad["layer0"]["mlp"]["wo"]["lora_b"]
    np.testing.assert_allclose(merged["layer0"]["mlp"]["wo"], ad["layer0"]["mlp"]["wo"]["pissa_residual"] + a @ b,
                               rtol=1e-5, atol=1e-5)
    assert not np.allclose(merged["layer0"]["mlp"]["wo"], w, atol=1e-6)   # trained away from the base


# --------------------------------------------------------------------------- errors


def _one_line(e):
    assert "\n" not in str(e.value), str(e.value)


def test_bad_configs_are_refused_in_one_line(data_dir):
    params = _base()
    with pytest.raises(ValueError) as e:
        adapters.PiSSA(".*", rank=7).select(params)
    _one_line(e)
    assert "adapter.rank=7 exceeds min(d_in, d_out)=6 of attn/o (8 x 6)" in str(e.value)
    assert str(e.value).endswith("allowed 1..5 for these targets")   # experts/wo is 5 x 6
    adapters.PiSSA(".*", rank=5).select(params)
    with pytest.raises(ValueError, match="stacked experts") as e:
        adapters.DoRA("experts/wo", rank=2, dropout=0.1).init(jax.random.PRNGKey(0), params)
    _one_line(e)
    assert "adapter.method='dora'" in str(e.value) and "use lora_dropout=0 or non-expert targets" in str(e.value)
    with pytest.raises(ValueError, match="initialises from the base weights' values") as e:
        adapters.DoRA("attn/q", rank=2).init(jax.random.PRNGKey(0), jax.eval_shape(lambda: params))
    _one_line(e)

    def cfg(method, **kw):
        return per_layer_config(data_dir, **{"adapter.method": method, "adapter.targets": "attn/q",
                                             **{f"adapter.{k}": v for k, v in kw.items()}})
    for c, needle in ((cfg("pissa", rslora=True), "adapter.rslora=True is not used by adapter.method='pissa'"),
                      (cfg("pissa", lora_dropout=0.1), "adapter.lora_dropout=0.1 is not supported by "
                                                        "adapter.method='pissa'"),
                      (cfg("dora", lora_dropout=1.0), "adapter.lora_dropout=1.0 of adapter.method='dora' must be")):
        with pytest.raises(config_check.ConfigError, match=needle) as e:
            config_check.validate(c)
        _one_line(e)
    for c in (cfg("dora", dora_detach_norm=False, rslora=True), cfg("pissa", rank=4), cfg("dora", lora_dropout=0.1)):
        config_check.validate(c)
    assert adapters.from_config(cfg("dora", dora_detach_norm=False).adapter).detach_norm is False
