"""Dense-to-MoE upcycling (sparse upcycling, Read-ME's refactorization), UOE unlearning and
unified layer skipping: the parameter maths against the models they must reproduce, and the
transforms on tiny in-memory sources."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from conftest import tiny_config
from routezoo import zoo
from routezoo.zoo import layer_skip as ls
from routezoo.zoo import stack
from routezoo.zoo import upcycle as up


def _tokens(seed=0, b=2, l=16):
    return jnp.asarray(np.random.default_rng(seed).integers(2, 258, (b, l)), jnp.int32)


def _init(model_cfg, seed=0, l=16):
    model = zoo.build(model_cfg)
    return model, nn.unbox(jax.jit(model.init)(jax.random.key(seed), _tokens(l=l)))


def _apply(model, variables, tokens):
    """``model.apply`` jitted (a scanned model run eagerly compiles every op on its own)."""
    return jax.jit(model.apply)(variables, tokens)


def _dense_cfg(data_dir, **kw):
    return tiny_config(data_dir, **{"model.num_layers": 4, "model.scan_layers": False, **kw})


def _source(config, params, model_state=None):
    from routezoo.training.transform import Source
    return Source(config=config, params=jax.device_get(params), model_state=model_state or {}, path="/nonexistent",
                  kind="memory", step=0, rng=np.zeros(2, np.uint32))


def _run(name, source, **opts):
    from routezoo.training import transform as T
    t = T.get_transform(name)
    ctx = T.Context(source, log=lambda *_: None)
    return t.fn(source, T.parse_options(t, opts), ctx), ctx


# ------------------------------------------------------------------ sparse upcycling


def _block(moe_cfg, d):
    from routezoo.layers.moe import moe_from_config
    return moe_from_config(moe_cfg, d_model=d, dtype=jnp.float32, param_dtype=jnp.float32)


@pytest.mark.parametrize("mlp_type", ["swiglu", "gelu"])
def test_moe_of_copies_is_the_dense_mlp_times_its_routed_mass(data_dir, mlp_type):
    """Each MoE layer of copies computes (Σ_k w_k) MLP(x): exactly MLP(x) with renormalised
    top-k weights, the top-k probability mass times MLP(x) without."""
    from routezoo.layers.mlp import MLP
    c = _dense_cfg(data_dir, **{"model.mlp_type": mlp_type})
    d, f = c.model.d_model, c.model.mlp_dim
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 8, d)), jnp.float32)
    mlp = MLP(f, mlp_type)
    mlp_params = nn.unbox(mlp.init(jax.random.key(2), x))["params"]
    dense = mlp.apply({"params": mlp_params}, x)
    for renorm in (True, False):
        mc = up.moe_config(c.model, num_experts=4, k=2, every=1, expert_dim=f, renormalize=renorm).moe
        block = _block(mc, d)
        init = nn.unbox(jax.jit(lambda r: block.init(r, x, deterministic=True))(jax.random.key(3)))["params"]
        params, counts = up.upcycle_params({"layer0": {"mlp": mlp_params}}, {"layer0": {"moe": init}}, [0])
        assert counts["fresh"] == d * 4 and counts["copied"] == 0
        y, _ = jax.jit(lambda v: block.apply(v, x, deterministic=True))({"params": params["layer0"]["moe"]})
        if renorm:
            np.testing.assert_allclose(y, dense, rtol=1e-5, atol=1e-5)
        else:   # the top-2 probability mass of the router's softmax, by hand
            logits = np.asarray(x).reshape(-1, d) @ np.asarray(init["router"]["kernel"], np.float64)
            p = np.exp(logits - logits.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            mass = np.sort(p, -1)[:, -2:].sum(-1).reshape(2, 8, 1)
            assert mass.max() < 0.99   # the test sees the difference
            np.testing.assert_allclose(y, mass * np.asarray(dense), rtol=1e-5, atol=1e-5)


def test_upcycled_lm_equals_the_dense_lm_at_init(data_dir):
    c = _dense_cfg(data_dir)
    model, v = _init(c.model)
    dense, _ = _apply(model, v, _tokens(5))
    mc = up.moe_config(c.model, num_experts=4, k=2, every=2, expert_dim=c.model.mlp_dim)
    assert up.moe_layer_indices(mc) == [1, 3]
    moe_model, mv = _init(mc, seed=9)
    params, counts = up.upcycle_params(v["params"], mv["params"], [1, 3], noise=0.0)
    got, _ = _apply(moe_model, {"params": params}, _tokens(5))
    np.testing.assert_allclose(got, dense, rtol=1e-5, atol=1e-5)
    # every leaf that exists in the dense model is copied bit for bit (dense layers, attention, embeddings)
    np.testing.assert_array_equal(params["layer0"]["mlp"]["wo"], v["params"]["layer0"]["mlp"]["wo"])
    np.testing.assert_array_equal(params["layer3"]["attn"]["q"], v["params"]["layer3"]["attn"]["q"])
    # noise breaks the symmetry: copies differ from each other, their mean stays near the dense weight
    noisy, _ = up.upcycle_params(v["params"], mv["params"], [1, 3], noise=0.01, seed=1)
    wi = noisy["layer1"]["moe"]["experts"]["wi"]
    dense_wi = np.asarray(v["params"]["layer1"]["mlp"]["wi"])
    assert not np.array_equal(wi[0], wi[1])
    assert np.abs(wi - dense_wi).max() < 0.1 * np.abs(dense_wi).max()


def test_upcycle_transform_on_a_workdir_round_trip(data_dir, tmp_path):
    """run_transform end to end: a dense (scanned) workdir in, an MoE workdir out that
    load_trained reads and that computes the dense model's logits."""
    from routezoo.training import transform as T
    from routezoo.training.workdir import load_trained, write_step0_workdir
    c = _dense_cfg(data_dir, **{"model.scan_layers": True})
    model, v = _init(c.model)
    src = str(tmp_path / "dense")
    write_step0_workdir(src, c, v["params"], {}, np.zeros(2, np.uint32), record_name="made.json", record={})
    out = str(tmp_path / "moe")
    rec = T.run_transform("upcycle", src, out, {"num_experts": "4", "every": "1", "evaluate": "false"},
                          log=lambda *_: None)
    assert rec["report"]["max_logit_diff"] < 1e-4
    config, moe_model, state = load_trained(out, log=lambda *_: None)
    assert config.model.ffn == "moe" and config.model.moe.num_experts == 4 and config.model.scan_layers
    got, _ = _apply(moe_model, {"params": state.params, **state.model_state}, _tokens(3))
    dense, _ = _apply(model, v, _tokens(3))
    np.testing.assert_allclose(got, dense, rtol=1e-5, atol=1e-5)
    moe = _source(config, stack.to_unscanned(state.params, config.model))
    with pytest.raises(T.TransformError, match="needs a dense model"):   # refused before anything is computed
        _run("upcycle", moe)


