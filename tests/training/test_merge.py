"""Merging without training: the four methods on parameter trees (zoo/merge.py) against
their definitions and hand-worked examples, and ``routezoo merge`` on tiny runs
(training/merge.py): the merged workdir reads and trains as any run, and every refusal is
one line, exit 2, with nothing written."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from conftest import tiny_config
from routezoo.training import cli
from routezoo.zoo import merge as M
from routezoo.zoo import stack

# ------------------------------------------------------------------------ the methods on trees


def _tree(rng, scale=1.0, dtype=np.float32):
    return {"layer0": {"attn": {"q": (scale * rng.standard_normal((4, 2, 3))).astype(dtype)},
                       "norm": {"scale": (1 + scale * rng.standard_normal(4)).astype(dtype)}},
            "embed": (scale * rng.standard_normal((7, 4))).astype(dtype)}


def _bits(tree):
    return [np.asarray(x).tobytes() for x in jax.tree.leaves(tree)]


IDENTITY = [("task_arithmetic", {"scale": 1.0}), ("ties", {"density": 1.0, "scale": 1.0}),
            ("dare", {"density": 1.0, "scale": 1.0}), ("dare", {"density": 1.0, "scale": 1.0, "combine": "ties"}),
            ("breadcrumbs", {"top": 0.0, "bottom": 0.0, "scale": 1.0})]


@pytest.mark.parametrize("method, hyper", IDENTITY)
def test_one_task_vector_at_scale_one_is_that_model_bit_for_bit(method, hyper):
    rng = np.random.default_rng(0)
    base = _tree(rng)
    # far-apart magnitudes (a float32 difference of these is inexact) and a bfloat16 leaf
    finetuned = jax.tree.map(lambda b: (b + rng.standard_normal(b.shape).astype(b.dtype) * 1e3), base)
    finetuned["embed"][0, 0], base["embed"][0, 0] = 1.0, 1e-30
    base["bf16"] = rng.standard_normal(5).astype(jax.numpy.bfloat16)
    finetuned["bf16"] = (base["bf16"].astype(np.float32) + 0.3).astype(jax.numpy.bfloat16)
    merged = M.merge(method, base, [M.task_vector(finetuned, base)], **hyper)
    assert jax.tree.structure(merged) == jax.tree.structure(finetuned)
    assert [x.dtype for x in jax.tree.leaves(merged)] == [x.dtype for x in jax.tree.leaves(finetuned)]
    assert _bits(merged) == _bits(finetuned)


def test_task_arithmetic_is_base_plus_scaled_sum():
    rng = np.random.default_rng(1)
    base, a, b = _tree(rng), _tree(rng), _tree(rng)
    merged = M.task_arithmetic(base, [M.task_vector(a, base), M.task_vector(b, base)], scale=0.4)
    want = jax.tree.map(lambda x0, x1, x2: (x0.astype(np.float64) + 0.4 * (
        (x1.astype(np.float64) - x0) + (x2.astype(np.float64) - x0))).astype(np.float32), base, a, b)
    assert _bits(merged) == _bits(want)
    assert M.METHODS["task_arithmetic"].defaults == {"scale": 0.4}
    assert _bits(M.merge("task_arithmetic", base, [M.task_vector(a, base), M.task_vector(b, base)])) == _bits(want)


# Three task vectors over two tensors (5 entries in all), worked by hand at density 0.4:
# each keeps its 2 largest magnitudes over both tensors together.
TIES_VECTORS = [
    {"a": [0.5, -0.1], "b": [0.2, -0.9, 0.05]},   # keeps -0.9 (b1), 0.5 (a0)
    {"a": [-0.3, 0.4], "b": [0.6, 0.1, -0.2]},    # keeps 0.6 (b0), 0.4 (a1)
    {"a": [-0.7, 0.05], "b": [0.3, 0.8, 0.1]},    # keeps 0.8 (b1), -0.7 (a0)
]
TIES_TRIMMED = [{"a": [0.5, 0.0], "b": [0.0, -0.9, 0.0]},
                {"a": [0.0, 0.4], "b": [0.6, 0.0, 0.0]},
                {"a": [-0.7, 0.0], "b": [0.0, 0.8, 0.0]}]
# elect: sums a0 0.5-0.7=-0.2 (-), a1 0.4 (+), b0 0.6 (+), b1 -0.9+0.8=-0.1 (-), b2 0 (none)
TIES_SIGN = {"a": [-1.0, 1.0], "b": [1.0, -1.0, 0.0]}
# disjoint mean over the agreeing entries: a0 only -0.7 (not (0.5-0.7)/2), b1 only -0.9 (not -0.05)
TIES_MEAN = {"a": [-0.7, 0.4], "b": [0.6, -0.9, 0.0]}


def _arrays(tree):
    return jax.tree.map(lambda x: np.asarray(x, np.float64), tree, is_leaf=lambda x: isinstance(x, list))


def test_ties_matches_a_worked_example():
    vectors = [_arrays(v) for v in TIES_VECTORS]
    trimmed = [M.trim(v, 0.4) for v in vectors]
    for got, want in zip(trimmed, TIES_TRIMMED):
        jax.tree.map(np.testing.assert_array_equal, got, _arrays(want))
    jax.tree.map(np.testing.assert_array_equal, M.elect_sign(trimmed), _arrays(TIES_SIGN))
    jax.tree.map(np.testing.assert_allclose, M.disjoint_mean(trimmed, M.elect_sign(trimmed)), _arrays(TIES_MEAN))
    base = {"a": np.array([1.0, 2.0]), "b": np.array([3.0, 4.0, 5.0])}
    for scale in (1.0, 0.5):
        merged = M.merge("ties", base, vectors, density=0.4, scale=scale)
        want = jax.tree.map(lambda b, m: b + scale * m, base, _arrays(TIES_MEAN))
        jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=0, atol=1e-12), merged, want)


def test_ties_defaults_are_the_papers():
    assert M.METHODS["ties"].defaults == {"density": 0.2, "scale": 1.0}
    # the trim counts over the whole vector: 20% of 10 entries is the 2 largest, here both in 'b'
    v = {"a": np.arange(1.0, 6.0), "b": np.arange(6.0, 11.0) * -1}
    t = M.trim(v, 0.2)
    np.testing.assert_array_equal(t["a"], 0.0)
    np.testing.assert_array_equal(t["b"], [0, 0, 0, -9.0, -10.0])


def test_dare_rescaling_keeps_the_expectation():
    """The mean of DARE's merged vector over many seeds converges to the task vector. One
    entry ``x`` dropped with probability ``p = 1 - d`` and kept as ``x/d`` has mean ``x`` and
    variance ``x²(1-d)/d``; over ``S`` seeds the mean's standard error is ``|x|·sqrt((1-d)/(d·S))``."""
    rng = np.random.default_rng(2)
    tau = {"w": rng.standard_normal((20, 30)), "v": rng.standard_normal(40) * 10}
    base = jax.tree.map(np.zeros_like, tau)
    seeds, d = 300, 0.1
    samples = [M.merge("dare", base, [tau], density=d, scale=1.0, seed=s) for s in range(seeds)]
    for key in tau:
        stack_ = np.stack([s[key] for s in samples])
        x = tau[key]
        # every entry is either dropped (0) or kept and rescaled (x/d)
        assert np.all((stack_ == 0) | np.isclose(stack_, x / d, rtol=1e-12))
        se = np.abs(x) * np.sqrt((1 - d) / (d * seeds))
        z = (stack_.mean(0) - x) / se
        # each entry within 5 standard errors; the standardised errors average to ~N(0, 1/n)
        assert np.max(np.abs(z)) < 5.0, np.max(np.abs(z))
        assert abs(z.mean()) < 4.0 / np.sqrt(z.size), z.mean()
        # and the drop rate is p: kept fraction within 5 binomial standard errors of d
        kept = (stack_ != 0).mean()
        assert abs(kept - d) < 5 * np.sqrt(d * (1 - d) / stack_.size)
    # DARE's papers' defaults; a seed gives one mask, another seed another
    assert M.METHODS["dare"].defaults == {"density": 0.1, "scale": 1.0, "seed": 0, "combine": "task_arithmetic"}
    assert _bits(M.merge("dare", base, [tau], seed=3)) == _bits(M.merge("dare", base, [tau], seed=3))
    assert _bits(M.merge("dare", base, [tau], seed=3)) != _bits(M.merge("dare", base, [tau], seed=4))


