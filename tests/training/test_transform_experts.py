"""Expert merging (MC-SMoE), compression and AdaMoE's null experts: the maths on arrays
(routezoo.zoo.expert_ops) against references, and the transforms on a tiny model."""

import itertools

import numpy as np
import pytest

from routezoo.zoo import expert_ops as ops


def _experts(rng, e=4, d=6, f=5, gate=True):
    out = {"wi": rng.normal(size=(e, d, f)), "wo": rng.normal(size=(e, f, d))}
    if gate:
        out["wi_gate"] = rng.normal(size=(e, d, f))
    return out


def _expert_fn(ex, x):
    """One SwiGLU (or GELU-free linear-unit) expert on x [T, D], numpy reference."""
    h = x @ ex["wi"]
    if "wi_gate" in ex:
        g = x @ ex["wi_gate"]
        h = h * (g / (1.0 + np.exp(-g)))
    else:
        h = np.maximum(h, 0.0)
    return h @ ex["wo"]


# ------------------------------------------------------------------ assignment and alignment


def test_linear_assignment_is_the_best_permutation():
    rng = np.random.default_rng(0)
    for n in (1, 2, 3, 5, 6):
        for _ in range(5):
            s = rng.normal(size=(n, n))
            perm = ops.linear_assignment(s)
            assert sorted(perm.tolist()) == list(range(n))
            best = max(sum(s[i, p[i]] for i in range(n)) for p in itertools.permutations(range(n)))
            assert s[np.arange(n), perm].sum() == pytest.approx(best, abs=1e-9)


def test_linear_assignment_matches_scipy_on_larger_matrices():
    scipy_opt = pytest.importorskip("scipy.optimize")
    rng = np.random.default_rng(1)
    for n in (17, 40):
        s = rng.normal(size=(n, n))
        rows, cols = scipy_opt.linear_sum_assignment(s, maximize=True)
        perm = ops.linear_assignment(s)
        assert s[np.arange(n), perm].sum() == pytest.approx(s[rows, cols].sum(), abs=1e-9)


def test_neuron_alignment_recovers_a_known_permutation():
    rng = np.random.default_rng(2)
    for gate in (True, False):
        ex = {k: v[0] for k, v in _experts(rng, e=1, d=8, f=12, gate=gate).items()}
        perm = rng.permutation(12)
        shuffled = ops.permute_neurons(ex, perm)
        # the permuted expert computes the same function
        x = rng.normal(size=(7, 8))
        np.testing.assert_allclose(_expert_fn(shuffled, x), _expert_fn(ex, x), rtol=1e-10, atol=1e-10)
        back = ops.neuron_alignment(ex, shuffled)
        aligned = ops.permute_neurons(shuffled, back)
        for name in ex:
            np.testing.assert_array_equal(aligned[name], ex[name])
        # unit a of the aligned expert is the shuffled one's unit back[a]: the inverse of perm
        np.testing.assert_array_equal(perm[back], np.arange(12))


# ------------------------------------------------------------------ grouping and merging


def test_similarity_and_grouping():
    rng = np.random.default_rng(3)
    base = rng.normal(size=(50, 3))
    # columns 3, 4 are noisy copies of 0 and 2; expert 5 copies 1
    logits = np.concatenate([base, base[:, [0, 2]] + 0.01 * rng.normal(size=(50, 2)),
                             base[:, [1]] * 2.0], axis=1)
    sim = ops.logit_similarity(logits)
    h = logits / np.linalg.norm(logits, axis=0)
    np.testing.assert_allclose(sim, (h.T @ h + 1) / 2, rtol=1e-12)
    assert np.all(sim <= 1 + 1e-12) and np.all(sim >= -1e-12)
    usage = np.array([10.0, 9.0, 8.0, 1.0, 2.0, 3.0])
    dominant, group = ops.group_experts(usage, sim, 3)
    np.testing.assert_array_equal(dominant, [0, 1, 2])
    np.testing.assert_array_equal(group, [0, 1, 2, 0, 2, 1])
    # dominant experts are the most used, in index order; ties go to the lower index
    dominant, group = ops.group_experts(np.array([1.0, 5.0, 5.0, 5.0, 0.0, 0.0]), sim, 2)
    np.testing.assert_array_equal(dominant, [1, 2])
    assert group[1] == 0 and group[2] == 1