# ------------------------------------------------------------------ Read-ME refactorization


def test_balanced_clustering_recovers_planted_groups():
    rng = np.random.default_rng(0)
    e, per, n = 4, 6, 200
    owner = rng.permutation(np.repeat(np.arange(e), per))          # neuron -> planted group
    token_group = rng.integers(0, e, n)                              # each token excites one group
    acts = rng.normal(size=(n, e * per)) * 0.05
    acts += (token_group[:, None] == owner[None, :]) * rng.uniform(1, 2, size=(n, e * per))
    shared, groups = up.cluster_neurons(acts, e, 0, seed=3)
    assert shared.size == 0 and groups.shape == (e, per)
    assert sorted(groups.reshape(-1).tolist()) == list(range(e * per))   # a partition
    for g in groups:
        assert len(set(owner[g].tolist())) == 1                           # one planted group each
    # shared neurons: the most active ones; the rest still a balanced partition
    acts[:, [3, 7]] += 10.0
    shared, groups = up.cluster_neurons(acts, 2, 2, seed=0)
    assert shared.tolist() == [3, 7] and groups.shape == (2, 11)
    assert sorted(np.concatenate([shared, groups.reshape(-1)]).tolist()) == list(range(e * per))
    with pytest.raises(ValueError, match="do not split"):
        up.cluster_neurons(acts, 5, 0)


