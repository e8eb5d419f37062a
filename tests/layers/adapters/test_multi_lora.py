"""Many LoRA adapters in one batch (layers/adapters/multi_lora.py): a mixed batch through
the tiny LM equals each example run alone on the base with its own LoRA merged in (both
implementations, mixed ranks, id 0 = the base model), gather == sorted == the per-adapter
loop == a per-example reference, missing targets are zeros, out-of-range ids, the
library's loading path through the training loop (frozen, count), the sampler under
bind, and the errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from conftest import random_adapter, per_layer_config, tiny_config
from routezoo import zoo
from routezoo.layers import adapters
from routezoo.layers.adapters import hooks as adapter_hooks
from routezoo.layers.adapters.multi_lora import (MultiLoRA, delta_gather, delta_sorted, per_adapter_loop)
from routezoo.training import config_check
from routezoo.training import train as train_lib
from routezoo.zoo import sampling

# Library: mixed ranks (2 and 4), different targets (v only in 1, o and mlp/wo only in 2),
# one rsLoRA scale.
LORA_1 = adapters.LoRA("attn/(q|v)", rank=2, alpha=4.0)
LORA_2 = adapters.LoRA("attn/(q|o)|mlp/wo", rank=4, alpha=8.0, rslora=True)


@pytest.fixture(scope="module")
def lm(data_dir):
    c = per_layer_config(data_dir)
    model = zoo.build(c.model)
    tokens = jnp.zeros((1, 8), jnp.int32)
    boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), tokens))["params"]
    base = jax.tree.map(np.asarray, nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), tokens)["params"]))
    lib = [random_adapter(LORA_1, boxed, 1, 0.2), random_adapter(LORA_2, boxed, 2, 0.2)]
    return c, model, boxed, base, lib


@functools.partial(jax.jit, static_argnums=(0, 1))
def _bound_apply(model, multi, base, stacked, ids, tokens):
    with adapter_hooks.bind(multi, base, stacked, task_ids=ids):
        return model.apply({"params": base}, tokens)[0]


@functools.partial(jax.jit, static_argnums=0)
def _apply(model, params, tokens):
    return model.apply({"params": params}, tokens)[0]


def test_stack_pads_ranks_folds_scales_and_zeros_missing_targets(lm):
    _, _, boxed, base, lib = lm
    stacked = MultiLoRA.stack(base, lib, [LORA_1, LORA_2])
    flat = adapters.flat_params(stacked)
    for layer in ("layer0", "layer1"):
        for proj in ("attn/q", "attn/v", "attn/o", "mlp/wo"):
            a, b = np.asarray(flat[f"{layer}/{proj}/lora_a"]), np.asarray(flat[f"{layer}/{proj}/lora_b"])
            assert a.shape[0] == b.shape[0] == 3 and a.shape[2] == b.shape[1] == 4   # N = 2 + zero slot, R_max
            assert not a[0].any() and not b[0].any()                                  # slot 0: no adapter
            for n, (lora, params) in enumerate(zip((LORA_1, LORA_2), lib), start=1):
                own = adapters.flat_params(params)
                if f"{layer}/{proj}/lora_a" not in own:                              # missing target: zeros
                    assert not a[n].any() and not b[n].any()
                    continue
                want = lora.scale * adapters.lora_delta(
                    adapters.select_targets(boxed, proj)[f"{layer}/{proj}"],
                    own[f"{layer}/{proj}/lora_a"], own[f"{layer}/{proj}/lora_b"])
                np.testing.assert_allclose(a[n] @ b[n], np.asarray(want).reshape(a.shape[1], -1), atol=1e-6)
                assert not a[n, :, lora.rank:].any() and not b[n, lora.rank:].any()   # zero padding
    assert set(p.split("/", 1)[1].rsplit("/", 1)[0] for p in flat) == {"attn/q", "attn/v", "attn/o", "mlp/wo"}
    # adapter.targets restricts what is served.
    only_q = adapters.flat_params(MultiLoRA.stack(base, lib, [LORA_1, LORA_2], targets="attn/q"))
    assert {p.rsplit("/", 1)[0] for p in only_q} == {"layer0/attn/q", "layer1/attn/q"}
    multi = MultiLoRA()
    assert multi.count(base, stacked) == sum(3 * 4 * (x.shape[1] + b.shape[2]) for x, b in (
        (flat[k], flat[k[:-1] + "b"]) for k in flat if k.endswith("lora_a")))


@pytest.mark.parametrize("impl", ["gather", "sorted"])
def test_mixed_batch_equals_each_example_with_its_own_merged_lora(lm, impl):
    _, model, _, base, lib = lm
    stacked = MultiLoRA.stack(base, lib, [LORA_1, LORA_2])
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(2, 258, (5, 8)), jnp.int32)
    ids = jnp.asarray([2, 0, 1, 2, 1], jnp.int32)
    got = np.asarray(_bound_apply(model, MultiLoRA(impl=impl), base, stacked, ids, tokens))
    refs = [_apply(model, base, tokens), _apply(model, LORA_1.merge(base, lib[0]), tokens),
            _apply(model, LORA_2.merge(base, lib[1]), tokens)]
    for i, a in enumerate(np.asarray(ids)):
        np.testing.assert_allclose(got[i], np.asarray(refs[a][i]), rtol=2e-5, atol=2e-5)
    # id 0 is the base model exactly as computed without any binding.
    np.testing.assert_allclose(got[1], np.asarray(refs[0][1]), rtol=1e-6, atol=1e-6)
    # The adapters do change the outputs (the comparison is not vacuous).
    assert np.abs(np.asarray(refs[1]) - np.asarray(refs[0])).max() > 1e-2
    assert np.abs(np.asarray(refs[2]) - np.asarray(refs[0])).max() > 1e-2


def test_gather_sorted_loop_and_reference_agree_with_out_of_range_ids():
    rng = np.random.default_rng(3)
    n, d_in, r, d_out = 5, 12, 3, 7
    a = rng.standard_normal((n, d_in, r)).astype(np.float32)
    b = rng.standard_normal((n, r, d_out)).astype(np.float32)
    a[0], b[0] = 0, 0
    x = rng.standard_normal((6, 4, d_in)).astype(np.float32)
    ids = np.array([3, 0, 4, 3, 1, 1], np.int32)
    want = np.einsum("bsi,bio->bso", x, np.einsum("nir,nro->nio", a, b)[ids])    # reference: per-example A·B
    got = {"gather": jax.jit(delta_gather)(x, a, b, ids),
           "loop": per_adapter_loop(x, a, b, ids)}
    for backend in ("blocked", "ragged_dot", "dense"):
        got[f"sorted/{backend}"] = jax.jit(delta_sorted, static_argnums=4)(x, a, b, ids, backend)
    for name, value in got.items():
        np.testing.assert_allclose(np.asarray(value), want, rtol=1e-5, atol=1e-5, err_msg=name)
    # Ids out of range under jit get the zero adapter (the base model) in both paths.
    bad = np.array([7, -1, 4, 3, 5, 1], np.int32)
    want_bad = np.where((bad >= n) | (bad < 0), 0, bad)
    for fn in (jax.jit(delta_gather), jax.jit(delta_sorted)):
        np.testing.assert_allclose(np.asarray(fn(x, a, b, bad)), np.asarray(fn(x, a, b, want_bad)), atol=1e-6)
        assert not np.asarray(fn(x, a, b, bad))[[0, 1, 4]].any()
    # Eager (concrete ids): an error naming the allowed range.
    ctx = adapter_hooks.HookContext(task_ids=jnp.asarray(bad), rng=None, deterministic=True,
                                    params={"w/lora_a": a, "w/lora_b": b}, base={})
    with pytest.raises(ValueError, match=r"adapter id 7 out of range; allowed: 0 \(base model\) \.\. 4"):
        MultiLoRA().hook_delta("w", jnp.asarray(x), None, ctx)


def test_auto_rule():
    assert MultiLoRA().resolve_impl(1) == "gather"
    assert MultiLoRA().resolve_impl(8) == "gather"
    assert MultiLoRA(impl="sorted").resolve_impl(1) == "sorted"
    assert MultiLoRA(impl="gather").resolve_impl(8) == "gather"


def test_decode_shape_batch_gather_equals_sorted(lm):
    _, model, _, base, lib = lm
    stacked = MultiLoRA.stack(base, lib, [LORA_1, LORA_2])
    tokens = jnp.asarray([[5], [9], [7], [300]], jnp.int32)       # one token per example: decode
    ids = jnp.asarray([1, 2, 0, 1], jnp.int32)
    auto = _bound_apply(model, MultiLoRA(), base, stacked, ids, tokens)
    srt = _bound_apply(model, MultiLoRA(impl="sorted"), base, stacked, ids, tokens)
    np.testing.assert_allclose(np.asarray(auto), np.asarray(srt), rtol=2e-5, atol=2e-5)


def test_sampler_under_bind_equals_merged_sampling(lm):
    _, model, _, base, lib = lm
    stacked = MultiLoRA.stack(base, lib, [LORA_1, LORA_2])
    multi = MultiLoRA()
    prompt = jnp.asarray(np.random.default_rng(1).integers(2, 258, (3, 4)), jnp.int32)
    ids = jnp.asarray([2, 0, 1], jnp.int32)

    @functools.partial(jax.jit, static_argnames="num_tokens")
    def generate(base, stacked, ids, prompt, rng, num_tokens):
        with adapter_hooks.bind(multi, base, stacked, task_ids=ids):
            return sampling.sample.__wrapped__(model, {"params": base}, prompt, rng, num_tokens=num_tokens,
                                               temperature=0.0)

    got = np.asarray(generate(base, stacked, ids, prompt, jax.random.PRNGKey(0), 4))
    merged = [base, LORA_1.merge(base, lib[0]), LORA_2.merge(base, lib[1])]
    for i, a in enumerate(np.asarray(ids)):
        want = sampling.sample(model, {"params": merged[a]}, prompt[i:i + 1], jax.random.PRNGKey(0),
                               num_tokens=4, temperature=0.0)
        np.testing.assert_array_equal(got[i], np.asarray(want)[0])


def test_library_through_training_loop_is_frozen(lm, data_dir, tmp_path):
    c0, model, boxed, _, lib = lm
    dirs = []
    for n, (lora, params) in enumerate(zip((LORA_1, LORA_2), lib)):
        cfg = per_layer_config(data_dir, **{"adapter.method": "lora", "adapter.targets": lora.targets,
                                       "adapter.rank": lora.rank, "adapter.alpha": lora.alpha,
                                       "adapter.rslora": lora.rslora})
        d = str(tmp_path / f"lora{n}")
        train_lib.save_adapter(d, params, {"adapter": cfg.adapter.to_dict(), "base_fingerprint": "x"}, 0)
        dirs.append(d)
    c = per_layer_config(data_dir, **{"adapter.method": "multi_lora", "adapter.targets": ".*",
                                 "adapter.library": ",".join(dirs), "adapter.multi_lora_impl": "sorted"})
    config_check.validate(c)
    multi = adapters.from_config(c.adapter)
    assert isinstance(multi, MultiLoRA) and multi.impl == "sorted" and not multi.mergeable
    sources = train_lib.adapter_sources(c)
    mesh, rules = train_lib.mesh_and_rules(c)
    tx, schedule = train_lib.optimizer_for(c, multi)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        _, shardings, setup = train_lib.adapter_state_shardings(model, tx, c, mesh, rules, multi, sources)
        base = train_lib.load_base(model, c, setup, mesh, rules)
        state = train_lib.create_adapter_state(model, tx, c, shardings, setup, sources)
        want = MultiLoRA.stack(base, lib, [dict(m["adapter"]) for _, m in sources["library"]])
        jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), state.params, want)
        assert not jax.tree.leaves(state.opt_state)      # every leaf frozen: no optimizer state
        # In a run, task t (the t-th of data.tasks) is served by library entry t (slot t + 1).
        assert multi.id_offset == 1
        toks8 = jnp.asarray(np.random.default_rng(1).integers(2, 258, (2, 8)))
        np.testing.assert_allclose(
            _bound_apply(model, multi, base, state.params, jnp.asarray([0, 1]), toks8),
            _bound_apply(model, MultiLoRA(impl="sorted"), base, state.params, jnp.asarray([1, 2]), toks8),
            rtol=1e-6, atol=1e-6)
        meta = train_lib.adapter_metadata(c, setup, base)
        assert meta["params_trainable"] == 0
        assert meta["params_adapter"] == multi.count(base, state.params) == adapters.num_params(want)
        step = jax.jit(train_lib.make_train_step(model, tx, c, schedule, multi))
        rng = np.random.default_rng(0)
        toks = rng.integers(2, 258, (8, c.data.seq_len + 1))
        batch = {"inputs": jnp.asarray(toks[:, :-1]), "targets": jnp.asarray(toks[:, 1:]),
                 "weights": jnp.ones((8, c.data.seq_len)), "task_id": jnp.asarray([0, 1, 2, 1, 0, 2, 2, 1])}
        before = jax.tree.map(np.asarray, state.params)
        new, metrics = step(state, batch, base)
        assert np.isfinite(float(metrics["loss"]))
        jax.tree.map(lambda x, y: np.testing.assert_array_equal(x, np.asarray(y)), before, new.params)


def test_errors(lm, data_dir):
    _, _, boxed, base, lib = lm
    with pytest.raises(ValueError, match=r"entry 1 is a 'mos' adapter; multi_lora serves: lora"):
        MultiLoRA.stack(base, lib, [LORA_1, {"method": "mos", "rank": 4}])
    with pytest.raises(ValueError, match=r"entry 0 is a 'hydra' adapter; multi_lora serves: lora"):
        MultiLoRA.stack(base, lib, [adapters.Hydra("attn/q"), LORA_2])
    mos = adapters.MoS("attn/q", rank=2, equiv_rank=2, private_rank=1)
    with pytest.raises(ValueError, match="non-LoRA parameters .* multi_lora serves: lora"):
        MultiLoRA.stack(base, [random_adapter(mos, boxed, 0, 0.2)], [LORA_1])
    with pytest.raises(ValueError, match="has rank 4 but its config says rank 2"):
        MultiLoRA.stack(base, [lib[1]], [LORA_1])
    with pytest.raises(ValueError, match="matches none of the library's adapted weights"):
        MultiLoRA.stack(base, lib, [LORA_1, LORA_2], targets="mlp/wi")
    with pytest.raises(ValueError, match="needs a library"):
        MultiLoRA().init(jax.random.PRNGKey(0), boxed)
    with pytest.raises(ValueError, match="multi_lora_impl='bgmv'; allowed: auto, gather, sorted"):
        adapters.from_config(per_layer_config(data_dir, **{"adapter.method": "multi_lora", "adapter.targets": ".*",
                                                      "adapter.multi_lora_impl": "bgmv"}).adapter)
    # Stacked expert weights are not reached by the hook: refused when stacking.
    c = per_layer_config(data_dir, **{"model.ffn": "moe"})
    moe_model = zoo.build(c.model)
    moe_boxed = jax.eval_shape(lambda: moe_model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32)))["params"]
    experts = adapters.LoRA("experts/wi", rank=2)
    with pytest.raises(ValueError, match="stacked expert weight"):
        MultiLoRA.stack(nn.unbox(moe_boxed), [random_adapter(experts, moe_boxed, 0, 0.2)], [experts])
