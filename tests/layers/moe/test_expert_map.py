"""The MoE block's logical-to-physical expert map (``model.moe.expert_map``): the identity
changes nothing, a permutation with the permuted experts is the same model (outputs and
gradients, dropless and capacity, under expert parallelism), a many-to-one map is the model
whose duplicated experts are identical, per-layer maps in a decoder, the config's
refusals, and the Hugging Face export of a mapped model.

Shapes are small: B=8, L=8, D=16, F=32, E=4, K=2.
"""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from routezoo.configs import base
from routezoo.layers import moe as moe_lib
from routezoo.layers import sharding

B, L, D, F, E = 8, 8, 16, 32, 4
TOL = dict(rtol=2e-5, atol=2e-5)


def make_cfg(**overrides):
    cfg = base.get_config().model.moe
    cfg.update(dict(num_experts=E, k=2, expert_dim=F, load_balance_coef=0.01, z_loss_coef=1e-3,
                    capacity_factor=4.0, eval_capacity_factor=4.0))
    cfg.update(overrides)
    return cfg


def make_x(seed=0):
    return jax.random.normal(jax.random.PRNGKey(seed), (B, L, D), jnp.float32)


def build(cfg, x, seed=1):
    model = moe_lib.moe_from_config(cfg, d_model=D, dtype=jnp.float32, param_dtype=jnp.float32)
    boxed = jax.jit(functools.partial(model.init, deterministic=True))(jax.random.PRNGKey(seed), x)
    return model, boxed, nn.unbox(boxed)


def loss_and_grads(model, variables, x, cot):
    def loss(v, x):
        y, aux = model.apply(v, x, deterministic=False)
        return jnp.sum(y * cot) + sum(aux["losses"].values()), y
    (_, y), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(variables, x)
    return y, grads


def with_experts(variables, experts):
    out = jax.tree.map(lambda a: a, variables)
    out["params"]["experts"] = {k: jnp.asarray(v) for k, v in experts.items()}
    return out


def physical(experts, expert_map, num_physical):
    """Physical weights for ``expert_map`` holding logical expert ``r``'s weights at ``map[r]``."""
    out = {}
    for name, w in experts.items():
        w = np.asarray(w)
        p = np.zeros((num_physical,) + w.shape[1:], w.dtype)
        for r, e in enumerate(expert_map):
            p[e] = w[r]
        out[name] = p
    return out


def bits(tree):
    return [np.asarray(a).tobytes() for a in jax.tree.leaves(tree)]


@pytest.mark.parametrize("dispatch", ["dropless", "capacity"])
def test_identity_map_changes_nothing_bit_for_bit(dispatch):
    x, cot = make_x(), make_x(7)
    plain, _, variables = build(make_cfg(dispatch=dispatch), x)
    mapped, _, v2 = build(make_cfg(dispatch=dispatch, expert_map=",".join(map(str, range(E)))), x)
    assert bits(v2) == bits(variables)   # same parameters: the router keeps its width
    y0, g0 = jax.jit(functools.partial(loss_and_grads, plain))(variables, x, cot)
    y1, g1 = jax.jit(functools.partial(loss_and_grads, mapped))(variables, x, cot)
    assert bits(y0) == bits(y1) and bits(g0) == bits(g1)


PERM = (2, 0, 3, 1)


@pytest.mark.parametrize("dispatch", ["dropless", "capacity"])
def test_permutation_with_permuted_experts_is_the_same_model(dispatch):
    """Bit for bit on one device: the same rows meet the same weights, in other buffers."""
    x, cot = make_x(), make_x(7)
    plain, _, variables = build(make_cfg(dispatch=dispatch), x)
    mapped = build(make_cfg(dispatch=dispatch, expert_map=",".join(map(str, PERM))), x)[0]
    moved = with_experts(variables, physical(variables["params"]["experts"], PERM, E))
    y0, (gp0, gx0) = jax.jit(functools.partial(loss_and_grads, plain))(variables, x, cot)
    y1, (gp1, gx1) = jax.jit(functools.partial(loss_and_grads, mapped))(moved, x, cot)
    assert bits(y1) == bits(y0) and bits(gx1) == bits(gx0)
    assert bits(gp1["params"]["router"]) == bits(gp0["params"]["router"])
    want = physical(gp0["params"]["experts"], PERM, E)   # expert gradients move with their experts
    assert bits(gp1["params"]["experts"]) == bits(want)