def test_expert_usage_counts_routed_copies_through_the_map():
    indices = np.array([[0, 3], [3, -1], [1, 2], [2, 0]])
    valid = np.array([True, True, True, False])
    usage = ops.expert_usage(indices, np.array([0, 1, 1, 0]), 2, valid)
    np.testing.assert_array_equal(usage, [3.0, 2.0])   # outputs 0, 3 -> 0; 1, 2 -> 1
    np.testing.assert_array_equal(ops.expert_usage(indices, ops.identity_map(4), 4), [2, 1, 2, 2])


def test_physical_logits_logsumexp_over_the_outputs_of_an_expert():
    rng = np.random.default_rng(4)
    h = rng.normal(size=(9, 4))
    np.testing.assert_allclose(ops.physical_logits(h, ops.identity_map(4), 4), h)
    out = ops.physical_logits(h, np.array([1, 0, 1, 1]), 3)
    np.testing.assert_allclose(out[:, 0], h[:, 1])
    np.testing.assert_allclose(out[:, 1], np.log(np.exp(h[:, [0, 2, 3]]).sum(1)))
    np.testing.assert_array_equal(out[:, 2], 0.0)


def test_merging_identical_experts_changes_nothing():
    rng = np.random.default_rng(5)
    one = _experts(rng, e=1, d=6, f=9)
    # expert 1 is expert 0 with its hidden units shuffled: the same function
    shuffled = ops.permute_neurons({n: w[0] for n, w in one.items()}, rng.permutation(9))
    two = {k: np.concatenate([v, shuffled[k][None]]) for k, v in one.items()}
    for method in ("mc_smoe", "average"):
        for usage in ([3.0, 1.0], [0.0, 0.0]):
            group, dominant = np.array([0, 0]), np.array([0])
            merged, _ = ops.merge_experts(two if method == "mc_smoe" else
                                          {k: np.concatenate([v, v]) for k, v in one.items()},
                                          group, dominant, np.array(usage), method)
            for name in one:
                np.testing.assert_allclose(merged[name], one[name], rtol=1e-12, atol=1e-12)


def test_frequency_weighted_average_by_hand():
    rng = np.random.default_rng(6)
    ex = _experts(rng, e=5, d=6, f=8)
    # members of group 0 are small perturbations of its dominant expert 2: alignment keeps them
    for e in (0, 4):
        for name in ex:
            ex[name][e] = ex[name][2] + 1e-3 * rng.normal(size=ex[name][2].shape)
    group = np.array([0, 1, 0, 1, 0])
    dominant = np.array([2, 3])
    usage = np.array([2.0, 7.0, 5.0, 1.0, 3.0])
    merged, info = ops.merge_experts(ex, group, dominant, usage, "mc_smoe")
    assert all(np.array_equal(p, np.arange(8)) for e, p in info["permutations"].items() if group[e] == 0)
    for name in ex:
        hand0 = (2.0 * ex[name][0] + 5.0 * ex[name][2] + 3.0 * ex[name][4]) / 10.0
        np.testing.assert_allclose(merged[name][0], hand0, rtol=1e-12)
    np.testing.assert_allclose(info["weights"], [0.2, 7 / 8, 0.5, 1 / 8, 0.3])
    # the same group with its members' units shuffled: alignment undoes the shuffles first
    shuffled = {k: v.copy() for k, v in ex.items()}
    for e in (0, 4):
        p = ops.permute_neurons({n: w[e] for n, w in ex.items()}, rng.permutation(8))
        for name in ex:
            shuffled[name][e] = p[name]
    again, _ = ops.merge_experts(shuffled, group, dominant, usage, "mc_smoe")
    for name in ex:
        np.testing.assert_allclose(again[name][0], merged[name][0], rtol=1e-12)
    # average: the plain mean, unaligned
    avg, _ = ops.merge_experts(ex, group, dominant, usage, "average")
    for name in ex:
        np.testing.assert_allclose(avg[name][1], (ex[name][1] + ex[name][3]) / 2, rtol=1e-12)


