"""Adapters (layers/adapters/base.py) and their training path: LoRA, MoS and Hydra parameter
counts against the papers' formulas, MoS == LoRA with private shards only, MoS index
buffers, merged == unmerged, frozen base bit-identical, only adapter parameters in the
optimizer state, the adapter checkpoint and its base fingerprint, and the errors."""

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from conftest import per_layer_config, random_adapter, tiny_config
from routezoo import zoo
from routezoo.layers import adapters
from routezoo.layers.mlp import MLP
from routezoo.zoo import stack
from routezoo.training import config_check
from routezoo.training.optim import make_optimizer
from routezoo.training import train as train_lib


def _boxed_params(c):
    model = zoo.build(c.model)
    tokens = jnp.zeros((1, 8), jnp.int32)
    return model, jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), tokens))["params"]


def test_lora_counts_equal_peft_formula(data_dir):
    c = per_layer_config(data_dir)
    m = c.model
    _, params = _boxed_params(c)
    lora = adapters.LoRA("attn/(q|v|o)|mlp/.*", rank=4)
    d, h, g, k, f = m.d_model, m.num_heads, m.num_kv_heads, m.head_dim, m.mlp_dim
    per_layer = (d + h * k) + (d + g * k) + (h * k + d) + 2 * (d + f) + (f + d)   # q v o wi wg wo
    want = m.num_layers * 4 * per_layer                                             # r (d_in + d_out)
    init = jax.eval_shape(lambda: lora.init(jax.random.PRNGKey(0), params))
    assert lora.count(params) == want == adapters.num_params(init)
    # A [I.., R], B [R, O..]: the attention output projection reads H·K.
    o = nn.unbox(init)["layer0"]["attn"]["o"]
    assert o["lora_a"].shape == (h, k, 4) and o["lora_b"].shape == (4, d)


def test_lora_counts_per_expert(data_dir):
    c = per_layer_config(data_dir, **{"model.ffn": "moe"})
    _, params = _boxed_params(c)
    lora = adapters.LoRA("experts/(wi|wo)", rank=2)
    e, d, fe = c.model.moe.num_experts, c.model.d_model, c.model.moe.expert_dim
    assert lora.count(params) == c.model.num_layers * 2 * e * 2 * (d + fe)
    init = nn.unbox(jax.eval_shape(lambda: lora.init(jax.random.PRNGKey(0), params)))
    assert init["layer0"]["moe"]["experts"]["wi"]["lora_a"].shape == (e, d, 2)
    assert init["layer0"]["moe"]["experts"]["wo"]["lora_b"].shape == (e, 2, d)


def test_rslora_scale():
    assert adapters.LoRA("x", rank=16, alpha=16.0).scale == 1.0
    assert adapters.LoRA("x", rank=16, alpha=16.0, rslora=True).scale == 4.0


def _nonzero_adapter(lora, params, seed=1):
    ad = nn.unbox(lora.init(jax.random.PRNGKey(seed), params))
    key = jax.random.PRNGKey(seed + 1)
    return jax.tree.map(lambda x: x + 0.1 * jax.random.normal(jax.random.fold_in(key, x.size), x.shape), ad)


@pytest.mark.parametrize("mlp_type", ["swiglu", "gelu"])
def test_mlp_merged_equals_unmerged_low_rank_path(mlp_type):
    """Merged weights through MLP == an explicit x·W + s·(x·A)·B activation path."""
    mlp = MLP(hidden_dim=24, mlp_type=mlp_type)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 16))
    params = mlp.init(jax.random.PRNGKey(1), x)["params"]
    lora = adapters.LoRA(".*", rank=3, alpha=6.0)
    ad = _nonzero_adapter(lora, params)
    merged = mlp.apply({"params": lora.merge(params, ad)}, x)

    p, s = nn.unbox(params), lora.scale
    lin = lambda v, name: adapters.lora_dense(v, p[name], ad[name]["lora_a"], ad[name]["lora_b"], s)
    hid = lin(x, "wi")
    hid = nn.silu(lin(x, "wg")) * hid if mlp_type == "swiglu" else nn.gelu(hid)
    unmerged = lin(hid, "wo")
    np.testing.assert_allclose(merged, unmerged, rtol=2e-5, atol=2e-5)
    assert not np.allclose(merged, mlp.apply({"params": params}, x), atol=1e-3)   # the adapter acts