@pytest.mark.parametrize("mlp_type,shared", [("swiglu", 0), ("swiglu", 8), ("relu", 4)])
def test_carved_experts_all_active_at_weight_one_are_the_dense_mlp(mlp_type, shared):
    from routezoo.layers.mlp import MLP
    from routezoo.layers.moe.dropless import dropless_moe
    rng = np.random.default_rng(4)
    d, f, e = 16, 40, 4
    x = jnp.asarray(rng.normal(size=(1, 12, d)), jnp.float32)
    mlp = MLP(f, mlp_type)
    mp = jax.device_get(nn.unbox(mlp.init(jax.random.key(0), x))["params"])
    dense = np.asarray(mlp.apply({"params": mp}, x))
    shared_idx, groups = up.cluster_neurons(rng.normal(size=(50, f)), e, shared, seed=1)
    experts, shared_mlp = up.carve_mlp(mp, groups, shared_idx)
    t = 12
    idx = jnp.broadcast_to(jnp.arange(e, dtype=jnp.int32), (t, e))
    y = dropless_moe(x.reshape(t, d), idx, jnp.ones((t, e), jnp.float32),
                     {k: jnp.asarray(v) for k, v in experts.items()}, expert_type=mlp_type, gmm_backend="dense")
    y = np.asarray(y).reshape(1, t, d)
    if shared:
        y = y + np.asarray(MLP(shared, mlp_type).apply({"params": shared_mlp}, x))
    else:
        assert shared_mlp is None
    np.testing.assert_allclose(y, dense, rtol=1e-5, atol=1e-5)


def test_readme_transform_carves_and_distils_the_pregate(data_dir):
    c = _dense_cfg(data_dir, **{"train.batch_size": 8, "model.num_layers": 2})
    _, v = _init(c.model)
    source = _source(c, v["params"])
    result, ctx = _run("upcycle", source, method="readme", num_experts=4, shared_fraction=0.25,
                       calibration_batches=1, router_steps=2, evaluate=False)
    m = result.config.model
    assert m.moe.router == "pregate" and m.moe.k == 1 and m.moe.num_experts == 4
    assert m.moe.expert_dim == 12 and m.moe.num_shared_experts == 1 and m.moe.shared_expert_dim == 16
    rep = result.report
    assert rep["shared_neurons"] == 16 and rep["expert_neurons"] == 12 and rep["calibration_tokens"] > 0
    phase = rep["distill_phases"][0]
    assert phase["phase"] == "router" and phase["kl_first"] > 0
    # the router phase moves only the pre-gate: the carved experts and everything else stay exact
    for i in (0, 1):
        ex = result.params[f"layer{i}"]["moe"]
        dense = {k: np.asarray(w) for k, w in v["params"][f"layer{i}"]["mlp"].items()}
        union = np.concatenate([ex["shared_experts"]["wi"], *np.asarray(ex["experts"]["wi"])], axis=1)
        assert sorted(map(tuple, union.T.tolist())) == sorted(map(tuple, dense["wi"].T.tolist()))
    np.testing.assert_array_equal(result.params["embed"]["embedding"], v["params"]["embed"]["embedding"])
    y = result.params["pregate"]["embed"]["embedding"].shape[1]
    assert not np.array_equal(result.params["pregate"]["embed"]["embedding"],
                              np.asarray(v["params"]["embed"]["embedding"])[:, :y])   # trained
    assert "teacher_workdir" not in rep   # an in-memory source is no workdir to distil from later


# ------------------------------------------------------------------ layer skipping


def test_skip_schedule():
    for n in (2, 5, 8, 12, 32):
        assert ls.skip_schedule(n, 1.0) == ()
        for r in (1.25, 1.5, 2.0, 3.0, 4.0):
            skip = ls.skip_schedule(n, r)
            kept = [i for i in range(n) if i not in skip]
            assert len(kept) == max(min(n, 2), round(n / r))
            assert kept[0] == 0 and kept[-1] == n - 1
            # balanced: the runs of skipped layers between kept ones differ by at most one
            runs = np.diff(kept) - 1
            assert np.ptp(runs) <= 1
    assert ls.skip_schedule(8, 2.0) == (1, 3, 4, 6)
    with pytest.raises(ValueError, match=">= 1"):
        ls.skip_schedule(8, 0.5)