def test_merged_map_and_pruning():
    group = np.array([0, 1, 0, 2, 1])
    np.testing.assert_array_equal(ops.merged_expert_map(ops.identity_map(5), group), group)
    np.testing.assert_array_equal(ops.merged_expert_map(np.array([4, 3, 2, 1, 0]), group), [1, 2, 0, 1, 0])
    rng = np.random.default_rng(7)
    ex = _experts(rng, e=5)
    kernel = rng.normal(size=(6, 5))
    usage = np.array([4.0, 1.0, 9.0, 0.0, 4.0])
    pruned, k2, m2, outs = ops.prune_experts(ex, kernel, ops.identity_map(5), usage, 3)
    np.testing.assert_array_equal(outs, [0, 2, 4])          # the three most used
    np.testing.assert_array_equal(m2, [0, 1, 2])
    np.testing.assert_array_equal(k2, kernel[:, [0, 2, 4]])
    for name in ex:
        np.testing.assert_array_equal(pruned[name], ex[name][[0, 2, 4]])
    # through a many-to-one map: outputs reaching a dropped expert go with it
    pruned, k2, m2, outs = ops.prune_experts({n: w[:3] for n, w in ex.items()}, kernel,
                                             np.array([0, 1, 2, 1, 0]), np.array([5.0, 1.0, 3.0]), 2)
    np.testing.assert_array_equal(outs, [0, 2, 4])
    np.testing.assert_array_equal(m2, [0, 1, 0])


# ------------------------------------------------------------------ compression


def test_low_rank_plus_sparse():
    rng = np.random.default_rng(8)
    w = rng.normal(size=(12, 7))
    u, v, s = ops.low_rank_plus_sparse(w, 7, 0.0)
    np.testing.assert_allclose(u @ v + s, w, atol=1e-10)
    u, v, s = ops.low_rank_plus_sparse(w, 0, 1.0)
    np.testing.assert_array_equal(u @ v + s, w)
    errors = []
    for r in range(8):
        u, v, s = ops.low_rank_plus_sparse(w, r, 0.1)
        assert u.shape == (12, r) and v.shape == (r, 7)
        assert np.count_nonzero(s) == round(0.1 * 84)
        errors.append(np.linalg.norm(w - u @ v - s))
        # the low-rank part is the best rank-r approximation (Eckart-Young)
        sv = np.linalg.svd(w, compute_uv=False)
        assert np.linalg.norm(w - u @ v) == pytest.approx(np.sqrt(np.sum(sv[r:] ** 2)), rel=1e-9, abs=1e-9)
    assert all(a > b for a, b in zip(errors, errors[1:-1])) and errors[-1] < 1e-9
    # the sparse part takes the largest residual entries
    u, v, s = ops.low_rank_plus_sparse(w, 2, 0.2)
    resid = np.abs(w - u @ v)
    kept = np.abs(s) > 0
    assert resid[kept].min() >= resid[~kept].max()
    # error decreases with density at fixed rank
    errs = []
    for dd in (0.0, 0.3, 0.6, 1.0):
        u, v, s = ops.low_rank_plus_sparse(w, 2, dd)
        errs.append(np.linalg.norm(w - u @ v - s))
    assert errs[0] > errs[1] > errs[2] > errs[3]
    assert ops.compressed_size((12, 7), ops.rank_for_rate((12, 7), 0.5, 0.1), 0.1) <= 0.5 * 84


# ------------------------------------------------------------------ null experts


def test_tiled_null_columns_keep_the_top_k_choice():
    rng = np.random.default_rng(9)
    x = rng.normal(size=(200, 6))
    kernel = rng.normal(size=(6, 4))
    for z, k in ((4, 2), (8, 1), (8, 2), (8, 3)):
        new = ops.null_router_kernel(kernel, z)
        assert new.shape == (6, 4 + z)
        np.testing.assert_array_equal(new[:, 4:], kernel[:, np.arange(z) % 4])
        lo, hi = ops.null_k_range(k, 4, z)
        assert hi == ops.tiled_null_k(k, 4, z) == k * (4 + z) // 4
        h, h2 = x @ kernel, x @ new
        top = [sorted(t.tolist()) for t in np.argsort(-h, axis=1, kind="stable")[:, :k]]
        for k2 in range(1, 4 + z + 1):
            top2 = np.argsort(-h2, axis=1, kind="stable")[:, :k2]
            real = [sorted(t[t < 4].tolist()) for t in top2]
            assert (real == top) == (lo <= k2 <= hi), (z, k, k2)
    with pytest.raises(ValueError):
        ops.tiled_null_k(2, 4, 6)


# ------------------------------------------------------------------ the transforms on a tiny model

MOE = {"model.ffn": "moe", "model.moe.num_experts": 4, "model.moe.k": 2, "train.steps": 3,
       "checkpoint.every": 3, "train.eval_steps": 1}


@pytest.fixture(scope="module")
def moe_run(data_dir, tmp_path_factory):
    from conftest import tiny_config
    from routezoo.training.train import train_and_evaluate
    wd = str(tmp_path_factory.mktemp("experts_src"))
    train_and_evaluate(tiny_config(data_dir, **MOE), wd)
    return wd