def test_attention_output_projection_merged_equals_unmerged():
    w = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 8))          # o [H, K, D]
    heads = jax.random.normal(jax.random.PRNGKey(1), (3, 5, 2, 4))    # [B, L, H, K]
    lora = adapters.LoRA(".*", rank=2, alpha=4.0)
    params = {"o": nn.LogicallyPartitioned(w, ("heads", "head_dim", "embed"))}
    ad = _nonzero_adapter(lora, params)
    merged = jnp.einsum("BLHK,HKD->BLD", heads, lora.merge(params, ad)["o"])
    unmerged = adapters.lora_dense(heads, w, ad["o"]["lora_a"], ad["o"]["lora_b"], lora.scale, num_in=2)
    np.testing.assert_allclose(merged, unmerged, rtol=2e-5, atol=2e-5)


def test_target_matching_nothing_lists_paths(data_dir):
    _, params = _boxed_params(per_layer_config(data_dir))
    with pytest.raises(ValueError, match=r"matches no adaptable parameter.*layer\*/attn/q.*layer\*/mlp/wo"):
        adapters.select_targets(params, "attn/nope")
    chosen = adapters.select_targets(params, "attn/(q|v)")
    assert sorted(chosen) == ["layer0/attn/q", "layer0/attn/v", "layer1/attn/q", "layer1/attn/v"]


def test_unknown_method_and_empty_targets(data_dir):
    c = per_layer_config(data_dir, **{"adapter.method": "nope", "adapter.targets": "attn/q"})
    allowed = ", ".join(sorted(adapters.METHODS))
    assert allowed.startswith("dora, glider, hydra, lora, mhr, mhr_mu, mhr_z, mos, multi_lora, phatgoose")
    with pytest.raises(config_check.ConfigError, match=f"unknown adapter.method 'nope'; allowed: {allowed}$"):
        config_check.validate(c)
    with pytest.raises(ValueError, match=f"allowed: {allowed}$"):
        adapters.from_config(c.adapter)
    c = per_layer_config(data_dir, **{"adapter.method": "lora"})
    with pytest.raises(config_check.ConfigError, match="adapter.targets"):
        config_check.validate(c)
    config_check.validate(per_layer_config(data_dir, **{"adapter.method": "lora", "adapter.targets": "attn/q"}))


def test_cli_accepts_init_from(tmp_path):
    from routezoo.training import cli
    config, _, _ = cli.parse_train_flags(["--config.init.from=/some/run", "--config.adapter.method=lora",
                                          f"--workdir={tmp_path}"])
    assert config.init.from_workdir == "/some/run" and config.adapter.method == "lora"


_METHOD_KEYS = {"lora": {}, "hydra": {"adapter.rank": 2, "adapter.hydra_seq_rank": 2},
               "mos": {"adapter.rank": 4, "adapter.mos_equiv_rank": 3, "adapter.mos_shards_per_vector": 2,
                       "adapter.lora_dropout": 0.1}}   # MoS with dropout: the activation path in training


@pytest.mark.parametrize("method", sorted(_METHOD_KEYS))
def test_train_step_freezes_base_and_optimizes_adapter_only(data_dir, method):
    c = per_layer_config(data_dir, **{"adapter.method": method, "adapter.targets": "attn/(q|v)", **_METHOD_KEYS[method]})
    mesh, rules = train_lib.mesh_and_rules(c)
    model = zoo.build(c.model)
    lora = adapters.from_config(c.adapter)
    tx, schedule = make_optimizer(c.optimizer, c.train.steps)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        abstract, shardings, setup = train_lib.adapter_state_shardings(model, tx, c, mesh, rules, lora)
        base = train_lib.load_base(model, c, setup, mesh, rules)
        before = jax.tree.map(np.array, base)
        state = train_lib.create_adapter_state(model, tx, c, shardings, setup)
        init = jax.tree.map(np.array, state.params)
        step = jax.jit(train_lib.make_train_step(model, tx, c, schedule, lora))
        rng = np.random.default_rng(0)
        for _ in range(3):
            ids = rng.integers(2, 258, (8, c.data.seq_len + 1))
            batch = {"inputs": jnp.asarray(ids[:, :-1]), "targets": jnp.asarray(ids[:, 1:]),
                     "weights": jnp.ones((8, c.data.seq_len))}
            state, metrics = step(state, batch, base)
    # Base bit-identical; every adapter parameter moved (B away from its zero init).
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, np.asarray(b)), before, base)
    jax.tree.map(lambda a, b: np.testing.assert_array_less(0, np.abs(a - np.asarray(b)).max()), init, state.params)
    # The optimizer state holds adapter-shaped leaves only (no base weight shapes).
    adapter_paths = set(adapters.flat_params(state.params))
    mu = next(s for s in jax.tree_util.tree_leaves(state.opt_state, is_leaf=lambda x: hasattr(x, "mu"))
              if hasattr(s, "mu")).mu
    assert set(adapters.flat_params(mu)) == adapter_paths
    n_opt = sum(x.size for x in jax.tree_util.tree_leaves(state.opt_state))
    n_adapter = sum(x.size for x in jax.tree_util.tree_leaves(state.params))
    assert n_opt <= 2 * n_adapter + 16 < adapters.num_params(base)