def test_dare_with_ties_elects_and_averages_the_dropped_vectors():
    rng = np.random.default_rng(3)
    vectors = [{"w": rng.standard_normal(50)} for _ in range(3)]
    base = {"w": np.zeros(50)}
    dropped = [M.dare_drop(v, 0.5, np.random.default_rng([7, t])) for t, v in enumerate(vectors)]
    want = M.disjoint_mean(dropped, M.elect_sign(dropped))
    got = M.merge("dare", base, vectors, density=0.5, scale=1.0, seed=7, combine="ties")
    np.testing.assert_array_equal(got["w"], want["w"])


@pytest.mark.parametrize("top, bottom", [(0.05, 0.5), (0.007, 0.85), (0.0, 0.3), (0.1, 0.0)])
def test_breadcrumbs_masks_exactly_the_top_and_bottom_fractions_per_tensor(top, bottom):
    rng = np.random.default_rng(4)
    # distinct magnitudes, random signs; the second tensor 1000x larger, so one mask over
    # both tensors would keep nothing of the first
    sizes = {"small": (10, 20), "large": (1000,)}
    vector = {}
    for i, (key, shape) in enumerate(sizes.items()):
        n = int(np.prod(shape))
        magnitudes = (rng.permutation(n) + 1.0) * (1000.0 ** i)
        vector[key] = (magnitudes * rng.choice([-1.0, 1.0], n)).reshape(shape)
    masked = M.breadcrumbs_mask(vector, top=top, bottom=bottom)
    for key, x in vector.items():
        n = x.size
        rank = np.argsort(np.argsort(np.abs(x).ravel())).reshape(x.shape)   # 0 = smallest
        keep = (rank >= round(bottom * n)) & (rank < n - round(top * n))
        np.testing.assert_array_equal(masked[key], np.where(keep, x, 0.0))
        assert (masked[key] != 0).sum() == n - round(bottom * n) - round(top * n)
    # the method: base + scale * sum of the masked vectors
    base = jax.tree.map(np.ones_like, vector)
    other = jax.tree.map(lambda x: x[::-1].copy(), vector)
    got = M.merge("breadcrumbs", base, [vector, other], top=top, bottom=bottom, scale=0.3)
    want = jax.tree.map(lambda b, u, v: b + 0.3 * (u + v), base, masked, M.breadcrumbs_mask(other, top, bottom))
    jax.tree.map(np.testing.assert_allclose, got, want)