@pytest.fixture(scope="module")
def source(moe_run):
    from routezoo.training import transform as T
    return T.load_source(moe_run, log=lambda *_: None)


def _run(name, source, **opts):
    """The transform ``name`` on an in-memory source; ``(result, ctx)``."""
    from routezoo.training import transform as T
    t = T.get_transform(name)
    ctx = T.Context(source, log=lambda *_: None)
    return t.fn(source, T.parse_options(t, {"evaluate": False, **opts} if "evaluate" in t.options else opts),
                ctx), ctx


def _with_params(source, params):
    import dataclasses
    return dataclasses.replace(source, params=params)


def _logits(ctx, config, params, model_state, batch):
    return np.asarray(ctx.apply(config, params, model_state, batch["inputs"])[0])


def test_add_null_experts_keeps_the_outputs_at_init(source):
    result, ctx = _run("add_null_experts", source, calibration_batches=1)
    moe = result.config.model.moe
    assert moe.router == "null_experts" and moe.num_null_experts == 4 and moe.k == 4
    assert result.report["routing_preserved_at_init"]
    for layer in source.moe_layers:
        old = source.params[f"layer{layer}"]["moe"]["router"]["kernel"]
        new = result.params[f"layer{layer}"]["moe"]["router"]["kernel"]
        np.testing.assert_array_equal(new, np.concatenate([old, old], axis=1))
    batch = ctx.batches(1)[0]
    want = _logits(ctx, source.config, source.params, source.model_state, batch)
    np.testing.assert_allclose(_logits(ctx, result.config, result.params, result.model_state, batch), want,
                               rtol=1e-5, atol=1e-5)
    assert result.report["real_experts_per_token"]["mean"] == pytest.approx(2.0)
    assert result.report["real_experts_per_token_source"]["mean"] == pytest.approx(2.0)
    # AdaMoE's recipe, Z = 2R nulls and k' = 2k: the real column ranks first among equal logits
    recipe, _ = _run("add_null_experts", source, num_null_experts=8, k=4, calibration_batches=0)
    assert recipe.report["routing_preserved_at_init"]
    assert recipe.report["balanced_real_experts_per_token"] == pytest.approx(4 * 4 / 12)
    np.testing.assert_allclose(_logits(ctx, recipe.config, recipe.params, recipe.model_state, batch), want,
                               rtol=1e-5, atol=1e-5)


def test_compress_at_full_rank_or_density_one_is_exact(source):
    full = source.config.model.d_model   # min(D, F) with F = expert_dim = D here
    for opts in ({"rank": min(full, int(source.config.model.moe.expert_dim))}, {"density": 1.0}):
        result, _ = _run("compress", source, **opts)
        for layer in source.moe_layers:
            old = source.params[f"layer{layer}"]["moe"]["experts"]
            new = result.params[f"layer{layer}"]["moe"]["experts"]
            for name in old:
                np.testing.assert_allclose(new[name], old[name], rtol=1e-5, atol=1e-6)
        assert result.report["relative_error"] < 1e-6
    errors = [_run("compress", source, rank=r)[0].report["relative_error"] for r in (2, 8, 16)]
    assert errors[0] > errors[1] > errors[2] > 0


def test_prune_keeps_the_most_used_experts(source):
    result, ctx = _run("merge", source, merge_method="prune", num_experts=2, calibration_batches=2)
    stats = ctx.routing_stats(source.config, source.params, source.model_state, 2)
    assert result.config.model.moe.num_experts == 2 and result.config.model.moe.k == 2
    for layer, load in zip(stats["layers"], stats["load"]):
        keep = np.sort(np.argsort(-np.asarray(load), kind="stable")[:2])
        assert result.report["layers"][f"layer{layer}"]["kept"] == keep.tolist()
        old, new = source.params[f"layer{layer}"]["moe"], result.params[f"layer{layer}"]["moe"]
        np.testing.assert_array_equal(new["router"]["kernel"], old["router"]["kernel"][:, keep])
        for name in old["experts"]:
            np.testing.assert_array_equal(new["experts"][name], old["experts"][name][keep])