def test_finetune_from_trained_base_saves_adapter_with_fingerprint(data_dir, tmp_path):
    base_wd, ft_wd = str(tmp_path / "base"), str(tmp_path / "ft")
    base_config = tiny_config(data_dir, **{"train.steps": 4})   # the base trains scanned (the default)
    assert stack.is_scanned(base_config.model)
    train_lib.train_and_evaluate(base_config, base_wd)
    c = tiny_config(data_dir, **{"train.steps": 4, "adapter.method": "lora", "adapter.targets": "attn/(q|v)|mlp/wo",
                                 "adapter.rank": 4, "adapter.rslora": True})
    c.init.from_workdir = base_wd
    out = train_lib.train_and_evaluate(c, ft_wd)
    assert math.isfinite(out["eval_loss"])

    meta = json.load(open(os.path.join(ft_wd, "adapter", "adapter.json")))
    m = c.model
    per_layer = (m.d_model + m.num_heads * m.head_dim) + (m.d_model + m.num_kv_heads * m.head_dim) \
        + (m.mlp_dim + m.d_model)
    assert meta["params_trainable"] == m.num_layers * 4 * per_layer
    assert meta["params_total"] == meta["params_trainable"] + meta["params_base"]
    first = json.loads(open(os.path.join(ft_wd, "metrics.jsonl")).readline())
    assert first["params_trainable"] == meta["params_trainable"]

    # The adapter run executed its base unscanned and recorded so.
    assert train_lib.read_workdir_config(ft_wd).model.scan_layers is False
    # The trained base restores bit-identical to what it was before fine-tuning, and
    # its fingerprint (in the per-layer layout) is the one stored with the adapter.
    mesh, rules = train_lib.mesh_and_rules(c)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        _, scanned_base = train_lib.restore_params(base_wd, mesh, rules)
        with pytest.raises(ValueError, match="scanned layer stack"):
            train_lib.load_adapter(os.path.join(ft_wd, "adapter"), scanned_base)
        base = stack.to_unscanned(scanned_base, base_config.model)
        assert adapters.fingerprint(base) == meta["base_fingerprint"]
        lora, ad, _ = train_lib.load_adapter(os.path.join(ft_wd, "adapter"), base)
        # Loaded adapter merged == the fine-tuned run's own merged parameters (load_trained).
        _, model, state = train_lib.load_trained(ft_wd)
        merged = lora.merge(base, ad)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6),
                     merged, state.params)
        other = jax.tree.map(lambda x: x + 1e-3, base)
        with pytest.raises(ValueError, match="belongs to base .* refusing"):
            train_lib.load_adapter(os.path.join(ft_wd, "adapter"), other)


# --------------------------------------------------------------------------- MoS

_random_adapter = random_adapter


_MOS = dict(rank=4, alpha=8.0, equiv_rank=3, private_rank=1, shards_per_vector=2)


def _stack_params(num_layers, shape=(8, 2, 4), names=("embed", "heads", "head_dim"), seed=0):
    """``{'layer<i>': {'attn': {'q': W}}}``, boxed, with real values."""
    key = jax.random.PRNGKey(seed)
    return {f"layer{i}": {"attn": {"q": nn.LogicallyPartitioned(
        jax.random.normal(jax.random.fold_in(key, i), shape), names)}} for i in range(num_layers)}