def test_permutation_holds_on_an_expert_parallel_mesh():
    """Dropless with experts sharded over ``expert`` (padded and ragged exchange) and
    capacity with its sharding constraints give the single-device unmapped values."""
    x, cot = make_x(), make_x(7)
    mesh = sharding.make_mesh({"expert": 4, "data": 2})
    rules = sharding.DEFAULT_RULES
    for dispatch, exchange in (("dropless", "padded"), ("dropless", "ragged_emulated"), ("capacity", "auto")):
        plain, boxed, variables = build(make_cfg(dispatch=dispatch, ep_exchange=exchange), x)
        mapped = build(make_cfg(dispatch=dispatch, ep_exchange=exchange, expert_map=",".join(map(str, PERM))), x)[0]
        y0, g0 = jax.jit(functools.partial(loss_and_grads, plain))(variables, x, cot)
        moved = with_experts(variables, physical(variables["params"]["experts"], PERM, E))
        v_s = jax.device_put(moved, nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, rules))
        x_s = jax.device_put(x, sharding.logical_sharding(mesh, ("batch", "length", "act_embed"), rules))
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            y1, g1 = jax.jit(functools.partial(loss_and_grads, mapped))(v_s, x_s, cot)
        np.testing.assert_allclose(y1, y0, **TOL, err_msg=f"{dispatch} {exchange}")
        want = physical(g0[0]["params"]["experts"], PERM, E)
        for name in want:
            np.testing.assert_allclose(g1[0]["params"]["experts"][name], want[name], **TOL, err_msg=name)


@pytest.mark.parametrize("dispatch", ["dropless", "capacity"])
def test_many_to_one_equals_the_model_with_identical_duplicated_experts(dispatch):
    """Router outputs 0 and 3 served by one physical expert = four experts of which 0 and 3
    are equal (capacity: a factor large enough that nothing is dropped either way)."""
    emap = (1, 0, 2, 1)
    x, cot = make_x(), make_x(7)
    dup, _, variables = build(make_cfg(dispatch=dispatch), x)
    ex = {k: np.asarray(v).copy() for k, v in variables["params"]["experts"].items()}
    for w in ex.values():
        w[3] = w[0]
    variables = with_experts(variables, ex)
    merged, _, mv = build(make_cfg(dispatch=dispatch, num_experts=3, expert_map=",".join(map(str, emap))), x)
    assert mv["params"]["router"]["kernel"].shape == (D, E) and mv["params"]["experts"]["wi"].shape[0] == 3
    three = {k: np.stack([w[1], w[0], w[2]]) for k, w in ex.items()}   # physical e holds logical map^-1(e)
    mv = with_experts(variables, three)
    y0, g0 = jax.jit(functools.partial(loss_and_grads, dup))(variables, x, cot)
    y1, g1 = jax.jit(functools.partial(loss_and_grads, merged))(mv, x, cot)
    np.testing.assert_allclose(y1, y0, **TOL)
    np.testing.assert_allclose(g1[1], g0[1], **TOL)
    np.testing.assert_allclose(g1[0]["params"]["router"]["kernel"], g0[0]["params"]["router"]["kernel"], **TOL)
    # the shared physical expert's gradient is the sum of its two logical experts'
    ge = g0[0]["params"]["experts"]["wi"]
    np.testing.assert_allclose(g1[0]["params"]["experts"]["wi"][1], ge[0] + ge[3], **TOL)


def test_expert_choice_runs_on_the_logical_experts():
    x = make_x()
    cfg = dict(router="expert_choice", capacity_factor=2.0)
    plain, _, variables = build(make_cfg(**cfg), x)
    mapped = build(make_cfg(**cfg, expert_map=",".join(map(str, PERM))), x)[0]
    moved = with_experts(variables, physical(variables["params"]["experts"], PERM, E))
    y0, _ = jax.jit(functools.partial(plain.apply, deterministic=True))(variables, x)
    y1, _ = jax.jit(functools.partial(mapped.apply, deterministic=True))(moved, x)
    np.testing.assert_allclose(y1, y0, **TOL)


@pytest.mark.parametrize("value, needle", [
    ("0,1,x,2", "entry 'x' is not an integer"),
    ("0,1,4,2", "names expert 4, outside [0, moe.num_experts=4)"),
    ("0,-1,2,3", "names expert -1"),
    ("0,1,2,3;0,1", "different lengths"),
    ("0,1,2,3;3,2,1,0;0,1,2,3", "3 per-layer maps for 2 MoE layers"),
])
def test_config_check_refuses_bad_maps_in_one_line(value, needle):
    from routezoo.training import config_check
    c = base.get_config()
    c.model.ffn, c.model.num_layers, c.model.moe.num_experts, c.model.moe.expert_map = "moe", 2, 4, value
    with pytest.raises(config_check.ConfigError) as e:
        config_check.validate(c, num_devices=1)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_config_check_accepts_maps_and_the_router_gets_the_logical_width():
    from routezoo.training import config_check
    c = base.get_config()
    c.model.ffn, c.model.num_layers, c.model.moe.num_experts, c.model.moe.k = "moe", 2, 2, 3
    c.model.moe.expert_map = "0,1,1,0"        # 4 router outputs, 2 physical experts: k=3 <= 4 is fine
    config_check.validate(c, num_devices=1)
    assert moe_lib.logical_num_experts(c.model.moe) == 4
    assert moe_lib.format_expert_maps([(0, 1), (0, 1)]) == "0,1"
    assert moe_lib.parse_expert_maps(moe_lib.format_expert_maps([(0, 1), (1, 0)])) == [(0, 1), (1, 0)]
    c.model.moe.router = "soft"
    with pytest.raises(config_check.ConfigError, match="builds its own block"):
        config_check.validate(c, num_devices=1)