def _twin_source(source, rng):
    """``source`` with expert 1 of every MoE layer a copy of expert 0 with its hidden units
    shuffled (the same function) and router column 1 equal to column 0."""
    params = source.params
    from routezoo.training.transform.merge_experts import get_path, set_path
    for layer in source.moe_layers:
        path = (f"layer{layer}", "moe")
        block = get_path(params, path)
        experts = {k: np.array(v) for k, v in block["experts"].items()}
        twin = ops.permute_neurons({k: v[0] for k, v in experts.items()}, rng.permutation(experts["wi"].shape[-1]))
        for k in experts:
            experts[k][1] = twin[k]
        kernel = np.array(block["router"]["kernel"])
        kernel[:, 1] = kernel[:, 0]
        params = set_path(params, path + ("experts",), experts)
        params = set_path(params, path + ("router", "kernel"), kernel)
    return _with_params(source, params)


def test_merging_identical_experts_in_a_model_changes_nothing(source, monkeypatch):
    from routezoo.training.transform import merge_experts as M
    real = M.calibrate

    def calibrate(*args, **kwargs):   # the routing counts make expert 1 the least used
        stats = real(*args, **kwargs)
        for entry in stats.values():
            n = entry["indices"].shape[0]
            entry["indices"] = np.tile(np.array([[0, 2], [0, 3], [2, 3], [1, 0]]), (n // 4 + 1, 1))[:n]
        return stats

    monkeypatch.setattr(M, "calibrate", calibrate)
    twins = _twin_source(source, np.random.default_rng(10))
    result, ctx = _run("merge", twins, num_experts=3, calibration_batches=1)
    for layer in source.moe_layers:
        rep = result.report["layers"][f"layer{layer}"]
        # the twins are one group (router-logit similarity 1), every other expert is its own
        assert rep["dominant"] == [0, 2, 3] and rep["group"] == [0, 0, 1, 2]
    assert result.config.model.moe.num_experts == 3
    batch = ctx.batches(1)[0]
    np.testing.assert_allclose(_logits(ctx, result.config, result.params, result.model_state, batch),
                               _logits(ctx, twins.config, twins.params, twins.model_state, batch),
                               rtol=1e-5, atol=1e-5)


def test_merged_model_is_the_many_to_one_map(source):
    """The merged model (E -> N experts, router kept, many-to-one map) computes what the
    source architecture computes with every expert replaced by its group's merged expert."""
    from routezoo.layers.moe.block import expand_expert_params, layer_expert_maps
    from routezoo.training.transform.merge_experts import set_path
    result, ctx = _run("merge", source, num_experts=2, merge_method="mc_smoe", calibration_batches=1)
    maps = layer_expert_maps(result.config.model.moe, len(source.moe_layers))
    expanded = result.params
    for layer, m in zip(source.moe_layers, maps):
        rep = result.report["layers"][f"layer{layer}"]
        assert list(m) == rep["group"]   # router output r -> its group's expert
        path = (f"layer{layer}", "moe", "experts")
        block = result.params[f"layer{layer}"]["moe"]
        np.testing.assert_array_equal(block["router"]["kernel"], source.params[f"layer{layer}"]["moe"]["router"]["kernel"])
        expanded = set_path(expanded, path, expand_expert_params(block["experts"], m))
    batch = ctx.batches(1)[0]
    np.testing.assert_allclose(_logits(ctx, result.config, result.params, result.model_state, batch),
                               _logits(ctx, source.config, expanded, source.model_state, batch),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name,flags,words", [
    ("merge", ["--config.transform.merge_method=zip"], "merge_method"),
    ("merge", ["--config.transform.num_experts=4"], "num_experts=4"),
    ("merge", ["--config.transform.bogus=1"], "no option"),
    ("compress", [], "rank"),
    ("compress", ["--config.transform.density=1.5"], "density"),
    ("add_null_experts", ["--config.transform.num_null_experts=3"], "multiple"),
    ("add_null_experts", ["--config.transform.k=9"], "k=9"),
])
def test_bad_options_one_line_exit_2_nothing_written(moe_run, tmp_path, capsys, name, flags, words):
    from routezoo.training import cli
    out = tmp_path / "out"
    assert cli.main(["transform", name, "--from", moe_run, "--workdir", str(out), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and words in err, err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_moe_blocks_outside_the_layers_are_refused(source):
    from routezoo.training.transform import TransformError
    extra = _with_params(source, {**source.params, "mtp1": {"block": {"moe": source.params["layer0"]["moe"]}}})
    for name in ("merge", "compress", "add_null_experts"):
        with pytest.raises(TransformError, match="outside its layers"):
            _run(name, extra, **({"rank": 2} if name == "compress" else {}))