@pytest.mark.parametrize("scan", [False, True])
@pytest.mark.parametrize("ffn", ["mlp", "moe"])
def test_skipped_layers_equal_the_model_without_them(data_dir, scan, ffn):
    kw = {"model.scan_layers": scan, "model.ffn": ffn, "model.moe.every": 2, "model.moe.num_experts": 4}
    c = _dense_cfg(data_dir, **kw)
    model, v = _init(c.model)
    tokens = _tokens(7)
    full, full_aux = _apply(model, v, tokens)
    nothing, _ = _apply(zoo.build(ls.with_skip(c.model, ())), v, tokens)
    np.testing.assert_array_equal(nothing, full)
    skip = (1, 2)
    got, aux = _apply(zoo.build(ls.with_skip(c.model, skip)), v, tokens)
    small_cfg, small = ls.drop_layers(stack.to_unscanned(v["params"], c.model), stack.with_scan(c.model, False),
                                      skip)
    ref, ref_aux = _apply(zoo.build(small_cfg), {"params": small}, tokens)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    assert np.abs(np.asarray(full) - np.asarray(ref)).max() > 1e-3
    # the skipped layers' statistics and losses are gone
    assert not any(k.startswith(("layer1/", "layer2/")) for k in aux["stats"])
    if ffn == "moe":   # layer 3 (kept) is layer 1 of the smaller model
        np.testing.assert_allclose(aux["losses"]["load_balance"], ref_aux["losses"]["load_balance"], rtol=1e-5)


def test_layer_skip_transform(data_dir):
    c = _dense_cfg(data_dir, **{"model.scan_layers": True, "train.eval_steps": 1})
    _, v = _init(c.model)
    source = _source(c, stack.to_unscanned(v["params"], c.model))
    same, _ = _run("layer_skip", source, speedup=1.0, speedups="", timing=False, evaluate=False)
    assert same.config.model.to_dict() == c.model.to_dict()
    for a, b in zip(jax.tree.leaves(same.params), jax.tree.leaves(source.params)):
        np.testing.assert_array_equal(a, b)
    result, _ = _run("layer_skip", source, speedup=2.0, speedups="1,2,4", timing=True)
    assert result.config.model.skip_layers == "1,2" and not result.config.model.scan_layers
    rows = {r["speedup"]: r for r in result.report["by_speedup"]}
    assert rows[1.0]["skip_layers"] == [] and rows[4.0]["skip_layers"] == [1, 2]
    assert all(r["forward_seconds"] > 0 and np.isfinite(r["eval_loss"]) for r in rows.values())
    dropped, _ = _run("layer_skip", source, speedup=2.0, mode="drop", speedups="", timing=False, evaluate=False)
    assert dropped.config.model.num_layers == 2
    assert sorted(k for k in dropped.params if k.startswith("layer")) == ["layer0", "layer1"]
    np.testing.assert_array_equal(dropped.params["layer1"]["mlp"]["wi"], source.params["layer3"]["mlp"]["wi"])


# ------------------------------------------------------------------ unlearning (UOE)


def test_gate_mass_and_attribution_by_hand():
    from routezoo.training.transform.unlearn import attribute, gate_mass
    stats = {"layers": [1, 3],
             "indices": [np.array([[0, 2], [2, -1], [1, 2]]), np.array([[3, 0], [0, 1], [0, 3]])],
             "weights": [np.array([[0.5, 0.5], [1.0, 0.0], [0.25, 0.75]]),
                         np.array([[0.6, 0.4], [0.9, 0.1], [0.8, 0.2]])]}
    maps = {1: np.array([0, 1, 2, 3]), 3: np.array([0, 0, 1, 2])}   # layer 3: outputs 0, 1 share expert 0
    g = gate_mass(stats, maps, 4)
    np.testing.assert_allclose(g[1], [0.5 / 3, 0.25 / 3, (0.5 + 1.0 + 0.75) / 3, 0.0])
    np.testing.assert_allclose(g[3], [(0.4 + 0.9 + 0.1 + 0.8) / 3, 0.0, (0.6 + 0.2) / 3, 0.0])
    retain = {1: np.array([0.0, 0.0, 0.7, 0.0]), 3: np.array([0.1, 0.0, 0.0, 0.0])}
    assert attribute(g, retain, "forget")[:2] == (1, 2)        # the largest forget mass
    assert attribute(g, retain, "contrast")[:2] == (3, 0)      # the largest forget-minus-retain
    assert attribute(g, retain, "contrast", layer=1)[:2] == (1, 0)


