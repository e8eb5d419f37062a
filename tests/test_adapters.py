"""Adapters (layers/adapters.py) and their training path: LoRA parameter counts against
PEFT.md's formula, merged == unmerged, frozen base bit-identical, only adapter parameters
in the optimizer state, the adapter checkpoint and its base fingerprint, and the errors."""

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from conftest import tiny_config
from routezoo import zoo
from routezoo.layers import adapters, dense
from routezoo.training import config_check
from routezoo.training.optim import make_optimizer
from routezoo.training import train as train_lib


def _boxed_params(c):
    model = zoo.build(c.model)
    tokens = jnp.zeros((1, 8), jnp.int32)
    return model, jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), tokens))["params"]


def test_lora_counts_equal_peft_formula(data_dir):
    c = tiny_config(data_dir)
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
    c = tiny_config(data_dir, **{"model.ffn": "moe"})
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
    """Merged weights through dense.MLP == an explicit x·W + s·(x·A)·B activation path."""
    mlp = dense.MLP(hidden_dim=24, mlp_type=mlp_type)
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
    _, params = _boxed_params(tiny_config(data_dir))
    with pytest.raises(ValueError, match=r"matches no adaptable parameter.*layer\*/attn/q.*layer\*/mlp/wo"):
        adapters.select_targets(params, "attn/nope")
    chosen = adapters.select_targets(params, "attn/(q|v)")
    assert sorted(chosen) == ["layer0/attn/q", "layer0/attn/v", "layer1/attn/q", "layer1/attn/v"]


def test_unknown_method_and_empty_targets(data_dir):
    c = tiny_config(data_dir, **{"adapter.method": "dora", "adapter.targets": "attn/q"})
    with pytest.raises(config_check.ConfigError, match="unknown adapter.method 'dora'; allowed: lora"):
        config_check.validate(c)
    with pytest.raises(ValueError, match="allowed: lora"):
        adapters.from_config(c.adapter)
    c = tiny_config(data_dir, **{"adapter.method": "lora"})
    with pytest.raises(config_check.ConfigError, match="adapter.targets"):
        config_check.validate(c)
    config_check.validate(tiny_config(data_dir, **{"adapter.method": "lora", "adapter.targets": "attn/q"}))


def test_cli_accepts_init_from(tmp_path):
    from routezoo.training import cli
    config, _, _ = cli.parse_train_flags(["--config.init.from=/some/run", "--config.adapter.method=lora",
                                          f"--workdir={tmp_path}"])
    assert config.init.from_workdir == "/some/run" and config.adapter.method == "lora"


def test_train_step_freezes_base_and_optimizes_adapter_only(data_dir):
    c = tiny_config(data_dir, **{"adapter.method": "lora", "adapter.targets": "attn/(q|v)"})
    mesh, rules = train_lib.mesh_and_rules(c)
    model = zoo.build(c.model)
    lora = adapters.from_config(c.adapter)
    tx, schedule = make_optimizer(c.optimizer, c.train.steps)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        abstract, shardings, setup = train_lib.adapter_state_shardings(model, tx, c, mesh, rules, lora)
        base = train_lib.load_base(model, c, setup, mesh, rules)
        before = jax.tree.map(np.array, base)
        state = train_lib.create_adapter_state(model, tx, c, shardings, setup)
        step = jax.jit(train_lib.make_train_step(model, tx, c, schedule, lora))
        rng = np.random.default_rng(0)
        for _ in range(3):
            ids = rng.integers(2, 258, (8, c.data.seq_len + 1))
            batch = {"inputs": jnp.asarray(ids[:, :-1]), "targets": jnp.asarray(ids[:, 1:]),
                     "weights": jnp.ones((8, c.data.seq_len))}
            state, metrics = step(state, batch, base)
    # Base bit-identical; adapter B moved away from its zero init.
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, np.asarray(b)), before, base)
    assert float(jnp.abs(state.params["layer0"]["attn"]["q"]["lora_b"]).max()) > 0
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
    train_lib.train_and_evaluate(tiny_config(data_dir, **{"train.steps": 4}), base_wd)
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

    # The trained base restores bit-identical to what it was before fine-tuning, and
    # its fingerprint is the one stored with the adapter.
    mesh, rules = train_lib.mesh_and_rules(c)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        _, base = train_lib.restore_params(base_wd, mesh, rules)
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