def test_mos_counts_equal_peft_formula(data_dir):
    c = per_layer_config(data_dir)
    m = c.model
    _, params = _boxed_params(c)
    mos = adapters.MoS("attn/(q|v)|mlp/wo", **_MOS)
    d, h, g, k, f = m.d_model, m.num_heads, m.num_kv_heads, m.head_dim, m.mlp_dim
    # Per type r_eq·L·(d_in + d_out) (= P·(d_in + d_out)/n): LoRA at rank r_eq.
    want = 3 * m.num_layers * ((d + h * k) + (d + g * k) + (f + d))
    init = nn.unbox(jax.eval_shape(lambda: mos.init(jax.random.PRNGKey(0), params)))
    assert mos.count(params) == want == adapters.num_params(init)
    assert want == adapters.LoRA("attn/(q|v)|mlp/wo", rank=3).count(params)
    # P = r_eq·L·n shards of d/n: one pool per projection type, no per-layer parameters.
    assert set(init) == {"mos"} and set(init["mos"]) == {"attn", "mlp"}
    assert init["mos"]["mlp"]["wo"]["a_pool"].shape == (3 * m.num_layers * 2, f // 2)
    assert init["mos"]["attn"]["v"]["b_pool"].shape == (3 * m.num_layers * 2, g * k // 2)


def test_mos_private_only_equals_lora_exactly():
    """r_pri = r_eq = r, n = 1: every layer's shards are its own, MoS == LoRA (bitwise)."""
    params = _stack_params(3)
    lora = adapters.LoRA("attn/q", rank=3, alpha=6.0)
    mos = adapters.MoS("attn/q", rank=3, alpha=6.0, equiv_rank=3, private_rank=3, shards_per_vector=1)
    ad = _random_adapter(lora, params)
    q = lambda i: ad[f"layer{i}"]["attn"]["q"]
    pools = {"mos": {"attn": {"q": {                       # layer i owns rows [3i, 3i+3)
        "a_pool": jnp.concatenate([q(i)["lora_a"].T for i in range(3)]),          # [P, D]
        "b_pool": jnp.concatenate([q(i)["lora_b"].reshape(3, 8) for i in range(3)])}}}}   # [P, H·K]
    assert jax.tree.map(jnp.shape, pools) == jax.tree.map(
        jnp.shape, nn.unbox(mos.init(jax.random.PRNGKey(0), params)))
    want, got = lora.merge(params, ad), mos.merge(params, pools)
    jax.tree.map(np.testing.assert_array_equal, got, want)
    assert not np.allclose(got["layer1"]["attn"]["q"], nn.unbox(params)["layer1"]["attn"]["q"], atol=1e-3)


def test_mos_factors_gather_shards_by_reference():
    """Vector sharding (n = 2): rank vector j of layer l is its n indexed shards concatenated,
    for every layer and both factors; the merge adds (alpha/r)·A·B."""
    params = _stack_params(4)
    mos = adapters.MoS("attn/q", **_MOS)
    pools = _random_adapter(mos, params)
    a_pool, b_pool = pools["mos"]["attn"]["q"]["a_pool"], pools["mos"]["attn"]["q"]["b_pool"]
    idx_a, idx_b = mos.indices("attn/q", 4)
    factors = mos.factors(params, pools)
    merged = mos.merge(params, pools)
    for layer in range(4):
        a, b = factors[f"layer{layer}/attn/q"]
        for j in range(4):
            np.testing.assert_array_equal(a[:, j], np.concatenate([a_pool[idx_a[layer, 2 * j + s]] for s in (0, 1)]))
            np.testing.assert_array_equal(b[j], np.concatenate([b_pool[idx_b[layer, 2 * j + s]] for s in (0, 1)]))
        w = nn.unbox(params)[f"layer{layer}"]["attn"]["q"]
        np.testing.assert_allclose(merged[f"layer{layer}"]["attn"]["q"],
                                   w + 2.0 * np.einsum("DR,RO->DO", a, b).reshape(8, 2, 4), rtol=1e-5, atol=1e-6)


def test_mos_index_buffers_strategies():
    layers, (r, r_pri, n) = 4, (4, 1, 2)
    mos = adapters.MoS("x", **_MOS)
    p, p_pub = mos.pool_size(layers)
    assert (p, p_pub) == (3 * layers * n, 2 * layers * n)
    ia, ib = mos.indices("attn/q", layers)
    assert ia.shape == ib.shape == (layers, r * n) and ia.dtype == np.int32
    pub = (r - r_pri) * n
    for idx in (ia, ib):
        for m in range(layers):   # public shards distinct and public; last r_pri·n private to layer m
            assert len(set(idx[m, :pub])) == pub and idx[m, :pub].max() < p_pub
            np.testing.assert_array_equal(idx[m, pub:], p_pub + np.arange(m * r_pri * n, (m + 1) * r_pri * n))
    assert len({tuple(row[:pub]) for row in ia}) == layers              # subset selection
    assert not np.array_equal(ia, ib)                                   # pair dissociation
    same = adapters.MoS("x", **_MOS, subset_selection=False).indices("attn/q", layers)[0]
    assert all(np.array_equal(same[0, :pub], row[:pub]) for row in same)
    tied = adapters.MoS("x", **_MOS, pair_dissociation=False).indices("attn/q", layers)
    np.testing.assert_array_equal(tied[0], tied[1])
    # Deterministic in (seed, type): a fresh object regenerates them; another seed does not.
    np.testing.assert_array_equal(adapters.MoS("y", **_MOS).indices("attn/q", layers)[0], ia)
    assert not np.array_equal(adapters.MoS("x", **_MOS, seed=1).indices("attn/q", layers)[0], ia)
    assert not np.array_equal(mos.indices("attn/k", layers)[0], ia)
    # Pinned values: the buffers are regenerated (not stored) when an adapter is loaded, so a
    # change of the generator would silently re-wire saved adapters.
    assert ia[0].tolist() == [10, 0, 12, 11, 1, 9, 16, 17] and ib[0].tolist() == [12, 13, 0, 1, 6, 8, 16, 17]
    assert ia[3].tolist() == [13, 1, 8, 10, 15, 7, 22, 23]


def test_mos_config_errors(data_dir):
    def cfg(**kw):
        return per_layer_config(data_dir, **{"adapter.method": "mos", "adapter.targets": "attn/q", "adapter.rank": 4,
                                        **{f"adapter.{k}": v for k, v in kw.items()}})
    with pytest.raises(config_check.ConfigError, match=r"^adapter.mos_private_rank=5 must be in \[0, min"):
        config_check.validate(cfg(mos_private_rank=5))
    with pytest.raises(config_check.ConfigError, match="adapter.rank=4 must equal 2"):
        config_check.validate(cfg(mos_private_rank=2, mos_equiv_rank=2))
    _, params = _boxed_params(cfg())
    with pytest.raises(ValueError, match="mos_shards_per_vector=3 must divide d_in=32"):
        adapters.from_config(cfg(mos_shards_per_vector=3).adapter).count(params)
    with pytest.raises(ValueError, match=r"adapter.rank=4 too large for 'attn/q'"):
        adapters.from_config(cfg().adapter).count(params)     # 4 - 1 > (2 - 1) * 2 layers
    config_check.validate(cfg(mos_equiv_rank=3))


def test_mos_trains_saves_and_restores_index_buffers(data_dir, tmp_path):
    """train_and_evaluate with mos: adapter.json keeps the seed, and load_adapter rebuilds
    the same method, whose regenerated index buffers equal the training run's."""
    c = per_layer_config(data_dir, **{"train.steps": 2, "train.eval_every": 2, "train.eval_steps": 1, "checkpoint.every": 2,
                                 "adapter.method": "mos", "adapter.targets": "attn/q|mlp/wo", "adapter.rank": 4,
                                 "adapter.mos_equiv_rank": 3, "adapter.mos_seed": 7})
    out = train_lib.train_and_evaluate(c, str(tmp_path))
    assert math.isfinite(out["eval_loss"])
    meta = json.load(open(os.path.join(tmp_path, "adapter", "adapter.json")))
    m = c.model
    assert meta["params_trainable"] == 3 * m.num_layers * ((m.d_model + m.num_heads * m.head_dim) + (m.mlp_dim + m.d_model))
    assert meta["adapter"]["mos_seed"] == 7
    mesh, rules = train_lib.mesh_and_rules(c)
    mos = adapters.from_config(c.adapter)
    model = zoo.build(c.model)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        tx, _ = make_optimizer(c.optimizer, c.train.steps)
        _, _, setup = train_lib.adapter_state_shardings(model, tx, c, mesh, rules, mos)
        base = train_lib.load_base(model, c, setup, mesh, rules)
        loaded, pools, _ = train_lib.load_adapter(os.path.join(tmp_path, "adapter"), base)
    assert loaded == mos   # the same hyper-parameters and seed, from adapter.json
    for kind in ("attn/q", "mlp/wo"):
        for got, want in zip(loaded.indices(kind, m.num_layers), mos.indices(kind, m.num_layers)):
            np.testing.assert_array_equal(got, want)
    # The saved pools are the trained ones (B moved off zero), shaped as a fresh init.
    assert jax.tree.map(np.shape, pools) == jax.tree.map(np.shape, nn.unbox(setup.adapter_boxed))
    assert float(np.abs(pools["mos"]["mlp"]["wo"]["b_pool"]).max()) > 0
    # The index buffers are saved beside the pools, and a loaded adapter uses the saved
    # ones (here swapped by hand, as another numpy's permutations would be).
    saved = train_lib.read_buffers(os.path.join(tmp_path, "adapter"))
    np.testing.assert_array_equal(saved["attn/q/I_A"], mos.indices("attn/q", m.num_layers)[0])
    swapped = {**saved, "attn/q/I_A": saved["attn/q/I_A"][::-1], "attn/q/I_B": saved["attn/q/I_B"][::-1]}
    np.savez(os.path.join(tmp_path, "adapter", "buffers.npz"), **{k.replace("/", "|"): v for k, v in swapped.items()})
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        again, _, _ = train_lib.load_adapter(os.path.join(tmp_path, "adapter"), base)
    np.testing.assert_array_equal(again.indices("attn/q", m.num_layers)[0], saved["attn/q/I_A"][::-1])
    fa = again.factors(nn.unbox(base), pools)["layer0/attn/q"][0]
    fm = mos.factors(nn.unbox(base), pools)["layer0/attn/q"][0]
    np.testing.assert_array_equal(fa, mos.factors(nn.unbox(base), pools)[f"layer{m.num_layers - 1}/attn/q"][0])
    assert not np.array_equal(fa, fm)


def test_mos_experts_and_unboxed_base():
    """Stacked experts: each expert matrix owns shards (M = L·E); merging into the unboxed
    base (as inside training, no logical names) equals merging into the boxed base, and for
    the attention output projection o [H, K, D] the input is H·K."""
    L, e, f, h, k, d = 2, 3, 8, 2, 4, 6
    key = jax.random.PRNGKey(0)
    params = {f"layer{i}": {
        "attn": {"o": nn.LogicallyPartitioned(jax.random.normal(jax.random.fold_in(key, i), (h, k, d)),
                                              ("heads", "head_dim", "embed"))},
        "moe": {"experts": {"wo": nn.LogicallyPartitioned(jax.random.normal(jax.random.fold_in(key, 9 + i), (e, f, d)),
                                                          ("expert", "expert_mlp", "embed"))}}} for i in range(L)}
    mos = adapters.MoS("attn/o|experts/wo", rank=2, alpha=4.0, equiv_rank=1, private_rank=0, shards_per_vector=2)
    assert mos.count(params) == L * ((h * k + d) + e * (f + d))
    pools = _random_adapter(mos, params)
    assert pools["mos"]["moe"]["experts"]["wo"]["a_pool"].shape == (L * e * 2, f // 2)
    assert pools["mos"]["attn"]["o"]["a_pool"].shape == (L * 2, h * k // 2)
    boxed, unboxed = mos.merge(params, pools), mos.merge(nn.unbox(params), pools)
    jax.tree.map(np.testing.assert_array_equal, boxed, unboxed)
    a, b = mos.factors(params, pools)["layer1/moe/experts/wo"]
    assert a.shape == (e, f, 2) and b.shape == (e, 2, d)
    w = nn.unbox(params)["layer1"]["moe"]["experts"]["wo"]
    np.testing.assert_allclose(boxed["layer1"]["moe"]["experts"]["wo"], w + 2.0 * np.einsum("EFR,ERD->EFD", a, b),
                               rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- Hydra

def test_hydra_counts_equal_peft_formula(data_dir):
    c = per_layer_config(data_dir, **{"model.ffn": "moe"})
    m = c.model
    _, params = _boxed_params(c)
    hydra = adapters.Hydra("attn/(q|o)|experts/wo", rank=3, seq_rank=2)
    d, hk, e, fe = m.d_model, m.num_heads * m.head_dim, m.moe.num_experts, m.moe.expert_dim
    # r_p (d_in + d_out) + 2 r_s d_out per matrix, times E for stacked experts
    per = lambda i, o: 3 * (i + o) + 2 * 2 * o
    want = m.num_layers * (per(d, hk) + per(hk, d) + e * per(fe, d))
    init = nn.unbox(jax.eval_shape(lambda: hydra.init(jax.random.PRNGKey(0), params)))
    assert hydra.count(params) == want == adapters.num_params(init)
    o = init["layer0"]["attn"]["o"]   # o [H, K, D]: parallel branch reads H·K, sequential reads D
    assert o["par_a"].shape == (m.num_heads, m.head_dim, 3) and o["seq_a"].shape == (d, 2)
    assert init["layer0"]["moe"]["experts"]["wo"]["seq_b"].shape == (e, 2, d)


def test_hydra_merged_equals_unmerged():
    """x·W' + b' == h0 + s·(x A_p) B_p + s·(h0 A_s) B_s with h0 = x W + b, by plain einsums:
    q [D, H, K] with its bias q_bias [H, K], o [H, K, D] (two input axes), and experts [E, F, D]."""
    key, rng = jax.random.PRNGKey(0), np.random.default_rng(0)
    r = lambda i, shape: rng.standard_normal(shape).astype(np.float32)
    d, h, k, e, f = 6, 2, 4, 3, 5
    params = {"attn": {"q": nn.LogicallyPartitioned(r(0, (d, h, k)), ("embed", "heads", "head_dim")),
                       "q_bias": nn.LogicallyPartitioned(r(1, (h, k)), ("heads", "head_dim")),
                       "o": nn.LogicallyPartitioned(r(2, (h, k, d)), ("heads", "head_dim", "embed"))},
              "experts": {"wo": nn.LogicallyPartitioned(r(3, (e, f, d)), ("expert", "expert_mlp", "embed"))}}
    hydra = adapters.Hydra(".*", rank=2, seq_rank=3, scale=0.5)
    assert "attn/q_bias" not in adapters.adaptable(params)      # a 2-axis bias is no target
    ad = jax.tree.map(np.asarray, _random_adapter(hydra, params))
    p, s = nn.unbox(params), 0.5
    merged = jax.tree.map(np.asarray, hydra.merge(params, ad))
    x = r(4, (2, 3, d))

    q = ad["attn"]["q"]
    h0 = np.einsum("BLD,DHK->BLHK", x, p["attn"]["q"]) + p["attn"]["q_bias"]
    want = (h0 + s * np.einsum("BLR,RHK->BLHK", np.einsum("BLD,DR->BLR", x, q["par_a"]), q["par_b"])
            + s * np.einsum("BLS,SHK->BLHK", np.einsum("BLHK,HKS->BLS", h0, q["seq_a"]), q["seq_b"]))
    got = np.einsum("BLD,DHK->BLHK", x, merged["attn"]["q"]) + merged["attn"]["q_bias"]
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)

    o, heads = ad["attn"]["o"], r(5, (2, 3, h, k))
    h0 = np.einsum("BLHK,HKD->BLD", heads, p["attn"]["o"])
    want = (h0 + s * np.einsum("BLR,RD->BLD", np.einsum("BLHK,HKR->BLR", heads, o["par_a"]), o["par_b"])
            + s * np.einsum("BLS,SD->BLD", np.einsum("BLD,DS->BLS", h0, o["seq_a"]), o["seq_b"]))
    np.testing.assert_allclose(np.einsum("BLHK,HKD->BLD", heads, merged["attn"]["o"]), want, rtol=2e-5, atol=2e-5)

    w, hid = ad["experts"]["wo"], r(6, (e, 4, f))        # [E, C, F] tokens per expert
    h0 = np.einsum("ECF,EFD->ECD", hid, p["experts"]["wo"])
    want = (h0 + s * np.einsum("ECR,ERD->ECD", np.einsum("ECF,EFR->ECR", hid, w["par_a"]), w["par_b"])
            + s * np.einsum("ECS,ESD->ECD", np.einsum("ECD,EDS->ECS", h0, w["seq_a"]), w["seq_b"]))
    np.testing.assert_allclose(np.einsum("ECF,EFD->ECD", hid, merged["experts"]["wo"]), want, rtol=2e-5, atol=2e-5)
    # Same merge from the unboxed base (as inside training); zero B at init leaves the base as it is.
    jax.tree.map(np.testing.assert_array_equal, hydra.merge(p, ad), merged)
    fresh = hydra.merge(params, nn.unbox(hydra.init(key, params)))
    jax.tree.map(np.testing.assert_array_equal, fresh, p)


def test_lora_dropout_path(data_dir):
    """LoRA / MoS / Hydra with dropout run on activations (adapter_hooks): deterministic,
    the hook path equals the merged weights (Hydra's sequential branch including the
    projection's bias); in training the input is dropped at rate p and scaled by 1/(1-p),
    so the low-rank term is unbiased; stacked experts are refused."""
    from routezoo.layers.adapters import hooks as adapter_hooks
    c = per_layer_config(data_dir, **{"model.qkv_bias": True})
    model, params = _boxed_params(c)
    rng = np.random.default_rng(0)
    base = jax.tree.map(lambda x: (0.2 * rng.standard_normal(x.shape)).astype(np.float32), nn.unbox(params))
    tokens = jnp.asarray(rng.integers(2, 258, (2, 8)))
    for method in (adapters.LoRA("attn/(q|o)|mlp/wi", rank=2, alpha=4.0, dropout=0.3),
                   adapters.MoS("attn/(q|o)", rank=2, alpha=4.0, equiv_rank=2, private_rank=1, dropout=0.3),
                   adapters.Hydra("attn/(q|o)|mlp/wi", rank=2, seq_rank=3, scale=0.5, dropout=0.3)):
        ad = _random_adapter(method, params)
        assert adapter_hooks.is_activation_adapter(method) and method.mergeable

        @jax.jit
        def run(ad, key):
            with adapter_hooks.bind(method, base, ad, rng=key, deterministic=key is None):
                return model.apply({"params": base}, tokens)[0]
        merged = model.apply({"params": method.merge(base, ad)}, tokens)[0]
        np.testing.assert_allclose(run(ad, None), merged, rtol=2e-5, atol=2e-5)
        assert not np.allclose(run(ad, jax.random.PRNGKey(1)), merged, atol=1e-3)
    # The dropped term: rate p, kept entries scaled by 1/(1-p), mean equal to the full term.
    ctx = adapter_hooks.HookContext(None, jax.random.PRNGKey(3), False, {}, {})
    x = jnp.ones((4, 500, 6))
    a, b = jnp.eye(6, 2), jnp.eye(2, 3)
    draws = adapters.low_rank_dropout_delta(x, a, b, 1.0, 0.25, ctx, "p")   # [B, S, O]: x_0, x_1, 0
    vals = np.asarray(draws[..., :2]).ravel()
    assert np.all(np.isclose(vals, 0.0) | np.isclose(vals, 1 / 0.75))
    assert abs((vals == 0).mean() - 0.25) < 0.03 and abs(vals.mean() - 1.0) < 0.05
    moe = per_layer_config(data_dir, **{"model.ffn": "moe"})
    _, moe_params = _boxed_params(moe)
    with pytest.raises(ValueError, match="stacked experts"):
        adapters.LoRA("experts/wi", dropout=0.1).select(moe_params)
    with pytest.raises(ValueError, match="stacked experts"):
        adapters.Hydra("experts/wi", dropout=0.1).select(moe_params)
    with pytest.raises(ValueError, match=r"lora_dropout=1.0 .* must be in \[0, 1\)"):
        adapters.LoRA("attn/q", dropout=1.0)