@pytest.fixture(scope="module")
def moe_source(data_dir):
    from routezoo.training import data as data_lib
    c = _dense_cfg(data_dir, **{"model.num_layers": 2, "model.ffn": "moe", "model.moe.num_experts": 4,
                                "train.batch_size": 8, "train.eval_steps": 1})
    _, v = _init(c.model)
    assert set(v) == {"params"}
    tasks = data_lib.available_tasks(c.data)
    with_eval = data_lib.available_tasks(c.data, c.data.eval_split)
    names = sorted((n for n in tasks if n in with_eval), key=lambda n: (-tasks[n], n))[:3]
    return _source(c, v["params"]), names


def test_unlearn_touches_only_the_chosen_expert_and_its_router(moe_source):
    source, (forget, *retain) = moe_source
    result, _ = _run("unlearn", source, forget=forget, retain=",".join(retain), steps=3, calibration_batches=1,
                     learning_rate=1e-2, evaluate=False)
    rep = result.report
    layer, expert = rep["target"]["layer"], rep["target"]["expert"]
    assert layer in (0, 1) and 0 <= expert < 4
    router = f"layer{layer}/moe/router/"
    experts = f"layer{layer}/moe/experts/"
    flat_src = {"/".join(str(k.key) for k in p): np.asarray(x)
                for p, x in jax.tree_util.tree_leaves_with_path(source.params)}
    flat_new = {"/".join(str(k.key) for k in p): np.asarray(x)
                for p, x in jax.tree_util.tree_leaves_with_path(result.params)}
    assert flat_src.keys() == flat_new.keys()
    changed_router = False
    for path, old in flat_src.items():
        new = flat_new[path]
        if path.startswith(router):
            changed_router |= not np.array_equal(old, new)
        elif path.startswith(experts):
            others = [i for i in range(old.shape[0]) if i != expert]
            np.testing.assert_array_equal(new[others], old[others])   # the other experts bit for bit
            assert not np.array_equal(new[expert], old[expert])
        else:
            np.testing.assert_array_equal(new, old)                    # everything else bit for bit
    assert changed_router
    assert set(rep["uoe"]["changed"]) <= {p for p in flat_src if p.startswith((router, experts))}
    # gradient ascent raised the forget loss; the whole-model baseline changed (nearly) everything
    assert rep["uoe"]["forget_ce_last"] > rep["uoe"]["forget_ce_first"]
    assert len(rep["whole_model"]["changed"]) > len(rep["uoe"]["changed"]) + 10
    assert 0.0 <= rep["uoe"]["target_share"] <= 1.0


def test_unlearn_npo_and_refusals(moe_source):
    from routezoo.training import transform as T
    source, (forget, *retain) = moe_source
    result, _ = _run("unlearn", source, forget=forget, retain=retain[0], steps=2, calibration_batches=1,
                     objective="npo", baseline=False, evaluate=False, learning_rate=1e-2)
    assert len(result.report["uoe"]["changed"]) >= 2 and "whole_model" not in result.report
    with pytest.raises(T.TransformError, match="no stdlib package"):
        _run("unlearn", source, forget="no_such_package")
    with pytest.raises(T.TransformError, match="objective"):
        _run("unlearn", source, forget=forget, objective="rmu")
    assert T.get_transform("unlearn").needs_moe   # run_transform refuses dense sources before it runs


def test_hf_export_of_a_skipping_model_leaves_the_skipped_layers_out(data_dir, tmp_path):
    import json
    import os
    import re

    from routezoo.zoo import hf
    from routezoo.zoo.hf import safetensors_io
    c = _dense_cfg(data_dir, **{"model.scale_tied_logits": False})   # a Llama layout
    _, v = _init(c.model)
    out = str(tmp_path / "hf")
    hf.to_hf(ls.with_skip(c.model, (1, 2)), v["params"], out)
    assert json.load(open(os.path.join(out, "config.json")))["num_hidden_layers"] == 2
    names = safetensors_io.hf_tensor_names(out)
    assert {int(m.group(1)) for n in names for m in [re.search(r"layers\.(\d+)\.", n)] if m} == {0, 1}
    name = next(n for n in names if "layers.1." in n and "down_proj" in n)
    with safetensors_io.hf_reader(out) as reader:   # layer 1 of the export is layer 3 of the model
        got = reader.get(name, tuple(slice(None) for _ in reader.shape(name)))
    np.testing.assert_array_equal(got.T, np.asarray(v["params"]["layer3"]["mlp"]["wo"]))
