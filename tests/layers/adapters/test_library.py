"""Library methods (layers/adapters/library.py): ScaLearn, PHATGOOSE (gate, routing), GLIDER.

ScaLearn with one adapter and omega = 1 equals that LoRA merged into the base; ScaLearn
counts against the paper's four formulas; PHATGOOSE and GLIDER routing weights against
numpy references (GLIDER's local router: the layer-normalised gates); the library frozen
bit-identical and absent from the optimizer state in a real (tiny) training run; the errors."""

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from conftest import per_layer_config, tiny_config
from routezoo import zoo
from routezoo.layers import adapters
from routezoo.layers.adapters import hooks as adapter_hooks
from routezoo.layers.adapters import library as lib
from routezoo.layers.adapters import phatgoose as pg_lib
from routezoo.training import config_check
from routezoo.training import train as train_lib


def _model_and_shapes(c):
    model = zoo.build(c.model)
    return model, jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32)))["params"]


def _values(shapes, seed, scale=0.3):
    """Random numpy values for a (boxed or plain) tree of shapes; boxes kept."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: (scale * rng.standard_normal(x.shape)).astype(np.float32), shapes)


def _lora(params, targets, rank, seed, alpha=None):
    """(a trained-looking LoRA's params, its config dict) for the base ``params``."""
    method = adapters.LoRA(targets, rank=rank, alpha=alpha or 2.0 * rank)
    values = _values(nn.unbox(jax.eval_shape(lambda: method.init(jax.random.PRNGKey(0), params))), seed)
    return method, values, {"method": "lora", "rank": rank, "alpha": method.alpha, "rslora": False}


def _ctx(adapter_params, deterministic=True, rng=None):
    flat = adapters.flat_params(nn.unbox(adapter_params))
    return adapter_hooks.HookContext(task_ids=None, rng=rng, deterministic=deterministic,
                                     params={k: jnp.asarray(v) for k, v in flat.items()}, base={})


def _ln(x, eps=lib.LN_EPS):
    x = np.asarray(x, np.float64)
    return (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + eps)


def _np_topk(logits, k):
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    out = np.zeros_like(p)
    idx = np.argsort(-p, axis=-1)[..., :k]
    np.put_along_axis(out, idx, np.take_along_axis(p, idx, -1), -1)
    return out / out.sum(-1, keepdims=True)


# --------------------------------------------------------------------------- ScaLearn

def test_scalearn_one_adapter_omega_one_equals_merged_lora(data_dir):
    c = per_layer_config(data_dir)
    model, shapes = _model_and_shapes(c)
    base = _values(shapes, 0, scale=0.1)
    lora, lora_params, cfg = _lora(base, "attn/(q|o)|mlp/wo", rank=3, seed=1)
    sl = lib.ScaLearn("attn/(q|o)|mlp/wo", num_library=1)
    ad = nn.unbox(sl.init(jax.random.PRNGKey(0), base, library=[lora_params], library_configs=[cfg]))
    ad["omega"] = jax.tree.map(np.ones_like, ad["omega"])
    tokens = jnp.asarray(np.random.default_rng(0).integers(2, 258, (2, 8)))

    @jax.jit
    def hooked(base_v, ad):
        with adapter_hooks.bind(sl, base_v, ad):
            return model.apply({"params": sl.merge(base_v, ad)}, tokens)[0]
    apply = jax.jit(lambda p: model.apply({"params": p}, tokens)[0])
    base_v = nn.unbox(base)
    want = apply(lora.merge(base_v, lora_params))
    np.testing.assert_allclose(hooked(base_v, ad), want, rtol=2e-4, atol=2e-4)
    assert not np.allclose(apply(base_v), want, atol=1e-3)   # the LoRA acts
    # The library's factors are the LoRA's, flattened to [K, I, R] / [K, R, O].
    np.testing.assert_array_equal(ad["library"]["layer0"]["attn"]["o"]["lora_a"][0],
                                  lora_params["layer0"]["attn"]["o"]["lora_a"].reshape(-1, 3))


def test_scalearn_counts_equal_peft_formulas(data_dir):
    c = per_layer_config(data_dir)
    m = c.model
    _, params = _model_and_shapes(c)
    targets, k = "attn/(q|v)|mlp/wo", 3
    outs = {"attn/q": m.num_heads * m.head_dim, "attn/v": m.num_kv_heads * m.head_dim, "mlp/wo": m.d_model}
    n = m.num_layers
    want = {(False, False): sum(n * k * o for o in outs.values()),   # ScaLearn  L·K·d
            (True, False): len(outs) * n * k,                        # Uniform   L·K
            (False, True): sum(k * o for o in outs.values()),        # ++        K·d
            (True, True): len(outs) * k}                             # Uniform++ K
    library = [_lora(params, targets, 2, seed)[1:] for seed in range(k)]
    for (uniform, shared), count in want.items():
        sl = lib.ScaLearn(targets, num_library=k, uniform=uniform, shared=shared)
        init = nn.unbox(jax.eval_shape(lambda: sl.init(jax.random.PRNGKey(0), params, library=[p for p, _ in library],
                                                       library_configs=[cf for _, cf in library])))
        assert sl.count(params) == count == adapters.num_params(init["omega"]), (uniform, shared)
        groups = jax.tree.leaves(sl.param_groups(init))
        sizes = [math.prod(x.shape) for x in jax.tree.leaves(init)]
        assert sum(s for s, g in zip(sizes, groups) if g == "trained") == count


def test_scalearn_init_and_dropout_on_omega():
    params = {"layer0": {"attn": {"q": nn.LogicallyPartitioned(np.zeros((16, 2, 4), np.float32),
                                                               ("embed", "heads", "head_dim"))}}}
    library = [_lora(params, "attn/q", 2, seed) for seed in range(4)]
    sl = lib.ScaLearn("attn/q", num_library=4, dropout=0.5)
    ad = nn.unbox(sl.init(jax.random.PRNGKey(3), params, library=[p for _, p, _ in library],
                          library_configs=[cf for _, _, cf in library]))
    omega = np.asarray(ad["omega"]["layer0"]["attn"]["q"])
    assert omega.shape == (4, 8)
    assert abs(omega.mean() - 2 / 4) < 1e-3 and 0 < omega.std() < 3e-3      # N(2/K, 0.001)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 3, 16)), jnp.float32)
    y = jnp.zeros((2, 3, 8))
    a = lib.library_outputs(x, *(ad["library"]["layer0"]["attn"]["q"][n] for n in ("lora_a", "lora_b")),
                            ad["library_scale"])
    # Eval: deterministic, Σ_k ω_k ⊙ a_k.
    got = sl.hook_delta("layer0/attn/q", x, y, _ctx(ad))
    np.testing.assert_allclose(got, np.einsum("bsko,ko->bso", a, omega), rtol=1e-5, atol=1e-6)
    # Train: each ω entry dropped or scaled by 1/(1 - p), the same for every token; solve
    # delta[:, o] = a[:, :, o] @ ω_eff[:, o] (6 tokens, K = 4 unknowns) for ω_eff.
    train = sl.hook_delta("layer0/attn/q", x, y, _ctx(ad, deterministic=False, rng=jax.random.PRNGKey(1)))
    a6, t6 = np.asarray(a).reshape(6, 4, 8), np.asarray(train).reshape(6, 8)
    eff = np.stack([np.linalg.lstsq(a6[:, :, o], t6[:, o], rcond=None)[0] for o in range(8)], axis=1)
    dropped, kept = np.isclose(eff, 0, atol=1e-4), np.isclose(eff, 2 * omega, rtol=1e-3)
    assert np.all(dropped | kept) and dropped.any() and kept.any()
    assert not np.allclose(train, got)


def test_scalearn_shared_omega_acts_in_every_layer():
    """Uniform++: one ω [K] for the type ``attn/q``, used by both layers' q."""
    params = {f"layer{i}": {"attn": {"q": nn.LogicallyPartitioned(np.zeros((16, 2, 4), np.float32),
                                                                  ("embed", "heads", "head_dim"))}} for i in range(2)}
    library = [_lora(params, "attn/q", 2, seed) for seed in range(2)]
    sl = lib.ScaLearn("attn/q", num_library=2, uniform=True, shared=True)
    ad = nn.unbox(sl.init(jax.random.PRNGKey(0), params, library=[p for _, p, _ in library],
                          library_configs=[cf for _, _, cf in library]))
    assert set(adapters.flat_params(ad["omega"])) == {"attn/q"}
    ad["omega"]["attn"]["q"] = np.asarray([0.5, -2.0], np.float32)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 3, 16)), jnp.float32)
    for layer in ("layer0", "layer1"):
        node = ad["library"][layer]["attn"]["q"]
        a = lib.library_outputs(x, node["lora_a"], node["lora_b"], ad["library_scale"])
        np.testing.assert_allclose(sl.hook_delta(f"{layer}/attn/q", x, None, _ctx(ad)),
                                   0.5 * a[:, :, 0] - 2.0 * a[:, :, 1], rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- PHATGOOSE, GLIDER

def _gate_entry(params, targets, rank, seed, gate_scale=1.0):
    """A phatgoose_gate run's params (LoRA + random gates) and config, from numpy values."""
    _, lora_params, cfg = _lora(params, targets, rank, seed)
    pg = pg_lib.PhatgooseGate(targets, num_library=1)
    ad = nn.unbox(pg.init(jax.random.PRNGKey(0), params, library=[lora_params], library_configs=[cfg]))
    rng = np.random.default_rng(100 + seed)
    ad["gate"] = jax.tree.map(lambda g: (gate_scale * rng.standard_normal(g.shape)).astype(np.float32), ad["gate"])
    return jax.tree.map(np.asarray, ad), {"method": "phatgoose_gate", "targets": targets}


_Q = {"layer0": {"attn": {"q": nn.LogicallyPartitioned(np.zeros((16, 2, 4), np.float32),
                                                       ("embed", "heads", "head_dim"))}}}


def test_phatgoose_gate_scales_lora_input_by_sigmoid():
    _, lora_params, cfg = _lora(_Q, "attn/q", 2, 0)
    pg = pg_lib.PhatgooseGate("attn/q", num_library=1)
    ad = nn.unbox(pg.init(jax.random.PRNGKey(0), _Q, library=[lora_params], library_configs=[cfg]))
    assert pg.count(_Q) == 16 and not np.any(ad["gate"]["layer0"]["attn"]["q"])   # v = 0 at init
    x = np.random.default_rng(0).standard_normal((2, 3, 16)).astype(np.float32)
    a, b = lora_params["layer0"]["attn"]["q"]["lora_a"], lora_params["layer0"]["attn"]["q"]["lora_b"].reshape(2, 8)
    v = np.random.default_rng(1).standard_normal(16).astype(np.float32)
    ad["gate"]["layer0"]["attn"]["q"] = v
    want = (x * (1 / (1 + np.exp(-(x @ v))))[..., None]) @ a @ b * pg_scale(cfg)
    np.testing.assert_allclose(pg.hook_delta("layer0/attn/q", jnp.asarray(x), None, _ctx(ad)), want,
                               rtol=1e-4, atol=1e-5)
    # From init.adapter_from (no library config): the scale is this run's alpha / rank.
    prev = nn.unbox(pg_lib.PhatgooseGate("attn/q", num_library=1, rank=2, alpha=6.0).init(
        jax.random.PRNGKey(0), _Q, previous=lora_params))
    np.testing.assert_allclose(prev["library_scale"], [3.0])
    np.testing.assert_array_equal(prev["library"]["layer0"]["attn"]["q"]["lora_a"],
                                  ad["library"]["layer0"]["attn"]["q"]["lora_a"])


def pg_scale(cfg):
    return cfg["alpha"] / cfg["rank"]


def test_phatgoose_routes_to_aligned_gate_and_matches_dense_reference():
    k = 4
    entries = [_gate_entry(_Q, "attn/q", 2 + i % 2, i) for i in range(k)]   # ranks 2 and 3: zero-padded
    ph = pg_lib.Phatgoose("attn/q", num_library=k, top_k=2)
    ad = nn.unbox(ph.init(jax.random.PRNGKey(0), _Q, library=[p for p, _ in entries],
                          library_configs=[cf for _, cf in entries]))
    assert ph.count(_Q) == 0
    x = np.random.default_rng(5).standard_normal((2, 3, 16)).astype(np.float32)
    # Expert 2's gate = the normalised input of token (1, 2), scaled: that token picks it first.
    gates = np.asarray(ad["library_gate"]["layer0"]["attn"]["q"]).copy()
    gates[2] = 10.0 * _ln(x[1, 2])
    ad["library_gate"]["layer0"]["attn"]["q"] = gates
    ctx = _ctx(ad)
    w = np.asarray(ph.weights("layer0/attn/q", jnp.asarray(x), ctx))
    scores = np.einsum("bsi,ki->bsk", _ln(x), _ln(gates)) / np.sqrt(16)
    assert np.argmax(scores[1, 2]) == 2 and np.argmax(w[1, 2]) == 2
    ref = _np_topk(scores, 2)
    np.testing.assert_allclose(w, ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-6)
    assert np.all((w > 0).sum(-1) == 2)
    # Output: Σ_topk p_k s_k (u A_k) B_k against each entry's own LoRA, in numpy.
    outs = np.stack([(x @ e["library"]["layer0"]["attn"]["q"]["lora_a"][0] @ e["library"]["layer0"]["attn"]["q"][
        "lora_b"][0]) * e["library_scale"][0] for e, _ in entries], axis=2)       # [B, S, K, O]
    np.testing.assert_allclose(ph.hook_delta("layer0/attn/q", jnp.asarray(x), None, ctx),
                               np.einsum("bsk,bsko->bso", ref, outs), rtol=1e-4, atol=1e-5)


def test_glider_logits_reference_and_large_lambda_is_retrieval():
    k = 3
    entries = [_gate_entry(_Q, "attn/q", 2, i) for i in range(k)]
    sims = (0.2, 0.9, 0.5)
    gl = pg_lib.Glider("attn/q", num_library=k, task_similarity=sims, lam=3.0, top_k=2)
    ad = nn.unbox(gl.init(jax.random.PRNGKey(0), _Q, library=[p for p, _ in entries],
                          library_configs=[cf for _, cf in entries]))
    # The authors' local router: lora_gate rows = LN(v_k) (normalised once, at load), the
    # input normalised in the forward: logits_k = LN(u)·LN(v_k)/√I + λ g_k.
    gates = np.stack([e["gate"]["layer0"]["attn"]["q"] for e, _ in entries])        # [a, I], raw
    router = np.asarray(ad["router"]["layer0"]["attn"]["q"])
    np.testing.assert_allclose(router.T, _ln(gates), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(router.mean(0), 0.0, atol=1e-5)                      # each column zero-mean,
    np.testing.assert_allclose(router.var(0), 1.0, rtol=1e-3)                       # unit variance
    assert gl.count(_Q) == 0 and set(jax.tree.leaves(gl.param_groups(ad))) == {"frozen"}
    trained = pg_lib.Glider("attn/q", num_library=k, task_similarity=sims, train_router=True)
    assert trained.count(_Q) == 16 * k and trained.param_groups(ad)["router"]["layer0"]["attn"]["q"] == "trained"
    x = np.random.default_rng(7).standard_normal((2, 5, 16)).astype(np.float32)
    logits = np.einsum("bsi,ki->bsk", _ln(x), _ln(gates)) / np.sqrt(16) + 3.0 * np.asarray(sims)
    w = np.asarray(gl.weights("layer0/attn/q", jnp.asarray(x), _ctx(ad)))
    np.testing.assert_allclose(w, _np_topk(logits, 2), rtol=1e-5, atol=1e-6)
    # Scaling a gate does not change the routing (it is normalised); feeding it raw would.
    big = [({**e, "gate": jax.tree.map(lambda g: 50.0 * g, e["gate"])} if i == 0 else e, cf)
           for i, (e, cf) in enumerate(entries)]
    ad_big = nn.unbox(gl.init(jax.random.PRNGKey(0), _Q, library=[p for p, _ in big],
                              library_configs=[cf for _, cf in big]))
    np.testing.assert_allclose(gl.weights("layer0/attn/q", jnp.asarray(x), _ctx(ad_big)), w, rtol=1e-5, atol=1e-6)
    # λ huge: every token's weight goes to argmax g (near-hard retrieval, the card's pitfall).
    hard = pg_lib.Glider("attn/q", num_library=k, task_similarity=sims, lam=1e4, top_k=2)
    w = np.asarray(hard.weights("layer0/attn/q", jnp.asarray(x), _ctx(ad)))
    np.testing.assert_allclose(w[..., 1], 1.0, atol=1e-6)
    # A plain LoRA entry has no gate: its local-router column is zero.
    _, lora_params, cfg = _lora(_Q, "attn/q", 2, 9)
    mixed = nn.unbox(gl.init(jax.random.PRNGKey(0), _Q, library=[entries[0][0], lora_params, entries[2][0]],
                             library_configs=[entries[0][1], cfg, entries[2][1]]))
    router = np.asarray(mixed["router"]["layer0"]["attn"]["q"])
    assert not np.any(router[:, 1]) and np.all(np.any(router[:, [0, 2]], axis=0))


def test_library_entries_with_different_targets_and_ranks():
    params = {"layer0": {"attn": {n: nn.LogicallyPartitioned(np.zeros((16, 2, 4), np.float32),
                                                             ("embed", "heads", "head_dim")) for n in "qv"}}}
    _, qv, cq = _lora(params, "attn/(q|v)", 2, 0)
    _, q, cv = _lora(params, "attn/q", 4, 1)
    factors, scale, _, _ = lib.read_library("scalearn", adapters.select_targets(params, "attn/(q|v)"), [qv, q], [cq, cv])
    a, b = factors["layer0/attn/v"]                      # only entry 0 adapts v: entry 1 is zeros there
    assert a.shape == (2, 16, 2) and b.shape == (2, 2, 8) and not np.any(a[1]) and not np.any(b[1])
    a, b = factors["layer0/attn/q"]                      # ranks 2 and 4: entry 0 zero-padded to 4
    assert a.shape == (2, 16, 4) and not np.any(a[0][:, 2:]) and not np.any(b[0][2:])
    np.testing.assert_array_equal(a[1], q["layer0"]["attn"]["q"]["lora_a"].reshape(16, 4))
    np.testing.assert_allclose(scale, [cq["alpha"] / 2, cv["alpha"] / 4])
    with pytest.raises(ValueError, match=r"^adapter.targets selects 'layer0/attn/v', which no adapter.library"):
        lib.read_library("scalearn", adapters.select_targets(params, "attn/(q|v)"), [q], [cv])
    with pytest.raises(ValueError, match=r"^adapter.library\[1\] adapts none of adapter.targets"):
        lib.read_library("scalearn", adapters.select_targets(params, "attn/v"), [qv, q], [cq, cv])


def test_errors(data_dir, tmp_path):
    def cfg(method, **kw):
        return per_layer_config(data_dir, **{"adapter.method": method, "adapter.targets": "attn/q",
                                        **{f"adapter.{k}": v for k, v in kw.items()}})
    for method in ("scalearn", "phatgoose", "glider"):
        with pytest.raises(config_check.ConfigError, match=rf"^adapter.method='{method}' needs adapter.library: "):
            config_check.validate(cfg(method))
    with pytest.raises(config_check.ConfigError, match=r"^adapter.glider_task_similarity has 1 values; it needs one "
                                                       r"per adapter.library entry \(2\)"):
        config_check.validate(cfg("glider", library="/a,/b", glider_task_similarity="0.5"))
    with pytest.raises(config_check.ConfigError, match=r"^adapter.method='phatgoose_gate' trains the gate of ONE"):
        config_check.validate(cfg("phatgoose_gate", library="/a,/b"))
    with pytest.raises(config_check.ConfigError, match=r"^adapter.scalearn_dropout=1.0 must be in \[0, 1\)"):
        config_check.validate(cfg("scalearn", library="/a", scalearn_dropout=1.0))
    runs = [tmp_path / "a", tmp_path / "b"]
    for run in runs:   # what config_check looks for in a library workdir
        os.makedirs(run / "adapter")
        (run / "adapter" / "adapter.json").write_text("{}")
    config_check.validate(cfg("glider", library=",".join(map(str, runs)), glider_task_similarity="0.5, 0.1"))
    config_check.validate(cfg("phatgoose_gate"))     # the LoRA may come from init.adapter_from
    # A library entry that is not a LoRA adapter: one line with what is allowed.
    _, lora_params, lcfg = _lora(_Q, "attn/q", 2, 0)
    sl = lib.ScaLearn("attn/q", num_library=1)
    with pytest.raises(ValueError, match=r"^adapter.library\[0\] is a 'mos' run; adapter.method='scalearn' combines "
                                         r"LoRA adapters only; allowed library entries: lora, phatgoose_gate$"):
        sl.init(jax.random.PRNGKey(0), _Q, library=[lora_params], library_configs=[{"method": "mos"}])
    with pytest.raises(ValueError, match=r"^adapter.method='phatgoose' routes by gate vectors: adapter.library\[0\] "
                                         r"is a 'lora' run; allowed: phatgoose_gate runs"):
        pg_lib.Phatgoose("attn/q", num_library=1).init(jax.random.PRNGKey(0), _Q, library=[lora_params],
                                                    library_configs=[lcfg])
    with pytest.raises(ValueError, match=r"^adapter.method='phatgoose_gate' needs the LoRA whose gate it trains"):
        pg_lib.PhatgooseGate("attn/q", num_library=1).init(jax.random.PRNGKey(0), _Q)
    with pytest.raises(ValueError, match=r"^init.adapter_from's LoRA has rank \[2\], but adapter.rank=8"):
        pg_lib.PhatgooseGate("attn/q", num_library=1, rank=8).init(jax.random.PRNGKey(0), _Q, previous=lora_params)


def test_task_similarity_of_the_base_model(data_dir):
    c = per_layer_config(data_dir)
    model, shapes = _model_and_shapes(c)
    base = _values(shapes, 0, scale=0.2)
    rng = np.random.default_rng(0)
    low = [rng.integers(2, 40, (2, 8))]
    low.append(low[0].copy())
    low[1][1, 3] = 7                                               # nearly the same task
    high = [rng.integers(200, 258, (2, 8))]                        # another task
    g = pg_lib.task_similarity(model, base, low[:1], [low[1:], high, low[:1]])
    assert g.shape == (3,) and np.isclose(g[2], 1.0, atol=1e-5)    # the task itself: cosine 1
    assert g[0] > g[1]                                             # the same kind of tokens is closer
    # weights mask tokens out: all-but-one masked equals that token's hidden state alone.
    e_masked = pg_lib.task_embedding(model, base, [{"inputs": low[0], "weights": np.eye(1, 16).reshape(2, 8)}])
    e_first = pg_lib.task_embedding(model, base, [low[0][:1, :1]])
    np.testing.assert_allclose(e_masked, e_first, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- end to end

def _run(data_dir, workdir, steps, lr=None, **adapter):
    c = per_layer_config(data_dir, **{"train.steps": steps, "train.eval_every": steps, "train.eval_steps": 1,
                                 "checkpoint.every": steps, **{f"adapter.{k}": v for k, v in adapter.items()}})
    c.optimizer.warmup_steps = 0   # every step at the peak rate: one step moves what trains
    if lr is not None:
        c.optimizer.learning_rate = lr
    config_check.validate(c)
    out = train_lib.train_and_evaluate(c, workdir)
    return c, out


def _saved(workdir):
    params, meta = train_lib.read_adapter_dir(os.path.join(workdir, "adapter"))
    return params, meta


def test_library_runs_end_to_end(data_dir, tmp_path):
    """Two tiny LoRA runs; ScaLearn over both (library bit-identical, not in the optimizer
    state, omega trains); PHATGOOSE gates on one; PHATGOOSE routing over two gate runs,
    whose steps change nothing, and its saved adapter used for inference via bind."""
    wd = {n: str(tmp_path / n) for n in ("lora1", "lora2", "scalearn", "gate", "phatgoose")}
    targets = "attn/(q|v)"
    _run(data_dir, wd["lora1"], 1, method="lora", targets=targets, rank=2)
    # The second library run, written without training (to save time): another rank, fewer targets.
    lora1, meta1 = _saved(wd["lora1"])
    c1 = per_layer_config(data_dir, **{"adapter.method": "lora", "adapter.targets": "attn/q", "adapter.rank": 4})
    lora2 = _lora(_model_and_shapes(c1)[1], "attn/q", 4, seed=3)[1]
    train_lib.save_adapter(os.path.join(wd["lora2"], "adapter"), lora2,
                           {**{k: v for k, v in meta1.items() if k != "directory"}, "adapter": c1.adapter.to_dict()}, 1)
    loras = [lora1, _saved(wd["lora2"])[0]]

    c, out = _run(data_dir, wd["scalearn"], 2, method="scalearn", targets=targets,
                  library=f"{wd['lora1']},{wd['lora2']}", lr=0.1)
    assert math.isfinite(out["eval_loss"])
    sl, meta = adapters.from_config(c.adapter), _saved(wd["scalearn"])[1]
    _, shapes = _model_and_shapes(c)
    assert meta["params_trainable"] == sl.count(shapes) == 2 * c.model.num_layers * (
        c.model.num_heads + c.model.num_kv_heads) * c.model.head_dim
    # The library inside the trained state is the LoRA runs' factors, bit for bit; omega moved.
    mesh, rules = train_lib.mesh_and_rules(c)
    import orbax.checkpoint as ocp
    trained = ocp.StandardCheckpointer().restore(os.path.join(wd["scalearn"], "checkpoints", "2", "state"))
    lib_params, omega = trained["params"]["library"], trained["params"]["omega"]
    for path in ("layer0/attn/q", "layer1/attn/v"):
        node = lambda t: t[path.split("/")[0]]["attn"][path.split("/")[2]]   # noqa: E731
        a_src = node(loras[0])["lora_a"]
        np.testing.assert_array_equal(node(lib_params)["lora_a"][0][:, :2], a_src.reshape(-1, 2))
        np.testing.assert_array_equal(node(lib_params)["lora_b"][0][:2], node(loras[0])["lora_b"].reshape(2, -1))
    np.testing.assert_array_equal(lib_params["layer0"]["attn"]["q"]["lora_a"][1],
                                  loras[1]["layer0"]["attn"]["q"]["lora_a"].reshape(-1, 4))
    assert not np.any(lib_params["layer0"]["attn"]["v"]["lora_a"][1])          # lora2 has no v: zeros
    assert abs(float(np.mean(omega["layer0"]["attn"]["q"])) - 1.0) > 1e-3      # moved off N(2/K=1, 0.001)
    # Optimizer state: only omega-shaped leaves (no library leaf has a moment).
    n_omega = sum(x.size for x in jax.tree.leaves(omega))
    mu_sizes = [x.size for x in jax.tree.leaves(trained["opt_state"]) if x.size > 1]
    assert sum(mu_sizes) == 2 * n_omega

    # PHATGOOSE stage 1 on lora1: gates train, the LoRA stays.
    c, _ = _run(data_dir, wd["gate"], 1, method="phatgoose_gate", targets=targets, library=wd["lora1"],
                lr=0.05)
    gate_params, meta = _saved(wd["gate"])
    assert meta["params_trainable"] == 2 * 2 * c.model.d_model
    assert float(np.abs(gate_params["gate"]["layer1"]["attn"]["v"]).max()) > 0
    np.testing.assert_array_equal(gate_params["library"]["layer1"]["attn"]["v"]["lora_b"][0],
                                  loras[0]["layer1"]["attn"]["v"]["lora_b"].reshape(2, -1))

    # PHATGOOSE stage 2 over two gate runs (the same one twice): nothing trains, so the
    # step changes nothing and the evals at step 0 and 1 agree.
    c, out = _run(data_dir, wd["phatgoose"], 1, method="phatgoose", targets=targets,
                  library=f"{wd['gate']},{wd['gate']}")
    records = [json.loads(line) for line in open(os.path.join(wd["phatgoose"], "metrics.jsonl"))]
    evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    assert len(evals) == 2 and evals[0] == evals[1] and records[0]["params_trainable"] == 0
    # Inference: load the saved adapter and bind it around the base model.
    model = zoo.build(c.model)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        tx, _ = train_lib.optimizer_for(c, adapters.from_config(c.adapter))
        _, _, setup = train_lib.adapter_state_shardings(model, tx, c, mesh, rules, adapters.from_config(c.adapter),
                                                        train_lib.adapter_sources(c))
        base = train_lib.load_base(model, c, setup, mesh, rules)
    method, params, _ = train_lib.load_adapter(os.path.join(wd["phatgoose"], "adapter"), base)
    assert isinstance(method, pg_lib.Phatgoose) and method.num_library == 2
    tokens = jnp.asarray(np.random.default_rng(0).integers(2, 258, (2, 8)))

    @jax.jit
    def logits(base, params):
        with adapter_hooks.bind(method, base, params):
            return model.apply({"params": base}, tokens)[0]
    plain = jax.jit(lambda b: model.apply({"params": b}, tokens)[0])(base)
    routed = logits(base, params)
    assert np.all(np.isfinite(routed)) and not np.allclose(routed, plain, atol=1e-6)