def test_breadcrumbs_defaults_are_the_papers():
    # beta = 0.85 (bottom percentile masked), gamma = 0.993 (above it masked)
    assert M.METHODS["breadcrumbs"].defaults == {"top": 0.007, "bottom": 0.85, "scale": 0.3}


@pytest.mark.parametrize("method, hyper, needle", [
    ("median", {}, "unknown merge method 'median'; allowed: task_arithmetic, ties, dare, breadcrumbs"),
    ("ties", {"top": 0.1}, "ties takes no top; its hyper-parameters: density, scale"),
    ("ties", {"density": 0.0}, "density must be in (0, 1], got 0.0"),
    ("dare", {"density": 1.5}, "density must be in (0, 1], got 1.5"),
    ("breadcrumbs", {"top": 0.2, "bottom": 0.8}, "top + bottom must be below 1"),
    ("task_arithmetic", {"scale": float("nan")}, "scale must be a finite number"),
    ("dare", {"combine": "mean"}, "unknown combine 'mean'; allowed: task_arithmetic, ties"),
])
def test_bad_hyperparameters_are_refused(method, hyper, needle):
    with pytest.raises(ValueError) as e:
        M.merge(method, {"w": np.zeros(3)}, [{"w": np.ones(3)}], **hyper)
    assert needle in str(e.value)