# ------------------------------------------------------------------ whole models


def _lm_config(**moe):
    from routezoo.configs import base as b
    c = b.get_config().model
    c.ffn, c.num_layers, c.d_model, c.num_heads, c.num_kv_heads, c.head_dim, c.mlp_dim = "moe", 2, 32, 2, 1, 16, 64
    c.vocab_size, c.scale_tied_logits = 300, False
    c.moe.num_experts, c.moe.k, c.moe.expert_dim = E, 2, 32
    c.moe.update(moe)
    return c


def _lm(model_cfg, seed=0):
    from routezoo import zoo
    model = zoo.build(model_cfg)
    tokens = jax.random.randint(jax.random.PRNGKey(3), (2, 16), 0, model_cfg.vocab_size)
    variables = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(seed), tokens))
    return model, variables, tokens


def _permuted_lm_params(params, maps):
    from routezoo.zoo import stack
    out = jax.tree.map(np.asarray, params)
    for i, m in enumerate(maps):
        moe = out[f"layer{i}"]["moe"]
        moe["experts"] = physical(moe["experts"], m, E)
    return out


def test_per_layer_maps_in_a_decoder_run_unscanned_and_equal_the_unmapped_model():
    from routezoo import zoo
    from routezoo.zoo import stack
    maps = [(2, 0, 3, 1), (1, 3, 0, 2)]
    cfg = _lm_config()
    model, variables, tokens = _lm(cfg)
    want, _ = jax.jit(model.apply)(variables, tokens)
    mapped_cfg = _lm_config(expert_map=moe_lib.format_expert_maps(maps))
    assert stack.is_scanned(cfg) and not stack.is_scanned(mapped_cfg)
    params = _permuted_lm_params(stack.to_unscanned(variables["params"], cfg), maps)
    got, _ = jax.jit(zoo.build(mapped_cfg).apply)({"params": params}, tokens)
    np.testing.assert_allclose(got, want, **TOL)


def test_hf_export_of_a_mapped_model_round_trips_its_logits(tmp_path):
    """Per-layer maps, a permutation in one layer and a many-to-one map in the other: the
    export expands the physical experts to one per router output; the import (identity
    map) gives the mapped model's logits."""
    from routezoo import zoo
    from routezoo.zoo import hf, stack
    maps = [(2, 0, 1, 1), (1, 2, 0, 0)]   # 4 router outputs over 3 physical experts
    cfg = _lm_config(num_experts=3, expert_map=moe_lib.format_expert_maps(maps))
    model, variables, tokens = _lm(cfg)
    want, _ = jax.jit(model.apply)(variables, tokens)
    out = str(tmp_path / "hf")
    hf.to_hf(cfg, variables["params"], out)
    loaded, params = hf.from_hf(out)
    assert int(loaded.cfg.moe.num_experts) == 4 and not str(loaded.cfg.moe.expert_map)
    got, _ = jax.jit(loaded.apply)({"params": params}, tokens)
    np.testing.assert_allclose(got, want, **TOL)
    assert os.path.isfile(os.path.join(out, "config.json"))
    del stack, zoo


def test_init_from_a_run_with_another_map_is_refused(tmp_path):
    """Equal shapes, another meaning: starting from a mapped run needs its map."""
    from routezoo.training import config_check
    src = base.get_config()
    src.model.ffn, src.model.moe.num_experts, src.model.moe.expert_map = "moe", 4, "2,0,3,1"
    os.makedirs(tmp_path / "run" / "checkpoints" / "4")
    (tmp_path / "run" / "config.json").write_text(src.to_json_best_effort())
    c = base.get_config()
    c.model.ffn, c.model.moe.num_experts, c.init.from_workdir = "moe", 4, str(tmp_path / "run")
    with pytest.raises(config_check.ConfigError, match="has model.moe.expert_map='2,0,3,1'"):
        config_check.validate(c, num_devices=1)
    c.model.moe.expert_map = "2,0,3,1"
    config_check.validate(c, num_devices=1)