def test_vectors_of_another_shape_are_refused():
    with pytest.raises(ValueError, match=r"task vector 2: parameter w has shape \[4\], the base's is \[3\]"):
        M.merge("task_arithmetic", {"w": np.zeros(3)}, [{"w": np.ones(3)}, {"w": np.ones(4)}])
    with pytest.raises(ValueError, match="task vector 1 has no parameter v"):
        M.merge("task_arithmetic", {"w": np.zeros(3), "v": np.zeros(1)}, [{"w": np.ones(3)}])


# ------------------------------------------------------------------------ routezoo merge on runs

STEPS = 2


def _config_only(path, config):
    """A workdir holding only ``config.json``."""
    os.makedirs(path)
    with open(os.path.join(path, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=2, sort_keys=True))
    return str(path)


def _host(tree):
    return jax.tree.map(np.asarray, jax.device_get(tree))


@pytest.fixture(scope="module")
def runs(data_dir, tmp_path_factory):
    """A tiny scanned base trained for 2 steps; a full fine-tune of it (its checkpoint: the
    base's state with every parameter moved by noise, step 3) and a LoRA run on it (its
    adapter directory: random non-zero factors on ``attn/(q|v)|mlp/wo``, unscanned as adapter
    runs are), both written as runs write them, without training."""

    from routezoo import zoo
    from routezoo.layers import adapters as adapter_lib
    from routezoo.training.adapter_run import adapter_config, save_adapter
    from routezoo.training.checkpoint import Checkpointer
    from routezoo.training.state import init_variables
    from routezoo.training.train import train_and_evaluate
    from routezoo.training.workdir import load_trained
    from conftest import random_adapter

    root = tmp_path_factory.mktemp("merge")
    base, full, lora = (str(root / n) for n in ("base", "full", "lora"))
    train_and_evaluate(tiny_config(data_dir, **{"train.steps": STEPS, "checkpoint.every": STEPS,
                                                "train.eval_every": 100, "model.scan_layers": True}), base)
    base_config, _, state = load_trained(base)
    rng = np.random.default_rng(0)

    full_config = tiny_config(data_dir, **{"init.from_workdir": base, "model.scan_layers": True})
    _config_only(full, full_config)
    moved = state.replace(params=jax.tree.map(
        lambda x: np.asarray(x) + (0.05 * rng.standard_normal(x.shape)).astype(x.dtype), _host(state.params)))
    checkpointer = Checkpointer(os.path.join(full, "checkpoints"), keep=1, async_save=False, verify=True)
    checkpointer.save(3, moved, None)
    checkpointer.close()

    lora_config = tiny_config(data_dir, **{"init.from_workdir": base, "model.scan_layers": False,
                                           "adapter.method": "lora", "adapter.targets": "attn/(q|v)|mlp/wo"})
    _config_only(lora, lora_config)
    method = adapter_lib.from_config(adapter_config(lora_config))
    boxed = jax.eval_shape(init_variables(zoo.build(lora_config.model), lora_config), jax.random.PRNGKey(0))["params"]
    base_u = stack.to_unscanned(_host(state.params), base_config.model)
    adapter_params = random_adapter(method, boxed, scale=0.1)
    meta = {"method": "lora", "adapter": adapter_config(lora_config).to_dict(),
            "base_fingerprint": adapter_lib.fingerprint(base_u)}
    save_adapter(os.path.join(lora, "adapter"), adapter_params, meta, 3)
    lora_params = _host(jax.jit(method.merge)(base_u, adapter_params))   # its weights at inference
    return {"base": base, "full": full, "lora": lora, "base_config": base_config, "base_u": base_u,
            "model_state": _host(state.model_state),
            "finetuned": {"full": stack.to_unscanned(_host(moved.params), base_config.model), "lora": lora_params}}


def _merge(capsys, *argv):
    capsys.readouterr()
    code = cli.main(["merge", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_one_run_at_scale_one_gives_that_run(runs, tmp_path, capsys):
    from routezoo.training.workdir import load_trained

    for src in ("full", "lora"):
        out = str(tmp_path / src)
        code, stdout, err = _merge(capsys, "--method", "task_arithmetic", "--scale", "1", "--base", runs["base"],
                                   "--from", runs[src], "--workdir", out)
        assert code == 0, err
        config, _, merged = load_trained(out)
        assert stack.is_scanned(config.model) and not config.adapter.method
        assert os.listdir(os.path.join(out, "checkpoints")) == ["0"] and int(merged.step) == 0
        got = stack.to_unscanned(_host(merged.params), config.model)
        assert _bits(got) == _bits(runs["finetuned"][src]), src
        assert _bits(got) != _bits(runs["base_u"])
        info = json.load(open(os.path.join(out, "merge.json")))
        assert info["method"] == "task_arithmetic" and info["hyperparameters"] == {"scale": 1.0}
        assert info["sources"] == [{"workdir": runs[src], "kind": "full fine-tune" if src == "full" else
                                    "adapter (lora)", "step": 3}]
        assert "task vector 1" in stdout


@pytest.mark.parametrize("method", list(M.METHODS))
def test_each_method_on_two_runs(runs, tmp_path, capsys, method):
    """The workdir holds exactly ``zoo.merge`` of the runs' task vectors (in the unscanned
    layout, moved back to the base's) and the base's model state; the sources are left as
    they were."""
    from routezoo.training.workdir import load_trained

    before = {k: sorted(os.listdir(runs[k])) for k in ("base", "full", "lora")}
    out = str(tmp_path / method)
    code, _, err = _merge(capsys, "--method", method, "--base", runs["base"], "--from",
                          f"{runs['full']},{runs['lora']}", "--workdir", out)
    assert code == 0, err
    _, _, merged = load_trained(out)
    vectors = [M.task_vector(runs["finetuned"][k], runs["base_u"]) for k in ("full", "lora")]
    want = stack.to_layout(M.merge(method, runs["base_u"], vectors), runs["base_config"].model)
    assert _bits(_host(merged.params)) == _bits(want)
    assert _bits(_host(merged.model_state)) == _bits(runs["model_state"])
    assert {k: sorted(os.listdir(runs[k])) for k in ("base", "full", "lora")} == before


def test_merged_workdir_trains(runs, tmp_path, capsys):
    """``routezoo train`` with the base's config resumes the merged workdir from step 0 (its
    parameters, the base's data position); ``--config.init.from`` reads it as any run."""
    from routezoo.training.train import train_and_evaluate
    from routezoo.training.workdir import read_workdir_config

    out = str(tmp_path / "merged")
    assert _merge(capsys, "--method", "ties", "--base", runs["base"], "--from", f"{runs['full']},{runs['lora']}",
                  "--workdir", out)[0] == 0
    config = read_workdir_config(out)
    config.train.steps = 1
    result = train_and_evaluate(config, out)
    assert result["step"] == 1 and np.isfinite(result["loss"])
    records = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["step"] for r in records if "eval_loss" in r] == [0, 1]
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == ["0", "1"]


# ------------------------------------------------------------------------ refusals


def _refused(capsys, argv, needle, out):
    """``routezoo merge ARGV`` exits 2 with one stderr line holding ``needle``; ``out`` is
    left as it was (absent, or with the same entries)."""
    before = sorted(os.listdir(out)) if os.path.isdir(out) else None
    code, _, err = _merge(capsys, *argv)
    err = err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("routezoo: error: merge:") and needle in err, err
    assert (sorted(os.listdir(out)) if os.path.isdir(out) else None) == before
    assert not [n for n in os.listdir(os.path.dirname(out)) if n.startswith(".")]   # no staging left


def test_refuses_bad_flags(runs, tmp_path, capsys):
    out = str(tmp_path / "out")
    src = ["--base", runs["base"], "--from", runs["full"], "--workdir", out]
    _refused(capsys, ["--method", "median", *src], "argument --method: invalid choice: 'median' (choose from "
             "'task_arithmetic', 'ties', 'dare', 'breadcrumbs')", out)
    _refused(capsys, ["--method", "ties", "--top", "0.1", *src],
             "ties takes no top; its hyper-parameters: density, scale", out)
    _refused(capsys, ["--method", "dare", "--density", "0", *src], "density must be in (0, 1]", out)
    _refused(capsys, ["--method", "ties", "--base", runs["base"], "--workdir", out],
             "the following arguments are required: --from", out)


def test_refuses_an_output_that_holds_something(runs, tmp_path, capsys):
    taken = tmp_path / "taken"
    shutil.copytree(runs["full"], taken)   # a run
    _refused(capsys, ["--method", "ties", "--base", runs["base"], "--from", runs["full"], "--workdir", str(taken)],
             "is not empty (it may hold a run); merge never overwrites", str(taken))
    _refused(capsys, ["--method", "ties", "--base", runs["base"], "--from", runs["full"], "--workdir",
                      os.path.join(runs["full"], "merged")], "is inside the input", os.path.join(runs["full"], "m"))


def test_refuses_missing_and_corrupt_workdirs(runs, tmp_path, capsys):
    out = str(tmp_path / "out")
    (tmp_path / "empty").mkdir()
    for bad, needle in ((str(tmp_path / "missing"), "is not a directory"),
                        (str(tmp_path / "empty"), "not a routezoo training workdir")):
        _refused(capsys, ["--method", "ties", "--base", runs["base"], "--from", bad, "--workdir", out], needle, out)
        _refused(capsys, ["--method", "ties", "--base", bad, "--from", runs["full"], "--workdir", out], needle, out)
    broken = str(tmp_path / "broken")
    shutil.copytree(runs["full"], broken)
    state_dir = os.path.join(broken, "checkpoints", "3", "state")
    victim = max((os.path.join(d, n) for d, _, names in os.walk(state_dir) for n in names), key=os.path.getsize)
    with open(victim, "r+b") as f:
        f.truncate(os.path.getsize(victim) // 2)
    _refused(capsys, ["--method", "ties", "--base", runs["base"], "--from", broken, "--workdir", out],
             "no intact checkpoint", out)
    adapterless = str(tmp_path / "adapterless")
    shutil.copytree(runs["lora"], adapterless)
    shutil.rmtree(os.path.join(adapterless, "adapter"))
    _refused(capsys, ["--method", "ties", "--base", runs["base"], "--from", adapterless, "--workdir", out],
             "without a readable adapter", out)


def test_refuses_runs_of_another_base(data_dir, runs, tmp_path, capsys):
    out = str(tmp_path / "out")
    argv = ["--method", "ties", "--base", runs["base"], "--workdir", out, "--from"]
    wider = _config_only(tmp_path / "wider", tiny_config(data_dir, **{"model.d_model": 64,
                                                                       "init.from_workdir": runs["base"]}))
    _refused(capsys, [*argv, f"{runs['full']},{wider}"], "is a run of another model than --base", out)
    _refused(capsys, [*argv, wider], "model.d_model: 64 here, 32 in the base", out)
    elsewhere = _config_only(tmp_path / "elsewhere", tiny_config(data_dir, **{"init.from_workdir": runs["full"]}))
    _refused(capsys, [*argv, elsewhere], f"was fine-tuned from {runs['full']} (init.from_workdir), not from", out)
    scratch = _config_only(tmp_path / "scratch", tiny_config(data_dir))
    _refused(capsys, [*argv, scratch], "was trained from scratch", out)
    hf = _config_only(tmp_path / "hf", tiny_config(data_dir, **{"init.from_hf": str(tmp_path / "hf_model")}))
    _refused(capsys, [*argv, hf], "from the Hugging Face checkpoint", out)
    # a LoRA whose adapter belongs to another base (its stored fingerprint)
    foreign = str(tmp_path / "foreign")
    shutil.copytree(runs["lora"], foreign)
    meta_path = os.path.join(foreign, "adapter", "adapter.json")
    meta = json.load(open(meta_path))
    meta["base_fingerprint"] = "0123456789abcdef"
    json.dump(meta, open(meta_path, "w"))
    _refused(capsys, [*argv, foreign], "is not an adapter on --base", out)
    # an adapter run as the base
    _refused(capsys, ["--method", "ties", "--base", runs["lora"], "--from", runs["full"], "--workdir", out],
             "is an adapter run (adapter.method='lora')", out)


def test_usage_lists_the_command_and_its_methods(capsys):
    assert cli.main(["merge", "--help"]) == 0
    assert "--method {task_arithmetic,ties,dare,breadcrumbs}" in capsys.readouterr().out
    assert cli.main(["--help"]) == 0
    assert "merge     merge fine-tunes of one base" in capsys.readouterr().out
